"""This project's own prompt building for ``llava``/``hf`` folders (``ConvertedModel.ask`` and ``ask_batch``: tools/
chat.py, the web demo, eval; ``prompt.py``'s ``prompt_inputs``: likelihood scoring, the serving test) on a folder
whose chat template writes the bos (an LLM whose tokenizer adds one): the rendered prompt goes through
``encode_prompt``, which adds no second bos; multi-turn prompts keep the one bos at the very start, as training."""

import pytest
import torch
from PIL import Image

from tests.models.export.test_chat_template_bos import ANSWER, QUESTION, llava_processor, training
from xtuner_plugins.data.template import IGNORE_INDEX
from xtuner_plugins.data.tokenize import tokenize_conversation
from xtuner_plugins.models.inference import ConvertedModel
from xtuner_plugins.models.prompt import prompt_inputs
from xtuner_plugins.tiny.tokenizer import build_tiny_tokenizer

IMAGE = Image.new('RGB', (28, 28), (200, 30, 30))


class Generator:
    """A model whose ``generate`` records its prompts and answers ``ANSWER``."""

    def __init__(self, tokenizer):
        self.answer = tokenizer(ANSWER, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
        self.prompts = []

    def generate(self, input_ids, **kwargs):
        self.prompts.extend(row.tolist() for row in input_ids)
        return torch.cat([input_ids, torch.tensor([self.answer] * len(input_ids))], dim=1)


@pytest.fixture(params=['bos', 'no_bos'])
def model(request, tmp_path):
    tokenizer = build_tiny_tokenizer(bos_token='<|begin_of_text|>' if request.param == 'bos' else None)
    processor = llava_processor(tokenizer, tmp_path)
    model = ConvertedModel.__new__(ConvertedModel)  # the llava folder's state, without weights to load
    model.__dict__.update(folder=str(tmp_path), format='llava', processor=processor, tokenizer=processor.tokenizer,
                          device='cpu', dtype=torch.float32, context=(8192, 'config.json'), config={},
                          model=Generator(processor.tokenizer))
    model.reset()
    return model


def second_prompt(tokenizer):
    """The training ids of a two-turn sample up to its second answer."""
    conv = [{'from': 'human', 'value': '<image>\n' + QUESTION}, {'from': 'gpt', 'value': ANSWER},
            {'from': 'human', 'value': 'And the circle?'}, {'from': 'gpt', 'value': 'Red.'}]
    out = tokenize_conversation(conv, tokenizer, [4])
    labels = out['labels']
    starts = [i for i in range(1, len(labels)) if labels[i] != IGNORE_INDEX and labels[i - 1] == IGNORE_INDEX]
    return out['input_ids'][:starts[1]]


def test_ask_and_prompt_inputs_build_the_training_prompt(model):
    ids, first = training(model.tokenizer, images=[4])
    assert prompt_inputs(model, QUESTION, [IMAGE])['input_ids'][0].tolist() == ids[:first]
    assert model.ask(QUESTION, [IMAGE], dict(max_new_tokens=8)) == ANSWER
    assert model.ask('And the circle?', [], dict(max_new_tokens=8)) == ANSWER
    assert model.model.prompts == [ids[:first], second_prompt(model.tokenizer)]


def test_ask_batch_builds_the_training_prompts(model):
    ids, first = training(model.tokenizer, images=[4])
    assert model.ask_batch([QUESTION, QUESTION], [[IMAGE], [IMAGE]], dict(max_new_tokens=8)) == [ANSWER, ANSWER]
    assert model.model.prompts == [ids[:first]] * 2



def test_token_type_ids_are_not_handed_on():
    """A tokenizer that returns token_type_ids (model_input_names left at its default, as Falcon-style folders
    ship) made an hf folder's generate refuse them: 'The following model_kwargs are not used by the model'."""
    from transformers import BatchFeature

    from xtuner_plugins.models.prompt import encode_prompt

    def processor(text, **kwargs):
        return BatchFeature({'input_ids': [[1, 2]], 'attention_mask': [[1, 1]], 'token_type_ids': [[0, 0]]})
    assert sorted(encode_prompt(processor, 'hi')) == ['attention_mask', 'input_ids']
