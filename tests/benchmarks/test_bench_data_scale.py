"""bench_data_scale.py's data: a LLaVA-shaped .json list (or .jsonl) that json and the sample index read alike,
images the samples share, and the summed PSS of a process tree."""

import json
import os

import pytest

from benchmarks.bench_data_scale import pss_of_tree, write_data
from xtuner_plugins.data.index import scan


@pytest.mark.parametrize('fmt', ['json', 'jsonl'])
def test_the_written_set_is_what_the_index_reads(tmp_path, fmt):
    path = write_data(tmp_path, samples=7, images=3, fmt=fmt, length=fmt == 'jsonl')
    text = path.read_text()
    samples = json.loads(text) if fmt == 'json' else [json.loads(line) for line in text.splitlines()]
    data = path.read_bytes()
    assert [json.loads(data[o:o + n]) for o, n, _ in scan(str(path))] == samples and len(samples) == 7
    assert {s['image'] for s in samples} == {f'00000/{k:09d}.jpg' for k in range(3)}
    assert all(os.path.isfile(tmp_path / 'images' / s['image']) for s in samples)
    assert all(('length' in s) == (fmt == 'jsonl') for s in samples)
    assert write_data(tmp_path, samples=7, images=3, fmt=fmt, length=fmt == 'jsonl') == path  # kept


def test_pss_of_a_process_tree():
    total, each = pss_of_tree(os.getpid())
    assert total > 0 and each[0][0] == os.getpid() and total == sum(pss for _, _, pss, _ in each)
    assert 0 < each[0][3] < each[0][2]   # this process's anonymous pages: less than its PSS (its mapped libraries)


def test_the_default_launcher_is_the_products_and_packages_can_be_left_out(tmp_path, monkeypatch):
    """The 2-rank run starts as ``run_train`` starts it (local_launch, tools/train.py); ``--no-import`` makes
    packages fail to import in every process."""
    import subprocess
    import sys

    import benchmarks.bench_data_scale as bench
    seen = []

    class Stop(Exception):
        pass

    def popen(cmd, **kwargs):
        seen.append((cmd, kwargs['env']))
        raise Stop
    monkeypatch.setattr(bench.subprocess, 'Popen', popen)
    for launcher, eager in (('local', False), ('torchrun', True)):
        with pytest.raises(Stop):
            bench.first_step(tmp_path, tmp_path / 'd.json', tmp_path / 'c', 1, 1, 'x', launcher=launcher,
                             eager_imports=eager)
    (local, local_env), (torchrun, torchrun_env) = seen
    assert local[1] == str(bench.ROOT / 'tools' / 'train.py') and local[-1] == '--nproc-per-node=2'
    assert 'MASTER_PORT' in local_env and 'XTUNER_PLUGINS_EAGER_IMPORTS' not in local_env
    assert torchrun[1:3] == ['-m', 'torch.distributed.run'] and torchrun_env['XTUNER_PLUGINS_EAGER_IMPORTS'] == '1'
    monkeypatch.undo()
    env = bench.launch_variant({}, tmp_path, ['json'])
    probe = 'import sys\ntry:\n import json\nexcept ImportError: sys.exit(7)'
    run = subprocess.run([sys.executable, '-c', probe], env=dict(os.environ, **env))
    assert run.returncode == 7
