"""The GGUF worker's answer text (``xtuner_plugins/models/gguf_worker.py``, run by ``.venv-gguf``; its decoding is
plain Python and is tested here): the same token ids read as the official folder's tokenizer reads them."""

import random

import pytest

from xtuner_plugins.models.gguf_worker import AnswerText


@pytest.fixture(scope='module')
def fast_sentencepiece(tmp_path_factory):
    """The tiny SentencePiece tokenizer (byte fallback) as a converted folder loads it (``LlamaTokenizerFast``)."""
    from transformers import AutoTokenizer

    from xtuner_plugins.tiny.sentencepiece_tokenizer import build_tiny_sentencepiece_tokenizer
    folder = tmp_path_factory.mktemp('spm')
    build_tiny_sentencepiece_tokenizer(folder=str(folder)).save_pretrained(folder / 'tok')
    tokenizer = AutoTokenizer.from_pretrained(folder / 'tok')
    assert type(tokenizer).__name__ == 'LlamaTokenizerFast'
    return tokenizer


def worker_text(tokenizer, ids):
    """What the worker makes of ``ids``: each token's bytes as llama.cpp gives them (a piece's ``'▁'`` a space, a
    byte token its byte, a special token nothing) and whether llama.cpp marks it a byte token."""
    text = AnswerText()
    out = []
    for piece in tokenizer.convert_ids_to_tokens(ids):
        byte = len(piece) == 6 and piece.startswith('<0x') and piece.endswith('>')
        data = bytes([int(piece[3:5], 16)]) if byte else piece.replace('\u2581', ' ').encode('utf-8')
        out.append(text.add(b'' if piece in tokenizer.all_special_tokens else data, byte))
    return ''.join(out) + text.end()


def test_byte_tokens_in_a_row_read_as_transformers_reads_them(fast_sentencepiece):
    """A run of byte tokens that is not UTF-8 is one replacement character per token, its valid bytes too
    (tokenizers' ByteFallback): the worker replaced only the invalid bytes ('你好\\x1b�$9�{=' where the official
    folder read '你好�������'), and the next turn's history parted from the official folder's."""
    tok = fast_sentencepiece
    ids = tok.convert_tokens_to_ids
    cases = [['\u2581你好', '<0x1B>', '<0x80>', '<0x24>', '<0x39>', '<0xB7>', '<0x7B>', '<0x3D>'],
             ['<0xE4>', '<0xBD>', '<0xA0>'], ['<0xE4>', '<0xBD>', '\u2581a', '<0xE4>', '<0xBD>', '<0xA0>'],
             ['<0xE4>', '<0xBD>']]
    for tokens in cases:
        assert worker_text(tok, ids(tokens)).lstrip(' ') == tok.decode(ids(tokens), skip_special_tokens=True)
    rng = random.Random(0)
    byte_ids = ids([f'<0x{b:02X}>' for b in range(256)])
    for _ in range(300):
        seq = [rng.choice(byte_ids) if rng.random() < 0.6 else rng.randrange(len(tok)) for _ in range(12)]
        assert worker_text(tok, seq).lstrip(' ') == tok.decode(seq, skip_special_tokens=True).lstrip(' '), \
            tok.convert_ids_to_tokens(seq)


def test_other_tokens_are_decoded_as_they_come():
    """A byte-level BPE vocabulary has no byte tokens: its tokens' bytes are decoded as they stream, an invalid
    sequence replaced once (as transformers' ByteLevel decoder reads the whole answer)."""
    text = AnswerText()
    parts = [text.add(b, False) for b in (b'a\xe4', b'\xbd', b'\xa0b', b'\xff', b'c')]
    assert parts == ['a', '', '你b', '\ufffd', 'c'] and text.end() == ''
    text = AnswerText()
    assert text.add(b'\xe4\xbd', False) == '' and text.end() == '\ufffd'
