"""The family configs (SigLIP + bilinear MLP, LLaVA-1.5 with CLIP) and the start-up check of data against model.

Each family config names its model parts once; the data set's geometry and tokenizer are derived from them
(engine/derive.py), and at the real encoders' image and patch sizes they are what a model built with those parts
reports. Each config trains through XTuner's own entry point on tiny look-alikes of its encoder, given only the
model paths and the data; a data set that disagrees with the model stops start-up, naming both values."""

import os

import pytest
import torch
from mmengine.config import Config

from tests.configs.conftest import ROOT, tiny_options
from tests.train_utils import load_checkpoint_state, run_train
from xtuner_plugins.engine.derive import derive_data_settings
from xtuner_plugins.models import VisionLanguageModel
from xtuner_plugins.tiny.vision import write_tiny_clip, write_tiny_siglip

FAMILY_CONFIGS = {
    'siglip_pretrain.py': ('siglip', write_tiny_siglip, 384),
    'siglip_finetune.py': ('siglip', write_tiny_siglip, 384),
    'llava_pretrain.py': ('clip', write_tiny_clip, 336),
    'llava_finetune_lora.py': ('clip', write_tiny_clip, 336),
}


def family_options(tiny, vision_folder):
    """tiny_options for a family config: its own encoder type, pointed at the tiny encoder; nothing else."""
    options = tiny_options(tiny, tiny['same'], repeat=12)
    options['model.vision_encoder.path'] = vision_folder
    del options['model.vision_encoder']
    return options


@pytest.mark.parametrize('name', sorted(FAMILY_CONFIGS))
def test_derived_data_geometry_is_what_the_model_computes(name, tiny, tmp_path):
    cfg = Config.fromfile(os.path.join(ROOT, 'configs', name))
    vision, writer, size = FAMILY_CONFIGS[name]
    assert cfg.model.vision_encoder['type'] == vision
    # the real encoder's tile and patch size, tiny widths
    folder = writer(str(tmp_path / vision), image_size=size, hidden_size=16, num_layers=3, num_heads=2,
                    intermediate_size=32)
    cfg.merge_from_dict({'model.vision_encoder.path': folder, 'model.llm': tiny['llm']})
    model = VisionLanguageModel(vision_encoder=dict(cfg.model.vision_encoder), llm=tiny['llm'],
                                projector=cfg.model.projector, image_mode=cfg.model.image_mode, torch_dtype='float32')
    derived = derive_data_settings(cfg, log=False)
    assert derived['image_size'] == size
    for key, value in model.geometry.items():
        assert derived[key] == (list(value) if isinstance(value, tuple) else value), key
    assert (derived['tokenizer'], derived['template']) == (tiny['llm'], model.template)


def test_llava_lora_config_gives_the_projector_a_larger_lr():
    cfg = Config.fromfile(os.path.join(ROOT, 'configs', 'llava_finetune_lora.py'))
    assert cfg.model.freeze_vision and cfg.model.freeze_llm and cfg.model.llm_lora['target_modules'] == 'all-linear'
    assert cfg.optim_wrapper.optimizer.paramwise_cfg.custom_keys.mlp1.lr_mult > 1


@pytest.mark.slow
@pytest.mark.parametrize('name', ['siglip_finetune.py', 'llava_finetune_lora.py'])
def test_family_config_trains(name, tiny, tmp_path):
    vision, writer, _ = FAMILY_CONFIGS[name]
    config = os.path.join(ROOT, 'configs', name)
    folder = writer(str(tmp_path / vision))
    out = run_train(config, str(tmp_path / 'work'), cfg_options=family_options(tiny, folder))
    assert out.ok, out.summary()
    tokens = 4 if vision == 'siglip' else 16  # 56 px tiles, patch 14: bilinear 4x4 -> 2x2, LLaVA's MLP 4x4
    assert f'data set: image_size 56, num_image_token {tokens}, ' in out.log
    state = load_checkpoint_state(out.final_checkpoint)
    assert any(k.startswith('mlp1.linear_1') for k in state), sorted(state)[:5]
    losses = [out.losses[i] for i in sorted(out.losses)]
    assert len(losses) == 6 and losses[-1] < losses[0] - 0.3, losses  # the same batch every iteration


@pytest.mark.slow
def test_a_data_set_that_disagrees_with_the_model_stops_start_up(tiny, tmp_path):
    options = tiny_options(tiny, tiny['same'], repeat=2)
    options['train_dataloader.dataset.image_size'] = 448   # the tiny InternViT takes 56 px tiles
    out = run_train(os.path.join(ROOT, 'configs', 'pretrain_mlp.py'), str(tmp_path / 'work'), cfg_options=options)
    assert not out.ok and out.last_iter is None, out.summary()
    assert 'image_size: model 56, data 448' in out.log and 'num_image_token: model 4, data 256' in out.log


def test_family_models_keep_checkpoint_keys_stable(tiny):
    """The InternViT family's checkpoints keep their keys (mlp1.0/1/3, vision_model.*): earlier stages load."""
    model = VisionLanguageModel(vision_encoder=tiny['internvit'], llm=tiny['llm'], torch_dtype='float32')
    assert sorted(model.state_dict()) == ['mlp1.0.bias', 'mlp1.0.weight', 'mlp1.1.bias', 'mlp1.1.weight',
                                          'mlp1.3.bias', 'mlp1.3.weight']
    assert torch.is_tensor(model.state_dict()['mlp1.1.weight'])


@pytest.mark.slow
def test_a_next_stage_builds_the_model_its_warm_up_trained_from_pretrained_pth_alone(tiny, tmp_path):
    """A SigLIP + bilinear MLP warm-up, then the LoRA stage and its DPO stage of the InternViT + pixel-shuffle
    configs, each given its previous stage's checkpoint and the data alone, through plain ``xtuner train``: the parts
    come from the previous stage's record (``engine/previous_settings.py``), said in the log, and go into the stage's
    own checkpoints. It was refused option by option (a new user's journey), each to be typed again."""
    folder = write_tiny_siglip(str(tmp_path / 'siglip'))
    options = dict(family_options(tiny, folder), **{'train_dataloader.dataset.repeat_times': 2})
    warm = run_train(os.path.join(ROOT, 'configs', 'siglip_pretrain.py'), str(tmp_path / 'warm'),
                     cfg_options=options)
    assert warm.ok, warm.summary()
    data = {k: v for k, v in options.items() if not k.startswith('model.')}
    sft = run_train(os.path.join(ROOT, 'configs', 'finetune_lora.py'), str(tmp_path / 'sft'),
                    cfg_options=dict(data, **{'model.pretrained_pth': warm.final_checkpoint}))
    assert sft.ok, sft.summary()
    assert f'model.pretrained_pth={warm.final_checkpoint}: builds the model that stage trained' in sft.log
    assert 'data set: image_size 56, num_image_token 4, ' in sft.log   # SigLIP's tiles through the bilinear MLP
    from xtuner_plugins.models.checkpoint import recorded_model_config
    model = recorded_model_config(sft.final_checkpoint)
    assert (model['vision_encoder'], model['llm'], model['projector'], model['image_mode']) == (
        dict(type='siglip', path=folder), tiny['llm'], 'bilinear_mlp', 'resize'), model
    assert model['llm_lora']['r'] > 0 and model['freeze_llm']   # what the stage trains: its own
    from tests.configs.test_dpo import pairs_file   # and its preference stage, from the SFT (which took them)
    pairs = dict(data, **{'train_dataloader.dataset.data_files': f'[{pairs_file(tmp_path)}]',
                          'train_dataloader.dataset.repeat_times': 1, 'model.pretrained_pth': sft.final_checkpoint})
    dpo = run_train(os.path.join(ROOT, 'configs', 'dpo_lora.py'), str(tmp_path / 'dpo'), cfg_options=pairs)
    assert dpo.ok, dpo.summary()
    assert dpo.scalar_series('rewards_chosen')[1] == 0.0   # the SFT model (adapters merged) is its reference
    assert recorded_model_config(dpo.final_checkpoint)['projector'] == 'bilinear_mlp'
