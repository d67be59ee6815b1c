"""``runtime.die_with_launcher``: a rank started by torchrun ends when its launcher is killed outright (SIGKILL, out
of memory), instead of training on, orphaned, holding its devices."""

import os
import signal
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

#: the rank: arms die_with_launcher, says whether it did, then trains on (sleeps)
RANK = 'import time\nfrom xtuner_plugins.engine.runtime import die_with_launcher\n' \
       'print(die_with_launcher(), flush=True)\ntime.sleep(60)\n'
#: the launcher: starts the rank, prints its pid and whether it armed, then waits to be killed
LAUNCHER = ('import subprocess, sys, time\n'
            f'rank = subprocess.Popen([sys.executable, "-c", {RANK!r}], stdout=subprocess.PIPE, text=True)\n'
            'print(rank.pid, rank.stdout.readline().strip(), flush=True)\ntime.sleep(60)\n')


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='prctl(PR_SET_PDEATHSIG) is Linux\'s')
@pytest.mark.parametrize('torchrun', [True, False])
def test_a_torchrun_rank_ends_with_its_launcher(torchrun):
    env = dict(os.environ, PYTHONPATH=ROOT)
    env.pop('TORCHELASTIC_RUN_ID', None)
    if torchrun:
        env['TORCHELASTIC_RUN_ID'] = 'test'
    launcher = subprocess.Popen([sys.executable, '-c', LAUNCHER], stdout=subprocess.PIPE,
                                text=True, env=env)
    pid, armed = launcher.stdout.readline().split()
    pid = int(pid)
    assert armed == str(torchrun)
    launcher.kill()
    launcher.wait()
    deadline = time.time() + (10 if torchrun else 2)   # SIGTERM comes at once; 2 s shows none came
    while time.time() < deadline and _alive(pid):
        time.sleep(0.1)
    try:
        assert _alive(pid) != torchrun   # gone with its launcher under torchrun; left alone otherwise
    finally:
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie reaped by init is gone; one not yet reaped counts as ended)."""
    try:
        with open(f'/proc/{pid}/stat') as f:
            return f.read().rsplit(')', 1)[1].split()[0] != 'Z'
    except OSError:
        return False
