"""Write tiny, randomly initialised look-alikes of the real checkpoints, offline, in seconds.

Usage::

    python tools/make_tiny_models.py OUT_DIR [--vision internvit|siglip|clip] [--llm qwen2|qwen3|llama|gemma3]
        [--chat chatml|llama3|phi3|gemma] [--seed 0] [--image-size 56] [--llm-heads 4] [--llm-kv-heads 2]
        [--vision-heads 4]

Writes ``OUT_DIR/<vision>``: InternViT in OpenGVLab's on-disk layout (config.json + model.safetensors with
the official keys), or a whole SigLIP / CLIP folder as google/siglip-so400m-patch14-384 and
openai/clip-vit-large-patch14-336 are published (with preprocessor_config.json); and ``OUT_DIR/llm``: a Qwen2,
Qwen3, Llama or Gemma 3 causal LM via ``save_pretrained`` with a byte-level BPE ``Qwen2TokenizerFast`` carrying
Qwen's special tokens (``--chat llama3`` / ``phi3`` / ``gemma``: a tokenizer with Llama 3 Instruct's, Phi-3's or
Gemma's special tokens, bos, eos and own chat template instead, trained with ``model.template=llama3`` /
``phi3-chat`` / ``gemma``). The model classes load them with the same code that loads the real checkpoints. Both
are 64 wide; the default LLM's 4 heads are 16 wide, narrower than vLLM's CPU build takes (32 and up):
``--llm-heads 2 --llm-kv-heads 1`` gives 32-wide heads, a model ``tools/serve.py`` can serve on a CPU
(docs/serving.md).

A folder that is there already and not empty is refused (its files would be replaced, and checkpoints trained on
it would no longer convert: the converter checks the source folders) unless ``--overwrite``, which replaces only
earlier tiny models (a folder holding files no tiny model writes, or weights of a real model's size, is refused),
both folders or neither. A run into an OUT_DIR another run is writing is refused (a lock file in it, let go when
that run ends, however it ends); options out of range (``--image-size`` 14 to 1022, ``--seed`` torch's) are refused
before anything is made.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from typing import Optional

from xtuner_plugins.cli.tool_args import tool_error
from xtuner_plugins.tiny import LLM_WIDTH, TINY_LLM_ARCHS, TINY_VISION_TYPES, VISION_WIDTH, make_tiny_models
from xtuner_plugins.tiny.dual import check_vit_sizes
from xtuner_plugins.tiny.tokenizer import CHAT_FAMILIES


def heads_problem(args) -> Optional[str]:
    """Why the head options cannot build the models (None: they can), naming the option and the numbers."""
    for option, heads, part, width in (('--llm-heads', args.llm_heads, 'LLM', LLM_WIDTH),
                                       ('--vision-heads', args.vision_heads, 'vision encoder', VISION_WIDTH)):
        if heads < 1 or width % heads:
            divisors = ', '.join(str(d) for d in range(1, width + 1) if width % d == 0)
            return f'{option} {heads}: the tiny {part} is {width} wide, so its heads must divide {width} ({divisors})'
    if args.llm_kv_heads < 1 or args.llm_heads % args.llm_kv_heads:
        return (f'--llm-kv-heads {args.llm_kv_heads}: must divide --llm-heads {args.llm_heads} (each key/value head '
                f'serves a whole number of heads)')
    return None


def occupied(out_dir: str, vision: str) -> Optional[str]:
    """Why writing into ``out_dir`` would replace files (a folder to write that is there and not empty), or None."""
    for name in (vision, 'llm'):
        folder = os.path.join(out_dir, name)
        if os.path.lexists(folder) and (not os.path.isdir(folder) or os.listdir(folder)):
            held = ', '.join(sorted(os.listdir(folder))[:4]) if os.path.isdir(folder) else 'not a folder'
            return (f'{folder} is there already ({held}): its files would be replaced, and checkpoints trained on it '
                    f'would no longer convert; give another OUT_DIR, or --overwrite')
    return None


#: every file a tiny model's folder holds (of any --vision, --llm and --chat): --overwrite replaces only such folders
TINY_FILES = frozenset({'added_tokens.json', 'chat_template.jinja', 'config.json', 'generation_config.json',
                        'merges.txt', 'model.safetensors', 'preprocessor_config.json', 'special_tokens_map.json',
                        'tokenizer.json', 'tokenizer_config.json', 'vocab.json'})
#: the largest file a tiny model writes is under 1 MB: one this large is a real model's weights
TINY_MOST_BYTES = 64 << 20


def not_tiny(out_dir: str, vision: str) -> Optional[str]:
    """Why ``--overwrite`` may not replace ``out_dir/<vision>`` or ``out_dir/llm`` (None: each is absent or an
    earlier tiny model): a file in its place, or a folder holding what no tiny model writes (a real model's
    README, sharded weights or code; weights over :data:`TINY_MOST_BYTES`). Checked for both before either is
    touched (a file in llm's place failed the write after the vision folder had been replaced)."""
    for name in (vision, 'llm'):
        folder = os.path.join(out_dir, name)
        if not os.path.lexists(folder):
            continue
        if not os.path.isdir(folder):
            return f'{folder} is a file, not a folder: remove it, or give another OUT_DIR'
        foreign = []
        with os.scandir(folder) as entries:
            for entry in entries:
                if entry.name not in TINY_FILES or not entry.is_file(follow_symlinks=False):
                    foreign.append(entry.name)
                elif entry.stat(follow_symlinks=False).st_size > TINY_MOST_BYTES:
                    foreign.append(f'{entry.name} of {entry.stat().st_size / 2 ** 30:.1f} GiB')
        if foreign:
            return (f'{folder} holds what no tiny model writes ({", ".join(sorted(foreign)[:4])}'
                    f'{", ..." if len(foreign) > 4 else ""}): --overwrite replaces only earlier tiny models; '
                    f'give another OUT_DIR')
    return None


def linked(out_dir: str, vision: str) -> Optional[str]:
    """Why ``out_dir/<vision>`` or ``out_dir/llm`` may not be written: a symbolic link (to a real model's folder,
    whose files ``--overwrite`` replaced, and whose weight shards it deleted), or None."""
    for name in (vision, 'llm'):
        folder = os.path.join(out_dir, name)
        if os.path.islink(folder):
            return (f'{folder} is a link to {os.path.realpath(folder)}: the tiny models are written into OUT_DIR '
                    f'itself, never through a link (--overwrite too); remove the link, or give another OUT_DIR')
    return None


def written_aside(out_dir: str, names, write) -> dict:
    """``write(tmp)`` into a new folder inside ``out_dir``, then each of ``names`` moved into ``out_dir`` in place of
    what was there (``--overwrite``: the old folder whole, no file of it left beside the new ones); a write that
    stops leaves the old folders as they were. Returns ``write``'s paths as they are in ``out_dir``."""
    import shutil
    import tempfile
    os.makedirs(out_dir, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=out_dir, prefix='.make_tiny_models.')
    moved = []   # (old folder, where it was put aside): put back if a later move fails
    try:
        paths = write(tmp)
        try:
            for name in names:
                target, aside = os.path.join(out_dir, name), os.path.join(tmp, f'old-{name}')
                if os.path.isdir(target) and not os.path.islink(target):
                    os.replace(target, aside)
                    moved.append((target, aside))
                os.replace(os.path.join(tmp, name), target)
        except OSError:
            for target, aside in reversed(moved):
                if os.path.isdir(target) and not os.path.islink(target):
                    shutil.rmtree(target)
                os.replace(aside, target)
            raise
        return {key: os.path.join(out_dir, os.path.relpath(path, tmp)) for key, path in paths.items()}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


#: the largest --image-size: a tiny tower's tile (InternViT's 448 and SigLIP's 384 are well inside; 140000 px
#: asked 25.6 GB of position embeddings)
MOST_IMAGE_SIZE = 1022
#: torch's seeds: 0 to 2**64 - 1
MOST_SEED = 2 ** 64 - 1
LOCK = '.make_tiny_models.lock'


def numbers_problem(args) -> Optional[str]:
    """Why ``--image-size`` or ``--seed`` is out of range (None: neither is), naming the option."""
    if not 14 <= args.image_size <= MOST_IMAGE_SIZE:
        return (f'--image-size {args.image_size}: give a tile side from 14 to {MOST_IMAGE_SIZE} pixels, a multiple '
                f'of the 14 px patch (default 56)')
    if not 0 <= args.seed <= MOST_SEED:
        return f'--seed {args.seed}: give a whole number from 0 to {MOST_SEED} (torch\'s seeds)'
    return None


@contextlib.contextmanager
def writing(out_dir: str):
    """This run's hold of ``out_dir`` (made if need be) for the block: a lock another make_tiny_models run into it
    finds held is a ValueError (two runs at once into one new folder both wrote, the later replacing the earlier's
    models without a word). The kernel lets the lock go when the process ends, however it ends."""
    import fcntl
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, LOCK)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ValueError(f'{out_dir}: another make_tiny_models run is writing into it; wait for it to end, or '
                             'give another OUT_DIR') from None
        if not os.path.exists(path) or not os.path.samestat(os.fstat(fd), os.stat(path)):   # removed by its holder
            raise ValueError(f'{out_dir}: another make_tiny_models run was writing into it just now; run again')
        try:
            yield
        finally:
            os.remove(path)
    finally:
        os.close(fd)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('out_dir', help='folder to write <vision>/ and llm/ into')
    p.add_argument('--vision', choices=TINY_VISION_TYPES, default='internvit',
                   help='vision encoder (default internvit)')
    p.add_argument('--llm', choices=TINY_LLM_ARCHS, default='qwen2', help='LLM architecture (default qwen2)')
    p.add_argument('--chat', choices=sorted(CHAT_FAMILIES), default='chatml',
                   help='the tokenizer\'s chat family: its special tokens, bos, eos and own template (default chatml, '
                        'Qwen2.5\'s; llama3 trains with model.template=llama3, phi3 with phi3-chat, gemma with gemma)')
    p.add_argument('--seed', type=int, default=0, help='random seed for the weights (default 0)')
    p.add_argument('--image-size', type=int, default=56,
                   help='tile size of the tiny encoder in pixels, a multiple of the 14 px patch; of 28 for '
                        'pixel_shuffle_mlp, which halves the grid; siglip and clip also take sizes between, whose '
                        'grid floors (default 56)')
    p.add_argument('--llm-heads', type=int, default=4,
                   help=f'the LLM\'s attention heads, a divisor of its width {LLM_WIDTH} (default 4: 16 wide; vLLM\'s '
                        f'CPU build needs 32 or wider: 2)')
    p.add_argument('--llm-kv-heads', type=int, default=2,
                   help='the LLM\'s key/value heads, a divisor of --llm-heads (default 2)')
    p.add_argument('--vision-heads', type=int, default=4,
                   help=f'the vision encoder\'s attention heads, a divisor of its width {VISION_WIDTH} (default 4)')
    p.add_argument('--overwrite', action='store_true',
                   help='replace OUT_DIR/<vision> and OUT_DIR/llm when they hold files already')
    args = p.parse_args(argv)
    problem = heads_problem(args) or numbers_problem(args)
    if problem:
        return tool_error('make_tiny_models', problem)
    try:   # the options first, then the folder
        # every tiny tower's 14 px patch; SigLIP's and CLIP's convolution floors a size between (SigLIP-384's 27 x 27)
        floors = args.vision in ('siglip', 'clip')
        check_vit_sizes(args.image_size - args.image_size % 14 if floors else args.image_size, 14, VISION_WIDTH,
                        args.vision_heads)
    except ValueError as exc:
        return tool_error('make_tiny_models', f'--image-size {args.image_size}: {exc}')
    from xtuner_plugins.links import leads_nowhere
    nowhere = leads_nowhere(args.out_dir)   # (was 'cannot be written: File exists' or 'No such file' under one)
    if nowhere:
        return tool_error('make_tiny_models', f'{args.out_dir} {nowhere.words}: give the folder itself' +
                                              (', or make the link\'s target first' if nowhere.missing else ''))
    made = not os.path.lexists(args.out_dir)
    from safetensors import SafetensorError
    try:
        with writing(args.out_dir):
            problem = linked(args.out_dir, args.vision) or (not_tiny if args.overwrite else occupied)(
                args.out_dir, args.vision)
            if problem:
                raise ValueError(problem)
            paths = written_aside(args.out_dir, (args.vision, 'llm'), lambda tmp: make_tiny_models(
                tmp, seed=args.seed, image_size=args.image_size, vision=args.vision, llm=args.llm,
                llm_heads=args.llm_heads, llm_kv_heads=args.llm_kv_heads, vision_heads=args.vision_heads,
                chat=args.chat))
    except ValueError as exc:  # the folder's state, another run writing it
        return tool_error('make_tiny_models', exc)
    except (OSError, SafetensorError) as exc:   # a folder this user cannot write, a full disk (safetensors' own
        # error for its writes, not an OSError): one line (a traceback before)
        return tool_error('make_tiny_models', f'{args.out_dir} cannot be written: {getattr(exc, "strerror", 0) or exc}'
                          + (f' ({exc.filename})' if getattr(exc, 'filename', None) else ''))
    finally:
        if made and os.path.isdir(args.out_dir) and not os.listdir(args.out_dir):   # (was left behind, empty)
            os.rmdir(args.out_dir)
    for name, path in paths.items():
        print(f'{name}: {path}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
