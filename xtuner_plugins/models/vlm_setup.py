"""What a built :class:`~xtuner_plugins.models.internvl.VisionLanguageModel` trains, and how
(:func:`set_up_training`, the end of its ``__init__``): the frozen parts, the trained ones in fp32, the previous
stages loaded (``pretrained_pth``), a quantised LLM made ready for training, LoRA adapters, a mixture of experts'
router, gradient checkpointing, the preference reference copies, Liger Kernel, ``torch.compile`` of the blocks and
the AVX-512 BF16 attention kernel (``cpu_attention.py``).
"""

from __future__ import annotations

import torch
from mmengine.logging import print_log

from .attention import SEGMENT_ATTENTION, recurrent_layer
from .compile import compile_model
from .cpu_attention import NAME, opt_out, route, serves_here
from .liger import apply_liger
from .lora import apply_lora
from .moe import router_aux
from .recompute import checkpoint_first_layers, checkpointing_kwargs, zero3_enabled


def set_up_training(model, dtype: torch.dtype, *, freeze_vision: bool, freeze_projector: bool, freeze_llm: bool,
                    trainable_fp32: bool, pretrained_pth, llm_quantization, llm_lora, vision_lora,
                    router_aux_loss_coef, cpu_attention: bool, attn_implementation: str, liger,
                    compile_blocks) -> None:
    """The parts of ``model`` (built, in ``dtype``) set up for training as its settings say (the arguments of
    :class:`~xtuner_plugins.models.internvl.VisionLanguageModel` of the same names; ``liger``: ``liger_kernel`` as
    ``liger.check_liger`` returned it)."""
    bf16 = dtype == torch.bfloat16
    model.freeze_vision, model.freeze_projector, model.freeze_llm = freeze_vision, freeze_projector, freeze_llm
    for module, frozen in ((model.vision_model, freeze_vision), (model.mlp1, freeze_projector),
                           (model.language_model, freeze_llm)):
        module.requires_grad_(not frozen)
    # Pretrained weights stay in `dtype`; what is trained is kept in fp32 (DeepSpeed keeps its own
    # fp32 master copy; MMEngine's AMP casts on the fly).
    trained_dtype = torch.float32 if trainable_fp32 else dtype
    model.mlp1.to(trained_dtype if not freeze_projector else dtype)
    for module, frozen in ((model.vision_model, freeze_vision), (model.language_model, freeze_llm)):
        if not frozen:
            module.to(trained_dtype)
    for param in model.vision.unused_parameters(model.vision_model):
        param.requires_grad_(False)  # never reached by the features (e.g. SigLIP's pooling head)
    if pretrained_pth:  # before this stage's adapters: earlier stages' adapters are merged underneath
        model.load_stages(pretrained_pth)
    if llm_quantization is not None:
        from peft import prepare_model_for_kbit_training
        # freezes the base, keeps norms/embeddings in fp32, makes inputs require grads for checkpointing
        model.language_model = prepare_model_for_kbit_training(
            model.language_model, use_gradient_checkpointing=model.llm_recompute is not None,
            gradient_checkpointing_kwargs=checkpointing_kwargs(model.llm_recompute or 'full'))
    if llm_lora is not None:
        model.language_model = apply_lora(model.language_model, llm_lora, task_type='CAUSAL_LM',
                                          key='model.llm_lora')
    if vision_lora is not None:
        model.vision_model = apply_lora(model.vision_model, vision_lora, key='model.vision_lora')
    #: a mixture-of-experts LLM's routing and its load-balancing loss (moe.py); None for a dense LLM
    model.router = router_aux(model.language_model, router_aux_loss_coef)
    model.llm_recurrent = recurrent_layer(model.language_model)   # refuses packed rows (attention.py)
    if model.router is not None:
        print_log(model.router.describe(), logger='current')
    # the kernel computes bf16 only: an fp32 model's attention stays SDPA's, routed or not
    if cpu_attention and freeze_vision and vision_lora is None and route(model.vision_model) and bf16:
        print_log(f"vision tower: attention on the AVX-512 BF16 kernel ({NAME}; model.cpu_attention=False keeps "
                  "torch's SDPA)", logger='current')
    if model.llm_recompute:
        model.language_model.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs=checkpointing_kwargs(model.llm_recompute))
        checkpoint_first_layers(model.language_model, model.llm_ckpt_layers)
    if model.vision_recompute:
        model.vision_model.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs=checkpointing_kwargs(model.vision_recompute))
    model.language_model.config.use_cache = False
    model.reference = None
    if model.preference is not None and llm_lora is None:
        from .preference import frozen_copies
        model.reference = frozen_copies({name: getattr(model, name) for name, frozen in (
            ('vision_model', freeze_vision), ('mlp1', freeze_projector), ('language_model', freeze_llm))
            if not frozen}, dtype)
    why_not = [why for why, cond in (('a quantised LLM', llm_quantization is not None),
                                     ('DeepSpeed ZeRO-3', zero3_enabled()),
                                     ('a model only run, not trained', not trainable_fp32),
                                     ('fp32 weights (measured: the bf16 recipe)', not bf16)) if cond]
    model.liger_kernel = apply_liger(model.language_model, liger)
    model.compile_blocks = compile_model(model, False if model.liger_kernel else compile_blocks, why_not)
    if not cpu_attention:
        opt_out(model)   # the reference copies too
    elif (attn_implementation == SEGMENT_ATTENTION and serves_here()) or route(model.language_model):
        if model.reference is not None and 'language_model' in model.reference:
            route(model.reference['language_model'])   # the reference policy's copy computes as the policy
        if bf16:
            print_log(f"LLM: attention ({attn_implementation}) on the AVX-512 BF16 kernel where it computes "
                      "SDPA's (model.cpu_attention=False keeps torch's SDPA)", logger='current')
