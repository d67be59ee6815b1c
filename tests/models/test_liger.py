"""Liger Kernel (models/liger.py, ``liger_kernel``): the fused loss gives the chunked loss's values and gradients
under every reduction, the model on Liger's kernels gives the eager losses and gradients, Liger's norms and MLPs
replace the LLM's with the weights' names unchanged, and what cannot work is refused with a reason.

Liger's kernels are Triton GPU kernels. Here they run on the CPU in Triton's interpreter (``TRITON_INTERPRET=1``,
read when Triton is imported, so in a process of their own; Liger's patches are process-wide too). Liger 0.8.4's
RMSNorm and SwiGLU kernels do not run in the interpreter (a float argument used as a tensor, ``'float' object has
no attribute 'to'``): their numbers are for ``benchmarks/gpu.sh``'s check on a GPU; here they are checked to be
in place."""

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.models.conftest import build
from xtuner_plugins.models.liger import LIGER_PARTS, apply_liger, check_liger, liger_parts

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def interpreted_checks(tiny_json: str, batch_path: str) -> None:
    """Run in a process of its own with ``TRITON_INTERPRET=1`` (see the module's docstring)."""
    from xtuner_plugins.models import liger
    from xtuner_plugins.models.loss import chunked_causal_lm_loss, fused_causal_lm_loss, supervised_positions
    assert liger.interpreted()
    tiny, batch = json.loads(tiny_json), torch.load(batch_path)

    # the fused loss against the chunked one: values and gradients, each reduction, packed rows' segments
    torch.manual_seed(0)
    hidden = torch.randn(2, 24, 16)
    head = torch.nn.Linear(16, 300, bias=False)
    labels = torch.randint(0, 300, (2, 24))
    labels[0, :5] = labels[1, 10:14] = -100
    segments = torch.tensor([[0] * 9 + [1] * 15, [0] * 20 + [-1] * 4])
    labels[1, 20:] = -100
    positions = supervised_positions(labels)
    for reduction in ('token', 'sample', 'square'):
        grads = []
        for fn in (lambda h: chunked_causal_lm_loss(h, head, labels, 7, reduction, segments=segments,
                                                    positions=positions),
                   lambda h: fused_causal_lm_loss(h, head, labels, reduction, segments=segments,
                                                  positions=positions)):
            h = hidden[:, positions].clone().requires_grad_()
            head.zero_grad()
            loss = fn(h)
            loss.backward()
            grads.append((loss.detach(), h.grad, head.weight.grad.clone()))
        (loss, gh, gw), (loss_f, gh_f, gw_f) = grads
        torch.testing.assert_close(loss_f, loss, rtol=1e-5, atol=0, msg=lambda m: f'{reduction} loss: {m}')
        torch.testing.assert_close(gh_f, gh, rtol=1e-4, atol=1e-6, msg=lambda m: f'{reduction} hidden grad: {m}')
        torch.testing.assert_close(gw_f, gw, rtol=1e-4, atol=1e-6, msg=lambda m: f'{reduction} weight grad: {m}')

    # the tiny model: eager first (Liger's RoPE patch is process-wide), then on Liger's RoPE and fused loss
    def step(**kw):
        torch.manual_seed(0)
        model = build(tiny, freeze_llm=False, loss_reduction='square', **kw).train()
        loss = model(batch, mode='loss')['loss']
        loss.backward()
        return model, loss.item(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    eager, loss, grads = step()
    calls, kernel = [], liger.fused_linear_ce
    liger.fused_linear_ce = lambda *a, **k: calls.append(a[-1]) or kernel(*a, **k)   # the loss went through it
    fused, loss_f, grads_f = step(liger_kernel=['rope', 'fused_loss'])
    assert fused.liger_kernel == ('rope', 'fused_loss') and calls == ['none'], calls
    from transformers.models.qwen2 import modeling_qwen2
    assert modeling_qwen2.apply_rotary_pos_emb.__module__.startswith('liger_kernel'), 'RoPE not patched'
    assert abs(loss_f - loss) <= 1e-5 * abs(loss), (loss_f, loss)
    assert grads_f.keys() == grads.keys()
    for name, g in grads.items():
        torch.testing.assert_close(grads_f[name], g, rtol=1e-4, atol=1e-6, msg=lambda m: f'{name}: {m}')

    # every part: Liger's norms and MLPs in the LLM, the weights under their names
    whole = build(tiny, freeze_llm=False, liger_kernel=True)
    assert whole.liger_kernel == LIGER_PARTS
    layers = whole.language_model.model.layers
    assert all(layer.mlp._get_name() == 'LigerSwiGLUMLP' for layer in layers)
    norms = [whole.language_model.model.norm] + [n for layer in layers
                                                for n in (layer.input_layernorm, layer.post_attention_layernorm)]
    assert all(n.forward.__func__.__qualname__ == 'LigerRMSNorm.forward' for n in norms)
    assert whole.state_dict().keys() == eager.state_dict().keys()
    print('liger checks: ok')


def test_liger_kernels_in_tritons_interpreter(tiny, batch, tmp_path):
    torch.save(batch, tmp_path / 'batch.pt')
    code = ('import sys; from tests.models.test_liger import interpreted_checks; '
            'interpreted_checks(sys.argv[1], sys.argv[2])')
    env = dict(os.environ, TRITON_INTERPRET='1', PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, '-c', code, json.dumps(tiny), str(tmp_path / 'batch.pt')], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and 'liger checks: ok' in proc.stdout, proc.stdout[-3000:] + proc.stderr[-6000:]
    # Liger's search for backends of other hardware (xtuner_plugins/quiet.py) is not printed
    assert 'could not be imported' not in proc.stdout + proc.stderr, proc.stderr[-3000:]


def test_parts_named():
    assert liger_parts(False) == () and liger_parts(None) == ()
    assert liger_parts(True) == LIGER_PARTS and liger_parts('fused_loss') == ('fused_loss',)
    # --cfg-options model.liger_kernel=1 (or 0) reads as an int: True (False), not a raw TypeError
    assert liger_parts(1) == LIGER_PARTS and liger_parts(0) == ()
    for bad in ('flash', ['rope', 'layer_norm'], [], 2, 1.0, {'rope': True, 'fused_loss': False}):
        with pytest.raises(ValueError, match='liger_kernel='):
            liger_parts(bad)


def test_refused_without_a_gpu_or_beside_what_it_cannot_join(tiny, monkeypatch):
    llm = torch.nn.Module()
    monkeypatch.delenv('TRITON_INTERPRET', raising=False)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match='needs a CUDA GPU'):
            build(tiny, liger_kernel=True)
    with pytest.raises(ValueError, match='compile_blocks fuse the same work'):
        build(tiny, liger_kernel=True, compile_blocks='llm')
    with pytest.raises(ValueError, match='ZeRO-3'):
        check_liger(['rope', 'fused_loss'], zero3=True)
    monkeypatch.setenv('TRITON_INTERPRET', '1')   # past the device check, refused before anything is patched
    llm.config = type('Config', (), {'model_type': 'nonesuch'})()
    with pytest.raises(ValueError, match="no kernels for Module \\(model_type 'nonesuch'\\).*'fused_loss'"):
        apply_liger(llm, ('rope', 'rms_norm'))


def test_fused_loss_refuses_a_wrapped_lm_head(tiny, monkeypatch):
    """LoRA on the LM head: the fused loss multiplies by the head's weight alone, which would leave the adapter
    out of the loss; refused when the model is built."""
    monkeypatch.setenv('TRITON_INTERPRET', '1')
    lora = dict(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=['q_proj', 'lm_head'])
    with pytest.raises(ValueError, match='LoRA on lm_head'):
        build(tiny, llm_lora=lora, liger_kernel=['fused_loss'])


def test_fused_loss_refuses_logits_soft_capped_after_the_head_when_applied():
    """Gemma-2's soft-capping after the LM head: the fused loss would leave it out; refused when Liger is applied
    (the model's build), naming the part, not at the first step."""
    from transformers import LlamaConfig, LlamaForCausalLM
    llm = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                       num_attention_heads=2, num_key_value_heads=2, final_logit_softcapping=30.0))
    with pytest.raises(ValueError, match="^liger_kernel's 'fused_loss': .*final_logit_softcapping=30.0"):
        apply_liger(llm, ('fused_loss',))


def test_refused_before_the_llm_loads(tiny, monkeypatch):
    """No GPU, or beside compile_blocks: refused before any weight loads (minutes for a large LLM), not after."""
    import xtuner_plugins.models.internvl as internvl

    def loaded(*args, **kwargs):
        raise AssertionError('the model was loaded before liger_kernel was refused')
    monkeypatch.setattr(internvl, 'build_parts', loaded)
    monkeypatch.delenv('TRITON_INTERPRET', raising=False)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match='needs a CUDA GPU'):
            build(tiny, liger_kernel=True)
    with pytest.raises(ValueError, match='compile_blocks fuse the same work'):
        build(tiny, liger_kernel=['rope'], compile_blocks='llm')
    with pytest.raises(ValueError, match='liger_kernel='):
        build(tiny, liger_kernel='flash')


def test_preference_training_leaves_the_fused_loss_out(tiny, monkeypatch):
    """The fused loss is the SFT loss; preference training's log-probabilities take the whole logits
    (``preference.pair_loss``): 'fused_loss' is left out with a log line, so neither the model nor the planner
    counts on it, and ZeRO-3 (which refuses it) is not refused for it."""
    from xtuner_plugins.models import liger
    from xtuner_plugins.plan_configs.meta import build_meta_model
    monkeypatch.setenv('TRITON_INTERPRET', '1')   # past the device check; 'fused_loss' alone patches nothing
    assert check_liger(True, zero3=True, preference=True) == ('rms_norm', 'swiglu', 'rope')
    lines = []
    monkeypatch.setattr(liger, 'print_log', lambda msg, *a, **k: lines.append(msg))
    lora = dict(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=['q_proj'])
    settings = dict(llm_lora=lora, freeze_projector=True, preference=dict(beta=0.1), liger_kernel=['fused_loss'])
    model = build(tiny, **settings)
    assert model.liger_kernel == ()
    assert any("'fused_loss' left out" in line for line in lines), lines
    meta = build_meta_model(dict(settings, vision_encoder=tiny['internvit'], llm=tiny['llm']), 'float32')
    assert 'fused_loss' not in meta.liger_kernel


def test_the_planner_refuses_what_training_refuses(tiny, capsys):
    """tools/plan.py plans on a machine without the GPU, but a run that training would refuse (the fused loss
    under ZeRO-3, Liger beside compile_blocks) is refused there too, in one line, not planned."""
    from xtuner_plugins.cli.plan import main
    cmd = [os.path.join(ROOT, 'configs/finetune_full.py'), '--gpus', '2', '--gpu-mem', '80', '--cfg-options',
           f'model.vision_encoder={tiny["internvit"]}', f'model.llm={tiny["llm"]}']
    assert main(cmd + ['model.liger_kernel=True', '--zero', '3']) == 2
    assert "leave 'fused_loss' out under ZeRO-3" in capsys.readouterr().err
    assert main(cmd + ['model.liger_kernel=[rope]', 'model.compile_blocks=llm']) == 2
    assert 'compile_blocks fuse the same work' in capsys.readouterr().err
    assert main(cmd + ['model.liger_kernel=[rope,swiglu]', '--zero', '3']) == 0   # planned without a GPU
    assert ': fits' in capsys.readouterr().out
