"""configs/mpo_full.py on the tiny models through XTuner's train script: full MPO from an SFT checkpoint (the
reference, a frozen copy, equals the loaded policy: the DPO term starts at log 2) learns the pairs, logs every
term and the rewards, writes checkpoints without the reference, converts (the trained policy, not the reference)
and chats, and starts from an official InternVL folder too; under DeepSpeed ZeRO-2 and ZeRO-3 with 2 processes."""

import math
import os

import pytest
import torch

from tests.configs.conftest import ROOT, tiny_options
from tests.configs.test_dpo import pairs_file
from tests.train_utils import load_checkpoint_state, run_train

CONFIG = os.path.join(ROOT, 'configs', 'mpo_full.py')
TRAIN = os.path.join(ROOT, 'tools', 'train.py')
LOGGED = ('term_sigmoid', 'term_bco_pair', 'term_sft', 'rewards_margin', 'rewards_accuracy', 'logps_chosen',
          'logps_rejected')


def sft_checkpoint(tiny, tmp_path):
    """A full fine-tuning checkpoint of the tiny models (every trained tensor perturbed): the MPO run's start."""
    from tests.tools.test_convert_to_official import FULL, options, trained_checkpoint
    path = str(tmp_path / 'sft.pth')
    trained_checkpoint(FULL, options(tiny), path, scale=0.05)
    return path


def mpo_options(tiny, tmp_path, **extra):
    return dict(tiny_options(tiny, pairs_file(tmp_path), repeat=8, lr=1e-3),
                **{'model.llm_grad_ckpt': False, 'model.pretrained_pth': sft_checkpoint(tiny, tmp_path)}, **extra)


def check_learned(out, iters=8):
    terms, margins = out.scalar_series('term_sigmoid'), out.scalar_series('rewards_margin')
    assert len(terms) == iters and all(len(out.scalar_series(k)) == iters for k in LOGGED), out.summary()
    assert abs(terms[1] - math.log(2)) < 1e-4, terms  # the reference is the policy as loaded
    assert terms[iters] < math.log(2) - 0.05 and margins[iters] > 0, (terms, margins)
    state = load_checkpoint_state(out.final_checkpoint)
    assert any(k.startswith('language_model.') for k in state) and any(k.startswith('mlp1.') for k in state)
    assert not [k for k in state if not k.startswith(('language_model.', 'mlp1.'))], sorted(state)[:4]
    return state


def test_mpo_full_settings_are_internvl_2_5_mpo():
    from mmengine.config import Config
    cfg = Config.fromfile(CONFIG)
    assert dict(cfg.model.preference) == dict(types=('sigmoid', 'bco_pair', 'sft'), weights=(0.8, 0.2, 1.0), beta=0.1)
    assert (cfg.model.freeze_vision, cfg.model.freeze_projector, cfg.model.freeze_llm) == (True, False, False)
    assert cfg.model.get('llm_lora') is None and cfg.optim_wrapper.optimizer.lr == 1e-6


def test_mpo_full_trains_converts_chats_and_starts_from_an_official_folder(tiny, tmp_path):
    from safetensors import safe_open

    from tools.convert_to_official import main as convert_main
    from xtuner_plugins.models.inference import ConvertedModel
    options = mpo_options(tiny, tmp_path)
    out = run_train(CONFIG, str(tmp_path / 'work'), cfg_options=options, script=TRAIN)
    assert out.ok and out.returncode == 0, out.summary()
    state = check_learned(out)
    folder = str(tmp_path / 'converted')
    args = ['--cfg-options'] + [f'{k}={v}' for k, v in options.items()]
    assert convert_main([CONFIG, out.final_checkpoint, folder, '--dtype', 'fp32'] + args) == 0
    with safe_open(os.path.join(folder, 'model.safetensors'), framework='pt') as f:
        keys = list(f.keys())
        assert not [k for k in keys if not k.startswith(('vision_model.', 'mlp1.', 'language_model.'))], keys[:4]
        key = 'language_model.lm_head.weight'
        assert torch.equal(f.get_tensor(key), state[key].float())  # the trained policy, not the reference
    answer = ConvertedModel(folder).ask('Say something.', [], dict(max_new_tokens=4))
    assert isinstance(answer, str)
    official = dict(tiny_options(tiny, pairs_file(tmp_path), repeat=1, lr=1e-3),
                    **{'model.llm_grad_ckpt': False, 'model.official_checkpoint': folder, 'model.vision_encoder': None,
                       'model.llm': None, 'train_dataloader.dataset.tokenizer': folder})
    again = run_train(CONFIG, str(tmp_path / 'official'), cfg_options=official, script=TRAIN)
    assert again.ok and again.returncode == 0, again.summary()
    assert abs(again.scalar_series('term_sigmoid')[1] - math.log(2)) < 1e-4, again.summary()


@pytest.mark.parametrize('stage', ['zero2', 'zero3'])
def test_mpo_full_under_deepspeed_on_two_processes(tiny, tmp_path, stage):
    """Full MPO under DeepSpeed ZeRO-2 and ZeRO-3 with two processes, one pair each: ZeRO-3 partitions the frozen
    reference copy with the rest and both ranks run its forward every step; the reference equals the loaded
    policy at first, the policy learns, and the checkpoint holds the trained parts only."""
    options = mpo_options(tiny, tmp_path, **{'train_dataloader.batch_size': 1,
                                             'train_dataloader.sampler.per_device_batch_size': 1,
                                             'train_dataloader.sampler.mega_batch_mult': 1})
    ranks = run_train(CONFIG, str(tmp_path / stage), nproc=2, deepspeed=stage, cfg_options=options, timeout=400,
                      script=TRAIN)
    assert ranks.ok and ranks.returncode == 0, ranks.summary()
    check_learned(ranks)
