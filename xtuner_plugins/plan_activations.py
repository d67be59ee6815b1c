"""The activations of one training step per device, for the memory planner (``planner.py``): per part, from
the batch shape (:class:`Batch`) and the model as built on the meta device (its checkpointing, frozen parts, LoRA
adapters and attention implementation), and which of them live at once (:func:`phases`).

The activation model (elements per token; ``b`` bytes per element, ``H`` hidden, ``F`` intermediate, ``a``/``kv``
heads, ``d`` head dim, ``V`` vocabulary):

* an LLM layer keeps ``E`` elements (2 bytes in bf16) per token for its backward (:func:`layer_elements`,
  counted from the tensors autograd saves, under bf16 autocast): frozen weights ``4H + 2ad + 2kv*d + 3F + 2d + 2a``
  (the two norms' fp32 inputs, q and k after RoPE and v, the attention output and its log-sum-exp, the MLP's gate,
  up and act, RoPE's cos/sin); trained weights ``2H + 2ad + F`` more (the matmuls' inputs, for the weights'
  gradients); peft's LoRA adapters, per adapted linear layer of input width ``n``, ``n`` more (its input cast for
  the adapter), ``3n`` with dropout (the dropout's output and mask too; ``1.5n`` on a CPU, where the mask is our
  ``CpuDropout``'s bool and its output is not kept beside the adapter's cast). Compiled (``compile_blocks``; inductor
  recomputes elementwise work, saves a shared input once): ``2H + ad + 2kv*d + 2F + 2d + 2a + 4``, ``H + ad + F``
  more trained, each LoRA input once (q/k/v's, gate/up's); with LoRA dropout as eager. Checkpointed it keeps its
  input (``H``), and in the backward the layer being recomputed holds its ``E`` again and the gradients in flight
  through its MLP, ``3F`` (the down projection's input's, the gate's and the up projection's: ``llm layer
  recomputed``; measured within 1% on a real-size step, benchmarks/RESULTS.md); checkpointing that
  keeps the attention kernel's output (``'keep_attention'``, ``models/recompute.py``; SDPA and flash kernels)
  keeps ``ad`` more, and ``4a`` bytes of fp32 log-sum-exp, per token and layer (``attention kept``);
* the LM head and the loss: ``12 V`` bytes per supervised token (bf16 and fp32 logits, the log-softmax the loss
  keeps; in the backward, the logits' gradient in their place; measured ~11 V on the CPU; preference training's
  too: its forward peaks at ``12 V`` when the reference's logits are made beside the policy's log-softmax, and its
  backward at ``12 V``, both measured on the CPU with ``logits_to_keep``; its batch is two rows a pair); with the
  model's
  ``loss_chunk``, per supervised token of one chunk a row; with Liger's fused loss (``liger_kernel``), read from
  its code and not measured, ``8 H`` bytes per supervised token (its chunk of logits is about as large as the
  hidden states, up to twice, and it keeps their gradient) and, for a trained head, its fp32 gradient;
* the token embeddings: ``3H`` (the lookup, the copy the image features go into, the sum);
* packed rows with a dense mask (``sdpa``/``eager``): ``(b + 3) L^2`` bytes per row (the additive mask and the
  boolean masks it is built from); ``eager`` also keeps ``a L^2`` attention probabilities per layer (one layer
  with checkpointing). Padded rows, per-sample (``sdpa_segments``, ``sdpa_varlen``), flash and flex attention:
  nothing quadratic;
* the vision tower, frozen (no graph): one layer's transient ``3C + I`` per token plus the hidden states the
  encoder returns (InternViT 2, CLIP/SigLIP all ``layers + 1``), gone before the LLM runs; trained: ``11C + 2I``
  per layer (``C`` with checkpointing, plus ``2 (11C + 2I)`` for the layer recomputed; ``'keep_attention'``
  ``C`` more, and ``4`` bytes a head, per layer);
* the projector (:func:`projector_elements`), trained or on a trained tower's features, per image token: its
  first linear layer's input ``C'`` (the ViT's width, four times it after InternVL's pixel shuffle), a LayerNorm's
  input before it (``2C'`` in fp32 weights, ``C'`` in bf16 under DeepSpeed), and its GELU's and second layer's
  inputs (``2H``).

The parts do not all live at once (:func:`phases`): the forward's peak holds what the backward keeps plus the
loss (or, earlier, a frozen tower's transient); the backward's holds what it keeps plus the larger of the loss
and the layer recomputed.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, Optional, Tuple

import torch

from xtuner_plugins.models.compile import is_compiled
from xtuner_plugins.models.cpu_attention import as_sdpa
from xtuner_plugins.models.dropout import CpuDropout
from xtuner_plugins.models.moe import routing

DTYPE_BYTES = {'bf16': 2, 'fp16': 2, 'fp32': 4}
RECOMPUTED = 'llm layer recomputed'
LM_HEAD = 'lm head + loss'


@dataclasses.dataclass
class Batch:
    """One step's batch on one device: ``rows`` rows of ``length`` tokens, ``tiles`` tiles in all, ``supervised``
    tokens with a label; ``packed``: the rows hold several samples each."""
    rows: int
    length: int
    tiles: int
    supervised: int
    packed: bool = False


def unchecked_layers(model) -> range:
    """The LLM layers that ``llm_grad_ckpt_layers`` leaves out of checkpointing (none when it is None)."""
    k = getattr(model, 'llm_ckpt_layers', None)
    n = llm_layers(model)
    return range(n, n) if k is None else range(k, n)


def llm_layers(model) -> int:
    """The LLM's decoder layers (its text config's count)."""
    return _llm_shapes(model)['L']


def _llm_shapes(model):
    c = model.language_model.config
    c = c.get_text_config() if hasattr(c, 'get_text_config') else c
    heads = c.num_attention_heads
    F, routed = mlp_width(c)
    return dict(H=c.hidden_size, F=F, L=c.num_hidden_layers, a=heads, routed=routed,
                kv=getattr(c, 'num_key_value_heads', None) or heads,
                d=getattr(c, 'head_dim', None) or c.hidden_size // heads, V=model.language_model.get_output_embeddings()
                .weight.shape[0])


def mlp_width(config) -> Tuple[int, Optional[Tuple[int, int]]]:
    """``(the MLP width a token goes through, (experts a token goes to, experts) or None)``: a dense LLM's
    ``intermediate_size`` (GPT-2's ``n_inner`` or 4 x its width, OPT's ``ffn_dim``); a mixture of experts' expert
    width (``moe_intermediate_size``, else ``intermediate_size``: Mixtral's, OLMoE's) times the experts each token
    goes to, plus a shared expert's (Qwen2-MoE's ``shared_expert_intermediate_size``, DeepSeek's
    ``n_shared_experts``). Qwen3-MoE's ``intermediate_size`` is the width of its dense layers, none in Qwen3-30B-A3B."""
    dense = (getattr(config, 'intermediate_size', None) or getattr(config, 'ffn_dim', None)
             or getattr(config, 'n_inner', None) or 4 * config.hidden_size)
    routed = routing(config)
    if routed is None:
        return dense, None
    expert = getattr(config, 'moe_intermediate_size', None) or dense
    shared = (getattr(config, 'shared_expert_intermediate_size', None)
              or (getattr(config, 'n_shared_experts', None) or 0) * expert)
    return expert * routed[0] + shared, routed


def _decoder_layer(lm):
    """The LLM's first decoder layer (through peft's wrapper), or None."""
    return next((m for name, m in lm.named_modules() if name.endswith('layers.0')), None)


_SHARED_INPUT = {'q_proj': 'qkv', 'k_proj': 'qkv', 'v_proj': 'qkv', 'gate_proj': 'mlp', 'up_proj': 'mlp'}  # one input


def layer_elements(model, device: str = 'cuda', fp32_stream: bool = False) -> float:
    """``E``: the elements (bf16-sized) one LLM decoder layer keeps per token for its backward, by what its first
    layer trains (module docstring). Measured by ``saved_tensors_hooks`` on a Qwen2.5-1.5B layer under bf16
    autocast (benchmarks/RESULTS.md): frozen 36.9k, trained 52.0k, LoRA on every linear layer 55.4k, 91.7k with
    dropout; tests/test_planner.py checks it against the tiny model's layer, eager and compiled (``device='cpu'``:
    LoRA's dropout is ``models/dropout.CpuDropout``, off a CPU torch's). ``fp32_stream``: the residual stream is
    fp32 (trained fp32 embeddings under bf16 autocast): the RMSNorms' fp32 and each projection's own bf16 cast of
    its input, 5 H more eager, 1.5 H compiled (inductor saves the stream once; measured, tests/test_planner.py)."""
    s = _llm_shapes(model)
    H, F, A, K = s['H'], s['F'], s['a'] * s['d'], s['kv'] * s['d']
    layer = _decoder_layer(model.language_model)   # None: not a decoder we can read, counted as trained
    adapted = [(name, m) for name, m in (layer.named_modules() if layer is not None else ())
               if isinstance(getattr(m, 'lora_A', None), torch.nn.ModuleDict) and len(m.lora_A)]
    dropouts = [any(isinstance(x, torch.nn.Dropout) for x in m.lora_dropout.values()) for _, m in adapted]
    compiled = layer is not None and is_compiled(layer) and not any(dropouts)
    trained = not adapted and (layer is None or any(p.requires_grad for p in layer.parameters()))
    if compiled:   # measured on compiled Qwen2 layers of two widths (tests/test_planner.py)
        e = 2 * H + A + 2 * K + 2 * F + 2 * s['d'] + 2 * s['a'] + 4 + (H + A + F if trained else 0)
        inputs = {_SHARED_INPUT.get(name.rsplit('.', 1)[-1], name): m.in_features for name, m in adapted}
        return e + sum(inputs.values()) + sum(2 * sum(m.r.values()) for _, m in adapted) + 1.5 * H * fp32_stream
    qk = (A + K) * _qk_norms(layer)   # Qwen3's and OLMoE's RMSNorm over the queries' and keys' heads
    e = (4 * H + 2 * A + 2 * K + 3 * F + 2 * s['d'] + 2 * s['a'] + 5 * H * fp32_stream + _moe_elements(s)
         + 2 * qk + (qk if trained else 0))
    for (name, m), dropout in zip(adapted, dropouts):
        cpu_dropout = device == 'cpu' and any(type(x) is CpuDropout for x in m.lora_dropout.values())
        share = _expert_share(s, name)
        e += share * (m.in_features * (1.5 if cpu_dropout else 3 if dropout else 1) + 2 * sum(m.r.values()))
    routed = s['routed'][0] * H if s['routed'] and trained else 0   # the trained router's weighing of each output
    return e + (2 * H + 2 * A + F + routed if trained else 0)


def _expert_share(shapes: dict, name: str) -> float:
    """The share of the tokens a module of a decoder layer sees: an expert's (``...experts.N...``) the experts each
    token goes to over the experts (1 for any other module)."""
    if shapes['routed'] is None or '.experts.' not in f'.{name}.':
        return 1.0
    top_k, experts = shapes['routed']
    return top_k / experts


def _moe_elements(shapes: dict) -> float:
    """What a mixture-of-experts layer keeps per token beyond its experts' MLPs: each token's input gathered and its
    output weighed once per expert it goes to (2 H each), the router's logits and weights (2 x experts). Fitted to
    what a Qwen3-MoE, a Mixtral and an OLMoE decoder layer save (256 wide, 8 experts of 512, 2 a token;
    tests/test_planner.py)."""
    if shapes['routed'] is None:
        return 0
    top_k, experts = shapes['routed']
    return 2 * top_k * shapes['H'] + 2 * experts


def _qk_norms(layer) -> bool:
    """Whether the decoder layer normalises its queries and keys (Qwen3's, OLMoE's ``q_norm``/``k_norm``): their
    inputs are kept twice more, three times trained (measured on the tiny Qwen3 and the MoE layers above; a dense
    Qwen3 was planned at 0.81x without them)."""
    return layer is not None and any(name.endswith(('q_norm', 'k_norm')) for name, _ in layer.named_modules())


def projector_elements(projector: torch.nn.Module, hidden: int, fp32: bool = True) -> int:
    """The elements (bf16-sized) a trained projector keeps per image token for its backward under bf16 autocast
    (module docstring): its first linear layer's input (bf16), a LayerNorm's input before it in the weights'
    dtype (``fp32``: trained weights kept in fp32, as without DeepSpeed; the projector casts its input to them),
    and ``2 x hidden`` (the GELU's input and the last linear layer's). tests/test_planner.py checks it against
    the tensors each registered projector saves."""
    first = next(m for m in projector.modules() if isinstance(m, (torch.nn.Linear, torch.nn.LayerNorm)))
    width = next(m for m in projector.modules() if isinstance(m, torch.nn.Linear)).in_features
    norm = width * (2 if fp32 else 1) if isinstance(first, torch.nn.LayerNorm) else 0
    return norm + width + 2 * hidden


def _keeps_attention(mode: Optional[str], attn: Optional[str], zero: int) -> bool:
    """Whether checkpointing in ``mode`` keeps the attention kernel's output with ``attn`` (``recompute.py``:
    SDPA's and flash-attn's kernels; eager and flex attention are recomputed, and everything under ZeRO-3)."""
    return mode == 'keep_attention' and zero != 3 and attn in ('sdpa', 'sdpa_segments', 'sdpa_varlen',
                                                                  'flash_attention_2')


def activation_bytes(model, batch: Batch, dtype: str = 'bf16', zero: int = 0, device: str = 'cuda') -> Dict[str, float]:
    """One step's activations per part, in bytes (module docstring), for ``model`` as built (its checkpointing,
    frozen parts and attention implementation); under ZeRO-3 (``zero=3``) checkpointing recomputes attention too
    (``models/recompute.py``)."""
    b = DTYPE_BYTES[dtype]
    s = _llm_shapes(model)
    tokens = batch.rows * batch.length
    lm = model.language_model
    ckpt = bool(getattr(lm, 'is_gradient_checkpointing', False))
    # with fp32 embeddings (trained in fp32, without DeepSpeed) under bf16 autocast the residual stream is fp32:
    # every layer keeps more (layer_elements), and a checkpointed layer's kept input is fp32
    fp32 = b == 2 and zero == 0 and lm.get_input_embeddings().weight.dtype == torch.float32
    per_layer = layer_elements(model, device, fp32_stream=fp32)
    trains_llm_graph = any(p.requires_grad for p in lm.parameters()) or not model.freeze_projector \
        or not model.freeze_vision
    out = {}
    if trains_llm_graph:
        # checkpointed layers keep their input; the others (llm_grad_ckpt_layers, or no checkpointing) every
        # activation
        checked = s['L'] - len(unchecked_layers(model)) if ckpt else 0
        out['llm layers'] = tokens * (checked * s['H'] * (4 if fp32 else b) + (s['L'] - checked) * per_layer * b)
        if checked:   # the backward's one layer recomputed: its activations and the MLP's gradients in flight
            out[RECOMPUTED] = tokens * (per_layer + 3 * s['F']) * b
            if _keeps_attention(getattr(model, 'llm_recompute', None), as_sdpa(lm.config._attn_implementation), zero):
                out['attention kept'] = tokens * checked * (s['a'] * s['d'] * b + s['a'] * 4)
    else:  # nothing upstream trains: forward only, one layer at a time
        out['llm layers'] = tokens * per_layer * b
    chunk = getattr(model, 'loss_chunk', 0)   # at most this many positions' logits a row at once
    out[LM_HEAD] = (min(batch.supervised, batch.rows * chunk) if chunk else batch.supervised) * s['V'] * 12
    if 'fused_loss' in getattr(model, 'liger_kernel', ()):   # Liger's chunks and gradients (from its code)
        head = lm.get_output_embeddings().weight
        out[LM_HEAD] = batch.supervised * s['H'] * 8 + (4 * head.numel() if head.requires_grad else 0)
    out['embeddings'] = tokens * 3 * s['H'] * b
    attn = as_sdpa(lm.config._attn_implementation)
    if batch.packed and attn in ('sdpa', 'eager'):
        out['dense packed mask'] = batch.rows * batch.length ** 2 * (b + 3)
    if attn == 'eager':
        out['attention probs'] = batch.rows * s['a'] * batch.length ** 2 * b * (1 if ckpt else s['L'])
    vc = model.vision_model.config
    c, inter, nl = vc.hidden_size, vc.intermediate_size, vc.num_hidden_layers
    n = model.vision.num_features + (1 if model.vision.drop_cls else 0)
    vit_tokens = batch.tiles * n
    if model.freeze_vision:
        kept = 2 if model.vision.name == 'internvit' else nl + 1
        out['vision tower'] = vit_tokens * (3 * c + inter + kept * c) * b
    else:
        layer = 11 * c + 2 * inter
        vckpt = bool(getattr(model.vision_model, 'is_gradient_checkpointing', False))
        out['vision tower'] = vit_tokens * ((nl * c + 2 * layer) if vckpt else nl * layer) * b
        if vckpt and _keeps_attention(getattr(model, 'vision_recompute', None),
                                      as_sdpa(getattr(vc, '_attn_implementation', None)), zero):
            out['vision tower'] += vit_tokens * nl * (c * b + vc.num_attention_heads * 4)
    if not model.freeze_projector or not model.freeze_vision:   # a frozen projector on frozen features: no graph
        # the LayerNorm's input in its weights' dtype: fp32 trained weights without DeepSpeed
        fp32 = zero == 0 and next(model.mlp1.parameters()).dtype == torch.float32
        out['projector'] = batch.tiles * model.num_image_token * projector_elements(model.mlp1, s['H'], fp32) * b
    return out


def phases(model, parts: Dict[str, float]) -> Dict[str, float]:
    """The activations alive at the forward's peak and at the backward's (module docstring): ``forward`` (what
    the backward keeps and the loss, or a frozen tower's transient, which runs before the LLM) and ``backward``
    (what it keeps, and the larger of the loss and the layer recomputed)."""
    vision = parts.get('vision tower', 0.0) if model.freeze_vision else 0.0
    lm, recomputed = parts.get(LM_HEAD, 0.0), parts.get(RECOMPUTED, 0.0)
    kept = sum(parts.values()) - vision - lm - recomputed
    return dict(forward=max(vision, kept + lm), backward=kept + max(lm, recomputed))
