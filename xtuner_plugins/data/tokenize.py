"""Tokenisation of a conversation as InternVL 2.5's ``preprocess_internvl2_5`` (``internvl_chat/internvl/train/
dataset.py``) does it, and the length of its text, through one renderer (:func:`render_turns`) and one
encoder (:func:`encode_turns`):

* every turn is rendered with the template and tokenised on its own, and the pieces are concatenated;
* system and user turns are not supervised (label ``-100``);
* in an assistant turn, the ``<|im_start|>assistant\\n`` prefix and the trailing ``\\n`` are not supervised,
  so the answer and ``<|im_end|>`` are;
* each ``<image>`` in a human turn becomes ``<img>`` + ``<IMG_CONTEXT>`` * n + ``</img>``;
* a tokenizer that adds a bos (``add_bos_token``, or a post-processor that does, as Llama 3's) gets it once, at the
  very start (not supervised).

The tokenizer's own calls (ids kept per tokenizer, the bos rule, an answer's ids after its prefix) are
``token_ids.py``; this module renders the turns, clips them, and builds ids and labels.
"""

from __future__ import annotations

import re
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from .conversation import Conversation, lenient_conversation, parse_conversation
from .errors import SampleError
from .template import (IGNORE_INDEX, IMAGE_PLACEHOLDER, IMG_CONTEXT_TOKEN, IMG_END_TOKEN, IMG_START_TOKEN, Template,
                       control_markers, image_token_string)
from .token_ids import _continued, _literal_ids, _split_at_prefix, _text_ids, _tokenize_turns, adds_bos

__all__ = ['render_turns', 'encode_turns', 'tokenize_conversation', 'count_text_tokens']

Conversations = Union[Conversation, Sequence[Mapping[str, Any]]]


Piece = Tuple[str, bool]  # text, and whether it is data text holding a control marker (never parsed as one)


def _split_markers(text: str, pattern) -> List[Piece]:
    """``text`` as pieces: each occurrence of a control marker its own protected piece."""
    if pattern is None or not pattern.search(text):
        return [(text, False)]
    pieces, prev = [], 0
    for m in pattern.finditer(text):
        pieces += [(text[prev:m.start()], False), (m.group(), True)]
        prev = m.end()
    return [p for p in pieces + [(text[prev:], False)] if p[0]]


def _fill(fmt: str, field: str, pieces: List[Piece]) -> List[Piece]:
    """A template format with its one field filled by ``pieces``."""
    before, after = fmt.format(**{field: '\0'}).split('\0')
    return [p for p in [(before, False)] + pieces + [(after, False)] if p[0]]


def _render_pieces(conversation: Conversation, image_text: str, pattern) -> List[Tuple[str, List[Piece]]]:
    """:func:`render_turns` as pieces: the data's text split at control markers (``pattern``; None: not split)."""
    tpl = conversation.template

    def value(text: str, images: bool) -> List[Piece]:
        return [(t.replace(IMAGE_PLACEHOLDER, image_text) if images and not protected else t, protected)
                for t, protected in _split_markers(text, pattern)]
    system = _fill(tpl.system, 'system', value(conversation.system, False)) if tpl.system else []
    out = [('system', system)] if tpl.writes_system(conversation.system) else []
    for k, (role, text) in enumerate(conversation.turns):
        if role == 'gpt':
            out.append((role, _fill(tpl.assistant, 'answer', value(text, False))))
        else:   # the system message opens the first user turn where the template has no system turn (Gemma's)
            opened = system if k == 0 and tpl.opens_user(conversation.system) else []
            out.append((role, _fill(tpl.user, 'query', opened + value(text, True))))
    return out


def render_turns(conversation: Conversation, image_text: str) -> List[Tuple[str, str]]:
    """``(role, text)`` of each turn as the template writes it (the system turn first when the template writes one),
    each ``<image>`` tag written as ``image_text``."""
    return [(role, ''.join(t for t, _ in pieces)) for role, pieces in _render_pieces(conversation, image_text, None)]


#: characters kept past :func:`clip_chars`'s bound: a text cut there pre-tokenises otherwise only near the cut
CLIP_MARGIN = 4096


def clip_chars(tokenizer, tokens: int) -> int:
    """How many characters after a turn's last image settle its first ``tokens`` tokens: no token covers more
    characters than its longest vocabulary entry has (byte-level BPE: a character a byte; sentencepiece: ``▁``
    a space; WordPiece: ``##`` more), and a normaliser composes at most 4 characters into one (NFC), so
    ``tokens * longest * 4`` characters hold ``tokens`` tokens at least; :data:`CLIP_MARGIN` more keep the
    neighbourhood of the cut after them. Kept on the tokenizer."""
    longest = getattr(tokenizer, '_xtuner_plugins_longest_token', None)
    if longest is None:
        longest = max(map(len, tokenizer.get_vocab()), default=1)
        try:
            tokenizer._xtuner_plugins_longest_token = longest
        except AttributeError:
            pass
    return tokens * max(longest, 1) * 4 + CLIP_MARGIN


def _clipped(text: str, chars: int) -> str:
    """``text`` cut ``chars`` characters after its last image (``</img>``): the images stay, and the tokens a
    sequence of ``tokens`` keeps are the same (:func:`clip_chars`)."""
    last = text.rfind(IMG_END_TOKEN)
    keep = (last + len(IMG_END_TOKEN) if last >= 0 else 0) + chars
    return text if len(text) <= keep else text[:keep]


def _cut_pieces(pieces: List[Piece], n: int) -> List[Piece]:
    """The first ``n`` characters of a turn's pieces (:func:`_clipped`'s cut of their text, for data holding control
    markers): a marker cut through is left as plain text."""
    out, left = [], n
    for text, protected in pieces:
        if left <= 0:
            break
        out.append((text, protected) if len(text) <= left else (text[:left], False))
        left -= len(text)
    return out


def clips(tokenizer, conversation: Conversation, tokens: Optional[int]) -> bool:
    """Whether a turn of ``conversation`` may be clipped for ``tokens`` (a superset: a turn longer than the
    bound whatever its images)."""
    return tokens is not None and any(len(v) > clip_chars(tokenizer, tokens) - CLIP_MARGIN
                                      for _, v in conversation.turns)


def _marker_pattern(tokenizer, template):
    """A regex of the control markers data text may not turn into (cached with them on the tokenizer)."""
    markers = control_markers(tokenizer, template)
    cached = getattr(tokenizer, '_xtuner_plugins_marker_pattern', None)
    if cached is None or cached[0] != markers:
        ids = tokenizer.convert_tokens_to_ids(list(markers))
        unk = getattr(tokenizer, 'unk_token_id', None)
        known = [i for i, m in zip(ids, markers) if i is not None and (i != unk or m == tokenizer.unk_token)]
        cached = (markers, re.compile('|'.join(map(re.escape, markers))), frozenset(known))
        try:
            tokenizer._xtuner_plugins_marker_pattern = cached
        except AttributeError:
            pass
    return cached[1], cached[2]


def encode_turns(tokenizer, conversation: Conversation, image_text: str,
                 clip: Optional[int] = None) -> List[Tuple[str, str, List[int]]]:
    """``(role, text, ids)`` of each rendered turn (:func:`render_turns`), tokenised as InternVL does; an
    assistant turn's ids start with its prefix's own ids (see :func:`_split_at_prefix`).

    ``clip``: a number of tokens past which the sequence is cut anyway (``max_length``): a turn's text longer than
    :func:`clip_chars` of it after its last image is cut there before it is tokenised, which gives the same first
    ``clip`` tokens (a 10 MB answer took 30 s and 6 GB to tokenise, at every draw of the sample) and fewer after.

    Control markers inside the data's text (``<|im_end|>`` in an answer: refused by the data set unless it allows
    them, see :func:`~xtuner_plugins.data.template.control_markers`) never become control tokens: such a turn is
    tokenised in pieces, each marker as plain text, each piece after the first going on from the one before
    (:func:`_continued`)."""
    pattern, controls = _marker_pattern(tokenizer, conversation.template)
    rendered = _render_pieces(conversation, image_text, pattern)
    texts = [''.join(t for t, _ in pieces) for _, pieces in rendered]
    literal = any(protected for _, pieces in rendered for _, protected in pieces)   # the path of the whole text
    if clip is not None:
        chars = clip_chars(tokenizer, clip)
        texts = [_clipped(t, chars) for t in texts]
        rendered = [(role, _cut_pieces(pieces, len(text))) for (role, pieces), text in zip(rendered, texts)]
    prefix = conversation.template.assistant_prefix
    prefix_ids = _text_ids(tokenizer, prefix)
    if not literal:
        turn_ids = _tokenize_turns(tokenizer, texts)
        return [(role, text, _split_at_prefix(tokenizer, text, ids, prefix, prefix_ids) if role == 'gpt' else ids)
                for (role, _), text, ids in zip(rendered, texts, turn_ids)]

    def encoder(protected: bool):
        return (lambda t: _literal_ids(tokenizer, t, controls)) if protected else (lambda t: _text_ids(tokenizer, t))
    prefixed = _continued(encoder(False), 'a') != _text_ids(tokenizer, 'a')   # SentencePiece: '▁a' alone, 'a' after

    def pieces_ids(pieces: List[Piece]) -> List[int]:   # a piece after another goes on from it, with no word start
        return [i for k, (t, protected) in enumerate(pieces)
                for i in (_continued(encoder(protected), t) if k and prefixed else encoder(protected)(t))]
    bos = [tokenizer.bos_token_id] if adds_bos(tokenizer) else []
    out = []
    for k, ((role, pieces), text) in enumerate(zip(rendered, texts)):
        ids = (bos if k == 0 else []) + pieces_ids(pieces)
        if role == 'gpt' and ids[:len(prefix_ids)] != prefix_ids:  # as _split_at_prefix: prefix + rest
            (first, _), rest = pieces[0], pieces[1:]
            ids = prefix_ids + pieces_ids([(first[len(prefix):], False)] * (len(first) > len(prefix)) + rest)
        out.append((role, text, ids))
    return out


def _conversation(conversations: Conversations, num_images: int, template, system) -> Conversation:
    if isinstance(conversations, Conversation):
        if conversations.num_images != num_images:
            raise ValueError(f'the conversation was parsed for {conversations.num_images} image(s), '
                             f'not {num_images}')
        return conversations
    return parse_conversation(conversations, num_images, template, system)


def _stop_id(tokenizer, stop_word: str) -> Optional[int]:
    """The id of the template's stop word, held by the tokenizer as one token (``check_tokenizer_fits``); None
    where it is not (a tokenizer no data set checked: nothing after the answer is then masked)."""
    ids = _text_ids(tokenizer, stop_word)
    return ids[0] if len(ids) == 1 else None


def _special_id(tokenizer, token: str) -> int:
    if token not in tokenizer.get_added_vocab():
        raise ValueError(f'the tokenizer has no added token {token!r}; call add_internvl_tokens(tokenizer) first')
    return tokenizer.convert_tokens_to_ids(token)


def tokenize_conversation(
    conversations: Conversations,
    tokenizer,
    num_image_tokens: Sequence[int],
    template: Union[str, Template] = 'internvl2_5',
    system: Optional[str] = None,
    max_length: Optional[int] = None,
    clip: Optional[int] = None,
) -> Dict[str, List[int]]:
    """Tokenise one conversation like InternVL 2.5 and return ``dict(input_ids=[...], labels=[...])``.

    Args:
        conversations: ``[{"from": "human"|"gpt"|"system", "value": str}, ...]`` (validated here,
            :func:`~xtuner_plugins.data.conversation.parse_conversation`), or a :class:`Conversation` already
            parsed for ``len(num_image_tokens)`` images (``template`` and ``system`` are then its own).
        tokenizer: a Hugging Face tokenizer with InternVL's added tokens.
        num_image_tokens: ``<IMG_CONTEXT>`` count per image, in order (256 * tiles); empty for text only.
        template: a :class:`Template` or the name of one in :data:`TEMPLATES`.
        system: system message instead of the template's default; a system turn in the data wins over both.
        max_length: cut longer sequences to this length, only after the last image's ``</img>``.
        clip: tokens past this many need not be exact (:func:`encode_turns`): ``max_length``, also for the
            uncut sequence a fit is judged by.

    Raises:
        SampleError: ``empty_conversation``, ``bad_conversation``, ``image_tag_mismatch``, ``too_long``,
            ``no_supervised_tokens``.
    """
    counts = [int(n) for n in num_image_tokens]
    if any(n <= 0 for n in counts):
        raise ValueError(f'num_image_tokens must be positive, got {counts}')
    if max_length is not None and max_length <= 0:
        raise ValueError(f'max_length must be positive, got {max_length}')
    conversation = _conversation(conversations, len(counts), template, system)
    tpl = conversation.template

    img_start = img_end = img_ctx = None
    if counts:
        img_start = _special_id(tokenizer, IMG_START_TOKEN)
        img_end = _special_id(tokenizer, IMG_END_TOKEN)
        img_ctx = _special_id(tokenizer, IMG_CONTEXT_TOKEN)

    # Render every turn with a single <IMG_CONTEXT> per image. Added tokens split the text before
    # pre-tokenisation, so the surrounding text tokenises exactly as with the full run; each single id is
    # expanded afterwards (cheap: no 3000-token strings per image go through the tokenizer).
    compact = image_token_string(1)
    prefix_len = len(_text_ids(tokenizer, tpl.assistant_prefix))
    # what follows the stop word ('\n' of InternVL 2.5's '<|im_end|>\n') is not trained: everything after the turn's
    # stop word token, its last (data text holds none: control markers in it are refused or kept as plain text).
    # Not counted by tokenising that tail alone: a SentencePiece tokenizer (legacy=False) writes '\n' alone as two
    # tokens ('▁', '<0x0A>') and as one after a special token, so the stop word itself went untrained.
    stop_id = _stop_id(tokenizer, tpl.stop_word)

    input_ids: List[int] = []
    labels: List[int] = []
    image_idx = 0
    last_img_end = -1  # index of the last image's </img> in input_ids
    for role, _, ids in encode_turns(tokenizer, conversation, compact, clip):
        if role == 'gpt':
            lab = list(ids)
            n_pre = min(prefix_len, len(lab))
            lab[:n_pre] = [IGNORE_INDEX] * n_pre
            end = len(lab) - lab[::-1].index(stop_id) if stop_id in lab[n_pre:] else len(lab)  # (a turn cut short:
            lab[end:] = [IGNORE_INDEX] * (len(lab) - end)                                      # none, all trained)
            input_ids.extend(ids)
            labels.extend(lab)
            continue
        if img_ctx is not None and img_ctx in ids:
            pieces: List[int] = []
            prev = 0
            for pos, tok in enumerate(ids):
                if tok != img_ctx:
                    continue
                if image_idx >= len(counts):
                    raise SampleError('image_tag_mismatch', f'more image slots than the {len(counts)} image(s)')
                if pos == 0 or ids[pos - 1] != img_start or pos + 1 >= len(ids) or ids[pos + 1] != img_end:
                    raise ValueError(f'the tokenizer does not keep {compact!r} as three tokens')
                pieces.extend(ids[prev:pos])
                pieces.extend([img_ctx] * counts[image_idx])
                image_idx += 1
                prev = pos + 1
                last_img_end = len(input_ids) + len(pieces)  # the </img> right after the run
            pieces.extend(ids[prev:])
            ids = pieces
        input_ids.extend(ids)
        labels.extend([IGNORE_INDEX] * len(ids))
    if image_idx != len(counts):
        raise SampleError('image_tag_mismatch',
                          f'found {image_idx} image slot(s) after tokenisation, expected {len(counts)}')

    if max_length is not None and len(input_ids) > max_length:
        if last_img_end >= max_length:
            image_tokens = sum(counts) + 2 * len(counts)  # <IMG_CONTEXT>s and each image's <img> and </img>
            least = 'at least ' if clips(tokenizer, conversation, clip) else ''   # a turn clipped: a lower bound
            raise SampleError('too_long',
                              f'the sample up to its last {IMG_END_TOKEN} needs {last_img_end + 1} tokens '
                              f'({image_tokens} image tokens of {len(counts)} image(s), '
                              f'{last_img_end + 1 - image_tokens} text tokens), max_length is {max_length}; the '
                              f'full sample has {least}{len(input_ids)} tokens, and it is never cut inside an image')
        input_ids = input_ids[:max_length]
        labels = labels[:max_length]
    if all(x == IGNORE_INDEX for x in labels):
        raise SampleError('no_supervised_tokens',
                          f'no supervised token left in {len(labels)} tokens (max_length={max_length})')
    return dict(input_ids=input_ids, labels=labels)


def count_text_tokens(
    conversations: Conversations,
    tokenizer,
    template: Union[str, Template] = 'internvl2_5',
    system: Optional[str] = None,
    num_images: Optional[int] = None,
    clip: Optional[int] = None,
) -> int:
    """Number of tokens of the templated text without any image tokens (for length estimates).

    ``<img>``, the ``<IMG_CONTEXT>`` run and ``</img>`` are all left out, so for a sample with images
    ``n = num_image_tokens``::

        count_text_tokens(...) + sum(n) + 2 * len(n) == len(tokenize_conversation(..., n)['input_ids'])

    (before truncation). This holds as written for a :class:`Conversation` and when the human turns carry
    the ``<image>`` tags; for a sample whose tags are implicit (``<image>\\n`` prepended by the parser), pass
    ``num_images`` so that the prepended ``\\n`` is counted too. With ``num_images`` the sample is also
    validated (:class:`SampleError`); without it, nothing is validated and malformed turns are skipped.
    With ``clip`` (:func:`encode_turns`) a count over ``clip`` is at least ``clip``, not exact.
    """
    if isinstance(conversations, Conversation):
        conversation = conversations
    elif num_images is not None:
        conversation = parse_conversation(conversations, num_images, template, system)
    else:
        conversation = lenient_conversation(conversations, template, system)
    # Each <image> written as '<img></img>', so that the text around it splits exactly as in the real
    # sequence; those two tokens are then left out of the count.
    encoded = encode_turns(tokenizer, conversation, IMG_START_TOKEN + IMG_END_TOKEN, clip)
    return sum(len(ids) for _, _, ids in encoded) - 2 * conversation.num_images
