"""The FLOPs accounting of benchmarks/flops.py: hand-computed values, shapes against built modules."""

import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from benchmarks.flops import (ModelShapes, batch_samples, default_peak_tflops, matmul_parameters,
                              meta_matmul_parameters, model_shapes, train_step_flops)
from benchmarks.synthetic import real_configs
from xtuner_plugins.data import internvl_collate_fn
from xtuner_plugins.data.packing import pack_items

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# A made-up model: ViT C=8, 2 layers, I=16, 2 px patches on 8 px tiles (16 patches + CLS = 17 tokens,
# 4 LLM tokens per tile after the 0.5 pixel shuffle, mlp1 32 -> 12 -> 12); LLM H=12, F=20, 3 layers,
# 3 query heads and 1 key/value head of 4 dims, vocab 50.
SMALL = ModelShapes(vit_hidden=8, vit_layers=2, vit_heads=2, vit_intermediate=16, patch_size=2, image_size=8,
                    num_channels=3, downsample_ratio=0.5, llm_hidden=12, llm_intermediate=20, llm_layers=3,
                    llm_heads=3, llm_kv_heads=1, llm_head_dim=4, vocab_size=50)
# Two samples of 10 and 6 tokens, one tile each (2 tiles, 16 tokens). Forward FLOPs by hand:
#   patch embedding  2 * (8*3*2*2 = 96) * 16 patches * 2 tiles              =   6,144
#   ViT matmuls      2 * 2 layers * (4*8*8 + 2*8*16 = 512) * 17 * 2 tiles   =  69,632
#   ViT attention    2 layers * 4 * 17^2 * 8 * 2 tiles                      =  36,992
#   projector        2 * (32*12 + 12*12 = 528) * 4 tokens * 2 tiles         =   8,448
#   LLM matmuls      2 * 3 layers * (12*12 + 2*12*4 + 12*12 + 3*12*20 = 1104) * 16 = 105,984
#   LLM attention    3 layers * 2 * (3*4) * (10^2 + 6^2)                    =   9,792
#   LM head          2 * 12 * 50 * 16                                       =  19,200
#   forward total                                                           = 256,192
SEQ_LENS, TILES = [10, 6], [1, 1]
FORWARD = 256_192


def test_forward_and_full_finetune_flops_match_hand_computed_values():
    # ViT frozen with nothing trainable before it: 1x (6,144 + 69,632 + 36,992 = 112,768);
    # projector and LLM trained: 3x (25,344; 3 * (105,984 + 9,792) = 347,328; 3 * 19,200 = 57,600)
    flops = train_step_flops(SMALL, SEQ_LENS, TILES, freeze_vision=True, freeze_projector=False, freeze_llm=False)
    assert flops == dict(vision=112_768, projector=25_344, llm=347_328, lm_head=57_600, total=543_040,
                         forward=FORWARD)


def test_lm_head_counted_at_the_supervised_tokens():
    # 3 supervised tokens of the 16: LM head forward 2 * 12 * 50 * 3 = 3,600, trained 3x = 10,800
    flops = train_step_flops(SMALL, SEQ_LENS, TILES, supervised=3)
    assert (flops['lm_head'], flops['total']) == (10_800, 543_040 - 57_600 + 10_800)
    assert flops['forward'] == FORWARD - 19_200 + 3_600


def test_frozen_llm_the_gradient_flows_through_costs_2x_weights_3x_attention():
    # MLP warm-up: LLM weights 2 * 105,984 = 211,968, attention 3 * 9,792 = 29,376, LM head 2 * 19,200
    flops = train_step_flops(SMALL, SEQ_LENS, TILES, freeze_vision=True, freeze_projector=False, freeze_llm=True)
    assert (flops['llm'], flops['lm_head'], flops['total']) == (241_344, 38_400, 417_856)


def test_everything_trained_and_nothing_trained():
    # ViT trained: patch embedding 2x (no pixel gradients) 12,288, matmuls 3 * 69,632, attention 3 * 36,992
    flops = train_step_flops(SMALL, SEQ_LENS, TILES, freeze_vision=False, freeze_projector=False, freeze_llm=False)
    assert (flops['vision'], flops['total']) == (332_160, 762_432)
    frozen = train_step_flops(SMALL, SEQ_LENS, TILES, freeze_vision=True, freeze_projector=True, freeze_llm=True)
    assert frozen['total'] == frozen['forward'] == FORWARD
    # a frozen projector behind a frozen ViT is forward only, the trained LLM still 3x
    only_llm = train_step_flops(SMALL, SEQ_LENS, TILES, freeze_vision=True, freeze_projector=True, freeze_llm=False)
    assert (only_llm['projector'], only_llm['total']) == (8_448, 526_144)


def test_packed_attention_is_per_sample_and_equals_the_unpacked_batch():
    img, per_tile = 7, SMALL.image_tokens_per_tile

    def sample(n, seed):
        ids = torch.randint(10, 40, (n,), generator=torch.Generator().manual_seed(seed))
        ids[1:1 + per_tile] = img
        return dict(input_ids=ids, labels=ids.clone(), pixel_values=torch.zeros(1, 3, 8, 8, dtype=torch.uint8),
                    image_flags=torch.ones(1, dtype=torch.long))

    items = [sample(10, 0), sample(6, 1)]
    unpacked = internvl_collate_fn(items)['data']
    packed = internvl_collate_fn([pack_items(items)])['data']
    assert unpacked['input_ids'].shape == (2, 10) and packed['input_ids'].shape == (1, 16)
    assert batch_samples(unpacked, img, per_tile) == batch_samples(packed, img, per_tile) == (SEQ_LENS, TILES)
    # attention over the whole 16-token pack would add 3 (trained) * 3 layers * 2 * 12 * (16^2 - 136)
    whole = train_step_flops(SMALL, [16], [2])
    assert whole['total'] - train_step_flops(SMALL, SEQ_LENS, TILES)['total'] == 3 * 3 * 2 * 12 * 120


def test_rejects_inconsistent_batches():
    with pytest.raises(ValueError, match='cannot hold'):
        train_step_flops(SMALL, [7], [2])  # 2 tiles are 8 image tokens
    with pytest.raises(ValueError, match='tile counts'):
        train_step_flops(SMALL, [10, 6], [1])


def test_shapes_and_matmul_sizes_match_a_built_tiny_model(tmp_path):
    from benchmarks.bench_memory import write_models
    from xtuner_plugins.models import VisionLanguageModel
    models = write_models(str(tmp_path), False)
    model = VisionLanguageModel(vision_encoder=models['internvit'], llm=models['llm'], freeze_llm=False)
    s = model_shapes(model.vision_model.config, model.language_model.config, model.downsample_ratio)
    assert s.vocab_size == model.language_model.get_output_embeddings().weight.shape[0] == len(model.tokenizer)
    with torch.no_grad():
        tile = torch.zeros(1, 3, s.image_size, s.image_size)
        assert model.vision_model(pixel_values=tile).last_hidden_state.shape[1] == s.vit_tokens_per_tile == 17
        assert model.extract_feature(tile).shape == (1, s.image_tokens_per_tile, s.llm_hidden) == (1, 4, 64)
    # every Linear / Conv2d weight of the whole model, against the formula's matmul shapes
    weights = {name + '.weight': m.weight.numel() for name, m in model.named_modules()
               if isinstance(m, (nn.Linear, nn.Conv2d))}
    p = matmul_parameters(s)
    assert sum(weights.values()) == (p['patch_embed'] + s.vit_layers * p['vit_layer'] + p['projector']
                                     + s.llm_layers * p['llm_layer'] + p['lm_head'])
    assert weights['language_model.lm_head.weight'] == p['lm_head']
    assert sum(v for k, v in weights.items() if k.startswith('mlp1.')) == p['projector']
    # what the formula leaves out is only embeddings, norms, biases and layer scales
    for name, param in model.named_parameters():
        if name not in weights:
            assert param.dim() == 1 or 'embed' in name or 'cls_token' in name, name


def test_real_sizes_match_published_parameter_counts():
    # Qwen2.5 report: 0.36B / 1.31B non-embedding parameters; InternViT-300M.
    # 0.5B: 24 * (896*896*2 + 896*128*2 + 3*896*4864) = 24 * 14,909,440 = 357,826,560
    # 1.5B: 28 * (1536*1536*2 + 1536*256*2 + 3*1536*8960) = 28 * 46,792,704 = 1,310,195,712
    # ViT:  24 * (4 * 1024^2 + 2 * 1024 * 4096) = 24 * 12,582,912 = 301,989,888
    for llm, layers_total in (('0.5b', 357_826_560), ('1.5b', 1_310_195_712)):
        vision, text = real_configs(llm)
        s = model_shapes(vision, text)
        p = matmul_parameters(s)
        assert s.llm_layers * p['llm_layer'] == layers_total
        assert s.vit_layers * p['vit_layer'] == 301_989_888
        assert (s.vit_tokens_per_tile, s.image_tokens_per_tile, s.projector_in, s.vocab_size) == (1025, 256, 4096,
                                                                                                151674)
        assert p['lm_head'] == s.llm_hidden * 151674
    # and the modules transformers builds from these configs (on the meta device) have exactly these weights
    vision, text = real_configs('1.5b')
    s = model_shapes(vision, text)
    p = matmul_parameters(s)
    assert meta_matmul_parameters(vision, text) == dict(
        patch_embed=p['patch_embed'], vit_layers=301_989_888, projector=p['projector'],
        llm_layers=1_310_195_712, lm_head=1536 * 151674)


def test_peak_table():
    assert default_peak_tflops('NVIDIA H100 80GB HBM3') == 989.0
    assert default_peak_tflops('NVIDIA H200') == 989.0
    assert default_peak_tflops('NVIDIA H100 PCIe') == 756.0
    assert default_peak_tflops('Tesla T4') is None


def bench(*args):
    return subprocess.run([sys.executable, 'benchmarks/bench_train.py', *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


def test_real_dry_run_builds_shapes_and_flops_on_the_cpu():
    out = bench('--real', '--llm', '1.5b', '--dry-run', '--samples', '4', '--batch', '2', '--peak-tflops', '989')
    assert out.returncode == 0, out.stderr[-3000:]
    assert 'Qwen2.5-1.5B' in out.stdout and '4 samples of 13 tiles' in out.stdout
    assert 'llm_layers        1,310,195,712  1,310,195,712' in out.stdout
    rows = {line.split()[0]: line.split() for line in out.stdout.splitlines()
            if line.startswith(('packed ', 'unpacked ', 'xtuner '))}
    assert set(rows) == {'packed', 'unpacked', 'xtuner'}
    assert rows['xtuner'][1:] == rows['unpacked'][1:]  # XTuner trains the unpacked batches
    assert ('XTuner 0.2.0 InternVL_V1_5 (row xtuner): the unpacked batches (same FLOPs); xtuner is installed'
            in out.stdout)


def test_llm_size_needs_real():
    out = bench('--llm', '0.5b', '--dry-run')
    assert out.returncode == 2 and '--llm' in out.stderr


def test_flex_attention_is_a_choice_that_trains_on_cuda_only():
    out = bench('--attn', 'flex_attention', '--samples', '4', '--batch', '2')
    assert out.returncode == 2 and 'no backward on a CPU' in out.stderr
    out = bench('--attn', 'flex_attention', '--dry-run', '--samples', '4', '--batch', '2')
    assert out.returncode == 0 and 'attention: flex_attention' in out.stdout, out.stderr[-3000:]


@pytest.mark.slow
def test_tiny_benchmark_trains_both_paths_and_reports_mfu_against_a_given_peak():
    out = bench('--samples', '8', '--steps', '1', '--workers', '0', '--peak-tflops', '1', '--no-xtuner')
    assert out.returncode == 0, out.stderr[-3000:]
    rows = {line.split()[0]: line.split() for line in out.stdout.splitlines()
            if line.startswith(('packed ', 'unpacked ', 'xtuner '))}
    assert set(rows) == {'packed', 'unpacked'}
    assert 'XTuner 0.2.0 InternVL path: left out (--no-xtuner)' in out.stdout
    for row in rows.values():  # tokens/s, samples/s, TFLOP/step, TFLOPS, MFU, data share, pad share, peak MiB
        assert len(row) == 9 and row[5].endswith('%') and float(row[3]) > 0
    assert 'MFU against a peak of 1 TFLOPS' in out.stdout
