"""tools/train.py on a CPU runs under jemalloc (xtuner_plugins/malloc.py): the command executed again with the
library preloaded and the settings that keep freed blocks; once, not for a forked rank or a second call; off with
XTUNER_PLUGINS_MALLOC=glibc. The speed it buys is measured in benchmarks/RESULTS.md, not here."""

import os
import subprocess
import sys

import pytest

from tests.train_utils import REPO_ROOT
from xtuner_plugins import malloc

LIBRARY = malloc.find_jemalloc()
PROBE = ('import os, sys; from xtuner_plugins.malloc import run_under_jemalloc, jemalloc_loaded; '
         'print("start", os.getpid(), flush=True); run_under_jemalloc(); run_under_jemalloc(); '
         'print("loaded" if jemalloc_loaded() else "glibc", os.getpid(), os.environ.get("MALLOC_CONF"), sys.argv[1:])')


def probe(**env):
    """The probe's lines: started once or twice, what it ran under, its pid, MALLOC_CONF and its arguments."""
    environ = {k: v for k, v in os.environ.items() if k not in ('LD_PRELOAD', 'MALLOC_CONF', malloc.RERUN)}
    out = subprocess.run([sys.executable, '-c', PROBE, 'a b', '--x'], env=dict(environ, PYTHONPATH=REPO_ROOT, **env),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.splitlines()


def test_the_environment_it_runs_under():
    lib = '/tmp/libjemalloc.so.2'
    env = dict(PATH='/bin', XTUNER_PLUGINS_JEMALLOC=__file__)   # any existing file stands for the library
    if os.path.exists('/dev/nvidia0'):
        assert malloc.jemalloc_env(env) is None   # on a GPU machine: glibc
        return
    got = malloc.jemalloc_env(env)
    assert got['LD_PRELOAD'] == __file__ and got['MALLOC_CONF'] == malloc.JEMALLOC_CONF and got['PATH'] == '/bin'
    kept = malloc.jemalloc_env(dict(env, LD_PRELOAD='/x/libfoo.so', MALLOC_CONF='narenas:2'))
    assert kept['LD_PRELOAD'] == f'{__file__}:/x/libfoo.so' and kept['MALLOC_CONF'] == 'narenas:2'
    assert malloc.jemalloc_env(dict(env, LD_PRELOAD=__file__))['LD_PRELOAD'] == __file__   # not twice
    assert malloc.jemalloc_env(dict(env, XTUNER_PLUGINS_MALLOC='glibc')) is None
    assert malloc.jemalloc_env(dict(env, XTUNER_PLUGINS_JEMALLOC=lib + '.missing')) is None
    assert 'dirty_decay_ms:-1' in malloc.JEMALLOC_CONF and 'background_thread:false' in malloc.JEMALLOC_CONF


@pytest.mark.skipif(LIBRARY is None or os.path.exists('/dev/nvidia0'),
                    reason='no jemalloc here (make test installs libjemalloc2 from apt), or a GPU machine')
def test_a_process_runs_itself_again_under_jemalloc_once_and_keeps_its_arguments():
    lines = probe()
    assert len(lines) == 3 and lines[0].startswith('start') and lines[1].startswith('start'), lines
    pid = lines[0].split()[1]
    assert lines[1].split()[1] == pid   # os.execve: the same process (srun, torchrun and signals keep it)
    assert lines[2] == f"loaded {pid} {malloc.JEMALLOC_CONF} ['a b', '--x']", lines
    off = probe(XTUNER_PLUGINS_MALLOC='glibc')
    assert len(off) == 2 and off[1].startswith('glibc'), off   # the setting that turns it off: not run again
    missing = probe(XTUNER_PLUGINS_JEMALLOC='/nonexistent/libjemalloc.so.2')
    assert len(missing) == 2 and missing[1].startswith('glibc'), missing


@pytest.mark.skipif(os.path.exists('/dev/nvidia0'), reason='a GPU machine: tools/train.py keeps glibc there')
def test_the_train_tool_runs_itself_again_first(tmp_path):
    """tools/train.py executes itself again under the library before anything else: a file that is no library,
    named as it, is what the dynamic loader then refuses (and the run goes on under glibc)."""
    env = {k: v for k, v in os.environ.items() if k not in ('LD_PRELOAD', 'MALLOC_CONF', malloc.RERUN)}
    out = subprocess.run([sys.executable, os.path.join(REPO_ROOT, 'tools', 'train.py'), 'missing.py'], cwd=tmp_path,
                         env=dict(env, XTUNER_PLUGINS_JEMALLOC=__file__), capture_output=True, text=True,
                         timeout=300)
    lines = out.stderr.strip().splitlines()
    assert 'cannot be preloaded' in lines[0] and __file__ in lines[0], out.stderr
    assert lines[1:] == ['train: refused: missing.py: no such config file'] and out.returncode == 2, out.stderr


@pytest.mark.parametrize('given', ['/tmp', '/nonexistent/libjemalloc.so.2'])
def test_a_library_named_that_is_no_file_is_said_once(given):
    """Before, XTUNER_PLUGINS_JEMALLOC naming a folder or a missing file ran the training on glibc without a word
    (the start-up line said only "malloc: glibc")."""
    environ = {k: v for k, v in os.environ.items() if k not in ('LD_PRELOAD', 'MALLOC_CONF', malloc.RERUN)}
    out = subprocess.run([sys.executable, '-c', PROBE], capture_output=True, text=True, timeout=120,
                         env=dict(environ, PYTHONPATH=REPO_ROOT, XTUNER_PLUGINS_JEMALLOC=given))
    assert out.returncode == 0 and out.stdout.splitlines()[-1].startswith('glibc'), out.stdout + out.stderr
    assert out.stderr.strip() == (f'malloc: XTUNER_PLUGINS_JEMALLOC={given} is not a file (give the library, e.g. '
                                  f"{malloc.CANDIDATES[0]}): this run uses glibc's malloc"), out.stderr
