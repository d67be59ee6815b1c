"""A resume takes the settings its checkpoint was trained with (``engine/resumed_settings.py``): a run started with
``--cfg-options`` for its models and data, resumed with ``--resume`` alone, built the config file's example models
(``vision encoder folder not found``) or was refused setting by setting (the checkpoint sweep). And what a sweep of
that found: packing's budgets, a shard folder, DeepSpeed's accumulation and the training length were not taken; a
run from an official checkpoint could not resume; data paths gone were taken; the safety settings were."""

import copy

import pytest
import torch
from mmengine.config import Config

from xtuner_plugins.engine import resumed_settings
from xtuner_plugins.engine.resumed_settings import carry_taken, said_taken, take_resumed_settings


class Model:   # a class in the config, as the stage configs import theirs
    def __init__(self, llm=None, vision_encoder=None, official_checkpoint=None, template=None, from_scratch=False,
                 compile_blocks='auto', torch_dtype=None, llm_lora=None, pretrained_pth=None):
        pass


class Data:
    def __init__(self, data_files=None, cache_dir=None, max_length=8192, allow_control_text=False,
                 max_image_pixels=None, image_folders=None):
        pass


class Packed:
    def __init__(self, dataset, max_tokens=16384, max_tiles=None):
        pass


class Loop:
    def __init__(self, max_iters=None, max_epochs=None):
        pass


# the other classes the config names, by the names the recorded config gives (a class of another name is another
# component: its settings are not taken)
InternViT, LoraConfig, Sampler, AdamW, AmpOptimWrapper = (type(n, (), {}) for n in (
    'InternViT', 'LoraConfig', 'Sampler', 'AdamW', 'AmpOptimWrapper'))


RECORDED = '''
model = dict(type='tests.engine.test_resumed_settings.Model', llm={llm!r},
             vision_encoder=dict(type='InternViT', path={encoder!r}, select_layer=-1),
             template='qwen2_5', from_scratch=True, compile_blocks=False, torch_dtype='torch.bfloat16',
             a_setting_this_version_removed=1,
             llm_lora=dict(type='peft.LoraConfig', r=8, lora_alpha=16, lora_dropout=0.1))
train_dataloader = dict(batch_size=2, num_workers=0, sampler=dict(type='Sampler', per_device_batch_size=2),
                        dataset=dict(type='Data', data_files={data!r}, cache_dir='/theirs/cache', max_length=2048,
                                     allow_control_text=True, max_image_pixels=1000000000000, image_folders=['gone/']))
optim_wrapper = dict(type='AmpOptimWrapper', accumulative_counts=1, clip_grad=dict(max_norm=0.5),
                     optimizer=dict(type='AdamW', lr=0.01))
train_cfg = dict(type='Loop', max_iters=6)
'''


def _checkpoint(path, text):
    """A training checkpoint recording ``text`` as its config (MMEngine dumps classes as their names)."""
    torch.save({'meta': {'cfg': text}, 'state_dict': {}}, path)
    return path


@pytest.fixture
def run(tmp_path):
    llm, encoder, data = tmp_path / 'llm', tmp_path / 'vit', tmp_path / 'mine.jsonl'
    llm.mkdir(), encoder.mkdir(), data.write_text('')
    text = RECORDED.format(llm=str(llm), encoder=str(encoder), data=[str(data)])
    return dict(llm=str(llm), encoder=str(encoder), data=str(data),
                checkpoint=_checkpoint(str(tmp_path / 'iter_2.pth'), text))


def _config(checkpoint, resume=True):
    """This run's config as the stage config file gives it (its example paths), resuming ``checkpoint``."""
    return dict(resume=resume, load_from=checkpoint, work_dir='w', max_epochs=1, max_iters=None,
                model=dict(type=Model, llm='models/Qwen2.5-1.5B-Instruct', compile_blocks='auto',
                           vision_encoder=dict(type=InternViT, path='models/InternViT', select_layer=-2),
                           template=None, torch_dtype=torch.bfloat16,
                           llm_lora=dict(type=LoraConfig, r=64, lora_alpha=32, lora_dropout=0.05)),
                train_dataloader=dict(batch_size=4, num_workers=4,
                                      sampler=dict(type=Sampler, per_device_batch_size=4),
                                      dataset=dict(type=Data, data_files=['data/my_sft.jsonl'], cache_dir=None,
                                                   max_length=8192, allow_control_text=False,
                                                   image_folders=['data/images'])),
                optim_wrapper=dict(type=AmpOptimWrapper, accumulative_counts=16, clip_grad=dict(max_norm=1.0),
                                   optimizer=dict(type=AdamW, lr=4e-5)),
                train_cfg=dict(type=Loop))


def test_a_resume_takes_what_the_command_line_does_not_name(run):
    cfg = _config(run['checkpoint'])
    taken, left = take_resumed_settings(cfg, ['resume', 'load_from', 'model.llm_lora.lora_alpha'])
    model, loader = cfg['model'], cfg['train_dataloader']
    assert model['llm'] == run['llm'] and model['vision_encoder']['path'] == run['encoder']
    assert model['template'] == 'qwen2_5' and model['from_scratch'] is True
    assert model['llm_lora'] == dict(type=LoraConfig, r=8, lora_alpha=32, lora_dropout=0.1)   # alpha: named
    assert model['vision_encoder']['select_layer'] == -1
    assert model['compile_blocks'] == 'auto' and model['type'] is Model   # how it runs; the classes stay
    assert model['torch_dtype'] is torch.bfloat16   # the same dtype, named as text in the record
    assert 'a_setting_this_version_removed' not in model   # Model does not take it: said, not passed on
    assert loader['dataset'] == dict(type=Data, data_files=[run['data']], cache_dir=None, max_length=2048,
                                     allow_control_text=False, image_folders=['data/images'])
    assert loader['batch_size'] == 2 and loader['sampler']['per_device_batch_size'] == 2
    assert loader['num_workers'] == 4   # this machine's
    assert cfg['optim_wrapper'] == dict(type=AmpOptimWrapper, accumulative_counts=1, clip_grad=dict(max_norm=0.5),
                                        optimizer=dict(type=AdamW, lr=0.01))
    assert cfg['train_cfg'] == dict(type=Loop, max_iters=6)   # the length it was started for, not the file's epoch
    assert f"model.llm='{run['llm']}' (the config: 'models/Qwen2.5-1.5B-Instruct')" in taken
    assert 'train_cfg.max_iters=6 (the config: max_epochs=1)' in taken
    assert not any(entry.startswith(('model.llm_lora.lora_alpha', 'model.compile_blocks')) for entry in taken)
    assert left == [
        f"model.a_setting_this_version_removed=1 (not a setting of {Model!r} now)",
        "train_dataloader.dataset.allow_control_text=True (what input a run accepts is its own: this one has False; "
        "name it to keep it)",
        "train_dataloader.dataset.max_image_pixels=1000000000000 (what input a run accepts is its own: this one has "
        "its default; name it to keep it)",
        "train_dataloader.dataset.image_folders: gone/ not found (the config's ['data/images'] is used)"]
    assert cfg['train_dataloader']['dataset']['allow_control_text'] is False


def test_a_setting_the_command_line_names_stays_in_every_form(run):
    cfg = _config(run['checkpoint'])
    take_resumed_settings(cfg, ['model.llm', 'train_dataloader.dataset', 'optim_wrapper.accumulative_counts',
                                'max_epochs'])
    assert cfg['model']['llm'] == 'models/Qwen2.5-1.5B-Instruct'
    assert cfg['train_dataloader']['dataset']['data_files'] == ['data/my_sft.jsonl']
    assert cfg['optim_wrapper']['accumulative_counts'] == 16 and cfg['train_cfg'] == dict(type=Loop)
    cfg = _config(run['checkpoint'])
    left = take_resumed_settings(cfg, ['optim_wrapper.accumulative_counts'])[1]   # named otherwise: said
    assert "optim_wrapper.accumulative_counts=1 (named 16: each optimizer step from here takes 16 iterations' " \
           "gradients where the run's took 1; the resume is not exact)" in left, left


def test_sources_gone_or_none_and_a_new_run(tmp_path, run):
    text = RECORDED.format(llm=str(tmp_path / 'gone'), encoder=None, data=[run['data']])
    text = text.replace("vision_encoder=dict(type='InternViT', path=None, select_layer=-1)", 'vision_encoder=None')
    cfg = _config(_checkpoint(str(tmp_path / 'official.pth'), text.replace(
        'template=', f"official_checkpoint={run['llm']!r}, template=")))
    cfg['model']['vision_encoder'] = 'models/InternViT'
    taken, left = take_resumed_settings(cfg, [])
    assert cfg['model']['llm'] == 'models/Qwen2.5-1.5B-Instruct'   # gone: the config's, said
    assert f"model.llm: {tmp_path / 'gone'} not found (the config's 'models/Qwen2.5-1.5B-Instruct' is used)" in left
    assert cfg['model']['vision_encoder'] is None and cfg['model']['official_checkpoint'] == run['llm']
    for fresh in (_config(run['checkpoint'], resume=False), dict(_config(run['checkpoint']), load_from='no.pth')):
        before = Config(fresh).to_dict()
        assert take_resumed_settings(fresh, []) == ([], []) and Config(fresh).to_dict() == before
    _checkpoint(str(tmp_path / 'bare.pth'), '')   # no config recorded in it
    assert take_resumed_settings(_config(str(tmp_path / 'bare.pth')), [])[1][0].startswith(
        'it records no training config')
    _checkpoint(str(tmp_path / 'code.pth'), 'import os\nmodel = dict()')   # read as data, never run
    assert 'not a plain setting' in take_resumed_settings(_config(str(tmp_path / 'code.pth')), [])[1][0]


def test_packing_budgets_and_deepspeed_words(tmp_path, run):
    text = RECORDED.replace("dataset=dict(type='Data'", "dataset=dict(type='Packed', max_tokens=600, max_tiles=8, "
                                                         "dataset=dict(type='Data'").replace(
        "image_folders=['gone/']))", "image_folders=['gone/'])))")
    text = text.format(llm=run['llm'], encoder=run['encoder'], data=[run['data']])
    cfg = _config(_checkpoint(str(tmp_path / 'packed.pth'), text))
    cfg['train_dataloader']['dataset'] = dict(type=Packed, max_tokens=16384, max_tiles=48,
                                              dataset=cfg['train_dataloader']['dataset'])
    ds = dict(gradient_accumulation_steps=16, train_micro_batch_size_per_gpu=4, gradient_clipping=1.0)
    cfg['strategy'], cfg['optim_wrapper'] = dict(ds), dict(type=Model, optimizer=dict(type=AdamW, lr=4e-5))
    take_resumed_settings(cfg, [])
    packed = cfg['train_dataloader']['dataset']
    assert (packed['max_tokens'], packed['max_tiles'], packed['dataset']['max_length']) == (600, 8, 2048)
    assert cfg['strategy'] == dict(gradient_accumulation_steps=1, train_micro_batch_size_per_gpu=2,
                                   gradient_clipping=0.5)
    assert 'accumulative_counts' not in cfg['optim_wrapper']   # DeepSpeed's wrapper takes none
    cfg = _config(_checkpoint(str(tmp_path / 'packed.pth'), text))
    cfg['strategy'] = dict(ds)
    take_resumed_settings(cfg, ['optim_wrapper.accumulative_counts', 'train_dataloader.batch_size'])
    assert cfg['strategy']['gradient_accumulation_steps'] == 16   # named in the wrapper's words: stays
    assert cfg['strategy']['train_micro_batch_size_per_gpu'] == 4


def test_what_was_taken_reaches_the_runners_own_copies_and_the_log(run, monkeypatch):
    cfg = Config(_config(run['checkpoint']))   # plain xtuner train: MMEngine's Config, no Mapping
    runner = type('Runner', (), {})()
    runner._train_dataloader = copy.deepcopy(cfg.train_dataloader.to_dict())
    runner.optim_wrapper, runner._train_loop = copy.deepcopy(cfg.optim_wrapper.to_dict()), dict(type=Loop)
    model = copy.deepcopy(cfg.model.to_dict())
    said_taken(cfg._cfg_dict, [])
    carry_taken(cfg, runner, model)
    assert model['llm'] == run['llm'] and model['vision_encoder']['path'] == run['encoder']
    assert runner._train_dataloader['dataset']['data_files'] == [run['data']]
    assert runner._train_dataloader['num_workers'] == 4
    assert runner.optim_wrapper['accumulative_counts'] == 1 and runner._train_loop == dict(type=Loop, max_iters=6)
    said = []
    monkeypatch.setattr('mmengine.logging.print_log', lambda line, **kw: said.append((kw.get('level'), line)))
    resumed_settings.say_taken()
    resumed_settings.say_taken()   # once
    assert [level for level, _ in said] == [20, 30], said   # what was taken; what was not (a warning)
    assert said[0][1].startswith(f'--resume {run["checkpoint"]}: goes on with the settings it was trained with')
    said_taken(_config(run['checkpoint'], resume=False), [])
    assert resumed_settings._TAKEN == []   # another run in the process: nothing carried


def test_another_optimizer_or_loop_is_refused_and_another_data_set_keeps_its_settings(run):
    """SGD over a run of AdamW's ended in a KeyError traceback as its state loaded (AdamW's settings taken into
    it); a loop of epochs over a run of iterations trained past its end and saved nothing, exit 0 (a sweep)."""
    from xtuner_plugins.errors import Refused
    SGD, EpochLoop = type('SGD', (), {}), type('EpochLoop', (), {})
    for part, other, what in (('optim_wrapper', dict(type=SGD, lr=0.1), 'the optimizer AdamW, and this config gives '
                                                                          'SGD'),
                              ('train_cfg', dict(type=EpochLoop, max_epochs=1), 'the training loop Loop, and this '
                                                                                'config gives EpochLoop')):
        cfg = _config(run['checkpoint'])
        if part == 'optim_wrapper':
            cfg['optim_wrapper']['optimizer'] = other
        else:
            cfg['train_cfg'] = other
        with pytest.raises(Refused, match=f'it was trained with {what}: the saved state is the other'):
            take_resumed_settings(cfg, [])
    cfg = _config(run['checkpoint'])
    cfg['train_dataloader']['dataset']['type'] = Packed   # another data set: its settings are its own
    taken, left = take_resumed_settings(cfg, [])
    assert cfg['train_dataloader']['dataset']['max_length'] == 8192
    assert "train_dataloader.dataset: trained as Data, this config builds Packed (its settings are not taken)" in left


def test_a_streams_workers_are_taken(tmp_path, run):
    """A stream's saved position is its DataLoader workers': a resume alone with the config's 2 was refused."""
    from xtuner_plugins.data.online_packing import OnlinePackedDataset
    text = RECORDED.format(llm=run['llm'], encoder=run['encoder'], data=[run['data']])
    for kind, workers in ((OnlinePackedDataset, 0), (Data, 4)):
        cfg = _config(_checkpoint(str(tmp_path / 'stream.pth'), text.replace("type='Data'", f"type='{kind.__name__}'")))
        cfg['train_dataloader']['dataset']['type'] = kind
        take_resumed_settings(cfg, [])
        assert cfg['train_dataloader']['num_workers'] == workers, kind


class Hook:
    def __init__(self, interval=None, max_keep_ckpts=-1, by_epoch=True, policy='stop', max_skipped=10,
                 timeout=300, data_file=None):
        pass


Guard, Eval = (type(n, (Hook,), {}) for n in ('Guard', 'Eval'))


def test_the_hooks_log_and_seed_are_taken(tmp_path, run):
    """A run kept 5 checkpoints every 2 iterations; resumed alone under the config file's max_keep_ckpts=2 its
    first save deleted three of them (MMEngine's rotation over the steps it recorded), and it saved every 500. What a
    run lets pass, the watchdog's time and a data file gone stay this run's, and a checkpoint rotation that would
    keep fewer than this config asks too; hooks of a class the run and the config hold otherwise many of keep theirs
    (an eval's settings went onto another eval: a helper's sweep)."""
    val = tmp_path / 'val.jsonl'
    val.write_text('')
    text = RECORDED.format(llm=run['llm'], encoder=run['encoder'], data=[run['data']]) + f'''
save_every = 2
log_processor = dict(by_epoch=False, window_size=1)
randomness = dict(seed=7)
default_hooks = dict(checkpoint=dict(type='Hook', interval=2, max_keep_ckpts=5, by_epoch=False),
                     logger=dict(type='Hook', interval=1), gone=dict(type='Hook', interval=3),
                     stall_watchdog=dict(type='Hook', timeout=30))
custom_hooks = [dict(type='Hook'), dict(type='Eval', interval=4, data_file={str(val)!r}),
                dict(type='Guard', policy='skip', max_skipped=3), dict(type='Eval', data_file='gone.jsonl')]
'''

    def config(keep=2, evals=2):
        cfg = _config(_checkpoint(str(tmp_path / 'hooks.pth'), text))
        cfg.update(save_every=500, log_processor=dict(by_epoch=False), randomness=dict(seed=42),
                   default_hooks=dict(checkpoint=dict(type=Hook, max_keep_ckpts=keep, by_epoch=False),
                                      logger=dict(type=Hook, interval=10), stall_watchdog=dict(type=Hook)),
                   custom_hooks=[dict(type=Guard, policy='stop'), dict(type=Hook)]
                   + [dict(type=Eval, data_file='mine.jsonl') for _ in range(evals)])
        return cfg

    cfg = config()
    taken, left = take_resumed_settings(cfg, [])
    assert cfg['default_hooks'] == dict(checkpoint=dict(type=Hook, interval=2, max_keep_ckpts=5, by_epoch=False),
                                        logger=dict(type=Hook, interval=1), stall_watchdog=dict(type=Hook))
    assert cfg['save_every'] == 2 and cfg['log_processor']['window_size'] == 1 and cfg['randomness']['seed'] == 7
    assert cfg['custom_hooks'] == [dict(type=Guard, policy='stop'), dict(type=Hook),   # the checks: this run's
                                   dict(type=Eval, data_file=str(val), interval=4),    # by class, in order
                                   dict(type=Eval, data_file='mine.jsonl')]            # (gone: the config's)
    assert 'log_processor.window_size=1 (the config: its default)' in taken
    assert [entry for entry in left if entry.startswith('custom_hooks')] == [
        "custom_hooks.3.data_file: gone.jsonl not found (the config's 'mine.jsonl' is used)",
        "custom_hooks.0.policy='skip' (what a run lets pass is its own: this one has 'stop'; name it to keep it)",
        "custom_hooks.0.max_skipped=3 (what a run lets pass is its own: this one has its default; name it to keep "
        "it)"], left
    cfg = config(keep=-1, evals=1)   # keeps all: a resume deletes none
    taken, left = take_resumed_settings(cfg, [])
    assert cfg['default_hooks']['checkpoint']['max_keep_ckpts'] == -1
    assert [e['data_file'] for e in cfg['custom_hooks'][2:]] == ['mine.jsonl']
    assert 'custom_hooks: 2 Eval then, 1 in this config (their settings are not taken)' in left
    cfg = config()
    take_resumed_settings(cfg, ['save_every', 'custom_hooks.0.policy'])   # either name of the interval: both stay
    assert cfg['save_every'] == 500 and 'interval' not in cfg['default_hooks']['checkpoint']
    assert cfg['default_hooks']['checkpoint']['max_keep_ckpts'] == 5


def test_a_setting_the_config_file_gave_and_now_gives_otherwise_is_a_warning(tmp_path, run, monkeypatch):
    """A checkpoint records the keys its run's command line named (engine/named.py): a setting taken from it that
    its run had from the config file, which says otherwise now (edited since: a user who raised the length or the
    learning rate there), is said in a WARNING; one the command line gave then in the INFO line. An older
    checkpoint, without the record: every one in the INFO line (the test above)."""
    text = torch.load(run['checkpoint'], weights_only=False)['meta']['cfg']
    named = ['model.llm', 'model.vision_encoder.path', 'train_dataloader.dataset.data_files', 'max_iters']
    checkpoint = str(tmp_path / 'iter_4.pth')
    torch.save({'meta': {'cfg': text, 'cfg_named': named}, 'state_dict': {}}, checkpoint)
    said = []
    monkeypatch.setattr('mmengine.logging.print_log', lambda line, **kw: said.append((kw.get('level'), line)))
    said_taken(_config(checkpoint), ['model.llm_lora'])
    resumed_settings.say_taken()
    (_, info), (_, edited) = [(level, line) for level, line in said if level in (20, 30)][:2]
    assert [level for level, _ in said][:2] == [20, 30], said
    assert f"model.llm='{run['llm']}'" in info and 'train_cfg.max_iters=6' in info   # named then
    assert "model.template='qwen2_5'" not in info
    assert edited.startswith(f'--resume {checkpoint}: the config file gives otherwise than when the run began'), edited
    assert "model.template='qwen2_5' (the config: None)" in edited and 'optim_wrapper.optimizer.lr=0.01' in edited
    assert "optim_wrapper.accumulative_counts=1 (the config: 16)" in edited   # in the optimizer wrapper's words
    assert 'model.llm=' not in edited and 'max_iters' not in edited and 'model.llm_lora' not in edited
    from xtuner_plugins.engine import named as record
    assert record._NAMED == sorted(named + ['model.llm_lora'])   # what this run's checkpoints record: both
    said.clear()
    cfg = _config(checkpoint)
    cfg.update(max_iters=9)   # the file's length edited (max_epochs=1 still): it wins over max_epochs; said so
    torch.save({'meta': {'cfg': text, 'cfg_named': []}, 'state_dict': {}}, checkpoint)
    said_taken(cfg, [])
    resumed_settings.say_taken()
    assert any(level == 30 and 'train_cfg.max_iters=6 (the config: max_iters=9)' in line for level, line in said), said
    # a checkpoint without the record (an older one): its run's command line is unknown, and this run records none
    # (a record of this command line alone would make the next resume take that run's keys for the file's)
    said_taken(_config(run['checkpoint']), ['max_iters'])
    assert record._NAMED is None
    said_taken(_config(run['checkpoint'], resume=False), ['max_iters'])   # a new run: its own command line
    assert record._NAMED == ['max_iters']


@pytest.mark.parametrize('form', ['folder', 'another class', 'dict into a folder'])
def test_a_source_of_another_form_is_taken_whole(tmp_path, run, form):
    """A run started with ``--cfg-options model.vision_encoder=DIR`` (a folder alone: its type read from its
    config.json) on a config whose encoder is a dict (``configs/llava_finetune_lora.py``: ``type='clip'``,
    ``select_layer=-2``), resumed with ``resume=True`` alone, took the folder into the dict's ``path``: a SigLIP
    folder built as ``clip`` (refused: not a clip encoder), the config's settings in place of the run's."""
    recorded = {'folder': repr(run['encoder']), 'another class': f"dict(type='siglip', path={run['encoder']!r})",
                'dict into a folder': f"dict(type='InternViT', path={run['encoder']!r}, select_layer=-1)"}[form]
    text = RECORDED.format(llm=run['llm'], encoder=run['encoder'], data=[run['data']]).replace(
        f"vision_encoder=dict(type='InternViT', path={run['encoder']!r}, select_layer=-1)",
        f'vision_encoder={recorded}')
    cfg = _config(_checkpoint(str(tmp_path / 'iter_4.pth'), text))
    if form == 'dict into a folder':
        cfg['model']['vision_encoder'] = 'models/InternViT'
    taken, _ = take_resumed_settings(cfg, [])
    expected = {'folder': run['encoder'], 'another class': dict(type='siglip', path=run['encoder']),
                'dict into a folder': dict(type='InternViT', path=run['encoder'], select_layer=-1)}[form]
    assert cfg['model']['vision_encoder'] == expected
    assert any(entry.startswith(f'model.vision_encoder={expected!r} (the config: ') for entry in taken), taken


def test_repeats_given_as_a_list_over_the_configs_number_are_taken(tmp_path, run):
    """``--cfg-options train_dataloader.dataset.repeat_times=[4]`` (the README's form) over the config's ``1.0``:
    resumed with resume=True alone, the run took its files but not their repeats (a list for a number was no value
    of the setting's kind) and was refused for its data, 'repeat_time 4.0 -> 1.0, used 16 -> 4'. InternVLDataset
    takes either form; a list for a setting that takes one number is still not taken."""
    from xtuner_plugins.data import InternVLDataset
    text = RECORDED.replace("dataset=dict(type='Data', ", "dataset=dict(type='InternVLDataset', repeat_times=[4], ")
    cfg = _config(_checkpoint(str(tmp_path / 'iter_4.pth'), text.format(
        llm=run['llm'], encoder=run['encoder'], data=[run['data']])))
    cfg['train_dataloader']['dataset'].update(type=InternVLDataset, repeat_times=1.0)
    taken, _ = take_resumed_settings(cfg, [])
    assert cfg['train_dataloader']['dataset']['repeat_times'] == [4]
    assert 'train_dataloader.dataset.repeat_times=[4] (the config: 1.0)' in taken
    cfg = _config(_checkpoint(str(tmp_path / 'iter_6.pth'), text.replace('max_length=2048', 'max_length=[2048]').format(
        llm=run['llm'], encoder=run['encoder'], data=[run['data']])))
    cfg['train_dataloader']['dataset'].update(type=InternVLDataset, repeat_times=[2, 3])
    take_resumed_settings(cfg, ['train_dataloader.dataset.repeat_times'])   # named: this run's
    assert cfg['train_dataloader']['dataset']['repeat_times'] == [2, 3]
    assert cfg['train_dataloader']['dataset']['max_length'] == 8192   # takes one number: no list taken
