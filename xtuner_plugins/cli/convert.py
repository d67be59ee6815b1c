"""Convert a training checkpoint into an InternVL Hugging Face folder.

Usage::

    python tools/convert_to_official.py CHECKPOINT OUT_DIR [--dtype bf16]
        [--format auto|official|hf|llava|remote|gguf] [--quant f16|q8_0|q4_k_m|f32] [--remap OLD=NEW ...]
        [--overwrite] [--max-shard-size 5GB]
    python tools/convert_to_official.py OFFICIAL_FOLDER OUT_DIR --format gguf [--quant q4_k_m]

    # e.g. a LoRA run: merged into the base weights, official layout, loadable with trust_remote_code
    python tools/convert_to_official.py work_dirs/finetune_lora/iter_1000.pth work_dirs/my_internvl

CHECKPOINT is an MMEngine ``.pth`` or a DeepSpeed ZeRO-2/3 checkpoint folder (``iter_N.pth/``, consolidated on
the CPU). It is enough: the converter rebuilds the model from the config the checkpoint records (the run's,
with its ``--cfg-options``), finds the frozen parts' folders and the earlier stages through its recorded lineage
(``--remap OLD=NEW`` for folders moved since; the fingerprints refuse other folders) and writes the tiling,
template and system message it was trained with. LoRA adapters are merged; a QLoRA 4-bit base is dequantised
first. ``CONFIG CHECKPOINT OUT_DIR`` (the form before checkpoints recorded their config) still works: the config
and ``--cfg-options`` are then checked against the recorded settings, and any that differ are refused, naming
both values; a checkpoint recording no config takes them as given.

``--format auto`` (default) picks the layout that fits the model and prints it. ``official`` is InternVL's
layout (InternViT + pixel shuffle, ``InternVLChatModel`` remote code): ``AutoModel.from_pretrained(OUT_DIR,
trust_remote_code=True)`` and ``model.chat(...)``. ``hf`` is transformers' ``InternVLForConditionalGeneration``
(no remote code). ``llava`` is transformers' ``LlavaForConditionalGeneration`` with its processor (CLIP or
SigLIP + LLaVA's MLP, one image per ``<image>``; no remote code). ``remote`` is a self-contained remote-code
folder for any encoder and projector, with the same ``chat`` as ``official``. ``gguf`` is llama.cpp's pair, the
LLM's GGUF (``--quant``: f16, the default, q8_0, q4_k_m, or f32) and the mmproj GGUF, written by llama.cpp's own
converter and quantiser (``make gguf`` builds them; InternVL models only), from a checkpoint or from an official
folder given in its place; ``tools/chat.py`` and ``tools/eval.py`` take the folder (docs/conversion.md, "GGUF").
"""

import argparse
import os
import re
import signal
import sys

PROG = 'convert_to_official'

#: what huggingface_hub's shard splitting reads as a size (it fails on anything else, after the model is built)
SHARD_SIZE = re.compile(r'\s*(\d+(?:\.\d+)?)\s*(?:KB|MB|GB|TB)\s*', re.IGNORECASE)


def parse_args(argv=None):
    from xtuner_plugins.cfg_words import CfgOptions   # (here: a stop while it loads is taken, see main)
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                     usage='%(prog)s [CONFIG] CHECKPOINT OUT_DIR [options]',
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('paths', nargs='+', metavar='PATH',
                        help='the checkpoint (iter_N.pth file, or a DeepSpeed checkpoint folder) and the folder to '
                             'write (new or empty; see --overwrite); a training config before them is optional')
    parser.add_argument('--remap', nargs='+', default=[], metavar='OLD=NEW',
                        help='a folder the checkpoint was trained with, moved since: its old and new path')
    parser.add_argument('--format', choices=('auto', 'official', 'hf', 'llava', 'remote', 'gguf'), default='auto',
                        help='auto (default): the layout that fits the model; official: InternVL remote code; '
                             'hf: InternVLForConditionalGeneration; llava: LlavaForConditionalGeneration; '
                             'remote: self-contained remote code for any encoder/projector; gguf: llama.cpp\'s '
                             'text + mmproj GGUF (from a checkpoint or an official folder)')
    parser.add_argument('--quant', choices=('f16', 'q8_0', 'q4_k_m', 'f32'), default=None,
                        help='with --format gguf: the LLM\'s type (default f16; the mmproj stays f16, f32 with f32)')
    parser.add_argument('--dtype', default=None, help='bf16 (default; fp32 for gguf, whose --quant rounds), fp16 or '
                                                      'fp32')
    parser.add_argument('--overwrite', action='store_true',
                        help='replace an earlier conversion in OUT_DIR (never a folder of other files)')
    parser.add_argument('--max-shard-size', default='5GB', help='largest safetensors shard (default 5GB)')
    parser.add_argument('--cfg-options', nargs='+', action=CfgOptions, default=None,
                        help='where source folders are now (model.llm=DIR); settings that differ from the '
                             'recorded ones are refused')
    args = parser.parse_args(argv)
    if len(args.paths) not in (2, 3):
        parser.error(f'give CHECKPOINT OUT_DIR (or CONFIG CHECKPOINT OUT_DIR), not {len(args.paths)} paths')
    args.config = args.paths[0] if len(args.paths) == 3 else None
    args.checkpoint, args.out_dir = args.paths[-2:]
    if args.quant and args.format != 'gguf':
        parser.error('--quant goes with --format gguf')
    if not SHARD_SIZE.fullmatch(args.max_shard_size) or not float(SHARD_SIZE.fullmatch(args.max_shard_size)[1]):
        parser.error(f'--max-shard-size {args.max_shard_size!r}: give a size over 0 in KB, MB, GB or TB (e.g. 5GB)')
    args.quant = args.quant or 'f16'
    args.dtype = args.dtype or ('fp32' if args.format == 'gguf' else 'bf16')
    return args


def main(argv=None) -> int:
    """The tool; ``argv`` None: this process's own command line, whose stop after a finished conversion, as the
    process ends, is said too (:func:`_said_at_exit`)."""
    from xtuner_plugins.signals import sigterm_as_interrupt, stop_code
    args, moving = None, []   # moving: the new folder written_whole announced as it moved it into OUT_DIR
    try:
        with sigterm_as_interrupt():   # first, before the libraries load (seconds): a stop then is one line too
            args = parse_args(argv)    # as Ctrl-C: the folder being written and a converter's process are removed
            code = _main(args, moving.append)
    except KeyboardInterrupt as stop:
        print(f'{PROG}: {_stopped(args, stop, moving[-1] if moving else None)}', file=sys.stderr)
        return stop_code(stop)
    if code == 0 and argv is None:
        _said_at_exit(args.out_dir)
    return code


def _stopped(args, stop: KeyboardInterrupt, moving) -> str:
    """What a stop left, in words: OUT_DIR as it was, or the new conversion in it (and the replaced folder's
    leftover, when a second stop cut its removal short: its claim stays, and the next conversion removes it)."""
    from xtuner_plugins.signals import stop_code
    how = 'terminated' if stop_code(stop) == 143 else 'interrupted'
    if args is None:
        return f'{how} as it started; nothing was written'
    done = sys.modules.get('xtuner_plugins.models.export.outdir')   # (not loaded: stopped before it wrote)
    if done is None or not done.moved_in(moving):
        return f'{how}; {args.out_dir} is as it was before'
    left = getattr(stop, 'leftover', None)
    return (f'{how} once the conversion was written: {args.out_dir} holds it whole' +
            (f'; what is left of the folder it replaced, {left}, is removed by the next conversion into '
             f'{args.out_dir} (or remove it yourself)' if left else ''))


def _said_at_exit(out_dir: str) -> None:
    """A SIGTERM from here to the process's end (its teardown takes a moment) says the conversion was written, and
    ends the process with 143 (it ended at once, without a word). For this process's own command line only: the
    handler stays."""
    line = f'{PROG}: terminated once the conversion was written: {out_dir} holds it whole\n'.encode()

    def said(signum, frame):
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError, RuntimeError):   # closed, or being written as the signal came
                pass
        os.write(2, line)
        os._exit(128 + signum)
    signal.signal(signal.SIGTERM, said)


def _main(args, moving_in) -> int:
    from xtuner_plugins.models.dtypes import resolve_dtype
    from xtuner_plugins.models.export import export_checkpoint
    from xtuner_plugins.models.export.gguf_job import export_folder_gguf, is_official_folder
    from xtuner_plugins.models.runconfig import parse_remap
    try:
        if args.config is None and is_official_folder(args.checkpoint):
            if args.format != 'gguf':  # it would be read as a DeepSpeed checkpoint folder, recording no config
                raise ValueError(f'{args.checkpoint} is a converted folder (it has a config.json), not a training '
                                 f'checkpoint: a converted folder converts to --format gguf only; for another '
                                 f'layout convert the checkpoint it was converted from')
            export_folder_gguf(args.checkpoint, args.out_dir, args.quant, args.overwrite, moving_in=moving_in)
            return 0
        export_checkpoint(args.config, args.checkpoint, args.out_dir, fmt=args.format,
                          dtype=resolve_dtype(args.dtype), overwrite=args.overwrite, cfg_options=args.cfg_options,
                          max_shard_size=args.max_shard_size, remap=parse_remap(args.remap), quant=args.quant,
                          moving_in=moving_in)
    except (ValueError, OSError, NotImplementedError) as exc:  # OSError: a disk full while writing, ...
        print(f'{PROG}: error: {exc}', file=sys.stderr)
        return 2
    return 0


if __name__ == '__main__':
    sys.exit(main())
