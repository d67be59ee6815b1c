"""Serving with vLLM for real (its CPU build, in .venv-vllm: ``make vllm``, which ``make test`` runs first).

A tiny model (32-wide heads: vLLM's CPU attention takes no narrower), LoRA-trained (every trained tensor
perturbed, so answers depend on the image) and converted to each format vLLM reads (official, with its remote
code; hf), is served by tools/serve.py; through the OpenAI API (the image as a data URL, greedy) every answer
equals tools/chat.py's. And vLLM's offline ``LLM.chat`` on the official folder builds the prompt ids this project
builds (system message, template, ``<img>`` + ``<IMG_CONTEXT>`` run of vLLM's own tiling + ``</img>``).

Not skipped when vLLM is missing: it fails, saying to run ``make vllm`` (``XTUNER_PLUGINS_SKIP_VLLM=1`` skips it
on purpose). About 2.5 minutes on 2 cores: each server is healthy after ~20-50 s.
"""

import base64
import json
import os
import subprocess
import sys
import time
import urllib.request

import pytest

from tests.helpers import write_image
from tests.serve.test_serve import write_folders
from tools.chat import main as chat_main
from xtuner_plugins.cli.serve import REPO_ROOT, VLLM_VENV

pytestmark = pytest.mark.slow

VLLM_PYTHON = os.path.join(VLLM_VENV, 'bin', 'python')
SERVE = os.path.join(REPO_ROOT, 'tools', 'serve.py')
QUESTION = 'Describe the image.'
MAX_TOKENS = 8


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
    if os.environ.get('XTUNER_PLUGINS_SKIP_VLLM'):
        pytest.skip('XTUNER_PLUGINS_SKIP_VLLM is set')
    if not os.path.exists(VLLM_PYTHON):
        pytest.fail(f'no vLLM environment ({VLLM_PYTHON}): run `make vllm` (make test does)')
    root = tmp_path_factory.mktemp('vllm')
    folders = write_folders(root)
    images = [write_image(root / f'{i}.png', size=size, seed=i) for i, size in
              enumerate([(120, 60), (50, 90), (56, 56)])]
    return dict(root=root, folders=folders, images=images)


def env(root):
    out = dict(os.environ, VLLM_CPU_KVCACHE_SPACE='1', VLLM_HOST_IP='127.0.0.1', HF_HUB_OFFLINE='1',
               TRANSFORMERS_OFFLINE='1', HF_HOME=str(root / 'hf'), XDG_CACHE_HOME=str(root / 'cache'),
               VLLM_CACHE_ROOT=str(root / 'vllm'))
    out.pop('PYTHONPATH', None)  # the vLLM venv's own packages only
    return out


def text(answer):
    """An answer without the replacement characters its last tokens may end in: the random model's byte tokens
    can stop inside a UTF-8 character, which transformers decodes as U+FFFD and vLLM's detokenizer holds back."""
    return answer.strip().rstrip('\ufffd').strip()


def chat_answer(folder, image, capsys):
    assert chat_main([folder, '--image', image, '--prompt', QUESTION, '--max-new-tokens', str(MAX_TOKENS)]) == 0
    return text(capsys.readouterr().out)


def data_url(path):
    with open(path, 'rb') as f:
        return 'data:image/png;base64,' + base64.b64encode(f.read()).decode()


def messages(image):
    return [{'role': 'user', 'content': [{'type': 'image_url', 'image_url': {'url': data_url(image)}},
                                         {'type': 'text', 'text': QUESTION}]}]


def serve(folder, root):
    """tools/serve.py on ``folder``: the process and its base URL once it printed ``ready``."""
    proc = subprocess.Popen([sys.executable, SERVE, folder, '--port', '0', '--vllm-python', VLLM_PYTHON],
                            stdout=subprocess.PIPE, text=True, env=dict(env(root), PYTHONPATH=REPO_ROOT))
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if line.startswith('ready: '):
            return proc, line.split()[1].rstrip('/')
        if not line and proc.poll() is not None:
            pytest.fail(f'tools/serve.py exited with {proc.returncode} before ready (its output is above)')
    proc.terminate()
    pytest.fail('tools/serve.py was not ready within 600 s')


def completion(base, model, image):
    body = json.dumps({'model': model, 'messages': messages(image), 'temperature': 0,
                       'max_tokens': MAX_TOKENS}).encode()
    request = urllib.request.Request(base + '/chat/completions', body, {'Content-Type': 'application/json'})
    with urllib.request.urlopen(request, timeout=300) as r:
        return text(json.load(r)['choices'][0]['message']['content'])


@pytest.mark.parametrize('fmt', ['official', 'hf'])
def test_openai_answers_equal_the_chat_tools(setup, fmt, capsys):
    folder = setup['folders'][fmt]
    expected = [chat_answer(folder, image, capsys) for image in setup['images']]
    assert len(set(expected)) > 1, expected  # the answers depend on the image
    proc, base = serve(folder, setup['root'])
    try:
        got = [completion(base, fmt, image) for image in setup['images']]
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    assert got == expected


OFFLINE = '''
import json, sys
from vllm import LLM, SamplingParams
if __name__ == '__main__':  # vLLM starts its engine in a new process
    folder, requests = sys.argv[1], json.loads(sys.argv[2])
    llm = LLM(model=folder, trust_remote_code=True, dtype='float32', max_model_len=2048, enforce_eager=True,
              limit_mm_per_prompt={'image': 1})
    outs = [llm.chat(m, SamplingParams(temperature=0, max_tokens=%d))[0] for m in requests]
    print('RESULT ' + json.dumps([dict(ids=list(o.prompt_token_ids), text=o.outputs[0].text) for o in outs]))
''' % MAX_TOKENS


def test_offline_llm_chat_prompt_ids_equal_ours(setup, capsys):
    from xtuner_plugins.models.prompt import prompt_inputs
    from xtuner_plugins.models.inference import ConvertedModel
    folder = setup['folders']['official']
    script = setup['root'] / 'offline.py'
    script.write_text(OFFLINE)
    out = subprocess.run([VLLM_PYTHON, str(script), folder, json.dumps([messages(i) for i in setup['images']])],
                         capture_output=True, text=True, env=env(setup['root']), timeout=600)
    lines = [line for line in out.stdout.splitlines() if line.startswith('RESULT ')]
    assert out.returncode == 0 and lines, out.stderr[-3000:]
    results = json.loads(lines[-1][len('RESULT '):])
    model = ConvertedModel(folder)
    ours = [prompt_inputs(model, QUESTION, [image])['input_ids'][0].tolist() for image in setup['images']]
    assert [r['ids'] for r in results] == ours
    assert len({len(ids) for ids in ours}) > 1  # images of different tile counts
    assert [text(r['text']) for r in results] == [chat_answer(folder, i, capsys) for i in setup['images']]
