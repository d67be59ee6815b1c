"""DeepSpeed checkpoint folders appear under their name only when complete; a killed save leaves a hidden
``.incomplete`` folder that the converter refuses and the next start removes. The ``last_checkpoint`` pointer is
written atomically and read against the work folder it is in (moved and copied work folders)."""

import os
from types import SimpleNamespace

import pytest
import torch

from tests.train_utils import REPO_ROOT
from xtuner_plugins.engine import checkpointing
from xtuner_plugins.engine.checkpointing import (CheckpointCleanupHook, ResumeError, resume_target, save_then_rename,
                                                 stale_temporaries)
from xtuner_plugins.models.checkpoint import load_trained_state_dict


def write_parts(path, fail_after=None):
    os.makedirs(path)
    for i in range(3):
        if i == fail_after:
            raise KeyboardInterrupt('killed')  # what a kill looks like to the writer: it stops mid-way
        with open(os.path.join(path, f'zero_pp_rank_{i}_mp_rank_00_model_states.pt'), 'w') as f:
            f.write('x')


def test_the_folder_gets_its_name_when_complete(tmp_path):
    final = str(tmp_path / 'iter_4.pth')
    save_then_rename(write_parts, final)
    assert sorted(os.listdir(final)) == [f'zero_pp_rank_{i}_mp_rank_00_model_states.pt' for i in range(3)]
    assert os.listdir(tmp_path) == ['iter_4.pth']
    save_then_rename(write_parts, final)  # saved again under the same name: replaced
    assert os.listdir(tmp_path) == ['iter_4.pth']


def test_a_killed_save_leaves_no_folder_under_the_final_name(tmp_path):
    final = str(tmp_path / 'iter_8.pth')
    with pytest.raises(KeyboardInterrupt):
        save_then_rename(lambda p: write_parts(p, fail_after=2), final)
    assert not os.path.exists(final)
    (partial,) = stale_temporaries(str(tmp_path))
    assert os.path.basename(partial) == '.iter_8.pth.incomplete'
    with pytest.raises(ValueError, match=r'\.iter_8\.pth\.incomplete is a checkpoint whose save did not finish'):
        load_trained_state_dict(partial)
    (tmp_path / '.last_checkpoint.abc123.tmp').write_text('half')  # a killed atomic write
    (tmp_path / 'iter_4.pth').write_text('kept')
    CheckpointCleanupHook().before_run(SimpleNamespace(work_dir=str(tmp_path)))
    assert os.listdir(tmp_path) == ['iter_4.pth']


def test_deepspeeds_save_goes_through_it():
    from mmengine._strategy.deepspeed import DeepSpeedStrategy
    assert getattr(DeepSpeedStrategy.save_checkpoint, '_xtuner_plugins_checkpoint_patch', False)


class Frozen(torch.nn.Module):
    """The shape of a training model: frozen encoder and LLM, a trained projector, a buffer."""

    def __init__(self):
        super().__init__()
        self.vision_model = torch.nn.Linear(3, 3).requires_grad_(False)
        self.mlp1 = torch.nn.Linear(3, 3)
        self.language_model = torch.nn.Linear(3, 3).requires_grad_(False)
        self.register_buffer('scale', torch.ones(1))


def load_through_the_runner(tmp_path, state_dict, name):
    """``Runner.load_checkpoint`` of ``{'state_dict': state_dict}`` saved as ``name``; what the log says."""
    from mmengine.logging import MMLogger
    from mmengine.runner import Runner
    from mmengine.runner.checkpoint import save_checkpoint
    path = str(tmp_path / name)
    save_checkpoint({'state_dict': state_dict, 'meta': {}}, path)
    log = tmp_path / f'{name}.log'
    MMLogger.get_instance(f'load-{name}', log_file=str(log))  # the current logger, as a runner's
    model = Frozen()
    fake_runner = SimpleNamespace(model=model, call_hook=lambda *a, **k: None, logger=MMLogger.get_current_instance())
    Runner.load_checkpoint(fake_runner, path)
    return model, path, log.read_text()


def test_a_checkpoint_of_the_trained_parameters_loads_with_one_line(tmp_path):
    trained = Frozen()
    model, path, log = load_through_the_runner(tmp_path, {k: v for k, v in trained.state_dict().items()
                                                           if k.startswith('mlp1.')}, 'iter_2.pth')
    assert torch.equal(model.mlp1.weight, trained.mlp1.weight)
    assert (f'loaded {path}: 2 tensors loaded; 4 frozen parameters and 1 buffers not in checkpoints by design '
            '(vision_model.*, language_model.*, scale)') in log
    assert 'missing keys' not in log and 'WARNING' not in log
    assert len([line for line in log.splitlines() if line.strip()]) == 2  # that line and the runner's own


def test_trained_parameters_missing_from_a_checkpoint_are_named_loudly(tmp_path):
    trained = Frozen()
    state = {'mlp1.weight': trained.mlp1.weight.detach(), 'stray.weight': torch.zeros(1)}
    _, path, log = load_through_the_runner(tmp_path, state, 'iter_4.pth')
    assert f'loaded {path}: 1 tensors loaded;' in log
    assert (f'WARNING - 1 TRAINED parameters are NOT in {path}: they keep the values they had before this load '
            '(mlp1.*): mlp1.bias') in log
    assert f'WARNING - 1 tensors of {path} match no parameter of the model and were not loaded (stray.*): ' \
           'stray.weight' in log


def test_resume_names_the_checkpoint_it_resumed_from():
    """The runners' ``resume`` calls their ``load_checkpoint``: the line says ``resumed from``, a plain load
    ``loaded``."""
    from mmengine.runner import FlexibleRunner, Runner

    from xtuner_plugins.engine import checkpointing
    for runner in (Runner, FlexibleRunner):
        assert runner.resume.__wrapped__ and runner.load_checkpoint.__wrapped__
    seen = []
    load = checkpointing._naming_the_source(lambda self, filename: seen.append(checkpointing._LOADING.get()),
                                            'loaded')
    resume = checkpointing._naming_the_source(lambda self, filename: load(self, filename), 'resumed from')
    resume(None, 'work/iter_4.pth')
    load(None, 'work/iter_6.pth')
    assert seen == [('resumed from', 'work/iter_4.pth'), ('loaded', 'work/iter_6.pth')]
    assert checkpointing._LOADING.get() is None


def test_the_pointer_is_written_atomically(tmp_path, monkeypatch):
    """MMEngine's checkpoint hook writes ``last_checkpoint`` with a plain ``open``: through the patch, a temporary
    file and a rename; a write that fails half-way leaves the old pointer."""
    import xtuner_plugins.engine  # noqa: F401 (applies the patches)
    from mmengine.hooks import checkpoint_hook
    pointer = tmp_path / 'last_checkpoint'
    with checkpoint_hook.open(str(pointer), 'w') as f:
        f.write(str(tmp_path / 'iter_2.pth'))
    assert pointer.read_text() == str(tmp_path / 'iter_2.pth')
    monkeypatch.setattr(os, 'fsync', lambda fd: (_ for _ in ()).throw(KeyboardInterrupt('killed')))
    with pytest.raises(KeyboardInterrupt):
        with checkpoint_hook.open(str(pointer), 'w') as f:
            f.write(str(tmp_path / 'iter_4.pth'))
    assert pointer.read_text() == str(tmp_path / 'iter_2.pth') and os.listdir(tmp_path) == ['last_checkpoint']
    with checkpoint_hook.open(str(tmp_path / 'other.txt'), 'w') as f:  # any other file: the builtin open
        assert not isinstance(f, checkpointing._AtomicPointer)


def test_resume_reads_the_pointer_against_its_work_folder(tmp_path):
    """A moved or copied work folder resumes from its own checkpoint (with a note); a copied one never from the
    original's; a pointer naming nothing loadable is one line."""
    original, copy = tmp_path / 'original', tmp_path / 'copy'
    for folder in (original, copy):
        folder.mkdir()
        (folder / 'iter_4.pth').write_text(folder.name)
    (copy / 'last_checkpoint').write_text(str(original / 'iter_4.pth'))  # as MMEngine wrote it, copied along
    found, note = resume_target(str(copy))
    assert found == str(copy / 'iter_4.pth')
    assert note == (f'{copy / "last_checkpoint"} names {original / "iter_4.pth"}, outside this work folder (it was '
                    f'moved or copied): resuming from {copy / "iter_4.pth"}, its own checkpoint of that name')
    (copy / 'last_checkpoint').write_text(str(tmp_path / 'gone' / 'iter_4.pth'))  # moved: the old path is gone
    assert resume_target(str(copy))[0] == str(copy / 'iter_4.pth')
    (original / 'last_checkpoint').write_text(str(original / 'iter_4.pth'))  # in its own folder: as it is
    assert resume_target(str(original)) == (str(original / 'iter_4.pth'), '')
    (copy / 'last_checkpoint').write_text('iter_4.pth')  # relative: against the work folder
    assert resume_target(str(copy)) == (str(copy / 'iter_4.pth'), '')
    outside = tmp_path / 'disk' / 'copy'  # the checkpoint hook's out_dir: a checkpoint's place, not a copy's
    outside.mkdir(parents=True)
    (outside / 'iter_6.pth').write_text('x')
    (copy / 'last_checkpoint').write_text(str(outside / 'iter_6.pth'))
    assert resume_target(str(copy), [str(outside)]) == (str(outside / 'iter_6.pth'), '')
    (copy / 'iter_4.pth').unlink()  # a copy without the checkpoint: not the original's either
    (copy / 'last_checkpoint').write_text(str(original / 'iter_4.pth'))
    with pytest.raises(ResumeError) as refused:
        resume_target(str(copy))
    assert str(refused.value) == (
        f'resume=True: {copy / "last_checkpoint"} names {original / "iter_4.pth"}, which is not in this work folder '
        f'({copy}; moved or copied from elsewhere?), and {copy} has no iter_4.pth; give the checkpoint to resume '
        f'from with --resume PATH, or delete {copy / "last_checkpoint"} to start this run over')
    (copy / 'last_checkpoint').write_text('')
    with pytest.raises(ResumeError, match='last_checkpoint is empty'):
        resume_target(str(copy))
    assert resume_target(str(tmp_path / 'none')) == (None, '')


TOY = os.path.join(REPO_ROOT, 'tests', 'engine', 'toy_configs', 'toy_schedule.py')


def toy_runner(work_dir, name, **options):
    """The toy config's runner (``Runner.from_cfg``, as the train scripts build it), trained."""
    from mmengine.config import Config
    from mmengine.runner import Runner
    cfg = Config.fromfile(TOY)
    cfg.merge_from_dict(dict(options, work_dir=str(work_dir), experiment_name=name))
    runner = Runner.from_cfg(cfg)
    runner.train()
    return runner


def _log(work_dir):
    import glob
    (path,) = glob.glob(os.path.join(str(work_dir), '*', '*.log'))
    with open(path, encoding='utf-8') as f:
        return f.read()


def test_a_copied_or_moved_work_folder_resumes_from_its_own_checkpoint(tmp_path):
    import shutil
    first = tmp_path / 'first'
    toy_runner(first, 'ptr-first', max_iters=4, save_every=2)
    copied = tmp_path / 'copied'
    shutil.copytree(first, copied, ignore=shutil.ignore_patterns('2*'))  # without the first run's log folder
    os.remove(first / 'iter_4.pth')  # were the original read, the resume would fail
    runner = toy_runner(copied, 'ptr-copied', max_iters=6, save_every=2, resume=True)
    assert runner.iter == 6
    log = _log(copied)
    assert f'resuming from {copied}/iter_4.pth, its own checkpoint of that name' in log
    assert f'resumed from {copied}/iter_4.pth' in log and ', iter: 4' in log
    moved = tmp_path / 'moved'
    os.rename(copied, moved)
    shutil.rmtree(next(p for p in moved.iterdir() if p.is_dir()))
    runner = toy_runner(moved, 'ptr-moved', max_iters=8, save_every=2, resume=True)
    assert runner.iter == 8 and f'resumed from {moved}/iter_6.pth' in _log(moved)
