"""A sample's ``conversations`` parsed and validated once: :func:`parse_conversation` -> :class:`Conversation`.

``conversations`` is a list of ``{"from": "human" | "gpt" | "system", "value": str}`` turns (LLaVA's and
InternVL's format): an optional leading system turn, then human and gpt turns alternating, ending with gpt.
Anything malformed raises :class:`~xtuner_plugins.data.errors.SampleError` with a countable reason.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Mapping, Optional, Sequence, Tuple, Union

from .errors import SampleError
from .template import IMAGE_PLACEHOLDER, RESERVED_IN_TEXT, Template, get_template

__all__ = ['Conversation', 'parse_conversation', 'lenient_conversation', 'refuse_control_text']

_ROLES = ('human', 'gpt', 'system')


@dataclass(frozen=True)
class Conversation:
    """A validated conversation, ready to render (``tokenize.py``).

    ``system``: the system message (the data's, else the caller's, else the template's default); ``turns``:
    ``(role, value)`` pairs, human first, with ``<image>`` tags where InternVL has them (one per image,
    prepended to the first human turn when the data has none); ``num_images``: the images the tags stand for;
    ``template``: the template it was checked against.
    """

    system: str
    turns: Tuple[Tuple[str, str], ...]
    num_images: int
    template: Template


def check_turn(i: int, turn: Any) -> None:
    """``bad_conversation`` for turn ``i`` of ``conversations`` unless it is a dict with "from" and "value"; one
    with OpenAI's "role" / "content" is said to be of that format."""
    if isinstance(turn, Mapping) and 'from' in turn and 'value' in turn:
        return
    other = (' (OpenAI\'s "role" / "content" keys are not this format\'s: its turns are {"from": "human" | "gpt" | '
             '"system", "value": TEXT}, LLaVA\'s and InternVL\'s)'
             if isinstance(turn, Mapping) and {'role', 'content'} & set(turn) else '')
    raise SampleError('bad_conversation', f'turn {i} must be a dict with "from" and "value"{other}, got {turn!r:.200}')


def _structure(conversations: Any) -> Tuple[Optional[str], List[Tuple[str, str]], int]:
    """Check the structure; return (data system message or None, [(role, value)], index of the first turn)."""
    if not isinstance(conversations, (list, tuple)):
        raise SampleError('bad_conversation',
                          f'conversations must be a list of turns, got {type(conversations).__name__}')
    if len(conversations) == 0:
        raise SampleError('empty_conversation', 'the conversation has no turns')
    for i, turn in enumerate(conversations):
        check_turn(i, turn)
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


def refuse_control_text(where: str, value: str, markers: Sequence[str]) -> None:
    """Raise ``control_text`` naming ``where``, the first of ``markers`` found in ``value`` and where it is."""
    found = [(value.find(m), m) for m in markers if m in value]
    if not found:
        return
    pos, marker = min(found)
    hint = (f'write {IMAGE_PLACEHOLDER} for an image' if marker in RESERVED_IN_TEXT else
            'it would be read as that control token and trained on; set the data set\'s allow_control_text=True '
            'if the data means it (it is then plain text)')
    raise SampleError('control_text', f'{where} contains the control marker {marker!r} at character {pos} '
                                      f'({value[max(0, pos - 20):pos + len(marker) + 20]!r}); {hint}')


def parse_conversation(conversations: Any, num_images: int = 0, template: Union[str, Template] = 'internvl2_5',
                       system: Optional[str] = None, markers: Sequence[str] = RESERVED_IN_TEXT) -> Conversation:
    """Validate ``conversations`` for ``num_images`` images; the :class:`Conversation` to render.

    ``system``: the system message instead of the template's default; a system turn in the data wins over both.
    ``markers``: control text refused in any turn and in the system message (``control_text``); InternVL's image
    tokens by default, the data set's :func:`~xtuner_plugins.data.template.control_markers` in training.

    Raises:
        SampleError: ``empty_conversation``, ``bad_conversation``, ``image_tag_mismatch``, ``control_text``.
    """
    template = get_template(template)
    num_images = int(num_images)
    data_system, turns, start = _structure(conversations)
    system_message = data_system if data_system is not None else (
        system if system is not None else template.default_system)

    texts = [('the system message', system_message)] + [
        (f'turn {start + k} ({role})', value) for k, (role, value) in enumerate(turns)]
    for where, value in texts:
        refuse_control_text(where, value, markers)
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
    return Conversation(system_message, tuple(turns), num_images, template)


def lenient_conversation(conversations: Any, template: Union[str, Template] = 'internvl2_5',
                         system: Optional[str] = None) -> Conversation:
    """The turns of ``conversations`` as they are, unvalidated (malformed turns skipped; tags as written):
    for estimates of samples that were not checked."""
    template = get_template(template)
    turns = [(t.get('from'), t.get('value')) for t in (conversations or [])
             if isinstance(t, Mapping) and isinstance(t.get('value'), str)]
    system_message = system if system is not None else template.default_system
    if turns and turns[0][0] == 'system':
        system_message = turns[0][1]
        turns = turns[1:]
    num_tags = sum(v.count(IMAGE_PLACEHOLDER) for r, v in turns if r != 'gpt')
    return Conversation(system_message, tuple(turns), num_tags, template)
