"""What a converted folder's model is given to answer: the prompt as its ``chat()`` builds it, measured against the
LLM's context, and a stop for answers that are only whitespace.

* :func:`official_query` is the text ``chat()`` of an official or remote-code folder tokenizes (its
  ``conversation.py`` template, the history, ``<img>`` + ``<IMG_CONTEXT>`` x tokens per tile + ``</img>`` per
  image); :func:`prompt_inputs` the ids and pixels of one new question, for every format (the serving test
  compares them with vLLM's prompt; ``likelihood.py`` scores answers after them).
* :func:`check_context`: a prompt plus the tokens to generate over the LLM's ``max_position_embeddings`` is
  refused (:class:`PromptTooLong`, naming both numbers and what to lower) before anything runs: past its context
  a model answers with noise, and the vision encoder's work for a 3000-frame video is wasted.
* :func:`blank_run_stop`: generation stops once the answer's last :data:`BLANK_RUN` tokens are all whitespace.
  An untrained model (the README's tiny one) often repeats a newline until ``max_new_tokens``: 512 steps of
  nothing; a trained model's text has no such run (a run of spaces or newlines is one token of its vocabulary).
"""

from __future__ import annotations

import sys
from typing import Collection, Dict, List, Optional, Sequence, Tuple

import torch

from xtuner_plugins.data.errors import SampleError
from xtuner_plugins.data.image_io import load_image
from xtuner_plugins.data.template import (GROUNDING_TOKENS, IMAGE_PLACEHOLDER, RESERVED_IN_TEXT, TEMPLATES,
                                          control_markers)
from xtuner_plugins.data.video import VIDEO_PLACEHOLDER

#: Whitespace-only tokens in a row after which generation stops (:func:`blank_run_stop`).
BLANK_RUN = 32


def media_question(question: str, images: int, frames: Optional[int]) -> str:
    """``question`` checked against its turn's vision input: ``images`` new images, or a video of ``frames`` frames
    (None: no video); with a video, ``<video>`` is put in front when the question has none. A ``ValueError``
    naming what does not fit (the chat models' ``ask``, of every format)."""
    if frames is not None and (images or not frames):
        raise ValueError('a turn takes images or one video (at least one frame), not both')
    if frames is None:
        if VIDEO_PLACEHOLDER in question:
            raise ValueError(f'the question has {VIDEO_PLACEHOLDER} but no video is given')
        return question
    if question.count(VIDEO_PLACEHOLDER) > 1:
        raise ValueError(f'the question has {question.count(VIDEO_PLACEHOLDER)} {VIDEO_PLACEHOLDER} tags for one '
                         f'video')
    if VIDEO_PLACEHOLDER not in question:
        question = f'{VIDEO_PLACEHOLDER}\n' + question
    if IMAGE_PLACEHOLDER in question:
        raise ValueError('a question about a video has no <image> tags (its frames take their place)')
    return question


def check_question(question: str, tokenizer=None, extra: Sequence[str] = ()) -> None:
    """``SampleError('control_text')`` when ``question`` holds text only the prompt builder writes: InternVL's image
    tokens (``<IMG_CONTEXT>``, ``<img>``), a template's turn markers (``<|im_start|>``, ``<|im_end|>``) or, with
    ``tokenizer``, its special tokens (``<|endoftext|>``); ``extra``: the control tokens of a vocabulary without a
    transformers tokenizer (a GGUF's), InternVL's grounding tokens left out as ``control_markers`` leaves them.
    Typed into the web demo or ``tools/chat.py`` they would be read as those tokens: image tokens without an image,
    or a forged turn. Training and ``tools/eval.py`` refuse them the same way. ``<image>`` and ``<video>`` are the
    tags that place images and a video, not markers. A lone surrogate (bytes that were not UTF-8 on a command line,
    ``"\\ud800"`` in JSON) is ``SampleError('not_text')``: the tokenizer takes only characters."""
    try:
        question.encode('utf-8')
    except UnicodeEncodeError as exc:
        raise SampleError('not_text', f'the question holds {question[exc.start]!r} at character {exc.start} '
                                      f'({question[max(0, exc.start - 20):exc.start + 20]!r}): not a character (a '
                                      'lone surrogate: text that was not UTF-8); write it in UTF-8') from None
    markers = _markers(tokenizer, extra) - {IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER, ''}
    found = [(question.find(m), m) for m in markers if m in question]
    if found:
        pos, marker = min(found, key=lambda f: (f[0], -len(f[1])))
        raise SampleError('control_text', f'the question holds {marker!r} at character {pos} '
                                          f'({question[max(0, pos - 20):pos + len(marker) + 20]!r}): text only the '
                                          f'prompt builder writes (image tokens, turn markers), which the model would '
                                          f'read as that control token, not as text; leave it out')


def _markers(tokenizer=None, extra: Sequence[str] = ()) -> set:
    """The templates' control text, the tokenizer's special tokens and ``extra`` (InternVL's grounding tokens left
    out) with the ``<image>`` and ``<video>`` tags. With a vocabulary to ask (``tokenizer``, or a GGUF's control
    tokens as ``extra``), a template's marker counts only where it is one of its tokens: Llama 3's ``<|eot_id|>`` is
    plain text to a Phi-3 model, as training reads it (``control_markers`` of the model's own template)."""
    extra = set(extra) - set(GROUNDING_TOKENS)
    found = set().union(*(control_markers(tokenizer, t) for t in TEMPLATES), extra)
    if tokenizer is None and not extra:
        return found
    known = set(extra) | set(RESERVED_IN_TEXT)
    if tokenizer is not None:
        known |= set(tokenizer.get_added_vocab()) | set(getattr(tokenizer, 'all_special_tokens', ()))
    return {m for m in found if m in known}


#: put after the first character of control text in an earlier answer (:func:`history_text`): U+2060 WORD JOINER
WORD_JOINER = '\u2060'


def history_text(answer: str, tokenizer=None, extra: Sequence[str] = ()) -> str:
    """``answer`` as it is given back to the model in the next turns' prompts: its ``<image>``/``<video>`` tags and
    control text (:func:`check_question`'s) with a word joiner after their first character, so they stay text. The
    next turn's prompt is text tokenized again: an ``<image>`` in an answer took the new turn's image tokens (the
    folder's ``chat()`` fills the tags of the whole prompt in order), ``<IMG_CONTEXT>`` gave more image tokens than
    tiles on every later turn, ``<|im_end|>`` ended the turn early. The answer shown is the model's own."""
    for marker in sorted(_markers(tokenizer, extra) | {IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER}, key=len, reverse=True):
        if len(marker) > 1 and marker in answer:
            answer = answer.replace(marker, marker[0] + WORD_JOINER + marker[1:])
    return answer


def split_images(question: str, num_images: int) -> List[Tuple[str, str]]:
    """``question`` as ordered parts ``('image', '')`` / ``('text', t)``: one ``<image>`` tag per image (added
    in front as ``<image>\\n`` when the question has none); the newline after a tag belongs to the image part,
    whose rendering ends with one."""
    if num_images and '<image>' not in question:
        question = '<image>\n' * num_images + question
    if question.count('<image>') != num_images:
        raise ValueError(f'the prompt has {question.count("<image>")} <image> tags for {num_images} images')
    parts: List[Tuple[str, str]] = []
    for i, text in enumerate(question.split('<image>')):
        if i:
            parts.append(('image', ''))
            text = text[1:] if text.startswith('\n') else text
        if text:
            parts.append(('text', text))
    return parts


def folder_conversation(net):
    """A fresh copy of the conversation template of an official or remote folder's model ``net``: its own
    ``conversation.py``'s (the module its modelling code imported), named by ``net.template``."""
    return sys.modules[type(net).__module__].get_conv_template(net.template)


def official_query(net, question: str, num_patches: Sequence[int], history: Optional[list] = None) -> str:
    """The text ``net.chat()`` (official / remote code) tokenizes for ``question`` after ``history``, its
    images of ``num_patches`` tiles each: the folder's own template (``conversation.py``) and image tokens."""
    if history is None and num_patches and '<image>' not in question:  # as chat() adds it
        question = '<image>\n' + question
    template = folder_conversation(net)
    template.system_message = net.system_message
    for old_question, old_answer in history or []:
        template.append_message(template.roles[0], old_question)
        template.append_message(template.roles[1], old_answer)
    template.append_message(template.roles[0], question)
    template.append_message(template.roles[1], None)
    return net._image_query(template.get_prompt(), list(num_patches), '<img>', '</img>', '<IMG_CONTEXT>')


def encode_prompt(processor, prompt, **kwargs):
    """``processor(text=prompt, **kwargs)`` for a prompt its chat template rendered (one text, or a batch of them),
    with the tokenizer's bos once: a converted folder's template writes the bos of a tokenizer that adds one
    (``export/files.py``'s ``chat_template``), which the tokenizer must then not add again; a folder written before
    that (no bos in its template) gets it from the tokenizer, as before. transformers' own
    ``processor.apply_chat_template(..., tokenize=True)`` decides the same way. No ``token_type_ids``: the
    vision-language classes take none."""
    first = prompt[0] if isinstance(prompt, (list, tuple)) and prompt else prompt
    bos = getattr(getattr(processor, 'tokenizer', None), 'bos_token', None)
    if bos and isinstance(first, str) and first.startswith(bos):
        kwargs['add_special_tokens'] = False
    inputs = processor(text=prompt, **kwargs)
    inputs.pop('token_type_ids', None)   # a tokenizer that returns them (Falcon-style model_input_names): generate
    # refused them ('model_kwargs are not used by the model')
    return inputs


def prompt_inputs(model, question: str, images: Sequence = ()) -> Dict[str, torch.Tensor]:
    """The inputs (``input_ids``, ``attention_mask``, pixels) of a :class:`~xtuner_plugins.models.inference.
    ConvertedModel` for one new question, up to where its answer starts, as its ``ask`` builds them."""
    check_question(question, model.tokenizer)
    new = [load_image(i) for i in images]
    parts = split_images(question, len(new))  # the tags must match the images
    if model.format in ('official', 'remote'):
        net = model.model
        if new and '<image>' not in question:
            question = '<image>\n' * len(new) + question
        pixel_values, num_patches = model.pixels(new)
        net.img_context_token_id = model.tokenizer.convert_tokens_to_ids('<IMG_CONTEXT>')
        encoded = model.tokenizer(official_query(net, question, num_patches), return_tensors='pt', verbose=False)
        inputs = dict(input_ids=encoded['input_ids'], attention_mask=encoded['attention_mask'])
        if pixel_values is not None:
            inputs.update(pixel_values=pixel_values,
                          image_flags=torch.ones(pixel_values.shape[0], dtype=torch.long))
        return {k: v.to(model.device) for k, v in inputs.items()}
    content = [{'type': kind} if kind == 'image' else {'type': 'text', 'text': text} for kind, text in parts]
    prompt = model.processor.apply_chat_template([{'role': 'user', 'content': content}], add_generation_prompt=True,
                                                 tokenize=False)
    inputs = encode_prompt(model.processor, prompt, images=new or None, return_tensors='pt')
    return {k: (v.to(model.device, model.dtype) if k == 'pixel_values' else v.to(model.device))
            for k, v in inputs.items()}


def context_length(config: dict) -> Tuple[Optional[int], str]:
    """The LLM's context (``max_position_embeddings`` of a folder's ``config.json``: ``llm_config`` for official
    and remote folders, ``text_config`` for hf and llava) and the key it was read from; ``(None, '')`` when the
    config records none."""
    for key in ('llm_config', 'text_config', None):
        part = config.get(key) if key else config
        value = part.get('max_position_embeddings') if isinstance(part, dict) else None
        name = f'{key}.max_position_embeddings' if key else 'max_position_embeddings'
        if value is not None:
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:  # a tampered or hand-edited file
                raise ValueError(f'{name} {value!r} is not a number of tokens (a whole number, 1 or more)')
            return value, name
    return None, ''


class NoVideo(ValueError):
    """A model folder that reads no video (``llava``, GGUF) asked about one: ``check_video`` of the chat models,
    before a frame is decoded; evaluation counts each such question as not scored (``no_video``)."""


class PromptTooLong(ValueError):
    """A prompt that, with the tokens to generate, does not fit the LLM's context. ``str()`` names the command
    line's options; :meth:`message` takes other names (the web page's settings). ``new``: the setting that asks
    for the new tokens (``None``: they are an answer's, scored by likelihood, and not a setting). ``media``: what
    the prompt holds of ``'image'`` and ``'video'`` (``None``: not known), so that the advice names only the
    settings that shorten this prompt (a frames setting is no help to an image question)."""

    def __init__(self, prompt_tokens: int, new_tokens: int, context: int, source: str, turns: int = 0,
                 new: Optional[str] = '--max-new-tokens', least: bool = False, tiles: Optional[str] = '--max-num',
                 media: Optional[Collection[str]] = None):
        self.prompt_tokens, self.new_tokens, self.context = prompt_tokens, new_tokens, context
        self.source, self.turns, self.new, self.least = source, turns, new, least  # least: a lower bound
        self.tiles = tiles   # None where the tiling is not the user's to set (a GGUF folder: llama.cpp's mmproj)
        self.media = None if media is None else frozenset(media)
        super().__init__(self.message())

    def message(self, frames: str = '--frames', tiles: Optional[str] = 'default', new: Optional[str] = None,
                reset: str = '/reset') -> str:
        """The one line; ``frames``, ``tiles`` (``None``: not offered; ``'default'``: the constructor's), ``new``,
        ``reset``: the settings named."""
        new = new or self.new
        tiles = self.tiles if tiles == 'default' else tiles
        settings = ([f'{frames} (frames of a video)'] if self.media is None or 'video' in self.media else []) + (
            [f'{tiles} (tiles per image)'] if tiles and (self.media is None or 'image' in self.media) else [])
        lower = ' or '.join(['shorten the question', 'lower ' + ' or '.join(settings)] if settings
                            else ['shorten the question'])
        earlier = f'; the {self.turns} earlier turns count too: {reset} starts anew' if self.turns else ''
        where = f"the LLM's context of {self.context} tokens ({self.source})"
        if self.prompt_tokens > self.context or not new:
            more = f' (+ {self.new_tokens} of the longest answer scored)' if self.new_tokens and not new else ''
            return (f'the prompt is {"at least " * self.least}{self.prompt_tokens} tokens{more}, over {where}; '
                    f'{lower}{earlier}')
        return (f'the prompt is {"at least " * self.least}{self.prompt_tokens} tokens and {new} asks for '
                f'{self.new_tokens} more: '
                f'{self.prompt_tokens + self.new_tokens} is over {where}; lower {new} to '
                f'{self.context - self.prompt_tokens} or less, or {lower}{earlier}')


class QuestionTooLong(PromptTooLong):
    """A question that alone is over the LLM's context (counted from its bytes, before it is tokenized: at least
    its bytes over the vocabulary's longest token): shortening it is the one way, whatever the settings."""

    def message(self, *args, **kwargs) -> str:
        return (f'the question is at least {self.prompt_tokens} tokens, over the LLM\'s context of {self.context} '
                f'tokens ({self.source}); shorten it')


def check_context(prompt_tokens: int, new_tokens: int, context: Optional[int], source: str, turns: int = 0,
                  new: Optional[str] = '--max-new-tokens', least: bool = False,
                  media: Optional[Collection[str]] = None) -> None:
    """:class:`PromptTooLong` when ``prompt_tokens + new_tokens`` is over ``context`` (``None``: not known);
    ``least``: ``prompt_tokens`` is the fewest the prompt can be (it is not built yet); ``media``: the prompt's
    kinds of vision input (:class:`PromptTooLong`)."""
    if context is not None and prompt_tokens + new_tokens > context:
        raise PromptTooLong(prompt_tokens, new_tokens, context, source, turns, new, least, media=media)


class BlankRun:
    """Whether a row's last ``run`` tokens after ``start`` (the prompt's length, where the ids passed in hold the
    prompt) all decode to whitespace: :func:`blank_run_stop`'s test."""

    def __init__(self, tokenizer, run: int = BLANK_RUN, start: int = 0):
        self.tokenizer, self.run, self.start, self.blank = tokenizer, run, start, {}

    def _blank(self, token: int) -> bool:
        if token not in self.blank:  # each token decoded once
            self.blank[token] = not self.tokenizer.decode([token]).strip()
        return self.blank[token]

    def __call__(self, input_ids: torch.Tensor, scores=None, **kwargs) -> torch.Tensor:
        if input_ids.shape[1] - self.start < self.run:
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        tails = input_ids[:, -self.run:].tolist()
        return torch.tensor([all(self._blank(t) for t in tail) for tail in tails], device=input_ids.device)


def blank_run_stop(tokenizer, start: int = 0, run: int = BLANK_RUN):
    """``generate``'s ``stopping_criteria``: stop a row after ``run`` whitespace-only tokens in a row (``generate``
    calls each entry with the ids so far and asks for one flag per row)."""
    from transformers import StoppingCriteriaList
    return StoppingCriteriaList([BlankRun(tokenizer, run, start)])
