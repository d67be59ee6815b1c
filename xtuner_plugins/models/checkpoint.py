"""Reading training checkpoints: an MMEngine ``.pth`` file or a DeepSpeed checkpoint folder.

MMEngine's CheckpointHook writes ``work_dirs/<cfg>/iter_N.pth``: a file in plain runs, and under
DeepSpeed a *folder* of that name holding DeepSpeed's own files (ZeRO-2/3 optimizer partitions and the
module states). Both give back the model's state dict here, consolidated to fp32 on the CPU (no GPU
needed). XTuner saves DeepSpeed checkpoints with ``exclude_frozen_parameters``: they hold only what was
trained, like our ``VisionLanguageModel.state_dict``.
"""

from __future__ import annotations

import json
import os
from typing import Dict, Optional

import torch


def load_trained_state_dict(path: str, lazy: bool = False) -> Dict[str, torch.Tensor]:
    """The model state dict stored at ``path`` (file or DeepSpeed folder), on the CPU.

    ``lazy``: a ``.pth`` is memory-mapped and a DeepSpeed folder consolidated lazily (DeepSpeed's
    ``lazy_mode``); call ``.contiguous()`` on a value to get its tensor. Memory then grows with the tensor
    being read, not with the whole checkpoint.
    """
    if not os.path.exists(path):
        raise FileNotFoundError(f'checkpoint not found: {path}')
    if os.path.basename(os.path.normpath(path)).endswith('.incomplete'):
        raise ValueError(f'{path} is a checkpoint whose save did not finish (the run was killed while writing it); '
                         f'use the one before it')
    if os.path.isdir(path):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
        parent, tag = os.path.split(os.path.normpath(os.path.abspath(path)))
        if not any(name.endswith('model_states.pt') for name in os.listdir(path)):
            raise ValueError(f'{path} is a folder but not a DeepSpeed checkpoint (no *model_states.pt inside)')
        state = get_fp32_state_dict_from_zero_checkpoint(parent, tag=tag, lazy_mode=lazy)
    else:
        # MMEngine checkpoints pickle training state (message hub, HistoryBuffer, ...) next to the weights,
        # which torch's weights_only loader refuses; they are this project's own outputs.
        ckpt = torch.load(path, map_location='cpu', weights_only=False, mmap=lazy)
        state = (ckpt.get('state_dict', ckpt.get('module', ckpt)) if isinstance(ckpt, dict) else None)
        if not isinstance(state, dict):
            raise ValueError(f'{path}: no state dict found (keys: {list(ckpt)[:10] if isinstance(ckpt, dict) else type(ckpt)})')
    return {(k[len('module.'):] if k.startswith('module.') else k): v for k, v in state.items()}


def read_meta(checkpoint: str) -> dict:
    """The ``meta`` MMEngine stores in a checkpoint (a file, or under DeepSpeed the folder's
    ``*model_states.pt``): the run's config text (``cfg``), its lineage (``models/lineage.py``), ...; {} if none.
    The file is memory-mapped: the weights are not read.

    Raises:
        ValueError: naming the file, when it is not a checkpoint torch can read (a safetensors file, a
            converted folder's weights, a truncated copy).
    """
    path = checkpoint
    if os.path.isdir(checkpoint):
        found = sorted(name for name in os.listdir(checkpoint) if name.endswith('model_states.pt'))
        if not found:
            return {}
        path = os.path.join(checkpoint, found[0])
    try:
        ckpt = torch.load(path, map_location='cpu', weights_only=False, mmap=True)
    except FileNotFoundError:
        raise
    except Exception as exc:  # torch's unpickling and zip errors alike
        reason = (str(exc).splitlines() or [''])[0][:200]
        raise ValueError(f'{path} is not a training checkpoint torch can read ({type(exc).__name__}: {reason}); '
                         'give a checkpoint of training: work_dirs/<config>/iter_N.pth (a file, or the folder '
                         'DeepSpeed saves)') from exc
    meta = ckpt.get('meta') if isinstance(ckpt, dict) else None
    return meta if isinstance(meta, dict) else {}


_WEIGHT_FILES = ('model.safetensors.index.json', 'model.safetensors', 'pytorch_model.bin.index.json',
                 'pytorch_model.bin')


def _load_file(path: str, prefix: str) -> Dict[str, torch.Tensor]:
    if path.endswith('.safetensors'):
        from safetensors import safe_open
        with safe_open(path, framework='pt') as f:
            return {k: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}
    sd = torch.load(path, map_location='cpu', weights_only=True)
    return {k: v for k, v in sd.items() if k.startswith(prefix)}


def read_hf_weights(folder: str, prefix: str = '', weights_file: Optional[str] = None) -> Dict[str, torch.Tensor]:
    """Tensors whose key starts with ``prefix`` from a Hugging Face-style folder: ``model.safetensors``,
    sharded safetensors with an index (only the shards holding ``prefix`` are read), or
    ``pytorch_model.bin`` (loaded with ``weights_only=True``)."""
    if weights_file is not None:
        return _load_file(weights_file, prefix)
    for name in _WEIGHT_FILES:
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            continue
        if not name.endswith('.index.json'):
            return _load_file(path, prefix)
        with open(path, encoding='utf-8') as f:
            weight_map = json.load(f)['weight_map']
        sd = {}
        for shard in sorted({file for key, file in weight_map.items() if key.startswith(prefix)}):
            sd.update(_load_file(os.path.join(folder, shard), prefix))
        return sd
    raise FileNotFoundError(f'{folder}: no weights found (looked for {", ".join(_WEIGHT_FILES)})')
