"""A real one-node Slurm cluster for the tests: Debian's slurm-wlm (``slurmctld``, ``slurmd``) and munge (``make
slurm`` installs them), configured in a temporary folder and started by :func:`start_cluster`, stopped by
:meth:`Cluster.stop`. Nothing outside that folder changes, except that ``munged`` is started when none answers
(and stopped again). :class:`Unavailable` says why a cluster could not be had (the tests are skipped with it).
"""

from __future__ import annotations

import getpass
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional

DAEMONS = ('slurmctld', 'slurmd', 'munged')
SBIN = ('/usr/sbin', '/usr/local/sbin', '/sbin')


class Unavailable(RuntimeError):
    """No Slurm cluster can be started here (the message says why)."""


def _which(name: str) -> Optional[str]:
    return shutil.which(name) or next((os.path.join(d, name) for d in SBIN
                                       if os.access(os.path.join(d, name), os.X_OK)), None)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _tail(path: str, n: int = 8) -> str:
    try:
        with open(path, encoding='utf-8', errors='replace') as f:
            return ' | '.join(f.read().splitlines()[-n:])
    except OSError:
        return f'({path} not written)'


def slurm_conf(root: str, cpus: int, ctld_port: int, slurmd_port: int) -> str:
    """One node (``localhost``, ``cpus`` CPUs) in one partition (``debug``), no cgroups, no accounting."""
    user = getpass.getuser()
    return '\n'.join([
        f'ClusterName=xtp{os.getpid()}', 'SlurmctldHost=localhost', f'SlurmUser={user}', f'SlurmdUser={user}',
        f'SlurmctldPort={ctld_port}', f'SlurmdPort={slurmd_port}', 'AuthType=auth/munge',
        f'StateSaveLocation={root}/state', f'SlurmdSpoolDir={root}/spool',
        f'SlurmctldPidFile={root}/slurmctld.pid', f'SlurmdPidFile={root}/slurmd.pid',
        f'SlurmctldLogFile={root}/slurmctld.log', f'SlurmdLogFile={root}/slurmd.log',
        'ProctrackType=proctrack/linuxproc', 'TaskPlugin=task/none', 'JobAcctGatherType=jobacct_gather/none',
        'AccountingStorageType=accounting_storage/none', 'SelectType=select/cons_tres', 'SelectTypeParameters=CR_CPU',
        f'FirstJobId={1000 + os.getpid() % 8000}',  # ports come from job ids: two clusters here take different ones
        # a requeued job starts again cred_expire s later (120 by default); KillWait: the grace after SIGTERM
        'MpiDefault=none', 'AuthInfo=cred_expire=5', 'ReturnToService=2', 'KillWait=20', 'MinJobAge=600',
        'SchedulerParameters=sched_interval=1',
        f'NodeName=localhost NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN',
        'PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES', ''])


@dataclass
class Cluster:
    root: str
    conf: str
    procs: Dict[str, subprocess.Popen] = field(default_factory=dict)
    munged_pid: Optional[int] = None  # started here: stopped by stop()

    @property
    def env(self) -> Dict[str, str]:
        """What a client command (srun, sbatch, scontrol) needs on top of the environment: this cluster's config."""
        return {'SLURM_CONF': self.conf}

    def run(self, *args: str, timeout: float = 60, env: Optional[Dict[str, str]] = None) -> subprocess.CompletedProcess:
        """A client command against this cluster (in ``env``, else this environment), its output captured."""
        return subprocess.run(list(args), env=dict(os.environ if env is None else env, **self.env),
                              capture_output=True, text=True, timeout=timeout)

    def job(self, job_id: str) -> Dict[str, str]:
        """``scontrol show job``'s fields (``JobState``, ``Restarts``, ...); empty once the job is gone."""
        out = self.run('scontrol', '-o', 'show', 'job', job_id).stdout
        return dict(w.split('=', 1) for w in out.split() if '=' in w)

    def logs(self) -> str:
        return '; '.join(f'{d}: {_tail(os.path.join(self.root, d + ".log"))}' for d in ('slurmctld', 'slurmd'))

    def stop(self) -> None:
        """Cancel what is left, then stop the daemons this cluster started (by their process ids)."""
        try:
            self.run('scancel', '--user', getpass.getuser(), timeout=30)
        except (OSError, subprocess.SubprocessError):
            pass
        for name in ('slurmd', 'slurmctld'):
            proc = self.procs.pop(name, None)
            if proc and proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(10)
        if self.munged_pid:
            try:
                os.kill(self.munged_pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            self.munged_pid = None


def _munge_answers() -> bool:
    try:
        token = subprocess.run(['munge', '-n'], capture_output=True, timeout=10)
        return token.returncode == 0 and subprocess.run(['unmunge'], input=token.stdout, capture_output=True,
                                                        timeout=10).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def _start_munged() -> Optional[int]:
    """Start ``munged`` (as the ``munge`` user when root) unless one answers; its pid when started here."""
    if _munge_answers():
        return None
    munged = _which('munged')
    if not munged or not os.path.exists('/etc/munge/munge.key'):
        raise Unavailable('munge is not installed (no munged or /etc/munge/munge.key): make slurm installs it')
    if os.geteuid() != 0:
        raise Unavailable('munged is not running and only root can start it here')
    os.makedirs('/run/munge', exist_ok=True)
    shutil.chown('/run/munge', 'munge', 'munge')
    done = subprocess.run(['runuser', '-u', 'munge', '--', munged], capture_output=True, text=True, timeout=30)
    deadline = time.time() + 15
    while time.time() < deadline and not _munge_answers():
        time.sleep(0.2)
    if not _munge_answers():
        raise Unavailable(f'munged did not start (exit code {done.returncode}: {done.stderr.strip()})')
    try:
        with open('/run/munge/munged.pid') as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def start_cluster(root: str, timeout: float = 60) -> Cluster:
    """Configure and start a one-node cluster under ``root``; raises :class:`Unavailable` saying why it cannot."""
    missing = [d for d in DAEMONS[:2] if not _which(d)] + [c for c in ('srun', 'sbatch', 'scontrol', 'sinfo', 'munge')
                                                         if not shutil.which(c)]
    if missing:
        raise Unavailable(f'Slurm is not installed ({", ".join(missing)} missing): make slurm installs Debian\'s '
                          'slurm-wlm and munge')
    for sub in ('state', 'spool'):
        os.makedirs(os.path.join(root, sub), exist_ok=True)
    conf = os.path.join(root, 'slurm.conf')
    with open(conf, 'w', encoding='utf-8') as f:
        f.write(slurm_conf(root, max(2, os.cpu_count() or 2), _free_port(), _free_port()))
    cluster = Cluster(root, conf)
    try:
        cluster.munged_pid = _start_munged()
        for name, extra in (('slurmctld', ['-c', '-i']), ('slurmd', ['-N', 'localhost'])):
            out = open(os.path.join(root, f'{name}.out'), 'w')
            cluster.procs[name] = subprocess.Popen([_which(name), '-D', '-f', conf, *extra], stdout=out,
                                                   stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                                   start_new_session=True)
        deadline = time.time() + timeout
        while time.time() < deadline:
            dead = [n for n, p in cluster.procs.items() if p.poll() is not None]
            if dead:
                started = _tail(os.path.join(root, dead[0] + '.out'))
                raise Unavailable(f'{", ".join(dead)} stopped at start-up: {started}; {cluster.logs()}')
            state = cluster.run('sinfo', '-h', '-o', '%T', timeout=20).stdout.strip()
            if state == 'idle':
                return cluster
            time.sleep(0.5)
        raise Unavailable(f'the node did not become idle in {timeout:.0f} s (state {state!r}): {cluster.logs()}')
    except BaseException:
        cluster.stop()
        raise


def wait_for(condition, timeout: float, interval: float = 0.2) -> bool:
    """Poll ``condition()`` until it is true (True) or ``timeout`` s passed (False)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return True
        time.sleep(interval)
    return bool(condition())


def squeue_ids(cluster: Cluster) -> List[str]:
    return cluster.run('squeue', '-h', '-o', '%i').stdout.split()
