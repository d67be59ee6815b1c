"""Start-up checks that the data pipeline and the model agree, before the first batch is drawn.

The vision encoder and projector fix the tile size, the ``<IMG_CONTEXT>`` tokens per tile, the image mode and
(for ``'pad'``) the padding colour (``InternVLModel.geometry``); the data set tiles and counts with its own
copies (``InternVLDataset.geometry``). A mismatch would otherwise surface at the first forward as a token
count error, or not at all (a tile size the encoder interpolates to). :class:`ModelDataCheckHook` compares
them in ``before_run``, after the model and the data loader are built, and stops with both values named.
"""

from __future__ import annotations

from typing import Dict

from mmengine.hooks import Hook

__all__ = ['ModelDataCheckHook', 'check_geometry']


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
