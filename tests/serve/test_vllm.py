"""Serving with vLLM for real (its CPU build, in .venv-vllm: ``make vllm``, which ``make test`` runs first).

A tiny model (32-wide heads: vLLM's CPU attention takes no narrower), LoRA-trained (every trained tensor perturbed,
so answers depend on the image) and converted to each format vLLM reads (official, with its remote code; hf), and a
CLIP + MLP model to llava. The hf and llava folders are served by tools/serve.py: through the OpenAI API (the image
as a data URL, greedy) every answer equals tools/chat.py's. vLLM's offline ``LLM.chat`` on the official folder
builds the prompt ids this project builds (system message, template, ``<img>`` + ``<IMG_CONTEXT>`` run of vLLM's own
tiling + ``</img>``) and gives tools/chat.py's answers, also for an LLM whose tokenizer adds a bos (the bos once, at
the very start, as training has it: a Llama 3 and a Gemma 3 look-alike). docs/serving.md's tiny path (an official
folder, tools/serve.py, curl) runs as written. Image URLs: none fetched by default (there, an ``http://127.0.0.1``
one and a ``file://`` one refused with 400); ``--allowed-media-domains 127.0.0.1`` (the hf server) fetches from
there.

Not skipped when vLLM is missing: it fails, saying to run ``make vllm`` (``XTUNER_PLUGINS_SKIP_VLLM=1`` skips it
on purpose). About 4 minutes on 2 cores: each server is healthy after ~20-50 s.
"""

import base64
import contextlib
import http.server
import json
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest

from tests.helpers import write_image
from tests.serve.test_serve import write_folders
from tools.chat import main as chat_main
from xtuner_plugins.cli.serve_vllm import REPO_ROOT, VLLM_VENV

pytestmark = pytest.mark.slow

VLLM_PYTHON = os.path.join(VLLM_VENV, 'bin', 'python')
SERVE = os.path.join(REPO_ROOT, 'tools', 'serve.py')
QUESTION = 'Describe the image.'
MAX_TOKENS = 8


def need_vllm():
    if os.environ.get('XTUNER_PLUGINS_SKIP_VLLM'):
        pytest.skip('XTUNER_PLUGINS_SKIP_VLLM is set')
    if not os.path.exists(VLLM_PYTHON):
        pytest.fail(f'no vLLM environment ({VLLM_PYTHON}): run `make vllm` (make test does)')


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
    need_vllm()
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


def messages(image, url=None):
    return [{'role': 'user', 'content': [{'type': 'image_url', 'image_url': {'url': url or data_url(image)}},
                                         {'type': 'text', 'text': QUESTION}]}]


def serve(folder, root, *options):
    """tools/serve.py on ``folder``: the process and its base URL once it printed ``ready``."""
    proc = subprocess.Popen([sys.executable, SERVE, folder, '--port', '0', '--vllm-python', VLLM_PYTHON, *options],
                            stdout=subprocess.PIPE, text=True, env=dict(env(root), PYTHONPATH=REPO_ROOT))
    return proc, ready(proc)


def ready(proc):
    """The base URL a tools/serve.py process printed when ready."""
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if line.startswith('ready: '):
            return line.split()[1].rstrip('/')
        if not line and proc.poll() is not None:
            pytest.fail(f'tools/serve.py exited with {proc.returncode} before ready (its output is above)')
    proc.terminate()
    pytest.fail('tools/serve.py was not ready within 600 s')


def completion(base, model, image, url=None, key=None):
    """The greedy answer to ``image`` (sent as a data URL, or as ``url``; ``key``: the server's API key);
    ``(status, error message)`` for a refused request."""
    body = json.dumps({'model': model, 'messages': messages(image, url), 'temperature': 0,
                       'max_tokens': MAX_TOKENS}).encode()
    headers = {'Content-Type': 'application/json', **({'Authorization': f'Bearer {key}'} if key else {})}
    request = urllib.request.Request(base + '/chat/completions', body, headers)
    try:
        with urllib.request.urlopen(request, timeout=300) as r:
            return text(json.load(r)['choices'][0]['message']['content'])
    except urllib.error.HTTPError as exc:
        error = json.load(exc)['error']
        return exc.code, error['message'] if isinstance(error, dict) else error


@contextlib.contextmanager
def image_server(folder):
    """An HTTP server of ``folder``'s files on 127.0.0.1 (a service of the server's own network); yields its URL
    and the paths it was asked for."""
    asked = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(folder), **kwargs)

        def do_GET(self):
            asked.append(self.path)
            super().do_GET()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f'http://127.0.0.1:{server.server_address[1]}', asked
    finally:
        server.shutdown()
        server.server_close()


def test_openai_answers_equal_the_chat_tools(setup, capsys):
    """The hf folder through the OpenAI API, started with --allowed-media-domains 127.0.0.1: it fetches from there
    (file:// URLs still refused). The official folder: its prompt ids and answers through vLLM's LLM.chat
    (test_offline_llm_chat_prompt_ids_equal_ours) and tools/serve.py's default refusals of URLs
    (test_the_tiny_path_of_the_serving_guide_runs_as_written); its own OpenAI run cost 105 s of the suite."""
    fmt = 'hf'
    folder = setup['folders'][fmt]
    expected = [chat_answer(folder, image, capsys) for image in setup['images']]
    assert len(set(expected)) > 1, expected  # the answers depend on the image
    image, name = setup['images'][0], os.path.basename(setup['images'][0])
    keyfile = setup['root'] / 'api_key'   # --api-key-file: vLLM asks every /v1 request for it
    keyfile.write_text('sk-test-789\n')
    with image_server(os.path.dirname(image)) as (local, asked):
        proc, base = serve(folder, setup['root'], '--allowed-media-domains', '127.0.0.1', '--api-key-file',
                           str(keyfile))
        try:
            got = [completion(base, fmt, image, key='sk-test-789') for image in setup['images']]
            fetched = completion(base, fmt, image, f'{local}/{name}', key='sk-test-789')
            from_file = completion(base, fmt, image, 'file://' + os.path.abspath(image), key='sk-test-789')
            unkeyed = completion(base, fmt, image)
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    assert unkeyed == (401, 'Unauthorized')
    assert got == expected
    assert fetched == expected[0] and asked == [f'/{name}']
    check_file_url_refused(from_file)


@pytest.fixture(scope='module')
def llava_setup(tmp_path_factory):
    """A tiny CLIP tower + LLaVA's MLP (one padded tile an image) + the 32-wide LLM, LoRA-trained (every trained
    tensor perturbed), its checkpoint and its llava folder."""
    import torch

    from tests.helpers import tiny_families
    from tests.tools.test_convert_to_official import LORA, convert, options, trained_checkpoint
    from xtuner_plugins.engine.options import load_config
    from xtuner_plugins.models.export import build_for_export
    from xtuner_plugins.tiny import write_tiny_llm
    need_vllm()
    root = tmp_path_factory.mktemp('vllm_llava')
    tiny = tiny_families(root / 'tiny')
    tiny['llm'] = write_tiny_llm(str(root / 'llm'), num_heads=2, num_kv_heads=1)
    opts = options(tiny, **{'model.llm': tiny['llm'], 'model.vision_encoder': tiny['clip'], 'model.projector': 'mlp',
                            'model.image_mode': 'pad'})
    probe = build_for_export(load_config(LORA, opts), None, torch.float32, log=lambda m: None)
    opts.update({f'train_dataloader.dataset.{k}': (list(v) if isinstance(v, tuple) else v)
                 for k, v in probe.geometry.items()})
    checkpoint = str(root / 'iter_1.pth')
    model = trained_checkpoint(LORA, opts, checkpoint, scale=0.3)
    folder = convert(LORA, checkpoint, str(root / 'llava'), opts, '--format', 'llava')
    state = torch.load(checkpoint, weights_only=False)   # as training records them, for serve.py --checkpoint
    state['meta'] = {'cfg': load_config(LORA, opts).pretty_text, 'lineage': model.lineage}
    torch.save(state, checkpoint)
    images = [write_image(root / f'{i}.png', size=size, seed=i) for i, size in
              enumerate([(120, 60), (50, 90), (56, 56)])]
    return dict(root=root, folder=folder, checkpoint=checkpoint, images=images)


def test_a_llava_folder_is_served_with_the_chat_tools_answers(llava_setup, capsys, tmp_path):
    """A CLIP + MLP model's llava folder (LlavaForConditionalGeneration) through tools/serve.py and the OpenAI API:
    the answers equal tools/chat.py's (vLLM builds the prompt from the folder's template and processor: 16 image
    tokens a picture, padded as training padded it). Before, serve.py refused llava folders ('neither sets up nor
    tests'), and --checkpoint of such a model failed converting to official; it converts to llava now."""
    from types import SimpleNamespace

    from xtuner_plugins.cli.serve import converted
    from xtuner_plugins.cli.serve_settings import settings
    from xtuner_plugins.models.inference import folder_format
    folder = llava_setup['folder']
    s = settings(folder)
    assert (s['format'], s['head_dim'], s['images']) == ('llava', 32, 8)
    expected = [chat_answer(folder, image, capsys) for image in llava_setup['images']]
    assert len(set(expected)) > 1, expected  # the answers depend on the image
    proc, base = serve(folder, llava_setup['root'])
    try:
        got = [completion(base, 'llava', image) for image in llava_setup['images']]
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    assert got == expected
    args = SimpleNamespace(checkpoint=llava_setup['checkpoint'], dtype=None, remap=[])
    assert folder_format(converted(args, str(tmp_path))) == 'llava'


def check_file_url_refused(from_file):
    assert from_file[0] == 400 and from_file[1].endswith('(file URLs are refused: send images as data URLs)`.'), \
        from_file


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


def offline(folder, root, images):
    """vLLM's offline ``LLM.chat`` on ``folder``, greedy, one request per image: ``[{ids, text}]``."""
    script = root / 'offline.py'
    script.write_text(OFFLINE)
    out = subprocess.run([VLLM_PYTHON, str(script), folder, json.dumps([messages(i) for i in images])],
                         capture_output=True, text=True, env=env(root), timeout=600)
    lines = [line for line in out.stdout.splitlines() if line.startswith('RESULT ')]
    assert out.returncode == 0 and lines, out.stderr[-3000:]
    return json.loads(lines[-1][len('RESULT '):])


def our_prompt_ids(folder, images):
    from xtuner_plugins.models.inference import ConvertedModel
    from xtuner_plugins.models.prompt import prompt_inputs
    model = ConvertedModel(folder)
    return model, [prompt_inputs(model, QUESTION, [image])['input_ids'][0].tolist() for image in images]


def test_offline_llm_chat_prompt_ids_equal_ours(setup, capsys):
    folder = setup['folders']['official']
    results = offline(folder, setup['root'], setup['images'])
    _, ours = our_prompt_ids(folder, setup['images'])
    assert [r['ids'] for r in results] == ours
    assert len({len(ids) for ids in ours}) > 1  # images of different tile counts
    assert [text(r['text']) for r in results] == [chat_answer(folder, i, capsys) for i in setup['images']]


#: template -> (LLM architecture, tokenizer family, bos, the token after it)
BOS_CASES = {'llama3': ('llama', 'llama3', '<|begin_of_text|>', '<|start_header_id|>'),
             'gemma': ('gemma3', 'gemma', '<bos>', '<start_of_turn>')}


@pytest.fixture(scope='module', params=sorted(BOS_CASES))
def bos_setup(request, tmp_path_factory):
    """``setup``'s tiny model with a Llama 3 or a Gemma 3 look-alike LLM: its tokenizer adds a bos (its
    post-processor), and it is trained in its family's own turns (``model.template=llama3``: no system turn without a
    system message; ``gemma``: none ever, Gemma 3's sliding layers); converted to official, and two images of
    different tile counts."""
    from tests.helpers import tiny_workspace
    from tests.tools.test_convert_to_official import LORA, convert, options, trained_checkpoint
    from xtuner_plugins.tiny import write_tiny_llm
    need_vllm()
    arch, chat, bos, first = BOS_CASES[request.param]
    root = tmp_path_factory.mktemp('vllm_bos')
    tiny = tiny_workspace(root / 'tiny')
    tiny['llm'] = write_tiny_llm(str(root / 'llm'), arch=arch, num_heads=2, num_kv_heads=1, chat=chat)
    opts = options(tiny, **{'model.llm': tiny['llm'], 'model.template': request.param})
    trained_checkpoint(LORA, opts, str(root / 'iter_1.pth'), scale=0.3)
    folders = {fmt: convert(LORA, str(root / 'iter_1.pth'), str(root / fmt), opts, '--format', fmt)
               for fmt in ('official',)}
    images = [write_image(root / f'{i}.png', size=size, seed=i) for i, size in enumerate([(120, 60), (56, 56)])]
    return dict(root=root, folders=folders, images=images, bos=bos, first=first)


@pytest.mark.parametrize('fmt', ['official'])
def test_a_tokenizer_with_a_bos_gets_it_once_from_vllms_chat(bos_setup, fmt, capsys):
    """vLLM's chat tokenises the rendered chat template without adding special tokens: the converted folder's
    template writes the bos (export/files.py), so vLLM's prompt starts with it once, as training's and ours do; and
    its prompt is Llama 3's (Gemma's) turns token for token, as training's; vLLM's Gemma 3 runs its sliding layers
    and answers as chat does.
    The official folder only (the hf folder's template is the same one, rendered the same way by transformers:
    tests/models/export/test_chat_template_bos.py; its vLLM run passed too, 2026-11-26, and cost 100 s a run)."""
    folder, images = bos_setup['folders'][fmt], bos_setup['images']
    results = offline(folder, bos_setup['root'], images)
    model, ours = our_prompt_ids(folder, images)
    bos = model.tokenizer.convert_tokens_to_ids(bos_setup['bos'])
    assert all(ids[0] == bos and ids.count(bos) == 1 for ids in ours), ours
    header = model.tokenizer.convert_tokens_to_ids(bos_setup['first'])
    assert all(ids[1] == header and '<|im_start|>' not in model.tokenizer.decode(ids) for ids in ours)
    assert [r['ids'] for r in results] == ours
    assert [text(r['text']) for r in results] == [chat_answer(folder, i, capsys) for i in images]


def test_the_tiny_path_of_the_serving_guide_runs_as_written(tmp_path):
    """docs/serving.md's tiny models: made with --llm-heads 2 --llm-kv-heads 1, trained one iteration on the README's
    my_data/, converted, served by tools/serve.py and asked its question with curl (on a free port, not 8000)."""
    from tests.test_readme import Reader, block, commands
    from xtuner_plugins.launch import free_port
    need_vllm()
    for name in ('configs', 'tools'):
        os.symlink(os.path.join(REPO_ROOT, name), tmp_path / name)
    os.symlink(os.path.dirname(os.path.dirname(sys.executable)), tmp_path / '.venv')
    reader = Reader(str(tmp_path))
    reader.run(block('ImageDraw.Draw(img).ellipse'))  # the README's my_data/
    *steps, serve_command = commands(block('make_tiny_models.py tiny32 --llm-heads 2 --llm-kv-heads 1'))
    assert serve_command == 'python tools/serve.py work_dirs/tiny32_internvl', serve_command
    for step in steps:
        reader.run(step)
    port = free_port()
    proc = subprocess.Popen(['bash', '-c', f'exec {serve_command} --port {port}'], cwd=reader.root, text=True,
                            env=dict(reader.env, VLLM_CACHE_ROOT=str(tmp_path / 'vllm')), stdout=subprocess.PIPE,
                            start_new_session=True)
    image = tmp_path / 'my_data' / 'images' / '0.jpg'
    try:
        assert ready(proc) == f'http://127.0.0.1:{port}/v1'
        question = block('base64 -w0 my_data/images/0.jpg')
        assert question.count('127.0.0.1:8000') == 1
        answer = json.loads(reader.run(question.replace('127.0.0.1:8000', f'127.0.0.1:{port}')))
        # by default no URL is fetched: a service of the server's own network, a file:// URL: 400, nothing asked
        with image_server(image.parent) as (local, asked):
            base = f'http://127.0.0.1:{port}/v1'
            fetched = completion(base, 'tiny32_internvl', image, f'{local}/0.jpg')
            from_file = completion(base, 'tiny32_internvl', image, f'file://{image}')
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    assert answer['model'] == 'tiny32_internvl' and answer['usage']['completion_tokens'] == 8, answer
    assert fetched == (400, "The URL must be from one of the allowed domains: ['none: images as data URLs only "
                            "(tools/serve.py --allowed-media-domains DOMAIN to fetch from it)']. Input URL "
                            "domain: 127.0.0.1") and asked == []
    check_file_url_refused(from_file)
