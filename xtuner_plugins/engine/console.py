"""A training console without MMEngine's hook-order dump and notes about its own internals; the log file keeps
the dump.

Applied when ``xtuner_plugins.engine`` is imported (configs import it), to every runner's logger as it is built
(``Runner.build_logger``; ``FlexibleRunner``'s comes from its strategy's, ``BaseStrategy.build_logger``):

* **Console only** (the terminal, and ``train_output.log`` of the launcher): MMEngine's list of the hooks in the
  order they run (~90 lines) is left to the run's log file, ``WORK_DIR/<timestamp>/<timestamp>.log``; one line
  says where it is. The environment block and the config dump stay on the console for now: tests read them
  there (``GPU number: 2`` in ``tests/test_launch.py``, ``loss_reduction='square'`` in
  ``tests/configs/test_finetune_full.py``); once those read the log file (or the config xtuner writes into the
  work folder), adding their starts (``'Config:\\n'``, ``'\\n' + '-' * 60 + '\\nSystem environment:'``) to
  :data:`LOG_FILE_ONLY` takes them off the console too. The iteration lines (``Iter(train) [k/N] ... loss:
  ...``, which ``xtuner_plugins.launch`` reads from the console), warnings and errors are untouched.
* **Console and log file**: MMEngine's own deprecation notes about its internals (``"FileClient" will be
  deprecated``, ``"HardDiskBackend" is the alias of "LocalBackend"``: its checkpoint hook uses them) and its
  note that this project's data sets carry no ``metainfo`` (nothing here reads a visualizer's
  ``dataset_meta``) are dropped, each by its exact text.
"""

from __future__ import annotations

import functools
import logging
from typing import List

from xtuner_plugins.quiet import DropMessages

_PATCH_MARK = '_xtuner_plugins_console_patch'

#: starts of the messages kept out of the console (the log file has them)
LOG_FILE_ONLY = ('Hooks will be executed in the following order',)
#: starts of the messages dropped (console and log file)
DROPPED = ('"FileClient" will be deprecated in future.', '"HardDiskBackend" is the alias of "LocalBackend"',
           *(f'Dataset {name} has no metainfo.' for name in
             ('InternVLDataset', 'InternVLPreferenceDataset', 'PackedInternVLDataset')))


def console_handlers(logger: logging.Logger) -> List[logging.Handler]:
    """The handlers of ``logger`` that write to a terminal stream, not to a file."""
    return [h for h in logger.handlers
            if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)]


def log_files(logger: logging.Logger) -> List[str]:
    return [h.baseFilename for h in logger.handlers if isinstance(h, logging.FileHandler)]


def quiet_console(logger: logging.Logger) -> logging.Logger:
    """Add the filters to a runner's ``logger`` (once); say where the start-up blocks are."""
    if any(isinstance(f, DropMessages) for f in logger.filters):
        return logger
    logger.addFilter(DropMessages(DROPPED))
    files = log_files(logger)
    if files:  # without a log file the console is the only copy: keep it whole
        for handler in console_handlers(logger):
            handler.addFilter(DropMessages(LOG_FILE_ONLY))
        logger.info(f'the order of the hooks is in {files[0]}, not on the console')
    return logger


def _patch_build_logger() -> bool:
    from mmengine._strategy import BaseStrategy  # FlexibleRunner's logger comes from its strategy
    from mmengine.runner import Runner
    if getattr(Runner.build_logger, _PATCH_MARK, False):
        return False
    for builder in (Runner, BaseStrategy):
        original = builder.build_logger

        @functools.wraps(original)
        def build_logger(self, *args, _original=original, **kwargs):
            return quiet_console(_original(self, *args, **kwargs))

        setattr(build_logger, _PATCH_MARK, True)
        builder.build_logger = build_logger
    return True


_patch_build_logger()
