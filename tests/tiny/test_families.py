"""Tiny SigLIP, CLIP, Qwen3 and Llama look-alikes: written in the real checkpoints' layouts, they load with
transformers' own classes (every vision tensor from the file, none initialised anew) and with the
tools/make_tiny_models.py command line."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import (AutoImageProcessor, AutoModelForCausalLM, AutoTokenizer, CLIPModel, CLIPVisionModel,
                          SiglipModel, SiglipVisionModel)

from xtuner_plugins.tiny import TINY_LLM_ARCHS, write_tiny_llm, write_tiny_qwen2
from xtuner_plugins.tiny.vision import write_tiny_clip, write_tiny_siglip

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DUAL = {'siglip': (write_tiny_siglip, SiglipModel, SiglipVisionModel, 'SiglipImageProcessor', [0.5] * 3),
        'clip': (write_tiny_clip, CLIPModel, CLIPVisionModel, 'CLIPImageProcessor',
                 [0.48145466, 0.4578275, 0.40821073])}


@pytest.mark.parametrize('name', sorted(DUAL))
def test_dual_encoder_folder_loads_as_the_real_one(name, tmp_path):
    writer, whole, vision_class, processor, mean = DUAL[name]
    folder = writer(str(tmp_path / name), image_size=42)
    config = json.load(open(os.path.join(folder, 'config.json')))
    assert config['model_type'] == name and {'text_config', 'vision_config'} <= set(config)
    assert config['vision_config']['image_size'] == 42
    stored = load_file(os.path.join(folder, 'model.safetensors'))
    assert any(k.startswith('text_model.') for k in stored)
    vision, info = vision_class.from_pretrained(folder, output_loading_info=True)
    assert not info['missing_keys']
    loaded = vision.state_dict()
    assert loaded and all(torch.equal(v, stored[k]) for k, v in loaded.items())
    assert isinstance(whole.from_pretrained(folder), whole)
    proc = AutoImageProcessor.from_pretrained(folder)
    assert type(proc).__name__.startswith(processor) and proc.image_mean == pytest.approx(mean)


@pytest.mark.parametrize('arch, cls', [('qwen2', 'Qwen2ForCausalLM'), ('qwen3', 'Qwen3ForCausalLM'),
                                       ('llama', 'LlamaForCausalLM')])
def test_llm_archs_load_and_run(arch, cls, tmp_path):
    folder = write_tiny_llm(str(tmp_path / arch), arch=arch, vocab_padding=7)
    model = AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert type(model).__name__ == cls and arch in TINY_LLM_ARCHS
    assert model.get_input_embeddings().weight.shape[0] == len(tokenizer) + 7
    logits = model(torch.tensor([tokenizer.encode('hello world')])).logits
    assert torch.isfinite(logits).all()


def test_qwen2_writer_is_the_generic_one(tmp_path):
    a = load_file(os.path.join(write_tiny_qwen2(str(tmp_path / 'a')), 'model.safetensors'))
    b = load_file(os.path.join(write_tiny_llm(str(tmp_path / 'b'), arch='qwen2'), 'model.safetensors'))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_bad_sizes_and_archs_are_named(tmp_path):
    with pytest.raises(ValueError, match='hidden_size 30 a multiple of num_heads 4'):
        write_tiny_siglip(str(tmp_path / 's'), hidden_size=30)
    with pytest.raises(ValueError, match='hidden_size 30 a multiple of num_heads 4'):
        write_tiny_clip(str(tmp_path / 'c'), hidden_size=30)
    with pytest.raises(ValueError, match="unknown tiny LLM arch 'gpt2'"):
        write_tiny_llm(str(tmp_path / 'l'), arch='gpt2')


def test_command_line_writes_the_chosen_family(tmp_path):
    out = subprocess.run([sys.executable, os.path.join(ROOT, 'tools', 'make_tiny_models.py'), str(tmp_path),
                          '--vision', 'clip', '--llm', 'llama'], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.load(open(tmp_path / 'clip' / 'config.json'))['model_type'] == 'clip'
    assert json.load(open(tmp_path / 'llm' / 'config.json'))['model_type'] == 'llama'
