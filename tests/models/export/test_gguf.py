"""GGUF export (``tools/convert_to_official.py ... --format gguf``) answered through llama.cpp (``.venv-gguf``,
``make gguf``; ``XTUNER_PLUGINS_SKIP_GGUF=1`` skips the tests that need it, which otherwise fail saying to build it).

The model is the demo's size (56 px tiles, 64 wide, 2 layers; ``converted_tiny_folder``), random. Its images are
one tile under both tilings: an image no larger than the tile is one tile (no thumbnail) in InternVL's
``dynamic_preprocess`` and in llama.cpp's mtmd, and at exactly the tile size neither resizes it.

A random model's top two logits are often closer than the rounding between two libraries: llama.cpp's GELU is
tanh's approximation read from an f16 table (InternViT's is erf's), and its KV cache is f16 by default. Measured on
this model: logits 4.9e-4 apart with the f16 KV cache, 1.4e-6 with an f32 one (text only); the smallest top-2
margins of its greedy answers 2.6e-3. So the answers are compared token for token wherever the official model's
choice is clear (its top two logits :data:`CLEAR` or more apart, 20 times the widest rounding seen), and at least
:data:`COVERED` of all the tokens must be so compared; a decided model (the demo's, trained) answers alike in full
(docs/conversion.md, "GGUF").
"""

import json
import os
import shutil

import pytest
import torch

from tests.helpers import converted_tiny_folder, write_image, write_jsonl
from tools.chat import main as chat_main
from tools.convert_to_official import main as convert_main
from tools.eval import main as eval_main
from xtuner_plugins.models.export import gguf as gguf_export
from xtuner_plugins.models.export import gguf_run
from xtuner_plugins.models.gguf_model import GGUFModel, gguf_pair
from xtuner_plugins.models.inference import ConvertedModel

QUESTIONS = ('Describe the image.', 'What colour is it?', 'How many are there?')
STEPS = 8
CLEAR = 0.01
COVERED = 0.5


def need_llama_cpp():
    if os.environ.get('XTUNER_PLUGINS_SKIP_GGUF'):
        pytest.skip('XTUNER_PLUGINS_SKIP_GGUF is set')
    try:
        gguf_export.tools()
    except ValueError as exc:
        pytest.fail(f'{exc} (make test does)')


def official_greedy(model, image, question, video=None, stop='<|im_end|>'):
    """``model.ask``'s greedy answer (chat()'s), its token ids (without the template's ``stop`` word) and each step's
    top-2 logit margin (``video``: its frames in place of the image; no image: a text question)."""
    lm, seen = model.model.language_model, {}
    generate = lm.generate

    def recording(**kwargs):
        out = generate(**kwargs, output_scores=True, return_dict_in_generate=True)
        seen.update(ids=out.sequences[0].tolist(),
                    margins=[float(s[0].topk(2).values.diff().abs()) for s in out.scores])
        return out.sequences

    lm.generate = recording
    try:
        model.reset()
        images = [image] if video is None and image is not None else []
        answer = model.ask(question, images, dict(max_new_tokens=STEPS), video=video)
    finally:
        del lm.generate
    end = model.tokenizer.convert_tokens_to_ids(stop)
    ids = seen['ids'][:-1] if seen['ids'] and seen['ids'][-1] == end else seen['ids']
    return answer, ids, seen['margins']


def convert(*argv):
    return convert_main([str(a) for a in argv])


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
    need_llama_cpp()
    root = tmp_path_factory.mktemp('gguf')
    folder = converted_tiny_folder(root)
    images = [write_image(root / 'img' / f'{i}.png', size=(56, 56), seed=10 + i) for i in range(4)]
    official = ConvertedModel(folder)
    expected = {(i, q): official_greedy(official, img, q) for i, img in enumerate(images) for q in QUESTIONS}
    out = root / 'f32'
    assert convert(folder, out, '--format', 'gguf', '--quant', 'f32') == 0
    return dict(root=root, folder=folder, images=images, expected=expected, f32=str(out))


def gguf_answers(folder, setup):
    """``(answer, token ids)`` of each question through llama.cpp."""
    model = GGUFModel(folder)
    try:
        answers = {}
        for i, img in enumerate(setup['images']):
            for q in QUESTIONS:
                model.reset()
                answers[(i, q)] = (model.ask(q, [img], dict(max_new_tokens=STEPS)), model.last_tokens)
        return answers
    finally:
        model.close()


def assert_answers_alike(got, expected):
    """Token for token up to the official model's first unclear step; the whole answer when it has none."""
    compared = total = 0
    for key, (answer, ids, margins) in expected.items():
        clear = next((i for i, m in enumerate(margins) if m < CLEAR), None)
        if clear is None:
            assert got[key] == (answer, ids), key
            compared += len(ids)
        else:
            assert got[key][1][:clear] == ids[:clear], (key, clear)
            compared += clear
        total += max(len(ids), 1)
    assert compared >= COVERED * total, f'only {compared} of {total} tokens compared: the test model is undecided'


@pytest.fixture(scope='module')
def f32_answers(setup):
    return gguf_answers(setup['f32'], setup)


def test_f32_gguf_answers_as_the_official_folder(setup, f32_answers):
    assert sorted(os.listdir(setup['f32'])) == ['f32-F32.gguf', 'mmproj-f32-F32.gguf']
    assert_answers_alike(f32_answers, setup['expected'])


def test_chat_tool_answers_through_llama_cpp_and_streams(setup, f32_answers, capsys, monkeypatch):
    image, question = setup['images'][2], QUESTIONS[1]
    answer = f32_answers[(2, question)][0]
    assert chat_main([setup['f32'], '--image', image, '--prompt', question, '--max-new-tokens', str(STEPS)]) == 0
    assert capsys.readouterr().out.rstrip('\n') == answer
    lines = iter([f'/image {image}', question, '/exit'])
    monkeypatch.setattr('builtins.input', lambda prompt='': next(lines))
    assert chat_main([setup['f32'], '--max-new-tokens', str(STEPS)]) == 0
    assert f'model> {answer}\n' in capsys.readouterr().out


def test_eval_tool_asks_through_llama_cpp(setup, f32_answers, tmp_path):
    question = QUESTIONS[1]
    samples = [{'id': f'q{i}', 'image': os.path.basename(img),
                'conversations': [{'from': 'human', 'value': '<image>\n' + question},
                                  {'from': 'gpt', 'value': setup['expected'][(i, question)][0] or 'x'}]}
               for i, img in enumerate(setup['images'])]
    data = write_jsonl(tmp_path / 'test.jsonl', samples)
    out = tmp_path / 'report.json'
    assert eval_main([setup['f32'], '--data', data, '--image-folder', os.path.dirname(setup['images'][0]),
                      '--out', str(out), '--no-blind', '--max-new-tokens', str(STEPS)]) == 0
    report = json.loads(out.read_text())
    assert [r['answer'] for r in report['results']] == [f32_answers[(i, question)][0] for i in range(4)]


def test_quantised_ggufs_shrink_answer_and_say_what_fell_back(setup, capsys):
    """f16 answers as the official folder does; q4_k_m's rows of 64 and 128 are not multiples of 256: llama.cpp's
    quantiser falls back for them, and the export says so."""
    sizes = {}
    for quant in ('f16', 'q4_k_m'):
        out = setup['root'] / quant
        assert convert(setup['folder'], out, '--format', 'gguf', '--quant', quant) == 0
        text, mmproj = gguf_pair(str(out))
        assert os.path.basename(text) == f'{quant}-{quant.upper()}.gguf'
        assert os.path.basename(mmproj) == f'mmproj-{quant}-F16.gguf'
        sizes[quant] = os.path.getsize(text)
        printed = capsys.readouterr().out
        assert f'wrote {os.path.basename(text)} (' in printed and f'wrote {os.path.basename(mmproj)} (' in printed
        answers = gguf_answers(str(out), setup)
        if quant == 'f16':
            assert_answers_alike(answers, setup['expected'])
        else:
            assert "tensors quantised to another type than q4_k_m asks (q4_K -> q5_0" in printed
            assert "are not multiples of 256; llama.cpp's own fallback" in printed
            assert len(answers) == len(setup['expected'])
    sizes['f32'] = os.path.getsize(gguf_pair(setup['f32'])[0])
    assert sizes['f32'] > sizes['f16'] > sizes['q4_k_m']


@pytest.mark.parametrize('arch', ['llama', 'qwen3'])
def test_the_other_llm_families_answer_text_as_their_official_folder(tmp_path, arch):
    """Llama's and Qwen3's decoders (InternVL 3.5's LLM family) convert, and answer text alike, token for token (the
    f32 export's KV cache is f32: 1.4e-6 of logits apart). With images their answers part at the official model's
    near-ties, as Qwen2's do, but a Llama answer once parted at a margin of 0.023 (docs/conversion.md, "GGUF"): not
    asserted here."""
    need_llama_cpp()
    from tests.helpers import tiny_workspace
    from tests.tools.test_convert_to_official import LORA, options, trained_checkpoint
    from tests.tools.test_convert_to_official import convert as convert_checkpoint
    from xtuner_plugins.tiny import write_tiny_llm
    tiny = tiny_workspace(tmp_path / 'tiny')
    opts = options(tiny, **{'model.llm': write_tiny_llm(str(tmp_path / arch), arch=arch)})
    trained_checkpoint(LORA, opts, str(tmp_path / 'iter_1.pth'), scale=0.3)
    folder = convert_checkpoint(LORA, str(tmp_path / 'iter_1.pth'), tmp_path / 'official', opts)
    assert convert(folder, tmp_path / 'gguf', '--format', 'gguf', '--quant', 'f32') == 0
    official, model = ConvertedModel(folder), GGUFModel(str(tmp_path / 'gguf'))
    try:
        for question in ('Hi there', 'Tell me a story', 'Count to ten', 'Say hello', *QUESTIONS):
            official.reset()
            model.reset()
            assert model.ask(question, [], dict(max_new_tokens=STEPS)) == official.ask(question, [],
                                                                                       dict(max_new_tokens=STEPS))
    finally:
        model.close()


def test_a_gemma3_llm_answers_as_its_official_folder_its_sliding_layers_listed(tmp_path):
    """Gemma 3 (refused before): a look-alike of 2 layers, sliding then full, whose 8-token window each prompt
    passes. llama.cpp takes the published models' layout (five sliding layers, then a full one) unless the GGUF lists
    its layers: so written, none of 12 answers was alike. Text and image answers are compared token for token up to
    the official model's first near-tie (:func:`assert_answers_alike`)."""
    need_llama_cpp()
    from tests.helpers import tiny_workspace
    from tests.tools.test_convert_to_official import LORA, options, trained_checkpoint
    from tests.tools.test_convert_to_official import convert as convert_checkpoint
    from xtuner_plugins.tiny import write_tiny_llm
    tiny = tiny_workspace(tmp_path / 'tiny')
    llm = write_tiny_llm(str(tmp_path / 'gemma3'), arch='gemma3', chat='gemma', num_layers=2)
    with open(os.path.join(llm, 'config.json')) as f:
        config = json.load(f)
    assert config['layer_types'] == ['sliding_attention', 'full_attention']
    config['sliding_window'] = 8
    with open(os.path.join(llm, 'config.json'), 'w') as f:
        json.dump(config, f)
    opts = options(tiny, **{'model.llm': llm, 'model.template': 'gemma'})
    trained_checkpoint(LORA, opts, str(tmp_path / 'iter_1.pth'), scale=0.3)
    folder = convert_checkpoint(LORA, str(tmp_path / 'iter_1.pth'), tmp_path / 'official', opts)
    assert convert(folder, tmp_path / 'gguf', '--format', 'gguf', '--quant', 'f32') == 0
    image = write_image(tmp_path / 'img.png', size=(56, 56), seed=3)
    official = ConvertedModel(folder)
    asked = [(q, []) for q in ('Hi there', 'Tell me a long story about the sea', 'Count to ten')] + \
        [(q, [image]) for q in QUESTIONS]
    expected = {(q, len(images)): official_greedy(official, images[0] if images else None, q, stop='<end_of_turn>')
                for q, images in asked}
    model, got = GGUFModel(str(tmp_path / 'gguf')), {}
    try:
        for q, images in asked:
            model.reset()
            got[(q, len(images))] = (model.ask(q, images, dict(max_new_tokens=STEPS)), model.last_tokens)
    finally:
        model.close()
    assert_answers_alike(got, expected)


def test_a_gguf_llama_cpp_does_not_load_is_refused_as_it_is_written(setup, tmp_path):
    """The export loads the pair it wrote: an OLMoE with grouped key/value heads (llama.cpp's OLMoE takes its k norm
    over the whole width) said done, then every question failed (found by a helper's sweep; its refusal seen by
    hand: "check_tensor_dims: tensor 'blk.0.attn_k_norm.weight' has wrong shape"). Here a model file cut short."""
    model, mmproj = gguf_pair(setup['f32'])
    gguf_export.check_loads(model, mmproj)   # the pair written: loads
    data = open(model, 'rb').read()
    (tmp_path / 'cut.gguf').write_bytes(data[:len(data) - 4096])
    with pytest.raises(ValueError, match=r"^llama.cpp does not load the GGUF it was converted to \(.*data is not "
                                         r"within the file bounds.*\): this model's layout is not one llama.cpp runs"):
        gguf_export.check_loads(str(tmp_path / 'cut.gguf'), mmproj)


def test_missing_fields_are_filled_in_a_staged_copy(setup, capsys):
    """A folder without architectures, preprocessor_config.json and chat template converts; it is not written."""
    bare = setup['root'] / 'bare'
    shutil.copytree(setup['folder'], bare)
    config = json.loads((bare / 'config.json').read_text())
    for part in (config, config['vision_config'], config['llm_config']):
        part.pop('architectures')
    (bare / 'config.json').write_text(json.dumps(config))
    (bare / 'preprocessor_config.json').unlink()
    (bare / 'chat_template.jinja').unlink()
    tok_cfg = json.loads((bare / 'tokenizer_config.json').read_text())
    tok_cfg.pop('chat_template', None)
    (bare / 'tokenizer_config.json').write_text(json.dumps(tok_cfg))
    before = {p: p.read_bytes() for p in bare.iterdir()}
    out = setup['root'] / 'from_bare'
    assert convert(bare, out, '--format', 'gguf', '--quant', 'f32') == 0
    assert 'filled in for llama.cpp\'s converter' in capsys.readouterr().out
    assert {p: p.read_bytes() for p in bare.iterdir()} == before
    assert_answers_alike(gguf_answers(str(out), setup), setup['expected'])


def test_a_model_trained_without_a_thumbnail_is_told_llama_cpp_adds_one(setup, tmp_path):
    """llama.cpp's mtmd adds a thumbnail to every image of more than one tile: a model trained with use_thumbnail
    false was exported without a word, and gets a tile it never saw on such images."""
    for thumbnail in (False, True):
        folder = edited(tmp_path / str(thumbnail), setup, lambda c: c.update(use_thumbnail=thumbnail))
        said = []
        gguf_export.stage(str(folder), str(tmp_path / f'staged_{thumbnail}'), log=said.append)
        warned = [line for line in said if line.startswith('WARNING: ') and 'without a thumbnail' in line]
        assert len(warned) == (not thumbnail), said


def refused(tmp_path, capsys, folder, *why):
    out = tmp_path / 'out'
    assert convert(folder, out, '--format', 'gguf') == 2
    err = capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.glob('out.tmp-*'))
    for words in why:
        assert words in err, err
    return err


def edited(tmp_path, setup, edit):
    folder = tmp_path / 'model'
    shutil.copytree(setup['folder'], folder)
    config = json.loads((folder / 'config.json').read_text())
    edit(config)
    (folder / 'config.json').write_text(json.dumps(config))
    return folder


def test_llava_folders_are_refused_before_anything_is_written(setup, tmp_path, capsys):
    folder = edited(tmp_path, setup, lambda c: c.update(model_type='llava', vision_config={'model_type': 'clip'}))
    refused(tmp_path, capsys, folder, 'Pixtral', 'CLIP or SigLIP')


@pytest.mark.parametrize('edit, why', [
    (lambda c: c['llm_config'].update(architectures=['GPTBigMambaForCausalLM']),
     "LLM 'GPTBigMambaForCausalLM', a family llama.cpp's converter does not know"),
    (lambda c: c['vision_config'].update(hidden_act='relu'), "vision hidden_act 'relu'"),
    (lambda c: c.update(ps_version='v1'), "ps_version 'v1'"),
    (lambda c: c.update(select_layer=-2), 'select_layer -2'),
    (lambda c: c.update(model_type='internvl'), "transformers' InternVL layout"),
    # llama.cpp's Gemma 2 drops the lm_head (its converter failed with a traceback), and applies no sliding window
    # to a Mistral's (the answers differed without a word); its Gemma 3 scales queries by the head width's root
    (lambda c: c['llm_config'].update(architectures=['Gemma2ForCausalLM'], model_type='gemma2'),
     "LLM 'Gemma2ForCausalLM': llama.cpp's Gemma and Gemma 2 read the embeddings as their head"),
    (lambda c: c['llm_config'].update(architectures=['Gemma3ForCausalLM'], model_type='gemma3_text', head_dim=16,
                                      query_pre_attn_scalar=20, attn_logit_softcapping=50.0),
     "query_pre_attn_scalar 20 (llama.cpp's Gemma 3 scales the queries by 16's root); attn_logit_softcapping 50.0"),
    (lambda c: c['llm_config'].update(use_sliding_window=True, sliding_window=8, layer_types=None),
     'a sliding window of 8 tokens in the LLM'),
])
def test_what_llama_cpp_cannot_take_is_refused_with_the_reason(setup, tmp_path, capsys, edit, why):
    refused(tmp_path, capsys, edited(tmp_path, setup, edit), 'cannot be converted to GGUF', why)


def test_a_clip_checkpoint_is_refused_before_anything_is_written(tmp_path, capsys):
    """The checkpoint route: a CLIP + LLaVA-MLP model is refused after it is built, before OUT_DIR is made."""
    need_llama_cpp()
    from tests.helpers import tiny_families
    from tests.tools.test_convert_to_official import LORA, as_args, options, trained_checkpoint
    tiny = tiny_families(tmp_path / 'tiny')
    opts = options(tiny, **{'model.vision_encoder': tiny['clip'], 'model.projector': 'mlp', 'model.image_mode': 'pad'})
    ckpt = str(tmp_path / 'iter_1.pth')
    trained_checkpoint(LORA, opts, ckpt)
    out = tmp_path / 'out'
    assert convert_main([LORA, ckpt, str(out), '--format', 'gguf'] + as_args(opts)) == 2
    err = capsys.readouterr().err
    assert '--format gguf does not fit this model' in err and 'CLIP or SigLIP' in err
    assert not out.exists() and not list(tmp_path.glob('out.tmp-*'))


def test_a_lora_checkpoint_converts_and_answers_as_its_official_folder(setup, tmp_path):
    """docs/conversion.md's first GGUF command: a LoRA checkpoint straight to GGUF (the adapters merged first; its
    LLM was named as peft's wrapper, 'a family llama.cpp's converter does not know', before)."""
    from tests.helpers import lora_trained_tiny
    from tests.tools.test_convert_to_official import LORA, as_args
    trained = lora_trained_tiny(tmp_path / 'lora')
    out = tmp_path / 'gguf'
    assert convert_main([LORA, trained['ckpt'], str(out), '--format', 'gguf', '--quant', 'f32']
                        + as_args(trained['opts'])) == 0
    assert sorted(p.name for p in out.iterdir()) == ['gguf-F32.gguf', 'mmproj-gguf-F32.gguf']
    folder = tmp_path / 'official'
    assert convert_main([LORA, trained['ckpt'], str(folder), '--dtype', 'fp32'] + as_args(trained['opts'])) == 0
    official = ConvertedModel(str(folder))
    expected = {(i, q): official_greedy(official, img, q) for i, img in enumerate(setup['images']) for q in QUESTIONS}
    assert_answers_alike(gguf_answers(str(out), setup), expected)


def edited_tokenizer(tmp_path, setup, drop):
    """A copy of the folder whose tokenizer files do not add the tokens ``drop``."""
    folder = edited(tmp_path, setup, lambda c: None)
    tok = json.loads((folder / 'tokenizer.json').read_text())
    tok['added_tokens'] = [t for t in tok['added_tokens'] if t['content'] not in drop]
    (folder / 'tokenizer.json').write_text(json.dumps(tok))
    cfg = json.loads((folder / 'tokenizer_config.json').read_text())
    cfg['added_tokens_decoder'] = {k: v for k, v in cfg.get('added_tokens_decoder', {}).items()
                                   if v['content'] not in drop}
    (folder / 'tokenizer_config.json').write_text(json.dumps(cfg))
    if (folder / 'added_tokens.json').exists():
        added = json.loads((folder / 'added_tokens.json').read_text())
        (folder / 'added_tokens.json').write_text(json.dumps({k: v for k, v in added.items() if k not in drop}))
    return folder


def test_a_tokenizer_without_internvls_image_tokens_is_refused(setup, tmp_path, capsys):
    """The GGUF converted and answered before, its prompts never carrying the image (the official folder's tools
    refuse such a tokenizer)."""
    folder = edited_tokenizer(tmp_path, setup, ('<img>', '</img>', '<IMG_CONTEXT>'))
    refused(tmp_path, capsys, folder, 'cannot be converted to GGUF',
            'its tokenizer has no <img>, </img>, <IMG_CONTEXT>')


def test_a_phi3_llm_whose_vocabulary_the_converter_cannot_read_is_refused(setup, tmp_path, capsys, monkeypatch):
    """llama.cpp's converter reads a Phi-3 LLM's vocabulary from a SentencePiece tokenizer.model, or as byte-level
    BPE under the class name GPT2Tokenizer: a Phi-3 with another tokenizer (the project's --chat phi3 BPE one) ended
    in its traceback ('Missing .../tokenizer.model'); it is refused before llama.cpp is asked for."""
    from xtuner_plugins.models.export.gguf_checks import vocabulary_problem
    folder = edited(tmp_path, setup, lambda c: c['llm_config'].update(architectures=['Phi3ForCausalLM']))
    named = json.loads((folder / 'tokenizer_config.json').read_text())['tokenizer_class'].removesuffix('Fast')
    monkeypatch.setenv('XTUNER_GGUF_VENV', str(tmp_path / 'none'))
    refused(tmp_path, capsys, folder, 'cannot be converted to GGUF: its LLM is Phi-3 (Phi3ForCausalLM)',
            f'this tokenizer is {named}, without a tokenizer.model')
    assert vocabulary_problem('Phi3ForCausalLM', 'GPT2Tokenizer', False) is None   # Phi-4's
    assert vocabulary_problem('Phi3ForCausalLM', 'LlamaTokenizer', True) is None   # Phi-3's own
    assert vocabulary_problem('Qwen2ForCausalLM', named, False) is None


def _drop(part, key):
    return lambda c: c[part].pop(key)


@pytest.mark.parametrize('edit, why', [
    (lambda c: c['llm_config'].update(architectures={'a': 1}), 'llm_config.architectures is {"a": 1}, not a list'),
    (lambda c: c['vision_config'].update(architectures=[['InternVisionModel']]),
     'vision_config.architectures is [["InternVisionModel"]], not a list of names'),
    (lambda c: c['vision_config'].update(num_hidden_layers='two'),
     'vision_config.num_hidden_layers is "two", not a positive number'),
    (lambda c: c.update(downsample_ratio='half'), 'downsample_ratio is "half", not a positive number'),
    (_drop('llm_config', 'num_hidden_layers'), 'no llm_config.num_hidden_layers in config.json'),
    # the converter allocated for 10^9 layers until the machine had no memory left
    (lambda c: c['llm_config'].update(num_hidden_layers=10 ** 9), 'llm_config.num_hidden_layers is 1000000000, its '
                                                                  'weights hold 2 layers'),
])
def test_a_config_the_converter_cannot_read_is_named_before_llama_cpp_is_asked_for(setup, tmp_path, capsys,
                                                                                   monkeypatch, edit, why):
    folder = edited(tmp_path, setup, edit)
    refused(tmp_path, capsys, folder, 'cannot be converted to GGUF', why)
    monkeypatch.setenv('XTUNER_GGUF_VENV', str(tmp_path / 'none'))   # said before `make gguf` is asked for
    err = refused(tmp_path, capsys, folder, why)
    assert 'make gguf' not in err


def test_sigterm_during_the_converter_leaves_nothing_running_nor_written(setup, tmp_path):
    """SIGTERM (timeout, Slurm, systemd) killed the tool alone: llama.cpp's converter went on writing into
    OUT_DIR.tmp-PID as an orphan. Now it is taken as Ctrl-C is: the converter ended, nothing left, exit 143."""
    import signal
    import subprocess
    import sys
    import time

    from tests.train_utils import REPO_ROOT, train_env
    out = tmp_path / 'sigterm_out'
    run = subprocess.Popen([sys.executable, os.path.join(REPO_ROOT, 'tools', 'convert_to_official.py'),
                            setup['folder'], str(out), '--format', 'gguf', '--quant', 'q4_k_m'],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=train_env())
    for line in run.stdout:
        if "llama.cpp's converter" in line:
            break
    time.sleep(1)   # the converter process started
    run.send_signal(signal.SIGTERM)
    _, err = run.communicate(timeout=120)
    assert run.returncode == 143, err[-2000:]
    assert err.strip().splitlines()[-1] == f'convert_to_official: terminated; {out} is as it was before'
    assert os.listdir(tmp_path) == []
    time.sleep(1)
    left = subprocess.run(['ps', '-eo', 'args'], capture_output=True, text=True).stdout
    assert 'sigterm_out' not in left, left


def test_the_converter_asks_nobody_whether_to_run_the_folders_tokenizer_code(setup, tmp_path):
    """A folder whose tokenizer_config.json maps AutoTokenizer to its own module: llama.cpp's converter loads the
    tokenizer without trust_remote_code, and transformers asked on the converter's stdin, the terminal's, whether to
    run it, its question in the converter's captured output: an invisible prompt that waited 15 s, and ran the
    module on a 'y' typed meanwhile. Now the converter reads no stdin: it refuses the code at once."""
    import subprocess
    import sys

    from tests.train_utils import REPO_ROOT, train_env
    folder, marker = tmp_path / 'model', tmp_path / 'ran'
    shutil.copytree(setup['folder'], folder)
    (folder / 'evil_tok.py').write_text(f'open({str(marker)!r}, "w").write("ran")\n'
                                        'from transformers import Qwen2TokenizerFast as EvilTokenizer\n')
    tok = json.loads((folder / 'tokenizer_config.json').read_text())
    tok.update(auto_map={'AutoTokenizer': [None, 'evil_tok.EvilTokenizer']}, tokenizer_class='EvilTokenizer')
    (folder / 'tokenizer_config.json').write_text(json.dumps(tok))   # (a class transformers has not: it asks)
    out = tmp_path / 'out'
    done = subprocess.run([sys.executable, os.path.join(REPO_ROOT, 'tools', 'convert_to_official.py'), str(folder),
                           str(out), '--format', 'gguf'], input='y\n', capture_output=True, text=True,
                          env=train_env(), timeout=300)
    assert not marker.exists()
    assert done.returncode == 2, done.stderr[-2000:]
    assert 'contains custom code' in done.stderr and not out.exists()


def test_without_llama_cpp_the_export_says_to_build_it(setup, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv('XTUNER_GGUF_VENV', str(tmp_path / 'none'))
    err = refused(tmp_path, capsys, setup['folder'], 'make gguf')
    assert 'llama.cpp is not built here' in err


def test_tiling_options_are_refused_for_a_gguf_folder(setup, capsys):
    assert chat_main([setup['f32'], '--image', setup['images'][0], '--prompt', 'Hi', '--max-num', '2']) == 2
    assert 'llama.cpp tiles the images as its mmproj says' in capsys.readouterr().err


def test_a_control_token_of_the_gguf_vocabulary_in_a_question_is_refused(setup, f32_answers):
    """llama.cpp's chat handler tokenizes the rendered prompt with special tokens parsed: '<|endoftext|>' typed in a
    question (a control token of the vocabulary, not a template's marker) would be read as that token. Refused as
    the other formats refuse it (their tokenizer's special tokens); grounding tokens stay data."""
    from xtuner_plugins.data.errors import SampleError
    model = GGUFModel(setup['f32'])
    try:
        assert {'<|endoftext|>', '<|im_start|>', '<|im_end|>'} <= set(model.control)
        with pytest.raises(SampleError, match=r"the question holds '<\|endoftext\|>' at character 8 .*control_text"):
            model.ask('Is this <|endoftext|> a cat?', [setup['images'][0]], dict(max_new_tokens=STEPS))
        assert model.messages == [] and model.images == []   # the turn was not asked
        question = QUESTIONS[0]
        assert model.ask(question, [setup['images'][1]], dict(max_new_tokens=STEPS)) == f32_answers[(1, question)][0]
    finally:
        model.close()


def test_the_web_demo_answers_from_a_gguf_folder_each_session_its_own_conversation(setup, f32_answers, tmp_path):
    """The web demo refused GGUF folders: the model kept one conversation, its images inside the messages as data
    URLs. The messages now name the images by index and a conversation is saved and resumed as the other formats'
    are: sessions in between change nothing, a follow-up on an image or a video's frames (kept as the files' bytes,
    the frames stretched again) is the answer the same conversation gets in one piece, and the /chat endpoint is
    chat's answer."""
    from xtuner_plugins.web.app import WebChat, build_app
    a, b = setup['images'][:2]
    frames = [write_image(tmp_path / f'{i}.png', size=size, seed=40 + i) for i, size in enumerate([(90, 40), (56, 56)])]
    model = GGUFModel(setup['f32'])
    try:
        whole = []
        for question, images, video in (('Describe the image.', [a], None), ('And now?', [], None),
                                         ('What happens?', [], frames), ('Anything else?', [], None)):
            whole.append(model.ask(question, images, dict(max_new_tokens=STEPS), video=video))
        assert model.frames == [False, True, True] and len(model.images) == 3
        model.reset()
        chat = WebChat(model, max_new_tokens=STEPS)
        assert chat.answer(b, QUESTIONS[1]) == f32_answers[(1, QUESTIONS[1])][0]

        def turn(question, images, conversation, video=None):
            steps = list(chat.stream(question, images, conversation, dict(max_new_tokens=STEPS, do_sample=False),
                                     video=video))
            assert all(after is None for _, after in steps[:-1])
            return steps[-1]

        first, conv_a = turn('Describe the image.', [a], None)
        assert first == whole[0] == f32_answers[(0, 'Describe the image.')][0]
        other, conv_b = turn(QUESTIONS[1], [b], None)   # another session in between
        assert other == f32_answers[(1, QUESTIONS[1])][0]
        second, conv_a = turn('And now?', [], conv_a)
        third, conv_a = turn('What happens?', [], conv_a, video=frames)
        fourth, conv_a = turn('Anything else?', [], conv_a)
        assert [first, second, third, fourth] == whole
        assert conv_a['frames'] == [False, True, True]   # the images' bytes in the server's store (web/kept.py)
        assert all(isinstance(i, bytes) for i in chat.kept.resolve(conv_a)['images'])
        assert len(conv_a['messages']) == 8 and len(conv_b['messages']) == 2
        assert model.messages == [] and model.images == []   # the shared model keeps no conversation
        with pytest.raises(ValueError, match='answers greedily only'):
            list(chat.stream('Hi', [], None, dict(max_new_tokens=2, do_sample=True)))
        sample = next(c for c in build_app(chat).blocks.values() if getattr(c, 'label', '') == 'Sample (otherwise '
                                                                                              'greedy)')
        assert sample.interactive is False
    finally:
        model.close()


def test_a_full_disk_under_the_converter_is_one_line(tmp_path, monkeypatch):
    """On a full disk llama.cpp's converter ended in numpy's 'OSError: 33536 requested and 20480 written' under a
    traceback and a progress bar, which the export printed as its last six lines; now one line says the disk is
    full. Another failure keeps its tail. The quantiser's 'iostream error' on a full disk is told by the disk."""
    import sys
    full = ("print('Traceback (most recent call last):'); print('OSError: 33536 requested and 20480 written'); "
            "print('Writing:  24%|##   | 67.1k/284k'); raise SystemExit(1)")
    with pytest.raises(ValueError) as err:
        gguf_run.run([sys.executable, '-c', full], "llama.cpp's converter")
    assert str(err.value) == ("llama.cpp's converter failed: the disk it writes to is full (OSError: 33536 requested "
                              "and 20480 written); free space there, or give an OUT_DIR on another disk")
    failing = [sys.executable, '-c', "print('failed to quantize: basic_ios::clear: iostream error'); print('done'); "
                                     "raise SystemExit(3)"]
    with pytest.raises(ValueError) as err:
        gguf_run.run(failing, 'the quantiser', writes_to=str(tmp_path))
    assert str(err.value) == ('the quantiser failed (exit 3):\n'
                              'failed to quantize: basic_ios::clear: iostream error\ndone')
    # llama.cpp's quantiser says no more on a full disk: the disk it wrote to, under 1 MiB free, is named
    monkeypatch.setattr(gguf_run.shutil, 'disk_usage', lambda path: shutil._ntuple_diskusage(10, 10, 4096))
    with pytest.raises(ValueError) as err:
        gguf_run.run(failing, 'the quantiser', writes_to=str(tmp_path))
    assert str(err.value) == (f'the quantiser failed: the disk it writes to is full (4,096 bytes free under '
                              f'{tmp_path.parent}; it said: failed to quantize: basic_ios::clear: iostream error); '
                              'free space there, or give an OUT_DIR on another disk')


def test_pre_tokenizer_is_named_only_for_qwen2s_rules(tmp_path):
    from xtuner_plugins.tiny.tokenizer import build_tiny_tokenizer
    build_tiny_tokenizer().save_pretrained(tmp_path)
    assert gguf_export.pre_tokenizer(str(tmp_path)) == 'qwen2'
    data = json.loads((tmp_path / 'tokenizer.json').read_text())
    data['pre_tokenizer']['pretokenizers'][0]['pattern']['Regex'] = r'\s+'
    (tmp_path / 'tokenizer.json').write_text(json.dumps(data))
    assert gguf_export.pre_tokenizer(str(tmp_path)) == '-'


def gguf_header(architecture):
    """The start of a GGUF file: its magic, version 3, no tensors, one key (general.architecture)."""
    import struct
    key, value = b'general.architecture', architecture.encode()
    return (b'GGUF' + struct.pack('<IQQ', 3, 0, 1) + struct.pack('<Q', len(key)) + key + struct.pack('<I', 8) +
            struct.pack('<Q', len(value)) + value)


def test_a_folder_of_other_ggufs_is_named(tmp_path):
    for name, arch in (('a.gguf', 'llama'), ('b.gguf', 'qwen2'), ('mmproj-a.gguf', 'clip')):
        (tmp_path / name).write_bytes(gguf_header(arch))
    with pytest.raises(ValueError, match='found 2 and 1'):
        gguf_pair(str(tmp_path))
    assert gguf_pair(str(tmp_path / 'nothing')) is None
    (tmp_path / 'b.gguf').write_bytes(b'')  # not GGUF (an interrupted copy): named
    with pytest.raises(ValueError, match='b.gguf is not a GGUF file'):
        gguf_pair(str(tmp_path))


def test_the_pair_is_told_apart_by_their_headers_not_their_names(setup, f32_answers, tmp_path):
    """An OUT_DIR named mmproj-... names both files mmproj-...: the folder the converter had just written was
    refused by chat and eval ('found 0 and 2'). The mmproj is the GGUF whose architecture is clip, whatever its
    name."""
    out = tmp_path / 'mmproj-x'
    assert convert(setup['folder'], out, '--format', 'gguf') == 0
    assert gguf_pair(str(out)) == (str(out / 'mmproj-x-F16.gguf'), str(out / 'mmproj-mmproj-x-F16.gguf'))
    swapped = tmp_path / 'swapped'  # the names the other way round, no -F32: answered as the F32 pair it is
    swapped.mkdir()
    shutil.copy(os.path.join(setup['f32'], 'f32-F32.gguf'), swapped / 'mmproj-a.gguf')
    shutil.copy(os.path.join(setup['f32'], 'mmproj-f32-F32.gguf'), swapped / 'a.gguf')
    model = GGUFModel(str(swapped))
    try:
        assert model.ready['ready']['kv_cache'] == 'f32'  # by its header's file type (it was by its name)
        key = (0, QUESTIONS[0])
        assert (model.ask(key[1], [setup['images'][0]], dict(max_new_tokens=STEPS)), model.last_tokens) == \
            f32_answers[key]
    finally:
        model.close()


def test_the_files_are_named_as_the_model_in_their_headers(setup):
    """llama.cpp's converter names the model after the folder it reads: every export said general.name '.Staging'
    and general.finetune 'staging' (the staged copy's folder). The staged copy is named as the model now."""
    from xtuner_plugins.models.gguf_model import gguf_keys
    for name in ('f32-F32.gguf', 'mmproj-f32-F32.gguf'):
        keys = gguf_keys(os.path.join(setup['f32'], name), ('general.architecture', 'general.name',
                                                            'general.finetune'))
        assert 'staging' not in str(keys).lower() and keys.get('general.name', '').lower().startswith('f32'), keys


@pytest.mark.parametrize('name, text, says', [
    ('tokenizer_config.json', '{oops', 'tokenizer_config.json: does not read (Expecting property name'),
    ('preprocessor_config.json', '[1]', 'preprocessor_config.json: holds a JSON list, not an object'),
    ('config.json', '[2]', 'config.json: holds a JSON list, not an object'),
    ('config.json', None, 'cannot be converted to GGUF: its vision_config in config.json is not a JSON object'),
])
def test_a_malformed_json_file_of_the_folder_is_one_line(setup, tmp_path, capsys, name, text, says):
    """A traceback (AttributeError) or the JSON parser's message naming no file before."""
    folder = edited(tmp_path, setup, lambda c: c.update(vision_config=[1]) if text is None else None)
    if text is not None:
        (folder / name).write_text(text)
    err = refused(tmp_path, capsys, folder, says)
    assert 'Traceback' not in err and len(err.strip().splitlines()) == 1, err


def gguf_chat_template(path):
    """The chat template a GGUF carries (llama.cpp prompts with it alone), read by the converter's own gguf-py."""
    import sys
    sys.path.insert(0, os.path.join(gguf_export.tools()[1], 'gguf-py'))
    try:
        from gguf import GGUFReader
    finally:
        sys.path.pop(0)
    field = GGUFReader(path).fields['tokenizer.chat_template']
    return bytes(field.parts[field.data[0]]).decode('utf-8')


def test_a_half_written_folder_is_named_before_the_converter_runs(setup, tmp_path, capsys):
    """The converter's own traceback (gguf-py: 'Could not read complete metadata') before."""
    folder = edited(tmp_path, setup, lambda c: None)
    os.truncate(folder / 'model.safetensors', 5000)
    err = refused(tmp_path, capsys, folder, f'{folder}/model.safetensors: 5000 bytes, shorter than its own header: '
                                            'a truncated (half-written) file')
    assert 'Traceback' not in err and len(err.strip().splitlines()) == 1, err


def test_an_out_dir_holding_files_the_folder_links_to_is_refused(setup, tmp_path, capsys):
    """A folder whose weights are a link into an earlier conversion: --overwrite into that conversion replaced the
    weights the folder reads, mid-export."""
    earlier, folder = tmp_path / 'earlier', tmp_path / 'model'
    shutil.copytree(setup['folder'], earlier)
    shutil.copytree(setup['folder'], folder)
    os.remove(folder / 'model.safetensors')
    os.symlink(earlier / 'model.safetensors', folder / 'model.safetensors')
    assert convert(folder, earlier, '--format', 'gguf', '--overwrite') == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f'convert_to_official: error: OUT_DIR {earlier} is, holds or lies inside an input '
        f'({earlier / "model.safetensors"}); choose another folder')
    assert sorted(os.listdir(earlier)) == sorted(os.listdir(setup['folder']))


def test_the_gguf_is_prompted_as_the_folders_chat_is(setup, tmp_path, capsys):
    """llama.cpp prompts with the GGUF's chat template alone, which the converter copied from the tokenizer: a
    folder whose config.json system_message differs from its template's default (chat() uses config.json's), or
    whose tokenizer template is not InternVL's (OpenGVLab's folders carry the LLM's chatml), answered to another
    prompt than the folder's chat()."""
    from xtuner_plugins.models.export.files import chat_template
    system = edited(tmp_path / 'a', setup, lambda c: c.update(system_message='Answer in one word.'))
    other = edited(tmp_path / 'b', setup, lambda c: None)
    os.remove(other / 'chat_template.jinja')
    tok = json.loads((other / 'tokenizer_config.json').read_text())
    tok['chat_template'] = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    (other / 'tokenizer_config.json').write_text(json.dumps(tok))
    for folder, says, expected in (
            (system, "the chat template's default system message (config.json's system_message, which chat() uses)",
             chat_template('internvl2_5', 'Answer in one word.')),
            (other, "the chat template (internvl2_5, as chat() prompts; the tokenizer's own is not it)",
             chat_template('internvl2_5'))):
        out = folder.parent / 'gguf'
        assert convert(folder, out, '--format', 'gguf') == 0
        assert says in capsys.readouterr().out
        assert gguf_chat_template(str(out / 'gguf-F16.gguf')) == expected


def test_a_video_is_asked_as_the_official_folder_asks_it(setup, tmp_path, capsys):
    """A GGUF folder refused every video. Its mmproj now records the frame prefix the model was trained with (here
    not the default), and each frame goes to llama.cpp stretched to one tile as InternVL's video path makes it (a
    frame of another size than the tile included): the answers are the official folder's, and chat takes
    ``--video``."""
    from xtuner_plugins.models.export.gguf_convert import FRAME_PREFIX_KEY
    from xtuner_plugins.models.gguf_model import VISION_KEYS, gguf_keys
    assert gguf_keys(gguf_pair(setup['f32'])[1], VISION_KEYS)[FRAME_PREFIX_KEY] == 'Frame{i}: '   # the default
    folder = edited(tmp_path, setup, lambda c: c.update(frame_prefix='Clip {i} - '))
    out = tmp_path / 'gguf'
    assert convert(folder, out, '--format', 'gguf', '--quant', 'f32') == 0
    capsys.readouterr()
    # (frames on which the random model's answers are mostly decided: on others its top two logits are often
    # closer than the two libraries' rounding, and too few tokens could be compared)
    frames = [write_image(tmp_path / 'frames' / f'{i}.png', size=size, seed=40 + i)
              for i, size in enumerate([(90, 40), (56, 56)])]
    questions = QUESTIONS + ('What happens?', 'Describe the video.')
    official = ConvertedModel(str(folder))
    expected = {q: official_greedy(official, None, q, video=frames) for q in questions}
    model = GGUFModel(str(out))
    try:
        assert model.vision[FRAME_PREFIX_KEY] == 'Clip {i} - '
        # what llama.cpp is given: the official folder's frame tiles (one each, stretched), and its frame lines
        tiles, counts = official.pixels(frames, [True, True])
        given, _ = official.pixels(model.frames_of(frames), [True, True])
        assert counts == [1, 1] and [im.size for im in model.frames_of(frames)] == [(56, 56)] * 2
        assert torch.equal(given, tiles)
        assert model.video_question('<video>\nWhat happens?', 2) == ('Clip 1 - <image>\nClip 2 - <image>\nWhat '
                                                                    'happens?')
        got = {}
        for q in questions:
            model.reset()
            got[q] = (model.ask(q, [], dict(max_new_tokens=STEPS), video=frames), model.last_tokens)
    finally:
        model.close()
    assert_answers_alike(got, expected)
    video = tmp_path / 'frames'   # a folder of frames: chat's --video reads them in order
    assert chat_main([str(out), '--video', str(video), '--prompt', QUESTIONS[0], '--max-new-tokens',
                      str(STEPS)]) == 0
    assert capsys.readouterr().out.rstrip('\n') == got[QUESTIONS[0]][0]


def test_a_gguf_folder_without_a_frame_prefix_or_with_too_many_frames_refuses_before_a_frame_is_decoded():
    """Chat and eval ask ``check_video`` first: an mmproj that records no frame prefix (written before videos were
    answered, or by another converter) refuses any video there, in one line; one that does refuses more frames
    than the context holds (``--frames 1000000000`` listed a billion frame numbers first)."""
    from xtuner_plugins.models.prompt import NoVideo, PromptTooLong
    model = GGUFModel.__new__(GGUFModel)
    model.mmproj_file, model.model_file, model.context, model.messages = '/x/mmproj-m-F16.gguf', '/x/m.gguf', 4096, []
    model.vision = {'clip.vision.image_size': 448, 'clip.vision.patch_size': 14}
    with pytest.raises(NoVideo, match=r'^mmproj-m-F16.gguf records no video frame prefix \(xtuner_plugins.frame_'
                                      r'prefix\) or tile size: convert the official folder to GGUF again'):
        model.check_video(8)
    model.vision.update({'xtuner_plugins.frame_prefix': 'Frame{x}: '})
    with pytest.raises(NoVideo, match=r"records no video frame prefix \(xtuner_plugins.frame_prefix: 'Frame\{x\}"):
        model.check_video(8)
    model.vision.update({'xtuner_plugins.frame_prefix': 'Frame{i}: ', 'clip.vision.projector.scale_factor': 2})
    model.check_video(15)   # 15 x (256 + 2) tokens
    with pytest.raises(PromptTooLong, match=r'^the prompt is at least 4128 tokens, over the LLM\'s context of 4096 '
                                            r'tokens \(/x/m.gguf .*lower --frames \(frames of a video\)$'):
        model.check_video(16)


def test_a_worker_that_fails_to_load_says_llama_cpps_error_and_the_exception_only():
    """A model file cut after its header: 'llama.cpp did not load it:   File ".../_internals.py", line 62, in
    __init__;     raise ValueError(...); ValueError: ...' before; now llama.cpp's error line and the exception."""
    import subprocess
    import sys
    import tempfile
    model = GGUFModel.__new__(GGUFModel)
    model.worker = subprocess.Popen([sys.executable, '-c', 'pass'])
    model.worker.wait()
    model.log = tempfile.TemporaryFile(mode='w+', encoding='utf-8')
    model.log.write('llama_model_loader: loaded meta data with 30 key-value pairs\n'
                    'llama_model_load: error loading model: tensor \'token_embd.weight\' data is not within the file '
                    'bounds, model is corrupted or incomplete\n'
                    'Traceback (most recent call last):\n  File "/x/_internals.py", line 62, in __init__\n'
                    '    raise ValueError(f"Failed to load model from file: {path_model}")\n'
                    'ValueError: Failed to load model from file: /m/m.gguf\n')
    assert model._problem() == (
        "llama_model_load: error loading model: tensor 'token_embd.weight' data is not within the file bounds, model "
        "is corrupted or incomplete; ValueError: Failed to load model from file: /m/m.gguf")
    model.log.close()


# llama.cpp's image embeddings (the mmproj's output, before the LLM) of one image, read through llama-cpp-python's
# mtmd in the GGUF venv: the embeddings of the image chunk a one-image chat prompt encodes
EMBEDDINGS = '''
import glob, json, sys
import llama_cpp.mtmd_cpp as mtmd
from llama_cpp import Llama
from llama_cpp.llama_chat_format import MTMDChatHandler
folder, image = sys.argv[1:3]
model = [p for p in glob.glob(folder + '/*.gguf') if not p.split('/')[-1].startswith('mmproj')][0]
handler = MTMDChatHandler(clip_model_path=glob.glob(folder + '/mmproj*.gguf')[0], verbose=False, use_gpu=False)
llm = Llama(model_path=model, chat_handler=handler, n_ctx=2048, n_gpu_layers=0, verbose=False, seed=0, n_threads=1)
out, chunk_eval = [], mtmd.mtmd_helper_eval_chunk_single

def encoded(ctx, lctx, chunk, *args):
    n, width = mtmd.mtmd_input_chunk_get_n_tokens(chunk), llm.n_embd()
    assert mtmd.mtmd_encode_chunk(ctx, chunk) == 0
    e = mtmd.mtmd_get_output_embd(ctx)
    out.append([[e[i * width + j] for j in range(width)] for i in range(n)])
    return chunk_eval(ctx, lctx, chunk, *args)

mtmd.mtmd_helper_eval_chunk_single = encoded
with open(image, 'rb') as f:
    import base64
    url = 'data:image/png;base64,' + base64.b64encode(f.read()).decode()
llm.create_chat_completion(messages=[{'role': 'user', 'content': [{'type': 'image_url', 'image_url': {'url': url}},
                                                                  {'type': 'text', 'text': 'x'}]}], max_tokens=1)
print('RESULT ' + json.dumps(out[0]))
'''


def test_the_mmprojs_image_features_are_the_trained_models(setup):
    """llama.cpp's InternVL graph puts the class token after the patches and adds the position rows in order: with
    the rows written as they are, each patch took its neighbour's, and the image features were 4-7% off the official
    folder's (the answers above still agreed where the random model's choice was clear). Written with the class
    token's row last (``gguf_convert.py``), they match to rounding."""
    import subprocess
    import sys

    official = ConvertedModel(setup['folder'])
    python, tree = gguf_export.tools()
    mmproj = os.path.join(setup['f32'], next(p for p in os.listdir(setup['f32']) if p.startswith('mmproj')))
    read = ('import sys; sys.path.insert(0, sys.argv[1]); from gguf import GGUFReader; '
            'print(bytes(GGUFReader(sys.argv[2]).fields[sys.argv[3]].parts[-1]).decode())')
    key = subprocess.run([sys.executable, '-c', read, os.path.join(tree, 'gguf-py'), mmproj,
                          'xtuner_plugins.position_embd.cls_row'], capture_output=True, text=True, timeout=120)
    assert key.stdout.strip() == 'last', key.stderr[-2000:]
    for image in setup['images'][:2]:
        out = subprocess.run([python, '-c', EMBEDDINGS, setup['f32'], image], capture_output=True, text=True,
                             timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
        got = torch.tensor(json.loads(next(line[7:] for line in out.stdout.splitlines() if line.startswith('RESULT '))))
        pixels, _ = official.pixels([image], [False])
        with torch.no_grad():
            expected = official.model.extract_feature(pixels.float())[0]
        assert got.shape == expected.shape
        assert float((got - expected).norm() / expected.norm()) < 2e-3


@pytest.mark.parametrize('legacy', [True, False])
def test_a_sentencepiece_tokenizer_without_a_word_start_after_markers_is_told(tmp_path, legacy):
    """llama.cpp puts a word start ('▁') after every special token of a SentencePiece vocabulary (add_space_prefix);
    a tokenizer with legacy=False puts none there, so 168 of 177 prompt positions differed from training's in a
    sweep, without a word. The export now says so (a fix waits: docs/conversion.md)."""
    from xtuner_plugins.data.template import add_internvl_tokens
    from xtuner_plugins.tiny.sentencepiece_tokenizer import build_tiny_sentencepiece_tokenizer
    tokenizer = build_tiny_sentencepiece_tokenizer(legacy=legacy, folder=str(tmp_path))
    add_internvl_tokens(tokenizer)
    tokenizer.save_pretrained(tmp_path / 'folder')
    assert gguf_export.spaces_after_specials(str(tmp_path / 'folder')) is legacy
    assert gguf_export.spaces_after_specials(str(tmp_path / 'spm_missing')) is None


@pytest.mark.parametrize('arch', ['LlamaForCausalLM', 'Phi3ForCausalLM'])
def test_a_gguf_of_a_tokenizer_without_a_word_start_after_markers_says_so_in_any_family(tmp_path, arch):
    """A SentencePiece tokenizer with legacy=False: the staged tokenizer_config.json says add_prefix_space false
    (llama.cpp's Llama converter reads it), and the GGUF's add_space_prefix is false for Phi-3 too, whose converter
    does not read it (its prompts had differed from training's after every marker, said in a WARNING line only);
    with a legacy tokenizer the key is left to the converter (true, or unset: llama.cpp's default)."""
    import subprocess
    import sys
    from xtuner_plugins.data.template import add_internvl_tokens
    from xtuner_plugins.tiny.sentencepiece_tokenizer import build_tiny_sentencepiece_tokenizer
    need_llama_cpp()
    _, tree = gguf_export.tools()
    for legacy in (False, True):
        folder = tmp_path / f'legacy_{legacy}'
        tokenizer = build_tiny_sentencepiece_tokenizer(legacy=legacy, folder=str(tmp_path))
        add_internvl_tokens(tokenizer)
        tokenizer.save_pretrained(folder)
        llm = {'architectures': [arch], 'model_type': arch[:-len('ForCausalLM')].lower(), 'vocab_size': len(tokenizer),
               'hidden_size': 64, 'intermediate_size': 128, 'num_hidden_layers': 1, 'num_attention_heads': 4,
               'num_key_value_heads': 4, 'max_position_embeddings': 512, 'rms_norm_eps': 1e-5}
        (folder / 'config.json').write_text(json.dumps({
            'architectures': ['InternVLChatModel'], 'template': 'internvl2_5',
            'vision_config': {'architectures': ['InternVisionModel']}, 'llm_config': llm}))
        said = []
        gguf_export.stage(str(folder), str(tmp_path / f'staged_{legacy}'), log=said.append)
        with open(tmp_path / f'staged_{legacy}' / 'tokenizer_config.json') as f:
            assert (json.load(f).get('add_prefix_space') is False) is not legacy
        assert not any(line.startswith('WARNING: ') for line in said), said
        text = tmp_path / f'text_{legacy}'   # the LLM alone, as the converter reads it for the GGUF's vocabulary
        text.mkdir()
        for name in os.listdir(tmp_path / f'staged_{legacy}'):
            if name != 'config.json':
                os.symlink(os.path.realpath(tmp_path / f'staged_{legacy}' / name), text / name)
        (text / 'config.json').write_text(json.dumps(llm))
        out = subprocess.run([sys.executable, os.path.join(gguf_export.HERE, 'gguf_convert.py'), tree, '-', '--',
                              str(text), '--vocab-only', '--outfile', str(tmp_path / f'{legacy}.gguf')],
                             capture_output=True, text=True, timeout=300)
        assert out.returncode == 0 and 'Duplicated key' not in out.stdout + out.stderr, out.stderr[-2000:]
        sys.path.insert(0, os.path.join(tree, 'gguf-py'))
        try:
            import gguf
            field = gguf.GGUFReader(str(tmp_path / f'{legacy}.gguf')).fields.get('tokenizer.ggml.add_space_prefix')
        finally:
            sys.path.remove(os.path.join(tree, 'gguf-py'))
        value = None if field is None else field.contents()
        assert value is False if not legacy else value in (None, True), (legacy, value)
