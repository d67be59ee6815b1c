"""What one record adds to the length cache: its signed length and tile count (``lengths.py``'s module docstring
says how they are counted), from its text tokens and its images' headers, its video's drawn frames, or the
``length_field`` it carries; and :class:`LengthSlice`, the lengths of a slice of records with their image files, as
the start-up check's pass (``startcheck.py``) or a pool process (:func:`length_slice`) sends them back.
"""

from __future__ import annotations

from array import array
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from .errors import SampleError
from .image_io import read_image_size
from .sources import Record
from .tile_grid import num_tiles
from .tokenize import count_text_tokens


def _image_size(ds, path: str, sizes: Optional[dict]) -> Optional[Tuple[int, int]]:
    """``(width, height)`` from the header of ``path``, None when it cannot be read; ``sizes`` (a pass's own
    dict) keeps each answer, so that samples sharing an image read its header once."""
    if sizes is not None and path in sizes:
        return sizes[path]
    try:
        size = read_image_size(path, ds.max_image_pixels)
    except SampleError:
        size = None
    if sizes is not None:
        sizes[path] = size
    return size


def _sample_length(ds, record: Record, checked, sizes: Optional[dict] = None) -> List[int]:
    """``[signed length, tiles]`` of one checked record (tiles: 1 for the dummy tile of a text-only sample);
    ``sizes``: image headers already read in this pass."""
    if checked.video is not None:
        return _video_length(ds, record, checked)
    # a preference pair is as long as its longer answer (both share the prompt and the tiles)
    text = max(count_text_tokens(c, ds.tokenizer, clip=ds.max_length) for c in checked.conversations)
    image_tokens = 0
    all_tiles = 0
    max_num = ds.max_tiles_per_image(record, len(checked.image_paths))
    for path in checked.image_paths:
        size = _image_size(ds, path, sizes)
        if size is None:
            continue
        tiles = num_tiles(size[0], size[1], min(ds.min_dynamic_patch, max_num), max_num, ds.image_size,
                          ds.use_thumbnail)
        image_tokens += tiles * ds.num_image_token + 2
        all_tiles += tiles
    total = text + image_tokens
    if ds.max_length:
        total = min(total, ds.max_length)
    total = max(total, 1)
    return [total, all_tiles] if checked.image_paths else [-total, 1]


def _video_length(ds, record: Record, checked) -> List[int]:
    """``[length, frames]`` of a video sample: its drawn frames, one tile each, and their ``Frame{i}:`` lines (an
    unreadable video: its text alone, reported when it is loaded)."""
    from .fitting import most_frames
    from .video import expand_video
    try:
        frames = ds.num_frames(record, ds.probe(checked))
    except SampleError:
        frames = 0
    if frames > most_frames(ds, frames):  # over max_length by its image tokens alone: not tokenized
        return [ds.max_length, frames]
    conversations = [expand_video(c, frames, ds.frame_prefix) for c in checked.conversations]
    text = max(count_text_tokens(c, ds.tokenizer, clip=ds.max_length) for c in conversations)
    total = text + frames * (ds.num_image_token + 2)
    total = max(min(total, ds.max_length) if ds.max_length else total, 1)
    return [total, max(frames, 1)]


MOST_LENGTH = 1 << 62   # a length field from here on is no length (with no max_length to cap it, it overflowed)


def _field_length(ds, sample: dict) -> Optional[List[int]]:
    """``[signed length, tiles]`` from the ``length_field`` a sample carries (tiles: one per image), or None (counted
    instead) where it is no count of tokens."""
    given = sample.get(ds.length_field)
    if not isinstance(given, int) or isinstance(given, bool) or not 0 < given < MOST_LENGTH:
        return None
    total = max(1, min(given, ds.max_length) if ds.max_length else given)
    images = sample.get('image')
    images = [images] if isinstance(images, str) else images if isinstance(images, list) else []
    media = bool(images) or sample.get('video') is not None
    return [total, max(1, len(images))] if media else [-total, 1]


def _checked(ds, record: Record):
    """``ds.check_record(record)`` of a record that passed the start-up check. That check may have been read from
    the cache (a warm start checks no sample), so an image made a symbolic link out of its folder since is refused
    here: the sample is checked again as if links were allowed, for the length it would have and its files watched
    as any other's (loading skips it as ``unsafe_image_path``). Its refusal stopped the start with a traceback."""
    try:
        return ds.check_record(record)
    except SampleError as err:
        if err.reason != 'unsafe_image_path' or ds.allow_links_outside:
            raise
    ds.allow_links_outside = True
    try:
        return ds.check_record(record)
    finally:
        ds.allow_links_outside = False


class LengthSlice:
    """The lengths of a slice of records, added one by one (by the start-up check's pass, ``startcheck.py``, or
    :func:`length_slice`), with their image files as the slice's own table: compact to send back from a pool
    process. Each distinct image's header is read once in the slice (samples share images)."""

    def __init__(self, ds):
        self.ds = ds
        self.rows = array('q')    # length, tiles, ... (flat: 16 bytes a record, no Python list per record)
        self.counts = array('q')
        self.table: Dict[str, int] = {}
        self.ids = array('q')
        self.sizes: Dict[str, Optional[Tuple[int, int]]] = {}

    def add(self, record: Record, checked=None) -> None:
        """Add ``record`` (``checked``: its ``check_record``, when the caller has it). A ``length_field`` the data
        carries is taken as it is (no tokenising, no image header read)."""
        ds = self.ds
        if getattr(ds, 'length_field', None):  # the start-up check passed it: its JSON and fields are read
            row = _field_length(ds, checked.sample if checked is not None else ds.parse(record))
            if row is not None:
                self.rows.extend(row)
                self.counts.append(0)
                return
        if checked is None:
            checked = _checked(ds, record)  # parsed and checked once: its image paths and its conversation
        files = checked.image_paths if checked.video is None else [checked.video]
        self.counts.append(len(files))
        self.ids.extend(self.table.setdefault(path, len(self.table)) for path in files)
        self.rows.extend(_sample_length(ds, record, checked, self.sizes))

    def result(self):
        """``([n, 2] lengths, paths, counts, ids)``: each record's number of files (``counts``) and their places
        in ``paths`` (``ids``)."""
        return (np.array(self.rows, dtype=np.int64).reshape(-1, 2), list(self.table),
                np.array(self.counts, dtype=np.int64), np.array(self.ids, dtype=np.int64))


def length_slice(ds, records: Sequence[Record], todo: Sequence[int]):
    """:meth:`LengthSlice.result` of the records at ``todo``."""
    part = LengthSlice(ds)
    for i in todo:
        part.add(records[i])
    return part.result()
