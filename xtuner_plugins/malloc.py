"""jemalloc for training on a CPU: ``tools/train.py`` runs itself again under it, once, before anything loads.

Why: a CPU training step frees and allocates the same large tensors every step (the LLM's embedding gradient,
151,674 x 896 fp32 = 544 MB for Qwen2.5-0.5B; the LM head's bf16 copy under autocast and its fp32 gradient).
glibc's malloc hands such blocks back to the kernel or splits them for smaller ones, so each step touches fresh
pages: on the AMX Xeon (benchmarks/RESULTS.md) the embedding gradient's zero fill took 737 ms a step and each cast
of the head 238 ms, page faults for the most part (the same fill in a process that reuses its memory: 32-44 ms).
jemalloc keeps large extents by size and, with the settings here (``dirty_decay_ms:-1``: freed pages are kept, as
PyTorch's GPU caching allocator keeps device memory), gives them back to the next step already mapped; this is what
Intel's guides for PyTorch on CPUs advise (``LD_PRELOAD`` of jemalloc). ``realsize.sh`` on the AMX Xeon, against
the run before on glibc: +5 to +9% tokens/s in setting (a), +7 to +13% in (c) (models trained in full); LoRA's (b)
within the noise.

The library must be loaded before the process starts (``LD_PRELOAD``), so :func:`run_under_jemalloc` executes the
same command again (``os.execv``: the same process id, for srun, torchrun and signals) with it preloaded, when:

* this is Linux and no NVIDIA GPU is present (``/dev/nvidia0``; on a GPU the device's caching allocator holds the
  tensors that matter);
* a jemalloc library is found (:data:`CANDIDATES`, or ``XTUNER_PLUGINS_JEMALLOC=PATH``); Debian and Ubuntu:
  ``apt install libjemalloc2``; conda: ``conda install jemalloc``;
* it is not loaded already, and ``XTUNER_PLUGINS_MALLOC`` is not ``glibc`` (the setting that turns this off).

``MALLOC_CONF`` set by the user is kept. ``background_thread`` stays off: the local launcher forks its ranks from
one process (``cli/local_launch.py``), and a forked child has none of its parent's threads.
"""

from __future__ import annotations

import os
import sys
from typing import Dict, List, Optional

#: jemalloc's settings for training: large blocks kept whole and never handed back (no page faults the next step)
JEMALLOC_CONF = 'oversize_threshold:1,dirty_decay_ms:-1,muzzy_decay_ms:-1,metadata_thp:auto,background_thread:false'
CANDIDATES = ('/usr/lib/x86_64-linux-gnu/libjemalloc.so.2', '/usr/lib/aarch64-linux-gnu/libjemalloc.so.2',
              '/usr/lib64/libjemalloc.so.2', '/usr/lib/libjemalloc.so.2', '/usr/local/lib/libjemalloc.so.2',
              '/usr/local/lib/libjemalloc.so')
OFF = 'XTUNER_PLUGINS_MALLOC'   # 'glibc': no jemalloc
RERUN = '_XTUNER_PLUGINS_MALLOC_RERUN'


def find_jemalloc(environ: Optional[Dict[str, str]] = None) -> Optional[str]:
    """The jemalloc library to preload: ``XTUNER_PLUGINS_JEMALLOC``, else the first of :data:`CANDIDATES` (and
    the active conda environment's) that exists; None: none here."""
    environ = os.environ if environ is None else environ
    given = environ.get('XTUNER_PLUGINS_JEMALLOC')
    if given:
        return given if os.path.isfile(given) else None
    conda = environ.get('CONDA_PREFIX')
    found = [p for p in ((os.path.join(conda, 'lib', 'libjemalloc.so.2'),) if conda else ()) + CANDIDATES
             if os.path.isfile(p)]
    return found[0] if found else None


def jemalloc_loaded() -> bool:
    """Whether this process runs on jemalloc (preloaded, or linked in)."""
    try:
        with open('/proc/self/maps') as f:
            return 'libjemalloc' in f.read()
    except OSError:
        return False


def jemalloc_env(environ: Optional[Dict[str, str]] = None) -> Optional[Dict[str, str]]:
    """The environment that runs a command under jemalloc here (``LD_PRELOAD``, ``MALLOC_CONF``); None where
    :func:`run_under_jemalloc` would not: off, not Linux, an NVIDIA GPU present, or no library found."""
    environ = dict(os.environ if environ is None else environ)
    if environ.get(OFF, '').lower() == 'glibc' or not sys.platform.startswith('linux') or \
            os.path.exists('/dev/nvidia0'):
        return None
    library = find_jemalloc(environ)
    if library is None:
        return None
    preload = environ.get('LD_PRELOAD', '')
    if library not in preload.split(':') and library not in preload.split():
        environ['LD_PRELOAD'] = f'{library}:{preload}' if preload else library
    environ.setdefault('MALLOC_CONF', JEMALLOC_CONF)
    return environ


def run_under_jemalloc(argv: Optional[List[str]] = None) -> None:
    """Execute this process's command again under jemalloc, when :func:`jemalloc_env` says to and it is not loaded
    yet; returns (doing nothing) otherwise, or when the execution fails. Call it before anything is imported that a
    second start would load twice for nothing (torch): it costs one interpreter start (~50 ms)."""
    if os.environ.get(RERUN):   # once a process: not again in it, in ranks forked from it or commands it starts
        return
    os.environ[RERUN] = '1'   # (a library that does not load is not tried again)
    given = os.environ.get('XTUNER_PLUGINS_JEMALLOC')
    if given and not os.path.isfile(given) and os.environ.get(OFF, '').lower() != 'glibc':
        print(f'malloc: XTUNER_PLUGINS_JEMALLOC={given} is not a file (give the library, e.g. '
              f'{CANDIDATES[0]}): this run uses glibc\'s malloc', file=sys.stderr, flush=True)
    env = None if jemalloc_loaded() else jemalloc_env()
    if env is None:
        return
    argv = list(sys.orig_argv if argv is None else argv)
    try:
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, [sys.executable, *argv[1:]], env)
    except OSError:
        return
