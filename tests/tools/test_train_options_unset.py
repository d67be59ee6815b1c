"""A ``--cfg-options`` key under a setting the config leaves unset (``model.vision_lora.r=4`` in
configs/finetune_lora.py, whose ``vision_lora`` is None) is refused in one line naming the way to set it
(``model.vision_lora._delete_=True`` beside it), by training, the planner and the converter alike: MMEngine's merge
raised a TypeError traceback in each."""

import os

import pytest

from xtuner_plugins.cli.train_args import option_problems
from xtuner_plugins.engine.options import load_config
from xtuner_plugins.cfg_words import option_into_unset

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LORA = os.path.join(ROOT, 'configs', 'finetune_lora.py')
WANTED = (r"model.vision_lora.r: model.vision_lora is None in the config, not a dict of settings, so 'r' has "
          r"nothing to go into; set it afresh with model.vision_lora._delete_=True beside model.vision_lora.r")


def test_training_refuses_it_in_one_line():
    problems = option_problems(LORA, {'model.vision_lora.r': 4})
    assert len(problems) == 1
    assert problems[0].startswith(WANTED.replace('\\', '').split(' (its')[0])


def test_the_planner_and_the_converter_refuse_it():
    with pytest.raises(ValueError, match=r'--cfg-options: ' + WANTED.replace('.', r'\.').replace('(', r'\(')):
        load_config(LORA, {'model.vision_lora.r': 4})


def test_the_way_it_names_works():
    options = {'model.vision_lora._delete_': True, 'model.vision_lora.r': 4, 'model.vision_lora.lora_alpha': 8}
    assert option_problems(LORA, options) == []
    assert dict(load_config(LORA, options).model.vision_lora) == {'r': 4, 'lora_alpha': 8}


def test_keys_into_lists_and_set_dicts_pass():
    from mmengine.config import Config
    cfg = Config.fromfile(LORA)
    assert option_into_unset(cfg, {'custom_hooks.2.policy': 'skip', 'model.llm_lora.r': 8,
                                   'train_dataloader.dataset.max_length': 1024}) is None


def test_an_index_past_a_lists_end_and_a_word_without_a_value_are_one_line():
    """``custom_hooks.9.policy=skip`` (5 hooks) and ``--cfg-options max_iters`` (no value) were a KeyError and a
    ValueError traceback from MMEngine's merge and parser."""
    from xtuner_plugins.cfg_words import unpaired_words
    problems = option_problems(LORA, {'custom_hooks.9.policy': 'skip'})
    assert problems == ['custom_hooks.9.policy: custom_hooks holds 5 entries (0 to 4), so there is no entry 9 (a '
                        'KeyError traceback in MMEngine\'s merge); to add one, set custom_hooks whole in a config '
                        'file'], problems
    assert unpaired_words(['max_iters=4', 'max_iters', '2]']) == [
        "'max_iters' is not KEY=VALUE (every word of --cfg-options is one setting: max_iters=200; a list without "
        "spaces, [a,b], or quoted)", "'2]' is not KEY=VALUE (every word of --cfg-options is one setting: "
        "max_iters=200; a list without spaces, [a,b], or quoted)"]


def test_a_key_given_a_value_and_a_key_inside_it_is_one_line():
    """``model.vision_encoder=DIR model.vision_encoder.path=DIR2``: MMEngine's merge raised a TypeError traceback
    ('str' object does not support item assignment) in training; the converter refused it in one line."""
    siglip = os.path.join(ROOT, 'configs', 'siglip_finetune.py')   # its vision_encoder is a dict of settings
    problems = option_problems(siglip, {'model.vision_encoder': '/a', 'model.vision_encoder.path': '/b'})
    assert problems == ['model.vision_encoder=/a gives model.vision_encoder a value and model.vision_encoder.path=/b '
                        'a key inside it: give one of them']
