"""bench_video.py runs both ways on small videos: seeking against decoding every frame, and ``--step``, the video
path's share of a tiny model's training step (figures in benchmarks/RESULTS.md)."""

import re

from benchmarks import bench_video


def test_seeking_against_every_frame(capsys):
    assert bench_video.main(['--seconds', '1', '--videos', '1', '--repeat', '1', '--size', '64x48']) == 0
    assert re.search(r'speedup vs decoding every frame: \d+\.\d\d$', capsys.readouterr().out.strip())


def test_share_of_a_training_step(capsys):
    assert bench_video.main(['--step', '--seconds', '1', '--videos', '2', '--frames', '3', '--steps', '1',
                             '--repeat', '1', '--size', '64x48']) == 0
    out = capsys.readouterr().out
    assert '2 videos as samples of 3 frames (one tile each)' in out
    share = float(re.search(r'video data share of a training step: (\d+\.\d)%$', out.strip()).group(1))
    assert 0 < share < 100
