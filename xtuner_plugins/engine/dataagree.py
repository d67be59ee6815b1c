"""Every rank must read the same data: checked once at start-up, before the first batch.

Each rank builds its own training data set from the files it sees. Nodes that each hold their own copy of the
data (a local disk, an ``rsync`` not finished, one node's copy older) or a file changed while the ranks started
give ranks data sets that differ: their samplers then cut different orders into parts that overlap and leave
samples out without a word, or give the ranks different numbers of iterations an epoch, and the first rank to end
its epoch meets the others in another collective (a hang, or an error about something else: a run once stopped
with "non-finite trained weights"). :func:`check_ranks_agree` gathers a small fingerprint of each rank's data set
(:func:`data_fingerprint`: the items, each source's annotation file's size, the samples it keeps and the digest of
their lines, a digest of a sample of the files' bytes, the digest of the lengths the sampler orders by; a shard
set's samples, shards and bytes and the digest of its list of shards, each with the digest of what it holds, and
its order's seed) and stops
start-up on every rank (exit code 2), in one line on rank 0 naming the first rank that differs from rank 0, its
node and what differs.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

__all__ = ['check_ranks_agree', 'data_fingerprint', 'difference', 'disagreement']


def _inner(dataset):
    """The data set holding the samples (a packed data set's ``dataset``, a shard stream's ``samples``)."""
    for _ in range(4):
        inner = getattr(dataset, 'dataset', None)
        if inner is None or inner is dataset:
            return dataset
        dataset = inner
    return dataset


def data_fingerprint(dataset) -> Dict[str, Any]:
    """What two ranks reading the same data agree on; small (one entry per source), cheap (no sample read)."""
    from torch.utils.data import IterableDataset
    found: Dict[str, Any] = {}
    if not isinstance(dataset, IterableDataset):  # a stream's length is its rank's share: ranks differ by one
        found['items'] = len(dataset)
    inner = _inner(dataset)
    if inner is not dataset:
        try:
            found['samples'] = len(inner)
        except TypeError:
            pass
    index = getattr(inner, 'index', None)
    if isinstance(index, dict) and isinstance(index.get('shards'), list):  # a shard set
        shards = index['shards']
        found['shards'] = [len(shards), index.get('samples'), sum(s.get('bytes') or 0 for s in shards)]
        # which samples each shard holds, in order: a set written again with another --samples-per-shard has the
        # same count and (tar padding) often the same bytes, and a resume read other samples at the saved places
        # and their order's seed, for sets written before each shard recorded a digest of its samples
        found['content'] = _digest(json.dumps([shards, index.get('order')], sort_keys=True).encode())
        return found
    sources, ranges = getattr(inner, 'sources', None), getattr(inner, '_source_ranges', None)
    if sources and ranges is not None and len(ranges) == len(sources):
        digests = getattr(getattr(inner, 'records', None), 'digests', None) or [None] * len(sources)
        found['sources'] = [[src.annotation, _size(src.annotation), len(rng), digest]
                            for src, rng, digest in zip(sources, ranges, digests)]
        # a sample of each file's bytes: its lines reordered or edited in place keep its size and count
        found['content'] = _digest(b''.join(_sampled(src.annotation) for src in sources))
    lengths = getattr(inner, '_lengths', None)
    if isinstance(lengths, np.ndarray):  # computed already (the sampler orders by them): they must agree too
        found['lengths'] = ints_digest(lengths)
    return found


#: the bytes :func:`_sampled` reads at each of a file's start, middle and end
SAMPLED = 1 << 16


def _digest(data: bytes) -> str:
    return hashlib.sha1(data).hexdigest()[:16]


def ints_digest(values) -> str:
    """:func:`_digest` of whole numbers (lengths, packs' sample numbers) as int64."""
    return _digest(np.ascontiguousarray(values, dtype=np.int64).tobytes())


def sampled_digest(path: str) -> str:
    """A digest of :func:`_sampled`'s bytes of ``path``: a file's lines reordered or edited in place under the same
    size and modification time (``cp -p``, ``touch -r``) change it."""
    return _digest(_sampled(path))


def _sampled(path: str) -> bytes:
    """``SAMPLED`` bytes at the start, middle and end of ``path`` (the whole of a smaller file): what every copy of
    the file on any node holds alike, read in a moment at any size; empty when it cannot be read."""
    try:
        with open(path, 'rb') as f:
            size = os.fstat(f.fileno()).st_size
            if size <= 3 * SAMPLED:
                return f.read()
            parts = []
            for at in (0, (size - SAMPLED) // 2, size - SAMPLED):
                f.seek(at)
                parts.append(f.read(SAMPLED))
            return b''.join(parts)
    except OSError:
        return b''


def _size(path: str) -> Optional[int]:
    try:
        return os.path.getsize(path)
    except OSError:
        return None


def _differs(a: Dict[str, Any], b: Dict[str, Any]) -> str:
    """What differs between rank 0's fingerprint ``a`` and another's ``b``, in words."""
    said = []
    for key, what in (('items', 'items'), ('samples', 'samples before packing')):
        if a.get(key) != b.get(key):
            said.append(f'{a.get(key)} {what} against {b.get(key)}')
    if a.get('shards') != b.get('shards'):
        (n0, s0, b0), (n1, s1, b1) = a.get('shards') or (None,) * 3, b.get('shards') or (None,) * 3
        said.append(f'shard set of {n0} shards, {s0} samples, {b0} bytes against {n1}, {s1}, {b1}')
    mine, theirs = a.get('sources') or [], b.get('sources') or []
    if len(mine) != len(theirs):
        said.append(f'{len(mine)} annotation files against {len(theirs)}')
    for (path, size, kept, digest), (_, size1, kept1, digest1) in zip(mine, theirs):
        if (size, kept) != (size1, kept1):
            said.append(f'{path}: {size} bytes, {kept} samples kept against {size1} bytes, {kept1} samples kept')
        elif digest != digest1:
            said.append(f'{path}: the same size and count, other lines kept (a sample refused on one, not the other)')
    if not said and a.get('content') != b.get('content'):
        said.append('the same shards, samples and bytes, the samples split or ordered otherwise (the shard set '
                    'written again)' if a.get('shards') else 'the same files, sizes and counts, other contents (lines '
                    'edited or reordered in place)')
    if not said and a.get('lengths') != b.get('lengths'):
        said.append('the same samples, other lengths (their images differ: another copy of the image folder)')
    return '; '.join(said[:3]) or 'their data sets differ'


def _compared(fingerprint: Dict[str, Any]) -> Dict[str, Any]:
    """A fingerprint without the annotation files' paths, which only name them (a folder mounted elsewhere on one
    node holds the same data)."""
    return dict(fingerprint, sources=[entry[1:] for entry in fingerprint.get('sources') or []])


def difference(a: Dict[str, Any], b: Dict[str, Any]) -> str:
    """What differs between two fingerprints, in words ('' when they agree). ``content`` is compared where both
    have it (a checkpoint's fingerprint saved before it was recorded has not)."""
    if 'content' not in a or 'content' not in b:
        a, b = ({k: v for k, v in f.items() if k != 'content'} for f in (a, b))
    return '' if _compared(a) == _compared(b) else _differs(a, b)


def disagreement(prints: List[Tuple[str, Dict[str, Any]]]) -> Optional[str]:
    """The refusal for the gathered ``(host, fingerprint)`` of every rank (None when they all agree)."""
    host0, first = prints[0]
    for rank, (host, other) in enumerate(prints):
        if _compared(other) != _compared(first):
            differ = sum(_compared(p) != _compared(first) for _, p in prints)
            return (f'the ranks do not read the same training data: rank 0 (on {host0}) against rank {rank} (on '
                    f'{host}): {_differs(first, other)} ({differ} of {len(prints)} ranks differ from rank 0). Every '
                    f'node must read the same files: a copy on a node\'s own disk that differs (an older copy, an '
                    f'rsync not finished), or a file changed while the ranks started; their samplers would split '
                    f'different data, leaving samples out or giving ranks different numbers of iterations (a hang)')
    return None


def check_ranks_agree(dataset) -> None:
    """Stop every rank (``runstart.refuse``: one line on rank 0, exit code 2) when the ranks' data sets differ
    (module docstring); one all-gather of a small object per rank, nothing when there is one rank."""
    from mmengine.dist import all_gather_object, get_world_size
    if dataset is None or get_world_size() < 2:
        return
    mine = (os.environ.get('SLURMD_NODENAME') or socket.gethostname(), data_fingerprint(dataset))
    problem = disagreement(all_gather_object(mine))
    if problem:
        from xtuner_plugins.engine.runstart import refuse
        refuse(problem)
