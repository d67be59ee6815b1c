"""configs/finetune_full.py on the tiny models: the LLM and projector trained, the vision tower too when
asked, each with its own learning rate, which must survive XTuner's --deepspeed rewrite (ZeRO-2, 2
processes on a CPU). LoRA under ZeRO-2 as well."""

import os

import pytest
import torch
from mmengine.config import Config

from tests.configs.conftest import ROOT, tiny_options
from tests.train_utils import load_checkpoint_state, run_train
from xtuner_plugins.models import VisionLanguageModel

CONFIG = os.path.join(ROOT, 'configs', 'finetune_full.py')


def test_full_settings():
    cfg = Config.fromfile(CONFIG)
    assert (cfg.model.freeze_vision, cfg.model.freeze_projector, cfg.model.freeze_llm) == (True, False, False)
    assert cfg.optim_wrapper.optimizer.lr == 4e-5
    # the vision tower's own lr (stage 1.5: 1e-5) is a paramwise setting inside `optimizer`
    assert cfg.optim_wrapper.optimizer.paramwise_cfg.custom_keys['vision_model'].lr_mult == 0.25


@pytest.mark.slow
def test_full_with_vision_under_zero2_keeps_per_module_lr(tiny, tmp_path):
    options = tiny_options(tiny, tiny['same'], repeat=12, batch_size=1)
    options.update({'model.freeze_vision': False, 'model.vision_drop_path': 0.1,
                    # lr 0 for the vision tower: if paramwise_cfg were dropped, it would train at 0.01
                    'optim_wrapper.optimizer.paramwise_cfg.custom_keys.vision_model.lr_mult': 0.0})
    out = run_train(CONFIG, str(tmp_path / 'work'), nproc=2, deepspeed='zero2', cfg_options=options)
    assert out.ok, out.summary()
    state = load_checkpoint_state(out.final_checkpoint)
    assert {k.split('.')[0] for k in state} == {'vision_model', 'mlp1', 'language_model'}
    source = VisionLanguageModel(vision_encoder=tiny['internvit'], llm=tiny['llm'], torch_dtype='float32',
                                 freeze_vision=False, freeze_llm=False)
    ref = source.state_dict()
    vision = [k for k in state if k.startswith('vision_model.')]
    assert vision and all(torch.equal(state[k], ref[k]) for k in vision)  # lr_mult 0: untouched
    llm = [k for k in state if k.startswith('language_model.')]
    assert any(not torch.equal(state[k], ref[k]) for k in llm)  # trained at the base lr
    losses = [out.losses[i] for i in sorted(out.losses)]
    assert losses[-1] < losses[0] - 0.3, losses


@pytest.mark.slow
def test_lora_under_zero2(tiny, tmp_path):
    out = run_train(os.path.join(ROOT, 'configs', 'finetune_lora.py'), str(tmp_path / 'work'), nproc=2,
                    deepspeed='zero2', cfg_options=tiny_options(tiny, tiny['same'], repeat=12, batch_size=1))
    assert out.ok, out.summary()
    state = load_checkpoint_state(out.final_checkpoint)
    assert any('lora_B' in k for k in state) and all('lora_' in k or k.startswith('mlp1.') for k in state)
    losses = [out.losses[i] for i in sorted(out.losses)]
    assert losses[-1] < losses[0] - 0.3, losses


def test_packed_attention_is_one_setting(tiny):
    cfg = Config.fromfile(os.path.join(ROOT, 'configs', 'finetune_full_packed.py'))
    assert cfg.model.attn_implementation == 'sdpa_segments'  # the default trains on a CPU too, with no L x L mask
    cfg.merge_from_dict({'model.attn_implementation': 'flex_attention', 'model.vision_encoder': tiny['internvit'],
                         'model.llm': tiny['llm'], 'model.torch_dtype': 'float32'})
    model = VisionLanguageModel(**{k: v for k, v in cfg.model.items() if k != 'type'})
    # flex attention is the LLM's; the vision tower's tiles need no mask and keep SDPA
    assert model.language_model.config._attn_implementation == 'flex_attention'
    from xtuner_plugins.models.cpu_attention import as_sdpa   # SDPA, or on some CPUs the kernel that computes it
    assert as_sdpa(model.vision_model.config._attn_implementation) == 'sdpa'


@pytest.mark.slow
def test_packed_full_finetuning(tiny, tmp_path):
    config = os.path.join(ROOT, 'configs', 'finetune_full_packed.py')
    options = {k.replace('train_dataloader.dataset.', 'train_dataloader.dataset.dataset.'): v
               for k, v in tiny_options(tiny, tiny['mixed'], repeat=6).items()}
    options.update({'train_dataloader.batch_size': 1, 'train_dataloader.sampler.per_device_batch_size': 1,
                    'train_dataloader.dataset.max_tokens': 600, 'train_dataloader.dataset.max_tiles': 12})
    out = run_train(config, str(tmp_path / 'work'), cfg_options=options)
    assert out.ok, out.summary()
    assert "loss_reduction='square'" in out.full_log()  # the config dump, in MMEngine's log file
    # the configs' llm_grad_ckpt_layers='auto' (engine/ckptfit.py) ran before the first step: all, on a CPU
    assert "llm_grad_ckpt_layers='auto': 2 of the LLM's 2 decoder layers checkpointed (on a CPU)" in out.log
    losses = [out.losses[i] for i in sorted(out.losses)]
    assert len(losses) >= 3 and losses[-1] < losses[0], losses
    tokens, samples = out.scalar_series('tokens_per_sec'), out.scalar_series('samples_per_sec')
    # several samples per pack: tokens per sample is a sample's size, not a whole pack's (up to 600)
    assert all(tokens[i] / samples[i] < 400 for i in samples), (tokens, samples)
