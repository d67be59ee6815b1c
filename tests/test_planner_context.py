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
    assert int(line.split(': ')[1].split(' ')[0]) > 8192


def test_a_max_length_past_the_context_is_said_and_images_past_it_fit_nowhere(tiny, tmp_path, capsys):
    """A context shorter than a row's images had the search start past its own bound and print that bound as the
    largest max_length (3584 for a 2,048-token context), beside rows of 8,192 tokens it called fitting: the rows
    past the context are named, no max_length is offered where the images alone pass it, and a context less than a
    step past the images is itself the largest."""
    import shutil
    llm = tmp_path / 'short'
    shutil.copytree(tiny['llm'], llm)
    config = json.loads((llm / 'config.json').read_text())
    config['max_position_embeddings'] = 40
    (llm / 'config.json').write_text(json.dumps(config))
    assert main([os.path.join(ROOT, 'configs/finetune_lora.py'), '--gpus', '1', '--gpu-mem', '80', '--cfg-options',
                 f'model.vision_encoder={tiny["internvit"]}', f'model.llm={llm}',
                 'train_dataloader.dataset.max_dynamic_patch=12']) == 0
    out = capsys.readouterr().out
    assert ("caution: max_length 8192 is past the LLM's context (max_position_embeddings 40): rows that long run "
            'past the positions it was trained for') in out
    line = next(line for line in out.splitlines() if line.startswith('largest max'))
    assert line == ("largest max_length at 4 per device: none (a row's 52 image tokens alone are past the LLM's "
                    'context, 40)'), line   # 13 tiles of the tiny tower's 4 tokens
    config['max_position_embeddings'] = 100   # past the 52 image tokens, short of the search's 256-token step
    (llm / 'config.json').write_text(json.dumps(config))
    assert largest(capsys, 'configs/finetune_lora.py', dict(tiny, llm=str(llm))) == (
        "largest max_length at 4 per device: 100 (the LLM's context, max_position_embeddings 100: more would fit)")
