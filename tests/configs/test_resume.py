"""Resume after a SIGKILL: the run is killed once a checkpoint exists, resumed with `resume=True`, and the
losses after the resume equal those of an uninterrupted run with the same seed (optimizer, scheduler and
sampler state all come back), for SFT and for preference training. Checkpoint writes are atomic, so a kill
during a save leaves nothing half-written under a checkpoint's name."""

import os
import re
import time

import pytest
import torch

from tests.configs.conftest import ROOT, tiny_options
from tests.train_utils import run_train, train_env
from xtuner_plugins.engine.checkpointing import atomic_write
from xtuner_plugins.launch import TrainJob, train_command

CONFIG = os.path.join(ROOT, 'configs', 'pretrain_mlp.py')


def options(tiny, batch_size=2):
    # 16 shuffled samples: 8 iterations in one process with 2 per batch, or in two with 1 each
    opts = tiny_options(tiny, tiny['mixed'], repeat=8, batch_size=batch_size)
    opts.update({'default_hooks.checkpoint.interval': 2, 'default_hooks.checkpoint.max_keep_ckpts': -1})
    return opts


def paused(config: str) -> str:
    """``config`` held still for a minute once its iteration-4 checkpoint is saved (tests/configs/paused/): an
    iteration of the tiny runs takes ~20 ms, less than the polling below, so an unpaused run may finish first."""
    return os.path.join(ROOT, 'tests', 'configs', 'paused', os.path.basename(config))


def kill_after_checkpoint(tiny, work_dir, name='iter_4.pth', timeout=240, config=CONFIG, opts=None):
    """Start training ``config`` paused after its iteration-4 save (the launcher's command and environment) and
    SIGKILL it, launcher and all, as soon as `last_checkpoint` points at `name`."""
    cmd, env = train_command(paused(config), work_dir, cfg_options=opts or options(tiny))
    os.makedirs(work_dir, exist_ok=True)
    job = TrainJob(cmd, train_env(extra_env=env), os.path.join(work_dir, 'killed_run.log'))
    pointer = os.path.join(work_dir, 'last_checkpoint')
    deadline = time.time() + timeout
    try:
        while time.time() < deadline and job.poll() is None:
            if os.path.isfile(pointer) and open(pointer).read().strip().endswith(name):
                return
            time.sleep(0.05)
        code = job.poll()
    finally:
        job.kill('stopped by the test')  # SIGKILL to the launcher and everything under it
        job.close()
    pytest.fail(f'{name} never appeared (exit code {code})')


def preference_options(tiny, tmp_path):
    """MPO (DPO, BCO with its running reward baseline, which the checkpoint keeps, and the SFT term) on 16 pairs
    (8 iterations of 2), LoRA without dropout: MMEngine does not checkpoint the random state, so LoRA dropout
    draws other masks after a resume (SFT with LoRA dropout too)."""
    from tests.configs.test_dpo import pairs_file
    opts = tiny_options(tiny, pairs_file(tmp_path), repeat=8, lr=5e-3)
    opts.update({'default_hooks.checkpoint.interval': 2, 'default_hooks.checkpoint.max_keep_ckpts': -1,
                 'model.llm_grad_ckpt': False, 'model.preference.types': ['sigmoid', 'bco_pair', 'sft'],
                 'model.preference.weights': [0.8, 0.2, 1.0], 'model.llm_lora.lora_dropout': 0.0})
    return opts


@pytest.mark.slow
@pytest.mark.parametrize('stage', ['sft', 'preference', 'mpo_full'])
def test_resume_after_sigkill_matches_an_uninterrupted_run(tiny, tmp_path, stage):
    """``mpo_full``: full MPO from an SFT checkpoint; the resumed run rebuilds its frozen reference from that
    checkpoint, not from the resumed one."""
    config, opts = CONFIG, options(tiny)
    if stage == 'preference':
        config, opts = os.path.join(ROOT, 'configs', 'dpo_lora.py'), preference_options(tiny, tmp_path)
    if stage == 'mpo_full':
        from tests.configs.test_mpo_full import mpo_options
        config, opts = os.path.join(ROOT, 'configs', 'mpo_full.py'), mpo_options(tiny, tmp_path)
        opts.update({'default_hooks.checkpoint.interval': 2, 'default_hooks.checkpoint.max_keep_ckpts': -1})
    full = run_train(config, str(tmp_path / 'full'), cfg_options=opts)
    assert full.ok, full.summary()
    assert sorted(full.losses) == list(range(1, 9))

    work = str(tmp_path / 'killed')
    kill_after_checkpoint(tiny, work, config=config, opts=opts)
    assert not os.path.exists(os.path.join(work, 'iter_8.pth'))  # it really stopped early
    resumed = run_train(config, work, cfg_options={**opts, 'resume': True})
    assert resumed.ok, resumed.summary()
    assert 'Auto resumed from the latest checkpoint' in resumed.log and 'resumed epoch: 0, iter: 4' in resumed.log
    assert 'missing keys in source state_dict' not in resumed.log  # MMEngine's list of the frozen keys
    assert 'Hooks will be executed' not in resumed.log and 'RuntimeInfoHook' not in resumed.log  # log file only
    if stage == 'sft':  # one line instead: the projector loaded, the frozen encoder and LLM left out by design
        line = (r'resumed from \S+/iter_4\.pth: \d+ tensors loaded; \d+ frozen parameters( and \d+ buffers)? '
                r'not in checkpoints by design \(vision_model\.\*, language_model\.\*\)')
        assert re.search(line, resumed.log), resumed.log[-3000:]
    after = {i: v for i, v in resumed.losses.items() if i > 4}
    assert sorted(after) == [5, 6, 7, 8], resumed.losses
    for i in after:
        assert after[i] == pytest.approx(full.losses[i], abs=1e-6), (i, after[i], full.losses[i])


def test_atomic_write_never_leaves_a_partial_file(tmp_path, monkeypatch):
    target = tmp_path / 'iter_2.pth'
    atomic_write(b'complete old checkpoint', target)

    def crash(*args, **kwargs):
        raise KeyboardInterrupt('killed while saving')
    monkeypatch.setattr(os, 'fsync', crash)
    with pytest.raises(KeyboardInterrupt):
        atomic_write(b'half of a new one', target)
    assert target.read_bytes() == b'complete old checkpoint'
    assert os.listdir(tmp_path) == ['iter_2.pth']  # no temporary file left behind


def test_mmengine_saves_through_it(tmp_path):
    import xtuner_plugins.engine  # noqa: F401 (applies the patches)
    from mmengine.fileio.backends.local_backend import LocalBackend
    from mmengine.runner.checkpoint import load_checkpoint, save_checkpoint
    assert getattr(LocalBackend.put, '_xtuner_plugins_checkpoint_patch', False)
    model = torch.nn.Linear(2, 2)
    from mmengine.logging import HistoryBuffer
    path = str(tmp_path / 'iter_1.pth')
    save_checkpoint({'state_dict': model.state_dict(), 'message_hub': {'x': HistoryBuffer()}}, path)
    loaded = load_checkpoint(torch.nn.Linear(2, 2), path)  # torch >= 2.6 would refuse it by default
    assert isinstance(loaded['message_hub']['x'], HistoryBuffer)


@pytest.mark.slow
def test_deepspeed_zero2_resume(tiny, tmp_path):
    """Resume from a DeepSpeed checkpoint folder: roll a finished 2-process ZeRO-2 run back to iter_4 (as a
    kill after that save would leave it) and resume; iterations 5..8 repeat the same losses."""
    import shutil
    full = run_train(CONFIG, str(tmp_path / 'full'), nproc=2, deepspeed='zero2', cfg_options=options(tiny, 1))
    assert sorted(full.losses) == list(range(1, 9))
    assert full.ok, full.summary()
    work = tmp_path / 'rolled_back'
    shutil.copytree(tmp_path / 'full', work, ignore=shutil.ignore_patterns('iter_6.pth', 'iter_8.pth', '2026*'))
    atomic_write(str(work / 'iter_4.pth'), work / 'last_checkpoint')
    assert os.path.isdir(work / 'iter_4.pth')
    resumed = run_train(CONFIG, str(work), nproc=2, deepspeed='zero2',
                        cfg_options={**options(tiny, 1), 'resume': True})
    assert resumed.ok, resumed.summary()
    assert 'resumed epoch: 0, iter: 4' in resumed.log
    after = {i: v for i, v in resumed.losses.items() if i > 4}
    assert sorted(after) == [5, 6, 7, 8], resumed.losses
    for i in after:
        assert after[i] == pytest.approx(full.losses[i], abs=1e-6), (i, after[i], full.losses[i])


TRAIN_TOOL = os.path.join(ROOT, 'tools', 'train.py')


@pytest.mark.slow
def test_resume_from_a_named_checkpoint_through_our_entry_point(tiny, tmp_path):
    """The README's `--resume work_dirs/<cfg>/iter_N.pth`: XTuner's script reads the checkpoint's seed with
    torch.load's weights_only default and crashes; tools/train.py resumes and continues the same run."""
    full = run_train(CONFIG, str(tmp_path / 'full'), cfg_options=options(tiny))
    assert full.ok, full.summary()
    checkpoint = os.path.join(full.work_dir, 'iter_4.pth')
    plain = run_train(CONFIG, str(tmp_path / 'plain'), cfg_options=options(tiny), extra_args=['--resume', checkpoint])
    assert not plain.ok and 'Weights only load failed' in plain.log
    resumed = run_train(CONFIG, str(tmp_path / 'resumed'), cfg_options=options(tiny), script=TRAIN_TOOL,
                        extra_args=['--resume', checkpoint])
    assert resumed.ok, resumed.summary()
    assert 'resumed epoch: 0, iter: 4' in resumed.log
    after = {i: v for i, v in resumed.losses.items() if i > 4}
    assert sorted(after) == [5, 6, 7, 8], resumed.losses
    for i in after:
        assert after[i] == pytest.approx(full.losses[i], abs=1e-6), (i, after[i], full.losses[i])


@pytest.mark.slow
def test_a_resume_given_only_its_checkpoint_goes_on_with_the_settings_recorded_in_it(tiny, tmp_path):
    """A run started with ``--cfg-options`` for its models, data, batches and optimizer, resumed with ``--resume``
    alone: it stopped on the config file's example folder (``vision encoder folder not found``); now it takes
    them from the checkpoint, says so in its log, and its losses are the uninterrupted run's. A setting the command
    line names otherwise than the checkpoint's is still refused, at the config file's own value too."""
    full = run_train(CONFIG, str(tmp_path / 'full'), cfg_options=options(tiny))
    assert full.ok, full.summary()
    checkpoint = os.path.join(full.work_dir, 'iter_4.pth')
    logging = {'default_hooks.logger.interval': 1, 'log_processor.window_size': 1}
    resumed = run_train(CONFIG, str(tmp_path / 'resumed'), cfg_options=logging, script=TRAIN_TOOL,
                        extra_args=['--resume', checkpoint])
    assert resumed.ok, resumed.summary()
    assert f'--resume {checkpoint}: goes on with the settings it was trained with' in resumed.log
    logs = [os.path.join(d, f) for d, _, files in os.walk(resumed.work_dir) for f in files if f.endswith('.log')
            and f != 'train_output.log']
    assert any('goes on with the settings' in open(p).read() for p in logs), logs   # the run's own log file
    assert f"model.llm='{tiny['llm']}' (the config: " in resumed.log, resumed.log[-3000:]
    # each was named on the run's command line, which its checkpoints record: none is said as the file's edit
    assert 'model.llm' in torch.load(checkpoint, map_location='cpu', weights_only=False)['meta']['cfg_named']
    assert 'the config file gives otherwise' not in resumed.log, resumed.log[-3000:]
    assert os.path.isfile(os.path.join(resumed.work_dir, 'iter_6.pth'))   # every 2 iterations, not the file's 500
    after = {i: v for i, v in resumed.losses.items() if i > 4}
    assert sorted(after) == [5, 6, 7, 8], resumed.losses
    for i in after:
        assert after[i] == pytest.approx(full.losses[i], abs=1e-6), (i, after[i], full.losses[i])
    other = run_train(CONFIG, str(tmp_path / 'other'), script=TRAIN_TOOL, extra_args=['--resume', checkpoint],
                      cfg_options={'train_dataloader.dataset.max_dynamic_patch': 12})   # the file's own
    assert not other.ok and 'train_dataloader.dataset.max_dynamic_patch: trained 4, given 12' in other.log, \
        other.log[-3000:]


class _Opens:
    """Unpickled, opens (creates) a file: what a tampered checkpoint in a shared work folder carries."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return open, (self.path, 'w')


def test_a_tampered_checkpoint_is_refused_by_resume_before_it_runs(tiny, tmp_path):
    """`--resume PATH` (XTuner's seed reader, then the runner) and `resume=True` (the runner, following
    last_checkpoint) read the checkpoint as training state: one that pickles anything else is refused in one
    line naming the file and the global, and nothing in it runs (both unpickled it whole before)."""
    full = run_train(CONFIG, str(tmp_path / 'full'), cfg_options=options(tiny))
    assert full.ok, full.summary()
    checkpoint = os.path.join(full.work_dir, 'iter_8.pth')
    state = torch.load(checkpoint, map_location='cpu', weights_only=False)
    marker = str(tmp_path / 'ran')
    state['meta']['note'] = _Opens(marker)
    torch.save(state, checkpoint)
    for how, extra in (('--resume', dict(extra_args=['--resume', checkpoint])),
                       ('resume=True', dict(cfg_options=dict(options(tiny), resume=True), work_dir=full.work_dir))):
        out = run_train(CONFIG, extra.pop('work_dir', str(tmp_path / 'resumed')), script=TRAIN_TOOL,
                        require_checkpoint=False, **dict(dict(cfg_options=options(tiny)), **extra))
        assert out.returncode == 2, (how, out.summary())
        last = out.log.rstrip().splitlines()[-1]
        assert last.startswith(f'train: refused: {checkpoint} names io.open, which training checkpoints never '
                               'hold'), (how, last)
        assert not os.path.exists(marker), how


def test_our_entry_point_exits_non_zero_when_the_model_cannot_load(tiny, tmp_path):
    """A model.llm that is no folder and not in the cache: refused in one line naming the key (exit code 2, no
    traceback), where xtuner train exits 0."""
    bad = dict(tiny_options(tiny, tiny['same'], repeat=1), **{'model.llm': str(tmp_path / 'no_llm')})
    out = run_train(CONFIG, str(tmp_path / 'work'), cfg_options=bad, script=TRAIN_TOOL, require_checkpoint=False)
    assert out.returncode == 2 and 'Traceback' not in out.log, out.summary()
    assert out.log.rstrip().splitlines()[-1].startswith("train: refused: model.llm: '"), out.log[-2000:]


def test_our_entry_point_refuses_cfg_options_that_would_change_nothing(tiny, tmp_path):
    opts = dict(tiny_options(tiny, tiny['same'], repeat=1), llm_path=tiny['llm'])
    out = run_train(CONFIG, str(tmp_path / 'work'), cfg_options=opts, script=TRAIN_TOOL, require_checkpoint=False)
    assert out.returncode == 2 and 'llm_path: a variable of the config file' in out.log
    assert 'model.llm' in out.log.split('llm_path: a variable')[1] and 'instead' in out.log, out.log[-2000:]


def test_a_stage_is_refused_a_work_dir_holding_its_parent(tmp_path):
    """Issue 46: `model.pretrained_pth=WD/iter_6.pth --work-dir WD` wrote over the parent's iter_6.pth; now one line
    before anything is built or written."""
    from xtuner_plugins.models.lineage import lineage_record
    work = tmp_path / 'warmup'
    work.mkdir()
    parent = str(work / 'iter_6.pth')
    torch.save({'meta': {'lineage': lineage_record({}, None)}, 'state_dict': {}}, parent)
    out = run_train(os.path.join(ROOT, 'configs', 'finetune_lora.py'), str(work), script=TRAIN_TOOL,
                    cfg_options={'model.pretrained_pth': parent}, require_checkpoint=False, timeout=240)
    lines = [line for line in out.log.splitlines() if line.strip()]
    assert out.returncode == 2 and 'Traceback' not in out.log, out.summary()
    assert lines[-1] == (f"train: refused: model.pretrained_pth={parent} is in this run's work folder {work}: the "
                         "run's own checkpoints (iter_N.pth, last_checkpoint) would write over it; give this stage "
                         "another --work-dir"), out.summary()
    assert sorted(os.listdir(work)) == ['iter_6.pth', 'train_output.log']  # run_train's copy of the output
