"""The demo's video recipe (``--recipe video``), shortened: image captions for the warm-up, video questions for
fine-tuning through XTuner's train script (each video N frames, one tile each), conversion, and the held-out video
questions through the converted folder with the blind and the single-frame controls. It checks that every stage
runs, that the controls are computed from the answers given, and that the model uses time: after 300 iterations
it answers the held-out video questions at >= 0.9 while the single-frame control (every frame the middle one,
which cannot tell the direction of a motion or which colour came first) stays near chance (the full recipe:
benchmarks/RESULTS.md)."""

import json

import pytest

from xtuner_plugins.demo.recipe import RECIPES
from xtuner_plugins.demo.run import main as demo_main

pytestmark = pytest.mark.slow


def test_shortened_video_demo_runs_with_the_single_frame_control(tmp_path, capsys):
    work = tmp_path / 'demo'
    assert RECIPES['video'].video == 'all'
    code = demo_main(['--recipe', 'video', '--work-dir', str(work), '--set', 'n_pretrain=100', 'n_sft=1500',
                      'n_test=30', 'pretrain_iters=20', 'finetune_iters=600', 'video_frames=6'])
    out = capsys.readouterr().out
    assert code == 0, out[-3000:]
    result = json.load(open(work / 'result.json'))
    answers = [json.loads(line) for line in open(work / 'answers.jsonl')]
    assert len(answers) == result['n'] == 30 and all(a['single'] is not None for a in answers)
    assert result['single_frame'] == sum(a['single_score'] for a in answers) / 30
    assert result['accuracy'] >= 0.9 and result['single_frame'] <= 0.7, result
    assert set(result['per_kind']) == {'motion_x', 'motion_y', 'first_colour'}
    closing = out.strip().splitlines()[-1]
    assert closing.startswith('demo accuracy: ') and f'single-frame control: {result["single_frame"]:.3f}' in closing
    train_log = open(work / 'finetune_full' / 'train_output.log').read()
    assert 'train_dataloader.dataset.min_num_frame=6' in train_log  # the videos' frames, as the recipe says
    assert 'train_dataloader.dataset.max_num_frame=6' in train_log
