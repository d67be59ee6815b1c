"""Tests of the tiny offline Qwen2.5-format tokenizer."""

import pytest
from transformers import AutoTokenizer, Qwen2TokenizerFast
from transformers.models.qwen2 import tokenization_qwen2

from xtuner_plugins.data.template import INTERNVL_ADDED_TOKENS, add_internvl_tokens
from xtuner_plugins.tiny.tokenizer import QWEN2_PRETOKENIZE_REGEX, build_tiny_tokenizer

TEXTS = [
    'The image shows a red circle next to a blue square.',
    '图片中有三个红色的圆形和一个蓝色的正方形。你好，世界！',
    '<|im_start|>user\n<img><IMG_CONTEXT><IMG_CONTEXT></img>\nWhat is it?<|im_end|>\n',
    '<|im_start|>assistant\n<ref>cat</ref><box>[[1, 2, 3, 4]]</box><quad></quad><|im_end|>\n<|endoftext|>',
    'emoji 🐱🎨, tabs\tand\r\nnewlines\n\n\n  spaces   ',
    'Ünïcödé ÅÆØ ß — ‘quotes’ “double” …',
]


@pytest.fixture(scope='module')
def tok():
    return build_tiny_tokenizer()


def test_format(tok):
    assert isinstance(tok, Qwen2TokenizerFast)
    assert tok.bos_token is None and tok.bos_token_id is None
    assert tok.eos_token == '<|im_end|>'
    assert tok.pad_token == '<|endoftext|>'
    assert tok.unk_token is None
    assert not getattr(tok, 'add_bos_token', False)
    assert tok.model_max_length >= 32768
    assert tok('hello').input_ids == tok('hello', add_special_tokens=False).input_ids  # adds nothing


def test_special_token_ids(tok):
    v = 512
    expected = ['<|endoftext|>', '<|im_start|>', '<|im_end|>'] + list(INTERNVL_ADDED_TOKENS)
    assert [tok.convert_tokens_to_ids(t) for t in expected] == list(range(v, v + 12))
    assert len(tok) == v + 12
    added = tok.added_tokens_decoder
    for t in expected:
        assert added[tok.convert_tokens_to_ids(t)].special
    # Special tokens are kept whole inside text; <image> is plain text, not a token.
    ids = tok('a<IMG_CONTEXT>b<|im_end|>').input_ids
    assert tok.convert_tokens_to_ids('<IMG_CONTEXT>') in ids and tok.eos_token_id in ids
    assert tok.convert_tokens_to_ids('<image>') is None or '<image>' not in tok.get_added_vocab()
    assert len(tok('<image>').input_ids) > 1


def test_structure_matches_qwen2(tok):
    assert QWEN2_PRETOKENIZE_REGEX == tokenization_qwen2.PRETOKENIZE_REGEX
    state = tok.backend_tokenizer
    import json
    cfg = json.loads(state.to_str())
    assert cfg['normalizer']['type'] == 'NFC'
    pre = cfg['pre_tokenizer']['pretokenizers']
    assert pre[0]['type'] == 'Split' and pre[0]['pattern']['Regex'] == QWEN2_PRETOKENIZE_REGEX
    assert pre[0]['behavior'] == 'Isolated' and not pre[0]['invert']
    assert pre[1] == {'type': 'ByteLevel', 'add_prefix_space': False, 'trim_offsets': True, 'use_regex': False}
    assert cfg['decoder']['type'] == 'ByteLevel'
    assert cfg['model']['type'] == 'BPE' and cfg['model']['unk_token'] is None
    assert len(cfg['model']['vocab']) == 512
    # The full byte alphabet is in the vocabulary.
    from tokenizers.pre_tokenizers import ByteLevel
    assert set(ByteLevel.alphabet()) <= set(cfg['model']['vocab'])
    # Merges were learnt: common words are single tokens.
    assert len(tok(' image').input_ids) == 1


@pytest.mark.parametrize('text', TEXTS)
def test_round_trip_text(tok, text):
    ids = tok(text).input_ids
    assert tok.decode(ids) == text
    assert tok.unk_token_id is None or tok.unk_token_id not in ids


def test_nfc(tok):
    assert tok('cafe\u0301').input_ids == tok('caf\u00e9').input_ids


def test_save_load_round_trip(tok, tmp_path):
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(str(tmp_path))
    assert isinstance(loaded, Qwen2TokenizerFast)
    assert len(loaded) == len(tok)
    assert loaded.get_added_vocab() == tok.get_added_vocab()
    assert (loaded.bos_token, loaded.eos_token, loaded.pad_token, loaded.unk_token) == \
        (None, '<|im_end|>', '<|endoftext|>', None)
    assert loaded.chat_template == tok.chat_template
    for text in TEXTS:
        assert loaded(text).input_ids == tok(text).input_ids
        assert loaded.decode(loaded(text).input_ids) == text
    batch = loaded(TEXTS).input_ids
    assert batch == tok(TEXTS).input_ids
    # Loading does not add the InternVL tokens twice.
    assert add_internvl_tokens(loaded) == 0


def test_internvl_tokens_added_once():
    plain = build_tiny_tokenizer(add_internvl_tokens=False)
    assert len(plain) == 515
    assert all(t not in plain.get_added_vocab() for t in INTERNVL_ADDED_TOKENS)
    assert add_internvl_tokens(plain) == 9
    assert add_internvl_tokens(plain) == 0
    assert len(plain) == 524
    assert plain.get_added_vocab() == build_tiny_tokenizer().get_added_vocab()


def test_deterministic_and_sizes():
    a, b = build_tiny_tokenizer(), build_tiny_tokenizer()
    assert a.backend_tokenizer.to_str() == b.backend_tokenizer.to_str()
    small = build_tiny_tokenizer(vocab_size=300)
    assert len(small) == 312 and small.convert_tokens_to_ids('<|endoftext|>') == 300
    assert small.decode(small(TEXTS[1]).input_ids) == TEXTS[1]
    with pytest.raises(ValueError, match='256'):
        build_tiny_tokenizer(vocab_size=100)
    with pytest.raises(ValueError, match='corpus'):
        build_tiny_tokenizer(vocab_size=100000)


def test_chat_template(tok):
    msgs = [{'role': 'system', 'content': 'S'}, {'role': 'user', 'content': 'hi'},
            {'role': 'assistant', 'content': 'yo'}]
    assert tok.apply_chat_template(msgs, tokenize=False) == \
        '<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nyo<|im_end|>\n'
    out = tok.apply_chat_template(msgs[1:2], tokenize=False, add_generation_prompt=True)
    assert out == ('<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.'
                   '<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n')
