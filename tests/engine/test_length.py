"""Training length in the user's words (engine/length.py): the loop, the learning-rate schedule and the
checkpoint interval follow max_epochs / max_iters / save_every. The schedule is built from a real stage config
by MMEngine's scheduler registry, as the runner builds it, and stepped once per iteration."""

import os
import re
import shutil

import pytest
import torch
from mmengine.config import Config
from mmengine.registry import PARAM_SCHEDULERS

from xtuner_plugins.engine.length import resolve_training_length

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STAGE = os.path.join(ROOT, 'configs', 'finetune_lora.py')
TOY_ITERS = os.path.join(ROOT, 'tests', 'engine', 'toy_configs', 'toy_regression.py')


def resolved(options, config=STAGE):
    cfg = Config.fromfile(config)
    cfg.merge_from_dict(options)
    resolve_training_length(cfg._cfg_dict, options)
    return cfg


def lrs(options, epoch_length=100):
    """The learning rate of each iteration of the run (base lr 1), as MMEngine's runner schedules it."""
    cfg = resolved(options)
    loop = cfg.train_cfg
    iterations = loop.get('max_iters') or int(loop['max_epochs'] * epoch_length)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    schedulers = [PARAM_SCHEDULERS.build(dict(s), default_args=dict(optimizer=opt, epoch_length=epoch_length))
                  for s in cfg.param_scheduler]
    out = []
    for _ in range(iterations):
        out.append(opt.param_groups[0]['lr'])
        opt.step()
        for scheduler in schedulers:
            scheduler.step()
    return out


def peak(values):
    """How many iterations the warm-up takes to reach the full learning rate."""
    return next(i for i, v in enumerate(values) if v > 0.99) + 1


@pytest.mark.parametrize('options', [{'max_epochs': 3}, {'train_cfg.max_epochs': 3}])
def test_max_epochs_stretches_warm_up_and_decay_over_the_run(options):
    one, three = lrs({}), lrs(options)
    assert len(one) == 100 and len(three) == 300
    assert peak(one) == 3 and peak(three) == 9  # warm-up: 3 % of the run
    assert three[150] == pytest.approx(0.5, abs=0.05)  # half-way through the decay, not at its end
    assert three[-1] < 1e-3 and three[9:] == sorted(three[9:], reverse=True)  # down to eta_min at the end


def test_max_iters_schedules_by_iterations():
    values = lrs({'max_iters': 200})
    assert len(values) == 200 and values == lrs({'max_iters': 200}, epoch_length=7)  # whatever an epoch is
    assert values[0] == pytest.approx(1e-5) and peak(values) == 6  # 3 % of 200 iterations
    assert values[100] == pytest.approx(0.5, abs=0.05) and values[-1] < 1e-3
    cfg = resolved({'max_iters': 200})
    assert dict(cfg.train_cfg, type=None) == {'type': None, 'max_iters': 200}  # no max_epochs left for XTuner
    assert [(s['begin'], s['end'], s['by_epoch']) for s in cfg.param_scheduler] == [(0, 6, False), (6, 200, False)]
    assert peak(lrs({'max_iters': 20})) == 2  # a short run still warms up over two iterations


def test_max_iters_in_a_config_wins_over_the_bases_max_epochs(tmp_path):
    shutil.copytree(os.path.join(ROOT, 'configs'), tmp_path / 'configs')  # a config of one's own, next to them
    derived = tmp_path / 'configs' / 'mine.py'
    derived.write_text('from mmengine.config import read_base\nwith read_base():\n    from .finetune_lora import *\n'
                       'max_iters = 120\nsave_every = 40\n')
    cfg = resolved({}, str(derived))
    assert cfg.train_cfg.max_iters == 120 and 'max_epochs' not in cfg.train_cfg
    assert cfg.param_scheduler[1]['end'] == 120 and cfg.default_hooks.checkpoint.interval == 40
    cfg = resolved({'max_epochs': 2}, str(derived))  # the command line's one wins over the file's
    assert cfg.train_cfg.max_epochs == 2 and 'max_iters' not in cfg.train_cfg


def test_save_every_sets_the_checkpoint_interval():
    assert resolved({}).default_hooks.checkpoint.interval == 500
    hook = resolved({'save_every': 50}).default_hooks.checkpoint
    assert hook.interval == 50 and hook.by_epoch is False
    assert resolved({'default_hooks.checkpoint.interval': 10}).default_hooks.checkpoint.interval == 10
    with pytest.raises(ValueError, match=r'save_every=50 and default_hooks\.checkpoint\.interval=10: give '
                                         r'save_every only'):
        resolved({'save_every': 50, 'default_hooks.checkpoint.interval': 10})


def test_lengths_that_contradict_each_other_are_refused():
    with pytest.raises(ValueError, match=r'max_epochs=3 and max_iters=200: give one of them'):
        resolved({'max_epochs': 3, 'max_iters': 200})
    with pytest.raises(ValueError, match=r'max_epochs=2 and train_cfg\.max_epochs=3: give max_epochs only'):
        resolved({'max_epochs': 2, 'train_cfg.max_epochs': 3})
    with pytest.raises(ValueError, match=r"max_epochs=3: train_cfg's IterBasedTrainLoop takes max_iters, not "
                                         r"max_epochs: set max_iters instead"):
        resolved({'max_epochs': 3}, TOY_ITERS)
    assert resolved({'max_iters': 10, 'save_every': 5}, TOY_ITERS).train_cfg.max_iters == 10


@pytest.mark.parametrize('key, value, says', [
    ('max_iters', -5, 'a positive whole number, got -5 (int)'), ('max_iters', 0, 'a positive whole number, got 0'),
    ('max_iters', 3.5, 'a positive whole number, got 3.5 (float)'),
    ('max_epochs', 0, 'a positive number of epochs, got 0 (int)'),
    ('max_epochs', -1, 'a positive number of epochs, got -1 (int)')])
def test_the_loops_own_length_is_checked_as_the_top_level_one(key, value, says):
    """``train_cfg.max_iters=-5`` (docs/training.md's other way to set the length) ran 0 iterations, exit 0;
    ``train_cfg.max_epochs=0`` and ``max_iters=3.5`` ended in MMEngine's tracebacks (an adversarial sweep)."""
    with pytest.raises(ValueError, match=rf'^train_cfg\.{key}: expected {re.escape(says)}'):
        resolved({f'train_cfg.{key}': value})


@pytest.mark.parametrize('key, value, says', [
    ('param_scheduler.1.eta_min', float('nan'), 'param_scheduler.1.eta_min: expected a finite number >= 0, got nan'),
    ('param_scheduler.1.eta_min', -0.1, 'param_scheduler.1.eta_min: expected a finite number >= 0, got -0.1'),
    ('param_scheduler.0.start_factor', float('inf'),
     'param_scheduler.0.start_factor: expected a finite number, got inf')])
def test_a_schedule_number_that_is_not_finite_is_refused(key, value, says):
    """``eta_min=nan`` trained on; the run ended in a non-finite loss, blamed on the batch's samples."""
    with pytest.raises(ValueError, match=f'^{re.escape(says)}$'):
        resolved({key: value})


def test_resolving_twice_changes_nothing():
    cfg = resolved({'max_epochs': 3})
    before = cfg.to_dict()
    resolve_training_length(cfg._cfg_dict)
    assert cfg.to_dict() == before


@pytest.mark.parametrize('key, value, says', [
    ('param_scheduler.0.end', 2.0,
     "param_scheduler.0.end: expected a fraction of the run from 0 to 1 (schedule_unit='run'), got 2.0"),
    ('param_scheduler.1.begin', -0.5,
     "param_scheduler.1.begin: expected a fraction of the run from 0 to 1 (schedule_unit='run'), got -0.5"),
    ('param_scheduler.1.begin', 1.0,
     "param_scheduler.1: begin 1.0 is not before end 1 (fractions of the run, schedule_unit='run')"),
    ('param_scheduler.0.start_factor', 0,
     'param_scheduler.0.start_factor: expected a number > 0 and <= 1 (the share of the learning rate the warm-up '
     'starts at), got 0'),
    ('param_scheduler.0.start_factor', 1.5,
     'param_scheduler.0.start_factor: expected a number > 0 and <= 1 (the share of the learning rate the warm-up '
     'starts at), got 1.5')])
def test_a_schedule_out_of_the_run_or_a_warm_up_from_zero_is_refused(key, value, says):
    """``param_scheduler.0.end=2.0`` made the warm-up last twice the run: the learning rate never reached its value
    (1.33e-04 of 2e-04 at the last of 2 iterations), without a word; ``start_factor=0`` stopped the run in a
    ZeroDivisionError traceback once the model had loaded."""
    with pytest.raises(ValueError, match=f'^{re.escape(says)}$'):
        resolved({key: value})
    resolved({'param_scheduler.0.end': 1.0, 'param_scheduler.1.begin': 0.5, 'param_scheduler.0.start_factor': 1})
