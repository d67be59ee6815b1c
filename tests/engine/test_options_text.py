"""check_cfg_options and the settings that take a boolean or a name (``Union[bool, str]``): the name given on the
command line passes (``model.liger_kernel=fused_loss``, ``model.llm_grad_ckpt=keep_attention``), a word given to
a plain boolean is still refused."""

import os

from mmengine.config import Config

from xtuner_plugins.engine.options import check_cfg_options

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CFG = Config.fromfile(os.path.join(ROOT, 'configs', 'finetune_full.py'))


def test_a_setting_that_takes_a_boolean_or_a_name_takes_the_name():
    # liger_kernel's default (False) and llm_grad_ckpt's value in the file (True) are booleans
    assert check_cfg_options(CFG, {'model.liger_kernel': 'fused_loss', 'model.llm_grad_ckpt': 'keep_attention',
                                   'model.compile_blocks': 'llm'}) == []
    # a boolean or one of the names a Literal lists (peft's init_lora_weights: True, 'gaussian', ...)
    lora = Config.fromfile(os.path.join(ROOT, 'configs', 'finetune_lora.py'))
    assert check_cfg_options(lora, {'model.llm_lora.init_lora_weights': 'gaussian'}) == []
    (problem,) = check_cfg_options(CFG, {'model.freeze_llm': 'yes'})
    assert problem.startswith("model.freeze_llm: expected true or false (the config has False), got 'yes'")
    (problem,) = check_cfg_options(CFG, {'model.cudnn_attention': 'on'})
    assert problem.startswith('model.cudnn_attention: expected true or false')


def test_a_text_setting_cut_at_its_commas_is_refused():
    """MMEngine's --cfg-options cuts any value at its commas: ``system=Hi,there`` reached the data set as the list
    ``['Hi', 'there']`` (a TypeError traceback once the samples were tokenised); ``model.llm=a,b`` an AttributeError.
    A setting that takes a list as well (``data_files``, ``image_folders``) keeps its list."""
    (problem,) = check_cfg_options(CFG, {'train_dataloader.dataset.system': ['Hi', 'there']})
    assert problem == ("train_dataloader.dataset.system: takes one text, and MMEngine's --cfg-options cut the value "
                       "at its commas into 2 (['Hi', 'there']): set a text holding a comma in a config file")
    assert check_cfg_options(CFG, {'model.llm': ['models/a', 'b']})[0].startswith('model.llm: takes one text')
    assert check_cfg_options(CFG, {'train_dataloader.dataset.system': 'Hi'}) == []
    assert check_cfg_options(CFG, {'train_dataloader.dataset.data_files': ['a.jsonl', 'b.jsonl'],
                                   'train_dataloader.dataset.image_folders': ['a', 'b']}) == []
