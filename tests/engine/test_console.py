"""The training console: MMEngine's start-up dumps and its iteration lines only in the run's log file, its notes
about its own internals nowhere; the progress lines, warnings and errors on both."""

import logging

from xtuner_plugins.engine.console import keep_off_console, quiet_console  # noqa: I001 (first: its filters before MMEngine's imports)
from mmengine.logging import MMLogger  # noqa: E402
from xtuner_plugins.engine.progress import REPLACED  # noqa: E402


def test_the_console_shows_the_run_and_the_log_file_keeps_everything(tmp_path, capsys):
    from mmengine._strategy import BaseStrategy
    from mmengine.runner import Runner
    assert getattr(Runner.build_logger, '_xtuner_plugins_console_patch', False)
    assert getattr(BaseStrategy.build_logger, '_xtuner_plugins_console_patch', False)
    log_file = tmp_path / 'run.log'
    logger = quiet_console(MMLogger.get_instance('console-test', log_file=str(log_file)))
    assert quiet_console(logger) is logger and len(logger.filters) == 1  # once
    assert keep_off_console(logger, REPLACED)  # what ProgressHook does when training starts
    logger.info('\n' + '-' * 60 + '\nSystem environment:\n    sys.platform: linux\n' + '-' * 60)
    logger.info('Config:\nlr = 0.0002\nmodel = dict(\n    type=X)')
    logger.info('Hooks will be executed in the following order:\nbefore_run:\n(VERY_HIGH   ) RuntimeInfoHook')
    logger.warning('"FileClient" will be deprecated in future. Please use io functions in https://...')
    logger.warning('"HardDiskBackend" is the alias of "LocalBackend" and the former will be deprecated in future.')
    logger.warning('Dataset InternVLDataset has no metainfo. ``dataset_meta`` in visualizer will be None.')
    logger.info('Iter(train) [1/8]  lr: 1.0000e-07  eta: 0:00:00  time: 0.0205  loss: 6.2307')
    logger.info('Exp name: pretrain_mlp_20261124_003446')
    logger.info('Checkpoints will be saved to /tmp/work.')
    logger.info('paramwise_options -- mlp1.0.weight:lr=4e-05')
    logger.info('iter 1/8  loss 6.231  lr 1.00e-07  eta 0:00:00')
    logger.warning('a warning of the run')
    logger.warning('Dataset MyOwnDataset has no metainfo. ``dataset_meta`` in visualizer will be None.')
    logger.warning('"FileClient" is what a user config names')  # another text: shown
    for handler in logger.handlers:
        handler.flush()
    console, saved = capsys.readouterr().out, log_file.read_text()
    for text in ('Hooks will be executed', 'RuntimeInfoHook', 'System environment:', 'sys.platform', 'Config:',
                 'lr = 0.0002', 'Iter(train) [1/8]', 'loss: 6.2307', 'Exp name:', 'Checkpoints will be saved',
                 'paramwise_options'):
        assert text not in console and text in saved, text
    for text in ('will be deprecated', 'is the alias of', 'InternVLDataset has no metainfo'):
        assert text not in console and text not in saved, text
    for text in ('iter 1/8  loss 6.231', 'a warning of the run', 'MyOwnDataset has no metainfo',
                 '"FileClient" is what'):
        assert text in console and text in saved, text
    assert len(console.splitlines()) == 4, console


def test_without_a_log_file_the_console_keeps_the_hook_order(capsys):
    logger = quiet_console(MMLogger.get_instance('console-test-no-file'))
    logger.info('Hooks will be executed in the following order:\nbefore_run:')
    assert 'before_run:' in capsys.readouterr().out
    assert not any(isinstance(h, logging.FileHandler) for h in logger.handlers)
