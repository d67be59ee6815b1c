"""models/cpu_attention.py: the AVX-512 BF16 attention kernel for a frozen tower, and what it leaves to SDPA.

The kernel runs only on CPUs with AVX-512 BF16 (it would stop on an illegal instruction elsewhere): on other CPUs
the tests check that nothing is routed to it, and that it still builds.
"""

import warnings

import pytest
import torch
import torch.nn.functional as F

from tests.models.conftest import build
from xtuner_plugins.models import cpu_attention as ca

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
    ours = ca.cpu_bf16_attention(q, k, v, q.shape[-1] ** -0.5)
    sdpa = F.scaled_dot_product_attention(q, k, v).transpose(1, 2)
    assert ours.shape == ref.shape and ours.dtype == torch.bfloat16
    return (ours.float() - ref).abs().max().item(), (sdpa.float() - ref).abs().max().item()


def test_builds_once_into_the_cache(tmp_path):
    first = ca.build(str(tmp_path))
    stamp = tmp_path.stat().st_mtime_ns, (tmp_path / first.split('/')[-1]).stat().st_mtime_ns
    assert ca.build(str(tmp_path)) == first
    assert (tmp_path.stat().st_mtime_ns, (tmp_path / first.split('/')[-1]).stat().st_mtime_ns) == stamp
    assert [p.name for p in tmp_path.iterdir()] == [first.split('/')[-1]]   # no temporary file left


def test_no_compiler_warns_and_sdpa_runs(monkeypatch, tmp_path):
    monkeypatch.setenv('CC', '/bin/false')
    monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path))
    monkeypatch.setattr(ca, 'FLAGS', ca.FLAGS + ('-DTEST_NEW_KEY',))   # not in any cache
    ca.library.cache_clear()
    try:
        with pytest.warns(UserWarning, match='not available.*/bin/false failed'):
            assert ca.library() is None
        q, k, v = qkv(1, 2, 9, 9, 16)
        assert not ca.takes(q, k, v, None, 0.0, False, {})
        out, _ = ca.attention(torch.nn.Module(), q, k, v, None, is_causal=False)
        torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v).transpose(1, 2))
    finally:
        ca.library.cache_clear()


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


def test_not_routed_where_it_does_not_pay(tiny, monkeypatch):
    monkeypatch.setattr(ca, 'cpu_pays', lambda: False)
    model = build(tiny, torch_dtype='bfloat16')
    assert model.vision_model.config._attn_implementation == 'sdpa'


@pytest.mark.skipif(not PAYS, reason='runs the AVX-512 BF16 kernel (see test_not_routed_where_it_does_not_pay)')
def test_a_frozen_tower_is_routed_and_gives_sdpas_features(tiny):
    pixels = torch.randn(3, 3, 56, 56, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    routed, plain = build(tiny, torch_dtype='bfloat16'), build(tiny, torch_dtype='bfloat16', vision_cpu_attention=False)
    assert routed.vision_model.config._attn_implementation == ca.NAME
    assert plain.vision_model.config._attn_implementation == 'sdpa'
    calls = []
    real = ca.cpu_bf16_attention
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


@pytest.mark.parametrize('case', ['mask', 'dropout', 'causal', 'grad', 'fp32', 'gqa', 'odd width'])
def test_what_the_kernel_does_not_compute_goes_to_sdpa(case, monkeypatch):
    def refuse(*a):
        raise AssertionError(f'the kernel was called for {case}')
    monkeypatch.setattr(ca, 'cpu_bf16_attention', refuse)
    q, k, v = qkv(1, 2, 6, 6, 15 if case == 'odd width' else 16)
    kw = dict(attention_mask=None, dropout=0.0, is_causal=False)
    if case == 'mask':
        kw['attention_mask'] = torch.zeros(1, 1, 6, 6, dtype=torch.bfloat16)
    elif case == 'dropout':
        kw['dropout'] = 0.1
    elif case == 'causal':
        kw['is_causal'] = True
    elif case == 'grad':
        q.requires_grad_(True)
    elif case == 'fp32':
        q, k, v = q.float(), k.float(), v.float()
    elif case == 'gqa':
        k, v = k[:, :1], v[:, :1]
    module = torch.nn.Module()
    module.num_key_value_groups = 2 if case == 'gqa' else 1
    torch.manual_seed(0)
    out, _ = ca.attention(module, q, k, v, **kw)
    assert out.shape == (1, 6, 2, q.shape[-1])
    # what SDPA gives (not the kernel): the same call to transformers' function
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    torch.manual_seed(0)
    torch.testing.assert_close(out, sdpa_attention_forward(module, q, k, v, **kw)[0])


@pytest.mark.skipif(not PAYS, reason='runs the AVX-512 BF16 kernel (see test_not_routed_where_it_does_not_pay)')
def test_the_op_passes_torch_opcheck():
    """Its fake (meta) implementation matches it, so a compiled tower keeps it in the graph."""
    q, k, v = qkv(2, 2, 9, 11, 16)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        torch.library.opcheck(ca.cpu_bf16_attention, (q, k, v, 0.25))
