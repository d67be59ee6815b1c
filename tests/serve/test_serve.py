"""tools/serve.py without vLLM: the settings it reads from a converted folder, the command it gives vLLM, its
health check before "ready", and the errors (no vLLM: how to install it; a format vLLM does not read).

A stand-in ``vllm`` package (``vllm.entrypoints.openai.api_server`` answering ``/health`` and ``/v1/models``, and
writing down its command line) takes vLLM's place; tests/serve/test_vllm.py serves with vLLM itself."""

import json
import os
import sys
import textwrap

import pytest

from tests.helpers import tiny_workspace
from xtuner_plugins.cli.serve import main as serve_main
from xtuner_plugins.cli.serve_settings import settings
from xtuner_plugins.cli.serve_vllm import NO_LOCAL_MEDIA, NO_REMOTE_MEDIA


def write_folders(root, formats=('official', 'hf')):
    """A tiny InternViT + LLM with 32-wide heads (vLLM's CPU attention takes no narrower), LoRA-trained (every
    trained tensor perturbed), converted to each of ``formats``: ``{format: folder}``."""
    from tests.tools.test_convert_to_official import LORA, convert, options, trained_checkpoint
    from xtuner_plugins.tiny import write_tiny_llm
    tiny = tiny_workspace(os.path.join(str(root), 'tiny'))
    tiny['llm'] = write_tiny_llm(os.path.join(str(root), 'llm'), num_heads=2, num_kv_heads=1)
    opts = options(tiny, **{'model.llm': tiny['llm']})
    ckpt = os.path.join(str(root), 'iter_1.pth')
    trained_checkpoint(LORA, opts, ckpt, scale=0.3)
    return {fmt: convert(LORA, ckpt, os.path.join(str(root), fmt), opts, '--format', fmt) for fmt in formats}


@pytest.fixture(scope='module')
def folders(tmp_path_factory):
    return write_folders(tmp_path_factory.mktemp('serve'), ('official', 'hf', 'remote'))


def test_settings_are_read_from_the_folder(folders, tmp_path):
    from transformers import AutoTokenizer
    for fmt in ('official', 'hf'):
        s = settings(folders[fmt])
        assert (s['format'], s['dtype'], s['max_model_len']) == (fmt, 'float32', 8192)
        # 4 tokens per 56-px tile, 4 tiles + thumbnail: 20 a picture; 8192 // 20 > 8, so the cap
        assert s['images'] == 8
        with open(os.path.join(folders[fmt], 'chat_template.jinja')) as f:
            assert s['chat_template'] == f.read()
    # a system message of our own: the chat template's default becomes it, as the tokenizer renders it
    s = settings(folders['official'], system_message='You are "tiny".\nBe brief.')
    tokenizer = AutoTokenizer.from_pretrained(folders['official'])
    rendered = tokenizer.apply_chat_template([{'role': 'user', 'content': 'Hi'}], chat_template=s['chat_template'],
                                             tokenize=False, add_generation_prompt=True)
    assert rendered.startswith('<|im_start|>system\nYou are "tiny".\nBe brief.<|im_end|>\n<|im_start|>user\nHi')
    # config.json's system_message (vLLM ignores it) wins over a template that says otherwise
    config = json.load(open(os.path.join(folders['official'], 'config.json')))
    json.dump(dict(config, system_message='From the config.'), open(tmp_path / 'config.json', 'w'))
    for name in os.listdir(folders['official']):
        if name != 'config.json':
            os.symlink(os.path.join(folders['official'], name), tmp_path / name)
    assert settings(str(tmp_path))['system_message'] == 'From the config.'
    assert '{% set system = "From the config." %}' in settings(str(tmp_path))['chat_template']


@pytest.mark.parametrize('edit, says', [
    (lambda c: c.update(max_dynamic_patch=None), None),   # null: not recorded (int(None) was a traceback)
    (lambda c: c.update(max_dynamic_patch='many'), "config.json: max_dynamic_patch 'many' is not a whole number"),
    (lambda c: c.update(force_image_size=None) or c['vision_config'].pop('image_size'),
     'config.json: no force_image_size nor vision_config.image_size'),
    (lambda c: c['vision_config'].update(patch_size=0), 'config.json: vision_config.patch_size 0 is not a whole'),
    (lambda c: c.update(downsample_ratio='x'), "config.json: downsample_ratio 'x' is not a number over 0"),
    (lambda c: c['llm_config'].update(num_attention_heads='x'),
     "config.json: llm_config.num_attention_heads 'x' is not a whole number"),
])
def test_a_config_value_that_does_not_read_is_one_line(folders, tmp_path, capsys, edit, says):
    """serve read config.json's numbers as they were: a traceback (TypeError, ZeroDivisionError) for a hand-edited
    one, or 'invalid literal for int()' naming neither file nor key."""
    folder = tmp_path / 'edited'
    folder.mkdir()
    for name in os.listdir(folders['official']):
        if name != 'config.json':
            os.symlink(os.path.join(folders['official'], name), folder / name)
    config = json.load(open(os.path.join(folders['official'], 'config.json')))
    edit(config)
    json.dump(config, open(folder / 'config.json', 'w'))
    if says is None:
        assert settings(str(folder))['format'] == 'official'
        return
    assert serve_main([str(folder), '--vllm-python', '/nonexistent']) == 2
    err = capsys.readouterr().err
    assert 'Traceback' not in err, err
    line = err.strip().splitlines()[-1]
    assert line.startswith(f'serve: error: {folder}/config.json: ') and says in line, line


def test_formats_vllm_does_not_read_and_a_missing_vllm_are_named(folders, capsys):
    assert serve_main([folders['remote']]) == 2
    err = capsys.readouterr().err   # not 'convert again with --format official': refused for such a model
    assert "a 'remote' folder, its own code for a vision tower and projector InternVL's and LLaVA's layouts have no " \
           "place for: vLLM has no architecture for it" in err and 'tools/serve.py serves the official, hf and llava' \
           in err, err
    gguf = folders['official'] + '-gguf-stand-in'   # a GGUF folder: 'no config.json; give a folder written by
    os.makedirs(gguf, exist_ok=True)               # tools/convert_to_official.py', which wrote it
    open(os.path.join(gguf, 'm-F16.gguf'), 'wb').close()
    assert serve_main([gguf]) == 2
    err = capsys.readouterr().err
    assert 'a GGUF folder (--format gguf' in err and 'llama-server' in err, err
    assert serve_main([folders['official'], '--vllm-python', sys.executable]) == 2  # this venv has no vLLM
    err = capsys.readouterr().err
    assert f'vLLM is not installed for {sys.executable}' in err and '`make vllm`' in err and 'pip install vllm' in err
    # a checkpoint: said before its conversion (minutes at real sizes) starts, which here would say it is not there
    assert serve_main(['--checkpoint', 'work_dirs/x/iter_1.pth', '--vllm-python', sys.executable]) == 2
    err = capsys.readouterr().err
    assert f'vLLM is not installed for {sys.executable}' in err and 'not found' not in err, err


STAND_IN = '''
import json, os, sys, threading
from http.server import BaseHTTPRequestHandler, HTTPServer
argv = sys.argv[1:]
with open(os.environ['STAND_IN_LOG'], 'w') as f:
    json.dump(dict(argv=argv, env={k: os.environ.get(k) for k in ('VLLM_HOST_IP', 'VLLM_CPU_KVCACHE_SPACE',
                                                                 'VLLM_MEDIA_URL_ALLOW_REDIRECTS', 'VLLM_API_KEY')},
                   local_media=os.listdir(argv[argv.index('--allowed-local-media-path') + 1])), f)
if os.environ.get('STAND_IN_FAIL'):
    sys.exit(3)
import argparse
parser = argparse.ArgumentParser()   # as vLLM reads them: a value that starts with '-' must follow '='
parser.add_argument('--served-model-name', nargs='+')
parser.add_argument('--model')
known = parser.parse_known_args(argv)[0]
name, root = known.served_model_name[0], known.model
key = argv[argv.index('--api-key') + 1] if '--api-key' in argv else os.environ.get('VLLM_API_KEY')
class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        body = {'/health': b'', '/v1/models': json.dumps({'data': [{'id': name, 'root': root}]}).encode()}.get(
            self.path)
        if key and self.path.startswith('/v1') and self.headers.get('Authorization') != f'Bearer {key}':
            self.send_response(401)   # as vLLM's middleware: /v1 needs the key, /health does not
            self.end_headers()
            return
        self.send_response(200 if body is not None else 404)
        self.end_headers()
        self.wfile.write(body or b'')
        if self.path == '/v1/models':  # the test is over once serve.py said ready (it checks this is still running)
            threading.Timer(3, os._exit, [0]).start()
    def log_message(self, *args):
        pass
server = HTTPServer((argv[argv.index('--host') + 1], int(argv[argv.index('--port') + 1])), Handler)
threading.Timer(60, os._exit, [4]).start()   # not asked within 60 s: exit 4
server.serve_forever()
'''


def stand_in(tmp_path, monkeypatch):
    package = tmp_path / 'stand_in' / 'vllm' / 'entrypoints' / 'openai'
    package.mkdir(parents=True)
    for folder in (package, package.parent, package.parent.parent):
        (folder / '__init__.py').write_text('')
    (package / 'api_server.py').write_text(textwrap.dedent(STAND_IN))
    monkeypatch.setenv('PYTHONPATH', str(tmp_path / 'stand_in') + os.pathsep + os.environ.get('PYTHONPATH', ''))
    monkeypatch.setenv('STAND_IN_LOG', str(tmp_path / 'argv.json'))
    monkeypatch.delenv('VLLM_HOST_IP', raising=False)


def test_the_server_gets_the_folders_settings_and_is_checked_before_ready(folders, tmp_path, monkeypatch, capsys):
    stand_in(tmp_path, monkeypatch)
    assert serve_main([folders['official'], '--port', '0', '--vllm-python', sys.executable, '--images', '2',
                       '--', '--seed', '7']) == 0
    out = capsys.readouterr().out.strip().splitlines()
    seen = json.load(open(tmp_path / 'argv.json'))
    argv = seen['argv']
    port = argv[argv.index('--port') + 1]
    assert out == [f'ready: http://127.0.0.1:{port}/v1 (model official)'] and port != '0'
    given = dict(zip(argv[:-1], argv[1:]))
    assert given['--model'] == os.path.abspath(folders['official']) and given['--host'] == '127.0.0.1'
    assert (given['--dtype'], given['--max-model-len'], given['--limit-mm-per-prompt']) == ('float32', '8192',
                                                                                            '{"image": 2}')
    assert '--trust-remote-code' in argv and argv[-2:] == ['--seed', '7']
    assert seen['env']['VLLM_HOST_IP'] == '127.0.0.1'
    # no image fetched from a URL (a domain no URL has), no redirects, file:// refused with 400 (an empty folder)
    assert given['--allowed-media-domains'] == NO_REMOTE_MEDIA and '/' in NO_REMOTE_MEDIA
    assert seen['env']['VLLM_MEDIA_URL_ALLOW_REDIRECTS'] == '0' and seen['local_media'] == []
    assert os.path.basename(given['--allowed-local-media-path']) == NO_LOCAL_MEDIA
    # the hf format needs no remote code; named domains are passed on
    assert serve_main([folders['hf'], '--port', '0', '--vllm-python', sys.executable, '--allowed-media-domains',
                       'example.com', 'images.example.org']) == 0
    argv = json.load(open(tmp_path / 'argv.json'))['argv']
    assert '--trust-remote-code' not in argv
    at = argv.index('--allowed-media-domains')
    assert argv[at + 1:at + 4] == ['example.com', 'images.example.org', '--allowed-local-media-path']
    # a server that dies is reported, not waited for
    monkeypatch.setenv('STAND_IN_FAIL', '1')
    capsys.readouterr()
    assert serve_main([folders['hf'], '--port', '0', '--vllm-python', sys.executable]) == 2
    assert 'vLLM exited with code 3 before it was ready' in capsys.readouterr().err


def test_a_model_trained_with_another_frame_prefix_is_served_without_videos(folders, tmp_path, monkeypatch, capsys):
    """vLLM writes each video frame after 'Frame{i}: ' whatever the folder records: a model trained with InternVL's
    SFT prefix ('Frame-{i}: ', config.json's frame_prefix) was served videos in another prompt than chat, eval and
    the web demo give it, without a word. Its server takes no video, and says why."""
    stand_in(tmp_path, monkeypatch)
    folder = tmp_path / 'prefixed'
    folder.mkdir()
    config = json.load(open(os.path.join(folders['official'], 'config.json')))
    json.dump(dict(config, frame_prefix='Frame-{i}: '), open(folder / 'config.json', 'w'))
    for name in os.listdir(folders['official']):
        if name != 'config.json':
            os.symlink(os.path.join(folders['official'], name), folder / name)
    assert settings(str(folder))['frame_prefix'] == 'Frame-{i}: ' and settings(folders['official'])['frame_prefix'] \
        is None
    assert serve_main([str(folder), '--port', '0', '--vllm-python', sys.executable, '--images', '2']) == 0
    argv = json.load(open(tmp_path / 'argv.json'))['argv']
    assert json.loads(argv[argv.index('--limit-mm-per-prompt') + 1]) == {'image': 2, 'video': 0}
    assert f"serve: {folder} was trained with each video frame after 'Frame-{{i}}: ' (config.json's frame_prefix), " \
           "and vLLM writes 'Frame{i}: ': videos are refused by this server" in capsys.readouterr().err


def test_a_folder_whose_name_starts_with_a_dash_is_served_under_it(folders, tmp_path, monkeypatch, capsys):
    """The served name defaults to the folder's name; one that starts with '-' reaches vLLM as a value, not as
    an option (vLLM's parser refused '--served-model-name -x')."""
    stand_in(tmp_path, monkeypatch)
    folder = tmp_path / '-x'
    os.symlink(folders['official'], folder)
    assert serve_main([str(folder), '--port', '0', '--vllm-python', sys.executable]) == 0, capsys.readouterr().err
    assert capsys.readouterr().out.strip().endswith('/v1 (model -x)')


def test_heads_vllms_cpu_build_cannot_serve_are_refused_before_it_starts(folders, tmp_path, monkeypatch, capsys):
    """16-wide heads (the demo's default LLM): vLLM's CPU build would start and fail at the first request."""
    from xtuner_plugins.cli import serve
    assert settings(folders['official'])['head_dim'] == settings(folders['hf'])['head_dim'] == 32
    config = json.load(open(os.path.join(folders['official'], 'config.json')))
    config['llm_config']['num_attention_heads'] = 2 * config['llm_config']['num_attention_heads']
    json.dump(config, open(tmp_path / 'config.json', 'w'))
    for name in os.listdir(folders['official']):
        if name != 'config.json':
            os.symlink(os.path.join(folders['official'], name), tmp_path / name)
    assert settings(str(tmp_path))['head_dim'] == 16
    monkeypatch.setattr(serve, 'probe', lambda python: dict(found=True, cpu='0.32.0'))
    monkeypatch.setattr(serve.subprocess, 'Popen', lambda *a, **k: pytest.fail('the server was started'))
    assert serve_main([str(tmp_path), '--port', '0', '--vllm-python', sys.executable]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path}: its LLM's attention heads are 16 wide; vLLM's CPU build takes head sizes 32, 64" in err
    assert '--set llm_heads=2 llm_kv_heads=1' in err
    assert 'tools/make_tiny_models.py --llm-heads 2 --llm-kv-heads 1' in err
    # the demo's closing lines say the same (xtuner_plugins/demo/run.py)
    from xtuner_plugins.demo.run import serving_line
    line = serving_line(str(tmp_path), 'official')
    assert line.startswith('serving: python tools/serve.py ') and "(on a GPU: its LLM's attention heads are 16" in line
    assert serving_line(folders['official'], 'official').endswith(os.path.basename(folders['official']))
    assert serving_line(folders['remote'], 'remote') == ('serving: vLLM does not read the remote layout (it serves '
                                                          'the official, hf and llava layouts)')


class OtherServer:
    """Another server on a port, answering /health and /v1/models as vLLM does, with ``models``' cards."""

    def __init__(self, models):
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                body = {'/health': b'', '/v1/models': json.dumps({'data': models}).encode()}.get(self.path)
                self.send_response(200 if body is not None else 404)
                self.end_headers()
                self.wfile.write(body or b'')

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(('127.0.0.1', 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def test_a_port_another_server_holds_is_refused_and_not_taken_for_ours(folders, monkeypatch, capsys):
    """Its /health and /v1/models would have said ready; vLLM would then die with "Address already in use"."""
    from xtuner_plugins.cli import serve
    other = OtherServer([{'id': 'official', 'root': '/elsewhere/official'}])
    popen = serve.subprocess.Popen
    monkeypatch.setattr(serve, 'probe', lambda python: dict(found=True, cpu='0.32.0'))
    try:
        monkeypatch.setattr(serve.subprocess, 'Popen', lambda *a, **k: pytest.fail('the server was started'))
        assert serve_main([folders['official'], '--port', str(other.port), '--vllm-python', sys.executable]) == 2
        captured = capsys.readouterr()
        assert 'ready' not in captured.out
        assert captured.err.strip() == (f'serve: error: port {other.port} on 127.0.0.1 is in use; give another with '
                                        f'--port (0: any free one)')
        # taken in the moment between that check and vLLM's start (here: a vLLM that has not bound it yet):
        # the other server's model is not taken for ours
        monkeypatch.setattr(serve, 'port_problem', lambda host, port, hint: '')
        monkeypatch.setattr(serve.subprocess, 'Popen', lambda cmd, **k: popen(
            [sys.executable, '-c', 'import time; time.sleep(120)'], **k))
        assert serve_main([folders['official'], '--port', str(other.port), '--vllm-python', sys.executable]) == 2
        captured = capsys.readouterr()
        assert 'ready' not in captured.out
        assert (f"[('official', '/elsewhere/official')], not 'official' from {os.path.abspath(folders['official'])}: "
                'another server answers on that port') in captured.err
    finally:
        other.close()


def test_a_training_checkpoint_is_converted_with_its_recorded_settings_and_served(tmp_path, monkeypatch, capsys):
    """``--checkpoint`` alone: converted (official, bf16) with the config it records, its system message included,
    then served under its work folder's name."""
    import torch

    from tests.tools.test_convert_to_official import LORA, options, trained_checkpoint
    from xtuner_plugins.engine.options import load_config
    from xtuner_plugins.tiny import write_tiny_llm
    tiny = tiny_workspace(tmp_path / 'tiny')
    tiny['llm'] = write_tiny_llm(str(tmp_path / 'llm'), num_heads=2, num_kv_heads=1)
    opts = options(tiny, **{'model.llm': tiny['llm'], 'train_dataloader.dataset.system': 'Be brief.'})
    ckpt = str(tmp_path / 'my_run' / 'iter_1.pth')
    os.makedirs(os.path.dirname(ckpt))
    model = trained_checkpoint(LORA, opts, ckpt)
    state = torch.load(ckpt, weights_only=False)
    state['meta'] = {'cfg': load_config(LORA, opts).pretty_text, 'lineage': model.lineage}
    torch.save(state, ckpt)
    stand_in(tmp_path, monkeypatch)
    seen = {}
    from xtuner_plugins.cli import serve
    real_settings = serve.settings
    monkeypatch.setattr(serve, 'settings', lambda folder, system=None: seen.setdefault('s', real_settings(folder, system)))
    assert serve_main(['--checkpoint', ckpt, '--port', '0', '--vllm-python', sys.executable]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1].endswith('(model my_run)')
    assert (seen['s']['format'], seen['s']['dtype'], seen['s']['system_message']) == ('official', 'bfloat16',
                                                                                     'Be brief.')
    argv = json.load(open(tmp_path / 'argv.json'))['argv']
    assert argv[argv.index('--dtype') + 1] == 'bfloat16'
    assert not os.path.exists(argv[argv.index('--model') + 1])  # the converted folder is removed after
    with pytest.raises(SystemExit):
        serve_main(['--remap', 'a=b', '--port', '0'])
    assert 'give a converted folder or --checkpoint' in capsys.readouterr().err


def test_a_checkpoint_only_the_remote_layout_fits_is_refused_before_it_is_written(tmp_path, monkeypatch, capsys):
    """``--checkpoint`` of an InternViT + LLaVA MLP model (neither official nor llava: the remote layout only): it
    was converted into a temporary folder, then refused naming that folder, deleted by then. Refused once the
    model is built, before anything is written, naming the checkpoint and why each served layout does not fit."""
    import torch

    from tests.tools.test_convert_to_official import LORA, options, trained_checkpoint
    from xtuner_plugins.engine.options import load_config
    tiny = tiny_workspace(tmp_path / 'tiny')
    opts = options(tiny, **{'model.projector': 'mlp'})
    ckpt = str(tmp_path / 'my_run' / 'iter_1.pth')
    os.makedirs(os.path.dirname(ckpt))
    model = trained_checkpoint(LORA, opts, ckpt)
    state = torch.load(ckpt, weights_only=False)
    state['meta'] = {'cfg': load_config(LORA, opts).pretty_text, 'lineage': model.lineage}
    torch.save(state, ckpt)
    stand_in(tmp_path, monkeypatch)
    assert serve_main(['--checkpoint', ckpt, '--port', '0', '--vllm-python', sys.executable]) == 2
    err = capsys.readouterr().err
    assert (f'serve: error: --checkpoint {ckpt}: this model converts to the remote layout only (its own code for a vision '
            'tower and projector') in err
    assert 'not official (projector mlp (InternVL takes pixel_shuffle_mlp)), not llava (encoder internvit (LLaVA ' \
           'takes clip or siglip); image mode tile' in err
    assert 'writing the' not in err and not os.path.exists(tmp_path / 'argv.json')   # nothing written nor served


def test_a_folder_converted_before_templates_wrote_the_bos_gets_it_from_serve(folders, tmp_path, monkeypatch, capsys):
    """A folder of an LLM whose tokenizer adds a bos, converted when templates did not write it: vLLM's chat adds
    no special tokens, so the server gets a copy of the template with the bos in front, and says so."""
    from xtuner_plugins.cli import serve
    from xtuner_plugins.models.export.files import BOS
    from xtuner_plugins.tiny.tokenizer import build_tiny_tokenizer
    for name in os.listdir(folders['official']):
        if not name.startswith(('tokenizer', 'special_tokens', 'vocab', 'merges', 'added_tokens', 'chat_template')):
            os.symlink(os.path.join(folders['official'], name), tmp_path / name)
    build_tiny_tokenizer(bos_token='<|begin_of_text|>').save_pretrained(tmp_path)
    with open(os.path.join(folders['official'], 'chat_template.jinja')) as f:
        older = f.read()
    assert not older.startswith(BOS)
    (tmp_path / 'chat_template.jinja').write_text(older)
    s = settings(str(tmp_path))
    assert s['bos_added'] and s['chat_template'] == BOS + older
    assert not settings(folders['official'])['bos_added']  # a tokenizer without a bos: the template as it is
    (tmp_path / 'chat_template.jinja').write_text(BOS + older)  # converted since: nothing added
    assert settings(str(tmp_path))['chat_template'] == BOS + older
    (tmp_path / 'chat_template.jinja').write_text(older)
    monkeypatch.setattr(serve, 'probe', lambda python: {'cpu': False})
    monkeypatch.setattr(serve, 'vllm_python', lambda given: sys.executable)
    monkeypatch.setattr(serve, 'port_problem', lambda *a, **k: 'stop here')
    assert serve_main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"serve: {tmp_path}'s chat template does not write the bos its tokenizer adds" in err
    assert err.rstrip().endswith('serve: error: stop here')


@pytest.mark.parametrize('extra, says', [
    (['--host', '0.0.0.0'], "--host after --: serve.py sets it for vLLM and checks what it set; use serve.py's --host"),
    (['--port=9001'], "--port=9001 after --: serve.py sets it for vLLM and checks what it set; use serve.py's --port"),
    (['--seed', '1', '--max_model_len', '4'], "--max_model_len after --: serve.py sets it for vLLM and checks what it "
                                              "set; use serve.py's --max-model-len"),
])
def test_an_option_serve_sets_is_refused_after_the_double_dash(tmp_path, capsys, extra, says):
    """vLLM takes the last of two: `-- --host 0.0.0.0` listened on every address while serve's ready line named
    127.0.0.1 (the port checked there); `-- --port 9001` was polled on the other port until the timeout."""
    with pytest.raises(SystemExit) as exit_:
        serve_main([str(tmp_path), '--', *extra])
    assert exit_.value.code == 2 and capsys.readouterr().err.strip().endswith(f'error: {says}')


def test_a_server_given_an_api_key_is_found_ready_and_one_without_on_the_network_warned(folders, tmp_path, monkeypatch,
                                                                                       capsys):
    """vLLM's /v1 answers 401 without the key: a server given one (`-- --api-key K`) was polled until the startup
    timeout and stopped. The key now goes with the check; --api-key-file keeps it off the command line (given to vLLM
    as VLLM_API_KEY) and the printed command shows none; a server for the network without one is warned about."""
    stand_in(tmp_path, monkeypatch)
    monkeypatch.delenv('VLLM_API_KEY', raising=False)
    keyfile = tmp_path / 'key'
    keyfile.write_text('sk-file-123\n')
    base = [folders['hf'], '--port', '0', '--vllm-python', sys.executable, '--startup-timeout', '20']
    assert serve_main(base + ['--api-key-file', str(keyfile)]) == 0
    err = capsys.readouterr().err
    assert json.load(open(tmp_path / 'argv.json'))['env']['VLLM_API_KEY'] == 'sk-file-123'
    assert 'sk-file-123' not in err and 'warning' not in err
    assert serve_main(base + ['--', '--api-key', 'sk-typed-456']) == 0
    err = capsys.readouterr().err
    assert 'sk-typed-456' not in err and "--api-key '***'" in err
    assert serve_main(base[:1] + ['--host', '0.0.0.0'] + base[1:]) == 0
    assert ('serve: warning: --host 0.0.0.0 serves the network without an API key: anyone who reaches port'
            in capsys.readouterr().err)
    keyfile.write_text('\n')
    with pytest.raises(SystemExit):
        serve_main(base + ['--api-key-file', str(keyfile)])
    assert f'--api-key-file {keyfile}: its first line is no key' in capsys.readouterr().err


def llava_folder(root, tower):
    """A tiny LoRA-trained ``tower`` (a tiny CLIP or SigLIP folder) + LLaVA's MLP (one padded tile an image) + the
    32-wide LLM, converted to llava under ``root``."""
    import torch

    from tests.tools.test_convert_to_official import LORA, convert, options, trained_checkpoint
    from xtuner_plugins.engine.options import load_config
    from xtuner_plugins.models.export import build_for_export
    from xtuner_plugins.tiny import write_tiny_llm
    tiny = tiny_workspace(os.path.join(str(root), 'tiny'))
    tiny['llm'] = write_tiny_llm(os.path.join(str(root), 'llm'), num_heads=2, num_kv_heads=1)
    opts = options(tiny, **{'model.llm': tiny['llm'], 'model.vision_encoder': tower, 'model.projector': 'mlp',
                            'model.image_mode': 'pad'})
    probe = build_for_export(load_config(LORA, opts), None, torch.float32, log=lambda m: None)
    opts.update({f'train_dataloader.dataset.{k}': (list(v) if isinstance(v, tuple) else v)
                 for k, v in probe.geometry.items()})
    ckpt = os.path.join(str(root), 'iter_1.pth')
    trained_checkpoint(LORA, opts, ckpt, scale=0.3)
    return convert(LORA, ckpt, os.path.join(str(root), 'llava'), opts, '--format', 'llava')


def test_a_clip_tower_whose_tile_is_no_multiple_of_its_patch_is_refused_before_vllm_starts(tmp_path, monkeypatch,
                                                                                          capsys):
    """A 60 px CLIP tower (14 px patches: its convolution floors to a 4 x 4 grid, which trains, converts and chats):
    vLLM's CLIP asserts image_size % patch_size == 0, so vLLM started, loaded, and exited with a bare
    AssertionError a minute later. It is refused in one line naming the numbers; a 60 px SigLIP tower, whose grid
    vLLM floors as transformers does (SigLIP-384's 27 x 27), is served."""
    from xtuner_plugins.cli import serve
    from xtuner_plugins.tiny.vision import write_tiny_clip, write_tiny_siglip
    clip = llava_folder(tmp_path / 'clip', write_tiny_clip(str(tmp_path / 'clip60'), image_size=60))
    siglip = llava_folder(tmp_path / 'siglip', write_tiny_siglip(str(tmp_path / 'siglip60'), image_size=60))
    assert settings(siglip)['format'] == 'llava'
    monkeypatch.setattr(serve, 'probe', lambda python: dict(found=True, cpu='0.32.0'))
    monkeypatch.setattr(serve.subprocess, 'Popen', lambda *a, **k: pytest.fail('the server was started'))
    assert serve_main([clip, '--port', '0', '--vllm-python', sys.executable]) == 2
    err = capsys.readouterr().err
    assert 'Traceback' not in err, err
    line = err.strip().splitlines()[-1]
    assert line.startswith(f'serve: error: {clip}: its CLIP tower\'s tiles are 60 px, not a multiple of its 14 px '
                           f'patch'), line
    assert '56 or 70' in line, line
