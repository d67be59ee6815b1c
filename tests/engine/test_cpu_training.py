"""The engine plugins on a CPU: runtime patches, AutoOptimWrapper, ThroughputHook, and end-to-end training of
a toy config through ``xtuner/tools/train.py``, ``torchrun`` + DeepSpeed ZeRO-2/3 and the ``xtuner train`` CLI.

The end-to-end tests (``slow``) each start a fresh training subprocess (about 10-15 s on 2 CPU cores, mostly
start-up); they share runs through module-scoped fixtures.
"""

import os

import pytest
import torch

from tests.engine.toy import ToyRegressionDataset, ToyRegressionModel, toy_collate_fn
from tests.train_utils import REPO_ROOT, load_checkpoint_state, run_train, shared_cache_dir

TOY_CONFIG = os.path.join(REPO_ROOT, 'tests', 'engine', 'toy_configs', 'toy_regression.py')
MAX_ITERS = 6
THROUGHPUT_KEYS = ('tokens_per_sec', 'samples_per_sec', 'data_time_share', 'peak_mem_mb')

requires_cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason='checks the CPU-only behaviour')


# ----------------------------------------------------------------------------------------------------------
# runtime.py
# ----------------------------------------------------------------------------------------------------------
@requires_cpu_only
def test_dist_backend_and_patches_on_cpu():
    from xtuner_plugins.engine import runtime

    assert runtime.DIST_BACKEND == 'gloo'
    applied = set(runtime.applied_patches())
    assert {'patch_mmengine_init_dist_pytorch', 'patch_mmengine_ddp_cpu_device_ids',
            'patch_deepspeed_shm_comm'} <= applied
    if getattr(torch.cpu.is_bf16_supported, runtime._PATCH_MARK, False):  # this torch lacked it
        assert 'patch_torch_cpu_is_bf16_supported' in applied
        assert isinstance(torch.cpu.is_bf16_supported(including_emulation=False), bool)
    assert torch.cpu.is_bf16_supported() is True
    assert runtime.apply_cpu_patches() == []  # idempotent


@requires_cpu_only
def test_deepspeed_shm_op_is_not_built():
    import deepspeed.ops
    from deepspeed.comm.torch import build_shm_op

    import xtuner_plugins.engine.runtime  # noqa: F401

    assert deepspeed.ops.__compatible_ops__['deepspeed_shm_comm'] is False
    assert build_shm_op() is None  # returns at once instead of compiling with g++


@requires_cpu_only
def test_init_dist_pytorch_and_ddp_on_cpu(monkeypatch):
    """The patched mmengine launcher starts a (1-process) gloo group and DDP wraps a CPU model."""
    import torch.distributed as torch_dist
    from mmengine.dist import utils as dist_utils
    from mmengine.model import MMDistributedDataParallel

    import xtuner_plugins.engine.runtime as runtime

    from tests.train_utils import free_port

    assert getattr(dist_utils._init_dist_pytorch, runtime._PATCH_MARK, False)
    if torch_dist.is_initialized():
        pytest.skip('a process group already exists in this process')
    for key, value in dict(RANK='0', LOCAL_RANK='0', WORLD_SIZE='1', MASTER_ADDR='127.0.0.1',
                           MASTER_PORT=str(free_port())).items():
        monkeypatch.setenv(key, value)
    dist_utils._init_dist_pytorch(runtime.DIST_BACKEND)  # stock mmengine: "Found no NVIDIA driver"
    try:
        assert torch_dist.get_backend() == 'gloo'
        ddp = MMDistributedDataParallel(module=torch.nn.Linear(2, 1), device_ids=[0])  # as Runner.wrap_model
        assert ddp.device_ids is None
    finally:
        torch_dist.destroy_process_group()


def test_gpu_path_untouched(monkeypatch):
    """With CUDA available no patch applies and the wrapped launcher still calls torch.cuda.set_device."""
    import torch.distributed as torch_dist
    from mmengine.dist import utils as dist_utils

    import xtuner_plugins.engine.runtime as runtime

    calls = []
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'set_device', lambda d: calls.append(('set_device', d)))
    monkeypatch.setattr(torch_dist, 'init_process_group', lambda **kw: calls.append(('init', kw['backend'])))
    for name, value in dict(RANK='1', LOCAL_RANK='1', WORLD_SIZE='2', MASTER_ADDR='127.0.0.1',
                            MASTER_PORT='29500').items():   # (torchrun's: without them, refused in one line)
        monkeypatch.setenv(name, value)
    assert runtime.apply_cpu_patches() == []
    dist_utils._init_dist_pytorch('nccl')
    assert calls == [('set_device', 1), ('init', 'nccl')]


@pytest.mark.filterwarnings('ignore:.*GradScaler.*:FutureWarning')
def test_auto_optim_wrapper_cpu_and_cuda(monkeypatch):
    from mmengine.optim import AmpOptimWrapper, OptimWrapper, build_optim_wrapper

    from xtuner_plugins.engine.nonfinite import _GuardedMixin
    from xtuner_plugins.engine.runtime import AutoOptimWrapper

    model = torch.nn.Linear(4, 2)
    cfg = dict(type=AutoOptimWrapper, optimizer=dict(type=torch.optim.AdamW, lr=1e-3),
               clip_grad=dict(max_norm=1.0), accumulative_counts=2, loss_scale='dynamic', dtype='bfloat16')

    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    wrapper = build_optim_wrapper(model, dict(cfg))  # through mmengine's registry, as the runner does
    assert type(wrapper).__mro__[1:3] == (_GuardedMixin, OptimWrapper)  # MMEngine's, with the non-finite checks
    assert wrapper._accumulative_counts == 2 and wrapper.clip_grad_kwargs == dict(max_norm=1.0)

    # On a GPU machine it becomes MMEngine's AmpOptimWrapper with bf16 autocast. Its constructor only
    # asserts a device and builds a GradScaler (no CUDA call), so it can be built here; stepping it needs CUDA.
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    wrapper = build_optim_wrapper(model, dict(cfg))
    assert isinstance(wrapper, AmpOptimWrapper) and isinstance(wrapper, _GuardedMixin)
    assert wrapper.cast_dtype == torch.bfloat16
    assert wrapper._accumulative_counts == 2


@requires_cpu_only
def test_toy_config_resolves_lazily():
    from mmengine.config import Config

    cfg = Config.fromfile(TOY_CONFIG)
    assert cfg.env_cfg.dist_cfg.backend == 'gloo'  # the LazyObject is built on access
    assert cfg.optim_wrapper.type.__name__ == 'AutoOptimWrapper'


def test_config_text_is_formatted_once_per_text(monkeypatch):
    from mmengine.config import Config
    from mmengine.config import config as mm_config

    from xtuner_plugins.engine import runtime
    installed = mm_config.FormatCode  # the patch is applied on import
    assert getattr(installed, runtime._PATCH_MARK, False)
    yapf_format = installed.__wrapped__
    cfg = Config(dict(a=1, b=dict(c=[1, 2, 3]), name='toy'))
    text = cfg.pretty_text
    monkeypatch.setattr(mm_config, 'FormatCode', yapf_format)
    assert cfg.pretty_text == text  # the text written is yapf's

    calls = []

    def counting(text, **kwargs):
        calls.append(text)
        return yapf_format(text, **kwargs)

    monkeypatch.setattr(mm_config, 'FormatCode', counting)
    assert runtime.memoize_config_formatting()
    assert not runtime.memoize_config_formatting()  # once
    for _ in range(3):
        assert cfg.pretty_text == text
    assert len(calls) == 1
    cfg.a = 2  # a changed config is formatted again
    assert 'a = 2' in cfg.pretty_text and len(calls) == 2


# ----------------------------------------------------------------------------------------------------------
# ThroughputHook (unit)
# ----------------------------------------------------------------------------------------------------------
def test_count_tokens_and_samples():
    from xtuner_plugins.engine.hooks import count_tokens_and_samples, peak_memory_mb

    ds = ToyRegressionDataset(num_samples=8)
    batch = toy_collate_fn([ds[i] for i in range(4)])
    assert count_tokens_and_samples(batch) == (int(ds.attention_mask[:4].sum()), 4)
    ids = {'data': {'input_ids': torch.ones(1, 10, dtype=torch.long),
                    'cumulative_len': [torch.tensor([0, 3, 10])]}, 'data_samples': None}
    assert count_tokens_and_samples(ids) == (10, 2)
    assert count_tokens_and_samples(None) == (None, None)
    assert peak_memory_mb() > 10


# ----------------------------------------------------------------------------------------------------------
# End to end
# ----------------------------------------------------------------------------------------------------------
def _expected_tokens_per_sample(rank_batches):
    ds = ToyRegressionDataset(num_samples=8)
    idx = [i for batch in rank_batches for i in batch]
    return float(ds.attention_mask[idx].sum()) / len(idx)


def _check_trained_checkpoint(outcome):
    assert outcome.ok, outcome.summary()
    assert os.path.basename(outcome.final_checkpoint) == f'iter_{MAX_ITERS}.pth'
    state = load_checkpoint_state(outcome.final_checkpoint)
    fresh = ToyRegressionModel()
    initial = {k: v.clone() for k, v in fresh.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in state.items()} == {k: tuple(v.shape) for k, v in initial.items()}
    fresh.load_state_dict(state, strict=True)
    for key, value in fresh.state_dict().items():
        assert torch.equal(value, state[key].to(value.dtype)), key
    assert any(not torch.allclose(state[k].float(), initial[k]) for k in initial), 'weights did not change'
    # Iterations 1 and 5 see the same batch (see the config): the loss on it must fall.
    assert set(outcome.losses) >= set(range(1, MAX_ITERS + 1)), outcome.losses
    assert outcome.losses[5] < outcome.losses[1], outcome.losses
    return state


@pytest.fixture(scope='module')
def plain_run(tmp_path_factory):
    return run_train(TOY_CONFIG, str(tmp_path_factory.mktemp('plain')), nproc=1)


@pytest.fixture(scope='module')
def zero2_run(tmp_path_factory):
    # optim_wrapper.type as a plain string: XTuner's train.py reads it (and replaces the wrapper by
    # DeepSpeedOptimWrapper) without importing xtuner_plugins, so here only the lazy DIST_BACKEND of
    # env_cfg.dist_cfg, built when DeepSpeedStrategy sets up the process group, can apply the CPU patches.
    return run_train(TOY_CONFIG, str(tmp_path_factory.mktemp('zero2')), nproc=2,
                     deepspeed='configs/deepspeed/zero2_cpu.json',
                     cfg_options={'optim_wrapper.type': 'AmpOptimWrapper'})


@pytest.fixture(scope='module')
def zero3_run(tmp_path_factory):
    return run_train(TOY_CONFIG, str(tmp_path_factory.mktemp('zero3')), nproc=2,
                     deepspeed='configs/deepspeed/zero3_cpu.json')


@pytest.mark.slow
def test_plain_single_process(plain_run):
    assert plain_run.returncode == 0, plain_run.summary()
    _check_trained_checkpoint(plain_run)
    assert 'applied CPU patches' in plain_run.log


@pytest.mark.slow
def test_throughput_scalars_in_log_and_tensorboard(plain_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert plain_run.ok, plain_run.summary()
    iter_lines = [line for line in plain_run.full_log().splitlines() if 'Iter(train)' in line]
    assert len(iter_lines) == MAX_ITERS
    for key in THROUGHPUT_KEYS:
        assert all(f'{key}: ' in line for line in iter_lines), (key, iter_lines[0])
        assert set(plain_run.scalar_series(key)) == set(range(1, MAX_ITERS + 1)), key

    tokens, samples = plain_run.scalar_series('tokens_per_sec'), plain_run.scalar_series('samples_per_sec')
    # Same time base: tokens/s over samples/s is the batch's non-padding tokens per sample.
    assert tokens[1] / samples[1] == pytest.approx(_expected_tokens_per_sample([range(0, 4)]))
    assert tokens[2] / samples[2] == pytest.approx(_expected_tokens_per_sample([range(4, 8)]))
    peak = plain_run.scalar_series('peak_mem_mb')
    assert all(100 < v < 24 * 1024 for v in peak.values()), peak
    assert all(0 <= v <= 1 for v in plain_run.scalar_series('data_time_share').values())

    events = [os.path.join(plain_run.vis_dir(), f) for f in os.listdir(plain_run.vis_dir())
              if f.startswith('events.out.tfevents')]
    assert events, os.listdir(plain_run.vis_dir())
    acc = EventAccumulator(plain_run.vis_dir(), size_guidance={'scalars': 0})
    acc.Reload()
    tags = set(acc.Tags()['scalars'])
    assert {'loss', *THROUGHPUT_KEYS} <= tags, tags
    tb_tokens = {e.step: e.value for e in acc.Scalars('tokens_per_sec')}
    assert tb_tokens.keys() == tokens.keys()
    assert all(tb_tokens[s] == pytest.approx(tokens[s], rel=1e-5) for s in tokens)


@pytest.mark.slow
def test_zero2_two_processes(zero2_run):
    assert zero2_run.returncode == 0, zero2_run.summary()
    _check_trained_checkpoint(zero2_run)
    # Tokens are summed over both ranks: rank 0 has samples 0,2,4,6 and rank 1 has 1,3,5,7.
    tokens, samples = zero2_run.scalar_series('tokens_per_sec'), zero2_run.scalar_series('samples_per_sec')
    assert tokens[1] / samples[1] == pytest.approx(_expected_tokens_per_sample([range(8)]))
    # DeepSpeed did not JIT-build its shared-memory op with g++ (patch_deepspeed_shm_comm).
    assert 'deepspeed_shm_comm_op built successfully' not in zero2_run.log
    assert not os.path.exists(os.path.join(shared_cache_dir(), 'torch_extensions', 'deepspeed_shm_comm'))


@pytest.mark.slow
def test_zero3_two_processes(zero3_run, zero2_run):
    assert zero3_run.returncode == 0, zero3_run.summary()
    state3 = _check_trained_checkpoint(zero3_run)
    # ZeRO-2 and ZeRO-3 run the same fp32 maths on the same data.
    assert zero3_run.losses == pytest.approx(zero2_run.losses, rel=1e-5)
    if zero2_run.ok:
        state2 = load_checkpoint_state(zero2_run.final_checkpoint)
        for key in state3:
            torch.testing.assert_close(state3[key], state2[key], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_xtuner_cli_zero3_two_processes(tmp_path, zero3_run):
    outcome = run_train(TOY_CONFIG, str(tmp_path / 'cli'), nproc=2, deepspeed='configs/deepspeed/zero3_cpu.json',
                        use_cli=True)
    assert outcome.ok, outcome.summary()
    assert os.path.basename(outcome.command[0]) == 'xtuner'
    _check_trained_checkpoint(outcome)
    assert outcome.losses == pytest.approx(zero3_run.losses, rel=1e-5)  # the same run as through torchrun


@pytest.mark.slow
def test_crash_is_detected_although_cli_exits_zero(tmp_path):
    outcome = run_train(TOY_CONFIG, str(tmp_path / 'crash'), nproc=1, use_cli=True,
                        cfg_options={'model.crash_at_iter': 2})
    assert outcome.failed, outcome.summary()
    assert 'deliberate crash at iteration 2' in outcome.log
    assert outcome.has_traceback
    assert outcome.last_iter == 1 and outcome.final_checkpoint is None
    # XTuner's CLI ignores the child's exit code (0 with xtuner 0.2.0): only the outcome tells.
    print(f'xtuner train exit code after the crash: {outcome.returncode}; reasons: {outcome.failure_reasons}')


def test_ranks_end_when_their_launcher_is_killed(tmp_path):
    """SIGKILL of the torchrun launcher: its rank (which imported xtuner_plugins.engine, as every config
    does) gets SIGTERM through the parent-death signal instead of running on, orphaned."""
    import signal
    import subprocess
    import sys
    import time
    flag = tmp_path / 'rank_pid'
    script = tmp_path / 'rank.py'
    script.write_text('import os, time\nimport xtuner_plugins.engine\n'
                      f'open({str(flag)!r}, "w").write(str(os.getpid()))\ntime.sleep(300)\n')
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    launcher = subprocess.Popen([sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=1',
                                 '--master_port=0', str(script)], env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not (flag.exists() and flag.read_text()) and time.time() < deadline:
            time.sleep(0.2)
        rank = int(flag.read_text())
        launcher.kill()
        launcher.wait()
        deadline = time.time() + 20
        while time.time() < deadline:
            try:
                os.kill(rank, 0)
            except ProcessLookupError:
                break
            time.sleep(0.2)
        else:
            os.kill(rank, signal.SIGKILL)
            pytest.fail('the rank outlived its killed launcher by 20 s')
    finally:
        launcher.kill()
