"""tools/web_demo.py served for real and driven in headless Chromium (Debian's chromium + chromedriver, which
``make test`` installs): upload an image, ask, read the answer off the page and compare it with tools/chat.py's;
a second turn, the clear button, the stop button, the /chat endpoint through gradio_client; a screenshot under
work_dirs/.
Bad input: a folder that is not a converted model, a port in use."""

import contextlib
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
import unicodedata

import pytest
import torch

from tests.helpers import converted_tiny_folder, write_image
from tests.train_utils import train_env
from xtuner_plugins.launch import TrainJob, free_port
from xtuner_plugins.models.inference import ConvertedModel

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOOL = os.path.join(ROOT, 'tools', 'web_demo.py')
SCREENSHOT = os.path.join(ROOT, 'work_dirs', 'web_demo', 'screenshot.png')
CHROMIUM, CHROMEDRIVER = '/usr/bin/chromium', '/usr/bin/chromedriver'
QUESTIONS = ['Describe the image.', 'What is it?', 'What colour is it?', 'Hi', 'Look.', 'Tell me more.']
FOLLOW_UPS = ['And now?', 'Go on.', 'Why?', 'Say more.', 'And then?', 'Again.']
# Characters that markdown or HTML would render as something else; the page's text is compared as text.
MARKUP = re.compile(r'[*_`#<>\[\]()\\~|]|^\s*([-+]|\d+\.)\s')


def shown_as_written(text):
    """Whether a page shows ``text`` as it is: a letter or digit, no markup, no control characters (a random
    tiny model's answer can be any bytes; U+FFFD, for a partial UTF-8 sequence, is shown)."""
    return any(c.isalnum() for c in text) and not MARKUP.search(text) and all(
        c in '\n\t' or unicodedata.category(c)[0] != 'C' for c in text)


def wait_until(condition, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f'timed out after {timeout} s waiting for {what}')


def tool_command(*args):
    """tools/web_demo.py with ``args``, and the launcher's environment (this checkout's package first)."""
    return [sys.executable, TOOL, *args], train_env()


@contextlib.contextmanager
def running_server(argv, port, cwd=ROOT, env=None, timeout=180):
    """Run ``argv``, a server that listens on ``port``, as the launcher runs training (its own session, killed
    with everything under it; ``env`` the launcher's unless given) until the block ends; its output is shown
    when it exits before it listens."""
    with tempfile.TemporaryDirectory() as tmp:
        server = TrainJob(argv, env or train_env(), os.path.join(tmp, 'server.log'), cwd=cwd)

        def up():
            if server.poll() is not None:
                raise AssertionError(f'{argv} exited with {server.proc.returncode}:\n{server.read_log()[-4000:]}')
            with socket.socket() as sock:
                return sock.connect_ex(('127.0.0.1', port)) == 0

        try:
            wait_until(up, timeout, f'{argv} on port {port}')
            yield
        finally:
            server.kill('the test is done')
            server.close()


@contextlib.contextmanager
def serve(folder, *args):
    """tools/web_demo.py FOLDER on a free port until the block ends; yields its URL."""
    port = free_port()
    argv, env = tool_command(str(folder), '--port', str(port), *args)
    with running_server(argv, port, env=env):
        yield f'http://127.0.0.1:{port}/'


@pytest.fixture(scope='module')
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp('web_demo')
    folder = converted_tiny_folder(root)
    with serve(folder, '--max-new-tokens', '6') as url:
        yield dict(root=root, folder=folder, port=int(url.rsplit(':', 1)[1].strip('/')), url=url)


def chat_tool(folder, image, question, capsys):
    from tools.chat import main as chat_main
    assert chat_main([folder, '--image', image, '--prompt', question, '--max-new-tokens', '6']) == 0
    return capsys.readouterr().out.strip()


def chromium(width=1280, height=800):
    """A headless Chromium under Selenium, offline (the flags keep it from reaching for Google's services)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not os.path.exists(p)]
    assert not missing, f'{missing} not installed: `make test` installs Debian\'s chromium and chromium-driver'
    os.environ.setdefault('SE_OFFLINE', 'true')  # Selenium Manager: never look for a driver online
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ('--headless=new', '--no-sandbox', '--disable-gpu', '--disable-dev-shm-usage', '--disable-quic',
                 '--no-first-run', '--disable-background-networking', '--disable-component-update',
                 '--disable-sync', f'--window-size={width},{height}'):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


@pytest.fixture
def browser():
    driver = chromium()
    try:
        yield driver
    finally:
        driver.quit()


def open_page(driver, url):
    from selenium.webdriver.common.by import By
    driver.get(url)
    wait_until(lambda: driver.find_elements(By.CSS_SELECTOR, '#question textarea'), 60, 'the page')


def ask_in_page(driver, question, image=None):
    from selenium.webdriver.common.by import By
    before = len(driver.find_elements(By.CSS_SELECTOR, '#chatbot [data-testid="bot"]'))
    if image:
        driver.find_element(By.CSS_SELECTOR, '#images input[type=file]').send_keys(image)
        uploaded = f'#images td.filename[aria-label="{os.path.basename(image)}"]'
        wait_until(lambda: driver.find_elements(By.CSS_SELECTOR, uploaded), 30, 'the upload')
    driver.find_element(By.CSS_SELECTOR, '#question textarea').send_keys(question)
    driver.find_element(By.ID, 'send').click()
    # the status and the chat panel are updated apart: the answer's bubble may show a moment after 'Answered', and
    # its text a moment after the bubble (an empty bubble was read once, CI 2026-11-25)
    def answered():
        from selenium.common.exceptions import StaleElementReferenceException
        try:
            bots = driver.find_elements(By.CSS_SELECTOR, '#chatbot [data-testid="bot"]')
            return ('Answered' in driver.find_element(By.ID, 'status').text and len(bots) > before
                    and bots[-1].text.strip())
        except StaleElementReferenceException:  # re-rendered between the lookup and the read
            return False
    wait_until(answered, 120, 'the answer')
    bots = driver.find_elements(By.CSS_SELECTOR, '#chatbot [data-testid="bot"]')
    assert len(bots) == before + 1
    return bots[-1].text


def test_the_page_answers_as_the_chat_tool_does(served, browser, capsys, tmp_path):
    from selenium.webdriver.common.by import By
    folder = served['folder']
    # an image and question whose answer the page shows as written
    for seed, question in enumerate(QUESTIONS):
        image = write_image(tmp_path / f'photo{seed}.png', size=(120, 60), seed=seed)
        expected = chat_tool(folder, image, question, capsys)
        if shown_as_written(expected):
            break
    else:
        pytest.fail(f'no answer to {QUESTIONS} can be shown as written')
    # and a second turn (it continues with the image of the first) whose answer can be, too
    model, greedy = ConvertedModel(folder), dict(max_new_tokens=6, do_sample=False)
    assert model.ask(question, [image], greedy) == expected
    first_turn = model.conversation()
    for follow_up in FOLLOW_UPS:
        model.resume(first_turn)
        answer = model.ask(follow_up, [], greedy)
        if shown_as_written(answer):
            break
    else:
        pytest.fail(f'no answer to {FOLLOW_UPS} after {question!r} can be shown as written')

    open_page(browser, served['url'])
    assert ask_in_page(browser, question, image).split() == expected.split()
    user = browser.find_elements(By.CSS_SELECTOR, '#chatbot [data-testid="user"] img')
    assert user, 'the uploaded image is shown in the chat'
    assert ask_in_page(browser, follow_up).split() == answer.split()
    os.makedirs(os.path.dirname(SCREENSHOT), exist_ok=True)
    assert browser.save_screenshot(SCREENSHOT) and os.path.getsize(SCREENSHOT) > 10_000

    # the clear button: no messages, and the next question starts a new conversation
    browser.find_element(By.ID, 'clear').click()
    wait_until(lambda: not browser.find_elements(By.CSS_SELECTOR, '#chatbot [data-testid="bot"]'), 30,
               'an empty chat')
    assert ask_in_page(browser, question, image).split() == expected.split()


def test_stop_ends_the_answer_and_takes_the_turn_back(served, browser, monkeypatch, tmp_path):
    """The page had no Stop: an answer asked for at 4096 new tokens held the one model to its end. Stop ends it
    within a few tokens, the turn (never in the session's conversation) leaves the chat and its question goes back
    in the box; a click with nothing under way changes nothing."""
    from selenium.webdriver.common.by import By

    from xtuner_plugins.web.app import WebChat, build_app
    from xtuner_plugins.web.server import launch
    monkeypatch.setenv('GRADIO_TEMP_DIR', str(tmp_path / 'gradio'))
    chat, steps = WebChat(ConvertedModel(served['folder']), max_new_tokens=4096), []
    # a token each 20 ms, as a real-size model gives them (the tiny one's 400 a second kept the page, re-drawing
    # the answer at each, from taking the click for seconds on two cores)
    chat.model.model.language_model.register_forward_hook(lambda *args: steps.append(1) or time.sleep(0.02))
    app, port = build_app(chat), free_port()
    launch(app, '127.0.0.1', port, prevent_thread_lock=True, quiet=True)
    try:
        open_page(browser, f'http://127.0.0.1:{port}/')
        browser.find_element(By.CSS_SELECTOR, '#question textarea').send_keys('Tell a long story.')
        browser.find_element(By.ID, 'send').click()
        wait_until(lambda: len(steps) > 20, 60, 'the answer under way')
        browser.find_element(By.ID, 'stop').click()
        wait_until(lambda: browser.find_element(By.ID, 'status').text.startswith('Stopped'), 30, 'the stop')
        assert chat.lock.acquire(timeout=30)   # generate ended: the model is free
        chat.lock.release()
        stopped_at = len(steps)
        time.sleep(1)
        assert len(steps) == stopped_at < 4000, f'{len(steps)} tokens generated'
        wait_until(lambda: not browser.find_elements(By.CSS_SELECTOR, '#chatbot [data-testid="user"]'), 30,
                   'the turn taken back')
        assert browser.find_element(By.CSS_SELECTOR, '#question textarea').get_attribute('value') == \
            'Tell a long story.'
        browser.find_element(By.ID, 'stop').click()   # nothing under way
        time.sleep(1)
        assert browser.find_element(By.ID, 'status').text.startswith('Stopped')   # unchanged
    finally:
        app.close()


def test_chat_endpoint_through_gradio_client(served, capsys):
    from gradio_client import Client, handle_file
    image = write_image(served['root'] / 'api.png', size=(50, 90), seed=7)
    expected = chat_tool(served['folder'], image, 'Describe the image.', capsys)
    client = Client(served['url'], verbose=False)
    assert '/chat' in client.view_api(print_info=False, return_format='dict')['named_endpoints']
    assert client.predict(handle_file(image), 'Describe the image.', api_name='/chat') == expected


def run_tool(*args):
    cmd, env = tool_command(*args)
    return subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT, timeout=300)


def test_a_port_in_use_is_named(served):
    result = run_tool(served['folder'], '--port', str(served['port']))
    assert result.returncode == 2
    assert f'port {served["port"]} on 127.0.0.1 is in use' in result.stderr


def test_a_folder_that_is_not_a_converted_model_is_named(tmp_path):
    (tmp_path / 'config.json').write_text('{"model_type": "qwen2"}')
    result = run_tool(str(tmp_path), '--port', str(free_port()))
    assert result.returncode == 2
    assert str(tmp_path / 'config.json') in result.stderr and "'qwen2' is not a converted" in result.stderr


@pytest.mark.parametrize('option, value', [('--max-num', '0'), ('--min-num', '0'), ('--max-new-tokens', '0'),
                                           ('--dtype', 'int8'), ('--device', 'cuda')])
def test_a_bad_option_value_is_one_argparse_line(tmp_path, monkeypatch, capsys, option, value):
    """As tools/chat.py refuses the same options (one parser for both), before a model loads."""
    from tests.tools.test_chat import BAD_OPTIONS, refused_line
    from tools.web_demo import main
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    says = BAD_OPTIONS.get((option, value), "'0': give a whole number, 1 or more")
    line = refused_line(main, [str(tmp_path), '--port', str(free_port()), option, value], capsys)
    assert line.endswith(f'error: argument {option}: {says}'), line
