"""A model trained with another chat template than ChatML, through conversion and chat: a Llama LLM with Llama 3
Instruct's tokenizer (``model.template=llama3``: a bos added, no pad token, ``<|eot_id|>`` ends an answer), a Qwen2
LLM with Phi-3's markers (``phi3-chat``, as InternVL2-4B) and a Gemma 3 LLM with Gemma's tokenizer (``gemma``: the
system message opens the first user turn; sliding-window layers, scaled embeddings). LoRA checkpoints with every
trained tensor perturbed (as test_convert_to_official does); each converted folder (official: ``chat()`` of its own
``conversation.py``; hf: transformers' InternVL and the folder's chat template) answers two turns as the training
model does with the training pipeline's prompts, and stops at the template's stop word.
"""

import os

import pytest

from tests.helpers import tiny_workspace, write_image
from tests.tools.test_convert_to_official import LORA, convert, options, trained_checkpoint
from tests.tools.test_export_families import greedy_decode
from tools.chat import main as chat_main
from xtuner_plugins.data.image_io import load_image
from xtuner_plugins.data.template import IGNORE_INDEX
from xtuner_plugins.data.tiling import image_tiles
from xtuner_plugins.data.tokenize import tokenize_conversation
from xtuner_plugins.models.inference import ConvertedModel
from xtuner_plugins.tiny import write_tiny_llm
from xtuner_plugins.tiny.tokenizer import CHAT_FAMILIES

# template -> (LLM architecture, tokenizer family)
CASES = {'llama3': ('llama', 'llama3'), 'phi3-chat': ('qwen2', 'phi3'), 'gemma': ('gemma3', 'gemma')}
Q1, Q2 = 'Describe the image.', 'What colour is it?'


@pytest.fixture(scope='module', params=sorted(CASES))
def trained(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    arch, chat = CASES[request.param]
    tiny = tiny_workspace(root / 'tiny')
    tiny['llm'] = write_tiny_llm(str(root / 'llm'), arch=arch, chat=chat, hidden_size=64)
    opts = options(tiny, **{'model.llm': tiny['llm'], 'model.template': request.param})
    ckpt = str(root / 'iter_1.pth')
    model = trained_checkpoint(LORA, opts, ckpt, scale=0.3)
    folders = {fmt: convert(LORA, ckpt, root / fmt, opts, *(['--format', fmt] if fmt != 'official' else []))
               for fmt in ('official', 'hf')}
    photo = write_image(root / 'photo.png', size=(90, 50), seed=7)
    return dict(name=request.param, model=model, folders=folders, photo=photo)


def training_answers(model, image, steps=8):
    """The training model's greedy answers to ``Q1`` (with the image) and then ``Q2``, each prompt the training
    pipeline's tokens up to that answer."""
    tiles = image_tiles(image, model.image_mode, image_size=model.vision.image_size, max_num=4, use_thumbnail=True,
                        mean=model.vision.mean)
    answers = []
    for question in (Q1, Q2):
        turns = [('<image>\n' + Q1, None)] + ([(Q2, None)] if answers else [])
        convs = []
        for k, (q, _) in enumerate(turns):
            convs += [{'from': 'human', 'value': q}, {'from': 'gpt', 'value': answers[k] if k < len(answers)
                                                       else 'x'}]
        sample = tokenize_conversation(convs, model.tokenizer, [model.num_image_token * tiles.shape[0]],
                                       model.template)
        labels = sample['labels']
        start = max(i for i, x in enumerate(labels) if x != IGNORE_INDEX and labels[i - 1] == IGNORE_INDEX)
        answers.append(greedy_decode(model, sample['input_ids'][:start], tiles, steps=steps))
    return answers


@pytest.mark.parametrize('fmt', ['official', 'hf'])
def test_converted_folder_answers_two_turns_as_the_training_model(trained, fmt, capsys):
    image = load_image(trained['photo'])
    expected = training_answers(trained['model'], image)
    assert all(expected), 'the perturbed model should say something'
    converted = ConvertedModel(trained['folders'][fmt])
    generation = dict(max_new_tokens=8, do_sample=False)
    assert [converted.ask(Q1, [image], generation), converted.ask(Q2, [], generation)] == expected
    assert chat_main([trained['folders'][fmt], '--image', trained['photo'], '--prompt', Q1,
                      '--max-new-tokens', '8']) == 0
    assert capsys.readouterr().out.strip() == expected[0]


def test_the_folder_records_its_template_and_stops_at_its_stop_word(trained):
    import json
    from transformers import GenerationConfig
    from xtuner_plugins.data.template import get_template
    folder = trained['folders']['official']
    with open(os.path.join(folder, 'config.json')) as f:
        assert json.load(f)['template'] == trained['name']
    stop = trained['model'].tokenizer.convert_tokens_to_ids(get_template(trained['name']).stop_word)
    config = GenerationConfig.from_pretrained(folder)
    assert stop in config.eos_token_id and config.pad_token_id is not None


@pytest.mark.parametrize('fmt', ['official', 'hf'])
def test_a_batch_pads_with_the_stop_word_and_generation_never_guesses_a_pad(trained, fmt):
    """Llama 3 has no pad token: a batch of questions (eval --batch-size: the remote code's batch_chat, the
    processor's padding) failed with 'the tokenizer does not have a padding token', and chat() warned 'Setting
    pad_token_id to eos_token_id' at every turn. The folder's tokenizer pads with the template's stop word; a batch
    answers as one question at a time does; generation is given its pad."""
    import logging

    from transformers import AutoTokenizer
    from xtuner_plugins.data.template import get_template
    folder = trained['folders'][fmt]
    own_pad = CHAT_FAMILIES[CASES[trained['name']][1]]['pad']   # Phi-3's <|endoftext|>, Gemma's <pad>; Llama 3: none
    assert AutoTokenizer.from_pretrained(folder).pad_token == (own_pad or get_template(trained['name']).stop_word)
    records = []

    class Kept(logging.Handler):
        def emit(self, record):
            records.append(record)
    handler = Kept()
    logging.getLogger('transformers').addHandler(handler)   # transformers' loggers do not propagate past it
    try:
        image = load_image(trained['photo'])
        converted = ConvertedModel(folder)
        generation = dict(max_new_tokens=8, do_sample=False)
        single = []
        for question in (Q1, Q2):
            converted.reset()
            single.append(converted.ask(question, [image], generation))
        assert converted.ask_batch([Q1, Q2], [[image], [image]], generation) == single
    finally:
        logging.getLogger('transformers').removeHandler(handler)
    assert not [r.getMessage() for r in records if 'pad_token_id' in r.getMessage()]
