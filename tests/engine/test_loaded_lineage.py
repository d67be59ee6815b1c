"""The previous stage of a resumed or loaded checkpoint (``engine/loaded_lineage.py``): a resume and a
``load_from`` over another ``model.pretrained_pth`` than the checkpoint's recorded one put its adapters on another
model without a word (a helper's sweep); one left unset is taken from the checkpoint."""

import os
import shutil

import pytest
import torch
from mmengine.config import Config
from mmengine.runner import Runner

from xtuner_plugins.engine.loaded_lineage import preference_from_other_stage, previous_stage_of_loaded
from xtuner_plugins.models.lineage import lineage_record


def _checkpoint(path, pretrained=None, content=0):
    """A training checkpoint whose lineage names ``pretrained`` as its previous stage (``content``: what tells two
    checkpoints apart)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save({'meta': {'lineage': lineage_record({}, pretrained)}, 'state_dict': {'x': torch.tensor(content)}},
               path)
    return path


@pytest.fixture
def stages(tmp_path):
    warm = _checkpoint(str(tmp_path / 'pre' / 'iter_2.pth'))
    return dict(warm=warm, sft=_checkpoint(str(tmp_path / 'sft' / 'iter_2.pth'), warm),
                other=_checkpoint(str(tmp_path / 'other' / 'iter_2.pth'), content=1))


def test_an_unset_previous_stage_is_taken_from_the_checkpoint(stages, tmp_path):
    for cfg in (dict(load_from=stages['sft'], resume=True, model={}), dict(load_from=stages['sft'], model={}),
                dict(resume=True, work_dir=os.path.dirname(stages['sft']), model={})):
        if 'work_dir' in cfg:
            with open(os.path.join(cfg['work_dir'], 'last_checkpoint'), 'w') as f:
                f.write(stages['sft'])
        assert previous_stage_of_loaded(cfg) is None
        assert cfg['model']['pretrained_pth'] == stages['warm'], cfg
    # moved: found beside the checkpoint by its content
    moved = shutil.move(stages['warm'], os.path.join(os.path.dirname(stages['sft']), 'warm.pth'))
    cfg = dict(load_from=stages['sft'], resume=True, model={})
    assert previous_stage_of_loaded(cfg) is None and cfg['model']['pretrained_pth'] == moved
    os.remove(moved)
    assert previous_stage_of_loaded(dict(load_from=stages['sft'], resume=True, model={})).startswith(
        f'--resume {stages["sft"]}: {stages["warm"]}: the previous stage of {stages["sft"]} (recorded in it, at '
        f'{stages["warm"]}) is not found')


def test_another_previous_stage_is_refused_naming_both(stages, tmp_path):
    for resume, what in ((True, '--resume'), (False, 'load_from=')):
        cfg = dict(load_from=stages['sft'], resume=resume, model=dict(pretrained_pth=stages['other']))
        problem = previous_stage_of_loaded(cfg)
        assert problem.startswith(
            f'{what}{"" if what.endswith("=") else " "}{stages["sft"]} was trained from {stages["warm"]} (its '
            f'recorded previous stage, at {stages["warm"]}), and this run gives model.pretrained_pth='
            f'{stages["other"]}, another checkpoint ('), problem
        assert problem.endswith('leave model.pretrained_pth out (the recorded one is taken) or give that one')
    copy = shutil.copy(stages['warm'], tmp_path / 'copy.pth')   # the same checkpoint elsewhere: fine
    assert previous_stage_of_loaded(dict(load_from=stages['sft'], resume=True,
                                         model=dict(pretrained_pth=str(copy)))) is None
    # a checkpoint trained from no previous stage, resumed over one
    assert previous_stage_of_loaded(dict(load_from=stages['warm'], resume=True, model=dict(
        pretrained_pth=stages['other']))).startswith(f'--resume {stages["warm"]} was trained from no previous stage')
    assert previous_stage_of_loaded(dict(load_from=stages['warm'], model=dict(pretrained_pth=stages['other']))) \
        is None   # load_from: a new run may start from a warm-up's weights over another
    assert previous_stage_of_loaded(dict(load_from=stages['warm'], resume=True, model={})) is None


def test_training_refuses_it_at_start_up(stages, tmp_path, capsys):
    cfg = Config(dict(model=dict(pretrained_pth=stages['other']), work_dir=str(tmp_path / 'w'),
                      load_from=stages['sft'], resume=True))
    with pytest.raises(SystemExit) as stopped:
        Runner.from_cfg(cfg)
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f'train: refused: --resume {stages["sft"]} was trained from {stages["warm"]}'), err


def _recorded(path, model_cfg, pretrained=None):
    """A checkpoint whose recorded training config (``meta['cfg']``) sets ``model`` to ``model_cfg``."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save({'meta': {'lineage': lineage_record({}, pretrained), 'cfg': f'model = {model_cfg!r}\n'},
                'state_dict': {'x': torch.tensor(0)}}, path)
    return path


DPO = dict(types=('sigmoid',), beta=0.1)
LORA = dict(r=4, lora_alpha=8)


@pytest.fixture
def preference_stages(stages, tmp_path):
    """An SFT checkpoint (full and LoRA) after ``stages['warm']``, and LoRA and full preference checkpoints after
    them, each with its training config recorded."""
    sft = _recorded(str(tmp_path / 'sft_full' / 'iter_3.pth'), dict(preference=None, llm_lora=None), stages['warm'])
    sft_lora = _recorded(str(tmp_path / 'sft_lora' / 'iter_3.pth'), dict(llm_lora=LORA), stages['warm'])
    return dict(stages, sft_full=sft, sft_lora=sft_lora,
                dpo_lora=_recorded(str(tmp_path / 'dpo' / 'iter_2.pth'), dict(llm_lora=LORA, preference=DPO), sft_lora),
                mpo_full=_recorded(str(tmp_path / 'mpo' / 'iter_2.pth'), dict(preference=DPO), sft))


def test_a_preference_run_loading_another_stage_is_refused(preference_stages):
    """load_from=<an SFT checkpoint> into a preference config built the reference from the SFT's previous stage (the
    warm-up: rewards_margin 0.119 at the first step), and a LoRA DPO lost the SFT's projector (a helper's sweep)."""
    s = preference_stages
    for sft, lora in ((s['sft_full'], None), (s['sft_lora'], LORA), (s['sft_full'], LORA)):
        problem = preference_from_other_stage(dict(load_from=sft, model=dict(preference=DPO, llm_lora=lora)))
        assert problem.startswith(f'load_from={sft} is a checkpoint of another stage (its recorded config trains no '
                                  'model.preference), and this preference run builds its reference policy'), problem
        assert problem.endswith(f'give it as model.pretrained_pth={sft} (the reference model is built from it) and '
                                'leave load_from out'), problem
        assert ('adapters off' if lora else 'frozen copies') in problem
    problem = preference_from_other_stage(dict(load_from=s['dpo_lora'], model=dict(preference=DPO)))
    assert problem.startswith(f'load_from={s["dpo_lora"]} trained with LoRA adapters on the LLM (model.llm_lora) and '
                              'this preference run trains its LLM whole (no model.llm_lora)'), problem
    assert preference_from_other_stage(dict(load_from=s['mpo_full'], model=dict(preference=DPO, llm_lora=LORA)))
    # what keeps working: a preference checkpoint of the same kind (a new run from its weights), a resume, the
    # SFT as model.pretrained_pth, a run that is no preference one, a checkpoint that records no config
    for cfg in (dict(load_from=s['dpo_lora'], model=dict(preference=DPO, llm_lora=LORA)),
                dict(load_from=s['mpo_full'], model=dict(preference=DPO)),
                dict(load_from=s['sft_full'], resume=True, model=dict(preference=DPO)),
                dict(load_from=None, model=dict(preference=DPO, pretrained_pth=s['sft_full'])),
                dict(load_from=s['sft_full'], model=dict(llm_lora=LORA)),
                dict(load_from=s['sft'], model=dict(preference=DPO))):
        assert preference_from_other_stage(cfg) is None, cfg


def test_training_refuses_a_preference_run_loading_another_stage(preference_stages, tmp_path, capsys):
    sft = preference_stages['sft_full']
    cfg = Config(dict(model=dict(preference=DPO), work_dir=str(tmp_path / 'w'), load_from=sft))
    with pytest.raises(SystemExit) as stopped:
        Runner.from_cfg(cfg)
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f'train: refused: load_from={sft} is a checkpoint of another stage'), err
    assert len(err.strip().splitlines()) == 1, err
