"""web/server.py's launch: what the server says when it starts."""

import types

from tests.web.test_uploads import free_port
from xtuner_plugins.web.app import WebChat, build_app
from xtuner_plugins.web.server import launch

STUB = types.SimpleNamespace(folder='stub', format='official', tiling={})


def test_the_start_says_where_it_listens_and_not_how_to_share(capsys):
    """gradio's 'To create a public link, set `share=True` in `launch()`' told the web demo's user of an option
    tools/web_demo.py does not have (share is off on purpose: gradio's tunnel would put the model on the
    internet); its 'Running on local URL' line stays."""
    port = free_port()
    app = build_app(WebChat(STUB, max_new_tokens=4))
    launch(app, '127.0.0.1', port, prevent_thread_lock=True)
    try:
        said = capsys.readouterr().out
        assert f'Running on local URL:  http://127.0.0.1:{port}' in said and 'share' not in said, said
        assert app.is_running
    finally:
        app.close()
    capsys.readouterr()
    launch(app, '127.0.0.1', port, prevent_thread_lock=True, quiet=True)   # quiet: nothing
    try:
        assert capsys.readouterr().out == ''
    finally:
        app.close()
