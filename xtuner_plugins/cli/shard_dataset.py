"""Turn annotation files and their images into WebDataset tar shards, for training at scale (``data/shards.py``).

Usage::

    python tools/shard_dataset.py --data data/llava_v1_5_mix665k.json --image-folder data/images --out data/shards
    python tools/shard_dataset.py --data a.jsonl b.json --image-folder imgs_a imgs_b --out shards \\
        --samples-per-shard 2000 --max-shard-bytes 2000000000
    python tools/shard_dataset.py --data meta.json --out shards     # an InternVL meta file (its roots and repeats)
    python tools/shard_dataset.py --data big.jsonl --out shards --workers 16

The files are read as ``InternVLDataset`` reads them (its checks, ``repeat_time`` applied): each sample it would
train on is written once per repeat, with its images' bytes. The samples are written in a seeded shuffled order
(``--seed``, 0 by default; ``--keep-order``: the annotations' order): training reads a shard's samples one after
another, so shards written in the files' order would give batches of one source, or of one length band when a file
is sorted, for a shard's length at a time (each epoch reshuffles the order of the shards, not their samples).
Every core works (``--workers``, default all): each sample is checked and sized first (its record, its files
opened), then the samples kept are cut into shards as one writer would cut them and each shard is written by one
process; any number of workers writes the same shards, sample for sample.
Samples the data set refuses are printed as ``FILE:LINE: reason: details`` and counted; a sample whose image is
missing is skipped, counted, and printed the same way. A video sample's video file goes into the shard as it is
(``KEY.video.mp4``), a folder of frames as its frames in their order (``KEY.frame0000.jpg``, ...); a video the data
set could not read (an empty folder, a frame linked out of the image folder or one whose header reads as no image,
a clip on frames) is skipped, counted and printed. ``--out`` must be a new or empty folder: nothing is written
over, and a run marks it as its own while it writes (``.shard_dataset.writing``: a second run into it is refused,
even one started at the same moment).
``shards.json`` is written last, with each shard's samples and bytes. Exit status 0 when shards were written, 1 when
no sample was, 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from collections import Counter
from typing import List, Optional, Tuple

from xtuner_plugins.cli.shard_entries import Shard, shard_sample
from xtuner_plugins.cli.tool_args import tool_error
from xtuner_plugins.data.errors import SampleError
from xtuner_plugins.data.nodepass import WorkerDied, default_workers
from xtuner_plugins.signals import sigterm_as_interrupt, stop_code

PROG = 'shard_dataset'


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split('\n\n')[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--data', nargs='+', required=True,
                   help='annotation files: .jsonl, .json (a list of samples) or InternVL meta .json')
    p.add_argument('--image-folder', nargs='*', default=None,
                   help='image folder, one for all files or one per file; paths may not leave it (default: '
                        'relative paths beside each file, kept inside its folder; absolute ones as written)')
    p.add_argument('--out', required=True, help='the shard set\'s folder (new or empty)')
    p.add_argument('--samples-per-shard', type=int, default=1000, help='samples per shard at most (default 1000)')
    p.add_argument('--max-shard-bytes', type=int, default=1 << 30,
                   help='a shard is closed once it holds this many bytes (default 1 GiB)')
    p.add_argument('--seed', type=int, default=0, help='the seed of the order the samples are written in (default 0)')
    p.add_argument('--keep-order', action='store_true',
                   help='write the samples in the annotations\' order (with their repeats) instead of shuffled')
    p.add_argument('--allow-links-outside', action='store_true',
                   help='follow symbolic links in an image folder to files outside it')
    p.add_argument('--show', type=int, default=20, help='problems printed per reason (default 20; 0: all)')
    p.add_argument('--workers', type=int, default=None,
                   help='processes writing shards, and checking the data before (default: every core this process '
                        'may use); any number writes the same shards')
    return p.parse_args(argv)


WRITING = '.shard_dataset.writing'  # in --out while a run writes there: {"pid", "host", "started"}


def _writer(out: str) -> str:
    """Who the ``WRITING`` mark of ``out`` names, in words."""
    try:
        with open(os.path.join(out, WRITING), encoding='utf-8') as f:
            mark = json.load(f)
        return (f'pid {mark["pid"]} on {mark["host"]}, since '
                f'{time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(mark["started"]))}')
    except (OSError, ValueError, KeyError, TypeError):
        return 'its mark unreadable'


def out_problem(out: str) -> str:
    """Why ``out`` cannot take a new shard set ('' when it can)."""
    if os.path.exists(out) and not os.path.isdir(out):
        return f'--out {out}: a file, not a folder'
    if os.path.isdir(out) and os.listdir(out):
        names = os.listdir(out)
        if WRITING in names and 'shards.json' not in names:
            return (f'--out {out}: another shard_dataset run is writing into it ({_writer(out)}), or was stopped '
                    f'before it finished ({len(names) - 1} entries beside its mark {WRITING}); give each run its own '
                    f'folder, or remove this one to write it again')
        unfinished = 'shards.json' not in names and any(n.startswith('shard-') and n.endswith(('.tar', '.tar.part'))
                                                        for n in names)
        return f'--out {out}: not empty ({len(names)} entries' + (
            ': the shards of a run that did not finish, no shards.json; remove the folder to write them again'
            if unfinished else '') + '); give a new or empty folder (nothing is written over)'
    return ''


def claim(out: str) -> str:
    """Mark ``out`` (new or empty) as this run's, atomically (``O_EXCL``: two runs started at once into one folder,
    both seeing it empty, cannot both write there); '' when claimed, else why not."""
    try:
        fd = os.open(os.path.join(out, WRITING), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return out_problem(out) or f'--out {out}: another shard_dataset run is writing into it'
    except OSError as exc:
        return f'--out {out}: cannot be written: {exc.strerror}'
    try:
        with os.fdopen(fd, 'w', encoding='utf-8') as f:
            json.dump(dict(pid=os.getpid(), host=socket.gethostname(), started=time.time()), f)
    except OSError as exc:   # a full disk: an empty mark left behind refused every later run into the folder
        os.remove(os.path.join(out, WRITING))
        return f'--out {out}: cannot be written: {exc.strerror or exc}'
    if sorted(os.listdir(out)) != [WRITING]:  # another run's files came in before the mark
        os.remove(os.path.join(out, WRITING))
        return out_problem(out) or f'--out {out}: not empty; give a new or empty folder (nothing is written over)'
    return ''


CHECK_PART = 10_000   # positions a process checks at a time before the shards are cut


def _nbytes(sample: dict) -> int:
    """What a sample adds to its shard's size (its values' bytes, or their sizes), as ``--max-shard-bytes`` counts."""
    return sum(v if isinstance(v, int) else len(v) for k, v in sample.items() if not k.startswith('__'))


def _checked(ds, order, start: int, stop: int):
    """The positions from ``start`` to ``stop`` whose samples the data set takes with their sizes, and the others'
    problems as plain values (a :class:`SampleError`, of its signature, does not unpickle from a pool's
    process)."""
    import numpy as np
    kept, sizes, problems = [], [], []
    for position in range(start, stop):
        try:
            sizes.append(_nbytes(shard_sample(ds, order(position), read=False)))
            kept.append(position)
        except SampleError as err:
            problems.append((err.reason, err.message, err.source))
    return np.asarray(kept, dtype=np.int64), np.asarray(sizes, dtype=np.int64), problems


def plan_shards(sizes, samples_per_shard: int, max_shard_bytes: int) -> List[Tuple[int, int]]:
    """The shards of samples of ``sizes`` (bytes) in turn: ``(start, stop)`` each, a new one begun past
    ``samples_per_shard`` samples or once ``max_shard_bytes`` are reached, as one writer closing its shards would."""
    bounds, start, count, size = [], 0, 0, 0
    for j, nbytes in enumerate(sizes.tolist()):
        if count and (count >= samples_per_shard or size >= max_shard_bytes):
            bounds.append((start, j))
            start, count, size = j, 0, 0
        count, size = count + 1, size + nbytes
    if count:
        bounds.append((start, len(sizes)))
    return bounds


def write_shards(ds, out: str, samples_per_shard: int, max_shard_bytes: int, show: int = 20,
                 seed: Optional[int] = 0, workers: int = 1) -> Counter:
    """Write the samples of ``ds`` (an ``InternVLDataset``) as shards into ``out``, in the order
    ``streaming.epoch_order`` gives ``seed`` (None: ``ds``'s order); returns the skips by reason (each printed as
    ``FILE:LINE: reason: details``, ``show`` per reason).

    Two passes, each over ``workers`` forked processes: every sample is checked (its record, its files opened)
    and sized, then the samples kept are cut into shards of ``samples_per_shard`` (fewer where ``max_shard_bytes``
    closes one early: :func:`plan_shards`), each shard written by one process under a temporary name and renamed
    ``shard-NNNNNN.tar`` in order as it is done. A file that changes between the passes is a skip too, leaving its
    shard one short. The shards do not depend on ``workers``: any number writes the same ones."""
    import numpy as np

    from xtuner_plugins.data.nodepass import imap_parts
    from xtuner_plugins.data.shard_index import FORMAT, INDEX
    from xtuner_plugins.data.streaming import epoch_order
    skipped: Counter = Counter()

    def skip(reason: str, message: str, source: Optional[str]) -> None:
        skipped[reason] += 1
        if not show or skipped[reason] <= show:
            print(f'{source}: {reason}: {message}', flush=True)

    for problem in ds.load_problems:
        skip(problem.reason, problem.message, problem.source)
    os.makedirs(out, exist_ok=True)
    order = epoch_order(len(ds), seed or 0, 0, shuffle=seed is not None)
    found, found_sizes = [], []
    for kept, sizes, problems in imap_parts(lambda a, b: _checked(ds, order, a, b),
                                     [(a, min(a + CHECK_PART, len(ds))) for a in range(0, len(ds), CHECK_PART)],
                                     workers, 'checking the samples'):
        for problem in problems:
            skip(*problem)
        found.append(kept)
        found_sizes.append(sizes)
    none = np.zeros(0, dtype=np.int64)
    positions = np.concatenate(found) if found else none
    planned = plan_shards(np.concatenate(found_sizes) if found else none, samples_per_shard, max_shard_bytes)
    mtime = int(time.time())

    def write_part(start: int, stop: int):   # one planned shard
        shard, problems = Shard(out, f'shard-part{start:09d}.tar.part', mtime), []
        try:
            for position in positions[start:stop].tolist():
                try:
                    shard.write(shard_sample(ds, order(position)))
                except SampleError as err:   # changed since the first pass
                    problems.append((err.reason, err.message, err.source))
            return shard.close(), problems
        except BaseException as exc:
            shard.abort()
            if isinstance(exc, OSError) and exc.filename is None:   # a full disk: the shard it was writing
                exc.filename = os.path.join(out, f'shard-part{start:09d}.tar.part')
            raise

    written: List[dict] = []
    for shard, problems in imap_parts(write_part, planned, workers, 'writing the shards'):
        for problem in problems:
            skip(*problem)
        if shard is not None:
            name = f'shard-{len(written):06d}.tar'
            os.replace(os.path.join(out, shard['file']), os.path.join(out, name))
            written.append(dict(shard, file=name))
    samples = sum(shard['samples'] for shard in written)
    index = dict(format=FORMAT, samples=samples, shards=written, skipped=dict(skipped),
                 order=dict(shuffled=True, seed=seed) if seed is not None else dict(shuffled=False),
                 sources=[dict(annotation=os.path.abspath(s.annotation), max_dynamic_patch=s.max_dynamic_patch)
                          for s in ds.sources])
    if samples:
        tmp = os.path.join(out, INDEX + '.tmp')
        with open(tmp, 'w', encoding='utf-8') as f:
            json.dump(index, f, indent=1)
        os.replace(tmp, os.path.join(out, INDEX))
    return skipped


def main(argv=None) -> int:
    with sigterm_as_interrupt():   # kill, timeout, Slurm: as Ctrl-C, the mark taken away and said (143)
        return _main(argv)


def _main(argv=None) -> int:
    args = parse_args(argv)
    if args.workers is not None and args.workers < 1:
        return tool_error(PROG, f'--workers {args.workers}: give 1 or more')
    if args.show < 0:
        return tool_error(PROG, f'--show {args.show}: give 0 (every problem) or more')
    workers = default_workers() if args.workers is None else args.workers
    if workers > default_workers():
        print(f'{PROG}: --workers {workers} is more than the {default_workers()} cores this process may use: each '
              f'process holds its own memory, and more than the cores seldom go faster', file=sys.stderr)
    if args.samples_per_shard < 1 or args.max_shard_bytes < 1:
        return tool_error(PROG, f'--samples-per-shard {args.samples_per_shard} and --max-shard-bytes '
                                f'{args.max_shard_bytes} must be positive')
    from xtuner_plugins.links import leads_nowhere
    nowhere = leads_nowhere(args.out)   # (was 'cannot be made a folder: File exists', or 'No such file' under one)
    problem = out_problem(args.out) or (nowhere and f'--out {args.out} {nowhere.words}: give the folder itself' +
                                                    (', or make the link\'s target first' if nowhere.missing else ''))
    if problem:
        return tool_error(PROG, problem)
    made = not os.path.isdir(args.out)
    try:  # before the data set's check, which can take long: a folder that cannot be made is said now
        os.makedirs(args.out, exist_ok=True)
    except OSError as exc:
        return tool_error(PROG, f'--out {args.out}: cannot be made a folder: {exc.strerror}')
    problem = claim(args.out)
    if problem:
        if made and not os.listdir(args.out):
            os.rmdir(args.out)
        return tool_error(PROG, problem)
    folders = args.image_folder[0] if args.image_folder and len(args.image_folder) == 1 else args.image_folder
    from xtuner_plugins.data.dataset import InternVLDataset
    try:
        ds = InternVLDataset(args.data, image_folders=folders, tokenizer=None, max_bad_fraction=1.0,
                             allow_links_outside=args.allow_links_outside, workers=workers)
    except (ValueError, FileNotFoundError, KeyboardInterrupt, WorkerDied) as exc:   # (stopped while checking)
        os.remove(os.path.join(args.out, WRITING))
        if made:
            os.rmdir(args.out)
        if isinstance(exc, KeyboardInterrupt):
            print(f'{PROG}: stopped while checking the data; nothing was written', file=sys.stderr)
            return stop_code(exc)
        return tool_error(PROG, exc)
    try:
        skipped = write_shards(ds, args.out, args.samples_per_shard, args.max_shard_bytes, args.show,
                               None if args.keep_order else args.seed, workers)
    except (Exception, KeyboardInterrupt) as exc:   # a full disk, the folder removed, Ctrl-C: no shard set
        if os.path.exists(os.path.join(args.out, WRITING)):   # the mark said 'another run is writing' ever after
            os.remove(os.path.join(args.out, WRITING))
        why = ('stopped' if isinstance(exc, KeyboardInterrupt) else
               f'failed: {exc}' if isinstance(exc, WorkerDied) else
               f'failed: {exc.strerror or exc}{f" ({exc.filename})" if exc.filename else ""}'
               if isinstance(exc, OSError) else f'failed: {type(exc).__name__}: {exc}')
        if os.path.isdir(args.out) and not os.listdir(args.out):   # nothing written yet
            if made:
                os.rmdir(args.out)
            print(f'{PROG}: error: ' + ('stopped before any shard was written'
                                       if why == 'stopped' else f'{why} (before any shard was written)') +
                  '; nothing was written', file=sys.stderr)
        else:
            print(f'{PROG}: error: writing into {args.out} {why}; what was written there is no shard set (no '
                  f'shards.json): remove the folder, then write it again', file=sys.stderr)
        return stop_code(exc) if isinstance(exc, KeyboardInterrupt) else 1
    os.remove(os.path.join(args.out, WRITING))  # finished (a run stopped before this leaves it: out_problem says so)
    from xtuner_plugins.data.shard_index import INDEX
    if not os.path.isfile(os.path.join(args.out, INDEX)):
        print(f'no sample to write: {sum(skipped.values())} skipped ({dict(skipped)})', file=sys.stderr)
        if made and not os.listdir(args.out):   # (the folder it made was left behind, empty)
            os.rmdir(args.out)
        return 1
    with open(os.path.join(args.out, INDEX), encoding='utf-8') as f:
        index = json.load(f)
    print(f'wrote {index["samples"]} samples in {len(index["shards"])} shards to {args.out}; skipped '
          f'{sum(skipped.values())}' + (f' ({dict(skipped)})' if skipped else ''))
    return 0


if __name__ == '__main__':
    sys.exit(main())
