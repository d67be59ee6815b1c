"""``llm_grad_ckpt_layers='auto'`` (engine/ckptfit.py): the stage configs ask for it; on a GPU the hook checkpoints
the fewest first LLM layers whose plan fits the memory allowed, on a CPU and under LoRA all of them, and says so."""

import logging
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
    assert cfg.default_hooks.ckpt_fit.type is ckptfit.CheckpointFitHook
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
        assert f'planned {totals[k] / 2 ** 30:.1f} GiB' in why and '1 pack of 16384 tokens and up to 48 tiles' in why
    layers, why = ckptfit.choose_layers(cfg, model, totals[LAYERS] * 0.99)
    assert layers is None and 'even all checkpointed' in why
    # ZeRO-3 over 8 ranks shards the weights and optimizer states: fewer layers need checkpointing
    assert ckptfit.choose_layers(cfg, model, (totals[2] + totals[1]) / 2, zero=3, gpus=8)[0] < 2
    # DDP on 2 ranks holds a copy of every gradient in its buckets: more layers
    assert ckptfit.choose_layers(cfg, model, totals[2] + 1, zero=0, gpus=2)[0] == 3
    assert ckptfit.choose_layers(cfg, model, totals[2] + 1, zero=0, gpus=1)[0] == 2


def test_unpacked_rows_are_planned_with_as_many_tiles_as_max_length_holds(models):
    """Videos' frames and many images' tiles can pass max_dynamic_patch: each tile takes its tokens of the row,
    so max_length bounds them; the plan is the worse of that and the config's tiles."""
    cfg = config(models, 'finetune_full.py', **{'train_dataloader.dataset.max_length': 4096})
    model = real_model(cfg)
    layers, why = ckptfit.choose_layers(cfg, model, 1e15)
    per_tile = model.num_image_token
    assert layers == 0 and f'4 rows of 4096 tokens and up to {4 * (4096 // per_tile)} tiles' in why, why


@pytest.mark.parametrize('zero, options, reason', [
    (1, {}, 'DeepSpeed ZeRO-1: the planner counts no DeepSpeed, ZeRO-2 and ZeRO-3'),
    (0, {'model.official_checkpoint': '/some/InternVL2_5-1B'}, 'an official_checkpoint'),
    (0, {'model.llm': '/nonexistent/llm'}, 'the plan could not be made')])
def test_what_is_not_planned_keeps_every_layer(models, zero, options, reason):
    cfg = config(models)
    model = real_model(cfg)
    cfg.merge_from_dict(options)
    layers, why = ckptfit.choose_layers(cfg, model, 1e15, zero=zero, gpus=2)
    assert layers is None and why.startswith(reason), why


def test_lora_keeps_every_layer(models):
    cfg = config(models, 'finetune_lora.py')
    layers, why = ckptfit.choose_layers(cfg, real_model(cfg), 1e15)
    assert layers is None and 'LoRA on the LLM' in why


class Forwarding:
    """A wrapper that passes unknown attribute reads on, as MMEngine's DeepSpeed wrapper and DeepSpeed's engine
    do (``model``, ``module``)."""

    def __init__(self, name, inner):
        setattr(self, name, inner)
        self._name = name

    def __getattr__(self, key):
        return getattr(vars(self)[vars(self)['_name']], key)


def run_hook(cfg, model, cuda: bool, budget: float = 0.0, wrapped=None) -> str:
    """What the hook logged."""
    runner = types.SimpleNamespace(model=model if wrapped is None else wrapped, cfg=cfg)
    with mock.patch.object(torch.cuda, 'is_available', return_value=cuda), \
            mock.patch.object(ckptfit, 'device_budget', return_value=budget), \
            mock.patch.object(ckptfit, 'print_log') as log:
        ckptfit.CheckpointFitHook().before_train(runner)
    return ' '.join(str(c.args[0]) for c in log.call_args_list)


def test_the_hook_sets_the_layers_and_says_why(models):
    cfg = config(models)
    totals = {k: planned(cfg, k) for k in (1, 2)}
    model = real_model(cfg)
    wrapped = Forwarding('model', Forwarding('module', model))   # MMEngine's DeepSpeed wrapper, DeepSpeed's engine
    said = run_hook(cfg, model, cuda=True, budget=(totals[1] + totals[2]) / 2, wrapped=wrapped)
    assert [layer.gradient_checkpointing for layer in model.language_model.model.layers] == [True, True, False, False]
    # set on the model itself, not on a wrapper that reads through to it
    assert model.llm_ckpt_layers == 2 and not model.llm_ckpt_auto and 'llm_ckpt_layers' not in vars(wrapped)
    assert "llm_grad_ckpt_layers='auto': 2 of the LLM's 4 decoder layers checkpointed (planned" in said
    model = real_model(cfg)   # on a CPU: all, said
    said = run_hook(cfg, model, cuda=False)
    assert [layer.gradient_checkpointing for layer in model.language_model.model.layers] == [True] * LAYERS
    assert '4 of the LLM\'s 4 decoder layers checkpointed (on a CPU)' in said
    model = real_model(config(models, **{'model.llm_grad_ckpt_layers': 1}))   # a number: the hook leaves it
    assert 'llm_grad_ckpt_layers' not in run_hook(cfg, model, cuda=True, budget=1e15)
    assert [layer.gradient_checkpointing for layer in model.language_model.model.layers] == [True] + [False] * 3


def test_a_plan_that_raises_leaves_every_layer_and_still_agrees(models):
    """Whatever one rank's plan meets, it reaches the ranks' agreement (a rank missing it would hang the others)."""
    cfg = config(models)
    model = real_model(cfg)
    with mock.patch.object(ckptfit, 'choose_layers', side_effect=RuntimeError('CUDA error: busy')), \
            mock.patch.object(ckptfit, 'agree', side_effect=lambda n, why: (n, why, None)) as agree:
        said = run_hook(cfg, model, cuda=True, budget=1e15)
    agree.assert_called_once_with(LAYERS, 'the plan could not be made (RuntimeError: CUDA error: busy)')
    assert 'the plan could not be made (RuntimeError: CUDA error: busy)' in said
    assert all(layer.gradient_checkpointing for layer in model.language_model.model.layers)


def test_the_budget_is_a_share_of_what_this_process_can_have():
    with mock.patch.object(torch.cuda, 'current_device', return_value=0), \
            mock.patch.object(torch.cuda, 'get_device_properties', return_value=types.SimpleNamespace(
                total_memory=80 * 2 ** 30)), \
            mock.patch.object(torch.cuda, 'memory_reserved', return_value=10 * 2 ** 30), \
            mock.patch.object(torch.cuda, 'mem_get_info', side_effect=[(70 * 2 ** 30, 0), (30 * 2 ** 30, 0)]):
        assert ckptfit.device_budget() == pytest.approx(0.85 * 80 * 2 ** 30)   # the GPU to itself
        assert ckptfit.device_budget() == pytest.approx(0.85 * 40 * 2 ** 30)   # another process holds 40 GiB


def test_zero_stage_is_read_through_the_wrappers():
    engine = types.SimpleNamespace(zero_optimization_stage=lambda: 3, module=object())
    assert ckptfit.zero_stage(types.SimpleNamespace(model=engine)) == 3
    assert ckptfit.zero_stage(types.SimpleNamespace(module=torch.nn.Linear(1, 1))) == 0


def _agree_on_rank(rank, init, out):
    import torch.distributed as dist
    dist.init_process_group('gloo', init_method=f'file://{init}', rank=rank, world_size=2)
    try:
        with open(f'{out}.{rank}', 'w') as f:
            f.write(repr(ckptfit.agree([3, 7][rank], ['planned 9 GiB', 'planned 70 GiB'][rank])))
    finally:
        dist.destroy_process_group()


def test_the_ranks_agree_on_the_largest_count(tmp_path):
    """Two ranks (gloo) that chose 3 and 7 layers both checkpoint 7, and rank 0 learns why (rank 1's reason: it
    logged only 'another rank needs 7; its log says why'); one process keeps its own."""
    import torch.multiprocessing as mp
    mp.spawn(_agree_on_rank, args=(str(tmp_path / 'init'), str(tmp_path / 'chose')), nprocs=2)
    assert [(tmp_path / f'chose.{r}').read_text() for r in (0, 1)] == [
        "(7, 'planned 70 GiB', 1)", "(7, 'planned 70 GiB', None)"]
    assert ckptfit.agree(5, 'why') == (5, 'why', None)


def test_another_ranks_reason_is_logged_with_its_rank(models):
    cfg = config(models)
    model = real_model(cfg)
    with mock.patch.object(ckptfit, 'choose_layers', return_value=(1, 'planned 9.0 GiB')), \
            mock.patch.object(ckptfit, 'agree', return_value=(LAYERS, 'even all checkpointed, the plan is over', 3)), \
            mock.patch.object(torch.cuda, 'is_available', return_value=True), \
            mock.patch.object(ckptfit, 'device_budget', return_value=1e15), \
            mock.patch.object(ckptfit, 'print_log') as log:
        ckptfit.CheckpointFitHook().before_train(types.SimpleNamespace(model=model, cfg=cfg))
    said, level = log.call_args.args[0], log.call_args.kwargs['level']
    assert f"{LAYERS} of the LLM's {LAYERS} decoder layers checkpointed (rank 3 needs {LAYERS}: even all " in said
    assert level == logging.WARNING   # that rank's plan did not fit: a warning here too
