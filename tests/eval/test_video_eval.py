"""Video questions in evaluation: read from a training-format jsonl (their videos checked from the headers, bad ones
named before anything is asked), asked with their frames, blind on blank frames, and once more on the middle frame
alone (the single-frame control): the report's time reliance."""

import numpy as np
import pytest

from tests.helpers import conv, write_image, write_jsonl, write_video
from xtuner_plugins.eval import Report, evaluate, read_questions
from xtuner_plugins.data import video as video_module
from xtuner_plugins.eval.questions import QuestionsError


class Model:
    """Answers 'up' when the frames it sees get brighter, 'flat' otherwise; records what it was shown."""

    def __init__(self):
        self.seen = []

    def reset(self):
        pass

    def ask(self, prompt, images, generation, video=None):
        levels = [int(np.asarray(f)[0, 0, 0]) if not isinstance(f, str) else f for f in (video or images)]
        self.seen.append((prompt, 'video' if video is not None else 'images', levels))
        return 'up' if video is not None and levels[-1] > levels[0] else 'flat'


@pytest.fixture
def data(tmp_path):
    write_video(tmp_path / 'up.mp4', [6 * i for i in range(40)])
    write_image(tmp_path / 'i.png')
    return write_jsonl(tmp_path / 'q.jsonl', [
        {'id': 'v', 'video': 'up.mp4', 'conversations': conv('Which way?', 'up', image=False)},
        {'id': 'c', 'video': 'up.mp4', 'clip': [1, 2], 'conversations': conv('<video>\nAnd here?', 'up', image=False)},
        {'id': 'i', 'image': 'i.png', 'conversations': conv('Which way?', 'flat')},
    ])


def test_video_questions_with_blind_and_single_frame_controls(data):
    questions = read_questions(data)
    assert [q.video is not None for q in questions] == [True, True, False] and questions[1].clip == (1.0, 2.0)
    model = Model()
    results = evaluate(model, questions, num_frames=4)
    shown = {(p, kind): levels for p, kind, levels in model.seen}
    middle = [(lo + hi) // 2 for lo, hi in zip(np.linspace(0, 40, 5).astype(int)[:-1],
                                               np.linspace(0, 40, 5).astype(int)[1:] - 1)]
    assert [lv // 6 for lv in model.seen[0][2]] == middle  # the frames, middle sampling
    assert model.seen[1][2] == [128] * 4  # blind: blank frames
    assert model.seen[2][2] == [model.seen[0][2][2]] * 4  # single frame: the middle one, every time
    assert len(model.seen) == 3 + 3 + 2 and ('<image>\nWhich way?', 'images') in shown
    assert [(r.score, r.blind_score, r.single_score) for r in results] == [(1, 0, 0), (1, 0, 0), (1, 1, None)]
    report = Report(results)
    s = report.summary()
    assert (s['videos'], s['video_accuracy'], s['single_frame'], s['time_reliance']) == (2, 1.0, 0.0, 1.0)
    assert 'videos: 1.000 (2), single frame: 0.000, time reliance: 1.000' in report.closing_line()
    model.seen.clear()
    evaluate(model, questions, num_frames=4, single_frame=False, blind=False)
    assert len(model.seen) == 3


def test_bad_video_questions_named_before_asking(tmp_path):
    write_video(tmp_path / 'up.mp4', [6 * i for i in range(40)])
    write_image(tmp_path / 'i.png')
    (tmp_path / 'bad.mp4').write_bytes(b'no video' * 30)
    path = write_jsonl(tmp_path / 'q.jsonl', [
        {'video': 'missing.mp4', 'conversations': conv(image=False)},
        {'video': 'bad.mp4', 'conversations': conv(image=False)},
        {'video': 'up.mp4', 'clip': [2, 9], 'conversations': conv(image=False)},
        {'video': 'up.mp4', 'image': 'i.png', 'conversations': conv()},
        {'image': 'i.png', 'conversations': conv('<video> what?')},
    ])
    with pytest.raises(QuestionsError) as err:
        read_questions(path)
    for line, reason in enumerate(['missing_video', 'corrupt_video', 'bad_clip', 'image_and_video',
                                   'video_tag_mismatch'], 1):
        assert f'{path}:{line}: ' in err.value.problems[line - 1] and f'[{reason}]' in err.value.problems[line - 1]


def test_frames_over_the_context_are_refused_before_one_is_decoded(data, monkeypatch):
    """``--frames 1000000000`` listed a billion frame numbers (gigabytes, minutes) before the prompt was found too
    long; the model's ``check_video`` now refuses them first: each video question counted as too long."""
    from xtuner_plugins.models.prompt import PromptTooLong

    class Short(Model):
        def check_video(self, num_frames):
            if num_frames * 258 > 8192:
                raise PromptTooLong(num_frames * 258, 0, 8192, 'config.json max_position_embeddings', least=True)

    decoded, real = [], video_module.choose_frames

    def choose_frames(info, n, *a):
        decoded.append(n)
        assert n < 10 ** 6, 'a billion frame numbers listed (gigabytes): refused too late'
        return real(info, n, *a)
    monkeypatch.setattr(video_module, 'choose_frames', choose_frames)
    failures = []
    results = evaluate(Short(), read_questions(data), num_frames=10 ** 9, failures=failures)
    assert [r.id for r in results] == ['i'] and not decoded
    assert [(f.id, f.reason) for f in failures] == [('v', 'too_long'), ('c', 'too_long')]
    assert 'the prompt is at least 258000000000 tokens' in failures[0].message
    evaluate(Short(), read_questions(data), num_frames=4)
    assert decoded == [4, 4]


def test_a_frame_folder_is_checked_with_the_frames_it_gives(tmp_path):
    """A folder of 3 frames asked for 40 gives 3 (InternVL's folder reader): the context check counts those 3,
    not the 40 asked for (it refused such a folder that fits)."""
    write_video(tmp_path / 'frames', [10, 90, 200])
    path = write_jsonl(tmp_path / 'q.jsonl', [
        {'id': 'f', 'video': 'frames', 'conversations': conv('Which way?', 'up', image=False)}])
    asked = []

    class Counting(Model):
        def check_video(self, num_frames):
            asked.append(num_frames)
    model = Counting()
    evaluate(model, read_questions(path), num_frames=40, blind=False, single_frame=False)
    assert asked == [3] and len(model.seen[0][2]) == 3

