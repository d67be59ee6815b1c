"""Real-size look-alikes (xtuner_plugins/tiny/realsize.py): the published config.json values, the tensor names
and shapes of the hub folders, Qwen2.5's token ids, sharded safetensors with an index. Nothing real-size is
written or allocated here: configs and tokenizers only, shapes on the meta device."""

import json
import math
import os
import stat

import pytest
import torch

from xtuner_plugins.data.template import IMG_CONTEXT_TOKEN, add_internvl_tokens
from xtuner_plugins.tiny.realsize import (REAL_MODELS, build_qwen25_tokenizer, meta_state_shapes, save_sharded,
                                          write_real_model)

# The hub files' values (Qwen/Qwen2.5-*-Instruct, OpenGVLab/InternViT-300M-448px-V2_5,
# google/siglip-so400m-patch14-384, openai/clip-vit-large-patch14-336 config.json), written out here on purpose
# rather than imported: the module's copy is checked against them.
QWEN = dict(architectures=['Qwen2ForCausalLM'], attention_dropout=0.0, bos_token_id=151643, eos_token_id=151645,
            hidden_act='silu', initializer_range=0.02, max_position_embeddings=32768, max_window_layers=21,
            model_type='qwen2', num_key_value_heads=2, rms_norm_eps=1e-06, rope_theta=1000000.0,
            sliding_window=32768, tie_word_embeddings=True, torch_dtype='bfloat16', transformers_version='4.43.1',
            use_cache=True, use_sliding_window=False, vocab_size=151936)
PUBLISHED = {
    'Qwen2.5-0.5B-Instruct': dict(QWEN, hidden_size=896, intermediate_size=4864, num_attention_heads=14,
                                  num_hidden_layers=24),
    'Qwen2.5-1.5B-Instruct': dict(QWEN, hidden_size=1536, intermediate_size=8960, num_attention_heads=12,
                                  num_hidden_layers=28),
    'InternViT-300M-448px-V2_5': dict(
        architectures=['InternVisionModel'], attention_dropout=0.0, drop_path_rate=0.0, dropout=0.0,
        hidden_act='gelu', hidden_size=1024, image_size=448, initializer_factor=0.1, initializer_range=1e-10,
        intermediate_size=4096, layer_norm_eps=1e-06, model_type='intern_vit_6b', norm_type='layer_norm',
        num_attention_heads=16, num_channels=3, num_hidden_layers=24, patch_size=14, qk_normalization=False,
        qkv_bias=True, torch_dtype='bfloat16', transformers_version='4.37.2', use_bfloat16=True,
        use_flash_attn=True, auto_map={'AutoConfig': 'configuration_intern_vit.InternVisionConfig',
                                       'AutoModel': 'modeling_intern_vit.InternVisionModel'}),
    'siglip-so400m-patch14-384': dict(
        architectures=['SiglipModel'], initializer_factor=1.0, model_type='siglip', torch_dtype='float32',
        transformers_version='4.37.0.dev0',
        text_config=dict(hidden_size=1152, intermediate_size=4304, model_type='siglip_text_model',
                         num_attention_heads=16, num_hidden_layers=27),
        vision_config=dict(hidden_size=1152, image_size=384, intermediate_size=4304, model_type='siglip_vision_model',
                           num_attention_heads=16, num_hidden_layers=27, patch_size=14)),
}
CLIP_DICTS = dict(  # CLIP's text_config_dict / vision_config_dict (its explicit sizes)
    text_config_dict=dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
                          projection_dim=768),
    vision_config_dict=dict(hidden_size=1024, image_size=336, intermediate_size=4096, num_attention_heads=16,
                            num_hidden_layers=24, patch_size=14, projection_dim=768))
# Parameter counts from the model cards (0.49B, 1.54B, ~300M, so400m: 878M with its text tower, CLIP-L/14-336).
PARAMETERS = {'Qwen2.5-0.5B-Instruct': 494_032_768, 'Qwen2.5-1.5B-Instruct': 1_543_714_304,
              'InternViT-300M-448px-V2_5': 304_012_288, 'siglip-so400m-patch14-384': 877_960_498,
              'clip-vit-large-patch14-336': 427_944_193}
SHAPES = {
    'Qwen2.5-0.5B-Instruct': {'model.embed_tokens.weight': (151936, 896), 'model.layers.23.self_attn.k_proj.weight':
                              (128, 896), 'model.layers.0.mlp.down_proj.weight': (896, 4864), 'model.norm.weight': (896,)},
    'Qwen2.5-1.5B-Instruct': {'model.embed_tokens.weight': (151936, 1536), 'model.layers.27.self_attn.q_proj.bias':
                              (1536,), 'model.layers.0.mlp.gate_proj.weight': (8960, 1536)},
    'InternViT-300M-448px-V2_5': {'embeddings.position_embedding': (1, 1025, 1024), 'embeddings.class_embedding':
                                  (1, 1, 1024), 'encoder.layers.23.attn.qkv.weight': (3072, 1024),
                                  'encoder.layers.0.ls1': (1024,), 'embeddings.patch_embedding.weight': (1024, 3, 14, 14)},
    'siglip-so400m-patch14-384': {'vision_model.embeddings.position_embedding.weight': (729, 1152),
                                  'vision_model.encoder.layers.26.mlp.fc1.weight': (4304, 1152),
                                  'vision_model.head.probe': (1, 1, 1152), 'text_model.embeddings.token_embedding.weight':
                                  (32000, 1152)},
    'clip-vit-large-patch14-336': {'vision_model.embeddings.position_embedding.weight': (577, 1024),
                                   'vision_model.encoder.layers.23.self_attn.k_proj.weight': (1024, 1024),
                                   'visual_projection.weight': (768, 1024), 'text_model.embeddings.token_embedding.weight':
                                   (49408, 768)},
}


@pytest.mark.parametrize('name', REAL_MODELS)
def test_config_is_the_published_one(name, tmp_path):
    folder = write_real_model(name, str(tmp_path / name), weights=False)
    written = json.load(open(os.path.join(folder, 'config.json')))
    if name in PUBLISHED:
        assert written == PUBLISHED[name]
    else:
        assert {k: written[k] for k in CLIP_DICTS} == CLIP_DICTS
        assert written['vision_config']['hidden_act'] == 'quick_gelu' and written['projection_dim'] == 768
    assert not any(f.endswith('.safetensors') for f in os.listdir(folder))


@pytest.mark.parametrize('name', REAL_MODELS)
def test_tensor_names_and_shapes_on_meta(name):
    shapes = meta_state_shapes(name)
    assert sum(math.prod(s) for s in shapes.values()) == PARAMETERS[name]
    for key, shape in SHAPES[name].items():
        assert shapes[key] == shape, key
    assert 'lm_head.weight' not in shapes  # Qwen2.5 0.5B/1.5B tie it to the embeddings and do not save it


def test_internvit_names_load_through_the_converter():
    """The loader's key conversion maps every written InternViT name onto transformers' InternVLVisionModel."""
    from transformers import InternVLVisionModel

    from xtuner_plugins.models.vision.internvit_layout import (official_to_hf_vision_config,
                                                               official_to_hf_vision_state_dict)
    from xtuner_plugins.tiny.realsize import PUBLISHED_CONFIGS
    shapes = meta_state_shapes('InternViT-300M-448px-V2_5')
    state = {k: torch.empty(s, device='meta') for k, s in shapes.items()}
    converted = official_to_hf_vision_state_dict(state)
    with torch.device('meta'):
        model = InternVLVisionModel(official_to_hf_vision_config(PUBLISHED_CONFIGS['InternViT-300M-448px-V2_5']))
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in converted.items()} == expected


def test_qwen25_token_ids():
    tok = build_qwen25_tokenizer()
    assert len(tok) == 151665
    assert tok.convert_tokens_to_ids(['<|endoftext|>', '<|im_start|>', '<|im_end|>', '<|file_sep|>']) == [
        151643, 151644, 151645, 151664]
    assert tok.eos_token == '<|im_end|>' and tok.pad_token == '<|endoftext|>' and tok.bos_token is None
    assert add_internvl_tokens(tok) == 9 and len(tok) == 151674  # InternVL's vocabulary
    assert tok.convert_tokens_to_ids(IMG_CONTEXT_TOKEN) == 151667
    text = 'Describe the image in detail. 图片'
    assert tok.decode(tok(text).input_ids) == text and max(tok(text).input_ids) < 1000


def test_save_sharded_writes_an_index_that_loads(tmp_path):
    from xtuner_plugins.models.checkpoint import read_hf_weights
    state = {f't{i}': torch.full((256,), float(i)) for i in range(5)}  # 1 KiB each
    files = save_sharded(state, str(tmp_path), max_shard_size=2048)
    assert files[-1] == 'model.safetensors.index.json' and len(files) == 4  # 2 + 2 + 1 tensors
    index = json.load(open(tmp_path / 'model.safetensors.index.json'))
    assert index['metadata']['total_size'] == 5 * 1024
    assert set(index['weight_map'].values()) == set(files[:-1])
    loaded = read_hf_weights(str(tmp_path), '', None)
    assert set(loaded) == set(state) and all(torch.equal(loaded[k], v) for k, v in state.items())
    from xtuner_plugins.filemodes import file_mode   # readable by others (safetensors 0.8 alone writes 0600)
    assert {stat.S_IMODE(os.stat(tmp_path / f).st_mode) for f in files} == {file_mode()}
    os.makedirs(tmp_path / 'one')
    assert save_sharded(state, str(tmp_path / 'one'), None) == ['model.safetensors']
    assert stat.S_IMODE(os.stat(tmp_path / 'one' / 'model.safetensors').st_mode) == file_mode()
