"""Multiple choice by likelihood (``tools/eval.py --mc likelihood``): how likely the model finds each option's text
as its answer, with nothing generated.

For a question (its stem: no options, no "answer with the letter") and one option's text, the prompt is the one
the model answers that question with (its chat template, system message and image tokens: :func:`prompt_inputs`
for a converted folder, the training data set's for the model being trained), and the option's tokens (the text
tokenized alone, as generation would produce it) follow it; the figure is the sum of the log-probabilities of
those tokens (:func:`continuation_logprob`), the end token not included. lm-eval-harness scores multiple choice
the same way (its ``acc``); the highest figure is the model's choice.

:func:`prompt_inputs` is also what the serving test compares with vLLM's prompt: the ids ``chat()`` of an
official or remote-code folder builds (its ``conversation.py`` template, ``<img>`` + ``<IMG_CONTEXT>`` x tokens
per tile + ``</img>`` per image), and the processor's for ``llava`` / ``hf``.
"""

from __future__ import annotations

import sys
from typing import Callable, Dict, List, Sequence

import torch

from xtuner_plugins.data.image_io import load_image

__all__ = ['continuation_logprob', 'option_logprobs', 'prompt_inputs']


def prompt_inputs(model, question: str, images: Sequence = ()) -> Dict[str, torch.Tensor]:
    """The inputs (``input_ids``, ``attention_mask``, pixels) of a :class:`~xtuner_plugins.models.inference.
    ConvertedModel` for one new question, up to where its answer starts, as its ``ask`` builds them."""
    from xtuner_plugins.models.inference import split_images
    new = [load_image(i) for i in images]
    parts = split_images(question, len(new))  # the tags must match the images
    if model.format in ('official', 'remote'):
        net = model.model
        if new and '<image>' not in question:
            question = '<image>\n' * len(new) + question
        pixel_values, num_patches = model.pixels(new)
        template = sys.modules[type(net).__module__].get_conv_template(net.template)  # the folder's conversation.py
        template.system_message = net.system_message
        template.append_message(template.roles[0], question)
        template.append_message(template.roles[1], None)
        query = net._image_query(template.get_prompt(), num_patches, '<img>', '</img>', '<IMG_CONTEXT>')
        net.img_context_token_id = model.tokenizer.convert_tokens_to_ids('<IMG_CONTEXT>')
        encoded = model.tokenizer(query, return_tensors='pt')
        inputs = dict(input_ids=encoded['input_ids'], attention_mask=encoded['attention_mask'])
        if pixel_values is not None:
            inputs.update(pixel_values=pixel_values,
                          image_flags=torch.ones(pixel_values.shape[0], dtype=torch.long))
        return {k: v.to(model.device) for k, v in inputs.items()}
    content = [{'type': kind} if kind == 'image' else {'type': 'text', 'text': text} for kind, text in parts]
    prompt = model.processor.apply_chat_template([{'role': 'user', 'content': content}], add_generation_prompt=True,
                                                 tokenize=False)
    inputs = model.processor(text=prompt, images=new or None, return_tensors='pt')
    return {k: (v.to(model.device, model.dtype) if k == 'pixel_values' else v.to(model.device))
            for k, v in inputs.items()}


@torch.no_grad()
def continuation_logprob(logits_of: Callable[[torch.Tensor], torch.Tensor], prompt_ids: torch.Tensor,
                         continuation: Sequence[int]) -> float:
    """The summed log-probability of ``continuation`` after ``prompt_ids`` ([1, P]); ``logits_of(ids)`` gives
    the logits [1, L, vocab] of ids [1, L]."""
    if not continuation:
        raise ValueError('an option with no tokens: its text is empty')
    cont = torch.tensor([list(continuation)], dtype=prompt_ids.dtype, device=prompt_ids.device)
    logits = logits_of(torch.cat([prompt_ids, cont], dim=1))
    start = prompt_ids.shape[1] - 1  # the logits at position i predict token i + 1
    logprobs = logits[0, start:start + cont.shape[1]].float().log_softmax(-1)
    return float(logprobs.gather(1, cont[0][:, None]).sum())


def option_logprobs(model, question: str, images: Sequence, texts: Sequence[str]) -> List[float]:
    """Each text's log-likelihood as a :class:`~xtuner_plugins.models.inference.ConvertedModel`'s answer to
    ``question`` (the module docstring)."""
    inputs = prompt_inputs(model, question, images)
    prompt_ids = inputs.pop('input_ids')
    inputs.pop('attention_mask')

    def logits_of(ids: torch.Tensor) -> torch.Tensor:
        mask = torch.ones_like(ids)
        return model.model(input_ids=ids, attention_mask=mask, **inputs).logits

    return [continuation_logprob(logits_of, prompt_ids, model.tokenizer(text, add_special_tokens=False)['input_ids'])
            for text in texts]
