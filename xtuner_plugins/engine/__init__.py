"""Engine plugins: CPU/GPU runtime choices (``runtime``) and training hooks (``hooks``).

Importing anything from this package imports ``runtime``, which applies the CPU compatibility patches when
CUDA is not available (see ``runtime``'s docstring), and ``checkpointing``, which makes checkpoint writes
atomic and lets resume load MMEngine checkpoints under torch >= 2.6.
"""

from . import console  # noqa: F401  (the runners' console: MMEngine's start-up dumps in the log file only)
from .badsamples import BadSampleHook
from .checkpointing import CheckpointCleanupHook, apply_checkpoint_patches, atomic_write
from .checks import ModelDataCheckHook, check_geometry
from .hooks import LineageHook, PreferenceStateHook, ThroughputHook
from .nonfinite import NonFiniteError, NonFiniteGuardHook
from .optim import OptimWrapperConstructor
from .runtime import (CUDA_AVAILABLE, DATALOADER_WORKERS, DIST_BACKEND, MP_START_METHOD, AutoOptimWrapper,
                      applied_patches, apply_cpu_patches)
from .schedulers import WarmupLR

__all__ = [
    'AutoOptimWrapper', 'CUDA_AVAILABLE', 'DATALOADER_WORKERS', 'DIST_BACKEND', 'MP_START_METHOD',
    'ModelDataCheckHook', 'ThroughputHook',
    'check_geometry', 'applied_patches', 'apply_cpu_patches', 'WarmupLR', 'OptimWrapperConstructor',
    'apply_checkpoint_patches', 'atomic_write', 'NonFiniteError', 'NonFiniteGuardHook',
    'CheckpointCleanupHook', 'BadSampleHook', 'PreferenceStateHook', 'LineageHook',
]
