"""VisionLanguageModel on the tiny look-alikes: assembly, tokens and embeddings, image-token injection,
trainable-only checkpoints, stage chaining, starting from an official-layout checkpoint, and the old class
name still building the model."""

import pytest
import torch

from tests.models.conftest import build, train_steps, write_official
from xtuner_plugins.data.template import INTERNVL_ADDED_TOKENS
from xtuner_plugins.data.tiling import normalize_tiles
from xtuner_plugins.errors import Refused
from xtuner_plugins.models import VisionLanguageModel


def test_tokens_and_embeddings(tiny):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    base = AutoModelForCausalLM.from_pretrained(tiny['llm'])
    n_old = len(AutoTokenizer.from_pretrained(tiny['llm']))
    model = build(tiny)
    tok, llm = model.tokenizer, model.language_model
    assert len(tok) == n_old + len(INTERNVL_ADDED_TOKENS)
    assert [tok.convert_tokens_to_ids(t) for t in INTERNVL_ADDED_TOKENS] == list(range(n_old, len(tok)))
    emb, head = llm.get_input_embeddings().weight, llm.get_output_embeddings().weight
    assert emb.shape[0] == head.shape[0] == len(tok) == llm.config.vocab_size  # padded rows dropped, as InternVL
    assert head.data_ptr() != emb.data_ptr() and llm.config.tie_word_embeddings is False
    old = base.get_input_embeddings().weight
    assert torch.equal(emb[:n_old], old[:n_old]) and torch.equal(head[:n_old], old[:n_old])
    mean = old[:n_old].mean(0)
    for row in range(n_old, len(tok)):
        assert torch.allclose(emb[row], mean, atol=1e-6) and torch.allclose(head[row], mean, atol=1e-6)


def test_image_tokens_are_filled_in_order(tiny, batch):
    model = build(tiny).eval()
    with torch.no_grad():
        embeds = model.embed_inputs(batch['input_ids'], batch['pixel_values'], batch['image_flags'])
        feats = model.extract_feature(normalize_tiles(batch['pixel_values']))
    flags = batch['image_flags']
    assert flags.tolist().count(0) == 1  # the text-only sample's dummy tile
    real = feats[flags == 1].reshape(-1, feats.shape[-1])
    slots = batch['input_ids'] == model.img_context_token_id
    assert int(slots.sum()) == real.shape[0] == int(flags.sum()) * 4
    assert torch.allclose(embeds[slots], real, atol=1e-6)
    plain = model.language_model.get_input_embeddings()(batch['input_ids'])
    assert torch.equal(embeds[~slots], plain[~slots])


def test_count_mismatch_names_both_counts(tiny, batch):
    model = build(tiny)
    ids = batch['input_ids'].clone()
    first = (ids == model.img_context_token_id).nonzero()[0]
    ids[first[0], first[1]] = 0
    n = int((batch['input_ids'] == model.img_context_token_id).sum())
    with pytest.raises(ValueError, match=f'{n - 1} <IMG_CONTEXT> tokens but {n} image features'):
        model.embed_inputs(ids, batch['pixel_values'], batch['image_flags'])


def test_mlp_warmup_trains_only_the_projector(tiny, batch):
    torch.manual_seed(0)
    model = build(tiny)
    assert {k.split('.')[0] for k in model.trainable_keys()} == {'mlp1'}
    assert set(model.state_dict()) == {f'mlp1.{k}' for k in model.mlp1.state_dict()}
    losses = train_steps(model, batch, 8)
    # only mlp1 learns; a random tiny LLM lets image tokens move the answer loss a little (6.26 -> 6.22)
    assert losses[-1] < losses[0] - 0.02 and losses == sorted(losses, reverse=True), losses
    assert all(p.grad is None for p in model.language_model.parameters())


def test_text_only_batch_reaches_every_trainable_parameter(tiny, batch):
    model = build(tiny, freeze_vision=False)
    text = {k: v[1:2] if k in ('input_ids', 'labels', 'attention_mask') else v for k, v in batch.items()}
    text['pixel_values'] = batch['pixel_values'][-0:][:1] * 0
    text['image_flags'] = torch.zeros(1, dtype=torch.long)
    model(text, mode='loss')['loss'].backward()
    assert all(p.grad is not None for p in model.mlp1.parameters())
    assert all(p.grad is not None for p in model.vision_model.parameters())


def test_state_dict_follows_what_is_trained(tiny):
    model = build(tiny, freeze_llm=False, freeze_vision=True)
    prefixes = {k.split('.')[0] for k in model.state_dict()}
    assert prefixes == {'mlp1', 'language_model'}
    assert model.mlp1[0].weight.dtype == torch.float32


def test_gradient_checkpointing_and_eager_attention(tiny, batch):
    model = build(tiny, freeze_llm=False, freeze_vision=False, llm_grad_ckpt=True, vision_grad_ckpt=True,
                  attn_implementation='eager')
    model.train()
    model(batch, mode='loss')['loss'].backward()
    assert model.language_model.is_gradient_checkpointing


def test_pretrained_pth_chains_stages(tiny, tmp_path):
    first = build(tiny)
    with torch.no_grad():
        for p in first.mlp1.parameters():
            p.add_(0.5)
    path = tmp_path / 'iter_1.pth'
    torch.save({'state_dict': first.state_dict(), 'meta': {}}, path)
    second = build(tiny, pretrained_pth=str(path), freeze_llm=False)
    for a, b in zip(first.mlp1.parameters(), second.mlp1.parameters()):
        assert torch.equal(a, b)
    state = first.state_dict()
    name = sorted(state)[0]
    state[name][0] = float('nan')  # a checkpoint of a run that diverged
    torch.save({'state_dict': state, 'meta': {}}, tmp_path / 'nan.pth')
    with pytest.raises(ValueError, match=rf"nan.pth: 1 tensors hold NaN or infinite values \(first: \['{name}'\]\)"):
        build(tiny, pretrained_pth=str(tmp_path / 'nan.pth'))
    torch.save({'state_dict': {'nope.weight': torch.zeros(1)}}, tmp_path / 'bad.pth')
    with pytest.raises(ValueError, match=r"bad.pth: 1 keys do not belong to this model .*nope.weight"):
        build(tiny, pretrained_pth=str(tmp_path / 'bad.pth'))


def test_lora_after_full_fine_tuning_starts_from_its_weights(tiny, batch, tmp_path):
    """A full fine-tuning checkpoint loads into a LoRA-wrapped LLM (its weights become the base layers'): the
    LoRA model, adapters still zero, computes what the fine-tuned model computes."""
    torch.manual_seed(2)
    full = build(tiny, freeze_llm=False).eval()
    with torch.no_grad():
        for p in full.language_model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    path = tmp_path / 'iter_1.pth'
    torch.save({'state_dict': full.state_dict(), 'meta': {}}, path)
    lora = build(tiny, pretrained_pth=str(path), llm_lora=dict(r=4, lora_alpha=8, target_modules='all-linear'))
    with torch.no_grad():
        assert (full(batch, mode='tensor') - lora.eval()(batch, mode='tensor')).abs().max() < 1e-5


def test_start_from_official_checkpoint(tiny, batch, tmp_path):
    torch.manual_seed(1)
    model = build(tiny).eval()
    with torch.no_grad():
        for p in model.mlp1.parameters():
            p.normal_(0, 0.2)
    write_official(model, tmp_path / 'official')
    again = VisionLanguageModel(official_checkpoint=str(tmp_path / 'official'), torch_dtype='float32').eval()
    assert again.img_context_token_id == model.img_context_token_id
    with torch.no_grad():
        a = model(batch, mode='tensor')
        b = again(batch, mode='tensor')
    assert (a - b).abs().max() < 1e-5


def test_bad_arguments(tiny, tmp_path):
    with pytest.raises(Refused, match='either official_checkpoint or vision_encoder'):
        VisionLanguageModel(official_checkpoint=str(tmp_path), llm=tiny['llm'])
    with pytest.raises(Refused, match='needs vision_encoder and llm'):
        VisionLanguageModel(llm=tiny['llm'])
    with pytest.raises(Refused, match='unknown dtype'):
        build(tiny, torch_dtype='float8')
    with pytest.raises(Refused, match=r"unknown attn_implementation 'flex'; use one of .*'flex_attention'"):
        build(tiny, attn_implementation='flex')
    with pytest.raises(FileNotFoundError, match='no config.json'):
        VisionLanguageModel(official_checkpoint=str(tmp_path))


@pytest.mark.parametrize('old', ['object', 'xtuner_plugins.models.InternVLModel',
                                 'xtuner_plugins.models.internvl.InternVLModel'])
def test_old_class_name_still_builds(tiny, old):
    """Configs written before the rename name ``InternVLModel``: as the class object, or as the dotted path
    a dumped work-dir config holds (MMEngine writes the path it was imported by). Both the runner's way
    (``MODELS.build``, a dotted type resolved by import) and the converter's (``build_for_export``) build
    the model."""
    from mmengine.config import Config
    from mmengine.registry import MODELS

    from xtuner_plugins.models.export.build import build_for_export
    if old == 'object':
        from xtuner_plugins.models import InternVLModel as old
    cfg = Config(dict(model=dict(type=old, vision_encoder=tiny['internvit'], llm=tiny['llm'],
                                 torch_dtype='float32')))
    assert type(MODELS.build(cfg.model)) is VisionLanguageModel
    assert type(build_for_export(cfg, None, torch.float32, log=lambda message: None)) is VisionLanguageModel


@pytest.mark.parametrize('kw', [{}, dict(llm_lora=dict(r=4, lora_alpha=8)),
                                dict(llm_lora=dict(r=4, lora_alpha=8), llm_quantization=dict(load_in_4bit=True))])
def test_runner_init_weights_changes_nothing(tiny, kw):
    """MMEngine's runner calls model.init_weights() before training; it must not redraw loaded weights."""
    model = build(tiny, **kw)
    before = {k: v.detach().clone() for k, v in super(VisionLanguageModel, model).state_dict().items()}
    model.init_weights()
    after = super(VisionLanguageModel, model).state_dict()
    assert [k for k in before if not torch.equal(before[k], after[k])] == []


def test_loss_reduction_setting(tiny, batch):
    from xtuner_plugins.models.loss import causal_lm_loss
    model = build(tiny, loss_reduction='square').eval()
    assert model.llm_keeps_logits   # the loss below takes the logits of supervised positions only
    with torch.no_grad():
        logits = model(batch, mode='tensor')
        assert model(batch, mode='loss')['loss'].item() == pytest.approx(
            causal_lm_loss(logits, batch['labels'], 'square').item(), rel=1e-6)
        assert causal_lm_loss(logits, batch['labels'], 'square').item() != pytest.approx(
            causal_lm_loss(logits, batch['labels'], 'token').item(), rel=1e-4)
    with pytest.raises(Refused, match="unknown loss_reduction 'mean'"):
        build(tiny, loss_reduction='mean')


def test_lora_loss_keeps_supervised_logits_only(tiny, batch):
    from xtuner_plugins.models.loss import causal_lm_loss
    model = build(tiny, llm_lora=dict(r=4, lora_alpha=8)).eval()
    assert model.llm_keeps_logits   # through PEFT's wrapper, the base model's forward is asked
    with torch.no_grad():
        assert model(batch, mode='loss')['loss'].item() == pytest.approx(
            causal_lm_loss(model(batch, mode='tensor'), batch['labels']).item(), rel=1e-6)


@pytest.mark.parametrize('kw', [dict(freeze_llm=False, llm_grad_ckpt=True),
                                dict(llm_lora=dict(r=4, lora_alpha=8)),
                                dict(freeze_llm=False, attn_implementation='sdpa_segments', packed=True)],
                         ids=['full+ckpt', 'lora', 'packed'])
def test_loss_chunk_gives_the_loss_and_gradients_of_whole_logits(tiny, batch, kw):
    """loss_chunk=2: the decoder's hidden states through the LM head and the loss two supervised positions at a
    time (no [B, K, V] logits) give what the whole logits give: the loss and every trained gradient."""
    from tests.models.test_packing import split_batch
    from xtuner_plugins.data import internvl_collate_fn
    from xtuner_plugins.data.packing import pack_items
    kw = dict(kw)
    data = internvl_collate_fn([pack_items(split_batch(batch))])['data'] if kw.pop('packed', False) else batch
    results = []
    for chunk in (0, 2):
        torch.manual_seed(0)
        model = build(tiny, loss_reduction='square', loss_chunk=chunk, **kw).eval()
        loss = model(data, mode='loss')['loss']
        loss.backward()
        results.append((loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}))
    (whole, whole_grads), (chunked, chunked_grads) = results
    assert chunked == pytest.approx(whole, rel=1e-6)
    assert whole_grads.keys() == chunked_grads.keys() and any(g.abs().max() > 0 for g in whole_grads.values())
    for name, grad in whole_grads.items():
        torch.testing.assert_close(chunked_grads[name], grad, rtol=1e-4, atol=1e-6, msg=lambda m: f'{name}: {m}')
    with pytest.raises(Refused, match='loss_chunk must be an integer >= 0'):
        build(tiny, loss_chunk=-1)


def test_cudnn_attention_is_off_unless_asked_for(tiny):
    """Building the model turns PyTorch's cuDNN SDPA backend off (it builds kernels for every new sequence
    length); ``cudnn_attention=True`` leaves it as it was."""
    before = torch.backends.cuda.cudnn_sdp_enabled()
    try:
        torch.backends.cuda.enable_cudnn_sdp(True)
        build(tiny, cudnn_attention=True)
        assert torch.backends.cuda.cudnn_sdp_enabled()
        build(tiny)
        assert not torch.backends.cuda.cudnn_sdp_enabled()
    finally:
        torch.backends.cuda.enable_cudnn_sdp(before)
