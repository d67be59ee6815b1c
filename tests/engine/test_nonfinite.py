"""Non-finite losses, gradient norms and weights (xtuner_plugins/engine/nonfinite.py): 'stop' raises naming the
iteration and the batch's samples before anything is updated; 'skip' drops the step, leaving the weights as they
were, and stops past its limit; a checkpoint is never written with a non-finite weight."""

from types import SimpleNamespace

import pytest
import torch
from mmengine.hooks import CheckpointHook
from torch import nn

from xtuner_plugins.engine.nonfinite import (GuardedOptimWrapper, NonFiniteError, NonFiniteGuard,
                                             NonFiniteGuardHook)


def setup(policy='stop', max_skipped=10):
    model = nn.Linear(3, 1)
    wrapper = GuardedOptimWrapper(optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                  clip_grad=dict(max_norm=1.0, error_if_nonfinite=False))
    wrapper.guard = NonFiniteGuard(policy, max_skipped)
    wrapper.guard.iteration, wrapper.guard.samples = 7, ['data/a.jsonl:3', 'data/a.jsonl:9']
    return model, wrapper


def train_step(model, wrapper, x):
    loss = model(x).sum()
    wrapper.guard.check_loss(loss)  # what VisionLanguageModel.parse_losses does
    wrapper.update_params(loss)


def test_stop_names_the_iteration_and_the_samples_before_any_update():
    model, wrapper = setup('stop')
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(NonFiniteError, match=r'non-finite loss \(nan on rank 0\) at iteration 7; the batch\'s '
                                             r'samples: data/a.jsonl:3, data/a.jsonl:9; no checkpoint'):
        train_step(model, wrapper, torch.tensor([[float('nan'), 1.0, 1.0]]))
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_skip_drops_the_step_then_training_goes_on_and_stops_past_the_limit():
    model, wrapper = setup('skip', max_skipped=1)
    before = [p.detach().clone() for p in model.parameters()]
    train_step(model, wrapper, torch.tensor([[float('inf'), 1.0, 1.0]]))
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # no update
    assert wrapper.guard.skipped == 1 and all(p.grad is None or not p.grad.any() for p in model.parameters())
    train_step(model, wrapper, torch.ones(1, 3))  # a finite batch trains
    assert not torch.equal(before[0], model.weight)
    with pytest.raises(NonFiniteError, match=r'after 1 dropped steps, the limit'):
        train_step(model, wrapper, torch.tensor([[float('nan'), 1.0, 1.0]]))


def test_a_non_finite_gradient_norm_with_a_finite_loss():
    model, wrapper = setup('stop')
    model.weight.register_hook(lambda g: torch.full_like(g, float('inf')))  # an overflow in the backward pass
    loss = model(torch.ones(1, 3)).sum()
    wrapper.guard.check_loss(loss)
    with pytest.raises(NonFiniteError, match=r'non-finite gradient norm \(inf\) at iteration 7'):
        wrapper.update_params(loss)
    model, wrapper = setup('skip')
    before = model.weight.detach().clone()
    model.weight.register_hook(lambda g: torch.full_like(g, float('inf')))
    loss = model(torch.ones(1, 3)).sum()
    wrapper.guard.check_loss(loss)
    wrapper.update_params(loss)
    assert torch.equal(before, model.weight) and wrapper.guard.skipped == 1


def runner_for(model, tmp_path, it=3, max_iters=10, interval=4):
    (tmp_path / 'last_checkpoint').write_text(str(tmp_path / 'iter_2.pth'))
    return SimpleNamespace(model=model, iter=it, max_iters=max_iters, work_dir=str(tmp_path),
                           hooks=[CheckpointHook(by_epoch=False, interval=interval, save_last=True)],
                           optim_wrapper=None)


def test_no_checkpoint_with_a_non_finite_weight(tmp_path):
    model = nn.Linear(3, 1)
    hook = NonFiniteGuardHook()
    runner = runner_for(model, tmp_path, it=3)  # iteration 4: CheckpointHook saves now
    hook.before_train(runner)
    hook.before_train_iter(runner, 0, {'data': {'samples': ['x.jsonl:1']}})
    hook.after_train_iter(runner, 0)  # finite: saved as usual
    with torch.no_grad():
        model.weight[0, 1] = float('inf')
    with pytest.raises(NonFiniteError, match=r'non-finite trained weights after iteration 4; the batch\'s samples: '
                                             r'x.jsonl:1: weight; the checkpoint of this iteration is not written; '
                                             r'the newest checkpoint .*iter_2.pth'):
        hook.after_train_iter(runner, 0)
    runner.iter = 4  # iteration 5 saves nothing: nothing to check
    hook.after_train_iter(runner, 0)


def test_skip_is_refused_where_a_step_cannot_be_dropped(tmp_path):
    runner = runner_for(nn.Linear(1, 1), tmp_path)
    runner.optim_wrapper = SimpleNamespace()  # e.g. DeepSpeedOptimWrapper
    with pytest.raises(ValueError, match="policy 'skip' needs AutoOptimWrapper"):
        NonFiniteGuardHook(policy='skip').before_train(runner)
    NonFiniteGuardHook(policy='stop').before_train(runner)
    with pytest.raises(ValueError, match="non-finite policy 'never'"):
        NonFiniteGuardHook(policy='never')


# ------------------------------------------------------------------ through XTuner's train script
def _diverging_run(tmp_path, policy, max_skipped=10):
    import os

    from tests.configs.conftest import ROOT, tiny_options
    from tests.helpers import tiny_workspace
    from tests.train_utils import find_checkpoints, run_train
    tiny = tiny_workspace(tmp_path / 'tiny')
    options = dict(tiny_options(tiny, tiny['same'], repeat=16, lr=1e6),  # diverges: nan from iteration 4
                   **{'default_hooks.checkpoint.interval': 1, 'custom_hooks.2.policy': policy,
                      'custom_hooks.2.max_skipped': max_skipped})
    out = run_train(os.path.join(ROOT, 'configs', 'finetune_full.py'), str(tmp_path / 'work'), cfg_options=options,
                    script=os.path.join(ROOT, 'tools', 'train.py'))
    for path in find_checkpoints(str(tmp_path / 'work')):  # every checkpoint left is finite
        state = torch.load(path, map_location='cpu', weights_only=False)['state_dict']
        assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point()), path
    return out


def test_a_diverging_run_stops_at_the_first_nan_and_keeps_its_last_finite_checkpoint(tmp_path):
    out = _diverging_run(tmp_path, 'stop')
    assert out.returncode == 1 and out.checkpoints, out.summary()
    newest = out.checkpoints[-1]
    saved = int(newest.rsplit('iter_', 1)[1].split('.')[0])  # every iteration saves: the failing one is next
    assert f'train: FAILED: NonFiniteError: non-finite loss (nan on rank 0) at iteration {saved + 1}; ' \
           f'the batch\'s samples: ' in out.log and f'the newest checkpoint (finite' in out.log, out.summary()
    assert f'{newest}. Lower the learning rate' in out.log and 'same.jsonl:' in out.log, out.summary()


def test_policy_skip_drops_steps_up_to_its_limit(tmp_path):
    out = _diverging_run(tmp_path, 'skip', max_skipped=2)
    assert 'step dropped (1 of at most 2)' in out.log and 'step dropped (2 of at most 2)' in out.log, out.summary()
    assert out.returncode == 1 and '(after 2 dropped steps, the limit)' in out.log, out.summary()


@pytest.mark.parametrize('max_skipped', [-1, 2.5, True])
def test_a_max_skipped_that_is_no_count_is_refused(max_skipped):
    """``max_skipped=-1`` stopped at the first non-finite step as if the policy were 'stop', without a word."""
    from xtuner_plugins.engine.nonfinite import NonFiniteGuardHook
    with pytest.raises(ValueError, match=rf"max_skipped: expected a whole number >= 0 .*, got {max_skipped!r}$"):
        NonFiniteGuardHook(policy='skip', max_skipped=max_skipped)
    assert NonFiniteGuardHook(policy='skip', max_skipped=0).guard.max_skipped == 0


def test_a_rank_with_a_finite_loss_says_the_non_finite_one_is_elsewhere(monkeypatch):
    import xtuner_plugins.engine.nonfinite as nonfinite
    monkeypatch.setattr(nonfinite, 'all_ranks_finite', lambda value: False)  # another rank's loss is nan
    with pytest.raises(NonFiniteError, match=r'non-finite loss \(on another rank; 2.5 on rank 0\) at iteration 7'):
        setup('stop')[1].guard.check_loss(torch.tensor(2.5))
