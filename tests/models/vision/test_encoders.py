"""The vision-encoder seam on tiny look-alikes in their real layouts: each encoder's conventions (tile size,
patch, mean/std from its folder, CLS, default layer), its features, the parameters it never uses, the
projector's token count, and the errors for a folder of the wrong kind; then every family as a model, with
Qwen2, Qwen3 and Llama LLMs, trained one step (LoRA targets found by layer type)."""

import glob
import json
import os
import shutil

import pytest
import torch

from xtuner_plugins.models import VisionLanguageModel
from xtuner_plugins.models.vision import build_vision_encoder
from xtuner_plugins.tiny import write_tiny_llm
from xtuner_plugins.tiny.vision import write_tiny_clip, write_tiny_internvit, write_tiny_siglip

WRITERS = {'internvit': write_tiny_internvit, 'siglip': write_tiny_siglip, 'clip': write_tiny_clip}
# name -> (default select_layer, CLS dropped, mean)
CONVENTIONS = {
    'internvit': (-1, True, (0.485, 0.456, 0.406)),
    'siglip': (-1, False, (0.5, 0.5, 0.5)),
    'clip': (-2, True, (0.48145466, 0.4578275, 0.40821073)),
}


@pytest.fixture(scope='module')
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp('families')
    out = {name: writer(str(root / name), image_size=56) for name, writer in WRITERS.items()}
    for arch in ('qwen2', 'qwen3', 'llama'):
        out[arch] = write_tiny_llm(str(root / arch), arch=arch)
    return out


def _pixels(n=2, size=56):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize('name', sorted(WRITERS))
def test_encoder_conventions_come_from_the_type_and_the_folder(folders, name):
    module, enc = build_vision_encoder(folders[name], torch.float32)
    layer, drop_cls, mean = CONVENTIONS[name]
    assert enc.name == name and (enc.select_layer, enc.drop_cls) == (layer, drop_cls)
    assert enc.mean == pytest.approx(mean) and (enc.image_size, enc.patch_size, enc.grid) == (56, 14, 4)
    feats = enc.features(module, _pixels())
    assert feats.shape == (2, 16, enc.hidden_size)  # 4 x 4 patches, CLS dropped where there is one


@pytest.mark.parametrize('name', ['siglip', 'clip'])
def test_transformers_tower_features_are_the_selected_hidden_state(folders, name):
    module, enc = build_vision_encoder(dict(type=name, path=folders[name], select_layer=1), torch.float32)
    pixels = _pixels()
    with torch.no_grad():
        hidden = module(pixel_values=pixels, output_hidden_states=True).hidden_states[1]
        feats = enc.features(module, pixels)
    assert torch.equal(feats, hidden[:, 1:] if enc.drop_cls else hidden)


def test_siglip_pooling_head_is_kept_but_never_run(folders):
    """SigLIP's attention-pooling head (whose output nothing reads) does not run in the tower's forward, in
    training mode with autograd on included; its weights stay, so the tower saves as published."""
    module, enc = build_vision_encoder(folders['siglip'], torch.float32)
    calls = []
    module.vision_model.head.register_forward_hook(lambda *_: calls.append(1))
    module.train()
    enc.features(module, _pixels())
    assert not calls
    assert any(k.startswith('vision_model.head.') for k in module.state_dict())


def test_mean_and_std_are_read_from_the_folders_preprocessor_config(folders, tmp_path):
    import shutil
    folder = shutil.copytree(folders['siglip'], tmp_path / 'siglip')
    path = folder / 'preprocessor_config.json'
    config = json.loads(path.read_text())
    config.update(image_mean=[0.1, 0.2, 0.3], image_std=[0.4, 0.5, 0.6])
    path.write_text(json.dumps(config))
    _, enc = build_vision_encoder(str(folder), torch.float32)
    assert enc.mean == pytest.approx((0.1, 0.2, 0.3)) and enc.std == pytest.approx((0.4, 0.5, 0.6))


def test_parameters_the_features_never_reach_are_not_trained(folders):
    model = VisionLanguageModel(vision_encoder=folders['siglip'], llm=folders['qwen2'], freeze_vision=False,
                                torch_dtype='float32')
    frozen = {n for n, p in model.vision_model.named_parameters() if not p.requires_grad}
    assert frozen and all('head' in n or 'post_layernorm' in n for n in frozen), sorted(frozen)
    model = VisionLanguageModel(vision_encoder=folders['clip'], llm=folders['qwen2'], freeze_vision=False,
                                torch_dtype='float32')
    frozen = {n for n, p in model.vision_model.named_parameters() if not p.requires_grad}
    last = len(model.vision_model.vision_model.encoder.layers) - 1
    assert any(f'layers.{last}.' in n for n in frozen) and not any(f'layers.{last - 1}.' in n for n in frozen)


def test_a_folder_of_another_kind_is_refused_naming_the_file(folders):
    """Refused: one line at training's start (an LLM's folder as the vision encoder was a ValueError traceback)."""
    from xtuner_plugins.errors import Refused
    with pytest.raises(Refused, match=r"^model.vision_encoder: .*siglip/config.json: model_type 'siglip' is not a clip "
                                      r"encoder"):
        build_vision_encoder(dict(type='clip', path=folders['siglip']), torch.float32)
    with pytest.raises(Refused, match=r"^model.vision_encoder: .*model_type 'qwen2' is no known vision encoder"):
        build_vision_encoder(folders['qwen2'], torch.float32)
    with pytest.raises(Refused, match="unknown vision encoder type 'dino'"):
        build_vision_encoder(dict(type='dino', path=folders['clip']), torch.float32)
    with pytest.raises(FileNotFoundError, match='vision encoder folder not found: /nonexistent'):
        build_vision_encoder('/nonexistent', torch.float32)


def test_projector_input_width_must_match_the_encoder(folders):
    from xtuner_plugins.models.projector import LlavaProjector
    model = VisionLanguageModel(vision_encoder=folders['clip'], llm=folders['qwen2'], projector='mlp',
                                torch_dtype='float32')
    assert isinstance(model.mlp1, LlavaProjector) and model.mlp1.linear_1.in_features == model.vision.hidden_size


FAMILIES = [('internvit', 'pixel_shuffle_mlp', 'tile', 4), ('siglip', 'bilinear_mlp', 'resize', 4),
            ('clip', 'mlp', 'pad', 16), ('siglip', 'pixel_shuffle_mlp', 'tile', 4), ('clip', 'bilinear_mlp', 'tile', 4)]


@pytest.mark.parametrize('vision, projector, mode, tokens', FAMILIES)
@pytest.mark.parametrize('llm', ['qwen2', 'qwen3', 'llama'])
def test_every_family_trains_a_step(folders, vision, projector, mode, tokens, llm):
    model = VisionLanguageModel(vision_encoder=folders[vision], llm=folders[llm], projector=projector, image_mode=mode,
                                freeze_vision=False, freeze_llm=False, torch_dtype='float32')
    assert model.geometry['num_image_token'] == tokens and model.geometry['image_mode'] == mode
    ctx = model.img_context_token_id
    ids = torch.tensor([[5, 6] + [ctx] * tokens + [7, 8, 9]])
    labels = ids.clone()
    labels[0, :2 + tokens] = -100
    batch = dict(input_ids=ids, labels=labels, image_flags=torch.ones(1, dtype=torch.long),
                 pixel_values=torch.randint(0, 256, (1, 3, 56, 56), dtype=torch.uint8))
    loss = model(batch)['loss']
    loss.backward()
    assert torch.isfinite(loss)
    for part in (model.mlp1, model.vision_model, model.language_model):
        grads = [p.grad for p in part.parameters() if p.requires_grad]
        assert grads and all(g is not None for g in grads), type(part).__name__


@pytest.mark.parametrize('llm', ['qwen3', 'llama'])
def test_lora_targets_every_linear_layer_of_any_llm_but_the_head(folders, llm):
    model = VisionLanguageModel(vision_encoder=folders['clip'], llm=folders[llm], projector='mlp',
                                llm_lora=dict(r=4, lora_alpha=8), torch_dtype='float32')
    from transformers import AutoModelForCausalLM
    plain = AutoModelForCausalLM.from_pretrained(folders[llm])
    linear = {n for n, m in plain.named_modules() if isinstance(m, torch.nn.Linear) and n != 'lm_head'}
    base = model.language_model.get_base_model()
    wrapped = {n for n, m in base.named_modules() if hasattr(m, 'lora_A')}
    assert wrapped == linear and len(linear) == 7 * plain.config.num_hidden_layers  # q k v o gate up down
    assert not hasattr(base.lm_head, 'lora_A')


def test_official_internvit_geometry_is_unchanged(folders):
    model = VisionLanguageModel(vision_encoder=folders['internvit'], llm=folders['qwen2'], torch_dtype='float32')
    assert model.geometry == dict(image_size=56, num_image_token=4, image_mode='tile',
                                  image_mean=(0.485, 0.456, 0.406))


def test_a_file_or_unreadable_weights_given_as_a_model_folder_are_refused_naming_them(folders, tmp_path,
                                                                                       monkeypatch):
    """A weight file given for the folder, and a folder whose weights this user cannot read (transformers called
    that "No such file or directory", a broken link too), are refused in one line naming the file."""
    from xtuner_plugins import filemodes
    from xtuner_plugins.errors import NotFound, Refused
    weights = os.path.join(folders['qwen2'], 'model.safetensors')
    with pytest.raises(NotFound, match=r'model.llm: .*/model.safetensors is a file, not a model folder: set '
                                       r'model.llm to the folder .* \(.* holds one\)'):
        VisionLanguageModel(vision_encoder=folders['clip'], llm=weights)
    vision_weights = glob.glob(os.path.join(folders['clip'], '*.safetensors'))[0]
    with pytest.raises(NotFound, match=r'model.vision_encoder: .* is a file, not a model folder'):
        VisionLanguageModel(vision_encoder=vision_weights, llm=folders['qwen2'])
    llm = shutil.copytree(folders['qwen2'], tmp_path / 'llm')
    real_access = os.access
    monkeypatch.setattr(filemodes.os, 'access', lambda p, mode: real_access(p, mode) and
                        not str(p).endswith('llm/model.safetensors'))
    with pytest.raises(Refused, match=r'model.llm: .*/llm: this user \(uid \d+\) cannot read model.safetensors '
                                      r'\(owner uid \d+, mode 0\d{3}\); make them readable'):
        VisionLanguageModel(vision_encoder=folders['clip'], llm=str(llm))
    monkeypatch.setattr(filemodes.os, 'access', real_access)
    os.remove(llm / 'model.safetensors')
    os.symlink(tmp_path / 'gone.safetensors', llm / 'model.safetensors')
    with pytest.raises(Refused, match=r'model.llm: .*/llm: model.safetensors is a broken link'):
        VisionLanguageModel(vision_encoder=folders['clip'], llm=str(llm))


def test_missing_folders_are_named_with_their_config_key(folders, tmp_path):
    with pytest.raises(FileNotFoundError, match='model.vision_encoder: vision encoder folder not found: .*/gone'):
        VisionLanguageModel(vision_encoder=str(tmp_path / 'gone'), llm=folders['qwen2'])
    with pytest.raises(FileNotFoundError, match=r"model.llm: '.*/no_llm' is neither a folder nor in the local "
                                                r"Hugging Face cache"):
        VisionLanguageModel(vision_encoder=folders['clip'], llm=str(tmp_path / 'no_llm'))
    with pytest.raises(FileNotFoundError, match=r"model.tokenizer \(or model.llm\): '.*/no_tok'"):
        VisionLanguageModel(vision_encoder=folders['clip'], llm=folders['qwen2'], tokenizer=str(tmp_path / 'no_tok'))
    # an official folder is read from a folder only (no cache name): a traceback of FileNotFoundError before
    from xtuner_plugins.errors import NotFound
    with pytest.raises(NotFound, match=r'model.official_checkpoint: .*/no_official: no such folder; set '
                                       r'model.official_checkpoint to the folder that holds its config.json'):
        VisionLanguageModel(official_checkpoint=str(tmp_path / 'no_official'))
    (tmp_path / 'empty').mkdir()
    with pytest.raises(NotFound, match=r'.*/empty: no config.json; is this an official InternVL checkpoint folder'):
        VisionLanguageModel(official_checkpoint=str(tmp_path / 'empty'))
