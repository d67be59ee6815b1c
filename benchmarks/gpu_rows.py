"""Running ``gpu.py``'s rows: each a child process in its own session, with its own log and time budget within the
run's (:func:`execute`: the prepare rows together, then the others ``jobs`` at a time), killed with its DataLoader
workers past its budget, and given a status and a reason from its exit code and the figures it wrote
(:func:`finish`); a row that trains on CUDA only is skipped, by name, where there is none.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import time
from typing import List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))   # the children's working folder: the checkout


def last_line(log: str) -> str:
    """The last non-empty line of a log (an argparse error, an exception, an out-of-memory message)."""
    try:
        with open(log, errors='replace') as f:
            lines = [line.strip() for line in f if line.strip()]
    except OSError:
        return ''
    return lines[-1][:400] if lines else ''


def start(row: dict, logs: str, timeout: float, threads: Optional[int]) -> None:
    row['log'] = os.path.join(logs, os.path.basename(row['json'])[:-5] + '.log')
    row['timeout'] = round(timeout)
    if os.path.exists(row['json']):
        os.remove(row['json'])
    env = dict(os.environ, TOKENIZERS_PARALLELISM='false')
    if threads:
        env['OMP_NUM_THREADS'] = str(threads)
    with open(row['log'], 'w') as log:
        log.write('$ ' + shlex.join(row['cmd']) + '\n')
        log.flush()
        row['proc'] = subprocess.Popen(row['cmd'], stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                                       start_new_session=True, env=env)
    row['started'] = time.time()


def finish(row: dict) -> None:
    proc = row.pop('proc')
    rc = proc.poll()
    if rc is None:  # past its budget: the child and its DataLoader workers
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    row['seconds'] = round(time.time() - row.pop('started'), 1)
    figures = None
    if os.path.exists(row['json']):
        with open(row['json']) as f:
            figures = json.load(f)
    row['figures'] = figures
    if rc is None:
        row.update(status='timeout', reason=f'killed after its budget of {row["timeout"]} s')
    elif rc != 0 or figures is None:
        row.update(status='failed', reason=f'exit {rc}: {last_line(row["log"])}')
    elif row['kind'] in ('train', 'profile') and not figures.get('rows'):
        row.update(status='failed', reason=f'no figures: {figures.get("xtuner_skip") or last_line(row["log"])}')
    elif row['kind'] == 'precision' and not figures['precision']['ok']:
        row.update(status='failed', reason='bf16 and fp32 disagree beyond the tolerance')
    elif row['kind'] == 'train' and figures.get('check') is not None and not figures['check']['ok']:
        row.update(status='failed', reason="XTuner's loss check against ours failed: not the same computation")
    elif row['kind'] == 'train' and figures.get('liger_check') is not None and not figures['liger_check']['ok']:
        row.update(status='failed', reason="Liger's kernels changed the loss or gradients beyond the tolerance")
    else:
        row.update(status='ok', reason='')


def cuda_available() -> bool:
    import torch
    return torch.cuda.is_available()


def execute(rows: List[dict], out: str, deadline: float, min_start: float, jobs: int,
            cuda: Optional[bool] = None) -> None:
    """Runs the prepare rows together, then the others ``jobs`` at a time, each within its budget and the
    run's ``deadline``; a row that would start with less than ``min_start`` seconds left is not run, and one that
    trains on CUDA only (``cuda_only``) is skipped without CUDA (``cuda``: whether there is; None: find out)."""
    if cuda is None and any(r.get('cuda_only') for r in rows):
        cuda = cuda_available()
    skipped = [r for r in rows if r.get('cuda_only') and not cuda]
    for row in skipped:
        row.update(status='skipped', reason=f'needs CUDA ({row["cuda_only"]}) and this machine has none',
                   seconds=0, figures=None)
        print(f'[   0.0 s] {row["name"]}: {row["status"]}: {row["reason"]}', flush=True)
    rows = [r for r in rows if not any(r is s for s in skipped)]
    logs = os.path.join(out, 'logs')
    os.makedirs(logs, exist_ok=True)
    os.makedirs(os.path.join(out, 'raw'), exist_ok=True)
    threads = max(1, (os.cpu_count() or 1) // jobs) if jobs > 1 else None
    for batch in ([r for r in rows if r['kind'] == 'prepare'], [r for r in rows if r['kind'] != 'prepare']):
        queue, running, limit = list(batch), [], (len(batch) if batch and batch[0]['kind'] == 'prepare' else jobs)
        while queue or running:
            while queue and len(running) < limit:
                row, left = queue.pop(0), deadline - time.time()
                if left < min_start:
                    row.update(status='not run', reason=f'out of time ({max(left, 0):.0f} s of the run budget left)',
                               seconds=0, figures=None)
                    print(f'[   0.0 s] {row["name"]}: {row["status"]} {row["reason"]}', flush=True)
                    continue
                start(row, logs, min(row['budget'], left), threads)
                running.append(row)
            time.sleep(0.2)
            done = [r for r in running if r['proc'].poll() is not None or time.time() > r['started'] + r['timeout']]
            for row in done:
                running.remove(row)
                finish(row)
                print(f'[{row["seconds"]:6.1f} s] {row["name"]}: {row["status"]} {row["reason"]}', flush=True)
