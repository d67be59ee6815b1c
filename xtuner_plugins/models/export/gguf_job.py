"""An official InternVL folder (written by this converter, or OpenGVLab's) converted to GGUF as it is:
``tools/convert_to_official.py FOLDER OUT_DIR --format gguf [--quant ...]``. A checkpoint goes through
:func:`~xtuner_plugins.models.export.job.export_checkpoint` instead (built, merged, then the same writer).

Checked before anything is written, the input first (before llama.cpp is asked for): the folder is InternVL's
official layout with the fields the converter reads (``gguf_checks.config_problem``), whole (``folder.check_folder``:
its weights and tokenizer files), its layer counts those of its weights and its tokenizer InternVL's
(``gguf_checks``); then llama.cpp is built and reads this model (``gguf.config_misfit``), and ``OUT_DIR`` is not
the folder nor inside it. The pair is written next to ``OUT_DIR`` and moved into place when whole.
"""

from __future__ import annotations

import os
import time
from typing import List

from ..folder import check_folder
from .files import Log, _print
from .gguf import config_misfit, json_object, llm_architecture, tools, write_gguf_from_folder
from .gguf_checks import config_problem, folder_vocabulary_problem, layer_problem, tokenizer_problem
from .outdir import check_out_dir, written_whole


def is_official_folder(path: str) -> bool:
    """A folder with a ``config.json`` (a converted folder, not a DeepSpeed checkpoint folder)."""
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, 'config.json'))


def export_folder_gguf(folder: str, out_dir: str, quant: str = 'f16', overwrite: bool = False,
                       log: Log = _print, moving_in=None) -> List[str]:
    """``folder``'s GGUF pair in ``out_dir``; returns the files (``moving_in``: :func:`~.outdir.written_whole`'s)."""
    start = time.time()
    config = json_object(os.path.join(folder, 'config.json'))
    problem = config_problem(config)
    if problem:
        raise ValueError(f'{folder} cannot be converted to GGUF: {problem}')
    check_folder(folder)  # a truncated or missing shard: one line naming it, not the converter's traceback
    problem = (layer_problem(folder, config) or tokenizer_problem(folder)
               or folder_vocabulary_problem(folder, llm_architecture(config['llm_config'])))
    if problem:
        raise ValueError(f'{folder} cannot be converted to GGUF: {problem}')
    _, tree = tools()
    misfit = config_misfit(config, tree)
    if misfit:
        raise ValueError(f'{folder} cannot be converted to GGUF: {misfit}')
    # the folder, and where its files are (a file linked from elsewhere, such as an earlier conversion, is an input)
    inputs = [os.path.realpath(folder)] + [os.path.realpath(os.path.join(folder, name)) for name in os.listdir(folder)]
    out = check_out_dir(out_dir, inputs, overwrite, log)
    files = written_whole(out, lambda tmp: write_gguf_from_folder(folder, tmp, quant, log,
                                                                 name=os.path.basename(out.rstrip(os.sep))),
                         moving_in)
    log(f'done: {out_dir} (gguf, {quant}; {time.time() - start:.1f}s)')
    return [os.path.join(out, os.path.basename(f)) for f in files]
