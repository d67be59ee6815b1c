"""Loss reductions on hand-computed values, and the global denominator across two gloo ranks."""

import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from xtuner_plugins.models.loss import causal_lm_loss, chunked_causal_lm_loss, supervised_positions, token_weights

IGN = -100


def two_class_batch(margins):
    """Vocabulary of 2; each supervised token has logits [0, m] and label 1, so its CE is log(1 + e^-m).
    `margins[i]` lists the margins of sample i's supervised tokens (labels shifted by one, as the loss does)."""
    length = max(len(m) for m in margins) + 1
    logits = torch.zeros(len(margins), length, 2)
    labels = torch.full((len(margins), length), IGN)
    for i, ms in enumerate(margins):
        for j, m in enumerate(ms):
            logits[i, j, 1] = m
            labels[i, j + 1] = 1
    return logits, labels


def ce(m):
    return math.log1p(math.exp(-m))


MARGINS = [[0.0], [1.0, 2.0, 3.0, 4.0]]  # a 1-token answer and a 4-token answer


def test_token_mean():
    logits, labels = two_class_batch(MARGINS)
    expected = sum(ce(m) for ms in MARGINS for m in ms) / 5
    assert causal_lm_loss(logits, labels, 'token').item() == pytest.approx(expected, rel=1e-6)


def test_sample_mean():
    logits, labels = two_class_batch(MARGINS)
    expected = (ce(0.0) + sum(ce(m) for m in MARGINS[1]) / 4) / 2
    assert causal_lm_loss(logits, labels, 'sample').item() == pytest.approx(expected, rel=1e-6)


def test_square_averaging():
    logits, labels = two_class_batch(MARGINS)
    # weights 1 / sqrt(1) for the first sample's token, 1 / sqrt(4) = 0.5 for each of the second's
    expected = (1.0 * ce(0.0) + 0.5 * sum(ce(m) for m in MARGINS[1])) / (1.0 + 4 * 0.5)
    assert causal_lm_loss(logits, labels, 'square').item() == pytest.approx(expected, rel=1e-6)


def test_weights_and_errors():
    mask = torch.tensor([[1, 0, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    assert token_weights(mask, 'square').tolist() == [[1, 0, 0, 0], [0.5, 0.5, 0.5, 0.5]]
    with pytest.raises(ValueError, match="unknown loss reduction 'mean'"):
        token_weights(mask, 'mean')
    logits, labels = two_class_batch([[1.0]])
    with pytest.raises(ValueError, match='no supervised token'):
        causal_lm_loss(logits, torch.full_like(labels, IGN))


@pytest.mark.parametrize('reduction', ['token', 'sample', 'square'])
def test_logits_of_supervised_positions_only(reduction):
    """The model computes logits at supervised positions only; the loss must be the one of all logits, packed
    rows (segments) included, gradients too."""
    torch.manual_seed(0)
    logits = torch.randn(2, 9, 5, requires_grad=True)
    labels = torch.full((2, 9), IGN)
    labels[0, [2, 3, 7]] = torch.tensor([1, 4, 0])
    labels[1, [3, 8]] = torch.tensor([2, 2])
    segments = torch.tensor([[0, 0, 0, 0, 1, 1, 1, 1, -1], [0, 0, 0, 0, 0, 0, 0, 0, 0]])
    positions = supervised_positions(labels)
    assert positions.tolist() == [1, 2, 6, 7]   # a position p predicts token p + 1
    for segs in (None, segments):
        full = causal_lm_loss(logits, labels, reduction, segments=segs)
        grad_full, = torch.autograd.grad(full, logits)
        kept = causal_lm_loss(logits[:, positions], labels, reduction, segments=segs, positions=positions)
        grad_kept, = torch.autograd.grad(kept, logits)
        assert kept.item() == pytest.approx(full.item(), rel=1e-6)
        assert torch.allclose(grad_kept, grad_full, atol=1e-7)
    with pytest.raises(ValueError, match='3 positions of logits for 4 positions'):
        causal_lm_loss(logits[:, :3], labels, reduction, positions=positions)


@pytest.mark.parametrize('reduction', ['token', 'sample', 'square'])
def test_chunked_head_and_loss_equal_the_whole_logits(reduction):
    """loss_chunk: the LM head and the cross-entropy a few supervised positions at a time (each chunk recomputed
    in the backward) give the loss and the gradients (hidden states and head) of the whole logits, packed rows
    and chunks that split a sample included."""
    torch.manual_seed(0)
    head = torch.nn.Linear(6, 11, bias=False)
    hidden = torch.randn(2, 9, 6, requires_grad=True)
    labels = torch.full((2, 9), IGN)
    labels[0, [2, 3, 7]] = torch.tensor([1, 4, 0])
    labels[1, [3, 4, 8]] = torch.tensor([2, 2, 9])
    segments = torch.tensor([[0, 0, 0, 0, 1, 1, 1, 1, -1], [0, 0, 0, 0, 0, 0, 0, 0, 0]])
    positions = supervised_positions(labels)
    for segs in (None, segments):
        full = causal_lm_loss(head(hidden), labels, reduction, segments=segs)
        grads_full = torch.autograd.grad(full, (hidden, head.weight))
        for chunk in (1, 2, 100):
            for pos in (positions, None):   # the supervised positions, or every one
                h = hidden[:, positions] if pos is not None else hidden
                loss = chunked_causal_lm_loss(h, head, labels, chunk, reduction, segments=segs, positions=pos)
                grads = torch.autograd.grad(loss, (hidden, head.weight))
                assert loss.item() == pytest.approx(full.item(), rel=1e-6), (chunk, pos)
                assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(grads, grads_full)), (chunk, pos)
    with pytest.raises(ValueError, match='chunk must be >= 1, got 0'):
        chunked_causal_lm_loss(hidden, head, labels, 0)


def _rank(rank, world, port, reduction, shards, out_dir):
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    dist.init_process_group('gloo', rank=rank, world_size=world)
    logits, labels = two_class_batch(shards[rank])
    logits.requires_grad_(True)
    causal_lm_loss(logits, labels, reduction).backward()
    torch.save(logits.grad, os.path.join(out_dir, f'grad{rank}.pt'))
    dist.destroy_process_group()


@pytest.mark.parametrize('reduction', ['token', 'square'])
def test_global_denominator_across_ranks(reduction, tmp_path):
    """Rank 0 holds a 1-token sample, rank 1 a 4-token one. The gradients averaged over ranks (what DDP and
    DeepSpeed do) must equal the gradients of the loss of the whole batch computed in one process."""
    from tests.train_utils import free_port
    shards = [[MARGINS[0]], [MARGINS[1]]]
    mp.spawn(_rank, args=(2, free_port(), reduction, shards, str(tmp_path)), nprocs=2, join=True)
    grads = [torch.load(tmp_path / f'grad{r}.pt') for r in range(2)]
    logits, labels = two_class_batch(MARGINS)
    logits.requires_grad_(True)
    causal_lm_loss(logits, labels, reduction).backward()
    # rank r's sample is row r of the whole batch; averaging over 2 ranks halves each rank's gradient
    for r in range(2):
        width = grads[r].shape[1]
        assert torch.allclose(grads[r][0] / 2, logits.grad[r, :width], atol=1e-6), (r, grads[r], logits.grad)


@pytest.mark.parametrize('name,value', [('final_logit_softcapping', 30.0), ('logit_scale', 0.0625),
                                        ('logits_scaling', 8.0), ('lm_head_multiplier', 0.5)])
def test_a_loss_that_runs_the_head_itself_refuses_logits_transformed_after_it(name, value):
    """Gemma-2's soft-capping, Cohere's logit scale, Granite's logits_scaling and Falcon-H1's lm_head_multiplier
    come after the LM head in the model's own forward: the chunked and the fused loss, which run the head themselves,
    would leave them out (a Granite trained at loss_chunk=64 on a loss of 20.3 where its own was 6.7, found by a
    helper's sweep). The refusal names the setting that asked for such a loss, and how to turn it off."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from xtuner_plugins.models.head import refuse_logit_transform
    from xtuner_plugins.models.loss import decoder_chunked_loss
    config = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2)
    llm = LlamaForCausalLM(config)
    refuse_logit_transform(llm, 'loss_chunk')   # the plain Llama: nothing to refuse
    setattr(llm.config, name, value)
    embeds, labels = torch.randn(1, 4, 16), torch.tensor([[-100, 3, 4, 5]])
    with pytest.raises(ValueError, match=rf'^loss_chunk: .*{name}={value}.*use loss_chunk=0$'):
        decoder_chunked_loss(llm, embeds, labels, supervised_positions(labels), chunk=2)
    with pytest.raises(ValueError, match=rf"^liger_kernel's 'fused_loss': .*{name}.*leave 'fused_loss' out of"):
        decoder_chunked_loss(llm, embeds, labels, supervised_positions(labels), chunk=0, fused=True)


def test_the_compiled_cross_entropy_gives_eager_losses_and_gradients_without_compiling_again():
    """weighted_ce(compiled=True) (the model's, where it compiles its LLM's blocks): the loss and the gradients of
    the eager cross-entropy, bf16 logits as the LLM gives them and fp32, whole and chunked, packed rows' weights;
    new numbers of supervised tokens reuse the graph (a count of one aside, which torch specialises)."""
    from xtuner_plugins.models.compile import compiled_graphs, reset_compiled
    reset_compiled()
    torch.manual_seed(0)
    head = torch.nn.Linear(6, 50, bias=False)
    counts = []
    for n, dtype in ((9, torch.float32), (14, torch.bfloat16), (5, torch.float32), (11, torch.bfloat16),
                     (23, torch.float32), (17, torch.float32)):
        logits = (torch.randn(1, n, 50) * 4).to(dtype).requires_grad_()
        labels = torch.randint(0, 50, (1, n))
        labels[0, ::3] = IGN
        segments = torch.cat([torch.zeros(n // 2, dtype=torch.long), torch.ones(n - n // 2, dtype=torch.long)])[None]
        for reduction in ('token', 'square'):
            eager = causal_lm_loss(logits, labels, reduction, segments=segments)
            grad, = torch.autograd.grad(eager, logits)
            compiled = causal_lm_loss(logits, labels, reduction, segments=segments, compiled=True)
            grad_c, = torch.autograd.grad(compiled, logits)
            assert compiled.item() == pytest.approx(eager.item(), rel=1e-5), (n, dtype, reduction)
            torch.testing.assert_close(grad_c, grad, rtol=1e-2 if dtype == torch.bfloat16 else 1e-5, atol=1e-6)
        hidden = torch.randn(1, n, 6, requires_grad=True)
        whole = causal_lm_loss(head(hidden), labels)
        chunked = chunked_causal_lm_loss(hidden, head, labels, 4, compiled=True)
        assert chunked.item() == pytest.approx(whole.item(), rel=1e-5)
        for a, b in zip(torch.autograd.grad(chunked, (hidden, head.weight)),
                        torch.autograd.grad(whole, (hidden, head.weight))):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
        counts.append(compiled_graphs())
    assert counts[0] > 0 and counts[-1] == counts[1], counts


def test_the_chunked_loss_finds_the_decoder_of_a_gpt2():
    """GPT-2's get_decoder() gives the whole causal LM back (an AttributeError: no last_hidden_state); its decoder
    is its base_model_prefix module, transformer. The chunked loss is its own forward's."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from xtuner_plugins.models.loss import decoder_chunked_loss
    llm = GPT2LMHeadModel(GPT2Config(vocab_size=32, n_embd=16, n_layer=1, n_head=2)).eval()
    embeds, labels = torch.randn(1, 6, 16), torch.tensor([[-100, 3, 4, 5, -100, 7]])
    with torch.no_grad():
        loss, aux = decoder_chunked_loss(llm, embeds, labels, supervised_positions(labels), chunk=2)
        own = llm(inputs_embeds=embeds, labels=labels).loss
    assert aux is None and loss.item() == pytest.approx(own.item(), rel=1e-5)

