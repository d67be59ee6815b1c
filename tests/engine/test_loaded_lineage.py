"""The previous stage of a resumed or loaded checkpoint (``engine/loaded_lineage.py``): a resume and a
``load_from`` over another ``model.pretrained_pth`` than the checkpoint's recorded one put its adapters on another
model without a word (a helper's sweep); one left unset is taken from the checkpoint."""

import os
import shutil

import pytest
import torch
from mmengine.config import Config
from mmengine.runner import Runner

from xtuner_plugins.engine.loaded_lineage import previous_stage_of_loaded
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
