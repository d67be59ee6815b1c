"""benchmarks/realsize.py end to end with tiny models standing in for the real ones (linked under their names):
every row runs in its own process, XTuner's check passes, and the closing lines have the form scripts parse.
Real sizes run in the benchmark only."""

import os
import re
import subprocess
import sys

from xtuner_plugins.tiny import make_tiny_models
from xtuner_plugins.tiny.vision import write_tiny_siglip

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CLOSING = re.compile(r'^real-size (\w): tokens/s ours/xtuner (\S+?)( \(check FAILED[^)]*\))?; peak memory ours/xtuner '
                     r'(\S+); packed/unpacked (\S+); roofline share (\S+)%$')


def test_realsize_rows_and_closing_lines(tmp_path):
    tiny = make_tiny_models(str(tmp_path / 'tiny'))
    siglip = write_tiny_siglip(str(tmp_path / 'tiny' / 'siglip'), image_size=56)
    models = tmp_path / 'w' / 'models'
    models.mkdir(parents=True)
    for name, target in (('InternViT-300M-448px-V2_5', tiny['internvit']), ('Qwen2.5-0.5B-Instruct', tiny['llm']),
                         ('siglip-so400m-patch14-384', siglip)):
        os.symlink(target, models / name)
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=ROOT, HF_HUB_OFFLINE='1', TOKENIZERS_PARALLELISM='false')
    out = subprocess.run([sys.executable, os.path.join(ROOT, 'benchmarks', 'realsize.py'), '--work', 'w',  # relative
                          '--out', 'out', '--settings', 'a', 'c', '--rows', 'unpacked', 'packed_segments', 'xtuner',
                          '--samples', '3', '--max-tokens', '1024'], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    assert not [x for x in lines if 'FAILED' in x], out.stdout
    assert any(x.startswith('loss check') and x.endswith('(tolerance 0.02)') and '-> OK' in x for x in lines)
    closing = {m.group(1): m for m in map(CLOSING.match, lines) if m}
    assert set(closing) == {'a', 'c'}, out.stdout
    assert closing['a'].group(2) != 'n/a' and closing['a'].group(5) != 'n/a'
    # the roofline share is the LLM's (the step's time less the vision tower's forward, timed by hooks)
    rows = [x for x in lines if re.match(r'^[ac] (unpacked|packed_segments|xtuner) +s/step', x)]
    assert len(rows) == 5 and all(re.search(r"the LLM's \d+%, vision tower \d+\.\d s\)", x) for x in rows), rows
    assert 0 < float(closing['a'].group(6)) < 100
    assert closing['c'].group(2) == 'n/a' and closing['c'].group(5) != 'n/a'  # XTuner has no bilinear projector
    assert (tmp_path / 'out' / 'results.json').exists()
