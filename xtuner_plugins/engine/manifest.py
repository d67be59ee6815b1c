"""The data manifest: what a map-style run trains on and how its epochs are cut, written by ``BadSampleHook``
(``badsamples.py``) in ``WORK_DIR/data_manifest.json`` and compared by a resume with the run it resumes.

Per source (an annotation file): its path, size, modification time and a digest of sampled bytes, image folder,
``repeat_time``, samples read, refused at start-up (by reason) and used after repeats; and how the epochs are
cut (:func:`reading_order`): the ranks and batch size, the sampler's seed and shuffling, a digest of the lengths a
length-grouped sampler orders by, and an offline-packed set's packs (count, budgets, digest). MMEngine resumes by
skipping as many batches as were trained: where any of these changed, those are other samples than the ones
trained on (:func:`manifest_changes` names what). A file moved, or whose modification time or image folder alone
changed, its size, sampled content and samples the same, is a harmless change (:func:`harmless_changes`).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from itertools import chain
from typing import Dict, List

import numpy as np
from mmengine.dist import get_dist_info

from .dataagree import ints_digest, sampled_digest


def resumed_folder(runner) -> str:
    """The work folder of the run being resumed: the checkpoint's folder for ``--resume PATH`` (a file, or
    DeepSpeed's folder of that name) where it holds the run's lists, else the work folder the checkpoint's config
    records (a run that saved its checkpoints elsewhere, ``default_hooks.checkpoint.out_dir``: its manifest went
    unread, and the resume unchecked) where it is there; this run's without ``--resume PATH``."""
    given = getattr(runner, '_load_from', None)
    if not getattr(runner, '_resume', False) or not isinstance(given, str) or not given:
        return runner.work_dir
    beside = os.path.dirname(os.path.abspath(os.path.normpath(given)))
    if any(os.path.isfile(os.path.join(beside, name)) for name in ('data_manifest.json', 'skipped_samples.json')):
        return beside
    from xtuner_plugins.models.checkpoint import config_settings, read_meta
    try:
        text = read_meta(given).get('cfg')
        recorded = config_settings(text, given).get('work_dir') if text else None
    except (OSError, ValueError, AttributeError):   # a checkpoint that does not read: its load says so
        recorded = None
    return os.path.abspath(recorded) if isinstance(recorded, str) and os.path.isdir(recorded) else beside


def read_manifest(path: str):
    """The manifest in ``path``: None where there is none, False for a file that is not one (another program's,
    which a run wrote over when its work folder was given as the data folder)."""
    if not os.path.lexists(path):
        return None
    try:
        with open(path, encoding='utf-8') as f:
            found = json.load(f)
    except (OSError, ValueError):
        return False
    return found if _well_formed(found) else False


def _well_formed(found) -> bool:
    """Whether ``found`` has the shape :func:`manifest` and :func:`reading_order` write, as far as
    :func:`manifest_changes` reads it (a hand edit gone wrong stopped a resume in a TypeError traceback)."""
    if not isinstance(found, dict) or not isinstance(found.get('sources'), list) or not all(
            isinstance(s, dict) and isinstance(s.get('annotation'), str) for s in found['sources']):
        return False
    order = found.get('order')
    if not order:   # none (a manifest before it), or a stream's
        return order is None or order == {}
    if not isinstance(order, dict) or not all(type(order.get(k)) is int for k in ('ranks', 'batch_size')):
        return False
    packs = order.get('packs')
    return packs is None or isinstance(packs, dict) and type(packs.get('count')) is int and 'digest' in packs


def manifest(dataset) -> dict:
    """Per source of an ``InternVLDataset``: the annotation file's identity and the sample counts."""
    used = (dict(enumerate(dataset.items_per_source())) if hasattr(dataset, 'items_per_source')  # no sample read
            else Counter(dataset.record_at(i).source for i in range(len(dataset))))
    refused: Dict[str, Counter] = {}
    for problem in dataset.load_problems:
        refused.setdefault((problem.source or '?').rsplit(':', 1)[0], Counter())[problem.reason] += 1
    sources = []
    for i, (src, rng) in enumerate(zip(dataset.sources, dataset._source_ranges)):
        st = os.stat(src.annotation)
        sources.append(dict(annotation=os.path.abspath(src.annotation), size=st.st_size, mtime_ns=st.st_mtime_ns,
                            content=sampled_digest(src.annotation),
                            image_folder=os.path.abspath(src.image_folder) if src.image_folder else None,
                            repeat_time=src.repeat_time, samples=len(rng),
                            refused_at_start_up=dict(refused.get(src.annotation, {})), used=used.get(i, 0)))
    return dict(sources=sources, total_used=len(dataset))


def reading_order(dataloader) -> Dict[str, int]:
    """What orders a map-style data set's epoch and cuts it into batches: the ranks, the batch per rank and the
    sampler's seed and shuffling ({} for a stream, whose own state resumes it: ``streamstate.py``)."""
    from torch.utils.data import IterableDataset
    batch = getattr(dataloader, 'batch_size', None)
    if isinstance(getattr(dataloader, 'dataset', None), IterableDataset) or not isinstance(batch, int):
        return {}
    order = dict(ranks=get_dist_info()[1], batch_size=batch)
    sampler = getattr(dataloader, 'sampler', None)
    while sampler is not None and not hasattr(sampler, 'seed') and hasattr(sampler, 'sampler'):
        sampler = sampler.sampler   # under the EpochSampler that gives each epoch its number (its seed was not read)
    for key in ('seed', 'shuffle'):
        value = getattr(sampler, key, None)
        if isinstance(value, (bool, int)):
            order[key] = value
    lengths = getattr(sampler, 'length', None)   # what a length-grouped sampler orders by (max_length, images)
    if isinstance(lengths, (np.ndarray, list)):   # (XTuner's sampler: a list)
        order['lengths'] = ints_digest(lengths)
    packs = getattr(dataloader.dataset, 'packs', None)   # a packed data set's packs, planned before training
    order['packs'] = None
    if isinstance(packs, list):
        order['packs'] = dict(count=len(packs), max_tokens=getattr(dataloader.dataset, 'max_tokens', None),
                              max_tiles=getattr(dataloader.dataset, 'max_tiles', None), digest=ints_digest(
                                  np.fromiter(chain(map(len, packs), chain.from_iterable(packs)), np.int64)))
    return order


def manifest_changes(before: dict, now: dict) -> List[str]:
    """What differs between two manifests, one phrase each."""
    then, order = before.get('order') or {}, now.get('order') or {}
    moved = []
    # the samplers split each global batch among the ranks: 1 rank x 2 and 2 x 1 take the same samples
    if then and order and then['ranks'] * then['batch_size'] != order['ranks'] * order['batch_size']:
        moved.append(f'the batches: {then["ranks"]} ranks x {then["batch_size"]} samples then, {order["ranks"]} x '
                     f'{order["batch_size"]} now: the epoch under way is cut into other batches, so those skipped to '
                     f'resume are not the ones trained on (some of its samples are trained on twice, others not at '
                     f'all until the next epoch); resume with as many samples a step (ranks x batch size) for an '
                     f'exact resume')
    drawn = [f'{key} {then[key]!r} -> {order[key]!r}' for key in ('seed', 'shuffle')
             if key in then and key in order and then[key] != order[key]]
    if drawn:   # the epoch under way drawn in another order: the batches skipped are not those trained on
        moved.append(f'the sampler\'s {", ".join(drawn)}: the epoch under way is drawn in another order, so those '
                     f'skipped to resume are not the ones trained on (some of its samples are trained on twice, '
                     f'others not at all until the next epoch); resume with the same sampler settings')
    then_sources, now_sources = before.get('sources', []), now.get('sources', [])
    then_paths, now_paths = [s['annotation'] for s in then_sources], [s['annotation'] for s in now_sources]
    moved_alike = len(then_sources) == len(now_sources) and all(
        a['annotation'] == b['annotation'] or _alike(a, b) for a, b in zip(then_sources, now_sources))
    if then_paths == now_paths or moved_alike:   # by place: a file may be named twice (a meta file's two entries)
        pairs = list(zip(then_paths, then_sources, now_sources))
        changes = []
    else:
        old, new = dict(zip(then_paths, then_sources)), dict(zip(now_paths, now_sources))
        changes = [f'{p}: no longer used' for p in old if p not in new] + [f'{p}: new' for p in new if p not in old]
        if not changes:   # each source's fractional subset is drawn by its place, with the seed plus it
            changes.append(f'the annotation files are named in another order or number: {then_paths} then, '
                           f'{now_paths} now')
        pairs = [(p, old[p], new[p]) for p in new if p in old]
    for p, a, b in pairs:
        diff = [f'{k} {a.get(k)!r} -> {b.get(k)!r}' for k in ('size', 'mtime_ns', 'content', 'image_folder',
                                                              'repeat_time', 'samples', 'used')
                if a.get(k) != b.get(k) and (k != 'content' or k in a)]   # (no content in an older manifest)
        if diff and not _alike(a, b):
            changes.append(f'{p}: ' + ', '.join(diff))
    if 'total_used' in before and before.get('total_used') != now.get('total_used') and not changes:
        changes.append(f'the samples used: {before["total_used"]} then, {now.get("total_used")} now')
    return changes + moved + ([] if changes else _packed_otherwise(then, order))


def _packed_otherwise(then: dict, order: dict) -> List[str]:
    """The same samples packed otherwise (another budget; packed then, not now) or ordered by other lengths (another
    ``max_length`` or tile count cut them otherwise): the epoch under way resumes on other batches."""
    lost = ('so those skipped to resume are not the ones trained on (some of its samples are trained on twice, '
            'others not at all until the next epoch)')
    packs, now = then.get('packs'), order.get('packs')   # (None: not packed; not there: a manifest before it)
    if packs and now and packs['digest'] != now['digest']:
        budgets = ', '.join(f'{k} {packs.get(k)!r} -> {now.get(k)!r}' for k in ('max_tokens', 'max_tiles')
                            if packs.get(k) != now.get(k))
        return [f'the packs: {packs["count"]} then, {now["count"]} now{f" ({budgets})" if budgets else ""}, packed '
                f'otherwise: the epoch under way is cut into other packs, {lost}; resume with the packing it started '
                'with']
    if 'packs' in then and 'packs' in order and bool(packs) != bool(now):
        was = (f'packed then ({packs["count"]} packs), not now' if packs else
               f'not packed then, packed now ({now["count"]} packs)')
        return [f'the samples were {was}: the epoch under way is cut otherwise, {lost}; resume with the config it '
                'started with']
    if 'lengths' not in then or 'lengths' not in order or then['lengths'] == order['lengths']:
        return []   # (a manifest before it, or the same)
    return ['the lengths the samples are ordered by (a length-grouped sampler\'s) changed: another max_length, tile '
            f'count or template cut the same samples to other lengths, or their images changed; the epoch under way '
            f'is drawn in another order, {lost}; resume with the data settings it started with']


def harmless_changes(before: dict, now: dict) -> List[str]:
    """A line for each source (by place) whose annotation file moved, whose modification time changed or whose image
    folder is another, its size, sampled content and samples alike (a copy to a job's own disk, one that did not
    keep times, images moved): the same samples in the same order, no change to stop for."""
    lines = []
    for a, b in zip(before.get('sources', []), now.get('sources', [])):
        if not _alike(a, b):
            continue
        what = [f'moved from {a["annotation"]}'] if a['annotation'] != b['annotation'] else []
        what += ['its modification time changed'] if a.get('mtime_ns') != b.get('mtime_ns') else []
        what += ([f'its image folder is {b.get("image_folder")} (was {a.get("image_folder")}; the images are not '
                  f'compared)'] if a.get('image_folder') != b.get('image_folder') else [])
        if what:
            lines.append(f'{b["annotation"]}: {", ".join(what)} since the run being resumed started, its size and '
                         f'sampled content did not: resumed on it')
    return lines


def _alike(a: dict, b: dict) -> bool:
    """Whether two manifest entries hold the same samples in the same order: size, sampled content (known), repeats
    and counts alike, whatever their path, modification time and image folder."""
    return 'content' in a and all(a.get(k) == b.get(k) for k in ('size', 'content', 'repeat_time', 'samples', 'used'))
