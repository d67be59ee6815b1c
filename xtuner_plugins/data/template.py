"""Chat templates (the registry :data:`TEMPLATES`) and InternVL's image tokens.

Templates are chosen by the config (``template=...``), never guessed from a model name. A sample's
conversation is parsed in ``conversation.py`` and tokenised in ``tokenize.py``.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Dict, Tuple, Union


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
    'INTERNVL_ADDED_TOKENS', 'INTERNVL_SYSTEM_MESSAGE', 'Template', 'TEMPLATES', 'DEFAULT_TEMPLATE',
    'add_internvl_tokens', 'get_template', 'image_token_string', 'check_tokenizer_fits', 'template_markers',
    'control_markers', 'vocab_key',
]

IMG_START_TOKEN = '<img>'
IMG_END_TOKEN = '</img>'
IMG_CONTEXT_TOKEN = '<IMG_CONTEXT>'
IMAGE_PLACEHOLDER = '<image>'
# Before each frame's <image> of a video ({i} from 1): the model card's and transformers' InternVLProcessor's.
DEFAULT_FRAME_PREFIX = 'Frame{i}: '
IGNORE_INDEX = -100

# InternVL's added tokens, in the order InternVL adds them (ids 151665..151673 in Qwen2.5's tokenizer).
INTERNVL_ADDED_TOKENS: Tuple[str, ...] = (
    '<img>', '</img>', '<IMG_CONTEXT>', '<quad>', '</quad>', '<ref>', '</ref>', '<box>', '</box>',
)

from xtuner_plugins.errors import Refused  # noqa: E402
# InternVL's default system message of its ``internvl2_5`` template (OpenGVLab/InternVL
# ``internvl_chat/internvl/conversation.py``); one copy, in the conversation file shipped with converted models.
from xtuner_plugins.remote_code.conversation import INTERNVL_SYSTEM_MESSAGE, conv_templates  # noqa: E402

# Tokens that only the pipeline may write: text containing them would break the image-token count.
RESERVED_IN_TEXT = (IMG_START_TOKEN, IMG_END_TOKEN, IMG_CONTEXT_TOKEN)
# InternVL's grounding markup (``<ref>a cat</ref><box>[[1, 2, 3, 4]]</box>``): meant in data, kept as its tokens.
GROUNDING_TOKENS = tuple(t for t in INTERNVL_ADDED_TOKENS if t not in RESERVED_IN_TEXT)


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
        frame_prefix: what stands before each frame's ``<image>`` of a video, ``{i}`` its number from 1
            (``'Frame{i}: '``: OpenGVLab's model card and transformers' ``InternVLProcessor``; InternVL's SFT
            script writes ``'Frame-{i}: '``).
        system_optional: an empty system message writes no system turn (Llama 3's rule); else the turn is
            written with nothing in it, as InternVL's templates do.
        system_in_user: no system turn: ``system`` (``'{system}\\n\\n'``) is written at the start of the first user
            turn's query, and nothing for an empty system message (Gemma's rule).
    """

    name: str
    system: str
    user: str
    assistant: str
    default_system: str
    stop_word: str
    frame_prefix: str = DEFAULT_FRAME_PREFIX
    system_optional: bool = False
    system_in_user: bool = False

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

    def writes_system(self, system: str) -> bool:
        """Whether a conversation with this system message has a system turn."""
        return bool(self.system) and not self.system_in_user and (bool(system) or not self.system_optional)

    def opens_user(self, system: str) -> bool:
        """Whether this system message is written at the start of the first user turn (``system_in_user``)."""
        return self.system_in_user and bool(system)

    def render_system(self, system: str) -> str:
        return self.system.format(system=system) if self.writes_system(system) else ''

    def render_user(self, query: str) -> str:
        return self.user.format(query=query)

    def render_assistant(self, answer: str) -> str:
        return self.assistant.format(answer=answer)


def _from_conversation(conv) -> Template:
    """The training template of a conversation template shipped with converted models (``remote_code/
    conversation.py``, InternVL's interface: ``system + sep``, ``role + message + sep`` per turn): one definition of
    each, which training tokenises and a converted folder's ``chat()`` prompts with."""
    sep = conv.sep
    system = conv.system_template.replace('{system_message}', '{system}')
    return Template(name=conv.name, system=system if conv.system_in_user else system + sep,
                    user=conv.roles[0] + '{query}' + sep, assistant=conv.roles[1] + '{answer}' + sep,
                    default_system=conv.system_message, stop_word=sep.strip(), system_optional=conv.system_optional,
                    system_in_user=conv.system_in_user)


#: the registered templates by name: ``internvl2_5`` (InternVL 2.5, ChatML: Qwen2.5, Qwen3, InternLM 2.5), InternVL
#: 2.0's ``Hermes-2`` and ``internlm2-chat`` (ChatML without a newline after each turn) and ``phi3-chat`` (Phi-3's
#: markers), ``llama3`` (Llama 3 Instruct's own turns) and ``gemma`` (Gemma 2 and 3's turns, the system message in
#: the first user turn)
TEMPLATES: Dict[str, Template] = {name: _from_conversation(conv) for name, conv in conv_templates.items()}
#: the template of a first stage that names none (``model.template=None``) and starts from no official folder
DEFAULT_TEMPLATE = 'internvl2_5'


def get_template(name_or_template: Union[str, Template]) -> Template:
    """Return the template itself, or the registered one of that name (:class:`Refused`, a ``ValueError``, naming
    the one meant and listing the known ones)."""
    if isinstance(name_or_template, Template):
        return name_or_template
    if isinstance(name_or_template, str) and name_or_template in TEMPLATES:
        return TEMPLATES[name_or_template]
    import difflib
    close = difflib.get_close_matches(str(name_or_template), sorted(TEMPLATES), 1, 0.6)
    raise Refused(f'unknown template {name_or_template!r}' + (f' (meant {close[0]!r}?)' if close else '') +
                  f'; known templates: {sorted(TEMPLATES)} (docs/families.md)')   # a start-up refusal, one line


def _fits(tokenizer, template: Template) -> Tuple[str, ...]:
    """The markers of ``template`` that ``tokenizer`` does not hold as one token each."""
    return tuple(m for m in template_markers(template) if len(tokenizer.encode(m, add_special_tokens=False)) != 1)


def check_tokenizer_fits(tokenizer, template: Union[str, Template], where: str = 'tokenizer',
                         setting: str = 'model.template') -> None:
    """Refuse a tokenizer that splits the template's special markers (``<|im_start|>``, ``<|im_end|>``): it belongs
    to an LLM trained with another chat template, whose answers would never end with the stop word; and one that
    appends a token to every text (:func:`appended_tokens`), which would end every turn and chat prompt with it. The
    refusal names the registered templates whose markers the tokenizer does hold, and ``setting``, where to choose
    one; or the setting that appends the token.

    Raises:
        Refused: (a ``ValueError``) naming ``where`` (the tokenizer's folder), the marker and its token count.
    """
    template = get_template(template)
    appended = appended_tokens(tokenizer)
    if appended:
        raise Refused(f'{where}: the tokenizer appends {" ".join(appended)} to every text it encodes (add_eos_token, '
                      'or its post-processor): each turn of a sample would end in it, in the middle of the '
                      'conversation, and every chat prompt after the assistant\'s turn opens; the template\'s stop '
                      'word ends the answers: set "add_eos_token": false in its tokenizer_config.json, or take it out '
                      'of the "post_processor" of its tokenizer.json')
    split = _fits(tokenizer, template)
    if not split:
        return
    n = len(tokenizer.encode(split[0], add_special_tokens=False))
    fitting = [name for name, other in sorted(TEMPLATES.items()) if not _fits(tokenizer, other)]
    hint = (f'its markers fit the template(s) {", ".join(fitting)}: set {setting} to one of them' if fitting
            else f'no registered template fits it ({", ".join(sorted(TEMPLATES))}); give the tokenizer the markers '
                 f'of one as special tokens (docs/families.md)')
    raise Refused(f'{where}: the tokenizer encodes {split[0]!r} of template {template.name!r} as {n} tokens, not 1: '
                  f'this LLM was trained with another chat template; {hint}')


def appended_tokens(tokenizer) -> Tuple[str, ...]:
    """The tokens ``tokenizer`` puts after every text it encodes with its special tokens (Llama's
    ``add_eos_token=True``; a post-processor ``$A </s>``, ``$A <|endoftext|>``), or ``()``."""
    added, plain = (tokenizer.encode('a', add_special_tokens=special) for special in (True, False))
    if not plain:   # a tokenizer that gives 'a' no token of its own (none of its vocabulary): nothing to tell by
        return ()
    for start in range(len(added) - len(plain) + 1):
        if added[start:start + len(plain)] == plain:
            return tuple(tokenizer.convert_ids_to_tokens(added[start + len(plain):]))
    return ()


def template_markers(template: Union[str, Template]) -> Tuple[str, ...]:
    """The control markers a template writes around the turns (``<|im_start|>``, ``<|im_end|>``; Gemma's
    ``<start_of_turn>``), sorted."""
    template = get_template(template)
    return tuple(sorted(set(re.findall(r'<[^<>\s{}]+>', template.system + template.user + template.assistant))
                        | {template.stop_word}))


def vocab_key(tokenizer) -> int:
    """What changes when tokens are added to a tokenizer: its count of added tokens (a few microseconds; the
    ``len`` of a fast tokenizer builds its whole vocabulary, a fifth of a sample's length count)."""
    decoder = getattr(tokenizer, 'added_tokens_decoder', None)
    return len(decoder) if decoder is not None else len(tokenizer)


def control_markers(tokenizer, template: Union[str, Template]) -> Tuple[str, ...]:
    """Text that only the pipeline may write into a sequence, longest first: the template's markers, InternVL's
    image tokens and, with a tokenizer, its special tokens and special added tokens (Qwen2.5's ``<|endoftext|>``,
    ``<|vision_start|>``, ...). InternVL's grounding tokens (``<ref>``, ``<box>``, ``<quad>`` and their ends) are
    not among them: data means them. Cached on the tokenizer (until tokens are added to it)."""
    template = get_template(template)
    key = (vocab_key(tokenizer), template) if tokenizer is not None else None
    cached = getattr(tokenizer, '_xtuner_plugins_control_markers', None)
    if key is not None and cached is not None and cached[0] == key:
        return cached[1]
    markers = set(template_markers(template)) | set(RESERVED_IN_TEXT)
    if tokenizer is not None:
        markers |= set(getattr(tokenizer, 'all_special_tokens', ()))
        decoder = getattr(tokenizer, 'added_tokens_decoder', {}) or {}
        markers |= {str(tok) for tok in decoder.values() if getattr(tok, 'special', False)}
    markers = tuple(sorted((m for m in markers if m and m not in GROUNDING_TOKENS), key=lambda m: (-len(m), m)))
    if key is not None:
        try:
            tokenizer._xtuner_plugins_control_markers = (key, markers)
        except AttributeError:
            pass
    return markers
