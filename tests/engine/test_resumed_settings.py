"""A resume takes the settings its checkpoint was trained with (``engine/resumed_settings.py``): a run started with
``--cfg-options`` for its models and data, resumed with ``--resume`` alone, built the config file's example models
(``vision encoder folder not found``) or was refused setting by setting (the checkpoint sweep)."""

import os

import torch
from mmengine.config import Config

from xtuner_plugins.engine import resumed_settings
from xtuner_plugins.engine.resumed_settings import carry_taken, said_taken, take_resumed_settings


class Model:   # a class in the config, as the stage configs import theirs
    pass


def _checkpoint(path, llm, encoder):
    """A training checkpoint recording ``cfg`` as MMEngine dumps it (classes as their names)."""
    text = f'''
model = dict(type='xtuner_plugins.models.VisionLanguageModel', llm='{llm}',
             vision_encoder=dict(type='InternViT', path='{encoder}', select_layer=-1),
             template='qwen2_5', from_scratch=True, compile_blocks=False, torch_dtype='torch.bfloat16',
             llm_lora=dict(type='peft.LoraConfig', r=8, lora_alpha=16, lora_dropout=0.1))
train_dataloader = dict(batch_size=2, num_workers=0, sampler=dict(type='Sampler', per_device_batch_size=2),
                        dataset=dict(type='Data', data_files=['mine.jsonl'], cache_dir='/theirs/cache',
                                     max_length=2048))
optim_wrapper = dict(type='AmpOptimWrapper', accumulative_counts=1, optimizer=dict(type='AdamW', lr=0.01))
'''
    torch.save({'meta': {'cfg': text}, 'state_dict': {}}, path)
    return path


def _config(checkpoint, resume=True):
    """This run's config as the stage config file gives it (its example paths), resuming ``checkpoint``."""
    return dict(resume=resume, load_from=checkpoint, work_dir='w',
                model=dict(type=Model, llm='models/Qwen2.5-1.5B-Instruct', compile_blocks='auto',
                           vision_encoder=dict(type=Model, path='models/InternViT', select_layer=-1),
                           template=None, torch_dtype=torch.bfloat16,
                           llm_lora=dict(type=Model, r=64, lora_alpha=32, lora_dropout=0.05)),
                train_dataloader=dict(batch_size=4, num_workers=4,
                                      sampler=dict(type=Model, per_device_batch_size=4),
                                      dataset=dict(type=Model, data_files=['data/my_sft.jsonl'], cache_dir=None,
                                                   max_length=8192)),
                optim_wrapper=dict(type=Model, accumulative_counts=16, optimizer=dict(type=Model, lr=4e-5)))


def test_a_resume_takes_what_the_command_line_does_not_give(tmp_path):
    llm, encoder = tmp_path / 'llm', tmp_path / 'vit'
    llm.mkdir(), encoder.mkdir()
    cfg = _config(_checkpoint(str(tmp_path / 'iter_2.pth'), llm, encoder))
    taken = take_resumed_settings(cfg, ['resume', 'load_from', 'model.llm_lora.lora_alpha'])
    model, loader = cfg['model'], cfg['train_dataloader']
    assert model['llm'] == str(llm) and model['vision_encoder']['path'] == str(encoder)
    assert model['template'] == 'qwen2_5' and model['from_scratch'] is True
    assert model['llm_lora'] == dict(type=Model, r=8, lora_alpha=32, lora_dropout=0.1)   # alpha: the command line's
    assert model['compile_blocks'] == 'auto' and model['type'] is Model   # how it runs; the classes stay
    assert model['torch_dtype'] is torch.bfloat16   # the same dtype, named as text in the record
    assert loader['dataset'] == dict(type=Model, data_files=['mine.jsonl'], cache_dir=None, max_length=2048)
    assert loader['batch_size'] == 2 and loader['sampler']['per_device_batch_size'] == 2
    assert loader['num_workers'] == 4   # this machine's
    assert cfg['optim_wrapper'] == dict(type=Model, accumulative_counts=1, optimizer=dict(type=Model, lr=0.01))
    assert f"model.llm='{llm}' (the config: 'models/Qwen2.5-1.5B-Instruct')" in taken
    assert not any(entry.startswith(('model.llm_lora.lora_alpha', 'model.compile_blocks')) for entry in taken)


def test_a_source_folder_gone_is_left_to_the_fingerprint_check_and_a_new_run_takes_nothing(tmp_path):
    checkpoint = _checkpoint(str(tmp_path / 'iter_2.pth'), tmp_path / 'gone', tmp_path / 'gone_too')
    cfg = _config(checkpoint)
    take_resumed_settings(cfg, [])
    assert cfg['model']['llm'] == 'models/Qwen2.5-1.5B-Instruct'
    assert cfg['model']['vision_encoder']['path'] == 'models/InternViT'
    assert cfg['model']['template'] == 'qwen2_5'   # the rest is taken
    for fresh in (_config(checkpoint, resume=False), dict(_config(checkpoint), load_from=str(tmp_path / 'no.pth'))):
        before = Config(fresh).to_dict()
        assert take_resumed_settings(fresh, []) == [] and Config(fresh).to_dict() == before
    torch.save({'meta': {}, 'state_dict': {}}, str(tmp_path / 'bare.pth'))   # no config recorded in it
    assert take_resumed_settings(_config(str(tmp_path / 'bare.pth')), []) == []


class _Runner:   # plain ``xtuner train``: the runner copied its settings before this package saw the config
    def __init__(self, cfg):
        import copy
        self._train_dataloader = copy.deepcopy(cfg['train_dataloader'])
        self.optim_wrapper = copy.deepcopy(cfg['optim_wrapper'])


def test_what_was_taken_reaches_the_runners_own_copies(tmp_path):
    llm, encoder = tmp_path / 'llm', tmp_path / 'vit'
    llm.mkdir(), encoder.mkdir()
    cfg = _config(_checkpoint(str(tmp_path / 'iter_2.pth'), llm, encoder))
    runner, model = _Runner(cfg), dict(cfg['model'], vision_encoder=dict(cfg['model']['vision_encoder']))
    said_taken(cfg, [])
    carry_taken(cfg, runner, model)
    assert model['llm'] == str(llm) and model['vision_encoder']['path'] == str(encoder)
    assert runner._train_dataloader['dataset']['data_files'] == ['mine.jsonl']
    assert runner._train_dataloader['num_workers'] == 4
    assert runner.optim_wrapper['accumulative_counts'] == 1
    assert resumed_settings._TAKEN and all('=' not in key for key in resumed_settings._TAKEN)
    said_taken(_config(str(tmp_path / 'iter_2.pth'), resume=False), [])
    assert resumed_settings._TAKEN == []   # another run in the process: nothing carried
    assert os.path.exists(llm)
