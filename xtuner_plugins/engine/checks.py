"""Start-up checks that the data pipeline and the model agree, before the first batch is drawn: the geometry
(below) and the tokenizer (the same vocabulary and InternVL token ids).

The vision encoder and projector fix the tile size, the ``<IMG_CONTEXT>`` tokens per tile, the image mode and
(for ``'pad'``) the padding colour (``InternVLModel.geometry``); the data set tiles and counts with its own
copies (``InternVLDataset.geometry``). A mismatch would otherwise surface at the first forward as a token
count error, or not at all (a tile size the encoder interpolates to). :class:`ModelDataCheckHook` compares
them in ``before_run``, after the model and the data loader are built, and stops with both values named.
"""

from __future__ import annotations

from typing import Dict

from mmengine.hooks import Hook

__all__ = ['ModelDataCheckHook', 'check_geometry', 'check_tokenizers']


def check_geometry(model_geometry: Dict[str, object], data_geometry: Dict[str, object]) -> None:
    """Raise ValueError naming every setting where the data disagrees with the model."""
    keys = ['image_size', 'num_image_token', 'image_mode']
    if model_geometry.get('image_mode') == 'pad':
        keys.append('image_mean')
    wrong = [f'{key}: model {model_geometry[key]!r}, data {data_geometry.get(key)!r}' for key in keys
             if _norm(model_geometry[key]) != _norm(data_geometry.get(key))]
    if wrong:
        raise ValueError('the data set does not match the model (set train_dataloader.dataset.<key> to the '
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
        raise ValueError(f'the data set\'s tokenizer is not the model\'s: {sizes[1]} tokens with {IMG_CONTEXT_TOKEN} '
                         f'at id {ids[1]}, the model\'s {sizes[0]} tokens with it at id {ids[0]} '
                         f'(set {where} to the LLM\'s folder)')


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


class ModelDataCheckHook(Hook):
    """Stops training at start-up when the training data set's geometry is not the model's."""

    priority = 'VERY_HIGH'

    def before_run(self, runner) -> None:
        model = _unwrap(runner.model, 'module', 'model')
        loop = getattr(runner, '_train_loop', None)
        dataloader = getattr(loop, 'dataloader', None)
        dataset = _unwrap(getattr(dataloader, 'dataset', None), 'dataset')
        if hasattr(model, 'geometry') and hasattr(dataset, 'geometry'):
            check_geometry(model.geometry, dataset.geometry)
            check_tokenizers(getattr(model, 'tokenizer', None), getattr(dataset, 'tokenizer', None))
