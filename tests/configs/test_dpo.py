"""configs/dpo_lora.py on the tiny models through XTuner's train script: pairs train (the logged reward margin
and accuracy, the DPO term below log 2 after training on the same pairs), the checkpoint holds only the LoRA
adapters, and it converts and answers like an SFT checkpoint; MPO under DeepSpeed ZeRO-2 and ZeRO-3; packed
pairs (configs/dpo_lora_packed.py)."""

import math
import os

import pytest

from tests.configs.conftest import ROOT, tiny_options
from tests.helpers import write_jsonl
from tests.train_utils import load_checkpoint_state, run_train

CONFIG = os.path.join(ROOT, 'configs', 'dpo_lora.py')


def pairs_file(tmp_path):
    return write_jsonl(str(tmp_path / 'pairs.jsonl'), [
        {'image': 'a.png', 'question': '<image>\nDescribe the image.', 'chosen': 'a wide noisy picture',
         'rejected': 'a cat on a mat'},
        {'question': 'Say something.', 'chosen': 'something', 'rejected': 'nothing at all'}])


def test_dpo_lora_trains_converts_and_chats(tiny, tmp_path):
    options = dict(tiny_options(tiny, pairs_file(tmp_path), repeat=8, lr=5e-3), **{'model.llm_grad_ckpt': False})
    out = run_train(CONFIG, str(tmp_path / 'work'), cfg_options=options,
                    script=os.path.join(ROOT, 'tools', 'train.py'))
    assert out.ok and out.returncode == 0, out.summary()
    margins, terms = out.scalar_series('rewards_margin'), out.scalar_series('term_sigmoid')
    assert len(margins) == 8 and out.scalar_series('rewards_accuracy'), out.summary()
    assert abs(terms[1] - math.log(2)) < 1e-4, terms  # the policy is its reference at first
    assert terms[8] < math.log(2) - 0.05 and margins[8] > 0, (terms, margins)
    state = load_checkpoint_state(out.final_checkpoint)
    assert state and all('lora_' in k for k in state), sorted(state)[:4]
    from tools.convert_to_official import main as convert_main
    from xtuner_plugins.models.inference import ConvertedModel
    args = ['--cfg-options'] + [f'{k}={v}' for k, v in options.items()]
    assert convert_main([CONFIG, out.final_checkpoint, str(tmp_path / 'converted'), '--dtype', 'fp32'] + args) == 0
    answer = ConvertedModel(str(tmp_path / 'converted')).ask('Say something.', [], dict(max_new_tokens=4))
    assert isinstance(answer, str)


@pytest.mark.parametrize('stage', ['zero2', 'zero3'])
def test_mpo_lora_under_deepspeed_on_two_processes(tiny, tmp_path, stage):
    """MPO (sigmoid + bco_pair + sft; the BCO baseline averaged over both ranks) under DeepSpeed ZeRO-2 and
    ZeRO-3 with two processes, one pair each: the reference is the policy at first (the DPO term is log 2), the
    term falls, and a checkpoint is written (ZeRO-3 gathers the partitioned adapters for both forwards)."""
    base = dict(tiny_options(tiny, pairs_file(tmp_path), repeat=8, batch_size=1, lr=5e-3),
                **{'model.llm_grad_ckpt': False, 'model.preference.types': ['sigmoid', 'bco_pair', 'sft'],
                   'model.preference.weights': [0.8, 0.2, 1.0], 'train_dataloader.sampler.mega_batch_mult': 1})
    ranks = run_train(CONFIG, str(tmp_path / stage), nproc=2, deepspeed=stage, cfg_options=base, timeout=400,
                      script=os.path.join(ROOT, 'tools', 'train.py'))
    assert ranks.ok and ranks.returncode == 0, ranks.summary()
    terms = ranks.scalar_series('term_sigmoid')
    assert len(terms) == 8 and abs(terms[1] - math.log(2)) < 1e-4, terms
    margins = ranks.scalar_series('rewards_margin')
    assert terms[8] < math.log(2) - 0.05 and margins[8] > 0 and ranks.scalar_series('term_bco_pair'), (terms, margins)
    assert load_checkpoint_state(ranks.final_checkpoint)


def test_packed_pairs_train(tiny, tmp_path):
    """configs/dpo_lora_packed.py: several pairs per pack; the reference is the policy at first and the DPO term
    falls below log 2."""
    config = os.path.join(ROOT, 'configs', 'dpo_lora_packed.py')
    options = {k.replace('train_dataloader.dataset.', 'train_dataloader.dataset.dataset.'): v
               for k, v in tiny_options(tiny, pairs_file(tmp_path), repeat=8, lr=5e-3).items()}
    options.update({'model.llm_grad_ckpt': False, 'train_dataloader.batch_size': 1,
                    'train_dataloader.sampler.per_device_batch_size': 1,
                    'train_dataloader.dataset.max_tokens': 400})
    out = run_train(config, str(tmp_path / 'work'), cfg_options=options)
    assert out.ok and out.returncode == 0, out.summary()
    terms, margins = out.scalar_series('term_sigmoid'), out.scalar_series('rewards_margin')
    last = max(terms)
    assert 1 < last < 16, terms  # 16 pairs (2 x repeat 8), about two per pack of 400 tokens
    assert abs(terms[1] - math.log(2)) < 1e-4 and terms[last] < math.log(2) - 0.05 and margins[last] > 0, terms
