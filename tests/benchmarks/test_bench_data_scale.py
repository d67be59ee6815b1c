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
    assert total > 0 and each[0][0] == os.getpid() and total == sum(pss for _, _, pss in each)


def test_env_launch_gives_each_rank_the_rendezvous_variables_and_stops_all_when_one_fails(tmp_path):
    """The torch-free launcher of ``--launcher env``: ranks 0..N-1 with torchrun's ``env://`` variables; one rank
    failing stops the others and is the launcher's exit code."""
    import subprocess
    import sys
    script = tmp_path / 'rank.py'
    script.write_text('import os, sys, time\n'
                      'keys = "RANK LOCAL_RANK WORLD_SIZE MASTER_ADDR MASTER_PORT OMP_NUM_THREADS".split()\n'
                      'open(sys.argv[1] + os.environ["RANK"], "w").write(" ".join(os.environ[k] for k in keys))\n'
                      'if sys.argv[2] == "fail" and os.environ["RANK"] == "1": sys.exit(3)\n'
                      'time.sleep(0 if sys.argv[2] == "ok" else 60)\n')
    launcher = os.path.join(os.path.dirname(__file__), '..', '..', 'benchmarks', 'env_launch.py')
    out = subprocess.run([sys.executable, launcher, '2', str(script), str(tmp_path / 'r'), 'ok'], timeout=60)
    seen = sorted((tmp_path / f'r{k}').read_text().split() for k in range(2))
    assert out.returncode == 0 and [s[:3] for s in seen] == [['0', '0', '2'], ['1', '1', '2']]
    assert seen[0][3:] == seen[1][3:] and seen[0][3] == '127.0.0.1' and seen[0][5] == '1'
    failed = subprocess.run([sys.executable, launcher, '2', str(script), str(tmp_path / 'f'), 'fail'], timeout=30)
    assert failed.returncode == 3  # rank 0 (sleeping a minute) was stopped


def test_launch_variant_swaps_torchrun_and_leaves_packages_out(tmp_path):
    import subprocess
    import sys

    from benchmarks.bench_data_scale import ROOT, launch_variant
    torchrun = [sys.executable, '-m', 'torch.distributed.run', '--nnodes=1', '--nproc_per_node=2',
                '--master_port=1', '/x/train.py', 'cfg.py', '--work-dir', 'w', '--launcher', 'pytorch']
    cmd, env = launch_variant(torchrun, {}, tmp_path, 'env', ['json'])
    assert cmd == [sys.executable, str(ROOT / 'benchmarks' / 'env_launch.py'), '2', '/x/train.py', 'cfg.py',
                   '--work-dir', 'w', '--launcher', 'pytorch']
    assert launch_variant(torchrun, {}, tmp_path, 'torchrun', []) == (torchrun, {})
    probe = 'import sys\ntry:\n import json\nexcept ImportError: sys.exit(7)'
    run = subprocess.run([sys.executable, '-c', probe], env=dict(os.environ, **env))
    assert run.returncode == 7
