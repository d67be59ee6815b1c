"""tools/chat.py's input: where the interactive conversation is read from, and the sampling settings."""

import sys

import pytest

from tests.tools.test_chat import refused_line
from tools.chat import main as chat_main


def test_interactive_chat_with_stdin_closed_is_refused_before_the_model_loads(tmp_path, monkeypatch, capsys):
    """``tools/chat.py FOLDER <&-`` loaded the model, then ended in a traceback (``RuntimeError: input(): lost
    sys.stdin``); ``--prompt`` needs no stdin."""
    monkeypatch.setattr(sys, 'stdin', None)
    assert refused_line(chat_main, [str(tmp_path)], capsys).endswith(
        'error: no --prompt, and stdin is closed: there is nothing to read the conversation from; give --prompt, or '
        'run it from a terminal or with a pipe')


@pytest.mark.parametrize('option, value, says', [
    ('--temperature', '-1', "argument --temperature: '-1': give a number over 0"),
    ('--top-p', '2', "argument --top-p: '2': give a number over 0 and at most 1"),
    ('--top-p', 'nan', "argument --top-p: 'nan': give a number over 0 and at most 1"),
    ('--top-k', '-3', "argument --top-k: '-3': give a whole number, 0 (no top-k filtering) or more"),
    ('--repetition-penalty', '0', "argument --repetition-penalty: '0': give a number over 0")])
def test_sampling_settings_out_of_range_are_refused_before_the_model_loads(tmp_path, capsys, option, value, says):
    """transformers refused a temperature of -1 only after the model loaded (with --do-sample), and took a top-p of
    2 without a word (no filtering)."""
    assert refused_line(chat_main, [str(tmp_path), '--prompt', 'hi', '--do-sample', option, value],
                        capsys).endswith(f'error: {says}')
