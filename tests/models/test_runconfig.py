"""A checkpoint's recorded training config read for its data settings (``models/runconfig.py``): under every wrapper
of the data set, as training reads them."""

import os
from types import SimpleNamespace

import pytest
from mmengine.config import Config

from xtuner_plugins.models.runconfig import inner_dataset, setting_conflicts, training_dataset

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SHARDS = os.path.join(REPO, 'configs', 'finetune_full_packed_shards.py')
INNER = 'train_dataloader.dataset.dataset.dataset'   # online packing > the shard set > its samples


def shards_config(**settings):
    cfg = Config.fromfile(SHARDS)
    cfg.merge_from_dict({f'{INNER}.{k}': v for k, v in settings.items()})
    return cfg


def test_the_settings_are_read_under_every_wrapper():
    """The packed-shards config holds its samples' settings two wrappers down: they were read one down (the shard
    set's dict, holding none), so a model trained at max_dynamic_patch 2, no thumbnail, its own system message and
    frame prefix was converted, chatted with and served at 12 tiles, a thumbnail, the template's system message
    and the default prefix, and a conflicting value typed on top was not seen."""
    from xtuner_plugins.models.export.build import training_frame_prefix, training_system_message
    from xtuner_plugins.plan_configs.batch import model_batch
    trained = dict(max_dynamic_patch=2, use_thumbnail=False, system='You are a terse bot.',
                   frame_prefix='Frame-{i}: ')
    cfg = shards_config(**trained)
    dataset, key = inner_dataset(cfg.train_dataloader.dataset)
    assert key == INNER and dataset['type'].__name__ == 'ShardSamples'
    assert {k: training_dataset(cfg)[k] for k in trained} == trained
    assert training_system_message(cfg) == trained['system']
    assert training_frame_prefix(cfg, SimpleNamespace(template='internvl2_5')) == trained['frame_prefix']
    assert setting_conflicts(cfg, shards_config(**trained)) == []
    assert setting_conflicts(cfg, shards_config(**dict(trained, max_dynamic_patch=9))) == \
        [f'{INNER}.max_dynamic_patch: trained 2, given 9']
    # the video frame range too (the converted folder records it): unset is InternVL's 8 to 32
    assert setting_conflicts(cfg, shards_config(**dict(trained, max_num_frame=32, min_num_frame=8))) == []
    assert setting_conflicts(cfg, shards_config(**dict(trained, max_num_frame=16))) == \
        [f'{INNER}.max_num_frame: trained 32, given 16']
    # the planner too: the unpacked shards config's max_length and tiling are its samples' (it took 8192 and 12)
    cfg = Config.fromfile(os.path.join(REPO, 'configs', 'finetune_lora_shards.py'))
    cfg.merge_from_dict({'train_dataloader.dataset.dataset.max_length': 1000,
                         'train_dataloader.dataset.dataset.max_dynamic_patch': 2})
    batch, _ = model_batch(cfg, SimpleNamespace(num_image_token=16, image_mode='tile'))
    rows = cfg.train_dataloader.batch_size
    assert (batch.length, batch.tiles) == (1000, 3 * rows), batch   # 2 tiles and the thumbnail a sample


def test_a_template_typed_for_a_checkpoint_that_inherited_its_own_is_compared_with_that(tiny, tmp_path):
    """A checkpoint whose config left its template to the stages before it (None): a template typed on top was
    dropped without a word in the converter, and the data set's was refused as 'trained None'."""
    import torch

    from tests.models.conftest import build
    from xtuner_plugins.models.runconfig import template_conflicts
    warm = build(tiny)
    torch.save({'meta': {'lineage': warm.lineage, 'cfg': "model = dict(template='Hermes-2')\n"},
                'state_dict': warm.state_dict()}, tmp_path / 'warm.pth')
    sft = build(tiny, llm_lora=dict(r=4, lora_alpha=8, lora_dropout=0.0), pretrained_pth=str(tmp_path / 'warm.pth'))
    assert sft.template == 'Hermes-2'
    recorded = dict(model=dict(template=None), train_dataloader=dict(dataset=dict(template=None)))
    cfg = "model = dict(template=None, llm_lora=dict(r=4, lora_alpha=8))\n"   # as its lineage records it
    torch.save({'meta': {'lineage': sft.lineage, 'cfg': cfg}, 'state_dict': sft.state_dict()}, tmp_path / 'sft.pth')
    given = Config(dict(model=dict(template='internvl2_5'), train_dataloader=dict(dataset=dict(template='llama3'))))
    assert template_conflicts(str(tmp_path / 'sft.pth'), recorded, given) == [
        "model.template: trained 'Hermes-2' (the stages before it), given 'internvl2_5'",
        "train_dataloader.dataset.template: trained 'Hermes-2' (the stages before it), given 'llama3'"]
    same = Config(dict(model=dict(template='Hermes-2'), train_dataloader=dict(dataset=dict(template=None))))
    assert template_conflicts(str(tmp_path / 'sft.pth'), recorded, same) == []
    assert setting_conflicts(recorded, given) == []   # (which cannot tell: None is 'the stages before it')


def test_a_source_folder_given_that_is_not_there_is_refused_not_passed_over(tmp_path):
    """``convert_to_official CKPT OUT --cfg-options model.llm=/typo`` converted from the recorded folder, the given
    one passed over without a word; a name that is no path (a hub id) still falls back to the recorded one."""
    import torch

    from xtuner_plugins.errors import NotFound
    from xtuner_plugins.models.runconfig import run_config
    llm = tmp_path / 'llm'
    llm.mkdir()
    ckpt = tmp_path / 'iter_2.pth'
    torch.save({'meta': {'cfg': f"model = dict(type='VisionLanguageModel', llm={str(llm)!r})\n"}, 'state_dict': {}},
               ckpt)
    with pytest.raises(NotFound, match=rf'^model.llm={tmp_path}/typo \(given\) is not found; {ckpt} was trained '
                                       rf'with {llm} \(at {llm}\): give where that folder is now'):
        run_config(str(ckpt), None, {'model.llm': str(tmp_path / 'typo')}, log=lambda m: None)
    assert run_config(str(ckpt), None, {'model.llm': 'org/name'}, log=lambda m: None).model['llm'] == str(llm)
    moved = tmp_path / 'moved'
    llm.rename(moved)
    assert run_config(str(ckpt), None, {'model.llm': str(moved)}, log=lambda m: None).model['llm'] == str(moved)
