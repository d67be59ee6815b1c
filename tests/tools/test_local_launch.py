"""The launcher without torch (``xtuner_plugins/cli/local_launch.py``) and ``tools/train.py --nproc-per-node``:
torchrun's ``env://`` variables, every rank stopped when one fails, signals passed on, no torch in the launcher."""

import io
import os
import signal
import subprocess
import sys
import time

from unittest import mock

import pytest

from tests.train_utils import REPO_ROOT
from xtuner_plugins.cli.local_launch import GPU_DEVICES

# where the ranks are forked: not on a machine with a GPU device (started anew there, fork_refusal)
forks = pytest.mark.skipif(any(os.path.exists(p) for p in GPU_DEVICES),
                           reason='a GPU device on this machine: the ranks start anew')

LAUNCH = [sys.executable, '-m', 'xtuner_plugins.cli.local_launch']
KEYS = ('RANK LOCAL_RANK WORLD_SIZE LOCAL_WORLD_SIZE GROUP_RANK ROLE_RANK ROLE_WORLD_SIZE MASTER_ADDR MASTER_PORT '
        'OMP_NUM_THREADS').split()
# a rank: writes its variables and pid to OUT<RANK>, then does what argv[2] says
RANK = '''import os, signal, sys, time
rank = os.environ["RANK"]
open(sys.argv[1] + rank, "w").write(" ".join([str(os.getpid())] + [os.environ[k] for k in {keys!r}]))
what = sys.argv[2]
if what == "fail" and rank == "1":
    time.sleep(1); sys.exit(3)
def got(sig, frame):
    open(sys.argv[1] + "got" + rank, "w").write(signal.Signals(sig).name)
    sys.exit(128 + sig)
if what == "interrupt":
    signal.signal(signal.SIGINT, got)
    signal.signal(signal.SIGTERM, got)
time.sleep(0 if what == "ok" else 120)
'''


def _env():
    env = {k: v for k, v in os.environ.items() if k not in KEYS}
    return dict(env, PYTHONPATH=REPO_ROOT)


@pytest.fixture
def rank_script(tmp_path):
    path = tmp_path / 'rank.py'
    path.write_text(RANK.format(keys=KEYS))
    return str(path)


def _seen(prefix, n, wait=60):
    deadline = time.time() + wait
    while time.time() < deadline:
        if all(os.path.isfile(f'{prefix}{k}') and os.path.getsize(f'{prefix}{k}') for k in range(n)):
            return [open(f'{prefix}{k}').read().split() for k in range(n)]
        time.sleep(0.1)
    raise AssertionError('the ranks did not start')


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f'/proc/{pid}/stat') as f:
        return f.read().split(')')[-1].split()[0] != 'Z'


def _gone(pids, wait=20):
    deadline = time.time() + wait
    while time.time() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.1)
    return not any(_alive(p) for p in pids)


def test_each_rank_gets_the_rendezvous_variables_of_torchrun(tmp_path, rank_script):
    out = subprocess.run(LAUNCH + ['--nproc-per-node', '3', rank_script, str(tmp_path / 'r'), 'ok'], env=_env(),
                         timeout=60)
    seen = [dict(zip(KEYS, s[1:])) for s in _seen(tmp_path / 'r', 3)]
    assert out.returncode == 0
    assert [(s['RANK'], s['LOCAL_RANK'], s['ROLE_RANK']) for s in seen] == [(str(k),) * 3 for k in range(3)]
    assert {(s['WORLD_SIZE'], s['LOCAL_WORLD_SIZE'], s['ROLE_WORLD_SIZE'], s['GROUP_RANK']) for s in seen} == \
        {('3', '3', '3', '0')}
    assert {(s['MASTER_ADDR'], s['MASTER_PORT'], s['OMP_NUM_THREADS']) for s in seen} == \
        {('127.0.0.1', seen[0]['MASTER_PORT'], '1')} and int(seen[0]['MASTER_PORT']) > 0


def test_the_ranks_share_the_usable_cores_and_more_ranks_than_cores_are_said(tmp_path, rank_script):
    """Each rank was given one thread (torchrun's OMP_NUM_THREADS=1): 2 ranks on a 16-core machine trained on 2 of
    its cores. The usable cores (the process's affinity) are shared among the ranks, at least one each; more ranks
    than cores is a warning (64 ranks on 2 cores started without a word)."""
    from xtuner_plugins.cli.local_launch import oversubscribed, threads_per_rank
    assert [threads_per_rank(n, cores=16) for n in (1, 2, 3, 16, 64)] == ['16', '8', '5', '1', '1']
    assert oversubscribed(2, cores=2) is None
    assert oversubscribed(64, cores=2) == ('local_launch: warning: 64 ranks on 2 usable cores: ranks wait on each '
                                           'other for a core, and each holds its own model in memory; '
                                           '--nproc-per-node 2 or fewer trains as fast in less')
    # through the launcher, its affinity set by taskset: (cores, ranks, OMP_NUM_THREADS given) -> each rank's
    for n, (cores, nproc, given, threads) in enumerate([('0,1', 1, None, '2'), ('0', 2, None, '1'),
                                                        ('0', 2, '3', '3')]):
        env = dict(_env(), **({'OMP_NUM_THREADS': given} if given else {}))
        out = subprocess.run(['taskset', '-c', cores] + LAUNCH + ['--nproc-per-node', str(nproc), rank_script,
                                                                   str(tmp_path / f'r{n}_'), 'ok'],
                             env=env, timeout=60, capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        assert [s[-1] for s in _seen(tmp_path / f'r{n}_', nproc)] == [threads] * nproc
        assert ('local_launch: warning: 2 ranks on 1 usable cores' in out.stderr) == (cores == '0'), out.stderr


def test_a_failing_rank_stops_the_others_and_gives_its_exit_code(tmp_path, rank_script):
    start = time.time()
    out = subprocess.run(LAUNCH + ['--nproc-per-node=2', rank_script, str(tmp_path / 'r'), 'fail'], env=_env(),
                         timeout=100, capture_output=True, text=True)
    pids = [int(s[0]) for s in _seen(tmp_path / 'r', 2)]
    assert out.returncode == 3 and time.time() - start < 60, out.stderr
    assert 'local_launch: rank 1 exited with code 3: stopping the 1 other rank(s)' in out.stderr
    assert _gone(pids)


@pytest.mark.parametrize('sig, code', [(signal.SIGINT, 130), (signal.SIGTERM, 128 + signal.SIGTERM)])
def test_a_signal_is_passed_on_to_every_rank(tmp_path, rank_script, sig, code):
    """Each rank gets the signal and ends on it (exit 130 after SIGINT, as tools/train.py after Ctrl-C)."""
    proc = subprocess.Popen(LAUNCH + ['--nproc-per-node', '2', rank_script, str(tmp_path / 'r'), 'interrupt'],
                            env=_env(), stderr=subprocess.PIPE, text=True)
    pids = [int(s[0]) for s in _seen(tmp_path / 'r', 2)]
    time.sleep(0.5)  # the ranks' handlers in place
    proc.send_signal(sig)
    assert proc.wait(60) == code and _gone(pids)
    assert [(tmp_path / f'rgot{k}').read_text() for k in range(2)] == [sig.name] * 2
    assert f'local_launch: {sig.name} received: passed on to the 2 ranks' in proc.stderr.read()


def test_no_rank_outlives_a_killed_launcher(tmp_path, rank_script):
    proc = subprocess.Popen(LAUNCH + ['--nproc-per-node', '2', rank_script, str(tmp_path / 'r'), 'hang'], env=_env())
    pids = [int(s[0]) for s in _seen(tmp_path / 'r', 2)]
    proc.kill()
    proc.wait(10)
    assert _gone(pids)


def test_a_port_in_use_is_one_line(tmp_path, rank_script):
    import socket
    with socket.socket() as taken:
        taken.bind(('127.0.0.1', 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = subprocess.run(LAUNCH + ['--nproc-per-node', '2', '--master-port', str(port), rank_script,
                                       str(tmp_path / 'r'), 'ok'], env=_env(), capture_output=True, text=True,
                             timeout=60)
    assert out.returncode == 1 and not list(tmp_path.glob('r[0-9]'))
    assert out.stderr == (f'local_launch: port {port} on 127.0.0.1 (--master-port, or MASTER_PORT): address already '
                          'in use (EADDRINUSE): choose another port\n')


def test_a_port_a_run_just_closed_is_free_again():
    """A fixed MASTER_PORT was refused as in use for a minute after each run: its store's sockets in TIME_WAIT.
    Bound as torch's store binds it (SO_REUSEADDR), it is free; a port something listens on is not."""
    import errno
    import socket

    from xtuner_plugins.cli.local_launch import free_port
    with socket.socket() as server:
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(('127.0.0.1', 0))
        server.listen()
        port = server.getsockname()[1]
        client = socket.create_connection(('127.0.0.1', port))
        accepted, _ = server.accept()
        accepted.close()   # the server's side closes first: its connection waits in TIME_WAIT
        client.close()
        with pytest.raises(OSError) as err:
            free_port('127.0.0.1', port)   # still listened on
        assert err.value.errno == errno.EADDRINUSE
    assert free_port('127.0.0.1', port) == port


def test_the_launchers_import_no_torch(tmp_path, rank_script):
    """``-X importtime`` of the launcher alone (its ranks run without it), and ``tools/train.py --nproc-per-node``
    up to the launch."""
    out = subprocess.run([sys.executable, '-X', 'importtime'] + LAUNCH[1:] + ['--nproc-per-node', '2', rank_script,
                          str(tmp_path / 'r'), 'ok'], env=_env(), capture_output=True, text=True, timeout=60)
    imported = {line.split('|')[-1].strip() for line in out.stderr.splitlines() if line.startswith('import time:')}
    assert out.returncode == 0 and 'xtuner_plugins.cli' in imported
    assert not {m.split('.')[0] for m in imported} & {'torch', 'numpy', 'mmengine', 'xtuner', 'psutil'}
    probe = ('import sys\nimport xtuner_plugins.cli.local_launch as l\ncalls = []\n'
             'l.launch = lambda cmd, n, **kw: calls.append((cmd, n)) or 0\n'
             'sys.argv = ["tools/train.py", "cfg.py", "--nproc-per-node", "2", "--work-dir", "w"]\n'
             'from xtuner_plugins.cli import train\ntrain.exit_now = sys.exit   # (os._exit: nothing printed after)\n'
             'try:\n    train.main()\nexcept SystemExit as end:\n    assert end.code == 0\n'
             'print(calls[0][0][1:], calls[0][1], sorted({m.split(".")[0] for m in sys.modules} & '
             '{"torch", "mmengine", "xtuner", "numpy"}))')
    out = subprocess.run([sys.executable, '-c', probe], env=_env(), capture_output=True, text=True, timeout=60,
                         cwd=str(tmp_path))
    assert out.stdout.strip() == (f"[{str(tmp_path / 'tools' / 'train.py')!r}, 'cfg.py', '--work-dir', 'w', "
                                  "'--launcher', 'pytorch'] 2 []"), out.stderr


def test_nproc_option_and_its_bad_values():
    from xtuner_plugins.cli.train_args import nproc_option
    assert nproc_option(['c.py', '--nproc-per-node', '4', '--work-dir', 'w']) == (4, ['c.py', '--work-dir', 'w'])
    assert nproc_option(['c.py', '--nproc_per_node=2']) == (2, ['c.py'])
    assert nproc_option(['c.py']) == (None, ['c.py'])
    for bad in (['--nproc-per-node', '0'], ['--nproc-per-node=two'], ['--nproc-per-node'], ['--nproc-per-node=\u00b2'],
                ['--nproc-per-node=2', '--nproc-per-node=3']):
        with pytest.raises(SystemExit) as exit_:
            nproc_option(['c.py'] + bad)
        assert exit_.value.code == 2, bad
    assert nproc_option(['c.py', '--nproc-per-node=2', '--nproc-per-node', '2']) == (2, ['c.py'])   # the same twice


@pytest.mark.parametrize('launcher', [['--launcher', 'none'], ['--launcher=slurm']])
def test_nproc_with_another_launcher_is_refused(tmp_path, launcher):
    """``--launcher none`` with ``--nproc-per-node 2`` would start two separate trainings into one folder."""
    out = subprocess.run([sys.executable, os.path.join(REPO_ROOT, 'tools', 'train.py'), 'c.py', '--nproc-per-node',
                          '2'] + launcher, env=_env(), timeout=100, capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 2 and 'leave --launcher out' in out.stderr and 'Traceback' not in out.stderr, out.stderr


def test_ranks_that_failed_together_are_all_named(tmp_path, rank_script):
    """Ranks that ended between two of the launcher's looks (a loaded machine): one line names each."""
    from xtuner_plugins.cli.local_launch import launch
    script = tmp_path / 'both.py'
    script.write_text('import os, sys, time\ntime.sleep(0.5)\nsys.exit(5 + int(os.environ["RANK"]))\n')
    with mock.patch('sys.stderr', new=io.StringIO()) as err:
        code = launch([sys.executable, str(script)], 2, poll_s=3)
    assert code == 5 and 'rank 0 exited with code 5, rank 1 exited with code 6' in err.getvalue(), err.getvalue()


def test_resume_command_of_a_rank_of_the_local_launcher(monkeypatch):
    from xtuner_plugins.cli.train_args import resume_command
    monkeypatch.setenv('WORLD_SIZE', '2')
    monkeypatch.setenv('LOCAL_WORLD_SIZE', '2')
    monkeypatch.setenv('XTUNER_PLUGINS_LAUNCHER', 'local_launch')
    assert resume_command(['tools/train.py', 'c.py', '--work-dir', 'w', '--launcher', 'pytorch'], 'w/iter_4.pth') \
        == 'python tools/train.py --nproc-per-node 2 c.py --work-dir w --resume w/iter_4.pth'


# ------------------------------------------------------------------ ranks forked from a launcher that preloaded
# The launcher (no RANK in its environment) preloads (records its pid; 'thread' also starts a thread), then launches
# this same file as 2 ranks; a rank (forked, or started anew when forking is refused) writes OUT<RANK>: its pid,
# parent pid, the preloading process's pid (None when it preloaded nothing), argv[1] and the variables; it then does
# what argv[2] says, and an atexit handler writes OUT<RANK>exit.
FORKING = '''import atexit, os, signal, sys, threading, time
from xtuner_plugins.cli import local_launch
KEYS, out, what = {keys!r}, sys.argv[1], sys.argv[2]
SETTINGS = ('OPENBLAS_NUM_THREADS', 'JE_ARROW_MALLOC_CONF')   # what the launcher sets for its own loading
loaded = {{}}

def preload():
    loaded['by'] = os.getpid()
    if what == 'thread':
        threading.Thread(target=time.sleep, args=(60,), daemon=True).start()
    if what == 'numpy':   # OpenBLAS starts its threads when loaded, as many as OMP_NUM_THREADS says
        import numpy
    if what == 'early':   # each rank, just forked, sends SIGTERM to the launcher and is slow to set itself up
        setsid = os.setsid
        os.setsid = lambda: (os.kill(os.getppid(), signal.SIGTERM), time.sleep(1), setsid())
    return entry

def entry():
    rank = os.environ['RANK']
    atexit.register(lambda: open(out + rank + 'exit', 'w').write('atexit'))
    open(out + rank + 'env', 'w').write(' '.join(k + '=' + str(os.environ.get(k)) for k in sorted(SETTINGS)))
    open(out + rank, 'w').write(' '.join([str(os.getpid()), str(os.getppid()), str(loaded.get('by')), sys.argv[2]]
                                         + [os.environ[k] for k in KEYS]))
    if rank == '1' and what == 'fail':
        sys.exit(3)
    if rank == '1' and what == 'raise':
        raise ValueError('boom in rank 1')
    if what in ('wait', 'early'):
        time.sleep(120)
    if rank == '1' and what in ('none', 'text'):   # read as sys.exit reads them, as `sys.exit(entry())` below
        return None if what == 'none' else 'rank 1 says no'
    return 0

if 'RANK' in os.environ:
    sys.exit(entry())
sys.exit(local_launch.launch([sys.executable, __file__, out, what], 2, preload=preload))
'''


@pytest.fixture
def forking(tmp_path):
    path = tmp_path / 'forking.py'
    path.write_text(FORKING.format(keys=KEYS))
    return str(path)


def _forking(forking, tmp_path, what, env=None, **kw):
    return subprocess.run([sys.executable, forking, str(tmp_path / 'r'), what], env=dict(_env(), **(env or {})),
                          capture_output=True, text=True, timeout=120, **kw)


@forks
def test_ranks_are_forked_from_the_launcher_after_its_preload(tmp_path, forking):
    out = _forking(forking, tmp_path, 'ok')
    assert out.returncode == 0 and 'the ranks are forked from here' in out.stderr, out.stderr
    seen = _seen(str(tmp_path / 'r'), 2)
    launcher = seen[0][1]
    for rank, (pid, ppid, loaded_by, what, *values) in enumerate(seen):
        assert ppid == launcher and loaded_by == launcher != pid and what == 'ok'   # preloaded once, in the parent
        assert values == [str(rank), str(rank), '2', '2', '0', str(rank), '2', '127.0.0.1', values[8], '1']
        assert open(tmp_path / f'r{rank}exit').read() == 'atexit'   # the interpreter's exit, though os._exit ends it


@pytest.mark.parametrize('what, code, said', [('fail', 3, ''), ('raise', 1, 'ValueError: boom in rank 1'),
                                              ('none', 0, ''), ('text', 1, 'rank 1 says no')])
def test_a_forked_rank_ends_with_the_code_of_an_interpreter_that_ran_it(tmp_path, forking, what, code, said):
    out = _forking(forking, tmp_path, what)
    assert out.returncode == code and (not code or f'rank 1 exited with code {code}' in out.stderr), out.stderr
    assert said in out.stderr


@pytest.mark.parametrize('what, env, why', [pytest.param('thread', {}, '2 threads in the launcher after loading',
                                                         marks=forks),
                                            ('ok', {'XTUNER_PLUGINS_FORK_RANKS': '0'}, 'XTUNER_PLUGINS_FORK_RANKS=0'),
                                            pytest.param('ok', {'OPENBLAS_NUM_THREADS': '2'}, 'OPENBLAS_NUM_THREADS=2: '
                                                         "OpenBLAS' threads would start in the launcher", marks=forks)])
def test_ranks_start_anew_where_forking_is_refused(tmp_path, forking, what, env, why):
    """Refused before loading where that is known then (nothing loaded in the launcher for nothing: ~0.55 GiB of
    its own while the ranks load theirs), after where the loading started a thread."""
    out = _forking(forking, tmp_path, what, env)
    assert out.returncode == 0 and f'local_launch: the ranks start as new processes ({why})' in out.stderr, out.stderr
    assert [loaded_by for _, _, loaded_by, *_ in _seen(str(tmp_path / 'r'), 2)] == ['None', 'None']


@pytest.mark.parametrize('sig, code', [(signal.SIGTERM, 128 + signal.SIGTERM), (signal.SIGINT, 130)])
def test_forked_ranks_are_stopped_with_the_launcher(tmp_path, forking, sig, code):
    """A signal to the launcher reaches the forked ranks (their own handlers, not the launcher's); SIGKILL to the
    launcher kills them (PR_SET_PDEATHSIG)."""
    proc = subprocess.Popen([sys.executable, forking, str(tmp_path / 'r'), 'wait'], env=_env(),
                            stderr=subprocess.PIPE, text=True)
    pids = [int(s[0]) for s in _seen(str(tmp_path / 'r'), 2)]
    proc.send_signal(sig)
    assert proc.wait(timeout=60) == code and _gone(pids)
    proc = subprocess.Popen([sys.executable, forking, str(tmp_path / 'k'), 'wait'], env=_env(),
                            stderr=subprocess.DEVNULL)
    pids = [int(s[0]) for s in _seen(str(tmp_path / 'k'), 2)]
    proc.kill()
    proc.wait(timeout=60)
    assert _gone(pids)


@forks
@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason='OpenBLAS starts no thread on one core')
def test_ranks_are_forked_with_more_than_one_openmp_thread_asked(tmp_path, forking):
    """``OMP_NUM_THREADS=2`` (for torch's own threads in each rank) does not start numpy's OpenBLAS threads in the
    launcher, which would refuse the fork (and leave torch loaded in the launcher for nothing); what the launcher
    sets for its loading is not passed on to the ranks: their variables are those of a rank started anew."""
    env = {k: v for k, v in _env().items() if k not in ('OPENBLAS_NUM_THREADS', 'GOTO_NUM_THREADS')}
    out = subprocess.run([sys.executable, forking, str(tmp_path / 'r'), 'numpy'], env=dict(env, OMP_NUM_THREADS='2'),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and 'the ranks are forked from here' in out.stderr, out.stderr
    assert [s[-1] for s in _seen(str(tmp_path / 'r'), 2)] == ['2', '2']   # OMP_NUM_THREADS as given
    assert {open(tmp_path / f'r{k}env').read() for k in range(2)} == \
        {'JE_ARROW_MALLOC_CONF=None OPENBLAS_NUM_THREADS=None'}


@forks
def test_a_signal_to_the_launcher_while_it_forks_reaches_the_ranks(tmp_path, forking):
    """A rank is forked (and the signal passed on) only once it has its own session and handlers: a signal to a
    rank just forked would otherwise miss it (no process group yet) or meet the launcher's handler, and the rank
    would run on until SIGKILL ``STOP_GRACE_S`` later (exit 137)."""
    start = time.time()
    out = _forking(forking, tmp_path, 'early')
    assert out.returncode == 128 + signal.SIGTERM and time.time() - start < 12, out.stderr
    assert 'local_launch: SIGTERM received: passed on to the 2 ranks' in out.stderr


@forks
def test_the_train_tools_ranks_are_forked(tmp_path):
    """``tools/train.py --nproc-per-node 2`` trains the toy config on two forked ranks."""
    out = subprocess.run([sys.executable, os.path.join(REPO_ROOT, 'tools', 'train.py'),
                          os.path.join(REPO_ROOT, 'tests', 'engine', 'toy_configs', 'toy_regression.py'),
                          '--work-dir', str(tmp_path / 'w'), '--nproc-per-node', '2'],
                         env=_env(), capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert out.returncode == 0 and 'the ranks are forked from here' in out.stderr, out.stderr[-3000:]
    assert (tmp_path / 'w' / 'iter_6.pth').is_file() and 'nanobind: leaked' not in out.stderr


class _Opens:
    def __reduce__(self):
        return open, (os.environ['OPENS_MARKER'], 'w')


def test_a_rank_refused_leaves_the_others_one_line_each(tmp_path, monkeypatch):
    """Rank 1 refuses its ZeRO-3 partition of a tampered checkpoint on resume; rank 0 then loses it inside a
    collective (gloo: 'Connection closed by peer'). Rank 0 says so in one line after rank 1's refusal, where it
    printed a traceback of DeepSpeed's all-gather and the gloo error as the run's last words."""
    import torch
    toy = os.path.join(REPO_ROOT, 'tests', 'engine', 'toy_configs', 'toy_regression.py')
    train = [sys.executable, os.path.join(REPO_ROOT, 'tools', 'train.py'), toy, '--nproc-per-node', '2',
             '--deepspeed', os.path.join(REPO_ROOT, 'configs', 'deepspeed', 'zero3_cpu.json')]
    first = subprocess.run(train + ['--work-dir', str(tmp_path / 'w')], env=_env(), capture_output=True, text=True,
                           timeout=300, cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    part = tmp_path / 'w' / 'iter_6.pth' / 'zero_pp_rank_1_mp_rank_00_optim_states.pt'
    monkeypatch.setenv('OPENS_MARKER', str(tmp_path / 'ran'))
    state = torch.load(part, weights_only=False)
    state['note'] = _Opens()
    torch.save(state, part)
    out = subprocess.run(train + ['--work-dir', str(tmp_path / 'r'), '--resume', str(tmp_path / 'w' / 'iter_6.pth'),
                                  '--cfg-options', 'train_cfg.max_iters=8'],
                         env=_env(), capture_output=True, text=True, timeout=300, cwd=tmp_path)
    lines = [line for line in out.stderr.splitlines() if line.startswith(('train:', 'local_launch: rank'))]
    # the launcher ends with rank 1's code, or 1 when it saw both ranks end at once (rank 0's own exit code)
    assert out.returncode in (1, 2) and len(lines) == 3, out.stderr[-4000:]
    assert lines[0].startswith(f'train: refused: {part} names io.open'), lines
    lost = ('train: FAILED on rank 0: another rank of the run stopped first (its own line, or its launcher\'s, says '
            'why); this one then lost it (and so did the node\'s other ranks): RuntimeError: ')
    if lines[1].startswith(lost):   # rank 0 saw the lost peer before its launcher saw rank 1 end
        assert lines[2] in ('local_launch: rank 1 exited with code 2: stopping the 1 other rank(s)',
                            'local_launch: rank 0 exited with code 1, rank 1 exited with code 2'), lines
    else:   # the launcher stopped rank 0 first (SIGTERM): its line keeps the checkpoint it was resuming from
        assert lines[1] == 'local_launch: rank 1 exited with code 2: stopping the 1 other rank(s)', lines
        assert lines[2].startswith('train: stopped by SIGTERM ') and lines[2].endswith(
            f'--resume {tmp_path / "w" / "iter_6.pth"} continues from the checkpoint it was given'), lines
    assert 'Traceback' not in out.stderr and not (tmp_path / 'ran').exists()


@forks
def test_bad_cfg_options_are_refused_once_by_the_launcher(tmp_path):
    """A misspelt ``--cfg-options`` key: one line, exit 2, from the launcher that loaded the libraries anyway,
    before any rank is forked (not the same line from each rank and the launcher's own after them)."""
    out = subprocess.run([sys.executable, os.path.join(REPO_ROOT, 'tools', 'train.py'),
                          os.path.join(REPO_ROOT, 'tests', 'engine', 'toy_configs', 'toy_regression.py'),
                          '--work-dir', str(tmp_path / 'w'), '--nproc-per-node', '2', '--cfg-options', 'model.hiddn=3'],
                         env=_env(), capture_output=True, text=True, timeout=300, cwd=tmp_path)
    lines = [line for line in out.stderr.splitlines() if line.startswith(('train:', 'local_launch:'))]
    assert out.returncode == 2 and lines == [
        "train: FAILED before loading anything: --cfg-options: model.hiddn: ToyRegressionModel has no setting "
        "'hiddn'; closest: model.hidden (fix the keys named and run again)"], out.stderr
    assert not (tmp_path / 'w').exists()


@forks
def test_an_unknown_option_is_refused_once_in_the_train_tools_words(tmp_path):
    """``tools/train.py CONFIG --nproc-per-node 2 --bogus``: the train tool's usage error, once, from the launcher
    (exit 2), naming train.py (not the launcher that loaded its libraries)."""
    out = subprocess.run([sys.executable, os.path.join(REPO_ROOT, 'tools', 'train.py'),
                          os.path.join(REPO_ROOT, 'tests', 'engine', 'toy_configs', 'toy_regression.py'),
                          '--work-dir', str(tmp_path / 'w'), '--nproc-per-node', '2', '--bogus'],
                         env=_env(), capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert out.returncode == 2 and out.stderr.count('error: unrecognized arguments: --bogus') == 1, out.stderr
    assert 'train.py: error' in out.stderr and 'local_launch' not in out.stderr, out.stderr


@forks
def test_ranks_are_forked_from_a_launcher_without_stdout(tmp_path, forking):
    """A launcher started with its stdout closed (``>&-``: ``sys.stdout`` is None) forks its ranks as it would
    start them anew."""
    out = _forking(forking, tmp_path, 'ok', preexec_fn=lambda: os.close(1))
    assert out.returncode == 0 and 'the ranks are forked from here' in out.stderr, out.stderr
    assert len(_seen(str(tmp_path / 'r'), 2)) == 2


def test_the_peers_grace_counts_from_a_rank_that_ended_before_the_wait():
    """Ctrl-C: the ranks left get PEER_GRACE_S once one has ended, also when that one ended before the wait began
    (CI: the launcher descheduled between its signal and its first look; the other rank, blocked on the ended one,
    was given the full 15 s)."""
    from xtuner_plugins.cli import local_launch

    class Rank:
        def __init__(self, code):
            self.code, self.pid = code, 2 ** 22 + 12345   # (no such process group: killpg finds none)

        def poll(self):
            return self.code

        def wait(self):
            self.code = -9 if self.code is None else self.code

    ranks = object.__new__(local_launch.Ranks)
    ranks.procs = [Rank(130), Rank(None)]   # rank 0 ended already; rank 1 never ends on the signal
    started = time.monotonic()
    killed = ranks.stop(signal.SIGINT, grace=5.0, peers=0.3)
    assert killed == [1] and time.monotonic() - started < 2.0
