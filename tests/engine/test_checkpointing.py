"""DeepSpeed checkpoint folders appear under their name only when complete; a killed save leaves a hidden
``.incomplete`` folder that the converter refuses and the next start removes."""

import os
import re
from types import SimpleNamespace

import pytest
import torch

from xtuner_plugins.engine.checkpointing import CheckpointCleanupHook, save_then_rename, stale_temporaries
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
    (tmp_path / '.last_checkpoint.abc12345.tmp').write_text('half')  # a killed atomic write
    (tmp_path / 'iter_4.pth').write_text('kept')
    CheckpointCleanupHook().before_run(SimpleNamespace(work_dir=str(tmp_path)))
    assert os.listdir(tmp_path) == ['iter_4.pth']


def test_only_what_a_save_leaves_is_removed(tmp_path):
    """A work folder given as another program's (``--work-dir .``, the data folder): its ``.notes.tmp`` and a
    ``.export.incomplete`` folder were removed at the start of a run, whatever had written them; only the names a
    killed save leaves are now."""
    left = ['.iter_8.pth.incomplete', '.iter_4.pth.k2x_9abc.tmp', '.last_checkpoint.abc12345.tmp',
            '.data_manifest.json.u7_kk2a1.tmp', '.slurm_job.json.a1b2c3d4.tmp', '.epoch_2.pth.incomplete']
    kept = ['.notes.tmp', '.export.incomplete', '.iter_4.pth.tmp', '.data.json.abcd1234.tmp', '..tmp', 'a.tmp',
            # a user's files that only look like a save's (an adversarial sweep): not the hook's names, nor
            # mkstemp's eight letters
            '.my_model.pth.incomplete', '.weights.pth.backup.tmp', '.iter_4.pth.backup.tmp']
    for name in left + kept:
        if name.endswith('incomplete'):
            (tmp_path / name).mkdir()
            (tmp_path / name / 'part').write_text('x')
        else:
            (tmp_path / name).write_text('x')
    assert [os.path.basename(p) for p in stale_temporaries(str(tmp_path))] == sorted(left)
    CheckpointCleanupHook().before_run(SimpleNamespace(work_dir=str(tmp_path)))
    assert sorted(os.listdir(tmp_path)) == sorted(kept)



def test_what_a_killed_save_left_in_the_checkpoint_folder_elsewhere_is_removed(tmp_path):
    """A run whose checkpoints go to ``default_hooks.checkpoint.out_dir`` (MMEngine's OUT/<work folder's name>),
    SIGKILLed while it wrote iter_4.pth: its ``.iter_4.pth.XXXXXXXX.tmp`` (a checkpoint's size) stayed there after
    every resume, only the work folder was cleaned. That folder is this run's (it locks it), and is cleaned too;
    the out_dir above it, which runs of other names share, is not."""
    work, out = tmp_path / 'run', tmp_path / 'disk'
    work.mkdir()
    (out / 'run').mkdir(parents=True)
    for folder in (out / 'run', out):
        (folder / '.iter_4.pth.k2x_9abc.tmp').write_text('half')
        (folder / 'iter_2.pth').write_text('kept')
    cfg = dict(work_dir=str(work), default_hooks=dict(checkpoint=dict(type='CheckpointHook', out_dir=str(out))))
    CheckpointCleanupHook().before_run(SimpleNamespace(work_dir=str(work), cfg=cfg))
    assert os.listdir(out / 'run') == ['iter_2.pth']
    assert sorted(os.listdir(out)) == ['.iter_4.pth.k2x_9abc.tmp', 'iter_2.pth', 'run']

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



def test_tensors_of_another_shape_are_named_not_counted_as_loaded():
    """A checkpoint of another config (another width, a LoRA rank): MMEngine's quiet non-strict load skips them;
    a load of a state dict not through load_from (no runner's source) says so in a warning."""
    from xtuner_plugins.engine.load_outcome import load_report, shape_mismatches
    model = Frozen()
    state = {'mlp1.weight': torch.zeros(5, 3), 'mlp1.bias': torch.zeros(3)}
    mismatched = shape_mismatches(model, state)
    assert mismatched == ['mlp1.weight [5, 3] vs [3, 3]']
    lines = load_report(model, 1, [], [], None, mismatched)
    assert lines[-1][1] == ("1 tensors of a state dict have another shape than the model's and were NOT loaded (a "
                            'checkpoint of another config?): mlp1.weight [5, 3] vs [3, 3]')


def test_a_load_from_whose_tensors_have_other_shapes_is_refused(tmp_path):
    """load_from= a LoRA checkpoint of rank 16 into a config of rank 8 trained on with fresh adapters: its 28
    adapter tensors were dropped, said in a warning (transformers' from_pretrained refuses other sizes too)."""
    from xtuner_plugins.errors import Refused
    state = {'mlp1.weight': torch.zeros(5, 3), 'mlp1.bias': torch.zeros(3)}
    with pytest.raises(Refused, match=r"^load_from=.*iter_6.pth: 1 of its tensors have another shape than this run's "
                                      r'model \(mlp1.weight \[5, 3\] vs \[3, 3\]\): a checkpoint of other settings'):
        load_through_the_runner(tmp_path, state, 'iter_6.pth')


@pytest.mark.parametrize('state, says', [
    ({'stray.weight': torch.zeros(1), 'other.bias': torch.zeros(2)},
     'its 2 tensors match no parameter of the model (stray.*, other.*)'),
    ({'mlp1.weight': torch.zeros(5, 3)}, "1 of its tensors have another shape than the model's (mlp1.weight [5, 3] vs "
                                        "[3, 3])")])
def test_a_load_from_that_loads_nothing_is_refused(tmp_path, state, says):
    """load_from= another model's checkpoint trained on from where the model stood, with warnings only."""
    from xtuner_plugins.errors import Refused
    with pytest.raises(Refused, match=r'^load_from=.*iter_2.pth: not a checkpoint of this model, nothing in it was '
                                      r'loaded: ' + re.escape(says)):
        load_through_the_runner(tmp_path, state, 'iter_2.pth')


def test_a_resume_into_a_model_of_other_trained_shapes_is_refused_before_the_optimizer_loads(tmp_path):
    """A LoRA rank changed on resume: a larger one crashed in the fused AdamW step (a segfault: the saved state is
    of another size), a smaller one went on with its adapters reset and the state misread. Resuming is refused; a
    plain load of the same checkpoint (a new run from its weights) still loads what fits, with its warning."""
    from mmengine.runner.checkpoint import save_checkpoint

    from xtuner_plugins.engine import checkpointing
    from xtuner_plugins.errors import Refused
    path = str(tmp_path / 'iter_8.pth')
    save_checkpoint({'state_dict': {'mlp1.weight': torch.zeros(5, 3), 'mlp1.bias': torch.zeros(3)}, 'meta': {}},
                    path)
    from mmengine.runner import Runner
    from mmengine.logging import MMLogger
    fake = SimpleNamespace(model=Frozen(), call_hook=lambda *a, **k: None, logger=MMLogger.get_current_instance())
    resume = checkpointing._naming_the_source(lambda self, filename: Runner.load_checkpoint(self, filename),
                                              'resumed from')
    with pytest.raises(Refused, match=r"resume: .*iter_8.pth is not a checkpoint of this run's model: 1 of its "
                                      r"tensors have another shape than this run's model \(mlp1.weight \[5, 3\] vs "
                                      r"\[3, 3\]\)"):
        resume(fake, path)
    save_checkpoint({'state_dict': {'mlp1.weight': torch.zeros(3, 3)}, 'meta': {}}, path)
    with pytest.raises(Refused, match=r'1 trained parameters of this run are not in it \(mlp1.bias\)'):
        resume(fake, path)
    Runner.load_checkpoint(fake, path)   # load_from: the fitting tensors, a warning for the rest


@pytest.mark.parametrize('umask', [0o022, 0o002, 0o077])
def test_an_atomic_write_gets_the_mode_a_plain_write_gets(tmp_path, umask):
    """Before, every checkpoint, last_checkpoint and data_manifest.json was 0600 (``mkstemp``'s mode): a work
    folder shared with a group showed checkpoints its members could not read (convert, chat, eval)."""
    from xtuner_plugins.engine.checkpointing import atomic_write
    previous = os.umask(umask)
    try:
        atomic_write(b'x', tmp_path / 'iter_2.pth')
        with open(tmp_path / 'plain', 'wb') as f:
            f.write(b'x')
    finally:
        os.umask(previous)
    assert oct(os.stat(tmp_path / 'iter_2.pth').st_mode & 0o777) == oct(0o666 & ~umask)
    assert os.stat(tmp_path / 'iter_2.pth').st_mode == os.stat(tmp_path / 'plain').st_mode


FULL_DISK = '''
import resource, sys
from xtuner_plugins.engine.checkpointing import WriteFailed, atomic_write
resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))   # as a full disk: the write fails part-way
try:
    atomic_write(b'n' * 200_000, sys.argv[1])
except WriteFailed as exc:
    print(exc, isinstance(exc, OSError), exc.errno)
'''


@pytest.mark.parametrize('existing', [True, False])
def test_a_checkpoint_write_that_fails_names_the_file_and_leaves_the_old_one(tmp_path, existing):
    """A full disk or a file-size limit (``ulimit -f``) during a save: before, ``OSError: [Errno 27] File too
    large`` with a traceback and no file named; now one line (``errors.Stated``) naming the file, the previous
    file of that name intact, no temporary left."""
    import subprocess
    import sys
    target = tmp_path / 'last_checkpoint'
    if existing:
        target.write_text('/w/iter_4.pth')
    out = subprocess.run([sys.executable, '-c', FULL_DISK, str(target)], capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.dirname(
                             os.path.abspath(__file__))))))
    kept = 'the file of that name is unchanged' if existing else 'no partial file was left'
    assert out.stdout.splitlines()[-1] == (
        f"could not write {target} (200,000 bytes): File too large (over the file-size limit: ulimit -f, or the file "
        f"system's largest file); {kept} True 27"), out.stdout + out.stderr
    assert os.listdir(tmp_path) == (['last_checkpoint'] if existing else [])
    if existing:
        assert target.read_text() == '/w/iter_4.pth'


def test_a_save_the_disk_refuses_is_one_line_naming_the_checkpoint(tmp_path):
    """torch.save of a DeepSpeed folder's part past a file-size limit or on a full disk raises a RuntimeError
    without an errno ('[enforce fail at inline_container.cc:671] . unexpected pos 2624 vs 2516'): the run ended
    in a 75-line traceback that named neither the checkpoint nor the cause (a helper's sweep)."""
    import subprocess
    import sys
    script = r'''
import os, resource, signal, sys, torch
from xtuner_plugins.engine.checkpointing import WriteFailed, save_then_rename
def save(path):
    os.makedirs(path)
    torch.save({'w': torch.zeros(100000)}, os.path.join(path, 'mp_rank_00_model_states.pt'))
save_then_rename(save, os.path.join(sys.argv[1], 'iter_2.pth'))
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 10, 64 << 10))
try:
    save_then_rename(save, os.path.join(sys.argv[1], 'iter_4.pth'))
except WriteFailed as exc:
    print('WriteFailed:', exc)
'''
    done = subprocess.run([sys.executable, '-c', script, str(tmp_path)], capture_output=True, text=True,
                          timeout=120, cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    assert done.returncode == 0, done.stderr[-2000:]
    assert re.fullmatch(rf"WriteFailed: could not write the checkpoint {tmp_path}/iter_4\.pth \(.+\) \(over the "
                        r"file-size limit: ulimit -f, or the file system's largest file\); the checkpoints before it "
                        r'are kept, and what was written of it is removed when the run resumes\n', done.stdout), \
        done.stdout
    assert sorted(os.listdir(tmp_path)) == ['.iter_4.pth.incomplete', 'iter_2.pth']
    assert torch.load(tmp_path / 'iter_2.pth' / 'mp_rank_00_model_states.pt')['w'].shape == (100000,)
