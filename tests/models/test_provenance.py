"""The converter refuses settings that change the result but not the keys (a LoRA alpha, the template, the
projector...), comparing them with the training config MMEngine records in every checkpoint."""

import os

import pytest
import torch
from mmengine.config import Config

from xtuner_plugins.models.provenance import check_trained_settings, recorded_config_text

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def lora_cfg(**options):
    cfg = Config.fromfile(os.path.join(ROOT, 'configs', 'finetune_lora.py'))
    cfg.merge_from_dict(options)
    return cfg


def save(path, cfg, deepspeed=False):
    """A checkpoint as MMEngine writes it: the run's config text in ``meta`` (DeepSpeed: in the folder's
    model states file)."""
    ckpt = {'meta': {'cfg': cfg.pretty_text}, 'state_dict': {'mlp1.0.weight': torch.zeros(2)}}
    if deepspeed:
        os.makedirs(path)
        torch.save(ckpt, os.path.join(path, 'mp_rank_00_model_states.pt'))
    else:
        torch.save(ckpt, path)
    return str(path)


@pytest.mark.parametrize('deepspeed', [False, True])
def test_a_lora_alpha_other_than_the_trained_one_is_refused(tmp_path, deepspeed):
    ckpt = save(tmp_path / 'iter_4.pth', lora_cfg(), deepspeed)
    assert 'lora_alpha' in recorded_config_text(ckpt)
    check_trained_settings(lora_cfg(), ckpt)  # the same config
    check_trained_settings(lora_cfg(**{'model.llm_lora.lora_dropout': 0.0,  # no effect on merged weights
                                       'model.llm': 'moved/llm'}), ckpt)   # nor does where the LLM lies
    with pytest.raises(ValueError, match=r"iter_4.pth was trained with other settings .*: "
                                         r"model.llm_lora.lora_alpha: trained 32, given 64$"):
        check_trained_settings(lora_cfg(**{'model.llm_lora.lora_alpha': 64}), ckpt)


@pytest.mark.parametrize('key, value', [('model.template', 'vicuna'), ('model.projector', 'mlp'),
                                        ('model.downsample_ratio', 0.25), ('model.select_layer', -2),
                                        ('model.llm_lora', None)])
def test_each_result_setting_is_compared(tmp_path, key, value):
    ckpt = save(tmp_path / 'iter_4.pth', lora_cfg(**{'model.template': 'internvl2_5'}))
    with pytest.raises(ValueError, match=f'{key}: trained '):
        check_trained_settings(lora_cfg(**{key: value}), ckpt)


def test_a_template_left_to_the_previous_stage_is_not_a_difference(tmp_path):
    """model.template None (the stage configs': the previous stage's, ``stages.inherited_template``) on either side
    is no conflict: the recorded setting builds the model; two named ones are compared."""
    ckpt = save(tmp_path / 'iter_4.pth', lora_cfg(**{'model.template': 'internvl2_5'}))
    check_trained_settings(lora_cfg(), ckpt)   # the stage config's None
    ckpt = save(tmp_path / 'iter_5.pth', lora_cfg())
    check_trained_settings(lora_cfg(**{'model.template': 'llama3'}), ckpt)


def test_an_encoder_given_as_a_folder_is_compared_by_its_type_and_layer(tmp_path):
    """A LLaVA run trained with model.vision_encoder=DIR (a CLIP folder: its type read from config.json, CLIP's
    layer -2), converted with the config form (configs/llava_finetune_lora.py's header), whose encoder is
    dict(type='clip', select_layer=-2): the same encoder. It was refused as 'model.vision_encoder.select_layer:
    trained None, given -2; model.vision_encoder.type: trained None, given 'clip''. Another type or layer is
    still refused, naming the folder's."""
    from xtuner_plugins.tiny.vision import write_tiny_clip

    def llava(**options):
        cfg = Config.fromfile(os.path.join(ROOT, 'configs', 'llava_finetune_lora.py'))
        cfg.merge_from_dict(options)
        return cfg
    clip = write_tiny_clip(str(tmp_path / 'clip'))
    ckpt = save(tmp_path / 'iter_4.pth', llava(**{'model.vision_encoder': clip}))
    check_trained_settings(llava(), ckpt)
    with pytest.raises(ValueError, match=r"model.vision_encoder.select_layer: trained -2, given -1$"):
        check_trained_settings(llava(**{'model.vision_encoder.select_layer': -1}), ckpt)
    with pytest.raises(ValueError, match=r"model.vision_encoder.type: trained 'clip', given 'siglip'"):
        check_trained_settings(llava(**{'model.vision_encoder.type': 'siglip'}), ckpt)


def test_a_checkpoint_without_a_recorded_config_is_converted_with_a_note(tmp_path):
    torch.save({'state_dict': {}}, tmp_path / 'plain.pth')
    notes = []
    check_trained_settings(lora_cfg(), str(tmp_path / 'plain.pth'), notes.append)
    assert notes and 'no training config recorded' in notes[0]


def test_a_recorded_config_with_code_is_refused_not_run(tmp_path):
    marker = tmp_path / 'ran'
    text = f'import os\nmarker = os.system("touch {marker}")\n' + lora_cfg().pretty_text
    torch.save({'meta': {'cfg': text}, 'state_dict': {}}, tmp_path / 'iter_4.pth')
    with pytest.raises(ValueError, match=r"iter_4.pth: meta\['cfg'\] \(the training config\): line 1 is not a plain "
                                         r"setting \('import os'\)"):
        check_trained_settings(lora_cfg(), str(tmp_path / 'iter_4.pth'))
    assert not marker.exists()
