"""DeepSpeed checkpoint folders appear under their name only when complete; a killed save leaves a hidden
``.incomplete`` folder that the converter refuses and the next start removes."""

import os
from types import SimpleNamespace

import pytest

from xtuner_plugins.engine.checkpointing import CheckpointCleanupHook, save_then_rename, stale_temporaries
from xtuner_plugins.models.checkpoint import load_trained_state_dict


def write_parts(path, fail_after=None):
    os.makedirs(path)
    for i in range(3):
        if i == fail_after:
            raise KeyboardInterrupt('killed')  # what a kill looks like to the writer: it stops mid-way
        with open(os.path.join(path, f'zero_pp_rank_{i}_mp_rank_00_model_states.pt'), 'w') as f:
            f.write('x')


def test_the_folder_gets_its_name_when_complete(tmp_path):
    final = str(tmp_path / 'iter_4.pth')
    save_then_rename(write_parts, final)
    assert sorted(os.listdir(final)) == [f'zero_pp_rank_{i}_mp_rank_00_model_states.pt' for i in range(3)]
    assert os.listdir(tmp_path) == ['iter_4.pth']
    save_then_rename(write_parts, final)  # saved again under the same name: replaced
    assert os.listdir(tmp_path) == ['iter_4.pth']


def test_a_killed_save_leaves_no_folder_under_the_final_name(tmp_path):
    final = str(tmp_path / 'iter_8.pth')
    with pytest.raises(KeyboardInterrupt):
        save_then_rename(lambda p: write_parts(p, fail_after=2), final)
    assert not os.path.exists(final)
    (partial,) = stale_temporaries(str(tmp_path))
    assert os.path.basename(partial) == '.iter_8.pth.incomplete'
    with pytest.raises(ValueError, match=r'\.iter_8\.pth\.incomplete is a checkpoint whose save did not finish'):
        load_trained_state_dict(partial)
    (tmp_path / '.last_checkpoint.abc123.tmp').write_text('half')  # a killed atomic write
    (tmp_path / 'iter_4.pth').write_text('kept')
    CheckpointCleanupHook().before_run(SimpleNamespace(work_dir=str(tmp_path)))
    assert os.listdir(tmp_path) == ['iter_4.pth']


def test_deepspeeds_save_goes_through_it():
    from mmengine._strategy.deepspeed import DeepSpeedStrategy
    assert getattr(DeepSpeedStrategy.save_checkpoint, '_xtuner_plugins_checkpoint_patch', False)
