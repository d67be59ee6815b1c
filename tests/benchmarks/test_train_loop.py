"""train_loop.py's bf16-against-fp32 check (``precision_check``, ``bench_train.py --precision-check``) and
synthetic.py's reusable work folder (``prepare``, ``--workdir``), on tiny models on the CPU."""

import os

import pytest
import torch

from benchmarks import train_loop
from benchmarks.synthetic import TRAINED, prepare
from benchmarks.train_loop import PRECISION_TOLERANCE, precision_check
from xtuner_plugins.data import InternVLDataset, internvl_collate_fn
from xtuner_plugins.data.packing import PackedInternVLDataset
from xtuner_plugins.models import VisionLanguageModel


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
    work = str(tmp_path_factory.mktemp('precision'))
    models, data = prepare(work, False, None, 4)
    ds = InternVLDataset(data, image_folders=os.path.join(work, 'data', 'images'), tokenizer=models['llm'],
                         image_size=models['image_size'], max_dynamic_patch=12, cache_dir=os.path.join(work, 'c'))
    packed = PackedInternVLDataset(ds, max_tokens=2 * max(ds.length), max_tiles=None, seed=0)
    batches = [internvl_collate_fn([packed[i % len(packed)]])['data'] for i in range(2)]
    return dict(work=work, models=models, data=data, batches=batches)


def build(models):
    torch.manual_seed(0)
    return VisionLanguageModel(vision_encoder=models['internvit'], llm=models['llm'], **TRAINED,
                               torch_dtype='float32').train()


def test_bf16_training_stays_within_tolerance_of_fp32_from_the_same_weights(setup):
    model = build(setup['models'])
    start = {k: v.detach().clone() for k, v in train_loop.trained_parameters(model).items()}
    result = precision_check(model, setup['batches'], 'cpu')
    assert result['ok'], result
    assert 0 < result['loss_rel'] < PRECISION_TOLERANCE['loss'] and result['grad_rel'] < PRECISION_TOLERANCE['grad']
    assert result['tensors'] == len(start) and result['same_trained']
    # the second run trained as the timed rows do: the frozen ViT in bf16, the trained parts in fp32 (moved)
    assert next(model.vision_model.parameters()).dtype == torch.bfloat16
    params = train_loop.trained_parameters(model)
    assert all(p.dtype == torch.float32 for p in params.values())
    assert any(not torch.equal(params[k], start[k]) for k in start)
    # both runs started from the same weights: a fresh fp32 model's first loss is the reference's first loss
    fresh = build(setup['models'])
    first = float(train_loop.ours_loss(fresh, setup['batches'][0]).detach())
    assert first == pytest.approx(result['losses_fp32'][0], rel=1e-6)


def test_a_bf16_only_difference_of_one_percent_fails_the_check(setup, monkeypatch):
    ours = train_loop.ours_loss

    def skewed(model, batch):
        loss = ours(model, batch)
        return loss * 1.01 if torch.is_autocast_enabled('cpu') else loss

    monkeypatch.setattr(train_loop, 'ours_loss', skewed)
    result = precision_check(build(setup['models']), setup['batches'], 'cpu')
    assert not result['ok'] and result['loss_rel'] == pytest.approx(0.01, rel=0.05)


def test_work_folder_is_reused_and_refuses_other_settings(setup):
    data = os.path.join(setup['work'], 'data', 'data.jsonl')
    stamp = os.stat(data).st_mtime_ns
    assert prepare(setup['work'], False, None, 4) == (setup['models'], setup['data'])
    assert os.stat(data).st_mtime_ns == stamp  # not written again
    with pytest.raises(SystemExit, match='use another --workdir'):
        prepare(setup['work'], False, None, 6)
