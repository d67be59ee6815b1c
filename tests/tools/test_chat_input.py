"""tools/chat.py's input: where the interactive conversation is read from."""

import sys

from tests.tools.test_chat import refused_line
from tools.chat import main as chat_main


def test_interactive_chat_with_stdin_closed_is_refused_before_the_model_loads(tmp_path, monkeypatch, capsys):
    """``tools/chat.py FOLDER <&-`` loaded the model, then ended in a traceback (``RuntimeError: input(): lost
    sys.stdin``); ``--prompt`` needs no stdin."""
    monkeypatch.setattr(sys, 'stdin', None)
    assert refused_line(chat_main, [str(tmp_path)], capsys).endswith(
        'error: no --prompt, and stdin is closed: there is nothing to read the conversation from; give --prompt, or '
        'run it from a terminal or with a pipe')
