"""A training console without MMEngine's start-up dumps and iteration lines; the run's log file keeps them.

Applied when ``xtuner_plugins.engine`` is imported (configs import it), to every runner's logger as it is built
(``Runner.build_logger``; ``FlexibleRunner``'s comes from its strategy's, ``BaseStrategy.build_logger``):

* **Console only** (the terminal, and ``train_output.log`` of the launcher): MMEngine's environment block, the
  config dump, the list of the hooks in the order they run, its notes on the sampler, SyncBN and the checkpoint
  folder, and its optimizer's line per trainable tensor (``paramwise_options -- NAME:lr=...``) are left to the run's log file, ``WORK_DIR/<timestamp>/<timestamp>.log`` (:data:`LOG_FILE_ONLY`).
  With ``engine/progress.py``'s ``ProgressHook`` (the stage configs' ``default_hooks.progress``) MMEngine's
  iteration lines (``Iter(train) [k/N]  lr: ...`` with every scalar) and ``Exp name:`` lines go there too
  (:func:`keep_off_console`), replaced on the console by the hook's lines; a config without the hook keeps them.
  Warnings and errors are untouched. Without a log file (a logger built without one) nothing is held back.
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
LOG_FILE_ONLY = ('Hooks will be executed in the following order', '\n' + '-' * 60 + '\nSystem environment:',
                 'Config:\n', 'Distributed training is not used, all SyncBatchNorm',
                 'LengthGroupedSampler is used.', 'LengthGroupedSampler construction is complete',
                 'Checkpoints will be saved to ', 'paramwise_options -- ')
#: starts of the messages dropped (console and log file)
DROPPED = ('"FileClient" will be deprecated in future.', '"HardDiskBackend" is the alias of "LocalBackend"',
           *(f'Dataset {name} has no metainfo.' for name in
             ('InternVLDataset', 'InternVLPreferenceDataset', 'PackedInternVLDataset', 'OnlinePackedDataset',
              'ShardDataset')))


def console_handlers(logger: logging.Logger) -> List[logging.Handler]:
    """The handlers of ``logger`` that write to a terminal stream, not to a file."""
    return [h for h in logger.handlers
            if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)]


def log_files(logger: logging.Logger) -> List[str]:
    return [h.baseFilename for h in logger.handlers if isinstance(h, logging.FileHandler)]


def quiet_console(logger: logging.Logger) -> logging.Logger:
    """Add the filters to a runner's ``logger`` (once)."""
    if any(isinstance(f, DropMessages) for f in logger.filters):
        return logger
    logger.addFilter(DropMessages(DROPPED))
    keep_off_console(logger, LOG_FILE_ONLY)  # without a log file the console is the only copy: kept whole
    return logger


def keep_off_console(logger: logging.Logger, starts) -> bool:
    """Keep the messages starting with ``starts`` off ``logger``'s console handlers when it writes a log file
    (which keeps them); whether it does."""
    if not log_files(logger):
        return False
    for handler in console_handlers(logger):
        handler.addFilter(DropMessages(tuple(starts)))
    return True


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
