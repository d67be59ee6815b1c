"""A tokenizer whose post-processor adds the bos (Llama 3's way: no ``add_bos_token`` attribute) gets it once, at
the very start of a training sample, as chat's prompt has it; InternVL's rule read the attribute and put a bos at
the start of every turn (``data/token_ids.py``: ``adds_bos``)."""

from xtuner_plugins.data.template import get_template
from xtuner_plugins.data.token_ids import adds_bos
from xtuner_plugins.data.tokenize import tokenize_conversation
from xtuner_plugins.tiny.tokenizer import build_tiny_tokenizer

BOS = '<|begin_of_text|>'


def llama3_style_tokenizer():
    """The tiny tokenizer whose post-processor adds ``BOS`` (no ``add_bos_token`` attribute), with InternVL's tokens."""
    return build_tiny_tokenizer(bos_token=BOS)


def test_a_bos_added_by_the_post_processor_starts_the_sample_once():
    tok = llama3_style_tokenizer()
    assert not getattr(tok, 'add_bos_token', False) and adds_bos(tok)
    conv = [{'from': 'human', 'value': 'Hi there'}, {'from': 'gpt', 'value': 'Hello'},
            {'from': 'human', 'value': 'And now?'}, {'from': 'gpt', 'value': 'Bye'}]
    ids = tokenize_conversation(conv, tok, [])['input_ids']
    assert [i for i, x in enumerate(ids) if x == tok.bos_token_id] == [0]
    template = get_template('internvl2_5')
    prompt = template.render_system(template.default_system) + template.render_user('Hi there')
    prompt += template.assistant_prefix
    chat_ids = tok(prompt).input_ids  # chat's first prompt: the tokenizer's own bos, once
    assert list(ids[:len(chat_ids)]) == chat_ids


def test_a_tokenizer_without_a_bos_adds_none():
    tok = build_tiny_tokenizer()
    assert not adds_bos(tok)
    ids = tokenize_conversation([{'from': 'human', 'value': 'Hi'}, {'from': 'gpt', 'value': 'Yes'}], tok, [])
    assert tok.convert_ids_to_tokens(ids['input_ids'][:1]) == ['<|im_start|>']
