"""The demo's console: a tool run in the demo's process prints under its step, indented, into the terminal and
demo.log, without MMEngine's INFO lines (those belong to a training run's log)."""

import logging

from mmengine.logging import MMLogger, print_log

from xtuner_plugins.demo.console import Console


def test_a_tool_run_under_a_step_is_indented_into_the_log_and_mmengine_info_is_left_out(tmp_path, capsys):
    logger = MMLogger.get_current_instance()
    before = logger.level
    records = []
    handler = logging.Handler(logging.DEBUG)
    handler.emit = records.append
    logger.addHandler(handler)
    console = Console(str(tmp_path / 'demo.log'))
    try:
        with console.under_step():
            print('[1/4] building the model')
            print_log('Parameters: 10 total, 2 trainable', logger='current')
            print_log('a checkpoint key is missing', logger='current', level=logging.WARNING)
        print_log('after the step', logger='current')
    finally:
        logger.removeHandler(handler)
    assert [(r.levelno, r.getMessage()) for r in records] == [
        (logging.WARNING, 'a checkpoint key is missing'), (logging.INFO, 'after the step')]
    assert logger.level == before
    assert '    [1/4] building the model\n' in capsys.readouterr().out
    assert (tmp_path / 'demo.log').read_text() == '    [1/4] building the model\n'
