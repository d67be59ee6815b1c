"""The conversion's checks before it writes (``models/export/job.py``)."""

import pytest

from xtuner_plugins.models.export.job import check_out_dir


@pytest.mark.parametrize('out', ['/', '//', '/work/..'])
def test_the_root_folder_holds_every_input(out, tmp_path):
    """OUT_DIR / (with --overwrite the old folder is removed before the new one takes its place) is refused as
    holding the inputs, as any other folder above them is."""
    checkpoint = str(tmp_path / 'iter_2.pth')
    with pytest.raises(ValueError, match=f'OUT_DIR {out} is, holds or lies inside an input'):
        check_out_dir(out, [checkpoint], overwrite=True)
    with pytest.raises(ValueError, match='holds or lies inside an input'):
        check_out_dir(str(tmp_path), [checkpoint], overwrite=True)
    with pytest.raises(ValueError, match='holds or lies inside an input'):
        check_out_dir(str(tmp_path / 'iter_2.pth' / 'out'), [checkpoint], overwrite=True)
    assert check_out_dir(str(tmp_path / 'iter_2.pthx'), [checkpoint], overwrite=True) == str(tmp_path / 'iter_2.pthx')
