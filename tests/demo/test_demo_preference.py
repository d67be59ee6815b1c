"""The embedded demo's preference stage end to end, shortened, on every kind of question the full demo asks
(``python tools/demo.py --set preference=mpo``; the families' shortened runs are in tests/demo/test_demo.py):
pairs made as MMPR makes them (the fine-tuned model's own wrong answers, greedy and sampled), MPO of the projector
and LLM from the fine-tuned model (the default after a full fine-tune; the LoRA stage: tests/demo/test_demo.py),
the held-out preference accuracy before and after, and the demo's questions again.

It checks that the stage does not hurt, kind by kind: no kind of question loses more than one question to the
stage (a loss on one kind cannot hide behind a gain on another; with beta 0.1 this run lost two count questions),
and the implicit reward prefers the right answer on held-out pairs more often than at the start (0.5).
"""

import json
import os
import re

import pytest

from xtuner_plugins.demo.data import KINDS
from xtuner_plugins.demo.recipe import Recipe
from xtuner_plugins.demo.run import run_demo
from xtuner_plugins.demo.scoring import kind_changes, per_kind

pytestmark = pytest.mark.slow

# the quick recipe's model and data, every kind
RECIPE = dict(n_pretrain=400, n_sft=3000, n_test=60, pretrain_iters=50, finetune_iters=600, log_interval=50,
              max_new_tokens=4, preference='mpo', preference_prompts=600, preference_iters=200)


def lost_questions(before, after):
    """``{kind: questions right before the stage minus after}`` for the kinds that lost any."""
    right = {}
    for sign, answers in ((1, before), (-1, after)):
        for a in answers:
            right[a.kind] = right.get(a.kind, 0) + sign * a.correct
    return {k: v for k, v in right.items() if v > 0}


def test_preference_stage_helps_on_every_kind(tmp_path):
    result = run_demo(str(tmp_path / 'demo'), Recipe(**RECIPE))
    p = result.preference
    assert p is not None and result.stages['preference'].losses and result.stages['preference'].checkpoint
    assert result.converted_dir == p.converted and p.converted.endswith('converted_preference')
    assert re.fullmatch(r'preference accuracy: [01]\.\d{3} \(60 held-out pairs\); before preference training: '
                        r'0\.500', p.line())
    assert sorted(per_kind(result.answers)) == sorted(KINDS) == sorted(per_kind(p.sft_answers))
    assert [a.id for a in p.sft_answers] == [a.id for a in result.answers]
    table = kind_changes(p.sft_answers, result.answers)
    # the quick recipe's model is weak (600 fine-tuning iterations): its held-out preference accuracy is above
    # the tie it starts from (0.633 on 60 pairs, 2026-11-24), not at the full demo's 0.9
    # (tests/demo/test_demo.py's shortened run on two kinds asserts that)
    assert p.before == 0.5 and p.accuracy > 0.55, (p.line(), table)
    lost = lost_questions(p.sft_answers, result.answers)
    assert all(n <= 1 for n in lost.values()), (lost, table)
    # held-out pairs: the test questions, random wrong answers
    with open(os.path.join(result.work_dir, 'data', 'test_pairs.jsonl')) as f:
        pairs = [json.loads(line) for line in f]
    assert [q['chosen'] for q in pairs] == [a.expected for a in result.answers]
    assert all(q['rejected'] != q['chosen'] and q['source'] == 'random' for q in pairs)
    # training pairs: on new prompts (data/preference.jsonl), some on-policy (the fine-tuned model's own wrong
    # answers: tests/demo/test_preference.py)
    with open(os.path.join(result.work_dir, 'data', 'preference_pairs.jsonl')) as f:
        pairs = [json.loads(line) for line in f]
    assert sum(q['source'] == 'model' for q in pairs) == sum(c['model'] for c in p.pairs.values()) > 0
    assert all(q['rejected'] != q['chosen'] and q['id'].startswith('preference_') for q in pairs)
