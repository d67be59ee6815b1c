"""Check a training data set without training: every sample, every image, every problem.

Usage::

    python tools/check_dataset.py --data data/blip_laion_cc_sbu_558k.json --image-folder data/images
    python tools/check_dataset.py --data a.jsonl b.json --image-folder imgs_a imgs_b \\
        --tokenizer Qwen/Qwen2.5-1.5B-Instruct --max-length 8192 --max-dynamic-patch 12
    python tools/check_dataset.py --data meta.json          # an InternVL meta file (its own roots)
    python tools/check_dataset.py --data pairs.jsonl --image-folder imgs --tokenizer DIR   # DPO / MPO pairs
    python tools/check_dataset.py --data my.jsonl --image-folder imgs --tokenizer models/Qwen2.5-0.5B-Instruct \
        --image-mode pad --image-size 336 --num-image-token 576   # LLaVA-1.5 on CLIP-336 (one padded tile)

It reads the files exactly as ``InternVLDataset`` does, decodes every image, and with ``--tokenizer`` decides
what training will do with each sample by the data set's own decision (``InternVLDataset.fit``, see
``data/fitting.py``): kept, kept with fewer tiles, kept with its answer cut (``truncated``), or dropped and why.
Each problem is printed as ``FILE:LINE: reason: details`` (samples given fewer tiles as ``fewer_tiles`` notes),
then per file: samples, what training does with them, images found / missing / corrupt, and the token lengths
trained on. Each video (a file, a GIF or a folder of frames) is read from its headers and its frames decoded;
it is listed as ``FILE:LINE: video PATH: N frames, D s at F fps, WxH, K frames trained on``. The samples are checked
by ``--workers`` processes (default: every core), each a slice of them; the report is the same for any number. Exit status 0 only when nothing is wrong (a kept truncation counts as wrong unless
``--allow-truncation``); 1 otherwise; 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import Counter, defaultdict

import numpy as np
from tqdm import tqdm

from xtuner_plugins.data.checked import build_tokenizer
from xtuner_plugins.data.dataset import InternVLDataset
from xtuner_plugins.data.errors import SampleError
from xtuner_plugins.data.fitting import TRUNCATION, tally_cut, tally_fit, tally_frames
from xtuner_plugins.data.image_io import DEFAULT_MAX_IMAGE_PIXELS, frame_note, load_image
from xtuner_plugins.data.preference import InternVLPreferenceDataset
from xtuner_plugins.data.index import source_index
from xtuner_plugins.data.lengths import default_cache_dir
from xtuner_plugins.data.nodepass import default_workers, run_slices
from xtuner_plugins.data.entries import parse_entry
from xtuner_plugins.data.sources import expand_sources
from xtuner_plugins.data.template import TEMPLATES
from xtuner_plugins.data.video import choose_frames, read_frames


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--data', nargs='+', required=True,
                   help='annotation files: .jsonl, .json (a list of samples) or InternVL meta .json')
    p.add_argument('--image-folder', nargs='*', default=None,
                   help='image folder, one for all files or one per file; paths may not leave it (default: '
                        'relative paths beside each file, kept inside its folder; absolute ones as written)')
    p.add_argument('--tokenizer', default=None,
                   help='tokenizer folder or name (offline); enables the token-length summary')
    p.add_argument('--template', default='internvl2_5', choices=sorted(TEMPLATES),
                   help='the chat template the model trains with (model.template; default internvl2_5)')
    p.add_argument('--max-length', type=int, default=8192, help='token budget per sample (default 8192)')
    p.add_argument('--max-dynamic-patch', type=int, default=12, help='max tiles per sample (default 12)')
    p.add_argument('--min-dynamic-patch', type=int, default=1, help='min tiles per image (default 1)')
    p.add_argument('--image-size', type=int, default=448, help='tile size in pixels (default 448)')
    p.add_argument('--patch-size', type=int, default=14, help='vision patch size (default 14)')
    p.add_argument('--downsample-ratio', type=float, default=0.5, help='pixel-shuffle ratio (default 0.5)')
    p.add_argument('--num-image-token', type=int, default=None,
                   help='LLM tokens per tile, the projector\'s (default: pixel shuffle of the two above; '
                        '576 for LLaVA on CLIP-336, 169 for bilinear_mlp on SigLIP-384)')
    p.add_argument('--image-mode', choices=('tile', 'resize', 'pad'), default='tile',
                   help='tile (InternVL dynamic tiling, default), resize or pad: one tile per image')
    p.add_argument('--no-thumbnail', action='store_true', help='tiling without the thumbnail tile')
    p.add_argument('--allow-truncation', action='store_true',
                   help='samples whose answer is cut to --max-length (and kept) do not make the check fail')
    p.add_argument('--truncation', choices=TRUNCATION, default='keep',
                   help='the data set\'s truncation: keep (default) or drop samples whose answer --max-length cuts')
    p.add_argument('--allow-control-text', action='store_true',
                   help='the data set\'s allow_control_text: control markers in the text are trained on as text')
    p.add_argument('--min-num-frame', type=int, default=8, help='fewest frames a video gets (default 8)')
    p.add_argument('--max-num-frame', type=int, default=32, help='most frames a video gets (default 32)')
    p.add_argument('--allow-links-outside', action='store_true',
                   help='the data set\'s allow_links_outside: follow symbolic links in an image folder to files '
                        'outside it (the Hugging Face cache\'s layout), and a shard set\'s shards linked out of its '
                        'folder')
    p.add_argument('--max-image-pixels', type=int, default=DEFAULT_MAX_IMAGE_PIXELS,
                   help=f'the data set\'s max_image_pixels: larger images are refused (default Pillow\'s '
                        f'{DEFAULT_MAX_IMAGE_PIXELS}; 0: no limit)')
    p.add_argument('--pairs', choices=('auto', 'yes', 'no'), default='auto',
                   help='preference pairs (chosen / rejected), read as DPO/MPO training reads them (default auto: '
                        'yes when the first sample has "chosen" and "rejected")')
    p.add_argument('--workers', type=int, default=None,
                   help='processes checking samples (default: every core); the report is the same for any number')
    p.add_argument('--show', type=int, default=50,
                   help='print at most this many problems per reason (default 50; 0 = all)')
    return p.parse_args(argv)


def first_is_pair(data_files) -> bool:
    """Whether the first sample of the first file (a meta file's first entry) has "chosen" or "rejected" (one of
    them: a pair missing the other is a bad pair, not a file of SFT samples)."""
    source = expand_sources(data_files)[0]
    index = source_index(source.annotation, default_cache_dir())  # the data set's own, built once
    for i in range(len(index)):
        try:
            _, sample = parse_entry(index.read(i), source.annotation.endswith('.jsonl'),
                                    f'{source.annotation}:{index.line(i)}')
        except SampleError:
            continue
        return bool({'chosen', 'rejected'} & set(sample))
    return False


def percentile_line(values):
    arr = np.asarray(values)
    return (f'min {arr.min()}, mean {arr.mean():.0f}, p50 {np.percentile(arr, 50):.0f}, '
            f'p95 {np.percentile(arr, 95):.0f}, max {arr.max()}')


def check_video(ds, record, checked, st, problems, lines, fit_it: bool, lengths, allow_truncation: bool) -> None:
    """One video sample: its headers, its frames decoded (those training samples), what training does with it."""
    where = ds.where(record)
    st['video samples'] += 1
    try:
        info = ds.probe(checked)
        frames = ds.num_frames(record, info)
        # its distinct frames: more than the clip's frames repeat the last (--max-num-frame 1000000000 was a list
        # of a billion frames)
        shown = read_frames(info, choose_frames(info, min(frames, info.length), 'middle'))
    except SampleError as err:
        st[f'dropped ({err.reason.replace("_", " ")})'] += 1
        problems.append(err.with_source(where))
        return
    st['videos found'] += 1
    timing = f'{info.duration:.2f} s at {info.fps:g} fps' if info.fps else 'a folder of frames'
    clip = f', clip frames {info.start}..{info.start + info.length - 1}' if checked.clip else ''
    width, height = shown[0].size  # as trained on: a video tagged as rotated is turned upright (data/video.py)
    turned = ' (turned upright by its rotation tag)' if (width, height) != tuple(info.size) else ''
    line = f'{where}: video {checked.video}: {info.total} frames, {timing}, {width}x{height}{turned}{clip}'
    if fit_it:
        try:
            fit = ds.fit(record, checked, [], info)
        except SampleError as err:
            st[f'dropped ({err.reason.replace("_", " ")})'] += 1
            problems.append(err.with_source(where))
            lines.append(line)
            return
        line += f', {fit.max_num} frames trained on'
        lengths[ds.sources[record.source].annotation].append(max(len(e['input_ids']) for e in fit.encoded))
        if fit.reduced:
            st['kept with fewer frames'] += 1
            line += f' (of {fit.frames_of}: fewer to fit --max-length)'
        tally_cut(fit, st, problems, where, allow_truncation)
    lines.append(line)


def check_slice(ds, args, start: int, stop: int, bar=None) -> dict:
    """Records ``start..stop`` checked (images decoded, each fitted with a tokenizer): their counts per file, token
    lengths, video lines, problems and notes (``(reason, message, FILE:LINE)``, to cross processes)."""
    stats, lengths, video_lines, problems, notes = defaultdict(Counter), defaultdict(list), [], [], []
    tokenizer = ds.tokenizer
    for r in range(start, stop):
        record = ds.records[r]
        if bar is not None:
            bar.update()
        st = stats[record.source]   # per naming of a file (a file named twice by a meta file: two reports)
        where = ds.where(record)
        st['samples'] += 1
        try:
            checked = ds.check_record(record)  # the data set's parse and checks, once
        except SampleError as err:   # passed a start-up check read from the cache: an image a link out since
            st[f'dropped ({err.reason.replace("_", " ")})'] += 1
            problems.append(err.with_source(where))
            continue
        if checked.video is not None:
            check_video(ds, record, checked, st, problems, video_lines, tokenizer is not None, lengths,
                        args.allow_truncation)
            continue
        st['text-only samples' if not checked.image_paths else 'image samples'] += 1
        sizes = []
        for path in checked.image_paths:
            st['images'] += 1
            try:
                sizes.append(load_image(path, ds.max_image_pixels).size)
                st['images found'] += 1
                tally_frames(frame_note(path), st, notes, where)
            except SampleError as err:
                st[f'images {err.reason.replace("_", " ")}'] += 1
                problems.append(err.with_source(where))
        if len(sizes) < len(checked.image_paths):
            st[f'dropped ({problems[-1].reason.replace("_", " ")})'] += 1
            continue
        if tokenizer is None:
            continue
        try:
            fit = ds.fit(record, checked, sizes)  # what training does with it: the data set's own decision
        except SampleError as err:
            st[f'dropped ({err.reason.replace("_", " ")})'] += 1
            problems.append(err.with_source(where))
            continue
        lengths[record.source].append(max(len(e['input_ids']) for e in fit.encoded))
        tally_fit(fit, st, notes, problems, where, ds.max_tiles_per_image(record, len(sizes)), args.max_length,
                  args.allow_truncation)
    return dict(stats=dict(stats), lengths=dict(lengths), videos=video_lines,
                problems=[(p.reason, p.message, p.source) for p in problems],
                notes=[(n.reason, n.message, n.source) for n in notes])


#: the largest --image-size taken: a tile's side in pixels (448 InternViT's, 384 SigLIP's, 1024 the largest towers')
MOST_IMAGE_SIZE = 8192


def main(argv=None) -> int:
    from xtuner_plugins.data.nodepass import WorkerDied
    from xtuner_plugins.signals import sigterm_as_interrupt, stop_code
    try:
        with sigterm_as_interrupt():   # kill, timeout, Slurm: as Ctrl-C
            return _main(argv)
    except WorkerDied as exc:   # a process of the check killed (the OOM killer): one line
        print(f'error: {exc}', file=sys.stderr)
        return 1
    except KeyboardInterrupt as exc:   # Ctrl-C (its workers' stop with it): one line, no report
        print('error: stopped before the check finished; no report', file=sys.stderr)
        return stop_code(exc)


def _main(argv=None) -> int:
    args = parse_args(argv)
    args.workers = default_workers() if args.workers is None else args.workers
    if args.workers < 1:
        print(f'error: --workers must be at least 1, got {args.workers}', file=sys.stderr)
        return 2
    if args.show < 0:   # (-1 hid the last problem of each reason)
        print(f'error: --show {args.show}: give 0 (every problem) or more', file=sys.stderr)
        return 2
    if not 1 <= args.image_size <= MOST_IMAGE_SIZE:
        print(f'error: --image-size {args.image_size}: give a tile side in pixels from 1 to {MOST_IMAGE_SIZE} '
              f'(the vision encoder\'s: 448 for InternViT, 384 for SigLIP)', file=sys.stderr)
        return 2
    folders = args.image_folder
    if folders is not None and len(folders) == 1:
        folders = folders[0]
    tokenizer = None
    try:
        if args.tokenizer:
            tokenizer = build_tokenizer(args.tokenizer, '--tokenizer')
        shard_sets = [d for d in args.data if os.path.isfile(os.path.join(d, 'shards.json'))]
        beside = [what for what, given in (('the other --data', len(args.data) > 1),
                                           ('--image-folder', bool(args.image_folder))) if given]
        if shard_sets and beside:   # (each was refused as 'not sharded again')
            raise ValueError(f'{shard_sets[0]} is a shard set: it is checked on its own, and holds its images '
                             f'(check_dataset.py --data {shard_sets[0]}, without {" nor ".join(beside)})')
        if shard_sets and args.pairs == 'yes':   # (it was checked as SFT samples without a word)
            raise ValueError(f'{shard_sets[0]} is a shard set, which holds conversations: tools/shard_dataset.py '
                             f'shards no preference pairs, so --pairs yes does not apply (check the pairs\' '
                             f'annotation file with it)')
        if len(args.data) == 1 and os.path.isdir(args.data[0]):   # a shard set (tools/shard_dataset.py)
            return check_shard_set(args, tokenizer)
        pairs = args.pairs == 'yes' or (args.pairs == 'auto' and first_is_pair(args.data))
        if pairs:
            print('preference pairs: checked as DPO / MPO training reads them (--pairs no: as SFT samples)')
        dataset_class = InternVLPreferenceDataset if pairs else InternVLDataset
        ds = dataset_class(args.data, image_folders=folders, tokenizer=tokenizer, template=args.template,
                           max_length=args.max_length, image_size=args.image_size, patch_size=args.patch_size,
                           downsample_ratio=args.downsample_ratio, num_image_token=args.num_image_token,
                           image_mode=args.image_mode, min_dynamic_patch=args.min_dynamic_patch,
                           max_dynamic_patch=args.max_dynamic_patch, use_thumbnail=not args.no_thumbnail,
                           truncation=args.truncation, allow_control_text=args.allow_control_text,
                           min_num_frame=args.min_num_frame, max_num_frame=args.max_num_frame,
                           allow_links_outside=args.allow_links_outside,
                           max_image_pixels=args.max_image_pixels or None,
                           max_bad_fraction=1.0, workers=args.workers)
    except (ValueError, FileNotFoundError) as exc:
        print(f'error: {exc}', file=sys.stderr)
        return 2

    problems, notes = list(ds.load_problems), []
    stats = defaultdict(Counter)
    lengths = defaultdict(list)
    video_lines = []
    namings = defaultdict(list)   # a file's sources: a line it cannot read is dropped by each
    for i, src in enumerate(ds.sources):
        namings[src.annotation].append(i)
    for prob in problems:
        for i in namings.get(prob.source.rsplit(':', 1)[0], ()):
            stats[i][f'dropped ({prob.reason.replace("_", " ")})'] += 1
    bar = tqdm(total=len(ds.records), desc='checking', unit='sample', file=sys.stderr)
    for part in run_slices(lambda a, b: check_slice(ds, args, a, b, bar if args.workers == 1 else None),
                           len(ds.records), args.workers, 'checking', progress=bar.update):
        for source, counts in part['stats'].items():
            stats[source].update(counts)
        for source, values in part['lengths'].items():
            lengths[source].extend(values)
        video_lines.extend(part['videos'])
        problems.extend(SampleError(*p) for p in part['problems'])
        notes.extend(SampleError(*n) for n in part['notes'])
    bar.close()

    print_problems(notes + problems, args.show)

    print_videos(video_lines, args.show)
    print('\nSummary')
    after_repeats = ds.items_per_source()
    for i, src in enumerate(ds.sources):
        st = stats[i]
        named = f'{src.name!r}: ' if len(namings[src.annotation]) > 1 else ''
        print(f'{src.annotation} ({named}image folder {src.image_folder}, repeat_time {src.repeat_time}, '
              f'{after_repeats[i]} samples after repeats)')
        for key in sorted(st):
            print(f'  {key}: {st[key]}')
        if lengths[i]:
            print(f'  tokens trained on (text + image): {percentile_line(lengths[i])}')
    return closing_lines(problems, notes, tokenizer)


def print_problems(probs_and_notes, show: int) -> None:
    by_reason = defaultdict(list)
    for prob in probs_and_notes:
        by_reason[prob.reason].append(prob)
    for reason, probs in sorted(by_reason.items()):
        shown = probs if not show else probs[:show]
        for prob in shown:
            print(f'{prob.source}: {reason}: {prob.message}')
        if len(shown) < len(probs):
            print(f'... and {len(probs) - len(shown)} more [{reason}]')


def print_videos(lines, show: int) -> None:
    """Each video's line (``show`` of them; 0: all)."""
    if lines:
        print('\nVideos')
        for line in lines if not show else lines[:show]:
            print(line)
        if show and len(lines) > show:
            print(f'... and {len(lines) - show} more videos')


def check_shard_set(args, tokenizer) -> int:
    """The same report for a shard folder (``data/shard_check.check_shards``): each sample read from its shard."""
    from xtuner_plugins.data.shard_check import check_shards
    report = check_shards(args.data[0], allow_truncation=args.allow_truncation, check_video=check_video,
                          min_num_frame=args.min_num_frame, max_num_frame=args.max_num_frame, tokenizer=tokenizer,
                          template=args.template, max_length=args.max_length, image_size=args.image_size,
                          patch_size=args.patch_size, downsample_ratio=args.downsample_ratio,
                          num_image_token=args.num_image_token, image_mode=args.image_mode,
                          min_dynamic_patch=args.min_dynamic_patch, max_dynamic_patch=args.max_dynamic_patch,
                          use_thumbnail=not args.no_thumbnail, truncation=args.truncation,
                          allow_control_text=args.allow_control_text, max_image_pixels=args.max_image_pixels or None,
                          allow_links_outside=args.allow_links_outside)
    problems, notes, stats, lengths = (report[k] for k in ('problems', 'notes', 'stats', 'lengths'))
    print_problems(notes + problems, args.show)
    print_videos(report['videos'], args.show)
    print('\nSummary')
    for annotation in sorted(stats):
        print(f'{annotation} (from the shards in {args.data[0]})')
        for key in sorted(stats[annotation]):
            print(f'  {key}: {stats[annotation][key]}')
        if lengths[annotation]:
            print(f'  tokens trained on (text + image): {percentile_line(lengths[annotation])}')
    print(f'left out when sharded: {dict(report["skipped"]) or "none"}')
    return closing_lines(problems, notes, tokenizer)


def closing_lines(problems, notes, tokenizer) -> int:
    kinds = Counter(n.reason for n in notes)
    if kinds['fewer_tiles']:
        print(f'notes: {kinds["fewer_tiles"]} samples get fewer tiles to fit --max-length (training keeps them)')
    if kinds['animated_image']:
        print(f'notes: {kinds["animated_image"]} image(s) of several frames (animated GIF, PNG or WebP; TIFF pages): '
              'training reads the first frame of each, as InternVL\'s loader does (a "video" reads them all)')
    if tokenizer is None:
        print('not checked without --tokenizer: token lengths (what --max-length does to each sample) and the '
              'tokenizer\'s own special tokens (<|endoftext|>, ...) written in the text')
    print(f'problems: {len(problems)}' + (f' ({dict(Counter(p.reason for p in problems))})' if problems else ''))
    return 1 if problems else 0


if __name__ == '__main__':
    sys.exit(main())
