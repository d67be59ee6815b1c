"""configs/finetune_full_packed_online.py trains on the tiny models, and a run rolled back to a mid-epoch checkpoint
and resumed gives the uninterrupted run's losses: each DataLoader worker's stream (position and buffer) comes back
from the checkpoint (StreamStateHook), no batch drawn again."""

import os
import shutil

import pytest

from tests.configs.conftest import ROOT, tiny_options
from tests.train_utils import run_train
from xtuner_plugins.engine.checkpointing import atomic_write

CONFIG = os.path.join(ROOT, 'configs', 'finetune_full_packed_online.py')


def options(tiny):
    opts = {k.replace('train_dataloader.dataset.', 'train_dataloader.dataset.dataset.'): v
            for k, v in tiny_options(tiny, tiny['mixed'], repeat=6).items() if 'sampler' not in k}
    opts.update({'train_dataloader.batch_size': 1, 'train_dataloader.num_workers': 2,
                 'train_dataloader.dataset.max_tokens': 600, 'train_dataloader.dataset.max_tiles': 12,
                 'train_dataloader.dataset.max_buffer_size': 2, 'max_iters': 6,
                 'default_hooks.checkpoint.interval': 3, 'default_hooks.checkpoint.max_keep_ckpts': -1})
    return opts


@pytest.mark.slow
def test_online_packing_trains_and_resumes_exactly(tiny, tmp_path):
    full = run_train(CONFIG, str(tmp_path / 'full'), cfg_options=options(tiny))
    assert full.ok, full.summary()
    assert sorted(full.losses) == list(range(1, 7))
    work = tmp_path / 'rolled_back'
    shutil.copytree(tmp_path / 'full', work, ignore=shutil.ignore_patterns('iter_6.pth', '2026*'))
    atomic_write(str(work / 'iter_3.pth'), work / 'last_checkpoint')
    resumed = run_train(CONFIG, str(work), cfg_options={**options(tiny), 'resume': True})
    assert resumed.ok, resumed.summary()
    assert 'data stream resumed at iteration 3' in resumed.log, resumed.log[-3000:]
    assert 'Advance dataloader' in resumed.log  # MMEngine's replay, answered without drawing a batch
    after = {i: v for i, v in resumed.losses.items() if i > 3}
    assert sorted(after) == [4, 5, 6], resumed.losses
    for i in after:
        assert after[i] == pytest.approx(full.losses[i], abs=1e-6), (i, after[i], full.losses[i])
