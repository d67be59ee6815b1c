"""Training hooks.

``ThroughputHook`` writes per-iteration throughput and memory scalars into the runner's message hub under
``train/<name>``. MMEngine's ``LogProcessor`` collects every ``train/*`` scalar of the message hub, so they
show in the console line of ``LoggerHook`` (``tokens_per_sec: ...``) and ``LoggerHook`` hands them to the
visualizer (``vis_data/scalars.json``, TensorBoard with ``TensorboardVisBackend``) at its logging interval.
The hook's priority (``NORMAL``) runs it before ``LoggerHook`` (``BELOW_NORMAL``) in ``after_train_iter``.
"""

from __future__ import annotations

import resource
import sys
import time
from typing import Any, Optional, Tuple

import torch
from mmengine.dist import all_reduce, get_world_size
from mmengine.hooks import Hook

from xtuner_plugins.errors import Refused

__all__ = ['ThroughputHook', 'count_tokens_and_samples', 'peak_memory_mb', 'peak_rss_mb']


def _as_data_dict(data_batch: Any) -> Optional[dict]:
    if isinstance(data_batch, dict):
        data = data_batch.get('data', data_batch)
        return data if isinstance(data, dict) else None
    return None


def count_tokens_and_samples(data_batch: Any) -> Tuple[Optional[int], Optional[int]]:
    """(non-padding tokens, samples) of an XTuner-style batch ``{'data': {...}, 'data_samples': ...}``.

    Tokens: ``attention_mask.sum()`` when the batch has a mask, else ``input_ids.numel()`` (packed/varlen
    batches carry no padding). Samples: the batch dimension, or for packed batches the number of samples
    in ``seq_lens`` (this project's packs) or ``cumulative_len`` (XTuner's). ``None`` where the batch does not tell.
    """
    data = _as_data_dict(data_batch)
    if data is None:
        return None, None
    tokens = samples = None
    mask = data.get('attention_mask')
    ids = data.get('input_ids')
    if torch.is_tensor(mask):
        tokens = int(mask.detach().to(torch.int64).sum().item())
        samples = int(mask.shape[0]) if mask.dim() > 0 else 1
    elif torch.is_tensor(ids):
        tokens = int(ids.numel())
        samples = int(ids.shape[0]) if ids.dim() > 0 else 1
    seq_lens = data.get('seq_lens')  # our packed batches (xtuner_plugins.data.packing)
    if isinstance(seq_lens, (list, tuple)) and seq_lens:
        samples = sum(int(len(s)) for s in seq_lens)
    cumulative_len = data.get('cumulative_len')
    if isinstance(cumulative_len, (list, tuple)) and cumulative_len:
        samples = sum(max(int(len(c)) - 1, 0) for c in cumulative_len)
    if samples is None:
        for value in data.values():
            if torch.is_tensor(value) and value.dim() > 0:
                samples = int(value.shape[0])
                break
    return tokens, samples


def peak_rss_mb() -> float:
    """Peak resident memory of this process in MiB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # ru_maxrss is KiB on Linux, bytes on macOS.
    return peak / 2**20 if sys.platform == 'darwin' else peak / 1024


def peak_memory_mb() -> float:
    """Peak memory of this process in MiB: ``torch.cuda.max_memory_allocated`` on a GPU, else peak RSS."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated() / 2**20
    return peak_rss_mb()


class ThroughputHook(Hook):
    """Log throughput and peak memory per training iteration.

    Scalars (``train/`` prefix in the message hub; without it in the log line and TensorBoard):

    - ``tokens_per_sec``: non-padding tokens of the iteration, summed over ranks, divided by the iteration's
      wall time (averaged over ranks); absent when the batches carry neither ``attention_mask`` nor
      ``input_ids``.
    - ``samples_per_sec``: samples of the iteration summed over ranks per second.
    - ``data_time_share``: time spent waiting for the batch divided by the iteration's wall time (summed over
      ranks; the time of hooks after this one, e.g. checkpoint saving, is counted in the next iteration's wait,
      as in MMEngine's ``IterTimerHook``).
    - ``peak_mem_mb``: the largest per-rank peak memory in MiB (GPU: ``max_memory_allocated`` since the last
      reset, MMEngine's ``LogProcessor`` resets it when it logs ``memory``; CPU: the process's peak RSS).

    Args:
        sync_across_ranks (bool): reduce the numbers over all ranks (two tiny all-reduces per iteration).
            Defaults to True; with False every rank logs its own numbers.
    """

    priority = 'NORMAL'

    def __init__(self, sync_across_ranks: bool = True) -> None:
        self.sync_across_ranks = sync_across_ranks
        self._last_end: Optional[float] = None
        self._data_time = 0.0

    def before_train(self, runner) -> None:
        self._last_end = time.perf_counter()

    def after_val(self, runner) -> None:
        # Do not count an in-training validation as data time of the next iteration.
        self._last_end = time.perf_counter()

    def before_train_iter(self, runner, batch_idx: int, data_batch=None) -> None:
        now = time.perf_counter()
        if self._last_end is None:
            self._last_end = now
        self._data_time = now - self._last_end

    def after_train_iter(self, runner, batch_idx: int, data_batch=None, outputs=None) -> None:
        now = time.perf_counter()
        start = self._last_end if self._last_end is not None else now
        iter_time = max(now - start, 1e-9)
        self._last_end = now

        tokens, samples = count_tokens_and_samples(data_batch)
        stats = torch.tensor(
            [float(tokens or 0), float(tokens is not None), float(samples or 0), self._data_time, iter_time],
            dtype=torch.float64)
        peak = torch.tensor([peak_memory_mb()], dtype=torch.float64)
        world_size = 1
        if self.sync_across_ranks:
            world_size = get_world_size()
            if world_size > 1:
                all_reduce(stats, op='sum')
                all_reduce(peak, op='max')
        tok_sum, has_tokens, sample_sum, data_sum, time_sum = stats.tolist()
        mean_iter_time = time_sum / world_size

        hub = runner.message_hub
        if has_tokens > 0:
            hub.update_scalar('train/tokens_per_sec', tok_sum / mean_iter_time)
        hub.update_scalar('train/samples_per_sec', sample_sum / mean_iter_time)
        hub.update_scalar('train/data_time_share', data_sum / time_sum)
        hub.update_scalar('train/peak_mem_mb', float(peak.item()))
        self._last_end = time.perf_counter()  # exclude the reductions above from the next data time


class PreferenceStateHook(Hook):
    """Keeps MPO's BCO reward baseline (a running mean over the whole run, the same on every rank) in the
    checkpoint's ``meta``, so that a resumed run continues it instead of starting it over (``configs/dpo_lora.py``
    adds this hook)."""

    KEY = 'bco_reward_baseline'

    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        from .nonfinite import unwrap_model
        baseline = getattr(unwrap_model(runner.model), '_reward_baseline', None)
        if baseline is not None:
            checkpoint.setdefault('meta', {})[self.KEY] = [baseline.mean, baseline.count]

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        from xtuner_plugins.models.preference import RunningMean

        from .nonfinite import unwrap_model
        saved = (checkpoint.get('meta') or {}).get(self.KEY)
        model = unwrap_model(runner.model)
        if saved is not None and hasattr(model, '_reward_baseline'):
            model._reward_baseline = RunningMean()
            model._reward_baseline.mean, model._reward_baseline.count = float(saved[0]), int(saved[1])


class LineageHook(Hook):
    """What the model was trained from (``models/lineage.py``): stops a stage meant to follow an earlier one that
    was started without it (``model.pretrained_pth``; ``model.from_scratch=True`` when that is meant), and records
    the model's lineage in every checkpoint's ``meta`` for the converter, the tools and the next stage, and the
    settings the run's command line named (``engine/named.py``) for a resume."""

    priority = 'VERY_HIGH'
    KEY = 'lineage'

    def before_run(self, runner) -> None:
        from .nonfinite import unwrap_model
        if getattr(unwrap_model(runner.model), 'expects_previous_stage', False):
            raise Refused('this stage trains more than the projector but starts from no earlier stage: its '
                          'projector (mlp1) would be random. Set model.pretrained_pth=CHECKPOINT (the warm-up '
                          'or the previous stage), or model.from_scratch=True if starting from scratch is meant')

    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        from .nonfinite import unwrap_model
        lineage = getattr(unwrap_model(runner.model), 'lineage', None)
        if lineage is not None:
            checkpoint.setdefault('meta', {})[self.KEY] = lineage
        from .named import record
        record(checkpoint)   # the keys the run's command line named, for a resume's words (engine/named.py)
