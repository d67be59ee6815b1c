"""likelihood.py: an option is scored on the tokens training supervises for the same text as the answer, after the
assistant turn's prefix; tokenised alone, a SentencePiece tokenizer starts it with a word start ('▁') the model
never gives there, and ``--mc likelihood`` picked other options than the trained model would (found by a sweep:
0.5 accuracy where the trained tokens give 1.0)."""

import pytest

from xtuner_plugins.data.template import IGNORE_INDEX, get_template, template_markers
from xtuner_plugins.data.token_ids import answer_ids
from xtuner_plugins.data.tokenize import tokenize_conversation
from xtuner_plugins.tiny.sentencepiece_tokenizer import build_tiny_sentencepiece_tokenizer

OPTIONS = ['Red', 'red', 'A', 'dark red', '42', 'café', 'The cat.', ' spaced ']


def _trained_answer(tokenizer, template, text):
    """The ids training supervises for ``text`` as the answer, its stop word left out."""
    out = tokenize_conversation([{'from': 'human', 'value': 'What colour?'}, {'from': 'gpt', 'value': text}],
                                tokenizer, [], template)
    return [i for i, label in zip(out['input_ids'], out['labels']) if label != IGNORE_INDEX][:-1]


@pytest.mark.parametrize('kind,template', [('byte-level', 'internvl2_5')] + [
    (kind, template) for kind in ('sentencepiece', 'sentencepiece-legacy')
    for template in ('internvl2_5', 'phi3-chat', 'llama3')])
def test_an_options_ids_are_the_trained_answers(tiny_tokenizer, tmp_path, kind, template):
    if kind == 'byte-level':   # (Qwen2.5's kind, ChatML's markers)
        tokenizer = tiny_tokenizer
    else:
        tokenizer = build_tiny_sentencepiece_tokenizer(legacy=kind.endswith('legacy'), folder=str(tmp_path))
        tokenizer.add_tokens(list(template_markers(template)), special_tokens=True)
    prefix = get_template(template).assistant_prefix
    for text in OPTIONS:
        assert answer_ids(tokenizer, prefix, text) == _trained_answer(tokenizer, template, text), text
    if kind == 'sentencepiece':   # what was scored: the text alone, a word start before it
        alone = tokenizer('Red', add_special_tokens=False)['input_ids']
        assert alone != _trained_answer(tokenizer, template, 'Red')
