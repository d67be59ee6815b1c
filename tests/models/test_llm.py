"""llm.py: an LLM folder that only its own code loads (InternLM2's ``internlm2``) is refused in one line, before the
vision encoder loads; a folder whose type transformers implements loads whatever its ``auto_map`` says."""

import json
import os
import re
import shutil

import pytest

from tests.models.conftest import build
from tests.train_utils import REPO_ROOT
from xtuner_plugins.errors import Refused


def _with_code(tiny, tmp_path, model_type):
    """The tiny LLM's folder, its config.json naming ``model_type`` and an ``auto_map`` to code in the folder that
    would fail if it ran (InternLM2's layout)."""
    folder = tmp_path / 'llm'
    shutil.copytree(tiny['llm'], folder)
    config = json.loads((folder / 'config.json').read_text())
    config.update(model_type=model_type, auto_map={
        'AutoConfig': 'configuration_own.OwnConfig', 'AutoModelForCausalLM': 'modeling_own.OwnForCausalLM'})
    (folder / 'config.json').write_text(json.dumps(config))
    for name in ('configuration_own.py', 'modeling_own.py'):
        (folder / name).write_text('raise RuntimeError("the folder\'s own code ran")\n')
    return str(folder)


def test_an_llm_only_its_own_code_loads_is_refused_before_the_vision_encoder(tiny, tmp_path, monkeypatch):
    """Before, the vision encoder loaded, then transformers' ValueError ('contains custom code which must be
    executed') ended the run with its traceback."""
    from xtuner_plugins.models import parts
    folder = _with_code(tiny, tmp_path, 'internlm2')
    monkeypatch.setattr(parts, 'build_vision_encoder', lambda *a, **k: pytest.fail('the vision encoder loaded'))
    with pytest.raises(Refused, match=rf"^model.llm: {folder}: its config.json names model_type 'internlm2', which "
                                      r"transformers does not implement: .*trust_remote_code=False.*"
                                      r"tools/convert2llama.py"):
        build(dict(tiny, llm=folder))


def test_an_llm_of_a_type_transformers_implements_loads_whatever_its_auto_map(tiny, tmp_path):
    """Phi-3's folders map to their own code too, for a type transformers implements: its own class loads it."""
    model = build(dict(tiny, llm=_with_code(tiny, tmp_path, 'qwen2')))
    assert type(model.language_model).__name__ == 'Qwen2ForCausalLM'


def test_a_tokenizer_only_its_own_code_loads_is_one_line(tiny, tmp_path):
    from xtuner_plugins.models.llm import load_tokenizer
    folder = tmp_path / 'tokenizer'
    shutil.copytree(tiny['llm'], folder)
    config = json.loads((folder / 'tokenizer_config.json').read_text())
    config.update(tokenizer_class='OwnTokenizer', auto_map={'AutoTokenizer': ['tokenization_own.OwnTokenizer', None]})
    (folder / 'tokenizer_config.json').write_text(json.dumps(config))
    with pytest.raises(Refused, match=rf'^model.tokenizer \(or model.llm\): {folder} is loaded only by its own code'):
        load_tokenizer(str(folder))


CACHED = '''
import json, os, sys
from xtuner_plugins.errors import Refused
from xtuner_plugins.models.llm import check_llm_folder, load_tokenizer
for call in (check_llm_folder, load_tokenizer):
    try:
        call('org/own')
    except Refused as exc:
        print(f'{call.__name__}: {exc}')
'''


def test_a_cache_name_only_its_own_code_loads_is_refused_as_a_folder_is(tiny, tmp_path):
    """Given by its Hugging Face cache name (``org/own``, in the local cache), such a model was said to be 'neither a
    folder nor in the local Hugging Face cache ... download it first', which it was."""
    import os
    import subprocess
    import sys
    hub = tmp_path / 'hub'
    snapshot = hub / 'models--org--own' / 'snapshots' / ('a' * 40)
    snapshot.parent.mkdir(parents=True)
    shutil.copytree(_with_code(tiny, tmp_path, 'internlm2'), snapshot)
    (hub / 'models--org--own' / 'refs').mkdir()
    (hub / 'models--org--own' / 'refs' / 'main').write_text('a' * 40)
    config = json.loads((snapshot / 'tokenizer_config.json').read_text())
    config.update(tokenizer_class='OwnTokenizer', auto_map={'AutoTokenizer': ['tokenization_own.OwnTokenizer', None]})
    (snapshot / 'tokenizer_config.json').write_text(json.dumps(config))
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = subprocess.run([sys.executable, '-c', CACHED], capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, HF_HUB_CACHE=str(hub), HF_HUB_OFFLINE='1', PYTHONPATH=root))
    lines = out.stdout.splitlines()
    assert len(lines) == 2 and 'neither a folder' not in out.stdout, out.stdout + out.stderr
    assert lines[0].startswith("check_llm_folder: model.llm: org/own: its config.json names model_type 'internlm2'")
    assert lines[1].startswith('load_tokenizer: model.tokenizer (or model.llm): org/own is loaded only by its own code')


def test_odd_config_files_and_an_internvl_folder_given_as_the_llm(tiny, tmp_path):
    from xtuner_plugins.models.llm import check_llm_folder
    folder = tmp_path / 'odd'
    folder.mkdir()
    for text in ('[]', '"x"', '{"auto_map": {}}'):   # left to the loading, which says what it is
        (folder / 'config.json').write_text(text)
        check_llm_folder(str(folder))
    (folder / 'config.json').write_text(json.dumps({'auto_map': {'AutoModel': 'm.M'}}))
    with pytest.raises(Refused, match='its config.json names no model_type, which transformers does not'):
        check_llm_folder(str(folder))
    (folder / 'config.json').write_text(json.dumps({'model_type': 'internvl_chat', 'auto_map': {'AutoModel': 'm.M'},
                                                    'vision_config': {}, 'llm_config': {}}))
    with pytest.raises(Refused, match='is an InternVL model, not an LLM: give it as model.official_checkpoint'):
        check_llm_folder(str(folder))
    # an attention-logit cap the attention implementation would drop, read from the text config of a
    # vision-language folder too; without attn (or under eager) not checked
    for config in ({'model_type': 'gemma2', 'attn_logit_softcapping': 50.0},
                   {'model_type': 'gemma3',
                    'text_config': {'model_type': 'gemma3_text', 'attn_logit_softcapping': 50.0}}):
        (folder / 'config.json').write_text(json.dumps(config))
        with pytest.raises(Refused, match=r"attn_logit_softcapping 50.0\), which attn_implementation='sdpa' does"):
            check_llm_folder(str(folder), attn='sdpa')
        check_llm_folder(str(folder))
        check_llm_folder(str(folder), attn='eager')


def _gemma3_vlm(folder):
    """A tiny Gemma 3 vision-language folder (``Gemma3ForConditionalGeneration``: gemma-3-4b-it's layout, a SigLIP
    tower and its projector beside the language model), with the tiny ChatML tokenizer."""
    import torch
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3TextConfig, SiglipVisionConfig

    from xtuner_plugins.tiny import build_tiny_tokenizer
    tokenizer = build_tiny_tokenizer(add_internvl_tokens=False)
    torch.manual_seed(0)
    config = Gemma3Config(
        text_config=Gemma3TextConfig(vocab_size=len(tokenizer) + 32, hidden_size=64, intermediate_size=128,
                                     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16),
        vision_config=SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, image_size=56, patch_size=14), mm_tokens_per_image=4)
    vlm = Gemma3ForConditionalGeneration(config)
    vlm.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return vlm


def _relaid(folder, old, new):
    """The folder's weights with ``old`` renamed ``new`` in every key."""
    from safetensors.torch import load_file, save_file
    path = str(folder / 'model.safetensors')
    save_file({k.replace(old, new): v for k, v in load_file(path).items()}, path, metadata={'format': 'pt'})


@pytest.mark.parametrize('layout', ['4.x', '5.x'])
def test_a_vision_language_folder_given_as_the_llm_trains_its_language_model(tiny, tmp_path, monkeypatch, layout):
    """gemma-3-4b-it and up are Gemma3ForConditionalGeneration folders, which AutoModelForCausalLM loads whole: the
    run ended in an AttributeError ('Gemma3Config' object has no attribute 'hidden_size') after loading it all. Its
    language model loads alone, as Gemma3ForCausalLM, with the folder's weights (the same text logits), said once;
    from transformers 4.x's layout (``language_model.model.*``) and 5.x's (``model.language_model.*``)."""
    import torch

    from xtuner_plugins.models import llm as llm_module
    said = []
    monkeypatch.setattr(llm_module, 'print_log', lambda line, **kw: said.append(line))
    vlm = _gemma3_vlm(tmp_path / 'gemma3')
    if layout == '5.x':
        _relaid(tmp_path / 'gemma3', 'language_model.model.', 'model.language_model.')
    model = build(dict(tiny, llm=str(tmp_path / 'gemma3')))
    llm = model.language_model
    assert type(llm).__name__ == 'Gemma3ForCausalLM'
    assert [line for line in said if 'vision-language' in line] == [
        f'model.llm: {tmp_path / "gemma3"} holds a vision-language model (model_type \'gemma3\', '
        'Gemma3ForConditionalGeneration): its language model is loaded alone as Gemma3ForCausalLM; its vision tower '
        'and projector are left out']
    ids = torch.arange(3, 40)[None]
    with torch.no_grad():
        expected = vlm(input_ids=ids).logits[..., :-32]   # the tokenizer's rows (the padding rows cut off)
        got = llm(input_ids=ids).logits[..., :expected.shape[-1]]   # (InternVL's tokens after them)
    torch.testing.assert_close(got, expected)


def test_a_vision_language_folder_whose_language_weights_are_elsewhere_is_refused(tiny, tmp_path):
    """A layout whose keys the text class does not read (here ``text_model.*``) is refused naming a missing weight,
    where it would have trained a language model of random weights."""
    _gemma3_vlm(tmp_path / 'gemma3')
    _relaid(tmp_path / 'gemma3', 'language_model.model.', 'text_model.')
    with pytest.raises(Refused, match=r"model.llm: .*gemma3 holds a vision-language model \(model_type 'gemma3', "
                                      r"Gemma3ForConditionalGeneration\), and its language model's weights are not "
                                      r"where Gemma3ForCausalLM reads them \(\d+ missing, e.g. model\."):
        build(dict(tiny, llm=str(tmp_path / 'gemma3')))


def test_an_encoder_given_as_the_llm_is_refused_in_training_and_the_planner(tmp_path, capsys):
    """A BERT folder as model.llm: AutoModelForCausalLM loaded it (BertLMHeadModel, with a warning) and the planner
    planned it without a word. Its decoder form (is_decoder) and a decoder LLM go on."""
    from xtuner_plugins.cli import plan
    from xtuner_plugins.models.llm import check_llm_folder
    folder = tmp_path / 'bert'
    folder.mkdir()
    config = {'model_type': 'bert', 'architectures': ['BertForMaskedLM'], 'hidden_size': 64,
              'num_hidden_layers': 2, 'num_attention_heads': 4, 'intermediate_size': 128, 'vocab_size': 100}
    (folder / 'config.json').write_text(json.dumps(config))
    says = (f"model.llm: {folder}: model_type 'bert' is an encoder (BertForMaskedLM), whose attention reads the text "
            "both ways, not a causal LLM that writes answers")
    with pytest.raises(Refused, match='^' + re.escape(says)):
        check_llm_folder(str(folder))
    assert plan.main([os.path.join(REPO_ROOT, 'configs', 'finetune_lora.py'), '--gpus', '1', '--gpu-mem', '24',
                      '--vision', 'internvit-300m', '--llm', str(folder)]) == 2
    assert capsys.readouterr().err == f'plan: error: {says}; use a decoder LLM (Qwen2.5, Qwen3, Llama, Phi-3, ...: ' \
                                      'docs/families.md)\n'
    for decoder in ({'model_type': 'bert', 'is_decoder': True}, {'model_type': 'qwen2'}):
        (folder / 'config.json').write_text(json.dumps(decoder))
        check_llm_folder(str(folder))


@pytest.mark.parametrize('model_type, architecture', [('qwen2_5_vl', 'Qwen2_5_VLForConditionalGeneration'),
                                                      ('mistral3', 'Mistral3ForConditionalGeneration'),
                                                      ('llava', 'LlavaForConditionalGeneration')])
def test_a_vision_language_folder_without_a_causal_lm_of_its_type_is_refused_in_one_line(tmp_path, model_type,
                                                                                      architecture):
    """transformers' refusal was a ValueError listing over 100 configuration classes, after the vision encoder
    loaded (found by a helper's sweep); Gemma 3's loads its language model (the tests above)."""
    from xtuner_plugins.models.llm import check_llm_folder
    (tmp_path / 'config.json').write_text(json.dumps({'model_type': model_type, 'architectures': [architecture],
                                                      'vision_config': {}, 'text_config': {}}))
    with pytest.raises(Refused, match=rf'^model.llm: {tmp_path}: a vision-language model \({architecture}\), whose '
                                      r'language model does not load here alone; give the folder of its text LLM'):
        check_llm_folder(str(tmp_path))


@pytest.mark.parametrize('attn', ['sdpa_segments', 'sdpa_varlen'])
def test_an_llm_without_transformers_attention_interface_is_refused_packed_attention(tmp_path, attn):
    """StableLM, Nemotron and Falcon pick their attention class by name: sdpa_segments was a KeyError traceback
    once both models had loaded (found by a helper's sweep). 'sdpa' goes on, as does a Llama under either."""
    from xtuner_plugins.models.llm import check_llm_folder
    (tmp_path / 'config.json').write_text(json.dumps({'model_type': 'stablelm'}))
    with pytest.raises(Refused, match=rf"^model.attn_implementation='{attn}': StableLmForCausalLM takes no attention "
                                      r"but its own .*set model.attn_implementation='sdpa'"):
        check_llm_folder(str(tmp_path), attn=attn)
    check_llm_folder(str(tmp_path), attn='sdpa')
    (tmp_path / 'config.json').write_text(json.dumps({'model_type': 'llama'}))
    check_llm_folder(str(tmp_path), attn=attn)
    (tmp_path / 'config.json').write_text(json.dumps({'model_type': 'bloom'}))   # no SDPA at all
    with pytest.raises(Refused, match=r"^model.attn_implementation='sdpa': BloomForCausalLM has no SDPA attention in "
                                      r"transformers; set model.attn_implementation='eager'$"):
        check_llm_folder(str(tmp_path), attn='sdpa')
    check_llm_folder(str(tmp_path), attn='eager')

