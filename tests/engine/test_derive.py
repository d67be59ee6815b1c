"""The training data set takes its tile size, tokens per tile, image mode, padding colour, template and tokenizer
from the model (``engine/derive.py``) unless the config sets them; both runners fill them before building the
data set; the converter takes the tile size from the model when the data set leaves it to the model.

Each family's stage config, pointed at tiny models by the model paths alone, gets what the model itself reports
(``VisionLanguageModel.geometry``, its tokenizer folder and template)."""

import os
from types import SimpleNamespace

import pytest
from mmengine.config import Config

from tests.helpers import tiny_families
from xtuner_plugins.engine import runtime  # noqa: F401  (applies the runner patches, as a config's import does)
from xtuner_plugins.engine.derive import DERIVED_KEYS, derive_data_settings
from xtuner_plugins.models import VisionLanguageModel

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# config -> the tiny encoder it is pointed at (internvit + pixel shuffle, siglip + bilinear, clip + LLaVA's MLP)
FAMILIES = {'pretrain_mlp.py': 'internvit', 'siglip_pretrain.py': 'siglip', 'llava_pretrain.py': 'clip'}


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
    return tiny_families(tmp_path_factory.mktemp('derive'))


def stage_config(name, tiny, vision=None, **options):
    """The stage config with only the model paths set (and ``options``), as a user runs it on other models."""
    cfg = Config.fromfile(os.path.join(ROOT, 'configs', name))
    vision = tiny[vision or FAMILIES[name]]
    key = 'model.vision_encoder.path' if isinstance(cfg.model.vision_encoder, dict) else 'model.vision_encoder'
    cfg.merge_from_dict({key: vision, 'model.llm': tiny['llm'], **options})
    return cfg


def model_of(cfg):
    spec = {k: v for k, v in cfg.model.items() if k != 'type'}
    return VisionLanguageModel(**dict(spec, torch_dtype='float32', pretrained_pth=None))


def as_model_reports(model):
    return dict(model.geometry, image_mean=list(model.geometry['image_mean']), template=model.template,
                tokenizer=model.tokenizer.name_or_path)


@pytest.mark.parametrize('name', sorted(FAMILIES))
def test_each_family_takes_what_the_model_reports(name, tiny):
    cfg = stage_config(name, tiny)
    assert all(cfg.train_dataloader.dataset.get(key) is None for key in DERIVED_KEYS)  # set once: in the model
    filled = derive_data_settings(cfg)
    assert filled == as_model_reports(model_of(cfg))
    assert {k: cfg.train_dataloader.dataset[k] for k in DERIVED_KEYS} == filled


def test_the_tokenizer_follows_model_llm(tiny):
    """--cfg-options model.llm=X alone moves the data set to X's tokenizer (it used to keep the config's)."""
    cfg = stage_config('pretrain_mlp.py', tiny)
    assert derive_data_settings(cfg)['tokenizer'] == tiny['llm']


def test_explicit_values_are_kept_and_the_rest_derived(tiny):
    cfg = stage_config('pretrain_mlp.py', tiny, **{'train_dataloader.dataset.image_size': 448,
                                                   'train_dataloader.dataset.template': 'internvl2_5'})
    filled = derive_data_settings(cfg)
    assert 'image_size' not in filled and 'template' not in filled
    dataset = cfg.train_dataloader.dataset
    # tokens for the data set's own (explicit) tiles: a wrong tile size is named with the count it implies
    assert (dataset.image_size, dataset.num_image_token, dataset.tokenizer) == (448, 256, tiny['llm'])


def test_a_packed_data_set_gets_them_inside_its_wrapper(tiny):
    cfg = stage_config('finetune_full_packed.py', tiny, vision='internvit')
    filled = derive_data_settings(cfg)
    inner = cfg.train_dataloader.dataset.dataset
    assert (inner.image_size, inner.num_image_token) == (56, 4) and filled['image_size'] == 56


def test_an_official_checkpoint_gives_them(tiny, tmp_path):
    from tests.models.conftest import write_official
    model = model_of(stage_config('pretrain_mlp.py', tiny))
    folder = str(tmp_path / 'official')
    write_official(model, folder)
    cfg = stage_config('finetune_lora.py', tiny, vision='internvit', **{
        'model.official_checkpoint': folder, 'model.vision_encoder': None, 'model.llm': None})
    assert derive_data_settings(cfg) == as_model_reports(model_of(cfg))
    assert cfg.train_dataloader.dataset.tokenizer == folder


@pytest.mark.parametrize('runner', ['Runner', 'FlexibleRunner'])
def test_both_runners_fill_the_data_set_before_building_it(runner, tiny):
    """XTuner's train script (and so tools/train.py) builds one of the two; each builds the data loader in
    build_train_loop, from its dict, with the run's config at hand."""
    import mmengine.runner
    from mmengine.runner import BaseLoop
    cfg = stage_config('siglip_pretrain.py', tiny)
    dataloader = dict(cfg.train_dataloader)
    fake = SimpleNamespace(_train_dataloader=dataloader, cfg=cfg)
    loop = object.__new__(type('BuiltLoop', (BaseLoop,), {'run': lambda self: None}))  # built: nothing else to do
    assert getattr(mmengine.runner, runner).build_train_loop(fake, loop) is loop
    assert dataloader['dataset']['image_size'] == 56 and dataloader['dataset']['num_image_token'] == 4


def test_a_model_that_is_not_ours_is_left_alone(tiny):
    cfg = stage_config('pretrain_mlp.py', tiny)
    cfg.model.type = 'SomeOtherModel'
    assert derive_data_settings(cfg) == {} and cfg.train_dataloader.dataset.image_size is None


def test_the_converter_takes_the_towers_tile_size(tiny):
    from xtuner_plugins.models.export.build import tiling_settings
    cfg = stage_config('finetune_lora.py', tiny, vision='internvit')
    model = SimpleNamespace(vision=SimpleNamespace(image_size=56))
    assert tiling_settings(cfg, model)['image_size'] == 56
    cfg.merge_from_dict({'train_dataloader.dataset.image_size': 112})  # what the data set says, it trained on
    assert tiling_settings(cfg, model)['image_size'] == 112


def test_the_template_is_the_previous_stages(tiny, tmp_path):
    """A stage config leaves model.template unset (None): the data set takes the template the previous stage
    (model.pretrained_pth) recorded, as the model does; an official folder's recorded one without a previous stage;
    internvl2_5 without either."""
    import json
    import torch
    from tests.models.conftest import write_official
    warm = tmp_path / 'warm.pth'
    torch.save({'meta': {'cfg': "model = dict(template='Hermes-2')\n"}, 'state_dict': {}}, warm)
    cfg = stage_config('finetune_lora.py', tiny, vision='internvit', **{'model.pretrained_pth': str(warm)})
    assert cfg.model.template is None
    assert derive_data_settings(cfg)['template'] == 'Hermes-2'
    assert stage_config('finetune_lora.py', tiny, vision='internvit').model.template is None
    assert derive_data_settings(stage_config('finetune_lora.py', tiny, vision='internvit'))['template'] == 'internvl2_5'
    folder = str(tmp_path / 'official')
    write_official(model_of(stage_config('pretrain_mlp.py', tiny)), folder)
    with open(os.path.join(folder, 'config.json')) as f:
        config = json.load(f)
    config['template'] = 'internlm2-chat'
    with open(os.path.join(folder, 'config.json'), 'w') as f:
        json.dump(config, f)
    cfg = stage_config('finetune_lora.py', tiny, vision='internvit', **{
        'model.official_checkpoint': folder, 'model.vision_encoder': None, 'model.llm': None})
    assert derive_data_settings(cfg)['template'] == 'internlm2-chat'


def test_a_next_stage_is_told_of_the_data_settings_it_does_not_carry_on(tmp_path):
    """The template is the previous stage's by itself; the system message, frame prefix and tiling are a stage's
    own. A DPO stage after an SFT with 'You are a terse bot.' and 2 tiles trained on the template's message and 12
    without a word (its start-up line said the template was carried over): now a warning names each."""
    import torch
    from mmengine.config import Config

    from xtuner_plugins.engine.derive import previous_stage_note
    sft = dict(system='You are a terse bot.', frame_prefix='Frame-{i}: ', max_dynamic_patch=2, use_thumbnail=False)
    cfg = Config(dict(model=dict(type='xtuner_plugins.models.VisionLanguageModel'),
                      train_dataloader=dict(dataset=dict(type='xtuner_plugins.data.InternVLDataset', **sft))))
    path = tmp_path / 'sft.pth'
    torch.save({'meta': {'cfg': cfg.pretty_text}, 'state_dict': {}}, path)
    model = dict(pretrained_pth=str(path))
    assert previous_stage_note(dict(sft), model) is None
    assert previous_stage_note(dict(type='OnlinePacked', dataset=dict(sft)), model) is None
    assert previous_stage_note(dict(max_dynamic_patch=2, frame_prefix='Frame-{i}: '), model) == (
        f"{path} (model.pretrained_pth) was trained with system 'You are a terse bot.', use_thumbnail False; this "
        "stage gives system None, use_thumbnail True (None: the template's, or the data set's default): a stage's "
        'data settings are its own, give train_dataloader.dataset.KEY=VALUE to train as before')
    assert previous_stage_note(dict(sft), dict(pretrained_pth=None)) is None
