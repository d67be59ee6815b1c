"""A shard set checked as ``tools/check_dataset.py`` checks annotation files (:func:`check_shards`): every sample
read from its shard, checked and its images decoded as training does, with what ``max_length`` does to each when a
tokenizer is given; the same report (problems, notes, stats, lengths, videos), and what the writer left out.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Dict, List, Optional

from .errors import SampleError
from .fitting import tally_fit, tally_frames
from .shard_index import read_shard
from .shards import ShardSamples, shard_record


def check_shards(folder: str, allow_truncation: bool = False, check_video: Optional[Callable] = None,
                 **settings) -> Dict[str, Any]:
    """What ``tools/check_dataset.py`` reports, for a shard set: every sample read from its shard, checked and its
    images decoded as training does; with a ``tokenizer`` in ``settings``, what ``max_length`` does to each
    (``InternVLDataset.fit``). A video sample goes to ``check_video`` (check_dataset's, called as it calls it for
    an annotation file; without one it is loaded as training loads it). Returns ``problems`` and ``notes``
    (``SampleError`` naming ``FILE:LINE``), ``stats`` (annotation -> Counter, check_dataset's keys), ``lengths``
    (annotation -> tokens trained on), ``videos`` (check_video's lines) and ``skipped`` (what the shard writer left
    out, by reason)."""
    from collections import Counter, defaultdict

    from .image_io import frame_note, load_image
    samples = ShardSamples(folder, **settings)
    problems: List[SampleError] = []
    notes: List[SampleError] = []
    stats: Dict[str, Counter] = defaultdict(Counter)
    lengths: Dict[str, List[int]] = defaultdict(list)
    videos: List[str] = []
    for shard in samples.index['shards']:
        for raw in read_shard(os.path.join(folder, shard['file']), expected=int(shard['samples']),
                              size=shard.get('bytes'), digest=shard.get('digest'), first=shard.get('first'),
                              media=shard.get('media')):
            record = shard_record(raw, len(samples.sources))
            where = samples.where(record)  # a bad KEY.json's counts go under its shard: it names no annotation
            st = stats[where.rsplit(':', 1)[0] if record.problem else samples.sources[record.source].annotation]
            st['samples'] += 1

            def drop(err: SampleError) -> None:
                st[f'dropped ({err.reason.replace("_", " ")})'] += 1
                problems.append(err.with_source(where))
            try:
                checked = samples.check_record(record)
            except SampleError as err:
                drop(err)
                continue
            if checked.video is not None:
                if check_video is not None:
                    check_video(samples, record, checked, st, problems, videos, samples.tokenizer is not None,
                                lengths, allow_truncation)
                    continue
                st['video samples'] += 1
                try:
                    samples.load_sample(record)
                    st['videos found'] += 1
                except SampleError as err:
                    drop(err)
                continue
            st['text-only samples' if not checked.image_paths else 'image samples'] += 1
            sizes = []
            for name, data in zip(record.names, checked.image_paths):
                st['images'] += 1
                try:
                    sizes.append(load_image(data, samples.max_image_pixels, f'{record.where}.{name}').size)
                    st['images found'] += 1
                    tally_frames(frame_note(data, f'{record.where}.{name}'), st, notes, where)
                except SampleError as err:
                    st[f'images {err.reason.replace("_", " ")}'] += 1
                    last = err
            if len(sizes) < len(checked.image_paths):
                drop(last)
                continue
            if samples.tokenizer is None:
                continue
            try:
                fit = samples.fit(record, checked, sizes)
            except SampleError as err:
                drop(err)
                continue
            lengths[samples.sources[record.source].annotation].append(max(len(e['input_ids']) for e in fit.encoded))
            tally_fit(fit, st, notes, problems, where, samples.max_tiles_per_image(record, len(sizes)),
                      samples.max_length, allow_truncation)
    return dict(problems=problems, notes=notes, stats=dict(stats), lengths={a: lengths[a] for a in stats},
                videos=videos, skipped=dict(samples.index.get('skipped', {})))
