"""Real-size look-alikes of the seeds' checkpoints: the published ``config.json``, random weights.

:func:`write_real_model` writes one of :data:`REAL_MODELS` as its hub folder has it, with the same code
paths as the tiny writers (InternViT's key layout from :mod:`.vision`, the transformers classes of
:mod:`.dual` and :mod:`.llm`), at the published sizes:

* ``config.json``: the published file's fields and values (:data:`PUBLISHED_CONFIGS`); for CLIP the fields
  the 2022 file sets explicitly, not the generation defaults (``top_k``, ``num_beams``, ...) it also dumped;
* the weights in the published dtype, random, in safetensors shards of at most ``max_shard_size`` with a
  ``model.safetensors.index.json`` (the hub holds these five models in one file each; sharding exercises the
  index path the larger checkpoints need; ``max_shard_size=None`` writes one ``model.safetensors``);
* for the LLMs, a tokenizer with Qwen2.5's id layout: 151,643 BPE entries (the tiny BPE's merges, the rest
  unreachable fillers), Qwen's 22 special tokens at 151643..151664, so that InternVL's nine tokens take
  151665..151673 (``<IMG_CONTEXT>`` = 151667) and the model resizes to InternVL's 151,674 rows on load.

They load through the code that loads the real checkpoints (``VisionLanguageModel(vision_encoder=DIR,
llm=DIR)``). :func:`meta_state_shapes` gives every tensor's name and shape without memory (meta device).
"""

from __future__ import annotations

import json
import os
from typing import Dict, Optional, Tuple

import torch

from xtuner_plugins.remote_code import INTERN_VIT_AUTO_MAP

__all__ = ['REAL_MODELS', 'PUBLISHED_CONFIGS', 'QWEN25_SPECIAL_TOKENS', 'QWEN25_BPE_SIZE', 'write_real_model',
           'build_qwen25_tokenizer', 'meta_state_shapes', 'save_sharded']

_QWEN_COMMON = {
    'architectures': ['Qwen2ForCausalLM'], 'attention_dropout': 0.0, 'bos_token_id': 151643,
    'eos_token_id': 151645, 'hidden_act': 'silu', 'initializer_range': 0.02, 'max_position_embeddings': 32768,
    'max_window_layers': 21, 'model_type': 'qwen2', 'num_key_value_heads': 2, 'rms_norm_eps': 1e-06,
    'rope_theta': 1000000.0, 'sliding_window': 32768, 'tie_word_embeddings': True, 'torch_dtype': 'bfloat16',
    'transformers_version': '4.43.1', 'use_cache': True, 'use_sliding_window': False, 'vocab_size': 151936}

_CLIP_TEXT = {'hidden_size': 768, 'intermediate_size': 3072, 'num_attention_heads': 12, 'num_hidden_layers': 12,
              'projection_dim': 768}
_CLIP_VISION = {'hidden_size': 1024, 'image_size': 336, 'intermediate_size': 4096, 'num_attention_heads': 16,
                'num_hidden_layers': 24, 'patch_size': 14, 'projection_dim': 768}

# config.json of each hub folder (Qwen/..., OpenGVLab/InternViT-300M-448px-V2_5, google/siglip-so400m-patch14-384,
# openai/clip-vit-large-patch14-336)
PUBLISHED_CONFIGS: Dict[str, dict] = {
    'InternViT-300M-448px-V2_5': {
        'architectures': ['InternVisionModel'], 'attention_dropout': 0.0, 'auto_map': dict(INTERN_VIT_AUTO_MAP),
        'drop_path_rate': 0.0, 'dropout': 0.0, 'hidden_act': 'gelu', 'hidden_size': 1024, 'image_size': 448,
        'initializer_factor': 0.1, 'initializer_range': 1e-10, 'intermediate_size': 4096, 'layer_norm_eps': 1e-06,
        'model_type': 'intern_vit_6b', 'norm_type': 'layer_norm', 'num_attention_heads': 16, 'num_channels': 3,
        'num_hidden_layers': 24, 'patch_size': 14, 'qk_normalization': False, 'qkv_bias': True,
        'torch_dtype': 'bfloat16', 'transformers_version': '4.37.2', 'use_bfloat16': True, 'use_flash_attn': True},
    'siglip-so400m-patch14-384': {
        'architectures': ['SiglipModel'], 'initializer_factor': 1.0, 'model_type': 'siglip',
        'text_config': {'hidden_size': 1152, 'intermediate_size': 4304, 'model_type': 'siglip_text_model',
                        'num_attention_heads': 16, 'num_hidden_layers': 27},
        'torch_dtype': 'float32', 'transformers_version': '4.37.0.dev0',
        'vision_config': {'hidden_size': 1152, 'image_size': 384, 'intermediate_size': 4304,
                          'model_type': 'siglip_vision_model', 'num_attention_heads': 16, 'num_hidden_layers': 27,
                          'patch_size': 14}},
    'clip-vit-large-patch14-336': {
        'architectures': ['CLIPModel'], 'initializer_factor': 1.0, 'logit_scale_init_value': 2.6592,
        'model_type': 'clip', 'projection_dim': 768,
        'text_config': dict(_CLIP_TEXT, hidden_act='quick_gelu', layer_norm_eps=1e-05, vocab_size=49408,
                            max_position_embeddings=77, bos_token_id=0, eos_token_id=2, pad_token_id=1,
                            dropout=0.0, attention_dropout=0.0, initializer_factor=1.0, initializer_range=0.02,
                            model_type='clip_text_model'),
        'text_config_dict': dict(_CLIP_TEXT),
        'torch_dtype': 'float32', 'transformers_version': None,
        'vision_config': dict(_CLIP_VISION, hidden_act='quick_gelu', layer_norm_eps=1e-05, num_channels=3,
                              dropout=0.0, attention_dropout=0.0, initializer_factor=1.0, initializer_range=0.02,
                              model_type='clip_vision_model'),
        'vision_config_dict': dict(_CLIP_VISION)},
    'Qwen2.5-0.5B-Instruct': dict(_QWEN_COMMON, hidden_size=896, intermediate_size=4864, num_attention_heads=14,
                                  num_hidden_layers=24),
    'Qwen2.5-1.5B-Instruct': dict(_QWEN_COMMON, hidden_size=1536, intermediate_size=8960, num_attention_heads=12,
                                  num_hidden_layers=28),
}
REAL_MODELS = tuple(PUBLISHED_CONFIGS)

# Qwen2.5's tokenizer: 151643 BPE entries, then these 22 special tokens (151643..151664)
QWEN25_BPE_SIZE = 151643
QWEN25_SPECIAL_TOKENS = (
    '<|endoftext|>', '<|im_start|>', '<|im_end|>', '<|object_ref_start|>', '<|object_ref_end|>', '<|box_start|>',
    '<|box_end|>', '<|quad_start|>', '<|quad_end|>', '<|vision_start|>', '<|vision_end|>', '<|vision_pad|>',
    '<|image_pad|>', '<|video_pad|>', '<tool_call>', '</tool_call>', '<|fim_prefix|>', '<|fim_middle|>',
    '<|fim_suffix|>', '<|fim_pad|>', '<|repo_name|>', '<|file_sep|>')

_DTYPES = {'bfloat16': torch.bfloat16, 'float32': torch.float32}


def _dtype(name: str) -> torch.dtype:
    return _DTYPES[PUBLISHED_CONFIGS[name]['torch_dtype']]


def _write_config(name: str, out_dir: str) -> None:
    with open(os.path.join(out_dir, 'config.json'), 'w', encoding='utf-8') as f:
        json.dump(PUBLISHED_CONFIGS[name], f, indent=2, sort_keys=True)
        f.write('\n')


def build_qwen25_tokenizer():
    """The tiny tokenizer's BPE (its merges; ids of the first 512 entries unchanged) padded with unreachable
    filler entries to Qwen2.5's 151,643, then Qwen2.5's 22 special tokens: ``len() == 151665`` as Qwen2.5's,
    ``<|endoftext|>`` = 151643, ``<|im_start|>`` = 151644, ``<|im_end|>`` = 151645 (eos; pad ``<|endoftext|>``)."""
    from tokenizers import AddedToken, models
    from transformers import Qwen2TokenizerFast

    from .tokenizer import CHATML_TEMPLATE, _train_bpe
    small = _train_bpe(512)
    model = json.loads(small.to_str())['model']
    vocab = dict(model['vocab'])
    merges = [tuple(m.split(' ')) if isinstance(m, str) else tuple(m) for m in model['merges']]
    for i in range(len(vocab), QWEN25_BPE_SIZE):
        vocab[f'<|filler_{i}|>'] = i  # no merge produces these: they are never emitted
    small.model = models.BPE(vocab=vocab, merges=merges, unk_token=None, fuse_unk=False, byte_fallback=False)
    small.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in QWEN25_SPECIAL_TOKENS])
    return Qwen2TokenizerFast(
        tokenizer_object=small, bos_token=None, eos_token='<|im_end|>', pad_token='<|endoftext|>', unk_token=None,
        additional_special_tokens=list(QWEN25_SPECIAL_TOKENS[1:]), model_max_length=131072, errors='replace',
        add_prefix_space=False, clean_up_tokenization_spaces=False, split_special_tokens=False,
        chat_template=CHATML_TEMPLATE)


def _parse_size(size) -> int:
    if isinstance(size, int):
        return size
    units = {'KB': 10 ** 3, 'MB': 10 ** 6, 'GB': 10 ** 9, 'KIB': 2 ** 10, 'MIB': 2 ** 20, 'GIB': 2 ** 30}
    s = str(size).upper().strip()
    for unit in sorted(units, key=len, reverse=True):
        if s.endswith(unit):
            return int(float(s[:-len(unit)]) * units[unit])
    return int(s)


def save_sharded(state: Dict[str, torch.Tensor], out_dir: str, max_shard_size=None) -> list:
    """``state`` as safetensors shards of at most ``max_shard_size`` bytes (a tensor larger than that gets a
    shard of its own) named as transformers names them, plus ``model.safetensors.index.json``; ``None``: one
    ``model.safetensors``. Returns the files written, each readable as the published ones are (safetensors 0.8
    writes 0600: ``filemodes.py``)."""
    from safetensors.torch import save_file as write

    from xtuner_plugins.filemodes import file_mode

    def save_file(tensors, path, metadata):
        write(tensors, path, metadata=metadata)
        os.chmod(path, file_mode())
    if max_shard_size is None:
        save_file(state, os.path.join(out_dir, 'model.safetensors'), metadata={'format': 'pt'})
        return ['model.safetensors']
    limit, shards, current, size = _parse_size(max_shard_size), [], {}, 0
    for key, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if current and size + nbytes > limit:
            shards.append(current)
            current, size = {}, 0
        current[key], size = tensor, size + nbytes
    shards.append(current)
    names = [f'model-{i + 1:05d}-of-{len(shards):05d}.safetensors' for i in range(len(shards))]
    weight_map, total = {}, 0
    for name, shard in zip(names, shards):
        save_file(shard, os.path.join(out_dir, name), metadata={'format': 'pt'})
        for key, tensor in shard.items():
            weight_map[key] = name
            total += tensor.numel() * tensor.element_size()
    with open(os.path.join(out_dir, 'model.safetensors.index.json'), 'w', encoding='utf-8') as f:
        json.dump({'metadata': {'total_size': total}, 'weight_map': weight_map}, f, indent=2, sort_keys=True)
        f.write('\n')
    return names + ['model.safetensors.index.json']


def _hf_model(name: str, device: str = 'cpu'):
    """The transformers model of a SigLIP / CLIP / Qwen2.5 folder built from the published config (random)."""
    from transformers import CLIPConfig, CLIPModel, Qwen2Config, Qwen2ForCausalLM, SiglipConfig, SiglipModel
    cfg = {k: v for k, v in PUBLISHED_CONFIGS[name].items() if k not in ('architectures', 'torch_dtype')}
    classes = {'siglip': (SiglipConfig, SiglipModel), 'clip': (CLIPConfig, CLIPModel),
               'qwen2': (Qwen2Config, Qwen2ForCausalLM)}
    config_class, model_class = classes[cfg.pop('model_type')]
    for key in ('text_config_dict', 'vision_config_dict', 'transformers_version'):
        cfg.pop(key, None)
    with torch.device(device):
        return model_class(config_class(**cfg))


def _internvit_state(seed: int) -> Dict[str, torch.Tensor]:
    from .vision import _official_state_dict
    # the published initializer_range (1e-10) would make the random layers all but zero: weights get 0.02
    config = dict(PUBLISHED_CONFIGS['InternViT-300M-448px-V2_5'], initializer_range=0.02)
    return {k: v.to(torch.bfloat16) for k, v in _official_state_dict(config, seed).items()}


def meta_state_shapes(name: str) -> Dict[str, Tuple[int, ...]]:
    """Every tensor :func:`write_real_model` writes for ``name``, by name, with its shape (no memory used)."""
    if name == 'InternViT-300M-448px-V2_5':
        from .vision import _official_state_dict
        with torch.device('meta'):
            state = _official_state_dict(PUBLISHED_CONFIGS[name], 0)
        return {k: tuple(v.shape) for k, v in state.items()}
    model = _hf_model(name, 'meta')
    return {k: tuple(v.shape) for k, v in _saved_state(model).items()}


def _saved_state(model) -> Dict[str, torch.Tensor]:
    """What ``save_pretrained`` saves: tied weights once (Qwen2.5's ``lm_head`` is its embeddings)."""
    state = model.state_dict()
    if getattr(model.config, 'tie_word_embeddings', False) and 'lm_head.weight' in state:
        del state['lm_head.weight']
    return state


def write_real_model(name: str, out_dir: str, seed: int = 0, weights: bool = True,
                     max_shard_size: Optional[str] = '1GB') -> str:
    """Write ``name`` (one of :data:`REAL_MODELS`) to ``out_dir`` (see the module docstring); returns it.
    ``weights=False`` writes the config (and the tokenizer or preprocessor) only."""
    if name not in PUBLISHED_CONFIGS:
        raise ValueError(f'unknown real-size model {name!r}; use one of {REAL_MODELS}')
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    if name.startswith('Qwen'):
        build_qwen25_tokenizer().save_pretrained(out_dir)
    elif name.startswith('siglip'):
        from transformers import SiglipImageProcessor
        SiglipImageProcessor(size={'height': 384, 'width': 384}, image_mean=[0.5] * 3, image_std=[0.5] * 3,
                             resample=3).save_pretrained(out_dir)
    elif name.startswith('clip'):
        from transformers import CLIPImageProcessor
        from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
        CLIPImageProcessor(size={'shortest_edge': 336}, crop_size={'height': 336, 'width': 336},
                           do_center_crop=True, image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD,
                           resample=3).save_pretrained(out_dir)
    if weights:
        torch.manual_seed(seed)
        if name == 'InternViT-300M-448px-V2_5':
            state = _internvit_state(seed)
        else:
            model = _hf_model(name).to(_dtype(name))
            state = {k: v.contiguous() for k, v in _saved_state(model).items()}
        save_sharded(state, out_dir, max_shard_size)
        del state
    _write_config(name, out_dir)  # last: the published file, whatever save_pretrained would have written
    return out_dir
