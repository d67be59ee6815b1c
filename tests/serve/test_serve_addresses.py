"""Where tools/serve.py and tools/web_demo.py listen, and serve's numbers: a port out of range, a host that does not
resolve or is not this machine's, an IPv6 address. Each was a traceback (a port over 65535), "port N on HOST is in
use" (a host name that does not resolve, an address of another machine, any IPv6 address), or a server never found
ready (serve on ::1 asked http://::1:PORT, which is no URL, until --startup-timeout); serve's --images -1 and
--max-model-len 0 went to vLLM, --startup-timeout -1 started it and gave up at once."""

import os
import sys

import pytest

from tests.serve.test_serve import STAND_IN, write_folders
from xtuner_plugins.cli.serve import main as serve_main

NOT_LOCAL = '192.0.2.1'  # TEST-NET-1: documentation only, no machine's address


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
    return write_folders(tmp_path_factory.mktemp('serve_addresses'), ('official',))['official']


@pytest.fixture
def no_server(monkeypatch):
    from xtuner_plugins.cli import serve
    monkeypatch.setattr(serve, 'probe', lambda python: dict(found=True, cpu=None, gpu='0'))
    monkeypatch.setattr(serve.subprocess, 'Popen', lambda *a, **k: pytest.fail('the server was started'))


@pytest.mark.parametrize('main', ['serve', 'web_demo'])
@pytest.mark.parametrize('port', ['70000', '-1', 'x'])
def test_a_port_out_of_range_is_one_argparse_line(folder, capsys, main, port):
    from xtuner_plugins.cli.web_demo import main as web_main
    with pytest.raises(SystemExit) as exit_:
        (serve_main if main == 'serve' else web_main)([folder, '--port', port])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert f"argument --port: '{port}': a port is a whole number from" in err[-1]


def test_the_web_demo_takes_no_port_0(folder, capsys):
    from xtuner_plugins.cli.web_demo import main as web_main
    with pytest.raises(SystemExit):
        web_main([folder, '--port', '0'])  # gradio then calls port 0 and fails after the model loaded
    assert "'0': a port is a whole number from 1 to 65535" in capsys.readouterr().err


@pytest.mark.parametrize('host, says', [('nosuch.invalid', '--host nosuch.invalid is not an address to listen on'),
                                        (NOT_LOCAL, f'cannot listen on --host {NOT_LOCAL} --port ')])
def test_a_host_that_is_not_this_machines_is_named(folder, capsys, no_server, host, says):
    from xtuner_plugins.cli.web_demo import main as web_main
    for main in (serve_main, web_main):
        assert main([folder, '--host', host, '--vllm-python', sys.executable] if main is serve_main
                    else [folder, '--host', host]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and says in err[0] and 'in use' not in err[0], err


def test_the_web_demo_refuses_an_ipv6_address_before_the_model_loads(folder, capsys, monkeypatch):
    from xtuner_plugins.cli import web_demo
    monkeypatch.setattr(web_demo, 'run_tool', lambda *a, **k: pytest.fail('the model was loaded'))
    assert web_demo.main([folder, '--host', '::1', '--port', '7871']) == 2
    assert 'gradio serves on IPv4 addresses and host names only' in capsys.readouterr().err


def test_serve_on_an_ipv6_address_is_found_ready(folder, tmp_path, monkeypatch, capsys):
    package = tmp_path / 'stand_in' / 'vllm' / 'entrypoints' / 'openai'
    package.mkdir(parents=True)
    for part in (package, package.parent, package.parent.parent):
        (part / '__init__.py').write_text('')
    # the stand-in server listens on the address it is given, IPv6 too
    code = STAND_IN.replace('server = HTTPServer(', 'import socket\nHTTPServer.address_family = socket.AF_INET6\n'
                                                     'server = HTTPServer(')
    (package / 'api_server.py').write_text(code)
    monkeypatch.setenv('PYTHONPATH', str(tmp_path / 'stand_in') + os.pathsep + os.environ.get('PYTHONPATH', ''))
    monkeypatch.setenv('STAND_IN_LOG', str(tmp_path / 'argv.json'))
    monkeypatch.delenv('VLLM_HOST_IP', raising=False)
    assert serve_main([folder, '--host', '::1', '--port', '0', '--vllm-python', sys.executable,
                       '--startup-timeout', '30']) == 0, capsys.readouterr().err
    out = capsys.readouterr().out.strip()
    assert out.startswith('ready: http://[::1]:') and out.endswith('/v1 (model official)')


@pytest.mark.parametrize('option, value, says', [
    ('--images', '-1', 'give a whole number, 1 or more'),         # was given to vLLM as {"image": -1}
    ('--max-model-len', '0', 'give a whole number, 1 or more'),   # was given to vLLM
    ('--startup-timeout', '-1', 'give a number of seconds over 0'),  # vLLM was started, then "not ready after -1 s"
    ('--startup-timeout', 'nan', 'give a number of seconds over 0'),
])
def test_serve_numbers_that_mean_nothing_are_refused_at_parsing(folder, capsys, no_server, option, value, says):
    with pytest.raises(SystemExit) as exit_:
        serve_main([folder, option, value, '--vllm-python', sys.executable])
    assert exit_.value.code == 2
    assert f"argument {option}: '{value}': {says}" in capsys.readouterr().err
