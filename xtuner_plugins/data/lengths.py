"""Sample lengths for a length-grouped sampler, from image headers and text tokens, cached per file.

A sample's length is its text tokens (the template around its turns) plus, for each image,
``(tiles * num_image_token) + 2`` tokens (``<img>`` and ``</img>``), capped at ``max_length``; the tile
count comes from the image's size read from its file header (no pixels are decoded). Text-only samples
get a negative length so that XTuner's ``LengthGroupedSampler`` can keep modalities apart.

Reading 500k image headers takes minutes, so results are cached in one JSON file per annotation file,
keyed by everything that changes the numbers (the file's size and modification time, the image folder,
tiling settings, template and tokenizer) and checked against the size and modification time of every image
(one ``stat`` each): the samples whose images changed are computed again. A missing or unreadable image counts as zero image tokens
here; the sample is reported when it is loaded.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from typing import List, Optional

import numpy as np
from mmengine.dist import is_main_process
from mmengine.logging import print_log
from tqdm import tqdm

from .errors import SampleError
from .image_io import read_image_size
from .sources import DataSource, Record
from .tiling import num_tiles
from .tokenize import count_text_tokens

CACHE_VERSION = 6  # 2: tiles per sample stored beside the length; 3: image files and their stats; 4: pairs;
#                   5: control text in data refused or tokenised as plain text (allow_control_text); 6: videos


def default_cache_dir() -> str:
    base = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
    return os.path.join(base, 'xtuner_plugins', 'lengths')


def _cache_key(ds, src: DataSource) -> str:
    st = os.stat(src.annotation)
    tok = ds.tokenizer
    parts = dict(
        version=CACHE_VERSION, dataset=type(ds).__name__,   # a pair counts its longer answer
        annotation=os.path.abspath(src.annotation), size=st.st_size, mtime_ns=st.st_mtime_ns,
        image_folder=os.path.abspath(src.image_folder) if src.image_folder else None,
        max_dynamic_patch=src.max_dynamic_patch or ds.max_dynamic_patch,
        min_dynamic_patch=ds.min_dynamic_patch, dynamic=ds.dynamic_image_size,
        image_size=ds.image_size, thumbnail=ds.use_thumbnail, num_image_token=ds.num_image_token,
        max_length=ds.max_length, template=ds.template.name, system=ds.system,
        allow_control_text=getattr(ds, 'allow_control_text', False),
        video=[getattr(ds, 'min_num_frame', None), getattr(ds, 'max_num_frame', None),
               getattr(ds, 'video_sampling', None), getattr(ds, 'frame_prefix', None), getattr(ds, 'seed', None)],
        tokenizer=[type(tok).__name__, getattr(tok, 'name_or_path', ''), len(tok)])
    return hashlib.sha1(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def _sample_length(ds, record: Record, checked) -> List[int]:
    """``[signed length, tiles]`` of one checked record (tiles: 1 for the dummy tile of a text-only sample)."""
    if checked.video is not None:
        return _video_length(ds, record, checked)
    # a preference pair is as long as its longer answer (both share the prompt and the tiles)
    text = max(count_text_tokens(c, ds.tokenizer) for c in checked.conversations)
    image_tokens = 0
    all_tiles = 0
    max_num = ds.max_tiles_per_image(record, len(checked.image_paths))
    for path in checked.image_paths:
        try:
            width, height = read_image_size(path, ds.max_image_pixels)
        except SampleError:
            continue
        tiles = num_tiles(width, height, min(ds.min_dynamic_patch, max_num), max_num, ds.image_size,
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
    from .video import expand_video
    try:
        frames = ds.num_frames(record, ds.probe(checked))
    except SampleError:
        frames = 0
    conversations = [expand_video(c, frames, ds.frame_prefix) for c in checked.conversations]
    text = max(count_text_tokens(c, ds.tokenizer) for c in conversations)
    total = text + frames * (ds.num_image_token + 2)
    total = max(min(total, ds.max_length) if ds.max_length else total, 1)
    return [total, max(frames, 1)]


def _stats(files: List[List[str]]) -> List[list]:
    """``[size, mtime_ns]`` (or None: missing) of every image file, per record: what the lengths depend on."""
    out = []
    for record_files in files:
        row = []
        for path in record_files:
            try:
                st = os.stat(path)
                row.append([st.st_size, st.st_mtime_ns])
            except OSError:
                row.append(None)
        out.append(row)
    return out


def compute_source_lengths(ds, src: DataSource, records: List[Record],
                           cache_dir: Optional[str] = None) -> np.ndarray:
    """``[N, 2]``: signed length and tile count of each of one source's (valid) records, from the cache or
    computed and cached. The cache is keyed on the annotation file and the settings, and holds the size and
    modification time of every image it read: records whose images changed, appeared or vanished since are
    computed again (never a stale length); a cache that cannot be written is skipped with a warning."""
    cache_dir = cache_dir or ds.cache_dir or default_cache_dir()
    key = _cache_key(ds, src)
    cache_file = os.path.join(cache_dir, f'{key}.json')
    lines = [r.line for r in records]
    lengths, files, stale = None, None, range(len(records))
    if os.path.isfile(cache_file):
        try:
            with open(cache_file) as f:
                cached = json.load(f)
            if cached.get('lines') == lines and len(cached.get('images', ())) == len(records):
                lengths, files = [list(x) for x in cached['lengths']], cached['images']
                now = _stats(files)
                stale = [i for i, (a, b) in enumerate(zip(now, cached['stats'])) if a != b]
                if not stale:
                    return np.asarray(lengths, dtype=np.int64).reshape(-1, 2)
        except (OSError, ValueError, KeyError, TypeError):
            lengths, files, stale = None, None, range(len(records))  # unreadable cache: recompute
    if lengths is None:
        print_log(f'Computing sample lengths of {src.annotation} ({len(records)} samples; cached in {cache_file})',
                  logger='current')
        files, lengths = [None] * len(records), [None] * len(records)
    else:
        print_log(f'{src.annotation}: the images of {len(stale)} samples changed since the length cache was '
                  f'written; computing those again', logger='current')
    for i in tqdm(stale, desc=f'lengths {src.name}', disable=not is_main_process() or len(stale) < 2000):
        checked = ds.check_record(records[i])  # parsed and checked once: its image paths and its conversation
        files[i] = checked.image_paths if checked.video is None else [checked.video]
        lengths[i] = _sample_length(ds, records[i], checked)
    _write_cache(cache_dir, cache_file, dict(annotation=os.path.abspath(src.annotation), lines=lines,
                                             lengths=lengths, images=files, stats=_stats(files)))
    return np.asarray(lengths, dtype=np.int64).reshape(-1, 2)


def _write_cache(cache_dir: str, cache_file: str, content: dict) -> None:
    """Atomically (concurrent ranks never read a half-written cache); an optional cache that cannot be
    written (a full disk, no permission) is skipped with one warning, leaving no temporary file."""
    tmp = None
    try:
        os.makedirs(cache_dir, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=cache_dir, suffix='.tmp')
        with os.fdopen(fd, 'w') as f:
            json.dump(content, f)
        os.replace(tmp, cache_file)
    except OSError as exc:
        if tmp and os.path.exists(tmp):
            os.unlink(tmp)
        print_log(f'the sample-length cache {cache_file} could not be written ({exc}); going on without it',
                  logger='current', level=30)


class LengthStats:
    """Per-item lengths and tile counts of :class:`~xtuner_plugins.data.dataset.InternVLDataset` (which inherits
    this), computed once per source (:func:`compute_source_lengths`, cached) and read by the length-grouped sampler and
    packing; the class using it has ``tokenizer``, ``sources``, ``records``, ``_source_ranges``, ``_index`` and
    ``_lengths`` (None until computed)."""

    def _record_stats(self) -> np.ndarray:
        """``[records, 2]``: token length of every record (text plus image tokens, negative for text-only
        samples) and its number of tiles."""
        if self._lengths is None:
            if self.tokenizer is None:
                raise ValueError('sample lengths need a tokenizer')
            parts = []
            for src, rng in zip(self.sources, self._source_ranges):
                parts.append(compute_source_lengths(self, src, [self.records[i] for i in rng]))
            self._lengths = np.concatenate(parts) if parts else np.zeros((0, 2), dtype=np.int64)
        return self._lengths

    @property
    def modality_length(self) -> List[int]:
        """Per-item lengths, positive with images and negative without (XTuner's LengthGroupedSampler
        with ``length_property='modality_length'`` then keeps image and text-only batches apart)."""
        return self._record_stats()[self._index, 0].tolist()

    @property
    def length(self) -> List[int]:
        """Per-item lengths, all positive (groups by length with modalities mixed)."""
        return np.abs(self._record_stats()[self._index, 0]).tolist()

    @property
    def num_tiles_per_item(self) -> List[int]:
        """Per-item tile counts estimated from image headers (1 for a text-only sample's dummy tile)."""
        return self._record_stats()[self._index, 1].tolist()
