"""Regional ``torch.compile`` (``compile_blocks``): each transformer block of the LLM and of the vision tower
compiled on its own, the rest of the model left eager.

Why blocks and not the whole model: the blocks of one stack share their code, so inductor compiles one graph
and every layer reuses it (compile time is one block's, not the model's); gradient checkpointing, LoRA wrappers,
the loss and the data-dependent parts (image tokens scattered into the embeddings, packed segments) stay eager,
where graph breaks would otherwise split the model. On a CPU with AMX one Qwen2.5-0.5B decoder layer's forward and
backward runs 1.2x faster compiled (``benchmarks/bench_compile.py``; benchmarks/RESULTS.md): the norms, RoPE,
SwiGLU and residual adds are fused into a few C++ loops instead of one pass over memory each. On an H100, a packed
Qwen2.5-1.5B step with every LLM and vision block compiled ran 1.16x faster (``benchmarks/gpu.sh``, 2026-11-27).

Lengths change every step. The blocks are compiled with dynamic shapes, so a new length reuses the graph;
``torch._dynamo``'s recompile limit bounds what is left (a batch of one sample against several is a second graph,
torch specialising sizes 0 and 1). :func:`compiled_graphs` counts the graphs made, for the tests' bound.

Compilation needs a C++ compiler on a CPU (inductor's) and Triton on CUDA; the first steps pay it (tens of
seconds on 2 cores, 35 s on the H100 machine's 16; inductor caches the kernels on disk, ``TORCHINDUCTOR_CACHE_DIR``,
so a restart pays less).
"""

from __future__ import annotations

import contextlib
import os
import shutil
from typing import Iterator, List, Optional, Tuple, Union

import torch
from torch import nn

from xtuner_plugins.errors import Refused

from . import cpu_bf16

COMPILE_PARTS = ('llm', 'vision')
# 'auto' compiles an LLM of at least this many parameters: a step of a smaller one is too short to pay back the
# compilation (tens of seconds on 2 cores) within a short run, and the tiny look-alikes of the tests stay eager
AUTO_MIN_LLM_PARAMETERS = 100_000_000


def cxx_compiler() -> bool:
    """Whether inductor finds a C++ compiler (``$CXX``, g++ or clang++), which it needs on a CPU."""
    return any(shutil.which(c) for c in (os.environ.get('CXX', ''), 'g++', 'clang++', 'c++') if c)


def cuda_compiles() -> bool:
    """Whether inductor compiles for this machine's GPU as it was measured to pay: Triton importable and a GPU of
    compute capability 8.0 or more (bf16 matrix units; an H100 measured)."""
    if not torch.cuda.is_available():
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.get_device_capability() >= (8, 0)


_AS_ON_A_GPU = False


@contextlib.contextmanager
def as_on_a_gpu() -> Iterator[None]:
    """``compile_blocks='auto'`` resolved as on a CUDA GPU that compiles, whatever this machine is: a GPU run
    planned elsewhere (``tools/plan.py`` on a laptop planned eager layers where the GPU compiles them)."""
    global _AS_ON_A_GPU
    before, _AS_ON_A_GPU = _AS_ON_A_GPU, True
    try:
        yield
    finally:
        _AS_ON_A_GPU = before


def compile_parts(flag: Union[bool, str, List[str], Tuple[str, ...], None], llm_parameters: int = 0,
                  why_not: Optional[List[str]] = None) -> Tuple[str, ...]:
    """``compile_blocks`` -> the parts compiled: False/None none, True both, or the parts named. ``'auto'`` (the
    default) compiles where it was measured to pay (benchmarks/RESULTS.md), for an LLM of at least
    :data:`AUTO_MIN_LLM_PARAMETERS` (``llm_parameters``) and without ``why_not`` reasons (fp32 weights, a quantised
    LLM, ZeRO-3): on a CUDA GPU that :func:`cuda_compiles`, the LLM's and the vision tower's blocks (1.16x on an
    H100, both compiled); on a machine without CUDA, a CPU where bf16 pays (:func:`cpu_bf16.why_not`) and a C++
    compiler, the LLM's blocks (the vision tower's forward gained nothing compiled there and once lost time)."""
    if flag is None or flag is False:
        return ()
    if flag == 'auto':
        if why_not or llm_parameters < AUTO_MIN_LLM_PARAMETERS:
            return ()
        if _AS_ON_A_GPU or torch.cuda.is_available():
            return COMPILE_PARTS if _AS_ON_A_GPU or cuda_compiles() else ()
        return ('llm',) if cpu_bf16.why_not() is None and cxx_compiler() else ()
    if flag is True:
        return COMPILE_PARTS
    parts = (flag,) if isinstance(flag, str) else tuple(flag)
    unknown = [p for p in parts if p not in COMPILE_PARTS]
    if unknown or not parts:
        raise Refused(f'compile_blocks={flag!r}: expected True, False, \'auto\', or some of '
                      f'{", ".join(COMPILE_PARTS)}')
    return parts


def compile_model(model: nn.Module, flag: Union[bool, str, List[str], Tuple[str, ...], None],
                  why_not: List[str]) -> Tuple[str, ...]:
    """Compile the blocks of the parts of ``model`` (a ``VisionLanguageModel``: ``language_model`` and
    ``vision_model``) that :func:`compile_parts` picks; returns them."""
    from mmengine.logging import print_log

    from .parts import count_parameters
    parts = compile_parts(flag, count_parameters(model.language_model)['total'], why_not)
    for part in parts:   # after LoRA, checkpointing and the reference's copies (eager)
        n = compile_stacks(model.language_model if part == 'llm' else model.vision_model)
        print_log(f'compile_blocks: {n} {part} blocks compiled (torch.compile, dynamic shapes; the first steps pay '
                  'the compilation)', logger='current')
    return parts


def repeated_blocks(module: nn.Module) -> Iterator[nn.Module]:
    """The blocks of ``module``'s transformer stacks: the children of every ``ModuleList`` of two or more modules
    of one class (an LLM's decoder layers, a vision tower's encoder layers; through PEFT and quantisation
    wrappers alike, which keep the stack a ``ModuleList``). Only the outermost: a stack inside a block (a mixture
    of experts' experts, inside each decoder layer) is compiled with its block, not again on its own (a Qwen3-MoE's
    2 layers of 4 experts were 10 blocks compiled, each expert a second compiled frame under its layer's)."""
    stacks = []
    for name, child in module.named_modules():
        if any(name.startswith(stack + '.') for stack in stacks):
            continue
        if isinstance(child, nn.ModuleList) and len(child) > 1 and len({type(m) for m in child}) == 1:
            stacks.append(name)
            yield from child


def compile_stacks(module: nn.Module) -> int:
    """Compile each block of ``module`` in place (``nn.Module.compile``: the module keeps its parameters,
    names and hooks, so checkpoints, LoRA and the state dict are unchanged); returns how many."""
    blocks = list(repeated_blocks(module))
    if blocks:
        # dynamo's DDP optimizer splits a compiled graph at DDP's gradient buckets, which serves a whole model
        # compiled under DDP; a block is much smaller than a bucket, and the split of a checkpointed block's
        # graph fails in torch's partitioner (``cleanup_recompute_tags``: ``None > None``) on 2 ranks
        torch._dynamo.config.optimize_ddp = False
    for block in blocks:
        block.compile(dynamic=True)
    return len(blocks)


def is_compiled(module: nn.Module) -> bool:
    """Whether ``module`` was compiled in place (``nn.Module.compile``, as :func:`compile_stacks` does)."""
    return getattr(module, '_compiled_call_impl', None) is not None


def compiled_graphs() -> int:
    """Graphs dynamo has compiled in this process so far (its ``unique_graphs`` counter)."""
    from torch._dynamo.utils import counters
    return int(counters['stats']['unique_graphs'])


def reset_compiled() -> None:
    """Forget compiled graphs and counters (tests)."""
    torch._dynamo.reset()
