"""The whole conversion (``tools/convert_to_official.py``): check the inputs, build, merge, write a folder::

    model = build_for_export(cfg, checkpoint, torch.bfloat16)   # config's sources + the trained tensors
    merge_adapters(model, torch.bfloat16)                       # LoRA merged, a 4-bit base dequantised
    write_official(model, tiling, out_dir, torch.bfloat16)      # or write_hf / write_llava / write_remote

Peak memory is about the model's size plus the largest tensor being converted.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import os
import re
import shutil
import socket
import sys
import time
from typing import Optional

import torch

from xtuner_plugins.data.template import DEFAULT_FRAME_PREFIX
from xtuner_plugins.engine.hooks import peak_rss_mb
from xtuner_plugins.engine.options import load_config
from xtuner_plugins.engine.runlock import LOCK_NAME
from xtuner_plugins.filemodes import as_plain_files

from ..dtypes import dtype_name
from ..lineage import recorded_inputs
from ..runconfig import run_config
from .build import build_for_export, merge_adapters, tiling_settings, training_frame_prefix, training_system_message
from .files import Log, _print
from .gguf import QUANTS, model_misfit as gguf_misfit, tools as gguf_tools, write_gguf
from .hf import hf_misfit, write_hf
from .llava import llava_misfit, write_llava
from .official import internvl_misfit, write_official
from .remote import write_remote


def _inputs(config: str, cfg, checkpoint: Optional[str]):
    """The existing files and folders the conversion reads: the config, the checkpoint, the config's sources and
    everything the checkpoint's lineage names (its previous stages and their sources, not on the command line)."""
    model = cfg.model
    vision = model.get('vision_encoder')
    paths = [config, checkpoint, vision.get('path') if isinstance(vision, dict) else vision, model.get('llm'),
             model.get('official_checkpoint'), model.get('pretrained_pth'), model.get('tokenizer')]
    if checkpoint is not None:
        paths += recorded_inputs(checkpoint)
    return sorted({os.path.realpath(p) for p in paths if isinstance(p, str) and os.path.exists(p)})


#: what a training work folder holds (checkpoints, MMEngine's pointer to the last one, the run lock)
TRAINING_FILES = ('*.pth', 'last_checkpoint', LOCK_NAME)


def training_file(folder: str) -> Optional[str]:
    """The first file in ``folder`` or below that marks a training work folder (:data:`TRAINING_FILES`), or None."""
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        for name in sorted(dirs + files):
            if any(fnmatch.fnmatch(name, pattern) for pattern in TRAINING_FILES):
                return os.path.join(root, name)
    return None


def check_out_dir(out_dir: str, inputs, overwrite: bool, log: Log = _print) -> str:
    """The folder to write (``out_dir``, or the folder it links to); refuses one that is an input, holds an input
    or lies inside one, one that holds a training run's files (``--overwrite`` never deletes a work folder), and
    a non-empty one without ``overwrite``. What a killed conversion left beside it is put right first
    (:func:`recover_leftovers`)."""
    out = os.path.realpath(out_dir)
    recover_leftovers(out, log)
    for path in inputs:  # by path parts: '/' holds every input ('/' + os.sep would not prefix one)
        if os.path.commonpath([out, path]) in (out, path):
            raise ValueError(f'OUT_DIR {out_dir} is, holds or lies inside an input ({path}); choose another folder')
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f'OUT_DIR {out_dir} exists and is not a folder')
    above = os.path.dirname(out)  # the folder the temporary copy is made in: checked before the model is built
    while not os.path.exists(above):
        above = os.path.dirname(above)
    if not os.path.isdir(above):
        raise ValueError(f'OUT_DIR {out_dir} cannot be made: {above} is a file, not a folder')
    if not os.access(above, os.W_OK | os.X_OK):
        raise ValueError(f'OUT_DIR {out_dir} cannot be made: {above} is not writable here')
    found = training_file(out) if os.path.isdir(out) else None
    if found:
        raise ValueError(f'OUT_DIR {out_dir} holds a training run\'s files ({found}); a conversion never replaces a '
                         'training work folder, --overwrite or not: choose another folder')
    if os.path.isdir(out) and os.listdir(out) and not overwrite:
        raise ValueError(f'OUT_DIR {out_dir} is not empty; pass --overwrite to replace its contents')
    not_ours = not_a_conversion(out) if os.path.isdir(out) else None
    if not_ours:
        raise ValueError(f'OUT_DIR {out_dir} is not a converted folder ({not_ours}); --overwrite replaces an earlier '
                         f'conversion only (a converted config.json or .gguf files, no subfolders), never a folder of '
                         f'other files: choose another folder, or empty it yourself')
    return out


def _claim(out: str, pid: int) -> str:
    """The file a conversion into ``out`` writes beside it while it runs (its host and pid): what it leaves when
    killed is recognised by it, not by its name alone."""
    return out.rstrip(os.sep) + f'.converting-{pid}'


def _claimed_here(out: str, pid: int) -> Optional[bool]:
    """Whether conversion ``pid``'s claim beside ``out`` is this machine's (None: no claim, or not a claim)."""
    try:
        with open(_claim(out, pid), encoding='utf-8') as f:
            claim = json.load(f)
        return claim['host'] == socket.gethostname() and claim['pid'] == pid
    except (OSError, ValueError, KeyError, TypeError):
        return None


_held: set = set()   # the claims this process holds (:func:`claimed` nests)


@contextlib.contextmanager
def claimed(out: str):
    """Hold this process's claim of ``out`` (:func:`_claim`) for the block, from before the model is built to the
    end: a second conversion into ``out`` while another one's claim is alive is refused. Two conversions into one
    folder otherwise each passed the start's check, and the later one to finish replaced the other's finished
    folder, ``--overwrite`` or not."""
    claim = _claim(out, os.getpid())
    if claim in _held:
        yield
        return
    os.makedirs(os.path.dirname(claim), exist_ok=True)   # OUT_DIR's parent, made as the conversion would
    try:
        with open(claim, 'w', encoding='utf-8') as f:
            json.dump({'host': socket.gethostname(), 'pid': os.getpid(), 'started': time.time()}, f)
    except BaseException:   # a full disk: the error is the caller's one line, and no empty claim is left behind
        with contextlib.suppress(OSError):
            os.remove(claim)
        raise
    _held.add(claim)
    try:
        other = _other_conversion(out)
        if other:
            raise ValueError(f'another conversion is writing {out} ({other}); wait for it to end, or choose another '
                             'folder')
        yield
    finally:
        _held.discard(claim)
        os.remove(claim)


def _other_conversion(out: str) -> Optional[str]:
    """Another live conversion's claim of ``out``, in words (a claim of another machine cannot be checked: it
    counts), or None. This machine's gone conversions' claims were removed by :func:`recover_leftovers`."""
    parent, base = os.path.split(out)
    claims = re.compile(re.escape(base) + r'\.converting-(\d+)$')
    elsewhere = None   # this machine's running conversion named first, whatever the names' order (it was by pid)
    for name in sorted(os.listdir(parent)) if os.path.isdir(parent) else []:
        found = claims.match(name)
        pid = int(found.group(1)) if found else None
        if pid is None or pid == os.getpid():
            continue
        here = _claimed_here(out, pid)
        if here and _running(pid):
            return f'pid {pid} on this machine'
        if here is False and elsewhere is None:
            elsewhere = (f'{os.path.join(parent, name)} claims it for a conversion on another machine; remove that '
                         'file once that conversion is over')
    return elsewhere


def recover_leftovers(out: str, log: Log) -> None:
    """What a conversion killed outright (SIGKILL, a power cut: no ``except`` ran) left beside ``out``, put right
    before another starts (:func:`written_whole`'s names): ``OUT.tmp-PID``, written in part, is removed;
    ``OUT.old-PID``, the earlier conversion moved aside just before the new one was to move in, is moved back where
    ``out`` is missing, else removed (the new one went in, as asked). Only for a conversion whose claim
    (:func:`_claim`) says it ran on this machine, as a PID no process holds now: a folder of the user's named
    alike (``OUT.old-20241127``) or another machine's running conversion is left alone. Each said."""
    parent, base = os.path.split(out)
    names = sorted(os.listdir(parent)) if base and os.path.isdir(parent) else []
    left = re.compile(re.escape(base) + r'\.(tmp|old)-(\d+)$')
    for name in names:
        found = left.match(name)
        path = os.path.join(parent, name)
        if not found or os.path.islink(path) or not os.path.isdir(path):
            continue
        pid = int(found.group(2))
        here = _claimed_here(out, pid)
        if not here:
            whose = 'no conversion claimed it' if here is None else 'another machine\'s conversion claimed it'
            log(f'{path}: named as a conversion\'s leftover, but {whose}; left as it is')
            continue
        if _running(pid):
            continue
        if found.group(1) == 'old' and not os.path.lexists(out):
            os.replace(path, out)
            log(f'{path}: the earlier conversion, moved aside by a conversion that was killed (pid '
                f'{pid}); moved back to {out}')
        else:
            shutil.rmtree(path)
            log(f'{path}: left by a conversion that was killed (pid {pid}); removed')
    claims = re.compile(re.escape(base) + r'\.converting-(\d+)$')
    for name in names:   # the claims of this machine's conversions that are gone (their folders put right above)
        found = claims.match(name)
        if found and _claimed_here(out, int(found.group(1))) and not _running(int(found.group(1))):
            os.remove(os.path.join(parent, name))


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):   # another user's process; a number no pid can be
        return True
    return True


def not_a_conversion(folder: str) -> Optional[str]:
    """Why the non-empty ``folder`` is not what a conversion writes, naming what it holds; None for a conversion or an
    empty folder. A conversion holds no subfolder and either ``.gguf`` files or a ``config.json`` whose
    ``model_type`` is one of the converted formats (``folder.FOLDER_FORMATS``): a plain transformers model (its
    LLM saved with ``save_pretrained``), or a download with its README, is not one."""
    from xtuner_plugins.models.folder import FOLDER_FORMATS
    names = sorted(os.listdir(folder))
    if not names:
        return None
    subfolders = [n + os.sep for n in names if os.path.isdir(os.path.join(folder, n))]
    if subfolders:
        return f'it holds {", ".join(subfolders[:3])}{", ..." if len(subfolders) > 3 else ""}'
    if any(n.endswith('.gguf') for n in names):
        return _not_a_gguf_pair(folder, names)
    if 'config.json' not in names:
        return f'it holds {", ".join(names[:3])}{", ..." if len(names) > 3 else ""} and no config.json'
    try:
        with open(os.path.join(folder, 'config.json'), encoding='utf-8') as f:
            model_type = json.load(f).get('model_type')
    except (OSError, ValueError, AttributeError):
        return 'its config.json does not read as a JSON object'
    if model_type not in FOLDER_FORMATS:
        return (f'its config.json is of model_type {model_type!r}, not one a conversion writes '
                f'({", ".join(sorted(FOLDER_FORMATS))})')
    docs = [n for n in names if n.lower().startswith(('readme', 'license')) or n.startswith('.git')]
    if docs:
        return f'it holds {", ".join(docs[:3])}, which a conversion never writes'
    others = [n for n in names if not written_by_conversions(n)]
    if others:   # a user's notes, results, a backup copy: the overwrite removed them with the old folder
        return (f'it holds {", ".join(others[:3])}{", ..." if len(others) > 3 else ""}, which a conversion never '
                f'writes (move it out first)')
    return None


#: what conversions write into a folder (every format; tokenizers save one of TOKENIZER_FILES and the files beside
#: it), besides the remote code (``remote_code.VLM_FILES``, ``projector.py``) and the weights' shards
CONVERSION_FILES = frozenset((
    'config.json', 'generation_config.json', 'preprocessor_config.json', 'processor_config.json',
    'video_preprocessor_config.json', 'chat_template.jinja', 'chat_template.json', 'model.safetensors',
    'model.safetensors.index.json', 'tokenizer_config.json', 'special_tokens_map.json', 'added_tokens.json',
    'merges.txt', 'vocab.json', 'tokenizer.json', 'tokenizer.model', 'vocab.txt', 'tokenizer.tiktoken'))


def written_by_conversions(name: str) -> bool:
    """Whether a file of this name is one a conversion writes (:data:`CONVERSION_FILES`), so that ``--overwrite``
    may remove it with the folder it replaces."""
    from xtuner_plugins.remote_code import VLM_FILES
    return (name in CONVERSION_FILES or name in VLM_FILES or name == 'projector.py'
            or re.fullmatch(r'model-\d{5}-of-\d{5}\.safetensors', name) is not None)


def _not_a_gguf_pair(folder: str, names) -> Optional[str]:
    """Why ``names`` are not the two files a GGUF conversion into ``folder`` writes (``gguf.convert_staged``,
    named after the folder: ``NAME-TYPE.gguf`` and ``mmproj-NAME-TYPE.gguf``), or None."""
    base = os.path.basename(os.path.normpath(folder))
    mmproj = [n for n in names if n.startswith(f'mmproj-{base}-') and n.endswith('.gguf')]
    text = [n for n in names if n.startswith(f'{base}-') and n.endswith('.gguf')]
    if len(names) == 2 and len(mmproj) == 1 and len(text) == 1:
        return None
    return (f'it holds {", ".join(names[:3])}{", ..." if len(names) > 3 else ""}, not the two files a GGUF '
            f'conversion into it writes ({base}-TYPE.gguf and mmproj-{base}-TYPE.gguf)')


FORMATS = ('auto', 'official', 'hf', 'llava', 'remote', 'gguf')


def choose_format(model, fmt: str = 'auto', frame_prefix: Optional[str] = None) -> str:
    """``fmt`` checked against the model, or for ``'auto'`` the layout that fits: ``official`` for InternVL,
    ``llava`` for CLIP/SigLIP + LLaVA's MLP on one image, ``remote`` for any other combination. ``frame_prefix``:
    the text training put before each video frame (``--format hf``'s processor writes its own)."""
    if fmt not in FORMATS:
        raise ValueError(f'unknown format {fmt!r}; use one of {FORMATS}')

    def hf(m) -> Optional[str]:
        if frame_prefix is not None and frame_prefix != DEFAULT_FRAME_PREFIX:
            return (f'trained with the video frame prefix {frame_prefix!r}; transformers\' InternVL processor writes '
                    f'{DEFAULT_FRAME_PREFIX!r}')
        return hf_misfit(m)
    misfit = {'official': internvl_misfit, 'hf': hf, 'llava': llava_misfit, 'gguf': gguf_misfit}
    if fmt == 'auto':
        return next((f for f in ('official', 'llava') if misfit[f](model) is None), 'remote')
    if fmt in misfit and misfit[fmt](model):
        fits = [f for f in ('official', 'hf', 'llava') if misfit[f](model) is None] + ['remote']
        raise ValueError(f'--format {fmt} does not fit this model: {misfit[fmt](model)}; formats that fit: '
                         f'{", ".join(fits)}')
    return fmt


WRITERS = {'official': write_official, 'hf': write_hf, 'llava': write_llava, 'remote': write_remote, 'gguf': write_gguf}


def written_whole(out: str, write):
    """``write(tmp)`` into a temporary folder beside ``out``, moved into place only once it is whole: the old ``out``
    is moved aside, the new one moved in, then the old removed; a failure or an interrupt (Ctrl-C) at any point
    removes the temporary folder and leaves ``out`` as it was (the old one moved back). Returns what ``write``
    returns."""
    tmp, old = (out.rstrip(os.sep) + f'.{kind}-{os.getpid()}' for kind in ('tmp', 'old'))
    with claimed(out):   # before anything is written or moved (held already by a conversion from its start)
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        try:
            result = write(tmp)
            as_plain_files(tmp)   # safetensors 0.8 writes its files 0600: unreadable to any other user
            if os.path.isdir(out):
                os.replace(out, old)
            os.replace(tmp, out)
        except BaseException:
            if os.path.isdir(old) and not os.path.exists(out):
                os.replace(old, out)
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        shutil.rmtree(old, ignore_errors=True)
        if os.path.lexists(old):   # files of another user's that this one may not remove: said, not left silently
            print(f'warning: the replaced folder could not be removed whole ({old}: its files or folders are not '
                  f'this user\'s to remove); remove it yourself', file=sys.stderr)
    return result


def export_checkpoint(config: Optional[str], checkpoint: Optional[str], out_dir: str, fmt: str = 'auto',
                      dtype: torch.dtype = torch.bfloat16, overwrite: bool = False,
                      cfg_options: Optional[dict] = None, max_shard_size: str = '5GB', log: Log = _print,
                      remap=(), quant: str = 'f16') -> str:
    """Rebuild the model ``checkpoint`` was trained as, load it, merge adapters, write ``out_dir``; returns it.

    The settings are the ones recorded in the checkpoint (``runconfig.run_config``: ``config`` and
    ``cfg_options``, when given, must agree with them; ``remap``: ``(OLD, NEW)`` prefixes of moved folders);
    without a checkpoint (an official folder converted as is), ``config``'s.

    ``fmt``: ``'official'`` (InternVL's remote-code layout), ``'hf'`` (transformers' InternVL), ``'llava'``
    (transformers' LLaVA), ``'remote'`` (a self-contained remote-code folder for any family) or ``'auto'`` (the
    one that fits, see :func:`choose_format`); ``'gguf'``: llama.cpp's pair (``gguf.py``), ``quant`` its LLM's type.
    The folder is written next to ``out_dir`` (the folder it links to, for a link) and moved into place only when
    complete.
    """
    if fmt not in FORMATS:
        raise ValueError(f'unknown format {fmt!r}; use one of {FORMATS}')
    if fmt == 'gguf' and quant not in QUANTS:
        raise ValueError(f'--quant {quant}: use one of {", ".join(QUANTS)}')
    start = time.time()
    if checkpoint is not None and os.path.isfile(os.path.join(checkpoint, 'config.json')):  # not DeepSpeed's folder
        raise ValueError(f'{checkpoint} is a model folder (it has a config.json), not a training checkpoint: a '
                         f'converted one is given as the folder itself (chat.py FOLDER, eval.py FOLDER, serve.py '
                         f'FOLDER), not as --checkpoint; a source model (an LLM, a vision encoder) is trained first')
    from xtuner_plugins.outcome import deepspeed_checkpoint, find_checkpoints
    if checkpoint is not None and not deepspeed_checkpoint(checkpoint) and find_checkpoints(checkpoint):
        raise ValueError(f'{checkpoint} is a training work folder, not a checkpoint: give one of its checkpoints '
                         f'(the newest: {find_checkpoints(checkpoint)[-1]})')
    if checkpoint is not None and os.path.isdir(checkpoint) and not deepspeed_checkpoint(checkpoint):
        # (it was read as a checkpoint recording nothing: 'records no training config', then given the config,
        # 'records no lineage ... give model.pretrained_pth', neither what is wrong)
        held = sorted(os.listdir(checkpoint))
        raise ValueError(f'{checkpoint} is a folder but not a DeepSpeed checkpoint (no *model_states.pt inside; it '
                         f'holds {", ".join(held[:3]) + (", ..." if len(held) > 3 else "") if held else "nothing"}): '
                         f'a copy that did not finish? Give the checkpoint DeepSpeed saved, whole')
    if checkpoint is not None:
        cfg = run_config(checkpoint, config, cfg_options, remap, log)
    elif config is None:
        raise ValueError('give a checkpoint, or a config that starts from an official folder')
    else:
        cfg = load_config(config, cfg_options)
    out = check_out_dir(out_dir, _inputs(config, cfg, checkpoint), overwrite, log)
    if fmt == 'gguf':  # once the inputs are checked, before the model is built
        gguf_tools()
    with claimed(out):
        return _export(cfg, checkpoint, config, out, out_dir, fmt, dtype, max_shard_size, log, quant, start)


def _export(cfg, checkpoint, config, out, out_dir, fmt, dtype, max_shard_size, log, quant, start) -> str:
    """:func:`export_checkpoint` once ``out`` is checked and claimed."""
    if os.path.islink(out_dir.rstrip(os.sep) or out_dir):
        log(f'OUT_DIR {out_dir} is a link: writing into the folder it points at, {out}')
    log(f'[1/4] building the model of {checkpoint or config} in {dtype_name(dtype)}')
    model = build_for_export(cfg, checkpoint, dtype, log)
    prefix = training_frame_prefix(cfg, model)
    fmt = choose_format(model, fmt, prefix)
    tiling = tiling_settings(cfg, model)
    if prefix != DEFAULT_FRAME_PREFIX:  # what stands before each video frame: recorded where a format can hold it
        tiling['frame_prefix'] = prefix
    log(f'[2/4] merging adapters ({time.time() - start:.1f}s, peak memory {peak_rss_mb():.0f} MB)')
    merge_adapters(model, dtype, log)
    log(f'[3/4] writing the {fmt} layout ({time.time() - start:.1f}s)')
    written_whole(out, lambda tmp: WRITERS[fmt](model, tiling, tmp, dtype, max_shard_size, log,
                                                system=training_system_message(cfg),
                                                **({'quant': quant} if fmt == 'gguf' else {})))
    log(f'[4/4] done: {out_dir} ({fmt} format; {time.time() - start:.1f}s, peak memory {peak_rss_mb():.0f} MB)')
    return out_dir
