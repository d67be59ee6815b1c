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
