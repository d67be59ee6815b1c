"""Files this project writes get a plain file's mode (``xtuner_plugins/filemodes.py``): safetensors 0.8 writes
0600 whatever the umask, and a converted folder's weights were unreadable to any other user (a teammate, a
serving account: ``PermissionError``)."""

import json
import os
import stat
import tempfile

import pytest
import torch
from safetensors.torch import save_file

from xtuner_plugins import filemodes
from xtuner_plugins.filemodes import file_mode, umask
from xtuner_plugins.models.export.job import written_whole
from xtuner_plugins.tiny import make_tiny_models


@pytest.fixture(params=[0o022, 0o027])
def mask(request):
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


def modes(folder):
    return {os.path.relpath(os.path.join(root, n), folder): stat.S_IMODE(os.stat(os.path.join(root, n)).st_mode)
            for root, _, names in os.walk(folder) for n in names}


def test_the_umask_is_read_without_changing_it(mask):
    assert umask() == mask and os.umask(mask) == mask and file_mode() == 0o666 & ~mask


def test_a_conversion_folder_is_as_readable_as_a_plain_write_makes_it(tmp_path, mask):
    def write(tmp):
        save_file({'w': torch.zeros(2)}, os.path.join(tmp, 'model.safetensors'))
        os.makedirs(os.path.join(tmp, 'sub'))
        save_file({'w': torch.zeros(2)}, os.path.join(tmp, 'sub', 'part.safetensors'))
        with open(os.path.join(tmp, 'config.json'), 'w') as f:
            json.dump({}, f)
    out = str(tmp_path / 'conv')
    written_whole(out, write)
    assert modes(out) == dict.fromkeys(['model.safetensors', 'sub/part.safetensors', 'config.json'],
                                       0o666 & ~mask)


def test_tiny_models_are_readable_by_others(tmp_path, mask):
    written = make_tiny_models(str(tmp_path / 'tiny'))
    found = {f'{part}/{name}': mode for part, folder in written.items() for name, mode in modes(folder).items()}
    assert 'llm/model.safetensors' in found and 'internvit/model.safetensors' in found, found
    assert set(found.values()) == {0o666 & ~mask}, found


def test_a_home_that_cannot_take_tritons_cache_sends_it_to_the_temporary_folder(tmp_path, monkeypatch):
    """DeepSpeed (imported by MMEngine) makes ~/.triton/autotune as it is imported: with HOME=/nonexistent (a
    container's user id without a home) conversion, chat, eval and serving stopped there with a PermissionError
    traceback (seen as user nobody; a file as HOME stands in for it here, since root may write anywhere)."""
    from xtuner_plugins.filemodes import home_caches
    home = tmp_path / 'home'
    home.write_text('')   # not a folder: nothing can be made under it
    monkeypatch.setenv('HOME', str(home))
    monkeypatch.delenv('TRITON_CACHE_DIR', raising=False)
    (tmp_path / 'tmp').mkdir()
    monkeypatch.setattr(tempfile, 'tempdir', str(tmp_path / 'tmp'))
    home_caches()
    base = os.path.join(tempfile.gettempdir(), f'triton-{os.getuid()}')
    assert os.environ['TRITON_CACHE_DIR'] == os.path.join(base, 'cache')
    assert stat.S_IMODE(os.stat(base).st_mode) == 0o700
    os.chmod(base, 0o777)   # as another user could have made it first: not used (its pickles would be loaded)
    try:
        monkeypatch.delenv('TRITON_CACHE_DIR')
        home_caches()
        chosen = os.path.dirname(os.environ['TRITON_CACHE_DIR'])
        assert chosen != base and stat.S_IMODE(os.stat(chosen).st_mode) == 0o700
        os.rmdir(chosen)
    finally:
        os.chmod(base, 0o700)
    monkeypatch.setenv('TRITON_CACHE_DIR', '/somewhere/chosen')
    home_caches()
    assert os.environ['TRITON_CACHE_DIR'] == '/somewhere/chosen'   # the user's own setting kept
    monkeypatch.delenv('TRITON_CACHE_DIR')
    monkeypatch.setenv('HOME', str(tmp_path))
    home_caches()
    assert 'TRITON_CACHE_DIR' not in os.environ   # a home that takes it: Triton's default


def test_unreadable_names_only_the_files_a_model_is_read_from(tmp_path, monkeypatch):
    """A weight or config file this user cannot read is named with its owner and mode; another file there (a
    README, notes) stops nothing."""
    for name in ('config.json', 'model.safetensors', 'NOTES.md'):
        (tmp_path / name).write_text('x')
    real_access = os.access
    closed = {'NOTES.md'}
    monkeypatch.setattr(filemodes.os, 'access', lambda p, mode: os.path.basename(p) not in closed and
                        real_access(p, mode))
    assert filemodes.unreadable(str(tmp_path)) is None
    closed.add('model.safetensors')
    assert filemodes.unreadable(str(tmp_path)).startswith(f'{tmp_path}: this user (uid {os.getuid()}) cannot read '
                                                          f'model.safetensors (owner uid ')
