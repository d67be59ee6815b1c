import pytest
import torch

from xtuner_plugins.models.projector import InternVLProjector, pixel_shuffle


def reference_shuffle(x, version):
    """Independent reading of REFERENCE.md: output token (r, c) concatenates inputs (2r,2c), (2r,2c+1),
    (2r+1,2c), (2r+1,2c+1); v2 lists tokens row-major, v1 column-major."""
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
    assert mlp(torch.randn(2, 5, 64)).shape == (2, 5, 24)
