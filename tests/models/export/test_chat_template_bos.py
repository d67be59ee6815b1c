"""The bos of an LLM whose tokenizer adds one (InternLM2's, Llama's), through a converted folder's chat template
(``export/files.py``): training puts it once at the very start of a sample (``data/token_ids.py``'s ``adds_bos``);
vLLM's chat renders the template and tokenises it with ``add_special_tokens=False``, as transformers'
``tokenizer.apply_chat_template(..., tokenize=True)`` does, so the template itself must write it. A tokenizer
without a bos (Qwen2.5's) keeps the template it always had, byte for byte.

Unit tests on the tiny tokenizer (its ``bos_token`` variant adds a bos in its post-processor, Llama 3's way): the
ids of each standard path equal the training ids of the same one-turn sample.
"""

import hashlib
from types import SimpleNamespace

import pytest
from PIL import Image

from xtuner_plugins.data.template import IGNORE_INDEX, IMG_CONTEXT_TOKEN
from xtuner_plugins.data.token_ids import adds_bos
from xtuner_plugins.data.tokenize import tokenize_conversation
from xtuner_plugins.models.export.files import BOS, chat_template, save_tokenizer, template_system, with_system
from xtuner_plugins.models.export.gguf import chat_prompt
from xtuner_plugins.models.export.llava import LLAVA_IMAGE_TEXT
from xtuner_plugins.tiny.tokenizer import build_tiny_tokenizer

QUESTION, ANSWER = 'What colour is the square?', 'The square is blue.'
#: chat_template's output before the bos was known to it (what Qwen2.5 folders carry): default, LLaVA's, hf's
UNCHANGED = {
    (): '2549986e4fffc986329b1b41e1764e86c6a4d216725b48f98d32d93aabd44b7f',
    (LLAVA_IMAGE_TEXT, None): '8857d19083b6a38f93faadb88233db3ea9fd6d5b19d56bd06350acd54209c051',
    (IMG_CONTEXT_TOKEN + '\n',): '61e91ca76cd3ac02904e3690f6cd21ce61d96fe2ad21cc72bf3f94d7e55fcfde',
}


@pytest.fixture(scope='module', params=['bos', 'no_bos'])
def tokenizer(request):
    return build_tiny_tokenizer(bos_token='<|begin_of_text|>' if request.param == 'bos' else None)


def training(tokenizer, images=()):
    """The training ids of the one-turn sample, and where its answer starts (the prompt generation is given)."""
    question = '<image>\n' * len(images) + QUESTION
    out = tokenize_conversation([{'from': 'human', 'value': question}, {'from': 'gpt', 'value': ANSWER}],
                                tokenizer, list(images))
    first = next(i for i, label in enumerate(out['labels']) if label != IGNORE_INDEX)
    return out['input_ids'], first


def saved(tokenizer, tmp_path):
    """The tokenizer as a converted folder holds it (``save_tokenizer``, as the hf and official formats write it)."""
    from transformers import AutoTokenizer
    save_tokenizer(SimpleNamespace(tokenizer=tokenizer, template='internvl2_5'), str(tmp_path))
    return AutoTokenizer.from_pretrained(str(tmp_path))


@pytest.mark.parametrize('args', sorted(UNCHANGED, key=len))
def test_the_template_without_a_bos_is_unchanged_and_the_bos_only_prefixes_it(args):
    plain = chat_template('internvl2_5', None, *args)
    assert hashlib.sha256(plain.encode()).hexdigest() == UNCHANGED[args]
    assert chat_template('internvl2_5', None, *args, bos=True) == BOS + plain
    with_bos = chat_template('internvl2_5', 'Be brief.', *args, bos=True)
    assert template_system(with_bos) == 'Be brief.'
    assert with_system(with_bos, 'Terse.') == BOS + chat_template('internvl2_5', 'Terse.', *args)


def test_the_tokenizer_path_and_vllms_give_the_training_ids(tokenizer, tmp_path):
    """``tokenizer.apply_chat_template(tokenize=True)`` and vLLM's chat (the rendered text, no special tokens added):
    the training ids of the sample, and of its prompt up to the answer; one bos at the very start, or none."""
    folder = saved(tokenizer, tmp_path)
    ids, first = training(tokenizer)
    turn = [{'role': 'user', 'content': QUESTION}, {'role': 'assistant', 'content': ANSWER}]
    assert list(folder.apply_chat_template(turn, tokenize=True)) == ids
    prompt = folder.apply_chat_template(turn[:1], tokenize=False, add_generation_prompt=True)
    assert folder(prompt, add_special_tokens=False).input_ids == ids[:first]
    assert list(folder.apply_chat_template(turn[:1], tokenize=True, add_generation_prompt=True)) == ids[:first]
    bos = [i for i, x in enumerate(ids) if x == tokenizer.bos_token_id] if tokenizer.bos_token else []
    assert bos == ([0] if adds_bos(tokenizer) else [])
    assert folder.chat_template.startswith(BOS) == adds_bos(tokenizer)


def llava_processor(tokenizer, tmp_path):
    """A LLaVA processor as ``write_llava`` builds it (a CLIP of 14-px patches on 28-px images: 4 image tokens)."""
    from transformers import AutoTokenizer, CLIPImageProcessor, LlavaProcessor
    template = save_tokenizer(SimpleNamespace(tokenizer=tokenizer, template='internvl2_5'), str(tmp_path),
                              image_text=LLAVA_IMAGE_TEXT, video_text=None)
    return LlavaProcessor(image_processor=CLIPImageProcessor(size={'height': 28, 'width': 28}, do_center_crop=False),
                          tokenizer=AutoTokenizer.from_pretrained(str(tmp_path)), patch_size=14,
                          vision_feature_select_strategy='default', num_additional_image_tokens=1,
                          image_token=IMG_CONTEXT_TOKEN, chat_template=template)


def test_the_llava_processor_paths_give_the_training_ids(tokenizer, tmp_path):
    """transformers' ``processor.apply_chat_template(tokenize=True)`` (llava.py's and conversion.md's example) and
    this project's ``encode_prompt`` (tools/chat.py, the demo, eval): the training prompt, image tokens included;
    the processor's default (special tokens added) on the rendered text would start with two bos tokens."""
    from xtuner_plugins.models.prompt import encode_prompt
    processor = llava_processor(tokenizer, tmp_path)
    image = Image.new('RGB', (28, 28), (200, 30, 30))
    ids, first = training(tokenizer, images=[4])
    turn = [{'role': 'user', 'content': [{'type': 'image', 'image': image}, {'type': 'text', 'text': QUESTION}]}]
    got = processor.apply_chat_template(turn, add_generation_prompt=True, tokenize=True, return_dict=True)
    assert list(got['input_ids'][0]) == ids[:first]
    prompt = processor.apply_chat_template(turn, add_generation_prompt=True, tokenize=False)
    assert encode_prompt(processor, prompt, images=[image])['input_ids'][0] == ids[:first]
    both = encode_prompt(processor, [prompt, prompt], images=[image, image], padding=True)['input_ids']
    assert [list(x) for x in both] == [ids[:first]] * 2
    if adds_bos(tokenizer):
        assert processor(text=prompt, images=[image])['input_ids'][0][:2] == [tokenizer.bos_token_id] * 2


def test_a_folder_written_without_the_bos_in_its_template_still_gets_one(tmp_path):
    """A folder converted before the template knew the bos: ``encode_prompt`` lets the tokenizer add it, as before."""
    from xtuner_plugins.models.prompt import encode_prompt
    tokenizer = build_tiny_tokenizer(bos_token='<|begin_of_text|>')
    processor = llava_processor(tokenizer, tmp_path)
    processor.chat_template = chat_template('internvl2_5', image_text=LLAVA_IMAGE_TEXT, video_text=None)
    image = Image.new('RGB', (28, 28), (200, 30, 30))
    ids, first = training(tokenizer, images=[4])
    turn = [{'role': 'user', 'content': [{'type': 'image'}, {'type': 'text', 'text': QUESTION}]}]
    prompt = processor.apply_chat_template(turn, add_generation_prompt=True, tokenize=False)
    assert encode_prompt(processor, prompt, images=[image])['input_ids'][0] == ids[:first]


@pytest.mark.parametrize('system', [None, 'Answer in one word.'])
def test_the_gguf_template_leaves_the_bos_to_llama_cpp(system, tmp_path):
    """llama.cpp adds the GGUF's bos itself (``tokenizer.ggml.add_bos_token``): the GGUF's template leaves it out
    (a runtime that wrote its text and tokenised with ``add_special`` would start with two; test_gguf_bos.py checks
    llama-cpp-python's prompt)."""
    converted = chat_template('internvl2_5', bos=True)
    template, why = chat_prompt(str(tmp_path), {'template': 'internvl2_5', 'system_message': system},
                                {'chat_template': converted})
    assert template == chat_template('internvl2_5', system)
    assert 'the chat template without its bos_token (llama.cpp adds the bos itself)' in why
    assert chat_prompt(str(tmp_path), {'template': 'internvl2_5'}, {'chat_template': chat_template('internvl2_5')}) \
        == (None, '')


def test_the_llava_processor_of_a_tokenizer_returning_token_type_ids_gives_none(tmp_path):
    """Llama 3's and Gemma's look-alikes (a bare PreTrainedTokenizerFast, model_input_names left at its default)
    return token_type_ids, which conversion.md's LLaVA snippet (processor.apply_chat_template(..., return_dict=True)
    into model.generate) handed to generate: 'The following model_kwargs are not used by the model:
    ['token_type_ids']'. The converted folder's tokenizer names only what the model takes."""
    tokenizer = build_tiny_tokenizer(chat='llama3')
    assert 'token_type_ids' in tokenizer('hi')   # the tokenizer as trained
    processor = llava_processor(tokenizer, tmp_path)
    image = Image.new('RGB', (28, 28), (200, 30, 30))
    turn = [{'role': 'user', 'content': [{'type': 'image', 'image': image}, {'type': 'text', 'text': QUESTION}]}]
    got = processor.apply_chat_template(turn, add_generation_prompt=True, tokenize=True, return_dict=True)
    assert sorted(got) == ['attention_mask', 'input_ids', 'pixel_values']
