"""What training does with a sample that may not fit ``max_length``: one decision (:func:`fit_sample`), made the
same way for training (``InternVLDataset.load_sample``) and for ``tools/check_dataset.py``.

In order: the sample with its full tiles; while too long, fewer tiles per image (halving down to one, the
thumbnail kept): ``fewer_tiles``; at one tile per image, the text after the last image cut to ``max_length``
(never inside an image; ``too_long`` when the text and images up to the last image do not fit). A cut that takes
supervised tokens (an answer, or part of one) is a ``truncated`` sample: kept and counted with the tokens it lost
(``truncation='keep'``, the default) or dropped (``truncation='drop'``). A cut that takes only the unsupervised
``\\n`` after the last ``<|im_end|>`` is not a truncation. The data set decides what a cut means
(``InternVLDataset.judge_cut``; preference pairs have their own rules, ``data/preference.py``).

Only image sizes are needed (tile counts come from :func:`~xtuner_plugins.data.tile_grid.num_tiles`): the check tool
decides without cutting tiles, and training cuts exactly the tiles decided here.
"""

from __future__ import annotations

import logging
import numbers
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

from mmengine.logging import print_log

from xtuner_plugins.errors import Refused

from .errors import SampleError
from .template import IGNORE_INDEX
from .tokenize import CLIP_MARGIN, clip_chars, clips, tokenize_conversation

__all__ = ['Cut', 'Fit', 'checked_geometry', 'fit_sample', 'fit_video', 'final_answer', 'keep_or_drop',
           'judge_sft_cut', 'note_fit', 'tally_cut', 'tally_fit', 'TRUNCATION']

TRUNCATION = ('keep', 'drop')  # what a data set does with a sample whose answer max_length cuts


def final_answer(labels: Sequence[int]) -> Tuple[int, int]:
    """``(start, end)`` of the last run of supervised labels (the final answer and its stop word); ``(0, 0)``
    when nothing is supervised."""
    end = len(labels)
    while end > 0 and labels[end - 1] == IGNORE_INDEX:
        end -= 1
    start = end
    while start > 0 and labels[start - 1] != IGNORE_INDEX:
        start -= 1
    return start, end


def whole_number(value, least: int = 1) -> bool:
    """Whether ``value`` is a whole number (not a bool, not a float) of at least ``least``: a setting's check."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= least


def checked_geometry(max_length: Optional[int], image_size: int, patch_size: int, downsample_ratio: float,
                     num_image_token: Optional[int], max_image_pixels: Optional[int]) -> int:
    """The LLM tokens a tile takes (``num_image_token``, else the pixel shuffle of ``image_size / patch_size`` by
    ``downsample_ratio``), once the settings are checked: a value that can hold no sample is refused when the data set
    is built, not met as a raw error (a division by zero, "must be positive") at the first sample."""
    def bad(name, value, expected):
        return Refused(f'{name}={value!r}: {expected}')

    if not whole_number(image_size):   # (a ValueError of tile_grid at the first sample)
        raise bad('image_size', image_size, 'a whole number of pixels >= 1 (a tile\'s side)')
    if max_length is not None and not whole_number(max_length):
        raise bad('max_length', max_length, 'a whole number of tokens >= 1 (or None: no limit)')
    if max_image_pixels is not None and (isinstance(max_image_pixels, bool) or max_image_pixels < 1):
        raise bad('max_image_pixels', max_image_pixels, 'a number of pixels >= 1 (or None / 0 in check_dataset: no '
                                                        'limit)')
    if num_image_token is None:
        if not whole_number(patch_size):
            raise bad('patch_size', patch_size, 'a whole number of pixels >= 1')
        if not downsample_ratio > 0:
            raise bad('downsample_ratio', downsample_ratio, 'a number > 0 (0.5: InternVL\'s pixel shuffle)')
        num_image_token = int((image_size // patch_size) ** 2 * downsample_ratio ** 2)
        if num_image_token < 1:
            raise Refused(f'image_size={image_size}, patch_size={patch_size} and downsample_ratio='
                          f'{downsample_ratio:g} give a tile {num_image_token} LLM tokens: nothing of an image '
                          f'would reach the model')
    elif isinstance(num_image_token, bool) or int(num_image_token) != num_image_token or num_image_token < 1:
        raise bad('num_image_token', num_image_token, 'a whole number of LLM tokens per tile >= 1')
    return int(num_image_token)


@dataclass(frozen=True)
class Cut:
    """What ``max_length`` cut from one token sequence: its length and supervised tokens before and after, and
    those of its final answer."""

    length: int
    kept: int
    supervised: int
    supervised_kept: int
    answer: int
    answer_kept: int

    @classmethod
    def of(cls, full: Dict[str, List[int]], cut: Dict[str, List[int]]) -> 'Cut':
        def count(labels):
            start, end = final_answer(labels)
            return sum(x != IGNORE_INDEX for x in labels), end - start
        (sup, ans), (sup_kept, _) = count(full['labels']), count(cut['labels'])
        start = final_answer(full['labels'])[0]
        ans_kept = max(0, min(len(cut['labels']), start + ans) - start)
        return cls(len(full['input_ids']), len(cut['input_ids']), sup, sup_kept, ans, ans_kept)

    @property
    def lost(self) -> int:
        return self.length - self.kept

    @property
    def answer_cut(self) -> bool:
        """Whether the cut took supervised tokens (not only the unsupervised tail)."""
        return self.supervised_kept < self.supervised


@dataclass
class Fit:
    """A sample as training takes it: each conversation's ``input_ids``/``labels``, the tiles of each image,
    the tiles per image allowed, whether that is fewer than the sample's own, and each conversation's cut."""

    encoded: List[Dict[str, List[int]]]
    tiles: List[int]
    max_num: int
    reduced: bool
    cuts: List[Optional[Cut]] = field(default_factory=list)
    truncated: Optional[str] = None  # what was cut, when training keeps a sample whose answer was cut
    frames_of: Optional[int] = None  # a video's own frame count (``max_num`` is then the frames it keeps)

    @property
    def tokens_lost(self) -> int:
        return max((c.lost for c in self.cuts if c is not None), default=0)


def fit_sample(ds, record, checked, sizes: Sequence[Tuple[int, int]]) -> Fit:
    """The :class:`Fit` of a checked record whose images have ``sizes`` (``(width, height)`` each), for data set
    ``ds``; raises :class:`~xtuner_plugins.data.errors.SampleError` (``too_long``, ``no_supervised_tokens``,
    ``truncated`` with ``truncation='drop'``, and whatever ``ds.judge_cut`` refuses)."""
    conversations = checked.conversations
    own = max_num = ds.max_tiles_per_image(record, len(sizes))
    cuts: List[Optional[Cut]] = [None] * len(conversations)
    while True:
        tiles = [ds.tile_count(size, max_num) for size in sizes]
        counts = [t * ds.num_image_token for t in tiles]
        encoded = [tokenize_conversation(c, ds.tokenizer, counts, clip=ds.max_length) for c in conversations]
        if ds.max_length is None or all(len(e['input_ids']) <= ds.max_length for e in encoded):
            break
        if max_num <= 1 or all(t == 1 for t in tiles):  # as small as it gets: cut, or too_long
            full = encoded
            encoded = [tokenize_conversation(c, ds.tokenizer, counts, max_length=ds.max_length, clip=ds.max_length)
                       for c in conversations]
            cuts = [Cut.of(f, e) if len(f['input_ids']) > ds.max_length else None for f, e in zip(full, encoded)]
            break
        max_num = max(1, max_num // 2)
    fit = Fit(encoded, tiles, max_num, max_num < own, cuts)
    fit.truncated = _clip_noted(ds, conversations, ds.judge_cut(fit))
    return fit


def _clip_noted(ds, conversations, truncated: Optional[str]) -> Optional[str]:
    """A cut's description, saying when its counts are lower bounds: a turn too long to matter past max_length
    is clipped before it is tokenised (``tokenize.encode_turns``)."""
    if truncated and any(clips(ds.tokenizer, c, ds.max_length) for c in conversations):
        return (f'{truncated} (at least: a turn over {clip_chars(ds.tokenizer, ds.max_length) - CLIP_MARGIN} '
                f'characters is clipped before it is tokenised)')
    return truncated


def most_frames(ds, num_frames: int) -> int:
    """The most frames that might fit ``max_length``: each takes its ``<img>``, ``</img>`` and ``num_image_token``
    ``<IMG_CONTEXT>`` tokens at least. More are not encoded (``max_num_frame`` set to a million was a prompt of
    millions of tokens tokenized for every video sample at start-up)."""
    return num_frames if ds.max_length is None else ds.max_length // (ds.num_image_token + 2)


def fit_video(ds, record, checked, num_frames: int) -> Fit:
    """The :class:`Fit` of a checked video sample of ``num_frames`` frames (one tile each): while too long, fewer
    frames (the most that fit, sampled over the whole video: ``fewer_frames``), then, at one frame, the text after
    it cut as for images. ``max_num`` is the frames kept, ``frames_of`` the video's own count."""
    from .video import expand_video
    prefix = ds.frame_prefix

    def encode(n: int, max_length: Optional[int] = None):
        return [tokenize_conversation(expand_video(c, n, prefix), ds.tokenizer, [ds.num_image_token] * n,
                                      max_length=max_length, clip=ds.max_length) for c in checked.conversations]

    def fits(enc) -> bool:
        return ds.max_length is None or all(len(e['input_ids']) <= ds.max_length for e in enc)
    most = most_frames(ds, num_frames)
    n, encoded = num_frames, encode(num_frames) if num_frames <= most else None
    cuts: List[Optional[Cut]] = [None] * len(checked.conversations)
    if encoded is None or not fits(encoded):
        lo, hi = 0, min(num_frames - 1, most)  # the most frames in [1, hi] that fit: lo (0 = none does)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if fits(encode(mid)):
                lo = mid
            else:
                hi = mid - 1
        n = max(lo, 1)
        full = encode(n)
        if lo:
            encoded = full
        else:
            encoded = encode(1, ds.max_length)
            cuts = [Cut.of(f, e) if len(f['input_ids']) > ds.max_length else None for f, e in zip(full, encoded)]
    fit = Fit(encoded, [1] * n, n, n < num_frames, cuts, frames_of=num_frames)
    fit.truncated = _clip_noted(ds, checked.conversations, ds.judge_cut(fit))
    return fit


def keep_or_drop(ds, detail: str) -> str:
    """``detail`` of a cut answer, kept (``truncation='keep'``), or a ``truncated`` SampleError (``'drop'``)."""
    if ds.truncation == 'drop':
        raise SampleError('truncated', f"{detail} (truncation='drop')")
    return detail


def judge_sft_cut(ds, fit: Fit) -> Optional[str]:
    """What a cut means for one conversation: None when no supervised token was cut, else :func:`keep_or_drop`
    of what was cut."""
    cut = fit.cuts[0]
    if cut is None or not cut.answer_cut:
        return None
    return keep_or_drop(ds, f'{cut.length} tokens cut to max_length={ds.max_length}: {cut.lost} tokens lost, '
                            f'{cut.supervised - cut.supervised_kept} of its {cut.supervised} supervised')


def note_fit(ds, record, fit: Fit) -> dict:
    """An item's ``reduced`` and ``truncated`` entries (collated for ``BadSampleHook``), each counted in the data
    set (``ds.reduced``, ``ds.truncated``) and the first of each logged."""
    where, out = ds.where(record), {}
    if fit.reduced:
        out['reduced'] = [(where, fit.max_num)]
        cut_to = (f'{fit.max_num} of its {fit.frames_of} video frames' if fit.frames_of else
                  f'at most {fit.max_num} tiles per image')
        _count(ds.reduced, where, fit.max_num,
               f'{where}: too long for max_length={ds.max_length} with its tiles; reduced to {cut_to} '
               f'(first such sample; the rest are counted in dataset.reduced)')
    if fit.truncated:
        out['truncated'] = [(where, fit.tokens_lost, fit.truncated)]
        _count(ds.truncated, where, fit.tokens_lost,
               f'{where}: answer cut (first such sample; the rest are counted in dataset.truncated and '
               f"skipped_samples.json; truncation='drop' skips them): {fit.truncated} [truncated]")
    return out


def _count(counts: dict, where: str, value, first_message: str) -> None:
    """``counts[where] = value``, logging ``first_message`` (a warning) for the first sample counted."""
    if not counts:
        print_log(first_message, logger='current', level=logging.WARNING)
    counts[where] = value


def tally_frames(note: str, counts: dict, notes: list, where: str) -> None:
    """An image of several frames (``image_io.frame_note``'s ``note``, '' for one frame), for check_dataset (annotation
    files and shard sets alike): counted in ``counts``, and an ``animated_image`` note naming ``where``."""
    if note:
        counts['images of several frames (the first used)'] += 1
        notes.append(SampleError('animated_image', note).with_source(where))


def tally_fit(fit: Fit, counts: dict, notes: list, problems: list, where: str, of_tiles: int, max_length: int,
              allow_truncation: bool) -> None:
    """``tools/check_dataset.py``'s record of what ``max_length`` did to a sample training keeps (annotation files
    and shard sets alike): ``counts`` (kept, with fewer tiles, truncated), a ``fewer_tiles`` note, and a cut answer
    as a problem unless ``allow_truncation``."""
    if fit.reduced:
        counts['kept with fewer tiles'] += 1
        notes.append(SampleError('fewer_tiles', f'at most {fit.max_num} tiles per image (of {of_tiles}) to fit '
                                                f'--max-length {max_length}', where))
    tally_cut(fit, counts, problems, where, allow_truncation)


def tally_cut(fit: Fit, counts: dict, problems: list, where: str, allow_truncation: bool) -> None:
    """The part of :func:`tally_fit` images and videos share: a cut answer (a problem unless
    ``allow_truncation``), or a sample kept whole."""
    if fit.truncated:
        counts['kept truncated'] += 1
        if not allow_truncation:
            problems.append(SampleError('truncated', fit.truncated, where))
    if not fit.reduced and not fit.truncated:
        counts['kept'] += 1
