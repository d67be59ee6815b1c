"""Scoring answers: the one scorer of the project (``tools/eval.py``, the demo, the evaluation hook).

* :func:`normalize_answer`: the VQA evaluation's normalisation, written from its description: lower case,
  punctuation removed (a full stop or comma between digits kept: ``2.5``, ``1,000``), number words to digits,
  articles dropped, common contractions fixed, whitespace collapsed.
* :func:`exact_match`: the normalised answer equals a normalised reference.
* :func:`anls`: Average Normalized Levenshtein Similarity (ST-VQA, DocVQA): ``1 - d / max(len)`` of the best
  reference, 0 below the threshold (``d / max(len) >= 0.5``), on lower-cased, stripped strings.
* :func:`extract_option`: the option a free answer chose, as VLMEvalKit reads it: its letter (``B``, ``(B)``,
  ``B.``, ``Answer: B``) when exactly one option letter stands alone in it, or else the one option whose text
  it contains.

Hand-written: the pinned packages hold no VQA normaliser or edit distance (the Levenshtein packages are not
in the tested set), and each is a few lines.
"""

from __future__ import annotations

import re
import string
from typing import Mapping, Optional, Sequence

__all__ = ['normalize_answer', 'exact_match', 'anls', 'edit_distance', 'extract_option', 'METRICS']

_NUMBERS = {w: str(i) for i, w in enumerate(
    'zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen '
    'seventeen eighteen nineteen twenty'.split())}
_ARTICLES = {'a', 'an', 'the'}
_CONTRACTIONS = {"dont": "don't", "doesnt": "doesn't", "isnt": "isn't", "arent": "aren't", "cant": "can't",
                 "wont": "won't", "didnt": "didn't", "wasnt": "wasn't", "werent": "weren't", "im": "i'm",
                 "ive": "i've", "youre": "you're", "theyre": "they're", "thats": "that's", "whats": "what's"}
_PUNCT = re.compile('[' + re.escape(string.punctuation.replace("'", '')) + ']')
_DIGIT_SEP = re.compile(r'(?<=\d)[.,](?=\d)')


def normalize_answer(text: str) -> str:
    """VQA-style normalisation (see the module docstring)."""
    text = str(text).strip().lower().replace('\n', ' ').replace('\t', ' ')
    kept = _DIGIT_SEP.sub(lambda m: {'.': '\x00', ',': ''}[m.group(0)], text)  # 2.5 stays, 1,000 -> 1000
    kept = _PUNCT.sub(' ', kept).replace('\x00', '.')
    words = []
    for word in kept.split():
        word = _NUMBERS.get(word, word)
        word = _CONTRACTIONS.get(word, word)
        if word not in _ARTICLES:
            words.append(word)
    return ' '.join(words)


def exact_match(answer: str, references: Sequence[str]) -> float:
    given = normalize_answer(answer)
    return float(any(given == normalize_answer(r) for r in references))


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
    given = ' '.join(str(answer).strip().lower().split())
    best = 0.0
    for ref in references:
        ref = ' '.join(str(ref).strip().lower().split())
        longest = max(len(given), len(ref))
        nl = edit_distance(given, ref) / longest if longest else 0.0
        best = max(best, 1.0 - nl if nl < threshold else 0.0)
    return best


METRICS = {'exact': exact_match, 'anls': anls}


def extract_option(answer: str, options: Mapping[str, str]) -> Optional[str]:
    """The letter of the option ``answer`` chose, or None when it cannot be told (see the module docstring)."""
    letters = [k for k in options if options[k] is not None]
    text = str(answer).strip()
    # a letter standing alone: "B", "(B)", "B.", "B:", "Answer: B", "The answer is B."
    alone = {k for k in letters if re.search(rf'(?:^|[\s(\[:]){re.escape(k)}(?:$|[\s).\]:,])', text)}
    if len(alone) == 1 and (len(text) <= 3 or not _mentions_text_of_other(text, options, alone)):
        return alone.pop()
    lowered = normalize_answer(text)
    matches = [k for k in letters if normalize_answer(options[k]) and normalize_answer(options[k]) in lowered]
    if len(matches) > 1:  # "red" inside "dark red": the longest option text wins when it contains the others
        longest = max(matches, key=lambda k: len(normalize_answer(options[k])))
        if all(normalize_answer(options[k]) in normalize_answer(options[longest]) for k in matches):
            matches = [longest]
    return matches[0] if len(matches) == 1 else None


def _mentions_text_of_other(text: str, options: Mapping[str, str], chosen) -> bool:
    """Whether a long answer names another option's text (then its lone letter may be an article "A")."""
    lowered = normalize_answer(text)
    return any(k not in chosen and normalize_answer(v) and normalize_answer(v) in lowered
               for k, v in options.items() if v is not None)
