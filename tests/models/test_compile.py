"""Regional compilation (models/compile.py, ``compile_blocks``): the same losses and gradients as eager, with and
without checkpointing and LoRA, every block compiled and the state dict's names unchanged, and new lengths that do
not compile again past a bound."""

import sys

import pytest
import torch

from tests.models.conftest import build
from xtuner_plugins.models.compile import compile_parts, compiled_graphs, is_compiled, repeated_blocks, reset_compiled


def step(tiny, batch, **kw):
    torch.manual_seed(0)
    model = build(tiny, freeze_llm='llm_lora' in kw, **kw).train()   # (LoRA: the adapters alone train)
    loss = model(batch, mode='loss')['loss']
    loss.backward()
    return model, loss.item(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize('kw', [dict(llm_grad_ckpt=False), dict(llm_grad_ckpt=True),
                                dict(llm_grad_ckpt=True, attn_implementation='sdpa_segments'),
                                dict(llm_lora=dict(r=4, lora_alpha=8, lora_dropout=0.0, target_modules='all-linear'))])
def test_compiled_blocks_give_eager_losses_and_gradients(tiny, batch, kw):
    reset_compiled()
    eager, loss, grads = step(tiny, batch, **kw)
    compiled, loss_c, grads_c = step(tiny, batch, compile_blocks=True, **kw)
    blocks = list(repeated_blocks(compiled.language_model)) + list(repeated_blocks(compiled.vision_model))
    assert blocks and all(is_compiled(b) for b in blocks)
    assert compiled_graphs() > 0   # dynamo ran: the blocks were not left eager
    assert compiled.state_dict().keys() == eager.state_dict().keys()
    assert loss_c == pytest.approx(loss, rel=1e-5)
    assert grads_c.keys() == grads.keys()
    for name, g in grads.items():
        torch.testing.assert_close(grads_c[name], g, rtol=1e-4, atol=1e-6, msg=lambda m: f'{name}: {m}')


@pytest.mark.parametrize('arch', ['llama', 'qwen3', 'qwen3_moe'])
def test_compiled_blocks_of_other_llm_families_give_eager_losses_and_gradients(tmp_path_factory, batch, arch):
    """'auto' compiles any LLM's blocks on a CPU with native bf16, not Qwen2's only: Llama (untied head), Qwen3
    (q/k norms) and Qwen3-MoE checkpointed, compiled against eager. The blocks are the decoder layers alone: a
    mixture of experts' experts (a stack inside each layer) were compiled again on their own."""
    from xtuner_plugins.tiny import make_tiny_models
    tiny = make_tiny_models(str(tmp_path_factory.mktemp(arch)), llm=arch)
    reset_compiled()
    eager, loss, grads = step(tiny, batch, llm_grad_ckpt=True)
    compiled, loss_c, grads_c = step(tiny, batch, compile_blocks='llm', llm_grad_ckpt=True)
    assert type(compiled.language_model).__name__.lower().startswith(arch.replace('_', ''))
    assert compiled_graphs() > 0
    blocks = list(repeated_blocks(compiled.language_model))
    assert len(blocks) == compiled.language_model.config.num_hidden_layers, [type(b).__name__ for b in blocks]
    assert all(type(b).__name__.endswith('DecoderLayer') for b in blocks), [type(b).__name__ for b in blocks]
    assert loss_c == pytest.approx(loss, rel=1e-5)
    assert grads_c.keys() == grads.keys()
    for name, g in grads.items():
        torch.testing.assert_close(grads_c[name], g, rtol=1e-4, atol=1e-6, msg=lambda m: f'{name}: {m}')


@pytest.mark.parametrize('attn', ['sdpa', 'sdpa_segments'])
def test_new_lengths_and_packings_do_not_compile_again(tiny, attn):
    """Six rows of new lengths (packed: new numbers of samples) through the compiled, checkpointed LLM: graphs are
    made for the first two (torch specialises a length of one), none after."""
    from xtuner_plugins.models.attention import segment_bounds
    reset_compiled()
    torch.manual_seed(0)
    model = build(tiny, freeze_llm=False, compile_blocks='llm', llm_grad_ckpt=True, attn_implementation=attn).train()
    counts = []
    for lens in ([5, 9], [7, 3, 10], [20], [4, 4, 4, 4], [11, 13], [6, 6, 6, 6, 6]):
        ids = torch.randint(0, 100, (1, sum(lens)))
        kw = dict(position_ids=torch.cat([torch.arange(n) for n in lens])[None],
                  segment_bounds=segment_bounds([lens], sum(lens))) if attn == 'sdpa_segments' else {}
        out = model.language_model(input_ids=ids, use_cache=False, **kw).logits
        out.float().mean().backward()
        counts.append(compiled_graphs())
    assert counts[0] > 0 and counts[-1] == counts[1], counts


def test_new_tile_counts_do_not_compile_the_vision_blocks_again(tiny):
    """On a GPU 'auto' compiles the vision tower's blocks too: batches of new numbers of tiles (frozen tower, no
    gradient, as the stage configs run it) make graphs for the first two counts (a count of one is specialised),
    none after."""
    reset_compiled()
    model = build(tiny, compile_blocks='vision').train()
    size = model.vision_model.config.image_size
    size = size[0] if isinstance(size, (list, tuple)) else size
    counts = []
    for tiles in (3, 1, 5, 2, 7, 4, 6):
        with torch.no_grad():
            model.tower_features(torch.randn(tiles, 3, size, size))
        counts.append(compiled_graphs())
    assert counts[0] > 0 and counts[-1] == counts[2], counts


def test_compile_blocks_values(monkeypatch):
    from xtuner_plugins.models import compile as compile_
    assert compile_parts(False) == () and compile_parts(None) == ()
    assert compile_parts(True) == ('llm', 'vision') and compile_parts('vision') == ('vision',)
    with pytest.raises(ValueError, match="compile_blocks=.*'auto', or some of llm, vision"):
        compile_parts('projector')
    # 'auto': the LLM where it was measured to pay, a CPU with native bf16 and an LLM of 100M parameters or more
    big = compile_.AUTO_MIN_LLM_PARAMETERS
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    monkeypatch.setattr('xtuner_plugins.models.cpu_bf16.why_not', lambda: None)
    monkeypatch.setattr(compile_, 'cxx_compiler', lambda: True)
    assert compile_parts('auto', big) == ('llm',)
    assert compile_parts('auto', big - 1) == ()                                # the tiny look-alikes stay eager
    assert compile_parts('auto', big, why_not=['DeepSpeed ZeRO-3']) == ()
    monkeypatch.setattr(compile_, 'cxx_compiler', lambda: False)
    assert compile_parts('auto', big) == ()                                    # inductor could not build
    monkeypatch.setattr(compile_, 'cxx_compiler', lambda: True)
    monkeypatch.setattr('xtuner_plugins.models.cpu_bf16.why_not', lambda: 'no native bf16 on this CPU')
    assert compile_parts('auto', big) == ()                                    # no bf16 hardware: not measured
    # CUDA: both parts (measured on an H100), on a GPU of compute capability 8.0 or more with Triton
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'get_device_capability', lambda device=None: (9, 0))
    assert compile_parts('auto', big) == ('llm', 'vision')                     # whatever the CPU has
    assert compile_parts('auto', big - 1) == ()
    assert compile_parts('auto', big, why_not=['DeepSpeed ZeRO-3']) == ()
    monkeypatch.setattr(torch.cuda, 'get_device_capability', lambda device=None: (7, 5))
    assert compile_parts('auto', big) == ()                                    # no bf16 matrix units: not measured
    monkeypatch.setattr(torch.cuda, 'get_device_capability', lambda device=None: (8, 0))
    assert compile_parts('auto', big) == ('llm', 'vision')
    monkeypatch.setitem(sys.modules, 'triton', None)                           # no Triton: inductor cannot build
    assert compile_parts('auto', big) == ()


def test_auto_leaves_a_tiny_model_and_a_model_only_run_eager(tiny, monkeypatch):
    from xtuner_plugins.models import compile as compile_
    monkeypatch.setattr('xtuner_plugins.models.cpu_bf16.why_not', lambda: None)
    monkeypatch.setattr(compile_, 'cxx_compiler', lambda: True)
    monkeypatch.setattr(compile_, 'AUTO_MIN_LLM_PARAMETERS', 1)
    bf16 = dict(torch_dtype='bfloat16')
    assert build(tiny, freeze_llm=False, **bf16).compile_blocks == ('llm',)   # the default is 'auto'
    assert build(tiny, freeze_llm=False).compile_blocks == ()                  # fp32 weights: not measured
    assert build(tiny, trainable_fp32=False, **bf16).compile_blocks == ()
    monkeypatch.setattr(compile_, 'AUTO_MIN_LLM_PARAMETERS', 10 ** 8)
    assert build(tiny, freeze_llm=False, **bf16).compile_blocks == ()


@pytest.mark.slow
def test_compiled_blocks_train_on_two_ranks(tmp_path):
    """Under DDP (two ranks of the local launcher), checkpointed LoRA LLM blocks compile and train: dynamo's DDP
    optimizer, which split their graphs at DDP's buckets, failed in torch's partitioner on the first step."""
    from tests.configs.conftest import tiny_options
    from tests.helpers import tiny_workspace
    from tests.train_utils import REPO_ROOT, run_train
    tiny = tiny_workspace(tmp_path / 'tiny')
    out = run_train(f'{REPO_ROOT}/configs/finetune_lora.py', str(tmp_path / 'work'), nproc=2, timeout=600,
                    cfg_options=dict(tiny_options(tiny, tiny['same'], repeat=4), **{'model.compile_blocks': 'llm'}))
    assert out.ok and 'llm blocks compiled' in out.log, out.summary()
    assert len(out.losses) == out.max_iters > 0


def test_the_loss_is_compiled_where_the_llm_blocks_are(tiny, batch, monkeypatch):
    """compile_blocks with the LLM compiles the loss's cross-entropy too (loss.weighted_ce); without, it stays
    eager, as with loss_chunk."""
    from xtuner_plugins.models import loss
    asked, real = [], loss.weighted_ce
    monkeypatch.setattr(loss, 'weighted_ce', lambda compiled=False: asked.append(compiled) or real(compiled))
    for kw, expected in ((dict(compile_blocks='llm'), True), (dict(compile_blocks='vision'), False),
                         (dict(compile_blocks=False, loss_chunk=4), False),
                         (dict(compile_blocks='llm', loss_chunk=4), True)):
        asked.clear()
        step(tiny, batch, **kw)
        assert asked and set(asked) == {expected}, (kw, asked)
