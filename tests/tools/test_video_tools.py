"""tools/chat.py --video on a converted folder: the answer is the training model's greedy answer on the data set's
video item (the fixtures of tests/models/test_video_export.py); a bad video stops before the model loads."""

import pytest

from tests.models.test_video_export import QUESTION, greedy, official, setup  # noqa: F401 (fixtures)
from tools.chat import main as chat_main


def test_chat_tool_answers_about_a_video(setup, official, capsys):  # noqa: F811
    expected = greedy(setup['model'], setup['ids'], setup['tiles'])
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
