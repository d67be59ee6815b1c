"""tools/convert_to_official.py on tiny models, fp32, on the CPU.

Checkpoints are the stage configs' own (``configs/finetune_*.py`` pointed at the tiny models), with every
trained tensor moved away from its initial value, so a tensor the converter drops, misnames or leaves
unmerged changes the logits. The converted folder is loaded the official way (``AutoModel`` with
``trust_remote_code``) or, for ``--format hf``, with transformers' ``InternVLForConditionalGeneration``,
and its logits are compared with the training model's on a real batch of the data pipeline.
"""

import json
import os
import re
import shutil

import pytest
import torch

from tests.configs.conftest import ROOT, tiny_options
from tests.helpers import tiny_workspace
from tests.train_utils import run_train
from tools.convert_to_official import main as convert_main
from xtuner_plugins.data import InternVLDataset, internvl_collate_fn
from xtuner_plugins.data.tiling import IMAGENET_MEAN, IMAGENET_STD, normalize_tiles
from xtuner_plugins.engine.options import load_config
from xtuner_plugins.models.export import build_for_export

FULL = os.path.join(ROOT, 'configs', 'finetune_full.py')
LORA = os.path.join(ROOT, 'configs', 'finetune_lora.py')
QLORA = os.path.join(ROOT, 'configs', 'finetune_qlora.py')
TOL = 1e-4


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
    return tiny_workspace(tmp_path_factory.mktemp('tiny'))


@pytest.fixture(scope='module')
def batch(tiny):
    ds = InternVLDataset(tiny['mixed'], image_folders=tiny['images'], tokenizer=tiny['llm'], image_size=56,
                         max_dynamic_patch=4, cache_dir=tiny['cache'])
    return internvl_collate_fn([ds[0], ds[1]])['data']


def options(tiny, **extra):
    opts = tiny_options(tiny, tiny['mixed'], repeat=1)
    opts.update(extra)
    return opts


def as_args(opts):
    return ['--cfg-options'] + [f'{k}={v}' for k, v in opts.items()]


def trained_checkpoint(config, opts, path, seed=0, scale=0.05):
    """The config's model with every trained tensor perturbed, saved as MMEngine saves it."""
    model = build_for_export(load_config(config, opts), None, torch.float32, log=lambda m: None)
    model.train()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * scale)
    torch.save({'meta': {}, 'state_dict': model.state_dict()}, path)
    model.eval()
    return model


def training_logits(model, batch):
    with torch.no_grad():
        return model(dict(batch), mode='tensor')


def converted_inputs(batch):
    pixel_values = normalize_tiles(batch['pixel_values'], IMAGENET_MEAN, IMAGENET_STD, dtype=torch.float32)
    return dict(pixel_values=pixel_values, input_ids=batch['input_ids'], attention_mask=batch['attention_mask'],
                image_flags=batch['image_flags'])


def official_logits(folder, batch):
    from transformers import AutoModel, AutoTokenizer
    model = AutoModel.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    model.img_context_token_id = tokenizer.convert_tokens_to_ids('<IMG_CONTEXT>')
    with torch.no_grad():
        return model(**converted_inputs(batch)).logits


def max_diff(a, b, mask):
    return (a - b).abs()[mask.bool()].max().item()


def convert(config, ckpt, out, opts, *extra):
    """Through the command line when every option is a plain value; dict-valued options (which
    ``--cfg-options`` cannot spell) through the function the command line calls."""
    if any(isinstance(v, dict) for v in opts.values()):
        from xtuner_plugins.models.export import export_checkpoint
        return export_checkpoint(config, ckpt, str(out), dtype=torch.float32, cfg_options=opts, log=lambda m: None)
    code = convert_main([config, ckpt, str(out), '--dtype', 'fp32', *extra] + as_args(opts))
    assert code == 0
    return str(out)


@pytest.mark.parametrize('name,config,extra', [
    ('full_with_vision', FULL, {'model.freeze_vision': False}),
    ('lora_llm_and_vision', LORA, {'model.vision_lora': {'_delete_': True, 'r': 4, 'lora_alpha': 8}}),
])
def test_converted_logits_equal_training_logits(tiny, batch, tmp_path, name, config, extra):
    opts = options(tiny, **extra)
    model = trained_checkpoint(config, opts, str(tmp_path / 'iter_1.pth'))
    expected = training_logits(model, batch)
    folder = convert(config, str(tmp_path / 'iter_1.pth'), tmp_path / 'out', opts)
    got = official_logits(folder, batch)
    assert max_diff(got, expected, batch['attention_mask']) < TOL
    # the untrained model differs by far more: the comparison sees the trained tensors
    base = build_for_export(load_config(config, opts), None, torch.float32, log=lambda m: None)
    assert max_diff(training_logits(base, batch), expected, batch['attention_mask']) > 100 * TOL


def test_an_llm_capping_its_attention_logits_answers_as_trained_in_its_folders(tiny, batch, tmp_path):
    """Gemma 2's attn_logit_softcapping trains under eager (SDPA drops the cap and is refused); the official
    folder's code built its LLM under SDPA whatever the LLM, and gave logits up to 13 apart from training's (a cap of
    1.0). It runs eager for such an LLM, and so does the hf folder loaded by chat and eval (ConvertedModel)."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    from xtuner_plugins.models.inference import ConvertedModel
    from xtuner_plugins.tiny import build_tiny_tokenizer
    tokenizer = build_tiny_tokenizer(add_internvl_tokens=False)
    torch.manual_seed(0)
    Gemma2ForCausalLM(Gemma2Config(
        vocab_size=len(tokenizer) + 32, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, attn_logit_softcapping=1.0,
        final_logit_softcapping=None, query_pre_attn_scalar=16, pad_token_id=tokenizer.pad_token_id,
        initializer_range=0.5)).save_pretrained(str(tmp_path / 'gemma2'))
    tokenizer.save_pretrained(str(tmp_path / 'gemma2'))
    opts = options(tiny, **{'model.llm': str(tmp_path / 'gemma2'), 'model.attn_implementation': 'eager'})
    expected = training_logits(trained_checkpoint(LORA, opts, str(tmp_path / 'iter_1.pth'), scale=0.3), batch)
    folder = convert(LORA, str(tmp_path / 'iter_1.pth'), tmp_path / 'official', opts)
    assert max_diff(official_logits(folder, batch), expected, batch['attention_mask']) < TOL
    hf = convert(LORA, str(tmp_path / 'iter_1.pth'), tmp_path / 'hf', opts, '--format', 'hf')
    assert ConvertedModel(hf).model.config.text_config._attn_implementation == 'eager'


def test_a_flex_attention_run_is_exported_with_sdpa(tiny):
    """FlexAttention is a training kernel (the packed rows' mask, compiled): export and the tools run SDPA."""
    opts = options(tiny, **{'model.attn_implementation': 'flex_attention'})
    model = build_for_export(load_config(os.path.join(ROOT, 'configs', 'finetune_full_packed.py'),
                                         {k.replace('train_dataloader.dataset.', 'train_dataloader.dataset.dataset.'): v
                                          for k, v in opts.items()}), None, torch.float32, log=lambda m: None)
    from xtuner_plugins.models.cpu_attention import as_sdpa   # SDPA, or on some CPUs the kernel that computes it
    assert as_sdpa(model.language_model.config._attn_implementation) == 'sdpa'


def test_a_run_on_gpu_kernels_is_exported_without_them(tiny):
    """A run with Liger's kernels (a GPU's) or compiled blocks is exported, and chatted with, on plain modules: here,
    on a CPU, its config builds without either."""
    opts = options(tiny, **{'model.liger_kernel': True, 'model.compile_blocks': True})
    model = build_for_export(load_config(os.path.join(ROOT, 'configs', 'finetune_full.py'), opts), None,
                             torch.float32, log=lambda m: None)
    assert model.liger_kernel == () and model.compile_blocks == ()


def test_a_lora_run_recorded_with_its_part_unfrozen_is_exported(tiny):
    """A LoRA run's config of before freeze_llm=False beside llm_lora was refused (peft had frozen the LLM, so the
    adapters alone trained) is built for export as what it trained, not refused."""
    opts = options(tiny, **{'model.freeze_llm': False})
    model = build_for_export(load_config(LORA, opts), None, torch.float32, log=lambda m: None)
    assert model.freeze_llm and all('lora_' in k or k.startswith('mlp1.') for k in model.trainable_keys())


def test_qlora_checkpoint_is_dequantised_and_merged(tiny, batch, tmp_path):
    """Tolerances. In training mode a 4-bit layer dequantises its NF4 weights to the compute dtype (fp32 here)
    and multiplies, so the dequantised, merged fp32 weights reproduce it up to fp32 rounding: 1e-4. In
    inference mode on a CPU with AVX512-BF16, bitsandbytes repacks the weights with bf16 scales and
    multiplies in bf16; the converted fp32 model then differs by bf16 rounding: 1e-2 allowed (2e-3 seen)."""
    import bitsandbytes as bnb
    opts = options(tiny)
    model = trained_checkpoint(QLORA, opts, str(tmp_path / 'iter_1.pth'))
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.train()  # the training path; LoRA dropout and the rest stay in eval mode
    expected = training_logits(model, batch)
    model.eval()
    inference = training_logits(model, batch)
    folder = convert(QLORA, str(tmp_path / 'iter_1.pth'), tmp_path / 'out', opts)
    got = official_logits(folder, batch)
    mask = batch['attention_mask']
    assert max_diff(got, expected, mask) < TOL
    assert max_diff(got, inference, mask) < 1e-2
    with open(os.path.join(folder, 'config.json')) as f:
        config = json.load(f)
    assert 'quantization_config' not in config['llm_config']
    # against the never-quantised base weights the difference is the quantisation error, far larger
    lora = build_for_export(load_config(LORA, opts), str(tmp_path / 'iter_1.pth'), torch.float32,
                            log=lambda m: None)
    assert max_diff(training_logits(lora, batch), expected, mask) > 10 * TOL


def assert_auto_model_reads_every_weight(folder, whole):
    """``AutoModel.from_pretrained(folder)`` (transformers' base class, InternVLModel or LlavaModel: what vLLM-style
    code and feature extraction load) holds ``whole``'s weights, each of them: the folder in the in-memory layout
    (``model.language_model.*``) left every one at random, with only a warning."""
    from transformers import AutoModel
    base = AutoModel.from_pretrained(folder, dtype=torch.float32)
    assert type(base).__name__ == type(whole.model).__name__
    expected = whole.model.state_dict()
    got = base.state_dict()
    assert got.keys() == expected.keys()
    differ = [k for k in expected if not torch.equal(got[k], expected[k])]
    assert not differ, differ[:5]


def test_hf_format_loads_without_remote_code(tiny, batch, tmp_path):
    from transformers import AutoProcessor, InternVLForConditionalGeneration
    opts = options(tiny, **{'model.freeze_vision': False})
    model = trained_checkpoint(FULL, opts, str(tmp_path / 'iter_1.pth'))
    expected = training_logits(model, batch)
    folder = convert(FULL, str(tmp_path / 'iter_1.pth'), tmp_path / 'hf', opts, '--format', 'hf')
    assert not any(name.endswith('.py') for name in os.listdir(folder))
    hf = InternVLForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    inputs = converted_inputs(batch)
    flags = inputs.pop('image_flags').bool()
    inputs['pixel_values'] = inputs['pixel_values'][flags]  # transformers takes the real tiles only
    with torch.no_grad():
        out = hf(**inputs)
    assert max_diff(out.logits, expected, batch['attention_mask']) < TOL
    assert_auto_model_reads_every_weight(folder, hf)
    # the LLM's KV cache on, as its own config has it: the folder took training's use_cache false (a forward
    # returned no past_key_values; generate() turns it on by itself)
    assert hf.config.text_config.use_cache and out.past_key_values is not None
    processor = AutoProcessor.from_pretrained(folder)
    assert processor.image_seq_length == 4 and processor.image_token == '<IMG_CONTEXT>'
    # the processor's tiles of an image it resizes are training's: the fast processor (torchvision's resize) was
    # one 8-bit level off on every resized image, logits 1e-3 off on the tiny model
    import numpy as np
    from PIL import Image

    from xtuner_plugins.data.tiling import IMAGENET_MEAN, IMAGENET_STD, image_tiles, normalize_tiles
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (500, 700, 3), dtype=np.uint8))
    got = processor.image_processor(images=[image], return_tensors='pt')['pixel_values']
    ours = processor.image_processor
    tiles = image_tiles(image, 'tile', image_size=ours.size['height'], min_num=ours.min_patches,
                        max_num=ours.max_patches, use_thumbnail=True)
    assert got.shape == tiles.shape and tiles.shape[0] > 1
    assert (got - normalize_tiles(tiles, IMAGENET_MEAN, IMAGENET_STD)).abs().max() < 1e-5


def test_round_trip_official_folder_back_into_training_model(tiny, batch, tmp_path):
    from xtuner_plugins.models import VisionLanguageModel
    opts = options(tiny, **{'model.freeze_vision': False})
    model = trained_checkpoint(FULL, opts, str(tmp_path / 'iter_1.pth'))
    expected = training_logits(model, batch)
    folder = convert(FULL, str(tmp_path / 'iter_1.pth'), tmp_path / 'out', opts)
    back = VisionLanguageModel(official_checkpoint=folder, torch_dtype='float32').eval()
    assert max_diff(training_logits(back, batch), expected, batch['attention_mask']) < TOL


def test_official_layout_files_and_config(tiny, tmp_path):
    opts = options(tiny)  # no tile size: the training data set took the tower's (56 px), and so does the folder
    assert 'train_dataloader.dataset.image_size' not in opts
    trained_checkpoint(LORA, opts, str(tmp_path / 'iter_1.pth'))
    folder = convert(LORA, str(tmp_path / 'iter_1.pth'), tmp_path / 'out', opts, '--max-shard-size', '200KB')
    names = set(os.listdir(folder))
    assert {'config.json', 'model.safetensors.index.json', 'configuration_internvl_chat.py',
            'configuration_intern_vit.py', 'modeling_internvl_chat.py', 'modeling_intern_vit.py', 'conversation.py',
            'generation_config.json', 'preprocessor_config.json', 'tokenizer_config.json'} <= names
    with open(os.path.join(folder, 'model.safetensors.index.json')) as f:
        index = json.load(f)
    shards = set(index['weight_map'].values())
    assert len(shards) > 1 and shards <= names
    keys = set(index['weight_map'])
    assert {k.split('.')[0] for k in keys} == {'vision_model', 'mlp1', 'language_model'}
    assert not any('lora' in k or 'base_layer' in k for k in keys)
    assert 'vision_model.encoder.layers.0.attn.qkv.weight' in keys and 'language_model.lm_head.weight' in keys
    with open(os.path.join(folder, 'config.json')) as f:
        config = json.load(f)
    assert config['model_type'] == 'internvl_chat' and config['architectures'] == ['InternVLChatModel']
    assert config['auto_map']['AutoModel'] == 'modeling_internvl_chat.InternVLChatModel'
    assert config['vision_config']['model_type'] == 'intern_vit_6b'
    assert (config['template'], config['ps_version'], config['downsample_ratio']) == ('internvl2_5', 'v2', 0.5)
    assert config['tie_word_embeddings'] is False and config['llm_config']['tie_word_embeddings'] is False
    assert (config['force_image_size'], config['max_dynamic_patch'], config['use_thumbnail']) == (56, 4, True)
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    with open(os.path.join(folder, 'generation_config.json')) as f:
        assert json.load(f)['eos_token_id'][0] == tokenizer.convert_tokens_to_ids('<|im_end|>')
    assert tokenizer.convert_tokens_to_ids('<IMG_CONTEXT>') == 517  # the training tokenizer's id (515 + 2)
    # the chat template renders what the training template renders
    from xtuner_plugins.data.template import get_template
    template = get_template('internvl2_5')
    messages = [{'role': 'user', 'content': 'Hi?'}, {'role': 'assistant', 'content': 'Hello.'},
                {'role': 'user', 'content': 'More?'}]
    expected = (template.render_system(template.default_system) + template.render_user('Hi?')
                + template.render_assistant('Hello.') + template.render_user('More?') + template.assistant_prefix)
    assert tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == expected
    with_system = tokenizer.apply_chat_template([{'role': 'system', 'content': 'Be brief.'}] + messages[:1],
                                                tokenize=False)
    assert with_system == template.render_system('Be brief.') + template.render_user('Hi?')


def test_deepspeed_zero3_folder_converts(tiny, batch, tmp_path):
    """A real 2-process ZeRO-3 LoRA run: its checkpoint folder, consolidated on the CPU, converts to a model
    with the training model's logits."""
    opts = tiny_options(tiny, tiny['mixed'], repeat=4, batch_size=1)
    out = run_train(LORA, str(tmp_path / 'work'), nproc=2, deepspeed='zero3', cfg_options=opts)
    assert out.ok, out.summary()
    assert os.path.isdir(out.final_checkpoint)
    model = build_for_export(load_config(LORA, opts), out.final_checkpoint, torch.float32, log=lambda m: None)
    expected = training_logits(model, batch)
    folder = convert(LORA, out.final_checkpoint, tmp_path / 'out', opts)
    assert max_diff(official_logits(folder, batch), expected, batch['attention_mask']) < TOL
    base = build_for_export(load_config(LORA, opts), None, torch.float32, log=lambda m: None)
    assert max_diff(training_logits(base, batch), expected, batch['attention_mask']) > 10 * TOL
    tampered_deepspeed_folder_runs_nothing(out.final_checkpoint, tmp_path)


def tampered_deepspeed_folder_runs_nothing(folder, tmp_path):
    """DeepSpeed's consolidation unpickles the folder's files whole (``weights_only=False``): a shared folder whose
    model and optimizer states hold a call of ``touch`` gives the same weights, and nothing of it runs."""
    from tests.models.test_checkpoint import Marker
    from xtuner_plugins.models.checkpoint import load_trained_state_dict
    expected = load_trained_state_dict(folder)
    copy = tmp_path / 'shared' / os.path.basename(folder)
    shutil.copytree(folder, copy)
    for name in os.listdir(copy):
        state = torch.load(copy / name, weights_only=False)   # our own run's files
        state['ds_config'] = Marker(str(tmp_path / f'ran-{name}'))
        torch.save(state, copy / name)
    for lazy in (False, True):
        state = load_trained_state_dict(str(copy), lazy=lazy)
        assert state.keys() == expected.keys()
        assert all(torch.equal(state[k].contiguous(), expected[k]) for k in expected)
    assert not [n for n in os.listdir(tmp_path) if n.startswith('ran-')]
    # a DeepSpeed that pickles a value it needs as a class this reader keeps inert: one line saying what to do
    from xtuner_plugins.models import checkpoint
    with pytest.MonkeyPatch.context() as patch:
        patch.delitem(checkpoint._ALSO_ALLOWED, 'deepspeed.runtime.zero.config.ZeroStageEnum')
        with pytest.raises(ValueError) as info:
            load_trained_state_dict(folder)
    parent, tag = os.path.split(folder)
    assert str(info.value).startswith(f'{folder}: DeepSpeed could not consolidate it with its files read as data '
                                      f'(TypeError: ')
    assert str(info.value).endswith(f'python -m deepspeed.utils.zero_to_fp32 {parent} OUT --tag {tag} --max_shard_size '
                                    f'1000GB, and give OUT/pytorch_model.bin instead (it records no config: the '
                                    f'converter takes it as CONFIG OUT/pytorch_model.bin OUT_DIR)')
    # a file of the folder cut short (a copy that did not finish): a raw RuntimeError from DeepSpeed naming no file
    cut = tmp_path / 'cut' / os.path.basename(folder)
    shutil.copytree(folder, cut)
    (name,) = [n for n in os.listdir(cut) if n.startswith('zero_pp_rank_1') and n.endswith('optim_states.pt')]
    os.truncate(cut / name, os.path.getsize(cut / name) // 2)
    with pytest.raises(ValueError, match=f'^{re.escape(str(cut / name))}: cannot be read .*truncated or damaged'):
        load_trained_state_dict(str(cut))
    # bytes of the same file changed in place (its size whole): torch.load reads it without a word; its checksums not
    shutil.rmtree(cut)
    shutil.copytree(folder, cut)
    data = bytearray((cut / name).read_bytes())
    data[len(data) // 2:len(data) // 2 + 64] = bytes(b ^ 0xFF for b in data[len(data) // 2:len(data) // 2 + 64])
    (cut / name).write_bytes(bytes(data))
    with pytest.raises(ValueError, match=f'^{re.escape(str(cut / name))}: its record .* does not match the checksum'):
        load_trained_state_dict(str(cut))


# ------------------------------------------------------------------------------------------ refusals
def test_refusals(tiny, tmp_path, capsys):
    opts = options(tiny)
    ckpt = str(tmp_path / 'iter_1.pth')
    trained_checkpoint(LORA, opts, ckpt)

    def refused(*args, options=opts):
        code = convert_main(list(args) + ['--dtype', 'fp32'] + as_args(options))
        err = capsys.readouterr().err
        assert code == 2, err
        return err

    # a checkpoint without its lineage (zero_to_fp32's file) under a stage that follows an earlier one, given none:
    # the projector was random, what the earlier stages trained missing, converted without a word
    later = {k: v for k, v in opts.items() if k != 'model.from_scratch'}
    err = refused(LORA, ckpt, str(tmp_path / 'p'), options=later)
    assert f'{ckpt} records no lineage' in err and 'model.pretrained_pth=CHECKPOINT' in err, err
    assert not (tmp_path / 'p').exists()
    # a LoRA checkpoint given with the full fine-tuning config: the keys are listed
    err = refused(FULL, ckpt, str(tmp_path / 'a'))
    assert 'missing from the checkpoint' in err and 'language_model.model.embed_tokens.weight' in err
    err = refused(LORA, ckpt, str(tmp_path / 'b'), options=options(tiny, **{'model.llm_lora.r': 8}))
    assert 'shape mismatch' in err and 'lora_A' in err
    state = torch.load(ckpt, weights_only=False)
    state['state_dict']['mlp1.9.weight'] = torch.zeros(2)
    torch.save(state, str(tmp_path / 'extra.pth'))
    err = refused(LORA, str(tmp_path / 'extra.pth'), str(tmp_path / 'c'))
    assert 'mlp1.9.weight' in err
    # the output folder: an input, or not empty
    assert 'input' in refused(LORA, ckpt, tiny['llm'])
    assert 'input' in refused(LORA, ckpt, str(tmp_path))  # would hold the checkpoint
    os.makedirs(tmp_path / 'full')
    (tmp_path / 'full' / 'keep.txt').write_text('x')
    assert '--overwrite' in refused(LORA, ckpt, str(tmp_path / 'full'))
    assert (tmp_path / 'full' / 'keep.txt').exists()
    # --overwrite replaces an earlier conversion, never a folder of the user's other files (it deleted them all)
    for held in ('keep.txt and no config.json', 'photos' + os.sep):  # the files, else the subfolders, are named
        (tmp_path / 'full' / 'photos').mkdir(exist_ok=True) if held != 'keep.txt and no config.json' else None
        assert refused(LORA, ckpt, str(tmp_path / 'full'), '--overwrite').splitlines()[-1] == (
            f'convert_to_official: error: OUT_DIR {tmp_path / "full"} is not a converted folder (it holds {held}); '
            '--overwrite replaces an earlier conversion only (a converted config.json or .gguf files, no '
            'subfolders), never a folder of other files: choose another folder, or empty it yourself')
    assert (tmp_path / 'full' / 'keep.txt').exists() and (tmp_path / 'full' / 'photos').is_dir()
    os.rmdir(tmp_path / 'full' / 'photos')
    os.remove(tmp_path / 'full' / 'keep.txt')
    # a model of another kind (a plain transformers LLM: its config.json and no subfolder) was deleted too
    plain = tmp_path / 'plain_llm'
    shutil.copytree(tiny['llm'], plain)
    assert "is of model_type 'qwen2', not one a conversion writes" in refused(LORA, ckpt, str(plain), '--overwrite')
    assert sorted(os.listdir(plain)) == sorted(os.listdir(tiny['llm']))
    # one .gguf file among others (a folder of downloads) passed for a conversion and was emptied: only the pair a
    # GGUF conversion into that folder writes is one
    downloads = tmp_path / 'my_llms'
    downloads.mkdir()
    for name in ('llama-3-8b.Q4_K_M.gguf', 'notes.txt'):
        (downloads / name).write_text('x')
    assert ('not the two files a GGUF conversion into it writes (my_llms-TYPE.gguf and mmproj-my_llms-TYPE.gguf)'
            in refused(LORA, ckpt, str(downloads), '--overwrite'))
    os.remove(downloads / 'notes.txt')
    assert 'not the two files' in refused(LORA, ckpt, str(downloads), '--overwrite')
    assert sorted(os.listdir(downloads)) == ['llama-3-8b.Q4_K_M.gguf']
    from xtuner_plugins.models.export.outdir import not_a_conversion
    (downloads / 'llama-3-8b.Q4_K_M.gguf').rename(downloads / 'my_llms-F16.gguf')
    (downloads / 'mmproj-my_llms-F16.gguf').write_text('x')
    assert not_a_conversion(str(downloads)) is None   # what a GGUF conversion into it wrote
    for _ in range(2):  # written, then replaced
        assert convert_main([LORA, ckpt, str(tmp_path / 'full'), '--dtype', 'fp32', '--overwrite'] +
                            as_args(opts)) == 0
    assert (tmp_path / 'full' / 'config.json').exists()
    assert not [p for p in os.listdir(tmp_path) if '.tmp-' in p]
    # an earlier conversion holding files of the user's (notes, results, a backup of the checkpoint): the overwrite
    # removed them with the folder without a word
    written = sorted(os.listdir(tmp_path / 'full'))
    for name in ('notes.txt', 'eval_report.json', 'my_backup.pt'):
        (tmp_path / 'full' / name).write_text('mine')
    assert refused(LORA, ckpt, str(tmp_path / 'full'), '--overwrite').splitlines()[-1] == (
        f'convert_to_official: error: OUT_DIR {tmp_path / "full"} is not a converted folder (it holds '
        'eval_report.json, my_backup.pt, notes.txt, which a conversion never writes (move it out first)); '
        '--overwrite replaces an earlier conversion only (a converted config.json or .gguf files, no subfolders), '
        'never a folder of other files: choose another folder, or empty it yourself')
    assert sorted(os.listdir(tmp_path / 'full')) == sorted(written + ['notes.txt', 'eval_report.json', 'my_backup.pt'])


def test_lora_on_an_official_checkpoint_converts(tiny, batch, tmp_path):
    """The README's 'LoRA from an official InternVL checkpoint': the frozen base comes from that folder."""
    opts = options(tiny, **{'model.freeze_vision': False})
    trained_checkpoint(FULL, opts, str(tmp_path / 'full.pth'))
    official = convert(FULL, str(tmp_path / 'full.pth'), tmp_path / 'official', opts)
    lora_opts = options(tiny, **{'model.official_checkpoint': official, 'model.vision_encoder': None,
                                 'model.llm': None, 'train_dataloader.dataset.tokenizer': official})
    model = trained_checkpoint(LORA, lora_opts, str(tmp_path / 'lora.pth'), seed=1)
    expected = training_logits(model, batch)
    folder = convert(LORA, str(tmp_path / 'lora.pth'), tmp_path / 'out', lora_opts)
    assert max_diff(official_logits(folder, batch), expected, batch['attention_mask']) < TOL
    assert max_diff(official_logits(official, batch), expected, batch['attention_mask']) > 10 * TOL


def test_out_dir_a_link_is_written_through(tiny, tmp_path, capsys):
    """A link to an empty folder as OUT_DIR: the folder it points at gets the converted files, the link stays
    (the whole conversion used to run and then fail on removing the link)."""
    opts = options(tiny)
    ckpt = str(tmp_path / 'iter_1.pth')
    trained_checkpoint(LORA, opts, ckpt)
    (tmp_path / 'real').mkdir()
    os.symlink(tmp_path / 'real', tmp_path / 'link')
    assert convert_main([LORA, ckpt, str(tmp_path / 'link'), '--dtype', 'fp32'] + as_args(opts)) == 0
    assert f'OUT_DIR {tmp_path / "link"} is a link: writing into the folder it points at, {tmp_path / "real"}' in \
        capsys.readouterr().out
    assert os.path.islink(tmp_path / 'link') and (tmp_path / 'real' / 'config.json').exists()
    assert not [p for p in os.listdir(tmp_path) if '.tmp-' in p]


def test_overwrite_never_replaces_an_input_or_a_training_work_folder(tiny, tmp_path, capsys):
    """Issue 46: ``convert --overwrite`` into the previous stage's work folder (found through the lineage, not on
    the command line) deleted its checkpoints and logs. Any folder holding an input, or a training run's files,
    is refused before anything is built."""
    from xtuner_plugins.models.lineage import lineage_record
    opts = options(tiny)
    warm_dir, sft_dir = tmp_path / 'pretrain', tmp_path / 'finetune'
    warm_dir.mkdir(), sft_dir.mkdir()
    warm = str(warm_dir / 'iter_2.pth')
    torch.save({'meta': {}, 'state_dict': {}}, warm)
    (warm_dir / 'train_output.log').write_text('log')
    ckpt = str(sft_dir / 'iter_1.pth')
    trained_checkpoint(LORA, opts, ckpt)
    state = torch.load(ckpt, weights_only=False)
    state['meta'] = {'lineage': lineage_record({}, pretrained_pth=warm)}
    torch.save(state, ckpt)

    def refused(out):
        code = convert_main([LORA, ckpt, str(out), '--dtype', 'fp32', '--overwrite'] + as_args(opts))
        out_err = capsys.readouterr()
        assert code == 2 and '[1/4]' not in out_err.out, out_err
        (line,) = out_err.err.splitlines()
        return line

    assert refused(warm_dir) == (f'convert_to_official: error: OUT_DIR {warm_dir} is, holds or lies inside an input '
                                 f'({warm}); choose another folder')
    assert os.path.exists(warm) and (warm_dir / 'train_output.log').exists()
    assert 'is, holds or lies inside an input' in refused(tmp_path)
    for i, name in enumerate(('last_checkpoint', 'run.lock', os.path.join('sub', 'epoch_1.pth'))):
        folder = tmp_path / f'run_{i}'
        (folder / name).parent.mkdir(parents=True)
        (folder / name).write_text('x')
        assert refused(folder) == (f'convert_to_official: error: OUT_DIR {folder} holds a training run\'s files '
                                   f'({folder / name}); a conversion never replaces a training work folder, '
                                   '--overwrite or not: choose another folder')
        assert (folder / name).exists()
    # the previous stage found where --remap moved it (into an earlier conversion's folder, under another name):
    # an input too (the lineage's recorded paths only were, and --overwrite deleted the file it had just read)
    earlier = tmp_path / 'earlier_conversion'
    earlier.mkdir()
    (earlier / 'config.json').write_text('{}')
    shutil.move(warm, earlier / 'warm_stage.bin')
    code = convert_main([LORA, ckpt, str(earlier), '--dtype', 'fp32', '--overwrite',
                         '--remap', f'{warm}={earlier / "warm_stage.bin"}'] + as_args(opts))
    assert code == 2 and f'is, holds or lies inside an input ({earlier / "warm_stage.bin"})' in capsys.readouterr().err
    assert (earlier / 'warm_stage.bin').exists()


def test_a_tampered_checkpoint_is_one_line(tiny, tmp_path, capsys):
    opts = options(tiny)
    ckpt = str(tmp_path / 'iter_1.pth')
    trained_checkpoint(LORA, opts, ckpt)
    state = torch.load(ckpt, weights_only=False)
    for meta, field in [({'lineage': {'sources': ['llm']}}, "meta['lineage']"),
                        ({'cfg': 'import os\nmodel = dict()'}, "meta['cfg']")]:
        torch.save(dict(state, meta=meta), ckpt)
        assert convert_main([LORA, ckpt, str(tmp_path / 'out'), '--dtype', 'fp32'] + as_args(opts)) == 2
        (line,) = capsys.readouterr().err.splitlines()
        assert line.startswith(f'convert_to_official: error: {ckpt}') and field in line, line
    assert not (tmp_path / 'out').exists()


def recorded_checkpoint(config, opts, path, seed=0):
    """:func:`trained_checkpoint` with what training records in it: the run's config text (MMEngine's
    ``meta['cfg']``) and its lineage (``LineageHook``)."""
    model = trained_checkpoint(config, opts, path, seed)
    state = torch.load(path, weights_only=False)
    state['meta'] = {'cfg': load_config(config, opts).pretty_text, 'lineage': model.lineage}
    torch.save(state, path)
    return model


def test_the_checkpoint_alone_converts_with_what_it_was_trained_with(tiny, batch, tmp_path, capsys):
    """No config: the model, the tiling and the system message come from the checkpoint (a config given with
    other data settings used to be converted without a word: max_dynamic_patch 12 for a run trained with 6,
    its system message dropped)."""
    opts = options(tiny, **{'train_dataloader.dataset.max_dynamic_patch': 6,
                            'train_dataloader.dataset.system': 'Answer in one word.'})
    ckpt = str(tmp_path / 'iter_1.pth')
    expected = training_logits(recorded_checkpoint(LORA, opts, ckpt), batch)
    elsewhere = tmp_path / 'elsewhere'
    elsewhere.mkdir()
    cwd = os.getcwd()
    os.chdir(elsewhere)  # the recorded paths are absolute or found through the lineage, not the current folder
    try:
        assert convert_main([ckpt, 'out', '--dtype', 'fp32']) == 0
    finally:
        os.chdir(cwd)
    folder = str(elsewhere / 'out')
    config = json.load(open(os.path.join(folder, 'config.json')))
    assert config['max_dynamic_patch'] == 6 and config['system_message'] == 'Answer in one word.'
    assert max_diff(official_logits(folder, batch), expected, batch['attention_mask']) < TOL

    def refused(*args):
        assert convert_main(list(args) + ['--dtype', 'fp32']) == 2
        return capsys.readouterr().err

    # a config (or options) that disagrees with the recorded settings is refused, each setting with both values
    err = refused(LORA, ckpt, str(tmp_path / 'a'), *as_args(options(tiny)))
    assert 'train_dataloader.dataset.max_dynamic_patch: trained 6, given 4' in err
    assert "train_dataloader.dataset.system: trained 'Answer in one word.', given None" in err
    err = refused(ckpt, str(tmp_path / 'b'), '--cfg-options', 'model.llm_lora.lora_alpha=64')
    assert 'model.llm_lora.lora_alpha: trained 32, given 64' in err and len(err.strip().splitlines()) == 1
    # the same config and options as training are accepted (a value with spaces cannot pass --cfg-options)
    from xtuner_plugins.models.export import export_checkpoint
    export_checkpoint(LORA, ckpt, str(tmp_path / 'c'), dtype=torch.float32, cfg_options=opts, log=lambda m: None)


def test_moved_source_folders_are_found_with_remap(tiny, tmp_path, capsys):
    work = tmp_path / 'work'
    shutil.copytree(os.path.dirname(tiny['llm']), work / 'models')
    moved = dict(tiny, llm=str(work / 'models' / os.path.basename(tiny['llm'])),
                 internvit=str(work / 'models' / os.path.basename(tiny['internvit'])))
    ckpt = str(tmp_path / 'iter_1.pth')
    recorded_checkpoint(LORA, options(moved), ckpt)
    os.rename(work / 'models', work / 'models2')
    assert convert_main([ckpt, str(tmp_path / 'a'), '--dtype', 'fp32']) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and '--remap OLD=NEW' in err and moved['internvit'] in err
    assert convert_main([ckpt, str(tmp_path / 'b'), '--dtype', 'fp32',
                         '--remap', f'{work / "models"}={work / "models2"}']) == 0
    out = capsys.readouterr().out
    assert f'model.llm: {work / "models2"}' in out
    # a folder remapped onto other weights is refused by the recorded fingerprints
    other = tmp_path / 'other'
    shutil.copytree(work / 'models2', other)
    weights = next(p for p in os.listdir(other / os.path.basename(tiny['llm'])) if p.endswith('.safetensors'))
    with open(other / os.path.basename(tiny['llm']) / weights, 'r+b') as f:
        f.seek(-8, os.SEEK_END)
        f.write(b'\x01' * 8)
    assert convert_main([ckpt, str(tmp_path / 'c'), '--dtype', 'fp32',
                         '--remap', f'{work / "models"}={other}']) == 2
    assert 'is not the folder' in capsys.readouterr().err


@pytest.mark.parametrize('size', ['abc', '0', '0GB', '100', '5 GiB'])
def test_a_shard_size_that_does_not_read_is_refused_as_the_command_is_read(tmp_path, capsys, size):
    """huggingface_hub's shard splitting failed on it after the model was built, naming no option ('Unit 'BC' not
    supported'); 0 would have passed to it."""
    with pytest.raises(SystemExit) as exc:
        convert_main([str(tmp_path / 'iter_1.pth'), str(tmp_path / 'out'), '--max-shard-size', size])
    assert exc.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1].endswith(
        f'error: --max-shard-size {size!r}: give a size over 0 in KB, MB, GB or TB (e.g. 5GB)')


@pytest.mark.parametrize('fmt', ['auto', 'hf'])
def test_a_converted_folder_given_as_the_checkpoint_is_named_as_one(tmp_path, capsys, fmt):
    """It was read as a DeepSpeed checkpoint folder: '... records no training config (it was not written by
    training's CheckpointHook)', which sends a user who wants another layout the wrong way."""
    folder = tmp_path / 'my_internvl'
    folder.mkdir()
    (folder / 'config.json').write_text('{"model_type": "internvl_chat"}')
    assert convert_main([str(folder), str(tmp_path / 'out'), '--format', fmt]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f'convert_to_official: error: {folder} is a converted folder (it has a config.json), not a training '
        'checkpoint: a converted folder converts to --format gguf only; for another layout convert the checkpoint '
        'it was converted from')
    assert not (tmp_path / 'out').exists()


def test_a_gguf_folder_given_as_the_checkpoint_is_named_as_one(tmp_path, capsys):
    """It was '... is a folder but not a DeepSpeed checkpoint ...: a copy that did not finish?', from the converter
    and from chat's --checkpoint: a GGUF folder is a whole conversion, to give as the folder itself."""
    from tools.chat import main as chat_main
    folder = tmp_path / 'my_gguf'
    folder.mkdir()
    for name in ('my_gguf-F16.gguf', 'mmproj-my_gguf-F16.gguf'):
        (folder / name).write_bytes(b'GGUF')
    says = (f'{folder} is a GGUF folder (--format gguf wrote it: mmproj-my_gguf-F16.gguf, my_gguf-F16.gguf), not a '
            'training checkpoint: tools/chat.py and tools/eval.py take it as the folder itself; for another format '
            'convert the checkpoint it was converted from')
    for prog, main, argv in (('convert_to_official', convert_main, [str(folder), str(tmp_path / 'out')]),
                             ('chat', chat_main, ['--checkpoint', str(folder), '--prompt', 'Hi'])):
        assert main(argv) == 2
        assert capsys.readouterr().err.splitlines()[-1] == f'{prog}: error: {says}'
    assert not (tmp_path / 'out').exists()


def test_a_work_folder_given_as_the_checkpoint_names_its_newest(tmp_path, capsys):
    """It said '... records no training config; give the training config', and given one: 'not a DeepSpeed
    checkpoint'."""
    work = tmp_path / 'finetune_lora'
    work.mkdir()
    for n in (2, 10):
        torch.save({'meta': {}, 'state_dict': {}}, work / f'iter_{n}.pth')
    for argv in ([str(work)], [LORA, str(work)]):
        assert convert_main(argv + [str(tmp_path / 'out')]) == 2
        assert capsys.readouterr().err.splitlines()[-1] == (
            f'convert_to_official: error: {work} is a training work folder, not a checkpoint: give one of its '
            f'checkpoints (the newest: {work}/iter_10.pth)')
    assert not (tmp_path / 'out').exists()


def test_weights_past_float16s_range_are_refused_not_written_as_inf(tiny, tmp_path, capsys):
    """--dtype fp16 of weights past 65504 wrote inf into model.safetensors without a word (the checkpoint's own
    values are checked finite; the cast was not)."""
    opts = options(tiny)
    big = str(tmp_path / 'iter_1.pth')
    trained_checkpoint(LORA, opts, big, scale=1e6)   # the projector's weights past 65504
    out = tmp_path / 'out'
    assert convert_main([LORA, big, str(out), '--dtype', 'fp16'] + as_args(opts)) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert re.fullmatch(r'convert_to_official: error: \S+: \d+ of its \d+ values are not finite in torch.float16 as '
                        r'they would be written \(float16 ends at 65504: convert with --dtype bf16, whose range is '
                        r"fp32's\); nothing was written", line), line
    assert not out.exists() and not [p for p in os.listdir(tmp_path) if '.tmp-' in p]
    assert convert_main([LORA, big, str(out), '--dtype', 'bf16'] + as_args(opts)) == 0


def test_a_folder_that_is_no_deepspeed_checkpoint_is_named_as_one(tmp_path, capsys):
    """An empty folder, or one holding only a DeepSpeed optimizer's files (a copy that did not finish), read as a
    checkpoint recording nothing: 'records no training config'; given the config, 'records no lineage ... give
    model.pretrained_pth'."""
    folder = tmp_path / 'iter_4.pth'
    folder.mkdir()
    for held in ('nothing', 'bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt'):
        if held != 'nothing':
            (folder / held).write_bytes(b'x')
        for argv in ([str(folder)], [LORA, str(folder)]):
            assert convert_main(argv + [str(tmp_path / 'out')]) == 2
            assert capsys.readouterr().err.splitlines()[-1] == (
                f'convert_to_official: error: {folder} is a folder but not a DeepSpeed checkpoint (no '
                f'*model_states.pt inside; it holds {held}): a copy that did not finish? Give the checkpoint '
                'DeepSpeed saved, whole')
    assert not (tmp_path / 'out').exists()


def test_an_out_dir_that_cannot_be_written_is_one_line(tiny, tmp_path, capsys, monkeypatch):
    """Under a file: a NotADirectoryError traceback once the model was built (minutes at real size); a disk that
    fills while writing: an OSError traceback. Now one line each; nothing is left behind."""
    import errno
    from xtuner_plugins.models.export import job
    opts = options(tiny)
    ckpt = str(tmp_path / 'iter_1.pth')
    trained_checkpoint(LORA, opts, ckpt)
    (tmp_path / 'afile').write_text('x')
    out = tmp_path / 'afile' / 'sub' / 'out'
    assert convert_main([LORA, ckpt, str(out), '--dtype', 'fp32'] + as_args(opts)) == 2
    out_err = capsys.readouterr()
    assert '[1/4]' not in out_err.out and out_err.err.splitlines()[-1] == (
        f'convert_to_official: error: OUT_DIR {out} cannot be made: {tmp_path / "afile"} is a file, not a folder')

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, 'No space left on device')
    monkeypatch.setitem(job.WRITERS, 'official', full)
    assert convert_main([LORA, ckpt, str(tmp_path / 'out'), '--dtype', 'fp32'] + as_args(opts)) == 2
    assert capsys.readouterr().err.splitlines()[-1] == \
        'convert_to_official: error: [Errno 28] No space left on device'
    assert sorted(os.listdir(tmp_path)) == ['afile', 'iter_1.pth']
    # safetensors' own writer on a full disk raises its SafetensorError, not an OSError: a traceback before
    import safetensors.torch
    from safetensors import SafetensorError

    def full_weights(*args, **kwargs):
        raise SafetensorError('Error while serializing: I/O error: No space left on device (os error 28)')
    monkeypatch.setitem(job.WRITERS, 'official', job.write_official)
    monkeypatch.setattr(safetensors.torch, 'save_file', full_weights)
    assert convert_main([LORA, ckpt, str(tmp_path / 'out'), '--dtype', 'fp32'] + as_args(opts)) == 2
    last = capsys.readouterr().err.splitlines()[-1]
    assert last.startswith('convert_to_official: error: ') and last.endswith(
        'model.safetensors: Error while serializing: I/O error: No space left on device (os error 28)'), last
    assert sorted(os.listdir(tmp_path)) == ['afile', 'iter_1.pth']


@pytest.mark.parametrize('when', ['writing', 'moving in'])
def test_an_interrupted_conversion_leaves_the_earlier_one_as_it_was(tiny, tmp_path, capsys, monkeypatch, when):
    """Ctrl-C printed a traceback; with --overwrite, one between removing the old folder and moving the new one in
    left no OUT_DIR at all. Now the old folder is moved aside first and back on an interrupt, and one line says so."""
    from xtuner_plugins.models.export import job
    opts = options(tiny)
    ckpt = str(tmp_path / 'iter_1.pth')
    trained_checkpoint(LORA, opts, ckpt)
    out = tmp_path / 'out'
    argv = [LORA, ckpt, str(out), '--dtype', 'fp32', '--overwrite'] + as_args(opts)
    assert convert_main(argv) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    replace, calls = os.replace, []

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    def interrupted_moving_in(src, dst):
        calls.append(dst)
        if dst == str(out) and calls.count(dst) == 1:  # the new folder moving in, once the old one is aside
            raise KeyboardInterrupt
        replace(src, dst)
    if when == 'writing':
        monkeypatch.setitem(job.WRITERS, 'official', interrupted)
    else:
        monkeypatch.setattr(job.os, 'replace', interrupted_moving_in)
    capsys.readouterr()
    assert convert_main(argv) == 130
    assert capsys.readouterr().err.splitlines()[-1] == \
        f'convert_to_official: interrupted; {out} is as it was before'
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(os.listdir(tmp_path)) == ['iter_1.pth', 'out']


def test_what_a_killed_conversion_left_is_put_right_by_the_next(tiny, tmp_path, capsys):
    """A conversion killed outright (SIGKILL: no except runs) leaves OUT_DIR.tmp-PID (half written) and, killed
    between moving the old OUT_DIR aside and the new one in, OUT_DIR.old-PID with no OUT_DIR. The next conversion
    removes the first, moves the earlier conversion back (then --overwrite replaces it as asked), and says both; a
    live process's leftovers are not touched."""
    import subprocess
    opts = options(tiny)
    ckpt = str(tmp_path / 'iter_1.pth')
    trained_checkpoint(LORA, opts, ckpt)
    out = tmp_path / 'out'
    argv = [LORA, ckpt, str(out), '--dtype', 'fp32'] + as_args(opts)
    assert convert_main(argv) == 0
    gone = subprocess.Popen(['true'])
    gone.wait()                                  # a pid no process holds any more
    os.replace(out, tmp_path / f'out.old-{gone.pid}')
    (tmp_path / f'out.tmp-{gone.pid}').mkdir()
    (tmp_path / f'out.tmp-{gone.pid}' / 'model-00001-of-00002.safetensors').write_bytes(b'half')
    import json
    import socket

    def claim(pid, host=socket.gethostname()):   # what the killed conversion wrote beside OUT_DIR as it started
        (tmp_path / f'out.converting-{pid}').write_text(json.dumps({'host': host, 'pid': pid}))
    claim(gone.pid)
    live = tmp_path / f'out.tmp-{os.getpid()}x'   # not the pattern: left alone
    live.mkdir()
    # named alike but claimed by no conversion of this machine: a user's backup (it was deleted), and another
    # machine's conversion running into a shared folder (it was removed while it wrote)
    other_pid = 4194399   # another machine's conversion: a pid past Linux's pid_max (no pid of this test's own)
    backup, elsewhere = tmp_path / 'out.old-20241127', tmp_path / f'out.tmp-{other_pid}'
    backup.mkdir()
    (backup / 'NOTES.txt').write_text('mine')
    elsewhere.mkdir()
    claim(other_pid, host='another-node')
    capsys.readouterr()
    assert convert_main(argv) == 2               # the earlier conversion is back: without --overwrite, refused
    out_text = capsys.readouterr()
    assert f'out.old-{gone.pid}: the earlier conversion, moved aside by a conversion that was killed' in out_text.out
    assert f'out.tmp-{gone.pid}: left by a conversion that was killed (pid {gone.pid}); removed' in out_text.out
    assert f"{backup}: named as a conversion's leftover, but no conversion claimed it; left as it is" in out_text.out
    assert f"{elsewhere}: named as a conversion's leftover, but another machine's conversion claimed it" in out_text.out
    assert 'is not empty; pass --overwrite' in out_text.err
    assert sorted(os.listdir(tmp_path)) == sorted(['iter_1.pth', 'out', live.name, backup.name, elsewhere.name,
                                                   f'out.converting-{other_pid}'])
    (tmp_path / f'out.old-{os.getppid()}').mkdir()   # a running process's (this one's parent): it stays
    claim(os.getppid())
    # a live conversion's claim (this machine's running process, or any of another machine) refuses a second
    # conversion into the folder: the later of two to finish replaced the other's folder, --overwrite or not
    assert convert_main(argv + ['--overwrite']) == 2
    assert f'another conversion is writing {out} (pid {os.getppid()} on this machine)' in capsys.readouterr().err
    os.remove(tmp_path / f'out.converting-{os.getppid()}')
    assert convert_main(argv + ['--overwrite']) == 2
    assert (f'out.converting-{other_pid} claims it for a conversion on another machine; remove that file once that '
            'conversion is over') in capsys.readouterr().err
    assert (tmp_path / f'out.converting-{other_pid}').exists()   # another machine's: kept
    os.remove(tmp_path / f'out.converting-{other_pid}')
    assert convert_main(argv + ['--overwrite']) == 0
    assert (tmp_path / f'out.old-{os.getppid()}').is_dir() and (out / 'config.json').is_file()
    assert (backup / 'NOTES.txt').read_text() == 'mine' and elsewhere.is_dir()
    assert not (tmp_path / f'out.converting-{os.getpid()}').exists()   # this run's claim, removed as it ended
    gone2 = subprocess.Popen(['true'])
    gone2.wait()
    claim(gone2.pid)   # a claim alone (killed before it made a folder, or after it moved them): removed
    assert convert_main(argv + ['--overwrite']) == 0
    assert not (tmp_path / f'out.converting-{gone2.pid}').exists()


def stopped(argv) -> int:
    """The tool's exit code; a stop it let out fails the test (pytest takes a KeyboardInterrupt as its own)."""
    try:
        return convert_main(argv)
    except KeyboardInterrupt as stop:
        pytest.fail(f'the stop went out of the tool: {stop!r}')


@pytest.mark.parametrize('when', ['removing the old folder', 'removing it, stopped twice', 'after it was done'])
def test_a_stop_once_the_new_folder_is_in_says_so(tiny, tmp_path, capsys, monkeypatch, when):
    """SIGTERM while --overwrite removed the replaced OUT.old-PID said 'OUT is as it was before' (OUT held the new
    conversion) and left OUT.old-PID in part, which no later conversion removed (its claim was gone); one after
    '[4/4] done' said the same. Now the stop says the new conversion is in; what is left of the old one is removed
    before the exit, or (a second stop) named, and the next conversion removes it."""
    from xtuner_plugins.models.export import job
    from xtuner_plugins.signals import Terminated
    opts = options(tiny)
    ckpt = str(tmp_path / 'iter_1.pth')
    trained_checkpoint(LORA, opts, ckpt)
    out, old = tmp_path / 'out', tmp_path / f'out.old-{os.getpid()}'
    argv = [LORA, ckpt, str(out), '--dtype', 'fp32', '--overwrite'] + as_args(opts)
    assert convert_main(argv) == 0
    before = os.stat(out).st_ino
    rmtree, peak, stops = shutil.rmtree, job.peak_rss_mb, []

    def stopped_removing(path, *args, **kwargs):
        if str(path) == str(old) and len(stops) < (2 if 'twice' in when else 1):
            for name in sorted(os.listdir(old))[:1]:   # the removal under way
                os.remove(old / name)
            stops.append(path)
            raise Terminated('signal 15')    # what SIGTERM raises (signals.sigterm_as_interrupt)
        return rmtree(path, *args, **kwargs)

    def stopped_when_done():   # the '[4/4] done' line's, once the new folder is in
        if os.stat(out).st_ino != before:
            raise Terminated('signal 15')
        return peak()
    if when == 'after it was done':
        monkeypatch.setattr(job, 'peak_rss_mb', stopped_when_done)
    else:
        monkeypatch.setattr(shutil, 'rmtree', stopped_removing)
    capsys.readouterr()
    assert stopped(argv) == 143
    left = (f'; what is left of the folder it replaced, {old}, is removed by the next conversion into {out} (or '
            'remove it yourself)' if 'twice' in when else '')
    assert capsys.readouterr().err.splitlines() == [
        f'convert_to_official: terminated once the conversion was written: {out} holds it whole{left}']
    assert os.stat(out).st_ino != before and (out / 'model.safetensors').is_file()
    monkeypatch.undo()
    if 'twice' not in when:
        assert sorted(os.listdir(tmp_path)) == ['iter_1.pth', 'out']
        return
    assert sorted(os.listdir(tmp_path)) == sorted(['iter_1.pth', 'out', old.name, f'out.converting-{os.getpid()}'])
    assert convert_main(argv) == 0
    assert (f'{old}: what was left of the folder a conversion replaced, stopped or killed (pid {os.getpid()}) '
            'before it removed it; removed') in capsys.readouterr().out
    assert sorted(os.listdir(tmp_path)) == ['iter_1.pth', 'out']


@pytest.mark.parametrize('module', ['xtuner_plugins.cfg_words', 'xtuner_plugins.models.export'])
def test_a_stop_while_the_libraries_load_is_one_line(tmp_path, capsys, monkeypatch, module):
    """SIGTERM in the first seconds (torch and the engine loading, after its handler was set and before the
    conversion's try) was a traceback ending in 'Terminated: signal 15', exit 1; before the handler was set (torch
    imported with the tool's module), the process ended without a word. Now one line, 143."""
    import builtins
    import signal
    import time

    from xtuner_plugins import signals
    real = builtins.__import__

    def loading(name, *args, **kwargs):
        if name == module:
            if signal.getsignal(signal.SIGTERM) is not signals._raise:
                pytest.fail('SIGTERM has no handler of the tool\'s yet: the process ends without a word')
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(10)   # (the handler raises in it)
        return real(name, *args, **kwargs)
    monkeypatch.setattr(builtins, '__import__', loading)
    assert stopped([str(tmp_path / 'iter_1.pth'), str(tmp_path / 'out')]) == 143
    monkeypatch.undo()
    said = ('terminated as it started; nothing was written' if module == 'xtuner_plugins.cfg_words' else
            f'terminated; {tmp_path / "out"} is as it was before')
    assert capsys.readouterr().err.splitlines() == [f'convert_to_official: {said}']
    assert os.listdir(tmp_path) == []


def test_a_stop_as_the_process_ends_after_a_conversion_says_it_was_written(tmp_path):
    """SIGTERM after '[4/4] done', as the process ended (its teardown takes a moment), ended it at once: exit 143
    without a word, though the conversion was written. Its own command line (no argv) says it now."""
    import subprocess
    import sys
    probe = ('import atexit, os, signal, sys, time\n'
             'from xtuner_plugins.cli import convert\n'
             'convert._main = lambda *args: 0   # a conversion that was written\n'
             'atexit.register(lambda: (os.kill(os.getpid(), signal.SIGTERM), time.sleep(30)))\n'
             'sys.argv = ["convert_to_official.py", "iter_1.pth", "out"]\n'
             'sys.exit(convert.main())\n')
    done = subprocess.run([sys.executable, '-c', probe], capture_output=True, text=True, cwd=str(tmp_path),
                          env=dict(os.environ, PYTHONPATH=ROOT), timeout=60)
    assert (done.returncode, done.stderr) == (
        143, 'convert_to_official: terminated once the conversion was written: out holds it whole\n'), done.stderr


@pytest.mark.parametrize('tool', ['convert_to_official', 'serve'])
def test_a_tool_that_does_not_train_says_its_error_alone(tmp_path, tool):
    """The training engine's CPU-patch line (``xtuner_plugins: CUDA is not available, applied CPU patches: ...;
    malloc: glibc (tools/train.py uses jemalloc ...)``) is logged as a training runner is built: conversion and
    serving, which import the engine and never train, printed it before their own one-line error."""
    import subprocess
    import sys

    from tests.train_utils import train_env
    argv = [str(tmp_path / 'gone')] + ([str(tmp_path / 'out')] if tool == 'convert_to_official' else [])
    done = subprocess.run([sys.executable, os.path.join(ROOT, 'tools', f'{tool}.py'), *argv], capture_output=True,
                          text=True, cwd=str(tmp_path), env=train_env(), timeout=300)
    assert done.returncode == 2 and done.stderr.startswith(f'{tool}: error: '), done.stderr
    assert (done.stdout + done.stderr).strip().splitlines() == done.stderr.strip().splitlines(), done.stdout
