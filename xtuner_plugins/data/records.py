"""A data set's records, read from their files when asked for: no Python object is held per sample.

Record ``r`` (in the order of the sources, then of their files) is entry ``good[s][r - start[s]]`` of source ``s``'s
:class:`~xtuner_plugins.data.index.SourceIndex`; its bytes are read and decoded into a
:class:`~xtuner_plugins.data.sources.Record` (parsed later, by the data set's ``parse``) each time it is asked for.
"""

from __future__ import annotations

import bisect
from typing import Iterator, List, Optional, Sequence

import numpy as np

from .index import SourceIndex
from .sources import Record

__all__ = ['RecordView']


class RecordView(Sequence):
    """The records of a data set (``part``: those of one source): ``len``, ``[r]``, iteration and ``lines()``."""

    def __init__(self, indexes: List[SourceIndex], good: List[np.ndarray], first: int = 0,
                 stop: Optional[int] = None, digests: Optional[List[Optional[str]]] = None):
        self.indexes = indexes
        self.digests = digests  # per source, lengths.lines_digest of its lines when its start-up check recorded it
        self.good = [g.view(np.ndarray) for g in good]  # the same mapped pages; indexing makes no memmap object
        self.starts = np.concatenate([[0], np.cumsum([len(g) for g in good])]).astype(np.int64).tolist()
        self.first = first
        self.stop = self.starts[-1] if stop is None else stop

    def __len__(self) -> int:
        return self.stop - self.first

    def locate(self, r: int):
        """``(source, entry)`` of record ``r`` of this view."""
        if not 0 <= r < len(self):
            raise IndexError(f'record {r} of {len(self)}')
        r += self.first
        s = bisect.bisect_right(self.starts, r) - 1
        return s, int(self.good[s][r - self.starts[s]])

    def __getitem__(self, r: int) -> Record:
        s, e = self.locate(int(r))
        index = self.indexes[s]
        return Record(s, index.line(e), index.read(e).decode('utf-8', errors='surrogateescape'))

    def __iter__(self) -> Iterator[Record]:
        return (self[r] for r in range(len(self)))

    def part(self, rng: range) -> 'RecordView':
        """The records ``rng`` of this view (one source's ``_source_ranges`` entry)."""
        return RecordView(self.indexes, self.good, self.first + rng.start, self.first + rng.stop, self.digests)

    def source_of(self, records: np.ndarray) -> np.ndarray:
        """The source of each record number in ``records`` (an array), without reading them."""
        return np.searchsorted(np.asarray(self.starts), np.asarray(records) + self.first, side='right') - 1

    def lines_digest(self) -> Optional[str]:
        """The digest of :meth:`lines` that the start-up check recorded, when this view is one whole source (a warm
        start then reads no page of the index for it: 384 MB at 16M samples); else None."""
        if self.digests is None:
            return None
        s = bisect.bisect_right(self.starts, self.first) - 1
        whole = self.starts[s] == self.first and self.starts[s + 1] == self.stop
        return self.digests[s] if whole else None

    def lines(self) -> np.ndarray:
        """``LINE`` of every record of this view, in order."""
        out = []
        for s, index in enumerate(self.indexes):
            a, b = max(self.first, self.starts[s]), min(self.stop, self.starts[s + 1])
            if b > a:
                out.append(np.asarray(index.entries[np.asarray(self.good[s][a - self.starts[s]:b - self.starts[s]]),
                                                    2]))
        return np.concatenate(out).astype(np.int64) if out else np.zeros(0, dtype=np.int64)
