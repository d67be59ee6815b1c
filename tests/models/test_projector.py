import pytest
import torch
from torch import nn

from xtuner_plugins.models.projector import InternVLProjector, build_projector, pixel_shuffle


def reference_shuffle(x, version):
    """InternVL's rule (``pixel_shuffle`` of OpenGVLab's ``InternVLChatModel``), written independently: output
    token (r, c) concatenates inputs (2r,2c), (2r,2c+1), (2r+1,2c), (2r+1,2c+1); v2 lists tokens row-major,
    v1 column-major."""
    n, h, w, c = x.shape
    out = torch.empty(n, h // 2, w // 2, 4 * c)
    for r in range(h // 2):
        for col in range(w // 2):
            out[:, r, col] = torch.cat([x[:, 2 * r, 2 * col], x[:, 2 * r, 2 * col + 1],
                                        x[:, 2 * r + 1, 2 * col], x[:, 2 * r + 1, 2 * col + 1]], dim=-1)
    return out if version == 'v2' else out.transpose(1, 2)


@pytest.mark.parametrize('version', ['v1', 'v2'])
@pytest.mark.parametrize('shape', [(2, 4, 4, 3), (1, 32, 32, 8), (3, 2, 6, 5)])
def test_pixel_shuffle_matches_the_rule(version, shape):
    x = torch.randn(*shape)
    out = pixel_shuffle(x, 0.5, version)
    ref = reference_shuffle(x, version)
    assert out.shape == ref.shape
    assert torch.equal(out, ref)


def test_pixel_shuffle_errors():
    with pytest.raises(ValueError, match='divisible by 2, got 3x4'):
        pixel_shuffle(torch.zeros(1, 3, 4, 2))
    with pytest.raises(ValueError, match='unknown pixel-shuffle version'):
        pixel_shuffle(torch.zeros(1, 4, 4, 2), version='v3')


def test_projector_layout_matches_official_keys():
    mlp = InternVLProjector(vision_hidden_size=16, llm_hidden_size=24, downsample_ratio=0.5)
    shapes = {k: tuple(v.shape) for k, v in mlp.state_dict().items()}
    assert shapes == {'0.weight': (64,), '0.bias': (64,), '1.weight': (24, 64), '1.bias': (24,),
                      '3.weight': (24, 24), '3.bias': (24,)}
    assert isinstance(mlp[2], torch.nn.GELU) and mlp[2].approximate == 'none'  # exact GELU
    features = torch.randn(2, 16, 16)  # two tiles of a 4x4 patch grid, 16 channels
    assert mlp.tokens_per_tile(4) == 4
    shuffled = pixel_shuffle(features.view(2, 4, 4, 16)).view(2, 4, 64)
    assert torch.equal(mlp(features), nn.Sequential.forward(mlp, shuffled))


def test_llava_projector_keys_and_tokens():
    mlp = build_projector('mlp', 16, 24)
    assert {k: tuple(v.shape) for k, v in mlp.state_dict().items()} == {
        'linear_1.weight': (24, 16), 'linear_1.bias': (24,), 'linear_2.weight': (24, 24), 'linear_2.bias': (24,)}
    features = torch.randn(3, 36, 16)
    assert mlp.tokens_per_tile(6) == 36
    ref = mlp.linear_2(torch.nn.functional.gelu(mlp.linear_1(features)))
    assert torch.equal(mlp(features), ref)


def reference_bilinear(grid, out):
    """Bilinear resampling written out: output pixel i samples input coordinate (i + 0.5) * in / out - 0.5,
    clamped at 0, between its two neighbours (align_corners=False, no antialiasing)."""
    n = grid.shape[-1]
    coords = ((torch.arange(out) + 0.5) * n / out - 0.5).clamp(min=0)
    lo = coords.floor().long().clamp(max=n - 1)
    hi = (lo + 1).clamp(max=n - 1)
    w = (coords - lo).view(-1)
    rows = grid[..., lo, :] * (1 - w)[:, None] + grid[..., hi, :] * w[:, None]
    return rows[..., lo] * (1 - w) + rows[..., hi] * w


@pytest.mark.parametrize('side, out', [(27, 13), (4, 2), (5, 2)])
def test_bilinear_projector_halves_the_grid(side, out):
    mlp = build_projector('bilinear_mlp', 8, 12)
    assert mlp.tokens_per_tile(side) == out * out
    features = torch.randn(2, side * side, 8)
    grid = features.view(2, side, side, 8).permute(0, 3, 1, 2)
    pooled = reference_bilinear(grid, out).flatten(2).transpose(1, 2)
    assert torch.allclose(mlp(features), mlp.mlp(pooled), atol=1e-5)
    assert mlp(features).shape == (2, out * out, 12)


def test_projector_errors():
    with pytest.raises(ValueError, match=r"unknown projector 'conv'; registered: \['bilinear_mlp', 'mlp', "
                                         r"'pixel_shuffle_mlp'\]"):
        build_projector('conv', 8, 8)
    with pytest.raises(ValueError, match='needs a patch grid divisible by 2, got 27x27'):
        build_projector('pixel_shuffle_mlp', 8, 8).tokens_per_tile(27)
    with pytest.raises(ValueError, match="projector 'mlp'"):
        build_projector(dict(type='mlp', downsample_ratio=0.5), 8, 8)
    with pytest.raises(ValueError, match='5 tokens per tile, not a square grid'):
        build_projector('bilinear_mlp', 8, 8)(torch.zeros(1, 5, 8))


@pytest.mark.parametrize('ratio', [0.3, 0.7, 0.0, -0.5, 1.5, 'half', True])
def test_a_ratio_that_is_not_one_over_a_whole_number_is_refused(ratio):
    """round(1/r) made 0.3 train as 1/3 and 0.7 as 1.0 (no shuffle) while the converted folders recorded 0.3 and
    0.7, whose remote code then failed on the tensors' shapes."""
    with pytest.raises(ValueError, match=r'downsample_ratio .*must be 1/n for a whole n'):
        build_projector(dict(type='pixel_shuffle_mlp', downsample_ratio=ratio), 16, 24)


@pytest.mark.parametrize('ratio,grid,tokens', [(0.5, 4, 4), (0.25, 8, 4), (1 / 3, 6, 4), (1.0, 4, 16)])
def test_ratios_one_over_n_build(ratio, grid, tokens):
    projector = build_projector(dict(type='pixel_shuffle_mlp', downsample_ratio=ratio), 16, 24)
    assert projector.tokens_per_tile(grid) == tokens
