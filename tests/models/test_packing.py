"""A pack gives each sample the logits, loss and gradients it gets alone, under each attention implementation
(SDPA and eager with the dense block-diagonal mask, FlexAttention with its document-causal ``BlockMask``, and
``sdpa_segments``: SDPA on each sample of a pack in turn, with no mask at all).

(RoPE makes attention scores depend only on relative positions, so with the block-diagonal mask the
restarting position ids do not change these logits; they matter to flash attention's varlen path, which
finds the sample boundaries from them, and are checked in tests/data/test_packing.py.)

FlexAttention runs through ``torch.compile`` (transformers compiles it; on a CPU inductor builds C++ kernels
with the system compiler, about 20 s the first time) and has no backward on a CPU: there its gradient check
trains ``lm_head`` only (the hidden states still come through the packed attention); with CUDA, the LLM."""

import pytest
import torch

from tests.models.conftest import build
from xtuner_plugins.data import internvl_collate_fn
from xtuner_plugins.data.packing import pack_items
from xtuner_plugins.models.loss import causal_lm_loss


def split_batch(batch):
    """The collated (unpacked) batch back into per-sample items."""
    items, t = [], 0
    for b in range(batch['input_ids'].shape[0]):
        n = int(batch['attention_mask'][b].sum())
        k = int(batch['num_tiles'][b])
        items.append(dict(input_ids=batch['input_ids'][b, :n], labels=batch['labels'][b, :n],
                          pixel_values=batch['pixel_values'][t:t + k], image_flags=batch['image_flags'][t:t + k],
                          num_tiles=k))
        t += k
    return items


ATTNS = ['sdpa', 'eager', 'flex_attention', 'sdpa_segments']


@pytest.mark.parametrize('attn', ATTNS)
def test_pack_equals_samples_one_by_one(tiny, batch, attn):
    model = build(tiny, attn_implementation=attn).eval()
    items = split_batch(batch)
    packed = internvl_collate_fn([pack_items(items)])['data']
    with torch.no_grad():
        pack_logits = model(packed, mode='tensor')[0]
        start = 0
        for item in items:
            alone = model(internvl_collate_fn([item])['data'], mode='tensor')[0]
            n = alone.shape[0]
            assert (pack_logits[start:start + n] - alone).abs().max() < 1e-5
            start += n


def test_flex_attention_logits_equal_sdpa_logits(tiny, batch):
    """Flex attention's own masks (padded rows and packs) against SDPA with transformers' causal mask and the
    dense block-diagonal one: the same-model comparisons above cannot see a mask wrong the same way for both."""
    sdpa, flex = build(tiny).eval(), build(tiny, attn_implementation='flex_attention').eval()
    flex.load_state_dict(super(type(sdpa), sdpa).state_dict())
    packed = internvl_collate_fn([pack_items(split_batch(batch))])['data']
    with torch.no_grad():
        for data in (batch, packed):
            real = data['attention_mask']
            torch.testing.assert_close(flex(data, mode='tensor')[real], sdpa(data, mode='tensor')[real],
                                       rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('attn', ATTNS)
@pytest.mark.parametrize('reduction', ['token', 'sample', 'square'])
def test_pack_loss_equals_unpacked_loss(tiny, batch, reduction, attn):
    model = build(tiny, loss_reduction=reduction, attn_implementation=attn).eval()
    packed = internvl_collate_fn([pack_items(split_batch(batch))])['data']
    with torch.no_grad():
        unpacked_loss = model(batch, mode='loss')['loss']
        packed_loss = model(packed, mode='loss')['loss']
        # the same reduction without sample boundaries would count the pack as one sample
        plain = causal_lm_loss(model(packed, mode='tensor'), packed['labels'], reduction)
    assert packed_loss.item() == pytest.approx(unpacked_loss.item(), rel=1e-5)
    if reduction != 'token':
        assert plain.item() != pytest.approx(unpacked_loss.item(), rel=1e-4)


@pytest.mark.parametrize('attn', ATTNS)
def test_pack_gradients_equal_unpacked_gradients(tiny, batch, attn, reduction='square'):
    device = 'cuda' if torch.cuda.is_available() else 'cpu'
    model = build(tiny, loss_reduction=reduction, attn_implementation=attn, freeze_llm=False).to(device).eval()
    if attn == 'flex_attention' and device == 'cpu':  # no FlexAttention backward on a CPU (module docstring)
        for name, param in model.named_parameters():
            param.requires_grad_(name.startswith('language_model.lm_head.'))
    trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trained

    def grads(data):
        model.zero_grad()
        model({k: v.to(device) if torch.is_tensor(v) else v for k, v in data.items()}, mode='loss')['loss'].backward()
        return {n: p.grad.clone() for n, p in trained.items()}
    unpacked = grads(batch)
    packed = grads(internvl_collate_fn([pack_items(split_batch(batch))])['data'])
    assert any(g.abs().max() > 0 for g in unpacked.values())
    for name in trained:
        torch.testing.assert_close(packed[name], unpacked[name], rtol=1e-4, atol=1e-6, msg=lambda m: f'{name}: {m}')


def test_segment_attention_builds_no_dense_mask(tiny, batch, monkeypatch):
    """``sdpa_segments`` never makes the ``L x L`` mask (ours, nor transformers' packed-sequence one), and its
    attention function sees each sample's bounds."""
    import xtuner_plugins.models.attention as attention
    model = build(tiny, attn_implementation='sdpa_segments').eval()
    monkeypatch.setattr(attention, 'block_causal_mask', lambda *a, **k: pytest.fail('a dense mask was built'))
    seen = []
    real = attention.segment_sdpa

    def spy(module, query, key, value, attention_mask, **kwargs):
        seen.append((attention_mask, kwargs.get('segment_bounds')))
        return real(module, query, key, value, attention_mask, **kwargs)
    from transformers import AttentionInterface
    AttentionInterface.register('sdpa_segments', spy)
    try:
        items = split_batch(batch)
        packed = internvl_collate_fn([pack_items(items)])['data']
        with torch.no_grad():
            model(packed, mode='loss')
    finally:
        AttentionInterface.register('sdpa_segments', real)
    lengths = [int(n) for n in packed['seq_lens'][0]]
    assert seen and all(mask is None for mask, _ in seen)
    assert seen[0][1].tolist() == [[0] + [sum(lengths[:i + 1]) for i in range(len(lengths))]]


def test_sample_index_numbers_the_samples_of_the_batch_row_after_row():
    from xtuner_plugins.models.attention import packed_segments, sample_index
    segments = packed_segments([[2, 2], [3], [1], [1, 1, 3]], 5, 'cpu')
    segments[2] = -1  # a row of padding only holds no sample
    index, per_row = sample_index(segments)
    assert per_row.tolist() == [2, 1, 0, 3]
    assert index.tolist() == [[0, 0, 1, 1, -1], [2, 2, 2, -1, -1], [-1] * 5, [3, 4, 5, 5, 5]]


@pytest.mark.parametrize('length', [1, 127, 128, 129, 700, 1024])
def test_document_block_mask_equals_the_mask_evaluated_on_every_pair(length):
    """The tile-level ``BlockMask`` allows exactly the pairs of ``create_block_mask`` run on every pair (the
    dense mask), and marks the same tiles full (where the kernel skips the mask function), for packs of samples
    shorter and longer than a tile, with and without trailing padding."""
    import random
    from torch.nn.attention.flex_attention import create_block_mask
    from xtuner_plugins.models.attention import document_block_mask, packed_segments
    rng = random.Random(length)
    for _ in range(8):
        rows = []
        for _ in range(rng.randint(1, 3)):
            lens, left = [], length - min(rng.choice([0, 0, 1, 130, length // 2]), length - 1)
            while left > 0:
                lens.append(min(left, rng.choice([1, 3, 50, 128, 256, 400])))
                left -= lens[-1]
            rows.append(lens)
        segments = packed_segments(rows, length, 'cpu')

        def mask_mod(b, h, q, kv):
            return (segments[b, q] == segments[b, kv]) & (kv <= q)
        expected = create_block_mask(mask_mod, len(rows), None, length, length, device='cpu', _compile=False)
        got = document_block_mask(segments)
        assert torch.equal(got.to_dense(), expected.to_dense()), rows
        assert torch.equal(got.full_kv_num_blocks, expected.full_kv_num_blocks), rows
        assert torch.equal(got.kv_num_blocks, expected.kv_num_blocks), rows


def reference_varlen(calls):
    """``varlen_attn`` written plainly for the CPU: causal SDPA on each ``[cu[i], cu[i+1])`` piece of the flat
    ``[T, heads, D]`` sequence, within ``window_size``'s left window where it has one (a query sees the ``left``
    keys before it). Records each call's bounds, longest piece and window."""
    def kernel(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, window_size=(-1, -1), enable_gqa=False):
        left, right = window_size
        assert right == 0 and torch.equal(cu_q, cu_k) and max_q == max_k and cu_q.dtype == torch.int32
        calls.append((cu_q.tolist(), max_q) if left < 0 else (cu_q.tolist(), max_q, left))
        out = torch.empty_like(q)
        for start, end in zip(cu_q.tolist()[:-1], cu_q.tolist()[1:]):
            piece = [t[start:end].transpose(0, 1)[None] for t in (q, k, v)]
            behind = torch.arange(end - start)[:, None] - torch.arange(end - start)[None, :]
            out[start:end] = torch.nn.functional.scaled_dot_product_attention(
                *piece, attn_mask=(behind >= 0) & ((behind <= left) if left >= 0 else True), scale=scale,
                enable_gqa=enable_gqa)[0].transpose(0, 1)
        return out
    return kernel


def test_varlen_attention_gives_the_segment_attentions_loss_and_gradients(tiny, batch, monkeypatch):
    """``sdpa_varlen`` flattens a batch of packed rows into one sequence for ``varlen_attn`` (CUDA's kernel; here
    a plain reference in its place): two packs of different numbers of samples, against ``sdpa_segments``."""
    import xtuner_plugins.models.attention as attention
    items = split_batch(batch)
    packed = internvl_collate_fn([pack_items(items[:1]), pack_items(items[1:])])['data']
    assert [len(lens) for lens in packed['seq_lens']] == [1, 2]

    def step(attn):
        torch.manual_seed(0)
        model = build(tiny, attn_implementation=attn, freeze_llm=False, loss_reduction='square').train()
        loss = model(packed, mode='loss')['loss']
        loss.backward()
        return loss.item(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    loss, grads = step('sdpa_segments')
    calls = []
    monkeypatch.setattr(attention, 'varlen_dtype', lambda query, dropout: None if dropout else query.dtype)
    monkeypatch.setattr(attention, 'varlen_attn', reference_varlen(calls))
    loss_v, grads_v = step('sdpa_varlen')
    length = packed['input_ids'].shape[1]
    (first,), (second, third) = [[int(n) for n in lens] for lens in packed['seq_lens']]
    cuts = [0, first] + ([length] if first < length else []) + [length + second, length + second + third]
    cuts += [2 * length] if second + third < length else []
    layers = build(tiny).language_model.config.num_hidden_layers
    assert calls == [(cuts, max(first, second, third, length - first, length - second - third))] * layers
    assert loss_v == pytest.approx(loss, rel=1e-6)
    assert grads_v.keys() == grads.keys()
    for name, g in grads.items():
        torch.testing.assert_close(grads_v[name], g, rtol=1e-5, atol=1e-7, msg=lambda m: f'{name}: {m}')


@pytest.mark.parametrize('window', [None, 8])
def test_varlen_kernel_gives_the_segments_attention_and_gradients(window, monkeypatch):
    """``varlen_sdpa`` on its kernel (torch's own ``varlen_attn`` on a GPU; on a CPU the plain reference in its
    place) in bf16, with grouped heads, a row with a padding tail, a row with fewer samples than the widest and
    queries whose memory is not in the kernel's order, without and with a sliding window: the output and the
    gradients that ``sdpa_segments`` gives, sample by sample."""
    from xtuner_plugins.models import attention
    device, calls = 'cuda' if torch.cuda.is_available() else 'cpu', []
    if device == 'cpu':
        monkeypatch.setattr(attention, 'VARLEN_DEVICE', 'cpu')
    kernel = reference_varlen([]) if device == 'cpu' else attention.varlen_attn
    monkeypatch.setattr(attention, 'varlen_attn', lambda *a, **k: calls.append(k['window_size']) or kernel(*a, **k))
    torch.manual_seed(0)
    bounds = torch.tensor([[0, 5, 40, 64], [0, 30, 64, 64]])
    shapes = ((2, 4, 64, 32), (2, 2, 64, 32), (2, 2, 64, 32))
    inputs = [torch.randn(shape, dtype=torch.bfloat16).to(device).requires_grad_() for shape in shapes]
    weights = torch.randn(2, 64, 4, 32, dtype=torch.bfloat16).to(device)
    results = []
    for attend in (attention.varlen_sdpa, attention.segment_sdpa):
        out, _ = attend(None, *inputs, None, scaling=0.2, segment_bounds=bounds, sliding_window=window)
        results.append((out, torch.autograd.grad((out.float() * weights).sum(), inputs)))
    assert calls == [(window - 1 if window else -1, 0)]   # the kernel ran, once, with the window
    (out, grads), (expected, expected_grads) = results
    torch.testing.assert_close(out, expected, rtol=2e-2, atol=2e-2)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=2e-2, atol=5e-2)
    if window:   # the window changed what a late query sees (else the test would not test it)
        causal, _ = attention.segment_sdpa(None, *inputs, None, scaling=0.2, segment_bounds=bounds)
        assert (causal - expected).abs().max() > 0.1


def test_varlen_attention_takes_fp32_queries_under_autocast_in_the_autocast_precision(tiny, batch, monkeypatch):
    """Full fine-tuning trains fp32 weights under bf16 autocast, where RoPE leaves the queries and keys fp32:
    ``sdpa_varlen`` hands them to ``varlen_attn`` cast to bf16, as autocast casts SDPA's (it ran the segments'
    loop instead on an H200, 2026-11-27), and its loss and gradients are the segments' under the same autocast.
    Here the CPU stands for CUDA, with a reference kernel."""
    import xtuner_plugins.models.attention as attention
    items = split_batch(batch)
    packed = internvl_collate_fn([pack_items(items[:1]), pack_items(items[1:])])['data']

    def step(attn):
        torch.manual_seed(0)
        model = build(tiny, attn_implementation=attn, freeze_llm=False, loss_reduction='square').train()
        with torch.autocast('cpu', dtype=torch.bfloat16):
            loss = model(packed, mode='loss')['loss']
        loss.backward()
        return loss.item(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    loss, grads = step('sdpa_segments')
    calls, dtypes, reference = [], [], reference_varlen([])

    def kernel(q, k, v, *args, **kwargs):
        dtypes.append({t.dtype for t in (q, k, v)})
        calls.append(kwargs['enable_gqa'])
        return reference(q, k, v, *args, **kwargs)
    monkeypatch.setattr(attention, 'VARLEN_DEVICE', 'cpu')
    monkeypatch.setattr(attention, 'varlen_attn', kernel)
    loss_v, grads_v = step('sdpa_varlen')
    assert len(calls) == build(tiny).language_model.config.num_hidden_layers
    assert dtypes == [{torch.bfloat16}] * len(calls)
    assert loss_v == pytest.approx(loss, rel=1e-3)
    assert grads_v.keys() == grads.keys()
    for name, g in grads.items():
        torch.testing.assert_close(grads_v[name], g, rtol=2e-2, atol=1e-3, msg=lambda m: f'{name}: {m}')
    # outside autocast an fp32 query stays on the segments' loop (the kernel takes half precisions only)
    calls.clear()
    monkeypatch.setattr(attention, 'VARLEN_DEVICE', 'cpu')
    torch.manual_seed(0)
    model = build(tiny, attn_implementation='sdpa_varlen', freeze_llm=False).train()
    model(packed, mode='loss')['loss'].backward()
    assert calls == []


@pytest.mark.parametrize('takes_gqa', [True, False])
def test_varlen_attn_repeats_key_heads_for_a_kernel_without_enable_gqa(monkeypatch, takes_gqa):
    """torch 2.11's ``varlen_attn`` has no ``enable_gqa`` (it came later) and takes as many key/value heads as query
    heads: the wrapper repeats grouped key/value heads for such a kernel and passes ``enable_gqa`` to one that takes
    it; the answers match causal SDPA with grouped heads either way."""
    import torch.nn.attention.varlen as varlen
    import xtuner_plugins.models.attention as attention
    calls = []
    reference = reference_varlen(calls)
    if takes_gqa:
        kernel = reference
    else:
        def kernel(q, k, v, cu_q, cu_k, max_q, max_k, *, return_aux=None, scale=None, window_size=(-1, -1)):
            assert k.shape[1] == v.shape[1] == q.shape[1], 'this kernel takes as many key/value heads as queries'
            return reference(q, k, v, cu_q, cu_k, max_q, max_k, scale=scale, window_size=window_size)
    monkeypatch.setattr(varlen, 'varlen_attn', kernel)
    torch.manual_seed(0)
    q, k, v = torch.randn(9, 6, 8), torch.randn(9, 2, 8), torch.randn(9, 2, 8)
    cuts = torch.tensor([0, 4, 9], dtype=torch.int32)
    got = attention.varlen_attn(q, k, v, cuts, cuts, 5, 5, scale=0.3, window_size=(-1, 0), enable_gqa=True)
    for start, end in ((0, 4), (4, 9)):
        piece = [t[start:end].transpose(0, 1)[None] for t in (q, k, v)]
        expected = torch.nn.functional.scaled_dot_product_attention(*piece, is_causal=True, scale=0.3,
                                                                    enable_gqa=True)[0].transpose(0, 1)
        torch.testing.assert_close(got[start:end], expected)
    assert len(calls) == 1


def test_an_llm_with_a_sliding_window_shorter_than_a_sample_is_refused_where_its_window_would_be_ignored(
        tiny, batch, monkeypatch):
    """Packed rows under sdpa and eager (their block masks) and flex_attention attend over the whole sample: a
    tiny Mistral with an 8-token window trained on attention it never runs (its converted folder's logits 4.8 off).
    Padded rows under sdpa take transformers' window mask; a window longer than every sample changes nothing;
    sdpa_segments and sdpa_varlen apply it (the next test)."""
    from transformers import Gemma2Config, MistralConfig, Qwen2Config

    from xtuner_plugins.errors import Refused
    from xtuner_plugins.models import attention
    from xtuner_plugins.models.attention import sliding_window
    assert sliding_window(MistralConfig(sliding_window=8)) == 8 and sliding_window(MistralConfig()) == 4096
    assert sliding_window(Qwen2Config(sliding_window=4096)) is None   # use_sliding_window False: Qwen2.5's configs
    assert sliding_window(Gemma2Config(sliding_window=512)) == 512 and sliding_window(MistralConfig(
        sliding_window=None)) is None
    items = split_batch(batch)
    packed = internvl_collate_fn([pack_items(items)])['data']
    longest = max(int(n) for n in packed['seq_lens'][0])
    for attn, data in (('sdpa', packed), ('eager', packed), ('flex_attention', batch)):
        model = build(tiny, attn_implementation=attn).eval()
        config = model.language_model.config   # the tiny Qwen2's window turned on
        config.sliding_window, config.layer_types, config.use_sliding_window = 8, None, True
        with pytest.raises(Refused, match=r'sliding window of 8 tokens, which .* do not apply: a sample of \d+ '
                                          r'tokens'):
            with torch.no_grad():
                model(data, mode='tensor')
        model.language_model.config.sliding_window = longest + 1   # every sample within it: as before
        with torch.no_grad():
            model(data, mode='tensor')
    model = build(tiny, attn_implementation='sdpa').eval()
    config = model.language_model.config
    config.sliding_window, config.layer_types, config.use_sliding_window = 8, None, True
    with torch.no_grad():
        model(batch, mode='tensor')   # padded rows: transformers' own window mask
    # sdpa_varlen applies the window on its kernel's device and off it (as segments): never refused
    embeds = torch.zeros(1, packed['input_ids'].shape[1], 4)
    for device in ('cuda', 'cpu'):
        monkeypatch.setattr(attention, 'VARLEN_DEVICE', device)
        attention.check_window(batch, embeds, 'sdpa_varlen', 8)
        attention.check_window(packed, embeds, 'sdpa_varlen', 8)


def test_sdpa_segments_and_varlen_apply_each_layers_sliding_window(tiny, batch, tmp_path, monkeypatch):
    """A Gemma 3 LLM whose sliding layers attend to the last 8 tokens (and a full layer): packed rows and padded
    rows under sdpa_segments and sdpa_varlen (as segments, and on its kernel) give each sample the logits
    transformers' own sliding-window mask gives it alone."""
    import json

    import xtuner_plugins.models.attention as attention
    from xtuner_plugins.tiny import write_tiny_llm
    folder = write_tiny_llm(str(tmp_path / 'gemma3'), arch='gemma3', hidden_size=64)
    with open(folder + '/config.json') as f:
        config = json.load(f)
    config['sliding_window'] = 8
    with open(folder + '/config.json', 'w') as f:
        json.dump(config, f)
    assert config['layer_types'] == ['sliding_attention', 'full_attention']
    windowed = dict(tiny, llm=folder)
    reference = build(windowed, attn_implementation='sdpa').eval()
    items = split_batch(batch)
    packed = internvl_collate_fn([pack_items(items)])['data']
    assert min(int(n) for n in packed['seq_lens'][0]) > 8
    with torch.no_grad():
        alone = [reference(internvl_collate_fn([item])['data'], mode='tensor')[0] for item in items]
    calls = []
    for attn, kernel in (('sdpa_segments', False), ('sdpa_varlen', False), ('sdpa_varlen', True)):
        # sdpa_varlen off a GPU runs as segments; on its kernel (a plain reference here), with its window_size
        monkeypatch.setattr(attention, 'varlen_dtype', lambda query, dropout: query.dtype if kernel else None)
        monkeypatch.setattr(attention, 'varlen_attn', reference_varlen(calls))
        segments = build(windowed, attn_implementation=attn).eval()
        segments.load_state_dict(super(type(reference), reference).state_dict())
        with torch.no_grad():
            pack_logits = segments(packed, mode='tensor')[0]
            padded = segments(batch, mode='tensor')
        start = 0
        for row, expected in enumerate(alone):
            n = expected.shape[0]
            torch.testing.assert_close(pack_logits[start:start + n], expected, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(padded[row, :n], expected, rtol=1e-5, atol=1e-5)
            start += n
    # the kernel ran for packed rows only, once per layer: window - 1 keys behind on the sliding layer, none on the
    # full one
    assert [call[2:] for call in calls] == [(7,), ()]
    with torch.no_grad():
        full = build(dict(tiny, llm=write_tiny_llm(str(tmp_path / 'full'), arch='gemma3', hidden_size=64)),
                     attn_implementation='sdpa_segments').eval()   # its 512-token window: causal, as before
        full.load_state_dict(super(type(reference), reference).state_dict())
        assert (full(packed, mode='tensor')[0][:alone[0].shape[0]] - alone[0]).abs().max() > 1e-3


@pytest.mark.parametrize('length,window', [(37, 8), (8, 8), (9, 8), (5, 1), (40, 64)])
def test_windowed_sdpa_in_blocks_is_the_whole_banded_mask(length, window):
    """Queries in blocks of the window, each with the keys it reaches: the output and the gradients of SDPA over the
    whole ``N x N`` banded mask (grouped key/value heads, a scale), which it never builds (benchmarks/RESULTS.md)."""
    from xtuner_plugins.models.attention import windowed_sdpa
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, length, 8), torch.randn(2, 2, length, 8), torch.randn(2, 2, length, 8)
    behind = torch.arange(length)[:, None] - torch.arange(length)[None, :]
    results = []
    for fn in (lambda *t: windowed_sdpa(*t, 0.0, 0.3, True, window),
               lambda *t: torch.nn.functional.scaled_dot_product_attention(
                   *t, attn_mask=(behind >= 0) & (behind < window), scale=0.3, enable_gqa=True)):
        inputs = [t.clone().requires_grad_() for t in (q, k, v)]
        out = fn(*inputs)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        results.append([out] + [t.grad for t in inputs])
    for got, expected in zip(*results):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_an_llm_that_caps_its_attention_logits_is_refused_where_the_cap_would_be_dropped(tiny, batch, tmp_path,
                                                                                         monkeypatch):
    """Gemma 2's attn_logit_softcapping: transformers' SDPA, and the segment and varlen kernels, take no ``softcap``
    and trained without it (a tiny Gemma 2 with a cap of 1.0: SDPA's logits apart from eager's, which vLLM and
    llama.cpp run as); refused at start-up naming the setting, from the folder's config.json before anything
    loads (a Gemma 2 27B loads for minutes); eager, which applies it, trains."""
    from xtuner_plugins.models import parts
    from transformers import Gemma2Config, Gemma2ForCausalLM

    from xtuner_plugins.errors import Refused
    from xtuner_plugins.tiny import build_tiny_tokenizer
    tokenizer = build_tiny_tokenizer(add_internvl_tokens=False)
    torch.manual_seed(0)
    config = Gemma2Config(vocab_size=len(tokenizer) + 32, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=16, attn_logit_softcapping=1.0,
                          query_pre_attn_scalar=16, pad_token_id=tokenizer.pad_token_id, initializer_range=0.5)
    llm = Gemma2ForCausalLM(config)
    llm.save_pretrained(str(tmp_path / 'gemma2'))
    tokenizer.save_pretrained(str(tmp_path / 'gemma2'))
    ids = torch.arange(3, 40)[None]
    logits = {}
    for attn in ('eager', 'sdpa'):
        llm.config._attn_implementation = attn
        with torch.no_grad():
            logits[attn] = llm(input_ids=ids).logits
    assert (logits['eager'] - logits['sdpa']).abs().max() > 1e-2   # the cap dropped changes the model
    gemma2 = dict(tiny, llm=str(tmp_path / 'gemma2'))
    loading = parts.build_vision_encoder
    with monkeypatch.context() as patch:   # refused before the vision encoder (and the LLM) loads
        patch.setattr(parts, 'build_vision_encoder', lambda *a, **k: pytest.fail('loaded before the refusal'))
        for attn in ('sdpa', 'sdpa_segments', 'sdpa_varlen'):
            with pytest.raises(Refused, match=rf"caps its attention logits \(attn_logit_softcapping 1.0\), which "
                                              rf"attn_implementation='{attn}' does not apply: .* set "
                                              r"model.attn_implementation to 'eager'"):
                build(gemma2, attn_implementation=attn)
    assert parts.build_vision_encoder is loading
    model = build(gemma2, attn_implementation='eager')
    assert torch.isfinite(model(batch, mode='loss')['loss'])
