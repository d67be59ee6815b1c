"""The tokenizer's own calls, as tokenisation (``tokenize.py``) makes them: a text's ids, each short text's kept
on the tokenizer (:func:`_encode`: most samples repeat the system turn and one of a few questions), the bos rule
(:func:`adds_bos`), the turns tokenised each on its own as InternVL does (:func:`_tokenize_turns`), an assistant
turn's ids with its prefix's kept apart (:func:`_split_at_prefix`, :func:`answer_ids`), data text holding a control
marker tokenised as plain text (:func:`_literal_ids`) and a piece's ids as text going on after other text
(:func:`_continued`).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import List, Optional, Sequence

from .template import vocab_key


TURN_CACHE = 256        # rendered turns whose ids are kept per tokenizer (the system turn, the question templates)
TURN_CACHE_CHARS = 512  # longer turns are not kept


def _ids(tokenizer, texts: List[str], special: bool) -> List[List[int]]:
    """``tokenizer(texts, add_special_tokens=special).input_ids``; for a fast tokenizer whose backend pads,
    truncates and splits special tokens as that call would have it (nothing of the three), straight from the
    backend's ``encode_batch``, as that call does it (without its ~20 us a call around it)."""
    backend = getattr(tokenizer, 'backend_tokenizer', None) if getattr(tokenizer, 'is_fast', False) else None
    if (backend is not None and backend.truncation is None and backend.padding is None
            and getattr(backend, 'encode_special_tokens', None) is False):
        return [e.ids for e in backend.encode_batch(texts, add_special_tokens=special)]
    return tokenizer(texts, add_special_tokens=special, padding=False, truncation=False).input_ids


def _encode(tokenizer, texts: List[str], special: bool) -> List[List[int]]:
    """``tokenizer(texts, add_special_tokens=special).input_ids``, each short text's ids kept (an LRU on the
    tokenizer, dropped when tokens are added to it): most samples repeat the system turn and one of a few
    questions, and tokenising those was half a sample's length count."""
    key = vocab_key(tokenizer)
    cache = getattr(tokenizer, '_xtuner_plugins_turn_ids', None)
    if cache is None or cache[0] != key:
        cache = (key, OrderedDict())
        try:
            tokenizer._xtuner_plugins_turn_ids = cache
        except AttributeError:
            return [list(x) for x in _ids(tokenizer, texts, special)]
    known = cache[1]
    out: List[Optional[List[int]]] = [None] * len(texts)
    todo = []
    for k, text in enumerate(texts):
        hit = known.get((text, special))
        if hit is None:
            todo.append(k)
        else:
            try:
                known.move_to_end((text, special))
            except KeyError:  # evicted meanwhile by another thread (the web demo's)
                pass
            out[k] = list(hit)
    if todo:
        ids = _ids(tokenizer, [texts[k] for k in todo], special)
        for k, x in zip(todo, ids):
            out[k] = list(x)
            if len(texts[k]) <= TURN_CACHE_CHARS:
                known[(texts[k], special)] = tuple(x)
                while len(known) > TURN_CACHE:
                    try:
                        known.popitem(last=False)
                    except KeyError:
                        break
    return out


def adds_bos(tokenizer) -> bool:
    """Whether ``tokenizer`` starts a text with its bos, asked of the tokenizer itself (a text's ids, kept by
    :func:`_encode`): ``add_bos_token`` says so for Llama 2's classes, but a Llama 3 style tokenizer adds it in its
    post-processor and has no such attribute (InternVL's rule, which reads the attribute, put a bos at the start of
    every turn of such a tokenizer, where chat puts one only at the very start)."""
    bos = getattr(tokenizer, 'bos_token_id', None)
    return bos is not None and _encode(tokenizer, ['a'], True)[0][:1] == [bos]


def _tokenize_turns(tokenizer, texts: List[str]) -> List[List[int]]:
    """Tokenise each turn on its own, exactly like InternVL (bos once at the very start when the tokenizer
    adds one: :func:`adds_bos`)."""
    if not texts:
        return []
    add_bos = adds_bos(tokenizer)
    if add_bos:
        texts = [tokenizer.bos_token + texts[0]] + texts[1:]
    ids = _encode(tokenizer, texts, True)
    if add_bos:
        # InternVL drops the first token of every turn, which is the bos the tokenizer adds itself.
        bos = tokenizer.bos_token_id
        bad = [i for i, x in enumerate(ids) if not x or x[0] != bos]
        if bad:
            raise ValueError(f'tokenizer adds a bos but does not start turn {bad[0]} with bos {bos}')
        ids = [x[1:] for x in ids]
    return [list(x) for x in ids]


def _split_at_prefix(tokenizer, text: str, ids: List[int], prefix: str, prefix_ids: List[int]) -> List[int]:
    """The ids of an assistant turn ``text`` (tokenised as ``ids``), with its prefix's ids kept apart.

    BPE can merge the end of the prefix with the start of the answer (a prefix ending in a space, say: 'A: ' +
    'the' -> 'A', ':', ' the'); the turn is then tokenised as prefix + rest, as generation after the prompt
    sees it, so that no answer text hides in the unsupervised prefix. Otherwise ``ids`` as they are (InternVL's
    own tokenisation of the whole turn).
    """
    if ids[:len(prefix_ids)] == prefix_ids:
        return ids
    return prefix_ids + _text_ids(tokenizer, text[len(prefix):])


def answer_ids(tokenizer, prefix: str, answer: str) -> List[int]:
    """The ids of ``answer`` after the assistant turn's ``prefix`` (``<|im_start|>assistant\\n``) as training
    tokenises them (:func:`_split_at_prefix`): in one piece with the prefix, unless a token would cross between
    them. Tokenised alone, the text may start otherwise: a SentencePiece tokenizer puts a word start ('▁') before a
    text of its own ('Red' alone: '▁', 'R', 'ed'; after the prefix: 'R', 'ed'), so a likelihood summed over those
    ids scores tokens the model never learnt to give there."""
    prefix_ids = _text_ids(tokenizer, prefix)
    text = prefix + answer
    return _split_at_prefix(tokenizer, text, _text_ids(tokenizer, text), prefix, prefix_ids)[len(prefix_ids):]


def _text_ids(tokenizer, text: str) -> List[int]:
    """``text``'s ids without special tokens added by the tokenizer (none for empty text)."""
    return _encode(tokenizer, [text], False)[0] if text else []


def _literal_ids(tokenizer, text: str, controls: Sequence[int]) -> List[int]:
    """Ids of data text holding a control marker, with special tokens not parsed (``split_special_tokens``)."""
    ids = tokenizer(text, add_special_tokens=False, split_special_tokens=True).input_ids
    if any(i in controls for i in ids):
        raise ValueError(f'the tokenizer ({type(tokenizer).__name__}) cannot tokenise {text!r} as plain text')
    return list(ids)


#: a text the pieces of a turn are tokenised after, then left out (``_continued``)
ANCHOR = '\n'


def _continued(encode, text: str) -> List[int]:
    """``text``'s ids (``encode``) as the text goes on after other text: tokenised after :data:`ANCHOR`, whose ids
    are then taken away. A SentencePiece tokenizer puts a word start ('▁') before a text of its own, so each piece
    of a turn tokenised alone ('a', '<|im_end|>' as plain text, 'b') read back 'a <|im_end|> b'. The ids of
    ``text`` alone where the anchor's are not a prefix (a token across the two)."""
    anchor, both = encode(ANCHOR), encode(ANCHOR + text)
    return both[len(anchor):] if both[:len(anchor)] == anchor else encode(text)
