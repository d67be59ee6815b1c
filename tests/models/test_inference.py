"""ConvertedModel on a broken converted folder (a half-written weights file, no weights, no tokenizer files) or a
training config + checkpoint that does not convert: chat, eval and the web demo each say in one line what is wrong,
and exit 2, without a traceback. A prompt over the LLM's context is refused with both numbers; generation stops
after a run of whitespace-only tokens."""

import json
import math
import os
import shutil

import pytest
import torch

from tests.helpers import lora_trained_tiny, write_image, write_video
from tests.tools.test_convert_to_official import FULL, LORA, as_args, convert
from xtuner_plugins.launch import free_port
from xtuner_plugins.models.prompt import BLANK_RUN, BlankRun, PromptTooLong


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    return lora_trained_tiny(tmp_path_factory.mktemp('inference'))


@pytest.fixture(scope='module')
def folder(trained):
    return convert(LORA, trained['ckpt'], os.path.join(os.path.dirname(trained['ckpt']), 'official'), trained['opts'])


@pytest.fixture(scope='module')
def hf_folder(trained):
    return convert(LORA, trained['ckpt'], os.path.join(os.path.dirname(trained['ckpt']), 'hf'), trained['opts'],
                   '--format', 'hf')


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


def rewrite(name, text, says):
    def breaks(path):
        with open(os.path.join(path, name), 'w') as f:
            f.write(text)
        return says
    return breaks


def edit_weights(edit, says):
    """The weights file rewritten by ``edit`` (its tensors by name): loaded as it is, a tensor the model has and the
    file lacks would be random (transformers only warns), one the file has and the model lacks dropped."""
    def breaks(path):
        from safetensors.torch import load_file, save_file
        tensors = load_file(os.path.join(path, 'model.safetensors'))
        edit(tensors)
        save_file(tensors, os.path.join(path, 'model.safetensors'), metadata={'format': 'pt'})
        return says
    return breaks


def index_to(name, says):
    """The weights moved to ``name`` (relative to the folder; ``None``: an absolute path beside it) and an index
    mapping every tensor there."""
    def breaks(path):
        from safetensors import safe_open
        shard = name or os.path.join(os.path.dirname(path), 'elsewhere.safetensors')
        weights = os.path.join(path, 'model.safetensors')
        with safe_open(weights, framework='pt') as f:
            keys = list(f.keys())
        shutil.move(weights, os.path.join(path, shard))
        with open(os.path.join(path, 'model.safetensors.index.json'), 'w') as f:
            json.dump({'metadata': {}, 'weight_map': {k: shard for k in keys}}, f)
        return says
    return breaks


def edit_config(edit, says):
    """config.json changed by ``edit`` (a hand-edited or tampered file): a traceback from inside the model's code
    before."""
    def breaks(path):
        with open(os.path.join(path, 'config.json')) as f:
            config = json.load(f)
        edit(config)
        with open(os.path.join(path, 'config.json'), 'w') as f:
            json.dump(config, f)
        return says
    return breaks


BROKEN = {
    'a_tensor_missing': edit_weights(lambda t: t.pop('mlp1.0.bias'), 'its weights do not fit its config.json: 1 '
                                     'tensors of the model its config.json describes are not in its weights '
                                     '(mlp1.0.bias)'),
    'a_tensor_not_the_models': edit_weights(lambda t: t.update({'mlp1.9.weight': torch.zeros(2)}),
                                            '1 tensors in its weights are not the model\'s (mlp1.9.weight)'),
    'a_tensor_of_another_shape': edit_config(  # the embedding's rows: the weights' are 8 fewer
        lambda c: c['llm_config'].update(vocab_size=c['llm_config']['vocab_size'] + 8),
        'the model does not load (RuntimeError: Error(s) in loading state_dict for'),
    'an_unknown_template': edit_config(lambda c: c.update(template='nope'),
                                       'the model does not load (KeyError: "unknown conversation template \'nope\''),
    'a_downsample_ratio_of_0': edit_config(lambda c: c.update(downsample_ratio=0),
                                           'the model does not load (ZeroDivisionError: division by zero)'),
    # without a part's config its config class built a default 7B-class LLM (chat, eval and the web demo took all
    # the memory there was)
    'no_llm_config': edit_config(lambda c: c.pop('llm_config'), 'config.json: its "llm_config" is missing, where an '
                                 'official folder'),
    'an_llm_config_without_its_type': edit_config(lambda c: c['llm_config'].pop('model_type'),
                                                  'its "llm_config" is {'),
    'an_empty_vision_config': edit_config(lambda c: c.update(vision_config={}), 'its "vision_config" is {}, where'),
    'a_context_not_a_number': edit_config(lambda c: c['llm_config'].update(max_position_embeddings='x'),
                                          "config.json: llm_config.max_position_embeddings 'x' is not a number of "
                                          'tokens (a whole number, 1 or more)'),
    'tokenizer_json_not_a_tokenizer': rewrite('tokenizer.json', '{"version": "1.0", "model": {"type": "Nope"}}',
                                              says='the tokenizer does not load (Exception: data did not match any '
                                                   'variant'),  # the tokenizers library's bare Exception
    # the tiling's numbers: 'invalid literal for int()', naming neither file nor key, and a traceback for null
    'a_max_dynamic_patch_not_a_number': edit_config(lambda c: c.update(max_dynamic_patch='many'),
                                                    "config.json: max_dynamic_patch 'many' is not a whole number, 1 "
                                                    'or more'),
    'a_min_dynamic_patch_of_0': edit_config(lambda c: c.update(min_dynamic_patch=0),
                                            'config.json: min_dynamic_patch 0 is not a whole number, 1 or more'),
    'a_tile_size_not_a_number': edit_config(lambda c: c.update(force_image_size='big'),
                                            "config.json: force_image_size 'big' is not a whole number, 1 or more"),
    'truncated_weights': truncated,
    'weights_cut_in_header': cut_in_header,
    'no_weights': remove('model.safetensors', says='no weights (model.safetensors'),
    'no_tokenizer_files': remove('tokenizer.json', 'vocab.json', 'merges.txt', says='no tokenizer files (one of'),
    'tokenizer_half_there': remove('tokenizer.json', 'merges.txt', says='the tokenizer does not load (TypeError'),
    # transformers then took the tokenizer from config.json's model_type: a line of 4,000 characters naming every
    # config class (official, remote), a traceback (llava: LLaVA's default LlamaTokenizerFast, ids past the rows)
    'no_tokenizer_config': remove('tokenizer_config.json', says='no tokenizer_config.json (the tokenizer\'s class '
                                  'and special tokens)'),
    # an index naming a file outside the folder (a tampered or hand-edited one): transformers read it from there
    'an_index_naming_a_file_outside': index_to('../elsewhere.safetensors', says='model.safetensors.index.json: it '
                                               'names ../elsewhere.safetensors as a weight file, not a file of this '
                                               'folder'),
    'an_index_naming_an_absolute_path': index_to(None, says='model.safetensors.index.json: it names /'),
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


def test_a_checkpoint_file_given_as_the_folder_says_to_convert_it(tmp_path, capsys):
    """It said 'no such folder', read as a wrong path."""
    ckpt = tmp_path / 'iter_2.pth'
    torch.save({'meta': {}, 'state_dict': {}}, ckpt)
    for prog, (main, args) in tools(tmp_path).items():
        assert main([str(ckpt), *args]) == 2, prog
        line = capsys.readouterr().err.strip().splitlines()[-1]
        assert line == (f'{prog}: error: {ckpt} is a file, not a model folder; give a folder written by '
                        f'tools/convert_to_official.py (convert a training checkpoint first: python '
                        f'tools/convert_to_official.py {ckpt} OUT_DIR)'), line


@pytest.mark.parametrize('name, says', [
    ('processor_config.json', 'no processor_config.json (the image tokens per image'),
    ('preprocessor_config.json', 'no preprocessor_config.json (the image processor\'s settings'),
    ('chat_template.jinja', 'no chat template (chat_template.jinja, or one in tokenizer_config.json)'),
])
def test_an_hf_folder_without_its_processor_files_is_one_line(hf_folder, tmp_path, capsys, name, says):
    """Without processor_config.json the processor took transformers' default of 256 tokens an image and the
    first question failed ('Image features and image tokens do not match: tokens: 256, features 4'); without the
    chat template, a line naming no folder."""
    broken = str(tmp_path / 'broken')
    shutil.copytree(hf_folder, broken)
    os.remove(os.path.join(broken, name))
    for prog, (main, args) in tools(tmp_path).items():
        assert main([broken, *args]) == 2, prog
        line = capsys.readouterr().err.strip().splitlines()[-1]
        assert line.startswith(f'{prog}: error: {broken}: {says}') and 'convert the model again' in line, line


def test_a_tokenizer_of_another_model_is_one_line(trained, folder, tmp_path, capsys):
    """The LLM's own tokenizer copied in (no InternVL image tokens) said 'set model.img_context_token_id ...',
    naming no file; a tokenizer of more tokens than the embedding's rows failed mid-answer (IndexError)."""
    from transformers import AutoTokenizer
    other, bigger = str(tmp_path / 'other'), str(tmp_path / 'bigger')
    for copy in (other, bigger):
        shutil.copytree(folder, copy)
    for name in ('tokenizer.json', 'tokenizer_config.json', 'added_tokens.json', 'special_tokens_map.json'):
        os.remove(os.path.join(other, name))
    AutoTokenizer.from_pretrained(trained['tiny']['llm']).save_pretrained(other)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.add_tokens(['<extra_1>', '<extra_2>'])
    tokenizer.save_pretrained(bigger)
    says = {other: "its tokenizer has no <img>, </img>, <IMG_CONTEXT> (InternVL's image tokens): a tokenizer of "
                   'another model?',
            bigger: f'its tokenizer has {len(tokenizer)} tokens, its model\'s embedding {len(tokenizer) - 2} rows'}
    for path, why in says.items():
        for prog, (main, args) in tools(tmp_path).items():
            assert main([path, *args]) == 2, prog
            line = capsys.readouterr().err.strip().splitlines()[-1]
            assert line.startswith(f'{prog}: error: {path}: {why}') and 'convert the model again' in line, line


def test_code_not_ours_is_not_run_unless_trusted(folder, hf_folder, tmp_path, capsys):
    """chat, eval, the web demo and serve load an official folder with its own Python files (trust_remote_code):
    a folder from someone else ran whatever they hold. Files other than this project's, byte for byte, are refused
    before anything is imported, unless --trust-remote-code."""
    from tools.chat import main as chat_main
    from tools.serve import main as serve_main
    marker = tmp_path / 'ran'
    changed, added, remote, linked, pathlike = (str(tmp_path / name) for name in (
        'changed', 'added', 'remote_map', 'linked', 'pathlike'))
    for copy in (changed, added, remote, linked, pathlike):
        shutil.copytree(folder, copy)
    # code in a folder reached through a symbolic link (os.walk did not follow it; transformers does), named by
    # an auto_map entry with a path; and a path-like entry to a file beside the folder
    payload = tmp_path / 'payload'
    payload.mkdir()
    (payload / 'evil.py').write_text(f'open({str(marker)!r}, "w").write("ran")\n')
    os.symlink(payload, os.path.join(linked, 'sub'))
    os.symlink(linked, os.path.join(linked, 'loop'))   # a link back to the folder: read once, no endless walk
    for path, entry in ((linked, 'sub/evil.InternVLChatConfig'), (pathlike, '../payload/evil.InternVLChatConfig')):
        with open(os.path.join(path, 'config.json')) as f:
            cfg = json.load(f)
        cfg['auto_map']['AutoConfig'] = entry
        with open(os.path.join(path, 'config.json'), 'w') as f:
            json.dump(cfg, f)
    with open(os.path.join(changed, 'modeling_internvl_chat.py'), 'a') as f:
        f.write(f'\nopen({str(marker)!r}, "w").write("ran")\n')
    with open(os.path.join(added, 'tokenization_x.py'), 'w') as f:
        f.write(f'open({str(marker)!r}, "w").write("ran")\n')
    with open(os.path.join(remote, 'tokenizer_config.json')) as f:
        tok = json.load(f)
    tok['auto_map'] = {'AutoTokenizer': ['someone/repo--tokenization_x.XTokenizer', None]}
    with open(os.path.join(remote, 'tokenizer_config.json'), 'w') as f:
        json.dump(tok, f)
    says = {changed: f'{changed}/modeling_internvl_chat.py differs from this project\'s modeling_internvl_chat.py',
            added: f'{added}/tokenization_x.py is code this project does not ship in a converted folder',
            remote: f'{remote}/tokenizer_config.json\'s auto_map names code in another repository',
            linked: f'{linked}/sub/evil.py is code this project does not ship in a converted folder',
            pathlike: f'{pathlike}/config.json\'s auto_map names \'../payload/evil.InternVLChatConfig\': not a class '
                      'of a module at the folder\'s top level (module.Class), where a converted folder\'s code is'}
    for path, why in says.items():
        for prog, (main, args) in tools(tmp_path).items():
            assert main([path, *args]) == 2, prog
            line = capsys.readouterr().err.strip().splitlines()[-1]
            assert line == (f'{prog}: error: {path}: loading it would run Python code that is not this project\'s '
                             f'({why}); read them, then pass --trust-remote-code to run them; or convert the model '
                             f'again with this project\'s tools/convert_to_official.py'), line
        assert serve_main([path, '--vllm-python', '/nonexistent']) == 2
        assert why in capsys.readouterr().err
    assert not marker.exists()
    assert chat_main([changed, '--trust-remote-code', '--prompt', 'Hi', '--max-new-tokens', '1']) == 0
    assert marker.read_text() == 'ran'
    # this project's own folders (official, and hf, whose .py files nothing runs) load as before
    from xtuner_plugins.models.folder import foreign_code
    assert foreign_code(folder) is None and foreign_code(hf_folder) is None


def test_an_hf_folders_code_is_not_run_unless_trusted(hf_folder, tmp_path, capsys):
    """An hf (or llava) folder was loaded without the check: transformers imports a local folder's
    custom_generate/generate.py whatever trust_remote_code says (it ran when chat, eval and the web demo loaded
    it), and asks 'run the custom code? [y/N]' on stdin for a tokenizer auto_map."""
    from tools.serve import main as serve_main
    marker = tmp_path / 'ran'
    generate, mapped = str(tmp_path / 'generate'), str(tmp_path / 'mapped')
    for copy in (generate, mapped):
        shutil.copytree(hf_folder, copy)
    os.makedirs(os.path.join(generate, 'custom_generate'))
    with open(os.path.join(generate, 'custom_generate', 'generate.py'), 'w') as f:
        f.write(f'open({str(marker)!r}, "w").write("ran")\n')
    with open(os.path.join(mapped, 'evil_tok.py'), 'w') as f:
        f.write(f'open({str(marker)!r}, "w").write("ran")\n')
    with open(os.path.join(mapped, 'tokenizer_config.json')) as f:
        tok = json.load(f)
    tok['auto_map'] = {'AutoTokenizer': [None, 'evil_tok.EvilTokenizer']}
    with open(os.path.join(mapped, 'tokenizer_config.json'), 'w') as f:
        json.dump(tok, f)
    says = {generate: f'{generate}/custom_generate/generate.py is code this project does not ship in a converted '
                      'folder',
            mapped: f'{mapped}/evil_tok.py is code this project does not ship in a converted folder'}
    for path, why in says.items():
        for prog, (main, args) in tools(tmp_path).items():
            assert main([path, *args]) == 2, prog
            line = capsys.readouterr().err.strip().splitlines()[-1]
            assert line.startswith(f'{prog}: error: {path}: loading it would run Python code that is not this '
                                   f'project\'s ({why}); read them, then pass --trust-remote-code'), line
        assert serve_main([path, '--vllm-python', '/nonexistent']) == 2
        assert why in capsys.readouterr().err
    assert not marker.exists()


def test_a_whole_folder_still_loads(folder):
    from xtuner_plugins.models.inference import ConvertedModel, check_folder
    check_folder(folder)
    assert ConvertedModel(folder).ask('Hi', [], dict(max_new_tokens=1, do_sample=False)) is not None


@pytest.mark.parametrize('fmt', ['official', 'remote'])
def test_a_bf16_folder_loads_whole_in_the_dtype_asked(trained, tmp_path, fmt):
    """A folder converted in bf16 (the converter's default), loaded in fp32 (chat's --dtype fp32, and auto's choice
    on most CPUs): every weight fp32. Before, the remote code built its LLM (and a remote folder its tower) from
    the sub-configs' recorded dtype, so those ran in bf16 beside an fp32 projector, and a CLIP + MLP model's remote
    folder answered otherwise than its llava folder and its checkpoint."""
    from xtuner_plugins.models.inference import ConvertedModel
    out = convert(LORA, trained['ckpt'], tmp_path / fmt, trained['opts'], '--dtype', 'bf16', '--format', fmt)
    for dtype in (torch.float32, torch.bfloat16):
        model = ConvertedModel(out, dtype=dtype).model
        kinds = {}
        for name, p in model.named_parameters():
            kinds.setdefault(str(p.dtype), name)
        assert list(kinds) == [str(dtype)], (dtype, kinds)


def test_tiling_numbers_of_null_are_taken_as_not_recorded(folder, tmp_path):
    """A config.json whose max_dynamic_patch and min_dynamic_patch are null (a hand-edited file): their defaults,
    as when they are left out (int(None) was a traceback)."""
    from xtuner_plugins.models.inference import ConvertedModel
    edited = str(tmp_path / 'edited')
    shutil.copytree(folder, edited)
    edit_config(lambda c: c.update(max_dynamic_patch=None, min_dynamic_patch=None), '')(edited)
    assert (ConvertedModel(edited).tiling['max_num'], ConvertedModel(edited).tiling['min_num']) == (12, 1)


# ------------------------------------------------------------------ a config + checkpoint that does not convert
def stage_with_lineage(trained, tmp_path):
    """A LoRA checkpoint recording a previous stage (a warm-up checkpoint), as training writes it; its path and
    the warm-up's."""
    from xtuner_plugins.engine.options import load_config
    from xtuner_plugins.models.export import build_for_export
    warm = str(tmp_path / 'warm.pth')   # a warm-up: the projector
    torch.save({'meta': {}, 'state_dict': {k: v for k, v in trained['model'].state_dict().items()
                                           if k.startswith('mlp1.')}}, warm)
    opts = dict(trained['opts'], **{'model.pretrained_pth': warm})
    model = build_for_export(load_config(LORA, opts), None, torch.float32, log=lambda m: None)
    torch.save({'meta': {'lineage': model.lineage}, 'state_dict': model.state_dict()}, tmp_path / 'sft.pth')
    return str(tmp_path / 'sft.pth'), warm


@pytest.mark.parametrize('case', ['checkpoint_missing', 'previous_stage_gone', 'another_config', 'a_converted_folder'])
def test_a_model_that_does_not_convert_is_one_line(trained, folder, tmp_path, case, capsys):
    """tools/convert_to_official.py's one-line errors, from chat, eval and the web demo given --config."""
    config, ckpt, says = LORA, trained['ckpt'], None
    if case == 'checkpoint_missing':
        ckpt, says = str(tmp_path / 'iter_9.pth'), f'checkpoint not found: {tmp_path}/iter_9.pth'
    elif case == 'previous_stage_gone':
        ckpt, warm = stage_with_lineage(trained, tmp_path)
        os.remove(warm)
        says = f'{warm}: the previous stage of {ckpt} (recorded in it, at {warm}) is not found'
    elif case == 'a_converted_folder':  # read as a DeepSpeed folder: '... records no training config'
        ckpt, says = folder, (f'{folder} is a model folder (it has a config.json), not a training checkpoint: a '
                              'converted one is given as the folder itself (chat.py FOLDER, eval.py FOLDER, serve.py '
                              'FOLDER), not as --checkpoint; a source model (an LLM, a vision encoder) is '
                              'trained first')
    else:
        config, says = FULL, 'trained parameters of this config are missing from the checkpoint'
    for prog, (main, args) in tools(tmp_path).items():
        assert main(['--config', config, '--checkpoint', ckpt, *as_args(trained['opts']), *args]) == 2, prog
        err = capsys.readouterr().err
        assert 'Traceback' not in err, err
        line = err.strip().splitlines()[-1]
        assert line.startswith(f'{prog}: error: ') and says in line, line


def test_the_checkpoint_alone_is_enough_for_chat_and_eval(trained, folder, tmp_path, capsys):
    """``--checkpoint`` without ``--config``: the settings the checkpoint records, the same answers as the folder
    converted from it; options on top that disagree with them are refused."""
    from xtuner_plugins.engine.options import load_config
    ckpt = str(tmp_path / 'iter_1.pth')
    state = torch.load(trained['ckpt'], weights_only=False)  # what training records beside the tensors
    state['meta'] = {'cfg': load_config(LORA, trained['opts']).pretty_text, 'lineage': trained['model'].lineage}
    torch.save(state, ckpt)
    chat_main, chat_args = tools(tmp_path)['chat']
    question = ['--image', str(tmp_path / 'a.png'), '--prompt', 'What is it?', '--max-new-tokens', '6']
    assert chat_main([folder, *question]) == 0
    from_folder = capsys.readouterr().out.strip().splitlines()[-1]
    assert chat_main(['--checkpoint', ckpt, *question]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == from_folder
    eval_main, eval_args = tools(tmp_path)['eval']
    assert eval_main(['--checkpoint', ckpt, *eval_args, '--out', str(tmp_path / 'r.json')]) == 0
    assert len(json.load(open(tmp_path / 'r.json'))['results']) == 1
    assert chat_main(['--checkpoint', ckpt, *question, '--cfg-options', 'model.llm_lora.r=8']) == 2
    assert 'model.llm_lora.r: trained 16, given 8' in capsys.readouterr().err
    with pytest.raises(SystemExit):  # a config alone names no trained weights
        chat_main(['--config', LORA, *question])
    assert '--config, --cfg-options and --remap go with --checkpoint' in capsys.readouterr().err


# ------------------------------------------------------------------ the LLM's context
def prompt_lengths(model, turns, generation):
    """The prompt lengths the model's generate is given for each turn of one conversation."""
    seen, net = [], model.model
    generate = net.generate

    def spy(*args, **kwargs):
        ids = kwargs.get('input_ids', args[1] if len(args) > 1 else None)
        seen.append(ids.shape[1])
        return generate(*args, **kwargs)

    net.generate = spy
    try:
        for question, images in turns:
            model.ask(question, images, dict(generation))
    finally:
        del net.generate
    model.reset()
    return seen


@pytest.mark.parametrize('fmt', ['official', 'hf'])
def test_the_context_check_counts_the_prompt_the_model_is_given(folder, hf_folder, tmp_path, fmt):
    """Prompt + max_new_tokens equal to the context is answered; one token more is refused, naming the prompt's
    length (the model's own, two turns with an image) and what to lower."""
    from xtuner_plugins.models.inference import ConvertedModel
    image = write_image(tmp_path / 'a.png', size=(120, 60))
    model = ConvertedModel(folder if fmt == 'official' else hf_folder)
    assert model.context == (8192, f'{model.folder}/config.json '
                                   f'{"llm_config" if fmt == "official" else "text_config"}.max_position_embeddings')
    turns, generation = [('Describe the image.', [image]), ('And now?', [])], dict(max_new_tokens=3, do_sample=False)
    lengths = prompt_lengths(model, turns, generation)
    assert len(lengths) == 2 and lengths[1] > lengths[0] > 20
    for turn, length in enumerate(lengths):
        for context in (length + 3, length + 2):
            model.reset()
            model.context = (10 ** 6, 'x')
            for question, images in turns[:turn]:  # the same earlier turns (greedy)
                model.ask(question, images, dict(generation))
            model.context = (context, "the test's")
            if context == length + 3:
                model.ask(*turns[turn], dict(generation))  # fits exactly
                continue
            with pytest.raises(PromptTooLong) as refused:
                model.ask(*turns[turn], dict(generation))
        assert (refused.value.prompt_tokens, refused.value.new_tokens) == (length, 3)
        assert str(refused.value) == (
            f"the prompt is {length} tokens and --max-new-tokens asks for 3 more: {length + 3} is over the LLM's "
            f"context of {length + 2} tokens (the test's); lower --max-new-tokens to 2 or less, or shorten the "
            f"question or lower --max-num (tiles per image)"   # an image in the conversation, no video
            + ('; the 1 earlier turns count too: /reset starts anew' if turn else ''))


def test_a_too_long_prompt_offers_the_tiles_only_where_they_are_the_users():
    """A GGUF folder's prompt over its context advised --max-num, which a GGUF folder refuses (llama.cpp tiles)."""
    gguf = str(PromptTooLong(900, 0, 800, 'm.gguf', tiles=None))
    assert gguf.endswith('; shorten the question or lower --frames (frames of a video)') and '--max-num' not in gguf
    assert str(PromptTooLong(900, 0, 800, 'x')).endswith('or --max-num (tiles per image)')


def test_a_too_long_prompt_names_the_settings_of_what_it_holds():
    """An image question over the context was told to lower the video's frames (the web demo, chat): the advice
    names the frames only where the conversation holds a video, the tiles only where it holds an image."""
    def advice(**kwargs):
        return str(PromptTooLong(900, 0, 800, 'x', **kwargs)).split('; ', 1)[1]
    assert advice(media=['image']) == 'shorten the question or lower --max-num (tiles per image)'
    assert advice(media=['video']) == 'shorten the question or lower --frames (frames of a video)'
    assert advice(media=['video', 'image']) == advice() == (
        'shorten the question or lower --frames (frames of a video) or --max-num (tiles per image)')
    assert advice(media=[]) == advice(media=['image'], tiles=None) == 'shorten the question'   # text; GGUF


def test_batches_and_likelihood_are_checked_too(folder, hf_folder, tmp_path):
    from xtuner_plugins.models.inference import ConvertedModel
    images = [[write_image(tmp_path / f'{i}.png', size=(60 + 30 * i, 60))] for i in range(2)]
    for path in (folder, hf_folder):
        model = ConvertedModel(path)
        model.context = (30, 'x')
        with pytest.raises(PromptTooLong, match='over the LLM.s context of 30 tokens'):
            model.ask_batch(['What?', 'Why?'], images, dict(max_new_tokens=2))
        with pytest.raises(PromptTooLong, match=r'tokens \(\+ \d+ of the longest answer scored\), over'):
            model.option_logprobs('What?', images[0], ['a red one', 'blue'])


def test_a_video_over_the_context_is_one_line_naming_both_numbers(folder, tmp_path, capsys):
    """tools/chat.py --video with more frames than the LLM's context holds: refused before generating."""
    from tools.chat import main as chat_main
    small = str(tmp_path / 'small')
    shutil.copytree(folder, small)
    with open(os.path.join(small, 'config.json')) as f:
        config = json.load(f)
    config['llm_config']['max_position_embeddings'] = 200
    with open(os.path.join(small, 'config.json'), 'w') as f:
        json.dump(config, f)
    video = write_video(tmp_path / 'v.mp4', [(37 * i) % 256 for i in range(40)], size=(64, 48))
    assert chat_main([small, '--video', video, '--frames', '30', '--prompt', 'What happens?']) == 2
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and 'Traceback' not in err, err
    assert err.startswith('chat: error: the prompt is ') and "over the LLM's context of 200 tokens (" in err, err
    assert err.rstrip().endswith('llm_config.max_position_embeddings); shorten the question or lower --frames '
                                 '(frames of a video)'), err   # a video's frames are one tile each
    assert chat_main([small, '--video', video, '--frames', '2', '--prompt', 'What happens?',
                      '--max-new-tokens', '4']) == 0
    capsys.readouterr()
    for prog, (main, args) in tools(tmp_path).items():  # eval too (the web demo: tests/web/test_app.py)
        if prog == 'eval':
            assert main([small, *args, '--max-new-tokens', '200']) == 2
            err = capsys.readouterr().err
            assert 'Traceback' not in err and err.strip().splitlines()[-1].startswith(
                'eval: error: none of the 1 questions could be scored; the first, ') and \
                "--max-new-tokens asks for 200 more" in err and '[too_long]' in err, err


# ------------------------------------------------------------------ whitespace runs
class Always:
    """A logits processor that makes ``token`` the only choice; counts the steps."""

    def __init__(self, token):
        self.token, self.steps = token, 0

    def __call__(self, input_ids, scores):
        self.steps += 1
        forced = torch.full_like(scores, -math.inf)
        forced[:, self.token] = 0
        return forced


@pytest.mark.parametrize('fmt', ['official', 'hf'])
def test_generation_stops_after_a_run_of_whitespace_tokens(folder, hf_folder, fmt):
    """A model that only emits newlines (the README's random tiny one) stops after BLANK_RUN of them, not at
    max_new_tokens; the prompt's own trailing newline does not count."""
    from transformers import LogitsProcessorList

    from xtuner_plugins.models.inference import ConvertedModel
    model = ConvertedModel(folder if fmt == 'official' else hf_folder)
    newline = model.tokenizer('\n', add_special_tokens=False)['input_ids']
    assert len(newline) == 1
    force = Always(newline[0])
    generation = dict(max_new_tokens=200, do_sample=False, logits_processor=LogitsProcessorList([force]))
    assert model.ask('Hi', [], generation) == '' and force.steps == BLANK_RUN
    force.steps = 0
    assert model.ask_batch(['Hi', 'Why?'], [[], []], generation) == ['', ''] and force.steps == 2 * BLANK_RUN


def test_a_token_with_text_breaks_the_run(folder):
    """BlankRun counts generated tokens only (after ``start``), and any token with text restarts the run."""
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(folder)
    nl, = tokenizer('\n', add_special_tokens=False)['input_ids']
    word = tokenizer('red', add_special_tokens=False)['input_ids'][0]
    stop = BlankRun(tokenizer, run=4, start=2)
    ids = torch.tensor([[word, word, nl, nl, nl, nl], [nl, nl, nl, nl, nl, word]])  # 2 prompt tokens, then 4
    assert stop(ids[:, :5]).tolist() == [False, False]  # 3 generated: the prompt's newlines do not count
    assert stop(ids).tolist() == [True, False]


def test_the_answer_starts_after_the_assistant_prefix_of_each_format(folder, hf_folder):
    """``--mc likelihood`` scores an option after the text its prompt ends with: the ``conversation.py`` template's
    assistant role (official), the chat template's generation prompt (hf)."""
    from xtuner_plugins.models.inference import ConvertedModel
    from xtuner_plugins.models.likelihood import assistant_prefix
    assert [assistant_prefix(ConvertedModel(path)) for path in (folder, hf_folder)] == ['<|im_start|>assistant\n'] * 2
