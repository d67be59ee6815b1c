"""tools/plan.py's largest max_length stays within the LLM's context (max_position_embeddings): a row is one sample,
and on a large device a small model's memory allowed 1,048,576 tokens where its context is 8192. Packs are not
capped: their samples' positions restart."""

import json
import os

import pytest

from xtuner_plugins.cli.plan import main
from xtuner_plugins.tiny import make_tiny_models

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
    paths = make_tiny_models(str(tmp_path_factory.mktemp('plan_context')))
    with open(os.path.join(paths['llm'], 'config.json')) as f:
        config = json.load(f)
    assert config['max_position_embeddings'] == 8192
    return paths


def largest(capsys, config, tiny, *extra):
    assert main([os.path.join(ROOT, config), '--gpus', '1', '--gpu-mem', '80', '--cfg-options',
                 f'model.vision_encoder={tiny["internvit"]}', f'model.llm={tiny["llm"]}', *extra]) == 0
    return next(line for line in capsys.readouterr().out.splitlines() if line.startswith('largest max'))


def test_the_largest_max_length_is_the_llms_context(tiny, capsys):
    assert largest(capsys, 'configs/finetune_lora.py', tiny) == (
        'largest max_length at 4 per device: 8192 (the LLM\'s context, max_position_embeddings 8192: more would fit)')


def test_packs_are_not_capped_by_the_context(tiny, capsys):
    line = largest(capsys, 'configs/finetune_full_packed.py', tiny)
    assert line.startswith('largest max_tokens (tokens per pack) at 1 per device: ') and 'context' not in line
    assert int(line.rsplit(' ', 1)[1]) > 8192
