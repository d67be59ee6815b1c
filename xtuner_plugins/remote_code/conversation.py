"""Conversation templates for InternVL chat models (``get_conv_template(name)``).

Written by the xtuner-plugins project to ship beside converted InternVL weights, with the names and the
interface of InternVL's ``conversation.py`` that ``modeling_internvl_chat.py`` and InternVL tooling use:
``Conversation`` with ``roles``, ``sep``, ``system_message``, ``append_message``, ``get_prompt`` and
``copy``. The prompts are those the training pipeline tokenises (``xtuner_plugins.data.template``).
"""

import dataclasses
from enum import IntEnum, auto
from typing import Dict, List, Optional, Tuple


class SeparatorStyle(IntEnum):
    """How ``get_prompt`` joins the turns. ``MPT``: ``system + sep``, then ``role + message + sep`` per turn
    and the bare role for the turn to be generated (ChatML with ``sep = '<|im_end|>\\n'``)."""
    MPT = auto()


# InternVL's default system message of its ``internvl2_5`` template.
INTERNVL_SYSTEM_MESSAGE = (
    '你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。'
)
# The default system message of InternVL 2.0's ``Hermes-2``, ``internlm2-chat`` and ``phi3-chat`` templates.
INTERNVL2_SYSTEM_MESSAGE = (
    '你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, 是一个有用无害的人工智能助手。'
)


@dataclasses.dataclass
class Conversation:
    name: str
    system_template: str = '{system_message}'
    system_message: str = ''
    roles: Tuple[str, str] = ('USER', 'ASSISTANT')
    messages: List[List[Optional[str]]] = dataclasses.field(default_factory=list)
    offset: int = 0
    sep_style: SeparatorStyle = SeparatorStyle.MPT
    sep: str = '\n'
    sep2: Optional[str] = None
    stop_str: Optional[str] = None
    stop_token_ids: Optional[List[int]] = None
    # An empty system message writes no system turn (Llama 3's own rule); InternVL's templates always write one.
    system_optional: bool = False
    # No system turn: a system message is written at the start of the first user message, through
    # ``system_template`` (Gemma's rule: the message and a blank line); an empty one writes nothing.
    system_in_user: bool = False

    def get_prompt(self) -> str:
        if self.sep_style != SeparatorStyle.MPT:
            raise ValueError(f'unsupported separator style {self.sep_style}')
        system = self.system_template.format(system_message=self.system_message)
        written = bool(self.system_message) or not (self.system_optional or self.system_in_user)
        prompt = system + self.sep if written and not self.system_in_user else ''
        for k, (role, message) in enumerate(self.messages):
            if k == 0 and self.system_in_user and written and role == self.roles[0]:
                message = system + (message or '')
            prompt += role + message + self.sep if message else role
        return prompt

    def set_system_message(self, system_message: str) -> None:
        self.system_message = system_message

    def append_message(self, role: str, message: Optional[str]) -> None:
        self.messages.append([role, message])

    def update_last_message(self, message: str) -> None:
        self.messages[-1][1] = message

    def to_openai_api_messages(self) -> List[Dict[str, str]]:
        messages = [{'role': 'system', 'content': self.system_message}]
        for i, (_, message) in enumerate(self.messages[self.offset:]):
            if message is not None:
                messages.append({'role': 'user' if i % 2 == 0 else 'assistant', 'content': message})
        return messages

    def copy(self) -> 'Conversation':
        return dataclasses.replace(self, messages=[[role, message] for role, message in self.messages],
                                   roles=tuple(self.roles))

    def dict(self) -> dict:
        return {'template_name': self.name, 'system_message': self.system_message, 'roles': self.roles,
                'messages': self.messages, 'offset': self.offset}


conv_templates: Dict[str, Conversation] = {}


def register_conv_template(template: Conversation, override: bool = False) -> None:
    if not override and template.name in conv_templates:
        raise ValueError(f'template {template.name} is already registered')
    conv_templates[template.name] = template


def get_conv_template(name: str) -> Conversation:
    if name not in conv_templates:
        raise KeyError(f'unknown conversation template {name!r}; known: {sorted(conv_templates)}')
    return conv_templates[name].copy()


# The templates, each as InternVL names and writes it (``internvl_chat/internvl/conversation.py``): InternVL 2.5's
# ChatML; InternVL 2.0's ChatML without the newline after each turn (``Hermes-2``: Nous-Hermes-2 and
# Hermes-2-Theta-Llama-3 LLMs; ``internlm2-chat``: InternLM2 / 2.5) and its Phi-3 one (``phi3-chat``); Llama 3
# Instruct's own turns (``llama3``: no InternVL model uses it; no default system message, and none written when
# there is none, as Llama 3's template does); and Gemma's (``gemma``: Gemma 2 and 3 instruction-tuned; no system
# turn, the system message and a blank line open the first user turn, as Gemma 3's own template writes it).
register_conv_template(Conversation(
    name='internvl2_5',
    system_template='<|im_start|>system\n{system_message}',
    system_message=INTERNVL_SYSTEM_MESSAGE,
    roles=('<|im_start|>user\n', '<|im_start|>assistant\n'),
    sep_style=SeparatorStyle.MPT,
    sep='<|im_end|>\n',
))
for _name in ('Hermes-2', 'internlm2-chat'):
    register_conv_template(Conversation(
        name=_name,
        system_template='<|im_start|>system\n{system_message}',
        system_message=INTERNVL2_SYSTEM_MESSAGE,
        roles=('<|im_start|>user\n', '<|im_start|>assistant\n'),
        sep_style=SeparatorStyle.MPT,
        sep='<|im_end|>',
    ))
register_conv_template(Conversation(
    name='phi3-chat',
    system_template='<|system|>\n{system_message}',
    system_message=INTERNVL2_SYSTEM_MESSAGE,
    roles=('<|user|>\n', '<|assistant|>\n'),
    sep_style=SeparatorStyle.MPT,
    sep='<|end|>',
))
register_conv_template(Conversation(
    name='llama3',
    system_template='<|start_header_id|>system<|end_header_id|>\n\n{system_message}',
    system_message='',
    roles=('<|start_header_id|>user<|end_header_id|>\n\n', '<|start_header_id|>assistant<|end_header_id|>\n\n'),
    sep_style=SeparatorStyle.MPT,
    sep='<|eot_id|>',
    system_optional=True,
))
register_conv_template(Conversation(
    name='gemma',
    system_template='{system_message}\n\n',
    system_message='',
    roles=('<start_of_turn>user\n', '<start_of_turn>model\n'),
    sep_style=SeparatorStyle.MPT,
    sep='<end_of_turn>\n',
    system_in_user=True,
))
