"""Write tiny, randomly initialised look-alikes of the real checkpoints, offline, in seconds.

Usage::

    python tools/make_tiny_models.py OUT_DIR [--vision internvit|siglip|clip] [--llm qwen2|qwen3|llama]
        [--seed 0] [--image-size 56]

Writes ``OUT_DIR/<vision>``: InternViT in OpenGVLab's on-disk layout (config.json + model.safetensors with
the official keys), or a whole SigLIP / CLIP folder as google/siglip-so400m-patch14-384 and
openai/clip-vit-large-patch14-336 are published (with preprocessor_config.json); and ``OUT_DIR/llm``: a Qwen2,
Qwen3 or Llama causal LM via ``save_pretrained`` with a byte-level BPE ``Qwen2TokenizerFast`` carrying Qwen's
special tokens. The model classes load them with the same code that loads the real checkpoints.
"""

from __future__ import annotations

import argparse
import sys

from xtuner_plugins.tiny import TINY_LLM_ARCHS, TINY_VISION_TYPES, make_tiny_models


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('out_dir', help='folder to write <vision>/ and llm/ into')
    p.add_argument('--vision', choices=TINY_VISION_TYPES, default='internvit',
                   help='vision encoder (default internvit)')
    p.add_argument('--llm', choices=TINY_LLM_ARCHS, default='qwen2', help='LLM architecture (default qwen2)')
    p.add_argument('--seed', type=int, default=0, help='random seed for the weights (default 0)')
    p.add_argument('--image-size', type=int, default=56,
                   help='tile size of the tiny encoder in pixels, a multiple of 28 (default 56)')
    args = p.parse_args(argv)
    paths = make_tiny_models(args.out_dir, seed=args.seed, image_size=args.image_size, vision=args.vision,
                             llm=args.llm)
    for name, path in paths.items():
        print(f'{name}: {path}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
