"""A web page to chat with a vision-language model: a converted folder of any format, or a config plus checkpoint.

Usage::

    python tools/web_demo.py work_dirs/my_internvl                # then open http://127.0.0.1:7860
    python tools/web_demo.py work_dirs/my_internvl --port 7861 --max-new-tokens 256
    # straight from training, as tools/chat.py takes it
    python tools/web_demo.py --checkpoint work_dirs/finetune_lora/iter_1000.pth
    # from a script: the /chat endpoint (an image and a question in, the greedy answer out)
    python -c "from gradio_client import Client, handle_file; \\
               print(Client('http://127.0.0.1:7860/').predict(handle_file('photo.jpg'), 'What is it?', api_name='/chat'))"

The page (``xtuner_plugins.web``): upload images, chat over several turns with streamed answers, tiling and
sampling settings, a button that clears the history. It listens on 127.0.0.1 only unless ``--host`` says
otherwise (``--host 0.0.0.0`` serves the network: anyone who reaches the port can use the model, and a warning
says so unless ``--auth FILE`` asks for a user name and password: the file's ``USER:PASSWORD`` lines, kept out of
the command line, which other users of the machine can read; gradio sends them unencrypted over plain HTTP).
"""

from __future__ import annotations

import argparse
import sys

from xtuner_plugins.web.server import environment_defaults

environment_defaults()

from xtuner_plugins.cli.tool_args import (add_model_arguments, add_tiling_arguments, check_model_arguments,
                                          count_argument, fixed_port_argument, run_tool, tool_error)
from xtuner_plugins.web.app import MAX_FILE_SIZE, WebChat, build_app
from xtuner_plugins.web.kept import DEFAULT_KEPT_BYTES
from xtuner_plugins.web.server import MAX_QUEUE, launch, network_warning, port_problem


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument('--host', default='127.0.0.1', help='address to listen on (default: this machine only)')
    parser.add_argument('--port', type=fixed_port_argument, default=7860, help='port (default 7860)')
    add_tiling_arguments(parser, image_size=False)
    parser.add_argument('--max-new-tokens', type=count_argument, default=512,
                        help='the page\'s starting value (default 512; generation stops sooner at the end token, '
                             'or after 32 whitespace-only tokens in a row)')
    parser.add_argument('--title', default='InternVL chat')
    parser.add_argument('--max-file-size', type=file_size_argument, default=MAX_FILE_SIZE,
                        help=f'the largest upload taken (default {MAX_FILE_SIZE}; e.g. 200mb, 2gb)')
    parser.add_argument('--max-image-memory', type=file_size_argument, default=f'{DEFAULT_KEPT_BYTES >> 30}gb',
                        help=f'the images the server keeps for the conversations\' later turns, all sessions '
                             f'together (default {DEFAULT_KEPT_BYTES >> 30}gb); past it the images of those that '
                             'asked least recently are let go, and their next question asks for them again')
    parser.add_argument('--max-queue', type=count_argument, default=MAX_QUEUE,
                        help=f'requests waiting at once; past it a request is told the queue is full (default '
                             f'{MAX_QUEUE}; each holds its uploads in memory)')
    parser.add_argument('--auth', metavar='FILE', help='ask for a user name and password: FILE holds USER:PASSWORD '
                                                       'lines (# comments)')
    args = parser.parse_args(argv)
    check_model_arguments(parser, args)
    return args


def read_auth(path: str):
    """``[(user, password), ...]`` of an ``--auth`` file's ``USER:PASSWORD`` lines; ``ValueError`` naming the file
    and line of one that is not."""
    try:
        with open(path, encoding='utf-8') as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f'--auth {path}: cannot read it ({getattr(exc, "strerror", None) or exc})') from None
    pairs = []
    for number, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith('#'):
            continue
        user, _, password = line.partition(':')
        if not user.strip() or not password:
            raise ValueError(f'--auth {path}:{number}: expected USER:PASSWORD, both non-empty')
        pairs.append((user.strip(), password))
    if not pairs:
        raise ValueError(f'--auth {path}: no USER:PASSWORD line')
    return pairs


def file_size_argument(text: str) -> str:
    """``--max-file-size``: a whole number of b, kb, mb, gb or tb (gradio's form), e.g. ``200mb``."""
    import re
    if not re.fullmatch(r'[1-9][0-9]*(b|kb|mb|gb|tb)', text.strip().lower()):
        raise argparse.ArgumentTypeError(f'{text!r}: give a size such as 200mb or 2gb (b, kb, mb, gb, tb)')
    return text.strip().lower()


def size_bytes(text: str) -> int:
    """A :func:`file_size_argument`'s bytes, as gradio counts them (1kb = 1024 b)."""
    number = text.rstrip('btkmg')
    return int(number) << (10 * ['', 'k', 'm', 'g', 't'].index(text[len(number):-1]))


def main(argv=None) -> int:
    args = parse_args(argv)
    problem = port_problem(args.host, args.port)
    if ':' in args.host and not problem:  # gradio writes http://HOST:PORT, not [HOST], and fails after the model loads
        problem = (f'--host {args.host}: gradio serves on IPv4 addresses and host names only (it cannot write an '
                   f'IPv6 address into its URL); give 0.0.0.0 for every interface, or 127.0.0.1')
    auth = None
    if not problem and args.auth:
        try:
            auth = read_auth(args.auth)
        except ValueError as exc:
            problem = str(exc)
    if problem:  # before the model loads, so the error comes at once
        return tool_error('web_demo', problem)
    warning = network_warning('web_demo', args.host, args.port, bool(auth), 'a password',
                              '--auth FILE (USER:PASSWORD lines)', can='use the model and upload files')
    if warning:
        print(warning, file=sys.stderr)

    def serve(model) -> None:
        chat = WebChat(model, args.max_new_tokens, kept_bytes=size_bytes(args.max_image_memory))
        launch(build_app(chat, title=args.title), args.host, args.port,
               max_file_size=args.max_file_size, max_queue=args.max_queue, **({'auth': auth} if auth else {}))

    return run_tool(args, 'web_demo', serve, (OSError,), max_num=args.max_num, min_num=args.min_num)


if __name__ == '__main__':
    sys.exit(main())
