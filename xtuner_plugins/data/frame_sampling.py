"""Which frames of a video a sample gets: InternVL 2.5's sampling, the frame count drawn per sample.

Sampling is InternVL 2.5's ``get_frame_indices`` (:func:`frame_indices`): ``rand`` (training), ``middle``
(evaluation), ``fpsX``. The number of frames is drawn in ``[min_num_frame, max_num_frame]`` per sample by
:func:`draw_num_frames`, from the seed and the sample's place only (the same in every epoch, so the length cache
holds); the frame positions that ``rand`` picks come from the seed, the epoch and the sample (:func:`frame_rng`).
A probed video's frames (its clip, a frame folder's count): :func:`xtuner_plugins.data.video.choose_frames`.
"""

from __future__ import annotations

import math
from typing import List, Optional

import numpy as np

from xtuner_plugins.errors import Refused

__all__ = ['check_sampling', 'frame_indices', 'draw_num_frames', 'frame_rng']


def check_sampling(sample: str) -> str:
    """``sample`` if it is ``rand``, ``middle`` or ``fpsX`` (X > 0, and 1 / X a finite number of seconds), else
    :class:`~xtuner_plugins.errors.Refused` (a ``ValueError``; ``fpsinf`` was a ZeroDivisionError when a video was
    sampled, ``fps1e-320`` numpy's "arange: cannot compute length")."""
    if sample in ('rand', 'middle'):
        return sample
    try:
        rate = float(sample[3:]) if isinstance(sample, str) and sample.startswith('fps') else 0.0
    except ValueError:
        rate = 0.0
    if 0 < rate < math.inf and 1.0 / rate < math.inf:
        return sample
    raise Refused(f'video_sampling={sample!r}: unknown frame sampling; use rand, middle or fpsX (fps0.5: one frame '
                  'every 2 s)')


def frame_indices(num_frames: int, vlen: int, sample: str = 'rand', rng: Optional[np.random.Generator] = None,
                  input_fps: float = 1.0, max_num_frames: int = -1) -> List[int]:
    """InternVL's ``get_frame_indices`` (0-based, within ``vlen`` frames).

    ``rand``/``middle``: ``acc = min(num_frames, vlen)`` intervals ``np.linspace(0, vlen, acc + 1).astype(int)``,
    ranges ``(lo, hi) = (intervals[i], intervals[i + 1] - 1)``; ``middle`` takes ``(lo + hi) // 2``, ``rand`` one of
    ``range(lo, hi)`` each (when any such range is empty: the first ``acc`` of a random permutation, sorted); fewer
    than ``num_frames`` are padded with the last. ``fpsX``: one frame every ``1/X`` s at the middle of its span,
    ``round(t * input_fps)``, those below ``vlen``, at most ``max_num_frames`` (at least the first frame).
    """
    check_sampling(sample)
    if vlen < 1 or num_frames < 1:
        raise ValueError(f'need vlen >= 1 and num_frames >= 1, got {vlen} and {num_frames}')
    if sample.startswith('fps'):
        delta = 1.0 / float(sample[3:])
        end = vlen / input_fps + delta / 2
        if max_num_frames > 0:  # no more than max_num_frames times (fps1e9 was a 30 GB array for a 4 s video)
            end = min(end, delta / 2 + delta * max_num_frames)
        seconds = np.arange(delta / 2, end, delta)
        out = [int(i) for i in np.around(seconds * input_fps).astype(int) if i < vlen]
        if max_num_frames > 0:
            out = out[:max_num_frames]
        return out or [0]
    acc = min(num_frames, vlen)
    intervals = np.linspace(0, vlen, acc + 1).astype(int)
    ranges = [(int(intervals[i]), int(intervals[i + 1]) - 1) for i in range(acc)]
    if sample == 'middle':
        out = [(lo + hi) // 2 for lo, hi in ranges]
    else:
        rng = rng if rng is not None else np.random.default_rng()
        if all(lo < hi for lo, hi in ranges):
            out = [int(rng.integers(lo, hi)) for lo, hi in ranges]
        else:
            out = sorted(int(i) for i in rng.permutation(vlen)[:acc])
    return out + [out[-1]] * (num_frames - len(out))


def draw_num_frames(min_num: int, max_num: int, seed: int, *key: int) -> int:
    """The number of frames of a sample, uniform in ``[min_num, max_num]``, from ``seed`` and ``key`` (the sample's
    source and line) only: the same in every epoch and process."""
    if not 1 <= min_num <= max_num:
        raise ValueError(f'need 1 <= min_num_frame <= max_num_frame, got {min_num} and {max_num}')
    return int(np.random.default_rng([int(seed), 0x51DE0, *map(int, key)]).integers(min_num, max_num + 1))


def frame_rng(seed: int, epoch: int, *key: int) -> np.random.Generator:
    """The generator ``rand`` sampling draws a sample's frame positions from: ``(seed, epoch, key)``."""
    return np.random.default_rng([int(seed), int(epoch), 0xF4A3E, *map(int, key)])
