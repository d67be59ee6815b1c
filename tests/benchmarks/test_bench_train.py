"""benchmarks/bench_train.py --liger-kernel: the check gpu.sh's Liger row makes before it times anything (one
pack's loss and gradient norms without and with Liger's kernels), run end to end on the CPU with Liger's RoPE and
fused loss in Triton's interpreter (tests/models/test_liger.py says why not its RMSNorm and SwiGLU)."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.slow
def test_the_liger_row_compares_its_kernels_with_eager_before_timing(tmp_path):
    out = tmp_path / 'figures.json'
    env = dict(os.environ, TRITON_INTERPRET='1')
    proc = subprocess.run([sys.executable, os.path.join(ROOT, 'benchmarks', 'bench_train.py'), '--samples', '2',
                           '--batch', '1', '--steps', '1', '--paths', 'packed', '--no-xtuner', '--attn',
                           'sdpa_segments', '--liger-kernel', 'rope', 'fused_loss', '--json', str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    figures = json.loads(out.read_text())
    check = figures['liger_check']
    assert check['parts'] == ['rope', 'fused_loss'] and check['ok'] and check['tensors'] > 0, check
    assert check['loss_rel'] < 1e-5 and check['grad_rel'] < 1e-4, check
    assert figures['rows']['packed']['tokens_per_s'] > 0
    assert 'liger check (rope, fused_loss; one pack, before training): eager ' in proc.stdout, proc.stdout[-2000:]
