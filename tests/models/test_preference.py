"""Preference losses: each term against its formula computed by hand, MPO's weighted sum, the BCO baseline
as a running mean, and the sequence log-probabilities of the answer tokens only; the model's preference forward
with either reference (LoRA adapters off, or the frozen copy of full training, also of a ZeRO-3 partitioned LLM)
and held-out preference accuracy."""

import math

import pytest
import torch
from torch import nn

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


def test_reward_accuracy_counts_a_tie_half():
    from xtuner_plugins.models.preference import reward_accuracy
    chosen, rejected = torch.tensor([1.0, 0.0, -1.0, 0.0]), torch.tensor([0.0, 0.0, 0.0, 0.0])
    assert reward_accuracy(chosen, rejected).item() == pytest.approx((1 + 0.5 + 0 + 0.5) / 4)


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
    assert loss.item() == pytest.approx(0.8 * metrics['term_sigmoid'].item() + 0.2 * metrics['term_bco_pair'].item()
                                        + 1.0 * 2.0, rel=1e-6)
    with pytest.raises(ValueError, match="types \\['dpo'\\]"):
        preference_losses(**PAIRS, beta=0.1, types=('dpo',))


def test_gradients_raise_the_chosen_and_lower_the_rejected():
    chosen = torch.tensor([-5.0], requires_grad=True)
    rejected = torch.tensor([-6.0], requires_grad=True)
    loss, _ = preference_losses(chosen, rejected, torch.tensor([-5.0]), torch.tensor([-6.0]), beta=0.1)
    loss.backward()
    assert chosen.grad.item() < 0 < rejected.grad.item()


# ------------------------------------------------------------------ the model's preference forward
@pytest.fixture
def pair_items(tiny, tmp_path):
    """Loaded pairs (before collation): with an image, text-only, with an image again."""
    from tests.helpers import write_image, write_jsonl
    from tests.models.conftest import TILE
    from xtuner_plugins.data import InternVLPreferenceDataset
    write_image(tmp_path / 'i' / 'a.png', size=(120, 50), seed=1)
    path = write_jsonl(tmp_path / 'p.jsonl', [
        {'image': 'a.png', 'question': 'What is it?', 'chosen': 'a wide thing', 'rejected': 'a cat'},
        {'question': 'Hello', 'chosen': 'hi there', 'rejected': 'go away now'},
        {'image': 'a.png', 'question': 'Colour?', 'chosen': 'grey, mostly', 'rejected': 'red'}])
    ds = InternVLPreferenceDataset(path, image_folders=str(tmp_path / 'i'), tokenizer=tiny['llm'], image_size=TILE,
                                   max_dynamic_patch=6, cache_dir=str(tmp_path / 'cache'))
    return [ds[i] for i in range(len(ds))]


@pytest.fixture
def pairs(pair_items):
    from xtuner_plugins.data import preference_collate_fn
    return preference_collate_fn(pair_items[:2])['data']


def test_dpo_on_the_model_starts_at_log_2_and_learns_to_prefer_the_chosen(tiny, pairs):
    from tests.models.conftest import build
    torch.manual_seed(0)
    model = build(tiny, freeze_projector=True, llm_lora=dict(r=8, lora_alpha=16, target_modules='all-linear'),
                  preference=dict(types=('sigmoid', 'sft'), weights=(1.0, 0.0), beta=0.1))
    out = model(dict(pairs), mode='loss')
    # LoRA's B starts at zero: the policy is its reference, every reward is 0 and the DPO term is log 2
    assert out['term_sigmoid'].item() == pytest.approx(math.log(2), abs=1e-6)
    assert out['rewards_margin'].item() == pytest.approx(0.0, abs=1e-6)
    assert out['rewards_accuracy'].item() == 0.5  # every pair a tie
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trained and all('lora_' in n for n in trained)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(8):
        out = model(dict(pairs), mode='loss')
        opt.zero_grad()
        out['loss'].backward()
        opt.step()
    out = model(dict(pairs), mode='loss')
    assert out['term_sigmoid'].item() < math.log(2) - 0.05 and out['rewards_accuracy'].item() == 1.0, out
    loss, log_vars = model.parse_losses(out)  # the metrics are logged, only 'loss' is summed
    assert loss.item() == pytest.approx(out['loss'].item()) and 'rewards_margin' in log_vars


def test_preference_forward_under_flex_attention_equals_sdpa(tiny, pairs):
    """The pairs' padded rows through flex attention's own mask, policy and reference passes (forward only:
    torch's FlexAttention has no backward on a CPU; the packing tests check the masks' gradients)."""
    from tests.models.conftest import build
    lora = dict(r=8, lora_alpha=16, target_modules='all-linear')
    settings = dict(types=('sigmoid', 'sft'), weights=(1.0, 1.0), beta=0.1)
    sdpa = build(tiny, freeze_projector=True, llm_lora=lora, preference=settings).eval()
    flex = build(tiny, freeze_projector=True, llm_lora=lora, preference=settings,
                 attn_implementation='flex_attention').eval()
    _away_from_reference(sdpa)
    with torch.no_grad():
        flex.load_state_dict(super(type(sdpa), sdpa).state_dict())
        expected, out = sdpa(dict(pairs), mode='loss'), flex(dict(pairs), mode='loss')
    assert abs(expected['rewards_margin'].item()) > 1e-3
    assert {k: v.item() for k, v in out.items()} == pytest.approx({k: v.item() for k, v in expected.items()},
                                                                  rel=1e-4, abs=1e-5)


def _away_from_reference(model, seed=0):
    """LoRA's B set at random: a policy away from its reference, so rewards are not all zero."""
    with torch.no_grad():
        gen = torch.Generator().manual_seed(seed)
        for name, param in model.named_parameters():
            if 'lora_B' in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.1)


@pytest.mark.parametrize('attn', ['sdpa', 'eager', 'sdpa_segments'])
def test_packed_pairs_give_the_losses_and_gradients_of_unpacked_pairs(tiny, pair_items, attn):
    """Pairs packed into rows (one row of all three, or rows of two and one) give every loss term, metric and
    LoRA gradient of the same pairs one per row; rows that do not pack the pairs alike are refused."""
    from tests.models.conftest import build
    from xtuner_plugins.data import preference_collate_fn
    from xtuner_plugins.data.packing import pack_items
    model = build(tiny, freeze_projector=True, llm_lora=dict(r=8, lora_alpha=16, target_modules='all-linear'),
                  preference=dict(MPO), attn_implementation=attn)
    _away_from_reference(model)

    def run(items):
        model.zero_grad()
        model._reward_baseline = None  # BCO's running mean starts afresh for each layout
        out = model(dict(preference_collate_fn(items)['data']), mode='loss')
        out['loss'].backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        return {k: v.item() for k, v in out.items()}, grads

    expected, expected_grads = run(pair_items)
    assert abs(expected['rewards_margin']) > 1e-3
    for layout in ([pair_items], [pair_items[:2], pair_items[2:]]):
        out, grads = run([pack_items(items) for items in layout])
        assert out == pytest.approx(expected, rel=1e-4, abs=1e-6)
        for name, grad in grads.items():
            torch.testing.assert_close(grad, expected_grads[name], rtol=1e-4, atol=1e-6)
    data = preference_collate_fn([pack_items(pair_items)])['data']
    data['seq_lens'][1] = torch.tensor([int(data['seq_lens'][1].sum())])  # the rejected row as one sample
    with pytest.raises(ValueError, match=r'chosen rows hold \[3\] samples but the rejected rows \[1\]'):
        model(dict(data), mode='loss')


def _policy_away_from_reference(tiny, reference, **settings):
    """An MPO model whose policy differs from its reference: LoRA's (``'lora'``: B drawn at random) or a frozen
    copy's (``'copy'``: the LLM's weights moved; ``'copy+tower'``: the vision tower trained too)."""
    from tests.models.conftest import build
    torch.manual_seed(0)
    if reference == 'lora':
        model = build(tiny, freeze_projector=True, llm_lora=dict(r=8, lora_alpha=16, target_modules='all-linear'),
                      preference=dict(MPO), **settings)
        _away_from_reference(model)
        return model
    model = build(tiny, freeze_projector=False, freeze_llm=False, freeze_vision=reference == 'copy',
                  preference=dict(MPO), **settings)
    with torch.no_grad():
        for p in model.language_model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


def _step(model, data, seen: list):
    """One forward and backward on ``data`` (``seen`` cleared first, for the hooks to fill): the outputs, every
    trained parameter's gradient and what ``seen`` got."""
    seen.clear()
    model.zero_grad()
    model._reward_baseline = None   # BCO's running mean starts afresh
    out = model(dict(data), mode='loss')
    out['loss'].backward()
    return ({k: v.item() for k, v in out.items()},
            {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}, list(seen))


def _assert_same_step(got, expected):
    out, grads, _ = got
    assert abs(expected[0]['rewards_margin']) > 1e-3   # a policy away from its reference
    assert out == pytest.approx(expected[0], rel=1e-5, abs=1e-6)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected[1][name], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize('reference,packed', [('lora', False), ('lora', True), ('copy', False)])
def test_the_lm_head_runs_at_the_answers_only_with_the_losses_of_whole_logits(tiny, pair_items, monkeypatch,
                                                                               reference, packed):
    """The policy's and the reference's LM head see only the positions whose next token is an answer token
    (``logits_to_keep``), and every loss term, metric and gradient equals those of the whole rows' logits."""
    from xtuner_plugins.data import preference_collate_fn
    from xtuner_plugins.data.packing import pack_items
    from xtuner_plugins.models import VisionLanguageModel
    model = _policy_away_from_reference(tiny, reference, attn_implementation='sdpa_segments' if packed else 'sdpa')
    heads = [model.language_model] + ([model.reference['language_model']] if model.reference else [])
    seen = []
    for head in heads:
        head.get_output_embeddings().register_forward_hook(lambda mod, args, out: seen.append(tuple(args[0].shape)))
    data = preference_collate_fn([pack_items(pair_items)] if packed else pair_items[:2])['data']
    got = _step(model, data, seen)
    labels = data['labels']
    answers = int((labels[:, 1:] != IGNORE_INDEX).any(0).sum())
    assert answers < labels.shape[1] // 2   # the image and the prompt: most of each row
    assert len(got[2]) == 2 and all(shape[:2] == (labels.shape[0], answers) for shape in got[2]), got[2]
    monkeypatch.setattr(VisionLanguageModel, 'llm_keeps_logits', property(lambda self: False))
    expected = _step(model, data, seen)
    assert all(shape[:2] == labels.shape for shape in expected[2]), expected[2]
    _assert_same_step(got, expected)


@pytest.mark.parametrize('reference', ['lora', 'copy', 'copy+tower'])
def test_a_tower_not_trained_runs_once_per_pair(tiny, pair_items, monkeypatch, reference):
    """Both answers of a pair carry the same tiles: a frozen tower runs on one copy (for the policy and the
    reference alike) with every loss term, metric and gradient of running it on each row; a trained tower runs
    on every row's tiles, as in SFT, and tiles whose halves differ are not shared."""
    from xtuner_plugins.data import preference_collate_fn
    from xtuner_plugins.models import preference
    model = _policy_away_from_reference(tiny, reference)
    tiles, features = [], model.vision.features

    def counted(module, pixel_values):   # the tiles each run of a tower (the policy's or the reference's) takes
        tiles.append(pixel_values.shape[0])
        return features(module, pixel_values)
    monkeypatch.setattr(model.vision, 'features', counted)
    data = preference_collate_fn(pair_items[:2])['data']
    total = data['pixel_values'].shape[0]
    got = _step(model, data, tiles)
    assert got[2] == ([total, total] if reference == 'copy+tower' else [total // 2]), got[2]
    monkeypatch.setattr(preference, 'pair_features', lambda model, pixel_values: None)
    expected = _step(model, data, tiles)
    assert expected[2] == ([total] if reference == 'lora' else [total, total]), expected[2]
    _assert_same_step(got, expected)
    monkeypatch.undo()
    other = data['pixel_values'].clone()
    other[-1] = 255 - other[-1]   # the halves differ: each row's own tiles
    assert preference.pair_features(model, other) is None


def test_preference_settings_that_leave_no_reference_are_refused(tiny):
    from tests.models.conftest import build
    lora = dict(r=8, lora_alpha=16, target_modules='all-linear')
    with pytest.raises(ValueError, match='with llm_lora needs the LLM, projector and vision tower frozen'):
        build(tiny, llm_lora=lora, freeze_projector=False, preference=dict(beta=0.1))
    with pytest.raises(ValueError, match='full preference training .* needs something trained'):
        build(tiny, freeze_projector=True, preference=dict(beta=0.1))
    # its loss takes the answers' logits whole: a loss_chunk would do nothing, and plans would count it
    with pytest.raises(ValueError, match=r'^loss_chunk=64 with preference training: .*leave loss_chunk at 0'):
        build(tiny, freeze_projector=True, llm_lora=lora, preference=dict(beta=0.1), loss_chunk=64)


@pytest.mark.parametrize('setting, says', [
    (dict(types=('sigmoid',)), 'beta must be a number > 0'),   # a TypeError at the first step
    (dict(beta=0.1, loss_type='ipo'), "'loss_type' not known"),
    (dict(beta=0.1, types='sigmoid'), 'types must be a non-empty list'),   # read letter by letter
    (dict(beta=0.1, types=()), 'types must be a non-empty list'),   # a loss of 0 with no gradient
    (dict(beta=-0.1), 'beta must be a number > 0'), (dict(beta=0), 'beta must be a number > 0'),
    (dict(beta=float('nan')), 'beta must be a number > 0'),   # a NaN loss
    (dict(beta=0.1, types=('sigmoid', 'sft'), weights=(1.0,)), 'weights must be one number for each'),
    # a negative weight flips the preference as a negative beta does; all 0 learns nothing; a type named twice
    (dict(beta=0.1, weights=[-1.0]), r'weights must be >= 0, got \[-1.0\] .*prefer the rejected answers'),
    (dict(beta=0.1, types=('sigmoid', 'bco_pair', 'sft'), weights=(0.8, -0.2, 1.0)), 'weights must be >= 0'),
    (dict(beta=0.1, weights=[0.0]), r'weights \[0.0\] for types \[.sigmoid.\] are all 0: nothing would be'),
    (dict(beta=0.1, types=('sigmoid', 'bco_pair', 'sft'), weights=(0, 0, 0)), 'are all 0'),
    (dict(beta=0.1, types=['sigmoid', 'sigmoid']), "name 'sigmoid' more than once"),
])
def test_preference_loss_settings_are_refused_before_the_model_loads(tiny, setting, says, monkeypatch):
    """They were read at the first training step (a raw TypeError), or not at all (a negative beta flipped the
    preference, NaN trained on NaN)."""
    from tests.models.conftest import build
    from xtuner_plugins.models import internvl
    monkeypatch.setattr(internvl, 'build_parts', lambda *a, **k: pytest.fail('the parts were built first'))
    with pytest.raises(ValueError, match=says):
        build(tiny, freeze_projector=True, llm_lora=dict(r=8, lora_alpha=16, target_modules='all-linear'),
              preference=setting)


def test_preference_weights_of_0_for_some_terms_are_taken():
    from xtuner_plugins.models.preference import MPO, check_losses
    check_losses(dict(MPO))
    check_losses(dict(beta=0.1, types=('sigmoid', 'bco_pair', 'sft'), weights=(1.0, 0.0, 0)))


def test_full_mpo_reference_is_a_frozen_copy_that_never_changes(tiny, pairs):
    """Full MPO (LLM and projector trained): the reference is a frozen copy of both, equal to the policy at first
    (the DPO term is log 2), unchanged by training, reached by no gradient, in eval mode, and not in the model's
    checkpoint; the policy moves away from it (positive margin). With the policy as its own reference (no copy)
    the copy check and the margin fail."""
    from tests.models.conftest import build
    torch.manual_seed(0)
    model = build(tiny, freeze_projector=False, freeze_llm=False, preference=MPO)
    assert sorted(model.reference) == ['language_model', 'mlp1']
    own = {p.data_ptr() for p in model.parameters() if p.requires_grad}
    before = {k: v.detach().clone() for k, v in model.reference.named_parameters()}
    assert before and not own & {p.data_ptr() for p in model.reference.parameters()}
    out = model(dict(pairs), mode='loss')
    assert out['term_sigmoid'].item() == pytest.approx(math.log(2), abs=1e-6)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.train()
    for _ in range(4):
        out = model(dict(pairs), mode='loss')
        opt.zero_grad()
        out['loss'].backward()
        assert all(p.grad is None for p in model.reference.parameters())
        assert all(p.grad is None for p in model.vision_model.parameters())
        assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad), 'a trained part missed'
        opt.step()
    assert not model.reference.training and model.language_model.training
    after = dict(model.reference.named_parameters())
    assert all(torch.equal(before[k], after[k]) for k in before), 'the reference changed during training'
    with torch.no_grad():
        out = model(dict(pairs), mode='loss')
    assert out['rewards_margin'].item() > 0 and out['term_sigmoid'].item() < math.log(2), out
    assert not [k for k in model.state_dict() if k.startswith('reference.')]


def test_full_mpo_in_bf16_starts_exactly_at_its_reference(tiny, pairs):
    """bf16 weights, fp32 trained parts under bf16 autocast (the GPU recipe): the frozen copy keeps in fp32 what
    autocast does not cast (norms, embeddings, rotary frequencies) and its matrices in bf16, so it computes what
    the policy computes, bit for bit, from fp32 trained weights that are not bf16 numbers (an SFT checkpoint's):
    the DPO term is log 2 and every reward 0. A copy all in bf16 started at 0.6932254 on these pairs."""
    from tests.models.conftest import build
    from xtuner_plugins.models.preference import frozen_copies
    torch.manual_seed(0)
    model = build(tiny, torch_dtype='bfloat16', freeze_projector=False, freeze_llm=False, preference=MPO)
    assert model.autocast_dtype == torch.bfloat16
    with torch.no_grad():   # fp32 trained weights, as an SFT checkpoint's are
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 1e-3 * (p.abs().mean() + 1e-3))
    model.reference = frozen_copies({'mlp1': model.mlp1, 'language_model': model.language_model}, torch.bfloat16)
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
        out = model(dict(pairs), mode='loss')
    assert out['term_sigmoid'].item() == math.log(2) or \
        out['term_sigmoid'].item() == pytest.approx(math.log(2), abs=1e-7), out
    assert out['rewards_chosen'].item() == 0 and out['rewards_rejected'].item() == 0, out
    llm = model.reference['language_model']  # memory: the matrices in bf16
    assert {p.dtype for m in llm.modules() if isinstance(m, nn.Linear) for p in m.parameters(recurse=False)
            if p is not llm.get_input_embeddings().weight} == {torch.bfloat16}, 'the matrices are in bf16'
    assert llm.get_input_embeddings().weight.dtype == torch.float32


# ------------------------------------------------------------------ held-out preference accuracy
def colour_pairs(tmp_path, tiny, name, n, seed):
    """Pairs about a one-colour picture: the chosen answer names its colour in a sentence, the rejected one
    names another colour with a shrug (a preference in the words, which the tiny model learns in a few steps;
    the demo's preference stage is the test of one that needs the image)."""
    import random

    from PIL import Image

    from tests.helpers import write_jsonl
    from tests.models.conftest import TILE
    from xtuner_plugins.data import InternVLPreferenceDataset
    rng, colours, rows = random.Random(seed), ['red', 'green', 'blue'], []
    for i in range(n):
        colour = rng.choice(colours)
        Image.new('RGB', (60, 40), colour).save(tmp_path / f'{name}{i}.png')
        rows.append({'image': f'{name}{i}.png', 'question': 'What colour is it?', 'chosen': f'It is {colour}.',
                     'rejected': f'no idea, {rng.choice([c for c in colours if c != colour])} maybe'})
    ds = InternVLPreferenceDataset(write_jsonl(tmp_path / f'{name}.jsonl', rows), image_folders=str(tmp_path),
                                   tokenizer=tiny['llm'], image_size=TILE, max_dynamic_patch=2,
                                   cache_dir=str(tmp_path / 'cache'))
    return [ds[i] for i in range(n)]


@torch.no_grad()
def independent_reward_accuracy(model, initial, items):
    """The held-out accuracy computed apart from the preference code path: each side's rows in an SFT batch,
    log-probabilities of the policy and of ``initial`` (the same model built again, not trained: what the
    reference must equal), the rewards compared here."""
    from xtuner_plugins.data import internvl_collate_fn
    from xtuner_plugins.models.preference import reward_accuracy

    def log_ratios(side):
        batch = internvl_collate_fn([dict(it[side], pixel_values=it['pixel_values'], image_flags=it['image_flags'])
                                     for it in items])['data']
        policy = sequence_logps(model(batch, mode='tensor'), batch['labels'])[0]
        return policy - sequence_logps(initial(batch, mode='tensor'), batch['labels'])[0]

    return reward_accuracy(log_ratios('chosen'), log_ratios('rejected')).item()


HELD_OUT_SETUPS = {  # LoRA DPO (adapters-off reference), full MPO (frozen-copy reference)
    'dpo_lora': (dict(freeze_projector=True, llm_lora=dict(r=8, lora_alpha=16, target_modules='all-linear'),
                      preference=dict(types=('sigmoid',), beta=0.1)), 1e-2),
    'mpo_full': (dict(freeze_projector=False, freeze_llm=False, preference=MPO), 1e-3),
}


@pytest.mark.parametrize('setup', list(HELD_OUT_SETUPS))
def test_held_out_preference_accuracy_rises_from_chance(tiny, tmp_path, setup):
    """DPO with LoRA / full MPO on 12 pairs: on 12 held-out pairs the implicit reward prefers the chosen answer at
    least 9 times in 10, from 0.5 (every pair a tie: the policy is its reference) before, by the model's own metric
    and by one computed apart. Swapping chosen and rejected in the batch, or a reference that is the policy
    itself, fails this."""
    from tests.models.conftest import build, train_steps
    from xtuner_plugins.data import preference_collate_fn
    settings, lr = HELD_OUT_SETUPS[setup]
    torch.manual_seed(0)
    train = preference_collate_fn(colour_pairs(tmp_path, tiny, 'train', 12, 0))['data']
    held_out = colour_pairs(tmp_path, tiny, 'held', 12, 1)
    model = build(tiny, **settings)
    torch.manual_seed(0)
    initial = build(tiny, **dict(settings, preference=None)).eval()
    with torch.no_grad():
        assert model(preference_collate_fn(held_out)['data'], mode='loss')['rewards_accuracy'].item() == 0.5
    assert independent_reward_accuracy(model, initial, held_out) == 0.5
    train_steps(model, train, 10, lr=lr)
    with torch.no_grad():
        out = model(preference_collate_fn(held_out)['data'], mode='loss')
    assert out['rewards_accuracy'].item() >= 0.9 and out['rewards_margin'].item() > 0, out
    assert independent_reward_accuracy(model, initial, held_out) >= 0.9


ZERO3_COPY = '''
import os, sys, torch
os.environ.update(RANK='0', WORLD_SIZE='1', LOCAL_RANK='0', MASTER_ADDR='127.0.0.1', MASTER_PORT=sys.argv[2])
import deepspeed
from transformers.integrations import HfDeepSpeedConfig
from xtuner_plugins.models.llm import load_llm, untie_embeddings
from xtuner_plugins.models.preference import frozen_copies
from xtuner_plugins.models.zero3 import gathered, hf_zero3_init, is_zero3_partitioned
from xtuner_plugins.engine.runtime import apply_cpu_patches
apply_cpu_patches()  # as in every training process: no g++ build of DeepSpeed's shared-memory op
deepspeed.init_distributed(dist_backend='gloo')
registered = HfDeepSpeedConfig({'zero_optimization': {'stage': 3}, 'train_micro_batch_size_per_gpu': 1})
with hf_zero3_init(True):
    llm = load_llm(sys.argv[1], torch.float32)
untie_embeddings(llm)
with torch.no_grad(), gathered(list(llm.parameters()), modify=True):
    for p in llm.parameters():
        p.add_(0.5)  # the copy must hold these values, not a fresh load's or initialisation's
params = dict(llm.named_parameters())
assert sum(is_zero3_partitioned(p) for p in params.values()) > 10
copy = frozen_copies({'language_model': llm}, torch.float32)['language_model']
for name, p in copy.named_parameters():
    assert is_zero3_partitioned(p) and not p.requires_grad, name
    with gathered([p, params[name]]):
        assert p.numel() > 0 and torch.equal(p, params[name]), name
print('copied', len(params))
'''


def test_frozen_copy_of_an_llm_partitioned_while_built(tiny, tmp_path):
    """An LLM built inside DeepSpeed's zero.Init (GPUs under --deepspeed deepspeed_zero3) cannot be deep-copied:
    its copy is built partitioned and filled tensor by tensor; gathered, it equals the source (one gloo process)."""
    import subprocess
    import sys

    from tests.train_utils import free_port, train_env
    script = tmp_path / 'zero3_copy.py'
    script.write_text(ZERO3_COPY)
    out = subprocess.run([sys.executable, str(script), tiny['llm'], str(free_port())], capture_output=True,
                         text=True, env=train_env(), timeout=300)
    assert out.returncode == 0 and 'copied' in out.stdout, out.stderr[-3000:]
