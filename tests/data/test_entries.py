"""A sample's fields as training reads them (``data/entries.py``): a top-level ``"system"`` (ShareGPT's,
LLaMA-Factory's) is the conversation's first turn, as those tools read it; it was dropped, and the template's
default system message trained in its place."""

import pytest

from xtuner_plugins.data.entries import sample_conversations, with_system
from xtuner_plugins.data.errors import SampleError

TURNS = [{'from': 'human', 'value': 'q'}, {'from': 'gpt', 'value': 'a'}]


def test_a_top_level_system_is_the_first_turn():
    pirate = {'from': 'system', 'value': 'You are a pirate.'}
    assert sample_conversations({'system': 'You are a pirate.', 'conversations': TURNS}) == [pirate] + TURNS
    for none in (None, ''):   # none, or empty: the template's own
        assert sample_conversations({'system': none, 'conversations': TURNS}) == TURNS
    assert with_system({'system': 'x'}, 'not a list') == 'not a list'   # (its own check says what is wrong)


@pytest.mark.parametrize('sample, says', [
    ({'system': 'A', 'conversations': [{'from': 'system', 'value': 'B'}] + TURNS},
     'a top-level "system" ("A") and a first "system" turn: give the system message once'),
    ({'system': 3, 'conversations': TURNS}, 'a top-level "system" is text, the system message; got 3'),
])
def test_one_beside_a_system_turn_or_not_text_is_refused(sample, says):
    with pytest.raises(SampleError) as err:
        sample_conversations(sample)
    assert err.value.reason == 'bad_conversation' and says in str(err.value)
