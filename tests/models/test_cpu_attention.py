"""models/cpu_attention.py (with cpu_attention_build.py and cpu_attention_ops.py): the AVX-512 BF16 attention
kernels (a frozen tower's, the LLM's forward and backward), and what they leave to SDPA.

The kernel runs only on CPUs with AVX-512 BF16 (it would stop on an illegal instruction elsewhere): on other CPUs
the tests check that nothing is routed to it, and that it still builds.
"""

import os
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from tests.models.conftest import build
from tests.models.test_packing import split_batch
from xtuner_plugins.data import internvl_collate_fn
from xtuner_plugins.data.packing import pack_items
from xtuner_plugins.models import cpu_attention as ca
from xtuner_plugins.models import cpu_attention_build as kb
from xtuner_plugins.models import cpu_attention_ops as ko

PAYS = ca.cpu_pays()


def qkv(b, h, n, m, d, seed=0, layout='bnhd'):
    g = torch.Generator().manual_seed(seed)

    def one(length, scale=1.0):
        x = (torch.randn(b, length, h, d, generator=g) * scale).to(torch.bfloat16)
        return x.transpose(1, 2) if layout == 'bnhd' else x.transpose(1, 2).contiguous()
    return one(n), one(m, 2.0), one(m)


def errors(q, k, v):
    """The kernel's and SDPA's (bf16) largest errors against SDPA in fp32, in the kernel's [B, N, H, D] layout."""
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float()).transpose(1, 2)
    ours = ko.cpu_bf16_attention(q, k, v, q.shape[-1] ** -0.5)
    sdpa = F.scaled_dot_product_attention(q, k, v).transpose(1, 2)
    assert ours.shape == ref.shape and ours.dtype == torch.bfloat16
    return (ours.float() - ref).abs().max().item(), (sdpa.float() - ref).abs().max().item()


def test_builds_once_into_the_cache(tmp_path):
    first = kb.build(str(tmp_path))
    stamp = tmp_path.stat().st_mtime_ns, (tmp_path / first.split('/')[-1]).stat().st_mtime_ns
    assert kb.build(str(tmp_path)) == first
    assert (tmp_path.stat().st_mtime_ns, (tmp_path / first.split('/')[-1]).stat().st_mtime_ns) == stamp
    assert [p.name for p in tmp_path.iterdir()] == [first.split('/')[-1]]   # no temporary file left


def test_no_compiler_warns_and_sdpa_runs(monkeypatch, tmp_path):
    monkeypatch.setenv('CC', '/bin/false')
    monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path))
    monkeypatch.setattr(kb, 'FLAGS', kb.FLAGS + ('-DTEST_NEW_KEY',))   # not in any cache
    kb.library.cache_clear()
    try:
        with pytest.warns(UserWarning, match='not available.*/bin/false failed'):
            assert kb.library() is None
        q, k, v = qkv(1, 2, 9, 9, 16)
        assert not ca.takes(torch.nn.Module(), q, k, v, None, 0.0, False, 0.25, {})
        out, _ = ca.attention(torch.nn.Module(), q, k, v, None, is_causal=False)
        torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v).transpose(1, 2))
    finally:
        kb.library.cache_clear()


def test_a_cc_that_does_not_parse_or_a_shared_cache_leaves_sdpa(monkeypatch, tmp_path):
    """$CC with an unclosed quote raised shlex's ValueError out of the model's build; a library in another user's
    cache folder (a shared $XDG_CACHE_HOME) was loaded, and ran as this process. Both warn and keep SDPA; this
    user's own folder that others could write is made private."""
    monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path))
    monkeypatch.setenv('CC', 'gcc "')
    kb.library.cache_clear()
    try:
        with pytest.warns(UserWarning, match='not available .*CC .*does not read as a command'):
            assert kb.library() is None
        monkeypatch.delenv('CC')
        kb.library.cache_clear()
        path = kb.build()   # a good build, in a private folder
        kb.library.cache_clear()
        assert kb.library() is not None
        os.chmod(os.path.dirname(path), 0o777)   # this user's own, made by an earlier version: made private
        kb.library.cache_clear()
        assert kb.library() is not None and not os.stat(os.path.dirname(path)).st_mode & 0o022
        monkeypatch.setattr(os, 'getuid', lambda: os.stat(path).st_uid + 1)   # another user's folder and file
        kb.library.cache_clear()
        with pytest.warns(UserWarning, match='is not yours: a kernel built there is not loaded'):
            assert kb.library() is None
    finally:
        kb.library.cache_clear()


def test_a_cached_build_that_does_not_load_is_built_again(monkeypatch, tmp_path):
    """A build cut short (an empty file under the final name) was loaded, failed, and kept SDPA for good."""
    monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path))
    monkeypatch.setattr(kb, 'FLAGS', kb.FLAGS + ('-DTEST_REBUILD',))
    path = kb.build()
    open(path, 'wb').close()
    kb.library.cache_clear()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter('error')   # no "not available" warning
            assert kb.library() is not None
        assert os.path.getsize(path) > 0
    finally:
        kb.library.cache_clear()


@pytest.mark.skipif(not PAYS, reason='runs the AVX-512 BF16 kernel: this CPU has no AVX-512 BF16 or has AMX '
                                      '(test_not_routed_where_it_does_not_pay covers it)')
@pytest.mark.parametrize('shape,layout', [
    ((7, 16, 1025, 1025, 64), 'bnhd'),   # InternViT-300M at 7 tiles, as transformers hands it over (strided)
    ((2, 3, 37, 53, 64), 'contiguous'),  # rows and keys not whole tiles
    ((1, 2, 50, 70, 80), 'bnhd'),        # a width not a multiple of 64
    ((2, 2, 33, 33, 72), 'bnhd'),        # SigLIP-so400m's 72-wide heads: padded to 80
    ((1, 3, 100, 100, 128), 'contiguous'),
    ((1, 1, 5, 1, 16), 'bnhd'),          # one key
    ((3, 1, 1, 4, 2), 'bnhd'),           # one query, a 2-wide head
])
def test_matches_sdpa(shape, layout):
    ours, sdpa = errors(*qkv(*shape, layout=layout))
    assert ours <= 1.5 * sdpa + 2e-3, (ours, sdpa)


@pytest.mark.skipif(not PAYS, reason='runs the AVX-512 BF16 kernel (see test_not_routed_where_it_does_not_pay)')
@pytest.mark.parametrize('shape,causal', [
    ((1, 14, 2, 300, 300, 64), True),    # Qwen2.5-0.5B's heads: 7 query heads a key/value head
    ((2, 3, 3, 100, 100, 80), False),
    ((1, 4, 2, 37, 37, 64), True),        # fewer queries than a block
    ((1, 2, 1, 5, 5, 16), True),
    ((2, 2, 2, 50, 130, 72), False),      # more keys than queries
])
def test_gradients_match_sdpa(shape, causal):
    """Output and dq, dk, dv against fp32 SDPA, no further off than bf16 SDPA (its dk and dv are summed over the
    query heads of a key/value head in fp32: closer)."""
    b, h, kv, n, m, d = shape
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(b, length, heads, d, generator=g).to(torch.bfloat16).transpose(1, 2)
               for length, heads in ((n, h), (m, kv), (m, kv)))
    grad = torch.randn(b, n, h, d, generator=g).to(torch.bfloat16)

    def attend(kernel, qq, kk, vv):
        return ca.kernel_attention(qq, kk, vv, d ** -0.5, causal) if kernel else F.scaled_dot_product_attention(
            qq, kk, vv, is_causal=causal, enable_gqa=kv != h).transpose(1, 2)
    assert_gradients_near_sdpas(attend, q, k, v, grad)


def assert_gradients_near_sdpas(attend, q, k, v, grad):
    """``attend(kernel, q, k, v)`` (``[B, N, H, D]``) on the kernel in bf16: its output and dq, dk, dv no further
    from SDPA's in fp32 than SDPA's in bf16 are (1.5x, plus 1% of the largest)."""
    def run(kernel, dtype):
        qq, kk, vv = (t.detach().to(dtype).requires_grad_() for t in (q, k, v))
        out = attend(kernel, qq, kk, vv)
        out.backward(grad.to(dtype))
        return [t.float() for t in (out, qq.grad, kk.grad, vv.grad)]
    ref, ours, sdpa = run(False, torch.float32), run(True, torch.bfloat16), run(False, torch.bfloat16)
    for name, r, a, s in zip(('out', 'dq', 'dk', 'dv'), ref, ours, sdpa):
        err, bound = (a - r).abs().max().item(), 1.5 * (s - r).abs().max().item() + 0.01 * r.abs().max().item()
        assert err <= bound, (name, err, bound)


@pytest.mark.skipif(not PAYS, reason='runs the AVX-512 BF16 kernel (see test_not_routed_where_it_does_not_pay)')
@pytest.mark.parametrize('heads,width,bounds', [
    ((14, 2), 64, [[0, 7, 100, 100, 299, 300]]),   # Qwen2.5-0.5B's heads; an empty sample; a 1-token one at the end
    ((4, 4), 72, [[0, 50, 257, 257], [0, 1, 2, 257]]),   # two rows of their own bounds (SigLIP's width)
    ((2, 1), 16, [[0, 130]]),   # one sample: the whole row
])
def test_packed_rows_in_one_call_match_sdpa_per_sample(heads, width, bounds):
    """bounds: each sample of each row attended causally on its own in one call, output and gradients against fp32
    SDPA run sample by sample, no further off than bf16 SDPA sample by sample."""
    (h, kv), bounds = heads, torch.tensor(bounds)
    b, n = bounds.shape[0], int(bounds[0, -1])
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(b, n, heads, width, generator=g).to(torch.bfloat16).transpose(1, 2)
               for heads in (h, kv, kv))
    grad = torch.randn(b, n, h, width, generator=g).to(torch.bfloat16)

    def attend(kernel, qq, kk, vv):
        if kernel:
            return ca.kernel_attention(qq, kk, vv, width ** -0.5, True, bounds)
        return torch.cat([torch.cat([F.scaled_dot_product_attention(
            qq[r:r + 1, :, s:e], kk[r:r + 1, :, s:e], vv[r:r + 1, :, s:e], is_causal=True, enable_gqa=kv != h)
            for s, e in zip(cuts[:-1], cuts[1:]) if e > s], 2) for r, cuts in enumerate(bounds.tolist())]).transpose(1, 2)
    assert_gradients_near_sdpas(attend, q, k, v, grad)


@pytest.mark.skipif(not PAYS, reason='runs the AVX-512 BF16 kernel (see test_not_routed_where_it_does_not_pay)')
@pytest.mark.parametrize('bounds', [[[0, 5, 11]], [[1, 5, 12]], [[0, 7, 5, 12]], [[0, 12]] * 2])
def test_bounds_that_do_not_cover_the_row_are_refused(bounds):
    """Bounds that do not run from 0 to the row's length in order (or one row's bounds for two rows) are refused,
    naming them, never read past."""
    q, k, v = qkv(1, 2, 12, 12, 16)
    with pytest.raises(RuntimeError, match=r'refused .*bounds .*sizes it does not take'):
        ko.cpu_bf16_attention(q, k, v, 0.25, True, torch.tensor(bounds))


@pytest.fixture
def packed_batch(batch):
    """The model tests' mixed batch as one pack of its three samples."""
    return internvl_collate_fn([pack_items(split_batch(batch))])['data']


class CountKernel(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.name().startswith('xtuner_plugins::'):
            self.calls[func.name()] = self.calls.get(func.name(), 0) + 1
        return func(*args, **(kwargs or {}))


@pytest.mark.skipif(not PAYS, reason='runs the AVX-512 BF16 kernel (see test_not_routed_where_it_does_not_pay)')
@pytest.mark.parametrize('recipe', ['bf16 weights', 'fp32 trained weights under bf16 autocast'])
def test_packed_llm_attention_trains_on_the_kernel_and_checkpointing_keeps_it(tiny, packed_batch, recipe):
    """sdpa_segments: every sample of a pack on the kernel in one call per row (no loop over samples), forward and
    backward, with bf16 weights and with the
    full fine-tuning recipe (fp32 trained weights under bf16 autocast, whose fp32 residual stream makes the queries
    fp32 through RoPE: the kernel was left out there at first); checkpointing that keeps attention never runs it
    again; the loss and gradients as with no checkpointing, and near SDPA's."""
    import contextlib
    autocast = recipe.startswith('fp32')
    runs = {}
    for name, kw in (('sdpa', dict(cpu_attention=False)), ('kernel', {}), ('kept', dict(llm_grad_ckpt=True))):
        torch.manual_seed(0)
        model = build(tiny, torch_dtype='bfloat16', trainable_fp32=autocast, freeze_llm=False,
                      attn_implementation='sdpa_segments', **kw).train()
        context = torch.autocast('cpu', torch.bfloat16) if autocast else contextlib.nullcontext()
        with CountKernel() as count:
            with context:
                loss = model(packed_batch, mode='loss')['loss']
            loss.backward()
        runs[name] = loss.item(), {n: p.grad.float() for n, p in model.named_parameters() if p.requires_grad}, \
            count.calls
    assert sum(len(lens) for lens in packed_batch['seq_lens']) > 1   # packs of samples: one call for them all
    layers = 2   # the tiny LLM's and the tiny tower's
    assert runs['sdpa'][2] == {}
    assert runs['kernel'][2] == {'xtuner_plugins::cpu_bf16_attention_train': layers,
                                 'xtuner_plugins::cpu_bf16_attention_backward': layers,
                                 'xtuner_plugins::cpu_bf16_attention': layers}   # the frozen tower's, forward only
    assert runs['kept'][2] == runs['kernel'][2]
    assert runs['kept'][0] == pytest.approx(runs['kernel'][0], rel=1e-3)
    assert runs['kernel'][0] == pytest.approx(runs['sdpa'][0], rel=2e-2)
    for name, g in runs['kernel'][1].items():
        torch.testing.assert_close(runs['kept'][1][name], g, rtol=2e-2, atol=2e-3, msg=lambda m: f'kept {name}: {m}')
        scale = g.abs().max().item()
        assert (runs['sdpa'][1][name] - g).abs().max().item() <= 0.1 * scale + 1e-3, name


@pytest.mark.skipif(not PAYS, reason='runs the AVX-512 BF16 kernel (see test_not_routed_where_it_does_not_pay)')
def test_the_llm_under_sdpa_trains_on_the_kernel_and_plans_as_sdpa(tiny, batch):
    """attn_implementation='sdpa' (the unpacked configs): the LLM's config names the kernel's function, whose masks
    are SDPA's; a row without padding trains on the kernel, a padded batch (a mask) on SDPA; the planner and the
    mask choice read it as 'sdpa'."""
    from xtuner_plugins.plan_activations import Batch, activation_bytes
    one = internvl_collate_fn([pack_items(split_batch(batch)[:1])])['data']   # one sample: no padding
    one.pop('seq_lens', None)
    runs = {}
    for name, kw in (('sdpa', dict(cpu_attention=False)), ('kernel', {})):
        torch.manual_seed(0)
        model = build(tiny, torch_dtype='bfloat16', trainable_fp32=False, freeze_llm=False, llm_grad_ckpt=True,
                      **kw).train()
        with CountKernel() as count:
            loss = model(one, mode='loss')['loss']
            loss.backward()
            model(batch, mode='loss')['loss'].backward()   # padded rows: SDPA (the forward and its recomputation)
        runs[name] = model, loss.item(), count.calls
    routed, plain = runs['kernel'][0], runs['sdpa'][0]
    assert routed.language_model.config._attn_implementation == ca.NAME
    assert plain.language_model.config._attn_implementation == 'sdpa' and runs['sdpa'][2] == {}
    layers = 2
    assert runs['kernel'][2] == {'xtuner_plugins::cpu_bf16_attention_train': layers,
                                 'xtuner_plugins::cpu_bf16_attention_backward': layers,
                                 'xtuner_plugins::cpu_bf16_attention': 2 * layers}   # the tower, both batches
    assert runs['kernel'][1] == pytest.approx(runs['sdpa'][1], rel=2e-2)
    step = Batch(rows=2, length=64, tiles=4, supervised=20, packed=True)
    assert activation_bytes(routed, step) == activation_bytes(plain, step)


@pytest.mark.skipif(not PAYS, reason='runs the AVX-512 BF16 kernel (see test_not_routed_where_it_does_not_pay)')
def test_the_reference_policy_computes_as_the_policy(tiny, batch):
    """Full preference training under sdpa: the reference LLM (a copy made before the LLM was routed) stayed on SDPA,
    so the policy's and the reference's log-probabilities differed at step 0 (a review)."""
    from xtuner_plugins.models.preference import MPO
    model = build(tiny, torch_dtype='bfloat16', trainable_fp32=False, freeze_llm=False, preference=dict(MPO))
    assert model.language_model.config._attn_implementation == ca.NAME
    assert model.reference['language_model'].config._attn_implementation == ca.NAME


def test_not_routed_where_it_does_not_pay(tiny, monkeypatch):
    monkeypatch.setattr(ca, 'cpu_pays', lambda: False)
    model = build(tiny, torch_dtype='bfloat16')
    assert model.vision_model.config._attn_implementation == 'sdpa'
    assert model.language_model.config._attn_implementation == 'sdpa'


@pytest.mark.skipif(not PAYS, reason='runs the AVX-512 BF16 kernel (see test_not_routed_where_it_does_not_pay)')
def test_a_frozen_tower_is_routed_and_gives_sdpas_features(tiny):
    pixels = torch.randn(3, 3, 56, 56, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    routed, plain = build(tiny, torch_dtype='bfloat16'), build(tiny, torch_dtype='bfloat16', cpu_attention=False)
    assert routed.vision_model.config._attn_implementation == ca.NAME
    assert plain.vision_model.config._attn_implementation == 'sdpa'
    calls = []
    real = ca.cpu_bf16_attention   # kernel_attention looks it up in cpu_attention
    try:
        ca.cpu_bf16_attention = lambda *a: calls.append(a[0].shape) or real(*a)
        with torch.no_grad():
            ours = routed.vision.features(routed.vision_model, pixels)
            theirs = plain.vision.features(plain.vision_model, pixels)
    finally:
        ca.cpu_bf16_attention = real
    assert len(calls) == routed.vision_model.config.num_hidden_layers
    torch.testing.assert_close(ours, theirs, atol=0.05, rtol=0.05)
    for kw in (dict(freeze_vision=False), dict(vision_lora=dict(r=2, target_modules=['fc1']))):
        assert build(tiny, torch_dtype='bfloat16', **kw).vision_model.config._attn_implementation == 'sdpa', kw


@pytest.mark.parametrize('case', ['mask', 'dropout', 'causal, more keys', 'odd width', 'fp32', 'opted out',
                                  'heads not a multiple', 'negative scale', 'fp16 autocast'])
def test_what_the_kernel_does_not_compute_goes_to_sdpa(case, monkeypatch):
    def refuse(*a):
        raise AssertionError(f'the kernel was called for {case}')
    monkeypatch.setattr(ca, 'cpu_bf16_attention', refuse)
    q, k, v = qkv(1, 3, 6, 8 if case.startswith('causal') else 6, 15 if case == 'odd width' else 16)
    kw = dict(attention_mask=None, dropout=0.0, is_causal=False)
    module = torch.nn.Module()
    module.num_key_value_groups = 1
    if case == 'mask':
        kw['attention_mask'] = torch.zeros(1, 1, 6, 6, dtype=torch.bfloat16)
    elif case == 'dropout':
        kw['dropout'] = 0.1
    elif case.startswith('causal'):
        kw['is_causal'] = True
    elif case == 'fp32':
        q, k, v = q.float(), k.float(), v.float()
    elif case == 'opted out':
        ca.opt_out(module)
    elif case == 'heads not a multiple':
        k, v = k[:, :2], v[:, :2]
        module.num_key_value_groups = 2   # transformers repeats them (3 / 2 heads: its own error), not the kernel
    elif case == 'negative scale':   # the kernel's row maximum assumes a positive one (it gave NaN)
        kw['scaling'] = -0.25
    torch.manual_seed(0)
    if case == 'heads not a multiple':
        assert not ca.takes(module, q, k, v, None, 0.0, False, 0.25, {})
        return
    if case == 'fp16 autocast':   # SDPA runs (and returns) fp16 there
        with torch.autocast('cpu', torch.float16):
            assert ca.attention(module, q, k, v, **kw)[0].dtype == torch.float16
        return
    out, _ = ca.attention(module, q, k, v, **kw)
    assert out.shape == (1, 6, 3, q.shape[-1])
    # what SDPA gives (not the kernel): the same call to transformers' function
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    torch.manual_seed(0)
    torch.testing.assert_close(out, sdpa_attention_forward(module, q, k, v, **kw)[0])


@pytest.mark.skipif(not PAYS, reason='runs the AVX-512 BF16 kernel (see test_not_routed_where_it_does_not_pay)')
def test_the_ops_pass_torch_opcheck():
    """Their fake (meta) implementations match them, strides included, so a compiled graph keeps them whole."""
    q, k, v = qkv(2, 2, 9, 11, 16)
    qc, kc, vc = qkv(1, 4, 12, 12, 16, layout='contiguous')   # dq comes back transposed all the same
    kc, vc = kc[:, :2].contiguous(), vc[:, :2].contiguous()
    out, lse = ko.cpu_bf16_attention_train(qc, kc, vc, 0.25, True)
    grad = torch.randn(out.shape).to(torch.bfloat16)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        torch.library.opcheck(ko.cpu_bf16_attention, (q, k, v, 0.25))
        torch.library.opcheck(ko.cpu_bf16_attention_train, (qc, kc, vc, 0.25, True))
        torch.library.opcheck(ko.cpu_bf16_attention_backward, (grad, qc, kc, vc, out, lse, 0.25, True))
        bounds = torch.tensor([[0, 5, 12]])   # a packed row of two samples
        out, lse = ko.cpu_bf16_attention_train(qc, kc, vc, 0.25, True, bounds)
        torch.library.opcheck(ko.cpu_bf16_attention_train, (qc, kc, vc, 0.25, True, bounds))
        torch.library.opcheck(ko.cpu_bf16_attention_backward, (grad, qc, kc, vc, out, lse, 0.25, True, bounds))
