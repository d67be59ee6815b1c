"""Convert a training checkpoint into an InternVL Hugging Face folder.

Usage::

    python tools/convert_to_official.py CONFIG CHECKPOINT OUT_DIR [--dtype bf16]
        [--format auto|official|hf|llava|remote]
        [--overwrite] [--max-shard-size 5GB] [--cfg-options key=value ...]

    # e.g. a LoRA run: merged into the base weights, official layout, loadable with trust_remote_code
    python tools/convert_to_official.py configs/finetune_lora.py work_dirs/finetune_lora/iter_1000.pth \\
        work_dirs/my_internvl

CONFIG is the training config with the same ``--cfg-options`` as the training run (the converter rebuilds
the model from it: frozen parts come from the config's sources, earlier stages from the checkpoint's recorded
lineage, which also refuses source folders other than those it was trained with). CHECKPOINT
is an MMEngine ``.pth`` or a DeepSpeed ZeRO-2/3 checkpoint folder (``iter_N.pth/``, consolidated on the
CPU). LoRA adapters are merged; a QLoRA 4-bit base is dequantised first.

``--format auto`` (default) picks the layout that fits the model and prints it. ``official`` is InternVL's
layout (InternViT + pixel shuffle, ``InternVLChatModel`` remote code): ``AutoModel.from_pretrained(OUT_DIR,
trust_remote_code=True)`` and ``model.chat(...)``. ``hf`` is transformers' ``InternVLForConditionalGeneration``
(no remote code). ``llava`` is transformers' ``LlavaForConditionalGeneration`` with its processor (CLIP or
SigLIP + LLaVA's MLP, one image per ``<image>``; no remote code). ``remote`` is a self-contained remote-code
folder for any encoder and projector, with the same ``chat`` as ``official``.
"""

import argparse
import sys

from xtuner_plugins.launch import CfgOptions
from xtuner_plugins.models.dtypes import resolve_dtype


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('config', help='the training config file')
    parser.add_argument('checkpoint', help='iter_N.pth file, or a DeepSpeed checkpoint folder')
    parser.add_argument('out_dir', help='the folder to write (must be new or empty; see --overwrite)')
    parser.add_argument('--format', choices=('auto', 'official', 'hf', 'llava', 'remote'), default='auto',
                        help='auto (default): the layout that fits the model; official: InternVL remote code; '
                             'hf: InternVLForConditionalGeneration; llava: LlavaForConditionalGeneration; '
                             'remote: self-contained remote code for any encoder/projector')
    parser.add_argument('--dtype', default='bf16', help='bf16 (default), fp16 or fp32')
    parser.add_argument('--overwrite', action='store_true', help='replace a non-empty OUT_DIR')
    parser.add_argument('--max-shard-size', default='5GB', help='largest safetensors shard (default 5GB)')
    parser.add_argument('--cfg-options', nargs='+', action=CfgOptions, default=None,
                        help='override config settings, as for xtuner train (key=value)')
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from xtuner_plugins.models.export import export_checkpoint
    try:
        export_checkpoint(args.config, args.checkpoint, args.out_dir, fmt=args.format,
                          dtype=resolve_dtype(args.dtype), overwrite=args.overwrite, cfg_options=args.cfg_options,
                          max_shard_size=args.max_shard_size)
    except (ValueError, FileNotFoundError, NotImplementedError) as exc:
        print(f'convert_to_official: error: {exc}', file=sys.stderr)
        return 2
    return 0


if __name__ == '__main__':
    sys.exit(main())
