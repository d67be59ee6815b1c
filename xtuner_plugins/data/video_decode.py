"""Decoding a video file's frames with PyAV: opening it (:func:`open_stream`), counting its packets, seeking to the
frames asked for and decoding only what reaches them (:func:`decode_wanted`), turning them upright as decord does
(:func:`upright`). ``video.py`` probes videos, samples their frames and calls this; see its docstring for the rules.
"""

from __future__ import annotations

import bisect
import io
import math
import os
import re
from typing import Dict, List, Optional, Tuple

from PIL import Image

from .errors import SampleError

__all__ = ['VideoBytes', 'av_module', 'open_stream', 'count_packets', 'clockwise_turn', 'upright', 'decode_wanted']


class VideoBytes(str):
    """A video file's bytes held in memory (a tar shard's member, ``data/shards.py``), read as the file would be;
    the string is its name in messages (``SHARD:KEY.video.mp4``)."""

    def __new__(cls, name: str, data: bytes) -> 'VideoBytes':
        self = super().__new__(cls, name)
        self.data = data
        return self

    def __reduce__(self):
        return VideoBytes, (str(self), self.data)


def av_module():
    try:
        import av
    except ImportError as exc:  # pragma: no cover - av is in requirements.txt
        raise ImportError('reading videos needs PyAV: pip install av (see requirements.txt)') from exc
    return av


def open_stream(path: str):
    """``(container, video stream)``; ``corrupt_video`` when FFmpeg cannot read it or it has no video stream."""
    av = av_module()
    try:
        # an absolute path: FFmpeg reads 'clip:1.mp4' or 'pipe:0' as a protocol's URL (a file named pipe:0 read stdin)
        container = av.open(io.BytesIO(path.data) if isinstance(path, VideoBytes) else os.path.abspath(path))
    except (av.FFmpegError, OSError, UnicodeDecodeError, ValueError) as exc:
        size = len(path.data) if isinstance(path, VideoBytes) else os.stat(path).st_size if os.path.isfile(path) else -1
        raise SampleError('corrupt_video', f'video {path} is an empty file (0 bytes): a download or copy that did not '
                                           f'finish?' if not size else f'cannot read video {path}: {exc}') from None
    if not container.streams.video:
        container.close()
        raise SampleError('corrupt_video', f'{path} has no video stream')
    stream = container.streams.best('video') or container.streams.video[0]   # FFmpeg's choice, as decord's
    if stream.codec_context is None:   # a stream FFmpeg knows but cannot decode (an SVG: its svg_pipe demuxer)
        kind = container.format.name
        container.close()
        raise SampleError('corrupt_video', f'{path}: FFmpeg has no decoder for its {kind} stream: not a video it '
                                           f'reads (convert it to MP4 or GIF)')
    stream.thread_count = 1
    return container, stream


#: packets counted per video file (path, size, modification time): counting reads the whole file, and a sample's
#: video is probed at every load
_COUNTED: Dict[Tuple[str, int, int], int] = {}


def count_packets(path, container, stream) -> int:
    """The stream's frames, counted from its packets (read, not decoded), once per file as it is."""
    key = None
    if isinstance(path, str) and not isinstance(path, VideoBytes):   # a shard's bytes: counted each time
        try:
            st = os.stat(path)
            key = (os.path.abspath(path), st.st_size, st.st_mtime_ns)
        except OSError:
            pass
        if key in _COUNTED:
            return _COUNTED[key]
    total = sum(1 for p in container.demux(stream) if p.size and not p.is_discard)
    if key is not None:
        if len(_COUNTED) >= 65536:
            _COUNTED.clear()
        _COUNTED[key] = total
    return total


def _frame_stamps(container, stream) -> Tuple[Optional[List[int]], List[int]]:
    """``(stamps, keys)``: the presentation timestamps of the stream's frames, in order, and those of its keyframes,
    from its packets (read, not decoded): frame ``i`` is the one stamped ``stamps[i]``, whatever the gaps (a variable
    frame rate). ``(None, [])`` when a packet has no timestamp (the frames are then placed at the average rate)."""
    stamps, keys = [], []
    for packet in container.demux(stream):
        if not packet.size or packet.is_discard:  # the end-of-stream packet; a packet an edit list drops
            continue
        stamp = packet.pts if packet.pts is not None else packet.dts
        if stamp is None:
            return None, []
        stamps.append(int(stamp))
        if packet.is_keyframe:
            keys.append(int(stamp))
    return sorted(stamps), sorted(keys)


#: decord's turns, degrees clockwise (its ``transpose`` filters), as Pillow's counter-clockwise transposes
_TURNS = {90: Image.Transpose.ROTATE_270, 180: Image.Transpose.ROTATE_180, 270: Image.Transpose.ROTATE_90}


_LEADING_NUMBER = re.compile(r'\s*[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?')   # what C's atof reads


def clockwise_turn(frame, rotate_tag: Optional[str] = None) -> int:
    """The turn decord gives a decoded PyAV frame, whole degrees clockwise (0: none), by decord's ``GetRotation``:
    the stream's ``rotate`` tag when set and not "0" (read as ``atof``), else the display matrix's rotation negated;
    taken modulo 360 and truncated (a horizontal flip alone reads as 180). The matrix's rotation is PyAV's
    ``frame.rotation``, whole degrees counter-clockwise: decord truncates the clockwise angle of the exact one, so
    the two differ for a matrix within a degree of a right angle and not on one (89.6 degrees: decord turns it,
    this does not; phones write exact right angles). ``frame.side_data``, which holds the exact matrix, is not
    read: it makes a reference cycle with the frame, whose FFmpeg scaler threads a forked DataLoader worker's
    garbage collection then freed, and hung on (seen in CI). decord reads the stream's matrix; FFmpeg puts it on
    each frame (and a frame's own orientation SEI there too, which decord does not read)."""
    found = _LEADING_NUMBER.match(rotate_tag) if rotate_tag and rotate_tag != '0' else None
    theta = float(found.group(0)) if found else 0.0
    if not theta:
        theta = -float(getattr(frame, 'rotation', 0) or 0)
    if not math.isfinite(theta):
        return 0
    theta = math.fmod(theta, 360)
    return int(theta + 360 if theta < 0 else theta)


def upright(frame, rotate_tag: Optional[str] = None) -> Image.Image:
    """A decoded PyAV frame as an image turned by :func:`clockwise_turn` when that is 90, 180 or 270 (decord's
    rule; other angles are left as stored, and the flips of a matrix are not applied as flips)."""
    image = frame.to_image()
    turn = _TURNS.get(clockwise_turn(frame, rotate_tag))
    return image if turn is None else image.transpose(turn)


class _Unplaced(Exception):
    """A file whose frames, decoded after a seek, are not where its packets' timestamps place them (an MPEG-TS or
    MPEG-PS file, which FFmpeg seeks by decode time; H.264 with B-frames in an AVI, whose frames' stamps are not in
    the order shown): read in order instead (:func:`_decode_in_order`)."""


def _rotate_tag(stream) -> Optional[str]:
    """The stream's ``rotate`` tag, which decord reads first (av_dict_get, any case: Matroska keeps it as ROTATE)."""
    return next((v for k, v in stream.metadata.items() if k.lower() == 'rotate'), None)


def decode_wanted(info, wanted: List[int], max_decoded_pixels: Optional[int] = None) -> dict:
    """``{frame number: RGB image}`` of the frames ``wanted`` (sorted, unique) of ``info`` (``video.VideoInfo``):
    by seeking (:func:`_decode_seeking`), or, where the frames a seek gives are not the ones the timestamps place
    (the frame a seek lands on shown after the one asked for with no earlier keyframe to try; a frame's stamp out of
    the packets' order; the stream ending after a seek), by decoding from the start, frame ``i`` the ``i``-th shown
    (:func:`_decode_in_order`). The next frame shown is never taken in the place of the one asked for: an MPEG-TS
    file gave its 13th frame for each of its first 12, and H.264 with B-frames in an AVI frame 1 for frame 2."""
    try:
        return _decode_seeking(info, wanted, max_decoded_pixels)
    except _Unplaced:
        return _decode_in_order(info, wanted, max_decoded_pixels)


def _decode_in_order(info, wanted: List[int], max_decoded_pixels: Optional[int] = None) -> dict:
    """:func:`decode_wanted`'s frames decoded from the start without a seek, frame ``i`` the ``i``-th the decoder
    shows (its stamps are not read)."""
    av = av_module()
    out: dict = {}
    k, decoded = 0, 0
    container, stream = open_stream(info.path)
    with container:
        tag = _rotate_tag(stream)
        try:
            for order, frame in enumerate(container.decode(stream)):
                decoded += _frame_pixels(info, frame, wanted[k], decoded, max_decoded_pixels)
                if order == wanted[k]:
                    out[order] = upright(frame, tag)
                    k += 1
                    if k == len(wanted):
                        break
        except av.FFmpegError as exc:
            raise _undecodable(info, wanted[k], exc) from None
    if k < len(wanted):
        raise _truncated(info, wanted[k])
    return out


def _decode_seeking(info, wanted: List[int], max_decoded_pixels: Optional[int] = None) -> dict:
    """``{frame number: RGB image}`` of the frames ``wanted`` (sorted, unique) of ``info`` (``video.VideoInfo``),
    seeking in a seekable file to the keyframe before a frame where a keyframe lies between the last frame decoded
    and it (by the keyframes' packets' stamps; one keyframe for a whole file: decoding on, never from the start
    again; without stamps, where the frame is further ahead than the longest keyframe interval seen), else decoding
    on. Frame ``i`` of a file is the one with the ``i``-th presentation timestamp (:func:`_frame_stamps`), so a
    variable frame rate gives the frames asked for; a GIF's frames go by order.

    A seek lands on a keyframe by its decode time, and with B-frames the frames shown just before that keyframe
    may need the one before it (an open GOP, MPEG-4 Part 2's B-frames): the decoder drops them. A frame asked for
    that did not come out is sought again from an earlier keyframe (twice at most; then :class:`_Unplaced`, as for
    a frame whose stamp is not the next one the packets have, or a stream that ends after a seek before the frame
    asked for: the caller reads the file in order). Each decoded frame is checked against ``info.max_pixels`` (a
    codec may change the frame size mid-stream) and counted against ``max_decoded_pixels`` (``video_too_large``: a
    file of one keyframe and thousands of frames decodes them all to reach the last one asked for)."""
    av = av_module()
    out: dict = {}
    container, stream = open_stream(info.path)
    with container:
        tb = float(stream.time_base or 0) or 1.0 / info.fps
        origin = stream.start_time or 0
        step = 1.0 / (info.fps * tb)  # one frame at the average rate, in timestamp units
        try:
            stamps, keys = _frame_stamps(container, stream) if info.kind != 'gif' else (None, [])
        except av.FFmpegError as exc:
            raise SampleError('corrupt_video', f'cannot read video {info.path}: {exc}') from None
        if stamps is not None and wanted[-1] >= len(stamps):
            raise SampleError('corrupt_video', f'{info.path} is truncated: it says {info.total} frames '
                                               f'({info.duration:.3f} s) but holds {len(stamps)}: frame '
                                               f'{wanted[-1]} cannot be decoded')
        slack = step / 2 if stamps is None else 0  # exact stamps: the frame itself, not its neighbour
        tag = _rotate_tag(stream)
        place = None if stamps is None else {s: i for i, s in enumerate(stamps)}   # a stamp's frame number

        def stamp(i: int) -> float:
            return stamps[i] if stamps is not None else origin + i * step

        def far(target: float) -> bool:   # whether a seek skips decoding to reach ``target``
            if info.kind == 'gif':
                return False
            if keys:   # a keyframe after what was decoded and not after the target (one keyframe: never)
                at = bisect.bisect_right(keys, target) - 1
                return at >= 0 and keys[at] > pos
            return target - pos > max(gop, 2 * step)
        k, frames, gop, last_key, pos, order, sought, decoded = 0, None, 0.0, None, None, -1, 0, 0
        again, point, retries = None, None, 0   # again: an earlier keyframe to seek from, for wanted[k]
        shown = None   # the frame number of the last frame decoded since the last seek (exact stamps)
        try:
            while k < len(wanted):
                target = stamp(wanted[k])
                if frames is None or again is not None or far(target):
                    if info.kind != 'gif':
                        point = target if again is None else again
                        container.seek(int(point), stream=stream, backward=True, any_frame=False)
                    frames, last_key, order, sought, again = container.decode(stream), None, -1, k, None
                    shown = None
                for frame in frames:
                    order += 1
                    decoded += _frame_pixels(info, frame, wanted[k], decoded, max_decoded_pixels)
                    pos = order * step + origin if info.kind == 'gif' or frame.pts is None else frame.pts
                    if frame.key_frame:
                        gop = max(gop, pos - last_key) if last_key is not None else gop
                        last_key = pos
                    elif last_key is not None:
                        gop = max(gop, pos - last_key)
                    if place is not None:   # each frame decoded the one after the last, by the packets' stamps
                        number = place.get(pos)
                        if number is None or (shown is not None and number != shown + 1):
                            raise _Unplaced()
                        shown = number
                    if stamps is not None and pos > stamp(wanted[k]):   # it did not come out
                        again = max((key for key in keys if key < point), default=None) if retries < 2 else None
                        if again is None:
                            raise _Unplaced()
                        retries += 1
                        break
                    while k < len(wanted) and pos + slack >= stamp(wanted[k]):
                        out[wanted[k]] = upright(frame, tag)
                        k, retries = k + 1, 0
                    if k == len(wanted) or (k > sought and far(stamp(wanted[k]))):
                        break
                else:   # the stream ended
                    if stamps is not None:   # before a frame its packets hold (checked above): a seek gone past
                        raise _Unplaced()
                    break
        except av.FFmpegError as exc:
            raise _undecodable(info, wanted[k], exc) from None
    if k < len(wanted):
        raise _truncated(info, wanted[k])
    return out


def _undecodable(info, number: int, exc) -> SampleError:
    return SampleError('corrupt_video', f'cannot decode {info.path} (frame {number} of {info.total}): {exc}')


def _truncated(info, number: int) -> SampleError:
    return SampleError('corrupt_video', f'{info.path} is truncated: it says {info.total} frames'
                                        + (f' ({info.duration:.3f} s)' if info.fps else '')
                                        + f' but frame {number} cannot be decoded')


def _frame_pixels(info, frame, number: int, decoded: int, budget: Optional[int]) -> int:
    """A decoded frame's pixels, checked against ``info.max_pixels`` (before it is converted) and, with those
    ``decoded`` before it, against ``budget``."""
    pixels = frame.width * frame.height
    if info.max_pixels is not None and pixels > info.max_pixels:
        raise SampleError('image_too_large', f'{info.path}: a {frame.width}x{frame.height} frame (the stream '
                                             f'says {info.size[0]}x{info.size[1]}) is over the decompression-bomb '
                                             f'limit of {info.max_pixels} pixels')
    if budget is not None and decoded + pixels > budget:
        raise SampleError('video_too_large', f'{info.path}: reaching frame {number + 1} of {info.total} decodes '
                                             f'over {budget / 1e9:g} gigapixels, the most taken here (frames are '
                                             f'decoded from the keyframe before each one used: this video has few '
                                             f'keyframes); send a shorter or smaller video, or one with more '
                                             f'keyframes')
    return pixels
