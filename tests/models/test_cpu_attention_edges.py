"""models/cpu_attention.py with inputs it was not written around (an adversarial sweep's finds): NaN scores, bounds
near the int64 limits, empty batches, inputs the ops would read as raw pointers, the log-sum-exp's gradient,
deterministic algorithms, functorch transforms, a cached library without the kernel's functions."""

import shutil

import pytest
import torch
import torch.nn.functional as F

from tests.models.test_cpu_attention import PAYS, qkv
from xtuner_plugins.models import attention as attention_module
from xtuner_plugins.models import cpu_attention as ca
from xtuner_plugins.models import cpu_attention_build as kb
from xtuner_plugins.models import cpu_attention_ops as ko

needs_kernel = pytest.mark.skipif(not PAYS, reason='runs the AVX-512 BF16 kernel: this CPU has no AVX-512 BF16 or '
                                                   'has AMX')


@needs_kernel
@pytest.mark.parametrize('causal', [False, True])
def test_a_nan_key_gives_nan_as_sdpa_does(causal):
    """exp() clamped its argument with vmaxps, which returns the clamp for a NaN: a NaN score weighed 0 and a
    diverging run's NaN came out finite."""
    q, k, v = qkv(1, 2, 40, 40, 64)
    k = k.clone()
    k[0, 0, 5, 3] = float('nan')
    module = torch.nn.Module()
    assert ca.takes(module, q, k, v, None, 0.0, causal, 0.125, {})
    ours = ca.attention(module, q, k, v, None, is_causal=causal)[0]
    sdpa = F.scaled_dot_product_attention(q, k, v, is_causal=causal).transpose(1, 2)
    assert torch.equal(ours.isnan(), sdpa.isnan()) and ours.isnan().any()
    q, kk, vv = (t.detach().clone().requires_grad_() for t in (q, k, v))
    ca.kernel_attention(q, kk, vv, 0.125, causal).float().sum().backward()
    assert kk.grad[0, 0].isnan().any()   # the backward's exp too


@needs_kernel
@pytest.mark.parametrize('bounds', [[0, 2 ** 63 - 1, -2 ** 63 + 17, 12], [0, 5, 2 ** 63 - 1, -2 ** 63 + 20, 12],
                                    [0, 13, 12, 12]])
def test_bounds_past_the_row_are_refused_even_where_their_differences_wrap(bounds):
    """Only a negative difference was refused: differences that overflow int64 wrapped to positive lengths and the
    kernel read far past the row (SIGSEGV)."""
    q, k, v = qkv(1, 2, 12, 12, 16)
    with pytest.raises(RuntimeError, match=r'refused .*sizes it does not take'):
        ko.cpu_bf16_attention(q, k, v, 0.25, True, torch.tensor([bounds]))


@pytest.mark.parametrize('shape', [(0, 2, 8, 16), (1, 0, 8, 16), (1, 2, 8, 0)])
def test_an_empty_batch_heads_or_width_goes_to_sdpa(shape):
    """The kernel refused them ('sizes it does not take'; no width: a ZeroDivisionError) where SDPA returns an
    empty result."""
    q = torch.randn(shape).to(torch.bfloat16)
    k = torch.randn(shape[0], max(shape[1], 1), shape[2], shape[3]).to(torch.bfloat16)
    out = ca.attention(torch.nn.Module(), q, k, k, None, is_causal=False)[0]
    assert out.shape == (shape[0], shape[2], shape[1], shape[3])
    if shape[1]:
        packed = attention_module.segment_sdpa(torch.nn.Module(), q, k, k, None,
                                               segment_bounds=torch.tensor([[0, 8]] * shape[0]).reshape(-1, 2))
        assert packed[0].shape == out.shape


@needs_kernel
@pytest.mark.parametrize('case', ['fp32', 'key batch', 'value rows', 'meta bounds', 'float bounds'])
def test_the_ops_refuse_what_they_would_read_as_raw_memory(case):
    """The ops are public: fp32 was read as bf16 (NaN), a key batch of 1 for 64 queries' was read past (SIGSEGV),
    bounds on the meta device returned uninitialised memory, float bounds were truncated."""
    q, k, v = qkv(2, 2, 12, 12, 16)
    bounds = None
    if case == 'fp32':
        q, k, v = q.float(), k.float(), v.float()
    elif case == 'key batch':
        k, v = k[:1], v[:1]
    elif case == 'value rows':
        v = v[:, :, :1]
    elif case == 'meta bounds':
        bounds = torch.tensor([[0, 5, 12]] * 2, device='meta')
    else:
        bounds = torch.tensor([[0.0, 5.9, 12.0]] * 2)
    with pytest.raises(ValueError, match='the CPU attention kernel takes'):
        ko.cpu_bf16_attention(q, k, v, 0.25, True, bounds)


@needs_kernel
def test_the_log_sum_exp_is_not_differentiable():
    """Its gradient was silently 0 (the backward ignored it)."""
    q, k, v = qkv(1, 2, 16, 16, 32)
    out, lse = ko.cpu_bf16_attention_train(q.clone().requires_grad_(), k, v, 0.25, False)
    assert out.requires_grad and not lse.requires_grad


def test_deterministic_algorithms_and_functorch_transforms_go_to_sdpa():
    """The kernel sums grouped heads' dk and dv in the order its threads finish, and its autograd function has no
    functorch rule: torch.func.grad through the routed attention raised 'must override the setup_context'."""
    q, k, v = qkv(1, 2, 20, 20, 32)
    module = torch.nn.Module()
    torch.use_deterministic_algorithms(True)
    try:
        assert not ca.takes(module, q, k, v, None, 0.0, True, 0.25, {})
    finally:
        torch.use_deterministic_algorithms(False)
    grad = torch.func.grad(lambda x: ca.attention(module, x, k, v, None, is_causal=True)[0].float().sum())(q)
    expected = torch.func.grad(lambda x: F.scaled_dot_product_attention(x, k, v, is_causal=True).float().sum())(q)
    torch.testing.assert_close(grad, expected)


@pytest.mark.skipif(shutil.which('cc') is None and shutil.which('gcc') is None, reason='needs a C compiler')
def test_a_cached_library_without_the_kernels_functions_is_replaced_in_the_same_process(monkeypatch, tmp_path):
    """dlopen of the same path returned the library already open, so the kernel built in its place was never
    loaded in that process ('undefined symbol: attn_fwd', SDPA for the rest of the run)."""
    import ctypes.util
    monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path))
    monkeypatch.setattr(kb, 'FLAGS', kb.FLAGS + ('-DTEST_FOREIGN',))
    path = kb.build()
    libm = ctypes.util.find_library('m')
    found = [p for p in ('/lib/x86_64-linux-gnu/' + (libm or ''), '/usr/lib/x86_64-linux-gnu/' + (libm or ''))
             if libm and __import__('os').path.isfile(p)]
    if not found:
        pytest.skip('no libm file to stand in for a foreign library')
    shutil.copy(found[0], path)
    kb.library.cache_clear()
    try:
        assert kb.library() is not None and hasattr(kb.library(), 'attn_fwd')
    finally:
        kb.library.cache_clear()
