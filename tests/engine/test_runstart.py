"""--cfg-options checked and the training length filled in when the runner is built, before the model is
(engine/runstart.py): through Runner.from_cfg (tools/train.py, xtuner train --deepspeed), and from inside
Runner.__init__ (plain xtuner train, which imports this package only there); then tools/train.py for real."""

import copy
import functools
import os
import time

import pytest
import torch
from mmengine.config import Config
from mmengine.runner import Runner

import xtuner_plugins.engine  # noqa: F401  (the patches)
from tests.engine.toy import ToyRegressionModel
from tests.train_utils import REPO_ROOT, run_train

TOY = os.path.join(REPO_ROOT, 'tests', 'engine', 'toy_configs', 'toy_schedule.py')
TRAIN_TOOL = os.path.join(REPO_ROOT, 'tools', 'train.py')


def run_cfg(tmp_path, **options):
    """The config as ``xtuner train`` hands it to the runner: the file read, the options merged."""
    cfg = Config.fromfile(TOY)
    cfg.merge_from_dict(dict(options, work_dir=str(tmp_path / 'work')))
    return cfg


def build(cfg, through_init: bool):
    """``Runner.from_cfg``; ``through_init``: MMEngine's own from_cfg, as when the patches arrive during
    ``Runner.__init__`` (plain ``xtuner train``)."""
    if through_init:
        return Runner.from_cfg.__func__.__wrapped__(Runner, cfg)
    return Runner.from_cfg(cfg)


@pytest.fixture
def no_model(monkeypatch):
    @functools.wraps(ToyRegressionModel.__init__)  # the same signature, which the check reads
    def refuse(self, *args, **kwargs):
        raise AssertionError('the model was built before the options were checked')
    monkeypatch.setattr(ToyRegressionModel, '__init__', refuse)


@pytest.mark.parametrize('through_init', [False, True])
@pytest.mark.parametrize('key, message', [
    ('model.hiden', "model.hiden: ToyRegressionModel has no setting 'hiden'; closest: model.hidden"),
    ('default_hooks.checkpoint.intervall', "default_hooks.checkpoint.intervall: CheckpointHook has no setting "
                                           "'intervall'; closest: default_hooks.checkpoint.interval"),
])
def test_an_unknown_key_stops_the_runner_before_the_model_is_built(tmp_path, no_model, through_init, key, message):
    with pytest.raises(ValueError) as info:
        build(run_cfg(tmp_path, **{key: 10}), through_init)
    assert str(info.value) == f'--cfg-options: {message}'


@pytest.mark.parametrize('through_init', [False, True])
def test_the_runner_gets_the_length_and_checkpoint_interval(tmp_path, through_init):
    runner = build(run_cfg(tmp_path, max_iters=40, save_every=10), through_init)
    assert runner._train_loop['max_iters'] == 40 and 'max_epochs' not in runner._train_loop
    assert [(s['begin'], s['end'], s['by_epoch']) for s in runner.param_schedulers] == [(0, 2, False), (2, 40, False)]
    (hook,) = [h for h in runner.hooks if type(h).__name__ == 'CheckpointHook']
    assert hook.interval == 10
    assert runner.cfg.train_cfg.max_iters == 40  # the config it logs and saves says so too


def test_our_train_command_refuses_bad_keys_in_one_line_before_anything_loads(tmp_path):
    start = time.perf_counter()
    out = run_train(TOY, str(tmp_path / 'work'), script=TRAIN_TOOL, require_checkpoint=False, timeout=120,
                    cfg_options={'default_hooks.checkpoint.intervall': 10, 'model.hiden': 3})
    lines = [line for line in out.log.splitlines() if line.strip()]
    assert out.returncode == 2 and out.max_iters is None and not out.checkpoints, out.summary()
    assert lines[-1] == ("train: FAILED before loading anything: --cfg-options: default_hooks.checkpoint.intervall: "
                         "CheckpointHook has no setting 'intervall'; closest: default_hooks.checkpoint.interval; "
                         "model.hiden: ToyRegressionModel has no setting 'hiden'; closest: model.hidden (fix the keys "
                         "named and run again)"), out.summary()
    assert 'Traceback' not in out.log and time.perf_counter() - start < 60, out.summary()


def test_a_short_run_follows_max_epochs_and_save_every(tmp_path):
    # 8 samples, batch 4: two iterations an epoch, 30 epochs; the stage configs' schedule and checkpoint setting
    out = run_train(TOY, str(tmp_path / 'work'), script=TRAIN_TOOL, timeout=240,
                    cfg_options={'max_epochs': 30, 'save_every': 20})
    assert out.ok, out.summary()
    assert [os.path.basename(p) for p in out.checkpoints] == ['iter_20.pth', 'iter_40.pth', 'iter_60.pth']
    lr = out.scalar_series('lr')  # the learning rate of each iteration, 1-based
    assert sorted(lr) == list(range(1, 61)), lr
    base = 0.05
    assert lr[1] < base * 1e-3 and lr[2] == pytest.approx(base, rel=0.02)  # warm-up: at least two iterations
    assert lr[30] == pytest.approx(base / 2, rel=0.15)  # half-way through the decay at half the run
    assert lr[60] < base * 0.01  # near eta_min (0) at the last iteration


def test_a_failed_run_ends_naming_its_log_and_what_to_do(tmp_path):
    from xtuner_plugins.cli.train_closing import next_steps
    work = tmp_path / 'work'
    assert next_steps(str(work), time.time()).startswith(f'no run log was written (the run stopped before it '
                                                         f'started; its log would be under {work}/<timestamp>/)')
    (work / '20260101_000000').mkdir(parents=True)
    (work / '20260101_000000' / '20260101_000000.log').write_text('...')
    (work / 'iter_20.pth').write_bytes(b'x')
    (work / 'last_checkpoint').write_text(str(work / 'iter_20.pth'))   # (resume=True follows it)
    assert next_steps(str(work), time.time()) == (
        f"the run's log: {work}/20260101_000000/20260101_000000.log; the traceback is above: fix its cause and run "
        f"again; --cfg-options resume=True continues from {work}/iter_20.pth")


class Killed(Exception):
    """What a SIGKILL right after the first checkpoint does to a run: it stops there."""


def stop_after_first_save():
    """A hook run after the checkpoint hook that stops the run once a checkpoint is written."""
    from mmengine.hooks import Hook

    class StopAfterFirstSave(Hook):
        priority = 'LOWEST'

        def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
            if os.path.exists(os.path.join(runner.work_dir, 'last_checkpoint')):
                raise Killed(runner.iter)

    return StopAfterFirstSave()


def trained_weights(tmp_path, name, stop=False, **options):
    cfg = run_cfg(tmp_path, max_iters=12, save_every=6, **{'optim_wrapper.accumulative_counts': 4}, **options)
    cfg.work_dir, cfg.experiment_name = str(tmp_path / name), f'accumulate-{name}-{options.get("resume", False)}'
    runner = Runner.from_cfg(cfg)
    if stop:
        runner.register_hook(stop_after_first_save())
    runner.train()
    return runner.iter, {k: v.clone() for k, v in runner.model.state_dict().items()}


def test_a_resume_under_gradient_accumulation_ends_with_the_weights_of_an_uninterrupted_run(tmp_path, caplog):
    """save_every=6 with accumulation 4: a checkpoint at iteration 6 would hold two iterations' gradients nowhere,
    and the resumed run would end elsewhere; checkpoints come every 8 iterations instead, at optimizer steps."""
    done, full = trained_weights(tmp_path, 'full')
    assert done == 12
    with pytest.raises(Killed) as killed:
        trained_weights(tmp_path, 'killed', stop=True)
    assert killed.value.args == (7,)  # in iteration 8 (0-based 7), after its save
    assert sorted(n for n in os.listdir(tmp_path / 'killed') if n.endswith('.pth')) == ['iter_8.pth']
    done, resumed = trained_weights(tmp_path, 'killed', resume=True)
    assert done == 12
    for key in full:
        assert torch.equal(resumed[key], full[key]), (key, (resumed[key] - full[key]).abs().max())


def test_a_checkpoint_interval_between_optimizer_steps_is_raised_to_the_next_one(tmp_path):
    from xtuner_plugins.engine.runstart import align_checkpoints
    cfg = dict(save_every=50, optim_wrapper=dict(accumulative_counts=4),
               default_hooks=dict(checkpoint=dict(interval=50, by_epoch=False)))
    assert align_checkpoints(cfg) == (
        'save_every=50 is not a multiple of the gradient accumulation (optim_wrapper.accumulative_counts=4): a '
        'checkpoint between optimizer steps lacks the gradients accumulated since the last step, and a resume from '
        'it would end with other weights than an uninterrupted run; checkpoints every 52 iterations instead '
        '(save_every=48 or 52: multiples of 4)')
    assert cfg['default_hooks']['checkpoint']['interval'] == 52 and cfg['save_every'] == 52
    assert align_checkpoints(cfg) is None  # a multiple: left as it is
    deepspeed = dict(strategy=dict(gradient_accumulation_steps=8), optim_wrapper=dict(type='DeepSpeedOptimWrapper'),
                     default_hooks=dict(checkpoint=dict(interval=3, by_epoch=False)))
    assert align_checkpoints(deepspeed).endswith('checkpoints every 8 iterations instead (save_every=8: multiples '
                                                 'of 8)')
    by_epoch = dict(optim_wrapper=dict(accumulative_counts=4), default_hooks=dict(checkpoint=dict(interval=3)))
    assert align_checkpoints(by_epoch) is None  # every 3 epochs: nothing to tell from the config


def _checkpoint(path, pretrained=None):
    """A training checkpoint whose lineage names ``pretrained`` as its previous stage."""
    from xtuner_plugins.models.lineage import lineage_record
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save({'meta': {'lineage': lineage_record({}, pretrained)}, 'state_dict': {}}, path)
    return path


def test_a_stage_whose_work_dir_holds_a_checkpoint_of_its_lineage_is_refused(tmp_path, capsys):
    """Issue 46: ``model.pretrained_pth=WD/iter_6.pth --work-dir WD`` replaced the parent's iter_6.pth."""
    work = tmp_path / 'warmup'
    parent = _checkpoint(str(work / 'iter_6.pth'))
    cfg = Config(dict(model=dict(pretrained_pth=parent), work_dir=str(work)))
    with pytest.raises(SystemExit) as stopped:
        Runner.from_cfg(cfg)
    assert stopped.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        f"train: refused: model.pretrained_pth={parent} is in this run's work folder {work}: the run's own "
        "checkpoints (iter_N.pth, last_checkpoint) would write over it; give this stage another --work-dir"]
    # an earlier stage, recorded in the lineage of the one given
    child = _checkpoint(str(tmp_path / 'sft' / 'iter_4.pth'), parent)
    with pytest.raises(SystemExit):
        Runner.from_cfg(Config(dict(model=dict(pretrained_pth=child), work_dir=str(work))))
    assert capsys.readouterr().err.startswith(
        f'train: refused: {parent} (an earlier stage of model.pretrained_pth={child}, recorded in its lineage) is in '
        f"this run's work folder {work}")
    from xtuner_plugins.engine.refusals import lineage_in_work_dir
    assert lineage_in_work_dir(dict(model=dict(pretrained_pth=child), work_dir=str(tmp_path / 'dpo'))) is None
    assert os.listdir(work) == ['iter_6.pth']


def test_a_work_dir_that_cannot_be_a_folder_is_one_line(tmp_path, capsys):
    """A file, a folder under a file and a symbolic link to nothing were MMEngine's FileExistsError /
    NotADirectoryError in a traceback ('File exists' for the link, whose target is not there); a folder under such
    a link a FileNotFoundError traceback once the models had loaded; a link loop was said to lead to nothing."""
    (tmp_path / 'f').write_text('hi')
    os.symlink(tmp_path / 'gone', tmp_path / 'link')
    os.symlink(tmp_path / 'loop', tmp_path / 'loop')
    make = "a run never makes a link's target: make that folder first, or give another --work-dir"
    for work, says in ((tmp_path / 'f', f'--work-dir {tmp_path}/f is a file, not a folder'),
                       (tmp_path / 'f' / 'sub', f'--work-dir {tmp_path}/f/sub cannot be made: {tmp_path}/f is a '
                                                'file, not a folder'),
                       (tmp_path / 'link', f'--work-dir {tmp_path}/link is a symbolic link to {tmp_path}/gone, '
                                           f'which does not exist; {make}'),
                       (tmp_path / 'link' / 'sub', f'--work-dir {tmp_path}/link/sub lies under {tmp_path}/link, a '
                                                   f'symbolic link to {tmp_path}/gone, which does not exist; {make}'),
                       (tmp_path / 'loop', f'--work-dir {tmp_path}/loop is a symbolic link loop ({tmp_path}/loop -> '
                                           f'{tmp_path}/loop -> ...); give another --work-dir')):
        with pytest.raises(SystemExit) as stopped:
            Runner.from_cfg(Config(dict(model=dict(), work_dir=str(work))))
        assert stopped.value.code == 2
        assert capsys.readouterr().err.splitlines() == [f'train: refused: {says}']
    assert (tmp_path / 'f').read_text() == 'hi'


def test_a_work_dir_this_user_cannot_write_or_a_models_own_folder_is_one_line(tmp_path, capsys, monkeypatch):
    """As a user without write access (the tests run as root, who has it: os.access stands in for the kernel)
    the run stopped in MMEngine's makedirs with a PermissionError traceback; a run in its LLM's own folder saved
    iter_N.pth there and could then not be converted (the folder no longer the one it was trained with)."""
    from xtuner_plugins.engine.refusals import work_dir_refusal
    locked = tmp_path / 'locked'
    locked.mkdir()
    access = os.access
    monkeypatch.setattr(os, 'access', lambda path, mode: str(path) != str(locked) and access(path, mode))
    assert work_dir_refusal(dict(work_dir=str(locked))) == f'--work-dir {locked} is not writable by this user'
    assert work_dir_refusal(dict(work_dir=str(locked / 'a' / 'b'))) == (
        f'--work-dir {locked}/a/b cannot be made: {locked} is not writable by this user')
    # a read-only mount (a snapshot, a dataset volume) refuses root too: it was said to be this user's permission
    from types import SimpleNamespace
    statvfs = os.statvfs
    monkeypatch.setattr(os, 'statvfs', lambda path: SimpleNamespace(f_flag=os.ST_RDONLY) if str(path) == str(
        locked) else statvfs(path))
    assert work_dir_refusal(dict(work_dir=str(locked))) == (
        f'--work-dir {locked} is on a read-only file system; give a --work-dir on a disk that can be written')
    assert work_dir_refusal(dict(work_dir=str(locked / 'a'))) == (
        f'--work-dir {locked}/a cannot be made: {locked} is on a read-only file system; give a --work-dir on a '
        'disk that can be written')
    monkeypatch.undo()
    llm, vit = tmp_path / 'llm', tmp_path / 'vit'
    llm.mkdir()
    vit.mkdir()
    model = dict(llm=str(llm), vision_encoder=dict(type='internvit', path=str(vit)))
    assert work_dir_refusal(dict(model=model, work_dir=str(llm))).startswith(
        f"--work-dir {llm} is model.llm's folder {llm}: its checkpoints would change the folder")
    assert work_dir_refusal(dict(model=model, work_dir=str(vit / 'run'))).startswith(
        f"--work-dir {vit}/run is inside model.vision_encoder's folder {vit}: ")
    assert work_dir_refusal(dict(model=model, work_dir=str(tmp_path / 'llm-run'))) is None
    # the tokenizer's folder, an official folder trained from: its checkpoints changed them too (no longer converted)
    for key in ('tokenizer', 'official_checkpoint'):
        assert work_dir_refusal(dict(model={key: str(llm)}, work_dir=str(llm))).startswith(
            f"--work-dir {llm} is model.{key}'s folder {llm}: its checkpoints would change the folder")
    import collections
    import shutil
    usage = collections.namedtuple('usage', 'total used free')
    monkeypatch.setattr(shutil, 'disk_usage', lambda path: usage(10 ** 9, 10 ** 9, 4096))   # a full disk
    assert work_dir_refusal(dict(work_dir=str(tmp_path / 'run'))) == (
        f'--work-dir {tmp_path}/run: its disk has 0.0 MiB free, and a run writes its log, its config and its '
        f'checkpoints there; free space first')
    monkeypatch.undo()
    with pytest.raises(SystemExit):
        Runner.from_cfg(Config(dict(model=model, work_dir=str(llm))))
    assert capsys.readouterr().err.startswith(f"train: refused: --work-dir {llm} is model.llm's folder")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal of a machine without CUDA")
def test_liger_kernels_on_a_machine_without_a_gpu_are_refused_in_one_line(tmp_path, capsys, monkeypatch):
    """``model.liger_kernel`` needs CUDA: the run stops before the model loads, in one line (no traceback)."""
    monkeypatch.delenv('TRITON_INTERPRET', raising=False)
    cfg = Config(dict(model=dict(liger_kernel=['rope', 'fused_loss']), work_dir=str(tmp_path / 'work')))
    with pytest.raises(SystemExit) as stopped:
        Runner.from_cfg(cfg)
    assert stopped.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        "train: refused: liger_kernel=['rope', 'fused_loss'] needs a CUDA GPU (Liger's kernels are Triton GPU "
        "kernels); on a CPU leave it False: compile_blocks fuses the same work there"]
    from xtuner_plugins.engine.refusals import liger_refusal
    assert liger_refusal(dict(model=dict(liger_kernel=False))) is None
    assert 'fuse the same work' in liger_refusal(dict(model=dict(liger_kernel=True, compile_blocks='llm')))


TRAINING_CHECKPOINT = 'give a checkpoint of training: work_dirs/<config>/iter_N.pth (a file, or the folder DeepSpeed saves)'


def _refused_at_start_up(settings: dict, tmp_path, capsys) -> list:
    """The lines a runner built from ``settings`` printed as it stopped at start-up (exit code 2: one line)."""
    with pytest.raises(SystemExit) as stopped:
        Runner.from_cfg(Config(dict(settings, work_dir=str(tmp_path / 'work'))))
    err = capsys.readouterr().err.splitlines()
    assert stopped.value.code == 2 and len(err) == 1, err
    return err


def test_a_pretrained_pth_that_cannot_load_is_refused_before_the_model_is_built(tmp_path, capsys):
    """Before, a missing ``model.pretrained_pth``, a folder that is no DeepSpeed checkpoint or a file torch cannot
    read failed only once the vision tower and the LLM had loaded, in a traceback."""
    (tmp_path / 'folder').mkdir()
    (tmp_path / 'junk.pth').write_text('hello')
    what = TRAINING_CHECKPOINT
    for path, said in [
            (tmp_path / 'gone.pth', f'model.pretrained_pth={tmp_path / "gone.pth"}: no such file or folder; {what}'),
            (tmp_path / 'folder', f'model.pretrained_pth={tmp_path / "folder"} is a folder but not a DeepSpeed '
                                  f'checkpoint (no *model_states.pt); {what}'),
            (tmp_path / 'junk.pth', f'model.pretrained_pth: {tmp_path / "junk.pth"} is not a training checkpoint: '
                                    "its 5 bytes are not in torch.save's format (another program's file, or a copy cut "
                                    f'short); {what}')]:
        assert _refused_at_start_up(dict(model=dict(pretrained_pth=str(path))), tmp_path, capsys)[0].startswith(
            f'train: refused: {said}')
    from xtuner_plugins.engine.refusals import pretrained_refusal
    assert pretrained_refusal(dict(model=dict(pretrained_pth=_checkpoint(str(tmp_path / 'ok' / 'iter_2.pth'))))) \
        is None
    assert pretrained_refusal(dict(model=dict(pretrained_pth=None))) is None
    converted = tmp_path / 'converted'   # a converted folder: the way to start from one named
    converted.mkdir()
    (converted / 'config.json').write_text('{}')
    assert pretrained_refusal(dict(model=dict(pretrained_pth=str(converted)))).startswith(
        f'model.pretrained_pth={converted} is a model folder (a config.json), not a checkpoint of training: start '
        f'from it with model.official_checkpoint={converted}')


def test_a_load_from_that_cannot_load_is_refused_before_the_model_is_built(tmp_path, capsys):
    """A load_from (not a resume) not there, or a folder of a converted model, was MMEngine's 'FileNotFoundError: ...
    can not be found' traceback once the vision tower and the LLM had loaded."""
    from xtuner_plugins.engine.refusals import load_from_refusal
    (tmp_path / 'folder').mkdir()
    converted = tmp_path / 'converted'
    converted.mkdir()
    (converted / 'config.json').write_text('{}')
    what = TRAINING_CHECKPOINT
    for path, said in [
            (tmp_path / 'gone.pth', f'load_from={tmp_path / "gone.pth"}: no such file or folder; {what}'),
            (tmp_path / 'folder', f'load_from={tmp_path / "folder"} is a folder but not a DeepSpeed checkpoint (no '
                                  f'*model_states.pt); {what}'),
            (converted, f'load_from={converted} is a model folder (a config.json), not a checkpoint of training: start '
                        f'from it with model.official_checkpoint={converted} (an InternVL folder: its vision tower, '
                        'projector and LLM), load_from left unset')]:
        assert _refused_at_start_up(dict(model=dict(), load_from=str(path)), tmp_path, capsys) == [
            f'train: refused: {said}']
    assert load_from_refusal(dict(load_from=_checkpoint(str(tmp_path / 'ok' / 'iter_2.pth')))) is None
    assert load_from_refusal(dict(load_from=None)) is None
    assert load_from_refusal(dict(load_from=str(tmp_path / 'gone.pth'), resume=True)) is None   # the resume's own


def test_a_pretrained_pth_of_another_vision_geometry_is_refused_before_the_model_is_built(tmp_path, capsys):
    """The geometry check (``stages.geometry_problem``, tested in tests/models/test_lineage.py) runs at training's
    start-up, before anything is built."""
    import torch
    warm = tmp_path / 'warm.pth'
    torch.save({'meta': {'cfg': Config(dict(model=dict(ps_version='v1'))).pretty_text}, 'state_dict': {}}, warm)
    with pytest.raises(SystemExit) as stopped:
        Runner.from_cfg(Config(dict(model=dict(pretrained_pth=str(warm), projector='pixel_shuffle_mlp'),
                                    work_dir=str(tmp_path / 'work'))))
    err = capsys.readouterr().err.splitlines()
    assert stopped.value.code == 2 and len(err) == 1 and err[0].startswith(
        f"train: refused: {warm} (model.pretrained_pth) was trained with another vision geometry than this run gives "
        "(model.ps_version: trained 'v1', given 'v2')"), err


def test_a_new_run_into_a_folder_with_an_earlier_runs_checkpoints_is_refused(tmp_path, capsys, monkeypatch):
    """A second run into the same --work-dir replaced the first run's iter_N.pth and pointed last_checkpoint at its
    own, leaving two runs mixed in one folder (found by an adversarial sweep). A resume, and a requeued Slurm job
    continuing its own checkpoints, go on."""
    from xtuner_plugins.engine.preempt import JOB_RECORD
    from xtuner_plugins.engine.refusals import earlier_run_in_work_dir
    work = tmp_path / 'work'
    work.mkdir()
    for name in ('iter_2.pth', 'iter_10.pth', 'iter_4.pth', 'iter_6.pth', 'iter_8.pth'):
        (work / name).write_bytes(name.encode())
    (work / 'last_checkpoint').write_text(str(work / 'iter_10.pth'))
    (work / 'notes.txt').write_text('mine')
    before = {p.name: p.read_bytes() for p in work.iterdir()}
    with pytest.raises(SystemExit) as stopped:
        Runner.from_cfg(Config(dict(work_dir=str(work))))
    assert stopped.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        f'train: refused: the work folder {work} holds the checkpoints of an earlier run (iter_2.pth, iter_4.pth, '
        f'iter_6.pth, ..., iter_10.pth; last_checkpoint -> {work / "iter_10.pth"}): this new run would write its own '
        f'iter_N.pth over them and leave two runs mixed in one folder. Continue that run with --cfg-options '
        f'resume=True (or --resume CHECKPOINT), give this run another --work-dir, or move them away first']
    assert {p.name: p.read_bytes() for p in work.iterdir()} == before
    assert earlier_run_in_work_dir(dict(work_dir=str(work), resume=True)) is None
    assert earlier_run_in_work_dir(dict(work_dir=str(work), resume=str(work / 'iter_6.pth'))) is None
    assert earlier_run_in_work_dir(dict(work_dir=str(tmp_path / 'new'))) is None
    (tmp_path / 'logs_only').mkdir()
    (tmp_path / 'logs_only' / '20261127_093000').mkdir()
    assert earlier_run_in_work_dir(dict(work_dir=str(tmp_path / 'logs_only'))) is None
    # a pointer alone (its checkpoints removed by max_keep_ckpts or by hand) is an earlier run's too
    (tmp_path / 'pointer').mkdir()
    (tmp_path / 'pointer' / 'last_checkpoint').write_text('gone/iter_4.pth')
    assert 'last_checkpoint -> gone/iter_4.pth' in earlier_run_in_work_dir(dict(work_dir=str(tmp_path / 'pointer')))
    # a requeued Slurm job whose own first run saved them continues (preempt.resume_requeued resumes it)
    (work / JOB_RECORD).write_text('{"job": "77"}')
    os.utime(work / JOB_RECORD, (time.time() - 60, time.time() - 60))
    monkeypatch.setenv('SLURM_JOB_ID', '77')
    monkeypatch.setenv('SLURM_RESTART_COUNT', '1')
    assert earlier_run_in_work_dir(dict(work_dir=str(work))) is None
    monkeypatch.setenv('SLURM_JOB_ID', '78')   # another job's checkpoints: refused
    assert earlier_run_in_work_dir(dict(work_dir=str(work))) is not None


def test_a_new_run_whose_checkpoint_folder_holds_another_runs_checkpoints_is_refused(tmp_path, monkeypatch):
    """MMEngine saves into ``out_dir/<the work folder's name>``: two runs in work folders a/run and c/run with
    one out_dir shared it, and the second wrote its iter_N.pth over the first's and rotated out the rest, exit 0
    (an adversarial sweep). A relative out_dir (saved against the current folder, read against the work folder:
    a resume found nothing) is made absolute at start-up."""
    from xtuner_plugins.engine.refusals import checkpoint_dir, earlier_run_in_work_dir
    from xtuner_plugins.engine.runstart import absolute_out_dir
    shared = tmp_path / 'ck'
    (shared / 'run').mkdir(parents=True)
    (shared / 'run' / 'iter_4.pth').write_bytes(b'run a')
    hooks = dict(checkpoint=dict(type='CheckpointHook', out_dir=str(shared)))
    cfg = dict(work_dir=str(tmp_path / 'c' / 'run'), default_hooks=hooks)
    assert checkpoint_dir(cfg) == str(shared / 'run')
    assert earlier_run_in_work_dir(cfg) == (
        f"the checkpoint folder {shared / 'run'} (default_hooks.checkpoint.out_dir + the work folder's name) holds "
        f"the checkpoints of an earlier run (iter_4.pth): this new run would write its own iter_N.pth over them and "
        f"rotate them out. Continue that run with --cfg-options resume=True, give this run a work folder of another "
        f"name or another out_dir, or move them away first")
    assert earlier_run_in_work_dir(dict(cfg, resume=True)) is None
    assert earlier_run_in_work_dir(dict(cfg, work_dir=str(tmp_path / 'c' / 'other'))) is None
    monkeypatch.chdir(tmp_path)
    relative = dict(work_dir='w', default_hooks=dict(checkpoint=dict(type='CheckpointHook', out_dir='ck')))
    absolute_out_dir(relative)
    assert relative['default_hooks']['checkpoint']['out_dir'] == str(tmp_path / 'ck')
    assert earlier_run_in_work_dir(dict(relative, work_dir='run')) is not None


def test_no_dataloader_workers_turns_persistence_off(tmp_path):
    """``train_dataloader.num_workers=0`` with the stage configs' persistent_workers=True ended in torch's traceback
    (``persistent_workers option needs num_workers > 0``)."""
    from xtuner_plugins.engine.runstart import workers_fit
    cfg = dict(train_dataloader=dict(num_workers=0, persistent_workers=True))
    assert 'persistent_workers=False' in workers_fit(cfg)
    assert cfg['train_dataloader']['persistent_workers'] is False
    for loader in (dict(num_workers=2, persistent_workers=True), dict(num_workers=0, persistent_workers=False)):
        cfg = dict(train_dataloader=dict(loader))
        assert workers_fit(cfg) is None and cfg['train_dataloader'] == loader


def test_the_length_grouped_sampler_takes_the_loaders_batch():
    """``train_dataloader.batch_size=1`` alone left the sampler's per_device_batch_size at the config's 4: batches
    of 4 grouped and filled (5 samples: 8 iterations, 'repeats 3 of them to fill whole iterations')."""
    from xtuner_plugins.engine.runstart import sampler_fits
    given = {'train_dataloader.batch_size': 1}
    cfg = dict(train_dataloader=dict(batch_size=1, sampler=dict(type='LengthGroupedSampler', per_device_batch_size=4)))
    assert sampler_fits(cfg, given) == ('train_dataloader.batch_size=1 and train_dataloader.sampler.per_device_batch_size=4: '
                                 'the sampler groups the batches the loader makes, so it takes 1 too (set batch_size '
                                 'alone)')
    assert cfg['train_dataloader']['sampler']['per_device_batch_size'] == 1
    for loader in (dict(batch_size=4, sampler=dict(per_device_batch_size=4)), dict(batch_size=2, sampler=dict()),
                   dict(batch_size=2)):
        cfg = dict(train_dataloader=loader)
        assert sampler_fits(cfg, given) is None
    # a config's own pair (XTuner's: the batch times the accumulation), or both given: as they are
    for changed in ({}, dict(given, **{'train_dataloader.sampler.per_device_batch_size': 8})):
        cfg = dict(train_dataloader=dict(batch_size=1, sampler=dict(per_device_batch_size=8)))
        assert sampler_fits(cfg, changed) is None and cfg['train_dataloader']['sampler']['per_device_batch_size'] == 8


def test_an_attention_this_machine_cannot_train_with_is_refused_at_start_up(monkeypatch):
    """flex_attention on a CPU stopped at the first backward, after 41 frames (no backward there); flash_attention_2
    without the flash_attn package in transformers' ImportError traceback once the vision tower had loaded."""
    import importlib.util

    from xtuner_plugins.engine import refusals
    cfg = dict(model=dict(attn_implementation='flex_attention'))
    flash = dict(model=dict(attn_implementation='flash_attention_2'))
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    assert refusals.attention_refusal(cfg) == (
        "model.attn_implementation='flex_attention' trains on a GPU only: PyTorch's FlexAttention has no backward "
        "on a CPU; on a CPU use 'sdpa_segments' (packed rows: each sample's causal attention) or 'sdpa'")
    assert refusals.attention_refusal(flash) == (
        "model.attn_implementation='flash_attention_2' runs on a CUDA GPU only (the flash_attn package's kernels); "
        "on a CPU use 'sdpa_segments' (packed rows: each sample's causal attention) or 'sdpa'")
    assert refusals.attention_refusal(dict(model=dict(attn_implementation='sdpa_segments'))) is None
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    assert refusals.attention_refusal(cfg) is None
    real_find = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, 'find_spec', lambda name, *a: None if name == 'flash_attn' else
                        real_find(name, *a))
    assert refusals.attention_refusal(flash).startswith(
        "model.attn_implementation='flash_attention_2' needs the flash_attn package, which is not installed")
    monkeypatch.setattr(importlib.util, 'find_spec', lambda name, *a: object())
    assert refusals.attention_refusal(flash) is None


@pytest.mark.parametrize('config', ['dpo_lora.py', 'dpo_lora_packed.py', 'mpo_full.py'])
def test_preference_pairs_for_a_model_without_preference_are_refused_at_start_up(config):
    """model.preference=None with a preference config's data stopped at step 1 in a ValueError traceback ('a batch
    of preference pairs, but the model has no preference= setting'), after the models had loaded."""
    from xtuner_plugins.engine.refusals import preference_data_refusal
    cfg = Config.fromfile(os.path.join(REPO_ROOT, 'configs', config))
    assert preference_data_refusal(cfg) is None
    cfg.model.preference = None
    said = preference_data_refusal(cfg)
    assert said and said.startswith('model.preference is None, but the data are preference pairs (') and \
        'model.preference.beta=0.1' in said, said
    sft = Config.fromfile(os.path.join(REPO_ROOT, 'configs', 'finetune_lora.py'))
    assert sft.model.get('preference') is None and preference_data_refusal(sft) is None


def test_deepspeed_in_one_process_without_a_launcher_trains_as_one_rank():
    """``xtuner train CONFIG --deepspeed zero2_cpu.json`` without NPROC_PER_NODE (XTuner runs its script alone,
    --launcher none) stopped in a raw 'ModuleNotFoundError: No module named mpi4py' once the model was built:
    DeepSpeed found no launcher's variables and looked for MPI. It is one rank of torch's env:// now; a run under
    a launcher, or without DeepSpeed, is left as it is."""
    from xtuner.engine import DeepSpeedStrategy
    from xtuner_plugins.engine.runstart import one_deepspeed_rank
    from xtuner_plugins.launch import free_port
    port = str(free_port())
    cfg, env = dict(launcher='none', strategy=dict(type=DeepSpeedStrategy)), {'LOCAL_RANK': '0', 'MASTER_PORT': port}
    note = one_deepspeed_rank(cfg, env)
    assert cfg['launcher'] == 'pytorch' and env == dict(RANK='0', LOCAL_RANK='0', WORLD_SIZE='1', LOCAL_WORLD_SIZE='1',
                                                         MASTER_ADDR='127.0.0.1', MASTER_PORT=port)
    assert note == ('--deepspeed in one process (no launcher): trains as the one rank of a run on this machine '
                    f'(--launcher pytorch, RANK=0, WORLD_SIZE=1, MASTER_PORT={port}); NPROC_PER_NODE=N for N ranks')
    env = {}
    one_deepspeed_rank(dict(strategy=dict(type='xtuner.engine.DeepSpeedStrategy')), env)   # (its name, a free port)
    assert env['RANK'] == '0' and 0 < int(env['MASTER_PORT']) < 65536
    for cfg, env in ((dict(launcher='pytorch', strategy=dict(type=DeepSpeedStrategy)), {}),   # torchrun's rank
                     (dict(launcher='none', strategy=dict(type=DeepSpeedStrategy)), {'RANK': '1', 'WORLD_SIZE': '2'}),
                     (dict(launcher='none', strategy=dict(type=DeepSpeedStrategy)), {'OMPI_COMM_WORLD_RANK': '0'}),
                     (dict(launcher='none'), {})):   # no DeepSpeed
        before = (dict(cfg), dict(env))
        assert one_deepspeed_rank(cfg, env) is None and (cfg, env) == before


def test_deepspeed_in_one_process_on_a_port_in_use_is_one_line(capsys):
    """MASTER_PORT given and taken by another process: torch's store stopped the run in a DistNetworkError traceback
    (EADDRINUSE) once the model was built; refused in one line before, exit code 2, nothing changed."""
    import socket
    from xtuner.engine import DeepSpeedStrategy
    from xtuner_plugins.engine.runstart import one_deepspeed_rank
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(('127.0.0.1', 0))
        taken.listen()
        port = taken.getsockname()[1]
        cfg, env = dict(launcher='none', strategy=dict(type=DeepSpeedStrategy)), {'MASTER_PORT': str(port)}
        with pytest.raises(SystemExit) as stop:
            one_deepspeed_rank(cfg, env)
    assert stop.value.code == 2 and cfg['launcher'] == 'none' and env == {'MASTER_PORT': str(port)}
    assert capsys.readouterr().err == (f'train: refused: --deepspeed in one process: MASTER_PORT={port}, the port its '
                                       'rendezvous would serve on 127.0.0.1, cannot be taken (Address already in '
                                       'use): set another MASTER_PORT, or unset it for a free one\n')


def test_a_deepspeed_train_batch_size_the_run_does_not_make_is_one_line():
    """A DeepSpeed JSON giving train_batch_size 3 for 2 ranks of batch 1: every rank stopped once the model was built
    in DeepSpeed's 'Check batch related parameters ... 3 != 1 * 1 * 2' traceback; Hugging Face's "auto" in a
    TypeError ('>' not supported between 'str' and 'int'). The first is refused naming the numbers, the second taken
    out (DeepSpeed computes it); one that fits, and a JSON without it, are left."""
    from xtuner_plugins.engine.runstart import deepspeed_batch_refusal

    def cfg(total, launcher='pytorch'):
        config = dict(zero_optimization=dict(stage=2)) if total is None else dict(train_batch_size=total)
        return dict(launcher=launcher, strategy=dict(config=config, train_micro_batch_size_per_gpu=1,
                                                     gradient_accumulation_steps=4))
    assert deepspeed_batch_refusal(cfg(3), {'WORLD_SIZE': '2'}) == (
        '--deepspeed: its train_batch_size is 3, and this run trains 8 samples an optimizer step (train_dataloader.'
        'batch_size=1 x optim_wrapper.accumulative_counts=4 x 2 ranks), which XTuner gives DeepSpeed from the config: '
        'remove train_batch_size from the JSON (or set it "auto"), or set the batch and accumulation that make it')
    assert 'x 4 ranks' in deepspeed_batch_refusal(cfg(8, 'slurm'), {'SLURM_NTASKS': '4'})
    assert 'x 1 ranks' in deepspeed_batch_refusal(cfg(8, 'none'), {})
    auto = cfg('auto')
    assert deepspeed_batch_refusal(auto, {'WORLD_SIZE': '2'}) is None and auto['strategy']['config'] == {}
    for fits, env in ((cfg(8), {'WORLD_SIZE': '2'}), (cfg(None), {'WORLD_SIZE': '2'}), (cfg(3), {}),   # not known
                      (dict(launcher='none'), {})):
        before = copy.deepcopy(fits)
        assert deepspeed_batch_refusal(fits, env) is None and fits == before
