"""The XTuner row (benchmarks/xtuner_row.py): XTuner 0.2.0's ``InternVL_V1_5`` built on an official folder written
from our model must compute what ours computes (tiny models, fp32, CPU).

The trained tensors of our model are moved away from their initial values first, so the loss depends on the
weights and on the images, not only on the vocabulary size, and a check that passes means the same
computation: the same tensors trained, the same token-mean loss and the same gradients on a padded batch.
"""

import copy
import os
import subprocess
import sys

import pytest
import torch

from benchmarks.bench_memory import write_models
from benchmarks.flops import model_shapes
from benchmarks.synthetic import TRAINED, write_data
from benchmarks.train_loop import check_step, compare_checks, ours_loss, run, trained_parameters
from benchmarks.xtuner_row import (CHECK_TOLERANCE, build_xtuner_model, ensure_process_group, write_official_folder,
                                   xtuner_inputs, xtuner_loss)
from xtuner_plugins.data import InternVLDataset, internvl_collate_fn
from xtuner_plugins.models import VisionLanguageModel
from xtuner_plugins.models.export import official_state_dict
from xtuner_plugins.models.loss import causal_lm_loss

pytest.importorskip('xtuner')

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOL = CHECK_TOLERANCE['cpu']


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp('bench_xtuner'))
    models = write_models(os.path.join(tmp, 'models'), False)
    data = write_data(os.path.join(tmp, 'data'), 6, models['image_size'])
    ds = InternVLDataset(data, image_folders=os.path.join(tmp, 'data', 'images'), tokenizer=models['llm'],
                         image_size=models['image_size'], max_dynamic_patch=12, cache_dir=os.path.join(tmp, 'c'))
    torch.manual_seed(0)
    model = VisionLanguageModel(vision_encoder=models['internvit'], llm=models['llm'], **TRAINED, torch_dtype='float32')
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    model.train()
    folder = write_official_folder(model, os.path.join(tmp, 'official'), models['image_size'])
    created = ensure_process_group(tmp)
    xt = build_xtuner_model(folder, 'cpu', grad_ckpt=False, attn='sdpa')
    batch = internvl_collate_fn([ds[0], ds[1], ds[2]])['data']
    yield dict(model=model, xt=xt, folder=folder, batch=batch, ds=ds, tmp=tmp)
    if created:
        torch.distributed.destroy_process_group()


def ours_check(model, batch):
    return check_step(lambda b: ours_loss(model, b), trained_parameters(model), batch, 'cpu')


def xtuner_check(xt, batch):
    return check_step(lambda b: xtuner_loss(xt, b), trained_parameters(xt.model), batch, 'cpu')


def test_xtuner_model_holds_our_weights_and_trains_the_same_parts(setup):
    model, xt = setup['model'], setup['xt']
    theirs = xt.model.state_dict()
    ours = official_state_dict(model)
    assert set(theirs) == set(ours)
    for key, value in ours.items():  # the exact values and dtypes, not XTuner's bf16 load
        assert theirs[key].dtype == value.dtype and torch.equal(theirs[key], value), key
    trained = set(trained_parameters(xt.model))
    assert trained == set(trained_parameters(model))
    assert {k.split('.')[0] for k in trained} == {'mlp1', 'language_model'}
    assert not any(p.requires_grad for p in xt.model.vision_model.parameters())
    assert not xt.model.language_model.is_gradient_checkpointing
    assert xt.model.language_model.config._attn_implementation == 'sdpa'
    assert xt.model.img_context_token_id == model.img_context_token_id


def test_xtuner_loss_and_gradients_equal_ours_with_token_mean(setup):
    model, xt, batch = setup['model'], setup['xt'], setup['batch']
    assert not bool(batch['attention_mask'].all())  # padded rows: the token mean must skip the padding
    ours, theirs = ours_check(model, batch), xtuner_check(xt, batch)
    check = compare_checks(ours, theirs, TOL)
    assert check['ok'], check
    assert check['loss_rel'] < 1e-6 and check['grad_rel'] < 1e-5 and check['tensors'] == len(ours['trained'])
    # every gradient tensor, not only its norm
    params = trained_parameters(model)
    xparams = trained_parameters(xt.model)
    ours_loss(model, batch).backward()
    xtuner_loss(xt, batch).backward()
    try:
        for name, p in params.items():
            assert torch.allclose(p.grad, xparams[name].grad, rtol=1e-4, atol=1e-7), name
    finally:
        for p in list(params.values()) + list(xparams.values()):
            p.grad = None
    # the check can tell the reductions apart: the per-sample mean is far from XTuner's loss
    with torch.no_grad():
        logits = model(dict(batch), mode='tensor')
        sample_mean = float(causal_lm_loss(logits, batch['labels'], 'sample'))
        token_mean = float(causal_lm_loss(logits, batch['labels'], 'token'))
    assert abs(token_mean - theirs['loss']) < 1e-5 * abs(token_mean)
    assert abs(sample_mean - theirs['loss']) > 10 * TOL * abs(token_mean)


def test_check_fails_on_other_images_weights_or_trained_parts(setup):
    model, xt, batch, folder = setup['model'], setup['xt'], setup['batch'], setup['folder']
    ours = ours_check(model, batch)
    # the images of the first two samples swapped (13 tiles each)
    n0, n1 = batch['num_tiles'][:2].tolist()
    swapped = dict(batch)
    pv = batch['pixel_values']
    swapped['pixel_values'] = torch.cat([pv[n0:n0 + n1], pv[:n0], pv[n0 + n1:]])
    assert n0 == n1 and not torch.equal(swapped['pixel_values'], pv)
    assert not compare_checks(ours, xtuner_check(xt, swapped), TOL)['ok']
    # the weights as XTuner itself would have loaded them (bf16, hard-coded in InternVL_V1_5), back in fp32
    saved = {k: v.clone() for k, v in xt.model.state_dict().items()}
    with torch.no_grad():
        for p in xt.model.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    try:
        rounded = compare_checks(ours, xtuner_check(xt, batch), TOL)
    finally:
        xt.model.load_state_dict(saved)
    assert not rounded['ok']
    # one projector weight matrix scaled by 1.01
    weight = xt.model.mlp1[1].weight
    with torch.no_grad():
        weight.mul_(1.01)
    try:
        assert not compare_checks(ours, xtuner_check(xt, batch), TOL)['ok']
    finally:
        xt.model.load_state_dict(saved)
    assert compare_checks(ours, xtuner_check(xt, batch), TOL)['ok']  # restored
    # the LLM frozen in XTuner's model: other trained tensors (the same loss, so the loss alone would pass)
    frozen_llm = build_xtuner_model(folder, 'cpu', grad_ckpt=False, attn='sdpa', trained=dict(TRAINED, freeze_llm=True))
    check = compare_checks(ours, xtuner_check(frozen_llm, batch), TOL)
    assert check['loss_rel'] < 1e-6 and not check['same_trained'] and not check['ok']


def test_run_checks_its_first_timed_step_on_the_weights_it_started_from(setup):
    """``run(check=...)`` (the real-size rows' check, no step of its own): the warm-up moves no weight, and the
    first timed step's loss and gradient norms are :func:`check_step`'s on that batch from the first weights;
    the timed step itself still trains."""
    model, ds = copy.deepcopy(setup['model']), setup['ds']
    batches = [internvl_collate_fn([ds[i], ds[i + 1]]) for i in (0, 2)]   # the warm-up's, then the checked step's
    expected = ours_check(setup['model'], batches[1]['data'])
    first = {k: v.detach().clone() for k, v in trained_parameters(model).items()}
    shapes = model_shapes(model.vision_model.config, model.language_model.config, model.downsample_ratio)
    r = run(model, batches, 1, 'cpu', shapes, check=trained_parameters(model))
    assert r['check']['trained'] == expected['trained'] and len(expected['grad_norms']) > 10
    assert r['check']['loss'] == expected['loss']
    assert r['check']['grad_norms'] == expected['grad_norms']
    assert all(not torch.equal(first[k], v) for k, v in trained_parameters(model).items())   # trained after it
    assert 'check' not in run(copy.deepcopy(setup['model']), batches, 1, 'cpu', shapes)


def test_xtuner_inputs_match_its_collate_and_image_flags(setup):
    ds, xt = setup['ds'], setup['xt']
    sample = ds[0]
    text_only = dict(input_ids=sample['input_ids'][:20], labels=sample['labels'][:20],
                     pixel_values=torch.zeros(1, *sample['pixel_values'].shape[1:], dtype=torch.uint8),
                     image_flags=torch.zeros(1, dtype=torch.long))
    text_only['input_ids'] = torch.where(text_only['input_ids'] == xt.model.img_context_token_id, 5,
                                         text_only['input_ids'])
    batch = internvl_collate_fn([sample, text_only])['data']
    inputs = xtuner_inputs(batch)
    assert [t.shape[0] for t in inputs['pixel_values']] == [sample['pixel_values'].shape[0], 1]
    assert inputs['pixel_values'][0].dtype == torch.float32
    # XTuner's image flags (tile pixel sum != 0) are ours
    flags = (torch.cat(inputs['pixel_values']).sum(dim=(1, 2, 3)) != 0).long()
    assert torch.equal(flags, batch['image_flags'])
    length = batch['input_ids'].shape[1]
    assert torch.equal(inputs['position_ids'], torch.arange(length).repeat(2, 1))
    for key in ('input_ids', 'labels', 'attention_mask'):
        assert inputs[key] is batch[key]
    with pytest.raises(ValueError, match='packed'):
        xtuner_inputs(dict(batch, seq_lens=[torch.tensor([length])]))
    with pytest.raises(ValueError, match='mlp1'):
        build_xtuner_model(setup['folder'], 'cpu', grad_ckpt=False, attn='sdpa',
                           trained=dict(TRAINED, freeze_projector=True))


@pytest.mark.slow
def test_tiny_benchmark_prints_the_xtuner_row_check_and_ratios():
    out = subprocess.run([sys.executable, 'benchmarks/bench_train.py', '--samples', '4', '--batch', '2', '--steps',
                          '1', '--workers', '0'], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = {line.split()[0]: line.split() for line in out.stdout.splitlines()
            if line.startswith(('packed ', 'unpacked ', 'xtuner '))}
    assert set(rows) == {'packed', 'unpacked', 'xtuner'}
    assert rows['xtuner'][3] == rows['unpacked'][3]  # the same batches: the same FLOPs per step
    assert rows['xtuner'][7] == rows['unpacked'][7]  # and the same padding
    check = [line for line in out.stdout.splitlines() if line.startswith('loss check')]
    assert len(check) == 1 and check[0].endswith('-> OK (tolerance 0.0001)'), out.stdout
    assert any(line.startswith('ours/xtuner tokens/s: unpacked ') for line in out.stdout.splitlines())
    assert 'not comparable' not in out.stdout and 'could not run' not in out.stdout
