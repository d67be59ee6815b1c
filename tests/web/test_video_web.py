"""The web demo with a video: the frames it shows are the frames asked about (as tools/chat.py --video takes them),
and the streamed answer is a fresh model's answer to the same frames; a bad upload is one clear error."""

import os

import numpy as np
import pytest

from tests.helpers import converted_tiny_folder, write_video
from xtuner_plugins.data.image_io import load_image
from xtuner_plugins.data.video import load_video
from xtuner_plugins.models.inference import ConvertedModel
from xtuner_plugins.web.app import WebChat, build_app, video_frames

GREEDY = dict(max_new_tokens=6, do_sample=False)


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp('webvideo')
    folder = converted_tiny_folder(root)
    video = write_video(root / 'v.mp4', [(37 * i) % 256 for i in range(30)], size=(90, 50))
    return dict(folder=folder, video=video, root=root, chat=WebChat(ConvertedModel(folder), max_new_tokens=6))


def test_shown_frames_are_the_asked_frames_and_the_answer_a_fresh_models(setup):
    frames, files = video_frames(setup['video'], 5, str(setup['root'] / 'shown'))
    expected_frames, _ = load_video(setup['video'], 5)
    assert len(files) == 5
    for shown, frame, expected in zip(files, frames, expected_frames):
        assert np.array_equal(np.asarray(load_image(shown)), np.asarray(expected))
        assert np.array_equal(np.asarray(frame), np.asarray(expected))
    *_, (answer, conversation) = setup['chat'].stream('What happens?', [], None, dict(GREEDY), video=frames)
    fresh = ConvertedModel(setup['folder']).ask('What happens?', [], dict(GREEDY), video=expected_frames)
    assert answer == fresh and conversation['frames'] == [True] * 5


def test_a_bad_video_upload_is_one_clear_error(setup, tmp_path):
    bad = tmp_path / 'bad.mp4'
    bad.write_bytes(b'not a video' * 20)
    with pytest.raises(ValueError, match=r'bad.mp4: cannot read video .*\[corrupt_video\]'):
        video_frames(str(bad), 4, str(tmp_path / 'shown'))


def test_the_page_has_a_video_upload(setup):
    app = build_app(setup['chat'])
    ids = [getattr(block, 'elem_id', None) for block in app.blocks.values()]
    assert 'video' in ids and 'images' in ids


def test_the_page_shows_the_frames_and_answers_about_them(setup, tmp_path, monkeypatch):
    """As served: the frames shown come from gradio's cache, and the PNGs written for the request are gone when it
    ends (none left under the temporary folder)."""
    import glob
    import tempfile

    from tests.web.test_app import file_payload, web_call
    monkeypatch.setenv('GRADIO_TEMP_DIR', str(tmp_path / 'gradio'))
    monkeypatch.setattr(tempfile, 'tempdir', str(tmp_path / 'tmp'))
    os.makedirs(tmp_path / 'tmp')
    app = build_app(setup['chat'])
    tiling = setup['chat'].model.tiling
    *_, last = web_call(app, lambda f: getattr(f.fn, '__name__', '') == 'send', [
        'What happens?', [], [], None, tiling['max_num'], tiling['use_thumbnail'], False, 0.7, 0.9, 6,
        file_payload(setup['video']), 5], postprocess=True)
    history, status = last[0], last[-1]
    shown = [part['file']['path'] for part in history[-2]['content'] if part['type'] == 'file']
    expected_frames, _ = load_video(setup['video'], 5)
    assert len(shown) == 5 and all(np.array_equal(np.asarray(load_image(p)), np.asarray(f))
                                   for p, f in zip(shown, expected_frames))
    assert all(p.startswith(str(tmp_path / 'gradio')) for p in shown)
    assert glob.glob(str(tmp_path / 'tmp' / 'internvl-web-*')) == []
    fresh = ConvertedModel(setup['folder']).ask('What happens?', [], dict(GREEDY), video=expected_frames)
    assert history[-1]['content'][0]['text'] == fresh and status.startswith('Answered in ')


def test_a_video_past_the_pixel_budget_is_refused_before_a_frame_is_decoded(setup, monkeypatch):
    """A small GIF of 9400 x 9400 frames took 2.3 GB to extract one frame: the frames' pixels are counted from the
    video's header, before any is decoded."""
    import gradio as gr

    from xtuner_plugins.web import app
    decoded = []
    monkeypatch.setattr(app, 'video_frames', lambda *a: decoded.append(a))
    monkeypatch.setattr(app, 'MAX_CONVERSATION_PIXELS', 4 * 90 * 50)
    send = next(f for f in build_app(setup['chat']).fns.values() if getattr(f.fn, '__name__', '') == 'send').fn
    with pytest.raises(gr.Error, match=r'too many pixels: this message brings 0\.0 megapixels'):
        list(send('What happens?', [], [], None, 6, True, False, 0.7, 0.9, 4, setup['video'], 5))
    assert not decoded


def test_a_gif_that_decodes_past_the_budget_is_refused_before_a_frame_is_decoded(setup, tmp_path, monkeypatch):
    """A GIF cannot seek: every frame up to the last one asked for is decoded on its full canvas (a 460 kB GIF of
    20,000 frames of 4000 x 4000 held the one model for 52 s while other users waited)."""
    from PIL import Image

    from xtuner_plugins.data import video
    from xtuner_plugins.web import app
    gif = tmp_path / 'long.gif'
    frames = [Image.new('RGB', (200, 150), ((37 * k) % 256, (91 * k) % 256, 0)) for k in range(300)]
    frames[0].save(gif, save_all=True, append_images=frames[1:], duration=40)
    decoded = []
    monkeypatch.setattr(video, 'read_frames', lambda info, wanted, budget=None: decoded.append(wanted) or [frames[0]] * len(wanted))
    monkeypatch.setattr(app, 'MAX_DECODED_PIXELS', 100 * 200 * 150)
    with pytest.raises(ValueError, match=r'long.gif: a GIF of 300 frames of 200x150: reaching frame \d+ decodes '
                                         r'.* gigapixels \(a GIF cannot seek\), over the 0.003 taken here.*'
                                         r'\[video_too_large\]'):
        video_frames(str(gif), 8, str(tmp_path / 'shown'))
    assert not decoded
    monkeypatch.setattr(app, 'MAX_DECODED_PIXELS', 300 * 200 * 150)
    video_frames(str(gif), 8, str(tmp_path / 'shown'))
    assert decoded


def test_more_frames_than_the_model_was_trained_with_is_a_note_on_the_page(setup, monkeypatch):
    """As tools/chat.py --frames says it on stderr: the folder's config.json records the most frames training drew
    for a video (max_num_frame); the page answers with more, and its status says so."""
    monkeypatch.setitem(setup['chat'].model.config, 'max_num_frame', 4)
    send = next(f for f in build_app(setup['chat']).fns.values() if getattr(f.fn, '__name__', '') == 'send').fn
    for frames, said in ((4, False), (6, True)):
        *_, last = send('What happens?', None, [], None, 6, True, False, 0.7, 0.9, 4, setup['video'], frames)
        status = last[-1]
        assert status.startswith('Answered in '), status
        assert ("Note: 6 frames of a video are over the 4 this model was trained with at most (its config.json's "
                "max_num_frame)" in status) is said, status


def test_a_video_the_decoder_trips_on_is_one_line_without_a_traceback(setup, tmp_path, monkeypatch):
    """An error no check names (an SVG as a video was an AttributeError in the probe) went to the page as its raw
    text and to the server's log as a 48-line traceback, a request; it is the client's one line, by file name."""
    import gradio as gr

    from xtuner_plugins.web import app

    def trips(*args):
        raise AttributeError("'NoneType' object has no attribute 'width'")

    monkeypatch.setattr(app, 'video_frames', trips)
    send = next(f for f in build_app(setup['chat']).fns.values() if getattr(f.fn, '__name__', '') == 'send').fn
    with pytest.raises(gr.Error) as error:
        list(send('What happens?', [], [], None, 6, True, False, 0.7, 0.9, 4, setup['video'], 5))
    assert error.value.message == 'v.mp4: cannot read it as a video (AttributeError)'
    assert error.value.print_exception is False
