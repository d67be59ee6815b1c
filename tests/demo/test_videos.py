"""The demo's synthetic videos: balanced answers, files the data set reads, and answers that need more than one
frame (the middle frame is the same whichever way a shape moves; both colours are there by then)."""

import json
from collections import Counter

import numpy as np

from xtuner_plugins.data.video import load_video
from xtuner_plugins.demo.scenes import COLOURS
from xtuner_plugins.demo.videos import VIDEO_ANSWERS, make_video_data


def centre(frame, colour):
    """The centre of ``colour``'s pixels in a frame (None when it is not there)."""
    a = np.asarray(frame).astype(int)
    mask = (np.abs(a - np.array(COLOURS[colour])).sum(-1) < 60)
    if not mask.any():
        return None
    ys, xs = np.nonzero(mask)
    return xs.mean(), ys.mean()


def test_videos_answer_only_with_their_frames(tmp_path):
    paths = make_video_data(str(tmp_path), n_sft=24, n_test=24, seed=0, frames=8)
    again = make_video_data(str(tmp_path / 'again'), n_sft=24, n_test=24, seed=0, frames=8)
    assert open(paths['test']).read() == open(again['test']).read()
    samples = [json.loads(line) for line in open(paths['test'])]
    assert Counter(s['kind'] for s in samples) == {k: 8 for k in VIDEO_ANSWERS}
    for s in samples:
        frames, info = load_video(f"{paths['images']}/{s['video']}", 8)
        assert info.total == 8 and s['conversations'][0]['value'].startswith('<video>\n')
        answer, meta = s['conversations'][1]['value'], s['meta']
        if s['kind'] == 'first_colour':
            seen = [(centre(f, answer) is not None, centre(f, meta['second']) is not None) for f in frames]
            assert seen[0] == (True, False) or seen[0] == (meta['starts'][0] == 0, False)
            assert seen[4] == (True, True)  # the middle frame shows both
            first = min(i for i, (a, _) in enumerate(seen) if a)
            assert first < min(i for i, (_, b) in enumerate(seen) if b)
        else:
            axis = 0 if s['kind'] == 'motion_x' else 1
            track = [centre(f, meta['colour'])[axis] for f in frames]
            moved = track[-1] - track[0]
            assert (moved > 0) == (answer in ('right', 'down')) and abs(moved) >= 8
