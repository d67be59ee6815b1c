"""Scoring answers: the one scorer of the project (``tools/eval.py``, the demo, the evaluation hook).

* :func:`normalize_answer`: the VQA evaluation's normalisation (its ``processPunctuation`` and
  ``processDigitArticle``): lower case; its marks removed or made spaces (not ``$ % # : & *``: ``$5`` is not ``5``;
  ``1,000`` is ``1000``); a period removed unless a digit follows (``U.S.`` is ``us``, ``2.5`` stays); number
  words to ten as digits; articles dropped; common contractions fixed; whitespace collapsed. Beyond ASCII (VQA's
  rule knows its marks only): text compared in Unicode's composed form (NFC), invisible format characters
  dropped, other scripts' and typographic punctuation (``。``, ``“ ”``, ``’``) treated as ASCII's; full-width
  letters stay as they are.
* :func:`exact_match`: the normalised answer equals a normalised reference. An empty (or whitespace-only)
  answer is never right; marks alone (``-``, ``...``: nothing left once normalised) are right against the same
  marks. Where dropping articles empties the answer or the reference (``A``, ``an``: a letter answer), both are
  compared with their articles kept, else their articles alone would match an empty answer or any other article.
* :func:`anls`: Average Normalized Levenshtein Similarity (ST-VQA, DocVQA): ``1 - d / max(len)`` of the best
  reference, 0 below the threshold (``d / max(len) >= 0.5``), on lower-cased, stripped strings (NFC, as above);
  0 for an empty answer.
* :func:`read_option` (and :func:`extract_option`, its letter): the option a free answer chose, as VLMEvalKit's
  ``can_infer`` reads it: by its letter (``B``, ``(B)``, ``B. red``, ``Answer: B``: exactly one option letter
  among the answer's words, near its end), else by the one option whose text the answer contains; and how it
  was read (``letter``, ``text`` or ``unmatched``), which the report counts.

Hand-written: the pinned packages hold no VQA normaliser or edit distance (the Levenshtein packages are not
in the tested set), and each is a few lines.
"""

from __future__ import annotations

import re
import unicodedata
from typing import Mapping, Optional, Sequence, Tuple

__all__ = ['normalize_answer', 'exact_match', 'anls', 'edit_distance', 'extract_option', 'option_by_letter',
           'option_by_text', 'read_option', 'READ_BY', 'METRICS']

_NUMBERS = dict({w: str(i) for i, w in enumerate('zero one two three four five six seven eight nine ten'.split())},
                none='0')   # the VQA evaluation's manualMap (to ten): 'none' is '0' too
_ARTICLES = {'a', 'an', 'the'}
_CONTRACTIONS = {"dont": "don't", "doesnt": "doesn't", "isnt": "isn't", "arent": "aren't", "cant": "can't",
                 "wont": "won't", "didnt": "didn't", "wasnt": "wasn't", "werent": "weren't", "im": "i'm",
                 "ive": "i've", "youre": "you're", "theyre": "they're", "thats": "that's", "whats": "what's"}
# the VQA evaluation's marks (not $ % # : & * ' nor the period, which has its own rule), and its two patterns
_PUNCT = (';', '/', '[', ']', '"', '{', '}', '(', ')', '=', '+', '\\', '_', '-', '>', '<', '@', '`', ',', '?', '!')
_COMMA_STRIP = re.compile(r'(\d)(,)(\d)')
_PERIOD_STRIP = re.compile(r'\.(?!\d)')   # a period not before a digit goes (VQA's pattern means this): U.S. -> us


def _unicode(text) -> str:
    """``text`` in Unicode's composed form (NFC: ``e`` + a combining accent, as a macOS-written file or another
    tool may hold it, is ``é``), without invisible format characters (a zero-width space)."""
    text = unicodedata.normalize('NFC', str(text))
    return ''.join(c for c in text if unicodedata.category(c) != 'Cf') if not text.isascii() else text


def _unicode_punctuation(text: str) -> str:
    """Punctuation beyond ASCII's as ASCII's rule treats it: typographic apostrophes as ``'`` (``don’t``), any
    other mark (curly quotes, ``。``, ``，``, ``¿``) a space."""
    if text.isascii():
        return text
    text = text.replace('\u2019', "'").replace('\u2018', "'")
    return ''.join(' ' if unicodedata.category(c).startswith('P') and c != "'" and not c.isascii() else c
                   for c in text)


def normalize_answer(text: str, articles: bool = True) -> str:
    """VQA-style normalisation (see the module docstring); ``articles=False`` keeps the articles."""
    text = _unicode_punctuation(_unicode(text)).replace('\n', ' ').replace('\t', ' ').strip().lower()
    kept = _vqa_punctuation(text)
    words = []
    for word in kept.split():
        word = _NUMBERS.get(word, word)
        word = _CONTRACTIONS.get(word, word)
        if not articles or word not in _ARTICLES:
            words.append(word)
    return ' '.join(words)


def _vqa_punctuation(text: str) -> str:
    """The VQA evaluation's punctuation step: each of its marks goes where a space stands beside it (or anywhere
    in a text holding a comma between digits: ``1,000``), else becomes a space (``top-left``); then a period goes
    unless a digit follows it (``2.5``, ``.5`` stay; ``a.m.`` is ``am``)."""
    out, digit_comma = text, _COMMA_STRIP.search(text) is not None
    for mark in _PUNCT:
        gone = digit_comma or mark + ' ' in text or ' ' + mark in text
        out = out.replace(mark, '' if gone else ' ')
    return _PERIOD_STRIP.sub('', out)


def _same(answer: str, reference: str) -> bool:
    given, wanted = normalize_answer(answer), normalize_answer(reference)
    if not given or not wanted:  # only articles (or marks) on one side: compared with the articles kept
        given, wanted = normalize_answer(answer, articles=False), normalize_answer(reference, articles=False)
    if not given and not wanted:   # marks alone on both sides ('-', '...'): the same marks are the same answer
        return _unicode(answer).strip() == _unicode(reference).strip() != ''
    return bool(given) and given == wanted


def exact_match(answer: str, references: Sequence[str]) -> float:
    if not str(answer).strip():
        return 0.0  # an answer that says nothing is never right
    return float(any(_same(answer, r) for r in references))


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance (insertions, deletions, substitutions of one character)."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def anls(answer: str, references: Sequence[str], threshold: float = 0.5) -> float:
    given = ' '.join(_unicode(answer).strip().lower().split())
    if not given:
        return 0.0  # an answer that says nothing is never right (against an empty reference it would be 1)
    best = 0.0
    for ref in references:
        ref = ' '.join(_unicode(ref).strip().lower().split())
        longest = max(len(given), len(ref))
        nl = edit_distance(given, ref) / longest if longest else 0.0
        best = max(best, 1.0 - nl if nl < threshold else 0.0)
    return best


METRICS = {'exact': exact_match, 'anls': anls}


# VLMEvalKit's rule (``vlmeval/utils/matching_util.py``: ``can_infer`` = ``can_infer_option``, else
# ``can_infer_text``), restated: these punctuation marks become spaces before the answer is split into words
_LETTER_PUNCT = str.maketrans({c: ' ' for c in '.()[],:;!*#{}'})
# answers that refuse: VLMEvalKit reads them as its "Z" (no option), never by the options' text
_REFUSALS = ("Sorry, I can't help with images of people yet.", "I can't process this file.",
             "I'm sorry, but without the image provided", 'Cannot determine the answer')
# "... answer is B": VLMEvalKit's last try; its letter taken upper-case only here ("the answer is a cat" is no "A")
# and the letter a word of its own: "The answer is Apple" named no option A (its text names B)
_ANSWER_IS = re.compile(r'(?i:(?:correct\s+)?answer\s+is)\s+\**([A-Z])(?![A-Za-z0-9])\**')
#: How a multiple-choice answer was read: by its letter, by an option's text in it, or not at all.
READ_BY = ('letter', 'text', 'unmatched')


def _letter(answer: str, options: Mapping[str, str]) -> Tuple[Optional[str], bool]:
    """The letter read, and whether the answer said "no option" (a refusal, or VLMEvalKit's ``Z``)."""
    text = str(answer)
    if any(r in text for r in _REFUSALS):
        return None, True
    words = text.translate(_LETTER_PUNCT).split()
    named = [k for k in options if k in words]
    if len(named) == 1 and words.index(named[0]) > len(words) - 5:
        return named[0], False
    if not named and 'Z' in words:
        return None, True
    found = _ANSWER_IS.search(text)
    return (found.group(1) if found and found.group(1) in options else None), False


def option_by_letter(answer: str, options: Mapping[str, str]) -> Optional[str]:
    """The option letter ``answer`` names, as VLMEvalKit's ``can_infer_option`` reads it: after the marks
    ``.()[],:;!*#{}`` become spaces, exactly one option letter is a word of the answer and it is among its last
    four words (``B``, ``(B)``, ``B. red``, ``Answer: B``); else ``... answer is B`` anywhere. None when it
    names none or several, and for a refusal or a lone ``Z`` (VLMEvalKit's "no option")."""
    return _letter(answer, options)[0]


def option_by_text(answer: str, options: Mapping[str, str]) -> Optional[str]:
    """The option whose text ``answer`` contains, as VLMEvalKit's ``can_infer_text`` reads it: case ignored,
    exactly one option's text inside the answer (two, as ``red`` and ``dark red`` in "dark red", is none), and
    only for an answer at most twice as long as all the options' texts together."""
    text = str(answer).lower()
    if len(text) > 2 * sum(len(str(v)) for v in options.values()):
        return None
    inside = [k for k, v in options.items() if str(v).strip() and str(v).lower() in text]   # '' is in every text
    return inside[0] if len(inside) == 1 else None


def read_option(answer: str, options: Mapping[str, str]) -> Tuple[Optional[str], str]:
    """``(letter, how)``: the option ``answer`` chose and how it was read (:data:`READ_BY`): by its letter
    (:func:`option_by_letter`), else by the option's text (:func:`option_by_text`; not after a refusal or a
    lone ``Z``, as in VLMEvalKit), else ``(None, 'unmatched')``."""
    options = {k: v for k, v in options.items() if v is not None}
    letter, refused = _letter(answer, options)
    if letter is not None:
        return letter, 'letter'
    letter = None if refused else option_by_text(answer, options)
    return (letter, 'text') if letter is not None else (None, 'unmatched')


def extract_option(answer: str, options: Mapping[str, str]) -> Optional[str]:
    """The letter of the option ``answer`` chose, or None when it cannot be told (:func:`read_option`)."""
    return read_option(answer, options)[0]
