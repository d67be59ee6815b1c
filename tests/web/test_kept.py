"""The images the web demo keeps for its conversations' later turns stay within one budget for the whole server
(xtuner_plugins/web/kept.py). Each session kept its images' bytes in its state, which gradio holds for a day, for up
to 1,000 sessions that any client can make up: a 108 MB noise PNG asked about in three new sessions took the server
from 1.00 to 1.43 GB. Past the budget the images of the conversations that asked least recently are let go, never
those of the one asking; such a conversation's next question is refused in one line that says what to do."""

import pytest

from tests.helpers import converted_tiny_folder, write_image
from xtuner_plugins.models.inference import ConvertedModel
from xtuner_plugins.web.app import WebChat, build_app
from xtuner_plugins.web.kept import KeptImages, LetGo

GREEDY = dict(max_new_tokens=4, do_sample=False)


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp('kept')
    folder = converted_tiny_folder(root)
    images = [write_image(root / f'{i}.png', size=(96, 96), seed=i) for i in range(12)]   # noise: ~27 kB each
    return dict(folder=folder, images=images, model=ConvertedModel(folder))


def turn(chat, question, images, conversation):
    return list(chat.stream(question, images, conversation, dict(GREEDY)))[-1]


def held(value) -> int:
    """Bytes of images ``value`` (a conversation, a list of them) holds itself."""
    if isinstance(value, (bytes, bytearray)):
        return len(value)
    if isinstance(value, dict):
        return sum(held(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(held(v) for v in value)
    return 0


def kept(chat) -> int:
    """Bytes the chat's store holds, counted from what it holds (not from its own total)."""
    store = getattr(chat, 'kept', None)
    return 0 if store is None else sum(len(data) for owned in store._owners.values() for data in owned.values())


def test_the_images_kept_over_many_sessions_stay_within_the_budget(setup):
    sizes = [len(open(image, 'rb').read()) for image in setup['images']]
    budget = int(3.5 * max(sizes))   # three sessions' images
    chat = WebChat(setup['model'], max_new_tokens=4, kept_bytes=budget)
    sessions = []   # as gradio keeps them: every session's conversation
    for image in setup['images']:
        sessions.append(turn(chat, 'Describe the image.', [image], None)[1])
        total = held(sessions) + kept(chat)
        assert total <= budget, (len(sessions), total, budget)
        assert chat.kept.total == kept(chat)
    assert held(sessions) == 0 and kept(chat) == sum(sizes[-3:])   # the three that asked last
    # the newest sessions go on as a fresh model would
    model = ConvertedModel(setup['folder'])
    answers = [model.ask('Describe the image.', [setup['images'][-1]], dict(GREEDY)),
               model.ask('And the colours?', [], dict(GREEDY))]
    assert [turn(chat, 'Describe the image.', [setup['images'][-1]], None)[0],
            turn(chat, 'And the colours?', [], sessions[-1])[0]] == answers
    # the first session's images were let go: its next question is refused, saying so and what to do
    with pytest.raises(LetGo, match=r"^this conversation's images were let go to make room for newer "
                                    r"conversations' \(the server keeps at most 0\.1 MiB of images\); press "
                                    r"'Clear history' and upload them again"):
        turn(chat, 'And the colours?', [], sessions[0])
    assert not chat.lock.locked() and kept(chat) <= budget


def test_the_least_recently_asking_goes_first_and_never_the_one_asking(setup):
    images = setup['images']
    sizes = [len(open(image, 'rb').read()) for image in images]
    chat = WebChat(setup['model'], max_new_tokens=4, kept_bytes=int(2.5 * min(sizes)))
    _, a = turn(chat, 'Describe the image.', [images[0]], None)
    _, b = turn(chat, 'Describe the image.', [images[1]], None)
    _, a = turn(chat, 'And now?', [], a)                         # a asked last: b goes first
    assert held(a) == 0 and len(a['images']) == 1                # its image still the store's, not its own
    _, c = turn(chat, 'Describe the image.', [images[2]], None)
    turn(chat, 'And now?', [], a)
    with pytest.raises(LetGo):
        turn(chat, 'And now?', [], b)
    # one conversation over the budget on its own keeps its images while it is the one asking
    _, d = turn(chat, 'Compare them.', images[3:6], None)
    assert kept(chat) == sum(sizes[3:6]) and turn(chat, 'And now?', [], d)[0]
    with pytest.raises(LetGo):
        turn(chat, 'And now?', [], c)


def test_clearing_the_history_lets_its_images_go(setup):
    import gradio as gr
    chat = WebChat(setup['model'], max_new_tokens=4, kept_bytes=1 << 20)
    app = build_app(chat)
    send = next(fn.fn for fn in app.fns.values() if fn.name == 'send')
    clear = next(fn.fn for fn in app.fns.values() if fn.name == 'clear')
    *_, (history, conversation, *_) = send('Describe the image.', [setup['images'][0]], [], None, 2, True, False,
                                           0.7, 0.9, 4)
    assert kept(chat) > 0 and len(history) == 2
    assert clear(conversation)[:2] == ([], None) and kept(chat) == 0
    # a conversation whose images were let go: one line on the page, the turn taken back, no traceback
    shown = []
    with pytest.raises(gr.Error, match="images were let go") as error:
        for outputs in send('And now?', None, history, conversation, 2, True, False, 0.7, 0.9, 4):
            shown.append(outputs)
    assert error.value.print_exception is False
    assert shown[-1][0] == history and shown[-1][5].startswith("Not asked: this conversation's images were let go")


def test_the_store_counts_what_it_holds():
    store = KeptImages(budget=10)
    a, b = store.keep('a', b'x' * 6, 1), store.keep('b', b'y' * 6, 1)
    assert store.total == 6 and store.resolve({'images': [b]})['images'] == [b'y' * 6]
    with pytest.raises(LetGo):
        store.resolve({'images': [a]})
    assert store.resolve(None) is None and store.resolve({'images': ['/a/path.png']})['images'] == ['/a/path.png']


def test_the_web_demo_takes_its_budget_from_the_command_line(monkeypatch, capsys):
    from tests.web.test_uploads import STUB, free_port
    from xtuner_plugins.cli import web_demo
    from xtuner_plugins.web.kept import DEFAULT_KEPT_BYTES
    budgets = []
    monkeypatch.setattr(web_demo, 'run_tool', lambda args, prog, use, errors, **tiling: use(STUB) or 0)
    monkeypatch.setattr(web_demo, 'build_app', lambda chat, title: budgets.append(chat.kept.budget))
    monkeypatch.setattr(web_demo, 'launch', lambda app, host, port, **kwargs: None)
    port = str(free_port())
    assert web_demo.main(['folder', '--port', port]) == 0
    assert web_demo.main(['folder', '--port', port, '--max-image-memory', '512MB']) == 0
    assert budgets == [DEFAULT_KEPT_BYTES, 512 << 20] and DEFAULT_KEPT_BYTES == 2 << 30
    with pytest.raises(SystemExit):
        web_demo.main(['folder', '--port', port, '--max-image-memory', '2.5gb'])
    assert "argument --max-image-memory: '2.5gb': give a size such as 200mb" in capsys.readouterr().err
