"""configs/finetune_lora.py on the tiny models: chained from an MLP warm-up checkpoint, one process
through XTuner's train entry point on a CPU; the checkpoint holds the LoRA adapters and mlp1."""

import os

import pytest
import torch
from mmengine.config import Config

from tests.configs.conftest import ROOT, tiny_options
from tests.train_utils import load_checkpoint_state, run_train
from xtuner_plugins.models import VisionLanguageModel

CONFIG = os.path.join(ROOT, 'configs', 'finetune_lora.py')


def test_lora_settings():
    cfg = Config.fromfile(CONFIG)
    assert cfg.model.freeze_llm and cfg.model.freeze_vision and not cfg.model.freeze_projector
    assert cfg.model.llm_lora['target_modules'] == 'all-linear' and cfg.model.vision_lora is None
    assert cfg.optim_wrapper.optimizer.lr == 4e-5


@pytest.mark.slow
def test_lora_from_mlp_warmup(tiny, tmp_path):
    warm = VisionLanguageModel(vision_encoder=tiny['internvit'], llm=tiny['llm'], torch_dtype='float32')
    with torch.no_grad():
        for p in warm.mlp1.parameters():
            p.add_(0.1)
    torch.save({'state_dict': warm.state_dict()}, tmp_path / 'mlp.pth')
    options = tiny_options(tiny, tiny['same'], repeat=12, lr=0.01)
    options['model.pretrained_pth'] = str(tmp_path / 'mlp.pth')
    out = run_train(CONFIG, str(tmp_path / 'work'), cfg_options=options)
    assert out.ok, out.summary()
    state = load_checkpoint_state(out.final_checkpoint)
    assert any('lora_A' in k for k in state) and any(k.startswith('mlp1.') for k in state)
    assert all('lora_' in k or k.startswith('mlp1.') for k in state), sorted(state)[:5]
    losses = [out.losses[i] for i in sorted(out.losses)]
    assert len(losses) == 6 and losses[-1] < losses[0] - 0.3, losses  # the same batch every iteration (6.23 -> 5.59)
    # the checkpoint loads back exactly onto the config's model, as the converter loads it (as a later stage's
    # pretrained_pth its adapters are merged instead: tests/models/test_lineage.py)
    again = VisionLanguageModel(vision_encoder=tiny['internvit'], llm=tiny['llm'], torch_dtype='float32',
                                llm_lora=Config.fromfile(CONFIG).model.llm_lora, pretrained_pth=str(tmp_path / 'mlp.pth'))
    again.load_pretrained(out.final_checkpoint, strict=True)
    for key, value in state.items():
        assert torch.allclose(again.state_dict()[key], value), key


QLORA_CONFIG = os.path.join(ROOT, 'configs', 'finetune_qlora.py')


@pytest.mark.slow
def test_qlora_one_process(tiny, tmp_path):
    cfg = Config.fromfile(QLORA_CONFIG)
    assert cfg.model.llm_quantization == dict(load_in_4bit=True, bnb_4bit_quant_type='nf4',
                                              bnb_4bit_use_double_quant=True)
    assert cfg.model.llm_lora == Config.fromfile(CONFIG).model.llm_lora
    out = run_train(QLORA_CONFIG, str(tmp_path / 'work'), cfg_options=tiny_options(tiny, tiny['same'], repeat=12))
    assert out.ok, out.summary()
    state = load_checkpoint_state(out.final_checkpoint)
    assert any('lora_A' in k for k in state) and all('lora_' in k or k.startswith('mlp1.') for k in state)
    losses = [out.losses[i] for i in sorted(out.losses)]
    assert len(losses) == 6 and losses[-1] < losses[0] - 0.3, losses


@pytest.mark.slow
def test_lora_from_an_official_checkpoint(tiny, tmp_path):
    """The README's second LoRA command: start from an official InternVL folder instead of encoder + LLM."""
    from tests.models.conftest import write_official
    source = VisionLanguageModel(vision_encoder=tiny['internvit'], llm=tiny['llm'], torch_dtype='float32')
    official = str(tmp_path / 'InternVL-tiny')
    write_official(source, official)
    options = tiny_options(tiny, tiny['same'], repeat=12)
    options.update({'model.official_checkpoint': official, 'model.vision_encoder': None, 'model.llm': None,
                    'train_dataloader.dataset.tokenizer': official})
    out = run_train(CONFIG, str(tmp_path / 'work'), cfg_options=options)
    assert out.ok, out.summary()
    state = load_checkpoint_state(out.final_checkpoint)
    assert any('lora_A' in k for k in state) and all('lora_' in k or k.startswith('mlp1.') for k in state)
    losses = [out.losses[i] for i in sorted(out.losses)]
    assert losses[-1] < losses[0] - 0.3, losses
