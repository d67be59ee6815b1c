"""The model a conversion builds from a checkpoint's recorded config (``models/export/build.py``): the config is
read as data, and its ``model.type`` only names one of this project's model classes."""

import pytest
import torch
from mmengine.config import Config

from xtuner_plugins.errors import Refused
from xtuner_plugins.models import VisionLanguageModel
from xtuner_plugins.models.export.build import build_for_export, model_class


def test_a_recorded_model_type_names_only_this_projects_model_classes(tmp_path):
    """MMEngine's registry imports and calls any dotted name: a checkpoint whose recorded config said
    ``type='torch.hub.load'`` (plain data, which the safe unpickler takes) ran a ``hubconf.py`` shipped beside it in
    the converter, chat and eval. The name is now looked up in this package only, and must be a model class."""
    hub = tmp_path / 'hub'
    hub.mkdir()
    ran = tmp_path / 'ran'
    (hub / 'hubconf.py').write_text(f'open({str(ran)!r}, "w").write("ran")\ndef entry(**kw):\n    return None\n')
    for kind in ('torch.hub.load', 'os.system', 'xtuner_plugins.models.export.build.build_for_export',
                 'xtuner_plugins.nothing.Here', 'VisionLanguageModel', None, dict):
        cfg = Config(dict(model=dict(type=kind, repo_or_dir=str(hub), model='entry', source='local')))
        with pytest.raises(Refused, match=r"is not one of this project's model classes"):
            build_for_export(cfg, None, torch.float32)
        assert not ran.exists(), kind
    assert model_class('xtuner_plugins.models.VisionLanguageModel') is VisionLanguageModel
    assert model_class('xtuner_plugins.models.InternVLModel') is VisionLanguageModel   # its old name
    assert model_class(VisionLanguageModel) is VisionLanguageModel


def test_a_model_class_of_the_users_own_comes_from_the_config_given_with_the_checkpoint(tmp_path, monkeypatch):
    """A checkpoint of a subclass in the user's own module names it by its dotted name, which is not imported from
    the checkpoint: given with the training config (which imports it), the class is the config's."""
    from xtuner_plugins.models.runconfig import run_config
    (tmp_path / 'mymodels.py').write_text('from xtuner_plugins.models import VisionLanguageModel\n\n\n'
                                          'class MyVLM(VisionLanguageModel):\n    pass\n')
    (tmp_path / 'cfg.py').write_text('from mymodels import MyVLM\nmodel = dict(type=MyVLM)\n')
    monkeypatch.syspath_prepend(str(tmp_path))
    torch.save({'meta': {'cfg': "model = dict(type='mymodels.MyVLM')\n"}, 'state_dict': {}}, tmp_path / 'ck.pth')
    cfg = run_config(str(tmp_path / 'ck.pth'), str(tmp_path / 'cfg.py'), None, log=lambda m: None)
    assert model_class(cfg.model['type']).__name__ == 'MyVLM'
    alone = run_config(str(tmp_path / 'ck.pth'), None, None, log=lambda m: None)
    with pytest.raises(Refused, match=r'give the training config with the checkpoint \(CONFIG CHECKPOINT\)'):
        model_class(alone.model['type'])
