"""``last_checkpoint`` (engine/resume.py): written atomically, and read against the work folder it is in, so that a
moved or copied work folder resumes from its own checkpoint and a copy never from the original's."""

import gc
import os

import pytest

from tests.train_utils import REPO_ROOT
from xtuner_plugins.engine.resume import ResumeError, _AtomicPointer, resume_target


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
        assert not isinstance(f, _AtomicPointer)
    # a stop between the open and the end of the with: the writer dropped unfinished writes nothing when collected
    # (its close() wrote, an empty pointer or one newer than the run's closing line named)
    monkeypatch.undo()   # (fsync again)
    for text in ('', str(tmp_path / 'iter_6.pth')):
        f = checkpoint_hook.open(str(pointer), 'w')
        f.write(text)
        del f
        gc.collect()
        assert pointer.read_text() == str(tmp_path / 'iter_2.pth')


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
        f'from with --resume PATH, or delete {copy / "last_checkpoint"} (and move away the checkpoints beside it) '
        'to start this run over')
    (copy / 'last_checkpoint').write_text('')
    with pytest.raises(ResumeError, match='last_checkpoint is empty'):
        resume_target(str(copy))
    # damaged (a failing disk, another program's file): a UnicodeDecodeError traceback, twice, before
    for damaged in (b'\xff\xfe\x00garbage', b'/w/iter_4\x00.pth'):
        (copy / 'last_checkpoint').write_bytes(damaged)
        with pytest.raises(ResumeError, match=r'^resume=True: .*last_checkpoint (is not a path that can be read|'
                                              r'names /w/iter_4\x00\.pth, which is not in this work folder)'):
            resume_target(str(copy))
    assert resume_target(str(tmp_path / 'none')) == (None, '')


def test_resume_true_takes_a_checkpoint_saved_after_the_one_the_pointer_names(tmp_path):
    """A kill (or a full disk) between a save and its pointer's write: last_checkpoint named iter_4.pth beside a
    whole iter_6.pth, and resume=True resumed from iter_4.pth and replaced iter_6.pth with its own saves (a warning
    said so). It takes iter_6.pth now, saying why; the newest of the pointer's kind, in the work folder or the
    checkpoint hook's out_dir."""
    work, out = tmp_path / 'work', tmp_path / 'disk'
    work.mkdir()
    out.mkdir()
    for name in ('iter_2.pth', 'iter_4.pth', 'iter_6.pth', 'epoch_9.pth'):
        (work / name).write_text('x')
    (work / 'last_checkpoint').write_text(str(work / 'iter_4.pth'))
    found, note = resume_target(str(work))
    assert found == str(work / 'iter_6.pth')
    assert note == (f'{work / "last_checkpoint"} names iter_4.pth, and {work / "iter_6.pth"} is newer (the run '
                    "stopped between its save and the pointer's write; checkpoints are written whole): resuming from "
                    f"{work / 'iter_6.pth'}, which this run's saves would otherwise have replaced")
    (out / 'iter_8.pth').mkdir()   # a DeepSpeed folder in out_dir
    (out / 'iter_8.pth' / 'mp_rank_00_model_states.pt').write_text('x')
    assert resume_target(str(work), [str(out)])[0] == str(out / 'iter_8.pth')
    (work / 'last_checkpoint').write_text(str(work / 'iter_6.pth'))   # the newest named: as it is
    assert resume_target(str(work)) == (str(work / 'iter_6.pth'), '')
    (work / 'last_checkpoint').write_text(str(work / 'epoch_9.pth'))   # another kind: iter_N is not newer than it
    assert resume_target(str(work)) == (str(work / 'epoch_9.pth'), '')


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


def test_a_pointer_behind_the_newest_checkpoint_resumes_from_the_newest_without_replacing_it(tmp_path):
    """The toy run through MMEngine's runner: its pointer put back to iter_2.pth (a kill between iter_4's save and
    the pointer's write). resume=True resumed at iteration 2 and wrote its own iter_4.pth over the whole one; it
    resumes at 4 now, and iter_4.pth is the first run's file."""
    work = tmp_path / 'w'
    toy_runner(work, 'behind-first', max_iters=4, save_every=2)
    (work / 'last_checkpoint').write_text(str(work / 'iter_2.pth'))
    before = (work / 'iter_4.pth').read_bytes()
    runner = toy_runner(work, 'behind-again', max_iters=6, save_every=2, resume=True)
    assert runner.iter == 6 and (work / 'iter_4.pth').read_bytes() == before
    log = ''.join(path.read_text(encoding='utf-8') for path in work.glob('*/*.log'))   # both runs' logs
    assert f'resuming from {work}/iter_4.pth, which this run\'s saves would otherwise have replaced' in log, log
    assert f'resumed from {work}/iter_4.pth' in log and ', iter: 4' in log


def test_a_resume_with_another_learning_rate_says_which_one_goes_on(monkeypatch):
    """Before, ``--resume CKPT --cfg-options optim_wrapper.optimizer.lr=0.5`` trained on with the checkpoint's 0.01
    (MMEngine loads the optimizer's and schedulers' learning rates over the config's) without a word."""
    import logging
    from types import SimpleNamespace

    import xtuner_plugins.engine  # noqa: F401 (applies the patches)
    from mmengine.runner import Runner

    from xtuner_plugins.engine import resume as resume_module
    said = []
    monkeypatch.setattr(resume_module, 'print_log', lambda msg, logger=None, level=logging.INFO: said.append(msg))
    groups = [{'lr': 5e-7, 'initial_lr': 0.5}, {'lr': 1e-7, 'initial_lr': 0.1}]
    runner = SimpleNamespace(optim_wrapper=SimpleNamespace(param_groups=groups), work_dir='w', iter=4, _load_from=None)

    def loads(saved):
        def load(self, filename, *args, **kwargs):   # what MMEngine's resume does to the groups
            for group, lr in zip(self.optim_wrapper.param_groups, saved):
                group.update(lr=lr * 1e-5, initial_lr=lr)
        return load
    Runner.resume(runner, 'w/iter_4.pth', _original=loads([0.01, 0.002]))
    assert said == ["resumed from w/iter_4.pth: its optimizer and schedule go on with the learning rate they were "
                    "saved with (0.01, and others), not this run's (0.5, optim_wrapper.optimizer.lr): a resume "
                    "continues the saved run as it was; to train with the new learning rate, start a new run from "
                    "the checkpoint's weights (load_from=PATH, resume=False, another --work-dir)"]
    said.clear()
    Runner.resume(runner, 'w/iter_4.pth', _original=loads([0.01, 0.002]))   # the same learning rates: nothing said
    assert said == []
    assert resume_module.lr_change_note('x', [], [0.1]) is None   # nothing read before the load (DeepSpeed)


def test_a_resume_from_an_older_checkpoint_does_not_write_over_later_ones(tmp_path, monkeypatch):
    """Before, ``--resume WD/iter_4.pth`` in a work folder holding iter_6.pth and iter_8.pth replaced them with this
    run's saves without a word, and ``--resume WD/epoch_1.pth`` beside epoch_3.pth still did (only iter_N was
    compared). A chosen older checkpoint is refused before training, by its kind; a checkpoint of another kind is
    not later, and a resume the pointer chose is not refused here (resume=True took the newest of its kind)."""
    import logging
    from types import SimpleNamespace

    import xtuner_plugins.engine  # noqa: F401 (applies the patches)
    from mmengine.runner import Runner

    from xtuner_plugins.engine import resume as resume_module
    from xtuner_plugins.errors import Refused
    said = []
    monkeypatch.setattr(resume_module, 'print_log', lambda msg, logger=None, level=logging.INFO: said.append(msg))
    for name in ('iter_2.pth', 'iter_4.pth', 'iter_6.pth', 'iter_10.pth', 'epoch_9.pth'):
        (tmp_path / name).write_text('x')

    def loaded(self, filename, *args, **kwargs):
        self.iter = 4
    chosen = SimpleNamespace(work_dir=str(tmp_path), iter=0, _load_from=str(tmp_path / 'iter_4.pth'))
    with pytest.raises(Refused, match=r'^--resume .*iter_4\.pth \(iteration 4\): this work folder holds later '
                                      r"checkpoints \(iter_6\.pth, iter_10\.pth\) that this run's saves would "
                                      r'replace; give this run another --work-dir'):
        Runner.resume(chosen, str(tmp_path / 'iter_4.pth'), _original=loaded)
    pointer = SimpleNamespace(work_dir=str(tmp_path), iter=0, _load_from=None)
    Runner.resume(pointer, str(tmp_path / 'iter_4.pth'), _original=loaded)
    assert said == []
    (tmp_path / 'epoch_1.pth').write_text('x')
    by_epoch = SimpleNamespace(work_dir=str(tmp_path), iter=0, _load_from=str(tmp_path / 'epoch_1.pth'))
    with pytest.raises(Refused, match=r'^--resume .*epoch_1\.pth \(iteration 4\): this work folder holds later '
                                      r'checkpoints \(epoch_9\.pth\) that'):
        Runner.resume(by_epoch, str(tmp_path / 'epoch_1.pth'), _original=loaded)
    last_epoch = SimpleNamespace(work_dir=str(tmp_path), iter=0, _load_from=str(tmp_path / 'epoch_9.pth'))
    Runner.resume(last_epoch, str(tmp_path / 'epoch_9.pth'), _original=loaded)   # iter_10.pth: another kind
    elsewhere = SimpleNamespace(work_dir=str(tmp_path / 'new'), iter=0, _load_from=str(tmp_path / 'iter_4.pth'))
    Runner.resume(elsewhere, str(tmp_path / 'iter_4.pth'), _original=loaded)   # another work folder: fine


def test_a_resume_from_elsewhere_into_a_folder_of_another_runs_checkpoints_is_refused(tmp_path, monkeypatch):
    """``--resume A/iter_4.pth --work-dir B`` (or B the default work_dirs/CONFIG) where B holds another run's
    iter_2.pth: this run's saves replaced B's pointer and the rotation deleted iter_2.pth. Refused before anything
    loads; B empty, or the checkpoint in B itself, goes on."""
    from types import SimpleNamespace

    import xtuner_plugins.engine  # noqa: F401 (applies the patches)
    from mmengine.runner import Runner

    from xtuner_plugins.errors import Refused
    (tmp_path / 'a').mkdir()
    (tmp_path / 'a' / 'iter_4.pth').write_text('x')
    other = tmp_path / 'b'
    other.mkdir()
    (other / 'iter_2.pth').write_text('theirs')
    loads = []

    def loaded(self, filename, *args, **kwargs):
        loads.append(filename)
        self.iter = int(os.path.basename(filename)[5:-4])   # iter_N.pth
    into_b = SimpleNamespace(work_dir=str(other), iter=0, _load_from=str(tmp_path / 'a' / 'iter_4.pth'),
                             optim_wrapper=None)
    with pytest.raises(Refused, match=r"^--resume .*a/iter_4\.pth: this work folder \(.*b\) holds another run's "
                                      r'checkpoints \(iter_2\.pth\), which this run.s saves and their rotation'):
        Runner.resume(into_b, str(tmp_path / 'a' / 'iter_4.pth'), _original=loaded)
    assert loads == [] and (other / 'iter_2.pth').read_text() == 'theirs'
    own = SimpleNamespace(work_dir=str(tmp_path / 'a'), iter=0, _load_from=str(tmp_path / 'a' / 'iter_4.pth'),
                          optim_wrapper=None)
    Runner.resume(own, str(tmp_path / 'a' / 'iter_4.pth'), _original=loaded)
    empty = SimpleNamespace(work_dir=str(tmp_path / 'c'), iter=0, _load_from=str(tmp_path / 'a' / 'iter_4.pth'),
                            optim_wrapper=None)
    Runner.resume(empty, str(tmp_path / 'a' / 'iter_4.pth'), _original=loaded)
    (tmp_path / 'scratch').mkdir()   # a checkpoint of the folder that is a link to a file elsewhere: its own
    (tmp_path / 'scratch' / 'iter_6.pth').write_text('x')
    os.symlink(tmp_path / 'scratch' / 'iter_6.pth', tmp_path / 'a' / 'iter_6.pth')
    linked = SimpleNamespace(work_dir=str(tmp_path / 'a'), iter=0, _load_from=str(tmp_path / 'a' / 'iter_6.pth'),
                             optim_wrapper=None)
    Runner.resume(linked, str(tmp_path / 'a' / 'iter_6.pth'), _original=loaded)
    assert len(loads) == 3


def test_a_resume_with_another_length_says_the_saved_schedule_goes_on(tmp_path):
    """max_iters raised from 4 to 8 on resume kept the saved schedule (its decay ended at 4; the rate stayed
    there for iterations 5-8) without a word, where the docs say the schedule follows the final length."""
    runner = toy_runner(tmp_path, 'len-first', max_iters=4, save_every=2)
    assert runner.iter == 4
    toy_runner(tmp_path, 'len-more', max_iters=8, save_every=2, resume=True)
    log = _log_of(tmp_path, 'len-more')
    assert f'resumed from {tmp_path}/iter_4.pth: its learning-rate schedule goes on as it was saved' in log, log
    assert 'not at this run\'s 8' in log


def test_a_resume_past_the_runs_last_iteration_is_refused_and_one_at_it_ends_as_done(tmp_path):
    """A checkpoint of iteration 4 resumed with max_iters=2 (a shorter schedule, less data) ended 'done' with exit 0
    having trained nothing and saved nothing; at its last iteration (a finished run started again) it is done."""
    from xtuner_plugins.errors import Refused
    toy_runner(tmp_path, 'past-first', max_iters=4, save_every=2)
    # named as the user asked for it (resume=True), not as a --resume they never gave
    with pytest.raises(Refused, match=rf'^resume=True \({tmp_path}/iter_4.pth\): its iteration 4 is past this run\'s '
                                      r'last, 2 \(max_iters'):
        toy_runner(tmp_path, 'past-shorter', max_iters=2, save_every=2, resume=True)
    assert toy_runner(tmp_path, 'past-again', max_iters=4, save_every=2, resume=True).iter == 4


def test_a_resume_with_another_llm_folder_is_refused_before_it_loads(tmp_path):
    """Adapters trained 10 iterations on one LLM went on over another of the same shapes (exit 0, no word), and the
    later checkpoints recorded only the new one, so the converter merged them onto it. The source folders the
    checkpoint's lineage records are compared with the built model's, fingerprints as the converter compares them."""
    from types import SimpleNamespace

    import torch
    from mmengine.runner import Runner

    import xtuner_plugins.engine  # noqa: F401 (applies the patches)
    from xtuner_plugins.errors import Refused
    from xtuner_plugins.models.lineage import lineage_record
    folders = {}
    for name, seed in (('llm', b'1'), ('other', b'2')):
        folders[name] = tmp_path / name
        folders[name].mkdir()
        (folders[name] / 'config.json').write_text('{"model_type": "qwen2"}')
        (folders[name] / 'model.safetensors').write_bytes(seed * 64)
    checkpoint = tmp_path / 'iter_10.pth'
    torch.save({'meta': {'lineage': lineage_record({'llm': str(folders['llm'])})}, 'state_dict': {}}, checkpoint)
    loads = []

    def loaded(self, filename, *args, **kwargs):
        loads.append(filename)

    def runner(llm):
        wrapped = SimpleNamespace(module=SimpleNamespace(lineage=lineage_record({'llm': str(llm)})))  # DDP's wrap
        return SimpleNamespace(work_dir=str(tmp_path / 'r'), iter=0, _load_from=str(checkpoint), optim_wrapper=None,
                               cfg=None, model=wrapped)
    with pytest.raises(Refused, match=rf"^model.llm: {folders['other']} is not the folder --resume {checkpoint} was "
                                      rf"trained with \({folders['llm']}\): model.safetensors: other content"):
        Runner.resume(runner(folders['other']), str(checkpoint), _original=loaded)
    assert loads == []
    Runner.resume(runner(folders['llm']), str(checkpoint), _original=loaded)
    assert loads == [str(checkpoint)]


def _log_of(work_dir, name):
    """The log of the run ``name``: the newest log of ``work_dir`` (the runs of a test run one after another), which
    must be that run's (its config's experiment name in it)."""
    import glob
    path = max(glob.glob(os.path.join(str(work_dir), '*', '*.log')), key=os.path.getmtime)
    with open(path, encoding='utf-8') as f:
        text = f.read()
    assert f"experiment_name = '{name}'" in text, path
    return text


def test_a_resume_with_other_model_or_data_settings_is_refused_before_it_loads(tmp_path):
    """A resume read only its config as given: another ``lora_alpha`` (the LoRA delta scaled 4x), other tiling, no
    system message, went on with exit 0, and its later checkpoints recorded the new settings, so the export merged
    adapters trained at two scalings. The settings the checkpoint records are compared first, naming each."""
    from types import SimpleNamespace

    import torch
    from mmengine.config import Config

    import xtuner_plugins.engine  # noqa: F401 (applies the patches)
    from mmengine.runner import Runner

    from xtuner_plugins.errors import Refused

    def config(alpha, patches, system):
        return Config(dict(model=dict(type='xtuner_plugins.models.VisionLanguageModel',
                                      llm_lora=dict(r=4, lora_alpha=alpha, lora_dropout=0.05)),
                           train_dataloader=dict(dataset=dict(max_dynamic_patch=patches, system=system))))
    checkpoint = tmp_path / 'iter_6.pth'
    torch.save({'meta': {'cfg': config(16, 2, 'You are terse.').pretty_text}, 'state_dict': {}}, checkpoint)
    loads = []

    def loaded(self, filename, *args, **kwargs):
        loads.append(filename)
    other = SimpleNamespace(work_dir=str(tmp_path / 'r'), iter=0, _load_from=str(checkpoint), optim_wrapper=None,
                            cfg=config(64, 12, None))
    with pytest.raises(Refused) as refused:
        Runner.resume(other, str(checkpoint), _original=loaded)
    assert str(refused.value) == (
        f"--resume {checkpoint}: it was trained with other settings than this run's config gives: "
        "model.llm_lora.lora_alpha: trained 16, given 64; train_dataloader.dataset.max_dynamic_patch: trained 2, "
        "given 12; train_dataloader.dataset.system: trained 'You are terse.', given None. A resume goes on with that "
        'run: give its settings (the checkpoint records them), or start a new run from its weights (--cfg-options '
        'load_from=PATH, without --resume, another --work-dir)')
    assert loads == []
    same = SimpleNamespace(work_dir=str(tmp_path / 'r'), iter=0, _load_from=str(checkpoint), optim_wrapper=None,
                           cfg=config(16, 2, 'You are terse.'))
    Runner.resume(same, str(checkpoint), _original=loaded)
    assert loads == [str(checkpoint)]


def test_a_checkpoint_of_the_other_kind_is_refused_in_one_line(tmp_path):
    """A DeepSpeed checkpoint resumed without --deepspeed ended in MMEngine's 'can not be found' (it is a folder);
    a plain one under --deepspeed in an AssertionError of DeepSpeed's loader: each refused, saying how to go on."""
    from xtuner_plugins.engine.resume import saved_kind_refusal

    class DeepSpeedStrategy:   # xtuner's, by its name
        pass
    folder, file = tmp_path / 'ds' / 'iter_2.pth', tmp_path / 'iter_2.pth'
    folder.mkdir(parents=True), file.write_bytes(b'x')
    (folder / 'mp_rank_00_model_states.pt').write_bytes(b'x')
    assert saved_kind_refusal(str(folder), None).endswith('this run trains without --deepspeed; resume it with '
                                                          'the --deepspeed it was saved with, or start a new run '
                                                          'from its weights (model.pretrained_pth=PATH, another '
                                                          '--work-dir)')
    assert 'a checkpoint saved without DeepSpeed (one file)' in saved_kind_refusal(str(file), DeepSpeedStrategy())
    assert saved_kind_refusal(str(file), None) is None and saved_kind_refusal(str(folder), DeepSpeedStrategy()) is None
    assert saved_kind_refusal(str(tmp_path / 'gone.pth'), DeepSpeedStrategy()) is None   # said by the resume itself
    # a folder in a checkpoint's name that DeepSpeed did not save (an empty one, a copy gone wrong): it was called
    # 'a DeepSpeed checkpoint' and the run told to resume it under --deepspeed
    (tmp_path / 'iter_4.pth').mkdir()
    for strategy in (None, DeepSpeedStrategy()):
        assert saved_kind_refusal(str(tmp_path / 'iter_4.pth'), strategy) == (
            f'--resume {tmp_path / "iter_4.pth"}: a folder that holds no checkpoint (a DeepSpeed checkpoint holds '
            '*model_states.pt; other checkpoints are one file); resume from another checkpoint')


def test_resume_true_without_the_pointer_beside_checkpoints_is_refused_not_started_over(tmp_path, capsys):
    """Before, ``resume=True`` in a work folder holding iter_2.pth and iter_4.pth but no ``last_checkpoint`` (a disk
    that filled as the first pointer was written, a folder copied without it) logged 'Did not find last_checkpoint'
    and trained from iteration 0, writing its own iter_2.pth and iter_4.pth over the saved ones. Refused now,
    naming the newest checkpoint; the files are left as they were."""
    first = tmp_path / 'run'
    toy_runner(first, 'nopointer-first', max_iters=4, save_every=2)
    os.remove(first / 'last_checkpoint')
    saved = {name: (first / name).read_bytes() for name in ('iter_2.pth', 'iter_4.pth')}
    with pytest.raises(ResumeError) as refused:
        resume_target(str(first))
    assert str(refused.value) == (
        f'resume=True: {first} holds checkpoints (iter_2.pth, iter_4.pth) but no last_checkpoint, the pointer '
        f'resume=True follows; give the one to resume from with --resume PATH (the newest: {first / "iter_4.pth"}), '
        'or move them away (or give another --work-dir) to start this run over')
    with pytest.raises(SystemExit) as stopped:
        toy_runner(first, 'nopointer-resumed', max_iters=6, save_every=2, resume=True)
    assert stopped.value.code == 2 and f'train: refused: {refused.value}' in capsys.readouterr().err
    assert {name: (first / name).read_bytes() for name in saved} == saved
    assert not (first / 'iter_6.pth').exists()
