"""The system message a model was trained with, as its converted folder records it: an empty one stays empty."""

import pytest
import torch

from tests.models.conftest import build
from xtuner_plugins.models.export import write_official, write_remote
from xtuner_plugins.models.export.build import DEFAULT_TILING
from xtuner_plugins.models.inference import ConvertedModel
from xtuner_plugins.models.prompt import official_query


@pytest.mark.parametrize('write', [write_official, write_remote], ids=['official', 'remote'])
@pytest.mark.parametrize('system', ['', 'Be brief.'])
def test_the_trained_system_message_is_the_one_chat_uses(tiny, tmp_path, write, system):
    """Trained with ``dataset.system=''`` (no system message), the folder's chat() and this project's chat and
    eval prompted with InternVL's long default message: '' was read as 'not recorded' (an adversarial sweep)."""
    model = build(tiny)
    write(model, dict(DEFAULT_TILING, image_size=model.vision.image_size), str(tmp_path), torch.float32,
          log=lambda message: None, system=system)
    net = ConvertedModel(str(tmp_path)).model
    assert net.system_message == system
    assert official_query(net, 'Hi', []).startswith(f'<|im_start|>system\n{system}<|im_end|>')
