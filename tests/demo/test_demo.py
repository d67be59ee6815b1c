"""The embedded demo's pipeline end to end, shortened: models, data, MLP warm-up and full fine-tuning through
XTuner's train script, conversion, answers through the converted folder's ``chat`` and the blind control.

It checks that every stage runs and leaves what the next needs, that the summary is computed from the
answers given, and that the model learned: on two of the demo's question kinds (colour and position) and a
few hundred iterations, its answers are right far more often than the blind control's (answers to the same
questions on blank images), which cannot beat the most common answer of each kind.
"""

import json
import os
import subprocess
import sys

import pytest
from mmengine.config import Config

from xtuner_plugins.demo.run import CONFIGS, REPO_ROOT, Recipe, per_kind, run_demo

pytestmark = pytest.mark.slow


def test_shortened_demo_runs_every_stage_and_learns(tmp_path):
    recipe = Recipe(kinds=('colour', 'position'), max_dynamic_patch=4, n_pretrain=100, n_sft=1600, n_test=40,
                    pretrain_iters=20, finetune_iters=800, log_interval=50, max_new_tokens=4)
    result = run_demo(str(tmp_path / 'demo'), recipe)
    assert result.n == 40 and len(result.answers) == 40
    for stage in ('pretrain', 'finetune'):
        assert result.stages[stage].checkpoint and os.path.exists(result.stages[stage].checkpoint)
        assert result.stages[stage].losses, f'{stage}: no losses logged'
    with open(os.path.join(result.official_dir, 'config.json')) as f:
        # the converted model's chat() uses the training system message (configs/demo/*.py set a short one)
        assert json.load(f)['system_message'] == Config.fromfile(CONFIGS['full']).demo_system_message
    assert os.path.isfile(os.path.join(result.official_dir, 'modeling_internvl_chat.py'))
    with open(os.path.join(result.work_dir, 'data', 'test.jsonl')) as f:
        expected = [json.loads(line)['conversations'][1]['value'] for line in f]
    assert [a.expected for a in result.answers] == expected
    correct = sum(a.correct for a in result.answers)
    assert result.accuracy == pytest.approx(correct / 40)
    assert result.blind == pytest.approx(sum(a.blind_correct for a in result.answers) / 40)
    assert result.summary() == (f'demo accuracy: {result.accuracy:.3f} (40 questions); '
                                f'blind control: {result.blind:.3f}')
    # learned: chance (the most common answer per kind) is (1/4 + 1/2) / 2 = 0.375 here
    assert result.chance == pytest.approx(0.375)
    assert result.blind <= 0.5, result.summary()
    assert result.accuracy >= 0.75 and result.accuracy >= result.blind + 0.3, (result.summary(),
                                                                                per_kind(result.answers))


def test_demo_command_line_help():
    out = subprocess.run([sys.executable, os.path.join(REPO_ROOT, 'tools', 'demo.py'), '--help'],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and '--nproc-per-node' in out.stdout
