"""LoRA's input dropout on a CPU, its mask drawn at a third of ``nn.Dropout``'s cost.

PEFT drops the input of every LoRA adapter (``lora_dropout``, 0.05 in InternVL's and XTuner's recipes) with its own
``nn.Dropout``: one Bernoulli draw per input element, for seven adapters a decoder layer, again in the recompute of
a checkpointed layer. On a CPU torch draws each element from its Mersenne Twister (5-6 ns an element on 2 cores;
inductor's dropout in a compiled block ~4 ns), more than the frozen matmuls the adapters sit beside: on the Xeon
with AMX (benchmarks/RESULTS.md, ``bench_lora_dropout.py``) a LoRA step of InternViT-300M + Qwen2.5-0.5B, bf16,
compiled LLM blocks, took 18.4 s with dropout 0.05 and 9.6 s without.

:class:`CpuDropout` draws 64 random bits per *four* elements from the same generator (``random_`` on int64) and
keeps an element when its 16 bits are at least ``p`` of their range: the drop probability is ``p`` rounded to
1/65536 (0.05 -> 0.0500030518), and the kept elements are scaled by the inverse of that probability's complement,
so the expectation is unchanged. That step took 15.6 s with it: the draws stay eager inside a compiled block, which
breaks the block at each adapter. The draws come from torch's default generator: ``torch.manual_seed`` repeats
them, and a checkpointed layer's recompute (which restores the RNG state) draws the same mask. Off a CPU, in eval
mode or at ``p=0`` it is ``nn.Dropout`` itself.
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ['CpuDropout', 'keep_mask', 'use_cpu_dropout']

LEVELS = 1 << 16


@torch.compiler.disable   # the draws stay torch's eager ones, in order, inside a compiled block too
def _uniform_int16(shape: torch.Size) -> torch.Tensor:
    """Uniform int16 values of ``shape``: four from each 64-bit draw of the default generator."""
    n = math.prod(shape)
    words = torch.empty((n + 3) // 4, dtype=torch.int64).random_(-2 ** 63, None)
    return words.view(torch.int16)[:n].view(shape)


def keep_mask(shape: torch.Size, p: float) -> torch.Tensor:
    """A bool mask, each element False with probability ``round(p * 65536) / 65536``."""
    return _uniform_int16(shape) >= round(p * LEVELS) - LEVELS // 2


class CpuDropout(nn.Dropout):
    """``nn.Dropout`` (same ``p``, same train/eval switch) whose mask on a CPU is drawn 16 bits an element."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p <= 0 or self.p >= 1 or x.device.type != 'cpu':
            return super().forward(x)
        dropped = round(self.p * LEVELS) / LEVELS
        return torch.where(keep_mask(x.shape, self.p), x, 0.0).mul_(1.0 / (1.0 - dropped))  # in place: one pass less


def use_cpu_dropout(model: nn.Module) -> int:
    """Put a :class:`CpuDropout` in place of each ``nn.Dropout`` of PEFT's ``lora_dropout`` dicts; returns how many.
    The adapters' weights and saved config are unchanged (dropout has neither)."""
    n = 0
    for module in model.modules():
        drops = getattr(module, 'lora_dropout', None)
        if isinstance(drops, nn.ModuleDict):
            for name, drop in drops.items():
                if type(drop) is nn.Dropout:
                    drops[name] = CpuDropout(drop.p)
                    n += 1
    return n
