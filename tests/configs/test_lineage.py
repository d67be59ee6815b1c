"""Stages chained through XTuner's train script: warm-up -> LoRA SFT -> DPO. Each checkpoint records its
lineage; DPO after LoRA SFT starts with every reward exactly 0 (its reference is the SFT model); the converter
finds the earlier stages from the last checkpoint alone and refuses another vision tower; a LoRA stage with no
previous stage stops at start-up naming model.pretrained_pth."""

import os

import pytest
import torch

from tests.configs.conftest import ROOT, tiny_options
from tests.configs.test_dpo import pairs_file
from tests.train_utils import run_train
from tools.convert_to_official import main as convert_main
from xtuner_plugins.models.checkpoint import read_meta
from xtuner_plugins.tiny import make_tiny_models

TRAIN = os.path.join(ROOT, 'tools', 'train.py')


def config(name):
    return os.path.join(ROOT, 'configs', f'{name}.py')


def chained(tiny, data, **extra):
    opts = tiny_options(tiny, data, repeat=2)
    del opts['model.from_scratch']
    opts.update(extra)
    return opts


def test_warm_up_lora_sft_dpo_chain_and_its_conversion(tiny, tmp_path, capsys):
    warm = run_train(config('pretrain_mlp'), str(tmp_path / 'warm'), cfg_options=chained(tiny, tiny['mixed']),
                     script=TRAIN)
    assert warm.ok, warm.summary()
    sft_opts = chained(tiny, tiny['mixed'], **{'model.pretrained_pth': warm.final_checkpoint,
                                               'model.llm_lora.lora_dropout': 0.0})
    sft = run_train(config('finetune_lora'), str(tmp_path / 'sft'), cfg_options=dict(sft_opts, **{
        'optim_wrapper.optimizer.lr': 0.05}), script=TRAIN)
    assert sft.ok, sft.summary()
    lineage = read_meta(sft.final_checkpoint)['lineage']
    assert lineage['pretrained']['path'] == warm.final_checkpoint and lineage['llm_lora']['r'] == 16
    assert set(lineage['sources']) == {'vision_encoder', 'llm'}

    dpo_opts = chained(tiny, pairs_file(tmp_path), **{'model.pretrained_pth': sft.final_checkpoint,
                                                       'model.llm_lora.lora_dropout': 0.0,
                                                       'model.llm_grad_ckpt': False})
    dpo = run_train(config('dpo_lora'), str(tmp_path / 'dpo'), cfg_options=dpo_opts, script=TRAIN)
    assert dpo.ok, dpo.summary()
    # the policy is its reference (the SFT model, adapters merged) before the first update
    assert dpo.scalar_series('rewards_chosen')[1] == 0.0 and dpo.scalar_series('rewards_rejected')[1] == 0.0

    # the converter is given the last checkpoint only: the SFT and warm-up stages come from its lineage
    plain = {k: v for k, v in dpo_opts.items() if k != 'model.pretrained_pth'}
    args = [f'{k}={v}' for k, v in plain.items()]
    capsys.readouterr()
    assert convert_main([config('dpo_lora'), dpo.final_checkpoint, str(tmp_path / 'out'), '--dtype', 'fp32',
                         '--cfg-options'] + args) == 0
    assert f'previous stage (recorded in {dpo.final_checkpoint}): {sft.final_checkpoint}' in capsys.readouterr().out
    other = make_tiny_models(str(tmp_path / 'other'), seed=1)['internvit']
    args = [f'{k}={v}' for k, v in dict(plain, **{'model.vision_encoder': other}).items()]
    assert convert_main([config('dpo_lora'), dpo.final_checkpoint, str(tmp_path / 'out2'), '--dtype', 'fp32',
                         '--cfg-options'] + args) == 2
    err = capsys.readouterr().err
    assert f'model.vision_encoder: {other} is not the folder' in err and tiny['internvit'] in err, err
    assert not os.path.exists(tmp_path / 'out2')


def test_a_lora_stage_without_a_previous_stage_stops_at_start_up(tiny, tmp_path):
    out = run_train(config('finetune_lora'), str(tmp_path / 'work'), cfg_options=chained(tiny, tiny['mixed']),
                    script=TRAIN, require_checkpoint=False)
    assert not out.ok and out.returncode != 0
    assert 'Set model.pretrained_pth=CHECKPOINT' in out.log and 'model.from_scratch=True' in out.log
    assert not out.checkpoints
