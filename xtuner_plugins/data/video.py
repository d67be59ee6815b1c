"""Videos as samples: reading (PyAV, seeking to the frames used), the frame prompt.

A sample's ``"video"`` is a video file (anything FFmpeg reads: ``.mp4``, ``.webm``, ``.mkv``, ``.gif``, ...) or a
folder of frames (image files, in the order of the numbers in their names), with an optional ``"clip": [start_s,
end_s]`` (seconds; files only). :func:`probe_video` reads what sampling needs from the headers, without decoding a
frame; :func:`read_frames` decodes only the frames asked for, seeking to them (a GIF, which cannot seek, is decoded
up to its last frame asked for); each frame goes through :func:`~xtuner_plugins.data.image_io.load_image`'s pixel
rule. A file's frames are turned upright by its display rotation (a phone's portrait video is stored landscape and
tagged) when that is 90, 180 or 270 degrees, other angles left, as decord does (InternVL reads videos through
decord, in training and on the model card): :func:`upright`. The probed size is the stored one (the tag is
only seen on decoded frames); frames of a folder are images, used as stored (no EXIF orientation, the image rule).

Which frames: :mod:`xtuner_plugins.data.frame_sampling` (InternVL 2.5's ``get_frame_indices``).

Each frame is one tile; the first human turn's ``<video>`` (prepended when missing, as ``<image>`` is for images)
becomes one line per frame, ``Frame{i}: <image>`` for i from 1 (:func:`video_prompt`; the prefix is the template's
``frame_prefix``), and each ``<image>`` then InternVL's ``<img><IMG_CONTEXT>...</img>``.

Failures are :class:`~xtuner_plugins.data.errors.SampleError`: ``bad_video_field``, ``missing_video``,
``corrupt_video`` (unreadable, no video stream, or a frame that cannot be decoded: a truncated file; a frame folder's
link to nothing), ``empty_video`` (zero frames), ``bad_clip`` (malformed, or outside the video), ``image_too_large``
(frames over the pixel limit), ``unsafe_image_path`` (a frame folder's frame linked out of the image folder).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass
from typing import Any, Callable, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

from .errors import SampleError
from .frame_sampling import check_sampling, frame_indices
from .image_io import (DEFAULT_MAX_IMAGE_PIXELS, load_image, read_image_size, refuse_link_outside, to_rgb,
                       why_missing)
from .strictjson import finite_number
from .template import DEFAULT_FRAME_PREFIX, IMAGE_PLACEHOLDER
from .video_decode import VideoBytes, av_module, count_packets, decode_wanted, open_stream

__all__ = ['VIDEO_PLACEHOLDER', 'DEFAULT_FRAME_PREFIX', 'VideoBytes', 'VideoFrames', 'VideoInfo', 'video_field',
           'probe_video', 'frames_for', 'choose_frames', 'read_frames', 'video_prompt', 'video_turns', 'expand_video',
           'load_video']

VIDEO_PLACEHOLDER = '<video>'
FRAME_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.webp', '.tif', '.tiff')


class VideoFrames(str):
    """A frame folder's frames held in memory, in the folder's order (a tar shard's members), read as the folder's
    files would be; the string is its name in messages."""

    def __new__(cls, name: str, frames: Sequence[bytes]) -> 'VideoFrames':
        self = super().__new__(cls, name)
        self.frames = tuple(frames)
        return self

    def __reduce__(self):
        return VideoFrames, (str(self), self.frames)


@dataclass(frozen=True)
class VideoInfo:
    """What sampling needs, from the headers: ``total`` frames, ``fps`` (None for a frame folder), ``size``
    ``(width, height)``, and the clip: ``length`` frames from frame ``start`` (the whole video without a clip)."""

    path: str
    kind: str                   # 'file', 'gif' or 'folder'
    total: int
    fps: Optional[float]
    size: Tuple[int, int]
    start: int = 0
    length: int = 0
    frames: Tuple[str, ...] = ()  # a folder's frame files, in order
    max_pixels: Optional[int] = DEFAULT_MAX_IMAGE_PIXELS  # each decoded frame's limit (the probe's)

    @property
    def duration(self) -> Optional[float]:
        return self.total / self.fps if self.fps else None


def video_field(sample: dict) -> Optional[Tuple[str, Optional[Tuple[float, float]]]]:
    """``(path, clip)`` of a sample's video, or None without one; ``bad_video_field`` / ``bad_clip`` when malformed."""
    video = sample.get('video')
    if video is None:
        return None
    if not isinstance(video, str) or not video:
        raise SampleError('bad_video_field', f'"video" must be one path (a file or a folder of frames), got '
                                             f'{video!r:.200}')
    clip = sample.get('clip')
    if clip is None:
        return video, None
    if (not isinstance(clip, (list, tuple)) or len(clip) != 2
            or not all(finite_number(x) for x in clip)
            or not 0 <= clip[0] < clip[1]):
        raise SampleError('bad_clip', f'"clip" must be [start_s, end_s] with 0 <= start_s < end_s, got {clip!r:.200}')
    return video, (float(clip[0]), float(clip[1]))


def _frame_key(name: str):
    """Frame files in the order of the numbers in their names (``frame_2`` before ``frame_10``): the split's odd
    parts are its runs of decimal digits (``str.isdigit`` also holds for a superscript ``\u00b2``, which ``int``
    cannot read: a raw ValueError)."""
    return [int(p) if i % 2 else p for i, p in enumerate(re.split(r'(\d+)', name))]


def _probe_file(path: str) -> VideoInfo:
    av = av_module()
    container, stream = open_stream(path)
    with container:
        fps = float(stream.average_rate or stream.guessed_rate or 0) or None
        total = int(stream.frames or 0)
        shown = float(stream.duration * stream.time_base) * fps if stream.duration and stream.time_base and fps \
            else None
        if not total or (shown is not None and shown + 0.5 < total):
            # no count in the headers (Matroska, WebM), or an edit list that shows fewer frames than the header
            # counts (a cut by stream copy, 'ffmpeg -ss ... -c copy': the frames it hides read as 'truncated'):
            # the packets counted (no decoding), as the frames are then found by their stamps; the duration times
            # the declared rate, a guess a variable frame rate makes wrong, left frames past it never sampled, or a
            # whole video dropped as truncated
            try:
                total = count_packets(path, container, stream)
            except av.FFmpegError as exc:
                raise SampleError('corrupt_video', f'cannot read video {path}: {exc}') from None
        width, height = stream.codec_context.width, stream.codec_context.height
        kind = 'gif' if container.format.name == 'gif' else 'file'
        webp = container.format.name.startswith('webp')
        # FFmpeg's demuxers of one picture (a seek then decodes nothing: a JPEG was 'truncated')
        still = container.format.name == 'image2' or container.format.name.endswith('_pipe')
        codec = {'mjpeg': 'JPEG'}.get(stream.codec_context.name, stream.codec_context.name.upper())
    if not total:
        raise SampleError('empty_video', f'{path} has no frames')
    if not width or not height:
        raise SampleError('corrupt_video', f'{path}: the video stream has no frame size ({width}x{height})'
                                           + (': an animated WebP, which FFmpeg does not decode; convert it to MP4 '
                                              'or GIF' if webp else ''))
    if still:
        raise SampleError('image_as_video', f'{path} is a still image ({codec}), not a video: give it as an image')
    return VideoInfo(path, kind, total, fps or 1.0, (width, height), 0, total)


def _probe_folder(path: str, max_pixels: Optional[int], image_folder: Optional[str]) -> VideoInfo:
    """A frame folder's frames; each that is a symbolic link must stay inside ``image_folder`` (when given) as an
    image does (``unsafe_image_path``), and one that leads nowhere (a loop, a broken link) or to no regular file (a
    FIFO, socket or device) is ``corrupt_video`` rather than a frame silently left out. A sub-folder is not a frame."""
    with os.scandir(path) as entries:
        found = sorted((e for e in entries if e.name.lower().endswith(FRAME_EXTENSIONS)),
                       key=lambda e: _frame_key(e.name))
    names = []
    for entry in found:
        if entry.is_symlink():
            if not os.path.exists(entry.path):
                raise SampleError('corrupt_video', f'frame folder {path}: '
                                                   + why_missing(entry.path, f'frame {entry.name}'))
            if image_folder is not None:
                refuse_link_outside(entry.path, image_folder, f'frame {entry.name} of frame folder {path}')
        if entry.is_file():
            names.append(entry.name)
        elif not entry.is_dir():  # a FIFO (reading it would block), socket or device named as a frame
            raise SampleError('corrupt_video', f'frame folder {path}: '
                                               + why_missing(entry.path, f'frame {entry.name}'))
    if not names:
        raise SampleError('empty_video', f'frame folder {path} holds no image files ({", ".join(FRAME_EXTENSIONS)})')
    frames = tuple(os.path.join(path, n) for n in names)
    size = read_image_size(frames[0], max_pixels)
    return VideoInfo(path, 'folder', len(frames), None, size, 0, len(frames), frames)


def probe_video(path: str, clip: Optional[Tuple[float, float]] = None,
                max_pixels: Optional[int] = DEFAULT_MAX_IMAGE_PIXELS, image_folder: Optional[str] = None) -> VideoInfo:
    """The :class:`VideoInfo` of a video file or frame folder, from headers only. With ``clip`` (seconds) the
    clip's frames as InternVL counts them: ``start = int(start_s * fps)``, ``length = int((end_s - start_s) * fps)``.
    With ``image_folder`` a frame folder's frames may not be symbolic links out of it (the data set's rule for
    images, unless ``allow_links_outside``).

    Raises:
        SampleError: ``missing_video``, ``corrupt_video``, ``empty_video``, ``bad_clip``, ``image_too_large``,
            ``unsafe_image_path``.
    """
    if isinstance(path, VideoFrames):
        if not path.frames:
            raise SampleError('empty_video', f'{path} holds no frames')
        size = read_image_size(path.frames[0], max_pixels)
        info = VideoInfo(path, 'folder', len(path.frames), None, size, 0, len(path.frames), path.frames)
    elif not isinstance(path, VideoBytes) and os.path.isdir(path):
        info = _probe_folder(path, max_pixels, image_folder)
    elif isinstance(path, VideoBytes) or os.path.isfile(path):
        info = _probe_file(path)
    else:
        raise SampleError('missing_video', why_missing(path, 'video'))
    width, height = info.size
    if max_pixels is not None and width * height > max_pixels:
        raise SampleError('image_too_large', f'{path}: {width}x{height} frames are over the decompression-bomb '
                                             f'limit of {max_pixels} pixels')
    info = dataclasses.replace(info, max_pixels=max_pixels)   # every frame's limit (a codec may change the size)
    if clip is None:
        return info
    if info.kind == 'folder':
        raise SampleError('bad_clip', f'{path} is a folder of frames, which has no timing: "clip" needs a video file')
    # in frames; a clip of 1e308 s is past any video (its frame count would not be finite)
    start, length = (int(x) if math.isfinite(x) else info.total + 1
                     for x in (clip[0] * info.fps, (clip[1] - clip[0]) * info.fps))
    if length < 1 and start < info.total:
        raise SampleError('bad_clip', f'clip [{clip[0]:g}, {clip[1]:g}] s of {path} is shorter than one frame '
                                      f'({1 / info.fps:.3g} s at {info.fps:g} fps): no frame to take')
    if length < 1 or start + length > info.total:
        raise SampleError('bad_clip', f'clip [{clip[0]:g}, {clip[1]:g}] s is outside {path}, which is '
                                      f'{info.duration:.3f} s long ({info.total} frames at {info.fps:g} fps): frames '
                                      f'{start}..{start + length - 1} asked for')
    return dataclasses.replace(info, start=start, length=length)


def frames_for(info: VideoInfo, drawn: int, sample: str = 'rand', max_num: int = 32) -> int:
    """The frames a video gets: ``drawn`` (padded when the video is shorter), for a frame folder at most its frame
    count (InternVL's folder reader: all its frames when they are no more than ``drawn``, whatever ``sample``), for
    ``fpsX`` as many as that rate gives (at most ``max_num``)."""
    if info.kind == 'folder' and drawn >= info.length:
        return info.length
    if sample.startswith('fps'):
        return len(frame_indices(1, info.length, sample, input_fps=info.fps or 1.0, max_num_frames=max_num))
    return min(drawn, info.length) if info.kind == 'folder' else drawn


def choose_frames(info: VideoInfo, num_frames: int, sample: str = 'rand',
                  rng: Optional[np.random.Generator] = None) -> List[int]:
    """Frame numbers in the whole video (the clip's start added) of ``num_frames`` frames sampled in the clip."""
    if info.kind == 'folder' and num_frames >= info.length:   # InternVL's folder reader: all of them, once each
        return list(range(info.length))
    found = frame_indices(num_frames, info.length, sample, rng, input_fps=info.fps or 1.0,
                          max_num_frames=num_frames)
    return [info.start + i for i in found]


def read_frames(info: VideoInfo, indices: Sequence[int],
                max_decoded_pixels: Optional[int] = None) -> List[Image.Image]:
    """The frames ``indices`` (frame numbers, repeats allowed) as RGB images, in that order, decoding only those
    (each within ``info.max_pixels``; a file's, those decoded to reach them within ``max_decoded_pixels``)."""
    wanted = sorted(set(int(i) for i in indices))
    if wanted and not 0 <= wanted[0] <= wanted[-1] < info.total:
        raise ValueError(f'frames {wanted[0]}..{wanted[-1]} asked of {info.path}, which has {info.total}')
    if info.kind == 'folder':   # every frame within the data set's limit, not the first only (the probe's)
        got = {i: load_image(info.frames[i], info.max_pixels, name=f'{info.path} frame {i + 1}'
                              if isinstance(info.path, VideoFrames) else None) for i in wanted}
    else:
        got = {i: to_rgb(im) for i, im in decode_wanted(info, wanted, max_decoded_pixels).items()}
    return [got[int(i)] for i in indices]


def video_prompt(num_frames: int, prefix: str = DEFAULT_FRAME_PREFIX) -> str:
    """What ``<video>`` stands for: ``prefix`` (``{i}`` from 1) + ``<image>`` per frame, one line each."""
    return '\n'.join(prefix.format(i=i + 1) + IMAGE_PLACEHOLDER for i in range(int(num_frames)))


def video_turns(conversations: Any, has_video: bool) -> Any:
    """A sample's ``conversations`` with the ``<video>`` rule applied: a video sample gets ``<video>\\n`` prepended to
    its first human turn when no turn has the tag; the tag must then stand once, in the first human turn, with no
    ``<image>`` tag beside it. A sample without a video may not have ``<video>``. Malformed turns are left to the
    conversation parser. Raises ``video_tag_mismatch``."""
    if not isinstance(conversations, list):
        return conversations
    turns = [t for t in conversations if isinstance(t, dict) and isinstance(t.get('value'), str)]
    first = next((i for i, t in enumerate(conversations) if isinstance(t, dict) and t.get('from') == 'human'), None)
    tags = sum(t['value'].count(VIDEO_PLACEHOLDER) for t in turns)
    if not has_video:
        if tags:
            raise SampleError('video_tag_mismatch', f'the conversation has {tags} {VIDEO_PLACEHOLDER} tag(s) but the '
                                                    f'sample has no "video"')
        return conversations
    if first is None or not isinstance(conversations[first].get('value'), str):
        return conversations
    images = sum(t['value'].count(IMAGE_PLACEHOLDER) for t in turns)
    if images:
        raise SampleError('video_tag_mismatch', f'a video sample\'s turns contain {images} {IMAGE_PLACEHOLDER} '
                                                f'tag(s); its frames are written in place of {VIDEO_PLACEHOLDER}')
    if tags == 0:
        conversations = list(conversations)
        conversations[first] = dict(conversations[first],
                                    value=f'{VIDEO_PLACEHOLDER}\n' + conversations[first]['value'])
        return conversations
    in_first = conversations[first]['value'].count(VIDEO_PLACEHOLDER)
    if tags != 1 or in_first != 1:
        raise SampleError('video_tag_mismatch', f'the conversation has {tags} {VIDEO_PLACEHOLDER} tag(s), '
                                                f'{in_first} in the first human turn: one video, one tag there')
    return conversations


def expand_video(conversation, num_frames: int, prefix: str = DEFAULT_FRAME_PREFIX):
    """A parsed :class:`~xtuner_plugins.data.conversation.Conversation` with ``<video>`` written as
    :func:`video_prompt` of ``num_frames`` frames (``num_images`` then counts the frames)."""
    prompt = video_prompt(num_frames, prefix)
    turns = tuple((role, value.replace(VIDEO_PLACEHOLDER, prompt)) for role, value in conversation.turns)
    return dataclasses.replace(conversation, turns=turns, num_images=int(num_frames))


def load_video(path: str, num_frames: int = 8, sample: str = 'middle', clip: Optional[Tuple[float, float]] = None,
               max_pixels: Optional[int] = DEFAULT_MAX_IMAGE_PIXELS, rng: Optional[np.random.Generator] = None,
               check: Optional[Callable[[int], None]] = None,
               max_decoded_pixels: Optional[int] = None) -> Tuple[List[Image.Image], VideoInfo]:
    """``(frames, info)``: ``num_frames`` frames of a video (chat, evaluation, the web demo), ``middle`` by default;
    ``check(n)`` is called with the frames the video gives (a frame folder: at most its own) before one is chosen
    or decoded (a model's ``check_video``: ``--frames 1000000000`` listed a billion frame numbers first).
    ``max_decoded_pixels``: a video that would decode more pixels than this to reach the frames chosen is
    ``video_too_large``: a GIF (which cannot seek: every frame up to the last one chosen is decoded on its full
    canvas) before any is decoded, a file once its decoding passes it (the web demo's budget: a 460 kB GIF of
    20,000 frames on a 4000 x 4000 canvas held the model for 52 s, a 1 MB MP4 of one 4K keyframe and 30,000 frames
    that change nothing 58 s)."""
    info = probe_video(path, clip, max_pixels)
    n = frames_for(info, num_frames, check_sampling(sample), max_num=num_frames)
    if check is not None:
        check(n)
    wanted = choose_frames(info, n, sample, rng)
    if max_decoded_pixels is not None and info.kind == 'gif' and wanted:
        cost = (max(wanted) + 1) * info.size[0] * info.size[1]
        if cost > max_decoded_pixels:
            raise SampleError('video_too_large', f'{path}: a GIF of {info.total} frames of {info.size[0]}x'
                                                 f'{info.size[1]}: reaching frame {max(wanted) + 1} decodes '
                                                 f'{cost / 1e9:.1f} gigapixels (a GIF cannot seek), over the '
                                                 f'{max_decoded_pixels / 1e9:g} taken here; send a shorter or '
                                                 'smaller one, or a video file (MP4, WebM)')
    return read_frames(info, wanted, max_decoded_pixels), info
