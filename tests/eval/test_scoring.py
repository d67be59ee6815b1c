"""The project's one scorer: VQA-style normalisation, exact match, ANLS, and reading the chosen option."""

import pytest

from xtuner_plugins.eval.scoring import anls, edit_distance, exact_match, extract_option, normalize_answer, read_option


@pytest.mark.parametrize('given, normalised', [
    ('Red.', 'red'), ('  The RED circle!  ', 'red circle'), ('Two', '2'), ('an apple', 'apple'),
    ('2.5 m', '2.5 m'), ('1,000', '1000'), ('yes, it is', 'yes it is'), ("dont", "don't"), ('top-left', 'top left'),
    ('.5', '.5'), ('It is 5.', 'it is 5'), ('0.5.', '0.5'),   # VQA's rule: a period before a digit stays
    ('None', '0'),   # the VQA evaluation's manualMap
])
def test_normalisation(given, normalised):
    assert normalize_answer(given) == normalised


@pytest.mark.parametrize('answer, reference', [
    ('cafe\u0301', 'café'),        # the same text, decomposed (NFD) and composed: was no match
    ('red\u200b', 'red'),          # a zero-width space after it
    ('\u201cRed\u201d', 'red'),    # curly quotes
    ('红色。', '红色'),               # an ideographic full stop
    ('I don\u2019t know', "i dont know"),  # a typographic apostrophe
    ('¿red?', 'red'),
])
def test_unicode_variants_of_one_answer_match(answer, reference):
    assert exact_match(answer, [reference]) == 1.0
    assert normalize_answer(answer) == normalize_answer(reference)


def test_unicode_normalisation_keeps_what_differs():
    assert anls('cafe\u0301', ['café']) == 1.0
    assert exact_match('café', ['cafe']) == 0.0  # accents are letters, not marks
    assert exact_match('ｒｅｄ', ['red']) == 0.0  # full-width letters are not folded (NFKC would also fold m² to m2)
    assert exact_match('2.5', ['25']) == 0.0 and exact_match('。', ['']) == 0.0


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


@pytest.mark.parametrize('answer, letter, how', [
    # by the letter: exactly one option letter among the words (after VLMEvalKit's marks become spaces),
    # among the last four words
    ('B', 'B', 'letter'), ('(B)', 'B', 'letter'), ('B.', 'B', 'letter'), ('Answer: C', 'C', 'letter'),
    ('B. a cat', 'B', 'letter'), ('**D**', 'D', 'letter'), ('A cat', 'A', 'letter'),  # VLMEvalKit reads "A" here
    ('The answer is D.', 'D', 'letter'),
    ('The answer is B because the animal on the mat looks like a cat', 'B', 'letter'),  # "answer is B": last try
    # by the text: no letter read, exactly one option's text inside the answer (case ignored)
    ('It is a cat.', 'B', 'text'), ('RED', 'D', 'text'),
    ('D? no, it is a cat, I think so', 'B', 'text'),  # "D" too early to count
    # unmatched
    ('dark red', None, 'unmatched'),  # "red" and "dark red" are both inside: VLMEvalKit reads neither
    ('I cannot tell', None, 'unmatched'), ('A or B', None, 'unmatched'),
    ('Z', None, 'unmatched'), ('Z: not a cat', None, 'unmatched'),  # VLMEvalKit's "no option": text not read
    ('Cannot determine the answer, maybe a cat', None, 'unmatched'),  # a refusal
    ('a cat ' * 20, None, 'unmatched'),  # longer than twice the options' texts: not read by text
    ('the answer is a cat', 'B', 'text'),  # a lower-case "a" is an article, not the letter
    ('The answer is Cats, a cat', 'B', 'text'),  # "answer is C..." is no letter C: the word is "Cats" (it read C)
])
def test_the_chosen_option_is_read_as_vlmevalkit_reads_it(answer, letter, how):
    assert read_option(answer, OPTIONS) == (letter, how)
    assert extract_option(answer, OPTIONS) == letter


@pytest.mark.parametrize('answer, references, right', [
    # an empty answer once matched a reference of articles only ('A', 'an': both normalise to ''): a model that
    # answered nothing scored 0.667 on three questions
    ('', ['A'], 0.0), ('', ['an'], 0.0), ('   \n', ['A'], 0.0), ('', [''], 0.0),
    ('the', ['A'], 0.0), ('B', ['A'], 0.0), ('a', ['A'], 1.0), ('A.', ['a'], 1.0),  # compared with articles kept
    ('An', ['A', 'an'], 1.0), ('the cat', ['A cat'], 1.0),  # articles still dropped where words remain
])
def test_an_empty_answer_is_never_right(answer, references, right):
    assert exact_match(answer, references) == right
    if not answer.strip():
        assert anls(answer, references) == 0.0


@pytest.mark.parametrize('answer, reference, right', [
    # where the normalisation written from VQA's description departed from VQA's code (vqaEval.py)
    ('US', 'U.S.', 1.0), ('am', 'a.m.', 1.0),     # a period goes, it was a space: 'u s', and 'a.m.' was 'm'
    ('M', 'a.m.', 0.0),
    ('5', '$5', 0.0), ('50', '50%', 0.0), ('C', 'C#', 0.0),   # VQA keeps $ % # : & *
    ('11', 'eleven', 0.0), ('10', 'ten', 1.0),    # its number words go to ten
    ('-', '-', 1.0), ('...', '...', 1.0), ('-', '?', 0.0),     # marks alone: never right before, even as the same
])
def test_exact_match_follows_the_vqa_evaluations_code(answer, reference, right):
    assert exact_match(answer, [reference]) == right
