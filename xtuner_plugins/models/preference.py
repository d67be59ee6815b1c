"""Preference losses: sigmoid DPO, BCO pair, an SFT term on the chosen answer, and their weighted sum (MPO).

The losses of preference training (``VisionLanguageModel(preference=...)`` runs them on a batch of pairs). All work
on per-sequence sums of the answer tokens' log-probabilities:

* :func:`sequence_logps`: ``sum log p(answer token)`` per row (per sample of packed rows) and the number of
  answer tokens, from logits and labels laid out as in SFT (``-100`` where not supervised; position ``t``
  predicts label ``t + 1``).
* :func:`preference_losses`: with ``chosen/rejected`` log-ratios ``r = logp - ref_logp`` (the implicit rewards
  are ``beta * r``):

  - ``sigmoid`` (DPO, Rafailov et al. 2023): ``-log sigmoid(beta * (r_chosen - r_rejected))``;
  - ``bco_pair`` (BCO on pairs, as TRL defines it): ``-log sigmoid(beta * r_chosen - delta)
    - log sigmoid(-(beta * r_rejected - delta))``, ``delta`` the running mean (over steps, and over ranks
    when distributed) of the batch's mean reward, updated with this batch first;
  - ``sft``: the chosen answers' mean negative log-likelihood per token (TRL's ``rpo_alpha`` term);

  each averaged over the pairs, then summed with ``weights``. InternVL 2.5's MPO is
  ``types=('sigmoid', 'bco_pair', 'sft'), weights=(0.8, 0.2, 1.0), beta=0.1``.

* :func:`pair_loss`: the model's loss on a batch of pairs (the policy's and the reference's log-probabilities,
  then :func:`preference_losses`); the LM head runs at the answers' positions only (``logits_to_keep``: a row's
  image and prompt need no logits), and a tower that is not trained runs once per pair (:func:`pair_features`:
  both answers carry the same tiles); :func:`check_setting`: which trained parts each reference policy allows.
* :func:`frozen_copies`: the reference policy of full fine-tuning: a frozen copy of each trained part (the
  usual choice, TRL's ``ref_model`` as InternVL's MPO scripts use it), in the pretrained weights' dtype; its
  memory cost is measured by ``benchmarks/bench_memory.py`` (stages ``dpo_lora`` and ``mpo_full``).

Hand-written: the pinned set has no TRL, and TRL's trainer is not an MMEngine model; the formulas are short.
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

import copy

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from xtuner_plugins.data.template import IGNORE_INDEX
from xtuner_plugins.errors import Refused

from .attention import SEGMENTED, llm_attention, packed_rows, sample_index, segment_bounds, sliding_window
from .cpu_attention import as_sdpa
from .loss import supervised_positions
from .moe import no_router_logits, real_tokens, routed_logits

__all__ = ['LOSS_TYPES', 'MPO', 'RunningMean', 'check_losses', 'check_setting', 'frozen_copies', 'pair_features',
           'pair_loss', 'preference_losses', 'reward_accuracy', 'sequence_logps']

LOSS_TYPES = ('sigmoid', 'bco_pair', 'sft')
MPO = dict(types=('sigmoid', 'bco_pair', 'sft'), weights=(0.8, 0.2, 1.0), beta=0.1)


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor, segments: Optional[torch.Tensor] = None,
                   positions: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(sum of the supervised tokens' log-probabilities, their count)`` in fp32: one per row, or, for packed
    rows (``segments [R, L]``: sample ids within each row, -1 on padding), one per sample, row after row.
    ``positions``: ``logits [R, K, V]`` are those of these ``K`` positions only (:func:`supervised_positions`,
    the LLM's ``logits_to_keep``), each predicting the next token."""
    if positions is None:
        logits, targets, after = logits[:, :-1].float(), labels[:, 1:], slice(1, None)
    else:
        if logits.shape[1] != positions.numel():
            raise ValueError(f'{logits.shape[1]} positions of logits for {positions.numel()} positions')
        after = positions.to(labels.device) + 1
        logits, targets = logits.float(), labels[:, after]
    mask = targets != IGNORE_INDEX
    token_logps = torch.gather(logits.log_softmax(-1), 2, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask
    if segments is None:
        return token_logps.sum(-1), mask.sum(-1)
    index, per_row = sample_index(segments.to(targets.device))
    index = index[:, after].flatten()                            # label t + 1 belongs to its sample
    keep = index >= 0
    samples = int(per_row.sum())
    sums = token_logps.new_zeros(samples).index_add(0, index[keep], token_logps.flatten()[keep])
    counts = mask.new_zeros(samples, dtype=torch.long).index_add(0, index[keep], mask.flatten()[keep].long())
    return sums, counts


class RunningMean:
    """The mean of every value seen so far (each step's batch-mean reward, all ranks' when distributed)."""

    def __init__(self):
        self.mean, self.count = 0.0, 0

    @torch.no_grad()
    def update(self, value: torch.Tensor) -> float:
        values = value.detach().float().reshape(1)
        if dist.is_available() and dist.is_initialized():
            gathered = [torch.zeros_like(values) for _ in range(dist.get_world_size())]
            dist.all_gather(gathered, values)
            values = torch.cat(gathered)
        for v in values.tolist():
            self.count += 1
            self.mean += (v - self.mean) / self.count
        return self.mean


def reward_accuracy(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> torch.Tensor:
    """The fraction of pairs whose chosen answer has the higher reward, a tie counting half: a policy that is
    still its reference (every reward 0) scores 0.5, chance, not 0."""
    won = (chosen_rewards > rejected_rewards).float() + 0.5 * (chosen_rewards == rejected_rewards).float()
    return won.detach().mean()


def preference_losses(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, ref_chosen_logps: torch.Tensor,
                      ref_rejected_logps: torch.Tensor, beta: float, types: Sequence[str] = ('sigmoid',),
                      weights: Optional[Sequence[float]] = None, chosen_nll: Optional[torch.Tensor] = None,
                      running: Optional[RunningMean] = None) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """``(the weighted loss, metrics)``; the metrics hold each term (``term_<type>``), the rewards and their
    margin and accuracy, and the policy's log-probabilities (see the module docstring)."""
    weights = [1.0] * len(types) if weights is None else list(weights)
    unknown = [t for t in types if t not in LOSS_TYPES]
    if unknown or len(weights) != len(types):
        raise Refused(f'preference loss types {list(types)} with weights {weights}: use types from {LOSS_TYPES} '
                      f'and one weight each')
    chosen_r, rejected_r = chosen_logps - ref_chosen_logps, rejected_logps - ref_rejected_logps
    chosen_rewards, rejected_rewards = beta * chosen_r, beta * rejected_r
    metrics: Dict[str, torch.Tensor] = {}
    total = chosen_logps.new_zeros(())
    for kind, weight in zip(types, weights):
        if kind == 'sigmoid':
            term = -F.logsigmoid(beta * (chosen_r - rejected_r)).mean()
        elif kind == 'bco_pair':
            if running is None:
                raise ValueError("the 'bco_pair' loss needs a RunningMean (its reward baseline)")
            delta = running.update(torch.cat([chosen_rewards, rejected_rewards]).mean())
            term = (-F.logsigmoid(chosen_rewards - delta) - F.logsigmoid(-(rejected_rewards - delta))).mean()
        else:
            if chosen_nll is None:
                raise ValueError("the 'sft' loss needs chosen_nll (the chosen answers' mean NLL per token)")
            term = chosen_nll
        metrics[f'term_{kind}'] = term.detach()  # not 'loss_...': MMEngine sums every logged key holding 'loss'
        total = total + weight * term
    metrics.update(rewards_chosen=chosen_rewards.detach().mean(), rewards_rejected=rejected_rewards.detach().mean(),
                   rewards_margin=(chosen_rewards - rejected_rewards).detach().mean(),
                   rewards_accuracy=reward_accuracy(chosen_rewards, rejected_rewards),
                   logps_chosen=chosen_logps.detach().mean(), logps_rejected=rejected_logps.detach().mean())
    return total, metrics


#: the modules whose weights autocast casts to its dtype before computing (matrix products); the others (norms,
#: embeddings) and the buffers (rotary frequencies) compute in the dtype they are stored in
AUTOCAST_CAST = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def kept_as_stored(module: nn.Module) -> set:
    """The ids of ``module``'s parameters autocast computes with as stored: those of a module it does not cast
    (:data:`AUTOCAST_CAST`'s), a weight tied to one (an LM head tied to its embedding) too."""
    return {id(p) for m in module.modules() if not isinstance(m, AUTOCAST_CAST) for p in m.parameters(recurse=False)}


def autocast_alike(part: nn.Module, dtype: torch.dtype) -> nn.Module:
    """``part`` with the weights that autocast would cast (:data:`AUTOCAST_CAST`'s) in ``dtype``, and the rest
    (norms, embeddings, a weight tied to an embedding, buffers) left as they are: a copy of an fp32 trained part
    so made computes under ``dtype`` autocast what the part computes, bit for bit (a copy all in bf16 rounded the
    norms, the embeddings and the rotary frequencies that the policy keeps in fp32: the DPO term of full MPO in
    bf16 started at 0.6931080, not log 2), for the memory of its matrices in ``dtype``."""
    kept = kept_as_stored(part)
    for module in part.modules():
        if isinstance(module, AUTOCAST_CAST):
            for param in module.parameters(recurse=False):
                if id(param) not in kept and param.is_floating_point():
                    param.data = param.data.to(dtype)
    return part


def frozen_copies(parts: Dict[str, nn.Module], dtype: torch.dtype) -> nn.ModuleDict:
    """Frozen copies (no gradients, eval mode) of ``parts``, equal to them now, whatever they become: their
    matrices in ``dtype``, the rest in the part's own dtype (:func:`autocast_alike`: fp32 trained parts under bf16
    autocast compute as their copies do).

    A part whose weights DeepSpeed ZeRO-3 partitioned while it was built (``zero.Init``: a Hugging Face model
    loaded on GPUs under ``--deepspeed deepspeed_zero3``) cannot be deep-copied (its tensors are empty shards
    tied to DeepSpeed's bookkeeping): its copy is built partitioned from the same config and filled one gathered
    tensor at a time. Otherwise the part is deep-copied; DeepSpeed then partitions the copy with the rest of the
    model when the engine starts (ZeRO-3), and every rank runs the reference forward on every step.
    """
    from .zero3 import gathered, hf_zero3_init, is_zero3_partitioned
    copies = nn.ModuleDict()
    for name, part in parts.items():
        if not any(is_zero3_partitioned(p) for p in part.parameters()):
            copies[name] = autocast_alike(copy.deepcopy(part), dtype)
        elif hasattr(type(part), '_from_config'):
            from transformers.modeling_utils import no_init_weights
            with hf_zero3_init(True), no_init_weights():  # every weight is overwritten below
                twin = type(part)._from_config(part.config, torch_dtype=dtype)
            mine, theirs = dict(twin.named_parameters()), dict(part.named_parameters())
            if mine.keys() != theirs.keys():
                raise ValueError(f'the reference copy of {name} has other parameters than it: '
                                 f'{sorted(mine.keys() ^ theirs.keys())[:8]}')
            with torch.no_grad():
                for key, param in mine.items():
                    with gathered([param, theirs[key]], modify=True):
                        param.copy_(theirs[key].to(param.dtype))
                theirs = dict(part.named_buffers())
                for key, buffer in twin.named_buffers():
                    buffer.copy_(theirs[key])
            copies[name] = twin
        else:
            raise Refused(f'{name} ({type(part).__name__}) was partitioned by DeepSpeed ZeRO-3 while it was built '
                          f'and is not a Hugging Face model: no frozen reference copy can be made of it')
    return copies.requires_grad_(False).eval()


def check_setting(llm_lora: Optional[dict], vision_lora: Optional[dict], frozen: bool,
                  preference: Optional[dict] = None) -> None:
    """Refuse a ``preference=`` setting whose loss cannot be computed (its keys and values, checked here, before
    anything loads: a missing ``beta`` was a TypeError at the first step, a negative one flipped the preference
    without a word) or whose reference policy cannot be built: with ``llm_lora`` the reference is the model with
    its LLM's adapters off, so nothing else may train; without it the reference is a frozen copy of the trained
    parts, so something must train (``frozen``: the LLM, projector and tower all frozen)."""
    if preference is not None:
        check_losses(preference)
    if llm_lora is not None and (not frozen or vision_lora is not None):
        raise Refused('preference training with llm_lora needs the LLM, projector and vision tower frozen and '
                      'no vision_lora (the reference policy is the model with its LLM adapters off); for '
                      'full preference training (a frozen copy as the reference) leave out llm_lora')
    if llm_lora is None and (vision_lora is not None or frozen):
        raise Refused('full preference training (the reference policy a frozen copy of the trained parts) '
                      'needs something trained (freeze_llm, freeze_projector or freeze_vision False) and no '
                      'vision_lora')


def check_losses(preference) -> None:
    """Refuse (:class:`~xtuner_plugins.errors.Refused`) a ``preference=`` dict that :func:`preference_losses`
    cannot take: keys other than ``beta``, ``types`` and ``weights``; no ``beta`` or one not a finite number > 0;
    ``types`` not a non-empty list of :data:`LOSS_TYPES` or naming one twice; ``weights`` not one finite number
    each, a negative one (it trains towards the rejected answers, as a negative ``beta`` would) or all 0."""
    import math
    example = "e.g. dict(beta=0.1) (DPO), or MPO's dict(types=('sigmoid', 'bco_pair', 'sft'), weights=(0.8, 0.2, " \
              "1.0), beta=0.1)"
    if not isinstance(preference, dict):
        raise Refused(f'preference must be a dict, got {type(preference).__name__}: {example}')
    unknown = sorted(set(preference) - {'beta', 'types', 'weights'})
    if unknown:
        raise Refused(f'preference: {", ".join(map(repr, unknown))} not known (its keys: beta, types, weights; '
                      f'types {LOSS_TYPES}): {example}')
    beta = preference.get('beta')
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not math.isfinite(beta) or beta <= 0:
        raise Refused(f'preference: beta must be a number > 0 (how far the policy may move from the reference; '
                      f'a negative one prefers the rejected answers), got {beta!r}: {example}')
    types = preference.get('types', ('sigmoid',))
    if isinstance(types, str) or not isinstance(types, (list, tuple)) or not types \
            or any(t not in LOSS_TYPES for t in types):
        raise Refused(f'preference: types must be a non-empty list of {LOSS_TYPES}, got {types!r}: {example}')
    weights = preference.get('weights')
    if weights is not None and (isinstance(weights, str) or not isinstance(weights, (list, tuple))
                                or len(weights) != len(types)
                                or any(isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w)
                                       for w in weights)):
        raise Refused(f'preference: weights must be one number for each of types {list(types)}, got {weights!r}')
    twice = sorted({t for t in types if list(types).count(t) > 1})
    if twice:
        raise Refused(f'preference: types {list(types)} name {", ".join(map(repr, twice))} more than once (its '
                      f'term would count once per mention): name each type once, its weight saying how much')
    if weights is not None and any(w < 0 for w in weights):
        raise Refused(f'preference: weights must be >= 0, got {list(weights)} for types {list(types)} (a negative '
                      f'one trains the opposite way: the policy learns to prefer the rejected answers)')
    if weights is not None and not any(w > 0 for w in weights):
        raise Refused(f'preference: weights {list(weights)} for types {list(types)} are all 0: nothing would be '
                      f'learned (the loss is 0 and has no gradient)')


def pair_features(model, pixel_values: torch.Tensor) -> Optional[torch.Tensor]:
    """The vision tower's features of a batch of pairs, made once: both answers of a pair carry copies of the
    same tiles (``preference_collate_fn``: the chosen rows' tiles, then the same again for the rejected rows), so
    a tower that is not trained runs on the first half and its features serve both halves (and the reference's
    forward, whose tower is this one). None, and each row's tiles run as in SFT, for a trained tower (vision LoRA or
    full; drop-path draws its own masks per run) or tiles whose halves differ."""
    if any(p.requires_grad for p in model.vision_model.parameters()):
        return None
    half, odd = divmod(pixel_values.shape[0], 2)
    if odd or not torch.equal(pixel_values[:half], pixel_values[half:]):
        return None
    features = model.tower_features(pixel_values[:half])
    return torch.cat([features, features])


def _policy_and_reference(model, data, embeds, features, positions, segments, kwargs):
    """``(policy logits, its router load-balancing loss or None, reference logits)`` of a batch of pairs: the
    reference is the LLM with its adapters off (LoRA) or the frozen copies in ``model.reference``, without gradients;
    a mixture-of-experts policy's routing is balanced over both answers' tokens (``moe.py``)."""
    llm, router = model.language_model, getattr(model, 'router', None)
    if router is not None and router.coef > 0:
        logits, aux = routed_logits(llm, embeds, positions, router, real_tokens(data, segments), **kwargs)
    else:
        logits, aux = llm(inputs_embeds=embeds, **kwargs).logits, None
    with torch.no_grad():
        if model.reference is None:
            with llm.disable_adapter():
                ref_logits = llm(inputs_embeds=embeds.detach(), **kwargs).logits
        else:
            ref_embeds = model.embed_inputs(data['input_ids'], data['pixel_values'], data['image_flags'],
                                            parts=model.reference, features=features)
            ref_logits = model.part('language_model', model.reference)(inputs_embeds=ref_embeds, **kwargs).logits
    return logits, aux, ref_logits


def pair_loss(model, data: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The preference loss of ``model`` (a ``VisionLanguageModel`` with ``preference=``) on a batch of pairs
    (``num_pairs`` chosen rows, then as many rejected rows; packed rows hold several pairs, row ``i`` and row
    ``num_pairs + i`` the same pairs in the same order) and its metrics; the reference log-probabilities come from
    the same forward with the LLM's adapters off (LoRA) or from the frozen copies in ``model.reference`` (full
    training)."""
    if model.preference is None:
        raise ValueError('a batch of preference pairs, but the model has no preference= setting')
    features = pair_features(model, data['pixel_values'])
    embeds = model.embed_inputs(data['input_ids'], data['pixel_values'], data['image_flags'], features=features)
    attention_mask, segments = llm_attention(data, embeds, as_sdpa(model.language_model.config._attn_implementation),
                                              sliding_window(model.language_model.config),
                                              getattr(model, 'llm_recurrent', None))
    rows, labels = int(data['num_pairs']), data['labels'].to(embeds.device)
    pairs = rows  # one pair per row, unless packed
    if segments is not None:  # packed: log-probs per sample; chosen rows must mirror rejected rows
        samples = sample_index(segments)[1]
        if not torch.equal(samples[:rows], samples[rows:]):
            raise ValueError(f'packed pairs: the chosen rows hold {samples[:rows].tolist()} samples but the '
                             f'rejected rows {samples[rows:].tolist()}; they must pack the same pairs alike')
        pairs = int(samples[:rows].sum())
    kwargs = dict(attention_mask=attention_mask, position_ids=data.get('position_ids'), use_cache=False,
                  return_dict=True, **no_router_logits(getattr(model, 'router', None)))
    if segments is not None and model.language_model.config._attn_implementation in SEGMENTED:
        kwargs['segment_bounds'] = segment_bounds(data['seq_lens'], embeds.shape[1])
    positions = None
    if model.llm_keeps_logits:   # the LM head at the answers' positions only: the image and prompt tokens, most
        # of a row, need no logits (with a 150k vocabulary those are most of the step's memory and LM-head FLOPs)
        positions = kwargs['logits_to_keep'] = supervised_positions(labels)
    with packed_rows('segment_bounds' in kwargs):
        logits, aux, ref_logits = _policy_and_reference(model, data, embeds, features, positions, segments, kwargs)
    logps, counts = sequence_logps(logits, labels, segments, positions)
    ref, _ = sequence_logps(ref_logits, labels, segments, positions)
    settings = dict(model.preference)
    types = tuple(settings.pop('types', ('sigmoid',)))
    if 'bco_pair' in types and model._reward_baseline is None:
        model._reward_baseline = RunningMean()
    nll = -logps[:pairs].sum() / counts[:pairs].sum().clamp(min=1)
    loss, metrics = preference_losses(logps[:pairs], logps[pairs:], ref[:pairs], ref[pairs:], types=types,
                                      chosen_nll=nll, running=model._reward_baseline, **settings)
    return dict(loss=loss, **metrics) if aux is None else dict(loss=loss, router_aux_loss=aux, **metrics)
