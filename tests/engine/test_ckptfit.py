"""``llm_grad_ckpt_layers='auto'`` (engine/ckptfit.py): the stage configs ask for it; on a GPU the hook checkpoints
the fewest first LLM layers whose plan fits the memory allowed, on a CPU and under LoRA all of them, and says so."""

import os
import types
from unittest import mock

import pytest
import torch

from xtuner_plugins.engine import ckptfit
from xtuner_plugins.engine.options import load_config
from xtuner_plugins.plan_configs.batch import model_batch, optimizer_settings
from xtuner_plugins.plan_configs.meta import build_meta_model
from xtuner_plugins.planner import plan_memory
from xtuner_plugins.tiny import make_tiny_models
from xtuner_plugins.tiny.llm import write_tiny_llm

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LAYERS = 4


@pytest.fixture(scope='module')
def models(tmp_path_factory):
    out = tmp_path_factory.mktemp('ckptfit')
    tiny = make_tiny_models(str(out))
    return dict(tiny, llm=write_tiny_llm(str(out / 'llm4'), num_layers=LAYERS))


def config(models, name='finetune_full_packed.py', **options):
    # bf16 weights, as real checkpoints hold them ('auto' reads the tiny model's fp32)
    return load_config(os.path.join(ROOT, 'configs', name), {
        'model.vision_encoder': models['internvit'], 'model.llm': models['llm'], 'model.torch_dtype': 'bfloat16',
        **options})


def real_model(cfg):
    from xtuner_plugins.models import VisionLanguageModel
    return VisionLanguageModel(**{k: v for k, v in cfg.model.items() if k != 'type'})


def planned(cfg, layers):
    """The plan's total for the config with the first ``layers`` LLM layers checkpointed (the planner alone)."""
    meta = build_meta_model(dict(cfg.model, llm_grad_ckpt_layers=layers))
    batch, _ = model_batch(cfg, meta)
    fused, accumulation = optimizer_settings(cfg)
    return plan_memory(meta, batch, 'bf16', fused=fused, accumulation=accumulation)['total']


def test_the_stage_configs_ask_for_it(models):
    cfg = config(models)
    assert cfg.model.llm_grad_ckpt_layers == 'auto' and cfg.model.llm_grad_ckpt is True
    assert ckptfit.CheckpointFitHook in [h['type'] for h in cfg.custom_hooks]
    model = real_model(cfg)
    # until the hook decides, every layer is checkpointed
    assert model.llm_ckpt_auto and model.llm_ckpt_layers is None
    assert [layer.gradient_checkpointing for layer in model.language_model.model.layers] == [True] * LAYERS
    # without checkpointing 'auto' has nothing to choose (no refusal for a config's default)
    off = real_model(config(models, **{'model.llm_grad_ckpt': False}))
    assert not off.llm_ckpt_auto and not any(layer.gradient_checkpointing for layer in off.language_model.model.layers)


def test_the_fewest_layers_whose_plan_fits(models):
    cfg = config(models)
    model = real_model(cfg)
    totals = {k: planned(cfg, k) for k in range(LAYERS + 1)}
    assert all(totals[k] > totals[k + 1] for k in range(LAYERS))   # each layer left out costs memory
    assert ckptfit.choose_layers(cfg, model, totals[0])[0] == 0
    for k in range(1, LAYERS + 1):   # just under what k - 1 layers need: k
        layers, why = ckptfit.choose_layers(cfg, model, (totals[k] + totals[k - 1]) / 2)
        assert layers == k, (k, why, totals)
        assert f'planned {totals[k] / 2 ** 30:.1f} GiB' in why and '1 pack of 16384 tokens' in why
    layers, why = ckptfit.choose_layers(cfg, model, totals[LAYERS] * 0.99)
    assert layers is None and 'even all checkpointed' in why
    # ZeRO-3 over 8 ranks shards the weights and optimizer states: fewer layers need checkpointing
    assert ckptfit.choose_layers(cfg, model, (totals[2] + totals[1]) / 2, zero=3, gpus=8)[0] < 2


def test_lora_and_unreadable_configs_keep_every_layer(models):
    cfg = config(models, 'finetune_lora.py')
    layers, why = ckptfit.choose_layers(cfg, real_model(cfg), 1e15)
    assert layers is None and 'LoRA on the LLM' in why
    cfg = config(models)
    model = real_model(cfg)
    cfg.model.llm = '/nonexistent/llm'
    layers, why = ckptfit.choose_layers(cfg, model, 1e15)
    assert layers is None and why.startswith('the plan could not be made')


def run_hook(cfg, model, cuda: bool, budget: float = 0.0) -> str:
    """What the hook logged."""
    runner = types.SimpleNamespace(model=model, cfg=cfg)
    with mock.patch.object(torch.cuda, 'is_available', return_value=cuda), \
            mock.patch.object(ckptfit, 'device_budget', return_value=budget), \
            mock.patch.object(ckptfit, 'print_log') as log:
        ckptfit.CheckpointFitHook().before_train(runner)
    return ' '.join(str(c.args[0]) for c in log.call_args_list)


def test_the_hook_sets_the_layers_and_says_why(models):
    cfg = config(models)
    totals = {k: planned(cfg, k) for k in (1, 2)}
    model = real_model(cfg)
    said = run_hook(cfg, model, cuda=True, budget=(totals[1] + totals[2]) / 2)
    assert [layer.gradient_checkpointing for layer in model.language_model.model.layers] == [True, True, False, False]
    assert model.llm_ckpt_layers == 2 and not model.llm_ckpt_auto
    assert "llm_grad_ckpt_layers='auto': 2 of the LLM's 4 decoder layers checkpointed (planned" in said
    model = real_model(cfg)   # on a CPU: all, said
    said = run_hook(cfg, model, cuda=False)
    assert [layer.gradient_checkpointing for layer in model.language_model.model.layers] == [True] * LAYERS
    assert '4 of the LLM\'s 4 decoder layers checkpointed (on a CPU)' in said
    model = real_model(config(models, **{'model.llm_grad_ckpt_layers': 1}))   # a number: the hook leaves it
    assert 'llm_grad_ckpt_layers' not in run_hook(cfg, model, cuda=True, budget=1e15)
    assert [layer.gradient_checkpointing for layer in model.language_model.model.layers] == [True] + [False] * 3


def test_zero_stage_is_read_through_the_wrappers():
    engine = types.SimpleNamespace(zero_optimization_stage=lambda: 3, module=object())
    assert ckptfit.zero_stage(types.SimpleNamespace(model=engine)) == 3
    assert ckptfit.zero_stage(types.SimpleNamespace(module=torch.nn.Linear(1, 1))) == 0
