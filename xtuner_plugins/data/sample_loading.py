"""One record loaded as a training item, for :class:`~xtuner_plugins.data.dataset.InternVLDataset` (which inherits
:class:`SampleLoading`): the record checked, its images decoded, fitted to ``max_length`` (``fitting.py``) and tiled,
and the item's tensors (``input_ids``, ``labels``, ``pixel_values``, ``image_flags``, ``num_tiles``, ``samples``);
a video's frames go through ``video_sample.py``. The class using it has the data set's settings, ``check_record``,
``where`` and ``VideoSamples``' methods.
"""

from __future__ import annotations

from typing import Dict, List, Optional

import torch

from .checked import CheckedSample
from .fitting import Fit, fit_sample, fit_video, judge_sft_cut, note_fit
from .image_io import load_image
from .sources import Record
from .tile_grid import num_tiles
from .tiling import image_tiles
from .video import VideoInfo


class SampleLoading:
    """``load_sample`` and what it calls (the module docstring)."""

    def load_sample(self, record: Record) -> Dict[str, torch.Tensor]:
        """Load one record fully; raises :class:`SampleError` on any problem."""
        fit, tiles = self.load_fit(record)
        pixel_values, image_flags = self.pixels(tiles)
        return dict(self._item(fit.encoded[0], pixel_values, image_flags, record), **note_fit(self, record, fit))

    def pixels(self, tiles: List[torch.Tensor]):
        """``(pixel_values, image_flags)`` of a sample's tiles; a text-only sample carries one dummy tile, flag 0
        (so every rank runs the vision tower)."""
        if not tiles:
            return (torch.zeros(1, 3, self.image_size, self.image_size, dtype=torch.uint8),
                    torch.zeros(1, dtype=torch.long))
        pixel_values = torch.cat(tiles)
        return pixel_values, torch.ones(pixel_values.shape[0], dtype=torch.long)

    def tile_count(self, size, max_num: int) -> int:
        """Tiles of an image of ``size`` (width, height) at ``max_num`` tiles per image, without its pixels."""
        if not self.dynamic_image_size:
            return 1
        return num_tiles(size[0], size[1], min(self.min_dynamic_patch, max_num), max_num, self.image_size,
                         self.use_thumbnail)

    def fit(self, record: Record, checked: 'CheckedSample', sizes, video: Optional[VideoInfo] = None) -> Fit:
        """What training does with a checked record whose images have ``sizes`` (``fitting.fit_sample``), or whose
        video is ``video`` (``fitting.fit_video``)."""
        if self.tokenizer is None:
            raise ValueError(f'{type(self).__name__} needs a tokenizer to load samples for training')
        if checked.video is not None:
            return fit_video(self, record, checked, self.num_frames(record, video or self.probe(checked)))
        return fit_sample(self, record, checked, sizes)

    def judge_cut(self, fit: Fit) -> Optional[str]:
        """What an answer cut by ``max_length`` means (``fitting.judge_sft_cut``; pairs have their own)."""
        return judge_sft_cut(self, fit)

    def load_fit(self, record: Record):
        """``(fit, tiles)``: the record checked, its images decoded, fitted to ``max_length`` and tiled."""
        checked = self.check_record(record)
        if checked.video is not None:
            return self.load_video_fit(record, checked)  # video_sample.py
        pictures = [load_image(p, self.max_image_pixels, name) for p, name in
                    zip(checked.image_paths, checked.image_names or [None] * len(checked.image_paths))]
        fit = self.fit(record, checked, [p.size for p in pictures])
        tiles = [image_tiles(im, self.image_mode, image_size=self.image_size,
                             min_num=min(self.min_dynamic_patch, fit.max_num), max_num=fit.max_num,
                             use_thumbnail=self.use_thumbnail, mean=self.image_mean) for im in pictures]
        if [t.shape[0] for t in tiles] != fit.tiles:
            raise RuntimeError(f'{self.where(record)}: {[t.shape[0] for t in tiles]} tiles cut, {fit.tiles} counted')
        return fit, tiles

    def _item(self, encoded, pixel_values, image_flags, record: Record) -> Dict[str, torch.Tensor]:
        return dict(input_ids=torch.tensor(encoded['input_ids'], dtype=torch.long),
                    labels=torch.tensor(encoded['labels'], dtype=torch.long),
                    pixel_values=pixel_values,
                    image_flags=image_flags,
                    num_tiles=pixel_values.shape[0],
                    samples=[self.where(record)])  # FILE:LINE, for messages about the batch
