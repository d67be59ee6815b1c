"""A training config's batch and optimizer settings as the planner counts them (``xtuner_plugins/planner.py``),
read by ``tools/plan.py`` and by ``engine/ckptfit.py`` (``llm_grad_ckpt_layers='auto'``) alike.

The batch is the config's: ``batch_size`` rows of ``max_length`` tokens with ``max_dynamic_patch`` tiles (+ the
thumbnail) per sample, or one pack of ``max_tokens`` tokens and ``max_tiles`` tiles for packed configs (preference
configs: twice the rows, a pair being a chosen and a rejected row, each with the pair's tiles); every text token
counts as supervised (the worst case for the LM head's logits).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Tuple


#: the most tokens a row or a pack is planned with (2**24: past every LLM's context; 10**20 planned a table of
#: 2.7 million TiB)
MOST_TOKENS = 2 ** 24
#: the most rows (or pairs) a device's batch, or tiles a pack, is planned with
MOST_ROWS = 2 ** 20


def whole(value, name: str, low: int = 1, high: int = MOST_ROWS) -> int:
    """``value`` as a config setting that must be a whole number from ``low`` to ``high``; ValueError naming it
    otherwise."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f'{name} must be a whole number >= {low}, got {value!r}')
    if value > high:
        raise ValueError(f'{name} {value} is past the most the planner takes ({high:,}): not a batch any device '
                         f'holds')
    return value


def rows_per_item(cfg) -> int:
    """Rows a data-set item makes: 2 for a preference config (a pair, or a pack of pairs, is a row of chosen and a
    row of rejected answers, each with the pair's tiles), else 1."""
    return 2 if cfg.model.get('preference') is not None else 1


def config_batch(cfg, tiles_per_sample: int, tokens_per_tile: int):
    """The config's data loader's ``Batch`` (module docstring; ``supervised`` 0: :func:`with_supervised`)."""
    from xtuner_plugins.plan_activations import Batch
    loader = cfg.train_dataloader
    ds = loader.dataset
    rows = whole(loader.get('batch_size', 1), 'train_dataloader.batch_size') * rows_per_item(cfg)
    from xtuner_plugins.models.runconfig import inner_dataset
    packed = 'max_tokens' in ds
    inner, key = inner_dataset(ds)
    if packed:
        length = whole(ds['max_tokens'], 'train_dataloader.dataset.max_tokens', high=MOST_TOKENS)
        tiles = ds.get('max_tiles')
        tiles = length // tokens_per_tile if tiles is None else whole(tiles, 'train_dataloader.dataset.max_tiles')
        return Batch(rows=rows, length=length, tiles=tiles * rows, supervised=0, packed=True)
    length = whole(inner.get('max_length', 8192), f'{key}.max_length', high=MOST_TOKENS)
    return Batch(rows=rows, length=length, tiles=tiles_per_sample * rows, supervised=0)


def with_supervised(batch, tokens_per_tile: int):
    """``batch`` with every text token supervised."""
    text = max(batch.rows * batch.length - batch.tiles * tokens_per_tile, 0)
    return replace(batch, supervised=text)


def model_batch(cfg, model):
    """The config's batch for ``model`` (its tokens per tile and image mode): ``(Batch, tokens per tile)``."""
    per_tile = model.num_image_token
    from xtuner_plugins.models.runconfig import inner_dataset
    inner, key = inner_dataset(cfg.train_dataloader.dataset)
    patches = whole(inner.get('max_dynamic_patch', 12), f'{key}.max_dynamic_patch')
    tiles = 1 if model.image_mode != 'tile' else patches + (
        1 if inner.get('use_thumbnail', True) and patches > 1 else 0)
    return with_supervised(config_batch(cfg, tiles, per_tile), per_tile), per_tile


def planned_batches(batch, tokens_per_tile: int) -> list:
    """The batches a run's plan must fit: the config's, and for unpacked rows also one with as many tiles as a row
    of ``batch.length`` tokens holds (videos' frames and many images' tiles can pass ``max_dynamic_patch``), fewer
    text tokens then; every text token supervised."""
    out = [with_supervised(batch, tokens_per_tile)]
    if not batch.packed:
        out.append(with_supervised(replace(batch, tiles=batch.rows * max(1, batch.length // tokens_per_tile)),
                                   tokens_per_tile))
    return out


def optimizer_settings(cfg) -> Tuple[bool, int]:
    """``(fused, accumulation)``: whether AdamW is the fused kernel, and ``accumulative_counts``."""
    optimizer = cfg.optim_wrapper.get('optimizer')   # (None or none: AdamW's default, not fused)
    fused = bool(optimizer.get('fused', False)) if isinstance(optimizer, dict) else False
    return fused, int(cfg.optim_wrapper.get('accumulative_counts', 1) or 1)
