import hashlib
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def digest(folder):
    h = hashlib.sha256()
    for name in sorted(os.listdir(folder)):
        if name.endswith(('.safetensors', '.json')):
            with open(os.path.join(folder, name), 'rb') as f:
                h.update(name.encode() + f.read())
    return h.hexdigest()


def test_writes_both_checkpoints_in_their_real_layouts_deterministically(tmp_path):
    for out in ('a', 'b'):
        result = subprocess.run([sys.executable, 'tools/make_tiny_models.py', str(tmp_path / out)], cwd=ROOT,
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr[-2000:]
    vit = json.load(open(tmp_path / 'a' / 'internvit' / 'config.json'))
    assert vit['model_type'] == 'intern_vit_6b' and vit['architectures'] == ['InternVisionModel']
    assert vit['auto_map']['AutoModel'] == 'modeling_intern_vit.InternVisionModel'
    llm = json.load(open(tmp_path / 'a' / 'llm' / 'config.json'))
    assert llm['architectures'] == ['Qwen2ForCausalLM'] and llm['tie_word_embeddings'] is True
    tok = json.load(open(tmp_path / 'a' / 'llm' / 'tokenizer_config.json'))
    assert tok['tokenizer_class'] == 'Qwen2Tokenizer' and tok['eos_token'] == '<|im_end|>'
    for part in ('internvit', 'llm'):
        assert digest(tmp_path / 'a' / part) == digest(tmp_path / 'b' / part), part


def test_head_options_set_the_heads_and_bad_ones_are_one_line_errors(tmp_path):
    """--llm-heads 2 --llm-kv-heads 1: 32-wide heads, which vLLM's CPU build serves (docs/serving.md)."""
    def run(*options):
        return subprocess.run([sys.executable, 'tools/make_tiny_models.py', str(tmp_path / 'out'), *options],
                              cwd=ROOT, capture_output=True, text=True, timeout=120)
    result = run('--llm-heads', '2', '--llm-kv-heads', '1', '--vision-heads', '2', '--llm', 'qwen3')
    assert result.returncode == 0, result.stderr[-2000:]
    llm = json.load(open(tmp_path / 'out' / 'llm' / 'config.json'))
    assert (llm['num_attention_heads'], llm['num_key_value_heads'], llm['head_dim']) == (2, 1, 32)
    assert json.load(open(tmp_path / 'out' / 'internvit' / 'config.json'))['num_attention_heads'] == 2
    for options, line in (
            (['--llm-heads', '3'], '--llm-heads 3: the tiny LLM is 64 wide, so its heads must divide 64 (1, 2, 4,'),
            (['--vision-heads', '0'], '--vision-heads 0: the tiny vision encoder is 64 wide, so its heads must '
                                      'divide 64'),
            (['--llm-heads', '2', '--llm-kv-heads', '4'], '--llm-kv-heads 4: must divide --llm-heads 2'),
            (['--image-size', '50'], '--image-size 50: image_size 50 must be a multiple of patch_size 14')):
        result = run(*options)
        assert result.returncode == 2 and result.stderr.startswith('make_tiny_models: error: ' + line), result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_siglip_and_clip_take_a_tile_size_between_patches_as_the_docs_say(tmp_path):
    """docs/families.md: SigLIP and CLIP also take sizes between multiples of the patch, whose grid floors (as
    SigLIP-384's 27 x 27 does). The command refused them all ('must be a multiple of patch_size 14'); InternViT's
    still must be a multiple."""
    def run(out, *options):
        return subprocess.run([sys.executable, 'tools/make_tiny_models.py', str(tmp_path / out), *options],
                              cwd=ROOT, capture_output=True, text=True, timeout=120)
    for vision in ('clip', 'siglip'):
        result = run(vision, '--vision', vision, '--image-size', '60')
        assert result.returncode == 0, result.stderr[-2000:]
        assert json.load(open(tmp_path / vision / vision / 'config.json'))['vision_config']['image_size'] == 60
    result = run('internvit', '--image-size', '60')
    assert result.returncode == 2 and result.stderr.startswith(
        'make_tiny_models: error: --image-size 60: image_size 60 must be a multiple of patch_size 14'), result.stderr


def test_chat_gives_the_llm_another_familys_tokenizer(tmp_path):
    """--chat llama3: Llama 3 Instruct's special tokens, bos added, eos <|eot_id|>, no pad, its own chat template;
    the model's config names that bos and eos."""
    from transformers import AutoTokenizer
    result = subprocess.run([sys.executable, 'tools/make_tiny_models.py', str(tmp_path / 'out'), '--llm', 'llama',
                             '--chat', 'llama3'], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    folder = str(tmp_path / 'out' / 'llm')
    tok = AutoTokenizer.from_pretrained(folder)
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ('<|begin_of_text|>', '<|eot_id|>', None)
    assert tok('a').input_ids[0] == tok.bos_token_id
    assert tok.apply_chat_template([{'role': 'user', 'content': 'Hi'}], tokenize=False, add_generation_prompt=True) == \
        '<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant' \
        '<|end_header_id|>\n\n'
    llm = json.load(open(os.path.join(folder, 'config.json')))
    assert llm['architectures'] == ['LlamaForCausalLM']
    assert (llm['bos_token_id'], llm['eos_token_id']) == (tok.bos_token_id, tok.eos_token_id)


def test_a_gemma3_llm_with_gemmas_tokenizer(tmp_path):
    """--llm gemma3 --chat gemma: Gemma 3's text LLM (sliding-window layers and a full one) with Gemma's special
    tokens, bos <bos> added, eos <eos>, pad <pad>, and Gemma 3's own template (a system message opens the first user
    turn)."""
    from transformers import AutoTokenizer
    result = subprocess.run([sys.executable, 'tools/make_tiny_models.py', str(tmp_path / 'out'), '--llm', 'gemma3',
                             '--chat', 'gemma'], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    folder = str(tmp_path / 'out' / 'llm')
    tok = AutoTokenizer.from_pretrained(folder)
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ('<bos>', '<eos>', '<pad>')
    assert tok('a').input_ids[0] == tok.bos_token_id
    messages = [{'role': 'system', 'content': 'Be brief.'}, {'role': 'user', 'content': 'Hi'}]
    assert tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == \
        '<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\n'
    llm = json.load(open(os.path.join(folder, 'config.json')))
    assert llm['architectures'] == ['Gemma3ForCausalLM']
    assert llm['layer_types'] == ['sliding_attention', 'full_attention'] and llm['sliding_window'] == 512
    assert (llm['bos_token_id'], llm['eos_token_id']) == (tok.bos_token_id, tok.eos_token_id)


def test_folders_holding_files_are_refused_unless_overwrite(tmp_path):
    """Run over a folder of models it replaced their files without asking (a real model's config.json, a shard
    deleted by save_pretrained), and checkpoints trained on tiny/ stopped converting (an adversarial sweep)."""
    def run(*options):
        return subprocess.run([sys.executable, 'tools/make_tiny_models.py', str(tmp_path / 'out'), *options],
                              cwd=ROOT, capture_output=True, text=True, timeout=120)
    (tmp_path / 'out' / 'llm').mkdir(parents=True)
    (tmp_path / 'out' / 'llm' / 'config.json').write_text('{"my": "precious real config"}')
    result = run()
    assert result.returncode == 2 and result.stderr.strip() == (
        f'make_tiny_models: error: {tmp_path / "out" / "llm"} is there already (config.json): its files would be '
        'replaced, and checkpoints trained on it would no longer convert; give another OUT_DIR, or --overwrite')
    assert (tmp_path / 'out' / 'llm' / 'config.json').read_text() == '{"my": "precious real config"}'
    assert not (tmp_path / 'out' / 'internvit').exists()
    result = run('--overwrite')
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.load(open(tmp_path / 'out' / 'llm' / 'config.json'))['architectures'] == ['Qwen2ForCausalLM']
    assert run().returncode == 2   # its own output too: a second run with another seed would replace it


def test_overwrite_replaces_the_folders_whole_and_never_writes_through_a_link(tmp_path):
    """``--overwrite`` wrote into ``OUT/llm`` where it stood: through a link into the real model folder it pointed at
    (its config and tokenizer replaced, its weight shard deleted, its index left), and beside an old folder's
    files. A link is refused; a folder is replaced whole, by one written aside first."""
    def run(*options):
        return subprocess.run([sys.executable, 'tools/make_tiny_models.py', str(tmp_path / 'out'), *options],
                              cwd=ROOT, capture_output=True, text=True, timeout=120)
    real = tmp_path / 'shared' / 'Qwen-7B'
    real.mkdir(parents=True)
    files = {'config.json': '{"hidden_size": 3584}', 'model-00001-of-00002.safetensors': 'REAL',
             'model.safetensors.index.json': '{}'}
    for name, text in files.items():
        (real / name).write_text(text)
    (tmp_path / 'out').mkdir()
    os.symlink(real, tmp_path / 'out' / 'llm')
    result = run('--overwrite')
    assert result.returncode == 2 and result.stderr.strip() == (
        f'make_tiny_models: error: {tmp_path}/out/llm is a link to {real}: the tiny models are written into OUT_DIR '
        'itself, never through a link (--overwrite too); remove the link, or give another OUT_DIR')
    assert {p.name: p.read_text() for p in real.iterdir()} == files
    os.remove(tmp_path / 'out' / 'llm')
    (tmp_path / 'out' / 'internvit').mkdir()
    (tmp_path / 'out' / 'internvit' / 'preprocessor_config.json').write_text('{}')   # a SigLIP tiny's, stale after
    assert run('--overwrite').returncode == 0
    assert sorted(os.listdir(tmp_path / 'out' / 'internvit')) == ['config.json', 'model.safetensors']
    assert sorted(os.listdir(tmp_path / 'out')) == ['internvit', 'llm']


def test_overwrite_replaces_only_earlier_tiny_models_and_both_or_neither(tmp_path):
    """``--overwrite`` deleted a real model's folder (its README, sharded weights, code: files no tiny model
    writes), and with a file in ``llm``'s place it replaced the vision folder before the move of ``llm`` failed.
    Both are checked before either is touched; a move that fails puts the old folders back."""
    from xtuner_plugins.cli.make_tiny_models import written_aside

    def run(*options):
        return subprocess.run([sys.executable, 'tools/make_tiny_models.py', str(out), *options],
                              cwd=ROOT, capture_output=True, text=True, timeout=120)
    out = tmp_path / 'out'
    (out / 'internvit').mkdir(parents=True)
    (out / 'internvit' / 'real_weights.bin').write_text('REAL')
    (out / 'internvit' / 'config.json').write_text('{"real": 1}')
    (out / 'llm').write_text('a file')
    for refused in (f'{out}/internvit holds what no tiny model writes (real_weights.bin): --overwrite replaces only '
                    f'earlier tiny models; give another OUT_DIR',
                    f'{out}/llm is a file, not a folder: remove it, or give another OUT_DIR'):
        result = run('--overwrite')
        assert result.returncode == 2 and result.stderr.strip() == f'make_tiny_models: error: {refused}'
        assert (out / 'internvit' / 'config.json').read_text() == '{"real": 1}'
        (out / 'internvit' / 'real_weights.bin').unlink(missing_ok=True)
    os.remove(out / 'llm')
    (out / 'llm').mkdir()
    with open(out / 'llm' / 'model.safetensors', 'wb') as f:   # a real model's size (sparse: no disk taken)
        f.truncate(3 << 30)
    result = run('--overwrite')
    assert result.returncode == 2 and 'holds what no tiny model writes (model.safetensors of 3.0 GiB)' in result.stderr
    os.remove(out / 'llm' / 'model.safetensors')
    (out / 'llm' / 'config.json').write_text('{"old": 1}')

    def half(tmp):   # the vision folder written, the LLM's not: its move fails after the vision folder's
        os.mkdir(os.path.join(tmp, 'internvit'))
        return {}
    with pytest.raises(FileNotFoundError):
        written_aside(str(out), ('internvit', 'llm'), half)
    assert (out / 'internvit' / 'config.json').read_text() == '{"real": 1}'
    assert (out / 'llm' / 'config.json').read_text() == '{"old": 1}'
    assert sorted(os.listdir(out)) == ['internvit', 'llm']


def test_a_folder_that_cannot_be_written_is_one_line(tmp_path):
    """A folder this user cannot write (or a full disk) was a traceback; here a file where a folder must be made
    stands in for it (the tests run as root, who may write anywhere)."""
    (tmp_path / 'f').write_text('')
    result = subprocess.run([sys.executable, 'tools/make_tiny_models.py', str(tmp_path / 'f' / 'tiny')], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and 'Traceback' not in result.stderr, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1] == (
        f'make_tiny_models: error: {tmp_path}/f/tiny cannot be written: Not a directory ({tmp_path}/f/tiny)')


def test_an_out_dir_through_a_link_leading_nowhere_is_one_line(tmp_path, capsys):
    """A folder under a link to nothing was 'cannot be written: No such file or directory', a link loop 'File
    exists': said as the link they are (xtuner_plugins/links.py), nothing made."""
    from xtuner_plugins.cli.make_tiny_models import main
    os.symlink(tmp_path / 'gone', tmp_path / 'dangling')
    os.symlink(tmp_path / 'loop', tmp_path / 'loop')
    assert main([str(tmp_path / 'dangling' / 'tiny')]) == 2
    assert capsys.readouterr().err == (f'make_tiny_models: error: {tmp_path}/dangling/tiny lies under '
                                       f'{tmp_path}/dangling, a symbolic link to {tmp_path}/gone, which does not '
                                       'exist: give the folder itself, or make the link\'s target first\n')
    assert main([str(tmp_path / 'loop')]) == 2
    assert capsys.readouterr().err == (f'make_tiny_models: error: {tmp_path}/loop is a symbolic link loop '
                                       f'({tmp_path}/loop -> {tmp_path}/loop -> ...): give the folder itself\n')
    assert not (tmp_path / 'gone').exists()


def file_size_limit(limit):
    """A ``preexec_fn`` that makes a write past ``limit`` bytes fail as a full disk would (EFBIG, SIGXFSZ off)."""
    def apply():
        import resource
        import signal
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def test_weights_the_disk_cannot_take_are_one_line(tmp_path):
    """safetensors' own error for a write the disk refused is not an OSError: a full disk (here a file-size limit)
    ended make_tiny_models and the demo in a traceback (a helper's sweep)."""
    result = subprocess.run([sys.executable, 'tools/make_tiny_models.py', str(tmp_path / 'tiny')], cwd=ROOT,
                            capture_output=True, text=True, timeout=120, preexec_fn=file_size_limit(64 << 10))
    assert result.returncode == 2 and 'Traceback' not in result.stderr, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1] == (
        f'make_tiny_models: error: {tmp_path}/tiny cannot be written: Error while serializing: I/O error: File too '
        'large (os error 27)')
    result = subprocess.run([sys.executable, 'tools/demo.py', '--recipe', 'quick', '--work-dir', str(tmp_path / 'd')],
                            cwd=ROOT, capture_output=True, text=True, timeout=300,
                            preexec_fn=file_size_limit(64 << 10))
    out = result.stdout + result.stderr
    assert result.returncode == 1 and 'Traceback' not in out, out[-2000:]
    assert out.strip().splitlines()[-1] == (
        f'demo failed: what it writes under {tmp_path}/d could not be written: Error while serializing: I/O error: '
        'File too large (os error 27)')


def test_every_file_a_tiny_model_writes_is_one_overwrite_replaces(tmp_path):
    """``TINY_FILES`` lists what a tiny model's folders hold, of every --vision, --llm and --chat: a name missing
    from it would make ``--overwrite`` refuse an earlier tiny model of another family as a real model."""
    from xtuner_plugins.cli.make_tiny_models import TINY_FILES
    from xtuner_plugins.tiny import TINY_LLM_ARCHS, TINY_VISION_TYPES, make_tiny_models
    from xtuner_plugins.tiny.tokenizer import CHAT_FAMILIES
    written = set()
    kinds = ([dict(vision=v) for v in TINY_VISION_TYPES] + [dict(llm=a) for a in TINY_LLM_ARCHS]
             + [dict(chat=c) for c in sorted(CHAT_FAMILIES)])
    for i, kind in enumerate(kinds):
        make_tiny_models(str(tmp_path / str(i)), **kind)
        for folder in os.listdir(tmp_path / str(i)):
            written.update(os.listdir(tmp_path / str(i) / folder))
    assert written <= TINY_FILES, sorted(written - TINY_FILES)


def test_sizes_and_seeds_out_of_range_are_one_line_and_leave_no_folder(tmp_path, monkeypatch):
    """Before: --image-size 0 wrote image_size 0, 140000 asked 25.6 GB, 1.4e20 a C++ TypeError; --seed 10**20 was
    said as '--image-size 56: Overflow ...'; each left an empty OUT_DIR."""
    from xtuner_plugins.cli.make_tiny_models import main
    out = str(tmp_path / 'out')
    for options, line in ((['--image-size', '0'], '--image-size 0: give a tile side from 14 to 1022 pixels'),
                          (['--image-size', '140000'], '--image-size 140000: give a tile side from 14 to 1022'),
                          (['--seed', '100000000000000000000'], '--seed 100000000000000000000: give a whole number '
                                                                 'from 0 to 18446744073709551615')):
        result = subprocess.run([sys.executable, 'tools/make_tiny_models.py', out, *options], cwd=ROOT,
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 2 and result.stderr == f'make_tiny_models: error: {line}' + \
            result.stderr[len(f'make_tiny_models: error: {line}'):] and result.stderr.count('\n') == 1, result.stderr
        assert not os.path.lexists(out), options
    import xtuner_plugins.cli.make_tiny_models as cli

    def full(*args, **kwargs):
        raise OSError(28, 'No space left on device')
    monkeypatch.setattr(cli, 'make_tiny_models', full)   # a write that fails: the folder it made goes too
    assert main([out]) == 2 and not os.path.lexists(out)


def test_a_second_run_into_a_folder_another_is_writing_is_refused(tmp_path, capsys):
    """Two runs into one new folder at once both wrote, the later replacing the earlier's models."""
    from xtuner_plugins.cli.make_tiny_models import main, writing
    out = str(tmp_path / 'out')
    with writing(out):   # another run's hold
        assert main([out]) == 2
        assert capsys.readouterr().err == (f'make_tiny_models: error: {out}: another make_tiny_models run is writing '
                                           'into it; wait for it to end, or give another OUT_DIR\n')
        assert os.listdir(out) == ['.make_tiny_models.lock']
    assert os.listdir(out) == []
