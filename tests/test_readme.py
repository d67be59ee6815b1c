"""The commands of README.md and of the guides in docs/, run as written on tiny models in the paths they name, so
they cannot drift.

In a temporary folder that links ``configs/`` and ``tools/`` of this checkout, tiny look-alikes are written where
the guides put the real checkpoints (``models/InternViT-300M-448px-V2_5`` with the real 448 px tiles,
``models/Qwen2.5-1.5B-Instruct``) with a small LLaVA-Pretrain-like json under ``data/llava_pretrain/``; the code
blocks are taken from README.md and docs/*.md, each found by a marker it alone holds, and run in the
quickstart's order with the venv first on ``PATH`` (as after ``source .venv/bin/activate``). The README's
quickstart: the small data example and its check, ``check_dataset.py`` of stage 1, the MLP warm-up (one process;
then docs/distributed.md's two processes under ZeRO-3, whose checkpoint the next stage starts from), LoRA
fine-tuning on ``my_data`` (it must really train: the learning rate reaches its peak, the LoRA weights move),
convert, chat and eval; then the guides': docs/training.md's stage 1 (the same command) and LoRA from an official
InternVL folder, docs/conversion.md's chat commands and loading snippet, docs/evaluation.md's web demo commands
(each served, then asked through its client snippet) and evaluation commands, docs/preference.md's preference
training. The README's tiny-model quickstart runs in its own test (make the tiny models, warm-up, LoRA,
convert, chat, eval, given only the model folders and the data). A last test checks that every bash block
with a command is run or listed in ``NOT_RUN`` with its reason; a fast one that every relative link of
README.md and docs/*.md (and its heading anchor) exists, and that the README stays under 220 lines.

Placeholders are filled the way a reader fills them: ``work_dirs/<stage>/iter_N.pth`` (and ``iter_M``) is that
stage's newest checkpoint, ``photo.jpg``/``a.jpg``/``b.jpg`` the reader's own pictures (``data/test.jsonl``,
``MMBench_DEV_EN.tsv``, ``data/my_pairs.jsonl`` their files), ``models/InternVL2_5-1B`` an official folder (the
converter's output, which has InternVL's layout). Not run: downloads (internet), commands for several GPUs
(``NPROC_PER_NODE=4``, ``deepspeed_zero*``: every ``torchrun`` line), ``tensorboard``, the installation
(``make test`` just did it), synopses with placeholders, and the LLaVA loading snippet (another family's
folder; ``tests/tools/test_export_families.py`` loads it the same way).
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from tests.eval.test_data import ROWS, write_tsv
from tests.train_utils import REPO_ROOT, find_checkpoints, read_scalars, train_env
from xtuner_plugins.engine.keep import kept_by

_SKIP = ('huggingface-cli', 'unzip', 'NPROC_PER_NODE=4', 'deepspeed_zero', 'tensorboard')


GUIDES = ('README.md', *sorted(os.path.relpath(p, REPO_ROOT)
                               for p in glob.glob(os.path.join(REPO_ROOT, 'docs', '*.md'))))
#: bash blocks with commands that no test runs, by a marker each, and why
NOT_RUN = {
    'make demo   # the whole life': 'the demo (tests/demo/test_demo.py runs a shortened one) and the suite itself',
    'make setup && source .venv/bin/activate': 'the installation: `make test` just did it',
    'python3 -m venv .venv': 'the installation by hand: `make test` just did it',
    'make test TEST_WORKERS=1': 'the test suite itself',
    'CONFIG [--work-dir DIR]': "the train command's synopsis (placeholders)",
    'convert_to_official.py CHECKPOINT OUT_DIR': "the converter's synopsis (placeholders)",
    'max_iters=200 save_every=50 ...': 'examples of options on an elided command line',
    'FILE.jsonl|FILE.json|META.json': "check_dataset's synopsis (placeholders)",
    'python tools/plan.py configs/finetune_lora.py --gpus 1 --gpu-mem 24': 'needs the real models\' config.json in '
    'models/ (tests/test_planner.py runs the same CLI on the stage configs with tiny models)',
    'make vllm ': 'serving through vLLM: tests/serve/test_vllm.py serves a converted folder with tools/serve.py and '
                  'asks it through the OpenAI API (make test builds .venv-vllm first)',
    'make gguf ': 'the GGUF export and answers through llama.cpp: tests/models/export/test_gguf.py converts a demo-size '
                  'model with --format gguf and asks it with tools/chat.py and tools/eval.py (make test builds '
                  '.venv-gguf first)',
    'IMG=$(base64 -w0 photo.png)': 'a request to a running server: tests/serve/test_vllm.py sends the same request',
    'make_tiny_models.py tiny32': "docs/serving.md's tiny path: tests/serve/test_vllm.py runs it as written",
    'base64 -w0 my_data/images/0.jpg': "its question to the server: tests/serve/test_vllm.py asks it as written",
    'pip install lmdeploy': 'LMDeploy: not installed here (docs/serving.md says so)',
    'pip install "sglang[all]"': 'SGLang: not installed here (docs/serving.md says so)',
    '--nproc-per-node 4 --cfg-options ...': 'four processes, placeholders: tests/test_deferred_imports.py trains '
                                            'the tiny QLoRA on 2 ranks of the same launcher',
}
#: (file, index) of every block a test took by its marker
USED = set()


def readme_blocks(path: str = os.path.join(REPO_ROOT, 'README.md')):
    """``[(heading, language, code)]`` of every fenced block of a markdown file."""
    blocks, heading, lang, code = [], '', None, []
    with open(path, encoding='utf-8') as f:
        for line in f:
            if lang is None and line.startswith('#'):
                heading = line.strip('# \n')
            elif line.startswith('```'):
                if lang is None:
                    lang, code = line[3:].strip(), []
                else:
                    blocks.append((heading, lang, ''.join(code)))
                    lang = None
            elif lang is not None:
                code.append(line)
    return blocks


def guide_blocks():
    """``[(file, index, heading, language, code)]`` of README.md's and docs/*.md's fenced blocks."""
    return [(name, i, *b) for name in GUIDES for i, b in enumerate(readme_blocks(os.path.join(REPO_ROOT, name)))]


def block(marker: str, lang: str = 'bash') -> str:
    """The one ``lang`` block of README.md and docs/*.md holding ``marker``."""
    found = [(name, i, code) for name, i, _, block_lang, code in guide_blocks()
             if block_lang == lang and marker in code]
    assert len(found) == 1, (f'README.md, docs/*.md: {len(found)} {lang} blocks hold {marker!r} '
                             f'({[name for name, _, _ in found]}), expected 1')
    USED.add(found[0][:2])
    return found[0][2]


def commands(code: str):
    """The block's commands: continuation lines joined, comments and skipped commands dropped."""
    joined = re.sub(r'\\\n\s*', ' ', code)
    out = []
    for line in joined.splitlines():
        line = re.sub(r'\s+#\s.*$', '', line).strip()
        if line and not line.startswith('#') and not any(s in line for s in _SKIP):
            out.append(line)
    return out


class Reader:
    """Runs commands in the README's working folder and fills placeholders as a reader would."""

    def __init__(self, root: str):
        self.root = root
        self.env = train_env(extra_env={'XDG_CACHE_HOME': os.path.join(root, '.cache')})
        self.ran = []

    def newest(self, stage: str) -> str:
        found = find_checkpoints(os.path.join(self.root, 'work_dirs', stage))
        assert found, f'no checkpoint under work_dirs/{stage}'
        return os.path.relpath(found[-1], self.root)

    def fill(self, command: str) -> str:
        command = re.sub(r'work_dirs/(\w+)/iter_[NM]\.pth', lambda m: self.newest(m.group(1)), command)
        if 'model.pretrained_pth=...' in command:
            command = command.replace('model.pretrained_pth=...', f'model.pretrained_pth={self.newest("pretrain_mlp")}')
        return command

    def run(self, command: str, stdin: str = '', timeout: int = 600) -> str:
        command = self.fill(command)
        proc = subprocess.run(['bash', '-euo', 'pipefail', '-c', command], cwd=self.root, env=self.env,
                              input=stdin, capture_output=True, text=True, timeout=timeout)
        out = proc.stdout + proc.stderr
        self.ran.append(command)
        self.stdout = proc.stdout
        assert proc.returncode == 0, f'{command}\nexit {proc.returncode}\n{out[-4000:]}'
        # `xtuner train` exits 0 when training crashed: the output must be clean too
        assert 'Traceback (most recent call last)' not in out, f'{command}\n{out[-4000:]}'
        return out

    @contextlib.contextmanager
    def serve(self, command: str, timeout: int = 300):
        """A server command (the web demo) run in the background on a free port given last, until the block
        ends; yields the port."""
        from tests.tools.test_web_demo import running_server
        from xtuner_plugins.launch import free_port
        port = free_port()
        command = f'{self.fill(command)} --port {port}'
        self.ran.append(command)
        with running_server(['bash', '-c', f'exec {command}'], port, cwd=self.root, env=self.env, timeout=timeout):
            yield port


def chat_answers(root: str, turns):
    """Greedy answers (8 new tokens) of the converted ``work_dirs/my_internvl``, asked in-process through the chat
    tool's model class, one new conversation per question."""
    from xtuner_plugins.models.inference import ConvertedModel
    model = ConvertedModel(os.path.join(root, 'work_dirs', 'my_internvl'))
    answers = []
    for question, images in turns:
        model.reset()
        answers.append(model.ask(question, [os.path.join(root, i) for i in images],
                                 dict(max_new_tokens=8, do_sample=False)))
    return answers


@pytest.fixture(scope='module')
def reader(tmp_path_factory):
    from xtuner_plugins.tiny.llm import write_tiny_qwen2
    from xtuner_plugins.tiny.vision import write_tiny_internvit
    root = str(tmp_path_factory.mktemp('readme'))
    for name in ('configs', 'tools'):
        os.symlink(os.path.join(REPO_ROOT, name), os.path.join(root, name))
    os.symlink(os.path.dirname(os.path.dirname(sys.executable)), os.path.join(root, '.venv'))
    write_tiny_internvit(os.path.join(root, 'models', 'InternViT-300M-448px-V2_5'), image_size=448)
    write_tiny_qwen2(os.path.join(root, 'models', 'Qwen2.5-1.5B-Instruct'))
    # LLaVA-Pretrain's layout: one json list, images in numbered sub-folders
    pretrain = os.path.join(root, 'data', 'llava_pretrain')
    os.makedirs(os.path.join(pretrain, 'images', '00000'))
    samples = []
    for i, colour in enumerate(['red', 'green', 'blue', 'yellow'] * 2):
        Image.new('RGB', (448, 448), colour).save(os.path.join(pretrain, 'images', '00000', f'{i:09d}.jpg'))
        samples.append({'id': f'{i:09d}', 'image': f'00000/{i:09d}.jpg', 'conversations': [
            {'from': 'human', 'value': 'Render a clear and concise summary of the photo.\n<image>'},
            {'from': 'gpt', 'value': f'a {colour} square'}]})
    with open(os.path.join(pretrain, 'blip_laion_cc_sbu_558k.json'), 'w') as f:
        json.dump(samples, f)
    for name, colour in (('photo.jpg', 'red'), ('a.jpg', 'green'), ('b.jpg', 'blue')):
        Image.new('RGB', (640, 480), colour).save(os.path.join(root, name))
    return Reader(root)


def test_readme_commands_run_as_written(reader):
    # Data: the small example, then its check and stage 1's
    reader.run(block('ImageDraw.Draw(img).ellipse'))
    assert sum(1 for _ in open(os.path.join(reader.root, 'my_data', 'train.jsonl'))) == 4
    (stage1,) = commands(block('--image-folder data/llava_pretrain/images'))
    out = reader.run(stage1)
    assert 'blip_laion_cc_sbu_558k.json' in out

    # Stage 1 on a CPU: the quickstart's one process, then two under ZeRO-3 (docs/distributed.md; a fresh work
    # folder: its checkpoint is a folder of the same name as the first run's file), whose checkpoint the
    # quickstart's LoRA starts from
    warmup, lora = commands(block('train_dataloader.dataset.repeat_times=[16]'))
    assert warmup == 'python tools/train.py configs/pretrain_mlp.py', warmup
    # docs/training.md's stage 1 block: the same one-process command (its torchrun line needs GPUs)
    assert commands(block('tools/train.py configs/pretrain_mlp.py --launcher pytorch')) == [warmup]
    reader.run(warmup)
    assert os.path.isfile(os.path.join(reader.root, reader.newest('pretrain_mlp')))
    shutil.rmtree(os.path.join(reader.root, 'work_dirs', 'pretrain_mlp'))
    (zero3,) = commands(block('configs/deepspeed/zero3_cpu.json'))
    reader.run(zero3)
    assert os.path.isdir(os.path.join(reader.root, reader.newest('pretrain_mlp')))

    # LoRA on the small example, from the warm-up: it must really train
    reader.run(lora)
    work = os.path.join(reader.root, 'work_dirs', 'finetune_lora')
    kept = kept_by(os.path.join(reader.root, reader.newest('pretrain_mlp')))   # out of the warm-up's rotation
    assert kept and os.path.realpath(kept) == os.path.realpath(work), kept
    lrs = [r['lr'] for r in read_scalars(work) if 'lr' in r]
    # the config's lr is 4e-5 and its warm-up starts at 4e-10
    assert lrs and max(lrs) > 0.2 * 4e-5, f'the learning rate never left the warm-up: {lrs}'
    state = torch.load(os.path.join(reader.root, reader.newest('finetune_lora')), map_location='cpu',
                       weights_only=False)['state_dict']
    lora_b = [v for k, v in state.items() if 'lora_B' in k]
    assert lora_b and all(v.abs().max() > 0 for v in lora_b), 'the LoRA B weights (zero at the start) never moved'

    # The quickstart's convert, chat and eval (on the reader's own test file, a jsonl)
    os.makedirs(os.path.join(reader.root, 'data', 'images'))
    shutil.copy(os.path.join(reader.root, 'photo.jpg'), os.path.join(reader.root, 'data', 'images', 'q.jpg'))
    with open(os.path.join(reader.root, 'data', 'test.jsonl'), 'w') as f:
        f.write(json.dumps({'image': 'q.jpg', 'conversations': [
            {'from': 'human', 'value': '<image>\nWhat colour is it?'}, {'from': 'gpt', 'value': 'Red.'}]}) + '\n')
    convert, chat_one, eval_one = commands(block(
        'convert_to_official.py work_dirs/finetune_lora/iter_N.pth work_dirs/my_internvl'))
    assert convert.startswith('python tools/convert_to_official.py'), convert
    reader.run(convert)
    assert os.path.isfile(os.path.join(reader.root, 'work_dirs', 'my_internvl', 'config.json'))
    # each chat prints the folder's own greedy answer (which a tiny model may end at once: then an empty one);
    # the shell hands the prompt's \n over as two characters, as it does to the guide's command
    expected = chat_answers(reader.root, [('What is in the picture?', ['photo.jpg']),
                                          ('Image-1: <image>\\nImage-2: <image>\\nWhat differs?', ['a.jpg', 'b.jpg'])])
    reader.run(chat_one + ' --max-new-tokens 8')
    assert reader.stdout.strip() == expected[0].strip(), (chat_one, reader.stdout, expected[0])
    check_eval(reader, eval_one)
    assert os.path.isfile(os.path.join(reader.root, 'report.json'))

    # docs/conversion.md's chat commands (the first is the quickstart's, just run) and loading snippet
    chat = commands(block('/image PATH, /reset, /exit'))
    assert len(chat) == 4 and chat[0] == chat_one, chat
    for i, command in enumerate(chat[1:], 1):
        # the interactive ones get a question and /exit
        reader.run(command + ' --max-new-tokens 8', stdin='What is in the picture?\n/exit\n')
        if i < 2:  # one shot: the answer alone
            assert reader.stdout.strip() == expected[i].strip(), (command, reader.stdout, expected[i])
        else:  # the loop ran, answered and ended at /exit
            assert 'you> ' in reader.stdout and 'model> ' in reader.stdout, (command, reader.stdout)
    assert 'model> ' + expected[0].strip() in reader.stdout, (reader.stdout, expected[0])  # from the checkpoint
    reader.run('python -', stdin=block("AutoModel.from_pretrained('work_dirs/my_internvl'", 'python'))

    # The web demo: each command serves (on a free port); the guide's client snippet gets an answer from it
    web = commands(block('python tools/web_demo.py work_dirs/my_internvl'))
    assert len(web) == 3, web
    client = block("Client('http://127.0.0.1:7860/')", 'python')
    for command in web:
        with reader.serve(command + ' --max-new-tokens 8') as port:
            reader.run('python -', stdin=client.replace(':7860/', f':{port}/'))
            # gradio_client first prints 'Loaded as API: URL', then the snippet prints the answer
            answer = '\n'.join(line for line in reader.stdout.splitlines()
                                if not line.startswith('Loaded as API:')).strip()
            assert answer == expected[0].strip(), f'{command}: /chat gave {answer!r}, the folder {expected[0]!r}'

    # docs/evaluation.md's commands (the first is the quickstart's, just run), on an MMBench TSV too
    write_tsv(Path(reader.root) / 'MMBench_DEV_EN.tsv', ROWS)
    evals = commands(block('MMBench_DEV_EN.tsv --circular'))
    assert len(evals) == 4 and evals[0] == eval_one, evals
    for command in evals[1:]:
        check_eval(reader, command)

    # LoRA from an official InternVL folder (the converted one has that layout)
    shutil.copytree(os.path.join(reader.root, 'work_dirs', 'my_internvl'),
                    os.path.join(reader.root, 'models', 'InternVL2_5-1B'))
    (official,) = commands(block('model.official_checkpoint=models/InternVL2_5-1B'))
    reader.run(official)
    assert glob.glob(os.path.join(reader.root, 'work_dirs', 'finetune_lora_official', 'iter_*.pth'))

    # Preference training from the LoRA checkpoint of the warm-up chain, on the reader's pairs
    with open(os.path.join(reader.root, 'data', 'my_pairs.jsonl'), 'w') as f:
        for i in range(4):
            f.write(json.dumps({'image': 'q.jpg', 'question': 'What colour is it?', 'chosen': 'Red.',
                                'rejected': f'Blue {i}.'}) + '\n')
    (dpo,) = commands(block('tools/train.py configs/dpo_lora.py'))
    out = reader.run(dpo)
    assert 'rewards_margin' in out and glob.glob(os.path.join(reader.root, 'work_dirs', 'dpo_lora', 'iter_*.pth'))


def check_eval(reader, command):
    """An evaluation command runs (8 new tokens) and ends with its accuracy line."""
    reader.run(command + ' --max-new-tokens 8')
    last = reader.stdout.strip().splitlines()[-1]
    pattern = r'accuracy: [0-9.]+ \(\d+ questions\); blind: [0-9.]+; image reliance: -?[0-9.]+'
    assert re.fullmatch(pattern, last), (command, last)


@pytest.fixture(scope='module')
def fresh_clone(tmp_path_factory):
    """A fresh clone of this checkout: the files git would hand out (tracked, and new ones not ignored: the state
    a commit of the working tree would have), nothing else: no models, caches, work folders or linked trees; the
    venv linked (``make setup`` would make the same one) and the copy's package first on the path."""
    root = str(tmp_path_factory.mktemp('clone'))
    listed = subprocess.run(['git', 'ls-files', '-z', '--cached', '--others', '--exclude-standard'], cwd=REPO_ROOT,
                            capture_output=True, check=True).stdout.decode().split('\0')
    for name in filter(None, listed):
        source = os.path.join(REPO_ROOT, name)
        if os.path.isfile(source):  # a deleted, not yet committed file is listed but gone
            os.makedirs(os.path.dirname(os.path.join(root, name)), exist_ok=True)
            shutil.copy2(source, os.path.join(root, name))
    os.symlink(os.path.dirname(os.path.dirname(sys.executable)), os.path.join(root, '.venv'))
    reader = Reader(root)
    reader.env['PYTHONPATH'] = os.pathsep.join([root] + [p for p in reader.env['PYTHONPATH'].split(os.pathsep)
                                                          if os.path.abspath(p) != REPO_ROOT])
    return reader


def test_tiny_quickstart_runs_as_written(fresh_clone):
    """The README's quickstart with tiny models in a fresh clone: only the model folders and the data are given;
    each training's console is the short one (a start line, progress lines, an end line)."""
    reader = fresh_clone
    assert not os.path.exists(os.path.join(reader.root, 'work_dirs'))
    used = reader.run('python -c "import xtuner_plugins; print(xtuner_plugins.__file__)"').strip()
    assert used == os.path.join(reader.root, 'xtuner_plugins', '__init__.py'), used  # the clone's code, not ours
    reader.run(block('ImageDraw.Draw(img).ellipse'))
    steps = commands(block('python tools/make_tiny_models.py tiny      # writes tiny/internvit'))
    assert [s.split()[1] for s in steps] == ['tools/make_tiny_models.py', 'tools/train.py', 'tools/train.py',
                                            'tools/convert_to_official.py', 'tools/chat.py', 'tools/eval.py'], steps
    make, warmup, lora, convert, chat, evaluate = steps
    reader.run(make)
    for folder in ('internvit', 'llm'):
        assert os.path.isfile(os.path.join(reader.root, 'tiny', folder, 'config.json'))
    for command, stage in ((warmup, 'tiny_pretrain'), (lora, 'tiny_lora')):
        out = reader.run(command)
        assert 'data set: image_size 56' in out, 'the data set did not take its tile size from the tiny model'
        lines = [line.split(' - INFO - ', 1)[-1] for line in out.splitlines()]
        progress = [line for line in lines if line.startswith('iter ')]
        assert progress and re.match(r'iter \d+/\d+  loss \S+  lr \S+  \S+ tokens/s  eta \S+  mem \S+ GiB$',
                                     progress[-1]), progress
        assert sum(line.startswith('training ') for line in lines) == 1 and lines[-1].startswith('done: '), lines
        assert len(out.splitlines()) <= 12 + len(progress), out  # no dumps: environment, config, hooks
        assert not any(s in out for s in ('Iter(train)', 'System environment', 'Config:', 'Hooks will be executed',
                                          'kernels-community', 'Setting accelerator to CPU', 'UserWarning')), out
        assert reader.newest(stage)
    reader.run(convert)
    assert os.path.isfile(os.path.join(reader.root, 'work_dirs', 'tiny_internvl', 'config.json'))
    reader.run(chat + ' --max-new-tokens 8')
    check_eval(reader, evaluate)


def test_every_command_block_is_run_or_listed():
    """Each bash block of README.md and docs/*.md with a command in it is run above, or listed in NOT_RUN."""
    if not USED:
        pytest.skip('the tests that run the guides did not run in this session')
    left = []
    for name, i, heading, lang, code in guide_blocks():
        if lang == 'bash' and (name, i) not in USED and commands(code):
            if not any(marker in code for marker in NOT_RUN):
                left.append(f'{name} ({heading}): {commands(code)[0]}')
    assert not left, 'blocks no test runs (run them in tests/test_readme.py or list them in NOT_RUN):\n' + \
        '\n'.join(left)


def _anchors(path: str) -> set:
    """GitHub's anchors of a markdown file's headings (outside code blocks)."""
    anchors, fenced = set(), False
    for line in open(path, encoding='utf-8'):
        if line.startswith('```'):
            fenced = not fenced
        elif not fenced and line.startswith('#'):
            title = line.strip('#').strip().lower()
            anchors.add(re.sub(r'[^\w\- ]', '', title).replace(' ', '-'))
    return anchors


def test_links_point_to_files_and_the_readme_stays_short():
    problems = []
    for name in GUIDES:
        path = os.path.join(REPO_ROOT, name)
        text = re.sub(r'```.*?```', '', open(path, encoding='utf-8').read(), flags=re.S)
        for target in re.findall(r'\]\(([^)\s]+)\)', text):
            if re.match(r'[a-z]+:', target):  # https:, mailto:
                continue
            file, _, anchor = target.partition('#')
            full = os.path.normpath(os.path.join(os.path.dirname(path), file)) if file else path
            if not os.path.exists(full):
                problems.append(f'{name}: {target}: no such file')
            elif anchor and full.endswith('.md') and anchor not in _anchors(full):
                problems.append(f'{name}: {target}: no such heading')
    assert not problems, '\n'.join(problems)
    lines = sum(1 for _ in open(os.path.join(REPO_ROOT, 'README.md'), encoding='utf-8'))
    assert lines <= 220, f'README.md has {lines} lines; keep it under 220 (details go to docs/)'
