"""Uploads to the web demo: at most --max-file-size (1gb by default; gradio took any size into its cache on /tmp's
disk, as a remote user chose), and gradio's cache of them cleared of files over a day old (it kept every upload
for as long as the server ran); at most --max-queue requests wait at once (gradio's queue kept any number)."""

import socket
import types

import pytest

from xtuner_plugins.data.image_io import load_image
from xtuner_plugins.web.app import DELETE_CACHE, MAX_FILE_SIZE, WebChat, build_app, for_client
from xtuner_plugins.web.server import MAX_QUEUE, MAX_REQUEST_BYTES, launch

STUB = types.SimpleNamespace(folder='stub', format='official', tiling={'max_num': 4, 'use_thumbnail': True})


def free_port():
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


def test_an_upload_over_the_limit_is_refused(tmp_path, monkeypatch):
    import httpx
    monkeypatch.setenv('GRADIO_TEMP_DIR', str(tmp_path / 'gradio'))
    app = build_app(WebChat(STUB, max_new_tokens=4))
    assert app.delete_cache == DELETE_CACHE == (3600, 86400)
    port = free_port()
    launch(app, '127.0.0.1', port, max_file_size='1kb', prevent_thread_lock=True, quiet=True)
    try:
        url = f'http://127.0.0.1:{port}/gradio_api/upload'
        small = httpx.post(url, files={'files': ('a.png', b'x' * 500)}, timeout=30)
        big = httpx.post(url, files={'files': ('b.png', b'x' * 5000)}, timeout=30)
    finally:
        app.close()
    assert small.status_code == 200 and big.status_code == 413, (small.text, big.text)
    assert app._queue.max_size == MAX_QUEUE == 16


def test_a_request_body_over_the_limit_is_refused_before_it_is_read(tmp_path, monkeypatch):
    """Only uploads were limited: any other request's body was read whole and parsed, e.g. a 300 MB chat history sent
    with a question (the page sends the history back each turn) took the server from 1.8 GB to 3.7 GB and was sent
    back twice (600 MB). Now a body past MAX_REQUEST_BYTES is answered 413 (or, sent without its length, cut off)
    before the app reads it; uploads keep their own limit, and the page's requests are answered as ever."""
    import json
    import httpx
    monkeypatch.setenv('GRADIO_TEMP_DIR', str(tmp_path / 'gradio'))
    app = build_app(WebChat(ReadsItsImage(), max_new_tokens=4))
    port = free_port()
    launch(app, '127.0.0.1', port, max_file_size='64mb', prevent_thread_lock=True, quiet=True)
    base = f'http://127.0.0.1:{port}/gradio_api'
    history = [{'role': 'user', 'content': [{'text': 'x' * MAX_REQUEST_BYTES, 'type': 'text'}]}]

    def join(history, chunked=False):
        body = json.dumps(dict(data=['Hi', None, history, None, 4, True, False, 0.7, 0.9, 8, None, 8], fn_index=0,
                               session_hash='s' + str(len(history)), event_data=None, trigger_id=None)).encode()
        content = iter([body[i:i + (1 << 20)] for i in range(0, len(body), 1 << 20)]) if chunked else body
        try:
            return httpx.post(f'{base}/queue/join', content=content, timeout=60,
                              headers={'content-type': 'application/json'}).status_code
        except httpx.HTTPError as exc:   # cut off
            return type(exc).__name__
    try:
        big, big_chunked, small = join(history), join(history, chunked=True), join([])
        upload = httpx.post(f'{base}/upload', files={'files': ('a.png', b'x' * (MAX_REQUEST_BYTES + 1))}, timeout=60)
    finally:
        app.close()
    assert big == 413 and big_chunked != 200 and small == 200, (big, big_chunked, small)
    assert upload.status_code == 200, upload.text


def test_the_web_demo_passes_its_limit(monkeypatch, capsys):
    from xtuner_plugins.cli import web_demo
    launched = []
    monkeypatch.setattr(web_demo, 'run_tool', lambda args, prog, use, errors, **tiling: use(STUB) or 0)
    monkeypatch.setattr(web_demo, 'build_app', lambda chat, title: 'app')
    monkeypatch.setattr(web_demo, 'launch', lambda app, host, port, **kwargs: launched.append(kwargs))
    port = str(free_port())
    assert web_demo.main(['folder', '--port', port]) == 0
    assert web_demo.main(['folder', '--port', port, '--max-file-size', '200MB', '--max-queue', '3']) == 0
    assert launched == [dict(max_file_size=MAX_FILE_SIZE, max_queue=MAX_QUEUE),
                        dict(max_file_size='200mb', max_queue=3)] and MAX_FILE_SIZE == '1gb'
    for bad in ('0mb', '1.5gb', 'big', '-1kb'):
        with pytest.raises(SystemExit):
            web_demo.main(['folder', '--port', port, f'--max-file-size={bad}'])
        assert f"argument --max-file-size: '{bad}': give a size such as 200mb" in capsys.readouterr().err


class ReadsItsImage:
    """A model that reads its image as every format does (``load_image``) and answers 'ok' (with no pieces to
    stream: no tokenizer is used)."""
    folder, format, tiling, tokenizer = 'stub', 'official', {}, None

    def resume(self, conversation):
        pass

    def reset(self):
        pass

    def ask(self, question, images, generation, streamer=None):
        for image in images:
            load_image(image)
        return 'ok'


def test_an_error_names_an_upload_by_its_file_name_not_the_servers_folders(tmp_path, monkeypatch):
    """The /chat endpoint's error for an upload that is not an image names the file the client sent; gradio's
    cache folder (which gradio serves by path) is not the client's to learn."""
    from gradio_client import Client, handle_file
    cache = tmp_path / 'gradio'
    monkeypatch.setenv('GRADIO_TEMP_DIR', str(cache))
    bad = tmp_path / 'holiday.png'
    bad.write_bytes(b'not an image at all')
    app = build_app(WebChat(ReadsItsImage(), max_new_tokens=4))
    port = free_port()
    launch(app, '127.0.0.1', port, prevent_thread_lock=True, quiet=True)
    try:
        client = Client(f'http://127.0.0.1:{port}/', verbose=False)
        with pytest.raises(Exception) as info:
            client.predict(handle_file(str(bad)), 'What is it?', api_name='/chat')
    finally:
        app.close()
    message = str(info.value)
    assert 'holiday.png' in message and 'image' in message, message
    assert str(cache) not in message and str(tmp_path) not in message, message


def test_for_client_keeps_file_names_only():
    message = "/tmp/g/ab12/x.png: cannot decode image (/tmp/g/ab12/x.png); /tmp/g/cd/x.png.bak stays"
    assert for_client(message, ['/tmp/g/ab12/x.png', '', None]) == \
        "x.png: cannot decode image (x.png); /tmp/g/cd/x.png.bak stays"
    # a name repr escapes (macOS screenshots: U+202F before 'AM'), quoted by Pillow's 'cannot identify image file %r'
    path = '/tmp/g/ab12/Shot at 10.00\u202fAM.png'
    said = f'cannot decode image Shot at 10.00\u202fAM.png: cannot identify image file {path!r} [corrupt_image]'
    assert '/tmp/g' in said and '/tmp/g' not in for_client(said, [path])
    assert for_client(said, [path]).endswith("image file 'Shot at 10.00\\u202fAM.png' [corrupt_image]")
