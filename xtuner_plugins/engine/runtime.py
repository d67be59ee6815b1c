"""Run the same XTuner/MMEngine configs on GPUs and on a CPU-only machine.

Configs use this module through lazy imports, e.g. in a base runtime config::

    from xtuner_plugins.engine.runtime import DIST_BACKEND, MP_START_METHOD, AutoOptimWrapper

    env_cfg = dict(cudnn_benchmark=False,
                   mp_cfg=dict(mp_start_method=MP_START_METHOD, opencv_num_threads=0),
                   dist_cfg=dict(backend=DIST_BACKEND))
    optim_wrapper = dict(type=AutoOptimWrapper, optimizer=..., dtype='bfloat16')

XTuner configs are lazy-import configs: ``DIST_BACKEND`` is a ``LazyObject`` that is only imported when the
config value is read. Both runners read it *before* they start the process group, so importing this module
is the hook that applies the CPU compatibility patches in time:

* plain ``Runner`` (``xtuner train CFG``, ``--launcher pytorch`` without DeepSpeed): ``Runner.setup_env`` first
  calls ``set_multi_processing(**env_cfg['mp_cfg'])``, building ``MP_START_METHOD`` (in one process too, before
  the runner logs and dumps the config: :func:`memoize_config_formatting` is in place for it); then it runs
  ``init_dist(self.launcher, **env_cfg['dist_cfg'])``; unpacking the ``ConfigDict`` builds ``DIST_BACKEND``
  (importing this module) before ``init_dist`` looks up ``_init_dist_pytorch``.
  ``optim_wrapper.type`` (``AutoOptimWrapper``) imports it as well, when the optimizer wrapper is built.
* ``--deepspeed`` (``FlexibleRunner`` + xtuner's ``DeepSpeedStrategy``): ``xtuner/tools/train.py`` already reads
  ``cfg.optim_wrapper.type`` (this builds the lazy ``AutoOptimWrapper``, importing this module) long before the
  runner exists; afterwards ``FlexibleRunner.build_strategy`` passes ``env_cfg`` as the strategy's
  ``env_kwargs`` and ``BaseStrategy._setup_env`` calls ``self._setup_distributed(launcher, **dist_cfg)``
  -> ``init_dist(launcher, backend, init_backend='deepspeed')`` -> ``deepspeed.init_distributed``.

On a machine with CUDA nothing is patched: ``DIST_BACKEND`` is ``'nccl'`` and ``AutoOptimWrapper`` builds
MMEngine's ``AmpOptimWrapper``. On a CPU (``torch.cuda.is_available()`` is False) the patches below are applied
once at import; each is idempotent and can be listed with :func:`applied_patches`. On any machine, a rank
started by ``torchrun`` is set to end with its launcher (:func:`die_with_launcher`) and the config's text is
formatted once per text (:func:`memoize_config_formatting`), and both runners' ``build_train_loop`` fill the
training data set's unset geometry, template and tokenizer from the model (``derive.py``,
:func:`~xtuner_plugins.engine.derive.apply_derive_patches`), and an iteration-based loop's data loader restarts
each epoch without MMEngine's warning when its sampler carries the epoch (``epochs.py``), and ``resume=True``
reads ``last_checkpoint`` against its work folder (``resume.py``): this import comes before either runner trains.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
from typing import List

import torch

__all__ = [
    'AutoOptimWrapper', 'CUDA_AVAILABLE', 'DIST_BACKEND', 'MP_START_METHOD', 'applied_patches', 'apply_cpu_patches',
    'memoize_config_formatting',
]

CUDA_AVAILABLE: bool = torch.cuda.is_available()

#: torch.distributed backend for ``env_cfg['dist_cfg']['backend']``: NCCL on GPUs, gloo on a CPU.
DIST_BACKEND: str = 'nccl' if CUDA_AVAILABLE else 'gloo'
#: ``env_cfg['mp_cfg']['mp_start_method']``. Every runner unpacks ``mp_cfg`` first in ``setup_env``, so reading
#: it from here imports this module before the runner logs and dumps the config (see the docstring).
MP_START_METHOD: str = 'fork'
# DataLoader workers per process: 4, or fewer on a machine with fewer cores (PyTorch warns past the core count).
DATALOADER_WORKERS: int = min(4, len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity')
                              else (os.cpu_count() or 1))

#: Set this environment variable to ``1`` to let DeepSpeed build its CPU shared-memory all-reduce op anyway.
KEEP_DS_SHM_COMM_ENV = 'XTUNER_PLUGINS_DS_SHM_COMM'
#: Set this environment variable to ``1`` to apply no CPU patch at all (to see the stock behaviour).
NO_CPU_PATCHES_ENV = 'XTUNER_PLUGINS_NO_CPU_PATCHES'

_PATCH_MARK = '_xtuner_plugins_cpu_patch'
_applied: List[str] = []


# --------------------------------------------------------------------------------------------------------
# Patch 1: mmengine's pytorch and slurm launchers call torch.cuda.set_device on a CPU.
# --------------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _cuda_set_device_is_noop():
    original = torch.cuda.set_device
    torch.cuda.set_device = lambda device: None
    try:
        yield
    finally:
        torch.cuda.set_device = original


def _launcher_without_set_device(name: str) -> bool:
    """Replace ``mmengine.dist.utils.<name>`` by mmengine's own function run with ``torch.cuda.set_device`` a
    no-op for the duration of the call (single-threaded start-up) where CUDA is not available; ``init_dist``
    looks the function up as a module global, so replacing it there is enough."""
    from mmengine.dist import utils as dist_utils

    original = getattr(dist_utils, name)
    if getattr(original, _PATCH_MARK, False):
        return False

    @functools.wraps(original)
    def launcher(*args, **kwargs):
        if torch.cuda.is_available():
            return original(*args, **kwargs)
        with _cuda_set_device_is_noop():
            return original(*args, **kwargs)

    setattr(launcher, _PATCH_MARK, True)
    setattr(dist_utils, name, launcher)
    return True


def _patch_mmengine_init_dist_pytorch() -> bool:
    """Fixes ``RuntimeError: Found no NVIDIA driver on your system`` from ``--launcher pytorch`` on a CPU:
    ``mmengine.dist.utils._init_dist_pytorch`` calls ``torch.cuda.set_device(local_rank)`` unconditionally (when
    no MLU/NPU/MUSA is found) before ``init_process_group``."""
    return _launcher_without_set_device('_init_dist_pytorch')


def _patch_mmengine_init_dist_slurm() -> bool:
    """The same for ``--launcher slurm`` (``_init_dist_slurm``, which ``engine/slurm.py`` wraps as well)."""
    return _launcher_without_set_device('_init_dist_slurm')


# --------------------------------------------------------------------------------------------------------
# Patch 2: mmengine's Runner gives DDP a CUDA device id for a CPU model.
# --------------------------------------------------------------------------------------------------------
def _patch_mmengine_ddp_cpu_device_ids() -> bool:
    """Fixes ``ValueError: DistributedDataParallel device_ids and output_device arguments only work with
    single-device/multiple-device GPU modules or CPU modules, but got device_ids [0], ...`` of a CPU model.

    ``Runner.wrap_model`` (``--launcher pytorch`` without DeepSpeed) builds
    ``MMDistributedDataParallel(module=model, device_ids=[LOCAL_RANK], ...)``; torch wants ``device_ids=None``
    for a module on the CPU. The wrapper drops ``device_ids``/``output_device`` only when every parameter of
    the module is on the CPU and CUDA is not available.
    """
    from mmengine.model.wrappers.distributed import MMDistributedDataParallel

    original = MMDistributedDataParallel.__init__
    if getattr(original, _PATCH_MARK, False):
        return False

    @functools.wraps(original)
    def __init__(self, module, *args, **kwargs):
        if not torch.cuda.is_available() and all(p.device.type == 'cpu' for p in module.parameters()):
            kwargs['device_ids'] = None
            kwargs.pop('output_device', None)
        original(self, module, *args, **kwargs)

    setattr(__init__, _PATCH_MARK, True)
    MMDistributedDataParallel.__init__ = __init__
    return True


# --------------------------------------------------------------------------------------------------------
# Patch 3: torch.cpu.is_bf16_supported is missing in this torch build.
# --------------------------------------------------------------------------------------------------------
def _cpu_is_bf16_supported(including_emulation: bool = True) -> bool:
    """Like ``torch.cuda.is_bf16_supported``: bf16 runs on every CPU (emulated if need be); with
    ``including_emulation=False`` report whether oneDNN has native bf16 kernels for this CPU."""
    if including_emulation:
        return True
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except Exception:  # pragma: no cover - depends on the build
        return False


def _patch_torch_cpu_is_bf16_supported() -> bool:
    """Fixes ``AttributeError: module 'torch.cpu' has no attribute 'is_bf16_supported'``.

    XTuner calls ``get_torch_device().is_bf16_supported()`` (``torch.cpu`` on a CPU) in ``model/sft.py`` and
    ``model/llava.py`` (choosing the LLM dtype) and in ``tools/utils.auto_dtype_of_deepspeed_config`` (a
    DeepSpeed JSON with ``"bf16": {"enabled": "auto"}``). The answer matches DeepSpeed's CPU accelerator,
    whose ``is_bf16_supported()`` is True.
    """
    if hasattr(torch.cpu, 'is_bf16_supported'):
        return False
    setattr(_cpu_is_bf16_supported, _PATCH_MARK, True)
    torch.cpu.is_bf16_supported = _cpu_is_bf16_supported
    return True


# --------------------------------------------------------------------------------------------------------
# Patch 4: DeepSpeed compiles its CPU shared-memory all-reduce op with g++ when it starts.
# --------------------------------------------------------------------------------------------------------
def _patch_deepspeed_shm_comm() -> bool:
    """Avoids a g++ build (about 30 s, 4.8 GiB peak, a toolchain and a writable ``TORCH_EXTENSIONS_DIR``).

    On its CPU accelerator ``deepspeed.comm.torch.TorchBackend.__init__`` calls ``build_shm_op()``, which JIT
    compiles ``deepspeed_shm_comm`` whenever ``deepspeed.ops.__compatible_ops__`` says the op is compatible.
    The op only serves ``inference_all_reduce``; training collectives go through torch.distributed (gloo)
    either way. Marking the op incompatible makes ``build_shm_op`` return None, DeepSpeed's own fallback.
    Set ``XTUNER_PLUGINS_DS_SHM_COMM=1`` to keep DeepSpeed's behaviour.
    """
    if os.environ.get(KEEP_DS_SHM_COMM_ENV, '') == '1':
        return False
    try:
        import deepspeed.ops
        from deepspeed.ops.op_builder.cpu.comm import ShareMemCommBuilder
    except Exception:  # deepspeed missing or without a CPU op builder: nothing to avoid
        return False
    compatible = deepspeed.ops.__compatible_ops__
    if compatible.get(ShareMemCommBuilder.NAME) is False:
        return False
    compatible[ShareMemCommBuilder.NAME] = False
    return True


def apply_cpu_patches() -> List[str]:
    """Apply the CPU compatibility patches when CUDA is not available; returns the names newly applied."""
    if torch.cuda.is_available() or os.environ.get(NO_CPU_PATCHES_ENV, '') == '1':
        return []
    newly = []
    for patch in (_patch_mmengine_init_dist_pytorch, _patch_mmengine_init_dist_slurm,
                  _patch_mmengine_ddp_cpu_device_ids, _patch_torch_cpu_is_bf16_supported, _patch_deepspeed_shm_comm):
        if patch():
            name = patch.__name__.lstrip('_')
            newly.append(name)
            _applied.append(name)
    if newly and (_announced or _runner_logging()):   # imported once a run has begun (DeepSpeed's patch, or
        _announced.append(True)                       # plain xtuner train importing this package late)
        _announce(newly)
    return newly


def _runner_logging() -> bool:
    """Whether a runner's logger exists (MMEngine names it after the run; the default one is ``mmengine``)."""
    if 'mmengine.logging' not in sys.modules:
        return False
    from mmengine.logging import MMLogger
    return MMLogger.get_current_instance().instance_name != 'mmengine'


_announced: List[bool] = []


def announce_cpu_patches() -> None:
    """Log the CPU patches applied, and the allocator, once per process, as a runner is built
    (``runstart.ON_RUNNER_BUILT``): a training run's line; the tools that never train (conversion, serving) stay
    quiet."""
    if not _announced:
        _announced.append(True)
        if _applied:
            _announce(_applied)


def _announce(names: List[str]) -> None:
    from mmengine.logging import print_log
    from xtuner_plugins.malloc import jemalloc_loaded
    memory = 'jemalloc' if jemalloc_loaded() else 'glibc (tools/train.py uses jemalloc where installed: malloc.py)'
    print_log(f'xtuner_plugins: CUDA is not available, applied CPU patches: {", ".join(names)}; malloc: {memory}',
              logger='current')


def applied_patches() -> List[str]:
    """Names of the patches applied in this process."""
    return list(_applied)


# --------------------------------------------------------------------------------------------------------
# Optimizer wrapper choice
# --------------------------------------------------------------------------------------------------------
class AutoOptimWrapper:
    """``optim_wrapper=dict(type=AutoOptimWrapper, optimizer=..., dtype='bfloat16', loss_scale=...)``.

    Builds MMEngine's ``AmpOptimWrapper`` (autocast to ``dtype``) when CUDA is available and an ``OptimWrapper``
    otherwise: ``AmpOptimWrapper`` asserts a GPU/NPU/MLU/MUSA in its constructor. The AMP-only arguments
    (``dtype``, ``loss_scale``, ``use_fsdp``) are dropped for the CPU's wrapper, which autocasts to what the model
    trains in (its ``autocast_dtype``: bf16 weights on a CPU where bf16 pays, ``models/precision.py``).

    It is a class (``__new__`` returns the real wrapper) because ``xtuner/tools/train.py`` turns every
    ``FunctionType`` value of a config into a string. With ``--deepspeed`` XTuner replaces the whole
    ``optim_wrapper`` by ``DeepSpeedOptimWrapper`` (keeping ``optimizer``) and the JSON decides the dtype.
    Both wrappers carry the non-finite checks of ``nonfinite.py`` (the same classes with a guard).
    """

    AMP_ONLY_KEYS = ('dtype', 'loss_scale', 'use_fsdp')

    @staticmethod
    def builds():
        """Where ``--cfg-options`` checks read this wrapper's settings (``engine/signatures.py``): the GPU's
        wrapper, whose settings are the CPU's and the AMP-only ones."""
        from xtuner_plugins.engine.nonfinite import GuardedAmpOptimWrapper
        return GuardedAmpOptimWrapper

    def __new__(cls, **kwargs):
        from xtuner_plugins.engine.nonfinite import GuardedAmpOptimWrapper, GuardedOptimWrapper
        if torch.cuda.is_available():
            return GuardedAmpOptimWrapper(**kwargs)
        for key in cls.AMP_ONLY_KEYS:
            kwargs.pop(key, None)
        return GuardedOptimWrapper(**kwargs)


# --------------------------------------------------------------------------------------------------------
# Ranks end with their launcher
# --------------------------------------------------------------------------------------------------------
def die_with_launcher() -> bool:
    """A rank started by ``torchrun`` (``TORCHELASTIC_RUN_ID`` set) gets SIGTERM when the launcher dies.

    ``torchrun`` stops its ranks when it is interrupted or terminated, but a launcher killed outright (SIGKILL,
    out of memory) leaves them training on, orphaned, holding the GPUs. Linux's parent-death signal
    (``prctl(PR_SET_PDEATHSIG)``) ends them too. Not on other systems; DataLoader workers (forked later, the
    setting is not inherited) already watch their rank.
    """
    if not sys.platform.startswith('linux') or 'TORCHELASTIC_RUN_ID' not in os.environ:
        return False
    import signal

    from xtuner_plugins.signals import parent_death_signal
    arm = parent_death_signal(signal.SIGTERM)
    if arm is None or arm() != 0:
        return False
    if os.getppid() == 1:  # the launcher died before this line ran
        os.kill(os.getpid(), signal.SIGTERM)
    return True


# --------------------------------------------------------------------------------------------------------
# The config's text is formatted once per run, not at every use
# --------------------------------------------------------------------------------------------------------
def memoize_config_formatting(keep: int = 8) -> bool:
    """MMEngine formats the whole config with yapf each time it needs its text (``Config.pretty_text``): when
    the runner logs and dumps it, in the visualizer, in the run's meta data and in every checkpoint: six times
    before the first step and once per save, about 0.65 s each for a stage config on one CPU core. The same
    text formats to the same result, so the result of the ``keep`` newest texts is kept; the text written is
    unchanged (yapf still formats each new text; a changed config is a new text).
    """
    try:
        from mmengine.config import config as mm_config
    except ImportError:
        return False
    original = mm_config.FormatCode
    if getattr(original, _PATCH_MARK, False):
        return False
    formatted: 'dict' = {}

    @functools.wraps(original)
    def format_code(text, *args, **kwargs):
        key = (text, repr(args), repr(sorted(kwargs.items())))
        if key not in formatted:
            if len(formatted) >= keep:
                formatted.pop(next(iter(formatted)))
            formatted[key] = original(text, *args, **kwargs)
        return formatted[key]

    setattr(format_code, _PATCH_MARK, True)
    mm_config.FormatCode = format_code
    return True


apply_cpu_patches()
die_with_launcher()
memoize_config_formatting()
# --cfg-options checked and the training length filled in when a runner is built (engine/runstart.py); the data
# set's unset geometry, template and tokenizer taken from the model when it is built (engine/derive.py); the data
# loader's restart at each epoch of an iteration-based run without MMEngine's warning about it (engine/epochs.py);
# last_checkpoint written atomically and read against its work folder (engine/resume.py); a checkpoint a later
# stage was trained from kept out of its run's rotation (engine/keep.py)
from xtuner_plugins.engine.derive import apply_derive_patches  # noqa: E402
from xtuner_plugins.engine.epochs import apply_epoch_patches  # noqa: E402
from xtuner_plugins.engine.keep import apply_keep_patches  # noqa: E402
from xtuner_plugins.engine.resume import apply_resume_patches  # noqa: E402
from xtuner_plugins.engine.runstart import ON_RUNNER_BUILT, apply_runstart_patches  # noqa: E402
# under Slurm: a checkpoint saved on SIGTERM (engine/preempt.py), MMEngine's slurm launcher checked (engine/slurm.py)
from xtuner_plugins.engine.preempt import apply_preempt_patches  # noqa: E402
from xtuner_plugins.engine.slurm import apply_slurm_patches  # noqa: E402

apply_runstart_patches()
if announce_cpu_patches not in ON_RUNNER_BUILT:
    ON_RUNNER_BUILT.append(announce_cpu_patches)   # the CPU-patch line as a runner is built (announce_cpu_patches)
apply_derive_patches()
apply_epoch_patches()
apply_keep_patches()
apply_resume_patches()
apply_preempt_patches()
apply_slurm_patches()
