"""``xtuner_plugins/deferred_imports.py``: DeepSpeed and bitsandbytes kept out of a training process until it uses
them, each check in a fresh interpreter (what the imports leave in ``sys.modules``)."""

import json
import os
import subprocess
import sys

import pytest

from tests.train_utils import REPO_ROOT
from xtuner_plugins.cli.local_launch import GPU_DEVICES

# the imports of tools/train.py's ranks, then what the probe's argv[2] asks
PROBE = '''import json, sys
from xtuner_plugins import deferred_imports
deferred_imports.install(sys.argv[1].split())
import importlib
importlib.import_module('xtuner_plugins.engine')
from xtuner.tools import train
out = {'start': sorted(m for m in ('deepspeed', 'bitsandbytes') if m in sys.modules)}
if sys.argv[2] == 'use':
    from mmengine.registry import OPTIMIZERS
    out['AdamW'] = OPTIMIZERS.get('AdamW').__module__
    out['after AdamW'] = sorted(m for m in ('deepspeed', 'bitsandbytes') if m in sys.modules)
    out['PagedAdamW8bit'] = OPTIMIZERS.get('PagedAdamW8bit').__module__
    import peft.helpers
    out['peft bnb'] = peft.helpers.bnb is sys.modules['bitsandbytes']
    import mmengine._strategy.deepspeed as strategy
    out['strategy before'] = strategy.deepspeed is None
    strategy.DeepSpeedStrategy(config=dict(train_micro_batch_size_per_gpu=1))
    out['strategy'] = strategy.deepspeed is sys.modules.get('deepspeed')
    out['end'] = sorted(m for m in ('deepspeed', 'bitsandbytes') if m in sys.modules)
if sys.argv[2] == 'scoped':   # a config's default_scope: its package's child registry of OPTIMIZERS
    from mmengine.registry import OPTIMIZERS, Registry
    child = Registry('optimizer', parent=OPTIMIZERS, scope='userscope')
    out['child PagedAdamW8bit'] = child.get('PagedAdamW8bit').__module__
print('PROBE ' + json.dumps(out))
'''


def _probe(argv: str, what: str) -> dict:
    out = subprocess.run([sys.executable, '-c', PROBE, argv, what], cwd=REPO_ROOT, capture_output=True, text=True,
                         timeout=600, env=dict(os.environ, PYTHONPATH=REPO_ROOT))
    lines = [line for line in out.stdout.splitlines() if line.startswith('PROBE ')]
    assert out.returncode == 0 and lines, out.stderr[-3000:]
    return json.loads(lines[-1][6:])


@pytest.mark.slow
def test_a_run_without_them_imports_neither_until_it_uses_them():
    out = _probe('configs/pretrain_mlp.py --launcher pytorch', 'use')
    assert out['start'] == [] and out['after AdamW'] == [] and out['AdamW'] == 'torch.optim.adamw'
    assert out['PagedAdamW8bit'] == 'bitsandbytes.optim.adamw'  # registered by name as MMEngine does
    assert out['peft bnb'] and out['strategy before'] and out['strategy']  # put back where they were refused
    assert out['end'] == ['bitsandbytes', 'deepspeed']


@pytest.mark.slow
def test_a_scopes_child_registry_finds_bitsandbytes_optimizers():
    """A config with ``default_scope`` builds its optimizer through its package's child registry, which reads the
    root's tables directly: the name still brings bitsandbytes in, as with eager imports."""
    out = _probe('configs/pretrain_mlp.py --launcher pytorch', 'scoped')
    assert out['start'] == [] and out['child PagedAdamW8bit'] == 'bitsandbytes.optim.adamw'


@pytest.mark.slow
def test_a_run_with_deepspeed_imports_it_at_start():
    assert _probe('configs/pretrain_mlp.py --deepspeed deepspeed_zero2', 'start')['start'] == ['deepspeed']


def test_used_packages():
    from xtuner_plugins.deferred_imports import used_packages
    assert used_packages(['c.py', '--deepspeed', 'zero2']) == {'deepspeed'}
    assert used_packages(['c.py', '--deepspeed=zero2']) == {'deepspeed'}
    assert used_packages(['c.py', '--cfg-options', 'x=deepspeed']) == set()


@pytest.mark.slow
def test_qlora_trains_on_two_ranks_of_the_local_launcher(tmp_path):
    """configs/finetune_qlora.py as the product starts 2 ranks (tools/train.py, bitsandbytes deferred until
    transformers loads the 4-bit LLM), as tests/configs/test_finetune_lora.py's one process."""
    from tests.configs.conftest import tiny_options
    from tests.helpers import tiny_workspace
    from tests.train_utils import run_train
    tiny = tiny_workspace(tmp_path / 'tiny')
    out = run_train(os.path.join(REPO_ROOT, 'configs', 'finetune_qlora.py'), str(tmp_path / 'work'), nproc=2,
                    cfg_options=tiny_options(tiny, tiny['same'], repeat=12), timeout=600)
    assert out.ok and '--nproc-per-node=2' in out.command, out.summary()
    gpu = any(os.path.exists(p) for p in GPU_DEVICES)   # there the ranks start anew (local_launch.fork_refusal)
    assert ('(a GPU is present)' if gpu else 'the ranks are forked from here') in out.log   # bitsandbytes deferred
    losses = [out.losses[i] for i in sorted(out.losses)]
    assert losses[-1] < losses[0], losses
