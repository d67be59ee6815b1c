"""Every registered chat template (``internvl2_5``, InternVL 2.0's ``Hermes-2``, ``internlm2-chat`` and ``phi3-chat``,
``llama3`` and ``gemma``), each with a tokenizer of its own family (the tiny look-alikes of Qwen2.5's, Phi-3's, Llama
3's and Gemma's: their special tokens, bos, eos and own chat template):

* one definition: the training text is what the converted folder's ``conversation.py`` (InternVL's interface,
  ``chat()``'s prompt) writes, turn for turn;
* what is supervised is each answer and its stop word, nothing of the markers around them;
* a converted folder's chat template (vLLM, transformers' ``apply_chat_template``) gives the training ids;
* ``llama3``'s and ``gemma``'s training texts are Llama 3 Instruct's and Gemma's own formats (Gemma's with the system
  message opening the first user turn): such an LLM keeps the turns it was tuned on;
* a tokenizer of another family is refused, naming the templates that fit it.
"""

import copy
from types import SimpleNamespace

import pytest

from xtuner_plugins.data.template import IGNORE_INDEX, TEMPLATES, check_tokenizer_fits, get_template
from xtuner_plugins.data.tokenize import render_turns, tokenize_conversation
from xtuner_plugins.errors import Refused
from xtuner_plugins.models.export.files import save_tokenizer
from xtuner_plugins.remote_code.conversation import get_conv_template
from xtuner_plugins.tiny.tokenizer import CHAT_FAMILIES, build_tiny_tokenizer

#: each template's tokenizer family (tiny/tokenizer.py's CHAT_FAMILIES)
FAMILY = {'internvl2_5': 'chatml', 'Hermes-2': 'chatml', 'internlm2-chat': 'chatml', 'phi3-chat': 'phi3',
          'llama3': 'llama3', 'gemma': 'gemma'}
TURNS = [('What colour is the square?', 'The square is blue.'), ('And the circle?', 'Red, and small.')]


def conversation(system=None, turns=TURNS):
    out = [{'from': 'system', 'value': system}] if system is not None else []
    for question, answer in turns:
        out += [{'from': 'human', 'value': question}, {'from': 'gpt', 'value': answer}]
    return out


@pytest.fixture(scope='module')
def tokenizers():
    return {family: build_tiny_tokenizer(chat=family) for family in set(FAMILY.values())}


def test_every_template_is_tested_here():
    assert sorted(TEMPLATES) == sorted(FAMILY)


@pytest.mark.parametrize('name', sorted(FAMILY))
@pytest.mark.parametrize('system', [None, 'Be brief.', ''])
def test_training_text_is_the_folders_conversation(name, system):
    """``render_turns`` joined is ``get_conv_template(name).get_prompt()`` with the same turns; and the prompt of
    its last question (answer ``None``) is the training text up to that answer."""
    from xtuner_plugins.data.conversation import parse_conversation
    parsed = parse_conversation(conversation(system), 0, name)
    text = ''.join(t for _, t in render_turns(parsed, '<image>\n'))
    conv = get_conv_template(name)
    if system is not None:
        conv.system_message = system
    for question, answer in TURNS:
        conv.append_message(conv.roles[0], question)
        conv.append_message(conv.roles[1], answer)
    assert conv.get_prompt() == text
    conv.update_last_message(None)
    prompt = conv.get_prompt()
    assert text.startswith(prompt) and text[len(prompt):] == TURNS[-1][1] + conv.sep


def test_the_system_turn_of_an_empty_system_message():
    """InternVL's templates write it with nothing in it (InternVL's ``get_prompt``); ``llama3`` writes none, as Llama
    3's own template does when there is no system message; its default is none."""
    from xtuner_plugins.data.conversation import parse_conversation
    for name in ('internvl2_5', 'phi3-chat'):
        roles = [r for r, _ in render_turns(parse_conversation(conversation(''), 0, name), '')]
        assert roles[0] == 'system'
    for name in ('llama3', 'gemma'):
        template = get_template(name)
        assert template.default_system == ''
        for system in (None, ''):
            turns = render_turns(parse_conversation(conversation(system), 0, template), '')
            assert [r for r, _ in turns] == ['human', 'gpt', 'human', 'gpt']
            assert turns[0][1] == template.render_user(TURNS[0][0])


def test_gemma_opens_the_first_user_turn_with_the_system_message():
    """Gemma has no system turn: the message and a blank line start the first user turn, and only the first."""
    from xtuner_plugins.data.conversation import parse_conversation
    turns = render_turns(parse_conversation(conversation('Be brief.'), 1, 'gemma'), '<IMG>')
    assert turns == [('human', '<start_of_turn>user\nBe brief.\n\n<IMG>\n' + TURNS[0][0] + '<end_of_turn>\n'),
                     ('gpt', '<start_of_turn>model\n' + TURNS[0][1] + '<end_of_turn>\n'),
                     ('human', '<start_of_turn>user\n' + TURNS[1][0] + '<end_of_turn>\n'),
                     ('gpt', '<start_of_turn>model\n' + TURNS[1][1] + '<end_of_turn>\n')]


@pytest.mark.parametrize('name', sorted(FAMILY))
def test_only_answers_and_stop_words_are_supervised(name, tokenizers):
    tokenizer = tokenizers[FAMILY[name]]
    template = get_template(name)
    out = tokenize_conversation(conversation('Be brief.'), tokenizer, [], name)
    spans, current = [], []
    for i, label in zip(out['input_ids'], out['labels']):
        if label == IGNORE_INDEX:
            if current:
                spans.append(current)
            current = []
        else:
            assert label == i
            current.append(i)
    spans += [current] if current else []
    assert [tokenizer.decode(s) for s in spans] == [answer + template.stop_word for _, answer in TURNS]
    stop = tokenizer.convert_tokens_to_ids(template.stop_word)
    assert [s[-1] for s in spans] == [stop] * len(TURNS)
    bos = tokenizer.bos_token_id
    if bos is not None:   # Llama 3's and Phi-3's: once, at the very start
        assert [k for k, i in enumerate(out['input_ids']) if i == bos] == [0]


@pytest.mark.parametrize('name', sorted(FAMILY))
@pytest.mark.parametrize('system', [None, 'Be brief.'])
def test_the_converted_folders_chat_template_gives_the_training_ids(name, system, tokenizers, tmp_path):
    from transformers import AutoTokenizer
    tokenizer = tokenizers[FAMILY[name]]
    save_tokenizer(SimpleNamespace(tokenizer=copy.deepcopy(tokenizer), template=name), str(tmp_path))  # sets its
    # chat_template
    folder = AutoTokenizer.from_pretrained(str(tmp_path))
    sample = tokenize_conversation(conversation(system), tokenizer, [], name)
    messages = [{'role': 'system', 'content': system}] if system is not None else []
    for question, answer in TURNS:
        messages += [{'role': 'user', 'content': question}, {'role': 'assistant', 'content': answer}]
    assert list(folder.apply_chat_template(messages, tokenize=True)) == sample['input_ids']
    labels = sample['labels']
    start = max(i for i, x in enumerate(labels) if x != IGNORE_INDEX and labels[i - 1] == IGNORE_INDEX)  # last answer
    assert list(folder.apply_chat_template(messages[:-1], tokenize=True, add_generation_prompt=True)) == \
        sample['input_ids'][:start]


@pytest.mark.parametrize('name', ['llama3', 'gemma'])
@pytest.mark.parametrize('system', [None, 'Be brief.'])
def test_llama3_and_gemma_train_on_their_own_formats(name, system, tokenizers):
    """The training ids are those of Llama 3 Instruct's and Gemma 3's own chat templates (the look-alike tokenizers
    carry them)."""
    tokenizer = tokenizers[FAMILY[name]]
    assert tokenizer.chat_template == CHAT_FAMILIES[FAMILY[name]]['template']
    messages = [{'role': 'system', 'content': system}] if system is not None else []
    for question, answer in TURNS:
        messages += [{'role': 'user', 'content': question}, {'role': 'assistant', 'content': answer}]
    own = tokenizer.apply_chat_template(messages, tokenize=True)
    assert tokenize_conversation(conversation(system), tokenizer, [], name)['input_ids'] == list(own)


@pytest.mark.parametrize('family, fits', [('llama3', ['llama3']), ('phi3', ['phi3-chat']), ('gemma', ['gemma']),
                                          ('chatml', ['Hermes-2', 'internlm2-chat', 'internvl2_5'])])
def test_a_tokenizer_of_another_family_is_refused_naming_the_templates_that_fit(family, fits, tokenizers):
    tokenizer = tokenizers[family]
    for name in FAMILY:
        if name in fits:
            check_tokenizer_fits(tokenizer, name)
            continue
        with pytest.raises(Refused, match=rf"models/llm: the tokenizer encodes '.*' of template '{name}' as \d+ "
                                          rf"tokens, not 1: .*fit the template\(s\) {', '.join(fits)}: set "
                                          r"model.template to one of them"):
            check_tokenizer_fits(tokenizer, name, where='models/llm')


def test_check_dataset_names_its_own_option_for_the_template(tokenizers, tmp_path, capsys):
    """tools/check_dataset.py with a Llama 3 tokenizer at the default template: refused naming --template (and the
    data set's setting in training), not only model.template, which a data check has not."""
    import json

    from tools.check_dataset import main as check_main
    tokenizers['llama3'].save_pretrained(str(tmp_path / 'tok'))
    data = tmp_path / 'd.jsonl'
    data.write_text(json.dumps({'conversations': conversation()}) + '\n')
    assert check_main(['--data', str(data), '--tokenizer', str(tmp_path / 'tok')]) != 0
    err = capsys.readouterr().err
    assert "its markers fit the template(s) llama3: set the data set's template" in err and '--template' in err, err
    assert check_main(['--data', str(data), '--tokenizer', str(tmp_path / 'tok'), '--template', 'llama3']) == 0
