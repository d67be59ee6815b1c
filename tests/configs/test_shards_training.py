"""configs/finetune_lora_shards.py trains on tiny shards (tools/shard_dataset.py's), and a run rolled back to a
mid-epoch checkpoint and resumed gives the uninterrupted run's losses (StreamStateHook)."""

import os
import shutil

import pytest

from tests.configs.conftest import ROOT, tiny_options
from tests.train_utils import run_train
from xtuner_plugins.cli.shard_dataset import main as shard_dataset
from xtuner_plugins.engine.checkpointing import atomic_write

CONFIG = os.path.join(ROOT, 'configs', 'finetune_lora_shards.py')


def options(tiny, shards):
    opts = {k.replace('train_dataloader.dataset.', 'train_dataloader.dataset.dataset.'): v
            for k, v in tiny_options(tiny, tiny['mixed'], repeat=1).items()
            if 'sampler' not in k and not k.endswith(('data_files', 'image_folders', 'repeat_times'))}
    opts.update({'train_dataloader.dataset.shards': shards, 'train_dataloader.num_workers': 2, 'max_iters': 6,
                 'model.llm_lora.lora_dropout': 0.0,
                 'default_hooks.checkpoint.interval': 3, 'default_hooks.checkpoint.max_keep_ckpts': -1})
    return opts


@pytest.mark.slow
def test_shards_train_and_resume_exactly(tiny, tmp_path):
    shards = str(tmp_path / 'shards')
    assert shard_dataset(['--data', tiny['mixed'], '--image-folder', tiny['images'], '--out', shards,
                          '--samples-per-shard', '1']) == 0
    full = run_train(CONFIG, str(tmp_path / 'full'), cfg_options=options(tiny, shards))
    assert full.ok, full.summary()
    assert sorted(full.losses) == list(range(1, 7))
    work = tmp_path / 'rolled_back'
    shutil.copytree(tmp_path / 'full', work, ignore=shutil.ignore_patterns('iter_6.pth', '2026*'))
    atomic_write(str(work / 'iter_3.pth'), work / 'last_checkpoint')
    resumed = run_train(CONFIG, str(work), cfg_options={**options(tiny, shards), 'resume': True})
    assert resumed.ok, resumed.summary()
    assert 'data stream resumed at iteration 3' in resumed.log, resumed.log[-3000:]
    after = {i: v for i, v in resumed.losses.items() if i > 3}
    assert sorted(after) == [4, 5, 6], resumed.losses
    for i in after:
        assert after[i] == pytest.approx(full.losses[i], abs=1e-6), (i, after[i], full.losses[i])
