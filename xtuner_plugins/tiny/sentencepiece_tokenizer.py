"""A tiny slow SentencePiece tokenizer (Llama 2 / InternLM2 style: ``LlamaTokenizer``, bos added), built offline."""

import os
import tempfile

from xtuner_plugins.data.template import INTERNVL_ADDED_TOKENS

WORDS = ('hello world there how are you image picture describe the cat dog über café 你好 answer question yes no '
         'system user assistant a b c d').split()


def build_tiny_sentencepiece_tokenizer(legacy: bool = True, folder: str = None):
    """A ``LlamaTokenizer`` (slow, ``add_bos_token=True``) on a 400-piece BPE SentencePiece model trained on a
    generated corpus (byte fallback, identity normalisation, no whitespace squeezing, as Llama 2's), with
    ``<|im_start|>``, ``<|im_end|>`` and InternVL's tokens added as special tokens. Its files go into ``folder``
    (a new temporary folder if none is given)."""
    import sentencepiece as spm
    from transformers import LlamaTokenizer
    folder = folder or tempfile.mkdtemp(prefix='tiny_spm_')
    corpus = os.path.join(folder, 'corpus.txt')
    with open(corpus, 'w', encoding='utf-8') as f:
        for i in range(2000):
            f.write(' '.join(WORDS[(i * k) % len(WORDS)] for k in range(1, 9)) + '\n')
    prefix = os.path.join(folder, 'tiny')
    spm.SentencePieceTrainer.train(input=corpus, model_prefix=prefix, vocab_size=400, model_type='bpe',
                                   character_coverage=1.0, byte_fallback=True, normalization_rule_name='identity',
                                   remove_extra_whitespaces=False, minloglevel=2)
    tok = LlamaTokenizer(prefix + '.model', add_bos_token=True, legacy=legacy)
    tok.add_tokens(['<|im_start|>', '<|im_end|>', *INTERNVL_ADDED_TOKENS], special_tokens=True)
    return tok
