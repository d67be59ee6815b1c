"""A DeepSpeed checkpoint resumed under another ZeRO stage or on another number of ranks is refused in one line
before it loads (engine/zero_layout.py, through resume.saved_kind_refusal): a ZeRO-2 folder resumed with
--deepspeed zero3_cpu.json (2 ranks, xtuner train) ended in DeepSpeed's bare 'AssertionError' (assert
len(self.ckpt_list) > 0), and one saved by 2 ranks resumed on 1 in its ZeRORuntimeException after the model was
built."""

from xtuner_plugins.engine.resume import saved_kind_refusal
from xtuner_plugins.engine.zero_layout import saved_zero, zero_refusal


class DeepSpeedStrategy:   # xtuner's, by its name; its DeepSpeed config as MMEngine keeps it
    def __init__(self, stage=2, **config):
        self.config = dict(config, zero_optimization=dict(stage=stage))


def _folder(path, zero3: bool, ranks: int, bf16: str = ''):
    path.mkdir(parents=True)
    names = [f'zero_pp_rank_{r}_mp_rank_00_model_states.pt' for r in range(ranks)] if zero3 else \
        ['mp_rank_00_model_states.pt']
    names += [f'{bf16}zero_pp_rank_{r}_mp_rank_00_optim_states.pt' for r in range(ranks)]
    for name in names:
        (path / name).write_bytes(b'x')
    return str(path)


def test_the_layout_tells_the_stage_and_the_ranks(tmp_path):
    assert saved_zero(_folder(tmp_path / 'z2', False, 2)) == (False, 2)
    assert saved_zero(_folder(tmp_path / 'z3', True, 4)) == (True, 4)
    assert saved_zero(_folder(tmp_path / 'bf', False, 3, bf16='bf16_')) == (False, 3)
    zero0 = tmp_path / 'z0'
    zero0.mkdir()
    (zero0 / 'mp_rank_00_model_states.pt').write_bytes(b'x')
    assert saved_zero(str(zero0)) == (False, None)


def test_another_stage_is_refused_naming_both(tmp_path):
    z2, z3 = _folder(tmp_path / 'z2' / 'iter_6.pth', False, 2), _folder(tmp_path / 'z3' / 'iter_6.pth', True, 2)
    said = f'resume=True ({z2})'
    line = zero_refusal(z2, DeepSpeedStrategy(3), 2, said)
    assert line == (f'{said}: a checkpoint saved under ZeRO-0/1/2 (the weights saved whole, in '
                    'mp_rank_00_model_states.pt), and this run trains under ZeRO-3: DeepSpeed resumes a checkpoint '
                    'only under the ZeRO stage it was saved with (0, 1 or 2); resume it with that --deepspeed (e.g. '
                    'deepspeed_zero2), or start a new run from its weights (model.pretrained_pth=PATH, another '
                    '--work-dir)')
    assert 'saved under ZeRO-3 (each rank saved its part of the weights), and this run trains under ZeRO-2' in \
        zero_refusal(z3, DeepSpeedStrategy(2), 2, 'x')
    assert 'under ZeRO-1' in zero_refusal(z3, DeepSpeedStrategy(1), 2, 'x')
    for folder, stage in ((z2, 2), (z2, 1), (z3, 3)):   # the same layout: resumed
        assert zero_refusal(folder, DeepSpeedStrategy(stage), 2, 'x') is None, (folder, stage)
    # through the resume's check, as the patched Runner.resume calls it (one process here: world size 1)
    assert 'this run trains under ZeRO-3' in saved_kind_refusal(z2, DeepSpeedStrategy(3))


def test_another_number_of_ranks_is_refused_unless_universal(tmp_path):
    z2, z3 = _folder(tmp_path / 'z2', False, 2), _folder(tmp_path / 'z3', True, 4)
    assert zero_refusal(z2, DeepSpeedStrategy(2), 1, 'said') == (
        'said: saved by 2 ranks (each its partition of the optimizer\'s state: zero_pp_rank_0..1_*optim_states.pt), '
        'and this run has 1: DeepSpeed resumes ZeRO\'s partitioned optimizer state only on as many ranks; resume it '
        'on 2 (--nproc-per-node 2, NPROC_PER_NODE=2), or start a new run from its weights '
        '(model.pretrained_pth=PATH, another --work-dir)')
    assert 'saved by 4 ranks' in zero_refusal(z3, DeepSpeedStrategy(3), 8, 'x')
    assert zero_refusal(z2, DeepSpeedStrategy(2, checkpoint=dict(load_universal=True)), 1, 'x') is None
    assert zero_refusal(z3, DeepSpeedStrategy(3), 4, 'x') is None
    assert 'saved by 2 ranks' in saved_kind_refusal(z2, DeepSpeedStrategy(2))   # one process: world size 1
