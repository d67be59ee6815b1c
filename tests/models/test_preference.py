"""Preference losses: each term against its formula computed by hand, MPO's weighted sum, the BCO baseline
as a running mean, and the sequence log-probabilities of the answer tokens only."""

import math

import pytest
import torch

from xtuner_plugins.data.template import IGNORE_INDEX
from xtuner_plugins.models.preference import MPO, RunningMean, preference_losses, sequence_logps


def logsig(x):
    return -math.log1p(math.exp(-x))


def test_sequence_logps_sum_the_answer_tokens_only():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7)
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 3, 4, IGNORE_INDEX], [IGNORE_INDEX, 1, 2, 6, 0]])
    total, count = sequence_logps(logits, labels)
    logp = logits.log_softmax(-1)
    assert count.tolist() == [2, 4]
    assert total[0].item() == pytest.approx(logp[0, 1, 3].item() + logp[0, 2, 4].item(), abs=1e-6)
    assert total[1].item() == pytest.approx(sum(logp[1, t - 1, labels[1, t]].item() for t in range(1, 5)), abs=1e-6)


PAIRS = dict(chosen_logps=torch.tensor([-5.0, -7.0]), rejected_logps=torch.tensor([-6.0, -6.5]),
             ref_chosen_logps=torch.tensor([-5.5, -7.0]), ref_rejected_logps=torch.tensor([-5.8, -6.0]))


def test_sigmoid_dpo():
    loss, metrics = preference_losses(**PAIRS, beta=0.1)
    margins = [0.1 * ((-5.0 + 5.5) - (-6.0 + 5.8)), 0.1 * ((-7.0 + 7.0) - (-6.5 + 6.0))]
    assert loss.item() == pytest.approx(-sum(logsig(m) for m in margins) / 2, rel=1e-6)
    assert metrics['rewards_margin'].item() == pytest.approx(sum(margins) / 2, rel=1e-6)
    assert metrics['rewards_accuracy'].item() == 1.0  # both margins are positive
    assert metrics['logps_chosen'].item() == pytest.approx(-6.0)


def test_bco_pair_uses_a_running_reward_baseline():
    running = RunningMean()
    chosen, rejected = [0.1 * 0.5, 0.0], [0.1 * -0.2, 0.1 * -0.5]  # beta * log-ratios
    loss, _ = preference_losses(**PAIRS, beta=0.1, types=('bco_pair',), running=running)
    delta = sum(chosen + rejected) / 4  # the first step's baseline is its own mean reward
    expected = sum(-logsig(c - delta) - logsig(-(r - delta)) for c, r in zip(chosen, rejected)) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    running.update(torch.tensor(1.0))
    assert running.mean == pytest.approx((delta + 1.0) / 2)


def test_mpo_is_the_weighted_sum_of_its_terms():
    running = RunningMean()
    nll = torch.tensor(2.0)
    loss, metrics = preference_losses(**PAIRS, chosen_nll=nll, running=running, **MPO)
    assert loss.item() == pytest.approx(0.8 * metrics['loss_sigmoid'].item() + 0.2 * metrics['loss_bco_pair'].item()
                                        + 1.0 * 2.0, rel=1e-6)
    with pytest.raises(ValueError, match="types \\['dpo'\\]"):
        preference_losses(**PAIRS, beta=0.1, types=('dpo',))


def test_gradients_raise_the_chosen_and_lower_the_rejected():
    chosen = torch.tensor([-5.0], requires_grad=True)
    rejected = torch.tensor([-6.0], requires_grad=True)
    loss, _ = preference_losses(chosen, rejected, torch.tensor([-5.0]), torch.tensor([-6.0]), beta=0.1)
    loss.backward()
    assert chosen.grad.item() < 0 < rejected.grad.item()
