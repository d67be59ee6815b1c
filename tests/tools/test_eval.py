"""tools/eval.py on a converted tiny model: the accuracy, blind accuracy and image reliance it prints are those
of the model's own answers (here the references are its greedy answers for two questions of three), the report
holds every answer, MMBench files run, and bad input is named."""

import json
import os
import stat

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
    # --mc likelihood on open questions changes nothing: said (it went without a word)
    assert eval_main([folder, '--data', str(tmp_path / 'test.jsonl'), '--no-blind', '--max-new-tokens', '6',
                      '--mc', 'likelihood']) == 0
    out = capsys.readouterr()
    assert out.out.strip().splitlines()[-1] == 'accuracy: 0.667 (3 questions)'
    assert '--mc likelihood: none of the 3 questions is multiple choice (options A, B, ...: an MMBench-layout .tsv); ' \
           'each is answered by generation' in out.err, out.err


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


def test_a_video_question_to_a_folder_that_reads_no_video_is_counted_not_a_crash(llava_folder, tmp_path, capsys):
    """A LLaVA folder holds no video: its video questions ended the run with a raw traceback (exit 1) at the first
    of them. Each is now named and counted as not scored (no_video); the image questions are scored; with only
    video questions nothing is scored, one line, exit 2."""
    from tests.helpers import write_video
    write_video(tmp_path / 'v.mp4', [10, 90, 200])
    data = write_questions(tmp_path, 3, **{'1': {'image': None, 'video': 'v.mp4', 'conversations': [
        {'from': 'human', 'value': '<video>\nWhat happens?'}, {'from': 'gpt', 'value': 'x'}]}})
    assert eval_main([llava_folder, '--data', data, '--max-new-tokens', '2', '--out', str(tmp_path / 'r.json')]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[0].startswith(f'not scored: {data}:2 (id 1): {llava_folder}: ') and out[0].endswith('[no_video]'), out
    assert out[-1].endswith('; 1 not scored'), out
    assert [r['id'] for r in json.load(open(tmp_path / 'r.json'))['results']] == ['0', '2']
    only = write_questions(tmp_path, 1, name='v.jsonl', **{'0': {'image': None, 'video': 'v.mp4', 'conversations': [
        {'from': 'human', 'value': '<video>\nWhat happens?'}, {'from': 'gpt', 'value': 'x'}]}})
    assert eval_main([llava_folder, '--data', only, '--max-new-tokens', '2']) == 2
    err = capsys.readouterr().err
    assert 'none of the 1 questions could be scored' in err and '[no_video]' in err and 'Traceback' not in err, err


def write_questions(tmp_path, n, name='test.jsonl', **overrides):
    """``n`` one-image questions (image ``i.png`` of different sizes); ``overrides``: line index -> fields."""
    with open(tmp_path / name, 'w') as f:
        for i in range(n):
            write_image(tmp_path / f'{i}.png', size=(40 + 10 * i, 60), seed=i)
            sample = {'id': i, 'image': f'{i}.png', 'conversations': [
                {'from': 'human', 'value': '<image>\nDescribe it.'}, {'from': 'gpt', 'value': 'x'}]}
            f.write(json.dumps(dict(sample, **overrides.get(str(i), {}))) + '\n')
    return str(tmp_path / name)


def test_data_problems_stop_before_the_model_loads(tmp_path, capsys):
    """A repeated id, a path leaving --image-folder, a corrupt image at question 7: all named at once before
    anything loads (the model folder here is not one: its error never comes)."""
    data = write_questions(tmp_path, 7, **{'2': {'id': 0}, '4': {'image': '../x.png'}})
    (tmp_path / '6.png').write_bytes(b'\x89PNG\r\n\x1a\n garbage')
    assert eval_main([str(tmp_path / 'no_model'), '--data', data, '--image-folder', str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f'eval: error: {data}: 3 problems, no question asked:\n'), err
    assert f"{data}:3: id '0' is also the id of line 1" in err and '[unsafe_image_path]' in err
    assert f'{data}:7: cannot read image header of {tmp_path}/6.png' in err and 'no config.json' not in err


def test_the_folders_special_tokens_in_a_question_stop_before_the_model_loads(tmp_path, capsys, tiny_tokenizer_dir):
    """The folder's tokenizer files (no model: its error never comes) name <|endoftext|>; the question holding it."""
    import shutil
    shutil.copytree(tiny_tokenizer_dir, tmp_path / 'model')
    data = tmp_path / 'q.jsonl'
    data.write_text(json.dumps({'id': 0, 'conversations': [{'from': 'human', 'value': 'A <|endoftext|> B?'},
                                                           {'from': 'gpt', 'value': 'x'}]}) + '\n')
    assert eval_main([str(tmp_path / 'model'), '--data', str(data)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f'eval: error: {data}:1: ') and "control marker '<|endoftext|>'" in err
    assert 'config.json' not in err


def test_another_templates_marker_is_plain_text_to_the_model(tmp_path, capsys):
    """A Phi-3 model's folder: its own <|end|> in a question is refused before the model loads; Llama 3's
    <|eot_id|> is no token of it, plain text as training reads it, and goes on (to the model, not one here)."""
    from xtuner_plugins.tiny.tokenizer import build_tiny_tokenizer
    build_tiny_tokenizer(chat='phi3').save_pretrained(str(tmp_path / 'model'))
    data = tmp_path / 'q.jsonl'
    for marker, refused in (('<|end|>', True), ('<|eot_id|>', False)):
        data.write_text(json.dumps({'id': 0, 'conversations': [{'from': 'human', 'value': f'A {marker} B?'},
                                                               {'from': 'gpt', 'value': 'x'}]}) + '\n')
        assert eval_main([str(tmp_path / 'model'), '--data', str(data)]) == 2
        err = capsys.readouterr().err
        assert (f"control marker '{marker}'" in err) == refused and ('no config.json' in err) != refused, err


def test_the_checkpoints_llm_special_tokens_in_a_question_stop_before_it_is_converted(tmp_path, capsys,
                                                                                        monkeypatch):
    """--checkpoint: the special tokens of the LLM it was trained with (its recorded, or here given, config's
    model.llm) are refused as a folder's are, before the conversion (minutes at real size) starts."""
    from tests.helpers import lora_trained_tiny
    from tests.tools.test_convert_to_official import LORA
    import xtuner_plugins.models.export as export
    trained = lora_trained_tiny(tmp_path / 'run')
    monkeypatch.setattr(export, 'export_checkpoint', lambda *a, **k: pytest.fail('converted before the data check'))
    data = tmp_path / 'q.jsonl'
    data.write_text(json.dumps({'id': 0, 'conversations': [{'from': 'human', 'value': 'A <|endoftext|> B?'},
                                                           {'from': 'gpt', 'value': 'x'}]}) + '\n')
    options = ['--cfg-options'] + [f'{k}={v}' for k, v in trained['opts'].items()]
    assert eval_main(['--config', LORA, '--checkpoint', trained['ckpt'], '--data', str(data)] + options) == 2
    err = capsys.readouterr().err
    assert err.startswith(f'eval: error: {data}:1: ') and "control marker '<|endoftext|>'" in err, err


def test_output_folders_are_made_or_refused_at_start(folder, tmp_path, capsys):
    data = write_questions(tmp_path, 1)
    (tmp_path / 'file').write_text('')
    assert eval_main([str(tmp_path / 'no_model'), '--data', data, '--out', str(tmp_path / 'file' / 'r.json')]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f'eval: error: {tmp_path}/file/r.json: cannot create its folder') and 'config' not in err
    with pytest.raises(SystemExit):
        eval_main([folder, '--data', data, '--out', str(tmp_path / 'r.json'), '--answers', str(tmp_path / 'r.json')])
    assert '--answers and --out must be two files' in capsys.readouterr().err
    os.symlink(tmp_path, tmp_path / 'alias')   # one new file by two spellings: the report replaced the answers
    with pytest.raises(SystemExit):
        eval_main([folder, '--data', data, '--out', str(tmp_path / 'r.json'), '--answers',
                   str(tmp_path / 'alias' / 'r.json')])
    assert '--answers and --out must be two files' in capsys.readouterr().err
    out = tmp_path / 'new' / 'sub' / 'r.json'
    assert eval_main([folder, '--data', data, '--max-new-tokens', '2', '--out', str(out)]) == 0
    assert json.load(open(out))['summary']['n'] == 1 and os.listdir(out.parent) == ['r.json']


def test_a_question_whose_image_fails_when_asked_is_counted_and_named(folder, tmp_path, capsys):
    """An image whose header reads but whose data is cut short: not scored, named with FILE:LINE, counted on
    the last line and in the report; the other questions are scored."""
    data = write_questions(tmp_path, 3)
    whole = (tmp_path / '1.png').read_bytes()
    (tmp_path / '1.png').write_bytes(whole[:len(whole) // 2])
    assert eval_main([folder, '--data', data, '--max-new-tokens', '2', '--out', str(tmp_path / 'r.json')]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[0].startswith(f'not scored: {data}:2 (id 1): cannot decode image {tmp_path}/1.png') and \
        out[0].endswith('[corrupt_image]'), out
    assert out[-1].startswith('accuracy: 0.000 (2 questions); blind: ') and out[-1].endswith('; 1 not scored'), out
    report = json.load(open(tmp_path / 'r.json'))
    assert [r['id'] for r in report['results']] == ['0', '2'] and report['summary']['not_scored'] == 1
    assert [(f['source'], f['reason']) for f in report['not_scored']] == [(f'{data}:2', 'corrupt_image')]


def test_an_interrupted_evaluation_resumes_where_it_stopped(folder, tmp_path, capsys, monkeypatch):
    """Interrupted after 2 answers of 4 (and a line cut short): the answers file kept them; --resume asks only
    the others (interrupted once more after one), and the report is the uninterrupted run's."""
    data = write_questions(tmp_path, 4)
    run = [folder, '--data', data, '--max-new-tokens', '3']
    assert eval_main(run + ['--out', str(tmp_path / 'whole.json')]) == 0
    whole = json.load(open(tmp_path / 'whole.json'))['results']
    closing = capsys.readouterr().out.strip().splitlines()[-1]
    asked, ask = [], ConvertedModel.ask

    def interrupted_ask(self, *args, **kwargs):
        asked.append(args[0])
        if stop_after is not None and len(asked) > stop_after:
            raise KeyboardInterrupt
        return ask(self, *args, **kwargs)

    monkeypatch.setattr(ConvertedModel, 'ask', interrupted_ask)
    stop_after, out = 4, str(tmp_path / 'r.json')  # 2 questions, with and without their image
    assert eval_main(run + ['--out', out]) == 130
    assert f'2 answers are kept in {tmp_path}/r.answers.jsonl: the same command with --resume' in \
        capsys.readouterr().err
    with open(tmp_path / 'r.answers.jsonl', 'a') as f:
        f.write('{"id": "2", "answer": "cut sh')  # a write the interruption cut short
    assert eval_main(run + ['--out', out]) == 2
    assert 'holds 2 answers of an earlier evaluation; --resume continues it' in capsys.readouterr().err
    assert eval_main(run + ['--out', out, '--resume', '--metric', 'anls']) == 2
    assert "written with other settings (metric: 'anls' now, 'exact' there)" in capsys.readouterr().err
    asked.clear()
    stop_after = 2  # one more answer, appended after the cut line (cut off first)
    assert eval_main(run + ['--out', out, '--resume']) == 130
    assert '2 of 4 questions answered' in capsys.readouterr().err
    asked.clear()
    stop_after = None
    assert eval_main(run + ['--out', out, '--resume']) == 0
    captured = capsys.readouterr()
    assert len(asked) == 2 and 'resuming' in captured.err and '3 of 4 questions answered' in captured.err
    assert captured.out.strip().splitlines()[-1] == closing
    assert json.load(open(out))['results'] == whole and not os.path.exists(tmp_path / 'r.answers.jsonl')
    stop_after, out = 0, str(tmp_path / 'early.json')   # before the first answer: no file named as kept
    assert eval_main(run + ['--out', out]) == 130
    assert 'eval: interrupted; no answer was kept; the same command starts again' in capsys.readouterr().err
    assert not os.path.exists(tmp_path / 'early.answers.jsonl')


def test_a_limited_resume_keeps_the_answers_its_report_leaves_out(folder, tmp_path, capsys):
    """--resume --limit 1 over an answers file of 4: the report held 1 result and the file, holding the other 3
    (hours of answers in a real run), was removed as if the report held them all."""
    data = write_questions(tmp_path, 4)
    run = [folder, '--data', data, '--max-new-tokens', '3']
    answers = tmp_path / 'r.answers.jsonl'
    assert eval_main(run + ['--answers', str(answers)]) == 0
    capsys.readouterr()
    assert eval_main(run + ['--out', str(tmp_path / 'r.json'), '--resume', '--limit', '1']) == 0
    assert len(json.load(open(tmp_path / 'r.json'))['results']) == 1
    assert answers.exists() and len(answers.read_text().splitlines()) == 5   # the settings line and 4 answers
    assert (f'{answers} is kept: it holds 3 answers to questions past --limit, which the report leaves out'
            in capsys.readouterr().err)
    assert eval_main(run + ['--out', str(tmp_path / 'r.json'), '--resume']) == 0   # all of them: it goes
    assert not answers.exists() and len(json.load(open(tmp_path / 'r.json'))['results']) == 4


def test_an_out_that_is_no_file_name_is_refused_before_the_model_loads(tmp_path, capsys):
    """--out FIFO (as root, /dev/null) was replaced by the report, exit 0; --out newdir/ asked every question,
    then could not write the report (its answers in newdir/.answers.jsonl, the --resume it advised refused)."""
    data = write_questions(tmp_path, 1)
    fifo = tmp_path / 'pipe'
    os.mkfifo(fifo)
    assert eval_main([str(tmp_path / 'no_model'), '--data', data, '--out', str(fifo)]) == 2
    assert (f'eval: error: {fifo}: not a regular file (a device, a FIFO or a socket), which eval would replace '
            f'with its file; give a file name') in capsys.readouterr().err
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    assert eval_main([str(tmp_path / 'no_model'), '--data', data, '--answers', str(fifo)]) == 2
    assert 'not a regular file' in capsys.readouterr().err
    assert eval_main([str(tmp_path / 'no_model'), '--data', data, '--out', str(tmp_path / 'newdir') + '/']) == 2
    assert f'eval: error: {tmp_path}/newdir/: names a folder; give a file name' in capsys.readouterr().err
    assert not (tmp_path / 'newdir').exists()


def test_an_out_through_a_link_to_a_folder_not_there_has_that_folder_made_at_the_start(tmp_path):
    """--out a link to a file in a folder not there: the link's own folder was made, every question asked, then
    the report (written to the link's target) could not be written, and the --resume it advised failed alike."""
    from xtuner_plugins.cli.eval import check_output
    link = tmp_path / 'r.json'
    os.symlink(tmp_path / 'elsewhere' / 'sub' / 'r.json', link)
    check_output(str(link))
    assert (tmp_path / 'elsewhere' / 'sub').is_dir()
    link.write_text('{}')   # now writable through the link
    assert (tmp_path / 'elsewhere' / 'sub' / 'r.json').read_text() == '{}'


@pytest.mark.parametrize('option, value, message', [
    ('--limit', '-1', 'argument --limit: must be at least 1, got -1'),  # asked 5 of 6 questions
    ('--limit', '0', 'argument --limit: must be at least 1, got 0'),  # asked them all
    ('--frames', '0', 'argument --frames: must be at least 1, got 0'),  # a traceback at the first video
    ('--max-new-tokens', '0', 'argument --max-new-tokens: must be at least 1, got 0'),
    ('--batch-size', '0', 'argument --batch-size: must be at least 1, got 0'),
    ('--limit', '2.5', "argument --limit: '2.5' is not a whole number"),
    ('--dtype', 'fp8', "argument --dtype: 'fp8' is not a dtype"),  # a traceback once the data was read
    ('--device', 'gpu', "argument --device: 'gpu' is not a device"),
])
def test_numbers_and_settings_that_mean_nothing_are_refused_at_parsing(tmp_path, capsys, option, value, message):
    with pytest.raises(SystemExit) as exit_:
        eval_main([str(tmp_path / 'no_model'), '--data', str(tmp_path / 'no.jsonl'), option, value])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and f'error: {message}' in err and 'Traceback' not in err, err


def test_an_output_that_is_one_of_the_inputs_is_refused_before_the_model_loads(tmp_path, capsys):
    """--out set to the --data file replaced the data with the report (exit 0). Now any output that is an input
    (the data, an image, a model file; through a symlink too) is refused in one line naming both, and nothing is
    written."""
    data = write_questions(tmp_path, 2)
    model = tmp_path / 'model'
    model.mkdir()
    (model / 'config.json').write_text('{}')
    os.symlink(data, tmp_path / 'link.json')
    before = {p: open(p, 'rb').read() for p in (data, str(tmp_path / '1.png'), str(model / 'config.json'))}
    for extra, message in [
            (['--out', data], f'--out {data} is the --data file {data}: eval would write over its input'),
            (['--out', str(tmp_path / 'link.json')], f'--out {tmp_path}/link.json is the --data file {data}'),
            (['--answers', str(tmp_path / '1.png')],
             f'the answers file {tmp_path}/1.png is an image of {data}:2 ({tmp_path}/1.png)'),
            (['--out', str(model / 'config.json')],
             f'--out {model}/config.json is {model}/config.json of the model folder {model}')]:
        assert eval_main([str(model), '--data', data] + extra) == 2, extra
        err = capsys.readouterr().err
        assert err.startswith(f'eval: error: {message}') and err.endswith(': eval would write over its input; give '
                                                                          'another path\n'), err
    # a frame of a video given as a folder of frames, and a new file in that folder (read as a frame next time):
    # the answers file was opened as a resume ('not JSON ...; remove the file to start again': a frame)
    from tests.helpers import write_video
    frames = write_video(tmp_path / 'frames', [10, 90, 200])
    with open(data, 'a') as f:
        f.write(json.dumps({'id': 'v', 'video': 'frames', 'conversations': [
            {'from': 'human', 'value': '<video>\nWhat?'}, {'from': 'gpt', 'value': 'x'}]}) + '\n')
    before.update({p: open(p, 'rb').read() for p in (data, f'{frames}/0003.png')})
    for extra, message in [
            (['--answers', f'{frames}/0003.png'],
             f'the answers file {frames}/0003.png is a frame of the video of {data}:3 ({frames}/0003.png)'),
            (['--answers', f'{frames}/0004.png'],
             f'the answers file {frames}/0004.png is in the frame folder of the video of {data}:3 ({frames})'),
            (['--answers', f'{tmp_path}/dangling.png'],   # a link to a new file there
             f'the answers file {tmp_path}/dangling.png is in the frame folder of the video of {data}:3')]:
        if 'dangling' in extra[1]:
            os.symlink(f'{frames}/0005.png', tmp_path / 'dangling.png')
        assert eval_main([str(model), '--data', data] + extra) == 2, extra
        err = capsys.readouterr().err
        assert err.startswith(f'eval: error: {message}') and 'eval would' in err and 'remove' not in err, err
    assert sorted(os.listdir(frames)) == ['0001.png', '0002.png', '0003.png']
    # a file there that is no frame (not an image's name) is not read as one: allowed
    assert eval_main([str(model), '--data', data, '--out', f'{frames}/r.json']) == 2
    assert 'frame folder' not in capsys.readouterr().err   # it goes on (to the model, not one here)
    cfg = tmp_path / 'cfg.py'
    cfg.write_text('')
    assert eval_main(['--config', str(cfg), '--checkpoint', str(tmp_path / 'iter_1.pth'), '--data', data,
                      '--out', str(cfg)]) == 2
    assert f'--out {cfg} is the --config file {cfg}: eval would' in capsys.readouterr().err
    assert before == {p: open(p, 'rb').read() for p in before} and not os.path.exists(tmp_path / 'test.answers.jsonl')


class ColourModel:
    """A stand-in for the converted model: answers the colour of the image's first pixel."""

    def reset(self):
        pass

    def ask(self, prompt, images, generation, video=None):
        from xtuner_plugins.data.image_io import load_image
        return 'red' if load_image(images[0]).getpixel((0, 0))[0] > 128 else 'blue'


def test_a_report_the_disk_cannot_take_is_one_line_and_the_answers_are_kept(folder, tmp_path, capsys, monkeypatch):
    """A full disk at the report, after every question was asked, was a traceback with no word of the kept
    answers; now one line saying where they are and that --resume writes the report without asking again."""
    from xtuner_plugins.eval.evaluate import Report
    data = write_questions(tmp_path, 2)
    run, out = [folder, '--data', data, '--max-new-tokens', '3', '--out', str(tmp_path / 'r.json')], tmp_path / 'r.json'
    write = Report.write

    def full(self, path, **kwargs):
        raise OSError(28, 'No space left on device')
    monkeypatch.setattr(Report, 'write', full)
    assert eval_main(run) == 2
    err = capsys.readouterr().err
    assert 'Traceback' not in err and err.strip().splitlines()[-1] == (
        f'eval: error: the report {out} could not be written ([Errno 28] No space left on device); the answers are '
        f'kept in {tmp_path}/r.answers.jsonl: the same command with --resume writes it without asking them again')
    monkeypatch.setattr(Report, 'write', write)
    asked = []
    monkeypatch.setattr(ConvertedModel, 'ask', lambda self, *a, **k: asked.append(a) or 'x')
    assert eval_main(run + ['--resume']) == 0 and not asked and json.load(open(out))['results']


def test_an_answer_the_disk_cannot_take_is_one_line_naming_resume(folder, tmp_path, capsys, monkeypatch):
    """A full disk while an answer was appended gave three chained tracebacks (the write, then the file's close
    twice) and no word of --resume, which works: one line naming the file, the answers kept and --resume."""
    import xtuner_plugins.eval.answers as answers_module
    data = write_questions(tmp_path, 4)
    run = [folder, '--data', data, '--max-new-tokens', '3', '--out', str(tmp_path / 'r.json')]
    monkeypatch.setattr(ConvertedModel, 'ask', lambda self, *a, **k: 'x')

    class FillingFile:   # the disk fills at the third answer
        def __init__(self, f):
            self.f, self.lines = f, 0

        def write(self, text):
            self.lines += 1
            if self.lines > 3:
                raise OSError(28, 'No space left on device')
            return self.f.write(text)

        def __getattr__(self, name):
            return getattr(self.f, name)
    monkeypatch.setattr(answers_module, 'open', lambda *a, **k: FillingFile(open(*a, **k)), raising=False)
    assert eval_main(run) == 2
    err = capsys.readouterr().err
    assert 'Traceback' not in err and err.strip().splitlines()[-1] == (
        f'eval: error: the answers file {tmp_path}/r.answers.jsonl could not be written (No space left on device); '
        '2 answers are kept in it: make room and run the same command with --resume to ask the rest')
    monkeypatch.undo()
    asked = []
    monkeypatch.setattr(ConvertedModel, 'ask', lambda self, *a, **k: asked.append(a) or 'x')
    assert eval_main(run + ['--resume']) == 0 and len(asked) == 2 * 2   # (each with its blind control)
    assert 'r.answers.jsonl: 2 of 4 questions answered, asking the other 2' in capsys.readouterr().err


def test_resume_asks_again_the_questions_whose_images_were_replaced(tmp_path, capsys, monkeypatch):
    """Images replaced in place between an evaluation and its --resume: the kept answers to the old images were
    reported (0.400 against 0.200 fresh). Now they are dropped, counted and named, and asked again."""
    import xtuner_plugins.cli.eval as cli
    monkeypatch.setattr(cli, 'run_tool', lambda args, prog, use, errors=(): use(ColourModel()) or 0)

    def paint(reds, width):
        for i in range(5):
            Image.new('RGB', (width, 8), (255, 0, 0) if i < reds else (0, 0, 255)).save(tmp_path / f'{i}.png')

    data = write_questions(tmp_path, 5, **{str(i): {'conversations': [
        {'from': 'human', 'value': '<image>\nWhich colour?'}, {'from': 'gpt', 'value': 'red'}]} for i in range(5)})
    paint(2, 8)
    run = ['model', '--data', data, '--no-blind', '--answers', str(tmp_path / 'a.jsonl')]
    assert eval_main(run) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == 'accuracy: 0.400 (5 questions)'
    paint(1, 9)  # another size, and another modification time
    assert eval_main(run + ['--resume']) == 0
    captured = capsys.readouterr()
    assert captured.out.strip().splitlines()[-1] == 'accuracy: 0.200 (5 questions)'
    assert f'resuming {tmp_path}/a.jsonl: 5 kept answers dropped and asked again: their images changed since ' \
           f'they were answered (size or modification time): {data}:1, {data}:2, {data}:3 and 2 more' in captured.err
    assert eval_main(run + ['--resume']) == 0  # nothing changed since: nothing asked, nothing dropped
    captured = capsys.readouterr()
    assert 'dropped' not in captured.err and '5 of 5 questions answered' in captured.err
    assert captured.out.strip().splitlines()[-1] == 'accuracy: 0.200 (5 questions)'


def test_a_resume_whose_one_new_question_fails_still_scores_the_kept_answers(tmp_path, capsys, monkeypatch):
    """A question added before --resume whose image does not decode: the report scored the two kept answers, then
    eval said 'none of the 1 questions could be scored' and exited 2."""
    import xtuner_plugins.cli.eval as cli
    monkeypatch.setattr(cli, 'run_tool', lambda args, prog, use, errors=(): use(ColourModel()) or 0)
    data = write_questions(tmp_path, 2)
    run = ['model', '--data', data, '--no-blind', '--answers', str(tmp_path / 'a.jsonl')]
    assert eval_main(run) == 0
    whole = (tmp_path / '1.png').read_bytes()
    (tmp_path / '2.png').write_bytes(whole[:len(whole) // 2])   # its header reads: it fails when asked
    with open(data, 'a') as f:
        f.write(json.dumps({'id': 2, 'image': '2.png', 'conversations': [
            {'from': 'human', 'value': '<image>\nDescribe it.'}, {'from': 'gpt', 'value': 'x'}]}) + '\n')
    capsys.readouterr()
    assert eval_main(run + ['--resume']) == 0
    captured = capsys.readouterr()
    assert captured.out.strip().splitlines()[-1].endswith('(2 questions); 1 not scored'), captured.out
    assert 'none of' not in captured.err


def test_resume_refuses_answers_of_another_model_converted_into_the_same_folder(tmp_path, capsys, monkeypatch):
    """A model converted again into the folder an evaluation was resumed on: the first model's answers were kept
    and reported as the second's (found by an adversarial sweep). The model's files are in the settings now."""
    import xtuner_plugins.cli.eval as cli
    monkeypatch.setattr(cli, 'run_tool', lambda args, prog, use, errors=(): use(ColourModel()) or 0)
    Image.new('RGB', (8, 8), (255, 0, 0)).save(tmp_path / '0.png')
    data = write_questions(tmp_path, 1, **{'0': {'conversations': [
        {'from': 'human', 'value': '<image>\nWhich colour?'}, {'from': 'gpt', 'value': 'red'}]}})
    model = tmp_path / 'model'
    model.mkdir()
    (model / 'model.safetensors').write_bytes(b'first')
    inside = [str(model), '--data', data, '--no-blind', '--answers', str(model / 'answers.jsonl')]
    assert eval_main(inside) == 2   # a new file in the model's folder: the resume would take it for the model's
    assert f'the answers file {model / "answers.jsonl"} is inside the model folder {model}: eval would add a file ' \
           'to the model it reads; give a path outside it' in capsys.readouterr().err
    answers = tmp_path / 'answers.jsonl'
    run = [str(model), '--data', data, '--no-blind', '--answers', str(answers)]
    assert eval_main(run) == 0
    assert eval_main(run + ['--resume']) == 0 and '1 of 1 questions answered' in capsys.readouterr().err
    (model / 'model.safetensors').write_bytes(b'second')
    assert eval_main(run + ['--resume']) == 2
    err = capsys.readouterr().err
    assert f'{answers}: written with other settings (model_files: \'1 files, 6 bytes' in err, err


@pytest.mark.parametrize('error', [
    None,  # the real converter: the checkpoint is not there
    FileNotFoundError('/w/warm/iter_5.pth: the previous stage of /w/sft/iter_9.pth (recorded in it) is not found'),
    ValueError('model.llm: /m/other is not the folder /w/sft/iter_9.pth was trained with'),
])
def test_a_config_and_checkpoint_that_do_not_convert_is_one_line(tmp_path, capsys, monkeypatch, error):
    """--config --checkpoint: a missing checkpoint, a previous stage not found, a settings mismatch were
    tracebacks. Now the converter's own message, as convert_to_official prints it: one line, exit 2, no answers
    file left."""
    from tests.tools.test_convert_to_official import LORA
    import xtuner_plugins.models.export as export
    if error is not None:
        def fails(*args, **kwargs):
            raise error
        monkeypatch.setattr(export, 'export_checkpoint', fails)
    data = write_questions(tmp_path, 1)
    ckpt = str(tmp_path / 'iter_9.pth')
    assert eval_main(['--config', LORA, '--checkpoint', ckpt, '--data', data, '--out', str(tmp_path / 'r.json')]) == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1] == f'eval: error: {error or f"checkpoint not found: {ckpt}"}', err
    assert 'Traceback' not in err and sorted(os.listdir(tmp_path)) == ['0.png', 'test.jsonl'], os.listdir(tmp_path)
