"""A next stage builds the model its previous stage trained (``engine/previous_settings.py``): a SigLIP + bilinear
MLP warm-up given to a stage config of InternViT + pixel-shuffle with ``model.pretrained_pth`` alone was refused
option by option (a new user's journey), each to be typed again."""

import logging

import torch

from xtuner_plugins.engine import named, resumed_settings
from xtuner_plugins.engine.previous_settings import take_previous_settings
from xtuner_plugins.engine.resumed_settings import said_taken


class Model:   # a class in the config, as the stage configs import theirs
    def __init__(self, llm=None, vision_encoder=None, official_checkpoint=None, projector='pixel_shuffle_mlp',
                 image_mode='tile', downsample_ratio=0.5, ps_version='v2', freeze_llm=True, llm_lora=None,
                 pretrained_pth=None, attn_implementation='sdpa'):
        pass


RECORDED = '''
model = dict(type='tests.engine.test_previous_settings.Model', llm={llm!r},
             vision_encoder=dict(type='siglip', path={encoder!r}), projector='bilinear_mlp', image_mode='resize',
             downsample_ratio=0.5, ps_version='v1', freeze_llm=True, attn_implementation='eager', llm_lora=None)
'''


def _previous(tmp_path, **changes):
    llm, encoder = tmp_path / 'llm', tmp_path / 'siglip'
    llm.mkdir(exist_ok=True), encoder.mkdir(exist_ok=True)
    text = RECORDED.format(llm=str(llm), encoder=str(encoder))
    for old, new in changes.items():
        text = text.replace(old, new)
    path = tmp_path / 'warm' / 'iter_2.pth'
    path.parent.mkdir(exist_ok=True)
    torch.save({'meta': {'cfg': text}, 'state_dict': {}}, path)
    return str(path), str(llm), str(encoder)


def _config(pretrained, **model):
    """The stage config's own model (its example folders), started from ``pretrained``."""
    return dict(work_dir='w', model=dict(dict(
        type=Model, vision_encoder='models/InternViT-300M-448px-V2_5', llm='models/Qwen2.5-1.5B-Instruct',
        projector='pixel_shuffle_mlp', image_mode='tile', downsample_ratio=0.5, ps_version='v2', freeze_llm=False,
        llm_lora=dict(r=8), attn_implementation='sdpa', pretrained_pth=pretrained), **model))


def test_a_next_stage_takes_the_model_its_previous_stage_trained(tmp_path):
    pretrained, llm, encoder = _previous(tmp_path)
    cfg = _config(pretrained)
    taker = take_previous_settings(cfg, ['model.pretrained_pth'])
    assert cfg['model'] == dict(type=Model, vision_encoder=dict(type='siglip', path=encoder), llm=llm,
                                projector='bilinear_mlp', image_mode='resize', downsample_ratio=0.5, ps_version='v1',
                                freeze_llm=False, llm_lora=dict(r=8), attn_implementation='sdpa',
                                pretrained_pth=pretrained)   # what it trains and how it computes: its own
    assert taker.taken == [
        f"model.vision_encoder={dict(type='siglip', path=encoder)!r} (the config: "
        "'models/InternViT-300M-448px-V2_5')",
        f"model.llm='{llm}' (the config: 'models/Qwen2.5-1.5B-Instruct')",
        "model.projector='bilinear_mlp' (the config: 'pixel_shuffle_mlp')",
        "model.image_mode='resize' (the config: 'tile')", "model.ps_version='v1' (the config: 'v2')"]
    assert taker.left == []


def test_what_the_command_line_names_stays_and_a_folder_gone_is_said(tmp_path):
    pretrained, llm, encoder = _previous(tmp_path)
    cfg = _config(pretrained, llm='/mine/llm')
    taker = take_previous_settings(cfg, ['model.pretrained_pth', 'model.llm', 'model.projector'])
    assert cfg['model']['llm'] == '/mine/llm' and cfg['model']['projector'] == 'pixel_shuffle_mlp'
    assert cfg['model']['image_mode'] == 'resize'   # (the geometry check refuses the projector named otherwise)
    (tmp_path / 'llm').rmdir()
    cfg = _config(pretrained)
    taker = take_previous_settings(cfg, [])
    assert cfg['model']['llm'] == 'models/Qwen2.5-1.5B-Instruct'
    assert taker.left == [f"model.llm: {llm} not found (the config's 'models/Qwen2.5-1.5B-Instruct' is used)"]


def test_a_tower_of_the_same_kind_takes_its_layer_and_an_official_run_its_folder(tmp_path):
    pretrained, llm, encoder = _previous(tmp_path, **{
        "dict(type='siglip', path=": "dict(type='clip', select_layer=-2, path="})
    cfg = _config(pretrained, vision_encoder=dict(type='clip', path='models/clip', select_layer=-1))
    take_previous_settings(cfg, ['model.vision_encoder.path'])
    assert cfg['model']['vision_encoder'] == dict(type='clip', path='models/clip', select_layer=-2)
    official = tmp_path / 'InternVL2_5-1B'
    official.mkdir()
    pretrained, llm, encoder = _previous(tmp_path, **{
        f"llm={str(tmp_path / 'llm')!r}": f'llm=None, official_checkpoint={str(official)!r}',
        f"dict(type='siglip', path={str(tmp_path / 'siglip')!r})": 'None'})
    cfg = _config(pretrained)
    take_previous_settings(cfg, [])
    assert (cfg['model']['official_checkpoint'], cfg['model']['vision_encoder'], cfg['model']['llm']) == (
        str(official), None, None)


def test_nothing_is_taken_for_a_resume_another_model_class_or_no_previous_stage(tmp_path):
    pretrained, llm, encoder = _previous(tmp_path)
    assert take_previous_settings(_config(None), []).taken == []
    assert take_previous_settings(_config(str(tmp_path / 'gone.pth')), []).taken == []
    cfg = _config(pretrained, type=dict)
    taker = take_previous_settings(cfg, [])
    assert cfg['model']['projector'] == 'pixel_shuffle_mlp' and taker.taken == []
    assert taker.left == ["it trained the model Model, and this config builds dict (its parts "
                          'are not taken)'], taker.left
    resumed = tmp_path / 'w'
    resumed.mkdir()
    torch.save({'meta': {}, 'state_dict': {}}, resumed / 'iter_4.pth')
    (resumed / 'last_checkpoint').write_text(str(resumed / 'iter_4.pth'))
    cfg = dict(_config(pretrained), resume=True, work_dir=str(resumed))
    assert take_previous_settings(cfg, []).taken == [] and cfg['model']['projector'] == 'pixel_shuffle_mlp'


def test_the_run_says_what_it_took_and_its_resume_reads_them_as_given(tmp_path, monkeypatch):
    pretrained, llm, encoder = _previous(tmp_path)
    cfg = _config(pretrained)
    said_taken(cfg, ['model.pretrained_pth'])
    assert resumed_settings.took('model') and cfg['model']['projector'] == 'bilinear_mlp'
    assert named._NAMED == ['model.image_mode', 'model.llm', 'model.pretrained_pth', 'model.projector',
                            'model.ps_version', 'model.vision_encoder']
    said = []
    monkeypatch.setattr('mmengine.logging.print_log', lambda line, **kw: said.append((kw.get('level'), line)))
    resumed_settings.say_taken()
    assert [level for level, _ in said] == [logging.INFO] and said[0][1].startswith(
        f'model.pretrained_pth={pretrained}: builds the model that stage trained (recorded in it; the command line '
        "names none of these): model.vision_encoder="), said
    runner_model = _config(pretrained)['model']   # plain xtuner train: the runner's own copy of the model's settings
    resumed_settings.carry_taken(cfg, object(), runner_model)
    assert runner_model == cfg['model']
