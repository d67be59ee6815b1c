"""The config's model on the meta device, for the planner (``xtuner_plugins/planner.py``): ``VisionLanguageModel``'s
own constructor with the towers built from their ``config.json`` (no weights read, no memory), so freezing, LoRA,
compiled blocks, the untied and resized embeddings are the config's."""

from __future__ import annotations

import contextlib
from typing import Optional
from unittest import mock

import torch

__all__ = ['build_meta_model']


class _Vocabulary:
    """Stands in for a tokenizer where the LLM's folder has none: its length, the rows the embeddings are resized
    to, is all the planner reads of it."""

    def __init__(self, rows: int):
        self.rows = rows

    def __len__(self) -> int:
        return self.rows

    def convert_tokens_to_ids(self, token) -> int:
        return self.rows - 1


@contextlib.contextmanager
def _meta_loaders(vocabulary: Optional[int] = None):
    """``VisionLanguageModel``'s loaders replaced by builders from ``config.json`` on the meta device; with
    ``vocabulary``, the tokenizer by a :class:`_Vocabulary` of that many rows (no tokenizer files read)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from xtuner_plugins.engine.derive import encoder_conventions

    def vision(spec, torch_dtype, attn_implementation='sdpa', drop_path_rate=0.0, select_layer=None):
        enc = encoder_conventions(spec, select_layer)
        config = _reread_config(spec)
        config._attn_implementation = attn_implementation
        module = type(enc).module_class(config).to(torch_dtype)
        return module, type(enc)(module, select_layer=enc.select_layer, mean=enc.mean, std=enc.std)

    def llm(path, torch_dtype=torch.float32, attn_implementation='sdpa', quantization=None):
        from xtuner_plugins.models.llm import text_config_of
        # a VLM's folder: its language model, as training loads it; never the folder's own code
        config = text_config_of(path) or AutoConfig.from_pretrained(path, trust_remote_code=False)
        return AutoModelForCausalLM.from_config(config, dtype=torch_dtype,
                                                attn_implementation=attn_implementation)

    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.device('meta'))
        for target, value in (('models.parts.build_vision_encoder', vision), ('models.parts.load_llm', llm),
                              ('models.internvl.lineage_record', lambda *a, **k: {}),
                              ('models.internvl.log_parameter_counts', lambda *a, **k: None)):
            stack.enter_context(mock.patch(f'xtuner_plugins.{target}', value))
        if vocabulary is not None:
            stack.enter_context(mock.patch('xtuner_plugins.models.parts.load_tokenizer',
                                           lambda path: (_Vocabulary(vocabulary), 0)))
            stack.enter_context(mock.patch('xtuner_plugins.models.parts.check_tokenizer_fits', lambda *a, **k: None))
        yield


def _reread_config(spec):
    import os

    from xtuner_plugins.models.vision.base import TransformersVisionEncoder, encoder_type_for_folder, read_json
    from xtuner_plugins.models.vision.internvit_layout import official_to_hf_vision_config
    spec = {'path': spec} if isinstance(spec, str) else dict(spec)
    cls = encoder_type_for_folder(spec['path'], spec.get('type'))
    if issubclass(cls, TransformersVisionEncoder):
        return cls.module_class.config_class.from_pretrained(spec['path'])
    return official_to_hf_vision_config(read_json(os.path.join(spec['path'], 'config.json')))


def build_meta_model(model_cfg: dict, torch_dtype: str = 'bfloat16', zero3: bool = False):
    """The config's ``VisionLanguageModel`` on the meta device (its settings; no previous stage loaded), from the
    folders' ``config.json`` alone: where the LLM's folder has no tokenizer, its vocabulary is
    :func:`xtuner_plugins.plan_configs.model_vocabulary`'s (``model.planned_vocabulary`` says which). ``zero3``:
    planned for DeepSpeed ZeRO-3, where ``compile_blocks='auto'`` compiles nothing (as for a quantised LLM, which
    the meta model is not)."""
    from xtuner_plugins.models import VisionLanguageModel
    from xtuner_plugins.models.liger import liger_parts
    from xtuner_plugins.plan_configs import model_vocabulary
    cfg = {k: v for k, v in dict(model_cfg).items() if k != 'type'}
    quantized = cfg.pop('llm_quantization', None) is not None
    liger = liger_parts(cfg.pop('liger_kernel', False),   # its kernels need a GPU; the plan needs only the parts
                        preference=cfg.get('preference') is not None)
    cfg.update(pretrained_pth=None, from_scratch=True, torch_dtype=torch_dtype, zero3_init=False)
    if cfg.get('compile_blocks', 'auto') == 'auto' and (quantized or zero3):
        cfg['compile_blocks'] = False   # as the run resolves 'auto' (its why_not); the plan kept compiled blocks' peaks
    if cfg.get('attn_implementation') == 'flash_attention_2':  # not needed to build the shapes
        cfg['attn_implementation'] = 'sdpa'
    rows, source = model_vocabulary(cfg)
    with _meta_loaders(rows):
        model = VisionLanguageModel(**cfg)
    model.planned_4bit = quantized
    model.liger_kernel = liger
    model.planned_vocabulary = source
    return model
