"""ModelDataCheckHook: a data set whose tile size, tokens per tile, image mode or padding colour is not the
model's stops start-up, naming both values; matching ones pass, through the wrappers the runner adds."""

import os
import sys
from types import SimpleNamespace

import pytest

from xtuner_plugins.engine.checks import ModelDataCheckHook, check_geometry

MODEL = dict(image_size=384, num_image_token=169, image_mode='resize', image_mean=(0.5, 0.5, 0.5))


def test_matching_geometry_passes():
    check_geometry(MODEL, dict(MODEL, image_mean=[0.5, 0.5, 0.5]))
    check_geometry(MODEL, dict(MODEL, image_mean=(0.1, 0.2, 0.3)))  # the mean only matters when padding


@pytest.mark.parametrize('key, value, message', [
    ('image_size', 448, 'image_size: model 384, data 448'),
    ('num_image_token', 256, 'num_image_token: model 169, data 256'),
    ('image_mode', 'tile', "image_mode: model 'resize', data 'tile'"),
])
def test_each_mismatch_is_named_with_both_values(key, value, message):
    with pytest.raises(ValueError, match=message):
        check_geometry(MODEL, dict(MODEL, **{key: value}))


def test_padding_colour_is_checked_in_pad_mode():
    model = dict(MODEL, image_mode='pad')
    with pytest.raises(ValueError, match=r'image_mean: model \(0.5, 0.5, 0.5\), data \(0.485, 0.456, 0.406\)'):
        check_geometry(model, dict(model, image_mean=(0.485, 0.456, 0.406)))


def test_hook_unwraps_model_and_packed_dataset():
    model = SimpleNamespace(module=SimpleNamespace(geometry=MODEL))               # DDP-style wrapper
    packed = SimpleNamespace(dataset=SimpleNamespace(geometry=dict(MODEL, num_image_token=4)))
    runner = SimpleNamespace(model=model, _train_loop=SimpleNamespace(dataloader=SimpleNamespace(dataset=packed)))
    with pytest.raises(ValueError, match='num_image_token: model 169, data 4'):
        ModelDataCheckHook().before_run(runner)
    packed.dataset.geometry = dict(MODEL)
    ModelDataCheckHook().before_run(runner)


def test_the_data_sets_tokenizer_must_be_the_models(tiny_tokenizer):
    from xtuner_plugins.engine.checks import check_tokenizers
    from xtuner_plugins.tiny import build_tiny_tokenizer
    check_tokenizers(tiny_tokenizer, build_tiny_tokenizer())  # the same vocabulary, built twice
    other = build_tiny_tokenizer(vocab_size=600)  # another LLM's vocabulary: InternVL's tokens land elsewhere
    with pytest.raises(ValueError, match=r"the data set's tokenizer is not the model's: \d+ tokens with "
                                         r"<IMG_CONTEXT> at id \d+, the model's \d+ tokens"):
        check_tokenizers(tiny_tokenizer, other)


def test_the_data_sets_template_must_be_the_models():
    from xtuner_plugins.data.template import get_template
    from xtuner_plugins.engine.checks import check_templates
    check_templates('internvl2_5', get_template('internvl2_5'))
    with pytest.raises(ValueError, match="template: model 'internvl2_5', data 'vicuna'"):
        check_templates('internvl2_5', SimpleNamespace(name='vicuna'))  # a template registered by a user


def _run_cfg(**options):
    """A config as the runner holds it: the file read, then ``--cfg-options`` merged (as `xtuner train` does)."""
    import os

    from mmengine.config import Config
    cfg = Config.fromfile(os.path.join(os.path.dirname(__file__), '..', '..', 'configs', 'finetune_lora.py'))
    cfg.merge_from_dict(options)
    return cfg


def test_run_options_that_change_nothing_stop_start_up():
    from xtuner_plugins.engine.checks import check_run_options
    check_run_options(_run_cfg(**{'model.llm': 'other/llm', 'train_dataloader.dataset.data_files': ['a.jsonl'],
                                  'work_dir': 'w', 'launcher': 'none'}))
    # model.llm alone: the data set's tokenizer follows it (engine/derive.py)
    with pytest.raises(ValueError, match=r'llm_path: a variable of the config file.*set model\.llm instead'):
        check_run_options(_run_cfg(llm_path='other/llm'))
    with pytest.raises(ValueError, match=r'model\.vision_encodr: VisionLanguageModel has no setting .*closest: '
                                         r'model\.vision_encoder'):
        check_run_options(_run_cfg(**{'model.vision_encodr': 'x'}))


def test_a_type_changed_with_its_entry_replaced_is_checked_on_what_the_run_builds(monkeypatch):
    """``optim_wrapper.optimizer.type=SGD optim_wrapper.optimizer._delete_=True``: MMEngine's merge replaced the
    entry, and the runner's check (``xtuner train``'s only one) must not hold AdamW's betas from the file against
    SGD; the same type without ``_delete_`` keeps them, and is refused."""
    from xtuner_plugins.engine.checks import check_run_options
    monkeypatch.setattr(sys, 'argv', ['train.py'])
    sgd = {'optim_wrapper.optimizer.type': 'SGD', 'optim_wrapper.optimizer.lr': 0.01}
    changed = check_run_options(_run_cfg(**sgd, **{'optim_wrapper.optimizer._delete_': True}))
    assert changed == sgd
    with pytest.raises(ValueError, match=r"optim_wrapper\.optimizer\.type=SGD: .*SGD has no setting 'betas'"):
        check_run_options(_run_cfg(**sgd))


def test_a_length_named_at_the_files_own_value_still_counts(monkeypatch, tmp_path):
    """max_epochs=1 on the command line over a config whose base says max_epochs = 1 and which sets max_iters
    (online packing's config): the option changed no value, so it was dropped and the file's max_iters ran (1000
    iterations), where docs/data.md says online packing refuses max_epochs. It now counts as given."""
    import shutil

    from mmengine.config import Config

    from xtuner_plugins.engine.checks import check_run_options
    from xtuner_plugins.engine.length import resolve_training_length
    root = os.path.join(os.path.dirname(__file__), '..', '..')
    shutil.copytree(os.path.join(root, 'configs'), tmp_path / 'configs')
    mine = tmp_path / 'configs' / 'mine.py'
    mine.write_text('from mmengine.config import read_base\nwith read_base():\n    from .finetune_lora import *\n'
                    'max_iters = 120\n')
    for argv, length in ((['train.py', str(mine), '--cfg-options', 'max_epochs=1'], ('max_epochs', 1)),
                         (['train.py', str(mine)], ('max_iters', 120))):
        monkeypatch.setattr(sys, 'argv', argv)
        cfg = Config.fromfile(str(mine))
        cfg.merge_from_dict({'max_epochs': 1} if len(argv) > 2 else {})
        changed = check_run_options(cfg)
        resolve_training_length(cfg._cfg_dict, changed)
        assert length[0] in cfg.train_cfg and cfg.train_cfg[length[0]] == length[1], cfg.train_cfg


def test_a_max_length_past_the_llms_context_is_warned_of_at_start_up(monkeypatch):
    """A data set's max_length past the LLM's max_position_embeddings trained on positions the LLM never saw, without
    a word (the planner said so; training did not)."""
    from xtuner_plugins.engine.checks import context_note
    config = SimpleNamespace(max_position_embeddings=4096, rope_scaling=None)
    assert context_note(config, 4096) is None and context_note(config, None) is None
    assert context_note(config, 8192) == (
        "train_dataloader.dataset.max_length 8192 is past the LLM's context (max_position_embeddings 4096 = 4096 "
        'tokens): samples that long train on positions it was not trained for; give a max_length of at most 4096, '
        "or a rope_scaling in the LLM's config.json for a longer context")
    config.rope_scaling = {'type': 'yarn', 'factor': 4.0}   # Qwen2.5's long-context recipe
    assert context_note(config, 8192) is None
    assert 'max_position_embeddings 4096 x rope_scaling factor 4 = 16384 tokens' in context_note(config, 20000)
    said = []
    monkeypatch.setattr('mmengine.logging.print_log', lambda line, **kw: said.append((kw.get('level'), line)))
    llm = SimpleNamespace(config=SimpleNamespace(max_position_embeddings=2048))
    model = SimpleNamespace(geometry=MODEL, language_model=llm)
    dataset = SimpleNamespace(dataset=SimpleNamespace(geometry=dict(MODEL), max_length=8192))   # a packing wrapper
    ModelDataCheckHook().before_run(SimpleNamespace(
        model=model, _train_loop=SimpleNamespace(dataloader=SimpleNamespace(dataset=dataset))))
    assert len(said) == 1 and said[0][0] == 30 and 'max_length 8192' in said[0][1], said
