"""``--cfg-options`` as the user typed them, read before MMEngine's ``DictAction`` changes them: the words given,
and the one-line refusals of a value it would change (a space inside an item, a path with a comma, a ``~`` the
shell left), of a word that is no ``KEY=VALUE``, and of a key under a setting the config leaves unset; the
tools' argparse action (:class:`CfgOptions`). Shared by training, the planner and the converter."""

from __future__ import annotations

import os
import re
from typing import List, Optional, Sequence, Tuple

from mmengine.config import DictAction


def _items_as_given(value: str) -> List[str]:
    """The items of a ``--cfg-options`` value as MMEngine reads them, each without the quotes around it: a list's
    (bracketed, nested, or bare ``a, b``) without the spaces around its items and separators; any other value whole,
    its outer spaces kept (a number's left out: ``1 `` is 1)."""
    bare = value.strip().strip('\'"').strip()   # (MMEngine takes the quotes around a whole value away first)
    if bare[:1] and bare[:1] in '[(' and bare[-1:] in '])' or ',' in bare:
        items = [i.strip() for i in re.split(r'[,\[\]()]', bare)]
    else:
        items = [value.strip().strip('\'"') if _number(bare) else value.strip('\'"') if value.strip() else value]
    return [i[1:-1] if len(i) > 1 and i[0] == i[-1] and i[0] in '\'"' else i for i in items]


def _number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def spaced_values(words: Sequence[str]) -> List[str]:
    """Problems of ``--cfg-options`` words (``key=value``) whose value holds a space inside an item: MMEngine's
    ``DictAction`` removes every space of a value, so ``[my data/a.jsonl]`` would become ``mydata/a.jsonl`` and a
    system message lose its spaces, ``frame_prefix='Frame-{i}: '`` its last one (spaces around a list's ``,`` and
    brackets are fine)."""
    problems = []
    for word in words:
        key, _, value = word.partition('=')
        if any(any(c.isspace() for c in item) for item in _items_as_given(value)):
            problems.append(f'{key}: the value {value!r} holds a space, and MMEngine\'s --cfg-options removes every '
                            f'space from a value ({value.replace(" ", "")!r} would be used): give a path without '
                            f'spaces (a link to it), or set the value in a config file')
    return problems


def _key_items(words: Sequence[str]) -> List[Tuple[str, List[str]]]:
    """``(key, items)`` of each ``key=value`` word: the value's comma-separated items, as MMEngine splits them
    (brackets and quotes around the value, and quotes around each item, taken away)."""
    out = []
    for word in words:
        key, _, value = word.partition('=')
        inner = value.strip().strip('\'"').strip()
        if inner[:1] in '[(' and inner[-1:] in '])':
            inner = inner[1:-1]
        out.append((key, [p.strip().strip('\'"') for p in inner.split(',')]))
    return out


def comma_paths(words: Sequence[str]) -> List[str]:
    """Problems of ``--cfg-options`` words whose value holds a path with a comma in it (an existing file or folder
    whose comma-split pieces are not all there): MMEngine's ``DictAction`` splits a value at its commas into a list,
    so ``model.llm=runs/a,b/llm`` became ``['runs/a', 'b/llm']`` (an AttributeError traceback) and
    ``data_files=[d,x/a.jsonl]`` two files neither of which the user named. A list of paths is left alone."""
    problems = []
    for key, pieces in _key_items(words):
        runs = (pieces[i:j] for i in range(len(pieces)) for j in range(i + 2, len(pieces) + 1))
        split = next((run for run in runs if os.path.exists(','.join(run)) and not all(map(os.path.exists, run))),
                     None)
        if split:
            problems.append(f'{key}: {",".join(split)!r} is a path with a comma, and MMEngine\'s --cfg-options '
                            f'splits a value at its commas ({split} would be used): give a path without commas (a '
                            f'link to it), or set the value in a config file')
    return problems


def tilde_values(words: Sequence[str]) -> List[str]:
    """Problems of ``--cfg-options`` words (or ``--option=value`` words) whose value, or an item of its list,
    starts with ``~``: the shell expands ``~`` only at the start of a word, so ``model.llm=~/models/qwen`` and
    ``--work-dir=~/runs`` reach the tool as they are, a path relative to a folder named ``~`` (the work folder made
    as ``./~``, where a later ``rm -rf ~`` removes the home)."""
    problems = []
    for key, items in _key_items(words):
        for item in items:
            if item.startswith('~') and os.path.expanduser(item) != item:
                problems.append(f'{key}: {item!r} starts with ~, which the shell expands only at the start of a '
                                f'word, not after {key}= (it would be used as it is): give '
                                f'{os.path.expanduser(item)}')
    return problems


def unpaired_words(words: Sequence[str]) -> List[str]:
    """Problems of ``--cfg-options`` words that are not ``KEY=VALUE`` (``max_iters`` alone, or a list's items split
    by the shell at their spaces): MMEngine's ``DictAction`` raised a ValueError traceback on them."""
    return [f'{word!r} is not KEY=VALUE (every word of --cfg-options is one setting: max_iters=200; a list without '
            f'spaces, [a,b], or quoted)' for word in words if '=' not in word]


def twice_given(words: Sequence[str]) -> List[str]:
    """Problems of a ``--cfg-options`` key given twice with different values (``lr=1e-4 ... lr=1e-5``, a command
    line added to): MMEngine's ``DictAction`` keeps the last without a word, so the run trains with one of two values
    the user typed."""
    seen, problems = {}, []
    for word in words:
        key, _, value = word.partition('=')
        if key in seen and _parsed(seen[key]) != _parsed(value):   # (lr=1e-4 and lr=0.0001 are one value)
            problems.append(f'{key} is given twice, {key}={seen[key]} and {key}={value} (only the last would be '
                            'used): give it once')
        seen.setdefault(key, value)
    return problems


def _parsed(value: str):
    """A ``--cfg-options`` value as MMEngine's ``DictAction`` reads it (its text where that fails)."""
    try:
        return DictAction._parse_iterable(value.replace(' ', ''))
    except Exception:   # (its parser's own errors: the value is refused on its own words elsewhere)
        return value


#: a name followed by parentheses holding a comma (``dict(type=x, path=y)``, ``runs/v(1,2)/a.jsonl``, ``You are
#: (very, very) helpful``), on which MMEngine's parser of ``--cfg-options`` values recurses without end (a
#: RecursionError of about 1000 traceback lines)
_CALL = re.compile(r'[A-Za-z_][\w.]*\s*\(.*,.*\)')


def call_values(words: Sequence[str]) -> List[str]:
    """Problems of ``--cfg-options`` words whose value MMEngine's parser recurses on (:data:`_CALL`)."""
    problems = []
    for word in words:
        key, _, value = word.partition('=')
        if _CALL.search(value):
            problems.append(f'{key}: the value {value!r} holds a name followed by parentheses with a comma (a call '
                            'such as dict(a=1,b=2), a path or a sentence alike), which --cfg-options cannot give '
                            '(MMEngine\'s parser of its values recurses without end on it): set its keys one by one '
                            f'({key}.path=..., lists as [a,b]), or the value in a config file')
    return problems


def cfg_options_words(argv: Sequence[str]) -> List[str]:
    """The words given to ``--cfg-options`` in ``argv`` (up to the next ``--option``)."""
    words, inside = [], False
    for word in argv:
        if word.startswith('--'):
            inside = word == '--cfg-options'
        elif inside:
            words.append(word)
    return words


class CfgOptions(DictAction):
    """MMEngine's ``DictAction`` for ``--cfg-options``, refusing a value it would change (:func:`spaced_values`,
    :func:`comma_paths`, :func:`tilde_values`) and a key given twice with different values (:func:`twice_given`, and
    across two ``--cfg-options``), of which it keeps the last."""

    def __call__(self, parser, namespace, values, option_string=None):
        problems = (unpaired_words(values) or call_values(values) or spaced_values(values) or comma_paths(values)
                    or tilde_values(values) or twice_given(values))
        if problems:
            parser.error('; '.join(problems))
        before = dict(getattr(namespace, self.dest, None) or {})   # a --cfg-options given before this one
        super().__call__(parser, namespace, values, option_string)
        after = getattr(namespace, self.dest)
        again = [f'{k} is given twice, {k}={before[k]!r} and {k}={after[k]!r} (only the last would be used): give it '
                 'once' for k in before if after.get(k) != before[k]]
        if again:
            parser.error('; '.join(again))


def option_into_unset(cfg, options) -> Optional[str]:
    """Why MMEngine cannot merge ``options`` (``--cfg-options``) into ``cfg``, in one line, or None: a key under a
    setting the config leaves unset or gives a plain value (``model.vision_lora.r=4`` where ``vision_lora = None``),
    which MMEngine answers with a TypeError traceback."""
    for key in options or {}:
        parts, node = str(key).split('.'), cfg
        for i, part in enumerate(parts[:-1]):
            if isinstance(node, (list, tuple)) and part.isdigit() and int(part) >= len(node):
                prefix = '.'.join(parts[:i])
                return (f'{key}: {prefix} holds {len(node)} entries (0 to {len(node) - 1}), so there is no entry '
                        f'{part} (a KeyError traceback in MMEngine\'s merge); to add one, set {prefix} whole in a '
                        'config file')
            if isinstance(node, (list, tuple)) and part.isdigit():
                node = node[int(part)]
            elif hasattr(node, 'keys') and part in node:
                node = node[part]
            else:
                break
            prefix = '.'.join(parts[:i + 1])
            unset = not hasattr(node, 'keys') and not isinstance(node, (list, tuple))
            if unset and f'{prefix}._delete_' not in options:
                return (f'{key}: {prefix} is {node!r} in the config, not a dict of settings, so {parts[i + 1]!r} has '
                        f'nothing to go into; set it afresh with {prefix}._delete_=True beside {key} (its other '
                        f'settings then take their defaults)')
    return None
