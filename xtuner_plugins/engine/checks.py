"""Start-up checks that the data pipeline and the model agree, before the first batch is drawn: the geometry
(below), the tokenizer (the same vocabulary and InternVL token ids) and the chat template. The run's
``--cfg-options`` are checked earlier, when the runner is built (:func:`check_run_options`, called by
``engine/runstart.py``), also under ``xtuner train``, whose command line does not check them.

The vision encoder and projector fix the tile size, the ``<IMG_CONTEXT>`` tokens per tile, the image mode and
(for ``'pad'``) the padding colour (``VisionLanguageModel.geometry``); the data set tiles and counts with its own
copies (``InternVLDataset.geometry``). A mismatch would otherwise surface at the first forward as a token
count error, or not at all (a tile size the encoder interpolates to). :class:`ModelDataCheckHook` compares
them in ``before_run``, after the model and the data loader are built, and stops with both values named.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Dict, Optional

from mmengine.hooks import Hook

from xtuner_plugins.errors import Refused

from .dataagree import check_ranks_agree

__all__ = ['ModelDataCheckHook', 'check_geometry', 'check_run_options', 'check_tokenizers']


def check_geometry(model_geometry: Dict[str, object], data_geometry: Dict[str, object]) -> None:
    """Raise ValueError naming every setting where the data disagrees with the model."""
    keys = ['image_size', 'num_image_token', 'image_mode']
    if model_geometry.get('image_mode') == 'pad':
        keys.append('image_mean')
    wrong = [f'{key}: model {model_geometry[key]!r}, data {data_geometry.get(key)!r}' for key in keys
             if _norm(model_geometry[key]) != _norm(data_geometry.get(key))]
    if wrong:
        raise Refused('the data set does not match the model (set train_dataloader.dataset.<key> to the '
                      'model\'s value): ' + '; '.join(wrong))


def check_tokenizers(model_tokenizer, data_tokenizer, where: str = 'train_dataloader.dataset.tokenizer') -> None:
    """The data set must tokenise with the model's vocabulary: the same tokens at the same ids (InternVL's
    added tokens included); otherwise its ``<IMG_CONTEXT>`` ids are not the ones the model fills."""
    if data_tokenizer is None or model_tokenizer is None:
        return
    from xtuner_plugins.data.template import IMG_CONTEXT_TOKEN
    ids = [t.convert_tokens_to_ids(IMG_CONTEXT_TOKEN) for t in (model_tokenizer, data_tokenizer)]
    sizes = [len(t) for t in (model_tokenizer, data_tokenizer)]
    if ids[0] != ids[1] or sizes[0] != sizes[1] or model_tokenizer.get_vocab() != data_tokenizer.get_vocab():
        raise Refused(f'the data set\'s tokenizer is not the model\'s: {sizes[1]} tokens with {IMG_CONTEXT_TOKEN} '
                      f'at id {ids[1]}, the model\'s {sizes[0]} tokens with it at id {ids[0]} '
                      f'(set {where} to the LLM\'s folder)')


def check_templates(model_template, data_template) -> None:
    """The data set must render conversations with the template the model records for the converter and chat."""
    name = getattr(data_template, 'name', data_template)
    if model_template is not None and name is not None and model_template != name:
        raise Refused(f'template: model {model_template!r}, data {name!r} (set model.template and '
                      f'train_dataloader.dataset.template to the same name)')


def context_note(llm_config, max_length) -> Optional[str]:
    """A warning when the data set's ``max_length`` (each sample's tokens at most; a pack restarts its positions at
    each sample) is past the LLM's context: ``max_position_embeddings``, times a ``rope_scaling`` factor where the
    config gives one. Such samples trained on positions the LLM was never trained at, without a word (the planner
    said so; training did not). None when it fits or either is not known."""
    context = getattr(llm_config, 'max_position_embeddings', None)
    if not isinstance(max_length, int) or not isinstance(context, int) or isinstance(context, bool) or context < 1:
        return None
    scaling = getattr(llm_config, 'rope_scaling', None)
    factor = scaling.get('factor') if isinstance(scaling, dict) else None
    scaled = isinstance(factor, (int, float)) and not isinstance(factor, bool) and factor > 1
    limit = int(context * factor) if scaled else context
    if max_length <= limit:
        return None
    reach = f'max_position_embeddings {context} x rope_scaling factor {factor:g}' if scaled else \
        f'max_position_embeddings {context}'
    return (f'train_dataloader.dataset.max_length {max_length} is past the LLM\'s context ({reach} = {limit} '
            'tokens): samples that long train on positions it was not trained for; give a max_length of at most '
            f'{limit}, or a rope_scaling in the LLM\'s config.json for a longer context')


def check_run_options(cfg) -> dict:
    """Compare the run's config with its file as written: every entry the command line changed must be one
    the run reads (see :func:`xtuner_plugins.engine.options.check_cfg_options`). Returns what it changed,
    ``{key: value}`` ({} for a config that is no file's); raises ValueError naming every problem.
    ``engine/runstart.py`` calls it when the runner is built, before the model is."""
    from mmengine.config import Config

    from xtuner_plugins.engine.options import _leaves, check_cfg_options
    filename = getattr(cfg, 'filename', None)
    if not filename or not os.path.isfile(filename):
        return {}
    written = Config.fromfile(filename)
    flat = dict(_leaves(written.to_dict()))
    changed = {key: value for key, value in _leaves(cfg.to_dict()) if key not in flat or flat[key] != value}
    # a length named on the command line at the file's own value (max_epochs=1 over the base's max_epochs = 1) is
    # still the user's: it was dropped, and the file's max_iters ran instead (online packing's refusal unsaid)
    from xtuner_plugins.cfg_words import cfg_options_words
    named = {word.partition('=')[0] for word in cfg_options_words(sys.argv)}
    changed.update({key: flat[key] for key in ('max_epochs', 'max_iters')
                    if key in named and key in flat and key not in changed})
    # an entry whose type changed and whose settings MMEngine replaced (--cfg-options ENTRY._delete_=True, gone by
    # now): the config's settings there are not the run's
    merged = dict(_leaves(cfg.to_dict()))
    replaced = {key.rpartition('.')[0] for key in flat if key not in merged} & {
        key[:-len('.type')] for key in changed if key.endswith('.type')}
    problems = check_cfg_options(written, dict(changed, **{f'{entry}._delete_': True for entry in replaced}))
    if problems:
        raise Refused('--cfg-options: ' + '; '.join(problems))
    return changed


def _norm(value):
    return tuple(round(float(v), 6) for v in value) if isinstance(value, (list, tuple)) else value


def _unwrap(obj, *attrs: str):
    """Follow wrapper attributes (DDP's ``module``, the DeepSpeed wrapper's ``model``, a packed data set's
    ``dataset``) to the object that has a ``geometry``."""
    for _ in range(4):
        if obj is None or hasattr(obj, 'geometry'):
            return obj
        obj = next((getattr(obj, a) for a in attrs if hasattr(obj, a)), None)
    return obj


def check_collate(collate_fn, model) -> None:
    """The collate function's settings (those MMEngine bound to it: ``train_dataloader.collate_fn``), checked
    against the model's vocabulary (``data/collate.check_collate_settings``)."""
    settings = getattr(collate_fn, 'keywords', None)
    if not isinstance(settings, dict):
        return
    from xtuner_plugins.data.collate import check_collate_settings
    llm = getattr(model, 'language_model', None)
    embeddings = llm.get_input_embeddings() if hasattr(llm, 'get_input_embeddings') else None
    check_collate_settings(settings, getattr(embeddings, 'num_embeddings', None))


class ModelDataCheckHook(Hook):
    """Stops training at start-up when the ranks' training data sets differ (``dataagree.py``) or the data set's
    geometry is not the model's."""

    priority = 'VERY_HIGH'

    def before_run(self, runner) -> None:
        model = _unwrap(runner.model, 'module', 'model')
        loop = getattr(runner, '_train_loop', None)
        dataloader = getattr(loop, 'dataloader', None)
        check_ranks_agree(getattr(dataloader, 'dataset', None))  # every rank reads the same data (dataagree.py)
        check_collate(getattr(dataloader, 'collate_fn', None), model)
        dataset = _unwrap(getattr(dataloader, 'dataset', None), 'dataset')
        if hasattr(model, 'geometry') and hasattr(dataset, 'geometry'):
            check_geometry(model.geometry, dataset.geometry)
            check_tokenizers(getattr(model, 'tokenizer', None), getattr(dataset, 'tokenizer', None))
            check_templates(getattr(model, 'template', None), getattr(dataset, 'template', None))
            llm = getattr(model, 'language_model', None)
            note = context_note(getattr(llm, 'config', None), getattr(dataset, 'max_length', None))
            if note:
                from mmengine.logging import print_log
                print_log(note, logger='current', level=logging.WARNING)
