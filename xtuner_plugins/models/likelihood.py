"""Multiple choice by likelihood (``tools/eval.py --mc likelihood``): how likely the model finds each option's text
as its answer, with nothing generated.

For a question (its stem: no options, no "answer with the letter") and one option's text, the prompt is the one
the model answers that question with (its chat template, system message and image tokens: ``prompt.py``'s
:func:`~xtuner_plugins.models.prompt.prompt_inputs` for a converted folder, the training data set's for the model
being trained: ``eval/hook.py``), and the option's tokens follow it, as training tokenises an answer after the
assistant turn's prefix (``data/token_ids.answer_ids``: the text alone took a SentencePiece word start, '▁', that
the model never gives there); the figure is the sum of the log-probabilities of those tokens
(:func:`continuation_logprob`), the end token not included. lm-eval-harness scores multiple choice the same way
(its ``acc``); the highest figure is the model's choice.

``ConvertedModel.option_logprobs`` is :func:`option_logprobs`; the training-time evaluation (``eval/hook.py``)
sums with :func:`continuation_logprob` over its own prompt.
"""

from __future__ import annotations

from typing import Callable, List, Sequence

import torch

from xtuner_plugins.data.token_ids import answer_ids

from .prompt import check_context, folder_conversation, prompt_inputs

__all__ = ['continuation_logprob', 'option_logprobs']


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


def assistant_prefix(model) -> str:
    """The text a :class:`~xtuner_plugins.models.inference.ConvertedModel`'s prompt ends with, where its answer
    starts (``<|im_start|>assistant\\n``): the assistant role of its ``conversation.py`` template (official and
    remote folders), or what the chat template's generation prompt adds (hf, llava)."""
    if model.format in ('official', 'remote'):
        return folder_conversation(model.model).roles[1]
    messages = [{'role': 'user', 'content': [{'type': 'text', 'text': 'x'}]}]
    with_prompt, without = (model.processor.apply_chat_template(messages, add_generation_prompt=generation,
                                                                tokenize=False) for generation in (True, False))
    return with_prompt[len(without):] if with_prompt.startswith(without) else ''


def option_logprobs(model, question: str, images: Sequence, texts: Sequence[str]) -> List[float]:
    """Each text's log-likelihood as a :class:`~xtuner_plugins.models.inference.ConvertedModel`'s answer to
    ``question`` (the module docstring)."""
    inputs = prompt_inputs(model, question, images)
    prompt_ids = inputs.pop('input_ids')
    inputs.pop('attention_mask')
    prefix = assistant_prefix(model)
    options = [answer_ids(model.tokenizer, prefix, text) for text in texts]
    check_context(prompt_ids.shape[1], max(map(len, options), default=0), *model.context,
                  new=None, media=['image'] * bool(images))

    def logits_of(ids: torch.Tensor) -> torch.Tensor:
        mask = torch.ones_like(ids)
        return model.model(input_ids=ids, attention_mask=mask, **inputs).logits

    return [continuation_logprob(logits_of, prompt_ids, option) for option in options]
