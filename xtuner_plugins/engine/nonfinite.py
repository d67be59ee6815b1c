"""Non-finite losses and gradients are caught at the step they happen, on every rank, and never saved.

Without this a ``nan`` loss trains on: the optimizer writes NaN into the weights, checkpoint rotation deletes the
last finite checkpoint, and the NaN checkpoints convert and chat (``!!!!``). Three checks, one policy:

* the **loss**, in ``VisionLanguageModel.parse_losses`` (every path calls it: plain, DDP and DeepSpeed), before the
  backward pass; every rank learns whether any rank's loss is non-finite (one all-reduce of a flag);
* the **gradient norm**, where ``AutoOptimWrapper``'s wrappers clip it (plain and DDP runs; under DeepSpeed a
  non-finite gradient shows as a non-finite loss one step later, and the weight check below keeps it unsaved);
* the **trained weights**, before every checkpoint is written (``NonFiniteGuardHook.after_train_iter`` runs
  before ``CheckpointHook``): a checkpoint with a non-finite weight is never written, so rotation keeps the
  last finite one.

Policy (``NonFiniteGuardHook(policy=..., max_skipped=...)`` in ``custom_hooks``): ``'stop'`` (the default)
raises :class:`NonFiniteError` naming the iteration, the batch's samples (``FILE:LINE``) and the newest
checkpoint; ``'skip'`` drops the step (no backward, no update) and counts it, stopping once more than
``max_skipped`` steps were dropped; DeepSpeed's engine cannot drop a step, so ``'skip'`` is refused there.
"""

from __future__ import annotations

import contextlib
import math
import os
from typing import List, Optional, Sequence

import torch
import torch.distributed as dist
from mmengine.hooks import CheckpointHook, Hook
from mmengine.logging import print_log
from mmengine.optim import AmpOptimWrapper, OptimWrapper

from xtuner_plugins.errors import Refused, Stated

__all__ = ['NonFiniteError', 'NonFiniteGuard', 'NonFiniteGuardHook', 'all_ranks_finite', 'GuardedOptimWrapper',
           'GuardedAmpOptimWrapper', 'non_finite_tensors', 'unwrap_model']

POLICIES = ('stop', 'skip')


class NonFiniteError(Stated, RuntimeError):
    """Training met a non-finite loss, gradient norm or weight."""


def all_ranks_finite(value: torch.Tensor) -> bool:
    """Whether ``value`` is finite on every rank (the same answer on all of them)."""
    bad = (~torch.isfinite(value.detach())).any().to(torch.float32).reshape(1)
    if dist.is_available() and dist.is_initialized():
        backend = dist.get_backend()
        bad = bad.to('cuda' if backend == 'nccl' else 'cpu')
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    return not bool(bad.item())


def non_finite_tensors(named_tensors) -> List[str]:
    """Names of the floating-point tensors of ``(name, tensor)`` pairs holding a NaN or an infinity."""
    return [name for name, t in named_tensors
            if t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all())]


class NonFiniteGuard:
    """What the checks need to know: the policy, the current iteration, the batch, the work folder."""

    def __init__(self, policy: str = 'stop', max_skipped: int = 10):
        if policy not in POLICIES:
            raise Refused(f'non-finite policy {policy!r}: use one of {POLICIES}')
        if isinstance(max_skipped, bool) or not isinstance(max_skipped, int) or max_skipped < 0:
            raise Refused(f'non-finite guard\'s max_skipped: expected a whole number >= 0 (steps the \'skip\' policy '
                          f'may drop), got {max_skipped!r}')
        self.policy, self.max_skipped = policy, max_skipped
        self.iteration: Optional[int] = None
        self.work_dir: Optional[str] = None
        self.samples: Sequence[str] = ()
        self.skipped = 0
        self.skip_step = False

    def where(self) -> str:
        it = f'iteration {self.iteration}' if self.iteration is not None else 'this step'
        samples = f'; the batch\'s samples: {", ".join(self.samples[:16])}' if self.samples else ''
        return it + samples

    def last_checkpoint(self) -> str:
        pointer = os.path.join(self.work_dir or '', 'last_checkpoint')
        if self.work_dir and os.path.isfile(pointer):
            with open(pointer, encoding='utf-8') as f:
                return f'; the newest checkpoint (finite: none with a non-finite weight is written): {f.read().strip()}'
        return '; no checkpoint was written yet'

    def failed(self, what: str) -> None:
        """A check failed on some rank: stop, or mark the step to be dropped (counted)."""
        if self.policy == 'skip' and self.skipped < self.max_skipped:
            self.skipped += 1
            self.skip_step = True
            print_log(f'non-finite {what} at {self.where()}: step dropped ({self.skipped} of at most '
                      f'{self.max_skipped})', logger='current', level=30)
            return
        limit = f' (after {self.skipped} dropped steps, the limit)' if self.policy == 'skip' else ''
        raise NonFiniteError(f'non-finite {what} at {self.where()}{limit}{self.last_checkpoint()}. Lower the learning '
                             f'rate or check these samples (policy \'skip\' drops such steps)')

    def check_loss(self, loss: torch.Tensor) -> None:
        self.skip_step = False
        if not all_ranks_finite(loss):
            value, rank = float(loss.detach()), dist.get_rank() if dist.is_initialized() else 0
            here = f'{value:g} on rank {rank}'
            self.failed(f'loss ({here})' if not math.isfinite(value) else f'loss (on another rank; {here})')


class _GuardedMixin:
    """``update_params`` drops a step the guard marked; ``_clip_grad`` checks the gradient norm."""

    guard: Optional[NonFiniteGuard] = None

    def update_params(self, loss, step_kwargs=None, zero_kwargs=None) -> None:
        if self.guard is None or not self.guard.skip_step:
            return super().update_params(loss, step_kwargs, zero_kwargs)
        # a dropped micro-batch: no backward; it still counts in the accumulation window, whose other
        # micro-batches' gradients are applied at its end
        self._inner_count += 1
        if self.should_update():
            if any(p.grad is not None for group in self.optimizer.param_groups for p in group['params']):
                self.guard.skip_step = False
                self.step(**(step_kwargs or {}))
            self.zero_grad(**(zero_kwargs or {}))

    def _clip_grad(self) -> None:
        """MMEngine's: clip and log the norm of the gradients present; then the norm is checked."""
        params = [p for group in self.optimizer.param_groups for p in group['params']
                  if p.requires_grad and p.grad is not None]
        if not params:
            return
        norm = self.clip_func(params, **self.clip_grad_kwargs)
        if norm is None:  # clip by value: no norm
            return
        self.message_hub.update_scalar(f'train/{self.grad_name}', float(norm))
        if self.guard is not None and not self._overflow_is_routine() and not bool(torch.isfinite(norm)):
            self.guard.failed(f'gradient norm ({float(norm)})')

    def _overflow_is_routine(self) -> bool:
        return False


class GuardedOptimWrapper(_GuardedMixin, OptimWrapper):
    """MMEngine's ``OptimWrapper`` (the CPU's: ``AmpOptimWrapper`` needs a GPU) with the guard's checks; a dropped
    step leaves the weights alone. A model that trains bf16 weights (``autocast_dtype``, ``models/precision.py``)
    runs its forward under the CPU's autocast, as ``AmpOptimWrapper`` runs it on a GPU: no loss scaling, bf16
    has fp32's range."""

    @contextlib.contextmanager
    def optim_context(self, model):
        dtype = getattr(unwrap_model(model), 'autocast_dtype', None)
        with super().optim_context(model), torch.autocast('cpu', dtype=dtype or torch.bfloat16,
                                                          enabled=dtype is not None):
            yield

    def step(self, **kwargs) -> None:
        if self.clip_grad_kwargs:
            self._clip_grad()
            if self.guard is not None and self.guard.skip_step:
                return  # update_params' zero_grad follows
        self.optimizer.step(**kwargs)


class GuardedAmpOptimWrapper(_GuardedMixin, AmpOptimWrapper):
    """MMEngine's ``AmpOptimWrapper`` with the guard's checks. Its loss scaler already leaves out a step whose
    gradients are not finite; in fp16 that is routine (the scale is too large) and not reported, in bf16 it
    is (the policy decides whether training goes on)."""

    def _overflow_is_routine(self) -> bool:
        return getattr(self, 'cast_dtype', None) == torch.float16


class NonFiniteGuardHook(Hook):
    """Installs the guard on the model and the optimizer wrapper; checks the weights before a checkpoint."""

    priority = 'NORMAL'  # after_train_iter before CheckpointHook (VERY_LOW)

    def __init__(self, policy: str = 'stop', max_skipped: int = 10):
        self.guard = NonFiniteGuard(policy, max_skipped)

    def before_train(self, runner) -> None:
        model = unwrap_model(runner.model)
        model.nonfinite_guard = self.guard
        self.guard.work_dir = runner.work_dir
        wrapper = runner.optim_wrapper
        if isinstance(wrapper, _GuardedMixin):
            wrapper.guard = self.guard
        elif self.guard.policy == 'skip':
            raise Refused(f'non-finite policy \'skip\' needs AutoOptimWrapper; {type(wrapper).__name__} (e.g. '
                          f'under --deepspeed) cannot drop a step: use policy=\'stop\'')

    def before_train_iter(self, runner, batch_idx: int, data_batch=None) -> None:
        self.guard.iteration = runner.iter + 1
        data = (data_batch or {}).get('data') or {}
        self.guard.samples = list(data.get('samples') or ())

    def after_train_iter(self, runner, batch_idx: int, data_batch=None, outputs=None) -> None:
        if not self._saves_now(runner):
            return
        model = unwrap_model(runner.model)
        local = [(n, getattr(p, 'ds_tensor', p)) for n, p in model.named_parameters() if p.requires_grad]
        bad = non_finite_tensors(local)
        if not all_ranks_finite(torch.tensor(float('nan') if bad else 0.0)):
            raise NonFiniteError(f'non-finite trained weights after {self.guard.where()}'
                                 f'{": " + ", ".join(bad[:8]) if bad else " (on another rank)"}; the checkpoint '
                                 f'of this iteration is not written{self.guard.last_checkpoint()}')

    @staticmethod
    def _saves_now(runner) -> bool:
        for hook in runner.hooks:
            if isinstance(hook, CheckpointHook) and not hook.by_epoch:
                last = hook.save_last and runner.iter + 1 >= runner.max_iters
                return last or (hook.interval > 0 and (runner.iter + 1) % hook.interval == 0)
        return False


def unwrap_model(model):
    """The model itself inside DDP's, DeepSpeed's and MMEngine's wrappers (which delegate attributes, so a
    ``hasattr`` test would stop at the wrapper)."""
    for _ in range(3):
        model = getattr(model, 'module', model)
    return model
