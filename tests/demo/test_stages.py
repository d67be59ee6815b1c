"""The demo finds its stage configs without the repository root: in ``--configs DIR`` or the checkout's
``configs/`` (xtuner_plugins.demo.stages), and says what to pass when it has neither."""

import os
import shutil

import pytest

from xtuner_plugins.demo import run, stages
from xtuner_plugins.demo.console import DemoError

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_the_checkouts_configs_by_default():
    assert stages.DEFAULT_CONFIGS == os.path.join(ROOT, 'configs')
    assert stages.demo_configs() == {'pretrain': os.path.join(ROOT, 'configs', 'demo', 'pretrain_mlp.py'),
                                     'full': os.path.join(ROOT, 'configs', 'demo', 'finetune_full.py'),
                                     'lora': os.path.join(ROOT, 'configs', 'demo', 'finetune_lora.py'),
                                     'preference': os.path.join(ROOT, 'configs', 'demo', 'dpo_lora.py'),
                                     'preference_full': os.path.join(ROOT, 'configs', 'demo', 'mpo_full.py')}


def test_the_preference_stage_trains_lora_or_projector_and_llm():
    from xtuner_plugins.demo.recipe import Recipe
    configs = stages.demo_configs()
    full = Recipe(preference='mpo')   # by default, what the fine-tune trained: full
    assert stages.preference_config(full, configs) == configs['preference_full'] and full.preference_rate == 1e-4
    lora = Recipe(preference='mpo', finetune='lora')
    assert stages.preference_config(lora, configs) == configs['preference'] and lora.preference_rate == 1e-3
    lora = Recipe(preference='mpo', preference_train='lora', preference_lr=3e-4)
    assert stages.preference_config(lora, configs) == configs['preference'] and lora.preference_rate == 3e-4
    models = {'vision': 'V', 'llm': 'L'}
    geometry = {'image_size': 56, 'num_image_token': 4, 'image_mode': 'tile', 'image_mean': (0.5, 0.5, 0.5)}
    options = stages.stage_options('preference', full, models, 'pairs.jsonl', 'images', 'cache', geometry=geometry)
    assert options['model.freeze_vision'] is True and options['model.preference.beta'] == full.preference_beta
    assert options['optim_wrapper.optimizer.lr'] == 1e-4
    options = stages.stage_options('preference', lora, models, 'pairs.jsonl', 'images', 'cache', geometry=geometry)
    assert 'model.freeze_vision' not in options and options['optim_wrapper.optimizer.lr'] == 3e-4
    with pytest.raises(DemoError, match='preference_train=full needs finetune=full'):
        stages.preference_config(Recipe(preference='mpo', preference_train='full', finetune='lora'), configs)
    with pytest.raises(DemoError, match="preference_train='qlora': use lora or full"):
        stages.preference_config(Recipe(preference='mpo', preference_train='qlora'), configs)


def test_configs_from_a_given_folder_and_its_deepspeed_jsons(tmp_path):
    copy = tmp_path / 'my_configs'
    shutil.copytree(os.path.join(ROOT, 'configs'), copy)
    configs = stages.demo_configs(str(copy))
    assert configs['full'] == str(copy / 'demo' / 'finetune_full.py') and all(map(os.path.isfile, configs.values()))
    assert stages.deepspeed_json('zero3', configs) == str(copy / 'deepspeed' / 'zero3_cpu.json')
    assert os.path.isfile(stages.deepspeed_json('zero2', configs))
    assert stages.deepspeed_json(None, configs) is None
    with pytest.raises(ValueError, match="zero2, zero3 or a JSON file, got 'zero9'"):
        stages.deepspeed_json('zero9', configs)


def test_a_folder_without_the_demo_configs_is_named(tmp_path):
    (tmp_path / 'demo').mkdir()
    (tmp_path / 'demo' / 'pretrain_mlp.py').write_text('')
    with pytest.raises(DemoError) as err:
        stages.demo_configs(str(tmp_path))
    assert str(tmp_path / 'demo' / 'finetune_full.py') in str(err.value)
    assert 'pretrain_mlp.py' not in str(err.value).split('; pass')[0].replace(str(tmp_path), '')


def test_installed_without_the_checkout_it_asks_for_configs(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(stages, 'DEFAULT_CONFIGS', None)
    with pytest.raises(DemoError, match='pass --configs DIR'):
        stages.demo_configs()
    # the command line: a clear failure before anything is made, exit code 1
    work = tmp_path / 'demo'
    assert run.main(['--work-dir', str(work), '--recipe', 'quick']) == 1
    assert 'demo failed: ' in capsys.readouterr().out and sorted(os.listdir(work)) == ['demo.log']
    assert run.main(['--work-dir', str(work), '--configs', str(tmp_path / 'nowhere')]) == 1
    assert 'nowhere' in capsys.readouterr().out


def test_a_work_dir_that_is_no_demo_run_is_refused_untouched(tmp_path, capsys):
    """--work-dir naming a folder of the user's (work_dirs, where the stage configs' own runs are): the demo
    replaced its pretrain_mlp/ run and overwrote data/sft.jsonl. Refused before anything is written there; an
    earlier demo run (its recipe.json) or a folder holding only a demo.log is run into as before."""
    work = tmp_path / 'work_dirs'
    (work / 'pretrain_mlp').mkdir(parents=True)
    (work / 'pretrain_mlp' / 'iter_500.pth').write_bytes(b'weeks of training')
    (work / 'data').mkdir()
    (work / 'data' / 'sft.jsonl').write_text('hand-labelled\n')
    before = sorted(p.name for p in work.rglob('*'))
    assert run.main(['--work-dir', str(work), '--recipe', 'quick']) == 2
    assert capsys.readouterr().err.strip() == (
        f'demo: refused: --work-dir {work} holds data, pretrain_mlp and is no earlier demo run (no recipe.json): the '
        'demo replaces its stage folders and data there; give a new or empty folder, or an earlier demo run\'s')
    assert sorted(p.name for p in work.rglob('*')) == before
    with pytest.raises(DemoError, match='is no earlier demo run'):
        run.run_demo(str(work), run.RECIPES['quick'])
    assert (work / 'data' / 'sft.jsonl').read_text() == 'hand-labelled\n'
    (work / 'recipe.json').write_text('{}')   # an earlier demo run's
    assert run.not_a_demo_run(str(work)) is None
    only_log = tmp_path / 'fresh'
    only_log.mkdir()
    (only_log / 'demo.log').write_text('')
    assert run.not_a_demo_run(str(only_log)) is None and run.not_a_demo_run(str(tmp_path / 'new')) is None


def test_a_work_dir_this_user_cannot_make_is_one_line(tmp_path, capsys, monkeypatch):
    """A read-only checkout (its work_dirs/ not this user's) stopped the demo in the lock's makedirs with a
    PermissionError traceback. The tests run as root: the kernel's refusal is raised where the folder is made."""
    from xtuner_plugins.engine import lockfile
    work = tmp_path / 'ro' / 'demo'

    def refused(path, *args, **kwargs):
        raise PermissionError(13, 'Permission denied', str(tmp_path / 'ro'))
    monkeypatch.setattr(lockfile.os, 'makedirs', refused)
    assert run.main(['--work-dir', str(work), '--recipe', 'quick']) == 2
    assert capsys.readouterr().err.strip() == (
        f'demo: refused: --work-dir {work} cannot be written: Permission denied ({tmp_path}/ro)')


@pytest.mark.parametrize('argv, says', [
    (['--set', 'finetune_iters=abc'], '--set finetune_iters=abc: expected an integer'),
    (['--set', 'finetune_lr=fast'], '--set finetune_lr=fast: expected a number'),
    (['--set', 'n_test=0'], '--set: n_test=0: needs 1 or more'),            # failed after all the training
    (['--set', 'n_sft=0'], '--set: n_sft=0: needs 1 or more'),              # failed after the warm-up
    (['--set', 'preference=xyz'], "--set: preference='xyz': use one of '', 'dpo', 'mpo'"),  # KeyError after training
    (['--set', 'finetune=qlora'], "--set: finetune='qlora': use one of 'full', 'lora'"),
    (['--set', 'kinds=colour,bogus'], '--set: kinds=colour,bogus: bogus not among colour'),
    (['--set', 'video=bogus'], '--set: video=bogus: use all, or kinds among motion_x'),
    (['--set', 'vision=foo'], "--set: vision='foo': use one of 'internvit'"),
    (['--set', 'tile_size=0'], '--set: tile_size=0: needs 1 or more'),
    (['--nproc-per-node', '0'], 'error: --nproc-per-node 0: needs 1 or more'),
    (['--deepspeed', 'bogus'], 'error: --deepspeed bogus: use zero2, zero3 or a DeepSpeed JSON file'),
    (['--nproc-per-node', '3'], 'demo: refused: pretrain_batch=16, finetune_batch=16 does not split over 3 processes'),
])
def test_a_recipe_or_option_that_cannot_run_is_one_line_before_anything_is_written(tmp_path, capsys, argv, says):
    """Each was a traceback, several of them only after minutes of training."""
    work = tmp_path / 'demo'
    try:
        code = run.main(['--work-dir', str(work), '--recipe', 'quick'] + argv)
    except SystemExit as exit:
        code, err = exit.code, str(exit.code) + capsys.readouterr().err
    else:
        err = capsys.readouterr().err
    assert code not in (0, None) and says in err, (code, err)
    assert 'Traceback' not in err and not work.exists()


def test_a_non_number_nproc_per_node_in_the_environment_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv('NPROC_PER_NODE', 'abc')
    with pytest.raises(SystemExit) as exit:
        run.main(['--work-dir', str(tmp_path / 'demo')])
    assert exit.value.code == 2
    assert "NPROC_PER_NODE='abc': expected a number of processes" in capsys.readouterr().err


def test_a_second_demo_into_a_folder_in_use_is_refused(tmp_path, capsys):
    """Two demos in one --work-dir: the second deleted the first's stage folders under it (its run then failed,
    naming a log the second had rewritten)."""
    from xtuner_plugins.engine.lockfile import RunLock
    work = tmp_path / 'demo'
    first = RunLock(str(work))
    first.acquire()
    try:
        assert run.main(['--work-dir', str(work), '--recipe', 'quick']) == 2
        assert 'is in use by another run' in capsys.readouterr().err
        assert sorted(os.listdir(work)) == ['run.lock']
    finally:
        first.release()


def test_preference_only_needs_a_whole_run(tmp_path, capsys, monkeypatch):
    """A rerun stopped halfway left the first run's checkpoint and converted folder beside its own recipe.json
    (and its warm-up folder gone): --preference-only took it and failed after drawing the pairs. A run removes the
    earlier result.json as it starts, and --preference-only needs one."""
    work = tmp_path / 'demo'
    work.mkdir()
    (work / 'recipe.json').write_text('{}')
    (work / 'result.json').write_text('{"recipe": {}}')   # the earlier whole run's

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(run, 'make_models', stopped)      # the rerun stopped at its first stage
    assert run.main(['--work-dir', str(work), '--recipe', 'quick']) == 130
    assert not (work / 'result.json').exists()
    assert run.main(['--work-dir', str(work), '--recipe', 'quick', '--preference-only', '--set', 'preference=mpo']) == 1
    assert 'needs a whole demo run' in (work / 'demo.log').read_text()
