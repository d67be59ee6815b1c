"""Third-party start-up noise, silenced message by message; installed when ``xtuner_plugins`` is imported.

Each entry names one logger (or warning category and module) and the start of one message; every other
message of the same logger or module still shows. Only lines that say nothing a user of this project can act on
are listed here, each with the reason:

* bitsandbytes, on a CPU with AVX512-BF16, logs at import (``bitsandbytes/backends/cpu/ops.py``)
  ``Failed to load CPU gemm_4bit_forward from kernels-community: No module named 'kernels'``: the optional
  ``kernels`` package (a fused 4-bit CPU kernel fetched from the Hugging Face Hub) is not installed, so
  bitsandbytes uses its own CPU code. Nothing here runs 4-bit models on a CPU; ``pip install kernels`` would
  only fetch a kernel over the network. Any other failure to load that kernel (``kernels`` installed but
  broken) still shows.
* DeepSpeed, imported without CUDA: ``Setting accelerator to CPU. If you have GPU or other accelerator, we were
  unable to detect it.`` (its logger ``DeepSpeed``): ``xtuner_plugins.engine`` (which imports DeepSpeed) says
  the same in its own line, ``xtuner_plugins: CUDA is not available, applied CPU patches: ...``.
* torch, training on a CPU: ``'pin_memory' argument is set as true but no accelerator is found, then device
  pinned memory won't be used.`` (a UserWarning from the data loader): the configs pin memory for GPUs.
* transformers 4.57.3 to 4.57.x, loading a tokenizer from a local folder whose ``config.json`` was written by such
  a version (every folder this project writes, converted models included): ``The tokenizer you are loading from
  '...' with an incorrect regex pattern: ... This will lead to incorrect tokenization. You should set the
  `fix_mistral_regex=True` flag`` (``tokenization_utils_base.py``). The check meant for Mistral's tokenizers skips
  other model types only for folders written by 4.57.2 or earlier, so it fires for Qwen2.5's too, and the flag it
  asks for would put Mistral's pre-tokenizer regex on a tokenizer that does not have its bug. It is dropped only
  when the folder's ``config.json`` names model types (its own and its ``llm_config`` / ``text_config``'s) of which
  none is a Mistral one (:class:`NotMistral`); a Mistral folder, or one whose types cannot be read, still shows it.
* MMEngine, with gradient accumulation: ``Detected call of `scheduler.step()` before `optimizer.step()```: its
  schedulers step every iteration and the optimizer every ``accumulative_counts``-th, so the first iterations
  step the schedule first, by design.

MMEngine's start-up blocks and its notes about its own internals during training are left to the run's log
file or dropped by ``xtuner_plugins.engine.console``.

The filters sit on the loggers themselves, so they hold whenever the message is logged after this package was
imported: ``tools/*.py`` and the ``xtuner-plugins-*`` console scripts import it first. ``xtuner train CONFIG``
imports XTuner (and with it bitsandbytes and DeepSpeed) before it reads the config, which imports this package;
for it, :func:`write_startup_file` (a step of ``make setup``) writes ``xtuner_plugins_quiet.pth`` into
the environment's site-packages, whose one line imports this package when Python starts, when it is installed.
Importing it costs only ``logging``, ``re`` and
``warnings``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sysconfig
import warnings
from typing import Dict, Iterator, Tuple

#: logger name -> starts of the messages of that logger that are dropped
SILENCED_LOGS: Dict[str, Tuple[str, ...]] = {
    'bitsandbytes.backends.cpu.ops': (
        "Failed to load CPU gemm_4bit_forward from kernels-community: No module named 'kernels'",),
    'DeepSpeed': ('Setting accelerator to CPU. If you have GPU or other accelerator, we were unable to detect it.',),
    # liger_kernel=True: Liger tries its backends for other hardware (NVIDIA's CuTe DSL, Ascend NPUs) at the first
    # RoPE call, each missing one a warning; its Triton kernels, the ones used, are not among them
    'liger_kernel.backends.registry': ("Backend impl 'liger_kernel.ops.backends._cutedsl.",
                                       "Backend impl 'liger_kernel.ops.backends._ascend."),
}

#: (the start of a warning's message, its category, the module that warns) of the ``warnings.warn`` lines dropped
SILENCED_WARNINGS: Tuple[Tuple[str, type, str], ...] = (
    # training on a CPU: the configs pin memory for GPUs; there is no accelerator to pin for, nothing to do
    ("'pin_memory' argument is set as true but no accelerator is found", UserWarning,
     'torch.utils.data.dataloader'),
    # gradient accumulation (`accumulative_counts` > 1): the schedule moves every iteration, the optimizer steps
    # every A-th, so the first iterations step the schedule before any optimizer step, by design
    ('Detected call of `scheduler.step()` before `optimizer.step()`', UserWarning,
     'mmengine.optim.scheduler.param_scheduler'),
)


class DropMessages(logging.Filter):
    """Drops the records whose formatted message starts with one of ``starts``; lets every other through."""

    def __init__(self, starts: Tuple[str, ...]):
        super().__init__()
        self.starts = tuple(starts)

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a malformed record is logging's to report, not ours to drop
            return True
        return not message.startswith(self.starts)


#: the model types transformers' check is meant for (``tokenization_utils_base.py``'s list)
MISTRAL_TYPES = ('mistral', 'mistral3', 'voxtral', 'ministral', 'pixtral')
MISTRAL_REGEX = re.compile(r"The tokenizer you are loading from '(.*)' with an incorrect regex pattern")


class NotMistral(logging.Filter):
    """Drops transformers' Mistral-regex warning for a local folder whose ``config.json`` names model types, none
    of them a Mistral one (module docstring); lets every other record through."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            found = MISTRAL_REGEX.match(record.getMessage())
            if not found:
                return True
            import json
            with open(os.path.join(found.group(1), 'config.json'), encoding='utf-8') as f:
                config = json.load(f)
            types = [c.get('model_type') for c in (config, config.get('llm_config'), config.get('text_config'))
                     if isinstance(c, dict) and c.get('model_type')]
        except Exception:  # unreadable: the warning stays
            return True
        return not types or any(str(t) in MISTRAL_TYPES for t in types)


def install() -> None:
    """Add the filters (once per logger; importing twice adds nothing)."""
    for name, starts in SILENCED_LOGS.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, DropMessages) for f in logger.filters):
            logger.addFilter(DropMessages(starts))
    logger = logging.getLogger('transformers.tokenization_utils_base')
    if not any(isinstance(f, NotMistral) for f in logger.filters):
        logger.addFilter(NotMistral())
    for message, category, module in SILENCED_WARNINGS:
        warnings.filterwarnings('ignore', message=re.escape(message), category=category,
                                module=re.escape(module) + '$')


#: the file Python's ``site`` reads at start-up, and its one line: this package imported when it is installed
STARTUP_FILE = 'xtuner_plugins_quiet.pth'
STARTUP_LINE = ("import importlib.util as _u; _u.find_spec('xtuner_plugins') is not None "
                "and __import__('xtuner_plugins')\n")


def write_startup_file(site_dir: str = '') -> str:
    """Write :data:`STARTUP_FILE` into ``site_dir`` (default: this environment's site-packages); its path."""
    path = os.path.join(site_dir or sysconfig.get_paths()['purelib'], STARTUP_FILE)
    with open(path + '.tmp', 'w', encoding='utf-8') as f:  # replaced whole: a Python starting meanwhile reads it all
        f.write(STARTUP_LINE)
    os.replace(path + '.tmp', path)
    return path


@contextlib.contextmanager
def quiet_mmengine_info() -> Iterator[None]:
    """MMEngine's current logger at WARNING for the block: its INFO lines are for a training run's log, not for
    the demo's terminal, nor a model built on the meta device only to be planned."""
    from mmengine.logging import MMLogger
    logger = MMLogger.get_current_instance()
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)
