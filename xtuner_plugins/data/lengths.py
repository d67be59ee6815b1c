"""Sample lengths for a length-grouped sampler, from image headers and text tokens, cached per file.

A sample's length is its text tokens (the template around its turns) plus, for each image,
``(tiles * num_image_token) + 2`` tokens (``<img>`` and ``</img>``), capped at ``max_length``; the tile
count comes from the image's size read from its file header (no pixels are decoded). Text-only samples
get a negative length so that XTuner's ``LengthGroupedSampler`` can keep modalities apart.

Reading 500k image headers and tokenising their text takes minutes, so it is done once per node over every core
(``nodepass.py``: the first process to need it builds, the others wait on a file lock), in the start-up check's
own pass (``startcheck.py``: each sample parsed and checked once, each distinct image's header read once a slice,
the repeated turns of a template tokenised once, ``tokenize.py``) and cached as ``.npy``
files per annotation file (memory-mapped: a 16M-sample cache loads in a moment), keyed by everything that changes
the numbers (the file's size, modification time, inode and change time, the image folder, tiling settings, template
and what the tokenizer does: :func:`tokenizer_fingerprint`) and checked against the size and modification time of
every distinct image file (one ``stat`` each): the samples whose images changed are computed again. A missing or
unreadable image counts as zero image tokens here; the sample is reported when it is loaded. With ``length_field``
set (InternVL's ``length``), a sample carrying that field is given it as its length, untokenised (for the
length-grouped sampler; packing needs exact lengths). One record's length, and a slice's: ``record_lengths.py``;
here, the cache and :class:`LengthStats`, which the data set inherits.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from mmengine.logging import print_log

from xtuner_plugins.filemodes import file_mode

from .index import file_identity, load_array, save_array
from .nodepass import node_once, run_slices
from .record_lengths import length_slice
from .sources import DataSource, Record

CACHE_VERSION = 9  # 2: tiles per sample stored beside the length; 3: image files and their stats; 4: pairs;
#                   5: control text in data refused or tokenised as plain text (allow_control_text); 6: videos;
#                   7: binary (.npy), the start-up check beside it, length_field; 8: control text's pieces go on
#                   from each other (SentencePiece: no word start between them); 9: a top-level "system" counted


def default_cache_dir() -> str:
    base = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
    return os.path.join(base, 'xtuner_plugins', 'lengths')


#: text a tokenizer is tried on for its fingerprint: word starts after specials, spaces, digits, non-Latin text
PROBE = '<|im_start|>user\n  Hello world! 12345 naïve 東京 \t<image>\n<|im_end|>'


def tokenizer_fingerprint(tok) -> str:
    """A digest of what a tokenizer does, not where it was loaded from: its whole ``tokenizer.json`` (vocabulary,
    merges, normalizer, pre-tokenizer, added tokens) or a slow tokenizer's vocabulary and SentencePiece model, its
    settings other than file paths, and the ids of :data:`PROBE`. Its path and size were the cache key: merges cut
    to a twentieth in the same folder kept both, and every cached length was stale (packs 41 % over max_tokens).
    Computed once per tokenizer object."""
    known = getattr(tok, '_xtuner_plugins_fingerprint', None)
    if known:
        return known
    digest = hashlib.sha1()
    backend = getattr(tok, 'backend_tokenizer', None)
    if backend is not None:
        digest.update(backend.to_str().encode('utf-8'))
    else:
        digest.update(json.dumps(sorted(tok.get_vocab().items())).encode('utf-8'))
        sp_model = getattr(tok, 'sp_model', None)
        if sp_model is not None and hasattr(sp_model, 'serialized_model_proto'):
            digest.update(sp_model.serialized_model_proto())
    settings = {k: v for k, v in (getattr(tok, 'init_kwargs', None) or {}).items()
                if not (k.endswith('_file') or k.endswith('name_or_path') or k == 'chat_template')}
    digest.update(json.dumps(settings, sort_keys=True, default=str).encode('utf-8'))
    digest.update(json.dumps(tok(PROBE, add_special_tokens=True)['input_ids']).encode('utf-8'))
    known = digest.hexdigest()
    try:
        tok._xtuner_plugins_fingerprint = known
    except AttributeError:   # a tokenizer that takes no attributes: computed again next time
        pass
    return known


def _cache_key(ds, src: DataSource) -> str:
    st = os.stat(src.annotation)
    tok = ds.tokenizer
    parts = dict(
        version=CACHE_VERSION, dataset=type(ds).__name__,   # a pair counts its longer answer
        annotation=os.path.abspath(src.annotation), **file_identity(st),
        image_folder=os.path.abspath(src.image_folder) if src.image_folder else None,
        max_dynamic_patch=src.max_dynamic_patch or ds.max_dynamic_patch,
        min_dynamic_patch=ds.min_dynamic_patch, dynamic=ds.dynamic_image_size,
        image_size=ds.image_size, thumbnail=ds.use_thumbnail, num_image_token=ds.num_image_token,
        max_length=ds.max_length, template=ds.template.name, system=ds.system,
        allow_control_text=getattr(ds, 'allow_control_text', False), length_field=getattr(ds, 'length_field', None),
        allow_links_outside=getattr(ds, 'allow_links_outside', False),
        max_image_pixels=getattr(ds, 'max_image_pixels', None),  # an image over it counts no tiles
        video=[getattr(ds, 'min_num_frame', None), getattr(ds, 'max_num_frame', None),
               getattr(ds, 'video_sampling', None), getattr(ds, 'frame_prefix', None), getattr(ds, 'seed', None)],
        tokenizer=None if tok is None else [type(tok).__name__, tokenizer_fingerprint(tok), len(tok)])
    return hashlib.sha1(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def _stat(path: str) -> List[int]:
    try:
        st = os.stat(path)
        return [st.st_size, st.st_mtime_ns]
    except OSError:
        return [-1, -1]


def lines_digest(lines: np.ndarray) -> str:
    """What a length cache is of: the LINE of each of its records, in order."""
    return hashlib.sha1(np.ascontiguousarray(lines, dtype=np.int64).tobytes()).hexdigest()


def _lines_digest(records: Sequence[Record]) -> str:
    known = records.lines_digest() if hasattr(records, 'lines_digest') else None  # the start-up check's
    return known or lines_digest(records.lines() if hasattr(records, 'lines')
                                 else np.asarray([r.line for r in records], dtype=np.int64))


def _load_cache(base: str, count: int, digest: str):
    """``(lengths, paths, stats, refs, ids)`` of a cache matching these records, or None."""
    try:
        with open(base + '.images.json', encoding='utf-8') as f:
            meta = json.load(f)
        if meta.get('count') != count or meta.get('lines') != digest:
            return None
        arrays = [load_array(base + suffix) for suffix in ('.lengths.npy', '.refs.npy', '.ids.npy')]
    except (OSError, ValueError):
        return None
    if any(a is None for a in arrays) or len(arrays[0]) != count or len(arrays[1]) != count + 1:
        return None
    lengths, refs, ids = arrays   # shapes and ranges: a cache edited in place is computed again, as a missing one
    if (lengths.ndim != 2 or lengths.shape[1] != 2 or lengths.dtype.kind not in 'iu' or refs.ndim != 1
            or ids.ndim != 1 or (count and (int(refs[0]) != 0 or int(refs[-1]) != len(ids)
                                            or bool(np.any(np.diff(refs) < 0)) or bool(np.any(lengths[:, 0] == 0))))
            or (len(ids) and (int(ids.min()) < 0 or int(ids.max()) >= len(meta.get('paths') or ())))):
        return None
    return arrays[0], meta['paths'], meta['stats'], arrays[1], arrays[2]


_UNSAVED: Dict[str, Tuple[int, str, np.ndarray]] = {}  # base -> (count, digest, lengths) not cached: a full disk


def _write_lengths(cache_dir: str, base: str, lengths: np.ndarray, paths: List[str], stats: list,
                   refs: np.ndarray, ids: np.ndarray, count: int, digest: str, annotation: str) -> None:
    """Atomically, each file (concurrent ranks never read a half-written cache; the ``.images.json`` written last
    says the set is whole); an optional cache that cannot be written (a full disk, no permission) is skipped with
    one warning, leaving no temporary file."""
    try:
        for suffix, values in (('.lengths.npy', lengths), ('.refs.npy', refs), ('.ids.npy', ids)):
            save_array(base + suffix, values)
        write_text_atomically(base + '.images.json', json.dumps(dict(
            annotation=os.path.abspath(annotation), count=count, lines=digest, paths=paths, stats=stats)))
    except OSError as exc:
        print_log(f'the sample-length cache {base}.lengths.npy could not be written ({exc}); going on without it',
                  logger='current', level=30)
        _UNSAVED[base] = (count, digest, lengths)  # this process need not compute them again (the start-up check's)


def write_text_atomically(path: str, text: str) -> None:
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, suffix='.tmp')
    try:
        os.fchmod(fd, file_mode())
        with os.fdopen(fd, 'w', encoding='utf-8') as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_slices(src: DataSource, base: str, cache_dir: str, parts: list, count: int, digest: str) -> np.ndarray:
    """The lengths of ``parts`` (:meth:`LengthSlice.result` of consecutive slices), their tables of image files
    mapped into one with each file's stat, written as the cache of ``count`` records (``digest``: their lines)."""
    lengths = np.concatenate([p[0] for p in parts]) if parts else np.zeros((0, 2), dtype=np.int64)
    table: Dict[str, int] = {}
    ids = []
    for _, paths, _, local in parts:  # each slice's own table of files, mapped into one
        ids.append(np.asarray([table.setdefault(path, len(table)) for path in paths], dtype=np.int64)[local])
    counts = np.concatenate([p[2] for p in parts]) if parts else np.zeros(0, dtype=np.int64)
    refs = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)]).astype(np.int64)
    paths = list(table)
    stats = [_stat(p) for p in paths]
    _write_lengths(cache_dir, base, lengths, paths, stats, refs,
                   np.concatenate(ids) if ids else np.zeros(0, dtype=np.int64), count, digest, src.annotation)
    return lengths


def _compute_all(ds, src: DataSource, records: Sequence[Record], base: str, cache_dir: str, digest: str):
    print_log(f'Computing sample lengths of {src.annotation} ({len(records)} samples; cached in {base}.*)',
              logger='current')
    parts = run_slices(lambda a, b: length_slice(ds, records, range(a, b)), len(records),
                       getattr(ds, 'workers', None), f'lengths of {src.annotation}')
    return save_slices(src, base, cache_dir, parts, len(records), digest)


def compute_source_lengths(ds, src: DataSource, records: Sequence[Record],
                           cache_dir: Optional[str] = None) -> np.ndarray:
    """``[N, 2]``: signed length and tile count of each of one source's (valid) records, from the cache or
    computed (once per node, over every core: ``nodepass``) and cached. The cache is keyed on the annotation file
    and the settings, and holds the size and modification time of every image it read: records whose images
    changed, appeared or vanished since are computed again (never a stale length); a cache that cannot be written
    is skipped with a warning."""
    cache_dir = cache_dir or ds.cache_dir or default_cache_dir()
    base = os.path.join(cache_dir, _cache_key(ds, src))
    digest = _lines_digest(records)
    unsaved = _UNSAVED.get(base)
    if unsaved is not None and unsaved[:2] == (len(records), digest):  # computed here, not cached (a full disk)
        return unsaved[2]
    cached = node_once(base + '.lengths.npy', lambda: _load_cache(base, len(records), digest),
                       lambda: _compute_all(ds, src, records, base, cache_dir, digest),
                       f'the sample lengths of {src.annotation}')
    if isinstance(cached, np.ndarray):
        return cached
    lengths, paths, stats, refs, ids = cached
    now = [_stat(p) for p in paths]
    changed = np.asarray([i for i, (a, b) in enumerate(zip(now, stats)) if a != list(b)], dtype=np.int64)
    if not len(changed):
        return lengths
    owners = np.searchsorted(refs, np.flatnonzero(np.isin(ids, changed)), side='right') - 1
    stale = np.unique(owners).tolist()
    print_log(f'{src.annotation}: the images of {len(stale)} samples changed since the length cache was '
              f'written; computing those again', logger='current')
    lengths = np.array(lengths)
    lengths[stale] = length_slice(ds, records, stale)[0]
    _write_lengths(cache_dir, base, lengths, paths, now, refs, ids, len(records), digest, src.annotation)
    return lengths


class LengthStats:
    """Per-item lengths and tile counts of :class:`~xtuner_plugins.data.dataset.InternVLDataset` (which inherits
    this), computed once per source (:func:`compute_source_lengths`, cached) and read by the length-grouped sampler and
    packing; the class using it has ``tokenizer``, ``sources``, ``records``, ``_source_ranges``, ``_index`` and
    ``_lengths`` (None until computed)."""

    # the start-up check's pass computes the lengths too (``startcheck.py``: each sample parsed and checked once)
    lengths_with_check = True

    def _record_stats(self) -> np.ndarray:
        """``[records, 2]``: token length of every record (text plus image tokens, negative for text-only
        samples) and its number of tiles."""
        if self._lengths is None:
            if self.tokenizer is None:
                raise ValueError('sample lengths need a tokenizer')
            parts = []
            for src, rng in zip(self.sources, self._source_ranges):
                parts.append(compute_source_lengths(self, src, self.records.part(rng)))
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
    def modality_length_array(self) -> np.ndarray:
        """:attr:`modality_length` as an int64 array (``data/sampler.py`` reads it: no Python int per item)."""
        return self._record_stats()[self._index, 0]

    @property
    def length_array(self) -> np.ndarray:
        """:attr:`length` as an int64 array."""
        return np.abs(self._record_stats()[self._index, 0])

    @property
    def num_tiles_per_item(self) -> List[int]:
        """Per-item tile counts estimated from image headers (1 for a text-only sample's dummy tile)."""
        return self._record_stats()[self._index, 1].tolist()

    def exact_stats(self) -> Tuple[np.ndarray, np.ndarray]:
        """Per-item lengths (positive) and tile counts as the samples load, for packing's budgets: with
        ``length_field`` set, computed (and cached) once more without it, as the field is untokenised and counts
        one tile an image (packs of 2,154 tokens and 54 tiles were planned under a budget of 400 and 6)."""
        stats = self._record_stats()
        if getattr(self, 'length_field', None):
            if getattr(self, '_exact_lengths', None) is None:
                field, given, self.length_field, self._lengths = self.length_field, self._lengths, None, None
                try:
                    self._exact_lengths = self._record_stats()
                finally:
                    self.length_field, self._lengths = field, given
            stats = self._exact_lengths
        return np.abs(stats[self._index, 0]), stats[self._index, 1]
