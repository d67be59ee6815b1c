"""benchmarks/bench_preference.py on tiny look-alikes at the real models' paths: both paths of a stage run, each in
its own process, and their first losses agree (the same sums, whichever positions the LM head ran at)."""

import os
import re
import subprocess
import sys

from xtuner_plugins.tiny import make_tiny_models

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_both_paths_run_and_give_the_same_first_loss(tmp_path):
    tiny = make_tiny_models(str(tmp_path / 'tiny'))
    models = tmp_path / 'w' / 'models'
    models.mkdir(parents=True)
    for name, target in (('InternViT-300M-448px-V2_5', tiny['internvit']), ('Qwen2.5-0.5B-Instruct', tiny['llm'])):
        os.symlink(target, models / name)
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=ROOT, HF_HUB_OFFLINE='1', TOKENIZERS_PARALLELISM='false')
    out = subprocess.run([sys.executable, os.path.join(ROOT, 'benchmarks', 'bench_preference.py'), '--work', 'w',
                          '--stages', 'mpo_full'], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = re.findall(r'^mpo_full +(now|before) +s/step +[\d.]+ +peak RSS +[\d.]+ GiB +loss ([\d.]+) +\(2 rows',
                      out.stdout, re.M)
    assert [path for path, _ in rows] == ['now', 'before'], out.stdout
    assert re.search(r'^mpo_full loss check: rel \S+ -> OK', out.stdout, re.M), out.stdout
