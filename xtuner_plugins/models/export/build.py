"""The model to export: the training config's model with the checkpoint's tensors (:func:`build_for_export`),
then LoRA adapters merged and a 4-bit base dequantised (:func:`merge_adapters`).

Memory: the model is built once, directly in the output dtype; checkpoint tensors are read one at a time
(memory-mapped ``.pth``, DeepSpeed's lazy consolidation) and copied into it.
"""

from __future__ import annotations

import copy
from typing import Optional

import torch
from torch import nn

from xtuner_plugins.errors import Refused

from ..internvl import VisionLanguageModel
from ..lineage import previous_stage_for, read_lineage
from ..provenance import check_trained_settings
from ..runconfig import DEFAULT_FRAMES, DEFAULT_TILING, training_dataset as _training_dataset
from .files import Log, _print


def tiling_settings(cfg, model: VisionLanguageModel) -> dict:
    """Tile size, tiling settings and video frame range of the training config's data set; the tile size is
    ``model``'s encoder's where the data set leaves it to the model (``engine/derive.py``), as training did."""
    dataset = _training_dataset(cfg)
    settings = {key: default if dataset.get(key) is None else dataset[key]
                for key, default in {**DEFAULT_TILING, **DEFAULT_FRAMES}.items()}
    image_size = dataset.get('image_size')
    settings['image_size'] = int(model.vision.image_size if image_size is None else image_size)
    return settings


def training_frame_prefix(cfg, model: VisionLanguageModel) -> str:
    """The text before each video frame's ``<image>`` in training: the data set's ``frame_prefix``, else the
    model's template's."""
    from xtuner_plugins.data.template import get_template
    given = _training_dataset(cfg).get('frame_prefix')
    return str(given) if given is not None else get_template(model.template).frame_prefix


def training_system_message(cfg) -> Optional[str]:
    """The system message the training data set was given (``dataset.system``), or None for the template's."""
    return _training_dataset(cfg).get('system')


def build_for_export(cfg, checkpoint: Optional[str], dtype: torch.dtype, log: Log = _print,
                     keep_preference: bool = False) -> VisionLanguageModel:
    """The config's model, every weight in ``dtype``, with the checkpoint's trained tensors loaded strictly.

    The frozen parts come from the config's sources (``vision_encoder``, ``llm``, ``official_checkpoint``)
    and from the earlier stages, as in training: the previous stage is the one recorded in the checkpoint
    (``lineage.previous_stage_for``; a ``pretrained_pth`` the config gives must be that checkpoint), and source
    folders other than the recorded ones are refused. The config's ``preference`` setting is dropped (an export
    has no reference policy) unless ``keep_preference``: a model that scores pairs.
    """
    model_cfg = copy.deepcopy(dict(cfg.model))
    model_type = model_class(model_cfg.pop('type', None))
    if checkpoint is not None:  # before the model is built: a mismatch is found in seconds
        check_trained_settings(cfg, checkpoint, log)
        model_cfg['pretrained_pth'] = previous_stage_for(model_cfg, checkpoint, log)
        if read_lineage(checkpoint) is None and model_type.expects_previous(**model_cfg):
            # a checkpoint without its meta (DeepSpeed's zero_to_fp32 output): what LineageHook refuses in training
            raise Refused(f'{checkpoint} records no lineage, and its config trains more than the projector from no '
                          'earlier stage: the projector (mlp1) and what the earlier stages trained would be random '
                          'or missing. Give the earlier stage\'s checkpoint: --cfg-options '
                          'model.pretrained_pth=CHECKPOINT (or model.from_scratch=True if it was trained so)')
    # training kernels off: Liger's need a GPU (and patch the process), compiled blocks pay a compilation
    model_cfg.update(torch_dtype=dtype, trainable_fp32=False, zero3_init=False, llm_grad_ckpt=False,
                     vision_grad_ckpt=False, vision_drop_path=0.0, liger_kernel=False, compile_blocks=False)
    for lora, freeze in (('llm_lora', 'freeze_llm'), ('vision_lora', 'freeze_vision')):
        if model_cfg.get(lora) is not None:   # what trained (the adapters alone, as peft froze the rest), for a run
            model_cfg[freeze] = True          # of before freeze_*=False beside LoRA was refused (parts.check_settings)
    if not keep_preference:  # the reference policy of full preference training is not exported
        model_cfg['preference'] = None
    # training kernels: flash attention needs a GPU; flex attention is the packed rows' mask (torch.compile)
    if (model_cfg.get('attn_implementation') == 'flash_attention_2' and not torch.cuda.is_available()
            or model_cfg.get('attn_implementation') == 'flex_attention'):
        model_cfg['attn_implementation'] = 'sdpa'
    model = model_class(model_type)(**model_cfg)
    model.eval()
    if checkpoint is not None:
        log(f'loading trained tensors from {checkpoint}')
        model.load_pretrained(checkpoint, strict=True)
    return model


def model_class(kind) -> type:
    """The model class a config's ``model.type`` names: a subclass of :class:`VisionLanguageModel`, given as the class
    (a config file the user runs) or by its dotted name (a checkpoint's recorded config, read as data). A name is
    looked up only in this package and must be such a class: MMEngine's registry imports and calls any dotted name,
    so a checkpoint received from someone else ran their code (``type='torch.hub.load'`` loading a ``hubconf.py``
    shipped beside it) in the converter, chat, eval, the web demo and serving."""
    import importlib
    found = kind
    if isinstance(kind, str):
        module, _, name = kind.rpartition('.')
        found = None
        if module == 'xtuner_plugins' or module.startswith('xtuner_plugins.'):
            try:
                found = getattr(importlib.import_module(module), name, None)
            except ImportError:
                found = None
    if isinstance(found, type) and issubclass(found, VisionLanguageModel):
        return found
    raise Refused(f'model.type {kind!r} is not one of this project\'s model classes (xtuner_plugins.models.'
                  f'VisionLanguageModel or a subclass of it): a checkpoint\'s config is read as data, and a name in '
                  'it imports nothing else (a tampered one ran code); a model class of your own: give the training '
                  'config with the checkpoint (CONFIG CHECKPOINT), which imports it')


def _dequantize(model: nn.Module, dtype: torch.dtype) -> int:
    """Replace bitsandbytes 4-bit/8-bit linear layers by plain ``nn.Linear`` in ``dtype``; returns how many."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        return 0
    count = 0
    for name, module in list(model.named_modules()):
        if isinstance(module, bnb.nn.Linear4bit):
            if getattr(module.weight.quant_state, 'packing_format_for_cpu', False):
                # bitsandbytes repacks 4-bit weights (bf16 scales) at the first CPU inference forward
                raise RuntimeError(f'{name}: 4-bit weights were repacked by an inference forward on the CPU; '
                                   'dequantise a freshly loaded model')
            weight = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
        elif isinstance(module, bnb.nn.Linear8bitLt):
            raise NotImplementedError(f'{name}: 8-bit LLM weights cannot be converted; train QLoRA in 4-bit')
        else:
            continue
        linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, dtype=dtype,
                           device='meta')
        linear.weight = nn.Parameter(weight.to(dtype), requires_grad=False)
        if module.bias is not None:
            linear.bias = nn.Parameter(module.bias.data.to(dtype), requires_grad=False)
        parent_name, _, child = name.rpartition('.')
        setattr(model.get_submodule(parent_name) if parent_name else model, child, linear)
        count += 1
    return count


def _merged_weight(name: str, module: nn.Module, adapters, base: torch.Tensor):
    """``(weight, bias delta)`` of a LoRA layer with a DoRA adapter or a LoRA bias, in fp32, by peft's own rule
    (``DoraLinearVariant.merge_safe``: each DoRA adapter rescales the rows of ``W + delta`` by its magnitude over
    the row norms of the unmerged ``W + delta``; a LoRA bias adds ``lora_B.bias * scaling`` to the layer's bias).
    ``base``: the layer's unmerged weight in fp32 (a 4-bit one dequantised)."""
    from peft.tuners.lora.variants import DoraLinearVariant
    variants = getattr(module, 'lora_variant', {}) or {}
    weight, bias = base, None
    for adapter in adapters:
        delta = module.get_delta_weight(adapter).to(torch.float32)
        variant = variants.get(adapter)
        if variant is None:
            weight = weight + delta
        elif isinstance(variant, DoraLinearVariant) and not getattr(module, 'fan_in_fan_out', False):
            norm = torch.linalg.norm(base + delta, dim=1)
            magnitude = module.lora_magnitude_vector[adapter].weight.to(torch.float32)
            weight = (magnitude / norm).view(-1, 1) * (weight + delta)
        else:
            raise Refused(f'{name}: LoRA variant {type(variant).__name__} of adapter {adapter!r} cannot be merged '
                          f'here (plain LoRA and DoRA on linear layers can)')
        if (getattr(module, 'lora_bias', {}) or {}).get(adapter):
            if getattr(module.get_base_layer(), 'bias', None) is None:
                raise Refused(f'{name}: its LoRA bias (lora_bias=True) has no bias of the layer to merge into; '
                              f'the exported model could not hold it')
            step = module.lora_B[adapter].bias.to(torch.float32) * module.scaling[adapter]
            bias = step if bias is None else bias + step
    return weight, bias


def _dequantized(weight) -> torch.Tensor:
    import bitsandbytes as bnb
    return bnb.functional.dequantize_4bit(weight.data, weight.quant_state).to(torch.float32)


@torch.no_grad()
def _merge_peft(peft_model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Add each LoRA layer's delta (peft's ``get_delta_weight``, summed over adapters in fp32) to its base
    weight, dequantising a 4-bit base first; returns the plain model without adapters. A layer with a DoRA
    adapter or a LoRA bias (``lora_bias``) is merged by peft's rule for it (:func:`_merged_weight`).

    A plain base weight takes its delta at once, layer by layer: at most one layer's fp32 delta exists at a
    time (holding them all is the LLM's linear weights again in fp32: 5.2 GB for a 1.5B model). A 4-bit base
    keeps its deltas (a DoRA layer: its merged weight) until the layers are dequantised, after ``unload``.
    """
    from peft.tuners.lora import LoraLayer
    pending, replaced, biases = {}, {}, {}
    for name, module in peft_model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        adapters = [a for a in module.active_adapters if a in module.lora_A]
        if not adapters:
            continue
        weight = module.get_base_layer().weight
        plain = type(weight) is nn.Parameter  # not a bitsandbytes Params4bit
        if any(a in (getattr(module, 'lora_variant', {}) or {}) or (getattr(module, 'lora_bias', {}) or {}).get(a)
               for a in adapters):
            merged, biases[name] = _merged_weight(name, module, adapters,
                                                  weight.to(torch.float32) if plain else _dequantized(weight))
            if plain:
                weight.copy_(merged.to(weight.dtype))
            else:
                replaced[name] = merged
            continue
        delta = None
        for adapter in adapters:
            step = module.get_delta_weight(adapter).to(torch.float32)
            delta = step if delta is None else delta + step
        if plain:
            weight.copy_((weight.to(torch.float32) + delta).to(weight.dtype))
        else:
            pending[name] = delta
    base = peft_model.unload()  # the base model with its original layers back, adapters dropped
    _dequantize(base, dtype)
    prefix = 'base_model.model.'

    def layer_of(name):
        return base.get_submodule(name[len(prefix):] if name.startswith(prefix) else name)
    for name, delta in pending.items():
        layer = layer_of(name)
        layer.weight.copy_((layer.weight.to(torch.float32) + delta).to(layer.weight.dtype))
    for name, merged in replaced.items():
        layer_of(name).weight.copy_(merged.to(layer_of(name).weight.dtype))
    for name, bias in biases.items():
        if bias is not None:
            layer = layer_of(name)
            layer.bias.copy_((layer.bias.to(torch.float32) + bias).to(layer.bias.dtype))
    return base


def merge_adapters(model: VisionLanguageModel, dtype: torch.dtype, log: Log = _print) -> None:
    """Merge LLM and vision LoRA adapters into their base weights and dequantise a 4-bit LLM (QLoRA)."""
    from peft import PeftModel
    for attr in ('language_model', 'vision_model'):
        module = getattr(model, attr)
        if isinstance(module, PeftModel):
            log(f'merging LoRA adapters of {attr}')
            setattr(model, attr, _merge_peft(module, dtype))
    count = _dequantize(model.language_model, dtype)
    if count:
        log(f'dequantised {count} 4-bit layers of language_model')
    for attr in ('quantization_config', '_pre_quantization_dtype'):
        if hasattr(model.language_model.config, attr):
            delattr(model.language_model.config, attr)
    for attr in ('is_quantized', 'is_loaded_in_4bit', 'is_loaded_in_8bit', 'hf_quantizer'):
        if hasattr(model.language_model, attr):
            try:
                delattr(model.language_model, attr)
            except AttributeError:
                pass
    for p in model.parameters():
        if p.dtype != dtype and p.is_floating_point():
            p.data = p.data.to(dtype)
