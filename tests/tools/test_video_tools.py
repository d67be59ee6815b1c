"""tools/chat.py --video on a converted folder: the answer is the training model's greedy answer on the data set's
video item (the fixtures of tests/models/test_video_export.py); a bad video stops before the model loads."""

import pytest

from tests.models.test_video_export import QUESTION, official, setup  # noqa: F401 (fixtures)
from tests.tools.test_export_families import greedy_decode
from tools.chat import main as chat_main


def test_chat_tool_answers_about_a_video(setup, official, capsys):  # noqa: F811
    expected = greedy_decode(setup['model'], setup['ids'], setup['tiles'])
    capsys.readouterr()
    assert chat_main([official, '--video', setup['video'], '--frames', '4', '--prompt', QUESTION,
                      '--max-new-tokens', '8']) == 0
    assert capsys.readouterr().out.strip() == expected


def test_chat_tool_names_a_bad_video(setup, tmp_path, capsys):  # noqa: F811
    bad = tmp_path / 'bad.mp4'
    bad.write_bytes(b'not a video' * 30)
    assert chat_main([str(tmp_path), '--video', str(bad), '--prompt', 'x']) == 2
    assert f'chat: error: {bad}: cannot read video' in capsys.readouterr().err
    with pytest.raises(SystemExit):
        chat_main([str(tmp_path), '--video', str(bad), '--image', 'a.png', '--prompt', 'x'])
    assert 'give --image or --video, not both' in capsys.readouterr().err


def test_chat_tool_refuses_more_frames_than_the_context_holds_before_reading_them(setup, official, capsys,  # noqa: F811
                                                                                   monkeypatch):
    """--frames 3000 (6 tokens a frame at least, 8192 in the context): every frame was loaded and tiled, and the
    prompt built, before it was found too long (--frames 200000: past 5 minutes and 12 GB); now refused first."""
    from xtuner_plugins.data import video
    from xtuner_plugins.models import inference
    loaded, decoded, real = [], [], inference.load_image
    monkeypatch.setattr(inference, 'load_image', lambda im, *a, **kw: loaded.append(1) or real(im, *a, **kw))
    real_choose = video.choose_frames

    def choose_frames(info, n, *a):
        decoded.append(n)
        assert n < 10 ** 6, 'a billion frame numbers listed (gigabytes): refused too late'
        return real_choose(info, n, *a)
    monkeypatch.setattr(video, 'choose_frames', choose_frames)
    capsys.readouterr()
    assert chat_main([official, '--video', setup['video'], '--frames', '3000', '--prompt', QUESTION,
                      '--max-new-tokens', '8']) == 2
    err = capsys.readouterr().err
    assert "chat: error: the prompt is at least 18000 tokens, over the LLM's context of 8192 tokens" in err, err
    assert 'lower --frames (frames of a video)' in err and 'Traceback' not in err
    assert not loaded and not decoded
    # --frames 1000000000 built a list of a billion frame numbers (gigabytes) before the model loaded; the
    # interactive /video the same
    assert chat_main([official, '--video', setup['video'], '--frames', str(10 ** 9), '--prompt', QUESTION]) == 2
    assert 'the prompt is at least 6000000000 tokens' in capsys.readouterr().err
    lines = iter([f'/video {setup["video"]}', '/exit'])
    monkeypatch.setattr('builtins.input', lambda prompt: next(lines))
    assert chat_main([official, '--frames', str(10 ** 9)]) == 0
    assert '(not attached: the prompt is at least 6000000000 tokens' in capsys.readouterr().out
    assert not loaded and not decoded


def test_eval_tool_asks_video_questions_with_both_controls(setup, official, tmp_path, capsys):  # noqa: F811
    import json

    from tests.helpers import write_jsonl
    from tools.eval import main as eval_main
    data = write_jsonl(tmp_path / 'q.jsonl', [
        {'id': 'v', 'video': setup['video'], 'conversations': [{'from': 'human', 'value': QUESTION},
                                                              {'from': 'gpt', 'value': 'left'}]}])
    out = str(tmp_path / 'report.json')
    assert eval_main([official, '--data', data, '--frames', '4', '--out', out, '--max-new-tokens', '4']) == 0
    closing = capsys.readouterr().out.strip().splitlines()[-1]
    assert 'blind: ' in closing and 'videos: ' in closing and 'time reliance: ' in closing
    result = json.load(open(out))['results'][0]
    expected = greedy_decode(setup['model'], setup['ids'], setup['tiles'], steps=4)
    assert result['answer'] == expected and result['single_answer'] is not None


@pytest.fixture(scope='module')
def four_frames(setup, tmp_path_factory):  # noqa: F811
    """The setup's checkpoint converted as trained with 2 to 4 frames a video (its data set's frame range)."""
    import torch

    from tests.tools.test_convert_to_official import LORA
    from xtuner_plugins.models.export import export_checkpoint
    opts = dict(setup['opts'], **{'train_dataloader.dataset.min_num_frame': 2,
                                  'train_dataloader.dataset.max_num_frame': 4})
    return export_checkpoint(LORA, setup['ckpt'], str(tmp_path_factory.mktemp('frames') / 'official'),
                             dtype=torch.float32, cfg_options=opts, log=lambda m: None)


def test_the_frame_range_trained_with_is_recorded(official, four_frames):  # noqa: F811
    """config.json holds the data set's frame range (InternVL's 8 to 32 when it gives none), for the notes below."""
    import json
    import os
    read = [json.load(open(os.path.join(folder, 'config.json'))) for folder in (official, four_frames)]
    assert [(c['min_num_frame'], c['max_num_frame']) for c in read] == [(8, 32), (2, 4)]


def test_the_hf_layout_records_the_frame_range_too(setup, tmp_path, capsys):  # noqa: F811
    """transformers' layout wrote no range: chat over its folder said nothing of 6 frames against 4 trained."""
    import torch

    from tests.tools.test_convert_to_official import LORA
    from xtuner_plugins.models.export import export_checkpoint
    opts = dict(setup['opts'], **{'train_dataloader.dataset.min_num_frame': 2,
                                  'train_dataloader.dataset.max_num_frame': 4})
    folder = export_checkpoint(LORA, setup['ckpt'], str(tmp_path / 'hf'), fmt='hf', dtype=torch.float32,
                               cfg_options=opts, log=lambda m: None)
    assert chat_main([folder, '--video', setup['video'], '--prompt', QUESTION, '--max-new-tokens', '2',
                      '--frames', '6']) == 0
    assert "6 frames of a video are over the 4 this model was trained with at most" in capsys.readouterr().err


def test_more_frames_than_trained_is_a_note_in_chat_and_eval(setup, four_frames, tmp_path, capsys,  # noqa: F811
                                                             monkeypatch):
    """--frames over config.json's max_num_frame runs, with a note on stderr; the answer stays alone on stdout."""
    from tests.helpers import write_jsonl
    from tools.eval import main as eval_main
    note = ("note: 6 frames of a video are over the 4 this model was trained with at most (its config.json's "
            "max_num_frame)")
    ask = [four_frames, '--video', setup['video'], '--prompt', QUESTION, '--max-new-tokens', '2']
    capsys.readouterr()
    assert chat_main(ask + ['--frames', '4']) == 0
    assert 'note' not in capsys.readouterr().err
    assert chat_main(ask + ['--frames', '6']) == 0
    out, err = capsys.readouterr()
    assert f'chat: {note}' in err and 'note' not in out, err
    lines = iter([f'/video {setup["video"]}', 'Which way?', '/exit'])   # the interactive /video too
    monkeypatch.setattr('builtins.input', lambda prompt='': next(lines))
    assert chat_main([four_frames, '--frames', '6', '--max-new-tokens', '2']) == 0
    assert f'chat: {note}' in capsys.readouterr().err
    data = write_jsonl(tmp_path / 'q.jsonl', [
        {'id': 'v', 'video': setup['video'], 'conversations': [{'from': 'human', 'value': QUESTION},
                                                              {'from': 'gpt', 'value': 'left'}]}])
    for frames, said in (('4', False), ('6', True)):
        assert eval_main([four_frames, '--data', data, '--frames', frames, '--max-new-tokens', '2',
                          '--no-single-frame']) == 0
        assert (f'eval: {note}' in capsys.readouterr().err) is said
