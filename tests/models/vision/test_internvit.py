"""Tests for xtuner_plugins.models.vision.internvit: InternViT (official layout) -> transformers InternVLVisionModel.

The loaded model is checked against a reference forward of InternViT written here in plain torch from the
official keys (the structure of OpenGVLab's ``modeling_intern_vit.py``: patch conv, CLS + bicubically
interpolated position embedding, pre-norm layers with fused qkv and layer scale, no final norm), not from
the module's helpers. Checkpoints are the tiny ones of ``xtuner_plugins.tiny.vision``.
"""

from __future__ import annotations

import json
import os
import time

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from transformers import InternVLVisionModel
from transformers.models.internvl.modeling_internvl import InternVLVisionLayer

from tests.models.vision.conftest import read_folder as _read
from xtuner_plugins.models.vision import (InternVLVisionLayerWithDropPath, load_internvit,
                                          official_to_hf_vision_state_dict, set_drop_path, vision_features)
from xtuner_plugins.tiny.vision import write_tiny_internvit

# ---------------------------------------------------------------------------------------------------------
# Independent reference: InternViT's forward from the official keys
# ---------------------------------------------------------------------------------------------------------


def _ref_norm(x, sd, name, cfg):
    if cfg['norm_type'] == 'layer_norm':
        return F.layer_norm(x, x.shape[-1:], sd[name + '.weight'], sd[name + '.bias'], cfg['layer_norm_eps'])
    return _ref_rms(x, sd[name + '.weight'], cfg['layer_norm_eps'])


def _ref_rms(x, weight, eps):
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def reference_internvit(sd, cfg, pixel_values):
    """Hidden states of InternViT: [embeddings, after layer 1, ..., after layer L], each [N, 1 + patches, C]."""
    c, heads, p = cfg['hidden_size'], cfg['num_attention_heads'], cfg['patch_size']
    d = c // heads
    x = F.conv2d(pixel_values, sd['embeddings.patch_embedding.weight'], sd['embeddings.patch_embedding.bias'],
                 stride=p)
    n, _, gh, gw = x.shape
    x = x.flatten(2).transpose(1, 2)
    pos = sd['embeddings.position_embedding']
    g = cfg['image_size'] // p
    patch_pos = pos[:, 1:].reshape(1, g, g, c).permute(0, 3, 1, 2)
    patch_pos = F.interpolate(patch_pos.float(), size=(gh, gw), mode='bicubic', align_corners=False)
    patch_pos = patch_pos.reshape(1, c, gh * gw).permute(0, 2, 1)
    x = torch.cat([sd['embeddings.class_embedding'].expand(n, 1, c), x], dim=1)
    x = x + torch.cat([pos[:, :1], patch_pos], dim=1)
    states = [x]
    for i in range(cfg['num_hidden_layers']):
        pre = f'encoder.layers.{i}.'
        h = _ref_norm(x, sd, pre + 'norm1', cfg)
        qkv = F.linear(h, sd[pre + 'attn.qkv.weight'], sd.get(pre + 'attn.qkv.bias'))
        q, k, v = qkv.reshape(n, -1, 3, heads, d).permute(2, 0, 3, 1, 4)  # each [n, heads, s, d]
        if cfg['qk_normalization']:
            q = _ref_rms(q.transpose(1, 2).flatten(2), sd[pre + 'attn.q_norm.weight'], cfg['layer_norm_eps'])
            k = _ref_rms(k.transpose(1, 2).flatten(2), sd[pre + 'attn.k_norm.weight'], cfg['layer_norm_eps'])
            q = q.view(n, -1, heads, d).transpose(1, 2)
            k = k.view(n, -1, heads, d).transpose(1, 2)
        attn = ((q * d ** -0.5) @ k.transpose(-2, -1)).softmax(dim=-1)
        a = (attn @ v).transpose(1, 2).reshape(n, -1, c)
        x = x + F.linear(a, sd[pre + 'attn.proj.weight'], sd[pre + 'attn.proj.bias']) * sd[pre + 'ls1']
        h = _ref_norm(x, sd, pre + 'norm2', cfg)
        m = F.linear(F.gelu(F.linear(h, sd[pre + 'mlp.fc1.weight'], sd[pre + 'mlp.fc1.bias'])),
                     sd[pre + 'mlp.fc2.weight'], sd[pre + 'mlp.fc2.bias'])
        x = x + m * sd[pre + 'ls2']
        states.append(x)
    return states


# ---------------------------------------------------------------------------------------------------------
# Helpers (the fixtures tiny_dir, tiny_300m are in conftest.py)
# ---------------------------------------------------------------------------------------------------------


def _pixels(n=2, size=56, seed=0):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _copy_folder(src, dst, sd=None, cfg=None, weights_name='model.safetensors'):
    """Write ``src``'s config/weights (or the given ones) to ``dst``; returns ``dst``."""
    src_cfg, src_sd = _read(src)
    os.makedirs(dst, exist_ok=True)
    with open(os.path.join(dst, 'config.json'), 'w', encoding='utf-8') as f:
        json.dump(cfg if cfg is not None else src_cfg, f)
    sd = sd if sd is not None else src_sd
    if weights_name.endswith('.bin'):
        torch.save(sd, os.path.join(dst, weights_name))
    else:
        save_file(sd, os.path.join(dst, weights_name))
    return str(dst)


# ---------------------------------------------------------------------------------------------------------
# Forward equivalence
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize('attn', ['sdpa', 'eager'])
@pytest.mark.parametrize('size', [56, 84])  # 84: the position embeddings are interpolated at run time
def test_load_matches_reference(tiny_dir, attn, size):
    cfg, sd = _read(tiny_dir)
    model = load_internvit(tiny_dir, attn_implementation=attn)
    assert isinstance(model, InternVLVisionModel) and not model.training
    assert model.config._attn_implementation == attn
    assert model.embeddings.patch_embeddings.projection.weight.dtype == torch.float32
    pixels = _pixels(size=size)
    with torch.no_grad():
        out = model(pixel_values=pixels).last_hidden_state
        ref = reference_internvit(sd, cfg, pixels)[-1]
    assert out.shape == (2, 1 + (size // 14) ** 2, cfg['hidden_size'])
    assert (out - ref).abs().max().item() < 1e-5


def test_load_dtype(tiny_300m):
    model = load_internvit(tiny_300m, torch_dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert vision_features(model, _pixels()).dtype == torch.bfloat16  # float32 pixels are cast
    assert {p.dtype for p in load_internvit(tiny_300m, torch_dtype='auto').parameters()} == {torch.float32}


def test_prefix_stripping(tiny_300m, tmp_path):
    cfg, sd = _read(tiny_300m)
    full = {f'vision_model.{k}': v for k, v in sd.items()}
    full['mlp1.0.weight'] = torch.ones(4)
    full['language_model.lm_head.weight'] = torch.ones(2, 2)
    plain = official_to_hf_vision_state_dict(sd)
    stripped = official_to_hf_vision_state_dict(full, prefix='vision_model.')
    assert set(stripped) == set(plain) and all(torch.equal(stripped[k], plain[k]) for k in plain)
    with pytest.raises(ValueError, match="no key starts with 'visual.'"):
        official_to_hf_vision_state_dict(full, prefix='visual.')
    with pytest.raises(ValueError, match='mlp1.0.weight'):  # without the prefix, the other parts are unknown
        official_to_hf_vision_state_dict(full)
    # a full InternVL chat folder: vision_config + vision_model.* tensors
    chat_cfg = {'model_type': 'internvl_chat', 'architectures': ['InternVLChatModel'], 'vision_config': cfg}
    folder = _copy_folder(tiny_300m, tmp_path / 'chat', sd=full, cfg=chat_cfg)
    pixels = _pixels()
    with torch.no_grad():
        a = load_internvit(folder)(pixel_values=pixels).last_hidden_state
        b = load_internvit(tiny_300m)(pixel_values=pixels).last_hidden_state
    assert torch.equal(a, b)


def test_missing_and_unexpected_keys_name_the_folder(tiny_300m, tmp_path):
    cfg, sd = _read(tiny_300m)
    missing = _copy_folder(tiny_300m, tmp_path / 'missing',
                           sd={k: v for k, v in sd.items() if k != 'encoder.layers.1.ls2'})
    with pytest.raises(ValueError, match=r'missing.*Missing: encoder\.layer\.1\.lambda_2\. Unexpected: -'):
        load_internvit(missing)
    extra = _copy_folder(tiny_300m, tmp_path / 'extra', cfg={**cfg, 'num_hidden_layers': 1})
    with pytest.raises(ValueError, match=r'Missing: -\. Unexpected: encoder\.layer\.1\.attention\.k_proj\.bias'):
        load_internvit(extra)
    wide = _copy_folder(tiny_300m, tmp_path / 'wide', cfg={**cfg, 'intermediate_size': 96})
    with pytest.raises(ValueError, match=r'wide: 6 tensor\(s\) have another shape than the config implies: '
                                         r'encoder\.layer\.0\.mlp\.fc1\.bias \[128\] \(config: \[96\]\)'):
        load_internvit(wide)
    with pytest.raises(FileNotFoundError, match='no weights found'):
        os.makedirs(tmp_path / 'empty')
        with open(tmp_path / 'empty' / 'config.json', 'w') as f:
            json.dump(cfg, f)
        load_internvit(tmp_path / 'empty')


def test_sharded_and_bin_checkpoints(tiny_300m, tmp_path):
    _, sd = _read(tiny_300m)
    keys = sorted(sd)
    shards = {'model-00001-of-00002.safetensors': keys[: len(keys) // 2],
              'model-00002-of-00002.safetensors': keys[len(keys) // 2:]}
    sharded = _copy_folder(tiny_300m, tmp_path / 'sharded', weights_name='unused.safetensors')
    os.remove(os.path.join(sharded, 'unused.safetensors'))
    for name, names in shards.items():
        save_file({k: sd[k] for k in names}, os.path.join(sharded, name))
    with open(os.path.join(sharded, 'model.safetensors.index.json'), 'w') as f:
        json.dump({'metadata': {}, 'weight_map': {k: n for n, names in shards.items() for k in names}}, f)
    binary = _copy_folder(tiny_300m, tmp_path / 'bin', weights_name='pytorch_model.bin')
    pixels = _pixels()
    with torch.no_grad():
        ref = load_internvit(tiny_300m)(pixel_values=pixels).last_hidden_state
        for folder in (sharded, binary, os.path.join(binary, 'pytorch_model.bin')):
            assert torch.equal(load_internvit(folder)(pixel_values=pixels).last_hidden_state, ref), folder


# ---------------------------------------------------------------------------------------------------------
# Position embeddings of another size
# ---------------------------------------------------------------------------------------------------------


def test_position_embedding_mismatch_is_an_error(tiny_300m, tmp_path):
    cfg, _ = _read(tiny_300m)
    folder = _copy_folder(tiny_300m, tmp_path / 'pos', cfg={**cfg, 'image_size': 28})
    with pytest.raises(ValueError, match=r'pos: embeddings\.position_embedding has 17 positions, but config\.json '
                                         r'image_size 28 with patch_size 14 implies 5 \(a 2x2 grid \+ CLS\)'):
        load_internvit(folder)


def test_image_size_interpolates_position_embeddings(tiny_300m):
    cfg, sd = _read(tiny_300m)
    model = load_internvit(tiny_300m, image_size=28)  # InternVL's force_image_size
    assert model.config.image_size == [28, 28]
    assert model.embeddings.position_embeddings.shape == (1, 5, cfg['hidden_size'])
    pixels = _pixels(size=28)
    with torch.no_grad():
        out = model(pixel_values=pixels).last_hidden_state
    # same as interpolating at run time from the original 4x4 grid, as InternViT does per forward
    ref = reference_internvit(sd, cfg, pixels)[-1]
    assert (out - ref).abs().max().item() < 1e-5
    assert torch.equal(load_internvit(tiny_300m, image_size=56).embeddings.position_embeddings,
                       sd['embeddings.position_embedding'])


# ---------------------------------------------------------------------------------------------------------
# Drop path
# ---------------------------------------------------------------------------------------------------------


def _train_out(model, pixels, seed):
    torch.manual_seed(seed)
    return model.train()(pixel_values=pixels).last_hidden_state


def test_drop_path_rates_are_linspace(tiny_300m):
    model = load_internvit(tiny_300m)
    assert type(model.encoder.layer[0]) is InternVLVisionLayer  # config drop_path_rate 0: untouched
    rates = set_drop_path(model, 0.1)
    assert rates == [x.item() for x in torch.linspace(0, 0.1, 2)] == [0.0, pytest.approx(0.1)]
    assert [layer.drop_path_rate for layer in model.encoder.layer] == rates
    assert all(type(layer) is InternVLVisionLayerWithDropPath for layer in model.encoder.layer)
    assert model.config.drop_path_rate == 0.1
    loaded = load_internvit(tiny_300m, drop_path_rate=0.3)
    assert [layer.drop_path_rate for layer in loaded.encoder.layer] == [0.0, pytest.approx(0.3)]
    assert set(loaded.state_dict()) == set(model.state_dict())  # names and parameters unchanged
    set_drop_path(model, 0.0)
    assert all(type(layer) is InternVLVisionLayer and 'drop_path_rate' not in vars(layer)
               for layer in model.encoder.layer)
    with pytest.raises(ValueError, match='in \\[0, 1\\]'):
        set_drop_path(model, 1.5)
    with torch.device('meta'):   # as tools/plan.py builds the model: .item() of a meta tensor raised
        assert set_drop_path(model, 0.2) == [0.0, pytest.approx(0.2)]


def test_drop_path_eval_unchanged_and_train_random(tiny_300m):
    pixels = _pixels(n=8)
    plain, dropped = load_internvit(tiny_300m), load_internvit(tiny_300m, drop_path_rate=0.1)
    with torch.no_grad():
        assert torch.equal(plain(pixel_values=pixels).last_hidden_state,
                           dropped(pixel_values=pixels).last_hidden_state)
        assert torch.equal(_train_out(plain, pixels, 0), _train_out(plain, pixels, 1))  # rate 0: no randomness
        assert torch.equal(_train_out(plain, pixels, 0), plain.eval()(pixel_values=pixels).last_hidden_state)
        set_drop_path(dropped, 0.5)
        a, b = _train_out(dropped, pixels, 0), _train_out(dropped, pixels, 1)
        assert not torch.equal(a, b)
        assert torch.equal(a, _train_out(dropped, pixels, 0))  # seeded: reproducible


def test_drop_path_is_per_sample_and_scaled(tiny_300m):
    model = load_internvit(tiny_300m)
    same = _pixels(n=1).expand(16, -1, -1, -1)
    with torch.no_grad():
        after_layer0 = vision_features(model, same, select_layer=1)
        set_drop_path(model, 1.0)  # rates [0, 1]: layer 1 drops both branches of every sample
        torch.manual_seed(0)
        assert torch.equal(vision_features(model.train(), same), after_layer0)
        set_drop_path(model, 0.5)
        out = _train_out(model, same, 0)
        # layer 1 (rate 0.5) on identical inputs: each sample keeps or drops each branch; kept ones are x2
        layer = model.encoder.layer[1]
        h = model.encoder.layer[0].eval()(model.embeddings(same[:1])[0])
        candidates = []
        for keep_attn in (0.0, 2.0):
            h1 = h + keep_attn * layer.lambda_1 * layer.attention(layer.layernorm_before(h))[0]
            for keep_mlp in (0.0, 2.0):
                candidates.append(h1 + keep_mlp * layer.lambda_2 * layer.mlp(layer.layernorm_after(h1)))
    matched = [min(range(4), key=lambda i: (row - candidates[i][0]).abs().max().item()) for row in out]
    for row, i in zip(out, matched):
        torch.testing.assert_close(row, candidates[i][0])
    assert len(set(matched)) > 1  # per-sample masks, not one per batch


def test_drop_path_with_gradient_checkpointing(tiny_300m):
    pixels = _pixels(n=4)
    grads = []
    for checkpointing in (False, True):
        model = load_internvit(tiny_300m, drop_path_rate=0.5)
        if checkpointing:
            model.gradient_checkpointing_enable()
        torch.manual_seed(0)
        model.train()(pixel_values=pixels).last_hidden_state.square().sum().backward()
        grads.append(model.encoder.layer[1].attention.q_proj.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])  # the recomputation draws the same masks


# ---------------------------------------------------------------------------------------------------------
# vision_features
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize('size', [56, 28])
def test_vision_features_shape_and_last_layer(tiny_300m, size):
    model = load_internvit(tiny_300m)
    pixels = _pixels(n=3, size=size)
    with torch.no_grad():
        feats = vision_features(model, pixels)
        last = model(pixel_values=pixels).last_hidden_state
    assert feats.shape == (3, (size // 14) ** 2, 64)
    assert torch.equal(feats, last[:, 1:])


@pytest.mark.parametrize('select_layer', [-3, -2, 0, 1, 2])
def test_vision_features_select_layer(tiny_dir, select_layer):
    cfg, sd = _read(tiny_dir)
    model = load_internvit(tiny_dir)
    pixels = _pixels()
    with torch.no_grad():
        feats = vision_features(model, pixels, select_layer=select_layer)
        ref = reference_internvit(sd, cfg, pixels)[select_layer][:, 1:]
        model.config.output_hidden_states = True  # transformers' own recording of the hidden states
        recorded = model(pixel_values=pixels).hidden_states[select_layer][:, 1:]
        model.config.output_hidden_states = False
    assert (feats - ref).abs().max().item() < 1e-5
    assert torch.equal(feats, recorded)


def test_vision_features_bad_layer(tiny_300m):
    with pytest.raises(ValueError, match='select_layer 3 is out of range for 2 layers'):
        vision_features(load_internvit(tiny_300m), _pixels(), select_layer=3)


# ---------------------------------------------------------------------------------------------------------
# Tiny writer
# ---------------------------------------------------------------------------------------------------------


def test_tiny_writer_is_deterministic_and_fast(tmp_path):
    start = time.perf_counter()
    a = write_tiny_internvit(tmp_path / 'a')
    elapsed = time.perf_counter() - start
    b = write_tiny_internvit(tmp_path / 'b')
    c = write_tiny_internvit(tmp_path / 'c', seed=1)
    data = {name: open(os.path.join(d, 'model.safetensors'), 'rb').read() for name, d in zip('abc', (a, b, c))}
    assert data['a'] == data['b'] and data['a'] != data['c']
    assert elapsed < 1.0
    cfg, sd = _read(a)
    assert cfg['model_type'] == 'intern_vit_6b' and cfg['architectures'] == ['InternVisionModel']
    assert cfg['auto_map']['AutoModel'] == 'modeling_intern_vit.InternVisionModel'
    assert sd['embeddings.position_embedding'].shape == (1, 17, 64)
    assert sd['encoder.layers.0.attn.qkv.weight'].shape == (192, 64)
    assert sd['encoder.layers.0.ls1'].shape == (64,) and abs(sd['encoder.layers.0.ls1'].mean().item() - 0.1) < 0.01
