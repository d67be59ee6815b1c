"""A slow SentencePiece tokenizer that adds a bos (Llama 2's ``LlamaTokenizer``, InternLM2's, Phi-3's): training's
turn-by-turn ids equal those of the whole rendered conversation, as chat tokenises its prompt (dummy prefix and
legacy handling of text after special tokens included), for each template whose turns such LLMs use (InternVL 2.0's
``phi3-chat`` and ``internlm2-chat`` put the next turn's marker right after the stop word, with no newline)."""

import pytest

from xtuner_plugins.data.template import get_template, template_markers
from xtuner_plugins.data.tokenize import tokenize_conversation
from xtuner_plugins.tiny.sentencepiece_tokenizer import build_tiny_sentencepiece_tokenizer

CONVERSATIONS = [
    [('<image>\nHi there', ' yes ')],
    [('<image>\nHi', ' yes '), ('how are you', 'café 你好'), (' über\n', '\nno')],
    [('<image>\n leading and trailing ', 'b'), ('\n\nnewlines\n', 'd ')],
]


@pytest.mark.parametrize('template', ['internvl2_5', 'internlm2-chat', 'phi3-chat'])
@pytest.mark.parametrize('legacy', [True, False])
def test_training_ids_equal_the_whole_prompts_ids(legacy, template, tmp_path):
    tok = build_tiny_sentencepiece_tokenizer(legacy=legacy, folder=str(tmp_path))
    tok.add_tokens(list(template_markers(template)), special_tokens=True)   # Phi-3's <|user|>, <|end|>, ...
    template = get_template(template)
    for qs in CONVERSATIONS:
        conv = [m for q, a in qs for m in ({'from': 'human', 'value': q}, {'from': 'gpt', 'value': a})]
        ids = list(tokenize_conversation(conv, tok, [1], template)['input_ids'])
        n = ids.count(tok.convert_tokens_to_ids('<IMG_CONTEXT>'))
        text = template.render_system(template.default_system)
        text += ''.join(template.render_user(q) + template.render_assistant(a) for q, a in qs)
        whole = tok(text.replace('<image>', '<img>' + '<IMG_CONTEXT>' * n + '</img>')).input_ids
        assert ids == whole
        assert [i for i, x in enumerate(ids) if x == tok.bos_token_id] == [0]


@pytest.mark.parametrize('template', ['internvl2_5', 'internlm2-chat', 'phi3-chat', 'llama3'])
@pytest.mark.parametrize('legacy', [True, False])
def test_each_answer_and_its_stop_word_are_trained_and_nothing_else(legacy, template, tmp_path):
    """With ``legacy=False``, '\\n' alone is two tokens ('▁', '<0x0A>') and one after a special token: the tail of
    InternVL 2.5's '<|im_end|>\\n', counted alone, masked the stop word too, so no answer taught the model to stop."""
    from xtuner_plugins.data.template import IGNORE_INDEX
    tok = build_tiny_sentencepiece_tokenizer(legacy=legacy, folder=str(tmp_path))
    tok.add_tokens(list(template_markers(template)), special_tokens=True)
    template = get_template(template)
    stop = tok.convert_tokens_to_ids(template.stop_word)
    for qs in CONVERSATIONS:
        conv = [m for q, a in qs for m in ({'from': 'human', 'value': q}, {'from': 'gpt', 'value': a})]
        out = tokenize_conversation(conv, tok, [1], template)
        spans, span = [], []
        for i, label in zip(out['input_ids'], out['labels']):
            if label == IGNORE_INDEX and span:
                spans.append(span)
                span = []
            elif label != IGNORE_INDEX:
                span.append(i)
        spans += [span] if span else []
        assert [s[-1] for s in spans] == [stop] * len(qs), [tok.convert_ids_to_tokens(s) for s in spans]
        assert [tok.decode(s[:-1]).strip() for s in spans] == [a.strip() for _, a in qs]


@pytest.mark.parametrize('legacy', [True, False])
def test_control_text_allowed_in_data_reads_back_as_written(legacy, tmp_path):
    """Data allowed to hold control markers as text (``allow_control_text``) is tokenised in pieces; each piece
    tokenised alone got a SentencePiece word start, so 'a<|im_end|>b' trained as 'a <|im_end|> b' and
    'hello <|im_end|> world' as 'hello  <|im_end|>  world'. A piece now goes on from the one before it."""
    from xtuner_plugins.data.conversation import parse_conversation
    from xtuner_plugins.data.template import IGNORE_INDEX
    tok = build_tiny_sentencepiece_tokenizer(legacy=legacy, folder=str(tmp_path))
    answers = ['hello <|im_end|> world', 'a<|im_end|>b', 'x <|im_start|>y\n<|im_end|>  z ', '<|im_end|>']
    for answer in answers:
        conv = parse_conversation([{'from': 'human', 'value': f'say {answer}'}, {'from': 'gpt', 'value': answer}],
                                  0, markers=())
        out = tokenize_conversation(conv, tok, [])
        supervised = [i for i, label in zip(out['input_ids'], out['labels']) if label != IGNORE_INDEX]
        assert supervised[-1] == tok.convert_tokens_to_ids('<|im_end|>') and \
            supervised.count(supervised[-1]) == 1, tok.convert_ids_to_tokens(supervised)
        assert tok.decode(supervised[:-1]) == answer, tok.convert_ids_to_tokens(supervised)
