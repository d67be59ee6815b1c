"""Will it fit: per-device memory of a training config, and the largest sequence length and batch that fit.

Usage::

    python tools/plan.py CONFIG --gpus N --gpu-mem GiB [--vision NAME|DIR] [--llm NAME|DIR] [--zero 0|2|3]
        [--cfg-options key=value ...] [--dtype bf16|fp32] [--reserve GiB]

    python tools/plan.py configs/finetune_full.py --gpus 4 --gpu-mem 24 --zero 3 \
        --vision internvit-300m --llm qwen2.5-7b
    python tools/plan.py configs/finetune_lora.py --gpus 1 --gpu-mem 24 --llm models/Qwen2.5-0.5B-Instruct

The model is the config's own (``VisionLanguageModel``'s constructor: freezing, LoRA, QLoRA's 4-bit LLM, the
untied and resized embeddings, gradient checkpointing, attention implementation), built on the meta device from
the ``config.json`` files of its folders: no weight is read and nothing is allocated, so a plan for a 78B model
runs on a laptop. ``--vision`` and ``--llm`` replace ``model.vision_encoder`` and ``model.llm``: a folder holding
at least a ``config.json``, or the name of a published one shipped in ``xtuner_plugins/plan_configs`` (listed
below), so the question can be asked before any download. A ``model.pretrained_pth`` given gives the parts its stage
was trained with where the command line names none of them, as training takes them (``engine/previous_settings``).
Without a tokenizer in the LLM's folder the vocabulary is the published tokenizer's length (+ InternVL's tokens)
where known, else ``config.json``'s ``vocab_size``. The batch is the config's: ``batch_size`` rows of ``max_length``
tokens with ``max_dynamic_patch`` tiles (+ the thumbnail) per sample, or one pack of ``max_tokens`` tokens and
``max_tiles`` tiles for packed configs (preference configs: twice the rows, a pair being a chosen and a rejected
row, each with the pair's tiles); every text token counts as supervised (the worst case for the LM head's logits). A
bad number (on the command line or in the config's batch settings) is one line naming it, exit status 2.
``--zero 0`` is training without DeepSpeed (or DDP); 2 and 3 DeepSpeed's ZeRO stages over ``--gpus`` devices.
The dtype is the config's ``model.torch_dtype`` (``'auto'``: bf16, as on a GPU), or ``--dtype`` where the config
leaves it ``'auto'`` (the two differing: one line naming both). A config of another model than
``VisionLanguageModel`` (XTuner's own) is one line too.
How each part is counted: ``xtuner_plugins/planner.py`` (the activations: ``plan_activations.py``). The estimate
is of torch's own memory plus ``--reserve`` (CUDA context, fragmentation; default 1 GiB); leave some more headroom.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys

GIB = 2 ** 30
CHUNK_HINT = 1024   # supervised positions a row per chunk in the loss_chunk hint
MOST_GPUS = 2 ** 20   # devices a plan takes (10**20 with ZeRO-3 planned a run of that many)


def check_args(args) -> None:
    """The numbers on the command line: ValueError naming the option and its value."""
    if args.gpus < 1:
        raise ValueError(f'--gpus must be >= 1, got {args.gpus}')
    if args.gpus > MOST_GPUS:
        raise ValueError(f'--gpus {args.gpus} is past the most the planner takes ({MOST_GPUS:,} devices)')
    if not math.isfinite(args.gpu_mem) or args.gpu_mem <= 0:
        raise ValueError(f'--gpu-mem must be a finite number of GiB > 0, got {args.gpu_mem:g}')
    if not math.isfinite(args.reserve) or args.reserve < 0:
        raise ValueError(f'--reserve must be a finite number of GiB >= 0, got {args.reserve:g}')
    if args.reserve >= args.gpu_mem:
        raise ValueError(f'--reserve {args.reserve:g} GiB is all of --gpu-mem {args.gpu_mem:g} GiB: nothing is left '
                         'for training (the reserve is what torch does not count: about 1 GiB)')


@contextlib.contextmanager
def config_read(path: str):
    """Reading the config file ``path`` (MMEngine's ``Config.fromfile``): a file MMEngine fails on with a
    traceback is a ValueError of one line naming it (a .json/.yaml holding no mapping of settings, a ``_base_`` or
    ``read_base()`` chain leading back to a file in it, the two config styles mixed in one chain, an import of a
    module that is not there)."""
    if os.path.splitext(path)[1].lower() in ('.json', '.yaml', '.yml') and os.path.isfile(path):
        from mmengine.fileio import load
        try:
            data = load(path)
        except Exception as exc:   # (the parser's own error: the file's line and column)
            raise ValueError(f'{path}: not readable: {_first_line(exc)}') from None
        if not isinstance(data, dict):
            raise ValueError(f'{path} holds a {type(data).__name__}, not a mapping of settings (a training config '
                             f'is one: e.g. {{"model": {{...}}, "train_dataloader": {{...}}}})')
    try:
        yield
    except RecursionError:
        raise ValueError(f'{path}: its base configs (_base_ or read_base()) lead back to a file already in the chain '
                         '(a config naming itself, or two naming each other)') from None
    except RuntimeError as exc:
        from xtuner_plugins.cli.train_failures import lazy_call_hint
        if lazy_call_hint(exc):   # a call of what the config imports, as it is read
            raise ValueError(lazy_call_hint(exc)) from None
        if 'lazy_import' not in str(exc):
            raise
        raise ValueError(f'{path}: its chain of base configs mixes MMEngine\'s two config styles (_base_ = [...] '
                         'with a "with read_base():" config, or an import of a module beside _base_): use one style '
                         'throughout, e.g. "with read_base(): from .finetune_lora import *"') from None
    except ImportError as exc:
        from xtuner_plugins.cli.train_failures import config_import_hint
        hint = config_import_hint(exc, path)   # (training's words: a base imported by a package name)
        if hint:
            raise ValueError(hint) from None
        if not str(exc).startswith('Failed to import '):   # MMEngine's lazy import of the config's own import
            raise
        raise ValueError(f'{path}: {_first_line(exc)}') from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def plan_reads(cfg) -> set:
    """The ``--cfg-options`` keys of the batch settings plan reads and checks itself (``plan_configs.batch``),
    at their places in ``cfg``: a bad value there is said in its own words; these keys anywhere else are checked
    as every other key is."""
    from xtuner_plugins.models.runconfig import inner_dataset
    loader = cfg.get('train_dataloader')
    dataset = loader.get('dataset') if isinstance(loader, dict) else None
    _, key = inner_dataset(dataset)
    reads = {'train_dataloader.batch_size', f'{key}.max_length', f'{key}.max_dynamic_patch'}
    if isinstance(dataset, dict) and 'max_tokens' in dataset:
        reads |= {'train_dataloader.dataset.max_tokens', 'train_dataloader.dataset.max_tiles'}
    return reads


def check_parts(cfg, config: str) -> None:
    """The config's model, data loader (and its data set) and optimizer wrapper are dicts of settings."""
    lacking = [key for key in ('model', 'train_dataloader', 'optim_wrapper') if key not in cfg]
    if lacking:
        raise ValueError(f'{config}: no {", ".join(lacking)}: not a training config (a stage config, '
                         f'e.g. configs/finetune_lora.py, not a part of one under configs/_base_/)')
    for key in ('model', 'train_dataloader', 'train_dataloader.dataset', 'optim_wrapper'):
        value = cfg
        for part in key.split('.'):
            value = value.get(part)
        if not isinstance(value, dict):
            raise ValueError(f'{key} is {value!r} (in {config} with its --cfg-options), not a dict of settings: '
                             f'plan needs its settings')
    from xtuner_plugins.engine.derive import _MODEL_ALIASES, _is, _model_class
    kind = cfg.model.get('type')
    if not _is(kind, _model_class(), _MODEL_ALIASES):   # (XTuner's LLaVAModel: a TypeError on its settings)
        name = f'{kind.__module__}.{kind.__qualname__}' if isinstance(kind, type) else repr(kind)
        raise ValueError(f'{config}: model.type is {name}, not VisionLanguageModel (xtuner_plugins.models) or a '
                         'subclass: plan plans this project\'s model alone (a stage config, e.g. '
                         'configs/finetune_lora.py)')


def planned_dtype(cfg, given) -> str:
    """The dtype plan counts in: ``--dtype`` (``given``), else the config's ``model.torch_dtype`` ('auto' or unset:
    bf16, as on a GPU); ValueError naming both where they differ (the run trains in the config's)."""
    from xtuner_plugins.models.dtypes import resolve_dtype
    setting = cfg.model.get('torch_dtype', 'auto')
    if setting in (None, 'auto'):
        return given or 'bf16'
    import torch
    name = {torch.bfloat16: 'bf16', torch.float16: 'fp16', torch.float32: 'fp32'}[resolve_dtype(setting)]
    if given and given != name:
        raise ValueError(f"--dtype {given}, and the config's model.torch_dtype is {setting!r} (with its "
                         '--cfg-options), which the run trains in: give one of them')
    return name


def use_models(cfg, vision, llm) -> None:
    """``--vision`` / ``--llm`` into the config's model: folders or shipped names (``plan_configs.resolve``)."""
    from xtuner_plugins.plan_configs import resolve
    model = cfg.model
    if (vision or llm) and model.get('official_checkpoint') is not None:
        if not (vision and llm):
            raise ValueError('the config plans an official_checkpoint: give both --vision and --llm to replace it')
        model['official_checkpoint'] = None
    if vision:
        folder = resolve(vision, 'vision', '--vision')
        spec = model.get('vision_encoder')
        model['vision_encoder'] = dict(spec, path=folder) if isinstance(spec, dict) else folder
    if llm:
        model['llm'] = resolve(llm, 'llm', '--llm')
        model['tokenizer'] = None   # the LLM's own (or none: plan_configs.planned_vocabulary)


def previous_stage(cfg, args) -> None:
    """The model ``model.pretrained_pth`` trained, where the command line names none of its parts: its source
    folders and vision geometry, as training takes them (``engine/previous_settings.py``), said."""
    from xtuner_plugins.engine.previous_settings import take_previous_settings
    given = list(args.cfg_options or {}) + [key for key, named in (('model.vision_encoder', args.vision),
                                                                     ('model.llm', args.llm)) if named]
    taker = take_previous_settings(cfg, given)
    pretrained = cfg.model.get('pretrained_pth')
    if taker.taken:
        print(f'model.pretrained_pth={pretrained}: the model that stage trained: {"; ".join(taker.taken)}')
    if taker.left:
        print(f'model.pretrained_pth={pretrained}: not taken from it: {"; ".join(taker.left)}')


def _names_epilog() -> str:
    from xtuner_plugins.plan_configs import shipped
    models = shipped()
    return 'shipped config.json (--vision / --llm NAME; xtuner_plugins/plan_configs/models.json: sources):\n' + \
        '\n'.join(f'  {"--" + e["kind"]:9s} {n:15s} {e["hub"]}' for n, e in models.items())


def main(argv=None) -> int:
    from xtuner_plugins.cfg_words import CfgOptions
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0], epilog=_names_epilog(),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('config', help='a training config (configs/*.py)')
    p.add_argument('--vision', metavar='NAME|DIR', help='the vision tower instead of model.vision_encoder: a folder '
                   'holding its config.json, or a shipped name (below)')
    p.add_argument('--llm', metavar='NAME|DIR', help='the LLM instead of model.llm: a folder holding its config.json '
                   '(a tokenizer there is used for the vocabulary), or a shipped name (below)')
    p.add_argument('--gpus', type=int, required=True, help='devices the run uses')
    p.add_argument('--gpu-mem', type=float, required=True, help='memory per device in GiB (e.g. 80)')
    p.add_argument('--zero', type=int, choices=(0, 2, 3), default=0,
                   help='0: no DeepSpeed (default); 2 or 3: DeepSpeed ZeRO stage')
    p.add_argument('--dtype', choices=('bf16', 'fp32'), default=None,
                   help="weights and activations (default: the config's model.torch_dtype; 'auto' is bf16)")
    p.add_argument('--reserve', type=float, default=1.0, help='GiB not counted by torch (default 1)')
    p.add_argument('--cfg-options', nargs='+', action=CfgOptions, default=None,
                   help='override config settings, as for training (key=value)')
    args = p.parse_args(argv)
    from dataclasses import replace

    from mmengine.config.utils import ConfigParsingError

    from mmengine.config import Config

    from xtuner_plugins.engine.options import check_cfg_options, load_config
    from xtuner_plugins.models.liger import check_liger
    from xtuner_plugins.plan_configs.batch import (config_batch, model_batch, optimizer_settings, planned_batches,
                                                   rows_per_item, with_supervised)
    from xtuner_plugins.models.cpu_attention import as_sdpa
    from xtuner_plugins.plan_configs.meta import build_meta_model
    from xtuner_plugins.plan_activations import LM_HEAD
    from xtuner_plugins.planner import largest_fitting, plan_memory
    try:
        check_args(args)
        with config_read(args.config):
            cfg = load_config(args.config, args.cfg_options)
            written = Config.fromfile(args.config)
        checked_here = plan_reads(cfg)   # below, each in its own words
        problems = [p for p in check_cfg_options(written, args.cfg_options or {})   # as training checks them
                    if p.split(':', 1)[0] not in checked_here]
        if problems:   # (was dropped without a word: a plan of settings the run would not have)
            raise ValueError(f'--cfg-options: {"; ".join(problems)}')
        check_parts(cfg, args.config)
        config_batch(cfg, 1, 1)   # the batch settings, checked before the model is built
        args.dtype = planned_dtype(cfg, args.dtype)
        previous_stage(cfg, args)
        use_models(cfg, args.vision, args.llm)
        from xtuner_plugins.models.compile import as_on_a_gpu
        with as_on_a_gpu(), config_read(args.config):   # compile_blocks='auto' as the GPU resolves it
            model = build_meta_model(cfg.model, {'bf16': 'bfloat16', 'fp16': 'float16'}.get(args.dtype, 'float32'),
                                     zero3=args.zero == 3)
        check_liger(cfg.model.get('liger_kernel', False), zero3=args.zero == 3, device=False,   # as training would
                    compile_blocks=cfg.model.get('compile_blocks', 'auto'),
                    preference=cfg.model.get('preference') is not None)
        batch, per_tile = model_batch(cfg, model)
    except SyntaxError as exc:  # in the config (MMEngine's message names no file)
        print(f'plan: error: {exc.filename if exc.filename not in (None, "<unknown>") else args.config}: line '
              f'{exc.lineno}: {exc.msg}', file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError, OSError, ConfigParsingError) as exc:  # ConfigParsingError: a base missing
        print(f'plan: error: {exc}', file=sys.stderr)
        return 2
    budget = args.gpu_mem * GIB

    fused, accumulation = optimizer_settings(cfg)

    def plan_with(m, b):
        return plan_memory(m, with_supervised(b, per_tile), args.dtype, args.zero, args.gpus, args.reserve,
                           fused=fused, accumulation=accumulation)

    def plan(b):
        return plan_with(model, b)

    r = plan(batch)
    lm = model.language_model
    what = 'packs of' if batch.packed else 'rows of'
    print(f'plan: {args.config} on {args.gpus} device(s) of {args.gpu_mem:g} GiB, '
          f'{"no DeepSpeed" if args.zero == 0 else f"DeepSpeed ZeRO-{args.zero}"}, {args.dtype}')
    layers = getattr(model, 'llm_ckpt_layers', None)
    print(f'model (meta device): {r["trained"]:,.0f} trained and {r["frozen"]:,.0f} frozen parameters; LLM gradient '
          f'checkpointing {getattr(model, "llm_recompute", None) or "off"}'
          f'{f" (the first {layers} layers)" if layers is not None and model.llm_recompute else ""}; attention '
          f'{as_sdpa(lm.config._attn_implementation)}; blocks compiled: {", ".join(model.compile_blocks) or "none"}')
    print(f'vocabulary: {lm.get_output_embeddings().weight.shape[0]:,} rows ({model.planned_vocabulary})')
    unit = rows_per_item(cfg)
    group = ('pack(s) of pairs' if batch.packed else 'pair(s)') if unit == 2 else ''
    pairs = f' ({batch.rows // 2} {group}: a row of chosen and a row of rejected answers each)' if unit == 2 else ''
    print(f'batch per device: {batch.rows} {what} {batch.length} tokens{pairs}, {batch.tiles} tiles '
          f'({per_tile} tokens each), {batch.supervised} supervised tokens')
    print(f'{"":22s} {"GiB":>8s}')
    for key in ('weights', 'gradients', 'optimizer', 'activations'):
        print(f'{key if key != "optimizer" else "optimizer states":22s} {r[key] / GIB:8.2f}')
        if key == 'activations':
            for part, v in r['parts'].items():
                print(f'  {part:20s} {v / GIB:8.2f}')
    print(f'{"autocast bf16 copies":22s} {r["autocast_copies"] / GIB:8.2f}  (the forward; '
          f'{r["saved_copies"] / GIB:.2f} kept into the backward)')
    print(f'{"optimizer temporaries":22s} {r["optimizer_temporaries"] / GIB:8.2f}  (during the step; AdamW '
          f'{"fused" if fused else "not fused: optim_wrapper.optimizer.fused=True makes none"})')
    kept = ('kept through it: DeepSpeed' if args.zero else f'kept through it: {accumulation} accumulated micro-steps'
            ) if r['gradients_kept'] else 'freed after each step, as MMEngine does'
    print(f'{"step peak":22s} {r["step_peak"] / GIB:8.2f}  (the largest of the forward {r["forward_peak"] / GIB:.2f}, '
          f'gradients {kept}; the backward {r["backward_peak"] / GIB:.2f} and the optimizer step, with the gradients)')
    if r['ddp_buckets']:
        print(f'{"DDP gradient buckets":22s} {r["ddp_buckets"] / GIB:8.2f}  (a copy of every gradient, on several '
              f'ranks without DeepSpeed)')
    print(f'{"reserve":22s} {r["reserve"] / GIB:8.2f}')
    fits = r['total'] <= budget
    print(f'{"total":22s} {r["total"] / GIB:8.2f}  of {args.gpu_mem:g}: {"fits" if fits else "DOES NOT FIT"} '
          f'(weights + optimizer states + step peak{" + DDP buckets" if r["ddp_buckets"] else ""} + reserve)')
    if model.llm_recompute and not hasattr(model.language_model, 'peft_config'):   # 'auto' keeps all under LoRA
        from xtuner_plugins.engine.ckptfit import FRACTION   # 'auto''s share: the planner's error kept as room
        batches = planned_batches(batch, per_tile)   # as 'auto' plans them
        print(checkpoint_line(model, lambda m: max(plan_with(m, b)['total'] for b in batches) <= FRACTION * budget,
                              f'{FRACTION:.0%} of --gpu-mem ({FRACTION * args.gpu_mem:.1f} GiB)'))
    if hasattr(model.language_model, 'peft_config'):
        print('caution: LoRA on the LLM. On one H100 (2026-11-24) a LoRA step of Qwen2.5-1.5B took 1.58x the total '
              'planned here (27.1 against 17.2 GiB; MLP warm-up and full fine-tuning of the same model and batch '
              'within 4%); the cause is not found (not on a CPU; that benchmark left the LLM in eval mode then): '
              'leave that headroom (benchmarks/RESULTS.md)')
    step = 256
    # a row is one sample: longer than the LLM's context it would run past its positions (a pack's restart per sample)
    context = None if batch.packed else getattr(lm.config, 'max_position_embeddings', None)
    context = context if isinstance(context, int) and context > 0 else None
    images = batch.tiles // batch.rows * per_tile   # a row's image tokens
    name = 'max_tokens (tokens per pack)' if batch.packed else 'max_length'
    if context and batch.length > context:
        print(f'caution: {name} {batch.length} is past the LLM\'s context (max_position_embeddings {context}): '
              'rows that long run past the positions it was trained for')
    per = f'{batch.rows // unit} {group + " " if group else ""}per device'
    capped = f' (the LLM\'s context, max_position_embeddings {context}: more would fit)'
    searched = ' (as far as the search goes: more would fit)'   # (a pack has no context to stop at)
    fixed = r['weights'] + r['optimizer'] + r['reserve']   # kept whatever the batch
    too_small = ('none (not even the images fit)' if fixed <= budget else
                 f'none (the weights, optimizer states and --reserve alone are {fixed / GIB:.3g} GiB, past --gpu-mem '
                 f'{args.gpu_mem:g})')
    low, high = max(1, images // step + 1), context // step if context else 4096

    def fits_length(tokens: int) -> bool:
        return plan(replace(batch, length=tokens))['total'] <= budget
    if context and images >= context:
        text = f'none (a row\'s {images} image tokens alone are past the LLM\'s context, {context})'
    elif low > high:   # a context less than a step past the images: the context itself, if it fits
        text = f'{context}{capped}' if fits_length(context) else too_small
    else:
        longest = largest_fitting(lambda n: fits_length(n * step), low, high)
        text = f'{longest * step}{(capped if context else searched) if longest == high else ""}' if longest else \
            too_small
    print(f'largest {name} at {per}: {text}')
    most = largest_fitting(lambda k: plan(replace(batch, rows=k * unit, tiles=batch.tiles // batch.rows * k * unit)
                                          )['total'] <= budget, 1, 4096)
    print(f'largest batch per device at {batch.length} tokens: {most or 0}'
          + (f' {group} (train_dataloader.batch_size)' if unit == 2 else '')
          + (searched if most == 4096 else ''))
    if unit == 1 and not getattr(model, 'loss_chunk', 0) and r['parts'].get(LM_HEAD, 0) > 0.2 * r['total']:
        model.loss_chunk = CHUNK_HINT   # the same batch with the LM head and the loss in chunks
        chunked = plan(batch)['total']
        print(f'the LM head\'s logits are {r["parts"][LM_HEAD] / GIB:.2f} GiB of it: with '
              f'--cfg-options model.loss_chunk={CHUNK_HINT} the total is {chunked / GIB:.3f} GiB instead of '
              f'{r["total"] / GIB:.3f} ({"fits" if chunked <= budget else "does not fit"}; the same loss, one more '
              f'LM-head matmul a chunk)')
    return 0 if fits else 1


def checkpoint_line(model, fits, within: str) -> str:
    """What ``llm_grad_ckpt_layers`` could be: the fewest checkpointed LLM layers that ``fits(model)``, the share of
    the GPU ``within`` names (the configs' 'auto' plans against the same share, so both choose alike)."""
    from xtuner_plugins.plan_activations import llm_layers
    from xtuner_plugins.planner import fewest_checkpointed_layers
    layers = llm_layers(model)
    fewest = fewest_checkpointed_layers(model, fits)
    if fewest is None:
        return (f'checkpointed LLM layers: not even all of them fit {within}; the configs\' \'auto\' checkpoints all '
                f'and warns')
    return (f'fewest checkpointed LLM layers that fit {within}: {fewest} of {layers} (--cfg-options '
            f'model.llm_grad_ckpt_layers={fewest}; the others keep their activations instead of running again in '
            "the backward. The configs' 'auto' chooses so at start-up on a GPU, against the same share of its "
            'memory)')


if __name__ == '__main__':
    sys.exit(main())
