"""tools/eval.py on a converted tiny model: the accuracy, blind accuracy and image reliance it prints are those
of the model's own answers (here the references are its greedy answers for two questions of three), the report
holds every answer, MMBench files run, and bad input is named."""

import json
import os

import pytest
from PIL import Image

from tests.helpers import converted_tiny_folder, tiny_workspace, write_image
from tests.tools.test_convert_to_official import LORA, convert, trained_checkpoint
from tests.eval.test_data import ROWS, write_tsv
from tools.eval import main as eval_main
from xtuner_plugins.models.inference import ConvertedModel

GEN = dict(max_new_tokens=6, do_sample=False, num_beams=1)


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
    return converted_tiny_folder(tmp_path_factory.mktemp('eval'))


@pytest.fixture(scope='module')
def llava_folder(tmp_path_factory):
    """CLIP + LLaVA MLP with padded images, LoRA, converted to transformers' LLaVA layout."""
    import torch

    from tests.tools.test_convert_to_official import options as opts_for
    from xtuner_plugins.engine.options import load_config
    from xtuner_plugins.models.export import build_for_export
    from xtuner_plugins.tiny.vision import write_tiny_clip
    root = tmp_path_factory.mktemp('eval_llava')
    tiny = tiny_workspace(root / 'tiny')
    opts = opts_for(tiny, **{'model.vision_encoder': write_tiny_clip(str(root / 'clip')), 'model.projector': 'mlp',
                             'model.image_mode': 'pad'})
    probe = build_for_export(load_config(LORA, opts), None, torch.float32, log=lambda m: None)
    opts.update({f'train_dataloader.dataset.{k}': (list(v) if isinstance(v, tuple) else v)
                 for k, v in probe.geometry.items()})
    trained_checkpoint(LORA, opts, str(root / 'iter_1.pth'), scale=0.3)
    return convert(LORA, str(root / 'iter_1.pth'), root / 'llava', opts)


def test_accuracy_blind_and_reliance_of_the_models_own_answers(folder, tmp_path, capsys):
    images = [write_image(tmp_path / f'{i}.png', size=size, seed=i) for i, size in
              enumerate([(120, 60), (50, 90), (56, 56)])]
    model = ConvertedModel(folder)
    answers, blind = [], []
    for path in images:
        model.reset()
        answers.append(model.ask('Describe it.', [path], dict(GEN, pad_token_id=model.tokenizer.pad_token_id)))
        model.reset()
        blank = Image.new('RGB', Image.open(path).size, (128, 128, 128))
        blind.append(model.ask('Describe it.', [blank], dict(GEN, pad_token_id=model.tokenizer.pad_token_id)))
    references = [answers[0], answers[1], 'zzz certainly not this']
    with open(tmp_path / 'test.jsonl', 'w') as f:
        for i, ref in enumerate(references):
            f.write(json.dumps({'id': i, 'image': f'{i}.png', 'kind': 'k', 'conversations': [
                {'from': 'human', 'value': '<image>\nDescribe it.'}, {'from': 'gpt', 'value': ref}]}) + '\n')
    blind_right = sum(b.strip().lower() == r.strip().lower() for b, r in zip(blind, references)) / 3
    assert eval_main([folder, '--data', str(tmp_path / 'test.jsonl'), '--max-new-tokens', '6',
                      '--out', str(tmp_path / 'report.json')]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1] == f'accuracy: 0.667 (3 questions); blind: {blind_right:.3f}; image reliance: ' \
                      f'{2 / 3 - blind_right:.3f}', out
    report = json.load(open(tmp_path / 'report.json'))
    assert [r['answer'] for r in report['results']] == answers and report['summary']['n'] == 3
    assert [r['score'] for r in report['results']] == [1.0, 1.0, 0.0]
    assert eval_main([folder, '--data', str(tmp_path / 'test.jsonl'), '--no-blind', '--max-new-tokens', '6']) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == 'accuracy: 0.667 (3 questions)'


def test_mmbench_circular_counts_each_question_once(folder, tmp_path, capsys):
    tsv = write_tsv(tmp_path / 'mmb.tsv', ROWS)
    assert eval_main([folder, '--data', tsv, '--circular', '--max-new-tokens', '2', '--no-blind']) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1].startswith('accuracy: ') and lines[-1].endswith(' (2 questions)'), lines
    assert any(line.split()[0] == 'colour' for line in lines) and any(line.split()[0] == 'shape' for line in lines)


def test_bad_input_is_named(folder, tmp_path, capsys):
    (tmp_path / 'bad.jsonl').write_text(json.dumps({'conversations': [{'from': 'human', 'value': 'x'}]}) + '\n')
    assert eval_main([folder, '--data', str(tmp_path / 'bad.jsonl')]) == 2
    assert 'bad.jsonl:1: the last turn is' in capsys.readouterr().err
    assert eval_main([str(tmp_path), '--data', write_tsv(tmp_path / 'm.tsv', ROWS)]) == 2
    assert 'no config.json' in capsys.readouterr().err
    assert not os.path.exists(tmp_path / 'report.json')


@pytest.mark.parametrize('fmt', ['official', 'llava'])
def test_batched_answers_equal_one_at_a_time(folder, llava_folder, tmp_path, fmt, capsys):
    """--batch-size 3 (left-padded batches: the remote code's batch_chat, the LLaVA processor's batch) gives
    every question the answer it gets alone."""
    path = {'official': folder, 'llava': llava_folder}[fmt]
    with open(tmp_path / 'test.jsonl', 'w') as f:
        for i, size in enumerate([(120, 60), (50, 90), (56, 56), (80, 80)]):
            write_image(tmp_path / f'{i}.png', size=size, seed=i)
            question = '<image>\nDescribe it' + ' in more detail' * i + '.'  # prompts of different lengths
            f.write(json.dumps({'id': i, 'image': f'{i}.png', 'conversations': [
                {'from': 'human', 'value': question}, {'from': 'gpt', 'value': 'x'}]}) + '\n')
    reports = []
    for batch in ('1', '3'):
        assert eval_main([path, '--data', str(tmp_path / 'test.jsonl'), '--max-new-tokens', '6', '--batch-size', batch,
                          '--out', str(tmp_path / f'b{batch}.json')]) == 0
        with open(tmp_path / f'b{batch}.json') as f:
            reports.append([(r['answer'], r['blind_answer']) for r in json.load(f)['results']])
    assert reports[0] == reports[1] and len({a for a, _ in reports[0]}) > 1, reports
