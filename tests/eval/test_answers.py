"""The answers file tools/eval.py resumes from: read back as written, refused when it would mislead or be lost."""

import os

import pytest

from xtuner_plugins.eval import Question, Result
from xtuner_plugins.eval.answers import AnswersFile

SETTINGS = dict(model='/m', data='/d.jsonl', metric='exact', cfg_options={'a': (1, 2)})


def question(id_, prompt='What?', reference='x'):
    return Question(id_, 'c', prompt, [], [reference])


def result(id_, prompt='What?', reference='x'):
    return Result(id_, 'c', prompt, reference, 'answer', 0.0, source=f'd.jsonl:{id_}')


def test_answers_read_back_and_checked_against_the_questions(tmp_path):
    path = str(tmp_path / 'a.jsonl')
    answers = AnswersFile(path, SETTINGS)
    answers.append(result('1'))
    answers.append(result('2'))
    answers.close()
    again = AnswersFile(path, SETTINGS, resume=True)  # a tuple in the settings reads back as a list: the same
    assert again.done == {'1': result('1'), '2': result('2')}
    again.check([question('1'), question('2'), question('3')])
    assert again.results([question('2'), question('3'), question('1')], [result('3')]) == \
        [result('2'), result('3'), result('1')]
    again.close()
    with pytest.raises(ValueError, match=r"a.jsonl:3: the answer to id '2' was to another question"):
        AnswersFile(path, SETTINGS, resume=True).check([question('1'), question('2', reference='y')])
    with pytest.raises(ValueError, match=r"a.jsonl:2: the answer to id '1' is not in the data any more"):
        AnswersFile(path, SETTINGS, resume=True).check([question('2')])


def test_a_file_that_is_not_an_answers_file_is_never_overwritten(tmp_path):
    for text in ('{"id": 1}\n', 'some notes without a newline'):
        (tmp_path / 'notes.jsonl').write_text(text)
        with pytest.raises(ValueError, match='not an answers file of tools/eval.py'):
            AnswersFile(str(tmp_path / 'notes.jsonl'), SETTINGS)
        assert (tmp_path / 'notes.jsonl').read_text() == text


def test_an_answer_whose_image_changed_since_is_dropped_and_asked_again(tmp_path):
    """--resume kept the answers to images replaced in place since (0.400 reported against 0.200 fresh): each
    answer records its images' size and modification time (ns), or an in-memory image's pixel hash; a kept answer
    whose images are not those any more is dropped (to be asked again) and its source named in ``changed``."""
    from PIL import Image
    paths = [str(tmp_path / f'{i}.bmp') for i in range(3)]  # a BMP's size: its pixels' count
    for i, path in enumerate(paths):
        Image.new('RGB', (4, 4), (200, 0, 0)).save(path)
    pixels = Image.new('RGB', (4, 4), (0, 0, 200))

    def questions(memory=pixels):
        return [Question(str(i), 'c', 'What?', [p], ['x'], source=f'd.jsonl:{i + 1}') for i, p in enumerate(paths)] \
            + [Question('m', 'c', 'What?', [memory], ['x'], source='m.tsv:2 (index m)')]

    path = str(tmp_path / 'a.jsonl')
    answers = AnswersFile(path, SETTINGS)
    answers.check(questions())
    for q in questions():
        answers.append(result(q.id))
    answers.close()
    st = os.stat(paths[1])
    Image.new('RGB', (4, 4), (0, 200, 0)).save(paths[1])  # the same size in bytes: told by its time alone
    assert os.path.getsize(paths[1]) == st.st_size
    os.utime(paths[1], ns=(st.st_atime_ns, st.st_mtime_ns + 1))
    Image.new('RGB', (5, 4), (200, 0, 0)).save(paths[2])
    os.utime(paths[2], ns=(st.st_atime_ns, os.stat(paths[0]).st_mtime_ns))  # the old time kept: told by its size
    again = AnswersFile(path, SETTINGS, resume=True)
    again.check(questions(Image.new('RGB', (4, 4), (0, 0, 201))))
    assert sorted(again.done) == ['0'] and again.changed == ['d.jsonl:2', 'd.jsonl:3', 'm.tsv:2 (index m)']
    again.close()
    unchanged = AnswersFile(path, SETTINGS, resume=True)
    unchanged.check(questions(Image.new('RGB', (4, 4), (0, 0, 200))))  # equal pixels: the same image
    assert sorted(unchanged.done) == ['0', 'm'] and len(unchanged.changed) == 2


def test_another_clip_is_asked_again_and_a_kept_answer_takes_the_datas_category(tmp_path):
    """A video question's clip edited between an evaluation and its --resume kept the answer to the old frames;
    a category renamed in the data kept the old one in the report (found by a helper's sweep)."""
    video = tmp_path / 'v.mp4'
    video.write_bytes(b'a video')

    def questions(clip, category='vid'):
        return [Question('v', category, 'What?', [], ['x'], source='d.jsonl:1', video=str(video), clip=clip),
                Question('i', category, 'Which?', [], ['x'], source='d.jsonl:2')]
    path = str(tmp_path / 'a.jsonl')
    answers = AnswersFile(path, SETTINGS)
    answers.check(questions((0.0, 1.0)))
    for id_, prompt in (('v', 'What?'), ('i', 'Which?')):
        answers.append(Result(id_, 'vid', prompt, 'x', 'answer', 0.0, source='old.jsonl:9'))
    answers.close()
    again = AnswersFile(path, SETTINGS, resume=True)
    again.check(questions((1.5, 2.4), category='renamed'))
    assert sorted(again.done) == ['i'] and again.changed == ['d.jsonl:1']
    assert (again.done['i'].category, again.done['i'].source) == ('renamed', 'd.jsonl:2')
    again.close()
    same = AnswersFile(path, SETTINGS, resume=True)
    same.check(questions((0.0, 1.0)))
    assert sorted(same.done) == ['i', 'v']


def test_a_second_evaluation_into_the_same_answers_is_refused_while_the_first_writes(tmp_path):
    """Two evaluations with one --out both appended to its answers file (the second, told to --resume, asked the
    same questions, wrote over the first's report and ended in a traceback): the file is held while written."""
    path = str(tmp_path / 'a.jsonl')
    first = AnswersFile(path, SETTINGS)
    first.append(result('1'))
    for resume in (False, True):
        with pytest.raises(ValueError, match=r'a.jsonl: another evaluation is writing its answers there now; wait '
                                             r'for it to end, or give this one another --out'):
            AnswersFile(path, SETTINGS, resume=resume)
    first.close()
    again = AnswersFile(path, SETTINGS, resume=True)
    assert again.done == {'1': result('1')}
    again.close()


def test_a_resume_from_another_folder_keeps_the_answers_to_the_same_images(tmp_path, monkeypatch):
    """Images named relative to where eval ran were recorded so: resumed from another folder (the same --data, as
    the settings check agreed), every kept answer was dropped as 'their images changed' and asked again."""
    from PIL import Image
    (tmp_path / 'd').mkdir()
    Image.new('RGB', (4, 4), (200, 0, 0)).save(tmp_path / 'd' / '0.bmp')
    path = str(tmp_path / 'a.jsonl')
    monkeypatch.chdir(tmp_path / 'd')
    answers = AnswersFile(path, SETTINGS)
    answers.check([Question('0', 'c', 'What?', ['0.bmp'], ['x'])])
    answers.append(result('0'))
    answers.close()
    monkeypatch.chdir(tmp_path)
    again = AnswersFile(path, SETTINGS, resume=True)
    again.check([Question('0', 'c', 'What?', [os.path.join('d', '0.bmp')], ['x'])])
    assert sorted(again.done) == ['0'] and again.changed == []
    again.close()


@pytest.mark.parametrize('edit, said', [
    (dict(score='1'), "score '1', not a number from 0 to 1"),   # a TypeError traceback summing the report
    (dict(score=None), 'score None, not a number from 0 to 1'),
    (dict(answer=3), 'answer 3, not text'),
    (dict(blind_score=None), 'blind_score None, not a number from 0 to 1'),   # the blind columns left the report
])
def test_an_edited_answer_is_named_by_its_line(tmp_path, edit, said):
    import json
    path = tmp_path / 'a.jsonl'
    blind = dict(SETTINGS, blind=True)
    answers = AnswersFile(str(path), blind)
    answers.append(Result('1', 'c', 'What?', 'x', 'answer', 1.0, blind_answer='b', blind_score=0.0))
    answers.close()
    lines = path.read_text().splitlines()
    lines[1] = json.dumps(dict(json.loads(lines[1]), **edit))
    path.write_text('\n'.join(lines) + '\n')
    with pytest.raises(ValueError, match=rf"a.jsonl:2: not an answer of tools/eval.py \({said}\): edited since"):
        AnswersFile(str(path), blind, resume=True)


def test_a_report_given_as_answers_is_not_offered_for_removal(tmp_path):
    """--answers r.json (eval's report, or notes): 'r.json:1: not JSON ...; remove the file to start again'."""
    (tmp_path / 'r.json').write_text('{\n "settings": {}\n}\n')
    with pytest.raises(ValueError, match=r'r.json:1: not an answers file of tools/eval.py \(not JSON lines\); give '
                                         r'another --answers file'):
        AnswersFile(str(tmp_path / 'r.json'), SETTINGS)


def test_a_kept_answer_is_scored_again_against_its_question(tmp_path):
    """An answer edited in the file to 'yes' (the reference) kept the 0.0 recorded for the answer before it: the
    report showed answer 'yes', reference 'yes', score 0. Kept answers are scored again, and named."""
    import json
    from xtuner_plugins.eval import Question
    path = tmp_path / 'a.jsonl'
    answers = AnswersFile(str(path), SETTINGS)
    answers.append(Result('1', 'c', 'What?', 'yes', 'no', 0.0, 'no', 0.0, source='d.jsonl:1'))
    answers.append(Result('2', 'c', 'Pick', 'B', 'B', 1.0, 'A', 0.0, read_by='likelihood',
                          option_scores={'A': -2.0, 'B': -1.0}, source='d.jsonl:2'))
    answers.close()
    lines = path.read_text().splitlines()
    edited = dict(json.loads(lines[1]), answer='Yes.', blind_answer='yes')
    path.write_text('\n'.join([lines[0], json.dumps(edited), lines[2]]) + '\n')
    again = AnswersFile(str(path), SETTINGS, resume=True)
    again.check([question('1', reference='yes'), Question('2', 'c', 'Pick', [], ['B'], options={'A': 'x', 'B': 'y'},
                                                          source='d.jsonl:2')])
    assert (again.done['1'].score, again.done['1'].blind_score) == (1.0, 1.0) and again.rescored == ['1']
    assert (again.done['2'].score, again.done['2'].blind_score, again.done['2'].read_by) == (1.0, 0.0, 'likelihood')
    again.close()
