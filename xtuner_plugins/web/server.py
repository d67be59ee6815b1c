"""Serving the web demo's app: the address and port checked before anything loads, gradio's queue and session
limits, offline defaults. ``tools/serve.py`` checks its address with the same functions."""

from __future__ import annotations

import os
from typing import List, Optional

from xtuner_plugins.web.guard import SESSION_CAPACITY, start_forgetting

#: requests waiting at once, each holding its uploads (gradio's queue keeps any number: a flood fills the memory)
MAX_QUEUE = 16

#: the largest body of a request other than an upload (those have --max-file-size): the page sends its chat history
#: back with each question, which gradio read and parsed whatever its size (a 300 MB one took 1.9 GB more, and was
#: sent back twice); a conversation's text is bounded by the LLM's context, its questions by MAX_QUESTION_CHARS
MAX_REQUEST_BYTES = 16 << 20

# Fonts the browser has: gradio's default theme loads Google's fonts, which an offline machine cannot reach.
SYSTEM_FONTS = ('system-ui', 'ui-sans-serif', 'sans-serif')
MONO_FONTS = ('ui-monospace', 'monospace')


def listen_address(host: str, port: int):
    """``(family, address)`` to bind for ``host`` (a name, IPv4 or IPv6); ``OSError`` naming a host that does not
    resolve."""
    import socket
    try:
        family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    except (socket.gaierror, UnicodeError) as exc:
        raise OSError(f'--host {host} is not an address to listen on ({getattr(exc, "strerror", None) or exc})') \
            from None
    return family, address


def port_problem(host: str, port: int, hint: str = 'give another with --port') -> str:
    """Why the server cannot listen on ``host``:``port`` (``''``: it can): the port in use (``hint`` says what to
    do), a host that does not resolve or is not this machine's (it was all "in use", IPv6 addresses too)."""
    import errno
    import socket
    try:
        family, address = listen_address(host, port)
    except OSError as exc:
        return str(exc)
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(address)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return f'port {port} on {host} is in use; {hint}'
            return f'cannot listen on --host {host} --port {port}: {exc.strerror or exc}'
    return ''


def is_loopback(host: str) -> bool:
    """Whether ``host`` names this machine only (127.0.0.1, localhost, ::1): a server there is not the network's."""
    import ipaddress
    import socket
    try:
        return ipaddress.ip_address(host.strip('[]')).is_loopback
    except ValueError:
        pass
    try:
        return all(ipaddress.ip_address(info[4][0]).is_loopback for info in socket.getaddrinfo(host, None))
    except (OSError, ValueError, UnicodeError):
        return False


def network_warning(prog: str, host: str, port: int, guarded: bool, lacking: str, option: str,
                    can: str = 'use the model') -> str:
    """``PROG: warning: ...`` for a server other machines reach (``host`` not this machine's only) with nothing
    asked of a client (not ``guarded``: ``lacking`` it, ``option`` to give; ``can``: what anyone can do there);
    ``''`` otherwise."""
    if guarded or is_loopback(host):
        return ''
    return (f'{prog}: warning: --host {host} serves the network without {lacking}: anyone who reaches port {port} '
            f'can {can}; give {option} to ask for one')


class BodyLimit:
    """ASGI middleware: a request's body past ``limit`` bytes, on any path but ``exempt`` (gradio's uploads, which
    it limits itself), is answered 413 when its length is given, and cut off where it passes the limit when not
    (the app sees the client go away), before the app reads it."""

    def __init__(self, app, limit: int = MAX_REQUEST_BYTES, exempt: tuple = ('/gradio_api/upload',)):
        self.app, self.limit, self.exempt = app, limit, exempt

    async def __call__(self, scope, receive, send):
        if scope['type'] != 'http' or scope['path'].rstrip('/').endswith(self.exempt):
            return await self.app(scope, receive, send)
        length = dict(scope.get('headers') or ()).get(b'content-length', b'0')
        if not length.isdigit() or int(length) > self.limit:
            message = f'the request is over {self.limit:,} bytes (uploads have their own limit)'.encode()
            await send({'type': 'http.response.start', 'status': 413,
                        'headers': [(b'content-type', b'text/plain; charset=utf-8'),
                                    (b'content-length', str(len(message)).encode())]})
            return await send({'type': 'http.response.body', 'body': message})
        read = 0

        async def limited():
            nonlocal read
            message = await receive()
            if message['type'] == 'http.request':
                read += len(message.get('body', b''))
                if read > self.limit:
                    return {'type': 'http.disconnect'}
            return message

        return await self.app(scope, limited, send)


def port_free(host: str, port: int) -> bool:
    return not port_problem(host, port)


def launch(app, host: str = '127.0.0.1', port: int = 7860, allowed_paths: Optional[List[str]] = None,
           max_queue: int = MAX_QUEUE, **kwargs):
    """Serve ``app`` (blocking unless ``prevent_thread_lock=True``); a port in use is a clear error, not
    gradio's search for another one. Past ``max_queue`` requests waiting, gradio tells a new one the queue is full;
    a request's body past :data:`MAX_REQUEST_BYTES` (uploads aside) is refused (:class:`BodyLimit`). gradio's start
    is quiet (its ``quiet``), its address said here: gradio said too 'To create a public link, set `share=True`',
    an option the web demo does not have (its tunnel would put the model on the internet)."""
    import gradio as gr
    problem = port_problem(host, port)
    if problem:
        raise OSError(problem)
    from starlette.middleware import Middleware
    theme = gr.themes.Default(font=list(SYSTEM_FONTS), font_mono=list(MONO_FONTS))
    app_kwargs = dict(kwargs.pop('app_kwargs', None) or {})
    app_kwargs['middleware'] = list(app_kwargs.get('middleware') or ()) + [Middleware(BodyLimit)]
    start_forgetting(app)   # gradio keeps every finished event's request (guard.py)
    quiet, wait = kwargs.pop('quiet', False), not kwargs.pop('prevent_thread_lock', False)
    result = app.queue(max_size=max_queue).launch(server_name=host, server_port=port, share=False, ssr_mode=False,
                                                  show_error=True, theme=theme, allowed_paths=allowed_paths,
                                                  footer_links=['api'], state_session_capacity=SESSION_CAPACITY,
                                                  app_kwargs=app_kwargs, quiet=True, prevent_thread_lock=True,
                                                  **kwargs)
    if not quiet:
        print(f'* Running on local URL:  {app.local_url.rstrip("/")}', flush=True)
    if wait:
        app.block_thread()   # as gradio's launch does when not told prevent_thread_lock
    return result


def environment_defaults() -> None:
    """Offline: no usage statistics, no update check."""
    os.environ.setdefault('GRADIO_ANALYTICS_ENABLED', 'False')
    os.environ.setdefault('HF_HUB_DISABLE_TELEMETRY', '1')
