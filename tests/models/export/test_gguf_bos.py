"""The GGUF of an LLM whose tokenizer adds a bos (Llama 3's, with its template; ``.venv-gguf``, ``make gguf``, as
test_gguf.py): llama-cpp-python's chat handler (``MTMDChatHandler``, what tools/chat.py answers a GGUF folder
through) prompts it with the training's ids, the bos once at the very start. llama.cpp adds the bos itself (the
converter writes ``tokenizer.ggml.add_bos_token`` from the tokenizer's post-processor), so the GGUF's chat template
leaves out the ``{{ bos_token }}`` the converted folder's template starts with (``export/gguf.py``'s
``chat_prompt``). About a minute on 2 cores (a tiny model trained one LoRA step and converted twice).
"""

import json
import os
import subprocess

import pytest

from tests.helpers import tiny_workspace
from tests.models.export.test_gguf import convert, gguf_chat_template, need_llama_cpp
from xtuner_plugins.data.template import IGNORE_INDEX
from xtuner_plugins.data.tokenize import tokenize_conversation
from xtuner_plugins.models.export import gguf as gguf_export

pytestmark = pytest.mark.slow

BOS = '<|begin_of_text|>'
QUESTION = 'Describe the image.'

#: run in .venv-gguf: the ids the chat handler evaluates for a text-only question (max_tokens=1: the prompt and
#: the tokens evaluated after it)
ASK = '''
import glob, json, sys
from llama_cpp import Llama
from llama_cpp.llama_chat_format import MTMDChatHandler
folder = sys.argv[1]
model = [p for p in glob.glob(folder + '/*.gguf') if not p.split('/')[-1].startswith('mmproj')][0]
handler = MTMDChatHandler(clip_model_path=glob.glob(folder + '/mmproj*.gguf')[0], verbose=False, use_gpu=False)
llm = Llama(model_path=model, chat_handler=handler, n_ctx=2048, n_gpu_layers=0, verbose=False, seed=0)
llm.create_chat_completion(messages=[{'role': 'user', 'content': sys.argv[2]}], max_tokens=1, temperature=0)
print('RESULT ' + json.dumps(dict(ids=[int(x) for x in llm.input_ids[:llm.n_tokens]],
                                  add_bos=llm.metadata.get('tokenizer.ggml.add_bos_token'))))
'''


def bos_official_folder(root):
    """A tiny InternViT + Llama LLM with Llama 3 Instruct's tokenizer, which adds ``BOS`` (its post-processor),
    trained with its template (``llama3``: the turns between headers, ``<|eot_id|>`` ending each), LoRA-trained one
    step and converted to the official layout."""
    from tests.tools.test_convert_to_official import LORA, convert as convert_checkpoint, options, trained_checkpoint
    from xtuner_plugins.tiny import write_tiny_llm
    tiny = tiny_workspace(os.path.join(str(root), 'tiny'))
    tiny['llm'] = write_tiny_llm(os.path.join(str(root), 'llm'), arch='llama', chat='llama3')
    opts = options(tiny, **{'model.llm': tiny['llm'], 'model.template': 'llama3'})
    ckpt = os.path.join(str(root), 'iter_1.pth')
    trained_checkpoint(LORA, opts, ckpt, scale=0.3)
    return convert_checkpoint(LORA, ckpt, os.path.join(str(root), 'official'), opts)


def test_llama_cpp_prompts_a_bos_llm_with_the_training_ids(tmp_path, capsys):
    from transformers import AutoTokenizer
    need_llama_cpp()
    folder = bos_official_folder(tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    with open(os.path.join(folder, 'chat_template.jinja'), encoding='utf-8') as f:
        assert f.read().startswith('{{ bos_token }}')  # the folder's, for vLLM and transformers
    capsys.readouterr()
    assert convert(folder, tmp_path / 'gguf', '--format', 'gguf', '--quant', 'f32') == 0
    assert 'the chat template without its bos_token (llama.cpp adds the bos itself)' in capsys.readouterr().out
    gguf = str(tmp_path / 'gguf' / 'gguf-F32.gguf')
    assert not gguf_chat_template(gguf).startswith('{{ bos_token }}')
    script = tmp_path / 'ask.py'
    script.write_text(ASK)
    out = subprocess.run([os.path.join(gguf_export.venv(), 'bin', 'python'), str(script), str(tmp_path / 'gguf'),
                          QUESTION], capture_output=True, text=True, timeout=300)
    lines = [line for line in out.stdout.splitlines() if line.startswith('RESULT ')]
    assert out.returncode == 0 and lines, out.stderr[-3000:]
    got = json.loads(lines[-1][len('RESULT '):])
    sample = tokenize_conversation([{'from': 'human', 'value': QUESTION}, {'from': 'gpt', 'value': 'A'}],
                                   tokenizer, [], 'llama3')
    prompt = sample['input_ids'][:next(i for i, x in enumerate(sample['labels']) if x != IGNORE_INDEX)]
    bos = tokenizer.convert_tokens_to_ids(BOS)
    assert prompt[0] == bos and prompt.count(bos) == 1
    assert tokenizer.decode(prompt) == f'{BOS}<|start_header_id|>user<|end_header_id|>\n\n{QUESTION}<|eot_id|>' \
        '<|start_header_id|>assistant<|end_header_id|>\n\n'
    assert got['add_bos'] == 'true' and got['ids'][:len(prompt)] == prompt
