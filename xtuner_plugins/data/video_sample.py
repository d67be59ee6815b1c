"""A data set's video samples: :class:`VideoSamples`, the video branch of
:class:`~xtuner_plugins.data.dataset.InternVLDataset` (which inherits it).

It holds the video settings (``min_num_frame``, ``max_num_frame``, ``video_sampling``, ``frame_prefix``, the epoch),
checks a sample's ``"video"`` against its images and resolves it like an image path, counts a video sample's frames
(drawn from the seed and the sample's place, so the same in every epoch) and loads them: the frame count fitted to
``max_length`` first (``fitting.fit_video``), then only those frames decoded (``video.py``), at positions drawn for
the epoch (``'rand'``), each frame one tile.
"""

from __future__ import annotations

import numbers
import os
from typing import Optional, Sequence, Tuple

from xtuner_plugins.errors import Refused

from .errors import SampleError
from .image_io import resolve_image_path
from .sources import Record
from .tiling import image_tiles
from .frame_sampling import check_sampling, draw_num_frames, frame_rng
from .template import IMAGE_PLACEHOLDER
from .video import VIDEO_PLACEHOLDER, VideoInfo, choose_frames, frames_for, probe_video, read_frames

__all__ = ['VideoSamples']


MOST_FRAMES = 2 ** 62  # frame counts are drawn as int64 (frame_sampling.draw_num_frames)


def check_frame_count(name: str, value) -> None:
    """:class:`Refused` (a ``ValueError``) naming the setting unless ``value`` is a whole number of frames, 1 to
    :data:`MOST_FRAMES` (``'8'`` was a raw TypeError, ``2.5`` silently 2 frames, ``10**19`` numpy's "high is out
    of bounds")."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not 1 <= value <= MOST_FRAMES:
        raise Refused(f'{name}={value!r}: a whole number of frames, 1 to {MOST_FRAMES}')


class VideoSamples:
    """The video side of a data set; the class using it has ``seed``, ``max_image_pixels``, ``image_mode``,
    ``image_size``, ``image_mean``, ``allow_links_outside``, ``sources`` and ``fit`` (``InternVLDataset``)."""

    def init_video(self, min_num_frame: int, max_num_frame: int, video_sampling: str) -> None:
        """The frame-count range and sampling, checked (:class:`Refused`); the epoch 0."""
        for name, value in (('min_num_frame', min_num_frame), ('max_num_frame', max_num_frame)):
            check_frame_count(name, value)
        if not 1 <= min_num_frame <= max_num_frame:
            raise Refused(f'need 1 <= min_num_frame <= max_num_frame, got {min_num_frame} and {max_num_frame}')
        self.min_num_frame, self.max_num_frame = int(min_num_frame), int(max_num_frame)
        self.video_sampling = check_sampling(video_sampling)
        self.epoch = 0  # set_epoch: what 'rand' frame positions are drawn with besides the seed and the sample

    def init_frame_prefix(self, frame_prefix: Optional[str]) -> None:
        """The text before each frame's ``<image>``: ``frame_prefix``, or the template's (after ``self.template``)."""
        self.frame_prefix = self.template.frame_prefix if frame_prefix is None else str(frame_prefix)
        if '{i}' not in self.frame_prefix:
            raise Refused(f'frame_prefix {self.frame_prefix!r} must hold {{i}}, the frame\'s number')
        try:   # str.format: other fields ({x}, {}) failed at the first video sample, or as the data set was built
            self.frame_prefix.format(i=1)
        except (KeyError, IndexError, ValueError) as exc:
            raise Refused(f'frame_prefix {self.frame_prefix!r}: {{i}} is its one field, the frame\'s number '
                          f'({type(exc).__name__}: {exc}); write a brace as {{{{ or }}}}') from None
        tags = [tag for tag in (IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER) if tag in self.frame_prefix]
        if tags:   # every video sample was then skipped as image_tag_mismatch, naming the data, not the setting
            raise Refused(f'frame_prefix {self.frame_prefix!r} holds {tags[0]}: each frame\'s {IMAGE_PLACEHOLDER} '
                          f'comes after the prefix already; leave it out')

    @staticmethod
    def refuse_images_with_video(video, images: Sequence) -> None:
        """``image_and_video`` when a sample has both."""
        if video and images:
            raise SampleError('image_and_video', f'the sample has {len(images)} image(s) and a video; a sample holds '
                                                 f'images or one video, not both')

    def resolve_video(self, record: Record, video: Tuple[str, Optional[tuple]]) -> str:
        """A sample's video path resolved against its source's folders, as image paths are; the folder itself
        (``"."``, ``"./"``) is ``bad_video_field``: it was read as one video whose frames were every image of the
        data set's image folder, without a word."""
        src = self.sources[record.source]
        path = resolve_image_path(video[0], src.image_folder, src.base_dir, self.allow_links_outside)
        root = src.image_folder if src.image_folder is not None else (src.base_dir or '.')
        if os.path.normpath(os.path.abspath(path)) == os.path.normpath(os.path.abspath(root)):
            folder = 'image folder' if src.image_folder is not None else 'annotation file\'s folder'
            raise SampleError('bad_video_field', f'"video" {video[0]!r} names the {folder} itself ({root}), not a '
                                                 f'video or a folder of frames in it')
        return path

    def links_within(self, record: Record) -> Optional[str]:
        """The folder a frame folder's frames may not be symbolic links out of: the sample's image folder, as for
        its images (None: no image folder, or ``allow_links_outside``)."""
        return None if self.allow_links_outside else self.sources[record.source].image_folder

    def set_epoch(self, epoch: int) -> None:
        """The epoch ``'rand'`` video frames are drawn for (0 until set). In training each item's index carries its
        epoch and ``__getitem__`` calls this in the process that loads it, DataLoader workers included
        (``data/epochs.py``)."""
        self.epoch = int(epoch)

    def probe(self, checked) -> VideoInfo:
        """A checked video sample's :class:`~xtuner_plugins.data.video.VideoInfo` (headers only)."""
        return probe_video(checked.video, checked.clip, self.max_image_pixels, checked.links_within)

    def num_frames(self, record: Record, info: VideoInfo) -> int:
        """The frames a video sample gets before ``max_length`` has its say: drawn from the seed and its place."""
        drawn = draw_num_frames(self.min_num_frame, self.max_num_frame, self.seed, record.source, record.line)
        return frames_for(info, drawn, self.video_sampling, self.max_num_frame)

    def load_video_fit(self, record: Record, checked):
        """``(fit, tiles)`` of a video sample: its frame count fitted to ``max_length``, then only those frames
        decoded, each one tile (resized, or padded first in ``image_mode='pad'``)."""
        info = self.probe(checked)
        fit = self.fit(record, checked, [], info)
        rng = frame_rng(self.seed, self.epoch, record.source, record.line)
        frames = read_frames(info, choose_frames(info, fit.max_num, self.video_sampling, rng))
        mode = 'pad' if self.image_mode == 'pad' else 'resize'
        return fit, [image_tiles(f, mode, image_size=self.image_size, mean=self.image_mean) for f in frames]
