"""What every tool that answers with a model (chat, eval, the web demo) shares on its command line: how it names
the model (a converted folder, or a training ``--checkpoint``, converted first with the settings it records), the
checks of its option values, and :func:`run_tool`, which loads the model and prints a problem as one line.

Usage, in a tool's ``parse_args``::

    add_model_arguments(parser)                 # FOLDER | --checkpoint CKPT [--remap OLD=NEW] [--config ...]
    add_tiling_arguments(parser)                # --max-num, --min-num, --image-size
    args = parser.parse_args(argv)
    check_model_arguments(parser, args)
    return run_tool(args, 'chat', use)          # 0, or 2 with 'chat: error: ...'
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
import tempfile
from typing import Callable, Optional, Tuple, Union

import torch

from xtuner_plugins.models.dtypes import resolve_dtype
from xtuner_plugins.models.gguf_model import GGUFModel, gguf_pair
from xtuner_plugins.models.inference import ConvertedModel, tiling_note
from xtuner_plugins.models.prompt import PromptTooLong


#: The errors a training config + checkpoint that do not convert are (a checkpoint or a previous stage of its
#: lineage not found, a config or source folder the checkpoint was not trained with): the converter's own, one
#: line each, which tools/convert_to_official.py prints as its error (``cli/convert.py``) and the tools too; and
#: the system's (``OSError``): a weight file another user wrote unreadable here, a full disk under the temporary
#: folder a ``--checkpoint`` is converted into (tracebacks before).
EXPORT_ERRORS = (ValueError, OSError, NotImplementedError)


def model_folder(folder: Optional[str], config: Optional[str], checkpoint: Optional[str], cfg_options, tmp: str,
                 dtype: torch.dtype, log=print, remap=()) -> str:
    """The folder to load: ``folder`` itself, or a training ``checkpoint`` converted into ``tmp`` first with the
    settings it records (``config`` and ``cfg_options``, when given, checked against them; ``remap``: moved
    folders), the converter's code path, so both ways run the same model code; :data:`EXPORT_ERRORS` when it does
    not convert."""
    if checkpoint is None:
        return folder
    from xtuner_plugins.models.export import export_checkpoint
    return export_checkpoint(config, checkpoint, os.path.join(tmp, 'model'), dtype=dtype, cfg_options=cfg_options,
                             log=log, remap=remap)


def loading_dtype(args, folder: str, dtype: torch.dtype) -> torch.dtype:
    """The dtype ``folder`` is loaded in: ``--dtype`` as given; ``auto`` as ``precision.running_dtype`` decides
    (bf16 on a CPU where bf16 products pay, ``models/cpu_bf16.py``, for a model of 100M parameters or more), said
    on stderr when it is not fp32 on a CPU."""
    if args.dtype not in (None, 'auto'):
        return dtype
    from xtuner_plugins.models.precision import running_dtype
    chosen = running_dtype(folder, args.device)
    if chosen != torch.float32 and not str(args.device).startswith('cuda'):
        print('--dtype auto: bf16 on this CPU, which multiplies bf16 in hardware (AMX or AVX-512 BF16); '
              '--dtype fp32 keeps fp32', file=sys.stderr)
    return chosen


def tool_error(prog: str, problem: Union[str, Exception]) -> int:
    """A tool's error printed as argparse prints its own (``PROG: error: ...``); the exit status 2."""
    print(f'{prog}: error: {problem}', file=sys.stderr)
    return 2


def logs_to_stderr() -> None:
    """MMEngine's log lines (a checkpoint's conversion: the tensors loaded, the attention kernels) on stderr: a
    tool's stdout is its answer (``chat.py --prompt ... > answer.txt``), and MMEngine's logger writes to stdout."""
    import logging

    from mmengine.logging import MMLogger
    for handler in MMLogger.get_current_instance().handlers:
        stream = getattr(handler, 'stream', None)
        if isinstance(handler, logging.StreamHandler) and stream in (sys.stdout, sys.__stdout__):
            handler.setStream(sys.stderr)


def run_tool(args, prog: str, use: Callable[[ConvertedModel], None], errors: Tuple[type, ...] = (),
             **tiling) -> int:
    """A tool's run on the model it names (:func:`add_model_arguments`' ``args``): the model loaded as a
    :class:`ConvertedModel` (``tiling`` as there; a config + checkpoint converted into a temporary folder
    first, removed after; a GGUF folder as a :class:`GGUFModel`, answering through llama.cpp), then
    ``use(model)``. The exit status: 0, or 2 with the error printed (:func:`tool_error`) when the model does not convert or load (:data:`EXPORT_ERRORS`) or ``use`` raises one
    of ``errors`` or a prompt that does not fit the LLM's context (``PromptTooLong``)."""
    from xtuner_plugins.signals import Terminated, sigterm_as_interrupt
    try:
        with sigterm_as_interrupt():   # the temporary folder (a checkpoint's converted model) is removed on the way out
            return _run_tool(args, prog, use, errors, **tiling)
    except Terminated:
        print(f'{prog}: stopped by SIGTERM', file=sys.stderr)
        return 143


def _run_tool(args, prog: str, use: Callable[[ConvertedModel], None], errors: Tuple[type, ...], **tiling) -> int:
    dtype = resolve_dtype(args.dtype)
    logs_to_stderr()
    with tempfile.TemporaryDirectory(prefix=f'internvl-{prog}-') as tmp:
        try:
            from xtuner_plugins.models.runconfig import parse_remap
            folder = model_folder(args.folder, args.config, args.checkpoint, args.cfg_options, tmp, dtype,
                                  log=lambda m: print(m, file=sys.stderr), remap=parse_remap(args.remap))
            trust = getattr(args, 'trust_remote_code', False)
            if gguf_pair(folder):
                model = GGUFModel(folder, **tiling)
            else:
                model = ConvertedModel(folder, loading_dtype(args, folder, dtype), args.device,
                                       trust_remote_code=trust, **tiling)
        except EXPORT_ERRORS as exc:
            full = isinstance(exc, OSError) and args.checkpoint and (
                exc.errno == errno.ENOSPC or 'No space left' in str(exc))   # safetensors' error has no errno
            return tool_error(prog, f'{exc}' + (f'; --checkpoint is converted into a temporary folder under '
                                                f'{tempfile.gettempdir()} first: set TMPDIR to a folder on a disk '
                                                f'with room' if full else ''))
        note = tiling_note(getattr(model, 'config', None), tiling.get('max_num'))   # (a GGUF folder has none)
        if note:
            print(f'{prog}: note: {note}', file=sys.stderr)
        try:
            use(model)
        except (PromptTooLong, *errors) as exc:
            return tool_error(prog, exc)
        finally:
            getattr(model, 'close', lambda: None)()  # a GGUF folder's llama.cpp worker
    return 0


def dtype_argument(text: str) -> str:
    """``--dtype``: a name :func:`~xtuner_plugins.models.dtypes.resolve_dtype` knows, kept as given."""
    try:
        resolve_dtype(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a dtype; use auto, bf16, fp16 or fp32") from None
    return text


def device_argument(text: str) -> str:
    """``--device``: ``cpu``, or ``cuda`` / ``cuda:N`` of a GPU torch sees here."""
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        device = None
    if device is None or device.type not in ('cpu', 'cuda'):
        raise argparse.ArgumentTypeError(f"{text!r} is not a device; use cpu, or cuda (cuda:N: the N-th GPU)")
    count = torch.cuda.device_count() if device.type == 'cuda' and torch.cuda.is_available() else 0
    if device.type == 'cuda' and not count:
        raise argparse.ArgumentTypeError(f'{text}: no CUDA GPU is visible here (torch.cuda.is_available() is '
                                         f'False); use cpu')
    if device.type == 'cuda' and (device.index or 0) >= count:
        raise argparse.ArgumentTypeError(f'{text}: {count} GPU{"s" * (count > 1)} here; use cuda:0 to '
                                         f'cuda:{count - 1}')
    return text


def count_argument(text: str) -> int:
    """A count or size option: a whole number, 1 or more."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give a whole number, 1 or more")
    return value


def top_k_argument(text: str) -> int:
    """``--top-k``: a whole number, 0 (no top-k filtering) or more."""
    if not text.strip().isdigit():
        raise argparse.ArgumentTypeError(f"{text!r}: give a whole number, 0 (no top-k filtering) or more")
    return int(text)


def sampling_argument(least: float, most: float = float('inf')):
    """An argparse type for a sampling setting: a finite number over ``least`` and at most ``most``. transformers
    refused some only once the model had loaded (a temperature of -1), or took them without a word (a top-p of 2:
    no filtering)."""
    import math

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and least < value <= most):
            raise argparse.ArgumentTypeError(f'{text!r}: give a number over {least:g}' +
                                             (f' and at most {most:g}' if math.isfinite(most) else ''))
        return value
    return parse


def _port(text: str, least: int, what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not least <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r}: a port is a whole number from {what} to 65535")
    return value


def port_argument(text: str) -> int:
    """``--port`` of ``tools/serve.py``: 0 (a free one) to 65535 (a larger one was a traceback from the port check)."""
    return _port(text, 0, '0 (any free one)')


def fixed_port_argument(text: str) -> int:
    """``--port`` of the web demo: 1 to 65535 (gradio cannot take 0, a free one: it then calls port 0)."""
    return _port(text, 1, '1')


def image_size_argument(text: str) -> int:
    """``--image-size``: 1 or more here; :class:`ConvertedModel` takes the folder's tile size only."""
    try:
        return count_argument(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"{text!r}: give the model's tile size in px (force_image_size in its "
                                         f"config.json), or leave --image-size out") from None


def add_model_arguments(parser) -> None:
    """The arguments by which every tool (chat, eval, web demo) names its model: a converted folder, or a
    training ``--checkpoint`` (its recorded config is used; ``--remap`` for folders moved since; a ``--config``
    and ``--cfg-options`` given too are checked against it); ``--dtype``, ``--device``.
    :func:`check_model_arguments` checks them after parsing."""
    from xtuner_plugins.cfg_words import CfgOptions
    parser.add_argument('folder', nargs='?', help='a converted folder (tools/convert_to_official.py)')
    parser.add_argument('--checkpoint', help='a training checkpoint (.pth or DeepSpeed folder) instead of a folder: '
                                             'it is converted with the settings it records')
    parser.add_argument('--remap', nargs='+', default=[], metavar='OLD=NEW',
                        help='a folder the checkpoint was trained with, moved since: its old and new path')
    parser.add_argument('--config', help='optional with --checkpoint: a training config, checked against the '
                                         'settings the checkpoint records (needed for a checkpoint recording none)')
    parser.add_argument('--cfg-options', nargs='+', action=CfgOptions, default=None,
                        help='with --checkpoint: where source folders are now (model.llm=DIR); settings that '
                             'differ from the recorded ones are refused')
    parser.add_argument('--trust-remote-code', action='store_true',
                        help='run the folder\'s Python files even where they are not this project\'s (a folder '
                             'from elsewhere: read them first)')
    parser.add_argument('--dtype', default='auto', type=dtype_argument,
                        help='auto (bf16 on a GPU, and on a CPU whose bf16 products run well over its fp32 ones for a '
                             'model of 100M parameters or more; else fp32), bf16, fp16, fp32')
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu', type=device_argument,
                        help='cpu, cuda or cuda:N (default: cuda when a GPU is visible, else cpu)')


def add_tiling_arguments(parser, image_size: bool = True) -> None:
    """The tiling options of the tools that take them (chat: all; web demo: the tile counts), each 1 or more;
    :func:`check_model_arguments` checks ``--min-num`` against ``--max-num``, :class:`ConvertedModel` against
    the folder."""
    parser.add_argument('--max-num', type=count_argument, default=None, help='most tiles per image (default: config)')
    parser.add_argument('--min-num', type=count_argument, default=None,
                        help='fewest tiles per image (default: config)')
    if image_size:
        parser.add_argument('--image-size', type=image_size_argument, default=None,
                            help="tile size in px: the folder's own (config.json's force_image_size; its vision "
                                 "tokens per tile are fixed by it), the default")


def add_image_limit_argument(parser) -> None:
    """``--max-image-pixels`` of the tools that read a user's own images (chat, eval): Pillow's decompression-bomb
    limit by default; :func:`image_limit` holds it over the tool's run."""
    from xtuner_plugins.data.image_io import DEFAULT_MAX_IMAGE_PIXELS
    parser.add_argument('--max-image-pixels', type=int, default=DEFAULT_MAX_IMAGE_PIXELS,
                        help=f'larger images are refused (default Pillow\'s decompression-bomb limit, '
                             f'{DEFAULT_MAX_IMAGE_PIXELS}; 0: no limit, for images you trust)')


def image_limit(args):
    """The images' limit of a tool's run (``--max-image-pixels``; 0: none), as a context."""
    from xtuner_plugins.data.image_io import max_image_pixels_within
    return max_image_pixels_within(args.max_image_pixels or None, '--max-image-pixels')


def check_model_arguments(parser, args) -> None:
    limit = getattr(args, 'max_image_pixels', None)
    if limit is not None and limit < 0:
        parser.error(f'--max-image-pixels {limit}: give a number of pixels, or 0 for no limit')
    if (args.config or args.cfg_options or args.remap) and not args.checkpoint:
        parser.error('--config, --cfg-options and --remap go with --checkpoint')
    if (args.folder is None) == (args.checkpoint is None):
        parser.error('give a converted folder or --checkpoint, one of them')
    low, high = getattr(args, 'min_num', None), getattr(args, 'max_num', None)
    from xtuner_plugins.data.tile_grid import tiles_problem
    for option, value in (('--min-num', low), ('--max-num', high)):
        problem = None if value is None else tiles_problem(value, option)
        if problem:
            parser.error(problem)
    if low is not None and high is not None and low > high:
        parser.error(f'--min-num {low} is over --max-num {high}')


