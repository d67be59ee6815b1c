"""The vision-language model MMEngine trains: vision encoder + projector + causal LM, each chosen by type.

Configs name :class:`VisionLanguageModel`::

    model = dict(type=VisionLanguageModel,
                 vision_encoder='OpenGVLab/InternViT-300M-448px-V2_5',   # type read from its config.json
                 projector='pixel_shuffle_mlp',                          # or 'mlp', 'bilinear_mlp'
                 llm='Qwen/Qwen2.5-1.5B-Instruct',                       # any HF causal LM
                 freeze_vision=True, freeze_llm=True)                    # MLP warm-up: train mlp1 only

    # LLaVA-1.5 on Qwen2.5: CLIP's second-to-last layer, CLS dropped, one padded image per <image>
    model = dict(type=VisionLanguageModel, vision_encoder=dict(type='clip', path='openai/clip-vit-large-patch14-336'),
                 projector='mlp', image_mode='pad', llm='Qwen/Qwen2.5-0.5B-Instruct')

or start from an official InternVL checkpoint (``official_checkpoint='OpenGVLab/InternVL2_5-1B'``).

The submodules carry InternVL's names whatever their type (``vision_model``, ``mlp1``, ``language_model``);
``vision`` holds the encoder's conventions (``vision/base.py``) and :attr:`VisionLanguageModel.geometry` what the
data must match (tile size, tokens per tile, image mode). The batch is the collate function's: ``uint8``
tiles are normalised here, on the device, with the encoder's mean/std. Checkpoints hold only what is
trained (``state_dict`` drops frozen parameters); frozen parts come back from their source checkpoints.

This module holds the class, its settings and checkpoints; its parts are built in ``parts.py``, set up for training
(frozen or trained, LoRA, checkpointing, kernels) in ``vlm_setup.py``, and run in ``vlm_forward.py``.
"""

from __future__ import annotations

import inspect
from typing import Dict, Optional, Sequence, Union

import torch
from mmengine.model import BaseModel
from torch import nn

from xtuner_plugins.data.errors import check_model_path
from xtuner_plugins.data.template import IMG_CONTEXT_TOKEN, get_template
from xtuner_plugins.data.tiling import normalize_tiles
from xtuner_plugins.errors import Refused

from . import vlm_forward
from .attention import SEGMENTED, cudnn_attention_off
from .liger import check_liger
from .lora import check_rank
from .lineage import lineage_record, source_paths
from .head import unwrapped
from .moe import check_coef
from .parts import build_parts, check_settings, log_parameter_counts
from .precision import training_dtype
from .recompute import checkpoint_first_layers, checkpointing_kwargs, recompute_mode, zero3_enabled
from .stages import check_template, inherited_template, load_stages, load_trained
from .vlm_setup import set_up_training


class VisionLanguageModel(BaseModel):
    """Vision encoder + projector (``mlp1``) + LLM, trained by MMEngine's runner.

    Args:
        vision_encoder: a vision encoder's folder (InternViT in OpenGVLab's layout, a SigLIP or CLIP model;
            its type is read from ``config.json``), ``dict(type='internvit'|'siglip'|'clip', path=FOLDER,
            select_layer=, mean=, std=)`` (the folder must be of that type), or a loaded tower.
        projector: ``'pixel_shuffle_mlp'`` (InternVL), ``'mlp'`` (LLaVA-1.5) or ``'bilinear_mlp'``, or
            ``dict(type=NAME, ...)`` (see ``projector.py``).
        image_mode: how an image becomes tiles: ``'tile'`` (InternVL's dynamic tiling, tiles of the
            encoder's size), ``'resize'`` (one tile, the image resized) or ``'pad'`` (one tile, the image
            padded to a square with the mean colour first, as LLaVA's ``image_aspect_ratio='pad'``).
        llm: folder (or hub id in the local cache) of a Hugging Face causal LM, or a ``PreTrainedModel``.
        tokenizer: tokenizer folder; defaults to ``llm`` (or ``official_checkpoint``).
        official_checkpoint: an official InternVL folder (``vision_model.``/``mlp1.``/``language_model.``
            keys) to start from instead of ``vision_encoder`` + ``llm``.
        select_layer: vision layer whose features are used; None: the encoder's default (InternViT and
            SigLIP -1, CLIP -2).
        downsample_ratio, ps_version: the pixel-shuffle projector's ratio (0.5) and version (``"v2"``).
        template: the chat template's name (``data/template.py``), recorded for the converter and chat tools; None
            (the stage configs'): the previous stage's (``pretrained_pth``), else the official folder's, else
            ``internvl2_5`` (``stages.inherited_template``). One given that differs from the previous stage's is
            refused.
        freeze_vision, freeze_projector, freeze_llm: what is not trained.
        vision_grad_ckpt, llm_grad_ckpt: gradient checkpointing for the vision tower / the LLM: True (or
            ``'keep_attention'``: every layer recomputed in the backward except its attention kernel, whose
            output is kept), ``'full'`` (everything recomputed: the least memory) or False (``recompute.py``).
        llm_grad_ckpt_layers: how many of the LLM's decoder layers ``llm_grad_ckpt`` checkpoints, the first ones;
            None (the default) all. The others keep their activations for the backward instead of running
            again in it: less work, more memory (``tools/plan.py`` counts it; on a GPU with memory to spare).
            ``'auto'`` (the stage configs'): on a CUDA GPU, the fewest that the planner fits in the GPU's memory,
            chosen at start-up (``engine/ckptfit.py``); all on a CPU, under LoRA or ZeRO-1, from an
            ``official_checkpoint`` and where no plan can be made; nothing without ``llm_grad_ckpt``.
        vision_drop_path: stochastic depth for the vision tower (InternVL stage 1.5 uses 0.1).
        llm_lora, vision_lora: peft ``LoraConfig`` arguments (a dict) to train LoRA adapters instead of
            the whole LLM / vision tower; ``target_modules`` defaults to all linear layers; ``init_lora_weights``
            True or ``'gaussian'`` (an init that rewrites the base weights is refused: ``lora.check_init``).
        llm_quantization: ``BitsAndBytesConfig`` arguments to load the LLM quantised (QLoRA: 4-bit NF4 with
            double quantisation; needs ``llm_lora``). The vision tower and projector stay in full precision.
        pretrained_pth: the previous stage's checkpoint (mmengine ``.pth`` or DeepSpeed folder); the stages before
            it are found in its recorded lineage and loaded first, oldest first, LoRA adapters merged
            (:meth:`load_stages`, ``lineage.py``); source folders other than those the stages recorded are refused.
        from_scratch: this stage starts without a previous stage on purpose. Without it, a stage that trains more
            than the projector (full, LoRA, preference) and has no ``pretrained_pth`` (nor ``official_checkpoint``)
            is stopped at start-up (``LineageHook``): its projector would be random.
        torch_dtype: dtype of the pretrained weights (``"auto"``: bf16 on a GPU, and in training on a CPU with
            native bf16 for an LLM of 100M parameters or more, else fp32: ``precision.training_dtype``); trained
            parameters are kept in fp32 and bf16 weights train under bf16 autocast (:attr:`autocast_dtype`).
        attn_implementation: ``"sdpa"``, ``"flash_attention_2"`` or ``"eager"`` for both towers, or
            ``"flex_attention"``: PyTorch's FlexAttention for the LLM (packed rows get a document-causal
            ``BlockMask``: sample boundaries without flash-attn; GPU training only, as torch's FlexAttention has no
            backward on a CPU) with SDPA for the vision tower (whole tiles, no mask: nothing for flex to skip);
            ``"sdpa_segments"``: packed rows' samples attended one by one with causal SDPA (no ``L x L`` mask: the
            CPU's packed path; ``attention.segment_sdpa``), padded rows causal SDPA (right padding; training);
            ``"sdpa_varlen"``: on a CUDA GPU a batch's packed samples in one ``varlen_attn`` call, else as segments.
        cudnn_attention: leave PyTorch's cuDNN SDPA backend on. Off by default (process-wide,
            ``torch.backends.cuda.enable_cudnn_sdp(False)``; SDPA then runs FlashAttention-2 on a GPU): cuDNN
            builds kernels for each sequence length it has not seen on the machine, 3-4 s each, and a training
            run's lengths change at every step (measured on an H100, torch 2.11, 10 steps of a 1.5B model on new
            lengths: 8.3k tokens/s with it, 15.3k without; benchmarks/RESULTS.md).
        preference: preference training on pairs (``data/preference.py``) instead of SFT:
            ``dict(types=('sigmoid',), weights=None, beta=0.1)`` (``models/preference.py``; MPO is
            ``preference.MPO``). The reference policy: with ``llm_lora`` (everything else frozen), this model
            with its LLM's adapters off (the previous stages' adapters are merged, so this is the SFT model);
            without, ``reference``: frozen copies of the trained parts as they are once ``pretrained_pth`` is
            loaded (``preference.frozen_copies``), never in checkpoints.
        loss_reduction: ``'token'`` (mean over supervised tokens), ``'sample'`` or ``'square'`` (InternVL
            2.5's square averaging), with the denominator summed over ranks (see ``loss.py``).
        loss_chunk: 0 (the LM head's logits at every supervised position at once), or the LM head and the
            cross-entropy that many supervised positions at a time, each chunk recomputed in the backward
            (``loss.chunked_causal_lm_loss``): the logits of a step (12 bytes x vocabulary per supervised
            token, 1.7 MB for Qwen2.5's) are bounded by the chunk, for one more LM head matmul.
        zero3_init: under DeepSpeed ZeRO-3, build the LLM partitioned (``deepspeed.zero.Init``) instead of
            whole on every rank; ``None``: only with CUDA (see ``zero3.hf_zero3_init``).
        trainable_fp32: keep the trained parameters in fp32 (training); False keeps every weight in
            ``torch_dtype`` (the converter and chat tools, which only run the model).
        compile_blocks: ``torch.compile`` each transformer block (``compile.py``): True for the LLM's and the
            vision tower's, ``'llm'`` or ``'vision'`` for one, False for none; ``'auto'`` (the default) where it
            was measured to pay, for an LLM of 100M parameters or more, not quantised, not under ZeRO-3: both on a
            CUDA GPU of compute capability 8.0 or more with Triton, the LLM's with bf16 weights (``torch_dtype``) on
            a CPU with native bf16 (AMX, AVX-512 BF16) (``compile.compile_parts``). With the LLM's blocks the
            loss's cross-entropy is compiled too (``loss.weighted_ce``).
        liger_kernel: on a CUDA GPU, the LLM's norms, SwiGLU, RoPE and loss on Liger Kernel's fused Triton kernels:
            True, or some of ``'rms_norm'``, ``'swiglu'``, ``'rope'``, ``'fused_loss'`` (``liger.py``). Off by
            default (on an H100 it was slower than eager, ``benchmarks/gpu.sh``); not with ``compile_blocks``, its
            loss not with ZeRO-3.
        cpu_attention: on a CPU with AVX-512 BF16 and no AMX, where torch's SDPA runs at a fifth of the matmul
            rate, attention on the AVX-512 BF16 kernels of ``cpu_attention.py`` (bf16 tensors, no mask, no
            dropout; any other call still takes SDPA): a frozen tower's (no ``vision_lora``), and the LLM's under
            ``sdpa`` and ``sdpa_segments`` (each sample of a pack, and unpadded rows). False: torch's SDPA.
        router_aux_loss_coef: a mixture-of-experts LLM's router load-balancing loss (``moe.py``): None, the LLM
            config's (on when it says ``output_router_logits``), or this coefficient (0: off).
    """

    @classmethod
    def expects_previous(cls, **settings) -> bool:
        """Whether a model of these settings (the others its defaults) is a stage meant to follow an earlier one and
        given none: it trains more than the projector, from no official checkpoint, no ``pretrained_pth`` and not
        ``from_scratch`` (its projector would be random)."""
        given = dict(_STAGE_DEFAULTS)   # the base class's (a subclass or a wrapped __init__ may take **kwargs)
        given.update({k: p.default for k, p in inspect.signature(cls.__init__).parameters.items() if k in given})
        given.update((k, v) for k, v in settings.items() if k in given)
        trains_more_than_projector = not (given['freeze_llm'] and given['freeze_vision']) or any(
            given[k] is not None for k in ('llm_lora', 'vision_lora', 'preference'))
        return (trains_more_than_projector and given['official_checkpoint'] is None and not given['pretrained_pth']
                and not given['from_scratch'])

    def __init__(self,
                 vision_encoder: Union[str, nn.Module, None] = None,
                 llm: Union[str, nn.Module, None] = None,
                 tokenizer: Optional[str] = None,
                 official_checkpoint: Optional[str] = None,
                 projector: Union[str, dict] = 'pixel_shuffle_mlp',
                 image_mode: str = 'tile',
                 select_layer: Optional[int] = None,
                 downsample_ratio: float = 0.5,
                 ps_version: str = 'v2',
                 template: Optional[str] = None,
                 freeze_vision: bool = True,
                 freeze_projector: bool = False,
                 freeze_llm: bool = True,
                 vision_grad_ckpt: Union[bool, str] = False,
                 llm_grad_ckpt: Union[bool, str] = False,
                 llm_grad_ckpt_layers: Union[int, str, None] = None,
                 vision_drop_path: float = 0.0,
                 llm_lora: Optional[dict] = None,
                 vision_lora: Optional[dict] = None,
                 llm_quantization: Optional[dict] = None,
                 pretrained_pth: Optional[str] = None,
                 from_scratch: bool = False,
                 torch_dtype: Union[str, torch.dtype] = 'auto',
                 attn_implementation: str = 'sdpa',
                 cudnn_attention: bool = False,
                 zero3_init: Optional[bool] = None,
                 loss_reduction: str = 'token',
                 loss_chunk: int = 0,
                 preference: Optional[dict] = None,
                 trainable_fp32: bool = True,
                 compile_blocks: Union[bool, str, Sequence[str]] = 'auto',
                 liger_kernel: Union[bool, str, Sequence[str]] = False,
                 cpu_attention: bool = True,
                 router_aux_loss_coef: Optional[float] = None,
                 data_preprocessor: Optional[dict] = None):
        super().__init__(data_preprocessor=data_preprocessor)
        check_settings(attn_implementation=attn_implementation, image_mode=image_mode, loss_reduction=loss_reduction,
                       loss_chunk=loss_chunk, llm_quantization=llm_quantization, llm_lora=llm_lora,
                       freeze_llm=freeze_llm, preference=preference, vision_lora=vision_lora,
                       freeze_vision=freeze_vision)
        check_coef(router_aux_loss_coef)
        for key, path in (('model.llm', llm), ('model.official_checkpoint', official_checkpoint)):
            if isinstance(path, str):   # before training_dtype reads the weights' headers
                check_model_path(path, key, folder_only=key == 'model.official_checkpoint')   # (read from a folder)
        check_rank(llm_lora, 'model.llm_lora', llm, 'text_config')   # (their config.json only)
        check_rank(vision_lora, 'model.vision_lora', vision_encoder, 'vision_config')
        dtype = training_dtype(torch_dtype, llm=llm, official_checkpoint=official_checkpoint, trained=trainable_fp32,
                               quantized=llm_quantization is not None, zero3=zero3_enabled())
        bf16 = dtype == torch.bfloat16
        #: what the optimizer wrappers autocast the forward to (on a CPU too): bf16 weights with fp32 trained ones
        self.autocast_dtype = torch.bfloat16 if trainable_fp32 and bf16 else None
        init_seed = torch.initial_seed()
        if preference is not None:
            from .preference import check_setting
            check_setting(llm_lora, vision_lora, frozen=freeze_llm and freeze_projector and freeze_vision,
                          preference=preference)
        if not cudnn_attention:
            cudnn_attention_off()
        # before any weight loads: a refusal (no GPU, compile_blocks, ZeRO-3) costs seconds, not the LLM's loading
        liger = check_liger(liger_kernel, zero3=zero3_enabled(), compile_blocks=compile_blocks,
                            preference=preference is not None)
        # tiles never cross samples and carry no mask: the vision tower keeps SDPA under flex attention
        vision_attn = 'sdpa' if attn_implementation in ('flex_attention', *SEGMENTED) else attn_implementation
        self.preference = None if preference is None else dict(preference)
        self._reward_baseline = None
        self.llm_recompute = recompute_mode(llm_grad_ckpt, 'llm_grad_ckpt')
        #: llm_grad_ckpt_layers='auto': all checkpointed until engine/ckptfit.py leaves out what the GPU holds
        self.llm_ckpt_auto = llm_grad_ckpt_layers == 'auto' and bool(self.llm_recompute)
        if llm_grad_ckpt_layers == 'auto':
            llm_grad_ckpt_layers = None
        if llm_grad_ckpt_layers is not None and not self.llm_recompute:
            raise Refused(f'llm_grad_ckpt_layers={llm_grad_ckpt_layers!r} without llm_grad_ckpt: set '
                          'llm_grad_ckpt=True too, or leave llm_grad_ckpt_layers out')
        self.llm_ckpt_layers = llm_grad_ckpt_layers
        self.vision_recompute = recompute_mode(vision_grad_ckpt, 'vision_grad_ckpt')
        self.image_mode = image_mode
        if template is None:   # what the stages before trained with: read from them, not typed again
            template = inherited_template(pretrained_pth, official_checkpoint)
        elif pretrained_pth:   # named: it must be theirs (refused here, before the parts are loaded)
            check_template(pretrained_pth, template, official_checkpoint)
        self.template = get_template(template).name   # an unknown name: a refusal naming the one meant
        self.loss_reduction = loss_reduction
        self.loss_chunk = loss_chunk
        self.source = dict(vision_encoder=vision_encoder if isinstance(vision_encoder, str) else None,
                           llm=llm if isinstance(llm, str) else None, official_checkpoint=official_checkpoint)
        self.lineage = lineage_record(source_paths(vision_encoder, llm, tokenizer, official_checkpoint),
                                      pretrained_pth, llm_lora, vision_lora, from_scratch)
        # what LineageHook stops at start-up: a random projector under a stage meant to follow the warm-up
        self.expects_previous_stage = self.expects_previous(
            freeze_llm=freeze_llm, freeze_vision=freeze_vision, llm_lora=llm_lora, vision_lora=vision_lora,
            preference=preference, official_checkpoint=official_checkpoint, pretrained_pth=pretrained_pth,
            from_scratch=from_scratch)

        self.vision_model, self.vision, self.mlp1, self.language_model, self.tokenizer = build_parts(
            vision_encoder, llm, tokenizer, official_checkpoint, projector, dtype=dtype,
            attn_implementation=attn_implementation, vision_attn=vision_attn, select_layer=select_layer,
            downsample_ratio=downsample_ratio, ps_version=ps_version, vision_drop_path=vision_drop_path,
            llm_quantization=llm_quantization, template=template, init_seed=init_seed,
            zero3=torch.cuda.is_available() if zero3_init is None else zero3_init)
        self.img_context_token_id = self.tokenizer.convert_tokens_to_ids(IMG_CONTEXT_TOKEN)
        self.num_image_token = self.mlp1.tokens_per_tile(self.vision.grid)
        # InternVL's names for the pixel-shuffle settings, read by the exporters (None for other projectors)
        self.downsample_ratio = getattr(self.mlp1, 'downsample_ratio', None)
        self.ps_version = getattr(self.mlp1, 'ps_version', None)

        set_up_training(self, dtype, freeze_vision=freeze_vision, freeze_projector=freeze_projector,
                        freeze_llm=freeze_llm, trainable_fp32=trainable_fp32, pretrained_pth=pretrained_pth,
                        llm_quantization=llm_quantization, llm_lora=llm_lora, vision_lora=vision_lora,
                        router_aux_loss_coef=router_aux_loss_coef, cpu_attention=cpu_attention,
                        attn_implementation=attn_implementation, liger=liger, compile_blocks=compile_blocks)
        log_parameter_counts(self)

    def init_weights(self):
        """Nothing to do: every weight was loaded or initialised when the model was built.

        MMEngine's runner calls ``model.init_weights()`` before training, and its default walks into the
        Hugging Face submodules, whose own ``init_weights`` re-initialises parameters it did not load
        itself (it redrew the untied ``lm_head``) and cannot handle 4-bit weights.
        """

    def train(self, mode: bool = True):
        """Training mode, but the reference policy's copies stay in eval mode (no dropout)."""
        super().train(mode)
        if getattr(self, 'reference', None) is not None:
            self.reference.eval()
        return self

    @property
    def select_layer(self) -> int:
        return self.vision.select_layer

    @property
    def geometry(self) -> Dict[str, object]:
        """What the data pipeline must match: tile size, ``<IMG_CONTEXT>`` tokens per tile, image mode and
        (for ``'pad'``) the mean colour; ``InternVLDataset.geometry`` has the same keys."""
        return dict(image_size=self.vision.image_size, num_image_token=self.num_image_token,
                    image_mode=self.image_mode, image_mean=self.vision.mean)

    # ----------------------------------------------------------------------------- checkpoints
    def trainable_keys(self):
        return {name for name, p in self.named_parameters() if p.requires_grad}

    def state_dict(self, *args, destination=None, prefix='', keep_vars=False):
        """Only the trained parameters: the frozen ones come back from their source checkpoints."""
        full = super().state_dict(*args, destination=destination, prefix=prefix, keep_vars=keep_vars)
        keep = {prefix + k for k in self.trainable_keys()}
        for key in [k for k in full if k not in keep]:
            del full[key]
        return full

    def load_stages(self, path: str) -> None:
        """Load the checkpoint chain that ends at ``path``, LoRA adapters merged (``stages.load_stages``)."""
        load_stages(self, path)

    def load_pretrained(self, path: str, strict: bool = False) -> None:
        """Load one checkpoint's trained tensors (``stages.load_trained``; ``strict``: exactly what this config
        trains)."""
        load_trained(self, path, strict)

    # ----------------------------------------------------------------------------- forward
    def part(self, name: str, parts: Optional[nn.ModuleDict] = None) -> nn.Module:
        """``vision_model``, ``mlp1`` or ``language_model``: the one in ``parts`` (the reference's copies) if
        there is one, this model's own otherwise."""
        return parts[name] if parts is not None and name in parts else getattr(self, name)

    def extract_feature(self, pixel_values: torch.Tensor, parts: Optional[nn.ModuleDict] = None) -> torch.Tensor:
        """Normalised tiles ``[T, 3, S, S]`` -> projected tokens ``[T, num_image_token, H]``."""
        return self.part('mlp1', parts)(self.vision.features(self.part('vision_model', parts), pixel_values))

    def tower_features(self, pixel_values: torch.Tensor, parts: Optional[nn.ModuleDict] = None) -> torch.Tensor:
        """Tiles as collated (uint8, or already normalised) -> the vision tower's features, before the projector."""
        vision_dtype = next(self.part('vision_model', parts).parameters()).dtype
        if pixel_values.dtype == torch.uint8:
            pixel_values = normalize_tiles(pixel_values, self.vision.mean, self.vision.std, dtype=vision_dtype)
        else:
            pixel_values = pixel_values.to(vision_dtype)
        return self.vision.features(self.part('vision_model', parts), pixel_values)

    def embed_inputs(self, input_ids: torch.Tensor, pixel_values: torch.Tensor, image_flags: torch.Tensor,
                     parts: Optional[nn.ModuleDict] = None, features: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Token embeddings with the ``<IMG_CONTEXT>`` positions filled, in order, by the projected tiles
        whose image flag is 1. Every tile (dummies too) runs through the vision tower, so all ranks
        run the same modules whatever their batch holds. ``parts``: see :meth:`part`; ``features``: the tower's
        output for these tiles (:meth:`tower_features`), made once for both answers of preference pairs."""
        return vlm_forward.embed_inputs(self, input_ids, pixel_values, image_flags, parts, features)

    def forward(self, data: Dict[str, torch.Tensor], data_samples=None, mode: str = 'loss'):
        return vlm_forward.forward(self, data, data_samples, mode)

    def parse_losses(self, losses):
        """MMEngine's sum of the losses, then the non-finite check of every path (plain, DDP, DeepSpeed), before
        the backward pass (``engine/nonfinite.py``; the guard's policy comes from ``NonFiniteGuardHook``)."""
        loss, log_vars = super().parse_losses(losses)
        guard = getattr(self, 'nonfinite_guard', None)
        if guard is None:
            from xtuner_plugins.engine.nonfinite import NonFiniteGuard
            guard = self.nonfinite_guard = NonFiniteGuard('stop')
        guard.check_loss(loss)
        return loss, log_vars

    @property
    def llm_keeps_logits(self) -> bool:
        """Whether the LLM's forward takes ``logits_to_keep`` (transformers' causal LMs of the pinned version
        do; through a PEFT wrapper, its base model's); without it, all logits are computed."""
        llm = self.language_model
        return 'logits_to_keep' in inspect.signature(unwrapped(llm).forward).parameters

    def gradient_checkpointing_enable(self):
        self.llm_recompute = self.llm_recompute or recompute_mode(True)
        self.language_model.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs=checkpointing_kwargs(self.llm_recompute))
        checkpoint_first_layers(self.language_model, self.llm_ckpt_layers)


# The old name (it clashed with transformers' InternVLModel): configs and dumped work-dir configs name it.
InternVLModel = VisionLanguageModel


#: what :meth:`VisionLanguageModel.expects_previous` reads, with the defaults of the class's own ``__init__``
_STAGE_DEFAULTS = {k: p.default for k, p in inspect.signature(VisionLanguageModel.__init__).parameters.items()
                   if k in ('freeze_llm', 'freeze_vision', 'llm_lora', 'vision_lora', 'preference',
                            'official_checkpoint', 'pretrained_pth', 'from_scratch')}
