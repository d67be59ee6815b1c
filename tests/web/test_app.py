"""The web demo's model wiring (no browser): the /chat endpoint answers as tools/chat.py does, the stream ends in
the answer, browser sessions keep their own conversations, one answer's settings do not leak into the next."""

import threading

import pytest
import torch

from tests.helpers import converted_tiny_folder, write_image
from xtuner_plugins.models.inference import ConvertedModel
from xtuner_plugins.web.app import WebChat, user_message
from xtuner_plugins.web.server import port_free

GREEDY = dict(max_new_tokens=6, do_sample=False)


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp('web')
    folder = converted_tiny_folder(root)
    images = [write_image(root / f'{i}.png', size=size, seed=i) for i, size in enumerate([(120, 60), (50, 90)])]
    return dict(folder=folder, images=images, chat=WebChat(ConvertedModel(folder), max_new_tokens=6))


def fresh_answers(folder, turns, **tiling):
    """What a new model answers to ``turns`` [(question, images)] in one conversation."""
    model = ConvertedModel(folder, **tiling)
    return [model.ask(q, imgs, dict(GREEDY)) for q, imgs in turns]


def test_chat_endpoint_is_the_chat_tools_answer(setup, capsys):
    from tools.chat import main as chat_main
    image = setup['images'][0]
    assert chat_main([setup['folder'], '--image', image, '--prompt', 'Describe the image.',
                      '--max-new-tokens', '6']) == 0
    expected = capsys.readouterr().out.strip()
    assert expected and setup['chat'].answer(image, 'Describe the image.') == expected
    with pytest.raises(ValueError, match='empty'):
        setup['chat'].answer(image, '  ')


def test_stream_grows_and_ends_in_the_answer_and_conversation(setup):
    chat, image = setup['chat'], setup['images'][1]
    steps = list(chat.stream('What is it?', [image], None, dict(GREEDY)))
    partial, (answer, conversation) = steps[:-1], steps[-1]
    assert answer == fresh_answers(setup['folder'], [('What is it?', [image])])[0]
    assert all(after is None for _, after in partial) and partial
    assert all(answer.startswith(text.strip()) for text, _ in partial)
    assert conversation['history'] == [('<image>\nWhat is it?', answer)] and len(conversation['images']) == 1
    assert chat.model.history is None and chat.model.images == []  # the shared model keeps no conversation


def test_sessions_keep_their_own_conversations(setup):
    chat, (a, b) = setup['chat'], setup['images']

    def turn(question, images, conversation):
        return list(chat.stream(question, images, conversation, dict(GREEDY)))[-1]

    first_a, conv_a = turn('Describe the image.', [a], None)
    _, conv_b = turn('What colour is it?', [b], None)        # another session in between
    second_a, conv_a = turn('And now?', [], conv_a)
    assert [first_a, second_a] == fresh_answers(setup['folder'], [('Describe the image.', [a]), ('And now?', [])])
    assert len(conv_a['history']) == 2 and len(conv_b['history']) == 1


def test_tiling_settings_hold_for_one_answer(setup):
    chat, image = setup['chat'], setup['images'][0]
    before = dict(chat.model.tiling)
    answer = list(chat.stream('Describe the image.', [image], None, dict(GREEDY), dict(max_num=1,
                                                                                    use_thumbnail=False)))[-1][0]
    assert answer == fresh_answers(setup['folder'], [('Describe the image.', [image])], max_num=1,
                                   use_thumbnail=False)[0]
    assert chat.model.tiling == before


def test_an_error_in_generation_reaches_the_caller(setup):
    chat = setup['chat']
    with pytest.raises(ValueError, match='<image> tags'):
        list(chat.stream('<image> <image> two tags', [setup['images'][0]], None, dict(GREEDY)))
    assert not chat.lock.locked()


def test_user_message_shows_images_then_text():
    assert user_message('Hi', ['a.png']) == {'role': 'user', 'content': [{'path': 'a.png'}, 'Hi']}


def test_port_in_use():
    import socket
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        sock.listen()
        assert not port_free('127.0.0.1', sock.getsockname()[1])
    assert port_free('127.0.0.1', 0)


def test_one_question_at_a_time(setup):
    """Two sessions asking at once both get their own full answers (the lock serialises them)."""
    chat, images = setup['chat'], setup['images']
    results = {}

    def ask(i):
        results[i] = list(chat.stream('Describe the image.', [images[i]], None, dict(GREEDY)))[-1][0]

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert [results[0], results[1]] == [fresh_answers(setup['folder'], [('Describe the image.', [p])])[0]
                                        for p in images]


# ------------------------------------------------------------------ one pixel rule on every path
def odd_images(folder):
    """Images that are not plain RGB, 90x40 (a rotation would show as a 40x90 grid): what gradio's image
    component used to rotate, whiten or re-encode before our loader saw it."""
    from PIL import Image

    def tagged(path, mode):  # stored 90x40, tagged "rotate 90 degrees clockwise to view" (EXIF orientation 6)
        img = Image.open(write_image(path, size=(90, 40), mode=mode, fmt='JPEG', seed=7))
        exif = Image.Exif()
        exif[0x0112] = 6
        img.save(path, format='JPEG', exif=exif.tobytes())
        return str(path)

    return [write_image(folder / 'grey16.png', size=(90, 40), mode='I;16', seed=1),
            write_image(folder / 'palette.png', size=(90, 40), mode='P', seed=2),
            write_image(folder / 'rgba.png', size=(90, 40), mode='RGBA', seed=3),
            write_image(folder / 'la.png', size=(90, 40), mode='LA', seed=4),
            write_image(folder / 'cmyk.jpg', size=(90, 40), mode='CMYK', fmt='JPEG', seed=5),
            tagged(folder / 'grey_exif.jpg', 'L'), tagged(folder / 'cmyk_exif.jpg', 'CMYK')]


def web_call(app, pick, inputs, postprocess=False):
    """A call as a request to the page runs it: gradio's own preprocessing of ``inputs`` (JSON payloads; the
    upload copied into gradio's cache), then the handler ``pick`` chooses; a stream is read to its end.
    ``postprocess``: each output as gradio sends it to the page, when it comes (the files shown copied into its
    cache)."""
    import asyncio
    import inspect
    fn = next(f for f in app.fns.values() if pick(f))
    args = asyncio.run(app.preprocess_data(fn, inputs, None, explicit_call=True))
    out = fn.fn(*args)
    if not postprocess:
        return list(out) if inspect.isgenerator(out) else out
    return [asyncio.run(app.postprocess_data(fn, list(o), None)) for o in (out if inspect.isgenerator(out) else [out])]


def file_payload(path):
    return {'path': path, 'orig_name': path.rsplit('/', 1)[-1], 'meta': {'_type': 'gradio.FileData'}}


def test_every_path_sees_the_same_pixels(setup, tmp_path, monkeypatch, tiny_tokenizer, capsys):
    """Training's data set, tools/chat.py, the page and the /chat endpoint tile the same pixels of each file:
    16-bit, palette, alpha, CMYK, and EXIF-rotated greyscale/CMYK JPEGs (the tag not applied, anywhere)."""
    from tests.helpers import conv, write_jsonl
    from tools.chat import main as chat_main
    from xtuner_plugins.data import sample_loading
    from xtuner_plugins.data.dataset import InternVLDataset
    from xtuner_plugins.models import inference
    from xtuner_plugins.web.app import build_app
    monkeypatch.setenv('GRADIO_TEMP_DIR', str(tmp_path / 'gradio'))
    images = odd_images(tmp_path / 'images')
    seen = []
    for module in (inference, sample_loading):  # every path tiles through tiling.image_tiles
        def spy(image, *args, _tiles=module.image_tiles, **kwargs):
            seen.append(_tiles(image, *args, **kwargs))
            return seen[-1]
        monkeypatch.setattr(module, 'image_tiles', spy)

    def tiles_of(run):
        seen.clear()
        run()
        return list(seen)

    tiling = setup['chat'].model.tiling
    data = write_jsonl(tmp_path / 'd.jsonl', [{'image': p.rsplit('/', 1)[-1], 'conversations': conv()}
                                              for p in images])
    ds = InternVLDataset(data, str(tmp_path / 'images'), tokenizer=tiny_tokenizer, max_length=None,
                         image_size=tiling['image_size'], max_dynamic_patch=tiling['max_num'],
                         min_dynamic_patch=tiling['min_num'], use_thumbnail=tiling['use_thumbnail'],
                         cache_dir=str(tmp_path / 'cache'))
    training = tiles_of(lambda: [ds[i] for i in range(len(images))])
    chat_tool = tiles_of(lambda: chat_main([setup['folder'], '--image', *images, '--prompt', 'Hi',
                                            '--max-new-tokens', '1']))
    capsys.readouterr()
    app = build_app(setup['chat'])
    endpoint = tiles_of(lambda: [web_call(app, lambda f: f.api_name == 'chat', [file_payload(p), 'Hi'])
                                 for p in images])
    page = tiles_of(lambda: web_call(app, lambda f: getattr(f.fn, '__name__', '') == 'send', [
        'Hi', [file_payload(p) for p in images], [], None, tiling['max_num'], tiling['use_thumbnail'], False,
        0.7, 0.9, 1, None, 8]))
    assert len(training) == len(chat_tool) == len(endpoint) == len(page) == len(images)
    for path, a, b, c, d in zip(images, training, chat_tool, endpoint, page):
        assert a.shape[0] == 3, (path, a.shape)  # a 2x1 grid plus the thumbnail
        for other in (b, c, d):
            assert torch.equal(a, other), path


class _Silent(WebChat):
    """A WebChat whose model answers nothing (only its end token: the decoded text is empty), or ``text``."""

    def __init__(self, chat, text=''):
        super().__init__(chat.model, max_new_tokens=6)
        self.text = text

    def stream(self, question, images, conversation, generation, tiling=None):
        yield self.text, {'history': []}


@pytest.mark.parametrize('text, hinted', [('', True), ('Red.', False)])
def test_the_page_says_when_the_answer_is_empty(setup, text, hinted):
    from xtuner_plugins.web.app import build_app
    app = build_app(_Silent(setup['chat'], text))
    send = next(f for f in app.fns.values() if getattr(f.fn, '__name__', '') == 'send').fn
    *_, last = send('Hi', [], [], None, 6, True, False, 0.7, 0.9, 6)
    status = last[-1]
    assert status.startswith('Answered in ')
    assert ('(empty answer: the model generated no text' in status) == hinted, status
    assert ("tick 'Sample (otherwise greedy)'" in status) == hinted, status


def test_a_prompt_over_the_context_is_an_error_on_the_page(setup, monkeypatch):
    """Not a crash: gradio's error box, naming the page's settings (the prompt fits, its new tokens do not)."""
    import gradio as gr

    from xtuner_plugins.web.app import build_app
    chat, image = setup['chat'], setup['images'][0]
    tokens = len(chat.model.tokenizer(chat.model.model.system_message)['input_ids'])  # fewer than the prompt's
    monkeypatch.setattr(chat.model, 'context', (tokens + 100, 'config.json'))
    send = next(f for f in build_app(chat).fns.values() if getattr(f.fn, '__name__', '') == 'send').fn
    with pytest.raises(gr.Error) as error:
        list(send('Describe the image.', [image], [], None, 12, True, False, 0.7, 0.9, 4000))
    assert error.value.message.startswith('the prompt is ') and "'Max new tokens' asks for 4000 more" in \
        error.value.message, error.value.message
    assert "lower 'Max new tokens' to " in error.value.message and "'Most tiles per image'" in error.value.message
    assert 'Frames of the video' not in error.value.message   # an image question
    assert not chat.lock.locked() and chat.model.history is None


def test_the_page_says_an_animated_image_was_seen_as_its_first_frame(setup, tmp_path):
    """An animated GIF uploaded as an image is its first frame to the model (as InternVL's loader reads it): the
    status says so, by the file's name only, and where its frames go (the video upload); a still image, nothing."""
    from PIL import Image

    from xtuner_plugins.web.app import build_app
    frames = [Image.new('RGB', (32, 32), (90 * i, 0, 0)) for i in range(3)]
    gif = str(tmp_path / 'moving.gif')
    frames[0].save(gif, save_all=True, append_images=frames[1:])
    send = next(f for f in build_app(_Silent(setup['chat'], 'Red.')).fns.values() if getattr(f.fn, '__name__', '') == 'send').fn
    *_, last = send('What is it?', [gif, setup['images'][0]], [], None, 6, True, False, 0.7, 0.9, 6)
    status = last[-1]
    assert status.startswith('Answered in ') and status.count('Note: ') == 1, status
    assert "Note: moving.gif: an animated GIF: its first frame is used" in status, status
    assert "upload it as the 'Video'" in status and str(tmp_path) not in status, status


def test_a_request_that_goes_away_stops_generating(setup):
    """A client that goes away mid-answer (a closed tab, a dropped connection: gradio closes the handler's generator)
    lets go of the one model within a few tokens. Before, the answer went on to 'Max new tokens' for no one: five
    hit-and-run requests at 4096 over HTTP kept a tiny model busy for 35 s, the next user waiting behind them."""
    chat, steps = setup['chat'], []
    hook = chat.model.model.language_model.register_forward_hook(lambda *args: steps.append(1))
    try:
        answer = chat.stream('Tell a long story.', [], None, dict(max_new_tokens=1000, do_sample=False))
        next(answer)   # generating, a piece shown
        answer.close()
        assert chat.lock.acquire(timeout=120)   # the answer's thread let go of the model
        chat.lock.release()
    finally:
        hook.remove()
    assert 0 < len(steps) < 100, f'{len(steps)} tokens generated after the request went away'
    assert chat.model.history is None and chat.model.images == []
    # the next request is answered as ever
    assert list(chat.stream('What is it?', [], None, dict(GREEDY)))[-1][0] == \
        fresh_answers(setup['folder'], [('What is it?', [])])[0]


def test_a_chat_endpoint_call_that_goes_away_stops_generating(setup):
    """The /chat endpoint answered whole, so a caller that went away (a script killed, a dropped connection) left
    the one model generating to --max-new-tokens for no one (1000 tokens here). It streams the answer now: over
    HTTP, a call dropped at its first piece lets go within a few tokens; one read to its end is the answer."""
    import time

    import httpx
    from gradio_client import Client

    from tests.web.test_uploads import free_port
    from xtuner_plugins.web.app import build_app
    from xtuner_plugins.web.server import launch
    chat, steps = WebChat(ConvertedModel(setup['folder']), max_new_tokens=1000), []
    chat.model.model.language_model.register_forward_hook(lambda *args: steps.append(1))
    app, port = build_app(chat), free_port()
    launch(app, '127.0.0.1', port, prevent_thread_lock=True, quiet=True)
    try:
        base = f'http://127.0.0.1:{port}/gradio_api'
        event = httpx.post(f'{base}/call/chat', json={'data': [None, 'Tell a long story.']}, timeout=60)
        with httpx.stream('GET', f'{base}/call/chat/{event.json()["event_id"]}', timeout=60) as answer:
            next(line for line in answer.iter_lines() if line.startswith('event: generating'))
        time.sleep(1)   # gradio's next piece finds the caller gone
        assert chat.lock.acquire(timeout=60)
        chat.lock.release()
        assert 0 < len(steps) < 100, f'{len(steps)} tokens generated for a caller that went away'
        steps.clear()
        whole = Client(f'http://127.0.0.1:{port}/', verbose=False).predict(None, 'Tell a long story.',
                                                                          api_name='/chat')
        assert len(steps) == 1000 and whole == chat.answer(None, 'Tell a long story.')   # it would have gone on
    finally:
        app.close()


def test_an_image_over_the_pixel_limit_says_what_the_user_can_do(setup, tmp_path, capsys):
    """A web user was told to 'raise max_image_pixels', a setting of the server's they cannot reach: the page and
    /chat say the image's pixels, the server's limit, and to send a smaller one. tools/chat.py, run by whoever
    runs the model, still says the setting."""
    import gradio as gr
    from PIL import Image

    from tools.chat import main as chat_main
    from xtuner_plugins.web.app import build_app
    wide = str(tmp_path / 'wide.png')
    Image.new('1', (10000, 9000)).save(wide)   # 90 megapixels: over Pillow's 89.5, within a conversation's 192
    app = build_app(setup['chat'])
    fns = {fn.name: fn.fn for fn in app.fns.values()}
    said = []
    for ask in (lambda: list(fns['api_chat'](wide, 'What is it?')),
                lambda: list(fns['send']('What is it?', [wide], [], None, 2, True, False, 0.7, 0.9, 4))):
        with pytest.raises(gr.Error) as error:
            ask()
        said.append(error.value.message)
    assert said[0] == said[1] == ('wide.png has 90,000,000 pixels, more than this server takes in one image '
                                  '(89,478,485): send a smaller image (scaled down)'), said
    assert chat_main([setup['folder'], '--image', wide, '--prompt', 'What is it?']) == 2
    assert 'pixels (raise --max-image-pixels if the image is trusted) [image_too_large]' in capsys.readouterr().err
