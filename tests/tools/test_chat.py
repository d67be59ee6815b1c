"""Chatting with a converted folder: the official ``chat`` / ``batch_chat`` of the remote code and tools/chat.py.

The answers are those of the training model: the prompt ``chat`` builds is token for token the prompt the
training pipeline builds for the same question, and greedy ``chat`` output equals a greedy decode with the
training model's forward (``test_export_families.greedy_with_training_model``).
"""

import json

import pytest
import torch

from tests.helpers import lora_trained_tiny, write_image
from tests.tools.test_convert_to_official import LORA, as_args, convert
from tests.tools.test_export_families import greedy_with_training_model
from tools.chat import main as chat_main
from xtuner_plugins.data.image_io import load_image, load_image_tiles
from xtuner_plugins.data.tokenize import tokenize_conversation


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp('chat')
    trained = lora_trained_tiny(root)
    folder = convert(LORA, trained['ckpt'], root / 'official', trained['opts'])
    from transformers import AutoModel, AutoTokenizer
    official = AutoModel.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    images = [write_image(root / 'img' / f'{i}.png', size=size, seed=i)
              for i, size in enumerate([(120, 60), (50, 90), (56, 56)])]
    return dict(trained, folder=folder, official=official, tokenizer=tokenizer, images=images)


def tiles(path):
    return load_image_tiles(path, image_size=56, max_num=4, use_thumbnail=True)


def captured_prompt(setup, pixel_values, question, monkeypatch):
    seen = {}

    def fake_generate(pixel_values=None, input_ids=None, attention_mask=None, **kwargs):
        seen['ids'] = input_ids
        return torch.tensor([[setup['tokenizer'].convert_tokens_to_ids('<|im_end|>')]])

    monkeypatch.setattr(setup['official'], 'generate', fake_generate)
    setup['official'].chat(setup['tokenizer'], pixel_values, question, dict(max_new_tokens=1))
    return seen['ids'][0].tolist()


def training_prompt(tokenizer, pixel_values, question, system=None):
    """The ids the training pipeline puts before the answer of a one-image question."""
    conversation = [{'from': 'human', 'value': '<image>\n' + question}, {'from': 'gpt', 'value': 'x'}]
    sample = tokenize_conversation(conversation, tokenizer, [4 * pixel_values.shape[0]], 'internvl2_5',
                                   system=system)
    first_answer = next(i for i, label in enumerate(sample['labels']) if label != -100)
    return list(sample['input_ids'][:first_answer])


def test_chat_prompt_is_the_training_prompt(setup, monkeypatch):
    pixel_values = tiles(setup['images'][0])
    got = captured_prompt(setup, pixel_values, 'What is it?', monkeypatch)
    assert got == training_prompt(setup['tokenizer'], pixel_values, 'What is it?')


def test_greedy_chat_equals_the_training_models_greedy_decode(setup):
    for path in setup['images'][:2]:
        pixel_values = tiles(path)
        expected = greedy_with_training_model(setup['model'], load_image(path), 'Describe the image.', steps=8)
        got = setup['official'].chat(setup['tokenizer'], pixel_values, 'Describe the image.',
                                     dict(max_new_tokens=8, do_sample=False))
        assert got == expected and got


def test_batch_chat_equals_chat(setup):
    official, tokenizer = setup['official'], setup['tokenizer']
    pixel = [tiles(p) for p in setup['images']]
    questions = ['Describe the image.', 'What colour is it?', 'Hi']
    config = dict(max_new_tokens=6, do_sample=False)
    single = [official.chat(tokenizer, px, q, dict(config)) for px, q in zip(pixel, questions)]
    batched = official.batch_chat(tokenizer, torch.cat(pixel), questions, dict(config),
                                  num_patches_list=[px.shape[0] for px in pixel])
    assert batched == single and any(batched)


def test_chat_history_and_several_images(setup):
    official, tokenizer = setup['official'], setup['tokenizer']
    a, b = tiles(setup['images'][0]), tiles(setup['images'][1])
    answer, history = official.chat(tokenizer, torch.cat([a, b]), 'Image-1: <image>\nImage-2: <image>\nCompare.',
                                    dict(max_new_tokens=4), num_patches_list=[len(a), len(b)],
                                    return_history=True)
    assert history == [('Image-1: <image>\nImage-2: <image>\nCompare.', answer)]
    follow, history = official.chat(tokenizer, torch.cat([a, b]), 'And now?', dict(max_new_tokens=4),
                                    num_patches_list=[len(a), len(b)], history=history, return_history=True)
    assert len(history) == 2
    with pytest.raises(ValueError, match='tiles'):
        official.chat(tokenizer, a, 'x', dict(max_new_tokens=1), num_patches_list=[len(a) + 1])


def test_a_saved_conversation_continues_alike_each_time(setup):
    """``resume`` of one saved conversation, twice: the first continuation does not change what was saved."""
    from xtuner_plugins.models.inference import ConvertedModel
    model, greedy = ConvertedModel(setup['folder']), dict(max_new_tokens=6, do_sample=False)
    model.ask('Describe the image.', [setup['images'][0]], greedy)
    saved = model.conversation()
    answers = []
    for _ in range(2):
        model.resume(saved)
        answers.append(model.ask('And now?', [], greedy))
        assert len(model.conversation()['history']) == 2
    assert len(saved['history']) == 1 and answers[0] == answers[1]


def test_chat_tool_one_shot_folder_and_config_agree(setup, capsys):
    image = setup['images'][0]
    expected = setup['official'].chat(setup['tokenizer'], tiles(image), 'Describe the image.',
                                      dict(max_new_tokens=8, do_sample=False))
    assert chat_main([setup['folder'], '--image', image, '--prompt', 'Describe the image.',
                      '--max-new-tokens', '8']) == 0
    assert capsys.readouterr().out.strip() == expected
    assert chat_main(['--config', LORA, '--checkpoint', setup['ckpt'], '--image', image, '--prompt',
                      'Describe the image.', '--max-new-tokens', '8', '--dtype', 'fp32']
                     + as_args(setup['opts'])) == 0
    assert capsys.readouterr().out.strip() == expected
    assert chat_main([setup['folder'], '--image', 'missing.png', '--prompt', 'x']) == 2
    # as a user runs it: stdout is the answer alone (the conversion's MMEngine log lines went there: capsys does not
    # see MMEngine's handler, a process's stdout does)
    import os
    import subprocess
    import sys

    from tests.train_utils import REPO_ROOT, train_env
    run = subprocess.run([sys.executable, os.path.join(REPO_ROOT, 'tools', 'chat.py'), '--config', LORA,
                          '--checkpoint', setup['ckpt'], '--image', image, '--prompt', 'Describe the image.',
                          '--max-new-tokens', '8', '--dtype', 'fp32'] + as_args(setup['opts']),
                         capture_output=True, text=True, env=train_env(), timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip() == expected and 'mmengine' in run.stderr, (run.stdout, run.stderr[-2000:])



def test_a_sampled_answer_is_the_same_from_the_checkpoint_and_its_folder(setup, capsys):
    """--do-sample --seed N was seeded before the model loaded: building it from --checkpoint draws random numbers
    (its fresh layers' initialisation), so the checkpoint and its converted folder sampled other answers with one
    seed (seen on a SigLIP + LLaVA MLP + Llama model: 'escriqu(escri{' against '...角ell large')."""
    args = ['--image', setup['images'][0], '--prompt', 'Describe the image.', '--max-new-tokens', '8',
            '--do-sample', '--temperature', '2.0', '--seed', '5', '--dtype', 'fp32']
    assert chat_main([setup['folder']] + args) == 0
    from_folder = capsys.readouterr().out.strip()
    assert from_folder
    assert chat_main(['--config', LORA, '--checkpoint', setup['ckpt']] + args + as_args(setup['opts'])) == 0
    assert capsys.readouterr().out.strip() == from_folder


def test_an_unreadable_weight_file_or_a_full_temporary_disk_is_one_line(setup, monkeypatch, capsys):
    """A folder another user converted (safetensors 0.8 wrote its weights 0600) gave chat, eval and the web demo a
    PermissionError traceback; a --checkpoint converted into a full temporary folder an OSError traceback. The
    tests run as root, which reads any file: the refusal the kernel gives another user is raised where the weights
    are first opened."""
    from xtuner_plugins.cli import tool_args
    from xtuner_plugins.models import folder as folder_module
    weights = f'{setup["folder"]}/model.safetensors'

    def refused(path):
        raise PermissionError(13, 'Permission denied', path)
    monkeypatch.setattr(folder_module, 'safetensors_problem', refused)
    assert chat_main([setup['folder'], '--prompt', 'x']) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == f"chat: error: [Errno 13] Permission denied: '{weights}'", err
    assert 'Traceback' not in err
    monkeypatch.undo()

    def full(*args, **kwargs):
        raise OSError(f'{args[4]}/model/model.safetensors: No space left on device (os error 28)')
    monkeypatch.setattr(tool_args, 'model_folder', full)
    assert chat_main(['--config', LORA, '--checkpoint', setup['ckpt'], '--prompt', 'x']
                     + as_args(setup['opts'])) == 2
    err = capsys.readouterr().err
    assert 'Traceback' not in err and 'No space left on device (os error 28); --checkpoint is converted into a ' \
        'temporary folder under ' in err and 'set TMPDIR to a folder on a disk with room' in err, err


def test_chat_tool_auto_dtype_is_bf16_on_a_cpu_with_native_bf16_for_a_large_model(setup, monkeypatch, capsys):
    from xtuner_plugins.models import compile as compiling
    from xtuner_plugins.models import inference
    loaded = []
    real = inference.ConvertedModel.__init__

    def spy(self, folder, dtype=torch.float32, *args, **kwargs):
        loaded.append(dtype)
        real(self, folder, dtype, *args, **kwargs)
    monkeypatch.setattr(inference.ConvertedModel, '__init__', spy)
    monkeypatch.setattr('xtuner_plugins.models.cpu_bf16.why_not', lambda: None)
    monkeypatch.setattr(compiling, 'AUTO_MIN_LLM_PARAMETERS', 1)        # the tiny folder counts as large
    args = [setup['folder'], '--image', setup['images'][0], '--prompt', 'Describe the image.', '--max-new-tokens', '2']
    assert chat_main(args) == 0
    err = capsys.readouterr().err
    assert loaded[-1] == torch.bfloat16 and '--dtype auto: bf16 on this CPU' in err, (loaded, err[-500:])
    assert chat_main(args + ['--dtype', 'fp32']) == 0                   # the setting that keeps fp32
    assert loaded[-1] == torch.float32 and 'bf16 on this CPU' not in capsys.readouterr().err
    monkeypatch.setattr(compiling, 'AUTO_MIN_LLM_PARAMETERS', 10 ** 8)  # the real threshold: tiny stays fp32
    assert chat_main(args) == 0
    assert loaded[-1] == torch.float32 and 'bf16 on this CPU' not in capsys.readouterr().err


def test_sigterm_removes_the_tools_temporary_folder(setup, monkeypatch, capsys):
    """The web demo (and chat, eval) killed by SIGTERM left its temporary folder, with --checkpoint the whole
    converted model; now SIGTERM unwinds run_tool as Ctrl-C does: the folder removed, one line, exit 143."""
    import os
    import signal
    import tempfile
    import time

    from xtuner_plugins.cli import tool_args
    made = []
    real = tempfile.TemporaryDirectory

    def recorded(*args, **kwargs):
        made.append(real(*args, **kwargs))
        return made[-1]
    monkeypatch.setattr(tool_args.tempfile, 'TemporaryDirectory', recorded)

    def use(model):
        assert os.path.isdir(made[-1].name)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)   # the handler raises here at once
    args = tool_args.argparse.Namespace(folder=setup['folder'], config=None, checkpoint=None, cfg_options=None,
                                        remap=[], dtype='fp32', device='cpu')
    before = signal.getsignal(signal.SIGTERM)
    assert tool_args.run_tool(args, 'web_demo', use) == 143
    assert 'web_demo: stopped by SIGTERM' in capsys.readouterr().err
    assert not os.path.exists(made[-1].name) and signal.getsignal(signal.SIGTERM) is before

def test_chat_tool_interactive_streams_the_answer(setup, monkeypatch, capsys, tmp_path):
    image = setup['images'][1]
    expected = setup['official'].chat(setup['tokenizer'], tiles(image), 'Describe the image.',
                                      dict(max_new_tokens=8, do_sample=False))
    (tmp_path / 'bad.png').write_bytes(b'not an image')  # refused when attached, not when asked
    lines = iter(['/help', f'/image {tmp_path}/bad.png', '/video', f'/image {image}', '/image', 'Describe the image.',
                  '/images', 'And?', '/reset', '/exit'])
    monkeypatch.setattr('builtins.input', lambda prompt='': next(lines))
    assert chat_main([setup['folder'], '--max-new-tokens', '8']) == 0
    out = capsys.readouterr().out
    answers = [line[len('model> '):] for line in out.splitlines() if line.startswith('model> ')]
    assert answers[0].strip() == expected
    assert len(answers) == 2 and '(history cleared)' in out and 'error' not in out
    assert f'(not attached: {tmp_path}/bad.png: cannot decode image' in out
    # a command without its path ('video not found: '; the images attached already, as if attached again)
    assert '(nothing attached: give a path after /video: /video PATH)' in out
    assert '(nothing attached: give a path after /image: /image PATH)' in out
    assert out.count('(attached to the next message') == 1
    assert out.count('/help shows this') == 3 and '(unknown command /images)' in out  # never sent to the model


def test_a_trained_system_message_is_the_converted_models_default(setup, tmp_path, monkeypatch):
    """Training with ``dataset.system``: config.json records it, and chat() and the tokenizer's chat template
    use it, so the converted model is prompted as it was trained."""
    import json

    from transformers import AutoModel, AutoTokenizer

    from xtuner_plugins.models.export import export_checkpoint
    system = 'Answer with one word.'
    opts = dict(setup['opts'], **{'train_dataloader.dataset.system': system})
    # through the function: --cfg-options cannot spell a value with spaces (MMEngine's DictAction drops them)
    folder = export_checkpoint(LORA, setup['ckpt'], str(tmp_path / 'official'), dtype=torch.float32,
                               cfg_options=opts, log=lambda m: None)
    with open(f'{folder}/config.json') as f:
        assert json.load(f)['system_message'] == system
    official = AutoModel.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    assert official.system_message == system
    pixel_values = tiles(setup['images'][0])
    got = captured_prompt(dict(setup, official=official, tokenizer=tokenizer), pixel_values, 'What is it?',
                          monkeypatch)
    assert got == training_prompt(tokenizer, pixel_values, 'What is it?', system=system)
    rendered = tokenizer.apply_chat_template([{'role': 'user', 'content': 'Hi'}], tokenize=False,
                                             add_generation_prompt=True)
    assert rendered.startswith(f'<|im_start|>system\n{system}<|im_end|>\n')
    # the default folder (trained with the template's system message) keeps InternVL's
    with open(f"{setup['folder']}/config.json") as f:
        assert 'system_message' not in json.load(f)
    assert setup['official'].system_message == official.conv_template.system_message


@pytest.mark.parametrize('tool', ['chat', 'eval', 'web_demo'])
def test_tools_start_without_the_training_stack(tool):
    """The tools on a converted folder need torch and transformers, not MMEngine's runner, DeepSpeed, PEFT or
    bitsandbytes (seconds of start-up each): ``xtuner_plugins.models`` imports its model classes on first use."""
    import subprocess
    import sys
    code = (f'import sys, xtuner_plugins.cli.{tool}; '
            "print(' '.join(m for m in ('mmengine.model', 'mmengine.runner', 'deepspeed', 'peft', 'bitsandbytes') "
            'if m in sys.modules))')
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == '', f'tools/{tool}.py imports {out.stdout.strip()} at start-up'


@pytest.mark.parametrize('problem', ['corrupt', 'truncated', 'missing'])
def test_chat_tool_names_a_bad_image_in_one_line(tmp_path, capsys, problem):
    """A corrupt, truncated (its header reads) or missing image: ``chat: error: FILE: ...`` and exit 2, before
    the model loads (the folder here is not one), no traceback."""
    path = str(tmp_path / 'photo.png')
    if problem != 'missing':
        data = open(write_image(path, size=(80, 60)), 'rb').read()
        open(path, 'wb').write(b'not an image' if problem == 'corrupt' else data[:len(data) // 2])
    assert chat_main([str(tmp_path), '--image', path, '--prompt', 'x']) == 2
    err = capsys.readouterr().err
    reason = 'missing_image' if problem == 'missing' else 'corrupt_image'
    assert err.startswith(f'chat: error: {path}: ') and err.endswith(f'[{reason}]\n') and err.count('\n') == 1, err


def test_chat_and_eval_take_an_image_past_pillows_limit_with_max_image_pixels(setup, capsys, tmp_path):
    """An image past Pillow's decompression-bomb limit was refused by chat and eval, told to 'raise
    max_image_pixels', a data set's setting neither tool has: --max-image-pixels raises it for the tool's run."""
    from PIL import Image

    from tools.eval import main as eval_main
    from xtuner_plugins.data.image_io import DEFAULT_MAX_IMAGE_PIXELS
    wide = str(tmp_path / 'wide.png')
    Image.new('1', (10000, 9000)).save(wide)   # 90 megapixels: over Pillow's 89.5
    assert chat_main([setup['folder'], '--image', wide, '--prompt', 'What is it?', '--max-new-tokens', '2']) == 2
    err = capsys.readouterr().err
    assert err.startswith(f'chat: error: {wide}: 10000x9000 = 90000000 pixels is over the decompression-bomb limit '
                          f'of {DEFAULT_MAX_IMAGE_PIXELS} pixels (raise --max-image-pixels if the image is trusted) '
                          '[image_too_large]'), err
    assert chat_main([setup['folder'], '--image', wide, '--prompt', 'What is it?', '--max-new-tokens', '2',
                      '--max-image-pixels', '90000000']) == 0, capsys.readouterr().err
    data = tmp_path / 'q.jsonl'
    data.write_text(json.dumps({'image': 'wide.png', 'conversations': [
        {'from': 'human', 'value': '<image>\nWhat is it?'}, {'from': 'gpt', 'value': 'black'}]}) + '\n')
    eval_args = [setup['folder'], '--data', str(data), '--no-blind', '--max-new-tokens', '2']
    capsys.readouterr()
    eval_main(eval_args)
    assert 'raise --max-image-pixels' in capsys.readouterr().err
    assert eval_main(eval_args + ['--max-image-pixels', '0']) == 0
    assert 'image_too_large' not in capsys.readouterr().err
    with pytest.raises(SystemExit) as stopped:
        chat_main([setup['folder'], '--image', wide, '--prompt', 'x', '--max-image-pixels', '-1'])
    assert stopped.value.code == 2 and '--max-image-pixels -1: give a number of pixels' in capsys.readouterr().err
    from xtuner_plugins.data import image_io
    assert image_io._PROCESS_LIMIT == dict(pixels=DEFAULT_MAX_IMAGE_PIXELS, setting='max_image_pixels')   # (after)


class EmptyAnswers:
    """A model that generates nothing but its end token (decoded: ''), or ``text``."""
    tokenizer = None

    def __init__(self, text=''):
        self.text, self.generations = text, []

    def ask(self, question, images, generation, streamer=None):
        self.generations.append(generation)
        if streamer is not None:
            streamer.end()
        return self.text

    def reset(self):
        pass


@pytest.mark.parametrize('text', ['', 'A red square.'])
@pytest.mark.parametrize('interactive', [False, True])
def test_chat_tool_says_when_the_answer_is_empty(monkeypatch, capsys, tmp_path, interactive, text):
    """A blank answer comes with a hint line (interactive: after the answer; one-shot: on stderr, the output
    stays the answer alone); an answer with text comes alone."""
    import xtuner_plugins.cli.chat as chat
    model = EmptyAnswers(text)
    monkeypatch.setattr(chat, 'run_tool', lambda args, prog, use, errors, **tiling: use(model) or 0)
    hints = []
    for sampling in ([], ['--do-sample']):
        lines = iter(['Hi', '/exit'])
        monkeypatch.setattr('builtins.input', lambda prompt='': next(lines))
        assert chat_main([str(tmp_path)] + ([] if interactive else ['--prompt', 'Hi']) + sampling) == 0
        out, err = capsys.readouterr()
        if not interactive:
            assert out == text + '\n'
        hints.append([line for line in (out if interactive else err).splitlines() if 'empty answer' in line])
    if text:
        assert hints == [[], []]
    else:
        start = ('(empty answer: the model generated no text, only special tokens such as its end token; an '
                 'untrained or mismatched model? ')
        assert hints == [[start + 'try --do-sample)'], [start + 'try another --seed or a higher --temperature)']]
    assert [g['do_sample'] for g in model.generations] == [False, True]


class FailsOnce(EmptyAnswers):
    """A model whose first answer fails (a prompt over its context, say); its later ones are ``text``."""

    def __init__(self, text='Red.'):
        super().__init__(text)
        self.asked = []

    def ask(self, question, images, generation, streamer=None):
        self.asked.append(list(images))
        if len(self.asked) == 1:
            raise ValueError('the prompt is over the context')
        return super().ask(question, images, generation, streamer)


def test_an_error_in_interactive_chat_says_the_attached_images_are_not_kept(monkeypatch, capsys, tmp_path):
    """The images attached to a message that failed were dropped without a word: the next message went without
    them. The error line now says so."""
    import xtuner_plugins.cli.chat as chat
    model = FailsOnce()
    still = write_image(tmp_path / 'still.png')
    monkeypatch.setattr(chat, 'run_tool', lambda args, prog, use, errors, **tiling: use(model) or 0)
    lines = iter([f'/image {still}', 'What is it?', 'And now?', '/exit'])
    monkeypatch.setattr('builtins.input', lambda prompt='': next(lines))
    assert chat_main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    said = [line for line in out.splitlines() if 'error:' in line]
    assert said == [f'(error: the prompt is over the context) (not kept for the next message: {still}; attach '
                    'again with /image or /video)'], out
    assert model.asked == [[str(still)], []]


# ------------------------------------------------------------------ option values
BAD_OPTIONS = {  # option, value: what the one line says after "argument OPTION: "
    ('--max-num', '0'): "'0': give a whole number, 1 or more",
    ('--min-num', '-1'): "'-1': give a whole number, 1 or more",
    ('--frames', 'x'): "'x': give a whole number, 1 or more",
    ('--max-new-tokens', '0'): "'0': give a whole number, 1 or more",
    ('--image-size', '0'): "'0': give the model's tile size in px (force_image_size in its config.json), or leave "
                           "--image-size out",
    ('--dtype', 'int8'): "'int8' is not a dtype; use auto, bf16, fp16 or fp32",
    ('--device', 'cuda'): 'cuda: no CUDA GPU is visible here (torch.cuda.is_available() is False); use cpu',
    ('--device', 'tpu'): "'tpu' is not a device; use cpu, or cuda (cuda:N: the N-th GPU)",
}


def refused_line(main, argv, capsys):
    """The one line a parser's refusal prints (its usage lines above it), and the exit status 2."""
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert 'Traceback' not in err and err.startswith('usage: '), err
    return err.strip().splitlines()[-1]


@pytest.mark.parametrize('option, value', sorted(BAD_OPTIONS))
def test_a_bad_option_value_is_one_argparse_line(tmp_path, monkeypatch, capsys, option, value):
    """Refused when parsed, before a model loads (``--device cuda`` on a machine without a GPU)."""
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    line = refused_line(chat_main, [str(tmp_path), '--prompt', 'x', option, value], capsys)
    assert line.endswith(f'error: argument {option}: {BAD_OPTIONS[option, value]}'), line


@pytest.mark.parametrize('prompt', ['', ' \n '])
def test_an_empty_prompt_is_refused_as_the_web_demo_refuses_it(tmp_path, capsys, prompt):
    assert refused_line(chat_main, [str(tmp_path), f'--prompt={prompt}'], capsys).endswith(
        'error: --prompt is empty: give a question (or leave --prompt out to chat interactively)')


def test_fewer_tiles_than_the_least_is_refused(tmp_path, capsys):
    assert refused_line(chat_main, [str(tmp_path), '--min-num', '3', '--max-num', '2'], capsys).endswith(
        'error: --min-num 3 is over --max-num 2')


@pytest.mark.parametrize('option, says', [
    (['--image-size', '7'], 'chat: error: --image-size 7: this model takes tiles of 56 px only (its vision tokens '
                            'per tile are fixed by {folder}/config.json\'s tile size); leave --image-size out'),
    (['--min-num', '9'], "chat: error: --min-num 9 (given) is over --max-num 4 ({folder}/config.json's "
                         "max_dynamic_patch); give a --min-num of at most 4")])
def test_tiling_the_model_cannot_take_is_one_line(setup, capsys, option, says):
    """Checked against the folder's config.json before its weights load."""
    assert chat_main([setup['folder'], '--image', setup['images'][0], '--prompt', 'x', *option]) == 2
    err = capsys.readouterr().err
    assert err == says.format(folder=setup['folder']) + '\n', err


def test_more_tiles_than_trained_is_a_note_and_the_answer_stays_alone_on_stdout(setup, capsys):
    """--max-num over config.json's max_dynamic_patch (4: the tiny model's training) is allowed and said."""
    args = [setup['folder'], '--image', setup['images'][0], '--prompt', 'x', '--max-new-tokens', '2']
    assert chat_main(args + ['--max-num', '4']) == 0
    assert 'note' not in capsys.readouterr().err
    assert chat_main(args + ['--max-num', '6']) == 0
    out, err = capsys.readouterr()
    assert 'note' not in out
    assert ("chat: note: --max-num 6 is over the 4 tiles per image this model was trained with (its config.json's "
            "max_dynamic_patch)") in err, err


def test_interactive_paths_with_spaces_and_quotes_are_attached(monkeypatch, capsys, tmp_path):
    """/image my photo.jpg was two missing files ('my', 'photo.jpg'); now a whole rest that names a file is one path,
    and several paths may be quoted as in a shell."""
    import xtuner_plugins.cli.chat as chat
    spaced, quoted = write_image(tmp_path / 'my photo.png'), write_image(tmp_path / "John's.png", seed=1)
    plain = write_image(tmp_path / 'b.png', seed=2)
    model = EmptyAnswers('Yes.')
    asked = []
    model.ask = lambda question, images, generation, streamer=None: (asked.append(list(images)), streamer.end(),
                                                                      'Yes.')[-1]
    monkeypatch.setattr(chat, 'run_tool', lambda args, prog, use, errors, **tiling: use(model) or 0)
    lines = iter([f'/image {spaced}', f'/image {quoted} {plain}', f"/image '{quoted}' {plain}", 'Same?', '/exit'])
    monkeypatch.setattr('builtins.input', lambda prompt='': next(lines))
    assert chat_main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert asked == [[spaced, quoted, plain]], out
    # an apostrophe inside single quotes is no shell quoting either: that line is refused, nothing attached from it
    assert out.count('(not attached: ') == 1
    from xtuner_plugins.cli.chat import typed_paths
    assert typed_paths(f' {spaced} ') == [spaced] and typed_paths(f'"{spaced}" {plain}') == [spaced, plain]
    assert typed_paths(f"{quoted}") == [quoted] and typed_paths("a 'b") == ['a', "'b"]


@pytest.mark.parametrize('interactive', [False, True])
def test_an_animated_image_is_said_to_be_seen_as_its_first_frame(monkeypatch, capsys, tmp_path, interactive):
    """``--image anim.gif`` (and ``/image``) showed the model the first frame without a word: now a note says so
    and how its frames are read (``--video``); a still image gets none."""
    from PIL import Image

    import xtuner_plugins.cli.chat as chat
    frames = [Image.new('RGB', (32, 32), (90 * i, 0, 0)) for i in range(3)]
    gif = str(tmp_path / 'moving.gif')
    frames[0].save(gif, save_all=True, append_images=frames[1:])
    still = write_image(tmp_path / 'still.png')
    monkeypatch.setattr(chat, 'run_tool', lambda args, prog, use, errors, **tiling: use(EmptyAnswers('Red.')) or 0)
    if interactive:
        lines = iter([f'/image {gif}', f'/image {still}', 'What is it?', '/exit'])
        monkeypatch.setattr('builtins.input', lambda prompt='': next(lines))
        assert chat_main([str(tmp_path)]) == 0
    else:
        assert chat_main([str(tmp_path), '--image', gif, still, '--prompt', 'What is it?']) == 0
    captured = capsys.readouterr()
    said = [line for line in (captured.out + captured.err).splitlines() if 'its first frame is used' in line]
    assert len(said) == 1 and gif in said[0] and 'give it as a video' in said[0], captured
    assert said[0].startswith('(note: ' if interactive else 'chat: note: '), said


def test_a_video_the_decoder_trips_on_is_not_attached_and_the_conversation_goes_on(monkeypatch):
    """An SVG given to /video was an AttributeError that ended the interactive chat, its history lost."""
    from xtuner_plugins.cli import chat

    def trips(*args, **kwargs):
        raise AttributeError("'NoneType' object has no attribute 'width'")

    monkeypatch.setattr(chat, 'load_video', trips)
    from types import SimpleNamespace
    assert chat.video_frames(SimpleNamespace(check_video=None), 'x.svg', 8) == (
        None, "x.svg: cannot read it as a video (AttributeError: 'NoneType' object has no attribute 'width')")


def test_an_image_refused_by_its_size_names_its_file_once(tmp_path):
    """'/image big.png' said '(not attached: /.../big.png: /.../big.png: 10000x10000 = ...)'."""
    from PIL import Image

    from xtuner_plugins.cli.chat import image_problem
    from xtuner_plugins.data.image_io import DEFAULT_MAX_IMAGE_PIXELS
    big = str(tmp_path / 'big.png')
    side = int(DEFAULT_MAX_IMAGE_PIXELS ** 0.5) + 100
    Image.new('1', (side, side)).save(big)
    problem = image_problem([big])
    assert problem.startswith(f'{big}: ') and problem.count(big) == 1 and problem.endswith('[image_too_large]'), problem
