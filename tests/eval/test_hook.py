"""EvalHook: the scorer on a held-out file during training, every N iterations and at the end, logged to the
console and the visualizer; its last figures equal tools/eval.py's on the converted final checkpoint; two
processes under DeepSpeed ZeRO-3 split the questions and finish (no hang); a low reliance can stop training."""

import json
import os
import re

import pytest

from tests.configs.conftest import ROOT, tiny_options
from tests.helpers import tiny_workspace
from tests.train_utils import DS_CPU_CONFIGS, run_train

CONFIG = os.path.join(ROOT, 'tests', 'eval', 'configs', 'finetune_full_eval.py')
TRAIN = os.path.join(ROOT, 'tools', 'train.py')


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
    return tiny_workspace(tmp_path_factory.mktemp('tiny'))


def run(tiny, work, nproc=1, **hook):
    hook = dict(dict(data_file=tiny['mixed'], image_folder=tiny['images']), **hook)
    options = dict(tiny_options(tiny, tiny['mixed'], repeat=4), **{f'custom_hooks.5.{k}': v for k, v in hook.items()})
    return run_train(CONFIG, str(work), cfg_options=options, script=TRAIN, nproc=nproc,
                     deepspeed=DS_CPU_CONFIGS['zero3'] if nproc > 1 else None), options


def test_the_training_model_answers_as_its_converted_folder(tiny, tmp_path):
    """A perturbed model (answers that depend on the image): prompt, tiles and greedy decoding of the hook's
    answerer are those of the converted folder, image by image."""
    from mmengine.registry import DATASETS

    from tests.helpers import write_image
    from tests.tools.test_convert_to_official import LORA, convert, options, trained_checkpoint
    from xtuner_plugins.eval import TrainingModelAnswerer
    from xtuner_plugins.engine.derive import derive_data_settings
    from xtuner_plugins.engine.options import load_config
    from xtuner_plugins.models.inference import ConvertedModel
    opts = options(tiny)
    model = trained_checkpoint(LORA, opts, str(tmp_path / 'iter_1.pth'), scale=0.3)
    folder = convert(LORA, str(tmp_path / 'iter_1.pth'), tmp_path / 'official', opts)
    cfg = load_config(LORA, opts)
    derive_data_settings(cfg, log=False)  # as the runner does: the data set's tiles and tokens are the model's
    dataset = cfg.train_dataloader.dataset
    dataset.update(data_files=[tiny['mixed']], image_folders=[tiny['images']])  # the options hold them as text
    answerer = TrainingModelAnswerer(model, DATASETS.build(dataset))
    converted = ConvertedModel(folder)
    answers = set()
    for i, size in enumerate([(120, 60), (50, 90), (56, 56)]):
        image = write_image(tmp_path / f'{i}.png', size=size, seed=i)
        expected = converted.ask('Describe the image.', [image], dict(max_new_tokens=8, do_sample=False))
        converted.reset()
        assert answerer.ask('Describe the image.', [image], dict(max_new_tokens=8)) == expected
        answers.add(expected)
    assert answerer.ask('Say something.', [], dict(max_new_tokens=8)) == converted.ask(
        'Say something.', [], dict(max_new_tokens=8, do_sample=False))
    assert len(answers) > 1, answers  # the answers depend on the image
    # --mc likelihood: the training model's log-likelihood of each option is the converted folder's
    texts = ['red', 'a blue circle', expected, 'left']
    theirs = converted.option_logprobs('Describe the image.', [image], texts)
    assert answerer.option_logprobs('Describe the image.', [image], texts) == pytest.approx(theirs, abs=1e-4)
    assert max(theirs) < 0 and len(set(theirs)) == 4, theirs
    # a question holding the tokenizer's special token is refused as the converted folder refuses it (not scored)
    from xtuner_plugins.data.errors import SampleError
    for asker in (converted, answerer):
        with pytest.raises(SampleError, match='control_text'):
            asker.ask('What <|endoftext|> is it?', [image], dict(max_new_tokens=8))


def test_eval_during_training_equals_tools_eval_on_the_converted_checkpoint(tiny, tmp_path, capsys):
    out, options = run(tiny, tmp_path / 'work')
    assert out.ok and out.returncode == 0, out.summary()
    lines = [line for line in out.log.splitlines() if 'eval at iteration ' in line]
    assert [line.split('eval at iteration ')[1].split()[0] for line in lines] == ['2', '4'], lines  # 4 iterations
    assert 'samples:' in out.log and "-> '" in out.log
    steps = out.scalar_series('eval/accuracy')
    assert sorted(steps) == [2, 4] and set(out.scalar_series('eval/reliance')) == {2, 4}
    final = 'accuracy: ' + lines[-1].split('accuracy: ', 1)[1]  # "accuracy: A (2 questions); blind: B; ..."
    last_eval = out.log[out.log.rindex('eval at iteration 4'):]
    answers = re.findall(r"^    \S+: '.*' -> '(.*)' \(reference", last_eval, flags=re.M)
    assert len(answers) == 2, last_eval
    from tools.convert_to_official import main as convert_main
    from tools.eval import main as eval_main
    args = ['--cfg-options'] + [f'{k}={v}' for k, v in options.items() if not k.startswith('custom_hooks')]
    assert convert_main([CONFIG, out.final_checkpoint, str(tmp_path / 'converted'), '--dtype', 'fp32'] + args) == 0
    capsys.readouterr()
    assert eval_main([str(tmp_path / 'converted'), '--data', tiny['mixed'], '--image-folder', tiny['images'],
                      '--max-new-tokens', '3', '--out', str(tmp_path / 'report.json')]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == final
    with open(tmp_path / 'report.json') as f:  # the same answers, not only the same score
        assert [r['answer'] for r in json.load(f)['results']] == answers


@pytest.mark.slow
def test_two_processes_under_zero3_split_the_questions_and_finish(tiny, tmp_path):
    three = tmp_path / 'three.jsonl'  # 3 questions on 2 ranks: one rank pads its share with a repeat
    lines = open(tiny['mixed']).read().splitlines()
    three.write_text('\n'.join(lines + [lines[1].replace('Say something.', 'Say more.')]) + '\n')
    out, _ = run(tiny, tmp_path / 'work', nproc=2, interval=1, data_file=str(three))  # 2 iterations of 2 x 2
    assert out.ok and not out.timed_out, out.summary()
    lines = [line for line in out.log.splitlines() if 'eval at iteration ' in line]
    assert len(lines) == 2 and all('(3 questions)' in line for line in lines), lines


def test_low_image_reliance_stops_training_when_asked(tiny, tmp_path):
    out, _ = run(tiny, tmp_path / 'work', min_reliance=1.0, on_low_reliance='stop')  # reliance is at most 1
    assert out.returncode == 1 and 'image reliance' in out.log and 'is below 1.0 at iteration 2' in out.log, \
        out.summary()


@pytest.mark.parametrize('settings, says', [
    (dict(data_file='gone.jsonl'), 'EvalHook: data file not found: gone.jsonl'),
    (dict(metric='bleu'), "EvalHook: metric='bleu'; use one of anls, exact"),
    (dict(mc='vote'), "EvalHook: mc='vote'; use one of "),
    (dict(max_questions=0), 'EvalHook: max_questions=0; give a whole number >= 1, or None for all'),
    (dict(interval=-5), 'EvalHook: interval=-5; give a whole number of iterations'),
    (dict(max_new_tokens=0), 'EvalHook: max_new_tokens=0; give a whole number >= 1'),
    (dict(min_reliance=2.0), 'EvalHook: min_reliance=2.0; image reliance is accuracy - blind accuracy, between -1 and '
                             '1'),
    (dict(on_low_reliance='halt'), "EvalHook: on_low_reliance='halt'; use 'warn' or 'stop'")])
def test_settings_and_a_data_file_it_cannot_use_are_refused_in_one_line(tiny, settings, says):
    """A data file not there, an unknown metric or mode were ValueError tracebacks as the runner built its hooks;
    max_questions=0 and min_reliance=2 ran (no question asked; a reliance no model reaches)."""
    from xtuner_plugins.errors import Refused
    from xtuner_plugins.eval import EvalHook
    with pytest.raises(Refused, match='^' + re.escape(says)):
        EvalHook(**dict(dict(data_file=tiny['mixed'], image_folder=tiny['images']), **settings))
    EvalHook(data_file=tiny['mixed'], image_folder=tiny['images'], interval=0, min_reliance=-0.5, max_questions=1)


def test_a_question_that_cannot_be_asked_is_not_scored_and_training_goes_on(tiny, tmp_path):
    """A question holding the tokenizer's special token, or whose image no longer decodes, raised out of the hook
    and stopped training at the first evaluation, where tools/eval.py counts it not scored (docs/evaluation.md)."""
    from types import SimpleNamespace

    from tests.helpers import conv, write_jsonl
    from xtuner_plugins.data import InternVLDataset
    from xtuner_plugins.eval import EvalHook
    from xtuner_plugins.models import VisionLanguageModel
    whole = open(os.path.join(tiny['images'], 'a.png'), 'rb').read()
    (tmp_path / 'images').mkdir()
    (tmp_path / 'images' / 'a.png').write_bytes(whole)
    (tmp_path / 'images' / 'cut.png').write_bytes(whole[:len(whole) // 2])   # its header reads, its pixels do not
    questions = write_jsonl(tmp_path / 'q.jsonl', [
        {'image': 'a.png', 'conversations': conv('Describe the image.', 'a picture')},
        {'conversations': conv('What <|endoftext|> is it?', 'x', image=False)},
        {'image': 'cut.png', 'conversations': conv('Describe it.', 'x')}])
    model = VisionLanguageModel(vision_encoder=tiny['internvit'], llm=tiny['llm'], torch_dtype='float32')
    dataset = InternVLDataset(tiny['mixed'], image_folders=tiny['images'], tokenizer=tiny['llm'], image_size=56,
                              max_dynamic_patch=6, cache_dir=str(tmp_path / 'cache'))
    said = []
    runner = SimpleNamespace(model=model, train_dataloader=SimpleNamespace(dataset=dataset), iter=9,
                             visualizer=SimpleNamespace(add_scalars=lambda *a, **k: said.append(a)))
    hook = EvalHook(data_file=questions, image_folder=str(tmp_path / 'images'), max_new_tokens=2)
    summary = hook.run(runner, 10)
    assert summary['n'] == 1 and summary['not_scored'] == 2
    # before training every rank leaves them out alike (one failing mid-evaluation on one rank would leave the
    # others waiting under ZeRO-3)
    hook.before_train(runner)
    assert [q.prompt for q in hook.questions] == [hook.questions[0].prompt] and len(hook.questions) == 1
    assert 'not_scored' not in hook.run(runner, 20)   # none left to fail
