"""Helpers that write small data sets to disk for the tests."""

import json
import os

import numpy as np
from PIL import Image


def write_image(path, size=(64, 48), mode='RGB', seed=0, fmt=None):
    """Write a random image of ``size`` (width, height) in ``mode``; returns the path."""
    rng = np.random.default_rng(seed)
    w, h = size
    if mode in ('L', 'P'):
        img = Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8))  # mode L
        if mode == 'P':
            img = img.convert('P')
    elif mode.startswith('I;16'):
        img = Image.fromarray(rng.integers(0, 65536, (h, w), dtype=np.uint16))  # mode I;16
    else:
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).convert(mode)  # RGB first
    os.makedirs(os.path.dirname(str(path)), exist_ok=True)
    img.save(path, format=fmt)
    return str(path)


def random_llm(folder, tokenizer_folder, config, **settings):
    """A random causal LM of transformers' ``config`` class (by name) and ``settings`` (the vocabulary sized as the
    LLM in ``tokenizer_folder``'s by default), seeded, saved in ``folder`` beside a copy of that folder's tokenizer
    files; returns the folder."""
    import shutil

    import torch
    import transformers
    settings.setdefault('vocab_size', transformers.AutoConfig.from_pretrained(tokenizer_folder).vocab_size)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(getattr(transformers, config)(**settings)).save_pretrained(folder)
    for name in os.listdir(tokenizer_folder):
        if name not in ('config.json', 'generation_config.json') and not name.endswith('.safetensors'):
            shutil.copy(os.path.join(tokenizer_folder, name), folder)
    return str(folder)


def write_jsonl(path, samples):
    with open(path, 'w', encoding='utf-8') as f:
        for s in samples:
            f.write((s if isinstance(s, str) else json.dumps(s, ensure_ascii=False)) + '\n')
    return str(path)


def conv(question='What is shown?', answer='A red square.', image=True):
    q = ('<image>\n' if image else '') + question
    return [{'from': 'human', 'value': q}, {'from': 'gpt', 'value': answer}]


def tiny_workspace(root):
    """Tiny models plus two small data sets (``same``: one image sample; ``mixed``: image + text-only) under
    ``root``; returns the paths (``internvit``, ``llm``, ``same``, ``mixed``, ``images``, ``cache``)."""
    from xtuner_plugins.tiny import make_tiny_models
    root = str(root)
    paths = make_tiny_models(os.path.join(root, 'models'))
    write_image(os.path.join(root, 'images', 'a.png'), size=(120, 60), seed=3)
    image = {'image': 'a.png', 'conversations': conv('Describe the image.', 'a wide noisy picture')}
    text = {'conversations': conv('Say something.', 'something', image=False)}
    paths['same'] = write_jsonl(os.path.join(root, 'same.jsonl'), [image])
    paths['mixed'] = write_jsonl(os.path.join(root, 'mixed.jsonl'), [image, text])
    paths['images'] = os.path.join(root, 'images')
    paths['cache'] = os.path.join(root, 'cache')
    return paths


def tiny_families(root):
    """:func:`tiny_workspace` plus a tiny SigLIP and CLIP tower (``siglip``, ``clip``) under ``root``."""
    from xtuner_plugins.tiny.vision import write_tiny_clip, write_tiny_siglip
    paths = tiny_workspace(root)
    paths['siglip'] = write_tiny_siglip(os.path.join(str(root), 'siglip'))
    paths['clip'] = write_tiny_clip(os.path.join(str(root), 'clip'))
    return paths


def lora_trained_tiny(root, scale=0.3):
    """A tiny InternViT + LLM under ``root`` with a LoRA checkpoint ``root/iter_1.pth`` (every trained tensor
    perturbed by ``scale``): ``dict(tiny=..., opts=..., ckpt=..., model=...)``, ``model`` the training model."""
    from tests.tools.test_convert_to_official import LORA, options, trained_checkpoint
    tiny = tiny_workspace(os.path.join(str(root), 'tiny'))
    opts = options(tiny)
    ckpt = os.path.join(str(root), 'iter_1.pth')
    return dict(tiny=tiny, opts=opts, ckpt=ckpt, model=trained_checkpoint(LORA, opts, ckpt, scale=scale))


def converted_tiny_folder(root, scale=0.3):
    """:func:`lora_trained_tiny` converted to the official layout under ``root``: the folder the chat, eval and
    web tools are tested on."""
    from tests.tools.test_convert_to_official import LORA, convert
    trained = lora_trained_tiny(root, scale)
    return convert(LORA, trained['ckpt'], os.path.join(str(root), 'official'), trained['opts'])


def write_video(path, levels, fps=10, size=(32, 24), gop=5, rotation=None, tags=None):
    """An H.264 ``.mp4`` (near-lossless) whose frame ``i`` is a grey of level ``levels[i]`` (or that RGB array,
    then of its size; one keyframe every ``gop`` frames), or a ``.gif`` of the same frames (Pillow); a path without
    an extension is a folder of frames ``0001.png``...; returns the path. ``rotation``: the ``.mp4``'s display
    rotation tag (degrees counter-clockwise, as a phone tags a portrait video stored landscape; or a dict of PyAV's
    ``set_display_rotation`` arguments, flips included); ``tags``: the stream's metadata."""
    w, h = size
    frames = [np.full((h, w, 3), int(v), np.uint8) if np.ndim(v) == 0 else np.asarray(v, np.uint8) for v in levels]
    h, w = frames[0].shape[:2]
    path = str(path)
    if not os.path.splitext(path)[1]:
        os.makedirs(path, exist_ok=True)
        for i, a in enumerate(frames):
            Image.fromarray(a).save(os.path.join(path, f'{i + 1:04d}.png'))
        return path
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if path.endswith('.gif'):
        images = [Image.fromarray(a) for a in frames]
        images[0].save(path, save_all=True, append_images=images[1:], duration=int(1000 / fps), loop=0)
        return path
    import av
    with av.open(path, 'w') as container:
        stream = container.add_stream('libx264', rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, 'yuv444p'
        stream.options = {'g': str(gop), 'qp': '0', 'bf': '0'}
        stream.metadata.update(tags or {})   # the stream's tags (Matroska keeps any, as ROTATE=90)
        if rotation is not None:   # degrees, or set_display_rotation's arguments (flips)
            stream.set_display_rotation(**rotation) if isinstance(rotation, dict) else stream.set_display_rotation(
                rotation)
        for a in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(a, format='rgb24')):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path
