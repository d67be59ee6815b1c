"""The training console of ``engine/progress.py``: a start line, ``iter k/N  loss ...`` at the logger's interval
and at the last iteration, an end line; MMEngine's own iteration lines in the run's log file only (one toy run,
the same run without the hook for the other side)."""

import os
import re

import pytest

from tests.train_utils import REPO_ROOT, run_train

TOY_CONFIG = os.path.join(REPO_ROOT, 'tests', 'engine', 'toy_configs', 'toy_regression.py')
WITH_HOOK = {'default_hooks.progress.type': 'xtuner_plugins.engine.progress.ProgressHook',
             'default_hooks.logger.interval': 4}


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp('progress')
    return (run_train(TOY_CONFIG, str(root / 'hook'), cfg_options=WITH_HOOK),
            run_train(TOY_CONFIG, str(root / 'plain'), cfg_options={'default_hooks.logger.interval': 4}))


def _messages(log):
    return [line.split(' - INFO - ', 1)[1] for line in log.splitlines() if ' - INFO - ' in line]


def test_the_console_has_one_line_per_interval_and_the_last(runs):
    run, _ = runs
    assert run.ok, run.summary()
    console = _messages(run.log)
    progress = [m for m in console if m.startswith('iter ')]
    assert [m.split()[1] for m in progress] == ['4/6', '6/6'], progress  # 6 is the last, not a multiple of 4
    # window_size=1 (toy runtime): the line's numbers are the iteration's, as MMEngine logs them (at 4, and at 2
    # where its two-batch data loader's "epoch" ends; not at 6)
    scalars = {int(r['step']): r for r in run.scalars if 'loss' in r}
    assert 4 in scalars and 6 not in scalars, scalars
    assert progress[0].startswith(f'iter 4/6  loss {scalars[4]["loss"]:.4g}  lr {scalars[4]["lr"]:.2e}  '), progress
    for line in progress:
        assert re.fullmatch(r'iter \d/6  loss [0-9.e+-]+  lr [0-9.e+-]+  [0-9.k]+ tokens/s  eta 0:00:0\d  '
                            r'mem [0-9.]+ GiB', line), line
    start = [m for m in console if m.startswith('training toy_regression: ')]
    assert start == [f'training toy_regression: 6 iterations (3 epochs of 2); 4 samples per iteration (batch 4 x 1 process); '
                     f'checkpoint every 6 and at the end -> {run.work_dir}; full log (config, environment, every '
                     f'iteration) {start[0].rsplit(" ", 1)[1]}'], console
    assert start[0].endswith('.log') and os.path.dirname(os.path.dirname(start[0].rsplit(' ', 1)[1])) == run.work_dir
    done = [m for m in console if m.startswith('done: ')]
    last_loss = progress[1].split()[3]
    assert len(done) == 1 and re.fullmatch(
        rf'done: 6 iterations in 0:00:\d\d, loss {last_loss} \(first logged {scalars[4]["loss"]:.4g}\); '
        rf'last checkpoint {re.escape(run.final_checkpoint)}', done[0]), done  # outside the cwd: whole
    assert not any('Iter(train)' in line for line in run.log.splitlines()), 'MMEngine iteration line on the console'
    assert [line.split('Iter(train) ')[1][:5] for line in run.full_log().splitlines() if 'Iter(train)' in line] \
        == [f'[{k}/6]' for k in sorted(scalars)]  # the log file keeps MMEngine's lines
    assert max(run.losses) == 4 and (run.max_iters, run.last_iter) == (6, 6)  # the launcher reads the console


def test_without_the_hook_the_console_keeps_mmengines_lines(runs):
    _, plain = runs
    assert plain.ok, plain.summary()
    assert sum('Iter(train)' in line for line in plain.log.splitlines()) >= 1
    assert not any(m.startswith('iter ') for m in _messages(plain.log))


def _loader(samples, batch, total):
    from types import SimpleNamespace
    inner = SimpleNamespace(total_size=total)
    return SimpleNamespace(train_dataloader=SimpleNamespace(dataset=list(range(samples)), batch_size=batch,
                                                            sampler=SimpleNamespace(sampler=inner)))


def test_a_batch_that_makes_the_sampler_repeat_much_of_the_data_is_said():
    """Before, a batch of 64 on 16 samples trained 1 iteration of each sample 4 times, and 17 samples at 16 an
    iteration trained 32 a epoch, without a word (the sampler pads an epoch to whole iterations)."""
    from xtuner_plugins.engine.progress import repeats_note
    assert repeats_note(_loader(16, 64, 64)) == (
        'the data set has 16 samples and an iteration takes 64 (batch 64 x 1 process): each epoch repeats 48 of them '
        'to fill whole iterations (64 samples in 1 iteration, 4x the data); choose a batch size that fits the data '
        '(train_dataloader.batch_size and train_dataloader.sampler.per_device_batch_size), or add data')
    assert 'repeats 15 of them' in repeats_note(_loader(17, 16, 32))
    assert repeats_note(_loader(16, 2, 16)) is None and repeats_note(_loader(1000, 16, 1008)) is None


@pytest.mark.parametrize('step,eta', [(2.0, 'eta 6 days, 22:40:00'), (1.0, 'eta over 30 years'),
                                      (float('nan'), 'eta ?')])
def test_an_eta_past_timedeltas_range_is_said_not_a_crash(step, eta):
    """max_iters=10**14 ended the run at its first progress line: OverflowError: days=1044560720 (timedelta's
    range)."""
    from types import SimpleNamespace

    from mmengine.logging import MessageHub

    from xtuner_plugins.engine.progress import progress_line
    hub = MessageHub.get_instance(f'eta-{step}')
    hub.update_scalar('train/time', step)
    total = 300_001 if step == 2.0 else 10 ** 14
    line = progress_line(SimpleNamespace(iter=0, max_iters=total, message_hub=hub))
    assert line.endswith(eta), line


def test_a_routers_balance_loss_is_shown_beside_the_loss():
    """A mixture-of-experts LLM's router_aux_loss (models/moe.py): logged by MMEngine, and shown in the line."""
    from types import SimpleNamespace

    from mmengine.logging import MessageHub

    from xtuner_plugins.engine.progress import progress_line
    hub = MessageHub.get_instance('router-aux')
    hub.update_scalar('train/loss', 2.5)
    hub.update_scalar('train/router_aux_loss', 0.00213)
    line = progress_line(SimpleNamespace(iter=0, max_iters=10, message_hub=hub))
    assert line.startswith('iter 1/10  loss 2.5  router_aux_loss 0.00213'), line


def test_the_rate_most_groups_train_at_is_shown_first():
    """A LoRA stage (the projector at its own lr_mult): the line showed MMEngine's scalar, the first group's, the
    projector's 1e-3 where the config's lr was 2e-4 (a new user's journey)."""
    from types import SimpleNamespace

    from mmengine.logging import MessageHub

    from xtuner_plugins.engine.progress import progress_line
    hub = MessageHub.get_instance('two-rates')
    hub.update_scalar('train/lr', 1e-3)
    optim = SimpleNamespace(get_lr=lambda: {'lr': [1e-3, 2e-4, 2e-4, 2e-4, 1e-3]})
    line = progress_line(SimpleNamespace(iter=0, max_iters=10, message_hub=hub, optim_wrapper=optim))
    assert line == 'iter 1/10  lr 2.00e-04 (1.00e-03 for 2 groups)', line
    line = progress_line(SimpleNamespace(iter=0, max_iters=10, message_hub=hub))   # no optimizer to ask
    assert line == 'iter 1/10  lr 1.00e-03', line
