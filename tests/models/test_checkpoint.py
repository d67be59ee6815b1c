"""``models/checkpoint.read_meta``: a training checkpoint's ``meta``, and a clear error naming any other file;
reading a checkpoint runs none of its code (its pickle, its recorded config)."""

import json
import re

import pytest
import torch
from safetensors.torch import save_file

from xtuner_plugins.models.checkpoint import config_settings, load_trained_state_dict, read_meta, recorded_model_config


def test_the_meta_of_a_checkpoint_and_of_a_deepspeed_folder(tmp_path):
    torch.save({'meta': {'cfg': 'x = 1'}, 'state_dict': {'w': torch.ones(2)}}, tmp_path / 'iter_2.pth')
    assert read_meta(str(tmp_path / 'iter_2.pth')) == {'cfg': 'x = 1'}
    folder = tmp_path / 'iter_4.pth'
    folder.mkdir()
    torch.save({'meta': {'cfg': 'y = 2'}, 'module': {}}, folder / 'mp_rank_00_model_states.pt')
    assert read_meta(str(folder)) == {'cfg': 'y = 2'}
    torch.save({'w': torch.ones(2)}, tmp_path / 'weights.pth')
    assert read_meta(str(tmp_path / 'weights.pth')) == {}


@pytest.mark.parametrize('kind', ['safetensors', 'truncated', 'text', 'empty', 'zip'])
def test_a_file_that_is_no_checkpoint_is_named(tmp_path, kind):
    """An empty file was 'not a training checkpoint torch can read (RuntimeError: mmap can only be used with files
    saved with torch.save(..., _use_new_zipfile_serialization=True)', advice about re-saving it (a helper's sweep):
    its size and what it is not are said."""
    path = tmp_path / 'model.bin'
    if kind == 'safetensors':
        save_file({'w': torch.ones(2)}, str(path))
    elif kind == 'truncated':
        torch.save({'meta': {}, 'state_dict': {'w': torch.ones(1000)}}, tmp_path / 'whole.pth')
        path.write_bytes((tmp_path / 'whole.pth').read_bytes()[:300])
    elif kind == 'zip':   # a zip file, not torch's
        import zipfile
        with zipfile.ZipFile(path, 'w') as z:
            z.writestr('notes.txt', 'x')
    else:
        path.write_text('' if kind == 'empty' else 'iter_10.pth\n')
    said = {'empty': r'is empty \(0 bytes\)', 'zip': r'is not a training checkpoint torch can read \(\w+: '}.get(
        kind, r"is not a training checkpoint: its [0-9,]+ bytes are not in torch\.save's format \(another program's "
              r'file, or a copy cut short\)')
    with pytest.raises(ValueError, match=rf'^{path} {said}.*; give a checkpoint of training: work_dirs/'):
        read_meta(str(path))
    with pytest.raises(FileNotFoundError):
        read_meta(str(tmp_path / 'missing.pth'))


class Marker:
    """Pickles as a call of ``touch`` (what a tampered checkpoint could hold): loading it must not run it."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return touch, (self.path,)


def touch(path):
    with open(path, 'w') as f:
        f.write('ran')
    return path


@pytest.mark.parametrize('where', ['message_hub', 'state_dict', 'meta'])
def test_reading_a_checkpoint_runs_none_of_its_code(tmp_path, where):
    marker = tmp_path / 'ran'
    ckpt = {'meta': {'cfg': 'x = 1'}, 'state_dict': {'w': torch.ones(2)}, 'message_hub': {}}
    if where == 'meta':
        ckpt['meta']['cfg'] = Marker(str(marker))
    elif where == 'state_dict':
        ckpt['state_dict']['extra'] = Marker(str(marker))
    else:
        ckpt['message_hub']['log_scalars'] = Marker(str(marker))
    torch.save(ckpt, tmp_path / 'iter_2.pth')
    if where == 'meta':
        with pytest.raises(ValueError, match=r"iter_2.pth: its meta\['cfg'\] \(the training config\) is a pickled "
                                             r"tests.models.test_checkpoint.touch object \(not loaded\), not text"):
            read_meta(str(tmp_path / 'iter_2.pth'))
    else:
        assert read_meta(str(tmp_path / 'iter_2.pth')) == {'cfg': 'x = 1'}
        state = load_trained_state_dict(str(tmp_path / 'iter_2.pth'))
        assert torch.equal(state['w'], torch.ones(2))
    assert not marker.exists()


def test_a_meta_that_is_not_a_mapping_is_named(tmp_path):
    torch.save({'meta': ['cfg', 'x = 1'], 'state_dict': {}}, tmp_path / 'iter_2.pth')
    with pytest.raises(ValueError, match=r"iter_2.pth: its meta is list \['cfg', 'x = 1'\], not the mapping"):
        read_meta(str(tmp_path / 'iter_2.pth'))


def test_the_recorded_config_is_read_as_data_never_run(tmp_path):
    marker = tmp_path / 'ran'
    text = ("model = dict(type='xtuner_plugins.models.VisionLanguageModel', select_layer=-1, llm_lora=dict(r=16),\n"
            "             mean=(0.5, 0.5), layers=[1, 2], flags={'a': True}, path=None)\n")
    assert config_settings(text, 'here') == {'model': dict(
        type='xtuner_plugins.models.VisionLanguageModel', select_layer=-1, llm_lora=dict(r=16), mean=(0.5, 0.5),
        layers=[1, 2], flags={'a': True}, path=None)}
    for bad, line, code in [(f'import os\nx = os.system("touch {marker}")\n', 1, 'import os'),
                            (f'x = 1\ny = open("{marker}", "w")\n', 2, f'open("{marker}", "w")'),
                            ('x = 1\ndef f():\n    pass\n', 2, 'def f():'),
                            ('x = dict(**y)\n', 1, 'dict(**y)'),
                            ('x = {[1]: 2}\n', 1, 'x = {[1]: 2}')]:
        torch.save({'meta': {'cfg': bad}, 'state_dict': {}}, tmp_path / 'iter_2.pth')
        with pytest.raises(ValueError, match=rf"iter_2.pth: meta\['cfg'\] \(the training config\): line {line} is "
                                             rf"not a plain setting \({re.escape(repr(code[:80]))}\); .* never run"):
            recorded_model_config(str(tmp_path / 'iter_2.pth'))
    assert not marker.exists()
    with pytest.raises(ValueError, match=r"^here: not Python settings \(line 1: "):
        config_settings('x = (', 'here')
    torch.save({'meta': {'cfg': 'model = [1]'}, 'state_dict': {}}, tmp_path / 'iter_2.pth')
    with pytest.raises(ValueError, match=r"iter_2.pth: meta\['cfg'\] \(the training config\) sets model to list"):
        recorded_model_config(str(tmp_path / 'iter_2.pth'))


def flip_inside(path, pattern: bytes) -> None:
    """Flip the bits of 16 bytes in the middle of the first run of ``pattern`` in the file (a weight's record)."""
    data = bytearray(open(path, 'rb').read())
    at = data.index(pattern * 64) + 32 * len(pattern)
    data[at:at + 16] = bytes(b ^ 0xFF for b in data[at:at + 16])
    open(path, 'wb').write(bytes(data))


def test_a_checkpoint_whose_bytes_changed_is_refused_naming_its_record(tmp_path):
    """torch.load never checks the CRC-32 torch.save writes for each record: a checkpoint with bytes flipped in a
    weight converted and chatted without a word (the weight quietly other). Refused, naming the file and record."""
    path = tmp_path / 'iter_2.pth'
    torch.save({'meta': {}, 'state_dict': {'w': torch.full((4096,), 1.5)}}, path)
    for lazy in (False, True):
        assert torch.equal(load_trained_state_dict(str(path), lazy=lazy)['w'].contiguous(), torch.full((4096,), 1.5))
    flip_inside(path, torch.tensor([1.5]).numpy().tobytes())
    for lazy in (False, True):
        with pytest.raises(ValueError, match=rf'^{re.escape(str(path))}: its record iter_2/data/0 does not match the '
                                             r'checksum \(CRC-32\) written with it: the file is damaged'):
            load_trained_state_dict(str(path), lazy=lazy)


def test_a_source_folders_weight_index_naming_a_file_outside_it_is_refused(tmp_path):
    """A source folder's (an official checkpoint's, an encoder's) index naming '../x.safetensors' or an absolute
    path read that other file without a word, as the converted folders' did (folder.check_folder refuses those)."""
    from xtuner_plugins.models.checkpoint import read_hf_weights
    folder, outside = tmp_path / 'model', tmp_path / 'outside.safetensors'
    folder.mkdir()
    save_file({'mlp1.0.weight': torch.ones(2)}, str(outside))
    save_file({'mlp1.0.weight': torch.zeros(2)}, str(folder / 'model-00001-of-00001.safetensors'))
    index = folder / 'model.safetensors.index.json'
    for name in ('../outside.safetensors', str(outside)):
        index.write_text(json.dumps({'weight_map': {'mlp1.0.weight': name}}))
        with pytest.raises(ValueError, match=rf"{index}: it names '{name}' as a weight file, not a file of this "
                                             r'folder'):
            read_hf_weights(str(folder), 'mlp1.')
    index.write_text(json.dumps({'weight_map': {'mlp1.0.weight': 'model-00001-of-00001.safetensors'}}))
    assert read_hf_weights(str(folder), 'mlp1.')['mlp1.0.weight'].tolist() == [0.0, 0.0]
