"""engine/keep.py: a checkpoint a later stage was trained from is kept out of its run's rotation."""

import os

from mmengine.hooks import Hook
from mmengine.registry import HOOKS

from tests.engine.test_resume import _log_of, toy_runner
from xtuner_plugins.engine.keep import KEPT_SUFFIX, kept_by, mark_kept


def test_a_checkpoint_a_later_stage_started_from_survives_the_rotation(tmp_path):
    """The warm-up resumed for more iterations after a fine-tune started from its iter_1: the rotation
    (max_keep_ckpts=2) deleted iter_1, and the fine-tune could no longer be converted. Marked, it stays; the
    others rotate as before."""
    work = tmp_path / 'warmup'
    keep = {'default_hooks.checkpoint.max_keep_ckpts': 2}
    toy_runner(work, 'keep-first', max_iters=2, save_every=1, **keep)
    assert sorted(p for p in os.listdir(work) if p.endswith('.pth')) == ['iter_1.pth', 'iter_2.pth']
    assert mark_kept(str(work / 'iter_1.pth'), str(tmp_path / 'finetune')) is None
    assert mark_kept(str(work / 'iter_1.pth'), str(tmp_path / 'finetune')) is None   # once a folder
    assert (work / f'iter_1.pth{KEPT_SUFFIX}').read_text() == f'{tmp_path / "finetune"}\n'
    assert kept_by(str(work / 'iter_1.pth')) == str(tmp_path / 'finetune') and kept_by(str(work / 'iter_2.pth')) is None
    toy_runner(work, 'keep-more', max_iters=5, save_every=1, resume=True, **keep)
    assert sorted(p for p in os.listdir(work) if p.endswith('.pth')) == ['iter_1.pth', 'iter_4.pth', 'iter_5.pth']
    assert f'{work}/iter_1.pth is kept, not rotated out: {tmp_path / "finetune"} was trained from it' in \
        _log_of(work, 'keep-more')


def test_a_stage_in_its_own_folder_or_an_unwritable_one_keeps_no_mark(tmp_path):
    (tmp_path / 'iter_2.pth').write_text('x')
    assert mark_kept(str(tmp_path / 'iter_2.pth'), str(tmp_path)) is None
    assert not os.path.exists(tmp_path / f'iter_2.pth{KEPT_SUFFIX}')
    assert mark_kept(str(tmp_path / 'gone.pth'), str(tmp_path / 'b')) is None
    os.chmod(tmp_path, 0o500)
    try:
        if os.access(tmp_path, os.W_OK):   # root writes anyway
            return
        warning = mark_kept(str(tmp_path / 'iter_2.pth'), str(tmp_path / 'b'))
        assert warning.startswith(f'{tmp_path}/iter_2.pth{KEPT_SUFFIX}: cannot be written') and 'keep a copy' in warning
    finally:
        os.chmod(tmp_path, 0o700)


def test_a_resume_with_fewer_kept_checkpoints_keeps_a_marked_one(tmp_path, monkeypatch):
    """MMEngine also deletes old checkpoints when a resume keeps fewer than the saved run did (its before_train,
    from the saved keep_ckpt_ids): a marked one is left out of that too. (Named on the command line: a resume
    takes the saved run's number otherwise, engine/resumed_settings.py.)"""
    work = tmp_path / 'warmup'
    toy_runner(work, 'fewer-first', max_iters=3, save_every=1, **{'default_hooks.checkpoint.max_keep_ckpts': 3})
    mark_kept(str(work / 'iter_1.pth'), str(tmp_path / 'finetune'))
    monkeypatch.setattr('sys.argv', ['train', 'toy.py', '--cfg-options', 'default_hooks.checkpoint.max_keep_ckpts=1'])
    toy_runner(work, 'fewer-more', max_iters=4, save_every=1, resume=True,
               **{'default_hooks.checkpoint.max_keep_ckpts': 1})
    assert sorted(p for p in os.listdir(work) if p.endswith('.pth')) == ['iter_1.pth', 'iter_4.pth']


def test_a_run_marks_what_it_starts_from_once_it_holds_its_work_folder(tmp_path):
    """The mark is written when the run takes its work folder's lock (as the runner dumps its config): a second run
    refused there, another being alive in the folder, marked the checkpoint all the same (kept ever after)."""
    from types import SimpleNamespace

    import xtuner_plugins.engine  # noqa: F401 (the patches)
    from mmengine.config import Config
    from mmengine.runner import Runner

    from xtuner_plugins.engine.lockfile import RunLock
    from xtuner_plugins.engine.runlock import RunLockHook
    (tmp_path / 'warmup').mkdir()
    parent = tmp_path / 'warmup' / 'iter_1.pth'
    parent.write_text('x')
    work = tmp_path / 'finetune'
    work.mkdir()

    def build():
        runner = SimpleNamespace(_hooks=[RunLockHook()], work_dir=str(work), timestamp='T',
                                 cfg=Config(dict(model=dict(pretrained_pth=str(parent)), work_dir=str(work))))
        Runner.dump_config(runner, _original=lambda r: None)
        return runner._hooks[0]
    alive = RunLock(str(work))
    alive.acquire()
    try:
        assert build().refused and kept_by(str(parent)) is None
    finally:
        alive.release()
    hook = build()
    try:
        assert not hook.refused and kept_by(str(parent)) == str(work)
    finally:
        hook.lock.release()


class _SeesTheFolder(Hook):
    """Lists the work folder's checkpoints as each save begins (before a byte of it is written)."""
    seen = []

    def before_save_checkpoint(self, runner, checkpoint):
        self.seen.append(sorted(p for p in os.listdir(runner.work_dir) if p.endswith('.pth')))


HOOKS.register_module(module=_SeesTheFolder, force=True)   # by name: a config's dump cannot write a class


def test_the_oldest_checkpoint_is_deleted_only_once_the_new_one_is_written(tmp_path):
    """MMEngine deleted it before writing the new one: with max_keep_ckpts=1 a run killed while it saved was left
    with no checkpoint, its last_checkpoint naming the one deleted. A resume then finds the deleted one gone."""
    work = tmp_path / 'run'
    _SeesTheFolder.seen = []
    keep = {'default_hooks.checkpoint.max_keep_ckpts': 1, 'custom_hooks': [dict(type='_SeesTheFolder')]}
    toy_runner(work, 'rotate-first', max_iters=3, save_every=1, **keep)
    assert _SeesTheFolder.seen == [[], ['iter_1.pth'], ['iter_2.pth']]
    assert sorted(p for p in os.listdir(work) if p.endswith('.pth')) == ['iter_3.pth']
    runner = toy_runner(work, 'rotate-more', max_iters=5, save_every=1, resume=True, **keep)
    assert runner.iter == 5 and sorted(p for p in os.listdir(work) if p.endswith('.pth')) == ['iter_5.pth']
    assert _SeesTheFolder.seen[-2:] == [['iter_3.pth'], ['iter_4.pth']]


def test_a_file_name_without_the_step_keeps_the_one_file_it_names(tmp_path):
    """``filename_tmpl=model.pth`` names every save the same file: the rotation, deleting after the save, deleted
    the one just written each time, and the run ended 'no checkpoint saved', exit 0, ``last_checkpoint`` naming a
    file that was not there."""
    work = tmp_path / 'run'
    keep = {'default_hooks.checkpoint.max_keep_ckpts': 1, 'default_hooks.checkpoint.filename_tmpl': 'model.pth'}
    toy_runner(work, 'one-name', max_iters=3, save_every=1, **keep)
    assert sorted(p for p in os.listdir(work) if p.endswith('.pth')) == ['model.pth']
    with open(work / 'last_checkpoint') as f:
        assert os.path.isfile(f.read().strip())
