"""What ``torch_dtype='auto'`` trains in: bf16 weights with bf16 autocast (the GPU recipe) wherever that pays,
fp32 elsewhere.

On a GPU, ``'auto'`` has always meant bf16 pretrained weights, fp32 trained ones and MMEngine's bf16 autocast.
On a CPU it meant plain fp32, which leaves a CPU with native bf16 matrix products (AMX, AVX-512 BF16) far below
its rate: on the Xeon with AMX of benchmarks/RESULTS.md bf16 ``torch.mm`` runs 4.5x fp32. So a *training* model
(``trainable_fp32=True``) on a CPU takes the GPU recipe too, when:

* bf16 pays there (:func:`.cpu_bf16.why_not`): the CPU has bf16 instructions and its bf16 products, timed once a
  process, run at 1.3x its fp32 ones or more. The flags alone are not enough: a Xeon whose hypervisor hides AMX
  multiplied bf16 at 0.57x fp32 with ``avx512_bf16``, and trained the stage configs under bf16 autocast at
  0.54-0.59x fp32's tokens/s. The log says when this, for an LLM big enough, keeps fp32;

* the LLM has at least :data:`~xtuner_plugins.models.compile.AUTO_MIN_LLM_PARAMETERS` parameters, counted from
  its weight files before they are loaded (:func:`llm_parameters`): a tiny model's matmuls are too small to gain
  and its numbers would differ from machine to machine (the tests' and the demo's look-alikes stay fp32);
* it is not quantised (4-bit QLoRA computes in ``bnb_4bit_compute_dtype``) and not under DeepSpeed ZeRO-3 (its
  CPU JSONs have bf16 off, and the partitioned weights are cast by the engine).

The trained parameters stay fp32 and the optimizer wrapper autocasts the forward to bf16 on the CPU as
``AmpOptimWrapper`` does on a GPU (``engine/nonfinite.GuardedOptimWrapper.optim_context``, which reads
:attr:`VisionLanguageModel.autocast_dtype`). ``torch_dtype='float32'`` turns all of it off, and with it the
compiled blocks that ``compile_blocks='auto'`` adds to the bf16 recipe.

Tools that only run a converted folder (chat, eval, the web demo: :func:`running_dtype`) load it in bf16 under
``--dtype auto`` on a GPU, and on a CPU where bf16 pays when the folder's tensors, all of them (the vision tower's
matmuls gain as the LLM's do), hold :data:`~xtuner_plugins.models.compile.AUTO_MIN_LLM_PARAMETERS` parameters or
more; a tiny folder, or a CPU where bf16 does not pay, keeps fp32 (1.84-1.92x on an Emerald Rapids Xeon at 0.5B:
benchmarks/RESULTS.md). The converter writes what ``--dtype`` says (bf16 by default).
"""

from __future__ import annotations

import glob
import json
import os
from typing import List, Optional, Union

import torch
from mmengine.logging import print_log
from torch import nn

from . import compile as compiling
from . import cpu_bf16
from .dtypes import resolve_dtype
from .parts import count_parameters

__all__ = ['llm_parameters', 'running_dtype', 'training_dtype']

BYTES = {'float32': 4, 'float16': 2, 'bfloat16': 2}


def _safetensors_numel(files: List[str], prefix: str) -> int:
    from safetensors import safe_open
    total = 0
    for path in files:
        with safe_open(path, framework='pt') as f:
            for key in f.keys():
                if key.startswith(prefix):
                    n = 1
                    for d in f.get_slice(key).get_shape():
                        n *= int(d)
                    total += n
    return total


def llm_parameters(llm: Union[str, nn.Module, None], official_checkpoint: Optional[str] = None) -> int:
    """The LLM's parameter count, without loading it: a module's own, else the tensor shapes in the headers of
    its ``.safetensors`` files (the ``language_model.`` tensors of an official InternVL folder); other weight
    files are counted by size over the element size their ``config.json`` records. 0 when nothing is found."""
    if isinstance(llm, nn.Module):
        return count_parameters(llm)['total']
    folder, prefix = (official_checkpoint, 'language_model.') if official_checkpoint else (llm, '')
    if not isinstance(folder, str) or not os.path.isdir(folder):
        return 0
    files = sorted(glob.glob(os.path.join(folder, '*.safetensors')))
    if files:
        return _safetensors_numel(files, prefix)
    weights = glob.glob(os.path.join(folder, '*.bin')) + glob.glob(os.path.join(folder, '*.pt'))
    try:
        with open(os.path.join(folder, 'config.json')) as f:
            stored = str(json.load(f).get('torch_dtype') or 'float32')
    except (OSError, ValueError):
        stored = 'float32'
    return sum(os.path.getsize(w) for w in weights) // BYTES.get(stored, 4)


def training_dtype(torch_dtype: Union[str, torch.dtype, None], *, llm: Union[str, nn.Module, None],
                   official_checkpoint: Optional[str], trained: bool, quantized: bool, zero3: bool,
                   why: Optional[List[str]] = None) -> torch.dtype:
    """The pretrained weights' dtype for ``torch_dtype``: a name or dtype as given; ``'auto'`` bf16 on a GPU, and
    on a CPU bf16 when the module docstring's conditions hold (``why`` gets the reason when they do not)."""
    if torch_dtype not in (None, 'auto') or torch.cuda.is_available():
        return resolve_dtype(torch_dtype)
    reasons = [r for r, cond in (('a model only run, not trained', not trained), ('a quantised LLM', quantized),
                                 ('DeepSpeed ZeRO-3', zero3)) if cond]
    if not reasons:
        n = llm_parameters(llm, official_checkpoint)
        if n < compiling.AUTO_MIN_LLM_PARAMETERS:   # (before the timing: a tiny model does not measure the CPU)
            reasons.append(f'an LLM of {n / 1e6:.1f}M parameters (< {compiling.AUTO_MIN_LLM_PARAMETERS / 1e6:.0f}M)')
        elif slow_bf16 := cpu_bf16.why_not():
            reasons.append(slow_bf16)
            print_log(f"torch_dtype='auto' trains in fp32 here: {slow_bf16} (torch_dtype='bfloat16' trains in bf16 "
                      "here too: in less memory, more slowly)", logger='current')
    if why is not None:
        why.extend(reasons)
    if reasons:
        return torch.float32
    print_log("torch_dtype='auto' on a CPU where bf16 pays: bf16 weights, fp32 trained parameters, bf16 autocast "
              "(torch_dtype='float32' trains in plain fp32)", logger='current')
    return torch.bfloat16


def running_dtype(folder: str, device: str) -> torch.dtype:
    """What ``--dtype auto`` loads a converted ``folder`` in for a tool that only runs it, on ``device``: bf16 on a
    GPU; on a CPU bf16 when the folder's tensors hold at least
    :data:`~xtuner_plugins.models.compile.AUTO_MIN_LLM_PARAMETERS` parameters and bf16 pays there
    (:func:`cpu_bf16.why_not`), else fp32."""
    if str(device).startswith('cuda'):
        return torch.bfloat16
    try:
        n = llm_parameters(folder)
    except Exception:   # weights that do not read (cut short, ...): loading the folder names what is wrong
        return torch.float32
    if n < compiling.AUTO_MIN_LLM_PARAMETERS or cpu_bf16.why_not():
        return torch.float32
    return torch.bfloat16
