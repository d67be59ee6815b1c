"""tokenize_conversation against InternVL 2.5's procedure, and count_text_tokens against it."""

import copy
import re

import numpy as np
import pytest
from tokenizers import processors

from tests.data.test_template import EXPECTED_SYSTEM
from xtuner_plugins.data.errors import SampleError
from xtuner_plugins.data.template import (IGNORE_INDEX, IMG_CONTEXT_TOKEN, IMG_END_TOKEN, IMG_START_TOKEN,
                                          INTERNVL_ADDED_TOKENS, Template, add_internvl_tokens, image_token_string)
from xtuner_plugins.data.tokenize import count_text_tokens, tokenize_conversation
from xtuner_plugins.tiny.tokenizer import build_tiny_tokenizer


@pytest.fixture(scope='module')
def tok():
    return build_tiny_tokenizer()


@pytest.fixture(scope='module')
def bos_tok():
    """The tiny tokenizer made to behave like InternLM's: ``add_bos_token`` and a bos ``<s>`` on every call."""
    t = build_tiny_tokenizer()
    t.add_special_tokens({'bos_token': '<s>'})
    bos_id = t.convert_tokens_to_ids('<s>')
    t.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single='<s> $A', pair='<s> $A <s> $B', special_tokens=[('<s>', bos_id)])
    t.add_bos_token = True
    assert t('hi').input_ids[0] == bos_id
    return t


# ------------------------------------------------------------------------------------ reference

def reference_internvl2_5(conversations, tokenizer, num_image_tokens, system=None):
    """InternVL 2.5's string-level procedure (dataset prepend + ``preprocess_internvl2_5``), written
    independently: full ``<IMG_CONTEXT>`` strings, per-turn tokenisation of whole strings, InternVL's masking."""
    convs = copy.deepcopy(conversations)
    if convs[0]['from'] == 'system':
        system_prompt = convs[0]['value']
        convs = convs[1:]
    else:
        system_prompt = EXPECTED_SYSTEM if system is None else system
    if num_image_tokens and not any('<image>' in c['value'] for c in convs if c['from'] == 'human'):
        convs[0]['value'] = '<image>\n' * len(num_image_tokens) + convs[0]['value']
    k = 0
    for c in convs:
        if c['from'] == 'human':
            for _ in range(c['value'].count('<image>')):
                run = '<img>' + '<IMG_CONTEXT>' * num_image_tokens[k] + '</img>'
                c['value'] = c['value'].replace('<image>', run, 1)
                k += 1
    assert k == len(num_image_tokens)

    batches = [f'<|im_start|>system\n{system_prompt}<|im_end|>\n']
    roles = ['system']
    for c in convs:
        if c['from'] == 'human':
            batches.append(f'<|im_start|>user\n{c["value"]}<|im_end|>\n')
        else:
            batches.append(f'<|im_start|>assistant\n{c["value"]}<|im_end|>\n')
        roles.append(c['from'])
    add_bos = getattr(tokenizer, 'add_bos_token', False)
    if add_bos:
        batches[0] = tokenizer.bos_token + batches[0]
    ids = tokenizer(batches, return_tensors='np', padding=False, truncation=False).input_ids
    if add_bos:
        ids = [x[1:] for x in ids]
    ignore_len = len(tokenizer('<|im_start|>assistant\n').input_ids) - (1 if add_bos else 0)
    targets = []
    for role, x in zip(roles, ids):
        x = np.asarray(x)
        if role == 'gpt':
            t = x.copy()
            t[:ignore_len] = -100
            t[-1:] = -100
        else:
            t = np.full(x.shape, -100)
        targets.append(t)
    return dict(input_ids=np.concatenate(ids).tolist(), labels=np.concatenate(targets).tolist())


def H(v):
    return {'from': 'human', 'value': v}


def G(v):
    return {'from': 'gpt', 'value': v}


def S(v):
    return {'from': 'system', 'value': v}


CASES = {
    'single_image': ([H('<image>\nWhat shape is shown?'), G('A red circle.')], [256], None),
    'multi_turn': ([H('<image>\nHow many circles are there?'), G('Two.'),
                    H('What colour are they?'), G('One is red and one is blue.'),
                    H('Is there a square?'), G('No, there is no square.')], [256 * 3], None),
    'multi_image': ([H('Image-1: <image>\nImage-2: <image>\nImage-3: <image>\nCompare them.'),
                     G('The first has more shapes than the others.')], [256 * 5, 256, 256 * 13], None),
    'images_in_two_turns': ([H('<image>\nDescribe it.'), G('A star.'), H('And this one? <image>'),
                             G('A square.')], [512, 256], None),
    'data_system_turn': ([S('You answer briefly.'), H('<image>\nColour?'), G('Blue.')], [256], None),
    'system_argument': ([H('<image>\nColour?'), G('Green.')], [256], 'You are a test assistant.'),
    'data_system_wins': ([S('Data wins.'), H('<image>\nColour?'), G('Green.')], [256], 'Argument loses.'),
    'empty_data_system': ([S(''), H('Hi'), G('Hello.')], [], None),
    'text_only': ([H('What is two plus three?'), G('Five.'), H('And times four?'), G('Twenty.')], [], None),
    'prepend_single': ([H('What is in the picture?'), G('A cat.')], [1024], None),
    'prepend_multi': ([H('Which picture is brighter?'), G('The second.')], [256, 768], None),
    'chinese': ([H('<image>\n请描述这张图片。'), G('图片中有三个红色的圆形和一个蓝色的正方形。')], [256], None),
    'tricky_whitespace': ([H('  <image>  lead and trail  \n\n'), G('\n\n spaced answer \n'), H('x\r\ny'),
                           G(' ok')], [256], None),
    'braces_and_specials': ([H('<image>{system} {query} {answer} <ref>a</ref><box>[[1, 2]]</box>'),
                             G('<quad>x</quad> {answer}')], [256], None),
}


@pytest.mark.parametrize('name', sorted(CASES))
def test_matches_internvl_reference(tok, name):
    conversations, n, system = CASES[name]
    before = copy.deepcopy(conversations)
    got = tokenize_conversation(conversations, tok, n, system=system)
    ref = reference_internvl2_5(conversations, tok, n, system=system)
    assert got['input_ids'] == ref['input_ids']
    assert got['labels'] == ref['labels']
    assert conversations == before, 'the input must not be modified'
    assert all(isinstance(x, int) for x in got['input_ids'] + got['labels'])


@pytest.mark.parametrize('name', sorted(CASES))
def test_matches_internvl_reference_with_bos(bos_tok, name):
    conversations, n, system = CASES[name]
    got = tokenize_conversation(conversations, bos_tok, n, system=system)
    ref = reference_internvl2_5(conversations, bos_tok, n, system=system)
    assert got == ref


# ------------------------------------------------------------------------------------ hand checks

def _supervised_text(tok, out):
    return tok.decode([i for i, l in zip(out['input_ids'], out['labels']) if l != IGNORE_INDEX])


def test_full_text_single_image(tok):
    out = tokenize_conversation([H('<image>\nWhat shape is shown?'), G('A red circle.')], tok, [256])
    expected = ('<|im_start|>system\n' + EXPECTED_SYSTEM + '<|im_end|>\n'
                '<|im_start|>user\n<img>' + '<IMG_CONTEXT>' * 256 + '</img>\nWhat shape is shown?<|im_end|>\n'
                '<|im_start|>assistant\nA red circle.<|im_end|>\n')
    assert tok.decode(out['input_ids']) == expected
    assert _supervised_text(tok, out) == 'A red circle.<|im_end|>'
    assert len(out['input_ids']) == len(out['labels'])


def test_first_tokens_are_the_system_turn(tok):
    out = tokenize_conversation([H('Hi'), G('Hello.')], tok, [])
    head = '<|im_start|>system\n' + EXPECTED_SYSTEM + '<|im_end|>\n'
    n = len(tok(head).input_ids)
    assert tok.decode(out['input_ids'][:n]) == head
    assert out['input_ids'][0] == tok.convert_tokens_to_ids('<|im_start|>')
    assert out['labels'][:n] == [IGNORE_INDEX] * n


def test_supervised_tokens_multi_turn(tok):
    conversations, n, _ = CASES['multi_turn']
    out = tokenize_conversation(conversations, tok, n)
    assert _supervised_text(tok, out) == ('Two.<|im_end|>One is red and one is blue.<|im_end|>'
                                          'No, there is no square.<|im_end|>')
    # Each answer span is followed by exactly one unsupervised '\n' and preceded by '<|im_start|>assistant\n'.
    ids, labels = out['input_ids'], out['labels']
    im_end = tok.convert_tokens_to_ids('<|im_end|>')
    ends = [i for i, (x, l) in enumerate(zip(ids, labels)) if x == im_end and l != IGNORE_INDEX]
    assert len(ends) == 3
    for e in ends:
        assert labels[e + 1] == IGNORE_INDEX and tok.decode([ids[e + 1]]) == '\n'
        start = e
        while labels[start - 1] != IGNORE_INDEX:
            start -= 1
        assert tok.decode(ids[:start]).endswith('<|im_start|>assistant\n')
    # The user's <|im_end|> tokens are not supervised.
    assert sum(1 for x in ids if x == im_end) == 1 + 3 + 3


@pytest.mark.parametrize('n', [[256], [256 * 5, 256, 256 * 13], [512, 256]])
def test_image_runs(tok, n):
    h = ' '.join(['<image>'] * len(n))
    out = tokenize_conversation([H(h + ' compare'), G('ok')], tok, n)
    ids = out['input_ids']
    start, end, ctx = (tok.convert_tokens_to_ids(t) for t in (IMG_START_TOKEN, IMG_END_TOKEN, IMG_CONTEXT_TOKEN))
    assert ids.count(ctx) == sum(n)
    starts = [i for i, x in enumerate(ids) if x == start]
    assert len(starts) == len(n) == ids.count(end)
    for s, k in zip(starts, n):
        assert ids[s + 1:s + 1 + k] == [ctx] * k
        assert ids[s + 1 + k] == end
    assert all(out['labels'][i] == IGNORE_INDEX for i, x in enumerate(ids) if x in (start, end, ctx))


def test_image_prepended_when_absent(tok):
    out = tokenize_conversation([H('What is it?'), G('A cat.')], tok, [256, 512])
    text = tok.decode(out['input_ids'])
    assert ('<|im_start|>user\n' + image_token_string(256) + '\n' + image_token_string(512) + '\nWhat is it?'
            in text)


def test_system_overrides(tok):
    conv = [H('Hi'), G('Hello.')]
    text = tok.decode(tokenize_conversation(conv, tok, [], system='Be brief.')['input_ids'])
    assert text.startswith('<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi')
    text = tok.decode(tokenize_conversation([S('From data.')] + conv, tok, [], system='Be brief.')['input_ids'])
    assert text.startswith('<|im_start|>system\nFrom data.<|im_end|>\n<|im_start|>user\nHi')
    assert 'Be brief.' not in text and EXPECTED_SYSTEM not in text


def test_chinese(tok):
    out = tokenize_conversation(CASES['chinese'][0], tok, [256])
    assert _supervised_text(tok, out) == '图片中有三个红色的圆形和一个蓝色的正方形。<|im_end|>'
    assert '请描述这张图片。' in tok.decode(out['input_ids'])


def test_bos_once_at_start(bos_tok):
    out = tokenize_conversation(CASES['multi_turn'][0], bos_tok, [256])
    bos = bos_tok.bos_token_id
    assert out['input_ids'][0] == bos
    assert out['input_ids'].count(bos) == 1
    assert out['labels'][0] == IGNORE_INDEX
    assert _supervised_text(bos_tok, out) == ('Two.<|im_end|>One is red and one is blue.<|im_end|>'
                                              'No, there is no square.<|im_end|>')
    plain = tokenize_conversation(CASES['multi_turn'][0], build_tiny_tokenizer(), [256])
    assert out['input_ids'][1:] == plain['input_ids'] and out['labels'][1:] == plain['labels']


def test_tokenizer_claiming_bos_without_adding_it():
    """The bos is what the tokenizer adds (chat's prompt gets the same), not what its attribute claims."""
    t = build_tiny_tokenizer()
    t.add_special_tokens({'bos_token': '<s>'})
    t.add_bos_token = True  # but the post-processor adds nothing
    ids = tokenize_conversation([H('Hi'), G('Hello.')], t, [])['input_ids']
    start = t('<|im_start|>system').input_ids
    assert t.bos_token_id not in ids and ids[:len(start)] == start


def test_tokenizer_without_internvl_tokens():
    t = build_tiny_tokenizer(add_internvl_tokens=False)
    with pytest.raises(ValueError, match='add_internvl_tokens'):
        tokenize_conversation([H('<image>Hi'), G('Hello.')], t, [256])
    assert add_internvl_tokens(t) == len(INTERNVL_ADDED_TOKENS)
    assert add_internvl_tokens(t) == 0
    tokenize_conversation([H('<image>Hi'), G('Hello.')], t, [256])


def test_count_text_tokens(tok):
    for name, (conv, n, system) in CASES.items():
        full = len(tokenize_conversation(conv, tok, n, system=system)['input_ids'])
        assert count_text_tokens(conv, tok, system=system, num_images=len(n)) + sum(n) + 2 * len(n) == full, name
        if any('<image>' in t['value'] for t in conv) or not n:
            assert count_text_tokens(conv, tok, system=system) + sum(n) + 2 * len(n) == full, name
    # Implicit tags without num_images: only the prepended '\n' per image is missing.
    conv, n, _ = CASES['prepend_multi']
    full = len(tokenize_conversation(conv, tok, n)['input_ids'])
    assert count_text_tokens(conv, tok) + sum(n) + 2 * len(n) == full - len(n)
    with pytest.raises(SampleError, match=r'1 <image> tag\(s\) but the sample has 2'):
        count_text_tokens([H('<image>'), G('x')], tok, num_images=2)


# ------------------------------------------------------------------------------------ templates

def test_custom_template(tok):
    t = Template(name='plain', system='', user='Q: {query}\n', assistant='A: {answer}<|im_end|>\n',
                 default_system='', stop_word='<|im_end|>')
    out = tokenize_conversation([H('<image>hi'), G('yo')], tok, [4], template=t)
    assert tok.decode(out['input_ids']) == 'Q: ' + image_token_string(4) + 'hi\nA: yo<|im_end|>\n'
    assert _supervised_text(tok, out) == 'yo<|im_end|>'
    # a prefix ending in a space merges with the answer's first word under BPE ('A: the' -> 'A', ':', ' the'):
    # the answer is tokenised apart from the prefix, as after a generation prompt, and supervised whole
    assert tok.tokenize('A: the circle') == ['A', ':', '\u0120the', '\u0120circle']
    out = tokenize_conversation([H('hi'), G('the circle')], tok, [], template=t)
    assert _supervised_text(tok, out) == 'the circle<|im_end|>'
    tail = tok('A: ').input_ids + tok('the circle<|im_end|>\n').input_ids
    assert out['input_ids'][-len(tail):] == tail
    assert count_text_tokens([H('hi'), G('the circle')], tok, template=t) == len(out['input_ids'])
    with pytest.raises(ValueError, match='stop word'):
        Template(name='bad', system='', user='{query}', assistant='{answer}\n', default_system='',
                 stop_word='<|im_end|>')


# ------------------------------------------------------------------------------------ errors

ERRORS = [
    ([], [], 'empty_conversation', 'no turns'),
    ([H('Hi'), G('   ')], [], 'empty_conversation', r'turn 1 \(gpt\) has an empty value'),
    ([H(''), G('Hello')], [], 'empty_conversation', r'turn 0 \(human\) has an empty value'),
    ([S('sys'), H('Hi'), G('')], [], 'empty_conversation', r'turn 2 \(gpt\)'),
    ([H('Hi'), H('Again'), G('Hello')], [], 'bad_conversation', "turn 1: found role 'human', expected 'gpt'"),
    ([G('Hello'), H('Hi')], [], 'bad_conversation', "turn 0: found role 'gpt', expected 'human'"),
    ([H('Hi'), G('Hello'), S('late'), G('x')], [], 'bad_conversation',
     "turn 2: found role 'system', expected 'human'"),
    ([S('a'), S('b'), H('Hi'), G('x')], [], 'bad_conversation', "turn 1: found role 'system', expected 'human'"),
    ([H('Hi'), {'from': 'bot', 'value': 'x'}], [], 'bad_conversation', "turn 1 has unknown role 'bot'"),
    ([H('Hi')], [], 'bad_conversation', r'no gpt turn \(turn 0 is human\)'),
    ([S('only')], [], 'bad_conversation', 'no gpt turn'),
    ([H('Hi'), G('Hello'), H('Bye')], [], 'bad_conversation', r'ends with a human turn \(turn 2\)'),
    ([H('Hi'), G(3)], [], 'bad_conversation', r'turn 1 \(gpt\) has a value of type int'),
    ([H('Hi'), {'from': 'gpt'}], [], 'bad_conversation', 'turn 1 must be a dict'),
    ('not a list', [], 'bad_conversation', 'must be a list'),
    ([H('<image><image>Hi'), G('x')], [256], 'image_tag_mismatch',
     r'contain 2 <image> tag\(s\) but the sample has 1 image'),
    ([H('<image>Hi'), G('x')], [], 'image_tag_mismatch', r'contain 1 <image> tag\(s\) but the sample has 0 image'),
    ([H('<image>Hi'), G('x'), H('more'), G('y')], [256, 256], 'image_tag_mismatch',
     r'contain 1 <image> tag\(s\) but the sample has 2 image'),
    ([H('Hi'), G('see <image>')], [256], 'image_tag_mismatch', r'turn 1 \(gpt\) contains 1 <image>'),
    ([S('sys <image>'), H('Hi'), G('x')], [256], 'image_tag_mismatch', 'system message contains 1 <image>'),
    ([H('<image>Hi <IMG_CONTEXT>'), G('x')], [256], 'control_text',
     r"turn 0 \(human\) contains the control marker '<IMG_CONTEXT>' at character 10"),
    ([H('Hi'), G('</img>')], [], 'control_text', r"turn 1 \(gpt\) contains the control marker '</img>'"),
]


@pytest.mark.parametrize('conv,n,reason,match', ERRORS)
def test_errors(tok, conv, n, reason, match):
    with pytest.raises(SampleError, match=match) as info:
        tokenize_conversation(conv, tok, n)
    assert info.value.reason == reason


def test_bad_arguments(tok):
    with pytest.raises(ValueError, match='positive'):
        tokenize_conversation([H('<image>Hi'), G('x')], tok, [0])
    with pytest.raises(ValueError, match='unknown template'):
        tokenize_conversation([H('Hi'), G('x')], tok, [], template='nope')


# ------------------------------------------------------------------------------------ truncation

TRUNC_CONV = [H('<image>\nFirst?'), G('Answer one.'), H('Second <image> now?'), G('Answer two is longer.')]
TRUNC_N = [256, 512]


def _last_img_end(tok, ids):
    end = tok.convert_tokens_to_ids(IMG_END_TOKEN)
    return max(i for i, x in enumerate(ids) if x == end)


def test_truncate_after_last_image(tok):
    full = tokenize_conversation(TRUNC_CONV, tok, TRUNC_N)
    last = _last_img_end(tok, full['input_ids'])
    for max_length in (last + 1, last + 5, len(full['input_ids']) - 1):
        out = tokenize_conversation(TRUNC_CONV, tok, TRUNC_N, max_length=max_length)
        assert out['input_ids'] == full['input_ids'][:max_length]
        assert out['labels'] == full['labels'][:max_length]
        assert out['input_ids'].count(tok.convert_tokens_to_ids(IMG_CONTEXT_TOKEN)) == sum(TRUNC_N)
        assert _supervised_text(tok, out).startswith('Answer one.<|im_end|>')


def test_truncate_exact_fit(tok):
    full = tokenize_conversation(TRUNC_CONV, tok, TRUNC_N)
    n = len(full['input_ids'])
    assert tokenize_conversation(TRUNC_CONV, tok, TRUNC_N, max_length=n) == full
    assert tokenize_conversation(TRUNC_CONV, tok, TRUNC_N, max_length=n + 100) == full
    out = tokenize_conversation(TRUNC_CONV, tok, TRUNC_N, max_length=n - 1)
    assert len(out['input_ids']) == n - 1  # only the final, unsupervised '\n' goes
    assert _supervised_text(tok, out) == 'Answer one.<|im_end|>Answer two is longer.<|im_end|>'


def test_truncate_images_do_not_fit(tok):
    full = tokenize_conversation(TRUNC_CONV, tok, TRUNC_N)
    last = _last_img_end(tok, full['input_ids'])
    with pytest.raises(SampleError, match=f'needs {last + 1} tokens.*max_length is {last}') as info:
        tokenize_conversation(TRUNC_CONV, tok, TRUNC_N, max_length=last)
    assert info.value.reason == 'too_long'
    with pytest.raises(SampleError, match='max_length is 100'):
        tokenize_conversation(TRUNC_CONV, tok, TRUNC_N, max_length=100)


def test_truncate_removes_all_answers(tok):
    conv = [H('<image>\nA question that is followed by the answer.'), G('The answer.')]
    full = tokenize_conversation(conv, tok, [256])
    first = next(i for i, l in enumerate(full['labels']) if l != IGNORE_INDEX)
    assert first > _last_img_end(tok, full['input_ids']) + 1
    with pytest.raises(SampleError, match=f'no supervised token left in {first} tokens') as info:
        tokenize_conversation(conv, tok, [256], max_length=first)
    assert info.value.reason == 'no_supervised_tokens'
    out = tokenize_conversation(conv, tok, [256], max_length=first + 1)
    assert sum(l != IGNORE_INDEX for l in out['labels']) == 1


def test_truncate_text_only(tok):
    conv = [H('Count to three.'), G('One, two, three.')]
    full = tokenize_conversation(conv, tok, [])
    out = tokenize_conversation(conv, tok, [], max_length=len(full['input_ids']) - 3)
    assert out['input_ids'] == full['input_ids'][:-3] and out['labels'] == full['labels'][:-3]


# ------------------------------------------------------------------------------------ control text

@pytest.mark.parametrize('tokenizer', ['tok', 'bos_tok'])
def test_control_markers_in_text_never_become_control_tokens(tokenizer, request):
    """Data allowed to hold control text (the data set's allow_control_text) is tokenised as plain text: every
    control id appears only where the template and the images put it, in every role and the system message."""
    from xtuner_plugins.data.conversation import parse_conversation
    from xtuner_plugins.data.template import control_markers
    tok = request.getfixturevalue(tokenizer)
    markers = control_markers(tok, 'internvl2_5')
    assert {'<|im_start|>', '<|im_end|>', '<|endoftext|>', '<img>', '</img>', '<IMG_CONTEXT>'} <= set(markers)
    assert '<ref>' not in markers and '<box>' not in markers  # grounding markup is data
    controls = set(tok.convert_tokens_to_ids(list(markers)))
    text = ' and '.join(markers)
    turns = [S(f'sys {text}'), H(f'<image>\nq {text}'), G(f'a {text}'), H(f'again{text}'), G(f'{text}end')]
    clean = [S('sys'), H('<image>\nq'), G('a'), H('again'), G('end')]
    out = tokenize_conversation(parse_conversation(turns, 1, markers=()), tok, [7])
    ref = tokenize_conversation(parse_conversation(clean, 1), tok, [7])
    for i in controls:
        assert out['input_ids'].count(i) == ref['input_ids'].count(i), tok.convert_ids_to_tokens(i)
    supervised = [i for i, label in zip(out['input_ids'], out['labels']) if label != IGNORE_INDEX]
    assert tok.decode(supervised) == f'a {text}<|im_end|>{text}end<|im_end|>'
    assert count_text_tokens(parse_conversation(turns, 1, markers=()), tok) + 7 + 2 == len(out['input_ids'])
    assert tok('<|im_end|>', add_special_tokens=False).input_ids == [tok.convert_tokens_to_ids('<|im_end|>')]
    # chat and eval: only the image tokens are refused; a typed '<|im_start|>' stays text
    ids = tokenize_conversation([H('x<|im_start|>'), G('y')], tok, [])['input_ids']
    assert ids.count(tok.convert_tokens_to_ids('<|im_start|>')) == 3
    with pytest.raises(SampleError, match=r"turn 0 \(human\) contains the control marker '<\|im_start\|>'") as info:
        parse_conversation([H('x<|im_start|>'), G('y')], 0, markers=markers)  # the data set's check
    assert info.value.reason == 'control_text'


# ------------------------------------------------------------------------------------ speed, same ids

def test_kept_turn_ids_are_the_tokenizers_and_dropped_when_tokens_are_added():
    """Repeated turns are tokenised once (an LRU on the tokenizer) and straight through the fast backend: the ids
    are always those of ``tokenizer(texts)``, also right after a ``split_special_tokens`` call left the backend
    splitting, and a token added to the tokenizer is seen at once."""
    from xtuner_plugins.data import token_ids
    t = build_tiny_tokenizer()
    texts = ['<|im_start|>user\nhello there<|im_end|>\n', 'x' * 600, '<|im_start|>assistant\nred<|im_end|>\n']
    want = [t(x, add_special_tokens=False).input_ids for x in texts]
    assert [token_ids._text_ids(t, x) for x in texts] == want
    assert [token_ids._text_ids(t, x) for x in texts] == want  # kept (the long one not)
    kept = t._xtuner_plugins_turn_ids[1]
    assert (texts[0], False) in kept and (texts[1], False) not in kept
    token_ids._literal_ids(t, '<|im_end|>', ())  # leaves the backend splitting special tokens
    assert t.backend_tokenizer.encode_special_tokens
    assert token_ids._ids(t, ['<|im_end|>'], False) == [[t.convert_tokens_to_ids('<|im_end|>')]]
    t.add_tokens(['hello there'])
    assert token_ids._text_ids(t, texts[0]) == t(texts[0], add_special_tokens=False).input_ids != want[0]


def test_control_markers_are_kept_without_counting_the_vocabulary(monkeypatch):
    """``len`` of a fast tokenizer builds its vocabulary (~30-60 us): the markers' cache is keyed on the added
    tokens instead, and still sees a special token added."""
    from xtuner_plugins.data.template import control_markers
    t = build_tiny_tokenizer()
    first = control_markers(t, 'internvl2_5')
    monkeypatch.setattr(type(t), '__len__', lambda self: pytest.fail('len(tokenizer) per call'))
    assert control_markers(t, 'internvl2_5') is first
    t.add_special_tokens({'additional_special_tokens': ['<|new|>']})
    assert '<|new|>' in control_markers(t, 'internvl2_5')


def test_a_huge_turn_is_clipped_before_tokenising_and_keeps_the_same_tokens(tok, monkeypatch):
    """A 10 MB answer was tokenised whole (30 s and 6 GB) at every draw of its sample, to keep max_length tokens:
    with ``clip`` a turn is cut clip_chars after its last image first, and the tokens kept are the same, for text
    of words, space runs, digits, accents written as combining marks (NFC) and CJK; images before the cut stay."""
    from xtuner_plugins.data import tokenize
    rng = np.random.default_rng(0)
    pieces = ['word', ' ', '   ', 'e\u0301', '\u4e2d\u6587', '12345', '\n', 'Zebra', ',', 'a\u0308\u0301'] + [
        ' colour', ' square', ' triangle', ' question', ' picture', ' circles'] * 3   # the vocabulary's longest
    text = ''.join(rng.choice(pieces, size=30_000))
    longest, seen = [], tokenize._tokenize_turns

    def watched(tokenizer, texts):
        longest.append(max(map(len, texts)))
        return seen(tokenizer, texts)
    monkeypatch.setattr(tokenize, '_tokenize_turns', watched)
    for conv in ([{'from': 'human', 'value': '<image>\n' + text[:50]}, {'from': 'gpt', 'value': text}],
                 [{'from': 'human', 'value': '<image>' + text[:40] + '<image>'}, {'from': 'gpt', 'value': text},
                  {'from': 'human', 'value': text}, {'from': 'gpt', 'value': 'ok'}]):
        images = [4] * sum(t['value'].count('<image>') for t in conv)
        for max_length in (200, 600):
            whole = tokenize_conversation(conv, tok, images, max_length=max_length)
            longest.clear()
            clipped = tokenize_conversation(conv, tok, images, max_length=max_length, clip=max_length)
            assert clipped == whole
            assert max(longest) < tokenize.clip_chars(tok, max_length) + 4000 < len(text) // 2
            assert count_text_tokens(conv, tok, num_images=len(images), clip=max_length) >= max_length


def test_too_long_says_the_full_count_is_a_lower_bound_when_a_turn_was_clipped(tok):
    """The images alone overflow max_length: the refusal gives the sample's full length, exact when nothing was
    clipped and 'at least' that when a turn was clipped before it was tokenised (its tokens past the cut uncounted)."""
    from xtuner_plugins.data.errors import SampleError
    short = [{'from': 'human', 'value': '<image>\nWhat is it?'}, {'from': 'gpt', 'value': 'A square.'}]
    huge = [short[0], {'from': 'gpt', 'value': 'The square is blue. ' * 5000}]
    with pytest.raises(SampleError, match=r'the full sample has \d+ tokens'):
        tokenize_conversation(short, tok, [64], max_length=40, clip=40)
    with pytest.raises(SampleError, match=r'the full sample has at least \d+ tokens') as clipped:
        tokenize_conversation(huge, tok, [64], max_length=40, clip=40)
    with pytest.raises(SampleError, match=r'the full sample has \d+ tokens') as whole:
        tokenize_conversation(huge, tok, [64], max_length=40)
    counted = [int(re.search(r'has (?:at least )?(\d+) tokens', str(e.value)).group(1)) for e in (clipped, whole)]
    assert counted[0] < counted[1]


def test_a_huge_turn_holding_control_markers_is_clipped_too_and_keeps_the_same_tokens(tok, monkeypatch):
    """Data that holds control markers as text (``allow_control_text``: each marker tokenised as plain text, in
    pieces) was tokenised whole however long a turn was; it is clipped as other data is, with the same tokens
    kept, markers before the cut and after it."""
    from xtuner_plugins.data import tokenize
    rng = np.random.default_rng(1)
    pieces = ['word', ' ', 'Zebra', ',', ' colour', ' square', '<|im_end|>', '<|im_start|>', '\n', 'e\u0301']
    text = ''.join(rng.choice(pieces, size=30_000))
    seen = []
    original = tokenize._text_ids

    def watched(tokenizer, piece):
        seen.append(len(piece))
        return original(tokenizer, piece)
    monkeypatch.setattr(tokenize, '_text_ids', watched)
    conv = [{'from': 'human', 'value': '<image>\n' + text[:60]}, {'from': 'gpt', 'value': text}]
    for max_length in (200, 600):
        whole = tokenize_conversation(conv, tok, [4], max_length=max_length)
        seen.clear()
        clipped = tokenize_conversation(conv, tok, [4], max_length=max_length, clip=max_length)
        assert clipped == whole
        assert sum(seen) < tokenize.clip_chars(tok, max_length) + 5000 < len(text) // 2, (sum(seen), len(text))
