"""The previous stage of a resumed or loaded checkpoint (``engine/loaded_lineage.py``): a resume and a
``load_from`` over another ``model.pretrained_pth`` than the checkpoint's recorded one put its adapters on another
model without a word (a helper's sweep); one left unset is taken from the checkpoint."""

import os
import shutil

import pytest
import torch
from mmengine.config import Config
from mmengine.runner import Runner

from xtuner_plugins.engine.loaded_lineage import load_from_other_stage, previous_stage_of_loaded
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
    sft = _recorded(str(tmp_path / 'sft_full' / 'iter_3.pth'), dict(preference=None, llm_lora=None, freeze_llm=False),
                    stages['warm'])
    sft_lora = _recorded(str(tmp_path / 'sft_lora' / 'iter_3.pth'), dict(llm_lora=LORA), stages['warm'])
    return dict(stages, sft_full=sft, sft_lora=sft_lora,
                dpo_lora=_recorded(str(tmp_path / 'dpo' / 'iter_2.pth'), dict(llm_lora=LORA, preference=DPO), sft_lora),
                mpo_full=_recorded(str(tmp_path / 'mpo' / 'iter_2.pth'), dict(preference=DPO, freeze_llm=False), sft))


def test_a_preference_run_loading_another_stage_is_refused(preference_stages):
    """load_from=<an SFT checkpoint> into a preference config built the reference from the SFT's previous stage (the
    warm-up: rewards_margin 0.119 at the first step), and a LoRA DPO lost the SFT's projector (a helper's sweep)."""
    s = preference_stages
    for sft, lora in ((s['sft_full'], None), (s['sft_lora'], LORA), (s['sft_full'], LORA)):
        problem = load_from_other_stage(dict(load_from=sft, model=dict(preference=DPO, llm_lora=lora)))
        assert problem.startswith(f'load_from={sft} is a checkpoint of another stage (its recorded config trains no '
                                  'model.preference), and this preference run builds its reference policy'), problem
        assert problem.endswith(f'give it as model.pretrained_pth={sft} (the reference model is built from it) and '
                                'leave load_from out'), problem
        assert ('adapters off' if lora else 'frozen copies') in problem
    problem = load_from_other_stage(dict(load_from=s['dpo_lora'], model=dict(preference=DPO, freeze_llm=False)))
    assert problem == (
        f'load_from={s["dpo_lora"]} is a checkpoint of another stage: it trained LoRA adapters on the LLM and the '
        "projector, and this run trains the LLM whole and the projector; load_from puts a checkpoint into this run's "
        'model as it stands, so what that stage trained would be lost (tensors under other keys are not loaded; '
        "weights loaded into parts this run does not train are not in its checkpoints); give it as "
        f"model.pretrained_pth={s['dpo_lora']} and leave load_from out (a previous stage: loaded first, its LoRA "
        'adapters merged)')
    assert load_from_other_stage(dict(load_from=s['mpo_full'], model=dict(preference=DPO, llm_lora=LORA)))
    # what keeps working: a preference checkpoint of the same kind (a new run from its weights), a resume, the
    # SFT as model.pretrained_pth, an SFT run from an SFT checkpoint of its kind, a checkpoint that records no config
    for cfg in (dict(load_from=s['dpo_lora'], model=dict(preference=DPO, llm_lora=LORA)),
                dict(load_from=s['mpo_full'], model=dict(preference=DPO, freeze_llm=False)),
                dict(load_from=s['sft_full'], resume=True, model=dict(preference=DPO)),
                dict(load_from=None, model=dict(preference=DPO, pretrained_pth=s['sft_full'])),
                dict(load_from=s['sft_lora'], model=dict(llm_lora=LORA)),
                dict(load_from=s['sft'], model=dict(preference=DPO))):
        assert load_from_other_stage(cfg) is None, cfg


@pytest.mark.parametrize('then, now, says', [
    (dict(freeze_llm=False), dict(llm_lora=LORA), 'it trained the LLM whole and the projector, and this run trains '
     'LoRA adapters on the LLM and the projector;'),
    (dict(llm_lora=LORA), dict(freeze_llm=False), 'it trained LoRA adapters on the LLM and the projector, and this '
     'run trains the LLM whole and the projector;'),
    (dict(freeze_llm=False, freeze_vision=False), dict(), 'it trained the LLM whole, the vision tower whole and the '
     'projector, and this run trains the projector;'),
    (dict(llm_lora=LORA, vision_lora=LORA), dict(llm_lora=LORA), 'it trained LoRA adapters on the LLM, LoRA adapters '
     'on the vision tower and the projector, and this run trains LoRA adapters on the LLM and the projector;'),
    (dict(llm_lora=LORA, freeze_projector=True), dict(llm_lora=LORA), 'it trained LoRA adapters on the LLM, and this '
     'run trains LoRA adapters on the LLM and the projector;'),
    (dict(freeze_projector=True), dict(freeze_projector=True, freeze_llm=False), 'it trained nothing, and this run '
     'trains the LLM whole;')])
def test_a_load_from_of_a_stage_that_trained_other_parts_is_refused(tmp_path, then, now, says):
    """A full SFT's checkpoint given as load_from to finetune_lora trained on from the base LLM (its 27 LLM
    tensors matched no key of the LoRA model, said only in warnings); one into the warm-up loaded the LLM into the
    frozen one, which the run's checkpoints do not hold."""
    path = _recorded(str(tmp_path / 'then' / 'iter_2.pth'), then)
    problem = load_from_other_stage(dict(load_from=path, model=now))
    assert problem.startswith(f'load_from={path} is a checkpoint of another stage: {says}'), problem
    assert problem.endswith(f'give it as model.pretrained_pth={path} and leave load_from out (a previous stage: '
                            'loaded first, its LoRA adapters merged)'), problem
    assert load_from_other_stage(dict(load_from=path, model=then)) is None   # the same parts
    assert load_from_other_stage(dict(load_from=path, resume=True, model=now)) is None   # a resume: its own checks


def test_training_refuses_a_preference_run_loading_another_stage(preference_stages, tmp_path, capsys):
    sft = preference_stages['sft_full']
    cfg = Config(dict(model=dict(preference=DPO), work_dir=str(tmp_path / 'w'), load_from=sft))
    with pytest.raises(SystemExit) as stopped:
        Runner.from_cfg(cfg)
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f'train: refused: load_from={sft} is a checkpoint of another stage'), err
    assert len(err.strip().splitlines()) == 1, err
