"""The streaming configs on 2 ranks (torchrun, gloo, CPU), 2 DataLoader workers each, on the tiny models and a
data set of images, a video and text: every rank x worker reads a disjoint part of an epoch and together all of
it, and a run rolled back to a mid-epoch checkpoint and resumed on 2 ranks trains on the uninterrupted run's
samples, batch for batch (each rank's samples recorded by tests/configs/recorded/record_hook.py)."""

import json
import os
import shutil
from collections import Counter

import pytest

from tests.configs.conftest import ROOT, tiny_options
from tests.helpers import conv, write_image, write_jsonl, write_video
from tests.train_utils import run_train
from xtuner_plugins.cli.shard_dataset import main as shard_dataset
from xtuner_plugins.engine.checkpointing import atomic_write

RECORDED = os.path.join(ROOT, 'tests', 'configs', 'recorded')
RANKS, WORKERS = 2, 2


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    """8 samples (5 with an image, 1 with a video, 2 text-only), each its own FILE:LINE."""
    root = tmp_path_factory.mktemp('streams')
    for k in range(3):
        write_image(root / 'images' / f'{k}.png', size=(56 + 28 * k, 56), seed=k)
    write_video(root / 'images' / 'v.mp4', [8 * i for i in range(12)], size=(40, 30))
    samples = [{'image': f'{i % 3}.png', 'conversations': conv(answer=f'answer {i} ' + 'x' * i)} for i in range(5)]
    samples += [{'video': 'v.mp4', 'conversations': conv('Brighter?', 'brighter', image=False)}]
    samples += [{'conversations': conv(question=f'say {i}', answer='text only', image=False)} for i in range(2)]
    path = write_jsonl(root / 'data.jsonl', samples)
    return dict(file=path, images=str(root / 'images'), names=[f'{path}:{line}' for line in range(1, 9)], root=root)


def records(work_dir):
    """rank -> [{'iter', 'samples', 'stream_state'}] in iteration order."""
    out = {}
    for rank in range(RANKS):
        with open(os.path.join(work_dir, f'samples_rank{rank}.jsonl'), encoding='utf-8') as f:
            out[rank] = [json.loads(line) for line in f]
    return out


def train(config, options, tmp_path):
    """A 6-iteration run on 2 ranks (checkpoints at 3 and 6); its records."""
    full = run_train(config, str(tmp_path / 'full'), nproc=RANKS, cfg_options=options, timeout=300)
    assert full.ok, full.summary()
    assert sorted(full.losses) == list(range(1, 7))
    before = records(full.work_dir)
    assert all([r['iter'] for r in before[rank]] == list(range(1, 7)) for rank in range(RANKS)), before
    return full, before


def resumes_exactly(config, options, tmp_path, full, before):
    """The run rolled back to iteration 3 and resumed on 2 ranks: each rank's batches 4-6 and the losses are the
    uninterrupted run's."""
    work = tmp_path / 'rolled_back'
    shutil.copytree(tmp_path / 'full', work, ignore=shutil.ignore_patterns('iter_6.pth', '2026*', 'samples_rank*'))
    atomic_write(str(work / 'iter_3.pth'), work / 'last_checkpoint')
    resumed = run_train(config, str(work), nproc=RANKS, cfg_options={**options, 'resume': True}, timeout=300)
    assert resumed.ok, resumed.summary()
    assert 'data stream resumed at iteration 3' in resumed.log, resumed.log[-3000:]
    after = records(str(work))
    for rank in range(RANKS):
        assert after[rank] == before[rank][3:], (rank, after[rank], before[rank][3:])
    for i in (4, 5, 6):
        assert resumed.losses[i] == pytest.approx(full.losses[i], abs=1e-6), (i, resumed.losses, full.losses)


def common(tiny, data):
    opts = {k.replace('train_dataloader.dataset.', 'train_dataloader.dataset.dataset.'): v
            for k, v in tiny_options(tiny, data['file'], repeat=1, batch_size=1).items() if 'sampler' not in k}
    opts.update({'train_dataloader.dataset.dataset.image_folders': f'[{data["images"]}]',
                 'train_dataloader.dataset.dataset.min_num_frame': 2,
                 'train_dataloader.dataset.dataset.max_num_frame': 3,
                 'train_dataloader.num_workers': WORKERS, 'train_dataloader.persistent_workers': True,
                 'max_iters': 6, 'default_hooks.checkpoint.interval': 3, 'default_hooks.checkpoint.max_keep_ckpts': -1})
    return opts


@pytest.mark.slow
def test_shards_on_two_ranks_read_disjoint_complete_parts_and_resume_exactly(tiny, data, tmp_path):
    """8 one-sample shards for 4 units: an epoch is 4 iterations of batch 1 per rank; the epoch-0 items (their
    stream state says the epoch) of all units are each sample once."""
    shards = str(tmp_path / 'shards')
    assert shard_dataset(['--data', data['file'], '--image-folder', data['images'], '--out', shards,
                          '--samples-per-shard', '1']) == 0
    opts = {k: v for k, v in common(tiny, data).items()
            if not k.endswith(('data_files', 'image_folders', 'repeat_times'))}
    opts.update({'train_dataloader.dataset.shards': shards, 'model.llm_lora.lora_dropout': 0.0})
    config = os.path.join(RECORDED, 'finetune_lora_shards.py')
    full, before = train(config, opts, tmp_path)
    epoch0, readers = Counter(), set()
    for rank, lines in before.items():
        for line in lines:
            (unit, state), = line['stream_state']
            assert rank * WORKERS <= unit < (rank + 1) * WORKERS, (rank, unit)
            if state['epoch'] == 0:
                epoch0.update(line['samples'])
                readers.add(unit)
    assert epoch0 == Counter(data['names']), epoch0  # every sample once: disjoint parts, together all of it
    assert readers == set(range(RANKS * WORKERS))
    resumes_exactly(config, opts, tmp_path, full, before)


@pytest.mark.slow
@pytest.mark.parametrize('source', ['annotation', 'shards'])
def test_online_packing_on_two_ranks_reads_disjoint_complete_parts_and_resumes_exactly(tiny, data, tmp_path, source):
    """Online packing over the annotation (finetune_full_packed_online.py) or over 8 one-sample shards
    (finetune_full_packed_shards.py). Unshuffled (each epoch the same order, so each unit reads the same part every
    epoch): the units' samples are disjoint and together all 8; packs of up to 2 samples from a buffer of 2 open
    packs, which the resumed run loads again."""
    opts = common(tiny, data)
    opts.update({'train_dataloader.dataset.shuffle': False, 'train_dataloader.dataset.max_tokens': 300,
                 'train_dataloader.dataset.max_tiles': 12, 'train_dataloader.dataset.max_buffer_size': 2})
    config = os.path.join(RECORDED, 'finetune_full_packed_online.py')
    if source == 'shards':
        shards = str(tmp_path / 'shards')
        assert shard_dataset(['--data', data['file'], '--image-folder', data['images'], '--out', shards,
                              '--samples-per-shard', '1', '--keep-order']) == 0   # the packs of the files' order
        opts = {k.replace('dataset.dataset.', 'dataset.dataset.dataset.'): v for k, v in opts.items()
                if not k.endswith(('data_files', 'image_folders', 'repeat_times'))}
        opts.update({'train_dataloader.dataset.dataset.shards': shards,
                     'train_dataloader.dataset.dataset.shuffle': False})
        config = os.path.join(RECORDED, 'finetune_full_packed_shards.py')
    full, before = train(config, opts, tmp_path)
    per_unit = {}
    for rank, lines in before.items():
        for line in lines:
            (unit, _), = line['stream_state']
            assert rank * WORKERS <= unit < (rank + 1) * WORKERS, (rank, unit)
            per_unit.setdefault(unit, set()).update(line['samples'])
    assert sorted(per_unit) == list(range(RANKS * WORKERS))
    assert sorted(n for names in per_unit.values() for n in names) == sorted(data['names']), per_unit
    assert any(len(line['samples']) > 1 for lines in before.values() for line in lines)  # packs of several samples
    assert any(state['buffer'] for lines in before.values() for line in lines[:3]
               for _, state in line['stream_state'])  # held packs at the checkpoint: the resume loads them again
    resumes_exactly(config, opts, tmp_path, full, before)
