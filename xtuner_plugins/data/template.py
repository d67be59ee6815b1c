"""Conversation templates and tokenisation of InternVL-style samples.

A sample's ``conversations`` is a list of ``{"from": "human" | "gpt" | "system", "value": str}`` turns
(LLaVA's and InternVL's format). :func:`tokenize_conversation` turns it into ``input_ids`` and ``labels``
that are identical to what InternVL 2.5's ``preprocess_internvl2_5`` (``internvl_chat/internvl/train/
dataset.py``) produces:

* every turn is rendered with the template and tokenised on its own, and the pieces are concatenated;
* system and user turns are not supervised (label ``-100``);
* in an assistant turn, the ``<|im_start|>assistant\\n`` prefix and the trailing ``\\n`` are not supervised,
  so the answer and ``<|im_end|>`` are;
* each ``<image>`` in a human turn becomes ``<img>`` + ``<IMG_CONTEXT>`` * n + ``</img>``;
* a tokenizer with ``add_bos_token`` gets its bos once, at the very start (not supervised).

It validates the sample on the way and raises :class:`~xtuner_plugins.data.errors.SampleError` with a
countable reason for anything malformed. Templates are chosen by the config (``template=...``), never guessed
from a model name.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from xtuner_plugins.data.errors import SampleError


def disable_tokenizer_parallelism() -> None:
    """Turn off the Rust thread pool of Hugging Face fast tokenizers in this process.

    Once that pool has run in a process, DataLoader workers forked from it can deadlock inside the
    tokenizer (seen here: a worker stuck in ``_batch_encode_plus`` after the main process had tokenised
    for sample lengths). Importing ``xtuner.dataset``, which every XTuner config does, sets
    ``TOKENIZERS_PARALLELISM=true``; samples are tokenised one at a time in workers, so the pool buys
    nothing. Called when this module is imported and when a dataset is built.
    """
    os.environ['TOKENIZERS_PARALLELISM'] = 'false'


disable_tokenizer_parallelism()

__all__ = [
    'IMG_START_TOKEN', 'IMG_END_TOKEN', 'IMG_CONTEXT_TOKEN', 'IMAGE_PLACEHOLDER', 'IGNORE_INDEX',
    'INTERNVL_ADDED_TOKENS', 'INTERNVL_SYSTEM_MESSAGE', 'Template', 'TEMPLATES', 'add_internvl_tokens',
    'get_template', 'image_token_string', 'tokenize_conversation', 'check_conversations',
    'count_text_tokens',
]

IMG_START_TOKEN = '<img>'
IMG_END_TOKEN = '</img>'
IMG_CONTEXT_TOKEN = '<IMG_CONTEXT>'
IMAGE_PLACEHOLDER = '<image>'
IGNORE_INDEX = -100

# InternVL's added tokens, in the order InternVL adds them (ids 151665..151673 in Qwen2.5's tokenizer).
INTERNVL_ADDED_TOKENS: Tuple[str, ...] = (
    '<img>', '</img>', '<IMG_CONTEXT>', '<quad>', '</quad>', '<ref>', '</ref>', '<box>', '</box>',
)

# InternVL's default system message of its ``internvl2_5`` template (OpenGVLab/InternVL
# ``internvl_chat/internvl/conversation.py``); one copy, in the conversation file shipped with converted models.
from xtuner_plugins.remote_code.conversation import INTERNVL_SYSTEM_MESSAGE  # noqa: E402

# Tokens that only the pipeline may write: text containing them would break the image-token count.
_RESERVED_IN_TEXT = (IMG_START_TOKEN, IMG_END_TOKEN, IMG_CONTEXT_TOKEN)


def add_internvl_tokens(tokenizer) -> int:
    """Add InternVL's nine tokens as special added tokens (InternVL's order); return how many were new.

    Idempotent: a second call adds nothing and returns 0.
    """
    return tokenizer.add_tokens(list(INTERNVL_ADDED_TOKENS), special_tokens=True)


def image_token_string(num_tokens: int) -> str:
    """The text an ``<image>`` placeholder stands for: ``<img>`` + ``<IMG_CONTEXT>`` * n + ``</img>``."""
    return f'{IMG_START_TOKEN}{IMG_CONTEXT_TOKEN * int(num_tokens)}{IMG_END_TOKEN}'


@dataclass(frozen=True)
class Template:
    """A chat template: one format string per role.

    Args:
        name: the template's name (the key in :data:`TEMPLATES`).
        system: format of the system turn, with ``{system}``; ``''`` for a template without system turn.
        user: format of a user turn, with ``{query}``.
        assistant: format of an assistant turn, with ``{answer}``. What precedes ``{answer}`` is not
            supervised; of what follows it, ``stop_word`` is supervised and the rest is not.
        default_system: the system message used when neither the data nor the caller gives one.
        stop_word: the token that ends an answer (generation stops there).
    """

    name: str
    system: str
    user: str
    assistant: str
    default_system: str
    stop_word: str

    def __post_init__(self):
        if self.system and '{system}' not in self.system:
            raise ValueError(f'template {self.name!r}: system format needs {{system}}: {self.system!r}')
        if '{query}' not in self.user:
            raise ValueError(f'template {self.name!r}: user format needs {{query}}: {self.user!r}')
        if self.assistant.count('{answer}') != 1:
            raise ValueError(f'template {self.name!r}: assistant format needs one {{answer}}: {self.assistant!r}')
        if not self.assistant_suffix.startswith(self.stop_word):
            raise ValueError(f'template {self.name!r}: the assistant format must continue {{answer}} with the '
                             f'stop word {self.stop_word!r}, got {self.assistant_suffix!r}')

    @property
    def assistant_prefix(self) -> str:
        """The unsupervised text before the answer (``<|im_start|>assistant\\n``)."""
        return self.assistant.split('{answer}')[0]

    @property
    def assistant_suffix(self) -> str:
        """The text after the answer (``<|im_end|>\\n``)."""
        return self.assistant.split('{answer}')[1]

    def render_system(self, system: str) -> str:
        return self.system.format(system=system) if self.system else ''

    def render_user(self, query: str) -> str:
        return self.user.format(query=query)

    def render_assistant(self, answer: str) -> str:
        return self.assistant.format(answer=answer)


TEMPLATES: Dict[str, Template] = {
    # InternVL 2.5 with a Qwen2.5 LLM: ChatML (InternVL's ``internvl2_5`` conversation template,
    # SeparatorStyle.MPT with sep '<|im_end|>\n').
    'internvl2_5': Template(
        name='internvl2_5',
        system='<|im_start|>system\n{system}<|im_end|>\n',
        user='<|im_start|>user\n{query}<|im_end|>\n',
        assistant='<|im_start|>assistant\n{answer}<|im_end|>\n',
        default_system=INTERNVL_SYSTEM_MESSAGE,
        stop_word='<|im_end|>',
    ),
}


def get_template(name_or_template: Union[str, Template]) -> Template:
    """Return the template itself, or the registered one of that name (``ValueError`` listing the known ones)."""
    if isinstance(name_or_template, Template):
        return name_or_template
    if isinstance(name_or_template, str) and name_or_template in TEMPLATES:
        return TEMPLATES[name_or_template]
    raise ValueError(f'unknown template {name_or_template!r}; known templates: {sorted(TEMPLATES)}')


def check_tokenizer_fits(tokenizer, template: Union[str, Template], where: str = 'tokenizer') -> None:
    """Refuse a tokenizer that splits the template's special markers (``<|im_start|>``, ``<|im_end|>``):
    it belongs to an LLM trained with another chat template, whose answers would never end with the stop word.

    Raises:
        ValueError: naming ``where`` (the tokenizer's folder), the marker and its token count.
    """
    template = get_template(template)
    markers = sorted(set(re.findall(r'<\|[^|<>]+\|>', template.system + template.user + template.assistant))
                     | {template.stop_word})
    for marker in markers:
        ids = tokenizer.encode(marker, add_special_tokens=False)
        if len(ids) != 1:
            raise ValueError(f'{where}: the tokenizer encodes {marker!r} of template {template.name!r} as {len(ids)} '
                             f'tokens, not 1: this LLM was trained with another chat template; give a template it '
                             f'knows (registered: {sorted(TEMPLATES)})')


# ----------------------------------------------------------------------------------------- validation

_ROLES = ('human', 'gpt', 'system')


def _parse_conversation(conversations: Any) -> Tuple[Optional[str], List[Tuple[str, str]], int]:
    """Check the structure; return (data system message or None, [(role, value)], index of the first turn)."""
    if not isinstance(conversations, (list, tuple)):
        raise SampleError('bad_conversation',
                          f'conversations must be a list of turns, got {type(conversations).__name__}')
    if len(conversations) == 0:
        raise SampleError('empty_conversation', 'the conversation has no turns')
    for i, turn in enumerate(conversations):
        if not isinstance(turn, Mapping) or 'from' not in turn or 'value' not in turn:
            raise SampleError('bad_conversation',
                              f'turn {i} must be a dict with "from" and "value", got {turn!r:.200}')
        role, value = turn['from'], turn['value']
        if role not in _ROLES:
            raise SampleError('bad_conversation',
                              f'turn {i} has unknown role {role!r} (known roles: human, gpt, system)')
        if not isinstance(value, str):
            raise SampleError('bad_conversation',
                              f'turn {i} ({role}) has a value of type {type(value).__name__}, expected str')

    data_system = None
    start = 0
    if conversations[0]['from'] == 'system':
        data_system = conversations[0]['value']
        start = 1
    turns = [(t['from'], t['value']) for t in conversations[start:]]
    if not turns:
        raise SampleError('bad_conversation', 'the conversation has no gpt turn (only a system turn)')
    for k, (role, _) in enumerate(turns):
        expected = 'human' if k % 2 == 0 else 'gpt'
        if role != expected:
            raise SampleError('bad_conversation',
                              f'turn {start + k}: found role {role!r}, expected {expected!r} '
                              f'(after an optional system turn, roles must alternate human, gpt, ...)')
    if len(turns) == 1:
        raise SampleError('bad_conversation', f'the conversation has no gpt turn (turn {start} is human)')
    if turns[-1][0] != 'gpt':
        raise SampleError('bad_conversation',
                          f'the conversation ends with a human turn (turn {start + len(turns) - 1}), '
                          f'expected it to end with a gpt turn')
    return data_system, turns, start


def _prepare(conversations, num_images: int, template: Template, system: Optional[str]
             ) -> Tuple[str, List[Tuple[str, str]]]:
    """Validate and return (system message, [(role, value)]) with ``<image>`` prepended where InternVL does."""
    data_system, turns, start = _parse_conversation(conversations)
    system_message = data_system if data_system is not None else (
        system if system is not None else template.default_system)

    texts = [('the system message', system_message)] + [
        (f'turn {start + k} ({role})', value) for k, (role, value) in enumerate(turns)]
    for where, value in texts:
        for tok in _RESERVED_IN_TEXT:
            if tok in value:
                raise SampleError('image_tag_mismatch',
                                  f'{where} contains the reserved token {tok!r}; write {IMAGE_PLACEHOLDER} instead')
    if IMAGE_PLACEHOLDER in system_message:
        raise SampleError('image_tag_mismatch',
                          f'the system message contains {system_message.count(IMAGE_PLACEHOLDER)} '
                          f'{IMAGE_PLACEHOLDER} tag(s); images belong in human turns')
    for k, (role, value) in enumerate(turns):
        if role == 'gpt' and IMAGE_PLACEHOLDER in value:
            raise SampleError('image_tag_mismatch',
                              f'turn {start + k} (gpt) contains {value.count(IMAGE_PLACEHOLDER)} '
                              f'{IMAGE_PLACEHOLDER} tag(s); images belong in human turns')

    n_tags = sum(value.count(IMAGE_PLACEHOLDER) for role, value in turns if role == 'human')
    if num_images > 0 and n_tags == 0:
        # InternVL prepends '<image>\n' to the first human turn of a single-image sample without a tag;
        # with several images, one '<image>\n' per image.
        turns = list(turns)
        turns[0] = ('human', f'{IMAGE_PLACEHOLDER}\n' * num_images + turns[0][1])
        n_tags = num_images
    if n_tags != num_images:
        raise SampleError('image_tag_mismatch',
                          f'the human turns contain {n_tags} {IMAGE_PLACEHOLDER} tag(s) but the sample has '
                          f'{num_images} image(s)')

    for k, (role, value) in enumerate(turns):
        if not value.replace(IMAGE_PLACEHOLDER, 'x').strip():
            raise SampleError('empty_conversation', f'turn {start + k} ({role}) has an empty value')
    return system_message, turns


# ----------------------------------------------------------------------------------------- tokenisation

def _special_id(tokenizer, token: str) -> int:
    if token not in tokenizer.get_added_vocab():
        raise ValueError(f'the tokenizer has no added token {token!r}; call add_internvl_tokens(tokenizer) first')
    return tokenizer.convert_tokens_to_ids(token)


def _tokenize_turns(tokenizer, texts: List[str]) -> List[List[int]]:
    """Tokenise each turn on its own, exactly like InternVL (bos once at the very start when the tokenizer
    has ``add_bos_token``)."""
    add_bos = bool(getattr(tokenizer, 'add_bos_token', False))
    if add_bos:
        texts = [tokenizer.bos_token + texts[0]] + texts[1:]
    ids = tokenizer(texts, padding=False, truncation=False).input_ids
    if add_bos:
        # InternVL drops the first token of every turn, which is the bos the tokenizer adds itself.
        bos = tokenizer.bos_token_id
        bad = [i for i, x in enumerate(ids) if not x or x[0] != bos]
        if bad:
            raise ValueError(f'tokenizer says add_bos_token but does not start turn {bad[0]} with bos {bos}')
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


def _text_ids(tokenizer, text: str) -> List[int]:
    """``text``'s ids without special tokens added by the tokenizer (none for empty text)."""
    return tokenizer(text, add_special_tokens=False).input_ids if text else []


def _count_tokens(tokenizer, text: str) -> int:
    return len(_text_ids(tokenizer, text))


def tokenize_conversation(
    conversations: Sequence[Mapping[str, Any]],
    tokenizer,
    num_image_tokens: Sequence[int],
    template: Union[str, Template] = 'internvl2_5',
    system: Optional[str] = None,
    max_length: Optional[int] = None,
) -> Dict[str, List[int]]:
    """Tokenise one conversation like InternVL 2.5 and return ``dict(input_ids=[...], labels=[...])``.

    Args:
        conversations: ``[{"from": "human"|"gpt"|"system", "value": str}, ...]``; an optional leading system
            turn, then human and gpt turns alternating, ending with gpt.
        tokenizer: a Hugging Face tokenizer with InternVL's added tokens.
        num_image_tokens: ``<IMG_CONTEXT>`` count per image, in order (256 * tiles); empty for text only.
        template: a :class:`Template` or the name of one in :data:`TEMPLATES`.
        system: system message instead of the template's default; a system turn in the data wins over both.
        max_length: cut longer sequences to this length, only after the last image's ``</img>``.

    Raises:
        SampleError: ``empty_conversation``, ``bad_conversation``, ``image_tag_mismatch``, ``too_long``,
            ``no_supervised_tokens``.
    """
    tpl = get_template(template)
    counts = [int(n) for n in num_image_tokens]
    if any(n <= 0 for n in counts):
        raise ValueError(f'num_image_tokens must be positive, got {counts}')
    if max_length is not None and max_length <= 0:
        raise ValueError(f'max_length must be positive, got {max_length}')
    system_message, turns = _prepare(conversations, len(counts), tpl, system)

    img_start = img_end = img_ctx = None
    if counts:
        img_start = _special_id(tokenizer, IMG_START_TOKEN)
        img_end = _special_id(tokenizer, IMG_END_TOKEN)
        img_ctx = _special_id(tokenizer, IMG_CONTEXT_TOKEN)

    # Render every turn with a single <IMG_CONTEXT> per image. Added tokens split the text before
    # pre-tokenisation, so the surrounding text tokenises exactly as with the full run; each single id is
    # expanded afterwards (cheap: no 3000-token strings per image go through the tokenizer).
    compact = image_token_string(1)
    texts, roles = [], []
    if tpl.system:
        texts.append(tpl.render_system(system_message))
        roles.append('system')
    for role, value in turns:
        if role == 'human':
            texts.append(tpl.render_user(value.replace(IMAGE_PLACEHOLDER, compact)))
        else:
            texts.append(tpl.render_assistant(value))
        roles.append(role)
    turn_ids = _tokenize_turns(tokenizer, texts)

    prefix = tpl.assistant_prefix
    prefix_ids = _text_ids(tokenizer, prefix)
    tail_len = _count_tokens(tokenizer, tpl.assistant_suffix[len(tpl.stop_word):])

    input_ids: List[int] = []
    labels: List[int] = []
    image_idx = 0
    last_img_end = -1  # index of the last image's </img> in input_ids
    for role, text, ids in zip(roles, texts, turn_ids):
        if role == 'gpt':
            ids = _split_at_prefix(tokenizer, text, ids, prefix, prefix_ids)
            lab = list(ids)
            n_pre = min(len(prefix_ids), len(lab))
            lab[:n_pre] = [IGNORE_INDEX] * n_pre
            if tail_len:
                lab[len(lab) - tail_len:] = [IGNORE_INDEX] * min(tail_len, len(lab))
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
            raise SampleError('too_long',
                              f'the sample up to its last {IMG_END_TOKEN} needs {last_img_end + 1} tokens '
                              f'({image_tokens} image tokens of {len(counts)} image(s), '
                              f'{last_img_end + 1 - image_tokens} text tokens), max_length is {max_length}; the '
                              f'full sample has {len(input_ids)} tokens, and it is never cut inside an image')
        input_ids = input_ids[:max_length]
        labels = labels[:max_length]
    if all(x == IGNORE_INDEX for x in labels):
        raise SampleError('no_supervised_tokens',
                          f'no supervised token left in {len(labels)} tokens (max_length={max_length})')
    return dict(input_ids=input_ids, labels=labels)


def check_conversations(
    conversations: Any,
    num_images: int = 0,
    template: Union[str, Template] = 'internvl2_5',
    system: Optional[str] = None,
) -> None:
    """Validate a conversation for ``num_images`` images without tokenising it (cheap; for load-time checks).

    Raises the same :class:`SampleError` as :func:`tokenize_conversation` would for the structure and the
    image tags (not ``too_long`` / ``no_supervised_tokens``, which need the tokenizer).
    """
    _prepare(conversations, int(num_images), get_template(template), system)


def count_text_tokens(
    conversations: Sequence[Mapping[str, Any]],
    tokenizer,
    template: Union[str, Template] = 'internvl2_5',
    system: Optional[str] = None,
    num_images: Optional[int] = None,
) -> int:
    """Number of tokens of the templated text without any image tokens (for length estimates).

    ``<img>``, the ``<IMG_CONTEXT>`` run and ``</img>`` are all left out, so for a sample with images
    ``n = num_image_tokens``::

        count_text_tokens(...) + sum(n) + 2 * len(n) == len(tokenize_conversation(..., n)['input_ids'])

    (before truncation). This holds as written when the human turns carry the ``<image>`` tags; for a sample
    whose tags are implicit (``<image>\n`` prepended by :func:`tokenize_conversation`), pass ``num_images``
    so that the prepended ``\n`` is counted too. With ``num_images`` the sample is also validated
    (:class:`SampleError`); without it, nothing is validated and malformed turns are skipped.
    """
    tpl = get_template(template)
    if num_images is not None:
        system_message, turns = _prepare(conversations, num_images, tpl, system)
    else:
        turns = [(t.get('from'), t.get('value')) for t in (conversations or [])
                 if isinstance(t, Mapping) and isinstance(t.get('value'), str)]
        system_message = system if system is not None else tpl.default_system
        if turns and turns[0][0] == 'system':
            system_message = turns[0][1]
            turns = turns[1:]
    texts = [tpl.render_system(system_message)] if tpl.system else []
    roles = ['system'] * len(texts)
    # Render each <image> as '<img></img>' so that the text around it splits exactly as in the real
    # sequence, then leave those two tokens out of the count.
    pair = IMG_START_TOKEN + IMG_END_TOKEN
    num_tags = 0
    for role, value in turns:
        if role == 'gpt':
            texts.append(tpl.render_assistant(value))
        else:
            num_tags += value.count(IMAGE_PLACEHOLDER)
            texts.append(tpl.render_user(value.replace(IMAGE_PLACEHOLDER, pair)))
        roles.append(role)
    if not texts:
        return 0
    ids = tokenizer(texts, add_special_tokens=False).input_ids
    prefix = tpl.assistant_prefix
    prefix_ids = _text_ids(tokenizer, prefix)
    ids = [_split_at_prefix(tokenizer, t, x, prefix, prefix_ids) if r == 'gpt' else x
           for r, t, x in zip(roles, texts, ids)]
    n = sum(len(x) for x in ids) - 2 * num_tags
    if getattr(tokenizer, 'add_bos_token', False):
        n += 1
    return n
