"""The whole conversion (``tools/convert_to_official.py``): check the inputs, build, merge, write a folder::

    model = build_for_export(cfg, checkpoint, torch.bfloat16)   # config's sources + the trained tensors
    merge_adapters(model, torch.bfloat16)                       # LoRA merged, a 4-bit base dequantised
    write_official(model, tiling, out_dir, torch.bfloat16)      # or write_hf / write_llava / write_remote

Peak memory is about the model's size plus the largest tensor being converted.
"""

from __future__ import annotations

import os
import time
from typing import Callable, Optional

import torch

from xtuner_plugins.data.template import DEFAULT_FRAME_PREFIX
from xtuner_plugins.engine.hooks import peak_rss_mb
from xtuner_plugins.engine.options import load_config

from ..dtypes import dtype_name
from ..lineage import recorded_inputs
from ..runconfig import run_config
from .build import build_for_export, merge_adapters, tiling_settings, training_frame_prefix, training_system_message
from .files import Log, _print
from .gguf import QUANTS, model_misfit as gguf_misfit, tools as gguf_tools, write_gguf
from .gguf_checks import settings_misfit
from .hf import hf_misfit, write_hf
from .llava import llava_misfit, write_llava
from .official import internvl_misfit, write_official
from .outdir import check_out_dir, claimed, written_whole
from .remote import write_remote


def _inputs(config: str, cfg, checkpoint: Optional[str]):
    """The existing files and folders the conversion reads: the config, the checkpoint, the config's sources and
    everything the checkpoint's lineage names (its previous stages and their sources, not on the command line)."""
    model = cfg.model
    vision = model.get('vision_encoder')
    paths = [config, checkpoint, vision.get('path') if isinstance(vision, dict) else vision, model.get('llm'),
             model.get('official_checkpoint'), model.get('pretrained_pth'), model.get('tokenizer')]
    if checkpoint is not None:
        paths += recorded_inputs(checkpoint)
    return sorted({os.path.realpath(p) for p in paths if isinstance(p, str) and os.path.exists(p)})


FORMATS = ('auto', 'official', 'hf', 'llava', 'remote', 'gguf')


def choose_format(model, fmt: str = 'auto', frame_prefix: Optional[str] = None) -> str:
    """``fmt`` checked against the model, or for ``'auto'`` the layout that fits: ``official`` for InternVL,
    ``llava`` for CLIP/SigLIP + LLaVA's MLP on one image, ``remote`` for any other combination. ``frame_prefix``:
    the text training put before each video frame (``--format hf``'s processor writes its own)."""
    if fmt not in FORMATS:
        raise ValueError(f'unknown format {fmt!r}; use one of {FORMATS}')

    def hf(m) -> Optional[str]:
        if frame_prefix is not None and frame_prefix != DEFAULT_FRAME_PREFIX:
            return (f'trained with the video frame prefix {frame_prefix!r}; transformers\' InternVL processor writes '
                    f'{DEFAULT_FRAME_PREFIX!r}')
        return hf_misfit(m)
    misfit = {'official': internvl_misfit, 'hf': hf, 'llava': llava_misfit, 'gguf': gguf_misfit}
    if fmt == 'auto':
        return next((f for f in ('official', 'llava') if misfit[f](model) is None), 'remote')
    if fmt in misfit and misfit[fmt](model):
        fits = [f for f in ('official', 'hf', 'llava') if misfit[f](model) is None] + ['remote']
        raise ValueError(f'--format {fmt} does not fit this model: {misfit[fmt](model)}; formats that fit: '
                         f'{", ".join(fits)}')
    return fmt


WRITERS = {'official': write_official, 'hf': write_hf, 'llava': write_llava, 'remote': write_remote, 'gguf': write_gguf}


def export_checkpoint(config: Optional[str], checkpoint: Optional[str], out_dir: str, fmt: str = 'auto',
                      dtype: torch.dtype = torch.bfloat16, overwrite: bool = False,
                      cfg_options: Optional[dict] = None, max_shard_size: str = '5GB', log: Log = _print,
                      remap=(), quant: str = 'f16', moving_in: Optional[Callable] = None,
                      accept: Optional[Callable[[str, object], Optional[str]]] = None) -> str:
    """Rebuild the model ``checkpoint`` was trained as, load it, merge adapters, write ``out_dir``; returns it.

    The settings are the ones recorded in the checkpoint (``runconfig.run_config``: ``config`` and
    ``cfg_options``, when given, must agree with them; ``remap``: ``(OLD, NEW)`` prefixes of moved folders);
    without a checkpoint (an official folder converted as is), ``config``'s.

    ``fmt``: ``'official'`` (InternVL's remote-code layout), ``'hf'`` (transformers' InternVL), ``'llava'``
    (transformers' LLaVA), ``'remote'`` (a self-contained remote-code folder for any family) or ``'auto'`` (the
    one that fits, see :func:`choose_format`); ``'gguf'``: llama.cpp's pair (``gguf.py``), ``quant`` its LLM's type.
    The folder is written next to ``out_dir`` (the folder it links to, for a link) and moved into place only when
    complete (``moving_in``: :func:`~.outdir.written_whole`'s). ``accept(fmt, model)``: a caller's check of the
    format chosen for the built model, before anything is written; a message it returns is the ``ValueError``.
    """
    if fmt not in FORMATS:
        raise ValueError(f'unknown format {fmt!r}; use one of {FORMATS}')
    if fmt == 'gguf' and quant not in QUANTS:
        raise ValueError(f'--quant {quant}: use one of {", ".join(QUANTS)}')
    start = time.time()
    if checkpoint is not None and os.path.isfile(os.path.join(checkpoint, 'config.json')):  # not DeepSpeed's folder
        raise ValueError(f'{checkpoint} is a model folder (it has a config.json), not a training checkpoint: a '
                         f'converted one is given as the folder itself (chat.py FOLDER, eval.py FOLDER, serve.py '
                         f'FOLDER), not as --checkpoint; a source model (an LLM, a vision encoder) is trained first')
    from xtuner_plugins.outcome import deepspeed_checkpoint, find_checkpoints
    if checkpoint is not None and not deepspeed_checkpoint(checkpoint) and find_checkpoints(checkpoint):
        raise ValueError(f'{checkpoint} is a training work folder, not a checkpoint: give one of its checkpoints '
                         f'(the newest: {find_checkpoints(checkpoint)[-1]})')
    if checkpoint is not None and os.path.isdir(checkpoint) and not deepspeed_checkpoint(checkpoint):
        # (it was read as a checkpoint recording nothing: 'records no training config', then given the config,
        # 'records no lineage ... give model.pretrained_pth', neither what is wrong)
        held = sorted(os.listdir(checkpoint))
        ggufs = [name for name in held if name.endswith('.gguf')]
        if ggufs:   # a whole conversion, not a copy that did not finish
            raise ValueError(f'{checkpoint} is a GGUF folder (--format gguf wrote it: {", ".join(ggufs[:3])}), not a '
                             f'training checkpoint: tools/chat.py and tools/eval.py take it as the folder itself; for '
                             f'another format convert the checkpoint it was converted from')
        raise ValueError(f'{checkpoint} is a folder but not a DeepSpeed checkpoint (no *model_states.pt inside; it '
                         f'holds {", ".join(held[:3]) + (", ..." if len(held) > 3 else "") if held else "nothing"}): '
                         f'a copy that did not finish? Give the checkpoint DeepSpeed saved, whole')
    if checkpoint is not None:
        cfg = run_config(checkpoint, config, cfg_options, remap, log)
    elif config is None:
        raise ValueError('give a checkpoint, or a config that starts from an official folder')
    else:
        cfg = load_config(config, cfg_options)
    out = check_out_dir(out_dir, _inputs(config, cfg, checkpoint), overwrite, log)
    if fmt == 'gguf':  # once the inputs are checked, before the model is built: what llama.cpp cannot take first
        misfit = settings_misfit(cfg.model)
        if misfit:
            raise ValueError(f'--format gguf does not fit this model: {misfit}; --format auto writes the layout '
                             'that fits it')
        gguf_tools()
    with claimed(out):
        return _export(cfg, checkpoint, config, out, out_dir, fmt, dtype, max_shard_size, log, quant, start,
                       moving_in, accept)


def _export(cfg, checkpoint, config, out, out_dir, fmt, dtype, max_shard_size, log, quant, start,
            moving_in, accept) -> str:
    """:func:`export_checkpoint` once ``out`` is checked and claimed."""
    if os.path.islink(out_dir.rstrip(os.sep) or out_dir):
        log(f'OUT_DIR {out_dir} is a link: writing into the folder it points at, {out}')
    log(f'[1/4] building the model of {checkpoint or config} in {dtype_name(dtype)}')
    model = build_for_export(cfg, checkpoint, dtype, log)
    prefix = training_frame_prefix(cfg, model)
    fmt = choose_format(model, fmt, prefix)
    problem = accept(fmt, model) if accept is not None else None
    if problem:
        raise ValueError(problem)
    tiling = tiling_settings(cfg, model)
    if prefix != DEFAULT_FRAME_PREFIX:  # what stands before each video frame: recorded where a format can hold it
        tiling['frame_prefix'] = prefix
    log(f'[2/4] merging adapters ({time.time() - start:.1f}s, peak memory {peak_rss_mb():.0f} MB)')
    merge_adapters(model, dtype, log)
    log(f'[3/4] writing the {fmt} layout ({time.time() - start:.1f}s)')
    written_whole(out, lambda tmp: WRITERS[fmt](model, tiling, tmp, dtype, max_shard_size, log,
                                                system=training_system_message(cfg),
                                                **({'quant': quant} if fmt == 'gguf' else {})), moving_in)
    log(f'[4/4] done: {out_dir} ({fmt} format; {time.time() - start:.1f}s, peak memory {peak_rss_mb():.0f} MB)')
    return out_dir
