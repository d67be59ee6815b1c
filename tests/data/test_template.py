"""The template registry and InternVL's tokens."""

import dataclasses
import re

import pytest

from xtuner_plugins.data.template import (INTERNVL_ADDED_TOKENS, INTERNVL_SYSTEM_MESSAGE, TEMPLATES,
                                          check_tokenizer_fits, get_template, image_token_string,
                                          template_markers)

# Written out by hand here (not imported) so that a typo in the module cannot pass unnoticed.
EXPECTED_SYSTEM = '你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。'


def test_default_system_message_is_internvls():
    assert INTERNVL_SYSTEM_MESSAGE == EXPECTED_SYSTEM
    assert TEMPLATES['internvl2_5'].default_system == EXPECTED_SYSTEM


def test_get_template():
    t = get_template('internvl2_5')
    assert t is TEMPLATES['internvl2_5']
    assert get_template(t) is t
    assert t.stop_word == '<|im_end|>'
    assert t.assistant_prefix == '<|im_start|>assistant\n' and t.assistant_suffix == '<|im_end|>\n'
    with pytest.raises(ValueError, match=r"unknown template 'qwen'.*internvl2_5"):
        get_template('qwen')
    from xtuner_plugins.errors import Refused   # a start-up refusal (one line in train), naming the one meant
    with pytest.raises(Refused, match=r"unknown template 'llama-3' \(meant 'llama3'\?\); known templates: "):
        get_template('llama-3')
    with pytest.raises(dataclasses.FrozenInstanceError):
        t.stop_word = 'x'


def test_added_tokens_constant():
    assert INTERNVL_ADDED_TOKENS == ('<img>', '</img>', '<IMG_CONTEXT>', '<quad>', '</quad>', '<ref>', '</ref>',
                                     '<box>', '</box>')
    assert image_token_string(3) == '<img><IMG_CONTEXT><IMG_CONTEXT><IMG_CONTEXT></img>'


def test_a_tokenizer_of_another_chat_template_is_refused(tiny_tokenizer):
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models, pre_tokenizers
    check_tokenizer_fits(tiny_tokenizer, 'internvl2_5')  # Qwen's ChatML markers are single tokens
    chars = sorted(set('<|im_start|><|im_end|>\nabc'))  # a character-level tokenizer without ChatML's markers
    bpe = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(chars)}, merges=[]))
    bpe.pre_tokenizer = pre_tokenizers.Split('', 'isolated')
    other = PreTrainedTokenizerFast(tokenizer_object=bpe)
    from xtuner_plugins.errors import Refused
    with pytest.raises(Refused, match=r"models/llama: the tokenizer encodes '<\|im_end\|>' of template "
                                      r"'internvl2_5' as 10 tokens, not 1: .*no registered template fits it"):
        check_tokenizer_fits(other, 'internvl2_5', where='models/llama')   # one line in train, no traceback


@pytest.mark.parametrize('kind', ['post_processor', 'add_eos_token'])
def test_a_tokenizer_that_appends_a_token_to_every_text_is_refused(tiny_tokenizer, tmp_path, kind):
    """A tokenizer that ends every text with its eos (Llama's add_eos_token=True, a post-processor '$A </s>'):
    every turn of a training sample ended in it, the masking of what follows an answer was off by one, and the
    converted folder's chat prompt ended '<|im_start|>assistant\\n<|endoftext|>'. Refused in one line, naming the
    setting."""
    import copy

    from tokenizers import processors

    from xtuner_plugins.errors import Refused
    from xtuner_plugins.tiny.sentencepiece_tokenizer import build_tiny_sentencepiece_tokenizer
    if kind == 'post_processor':
        tok = copy.deepcopy(tiny_tokenizer)
        eos = '<|endoftext|>'
        tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
            single=f'$A {eos}', special_tokens=[(eos, tok.convert_tokens_to_ids(eos))])
        template, appended = 'internvl2_5', '<|endoftext|>'
    else:
        tok = build_tiny_sentencepiece_tokenizer(legacy=False, folder=str(tmp_path))
        tok.add_tokens(list(template_markers('internlm2-chat')), special_tokens=True)
        check_tokenizer_fits(tok, 'internlm2-chat')   # as it comes (a bos only): fine
        tok.add_eos_token = True
        template, appended = 'internlm2-chat', '</s>'
    with pytest.raises(Refused, match=rf'^models/llm: the tokenizer appends {re.escape(appended)} to every text it '
                                      r'encodes \(add_eos_token, or its post-processor\): .*"add_eos_token": false'):
        check_tokenizer_fits(tok, template, where='models/llm')
