"""configs/demo/*.py: each is its stage config with the demo's short system message, and nothing else changed."""

import glob
import os

import pytest
from mmengine.config import Config

from tests.configs.conftest import ROOT

DEMO_CONFIGS = sorted(glob.glob(os.path.join(ROOT, 'configs', 'demo', '*.py')))


def test_the_demo_runs_these_configs():
    from xtuner_plugins.demo.run import CONFIGS
    assert sorted(CONFIGS.values()) == DEMO_CONFIGS


@pytest.mark.parametrize('path', DEMO_CONFIGS, ids=os.path.basename)
def test_demo_config_is_its_stage_config_with_a_short_system_message(path):
    demo = Config.fromfile(path).to_dict()
    stage = Config.fromfile(os.path.join(ROOT, 'configs', os.path.basename(path))).to_dict()
    assert stage['train_dataloader']['dataset'].get('system') is None   # the template's (InternVL's) default
    system = demo.pop('demo_system_message')
    assert 0 < len(system) < 80 and demo['train_dataloader']['dataset'].pop('system') == system
    assert demo == stage
