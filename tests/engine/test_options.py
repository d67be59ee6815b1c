"""check_cfg_options on a real stage config: a file variable and a misspelt component setting are named with
what to set instead; valid and new settings pass."""

import os

from mmengine.config import Config

from xtuner_plugins.engine.options import check_cfg_options

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CFG = Config.fromfile(os.path.join(ROOT, 'configs', 'finetune_lora.py'))


def test_valid_and_new_settings_pass():
    assert check_cfg_options(CFG, {'model.llm': 'x', 'model.vision_lora.r': 4, 'resume': True,
                                   'train_dataloader.sampler.mega_batch_mult': 4,
                                   'optim_wrapper.optimizer.paramwise_cfg.custom_keys.mlp1.lr_mult': 2.0}) == []


def test_a_file_variable_names_the_entries_that_hold_its_value():
    (problem,) = check_cfg_options(CFG, {'llm_path': 'models/other'})
    assert problem.startswith('llm_path: a variable of the config file')
    assert 'model.llm' in problem  # the data set's tokenizer follows model.llm (engine/derive.py)


def test_a_misspelt_setting_names_the_closest():
    (problem,) = check_cfg_options(CFG, {'model.vision_encodr': 'x'})
    assert problem.startswith("model.vision_encodr: VisionLanguageModel has no setting 'vision_encodr'; closest: "
                              "model.vision_encoder, ")
    (problem,) = check_cfg_options(CFG, {'train_dataloader.dataset.image_folder': ['x']})
    assert 'InternVLDataset has no setting' in problem and 'train_dataloader.dataset.image_folders' in problem


def test_a_setting_of_an_inner_entry_names_that_entry():
    """The packed config wraps the data set (train_dataloader.dataset.dataset): its data files set one level up
    are named where they go, not as the closest setting of the wrapper."""
    packed = Config.fromfile(os.path.join(ROOT, 'configs', 'finetune_full_packed.py'))
    (problem,) = check_cfg_options(packed, {'train_dataloader.dataset.data_files': ['x.jsonl']})
    assert problem == ("train_dataloader.dataset.data_files: PackedInternVLDataset has no setting 'data_files'; it is "
                       "train_dataloader.dataset.dataset.data_files")
    assert check_cfg_options(packed, {'train_dataloader.dataset.dataset.data_files': ['x.jsonl']}) == []


def test_a_value_of_the_wrong_kind_is_named_with_the_kind_expected():
    (problem,) = check_cfg_options(CFG, {'train_dataloader.dataset.max_length': 'abc'})
    assert problem == ("train_dataloader.dataset.max_length: expected a number (the config has 8192), got 'abc' "
                       "(str)")
    (problem,) = check_cfg_options(CFG, {'train_dataloader.dataset.seed': 'x'})  # not in the config: the default
    assert problem == "train_dataloader.dataset.seed: expected a number (InternVLDataset's default is 0), got 'x' (str)"
    (problem,) = check_cfg_options(CFG, {'train_dataloader.dataset.use_thumbnail': 'yes'})
    assert problem.startswith('train_dataloader.dataset.use_thumbnail: expected true or false (the config has True)')
    (problem,) = check_cfg_options(CFG, {'max_length': 'abc'})  # a file variable: set the entries instead
    assert problem.startswith('max_length: a variable of the config file')
    assert check_cfg_options(CFG, {'train_dataloader.dataset.max_length': None,
                                   'train_dataloader.dataset.repeat_times': 2,
                                   'train_dataloader.dataset.use_thumbnail': False}) == []
    assert check_cfg_options(CFG, {'train_dataloader.dataset.max_length': 4096.0}) == []
    # a list where the argument takes one (repeat_times: one per file), as the README passes it; not elsewhere
    assert check_cfg_options(CFG, {'train_dataloader.dataset.repeat_times': [16, 2]}) == []
    (problem,) = check_cfg_options(CFG, {'train_dataloader.dataset.max_length': [16]})
    assert problem.startswith('train_dataloader.dataset.max_length: expected a number')


def test_a_hooks_setting_is_checked_against_its_class():
    # CheckpointHook takes **kwargs (for save_checkpoint, which the hook gives every argument): its documented
    # arguments are the valid set
    assert check_cfg_options(CFG, {'default_hooks.checkpoint.intervall': 10}) == [
        "default_hooks.checkpoint.intervall: CheckpointHook has no setting 'intervall'; closest: "
        "default_hooks.checkpoint.interval"]
    (problem,) = check_cfg_options(CFG, {'custom_hooks.2.polcy': 'skip'})
    assert problem.startswith("custom_hooks.2.polcy: NonFiniteGuardHook has no setting 'polcy'; closest: "
                              "custom_hooks.2.policy")
    # a hook that takes no settings at all (its class has no __init__): before, taken as one that takes any, and
    # the run ended in 'TypeError: ModelDataCheckHook() takes no arguments' after the models loaded
    assert check_cfg_options(CFG, {'custom_hooks.0.max_skipped': 3}) == [
        "custom_hooks.0.max_skipped: ModelDataCheckHook has no setting 'max_skipped'"]
    (problem,) = check_cfg_options(CFG, {'default_hooks.chekpoint.interval': 10})  # an entry, not a setting
    assert problem.startswith("default_hooks.chekpoint.interval: default_hooks has no entry 'chekpoint'")
    assert problem.endswith('closest: default_hooks.checkpoint')
    assert check_cfg_options(CFG, {'default_hooks.checkpoint.interval': 10, 'default_hooks.checkpoint.save_begin': 5,
                                   'default_hooks.stall_watchdog.timeout': 900, 'custom_hooks.2.policy': 'skip',
                                   'default_hooks.mine.type': 'EmptyCacheHook', 'default_hooks.mine.every': 2}) == []


def test_every_other_key_is_checked_too():
    # a setting the class passes on with **kwargs: the loop's base class takes it or not
    (problem,) = check_cfg_options(CFG, {'train_cfg.max_epoch': 3})
    assert problem == "train_cfg.max_epoch: TrainLoop has no setting 'max_epoch'; closest: train_cfg.max_epochs"
    assert check_cfg_options(CFG, {'train_cfg.val_interval': 10, 'param_scheduler.1.eta_min': 1e-6}) == []
    (problem,) = check_cfg_options(CFG, {'param_scheduler.1.eta_mim': 1e-6})
    assert 'CosineAnnealingLR has no setting' in problem and 'param_scheduler.1.eta_min' in problem
    (problem,) = check_cfg_options(CFG, {'train_dataloader.batchsize': 2})  # torch's DataLoader settings
    assert problem.startswith("train_dataloader.batchsize: DataLoader has no setting 'batchsize'; closest: "
                              "train_dataloader.batch_size")
    (problem,) = check_cfg_options(CFG, {'model.llm_lorra.r': 4})  # a missing sub-dict of a component
    assert problem == "model.llm_lorra: VisionLanguageModel has no setting 'llm_lorra'; closest: model.llm_lora"
    (problem,) = check_cfg_options(CFG, {'llm_lora.r': 8})  # inside a variable of the file: its holders' key
    assert problem.startswith('llm_lora.r: a variable of the config file') and problem.endswith(
        'set model.llm_lora.r instead')
    (problem,) = check_cfg_options(CFG, {'max_epoch': 3})  # a top-level name nothing reads
    assert problem.startswith("max_epoch: 'max_epoch' is not a setting the run reads; closest: max_epochs")


def test_a_setting_without_a_default_is_checked_by_its_annotation():
    (problem,) = check_cfg_options(CFG, {'train_dataloader.sampler.mega_batch_mult': 'x'})
    assert problem == ("train_dataloader.sampler.mega_batch_mult: expected a number (LengthGroupedSampler takes "
                       "int), got 'x' (str)")
    (problem,) = check_cfg_options(CFG, {'model.zero3_init': 'yes'})
    assert problem.startswith('model.zero3_init: expected true or false (VisionLanguageModel takes bool)')


def test_training_length_settings_are_checked():
    assert check_cfg_options(CFG, {'max_epochs': 3}) == []
    assert check_cfg_options(CFG, {'max_iters': 200, 'save_every': 50, 'train_cfg.max_epochs': 2}) == []
    (problem,) = check_cfg_options(CFG, {'max_epochs': 3, 'max_iters': 200})
    assert problem.startswith('max_epochs=3 and max_iters=200: give one of them')
    assert check_cfg_options(CFG, {'max_iters': 'abc', 'save_every': 0}) == [
        "max_iters: expected a positive whole number, got 'abc' (str)",
        'save_every: expected a positive whole number, got 0 (int)']



def test_a_number_out_of_its_settings_range_is_refused():
    """Before, ``lr=nan``, ``lr=-1`` and ``accumulative_counts=0`` went through the checks: the model loaded, then
    torch's or MMEngine's traceback (``Invalid learning rate: nan``, ``AssertionError: _accumulative_counts at
    least greater than or equal to 1``)."""
    bad = {'optim_wrapper.optimizer.lr': float('nan'), 'optim_wrapper.optimizer.weight_decay': -0.1,
           'optim_wrapper.clip_grad.max_norm': float('inf'), 'optim_wrapper.accumulative_counts': 0,
           'train_dataloader.batch_size': 2.5, 'train_dataloader.sampler.per_device_batch_size': -1,
           'train_dataloader.num_workers': -2}
    assert check_cfg_options(CFG, bad) == [
        'optim_wrapper.optimizer.lr: expected a finite number >= 0, got nan',
        'optim_wrapper.optimizer.weight_decay: expected a finite number >= 0, got -0.1',
        'optim_wrapper.clip_grad.max_norm: expected a finite number > 0, got inf',
        'optim_wrapper.accumulative_counts: expected a whole number >= 1, got 0',
        'train_dataloader.batch_size: expected a whole number >= 1, got 2.5',
        'train_dataloader.sampler.per_device_batch_size: expected a whole number >= 1, got -1',
        'train_dataloader.num_workers: expected a whole number >= 0, got -2']
    assert check_cfg_options(CFG, {'optim_wrapper.optimizer.lr': 0, 'optim_wrapper.accumulative_counts': 8,
                                   'train_dataloader.num_workers': 0, 'optim_wrapper.clip_grad.max_norm': 0.5}) == []
    # the data set's and the loop's (found by a sweep: tracebacks after the model loaded)
    bad = {'train_dataloader.dataset.max_length': 0, 'train_dataloader.dataset.max_dynamic_patch': 0,
           'default_hooks.logger.interval': 0, 'model.llm_lora.r': -4}
    assert check_cfg_options(CFG, bad) == [
        'train_dataloader.dataset.max_length: expected a whole number >= 1, got 0',
        'train_dataloader.dataset.max_dynamic_patch: expected a whole number >= 1, got 0',
        'default_hooks.logger.interval: expected a whole number >= 1, got 0',
        'model.llm_lora.r: expected a whole number >= 1, got -4']
    # a packed config's data set, under packing's wrapper: refused by the data set after the model loaded
    packed = Config.fromfile(os.path.join(ROOT, 'configs', 'finetune_full_packed.py'))
    assert check_cfg_options(packed, {'train_dataloader.dataset.dataset.max_length': 0,
                                      'train_dataloader.dataset.dataset.max_dynamic_patch': 0}) == [
        'train_dataloader.dataset.dataset.max_length: expected a whole number >= 1, got 0',
        'train_dataloader.dataset.dataset.max_dynamic_patch: expected a whole number >= 1, got 0']
    assert check_cfg_options(packed, {'train_dataloader.dataset.dataset.max_length': 4096}) == []
    # a range with a top: torch's dropout refused 2.0 as the adapters were built, a traceback after the models loaded
    assert check_cfg_options(CFG, {'model.llm_lora.lora_dropout': 2.0, 'model.vision_drop_path': 1}) == [
        'model.llm_lora.lora_dropout: expected a number >= 0 and < 1, got 2.0',
        'model.vision_drop_path: expected a number >= 0 and < 1, got 1']
    assert check_cfg_options(CFG, {'model.llm_lora.lora_dropout': 0.0, 'model.vision_drop_path': 0.1}) == []
    assert check_cfg_options(CFG, {'randomness.seed': -1, 'optim_wrapper.optimizer.eps': -1e-8}) == [
        'randomness.seed: expected a whole number >= 0 and < 2**32, got -1',
        'optim_wrapper.optimizer.eps: expected a finite number >= 0, got -1e-08']
    assert check_cfg_options(CFG, {'randomness.seed': 2 ** 32 - 1}) == []


def test_adamws_betas_not_a_pair_in_its_range_are_refused():
    """``optim_wrapper.optimizer.betas=0.9`` went through the checks: the model loaded, then torch's AdamW raised
    "TypeError: 'float' object is not subscriptable" (and 'Invalid beta parameter' for 1.5) after a traceback."""
    said = "expected two numbers, each >= 0 and < 1 (AdamW's [beta1,beta2], e.g. [0.9,0.999])"
    for value in (0.9, [0.9], [0.9, 1.5], [0.9, -0.1], ['a', 0.9], [0.9, 0.99, 0.999], [True, 0.9]):
        assert check_cfg_options(CFG, {'optim_wrapper.optimizer.betas': value}) == [
            f'optim_wrapper.optimizer.betas: {said}, got {value!r}'], value
    assert check_cfg_options(CFG, {'optim_wrapper.optimizer.betas': [0.9, 0.95]}) == []
    assert check_cfg_options(CFG, {'optim_wrapper.optimizer.betas': (0, 0.999)}) == []


def test_a_file_variable_is_not_traced_to_settings_by_a_number_alone():
    """``save_total_limit=0`` (a file variable of 2) named train_dataloader.num_workers and max_keep_ckpts (both
    2) as where to set it; a number matches unrelated settings, a dict or a path names its holders."""
    (problem,) = check_cfg_options(CFG, {'save_total_limit': 0})
    assert problem.endswith('set the entry that uses it instead; those holding its value (2) are '
                            'train_dataloader.num_workers, default_hooks.checkpoint.max_keep_ckpts'), problem


def test_a_misspelt_setting_of_a_plain_dict_entry_or_a_wrapper_that_builds_another_is_named():
    """Entries without a ``type`` are read by a known component (LoRA's by peft's LoraConfig, ``env_cfg`` by the
    runner's set-up, ``randomness``, ``log_processor``, ``clip_grad``), and AutoOptimWrapper's settings are the
    wrapper's it builds: a misspelt key there was merged without a word (``env_cfg.cudnn_benchmrk``: ignored; the
    others failed after the models loaded)."""
    cases = {'model.llm_lora.lora_alpah': 'model.llm_lora.lora_alpha',
             'env_cfg.cudnn_benchmrk': 'env_cfg.cudnn_benchmark', 'randomness.sed': 'randomness.seed',
             'log_processor.windw_size': 'log_processor.window_size',
             'optim_wrapper.clip_grad.max_nrom': 'optim_wrapper.clip_grad.max_norm',
             'optim_wrapper.optimzer.fused': 'optim_wrapper.optimizer'}
    for key, closest in cases.items():
        (problem,) = check_cfg_options(CFG, {key: 1})
        assert 'has no setting' in problem and f'closest: {closest}' in problem, problem
    # their valid settings, MMEngine's _delete_ and what the builders take out before building still pass
    assert check_cfg_options(CFG, {'model.llm_lora.lora_alpha': 8, 'model.llm_lora._delete_': True,
                                   'env_cfg.cudnn_benchmark': True, 'env_cfg.dist_cfg.timeout': 60,
                                   'randomness.seed': 3, 'log_processor.window_size': 1,
                                   'optim_wrapper.clip_grad.norm_type': 2.0, 'optim_wrapper.dtype': 'float16',
                                   'optim_wrapper.paramwise_cfg.custom_keys.mlp1.lr_mult': 2.0}) == []
    mlp = Config.fromfile(os.path.join(ROOT, 'configs', 'pretrain_mlp.py'))   # no paramwise_cfg of its own
    assert check_cfg_options(mlp, {'optim_wrapper.optimizer.paramwise_cfg.custom_keys.mlp1.lr_mult': 2.0}) == []


def test_a_number_in_place_of_an_entry_of_settings_is_refused():
    """``model=3`` replaced the whole model entry and failed later with an AttributeError (in training and in the
    planner); a folder's path in place of a built tokenizer and None stay allowed."""
    (problem,) = check_cfg_options(CFG, {'model': 3})
    assert problem.startswith("model: expected a dict of settings or None (the config has VisionLanguageModel's "
                              'settings there), got 3 (int)')
    (problem,) = check_cfg_options(CFG, {'optim_wrapper.optimizer': [1, 2]})
    assert "AdamW's settings" in problem
    assert check_cfg_options(CFG, {'model.llm_lora': None, 'model.vision_lora': {'r': 4}}) == []
    built = CFG.to_dict()
    built['train_dataloader']['dataset']['tokenizer'] = dict(type='AutoTokenizer', pretrained_model_name_or_path='x')
    assert check_cfg_options(built, {'train_dataloader.dataset.tokenizer': 'models/llm'}) == []


def test_a_dict_written_in_braces_is_refused_naming_the_entry_by_entry_form():
    """MMEngine's --cfg-options reads no {...} dict: it kept ``{'r':4}`` as text and cut ``{'r':4,'lora_alpha':8}``
    at its comma into two texts, and the model failed on them with a traceback once everything had loaded."""
    import argparse

    from mmengine.config import DictAction
    parser = argparse.ArgumentParser()
    parser.add_argument('--cfg-options', nargs='+', action=DictAction)
    options = parser.parse_args(['--cfg-options', "model.vision_lora={'r':4,'lora_alpha':8}",
                                 "model.llm_lora={'r':4}"]).cfg_options
    problems = check_cfg_options(CFG, options)
    assert [p.split(':')[0] for p in problems] == ['model.vision_lora', 'model.llm_lora'], problems
    assert all('--cfg-options does not read a {...} dict' in p for p in problems)
    # vision_lora is None in the config: set afresh (_delete_); llm_lora is a dict: its entries merge into it
    assert problems[0].endswith('model.vision_lora.NAME=VALUE beside model.vision_lora._delete_=True'), problems
    assert problems[1].endswith('set each entry on its own, model.llm_lora.NAME=VALUE'), problems
    # text settings may be written so: a format string, a message
    assert check_cfg_options(CFG, {'train_dataloader.dataset.frame_prefix': '{i}',
                                   'train_dataloader.dataset.system': '{"task": "caption"}',
                                   'model.llm': '{odd}name'}) == []


def test_delete_under_a_setting_the_config_does_not_give_is_refused():
    """MMEngine drops ``_delete_`` only where it replaces an entry the config has; under one the config lacks
    (finetune_full.py gives no vision_lora) it was handed to peft's LoraConfig, a TypeError after the models
    loaded."""
    full = Config.fromfile(os.path.join(ROOT, 'configs', 'finetune_full.py'))
    (problem,) = check_cfg_options(full, {'model.vision_lora._delete_': True, 'model.vision_lora.r': 4})
    assert problem.startswith('model.vision_lora._delete_: the config gives no model.vision_lora to replace')
    assert check_cfg_options(full, {'model.vision_lora.r': 4}) == []
    assert check_cfg_options(CFG, {'model.vision_lora._delete_': True, 'model.vision_lora.r': 4}) == []


def test_a_type_no_registry_has_is_refused_with_the_names_there():
    """``optim_wrapper.type=Foo`` went through the checks: the model loaded, then MMEngine's registry raised
    'KeyError: Foo is not in the mmengine::optim_wrapper registry' after a traceback (``optimizer.type=Foo``: 'None is
    not a callable object'). A name the registry has, or a dotted path, passes; its entry's other settings are then
    checked against the class it names (a scheduler's convert_to_iter_based is the runner's, taken out first)."""
    assert check_cfg_options(CFG, {'optim_wrapper.type': 'Foo'}) == [
        "optim_wrapper.type: no 'Foo' in MMEngine's optim_wrapper registry, which the runner builds it from: give one "
        'of AmpOptimWrapper, ApexOptimWrapper, ColossalAIOptimWrapper, DeepSpeedOptimWrapper, OptimWrapper, or a '
        'class by its dotted path (module.Class)']
    (problem,) = check_cfg_options(CFG, {'param_scheduler.1.type': 'Cosine'})
    assert problem.startswith("param_scheduler.1.type: no 'Cosine' in MMEngine's parameter scheduler registry") \
        and '(closest: CosineRestartLR, CosineAnnealingLR)' in problem, problem
    for key in ('optim_wrapper.optimizer.type', 'train_cfg.type', 'default_hooks.checkpoint.type',
                'custom_hooks.1.type', 'train_dataloader.sampler.type'):
        (problem,) = check_cfg_options(CFG, {key: 'Foo'})
        assert problem.startswith(f"{key}: no 'Foo' in MMEngine's "), problem
    assert check_cfg_options(CFG, {'optim_wrapper.type': 'AmpOptimWrapper', 'optim_wrapper.optimizer.type': 'Adam',
                                   'param_scheduler.1.type': 'CosineAnnealingLR', 'param_scheduler.0.type': 'WarmupLR',
                                   'default_hooks.checkpoint.type': 'CheckpointHook'}) == []
    assert check_cfg_options(CFG, {'optim_wrapper.optimizer.type': 'torch.optim.Adam'}) == []
    # SGD takes momentum (AdamW does not), but not the betas the config gives: a TypeError after the model loaded
    (problem,) = check_cfg_options(CFG, {'optim_wrapper.optimizer.type': 'SGD',
                                         'optim_wrapper.optimizer.momentum': 0.9})
    assert problem.startswith("optim_wrapper.optimizer.type=SGD: optim_wrapper.optimizer.betas: SGD has no setting "
                              "'betas', which the config gives (optim_wrapper.optimizer.betas=(0.9, 0.999)): give "
                              'optim_wrapper.optimizer._delete_=True'), problem
    assert check_cfg_options(CFG, {'optim_wrapper.optimizer.type': 'SGD', 'optim_wrapper.optimizer._delete_': True,
                                   'optim_wrapper.optimizer.momentum': 0.9, 'optim_wrapper.optimizer.lr': 0.1}) == []


def test_a_checkpoint_interval_lora_alpha_or_backend_out_of_range_is_refused():
    """``default_hooks.checkpoint.interval=0`` (or -3) ran and saved nothing but the last checkpoint, without a word;
    ``model.llm_lora.lora_alpha=-8`` trained each adapter update with its sign turned (0: none applied);
    ``env_cfg.dist_cfg.backend=foo`` was taken by a run of one process and stopped a run of two with 'AssertionError:
    Unknown backend type foo' tracebacks from each rank."""
    bad = {'default_hooks.checkpoint.interval': 0, 'model.llm_lora.lora_alpha': -8,
           'model.vision_lora.lora_alpha': 0, 'env_cfg.dist_cfg.backend': 'foo'}
    problems = check_cfg_options(CFG, bad)
    assert problems[:3] == [
        'default_hooks.checkpoint.interval: expected a whole number >= 1 (iterations between checkpoints), got 0',
        'model.llm_lora.lora_alpha: expected a number > 0, got -8',
        'model.vision_lora.lora_alpha: expected a number > 0, got 0'], problems
    assert problems[3].startswith('env_cfg.dist_cfg.backend: expected one of gloo, nccl') and \
        problems[3].endswith("(torch.distributed's backends; the configs' DIST_BACKEND is nccl with CUDA, gloo "
                             "without), got 'foo'"), problems
    assert len(problems) == 4
    assert check_cfg_options(CFG, {'default_hooks.checkpoint.interval': -1})[0].endswith('got -1')
    assert check_cfg_options(CFG, {'default_hooks.checkpoint.interval': 50, 'model.llm_lora.lora_alpha': 0.5,
                                   'env_cfg.dist_cfg.backend': 'GLOO'}) == []
    assert check_cfg_options(CFG, {'env_cfg.dist_cfg.backend': 'cpu:gloo,cuda:nccl'}) == []
    assert check_cfg_options(CFG, {'env_cfg.dist_cfg.backend': 'hccl'}) == []   # torch_npu's, registered on import
    assert check_cfg_options(CFG, {'env_cfg.dist_cfg.backend': 'cpu:gloo,cuda:foo'})[0].endswith("got "
                                                                                                 "'cpu:gloo,cuda:foo'")


def test_a_log_level_start_method_or_clipping_no_component_has_is_refused():
    """Each ran to a traceback: ``log_level=info`` ('KeyError: info': MMEngine's logger reads the names in capitals)
    and ``env_cfg.mp_cfg.mp_start_method=spwan`` ('cannot find context') as the runner was built,
    ``optim_wrapper.clip_grad.type=foo`` once the model had loaded."""
    import multiprocessing
    assert check_cfg_options(CFG, {'log_level': 'info', 'env_cfg.mp_cfg.mp_start_method': 'spwan',
                                   'optim_wrapper.clip_grad.type': 'foo'}) == [
        "log_level: expected one of CRITICAL, ERROR, WARNING, INFO, DEBUG (logging's level names, in capitals, or a "
        "level's number), got 'info'",
        f'env_cfg.mp_cfg.mp_start_method: expected one of {", ".join(multiprocessing.get_all_start_methods())} '
        "(multiprocessing's start methods here), got 'spwan'",
        "optim_wrapper.clip_grad.type: expected one of norm, value (MMEngine's kinds of clipping: the gradients' norm, "
        "or each value), got 'foo'"]
    assert check_cfg_options(CFG, {'log_level': 'DEBUG', 'env_cfg.mp_cfg.mp_start_method': 'spawn',
                                   'optim_wrapper.clip_grad.type': 'value'}) == []
    assert check_cfg_options(CFG, {'log_level': 10}) == []


def test_a_prefetch_factor_of_0_is_refused():
    """``train_dataloader.prefetch_factor=0``: 'AssertionError: prefetch_factor must be greater than 0 for
    MultiProcessingDataLoaderIter' in a traceback, once the model had loaded."""
    assert check_cfg_options(CFG, {'train_dataloader.prefetch_factor': 0}) == [
        'train_dataloader.prefetch_factor: expected a whole number >= 1, got 0']
    assert check_cfg_options(CFG, {'train_dataloader.prefetch_factor': 4}) == []
