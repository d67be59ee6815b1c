"""ConvertedModel on a broken converted folder (a half-written weights file, no weights, no tokenizer files): chat,
eval and the web demo each say in one line which folder and what is wrong, and exit 2, without a traceback."""

import json
import os
import shutil

import pytest

from tests.helpers import converted_tiny_folder, write_image
from xtuner_plugins.launch import free_port


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
    return converted_tiny_folder(tmp_path_factory.mktemp('inference'))


def truncated(path):
    data = open(os.path.join(path, 'model.safetensors'), 'rb').read()
    open(os.path.join(path, 'model.safetensors'), 'wb').write(data[:len(data) // 2])
    return f'model.safetensors: {len(data) // 2} bytes where its header promises {len(data)}: a truncated'


def cut_in_header(path):
    open(os.path.join(path, 'model.safetensors'), 'r+b').truncate(100)
    return 'model.safetensors: 100 bytes, shorter than its own header: a truncated'


def remove(*names, says):
    def breaks(path):
        for name in names:
            os.remove(os.path.join(path, name))
        return says
    return breaks


BROKEN = {
    'truncated_weights': truncated,
    'weights_cut_in_header': cut_in_header,
    'no_weights': remove('model.safetensors', says='no weights (model.safetensors'),
    'no_tokenizer_files': remove('tokenizer.json', 'vocab.json', 'merges.txt', says='no tokenizer files (one of'),
    'tokenizer_half_there': remove('tokenizer.json', 'merges.txt', says='the tokenizer does not load (TypeError'),
}


def tools(tmp_path):
    """Each tool's main and its arguments after the folder."""
    from tools.chat import main as chat_main
    from tools.eval import main as eval_main
    from tools.web_demo import main as web_main
    write_image(tmp_path / 'a.png')
    with open(tmp_path / 'q.jsonl', 'w') as f:
        f.write(json.dumps({'image': 'a.png', 'conversations': [{'from': 'human', 'value': '<image>\nWhat?'},
                                                               {'from': 'gpt', 'value': 'x'}]}) + '\n')
    return {'chat': (chat_main, ['--prompt', 'Hi', '--max-new-tokens', '1']),
            'eval': (eval_main, ['--data', str(tmp_path / 'q.jsonl'), '--max-new-tokens', '1']),
            'web_demo': (web_main, ['--port', str(free_port())])}


@pytest.mark.parametrize('case', sorted(BROKEN))
def test_a_broken_folder_is_one_line(folder, tmp_path, case, capsys):
    broken = str(tmp_path / 'broken')
    shutil.copytree(folder, broken)
    says = BROKEN[case](broken)
    for prog, (main, args) in tools(tmp_path).items():
        assert main([broken, *args]) == 2, prog
        err = capsys.readouterr().err
        assert 'Traceback' not in err, err
        line = err.strip().splitlines()[-1]
        assert line.startswith(f'{prog}: error: {broken}') and says in line, line
        assert 'convert the model again' in line


def test_a_whole_folder_still_loads(folder):
    from xtuner_plugins.models.inference import ConvertedModel, check_folder
    check_folder(folder)
    assert ConvertedModel(folder).ask('Hi', [], dict(max_new_tokens=1, do_sample=False)) is not None
