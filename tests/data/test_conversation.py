"""parse_conversation: the structure, the image tags and each error's reason."""

import pytest

from tests.data.test_tokenize import ERRORS, G, H, S
from xtuner_plugins.data.conversation import parse_conversation
from xtuner_plugins.data.errors import SampleError


def test_check_conversations():
    parse_conversation([H('<image>Hi'), G('x')], 1)
    parse_conversation([H('Hi'), G('x')], 2)  # tags implicit
    parse_conversation([S('s'), H('Hi'), G('x')])
    for conv, n, reason, match in ERRORS:
        with pytest.raises(SampleError, match=match) as info:
            parse_conversation(conv, len(n))
        assert info.value.reason == reason
