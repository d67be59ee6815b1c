"""configs/pretrain_mlp.py on the tiny models, through XTuner's own train entry point, on a CPU:
one process, and two processes under DeepSpeed ZeRO-2 and ZeRO-3 (with text-only and image samples
mixed, which must not hang). Each run is judged by its outcome: the final checkpoint loads back into a
fresh model, and the loss on repeated data falls."""

import glob
import inspect
import os

import pytest
import torch
from mmengine.config import Config

from tests.configs.conftest import ROOT, tiny_options
from tests.train_utils import load_checkpoint_state, run_train
from xtuner_plugins.data import InternVLDataset
from xtuner_plugins.models import VisionLanguageModel

CONFIG = os.path.join(ROOT, 'configs', 'pretrain_mlp.py')


@pytest.mark.parametrize('path', sorted(glob.glob(os.path.join(ROOT, 'configs', '*.py'))))
def test_every_stage_config_loads(path):
    cfg = Config.fromfile(path)
    # the package's model and data set, given only settings they take (a misspelt key fails here, not at build)
    dataset = cfg.train_dataloader.dataset
    while isinstance(dataset.get('dataset'), dict):  # a packing or streaming wrapper's
        dataset = dataset.dataset
    for spec, base in ((cfg.model, VisionLanguageModel), (dataset, InternVLDataset)):
        assert isinstance(spec.type, type) and issubclass(spec.type, base), spec.type
        accepted = dict(inspect.signature(spec.type).parameters)
        if any(p.kind == p.VAR_KEYWORD for p in accepted.values()):   # a subclass passing its base's settings on
            assert spec.type is not base                              # (ShardSamples): checked against the base's
            accepted = {**inspect.signature(base).parameters,
                        **{k: p for k, p in accepted.items() if p.kind != p.VAR_KEYWORD}}
        assert set(spec) - {'type'} <= set(accepted), set(spec) - {'type'} - set(accepted)
    assert cfg.env_cfg.dist_cfg.backend in ('gloo', 'nccl')


def test_pretrain_settings_are_internvl_stage_1():
    cfg = Config.fromfile(CONFIG)
    assert (cfg.model.freeze_vision, cfg.model.freeze_projector, cfg.model.freeze_llm) == (True, False, True)
    assert cfg.optim_wrapper.optimizer.lr == 2e-4 and cfg.optim_wrapper.optimizer.weight_decay == 0.01
    assert [s.type.__name__ for s in cfg.param_scheduler] == ['WarmupLR', 'CosineAnnealingLR']
    assert cfg.train_dataloader.dataset.tokenizer is None  # the model's (engine/derive.py): set once, in model.llm


def check_outcome(out, tiny):
    assert out.ok, out.summary()
    state = load_checkpoint_state(out.final_checkpoint)
    assert state and all(k.startswith('mlp1.') for k in state), sorted(state)[:5]
    model = VisionLanguageModel(vision_encoder=tiny['internvit'], llm=tiny['llm'], torch_dtype='float32',
                                pretrained_pth=out.final_checkpoint)
    for key, value in state.items():
        assert torch.allclose(model.state_dict()[key], value.float()), key
    for name in ('loss', 'lr', 'data_time', 'tokens_per_sec', 'samples_per_sec', 'peak_mem_mb'):
        assert out.scalar_series(name), f'{name} missing from the logged scalars'
        assert f'{name}: ' in out.full_log(), f'{name} missing from MMEngine\'s log file'
    progress = [line for line in out.log.splitlines() if ' - INFO - iter ' in line]
    assert progress and all(' loss ' in line and ' lr ' in line and ' tokens/s ' in line for line in progress), \
        progress  # the console's short lines (engine/progress.py)
    lrs = out.scalar_series('lr')
    assert max(lrs.values()) >= 0.4 * 0.01, lrs  # near the configured lr (tiny_options) right after warm-up
    return [out.losses[i] for i in sorted(out.losses)]


@pytest.mark.slow
def test_one_process_through_the_xtuner_cli(tiny, tmp_path):
    out = run_train(CONFIG, str(tmp_path / 'work'), use_cli=True,
                    cfg_options=tiny_options(tiny, tiny['same'], repeat=12))
    losses = check_outcome(out, tiny)
    # only the model paths and the data given: the data set took the tiny tower's 56 px tiles (4 tokens each)
    assert 'data set: image_size 56, num_image_token 4, image_mode tile, template internvl2_5, ' in out.log
    assert len(losses) == 6
    # the same batch every iteration; only mlp1 learns, so the random tiny LLM moves little (6.231 -> 6.197)
    assert losses[-1] < losses[0] - 0.02 and losses[1:] == sorted(losses[1:], reverse=True), losses
    assert os.path.isfile(out.final_checkpoint)  # a plain run writes one .pth file
    assert glob.glob(str(tmp_path / 'work' / '*' / 'vis_data' / 'events.out.tfevents.*'))  # TensorBoard


@pytest.mark.slow
def test_zero2_two_processes(tiny, tmp_path):
    out = run_train(CONFIG, str(tmp_path / 'work'), nproc=2, deepspeed='zero2',
                    cfg_options=tiny_options(tiny, tiny['same'], repeat=12, batch_size=1))
    losses = check_outcome(out, tiny)
    assert len(losses) == 6 and losses[-1] < losses[0] - 0.02, losses
    assert os.path.isdir(out.final_checkpoint)  # DeepSpeed writes a folder, consolidated on the CPU here


def rank_batches(dataset_cfg_options, tiny, world_size, batch_size):
    """The samples each rank gets per iteration, computed with the config's own sampler."""
    from unittest import mock

    from xtuner.dataset.samplers import LengthGroupedSampler

    from xtuner_plugins.data import InternVLDataset
    ds = InternVLDataset(tiny['mixed'], image_folders=tiny['images'], tokenizer=tiny['llm'], image_size=56,
                         max_dynamic_patch=4, repeat_times=dataset_cfg_options, cache_dir=tiny['cache'])
    cfg = Config.fromfile(CONFIG).train_dataloader.sampler
    per_rank = []
    for rank in range(world_size):
        with mock.patch('xtuner.dataset.samplers.length_grouped.get_dist_info', return_value=(rank, world_size)):
            sampler = LengthGroupedSampler(ds, per_device_batch_size=batch_size,
                                           length_property=cfg.length_property, seed=cfg.seed)
        order = list(iter(sampler))
        per_rank.append([order[i:i + batch_size] for i in range(0, len(order), batch_size)])
    has_image = [ds.record_at(i).raw.count('"image"') > 0 for i in range(len(ds))]
    return [[[has_image[i] for i in batch] for batch in batches] for batches in per_rank]


@pytest.fixture(scope='module')
def mixed_runs(tiny, tmp_path_factory):
    """ZeRO-2 and ZeRO-3 on the same mixed data (2 processes, 2 samples each per iteration)."""
    runs = {}
    for stage in ('zero2', 'zero3'):
        work = tmp_path_factory.mktemp(f'mixed_{stage}')
        runs[stage] = run_train(CONFIG, str(work), nproc=2, deepspeed=stage, timeout=300,
                                cfg_options=tiny_options(tiny, tiny['mixed'], repeat=4, batch_size=2))
    return runs


@pytest.mark.slow
def test_zero3_mixed_text_and_image_batches(tiny, mixed_runs):
    batches = rank_batches(4, tiny, world_size=2, batch_size=2)
    # the premise: some per-rank batch mixes a text-only sample (dummy tile) with an image sample
    assert any(True in b and False in b for rank in batches for b in rank), batches
    out = mixed_runs['zero3']
    losses = check_outcome(out, tiny)  # finished: no hang, a checkpoint that loads
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses))), losses


@pytest.mark.slow
def test_zero3_builds_the_same_model_as_zero2(tiny, mixed_runs):
    """Under ZeRO-3 the LLM is built partitioned (deepspeed.zero.Init); untying and resizing the
    embeddings must still give the model ZeRO-2 trains: same losses from the first iteration on."""
    a, b = mixed_runs['zero2'], mixed_runs['zero3']
    assert a.ok and b.ok, (a.summary(), b.summary())
    assert sorted(a.losses) == sorted(b.losses) == [1, 2]
    for it in a.losses:
        assert abs(a.losses[it] - b.losses[it]) < 1e-4, (a.losses, b.losses)


def test_a_config_variable_in_cfg_options_stops_xtuners_own_train_script(tiny, tmp_path):
    # `llm_path=` changes nothing once the file is read: start-up stops naming the entries to set instead
    out = run_train(CONFIG, str(tmp_path / 'work'), cfg_options=dict(tiny_options(tiny, tiny['same'], repeat=2),
                                                                     llm_path=tiny['llm']))
    assert out.failed and not out.checkpoints, out.summary()
    assert 'llm_path: a variable of the config file' in out.log and 'model.llm instead' in out.log, out.summary()
