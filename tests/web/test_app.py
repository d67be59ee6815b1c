"""The web demo's model wiring (no browser): the /chat endpoint answers as tools/chat.py does, the stream ends in
the answer, browser sessions keep their own conversations, one answer's settings do not leak into the next."""

import threading

import pytest

from tests.helpers import converted_tiny_folder, write_image
from xtuner_plugins.models.inference import ConvertedModel
from xtuner_plugins.web.app import WebChat, port_free, user_message

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
