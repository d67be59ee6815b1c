"""``models/checkpoint.read_meta``: a training checkpoint's ``meta``, and a clear error naming any other file."""

import pytest
import torch
from safetensors.torch import save_file

from xtuner_plugins.models.checkpoint import read_meta


def test_the_meta_of_a_checkpoint_and_of_a_deepspeed_folder(tmp_path):
    torch.save({'meta': {'cfg': 'x = 1'}, 'state_dict': {'w': torch.ones(2)}}, tmp_path / 'iter_2.pth')
    assert read_meta(str(tmp_path / 'iter_2.pth')) == {'cfg': 'x = 1'}
    folder = tmp_path / 'iter_4.pth'
    folder.mkdir()
    torch.save({'meta': {'cfg': 'y = 2'}, 'module': {}}, folder / 'mp_rank_00_model_states.pt')
    assert read_meta(str(folder)) == {'cfg': 'y = 2'}
    torch.save({'w': torch.ones(2)}, tmp_path / 'weights.pth')
    assert read_meta(str(tmp_path / 'weights.pth')) == {}


@pytest.mark.parametrize('kind', ['safetensors', 'truncated', 'text'])
def test_a_file_that_is_no_checkpoint_is_named(tmp_path, kind):
    path = tmp_path / 'model.bin'
    if kind == 'safetensors':
        save_file({'w': torch.ones(2)}, str(path))
    elif kind == 'truncated':
        torch.save({'meta': {}, 'state_dict': {'w': torch.ones(1000)}}, tmp_path / 'whole.pth')
        path.write_bytes((tmp_path / 'whole.pth').read_bytes()[:300])
    else:
        path.write_text('iter_10.pth\n')
    with pytest.raises(ValueError, match=rf'^{path} is not a training checkpoint torch can read \(\w+: .*work_dirs/'):
        read_meta(str(path))
    with pytest.raises(FileNotFoundError):
        read_meta(str(tmp_path / 'missing.pth'))
