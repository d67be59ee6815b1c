"""An LLM whose embedding has fewer rows than its tokenizer has tokens (before InternVL's nine are added): the rows it
lacks get the mean of its rows, as InternVL's new tokens do, the same in every process that builds the model.
``resize_token_embeddings`` drew them at random, differently each build, and a frozen LLM's rows are in no
checkpoint: the converted model's logits were 0.85 off the trained model's at those vocabulary entries."""

import torch
import transformers

from tests.models.conftest import build
from xtuner_plugins.tiny.tokenizer import build_tiny_tokenizer


def short_llm(folder, missing=2):
    tokenizer = build_tiny_tokenizer(add_internvl_tokens=False)
    config = transformers.Qwen2Config(vocab_size=len(tokenizer) - missing, hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    transformers.Qwen2ForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder), len(tokenizer) - missing


def test_rows_the_llm_lacks_are_the_mean_the_same_every_build(tiny, tmp_path):
    folder, rows = short_llm(tmp_path / 'llm')
    embeddings = []
    for seed in (1, 2):
        torch.manual_seed(seed)  # as another process would be: the build draws other random numbers
        model = build(dict(tiny, llm=folder))
        embeddings.append(model.language_model.get_input_embeddings().weight.detach().clone())
    a, b = embeddings
    assert a.shape[0] == rows + 2 + 9  # the tokenizer's own two tokens the model lacked, then InternVL's nine
    assert torch.equal(a, b)
    assert torch.allclose(a[rows:], a[:rows].mean(0).expand(a.shape[0] - rows, -1))
