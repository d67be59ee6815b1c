"""Model FLOPs of a training step, counted from the model shapes (:func:`train_step_flops`), and the batches'
samples they are counted over (:func:`batch_samples`). ``bench_train.py``, ``realsize.py`` and ``gpu.py`` report
achieved FLOP/s and MFU with them; ``bench_train.py --dry-run`` checks the formula's matmul sizes against modules
built on the ``meta`` device (:func:`meta_matmul_parameters`).
"""

from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional, Sequence, Tuple

import torch


# Dense (no sparsity) bf16 tensor-core peaks in TFLOPS, matched in order against torch.cuda.get_device_name().


PEAK_TFLOPS = [('H200', 989.0), ('H100 PCIe', 756.0), ('H100', 989.0), ('A100', 312.0)]


@dataclasses.dataclass(frozen=True)
class ModelShapes:
    """The sizes the FLOPs depend on (see :func:`model_shapes`)."""
    vit_hidden: int
    vit_layers: int
    vit_heads: int
    vit_intermediate: int
    patch_size: int
    image_size: int
    num_channels: int
    downsample_ratio: float
    llm_hidden: int
    llm_intermediate: int
    llm_layers: int
    llm_heads: int
    llm_kv_heads: int
    llm_head_dim: int
    vocab_size: int

    @property
    def patches_per_tile(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def vit_tokens_per_tile(self) -> int:
        """Patches plus the CLS token (1025 for a 448 px tile with 14 px patches)."""
        return self.patches_per_tile + 1

    @property
    def image_tokens_per_tile(self) -> int:
        """LLM tokens per tile after the pixel shuffle (256 for 448 px, 14 px patches, ratio 0.5)."""
        return int(self.patches_per_tile * self.downsample_ratio ** 2)

    @property
    def projector_in(self) -> int:
        """``mlp1``'s input width: the ViT width times ``(1 / ratio)^2`` (4096 for InternViT-300M)."""
        return self.vit_hidden * round(1 / self.downsample_ratio) ** 2


def _field(config, name):
    value = config[name] if isinstance(config, dict) else getattr(config, name)
    if isinstance(value, (list, tuple)):  # transformers' InternVLVisionConfig keeps sizes as [s, s]
        if len(value) != 2 or value[0] != value[1]:
            raise ValueError(f'{name} must be square, got {list(value)}')
        value = value[0]
    return value


def model_shapes(vision_config, llm_config, downsample_ratio: float = 0.5,
                 vocab_size: Optional[int] = None) -> ModelShapes:
    """Read the shapes from the configs of a built model (``model.vision_model.config``,
    ``model.language_model.config``, ``model.downsample_ratio``) or from config dicts with the same field
    names. ``vocab_size`` overrides the LLM config's (the rows of ``lm_head``)."""
    heads = _field(llm_config, 'num_attention_heads')
    hidden = _field(llm_config, 'hidden_size')
    head_dim = (llm_config.get('head_dim') if isinstance(llm_config, dict)
                else getattr(llm_config, 'head_dim', None)) or hidden // heads
    return ModelShapes(
        vit_hidden=_field(vision_config, 'hidden_size'), vit_layers=_field(vision_config, 'num_hidden_layers'),
        vit_heads=_field(vision_config, 'num_attention_heads'),
        vit_intermediate=_field(vision_config, 'intermediate_size'), patch_size=_field(vision_config, 'patch_size'),
        image_size=_field(vision_config, 'image_size'), num_channels=_field(vision_config, 'num_channels'),
        downsample_ratio=downsample_ratio, llm_hidden=hidden,
        llm_intermediate=_field(llm_config, 'intermediate_size'), llm_layers=_field(llm_config, 'num_hidden_layers'),
        llm_heads=heads, llm_kv_heads=_field(llm_config, 'num_key_value_heads'), llm_head_dim=head_dim,
        vocab_size=vocab_size or _field(llm_config, 'vocab_size'))


def matmul_parameters(s: ModelShapes) -> Dict[str, int]:
    """Weights that multiply activations, per part (biases, norms, layer scales and embeddings excluded).

    * ``patch_embed``: the Conv2d, ``C * 3 * p^2`` (one matmul per patch);
    * ``vit_layer`` (one layer): q, k, v, out ``4 C^2`` + MLP ``2 C I``;
    * ``projector``: ``mlp1`` ``4C * H + H * H``;
    * ``llm_layer`` (one layer): q ``H * a * d``, k and v ``2 * H * kv * d``, o ``a * d * H``, MLP (gate, up,
      down) ``3 H F``; ``a`` heads, ``kv`` key/value heads, ``d`` head dim;
    * ``lm_head``: ``H * V``.
    """
    c, i = s.vit_hidden, s.vit_intermediate
    h, f, d = s.llm_hidden, s.llm_intermediate, s.llm_head_dim
    return dict(
        patch_embed=c * s.num_channels * s.patch_size ** 2,
        vit_layer=4 * c * c + 2 * c * i,
        projector=s.projector_in * h + h * h,
        llm_layer=h * s.llm_heads * d + 2 * h * s.llm_kv_heads * d + s.llm_heads * d * h + 3 * h * f,
        lm_head=h * s.vocab_size)


def _train_multipliers(trainable: bool, upstream_trainable: bool) -> Tuple[int, int]:
    """(weight matmuls, attention matmuls): training FLOPs of a part as multiples of its forward FLOPs."""
    if trainable:
        return 3, 3  # forward + input gradients + weight gradients
    if upstream_trainable:
        return 2, 3  # weights: forward + input gradients; attention: dQ, dK, dV, dP all needed
    return 1, 1  # no gradient reaches this part: forward only


def train_step_flops(s: ModelShapes, seq_lens: Sequence[int], tiles: Sequence[int], *,
                     freeze_vision: bool = True, freeze_projector: bool = False,
                     freeze_llm: bool = False, supervised: Optional[int] = None) -> Dict[str, int]:
    """Model FLOPs of one training step (forward + backward), from the shapes alone.

    The batch is described per sample: ``seq_lens[k]`` tokens (text plus its image tokens) and ``tiles[k]``
    tiles (thumbnail included). Only real tokens count: padding in unpacked rows is not useful work and
    is left out, and so are dummy tiles of text-only samples (the bench derives ``tiles`` from the image
    tokens). Packed or unpacked makes no difference: a pack's attention is block-diagonal causal (a sample
    never attends to another), so its useful attention is the sum over its samples of causal attention on
    the sample's own length, exactly what the same samples cost in separate rows. MFU computed from these
    FLOPs therefore credits both paths with the same work and shows what padding and dense masks waste.

    Forward FLOPs (a multiply-add is 2 FLOPs; ``n = 1 + (S/p)^2`` ViT tokens per tile, ``t = n - 1`` patches,
    ``m = t * r^2`` LLM tokens per tile, ``T`` tiles in the step, ``L_k`` sample lengths, ``N = sum L_k``;
    the parameter counts are :func:`matmul_parameters`'):

    * patch embedding: ``2 * (C * 3 * p^2) * t * T``;
    * ViT matmuls: ``2 * vit_layers * (4 C^2 + 2 C I) * n * T`` (CLS token included);
    * ViT attention, bidirectional: ``QK^T`` and ``AV`` are ``2 n^2 C`` each, so ``4 * n^2 * C`` per layer
      and tile: ``vit_layers * 4 * n^2 * C * T``;
    * projector: ``2 * (4C * H + H^2) * m * T``;
    * LLM matmuls: ``2 * llm_layers * llm_layer * N``;
    * LLM attention, causal: half the full ``4 * L^2 * a * d`` (the usual convention, e.g. FlashAttention's
      benchmarks; exact would be ``L (L + 1) / 2`` score entries): ``llm_layers * 2 * a * d * sum L_k^2``;
      grouped key/value heads do not reduce it, every query head attends;
    * LM head: ``2 * H * V * N_s`` with ``N_s = supervised``, the supervised tokens of the step: the only
      logits the loss needs, and the only ones this project's model computes (``logits_to_keep``); XTuner's
      path computes every token's, work the same samples do not need, so it is not credited. ``None``:
      every token (``N``), an upper bound for callers that know only lengths.

    Training multiplies each part's forward FLOPs (:func:`_train_multipliers`):

    * trainable part: 3x (backward = input gradients + weight gradients, each as large as the forward);
      the patch embedding is 2x when the ViT trains, as no gradient is needed for the pixels;
    * frozen part with a trainable part before it (the gradient flows through it, e.g. the frozen LLM in
      MLP warm-up): 2x for weight matmuls (input gradients only) and 3x for attention score/value matmuls,
      which have no weights and need gradients for both operands;
    * frozen part with nothing trainable before it (the frozen ViT in every stage but 1.5 and full+vision):
      1x, forward only. LoRA adapters are not modelled (their matmuls are small; the frozen base they sit
      in counts as a frozen part the gradient flows through).

    Only matmuls count (the MFU convention): norms, activations, softmax, rotary embeddings, the embedding
    lookup, the loss and the optimizer step are left out, and so is the recomputation of gradient
    checkpointing (model FLOPs, not hardware FLOPs).

    Returns:
        ``vision``, ``projector``, ``llm`` (layers), ``lm_head``: training FLOPs per part; ``total``; and
        ``forward``: the forward FLOPs of all parts.
    """
    if len(seq_lens) != len(tiles):
        raise ValueError(f'{len(seq_lens)} sequence lengths but {len(tiles)} tile counts')
    per_tile = s.image_tokens_per_tile
    for n, t in zip(seq_lens, tiles):
        if n < t * per_tile:
            raise ValueError(f'a sample of {n} tokens cannot hold {t} tiles of {per_tile} image tokens')
    p = matmul_parameters(s)
    total_tiles, tokens = sum(tiles), sum(seq_lens)
    n = s.vit_tokens_per_tile
    attn_dim = s.llm_heads * s.llm_head_dim
    fwd = dict(
        patch_embed=2 * p['patch_embed'] * s.patches_per_tile * total_tiles,
        vit_matmul=2 * s.vit_layers * p['vit_layer'] * n * total_tiles,
        vit_attention=s.vit_layers * 4 * n * n * s.vit_hidden * total_tiles,
        projector=2 * p['projector'] * per_tile * total_tiles,
        llm_matmul=2 * s.llm_layers * p['llm_layer'] * tokens,
        llm_attention=s.llm_layers * 2 * attn_dim * sum(L * L for L in seq_lens),
        lm_head=2 * p['lm_head'] * (tokens if supervised is None else supervised))
    vision_trains, projector_trains, llm_trains = not freeze_vision, not freeze_projector, not freeze_llm
    vit_w, vit_a = _train_multipliers(vision_trains, False)
    proj_w, _ = _train_multipliers(projector_trains, vision_trains)
    llm_w, llm_a = _train_multipliers(llm_trains, vision_trains or projector_trains)
    out = dict(
        vision=(2 if vision_trains else 1) * fwd['patch_embed'] + vit_w * fwd['vit_matmul']
        + vit_a * fwd['vit_attention'],
        projector=proj_w * fwd['projector'],
        llm=llm_w * fwd['llm_matmul'] + llm_a * fwd['llm_attention'],
        lm_head=llm_w * fwd['lm_head'])
    out['total'] = sum(out.values())
    out['forward'] = sum(fwd.values())
    return out


def batch_samples(batch: dict, img_context_token_id: int, image_tokens_per_tile: int) -> Tuple[List[int], List[int]]:
    """Per-sample token counts and tiles of a collated batch (packed rows are split by ``seq_lens``, unpacked
    rows lose their padding); tiles are the sample's ``<IMG_CONTEXT>`` tokens over the tokens per tile."""
    ids, mask = batch['input_ids'], batch['attention_mask']
    seq_lens, tiles = [], []
    for row in range(ids.shape[0]):
        lengths = ([int(n) for n in batch['seq_lens'][row]] if batch.get('seq_lens') is not None
                   else [int(mask[row].sum())])
        start = 0
        for n in lengths:
            image_tokens = int((ids[row, start:start + n] == img_context_token_id).sum())
            if image_tokens % image_tokens_per_tile:
                raise ValueError(f'a sample has {image_tokens} image tokens, not a multiple of '
                                 f'{image_tokens_per_tile} per tile')
            seq_lens.append(n)
            tiles.append(image_tokens // image_tokens_per_tile)
            start += n
    return seq_lens, tiles


def default_peak_tflops(device_name: str) -> Optional[float]:
    """Dense bf16 peak of a known GPU from its name (:data:`PEAK_TFLOPS`), else None."""
    for key, tflops in PEAK_TFLOPS:
        if key.lower() in device_name.lower():
            return tflops
    return None


def meta_matmul_parameters(vision_config, llm_config, downsample_ratio: float = 0.5) -> Dict[str, int]:
    """The :func:`matmul_parameters` parts counted in modules built from the configs on the ``meta`` device
    (no memory): nn.Linear / Conv2d weights only."""
    from transformers import AutoModelForCausalLM, InternVLVisionModel

    from xtuner_plugins.models.projector import InternVLProjector
    with torch.device('meta'):
        vit = InternVLVisionModel(vision_config)
        lm = AutoModelForCausalLM.from_config(llm_config)
        mlp1 = InternVLProjector(vision_config.hidden_size, llm_config.hidden_size, downsample_ratio)
    return module_matmul_parameters(vit, mlp1, lm)


def module_matmul_parameters(vision_model, mlp1, language_model) -> Dict[str, int]:
    """nn.Linear and Conv2d weight elements of the three towers, summed as :func:`matmul_parameters`'
    parts (``vit_layers``/``llm_layers``: all layers together)."""
    def linear(module, skip=None):
        return sum(m.weight.numel() for m in module.modules()
                   if isinstance(m, torch.nn.Linear) and m is not skip)
    head = language_model.get_output_embeddings()
    return dict(patch_embed=vision_model.embeddings.patch_embeddings.projection.weight.numel(),
                vit_layers=linear(vision_model), projector=linear(mlp1),
                llm_layers=linear(language_model, skip=head), lm_head=head.weight.numel())
