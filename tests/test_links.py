"""A path through a symbolic link that leads nowhere, in words (``xtuner_plugins/links.py``): the work folder,
a conversion's OUT_DIR and a cache folder refuse it with these words (their own tests)."""

import os

from xtuner_plugins.links import Nowhere, leads_nowhere


def test_a_link_to_nothing_a_loop_and_the_folders_under_them(tmp_path):
    os.symlink(tmp_path / 'gone', tmp_path / 'dangling')
    os.symlink(tmp_path / 'loop', tmp_path / 'loop')
    (tmp_path / 'real').mkdir()
    os.symlink(tmp_path / 'real', tmp_path / 'fine')
    assert leads_nowhere(str(tmp_path / 'dangling')) == Nowhere(
        f'is a symbolic link to {tmp_path / "gone"}, which does not exist', True)
    assert leads_nowhere(str(tmp_path / 'dangling' / 'a' / 'b')) == Nowhere(
        f'lies under {tmp_path / "dangling"}, a symbolic link to {tmp_path / "gone"}, which does not exist', True)
    assert leads_nowhere(str(tmp_path / 'loop' / 'sub')) == Nowhere(
        f'lies under {tmp_path / "loop"}, a symbolic link loop ({tmp_path / "loop"} -> {tmp_path / "loop"} -> ...)',
        False)
    for fine in (tmp_path / 'fine', tmp_path / 'fine' / 'new' / 'folder', tmp_path / 'not' / 'made', tmp_path):
        assert leads_nowhere(str(fine)) is None, fine
    assert leads_nowhere('relative/path') is None
