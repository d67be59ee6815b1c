"""What a browser session keeps of its images between turns: each file's bytes (or a PNG of a video's frames), not
the decoded pixels, which gradio held for as long as it kept the session (without limit: its states never
expired). A 9400 x 9400 PNG of one colour is a 280 kB upload that held 340 MB per session; later turns still
answer as a fresh model given the same images. (The bytes are held by the server's store, the session's
conversation holding a handle for each: tests/web/test_kept.py.)"""

import os

import numpy as np
import pytest
from PIL import Image

from tests.helpers import converted_tiny_folder, write_image, write_video
from xtuner_plugins.data.image_io import load_image
from xtuner_plugins.data.video import load_video
from xtuner_plugins.models.inference import ConvertedModel
from xtuner_plugins.web.app import WebChat
from xtuner_plugins.web.kept import stored

GREEDY = dict(max_new_tokens=4, do_sample=False)


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp('session_memory')
    folder = converted_tiny_folder(root)
    big = str(root / 'big.png')
    Image.new('RGB', (3000, 2000), (40, 90, 200)).save(big)  # 18 MB decoded, a few kB as a file
    return dict(folder=folder, root=root, big=big, small=write_image(root / 'small.png', size=(70, 40), seed=3),
                video=write_video(root / 'v.mp4', [(53 * i) % 256 for i in range(20)], size=(64, 48)),
                chat=WebChat(ConvertedModel(folder), max_new_tokens=4))


def turn(chat, question, images, conversation, video=None):
    return list(chat.stream(question, images, conversation, dict(GREEDY), video=video))[-1]


def kept(chat, conversation):
    """``conversation`` with the images the server keeps for it."""
    return chat.kept.resolve(conversation)


def test_a_session_keeps_its_images_as_their_files(setup):
    chat, big, small = setup['chat'], setup['big'], setup['small']
    first, conversation = turn(chat, 'Describe the image.', [big], None)
    assert kept(chat, conversation)['images'] == [open(big, 'rb').read()]
    assert sum(map(len, kept(chat, conversation)['images'])) < os.path.getsize(big) + 1 < 3000 * 2000 * 3 / 100
    second, conversation = turn(chat, 'And this one? <image>', [small], conversation)
    third, conversation = turn(chat, 'Which is larger?', [], conversation)
    assert kept(chat, conversation)['images'] == [open(big, 'rb').read(), open(small, 'rb').read()]
    model = ConvertedModel(setup['folder'])
    fresh = [model.ask(q, imgs, dict(GREEDY)) for q, imgs in (('Describe the image.', [big]),
                                                             ('And this one? <image>', [small]),
                                                             ('Which is larger?', []))]
    assert [first, second, third] == fresh


def test_video_frames_are_kept_as_pngs_of_their_pixels(setup):
    chat = setup['chat']
    frames, _ = load_video(setup['video'], 4)
    first, conversation = turn(chat, 'What happens?', [], None, video=frames)
    images = kept(chat, conversation)['images']
    assert all(isinstance(k, bytes) for k in images) and len(images) == 4 and conversation['frames'] == [True] * 4
    assert all(np.array_equal(np.asarray(load_image(k)), np.asarray(f)) for k, f in zip(images, frames))
    second, _ = turn(chat, 'And then?', [], conversation)
    model = ConvertedModel(setup['folder'])
    assert [first, second] == [model.ask('What happens?', [], dict(GREEDY), video=frames),
                               model.ask('And then?', [], dict(GREEDY))]


def test_stored_reads_back_to_the_same_pixels(setup, tmp_path):
    image = load_image(setup['small'])
    assert stored(setup['small'], image) == open(setup['small'], 'rb').read()
    assert np.array_equal(np.asarray(load_image(stored(image, image))), np.asarray(image))


def test_a_file_of_more_bytes_than_its_pixels_is_kept_as_their_png(setup, tmp_path):
    """300 MB after a 32 x 32 PNG's end was kept whole, once for each time a message named the upload: 600 MB
    more a turn, for as long as the session lives."""
    padded = tmp_path / 'padded.png'
    padded.write_bytes(open(setup['small'], 'rb').read() + os.urandom(3 << 20))
    image = load_image(str(padded))
    png = stored(str(padded), image)
    assert len(png) < 1 << 16 and np.array_equal(np.asarray(load_image(png)), np.asarray(image))
    assert len(stored(padded.read_bytes(), image)) == len(png)
    first, conversation = turn(setup['chat'], 'Describe the image.', [str(padded)] * 2, None)
    assert sum(map(len, kept(setup['chat'], conversation)['images'])) < 1 << 17


def test_an_hf_folder_continues_from_the_kept_files(setup):
    from tests.helpers import lora_trained_tiny
    from tests.tools.test_convert_to_official import LORA, convert
    trained = lora_trained_tiny(setup['root'] / 'hf_run')
    folder = convert(LORA, trained['ckpt'], str(setup['root'] / 'hf'), trained['opts'], '--format', 'hf')
    chat, small = WebChat(ConvertedModel(folder), max_new_tokens=4), setup['small']
    frames, _ = load_video(setup['video'], 3)
    first, conversation = turn(chat, 'Describe the image.', [small], None)
    second, conversation = turn(chat, 'What happens?', [], conversation, video=frames)
    third, conversation = turn(chat, 'And the colour?', [], conversation)
    held = kept(chat, conversation)
    assert held['images'] == [open(small, 'rb').read()]
    assert all(isinstance(f, bytes) for f in held['videos'][0]) and len(held['videos'][0]) == 3
    model = ConvertedModel(folder)
    assert [first, second, third] == [model.ask('Describe the image.', [small], dict(GREEDY)),
                                      model.ask('What happens?', [], dict(GREEDY), video=frames),
                                      model.ask('And the colour?', [], dict(GREEDY))]


def test_a_conversation_past_its_pixel_budget_is_refused_before_decoding(setup, monkeypatch):
    """Every turn decodes all of a conversation's images again, and Pillow's limit is per image: six uploads of a
    22 kB 9400 x 9400 PNG in one message held 3 GB. The pixels are read from the headers and a turn past
    MAX_CONVERSATION_PIXELS is refused, saying how many, before anything is decoded; the session is unchanged."""
    from xtuner_plugins.web import app
    chat, big = setup['chat'], setup['big']   # 3000 x 2000: 6 megapixels
    huge = str(setup['root'] / 'huge.png')
    Image.new('1', (9400, 9400)).save(huge)
    decoded = []
    real = app.ConvertedModel.ask
    monkeypatch.setattr(app.ConvertedModel, 'ask', lambda self, *a, **k: decoded.append(1) or real(self, *a, **k))
    with pytest.raises(ValueError, match=r'too many pixels: this message brings 265\.1 megapixels and the '
                                         r'conversation holds 0\.0; the server takes 192 per conversation'):
        turn(chat, 'Compare them.', [huge] * 3, None)
    bomb = str(setup['root'] / 'bomb.png')   # past Pillow's decompression-bomb limit: counted as it is
    Image.new('1', (16000, 16000)).save(bomb)
    with pytest.raises(ValueError, match=r'this message brings 256\.0 megapixels'):   # (it was said 384.0)
        turn(chat, 'And this?', [bomb], None)
    assert not decoded
    monkeypatch.setattr(app, 'MAX_CONVERSATION_PIXELS', 10_000_000)
    _, conversation = turn(chat, 'Describe the image.', [big], None)
    with pytest.raises(ValueError, match=r'brings 6\.0 megapixels and the conversation holds 6\.0; the server '
                                         r'takes 10 per conversation'):
        turn(chat, 'And this? <image>', [big], conversation)
    assert kept(chat, conversation)['images'] == [open(big, 'rb').read()] and len(decoded) == 1
    frames, _ = load_video(setup['video'], 4)   # 64 x 48 each
    with pytest.raises(ValueError, match=r'brings 0\.0 megapixels'):
        app.check_pixels(frames, conversation, budget=6_000_000 + 3 * 64 * 48)
    app.check_pixels(frames[:3], conversation, budget=6_000_000 + 3 * 64 * 48)
