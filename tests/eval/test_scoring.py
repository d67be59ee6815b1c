"""The project's one scorer: VQA-style normalisation, exact match, ANLS, and reading the chosen option."""

import pytest

from xtuner_plugins.eval.scoring import anls, edit_distance, exact_match, extract_option, normalize_answer


@pytest.mark.parametrize('given, normalised', [
    ('Red.', 'red'), ('  The RED circle!  ', 'red circle'), ('Two', '2'), ('an apple', 'apple'),
    ('2.5 m', '2.5 m'), ('1,000', '1000'), ('yes, it is', 'yes it is'), ("dont", "don't"), ('top-left', 'top left'),
])
def test_normalisation(given, normalised):
    assert normalize_answer(given) == normalised


def test_exact_match_after_normalisation():
    assert exact_match('Two.', ['2']) == 1.0 and exact_match('the Circle', ['circle', 'disc']) == 1.0
    assert exact_match('three', ['2']) == 0.0 and exact_match('', ['2']) == 0.0


def test_anls():
    assert edit_distance('kitten', 'sitting') == 3 and edit_distance('', 'abc') == 3
    assert anls('Hello World', ['hello world']) == 1.0
    assert anls('hello wrld', ['hello world']) == pytest.approx(1 - 1 / 11)
    assert anls('goodbye', ['hello world']) == 0.0  # past the 0.5 threshold
    assert anls('abcd', ['abcx', 'zzzz']) == pytest.approx(0.75)  # the best reference counts


OPTIONS = {'A': 'a dog', 'B': 'a cat', 'C': 'dark red', 'D': 'red'}


@pytest.mark.parametrize('answer, letter', [
    ('B', 'B'), ('(B)', 'B'), ('B.', 'B'), ('Answer: C', 'C'), ('The answer is D.', 'D'),
    ('It is a cat.', 'B'),             # no lone letter: the option's text
    ('A cat', 'B'),                    # "A" is an article here: another option's text is named
    ('dark red', 'C'),                 # "red" is inside "dark red": the longer option
    ('I cannot tell', None), ('A or B', None),
])
def test_the_chosen_option_is_read_from_the_answer(answer, letter):
    assert extract_option(answer, OPTIONS) == letter
