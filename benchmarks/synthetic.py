"""The models and the data set ``bench_train.py`` trains: InternViT-300M + Qwen2.5 with random weights at the real
shapes (``--real``) or the tiny look-alikes, and synthetic 12-tile images with answers of varied length, written
once into a work folder and reused (:func:`prepare`).
"""

from __future__ import annotations

import json
import os
from typing import Tuple

import numpy as np
from PIL import Image

from benchmarks.bench_memory import write_models

# (cols, rows) grids of exactly 12 tiles; an image of 448*cols x 448*rows px is tiled into that grid (its
# ratio is matched exactly; 6x2 and 2x6 tie with 3x1 and 1x3 and win the tie by area), plus a thumbnail.


GRIDS = [(4, 3), (3, 4), (6, 2), (2, 6)]

# Real shapes (OpenGVLab/InternViT-300M-448px-V2_5; Qwen/Qwen2.5-{0.5B,1.5B}-Instruct config.json).
INTERNVIT_300M = dict(image_size=448, patch_size=14, hidden_size=1024, num_layers=24, num_heads=16,
                      intermediate_size=4096)


REAL_LLMS = {
    '0.5b': dict(hidden_size=896, num_layers=24, num_heads=14, num_kv_heads=2, intermediate_size=4864),
    '1.5b': dict(hidden_size=1536, num_layers=28, num_heads=12, num_kv_heads=2, intermediate_size=8960),
}

REAL_VOCAB = 151674  # Qwen2.5's 151665 tokens + InternVL's 9 added ones: the rows InternVL resizes to


# What is trained: the full fine-tuning setting (finetune_full): projector + LLM, the vision tower frozen.


TRAINED = dict(freeze_vision=True, freeze_projector=False, freeze_llm=False)


def real_configs(llm: str):
    """``(vision config, LLM config)`` of InternViT-300M + Qwen2.5-``llm`` as the model holds them after
    loading (transformers' ``InternVLVisionConfig``; ``Qwen2Config`` with InternVL's vocabulary, untied)."""
    from transformers import Qwen2Config

    from xtuner_plugins.models.vision import official_to_hf_vision_config
    v, q = INTERNVIT_300M, REAL_LLMS[llm]
    vision = official_to_hf_vision_config(dict(
        image_size=v['image_size'], patch_size=v['patch_size'], hidden_size=v['hidden_size'],
        num_hidden_layers=v['num_layers'], num_attention_heads=v['num_heads'],
        intermediate_size=v['intermediate_size'], qkv_bias=True, qk_normalization=False, norm_type='layer_norm'))
    text = Qwen2Config(vocab_size=REAL_VOCAB, hidden_size=q['hidden_size'], intermediate_size=q['intermediate_size'],
                       num_hidden_layers=q['num_layers'], num_attention_heads=q['num_heads'],
                       num_key_value_heads=q['num_kv_heads'], tie_word_embeddings=False)
    return vision, text


def folder_configs(models: dict):
    """``(vision config, LLM config)`` of written model folders, with the vocabulary the model resizes to."""
    from transformers import AutoConfig

    from xtuner_plugins.models.llm import load_tokenizer
    from xtuner_plugins.models.vision import official_to_hf_vision_config
    with open(os.path.join(models['internvit'], 'config.json')) as f:
        vision = official_to_hf_vision_config(json.load(f))
    text = AutoConfig.from_pretrained(models['llm'], trust_remote_code=False)
    text.vocab_size = len(load_tokenizer(models['llm'])[0])
    text.tie_word_embeddings = False
    return vision, text


def write_real_models(out: str, llm: str, weights: bool = True) -> dict:
    """InternViT-300M + Qwen2.5-``llm`` with random weights (``weights=False``: the tokenizer only, for a
    dry run). The LLM is written with the tiny tokenizer's vocabulary; ``bench_train.py`` resizes it to
    :data:`REAL_VOCAB` after loading (VisionLanguageModel resizes the embeddings to the tokenizer's length)."""
    from xtuner_plugins.tiny.llm import write_tiny_qwen2
    from xtuner_plugins.tiny.tokenizer import build_tiny_tokenizer
    from xtuner_plugins.tiny.vision import write_tiny_internvit
    llm_dir = os.path.join(out, 'llm')
    if not weights:
        build_tiny_tokenizer(add_internvl_tokens=False).save_pretrained(llm_dir)
        return dict(internvit=None, llm=llm_dir, image_size=INTERNVIT_300M['image_size'])
    return dict(internvit=write_tiny_internvit(os.path.join(out, 'internvit'), **INTERNVIT_300M),
                llm=write_tiny_qwen2(llm_dir, **REAL_LLMS[llm]), image_size=INTERNVIT_300M['image_size'])


def prepare(work: str, real: bool, llm: str, samples: int, weights: bool = True) -> Tuple[dict, str]:
    """The models and the data set in ``work`` (``models/``, ``data/``) as ``(models, data.jsonl path)``,
    written once and reused by later runs with the same settings (``prepared.json`` records them)."""
    key = dict(real=real, llm=llm if real else None, samples=samples, weights=weights)
    marker = os.path.join(work, 'prepared.json')
    if os.path.exists(marker):
        with open(marker) as f:
            saved = json.load(f)
        if saved['key'] != key:
            raise SystemExit(f'{work} holds models and data for {saved["key"]}, not {key}: use another --workdir')
        return saved['models'], saved['data']
    models = (write_real_models(os.path.join(work, 'models'), llm, weights=weights) if real
              else write_models(os.path.join(work, 'models'), False))
    data = write_data(os.path.join(work, 'data'), samples, models['image_size'])
    with open(marker + '.tmp', 'w') as f:
        json.dump(dict(key=key, models=models, data=data), f)
    os.replace(marker + '.tmp', marker)
    return models, data


def write_data(folder: str, n: int, tile: int, seed: int = 0) -> str:
    """``n`` samples, each one image of a 12-tile grid (:data:`GRIDS`, ``tile`` px tiles) and an answer of
    5 to 119 words."""
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(folder, 'images'), exist_ok=True)
    path = os.path.join(folder, 'data.jsonl')
    with open(path, 'w') as f:
        for i in range(n):
            cols, rows = GRIDS[i % len(GRIDS)]
            Image.fromarray(rng.integers(0, 256, (rows * tile, cols * tile, 3), dtype=np.uint8)).save(
                os.path.join(folder, 'images', f'{i}.jpg'))
            answer = ' '.join(['word'] * int(rng.integers(5, 120)))
            f.write(json.dumps({'image': f'{i}.jpg', 'conversations': [
                {'from': 'human', 'value': '<image>\nDescribe it.'}, {'from': 'gpt', 'value': answer}]}) + '\n')
    return path
