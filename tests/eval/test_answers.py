"""The answers file tools/eval.py resumes from: read back as written, refused when it would mislead or be lost."""

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
