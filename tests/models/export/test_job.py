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


def test_a_claim_that_cannot_be_written_is_not_left_behind(tmp_path, monkeypatch):
    """A conversion on a full disk left an empty OUT.converting-PID that no later conversion removed."""
    import builtins
    import os

    from xtuner_plugins.models.export import job
    real = builtins.open

    def full(path, mode='r', *args, **kwargs):
        f = real(path, mode, *args, **kwargs)
        if '.converting-' in str(path) and 'w' in mode:
            f.close()
            raise OSError(28, 'No space left on device')
        return f
    monkeypatch.setattr(builtins, 'open', full)
    with pytest.raises(OSError, match='No space left'):
        with job.claimed(str(tmp_path / 'conv')):
            pass
    monkeypatch.undo()
    assert os.listdir(tmp_path) == []


def test_an_old_folder_that_cannot_be_removed_is_said(tmp_path, monkeypatch, capsys):
    """--overwrite of a conversion whose files another user owns left OUT.old-PID, a whole model, in silence."""
    import os
    import shutil

    from xtuner_plugins.models.export import job
    out = tmp_path / 'conv'
    out.mkdir()
    (out / 'config.json').write_text('{}')
    monkeypatch.setattr(shutil, 'rmtree', lambda path, ignore_errors=False: None if ignore_errors else 1 / 0)
    job.written_whole(str(out), lambda tmp: open(os.path.join(tmp, 'config.json'), 'w').close())
    old = f'{out}.old-{os.getpid()}'
    assert os.path.isdir(old) and (out / 'config.json').read_text() == ''
    assert f'warning: the replaced folder could not be removed whole ({old}: ' in capsys.readouterr().err


@pytest.mark.parametrize('kind', ['to nothing', 'under one to nothing', 'loop', 'under a loop'])
def test_an_out_dir_through_a_link_that_leads_nowhere_is_refused(tmp_path, kind):
    """A link to nothing as OUT_DIR had its target made, parents and all, by the conversion; a link loop failed
    only once the whole model was converted ('Not a directory'). Both are refused before anything is built."""
    import os
    gone = tmp_path / 'gone' / 'dir'
    if 'nothing' in kind:
        os.symlink(gone, tmp_path / 'link')
        why = f'a symbolic link to {gone}, which does not exist; a conversion never makes a link\'s target: make ' \
              'that folder first, or give another OUT_DIR'
    else:
        os.symlink(tmp_path / 'lp2', tmp_path / 'link')
        os.symlink(tmp_path / 'link', tmp_path / 'lp2')
        why = f'a symbolic link loop ({tmp_path / "link"} -> {tmp_path / "lp2"} -> ...); give another OUT_DIR'
    out = str(tmp_path / 'link' / 'sub') if 'under' in kind else str(tmp_path / 'link')
    where = f'lies under {tmp_path / "link"},' if 'under' in kind else 'is'
    with pytest.raises(ValueError) as refused:
        check_out_dir(out, [str(tmp_path / 'iter_1.pth')], overwrite=False)
    assert str(refused.value) == f'OUT_DIR {out} {where} {why}'
    assert not (tmp_path / 'gone').exists()


@pytest.mark.parametrize('encoder, projector, why', [
    ('siglip', 'mlp', "llama.cpp's converter reads LlavaForConditionalGeneration only with a Pixtral vision tower"),
    ('clip', 'mlp', "llama.cpp's converter reads LlavaForConditionalGeneration only with a Pixtral vision tower"),
    ('internvit', 'bilinear_mlp', "llama.cpp reads InternVL's official layout only: projector bilinear_mlp"),
    ('internvit', 'pixel_shuffle_mlp', None)])   # one it takes: llama.cpp is asked for
def test_a_model_llama_cpp_cannot_take_is_refused_before_make_gguf_is_asked_for(tmp_path, monkeypatch, encoder,
                                                                                  projector, why):
    """A SigLIP + LLaVA MLP checkpoint converted --format gguf was told `llama.cpp is not built here ...: run make
    gguf first` (7 minutes), and only then refused as a model llama.cpp cannot take. Its settings say so first."""
    import os

    from tests.train_utils import REPO_ROOT
    from xtuner_plugins.models.export.job import export_checkpoint
    from xtuner_plugins.tiny import make_tiny_models
    paths = make_tiny_models(str(tmp_path), vision=encoder)
    monkeypatch.setenv('XTUNER_GGUF_VENV', str(tmp_path / 'none'))   # llama.cpp not built
    with pytest.raises(ValueError) as refused:
        export_checkpoint(os.path.join(REPO_ROOT, 'configs', 'finetune_full.py'), None, str(tmp_path / 'out'),
                          fmt='gguf', cfg_options={'model.vision_encoder': paths[encoder], 'model.llm': paths['llm'],
                                                   'model.projector': projector})
    if why is None:
        assert str(refused.value).startswith('llama.cpp is not built here'), refused.value
    else:
        assert str(refused.value).startswith(f'--format gguf does not fit this model: {why}'), refused.value
        assert 'make gguf' not in str(refused.value)
    assert not (tmp_path / 'out').exists()
