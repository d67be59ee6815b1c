"""Settings of the data set, its packing and its collate function that cannot work, given through
``tools/train.py --cfg-options``: each stops the run at start-up (or at the first batch) with one line,
``train: refused: ...`` naming the setting and its value, exit code 2, where each printed a ValueError's or a
TypeError's traceback before the ``train: FAILED`` line."""

import os

import pytest

from tests.configs.conftest import ROOT, tiny_options
from tests.train_utils import run_train

TRAIN_TOOL = os.path.join(ROOT, 'tools', 'train.py')
DATASET = 'train_dataloader.dataset.'


def refused_line(tiny, tmp_path, options, config='finetune_lora'):
    """The last line of a run of ``config`` on the tiny models with ``options`` over the tiny ones, once checked
    that it is a one-line refusal: exit code 2 and no traceback. A packing or shard config's data set settings go
    to the data set it wraps, and its batch is the config's 1."""
    base = tiny_options(tiny, tiny['mixed'], '[1]')
    if config != 'finetune_lora':   # (the packed and shard configs wrap the data set: its settings go inside)
        base = {(k.replace(DATASET, DATASET + 'dataset.') if k.startswith(DATASET) else k): v for k, v in base.items()}
        base['train_dataloader.batch_size'] = 1
        base.pop('train_dataloader.sampler.per_device_batch_size', None)
    out = run_train(os.path.join(ROOT, 'configs', f'{config}.py'), str(tmp_path / 'work'),
                    cfg_options=dict(base, **options), script=TRAIN_TOOL)
    assert out.returncode == 2 and not out.has_traceback, out.log[-3000:]
    return out.log.rstrip().splitlines()[-1]


@pytest.mark.parametrize('key,value,said', [
    ('min_num_frame', 0, 'min_num_frame=0: a whole number of frames, 1 to '),
    ('max_num_frame', -1, 'max_num_frame=-1: a whole number of frames, 1 to '),
    ('video_sampling', 'nope', "video_sampling='nope': unknown frame sampling; use rand, middle or fpsX"),
    ('frame_prefix', 'Frame:', "frame_prefix 'Frame:' must hold {i}, the frame's number"),
    ('max_image_pixels', -1, 'max_image_pixels=-1: a number of pixels >= 1'),
    ('image_size', 0, "image_size=0: a whole number of pixels >= 1 (a tile's side)"),
    ('system', 5, 'system=5: expected text (a path, a name) or None'),
    ('cache_dir', 5, 'cache_dir=5: expected text (a path, a name) or None'),
    ('data_files', 5, 'data_files=5: give an annotation file, or a list of them (their paths)'),
    ('image_folders', 5, '{mixed}: image_folders gives it 5; give a folder (its path) per file, or None'),
    ('image_mean', '[a,b,c]', "image_mean=['a', 'b', 'c']: the mean colour is 3 numbers (R, G, B, from 0 to 1)"),
    ('image_mean', 5, 'image_mean=5: the mean colour is 3 numbers')])
def test_a_data_set_setting_that_cannot_work_is_refused_in_one_line(tiny, tmp_path, key, value, said):
    """Before: ``ValueError: min_num_frame=0: ...`` (and the others) after a 50-line traceback, exit code 1;
    ``image_size=0`` tile_grid's ValueError at the first sample; ``system=5`` a ``TypeError: argument of type 'int'
    is not iterable`` at the first sample; ``cache_dir=5``, ``data_files=5`` and ``image_folders=5`` TypeErrors
    ('expected str, bytes or os.PathLike object, not int', 'object of type 'int' has no len()'); image_mean=[a,b,c]
    'ValueError: could not convert string to float', image_mean=5 'TypeError: 'int' object is not iterable'."""
    assert refused_line(tiny, tmp_path, {DATASET + key: value}).startswith(
        'train: refused: ' + said.replace('{mixed}', tiny['mixed']))


@pytest.mark.parametrize('value', [0, 2.5])
def test_online_packing_buffers_that_are_no_whole_number_are_refused_in_one_line(tiny, tmp_path, value):
    """Online packing's ``max_buffer_size=0`` printed ``ValueError: online packing budgets must be positive`` after
    a traceback (once the data set it packs was built), and ``2.5`` trained as a buffer of 3 packs."""
    assert refused_line(tiny, tmp_path, {DATASET + 'max_buffer_size': value}, 'finetune_full_packed_online') == (
        f'train: refused: packing budgets max_buffer_size={value!r} (train_dataloader.dataset.*): each is a whole '
        'number >= 1 (tokens and tiles per pack, open packs per DataLoader worker; max_tiles=None: no limit)')


@pytest.mark.parametrize('value', ['v3', 2])
def test_a_pixel_shuffle_version_there_is_not_is_refused_in_one_line(tiny, tmp_path, value):
    """``model.ps_version=v3`` (or 2) built the model, then the first forward printed ``ValueError: unknown
    pixel-shuffle version`` after a traceback."""
    assert refused_line(tiny, tmp_path, {'model.ps_version': value}) == (
        f"train: refused: ps_version {value!r}: the pixel-shuffle version is one of ('v1', 'v2') (InternVL 1.5 and "
        "later: 'v2'; set model.ps_version)")


@pytest.mark.parametrize('key,value,said', [
    ('pad_to_multiple_of', -8, r'pad_to_multiple_of=-8: the padded length is a multiple of a whole number >= 1 '),
    ('pad_to_multiple_of', 1.5, r'pad_to_multiple_of=1\.5: the padded length is a multiple of a whole number >= 1 '),
    ('pad_token_id', 999999, r"pad_token_id=999999: padding is a token id, a whole number >= 0 below (\d+), the "
                             r"LLM's vocabulary \(embedding rows\); "),
    ('pad_token_id', -3, r'pad_token_id=-3: padding is a token id, a whole number >= 0 below (\d+), '),
    ('pad_token_id', 2.5, r'pad_token_id=2\.5: padding is a token id, a whole number >= 0 below (\d+), ')])
def test_collate_settings_that_cannot_work_are_refused_in_one_line(tiny, tmp_path, key, value, said):
    """At the first batch or forward, with a traceback: pad_to_multiple_of=-8 'RuntimeError: The expanded size of
    the tensor (160) must match the existing size (167)', 1.5 a TypeError of torch.full, pad_token_id=999999 or -3
    'IndexError: index out of range in self' in the embedding; pad_token_id=2.5 trained padded with 2. The bound
    named is the tiny LLM's embedding rows (its tokenizer's tokens and InternVL's)."""
    import re

    from xtuner_plugins.models.llm import load_tokenizer
    line = refused_line(tiny, tmp_path, {f'train_dataloader.collate_fn.{key}': value})
    found = re.match(f'train: refused: train_dataloader\\.collate_fn\\.{said}', line)
    assert found, line
    if found.groups():
        assert int(found.group(1)) == len(load_tokenizer(tiny['llm'])[0]), line


@pytest.mark.parametrize('kept,key,said', [
    ((), 'model.tokenizer', 'holds no tokenizer: none of tokenizer.json, tokenizer.model, vocab.json, merges.txt, '
                            'vocab.txt, spiece.model, sentencepiece.bpe.model is there'),
    (('tokenizer_config.json', 'vocab.json'), 'model.tokenizer',
     'has no tokenizer.json, nor merges.txt, which its Qwen2Tokenizer (tokenizer_config.json) reads its vocabulary '
     'from'),
    (('tokenizer_config.json',), DATASET + 'tokenizer',
     'has no tokenizer.json, nor merges.txt and vocab.json, which its Qwen2Tokenizer (tokenizer_config.json) reads '
     'its vocabulary from')])
def test_a_tokenizer_folder_without_its_files_is_refused_in_one_line(tiny, tmp_path, kept, key, said):
    """A tokenizer folder lacking its vocabulary files failed inside transformers with a traceback: 'TypeError:
    expected str, bytes or os.PathLike object, not NoneType' (no tokenizer.json, vocab.json, merges.txt), or
    an empty folder 'AttributeError: 'NoneType' object has no attribute 'endswith'' or 'ValueError: Unrecognized
    model in ...' and every model type transformers knows."""
    import shutil
    folder = tmp_path / 'tokenizer'
    folder.mkdir()
    for name in kept:
        shutil.copy(os.path.join(tiny['llm'], name), folder)
    name = 'model.tokenizer (or model.llm)' if key == 'model.tokenizer' else key
    assert refused_line(tiny, tmp_path, {key: str(folder)}) == (
        f"train: refused: {name}: {folder} {said}; give the LLM's folder as downloaded (huggingface-cli download "
        'REPO --local-dir FOLDER), or copy the missing files into it')


def test_a_vision_layer_there_is_not_is_refused_in_one_line(tiny, tmp_path):
    """``model.select_layer=-99`` on a 2-layer encoder: ``ValueError: select_layer -99 is out of range`` after a
    traceback, as the model was built."""
    assert refused_line(tiny, tmp_path, {'model.select_layer': -99}) == (
        "train: refused: select_layer -99 (model.select_layer) is out of range for the vision encoder's 2 layers "
        '(valid: -3..2)')


def test_a_vision_folder_whose_image_size_its_weights_do_not_have_is_refused_in_one_line(tiny, tmp_path):
    """An InternViT folder whose config.json says image_size 70 (a 5x5 grid) beside weights of a 4x4 grid: a
    ValueError's traceback as the model was built."""
    import json
    import shutil
    folder = tmp_path / 'vit'
    shutil.copytree(tiny['internvit'], folder)
    config = json.loads((folder / 'config.json').read_text())
    (folder / 'config.json').write_text(json.dumps(dict(config, image_size=70)))
    assert refused_line(tiny, tmp_path, {'model.vision_encoder': str(folder)}).startswith(
        f'train: refused: {folder}: embeddings.position_embedding has 17 positions, but config.json image_size 70 '
        'with patch_size 14 implies 26 (a 5x5 grid + CLS).')


def test_a_shard_set_that_is_no_path_is_refused_in_one_line(tiny, tmp_path):
    """``train_dataloader.dataset.shards=5``: 'TypeError: expected str, bytes or os.PathLike object, not int' after a
    traceback (a folder that is no shard set was refused in one line already)."""
    assert refused_line(tiny, tmp_path, {'train_dataloader.dataset.shards': 5}, 'finetune_lora_shards') == (
        "train: refused: shards=5: give the shard set's folder (tools/shard_dataset.py's --out)")

