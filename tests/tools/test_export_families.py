"""Exporting every model family: transformers' LLaVA (CLIP + LLaVA MLP, one padded image, LoRA; SigLIP + LLaVA
MLP, one resized image, QLoRA dequantised and merged) and the self-contained remote-code folder (SigLIP +
bilinear MLP with tiles, CLIP + pixel shuffle on one resized image); and chat on a ``--format hf`` folder.

Checkpoints are the stage configs' own with every trained tensor perturbed (as test_convert_to_official does),
so a tensor the converter drops, misnames or leaves unmerged changes the result. Each converted folder's
logits equal the training model's (fp32, < 1e-4) on a batch of the real data pipeline; its greedy answers
through ``ConvertedModel`` (what tools/chat.py and the demo use) equal a greedy decode with the training model;
the LLaVA processor builds the training prompt token for token and the training pixels.
"""

import json
import os

import pytest
import torch

from tests.helpers import tiny_families, write_image
from tests.tools.test_convert_to_official import (FULL, LORA, QLORA, TOL, assert_auto_model_reads_every_weight,
                                                  convert, max_diff, options, trained_checkpoint)
from tools.chat import main as chat_main
from xtuner_plugins.data import InternVLDataset, internvl_collate_fn
from xtuner_plugins.data.image_io import load_image
from xtuner_plugins.data.template import IGNORE_INDEX
from xtuner_plugins.data.tokenize import tokenize_conversation
from xtuner_plugins.data.tiling import image_tiles, normalize_tiles
from xtuner_plugins.engine.options import load_config
from xtuner_plugins.models.export import build_for_export, choose_format
from xtuner_plugins.models.inference import ConvertedModel

# name -> (config, encoder, projector, image mode, the format auto picks)
FAMILIES = {
    'llava_lora': (LORA, 'clip', 'mlp', 'pad', 'llava'),
    'llava_qlora_siglip_resize': (QLORA, 'siglip', 'mlp', 'resize', 'llava'),
    'siglip_bilinear_tiles': (FULL, 'siglip', 'bilinear_mlp', 'tile', 'remote'),
    'clip_shuffle_resize': (FULL, 'clip', 'pixel_shuffle_mlp', 'resize', 'remote'),
}


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp('families')
    paths = tiny_families(root)
    paths['photo'] = write_image(root / 'photo.png', size=(90, 50), seed=7)
    return paths


@pytest.fixture(scope='module', params=sorted(FAMILIES))
def family(request, tiny, tmp_path_factory):
    config, vision, projector, mode, fmt = FAMILIES[request.param]
    tmp = tmp_path_factory.mktemp(request.param)
    opts = options(tiny, **{'model.vision_encoder': tiny[vision], 'model.projector': projector,
                            'model.image_mode': mode})
    probe = build_for_export(load_config(config, opts), None, torch.float32, log=lambda m: None)
    opts.update({f'train_dataloader.dataset.{k}': (list(v) if isinstance(v, tuple) else v)
                 for k, v in probe.geometry.items()})
    ckpt = str(tmp / 'iter_1.pth')
    model = trained_checkpoint(config, opts, ckpt, scale=0.3)
    if config == QLORA:
        import bitsandbytes as bnb
        for module in model.modules():
            if isinstance(module, bnb.nn.Linear4bit):
                module.train()  # fp32 dequantise-and-multiply, as in training (see test_qlora_checkpoint_...)
    folder = convert(config, ckpt, tmp / 'out', opts)
    return dict(name=request.param, config=config, opts=opts, ckpt=ckpt, model=model, folder=folder, fmt=fmt)


def data_batch(family, tiny):
    ds_cfg = load_config(family['config'], family['opts']).train_dataloader.dataset
    keys = ('image_size', 'num_image_token', 'image_mode', 'image_mean', 'max_dynamic_patch')
    ds = InternVLDataset(tiny['mixed'], image_folders=tiny['images'], tokenizer=tiny['llm'], cache_dir=tiny['cache'],
                         **{k: ds_cfg[k] for k in keys})
    return internvl_collate_fn([ds[0], ds[1]])['data']


def test_auto_picks_the_format_that_fits(family):
    with open(os.path.join(family['folder'], 'config.json')) as f:
        model_type = json.load(f)['model_type']
    assert model_type == {'llava': 'llava', 'remote': 'xtuner_vlm_chat'}[family['fmt']]
    with pytest.raises(ValueError, match=r'--format official does not fit this model: encoder .*; formats that fit'):
        choose_format(family['model'], 'official')


def test_converted_logits_equal_training_logits(family, tiny):
    batch = data_batch(family, tiny)
    model = family['model']
    with torch.no_grad():
        expected = model(dict(batch), mode='tensor')
    pixels = normalize_tiles(batch['pixel_values'], model.vision.mean, model.vision.std)
    if family['fmt'] == 'llava':
        from transformers import LlavaForConditionalGeneration
        converted = LlavaForConditionalGeneration.from_pretrained(family['folder'], dtype=torch.float32).eval()
        assert_auto_model_reads_every_weight(family['folder'], converted)
        with torch.no_grad():
            got = converted(input_ids=batch['input_ids'], attention_mask=batch['attention_mask'],
                            pixel_values=pixels[batch['image_flags'] == 1]).logits
    else:
        from transformers import AutoModel
        converted = AutoModel.from_pretrained(family['folder'], trust_remote_code=True, dtype=torch.float32).eval()
        converted.img_context_token_id = model.img_context_token_id
        with torch.no_grad():
            got = converted(pixel_values=pixels, input_ids=batch['input_ids'], attention_mask=batch['attention_mask'],
                            image_flags=batch['image_flags']).logits
    assert max_diff(got, expected, batch['attention_mask']) < TOL
    base = build_for_export(load_config(family['config'], family['opts']), None, torch.float32, log=lambda m: None)
    with torch.no_grad():
        assert max_diff(base(dict(batch), mode='tensor'), expected, batch['attention_mask']) > 100 * TOL


@pytest.mark.parametrize('family', ['siglip_bilinear_tiles'], indirect=True)   # the remote-code SigLIP family
def test_remote_siglip_never_runs_its_pooling_head(family, tiny):
    """The converted SigLIP tower keeps its attention-pooling head's weights (the published tower) but does not run
    it, with autograd on too (a user fine-tuning the converted folder): its output is never read."""
    from transformers import AutoModel
    converted = AutoModel.from_pretrained(family['folder'], trust_remote_code=True, dtype=torch.float32).train()
    head = converted.vision_model.vision_model.head
    calls = []
    head.register_forward_hook(lambda *_: calls.append(1))
    batch = data_batch(family, tiny)
    model = family['model']
    converted.features(normalize_tiles(batch['pixel_values'], model.vision.mean, model.vision.std)).sum().backward()
    assert not calls
    assert any(k.startswith('vision_model.vision_model.head.') for k in converted.state_dict())


def training_prompt_and_pixels(model, image, question):
    """The ids the training pipeline puts before the answer of a one-image question, and its uint8 tiles."""
    tiles = image_tiles(image, model.image_mode, image_size=model.vision.image_size, max_num=4, use_thumbnail=True,
                        mean=model.vision.mean)
    sample = tokenize_conversation([{'from': 'human', 'value': '<image>\n' + question}, {'from': 'gpt', 'value': 'x'}],
                                   model.tokenizer, [model.num_image_token * tiles.shape[0]], model.template)
    first = next(i for i, label in enumerate(sample['labels']) if label != IGNORE_INDEX)
    return list(sample['input_ids'][:first]), tiles


def greedy_with_training_model(model, image, question, steps=8):
    return greedy_decode(model, *training_prompt_and_pixels(model, image, question), steps=steps)


def greedy_decode(model, ids, tiles, steps=8):
    """The training model's greedy answer (up to ``steps`` tokens, to its template's stop word: ``<|im_end|>``)
    to prompt ``ids`` with ``tiles`` (one image's tiles, or a video's frames)."""
    from xtuner_plugins.data.template import get_template
    ids = torch.tensor([ids])
    stop = model.tokenizer.convert_tokens_to_ids(get_template(model.template).stop_word)
    out = []
    with torch.no_grad():
        for _ in range(steps):
            logits = model(dict(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=tiles,
                                image_flags=torch.ones(tiles.shape[0], dtype=torch.long)), mode='tensor')
            token = int(logits[0, -1].argmax())
            if token == stop:
                break
            out.append(token)
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    return model.tokenizer.decode(out, skip_special_tokens=True).strip()


def test_greedy_answers_and_chat_tool_equal_the_training_model(family, tiny, capsys):
    image = load_image(tiny['photo'])
    expected = greedy_with_training_model(family['model'], image, 'Describe the image.')
    assert expected, 'the perturbed model should say something'
    converted = ConvertedModel(family['folder'])
    assert converted.format == family['fmt']
    assert converted.ask('Describe the image.', [image], dict(max_new_tokens=8, do_sample=False)) == expected
    assert chat_main([family['folder'], '--image', tiny['photo'], '--prompt', 'Describe the image.',
                      '--max-new-tokens', '8']) == 0
    assert capsys.readouterr().out.strip() == expected


@pytest.mark.parametrize('family', ['llava_lora'], indirect=True)
def test_llava_processor_builds_the_training_prompt_and_pixels(family, tiny):
    from transformers import AutoProcessor
    processor = AutoProcessor.from_pretrained(family['folder'])
    image = load_image(tiny['photo'])
    messages = [{'role': 'user', 'content': [{'type': 'image', 'image': image},
                                             {'type': 'text', 'text': 'What is it?'}]}]
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors='pt')
    ids, tiles = training_prompt_and_pixels(family['model'], image, 'What is it?')
    assert inputs['input_ids'][0].tolist() == ids
    model = family['model']
    assert torch.allclose(inputs['pixel_values'], normalize_tiles(tiles, model.vision.mean, model.vision.std),
                          atol=1e-5)
    with open(os.path.join(family['folder'], 'config.json')) as f:   # the KV cache on (training's false before)
        text = f.read()
    assert json.loads(text)['text_config']['use_cache'] is True
    assert '_name_or_path' not in text   # (the training machine's folders of the LLM and the tower, before)


def test_hf_folder_chats_like_the_training_model(tiny, tmp_path, capsys):
    """``--format hf`` (transformers' InternVL and its processor): tools/chat.py answers as the training model."""
    opts = options(tiny)
    model = trained_checkpoint(LORA, opts, str(tmp_path / 'iter_1.pth'), scale=0.3)
    folder = convert(LORA, str(tmp_path / 'iter_1.pth'), tmp_path / 'hf', opts, '--format', 'hf')
    expected = greedy_with_training_model(model, load_image(tiny['photo']), 'Describe the image.')
    assert expected and ConvertedModel(folder).format == 'hf'
    with open(os.path.join(folder, 'config.json')) as f:   # no path of the training machine's
        assert '_name_or_path' not in f.read()
    capsys.readouterr()  # the converter's log
    assert chat_main([folder, '--image', tiny['photo'], '--prompt', 'Describe the image.',
                      '--max-new-tokens', '8']) == 0
    assert capsys.readouterr().out.strip() == expected


@pytest.mark.parametrize('family', ['siglip_bilinear_tiles', 'clip_shuffle_resize'], indirect=True)
def test_the_remote_loading_snippet_of_the_docs_answers_as_chat(family, tiny, capsys):
    """docs/conversion.md gave one loading snippet, the official folder's (``load_image_tiles``: InternVL's tiles,
    ImageNet's mean and std), for the remote folder too ('the same chat() as official'): a SigLIP or resized model
    got other pixels than it was trained on, without an error. Its own snippet, run as written (the folder, the
    photo and the length filled in), answers as tools/chat.py's ConvertedModel does."""
    import re
    from contextlib import redirect_stdout
    from io import StringIO

    from tests.train_utils import REPO_ROOT
    from xtuner_plugins.data.image_io import load_image_tiles
    with open(os.path.join(REPO_ROOT, 'docs', 'conversion.md'), encoding='utf-8') as f:
        blocks = re.findall(r'```python\n(.*?)```', f.read(), re.S)
    code = next(b for b in blocks if "'work_dirs/my_remote'" in b)
    code = code.replace("'work_dirs/my_remote'", repr(family['folder'])).replace(
        "'photo.jpg'", repr(tiny['photo'])).replace('max_new_tokens=128', 'max_new_tokens=8')
    out = StringIO()
    with redirect_stdout(out):
        exec(compile(code, 'conversion.md', 'exec'), {})
    expected = ConvertedModel(family['folder'], dtype=torch.bfloat16).ask(
        'What is in the picture?', [tiny['photo']], dict(max_new_tokens=8, do_sample=False))
    assert expected and out.getvalue().strip() == expected
    converted = ConvertedModel(family['folder'])
    official_way = load_image_tiles(tiny['photo'], image_size=converted.tiling['image_size'])
    mine = converted.pixels([tiny['photo']])[0]
    assert official_way.shape != mine.shape or (official_way - mine).abs().max() > 0.1   # the snippet that misled
