"""Videos through converted folders: the official ``chat()`` given frames and ``num_patches_list`` as OpenGVLab's
model card does, ``--format hf`` with transformers' ``InternVLProcessor`` (its video processor and the chat template's
``<video>``), and the LLaVA layout, which refuses a video.

The training side is the data set's own video item (``video_sampling='middle'``, 4 frames of a video made here,
112x56 frames of one grey each: an image would be cut into 2 tiles and a thumbnail, a frame is one resized tile,
and no resize filter tells two ways apart): the converted model must see the same ids and pixels and give the same greedy answer."""

import pytest
import torch

from tests.helpers import lora_trained_tiny, write_jsonl, write_video
from tests.tools.test_convert_to_official import LORA, convert
from tests.tools.test_export_families import greedy_decode
from xtuner_plugins.data import InternVLDataset
from xtuner_plugins.data.template import IGNORE_INDEX
from xtuner_plugins.data.tiling import IMAGENET_MEAN, IMAGENET_STD, normalize_tiles
from xtuner_plugins.data.video import load_video
from xtuner_plugins.models.export.files import chat_template
from xtuner_plugins.models.inference import ConvertedModel

QUESTION = 'Which way does it move?'


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp('video_export')
    trained = lora_trained_tiny(root)
    video = write_video(root / 'media' / 'v.mp4', [(37 * i) % 256 for i in range(30)], size=(112, 56))
    data = write_jsonl(root / 'v.jsonl', [{'video': 'v.mp4', 'conversations': [
        {'from': 'human', 'value': QUESTION}, {'from': 'gpt', 'value': 'x'}]}])
    tiny = trained['tiny']
    ds = InternVLDataset(data, image_folders=str(root / 'media'), tokenizer=tiny['llm'], image_size=56,
                         min_num_frame=4, max_num_frame=4, video_sampling='middle', cache_dir=tiny['cache'])
    item = ds[0]
    first = next(i for i, label in enumerate(item['labels'].tolist()) if label != IGNORE_INDEX)
    return dict(trained, video=video, root=root, ids=item['input_ids'][:first].tolist(), tiles=item['pixel_values'])


@pytest.fixture(scope='module')
def official(setup):
    return convert(LORA, setup['ckpt'], setup['root'] / 'official', setup['opts'])


def test_official_chat_with_frames_is_the_training_prompt_and_answer(setup, official, monkeypatch):
    folder = official
    frames, _ = load_video(setup['video'], 4)
    converted = ConvertedModel(folder)
    # the model card's way: Frame{i}: <image> lines, one tile per frame, num_patches_list of ones
    pixel_values, num_patches = converted.pixels(frames, [True] * 4)
    assert num_patches == [1, 1, 1, 1]
    assert torch.equal(pixel_values, normalize_tiles(setup['tiles'], IMAGENET_MEAN, IMAGENET_STD))
    seen = {}
    real = converted.model.generate

    def spy(**kw):
        seen['ids'] = kw['input_ids'][0].tolist()
        return real(**kw)
    monkeypatch.setattr(converted.model, 'generate', spy)
    prefix = ''.join(f'Frame{i + 1}: <image>\n' for i in range(4))
    answer = converted.model.chat(converted.tokenizer, pixel_values, prefix + QUESTION,
                                  dict(max_new_tokens=8, do_sample=False), num_patches_list=num_patches)
    assert seen['ids'] == setup['ids']
    expected = greedy_decode(setup['model'], setup['ids'], setup['tiles'])
    assert answer == expected and expected
    converted.reset()
    assert converted.ask(QUESTION, video=frames, generation=dict(max_new_tokens=8, do_sample=False)) == expected
    assert seen['ids'] == setup['ids']


def test_hf_processor_gives_the_training_ids_and_pixels(setup):
    from transformers import AutoProcessor
    folder = convert(LORA, setup['ckpt'], setup['root'] / 'hf', setup['opts'], '--format', 'hf')
    frames, _ = load_video(setup['video'], 4)
    processor = AutoProcessor.from_pretrained(folder)
    messages = [{'role': 'user', 'content': [{'type': 'video'}, {'type': 'text', 'text': QUESTION}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = processor(text=prompt, videos=[frames], return_tensors='pt')
    assert inputs['input_ids'][0].tolist() == setup['ids']
    assert torch.allclose(inputs['pixel_values'], normalize_tiles(setup['tiles'], IMAGENET_MEAN, IMAGENET_STD),
                          atol=1e-5)
    expected = greedy_decode(setup['model'], setup['ids'], setup['tiles'])
    converted = ConvertedModel(folder)
    assert converted.ask(QUESTION, video=frames, generation=dict(max_new_tokens=8, do_sample=False)) == expected


def test_llava_refuses_a_video():
    from transformers.utils.chat_template_utils import render_jinja_template
    template = chat_template('internvl2_5', image_text='<image>\n', video_text=None)
    with pytest.raises(Exception, match='cannot hold a video'):
        render_jinja_template(conversations=[[{'role': 'user', 'content': [{'type': 'video'}]}]],
                              chat_template=template)
    converted = ConvertedModel.__new__(ConvertedModel)
    converted.folder, converted.format = 'llava_folder', 'llava'
    converted.reset()
    with pytest.raises(ValueError, match='llava_folder: .*cannot hold a video'):
        converted.ask(QUESTION, video=[torch.zeros(1)])


def test_a_trained_frame_prefix_is_recorded_and_used(setup, tmp_path, monkeypatch):
    """A run trained with InternVL's SFT prefix (``Frame-{i}: ``): the folder records it, the tools ask with it;
    the hf layout, whose processor writes ``Frame{i}: ``, is refused."""
    from xtuner_plugins.models.export import export_checkpoint
    prefix = 'Frame-{i}: '
    opts = dict(setup['opts'], **{'train_dataloader.dataset.frame_prefix': prefix})
    folder = export_checkpoint(LORA, setup['ckpt'], str(tmp_path / 'official'), dtype=torch.float32,
                               cfg_options=opts, log=lambda m: None)
    ds = InternVLDataset(str(setup['root'] / 'v.jsonl'), image_folders=str(setup['root'] / 'media'),
                         tokenizer=setup['tiny']['llm'], image_size=56, min_num_frame=4, max_num_frame=4,
                         video_sampling='middle', frame_prefix=prefix, cache_dir=setup['tiny']['cache'])
    item = ds[0]
    first = next(i for i, label in enumerate(item['labels'].tolist()) if label != IGNORE_INDEX)
    converted = ConvertedModel(folder)
    assert converted.config['frame_prefix'] == prefix
    seen, real = {}, converted.model.generate
    monkeypatch.setattr(converted.model, 'generate', lambda **kw: seen.setdefault('ids', kw['input_ids'][0].tolist())
                        and real(**kw))
    frames, _ = load_video(setup['video'], 4)
    converted.ask(QUESTION, video=frames, generation=dict(max_new_tokens=2, do_sample=False))
    assert seen['ids'] == item['input_ids'][:first].tolist() != setup['ids']
    with pytest.raises(ValueError, match=r"^--format hf does not fit this model: trained with the video frame prefix "
                                         r"'Frame-\{i\}: '.*; formats that fit: official, remote$"):
        export_checkpoint(LORA, setup['ckpt'], str(tmp_path / 'hf'), fmt='hf', dtype=torch.float32,
                          cfg_options=opts, log=lambda m: None)
    # and another format's refusal does not offer hf (it listed it, which then refused the prefix)
    with pytest.raises(ValueError, match=r'^--format llava does not fit this model: .*; formats that fit: official, '
                                         r'remote$'):
        export_checkpoint(LORA, setup['ckpt'], str(tmp_path / 'llava'), fmt='llava', dtype=torch.float32,
                          cfg_options=opts, log=lambda m: None)
