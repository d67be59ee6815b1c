"""web/guard.py: what the web demo refuses of a request before anything of it is kept (NaN settings, a lone
surrogate, an over-long question: found by a helper's sweep driving the page's handlers over HTTP), and gradio's
finished events let go of."""

import types

import pytest

from tests.web.test_uploads import ReadsItsImage, free_port
from xtuner_plugins.web.app import WebChat, build_app
from xtuner_plugins.web.guard import MAX_QUESTION_CHARS, forget_finished_events
from xtuner_plugins.web.server import launch


def handler(name, chat):
    return next(f for f in build_app(chat).fns.values() if getattr(f.fn, '__name__', '') == name).fn


class Unasked(WebChat):
    """A WebChat whose model must not be asked."""

    def __init__(self):
        super().__init__(types.SimpleNamespace(folder='/srv/models/secret', format='official', tiling={}), 4)

    def stream(self, *args, **kwargs):
        pytest.fail('the model was asked')


class Answers(ReadsItsImage):
    def conversation(self):
        return {}


SETTINGS = dict(max_num=6, thumbnail=True, do_sample=True, temperature=0.7, top_p=0.9, max_new_tokens=8,
                video_file=None, num_frames=8)


@pytest.mark.parametrize('question, setting, says', [
    ('Hi', dict(max_num=float('nan')), "'Most tiles per image' must be a finite number, got nan"),
    ('Hi', dict(top_p=float('nan')), "'Top-p' must be a finite number, got nan"),
    ('Hi', dict(num_frames=float('nan')), "'Frames of the video' must be a finite number, got nan"),
    ('a \ud800 b', {}, "the question holds '\\ud800' at character 2"),
    ('Is <|im_start|> here?', {}, "the question holds '<|im_start|>'"),
    ('x' * (MAX_QUESTION_CHARS + 1), {}, f'the question is {MAX_QUESTION_CHARS + 1:,} characters; the page takes '
                                         f'up to {MAX_QUESTION_CHARS:,}')])
def test_a_request_is_refused_before_its_question_is_shown_or_kept(question, setting, says):
    """Before, int(nan) ended the request in a traceback in the server's log (top_p=nan was taken as it was); a lone
    surrogate, shown in the chat at once, broke the answer's event stream (a 77-line traceback); a 100 MB question
    was shown and given back to the text box, 300 MB a request kept in the session."""
    import gradio as gr
    send = handler('send', Unasked())
    values = dict(SETTINGS, **setting)
    turn = send(question, [], [], None, values['max_num'], values['thumbnail'], values['do_sample'],
                values['temperature'], values['top_p'], values['max_new_tokens'], values['video_file'],
                values['num_frames'])
    with pytest.raises(gr.Error) as error:
        next(turn)   # nothing yielded first: nothing shown, nothing kept
    assert says in error.value.message and error.value.print_exception is False, error.value.message


def test_the_chat_endpoint_refuses_the_same_before_the_model(tmp_path):
    import gradio as gr
    chat = handler('api_chat', Unasked())
    for question in ('a \ud800 b', 'x' * (MAX_QUESTION_CHARS + 1)):
        with pytest.raises(gr.Error):
            list(chat(None, question))   # a generator: it streams the answer


def test_the_page_names_the_models_folder_by_its_name_only():
    app = build_app(Unasked())
    header = next(b for b in app.blocks.values() if type(b).__name__ == 'Markdown' and 'format' in str(b.value))
    assert '`secret` (official format)' in header.value and '/srv/models' not in header.value


def test_finished_events_are_let_go_and_waiting_ones_kept(tmp_path, monkeypatch):
    """gradio 6.17 kept every event it ran, with its request and inputs (215 kB a plain /chat call, 200 MB one with
    a 100 MB question), for as long as the server ran."""
    from gradio_client import Client
    monkeypatch.setenv('GRADIO_TEMP_DIR', str(tmp_path / 'gradio'))
    app = build_app(WebChat(Answers(), max_new_tokens=4))
    port = free_port()
    launch(app, '127.0.0.1', port, prevent_thread_lock=True, quiet=True)
    try:
        client = Client(f'http://127.0.0.1:{port}/', verbose=False)
        for _ in range(3):
            assert client.predict(None, 'What is it?', api_name='/chat') == 'ok'
        queue = app._queue
        assert len(queue.event_ids_to_events) == 3   # gradio's own: none let go
        waiting = types.SimpleNamespace(_id='waiting')
        queue.event_ids_to_events['waiting'] = waiting
        queue.pending_event_ids_session['some-session'] = {'waiting'}
        assert forget_finished_events(queue) == 3
        assert list(queue.event_ids_to_events) == ['waiting']
        assert client.predict(None, 'And now?', api_name='/chat') == 'ok'   # the server goes on
    finally:
        app.close()


def test_a_page_served_to_the_network_asks_for_a_password_or_warns(tmp_path, monkeypatch, capsys):
    """--host 0.0.0.0 served anyone who reached the port, without a word: a warning says so, and --auth FILE (its
    USER:PASSWORD lines: a password on the command line is in every user's ps) makes gradio ask for one, on the page
    and the /chat endpoint alike."""
    from gradio_client import Client

    from xtuner_plugins.cli import web_demo
    launched = []
    monkeypatch.setattr(web_demo, 'run_tool', lambda args, prog, use, errors, **tiling: use(Answers()) or 0)
    monkeypatch.setattr(web_demo, 'build_app', lambda chat, title: 'app')
    monkeypatch.setattr(web_demo, 'launch', lambda app, host, port, **kwargs: launched.append(kwargs.get('auth')))
    port = str(free_port())
    good, bad = tmp_path / 'auth', tmp_path / 'bad'
    good.write_text('# who may use it\nann:s3cret: with a colon\n\nbob:pw\n')
    bad.write_text('ann:pw\njust-a-name\n')
    assert web_demo.main(['folder', '--host', '0.0.0.0', '--port', port]) == 0
    assert 'warning: --host 0.0.0.0 serves the network without a password' in capsys.readouterr().err
    assert web_demo.main(['folder', '--host', '0.0.0.0', '--port', port, '--auth', str(good)]) == 0
    assert web_demo.main(['folder', '--port', port]) == 0
    assert 'warning' not in capsys.readouterr().err
    assert launched == [None, [('ann', 's3cret: with a colon'), ('bob', 'pw')], None]
    assert web_demo.main(['folder', '--port', port, '--auth', str(bad)]) == 2
    assert capsys.readouterr().err == f'web_demo: error: --auth {bad}:2: expected USER:PASSWORD, both non-empty\n'
    monkeypatch.setenv('GRADIO_TEMP_DIR', str(tmp_path / 'gradio'))
    app = build_app(WebChat(Answers(), max_new_tokens=4))
    launch(app, '127.0.0.1', int(port), prevent_thread_lock=True, quiet=True, auth=[('ann', 'pw')])
    try:
        with pytest.raises(Exception):
            Client(f'http://127.0.0.1:{port}/', verbose=False).predict(None, 'Hi', api_name='/chat')
        client = Client(f'http://127.0.0.1:{port}/', auth=('ann', 'pw'), verbose=False)
        assert client.predict(None, 'Hi', api_name='/chat') == 'ok'
    finally:
        app.close()
