"""engine/resume_load.py: resume reads a checkpoint's training state (message hub, numpy, ConfigDict, DeepSpeed's
objects) for real and refuses every other global before it runs, through MMEngine's loader and DeepSpeed's."""

import os
import pickle

import numpy as np
import pytest
import torch
from mmengine.config import ConfigDict
from mmengine.logging import HistoryBuffer, MessageHub

from xtuner_plugins.engine import resume_load
from xtuner_plugins.engine.resume_load import TRUST_ENV, UntrustedCheckpoint


class Calls:
    """Unpickled, calls ``func(*args)``: what a tampered checkpoint carries."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def training_state(tmp_path):
    """What MMEngine's runner saves: meta with the config, the message hub's HistoryBuffers, optimizer and
    scheduler states (protocol 2, as torch.save writes)."""
    hub = MessageHub.get_instance('resume_load_test')
    for i in range(5):
        hub.update_scalar('train/loss', 1.0 / (i + 1))
    hub.update_info('iter', 4)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    return {'meta': {'cfg': 'model = dict(type=1)\n', 'seed': 7, 'iter': 4, 'dataset_meta': ConfigDict(a=1),
                     'arrays': [np.arange(3, dtype=np.int64), np.float32(2.5)], 'tags': {'x', 'y'}},
            'state_dict': model.state_dict(), 'message_hub': hub.state_dict(), 'optimizer': opt.state_dict(),
            'param_schedulers': [{'last_step': 4, 'base_lrs': [1e-3]}]}


def test_a_training_checkpoint_comes_back_whole(tmp_path):
    state = training_state(tmp_path)
    path = str(tmp_path / 'iter_4.pth')
    torch.save(state, path)
    got = resume_load.load(path, map_location='cpu')
    buffer = got['message_hub']['log_scalars']['train/loss']
    assert isinstance(buffer, HistoryBuffer) and buffer.mean() == pytest.approx(np.mean([1, 1 / 2, 1 / 3, 1 / 4, 1 / 5]))
    assert buffer.statistics('min') == pytest.approx(0.2)   # its statistics methods, pickled through getattr
    assert isinstance(got['meta']['dataset_meta'], ConfigDict) and got['meta']['dataset_meta'].a == 1
    assert got['meta']['arrays'][0].tolist() == [0, 1, 2] and got['meta']['arrays'][1] == np.float32(2.5)
    assert got['meta']['tags'] == {'x', 'y'} and got['meta']['cfg'] == state['meta']['cfg']
    for k, v in state['state_dict'].items():
        assert torch.equal(got['state_dict'][k], v)
    assert got['optimizer']['param_groups'] == state['optimizer']['param_groups']
    hub = MessageHub.get_instance('resume_load_test_back')
    hub.load_state_dict(got['message_hub'])   # as the runner's resume does
    assert hub.get_info('iter') == 4


@pytest.mark.parametrize('payload, named', [
    (lambda marker: Calls(open, marker, 'w'), 'io.open'),
    (lambda marker: Calls(os.system, f'touch {marker}'), 'posix.system'),
    (lambda marker: Calls(getattr, HistoryBuffer, '_set_default_statistics'), "getattr(HistoryBuffer, "
                                                                              "'_set_default_statistics')"),
    (lambda marker: Calls(getattr, ConfigDict, 'to_dict'), "getattr(ConfigDict, 'to_dict')"),
])
def test_a_tampered_checkpoint_is_refused_before_it_runs(tmp_path, payload, named):
    marker = str(tmp_path / 'ran')
    state = training_state(tmp_path)
    state['meta']['extra'] = payload(marker)
    path = str(tmp_path / 'iter_4.pth')
    torch.save(state, path)
    with pytest.raises(UntrustedCheckpoint) as info:
        resume_load.load(path, map_location='cpu')
    message = str(info.value)
    assert message.startswith(f'{path} ') and named in message and f'{TRUST_ENV}=1' in message, message
    assert not os.path.exists(marker)


@pytest.mark.parametrize('keep', [300, 0])
def test_a_checkpoint_cut_short_is_refused_in_one_line(tmp_path, keep):
    """A resume from a truncated iter_N.pth ended in torch's traceback, naming no file in its last line."""
    from xtuner_plugins.errors import Refused
    path = tmp_path / 'iter_2.pth'
    torch.save(training_state(tmp_path), path)
    path.write_bytes(path.read_bytes()[:keep])
    with pytest.raises(Refused, match=rf'{path} does not read as a checkpoint \(.*\): cut short, perhaps'):
        resume_load.load(str(path), map_location='cpu')


def test_a_checkpoint_whose_bytes_changed_is_refused_in_one_line(tmp_path):
    """torch.load never checks the CRC-32 of a record: a resume read a weight or an optimizer state with bytes
    flipped (a bad copy, a failing disk) and trained on."""
    from tests.models.test_checkpoint import flip_inside
    from xtuner_plugins.errors import Refused
    path = tmp_path / 'iter_2.pth'
    state = training_state(tmp_path)
    state['state_dict'] = {'w': torch.full((4096,), 1.5)}
    torch.save(state, path)
    resume_load.load(str(path), map_location='cpu')
    flip_inside(path, torch.tensor([1.5]).numpy().tobytes())
    with pytest.raises(Refused, match=rf'^{path}: its record iter_2/data/\d+ does not match the checksum .*: the file '
                                      r'is damaged .*; resume from an earlier iter_N.pth'):
        resume_load.load(str(path), map_location='cpu')



def test_a_damaged_checkpoint_beside_an_earlier_one_names_how_to_resume_from_it(tmp_path):
    """resume=True on a cut or damaged iter_4.pth said 'resume from an earlier iter_N.pth (--resume PATH)', and
    --resume WORK/iter_3.pth was then refused ('this work folder holds later checkpoints (iter_4.pth) ...'): the
    damaged file has to leave the folder first. The refusal names that and the checkpoint before it now."""
    from xtuner_plugins.errors import Refused
    for n in (2, 3, 4):
        torch.save(training_state(tmp_path), tmp_path / f'iter_{n}.pth')
    path = tmp_path / 'iter_4.pth'
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(Refused) as refused:
        resume_load.load(str(path), map_location='cpu')
    assert str(refused.value).endswith(
        f'cut short, perhaps (a copy or a save that was interrupted); move {path} out of {tmp_path} (a resume '
        f'from an earlier checkpoint is refused while a later one is there) and resume from the one before it: '
        f'--resume {tmp_path / "iter_3.pth"}'), refused.value
    lone = tmp_path / 'lone' / 'iter_2.pth'   # none before it: as before
    lone.parent.mkdir()
    lone.write_bytes((tmp_path / 'iter_2.pth').read_bytes()[:300])
    with pytest.raises(Refused, match=r'resume from an earlier iter_N.pth \(--resume PATH\), or start the run '
                                      r'again$'):
        resume_load.load(str(lone), map_location='cpu')

def test_getattr_and_codecs_stay_narrow():
    """``getattr`` only gives HistoryBuffer's statistics methods, ``_codecs.encode`` only latin-1."""
    unpickler = resume_load.ResumeUnpickler.__new__(resume_load.ResumeUnpickler)
    get, encode = unpickler.find_class('builtins', 'getattr'), unpickler.find_class('_codecs', 'encode')
    assert get(HistoryBuffer, 'mean') is HistoryBuffer.mean
    for obj, name in ((HistoryBuffer, '__init__'), (HistoryBuffer, '_log_history'), (ConfigDict, 'max_length'),
                      (os, 'system'), (HistoryBuffer, 'update'), (ConfigDict, 'to_dict')):
        with pytest.raises(UntrustedCheckpoint):
            get(obj, name)
    assert encode('\xff\x00', 'latin1') == b'\xff\x00'
    with pytest.raises(UntrustedCheckpoint):
        encode('x', 'rot13')
    with pytest.raises(UntrustedCheckpoint):
        unpickler.find_class('subprocess', 'Popen')


def test_trust_env_unpickles_whole(tmp_path, monkeypatch):
    marker = str(tmp_path / 'ran')
    path = str(tmp_path / 'iter_4.pth')
    torch.save({'meta': {'extra': Calls(open, marker, 'w')}}, path)
    monkeypatch.setenv(TRUST_ENV, '1')
    resume_load.load(path, map_location='cpu')
    assert os.path.exists(marker)


def test_mmengine_and_deepspeed_loaders_read_through_it(tmp_path):
    """The runner's resume / load_from (MMEngine's CheckpointLoader) and DeepSpeed's checkpoint engine, which
    reads a ZeRO folder's files, both refuse a tampered file now (they unpickled it whole)."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    from xtuner_plugins.engine.checkpointing import apply_checkpoint_patches
    apply_checkpoint_patches()   # DeepSpeed's once it is imported (as the runners' resume does)
    from mmengine.runner.checkpoint import CheckpointLoader
    marker = str(tmp_path / 'ran')
    path = str(tmp_path / 'mp_rank_00_model_states.pt')
    torch.save({'module': {'w': torch.ones(2)}, 'extra': Calls(open, marker, 'w')}, path)
    with pytest.raises(UntrustedCheckpoint, match='io.open'):
        CheckpointLoader.load_checkpoint(path, map_location='cpu')
    with pytest.raises(UntrustedCheckpoint, match='io.open'):
        TorchCheckpointEngine().load(path, map_location='cpu')
    assert not os.path.exists(marker)
    torch.save({'module': {'w': torch.ones(2)}}, path)
    assert torch.equal(TorchCheckpointEngine().load(path, map_location='cpu')['module']['w'], torch.ones(2))


def test_the_error_is_an_unpickling_error_and_a_refusal():
    assert issubclass(UntrustedCheckpoint, pickle.UnpicklingError) and issubclass(UntrustedCheckpoint, ValueError)
