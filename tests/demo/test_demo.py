"""The embedded demo's pipeline end to end, shortened: models, data, MLP warm-up and full fine-tuning through
XTuner's train script, conversion, answers through the converted folder's ``chat`` and the blind control.

It checks that every stage runs and leaves what the next needs, and that the summary is computed from the
answers given; it does not check the accuracy target (see the demo issue's note: no recipe reaches it yet).
"""

import json
import os
import subprocess
import sys

import pytest

from xtuner_plugins.demo.run import REPO_ROOT, Recipe, run_demo

pytestmark = pytest.mark.slow


def test_shortened_demo_runs_every_stage(tmp_path):
    recipe = Recipe(n_pretrain=24, n_sft=48, n_test=12, max_new_tokens=4)
    result = run_demo(str(tmp_path / 'demo'), recipe)
    assert result.n == 12 and len(result.answers) == 12
    for stage in ('pretrain', 'finetune'):
        assert result.stages[stage].checkpoint and os.path.exists(result.stages[stage].checkpoint)
        assert result.stages[stage].losses, f'{stage}: no losses logged'
    assert os.path.isfile(os.path.join(result.official_dir, 'config.json'))
    assert os.path.isfile(os.path.join(result.official_dir, 'modeling_internvl_chat.py'))
    with open(os.path.join(result.work_dir, 'data', 'test.jsonl')) as f:
        expected = [json.loads(line)['conversations'][1]['value'] for line in f]
    assert [a.expected for a in result.answers] == expected
    correct = sum(a.correct for a in result.answers)
    assert result.accuracy == pytest.approx(correct / 12)
    assert 0.0 <= result.blind <= 1.0
    assert result.summary() == (f'demo accuracy: {result.accuracy:.3f} (12 questions); '
                                f'blind control: {result.blind:.3f}')


def test_demo_command_line_help():
    out = subprocess.run([sys.executable, os.path.join(REPO_ROOT, 'tools', 'demo.py'), '--help'],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and '--nproc-per-node' in out.stdout
