"""Each epoch draws other 'rand' video frames, in a real MMEngine run with XTuner's TrainLoop and a persistent
DataLoader worker (which never sees an attribute set on the main process's data set): the epoch reaches the worker
with each index (data/epochs.py, wrapped in by engine/derive.py). The same run repeated, or resumed from a
checkpoint in its second epoch, draws the same frames.

Videos are made here: frame i is a grey of level 6*i (lossless H.264), so a tile tells its frame's number."""

import os
import pickle

import numpy as np
import pytest
import torch
from mmengine.hooks import CheckpointHook, Hook
from mmengine.model import BaseModel

from tests.helpers import conv, write_jsonl, write_video
from xtuner_plugins.data.dataset import InternVLDataset
from xtuner_plugins.data.epochs import EpochIndex, EpochSampler
from xtuner_plugins.data.packing import PackedInternVLDataset

VIDEOS = 3    # one a batch: 3 iterations an epoch
FRAMES = 4    # of 40, one drawn in each tenth


class FrameModel(BaseModel):
    """A model of one weight, trained on nothing: the run is about the data."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))

    def forward(self, data, data_samples=None, mode='loss'):
        return dict(loss=(self.w - 1).pow(2).sum())


class FrameLog(Hook):
    """``(iteration, sample, frame numbers)`` of every batch the run trains on (main process)."""

    def __init__(self):
        self.seen = []

    def before_train_iter(self, runner, batch_idx, data_batch=None):
        data = data_batch['data']
        frames = [int(round(float(t[0, 0, 0]) / 6)) for t in data['pixel_values']]
        self.seen.append((runner.iter, data['samples'][0], tuple(frames)))


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp('epochs')
    samples = []
    for k in range(VIDEOS):
        write_video(root / f'v{k}.mp4', [6 * i for i in range(40)], size=(28, 28))
        samples.append({'video': f'v{k}.mp4', 'conversations': conv(f'Video {k}?', 'grey', image=False)})
    return write_jsonl(root / 'videos.jsonl', samples)


def train(work_dir, data, tokenizer, resume_from=None):
    from mmengine.dataset import DefaultSampler
    from mmengine.runner import Runner
    from xtuner.engine.runner import TrainLoop

    import xtuner_plugins.engine  # noqa: F401  (the runner patches: derive.py wraps the sampler)
    from xtuner_plugins.data import internvl_collate_fn
    log = FrameLog()
    runner = Runner(
        model=FrameModel(), work_dir=str(work_dir),
        train_dataloader=dict(
            batch_size=1, num_workers=1, persistent_workers=True,
            dataset=dict(type=InternVLDataset, data_files=[data], tokenizer=tokenizer, image_size=28,
                         min_num_frame=FRAMES, max_num_frame=FRAMES, video_sampling='rand', seed=5),
            sampler=dict(type=DefaultSampler, shuffle=True), collate_fn=dict(type=internvl_collate_fn)),
        train_cfg=dict(type=TrainLoop, max_epochs=2),
        optim_wrapper=dict(optimizer=dict(type=torch.optim.SGD, lr=0.1)),
        default_hooks=dict(checkpoint=dict(type=CheckpointHook, interval=1, by_epoch=False)),
        custom_hooks=[log], env_cfg=dict(mp_cfg=dict(mp_start_method='fork')),
        randomness=dict(seed=3), resume=resume_from is not None, load_from=resume_from)
    runner.train()
    return log.seen


def by_epoch(seen):
    """``{(epoch, sample): frames}``."""
    return {(i // VIDEOS, name): frames for i, name, frames in seen}


@pytest.mark.slow
def test_epochs_draw_other_frames_and_runs_repeat_them(data, tiny_tokenizer_dir, tmp_path):
    first = train(tmp_path / 'a', data, tiny_tokenizer_dir)
    assert [i for i, _, _ in first] == list(range(2 * VIDEOS))
    frames = by_epoch(first)
    names = sorted({name for _, name, _ in first})
    assert len(names) == VIDEOS and len(frames) == 2 * VIDEOS
    for name in names:
        assert len(frames[0, name]) == FRAMES and list(frames[0, name]) == sorted(frames[0, name])
        assert frames[0, name] != frames[1, name], (name, frames[0, name])  # epoch 1 drew its own

    assert train(tmp_path / 'b', data, tiny_tokenizer_dir) == first  # the same run: the same frames

    # resumed in the second epoch: MMEngine replays 4 iterations (across the epoch's end), then trains on the same
    resumed = train(tmp_path / 'c', data, tiny_tokenizer_dir, resume_from=str(tmp_path / 'a' / 'iter_4.pth'))
    assert resumed == first[4:]


def test_epoch_index_reaches_the_data_set(data, tiny_tokenizer_dir):
    index = EpochIndex(2, 7)
    assert index == 2 and int(index) == 2 and pickle.loads(pickle.dumps(index)).epoch == 7
    ds = InternVLDataset(data, tokenizer=tiny_tokenizer_dir, image_size=28, min_num_frame=FRAMES,
                         max_num_frame=FRAMES, seed=5)

    def frames(item):
        return [int(round(float(t[0, 0, 0]) / 6)) for t in item['pixel_values']]
    plain = [frames(ds[i]) for i in range(VIDEOS)]
    assert ds.epoch == 0
    later = [frames(ds[EpochIndex(i, 1)]) for i in range(VIDEOS)]
    assert ds.epoch == 1 and later != plain
    ds.set_epoch(0)
    assert [frames(ds[i]) for i in range(VIDEOS)] == plain

    packed = PackedInternVLDataset(ds, max_tokens=1, shuffle=False)  # one sample a pack
    assert [frames(packed[EpochIndex(i, 1)]) for i in range(VIDEOS)] == later and ds.epoch == 1

    from mmengine.dataset import DefaultSampler
    sampler = EpochSampler(ds, dict(type=DefaultSampler, shuffle=False), seed=0)
    sampler.set_epoch(3)
    got = list(sampler)
    assert got == list(range(VIDEOS)) and {i.epoch for i in got} == {3} and ds.epoch == 3
    assert np.all(np.asarray(got) == np.arange(VIDEOS))


def test_the_configs_sampler_is_wrapped_once():
    from mmengine.config import Config
    from tests.configs.conftest import ROOT
    from xtuner_plugins.data.sampler import LengthGroupedSampler
    from xtuner_plugins.engine.derive import wrap_sampler
    loader = Config.fromfile(os.path.join(ROOT, 'configs', 'finetune_lora.py')).train_dataloader
    inner = dict(loader.sampler)
    assert wrap_sampler(loader) and loader.sampler.type is EpochSampler and loader.sampler.sampler == inner
    assert inner['type'] is LengthGroupedSampler
    assert not wrap_sampler(loader) and loader.sampler.sampler == inner  # once
    other = dict(dataset=dict(type='ToyRegressionDataset'), sampler=dict(type='DefaultSampler'))
    assert not wrap_sampler(other) and other['sampler'] == dict(type='DefaultSampler')


class _Numbers(torch.utils.data.Dataset):
    def __len__(self):
        return 2

    def __getitem__(self, index):
        return int(index)


def _restart_warnings(tmp_path, sampler):
    """The lines an iteration-based loop's data loader iterator logs over two passes of ``sampler``'s loader
    (MMEngine's iterator, as ``IterBasedTrainLoop`` builds it, under the runner's logger)."""
    from mmengine.logging import MMLogger
    from mmengine.runner.loops import _InfiniteDataloaderIterator

    import xtuner_plugins.engine  # noqa: F401  (the patches)
    from xtuner_plugins.engine.epochs import RESTART_WARNING
    log = tmp_path / f'{type(sampler).__name__}.log'
    MMLogger.get_instance(f'restarts-{type(sampler).__name__}', log_file=str(log))  # the current logger
    loader = torch.utils.data.DataLoader(_Numbers(), batch_size=2, sampler=sampler)
    iterator = _InfiniteDataloaderIterator(loader)
    for _ in range(2):  # one batch a pass: the second restarts the loader (and sleeps 2 s, as MMEngine does)
        next(iterator)
    return [line for line in log.read_text().splitlines() if RESTART_WARNING in line]


def test_the_restart_warning_is_dropped_where_restarts_are_the_epochs(tmp_path):
    """An EpochSampler (this project's training data) takes its epoch from each restart: MMEngine's advice to use
    InfiniteSampler, which never calls set_epoch, is dropped; any other sampler keeps the warning."""
    from mmengine.dataset import DefaultSampler
    epochs = EpochSampler(_Numbers(), DefaultSampler(_Numbers(), shuffle=False))
    assert _restart_warnings(tmp_path, epochs) == [] and epochs.epoch == 1  # restarted: the next epoch
    assert len(_restart_warnings(tmp_path, DefaultSampler(_Numbers(), shuffle=False))) == 1


def test_a_fractional_max_epochs_runs_whole_iterations(tmp_path):
    """max_epochs=1.3 over 2 batches an epoch was 2.6 iterations, refused by MMEngine's loop with an
    AssertionError after the model loaded; it runs 3, and says so."""
    from tests.engine.test_resume import _log, toy_runner
    from xtuner_plugins.engine.epochs import whole_iterations
    runner = toy_runner(tmp_path, 'fractional', max_epochs=1.3, save_every=100)
    assert runner.iter == 3 and runner.train_loop.max_iters == 3
    assert 'max_epochs gives 2.6 iterations: 3 run (whole iterations)' in _log(tmp_path)
    assert whole_iterations(0.2) == 1 and whole_iterations(4) == 4 and whole_iterations(4.0) == 4.0


@pytest.mark.parametrize('epochs,iters', [(0.1, 1), (1.3, 3)])
def test_a_fractional_max_epochs_stretches_the_schedule_over_the_iterations_it_runs(tmp_path, epochs, iters):
    """MMEngine converted a schedule in epochs by truncation: 0.1 epoch of 2 iterations gave the cosine decay an
    end of iteration 0, refused with a ValueError traceback after the model loaded; 1.3 epochs ended it at 2 of 3
    iterations. The loop, which knows its iterations, now stretches the run's fractions over them."""
    from tests.engine.test_resume import toy_runner
    runner = toy_runner(tmp_path, 'fractional', max_epochs=epochs, save_every=100)
    warm_up, decay = runner.param_schedulers
    assert runner.iter == iters and not warm_up.by_epoch and not decay.by_epoch
    assert (warm_up.begin, warm_up.end, decay.begin, decay.end) == (0, 2, 2, max(iters, 3))
