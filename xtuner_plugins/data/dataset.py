"""The InternVL dataset: annotation files -> token ids, labels and ``uint8`` image tiles.

Configs name :class:`InternVLDataset` directly::

    train_dataset = dict(
        type=InternVLDataset,
        data_files=['data/llava_pretrain.json', 'data/my_sft.jsonl', 'data/meta.json'],
        image_folders=['data/llava_images', 'data/my_images', None],   # meta files carry their own root
        repeat_times=[1, 2.5, 1],
        tokenizer=dict(type=AutoTokenizer.from_pretrained, pretrained_model_name_or_path=LLM_PATH),
        template='internvl2_5', max_length=8192, max_dynamic_patch=12)

Each item is a dict with ``input_ids`` and ``labels`` (``LongTensor [L]``), ``pixel_values``
(``uint8 [N, 3, S, S]``, normalised later on the device), ``image_flags`` (``LongTensor [N]``: 1 for
real tiles, 0 for the dummy tile a text-only sample carries so that every rank runs the vision tower)
``num_tiles`` (``N``) and ``samples`` (``['FILE:LINE']``, named in messages about its batch).

Bad samples never shift images against text: a sample either comes out whole or not at all. Problems
found while reading the files (a line that is not JSON, a malformed conversation, ``<image>`` tags that
do not match the images, a path escaping its image folder, ``<video>`` tags that do not match the video, a
sample with both images and a video) are counted and logged once
per reason at start-up, as is the count of images and videos not found (``presence.py``; none found, a wrong
image folder, stops start-up). That check of every sample runs once per node over every core and is cached
(``startcheck.py``); the samples themselves stay in their files, found by a memory-mapped byte index
(``index.py``, ``records.py``), and are read when loaded; problems found while loading a sample (missing, corrupt, truncated or oversized
image, a sample too long for ``max_length``) are counted and logged once per reason, and the next sample
is served instead. What ``max_length`` does to a sample (fewer tiles, an answer cut) is decided in
``fitting.py``, for training and ``tools/check_dataset.py`` alike, and counted (``reduced``, ``truncated``).
Past ``max_bad_fraction`` of the data (per process / dataloader worker) the dataset
raises :class:`~xtuner_plugins.data.errors.TooManyBadSamplesError` with the counts per reason.
"""

from __future__ import annotations

import logging
import numbers
import os
import random
from collections import Counter
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from mmengine.logging import print_log
from torch.utils.data import Dataset

from xtuner_plugins.errors import Refused

from .epochs import take_epoch
from .errors import SampleError, TooManyBadSamplesError
from .image_io import DEFAULT_MAX_IMAGE_PIXELS, resolve_image_path
from .lengths import LengthStats
from .entries import parse_record, sample_conversations, sample_images
from .sources import DataSource, Record, expand_sources
from .checked import CheckedSample, build_tokenizer
from .sample_loading import SampleLoading
from .startcheck import read_sources
from .conversation import parse_conversation
from .fitting import TRUNCATION, checked_geometry
from .template import (DEFAULT_TEMPLATE, add_internvl_tokens, check_tokenizer_fits, control_markers,
                       disable_tokenizer_parallelism, get_template)
from .tile_grid import tiles_problem
from .tiling import IMAGE_MODES, IMAGENET_MEAN
from .video import video_field, video_turns
from .video_sample import VideoSamples


# What a data set built directly (not from a training config, which takes the model's) uses for None.
DEFAULT_IMAGE_SIZE = 448          # InternViT-300M-448px's tiles


class InternVLDataset(SampleLoading, VideoSamples, LengthStats, Dataset):
    """LLaVA-format samples with InternVL 2.5 dynamic high-resolution tiling (a record loaded as an item:
    :class:`~xtuner_plugins.data.sample_loading.SampleLoading`; videos: :class:`VideoSamples`; lengths for the
    length-grouped sampler: :class:`~xtuner_plugins.data.lengths.LengthStats`).

    Args:
        data_files: one path or a list: ``.jsonl``, ``.json`` (a list of samples) or InternVL meta
            ``.json`` files (``{name: {"root", "annotation", "repeat_time", "max_dynamic_patch"}}``).
        image_folders: the image folder of each file (one for all, or one per file; ``None`` resolves
            relative image paths against the annotation file's folder, absolute ones as written). Paths may
            not escape their folder (``image_io.resolve_image_path``).
        repeat_times: per file; the fractional part counts (2.5 = two copies plus a seeded half).
        max_dynamic_patches: per-file override of ``max_dynamic_patch``.
        tokenizer: a tokenizer, its folder, or a config dict building one. InternVL's added tokens are
            added to it.
            May be ``None`` only for checking files (``tools/check_dataset.py``), not for training.
        template: the conversation template's name (see ``template.TEMPLATES``) or a ``Template``.
        system: system message overriding the template's default (a system turn in the data wins).
        max_length: token budget per sample; text after the last image may be cut, images never.
        truncation: ``'keep'`` (the default, as InternVL) trains on a sample whose answer ``max_length`` cuts,
            counted as ``truncated`` with the tokens it lost (logged, and in ``skipped_samples.json``);
            ``'drop'`` skips it as a bad sample (reason ``truncated``).
        allow_control_text: a sample whose text holds a control marker of the template or tokenizer
            (``<|im_end|>``, ``<|endoftext|>``, the image tokens, see ``template.control_markers``) is refused
            as ``control_text`` by default; ``True`` trains on it, the markers tokenised as plain text.
        image_size: tile side in pixels, the vision encoder's (448 for InternViT-300M-448px).
        num_image_token: ``<IMG_CONTEXT>`` tokens per tile, the projector's (``model.num_image_token``: 256
            for InternVL's pixel shuffle of 448 px tiles, 576 for LLaVA's MLP on CLIP-336, 169 for
            ``bilinear_mlp`` on SigLIP-384). None: InternVL's pixel-shuffle count,
            ``(image_size // patch_size) ** 2 * downsample_ratio ** 2``.
        patch_size, downsample_ratio: that count's inputs (14, 0.5), used when ``num_image_token`` is None.
        image_mode: ``'tile'`` (InternVL's dynamic tiling), ``'resize'`` (one tile per image, resized) or
            ``'pad'`` (one tile, padded to a square with the ``image_mean`` colour first, as LLaVA).
        image_mean: the encoder's normalisation mean; only ``'pad'`` uses it (its padding colour).

    In training, ``image_size``, ``num_image_token``, ``image_mode``, ``image_mean``, ``template`` and
    ``tokenizer`` left None come from the model's config before the data set is built
    (``xtuner_plugins.engine.derive``); a data set built directly takes None as InternVL 2.5's value
    (448 px tiles, ``'tile'``, ImageNet's mean, ``'internvl2_5'``; no tokenizer).
        min_dynamic_patch, max_dynamic_patch: tile-count range; a sample with N images uses
            ``max(1, max_dynamic_patch // N)`` tiles per image.
        use_thumbnail: append a whole-image thumbnail tile when an image has more than one tile.
        dynamic_image_size: InternVL's name; ``False`` is ``image_mode='resize'``.
        max_bad_fraction: stop when more than this fraction of the samples is bad (0 stops at the first).
        max_image_pixels: decompression-bomb limit (Pillow's by default); ``None`` disables it.
        seed: seed for fractional repeats.
        cache_dir: where the per-file caches go: the sample index, the start-up check and the lengths (for the
            length-grouped sampler); default ``~/.cache/xtuner_plugins/lengths``.
        length_field: a field holding a sample's token length (InternVL's ``'length'``): where a sample has it, the
            length-grouped sampler uses it, untokenised (None, the default: every length is counted, as packing
            needs).
        workers: processes for the start-up check and the lengths, once per node (default: every core).
        lengths_with_check: the start-up check computes the lengths too (False: online packing, never reading them).
        allow_links_outside: follow symbolic links inside an image folder to files outside it (refused as
            ``unsafe_image_path`` by default).
        min_num_frame, max_num_frame: a video sample's frame count is drawn in this range (InternVL's 8 and 32),
            per sample from ``seed`` (the same in every epoch); each frame is one tile (``data/video.py``).
        video_sampling: where the frames are taken: ``'rand'`` (one at random in each of N equal intervals, from
            ``seed``, the epoch and the sample), ``'middle'`` (each interval's middle) or ``'fpsX'`` (X per second).
        frame_prefix: the text before each frame's ``<image>`` (``{i}`` from 1); None: the template's
            (``'Frame{i}: '``).

    The model checks at start-up (``ModelDataCheckHook``) that :attr:`geometry` matches its own.
    """

    def __init__(self,
                 data_files: Union[str, Sequence[str]],
                 image_folders: Union[None, str, Sequence[Optional[str]]] = None,
                 repeat_times: Union[float, Sequence[float]] = 1.0,
                 max_dynamic_patches: Union[None, int, Sequence[Optional[int]]] = None,
                 tokenizer=None,
                 template=None,
                 system: Optional[str] = None,
                 max_length: Optional[int] = 8192,
                 truncation: str = 'keep',
                 allow_control_text: bool = False,
                 image_size: Optional[int] = None,
                 num_image_token: Optional[int] = None,
                 patch_size: int = 14,
                 downsample_ratio: float = 0.5,
                 image_mode: Optional[str] = None,
                 image_mean: Optional[Sequence[float]] = None,
                 min_dynamic_patch: int = 1,
                 max_dynamic_patch: int = 12,
                 use_thumbnail: bool = True,
                 dynamic_image_size: bool = True,
                 max_bad_fraction: float = 0.01,
                 max_image_pixels: Optional[int] = DEFAULT_MAX_IMAGE_PIXELS,
                 seed: int = 0,
                 cache_dir: Optional[str] = None,
                 allow_links_outside: bool = False,
                 min_num_frame: int = 8,
                 max_num_frame: int = 32,
                 video_sampling: str = 'rand',
                 frame_prefix: Optional[str] = None,
                 length_field: Optional[str] = None,
                 workers: Optional[int] = None,
                 lengths_with_check: bool = True):
        super().__init__()
        self.init_video(min_num_frame, max_num_frame, video_sampling)  # video_sample.py
        if truncation not in TRUNCATION:
            raise Refused(f'truncation={truncation!r}; use one of {TRUNCATION}')
        for name, value in (('system', system), ('cache_dir', cache_dir), ('length_field', length_field)):
            if value is not None and not isinstance(value, (str, os.PathLike)):   # (TypeErrors, or unused)
                raise Refused(f'{name}={value!r:.60}: expected text (a path, a name) or None')
        if not 0 <= max_bad_fraction <= 1:
            raise Refused(f'max_bad_fraction must be in [0, 1], got {max_bad_fraction}')
        for problem in (tiles_problem(min_dynamic_patch, 'min_dynamic_patch'),
                        tiles_problem(max_dynamic_patch, 'max_dynamic_patch')):
            if problem:
                raise Refused(problem)
        if not 1 <= min_dynamic_patch <= max_dynamic_patch:
            raise Refused(f'need 1 <= min_dynamic_patch <= max_dynamic_patch, got '
                          f'{min_dynamic_patch} and {max_dynamic_patch}')
        disable_tokenizer_parallelism()  # before any tokenising here: forked workers tokenise too
        self.tokenizer = build_tokenizer(tokenizer)
        if self.tokenizer is not None:
            add_internvl_tokens(self.tokenizer)
        template = DEFAULT_TEMPLATE if template is None else template
        image_size = DEFAULT_IMAGE_SIZE if image_size is None else image_size   # (checked_geometry checks it)
        image_mode = 'tile' if image_mode is None else image_mode
        image_mean = IMAGENET_MEAN if image_mean is None else image_mean
        self.template = get_template(template)
        self.init_frame_prefix(frame_prefix)
        if self.tokenizer is not None:
            check_tokenizer_fits(self.tokenizer, self.template,
                                 where=tokenizer if isinstance(tokenizer, str) else 'the data set\'s tokenizer',
                                 setting='the data set\'s template (in training model.template\'s, unless '
                                         'train_dataloader.dataset.template is set; tools/check_dataset.py: '
                                         '--template)')
        self.system = system
        self.max_length = max_length
        self.truncation = truncation
        self.allow_control_text = allow_control_text
        self.control_markers = () if allow_control_text else control_markers(self.tokenizer, self.template)
        if image_mode not in IMAGE_MODES:
            raise Refused(f'unknown image_mode {image_mode!r}; use one of {IMAGE_MODES}')
        self.image_mode = image_mode if dynamic_image_size else 'resize'
        if isinstance(image_mean, (str, bytes)) or not hasattr(image_mean, '__len__') or len(image_mean) != 3 or \
                not all(isinstance(x, numbers.Real) and not isinstance(x, bool) for x in image_mean):
            raise Refused(f'image_mean={image_mean!r:.60}: the mean colour is 3 numbers (R, G, B, from 0 to 1)')
        self.image_mean = tuple(float(x) for x in image_mean)
        self.num_image_token = checked_geometry(max_length, image_size, patch_size, downsample_ratio, num_image_token,
                                                max_image_pixels)
        self.image_size = int(image_size)
        self.min_dynamic_patch = min_dynamic_patch
        self.max_dynamic_patch = max_dynamic_patch
        self.use_thumbnail = use_thumbnail
        self.dynamic_image_size = self.image_mode == 'tile'
        self.max_bad_fraction = max_bad_fraction
        self.max_image_pixels = max_image_pixels
        self.seed = seed
        self.cache_dir = cache_dir
        self.allow_links_outside = allow_links_outside
        self.length_field = length_field
        self.workers = workers
        self.lengths_with_check = lengths_with_check

        self.failures: Counter = Counter()  # samples that failed to load in this process, by reason
        self.failed: Dict[str, str] = {}     # FILE:LINE -> reason of those samples: each is counted once
        self.reduced: Dict[str, int] = {}    # FILE:LINE -> tiles per image it was cut to, to fit max_length
        self.truncated: Dict[str, int] = {}  # FILE:LINE -> tokens max_length cut from it (its answer cut, kept)
        self._lengths: Optional[np.ndarray] = None
        self.read_files(data_files, image_folders, repeat_times, max_dynamic_patches)

    def read_files(self, data_files, image_folders, repeat_times, max_dynamic_patches) -> None:
        """The annotation files: their sources, the index of their samples and its start-up check; a subclass
        reading its samples elsewhere (``shards.ShardSamples``) sets ``sources`` and ``num_distinct`` its way."""
        self.sources: List[DataSource] = expand_sources(data_files, image_folders, repeat_times,
                                                        max_dynamic_patches)
        # startcheck.py: each file's index and start-up check, once per node and cached
        self.records, self._index, self._source_ranges, self.load_problems = read_sources(
            self, self.seed, lambda *args, **kw: print_log(*args, **kw))
        used = np.zeros(len(self.records), dtype=bool)
        used[self._index] = True  # (np.unique: 19 s at 16M items)
        self.num_distinct = int(used.sum())  # samples the limit is a fraction of (repeats once)
        self._report_load_problems()

    # ------------------------------------------------------------------ reading and checking
    def where(self, record: Record) -> str:
        """``FILE:LINE`` of a record."""
        return f'{self.sources[record.source].annotation}:{record.line}'

    def max_tiles_per_image(self, record: Record, num_images: int) -> int:
        if not self.dynamic_image_size:
            return 1
        patch = self.sources[record.source].max_dynamic_patch or self.max_dynamic_patch
        return max(1, int(patch) // max(1, num_images))

    def parse(self, record: Record) -> dict:
        """The sample of a record, with its ``conversations`` (a subclass may build them from other fields)."""
        return parse_record(record)

    def conversations_of(self, sample: dict) -> List[Any]:
        """The conversations a sample is trained on (one here; a preference pair's two)."""
        return [sample_conversations(sample)]

    def check_record(self, record: Record) -> 'CheckedSample':
        """The record parsed and checked once (no image decoding, no tokenizer): what loading and the length
        count read. Raises :class:`SampleError`."""
        sample = self.parse(record)
        src = self.sources[record.source]
        video = video_field(sample)
        images = sample_images(sample)
        self.refuse_images_with_video(video, images)
        paths = [resolve_image_path(path, src.image_folder, src.base_dir, self.allow_links_outside)
                 for path in images]
        conversations = [parse_conversation(video_turns(c, video is not None), len(paths), self.template,
                                            self.system, self.control_markers) for c in self.conversations_of(sample)]
        if video is None:
            return CheckedSample(sample, paths, conversations)
        return CheckedSample(sample, [], conversations, self.resolve_video(record, video), video[1],
                             self.links_within(record))

    def record_at(self, index: int) -> Record:
        """The record of item ``index`` (after repeats)."""
        return self.records[int(self._index[index])]

    def items_per_source(self) -> List[int]:
        """How many items (after repeats) each source gives, without reading a sample."""
        return np.bincount(self.records.source_of(self._index), minlength=len(self.sources)).tolist()

    def _report_load_problems(self) -> None:
        if not self.load_problems:
            return
        counts = self.load_problems.reasons()
        for problem in self.load_problems.firsts():
            print_log(f'Skipping bad sample ({counts[problem.reason]} with this reason): {problem}',
                      logger='current', level=logging.WARNING)
        total = len(self.records) + len(self.load_problems)
        if len(self.load_problems) > self.max_bad_fraction * total:
            raise TooManyBadSamplesError(
                f'{len(self.load_problems)} of {total} samples are bad, over max_bad_fraction='
                f'{self.max_bad_fraction}: {dict(counts)}; first: {self.load_problems[0]}. '
                f'Run tools/check_dataset.py for the full list.')

    # ------------------------------------------------------------------ loading (sample_loading.py) and bad samples
    def count_failure(self, err: SampleError) -> None:
        """Count a sample that failed to load, once however often it is drawn; stop past the limit. Other
        processes (DataLoader workers, ranks) count their own; ``BadSampleHook`` adds them all up."""
        if err.source in self.failed:
            return
        self.failed[err.source] = err.reason
        self.failures[err.reason] += 1
        if self.failures[err.reason] == 1:
            print_log(f'Skipping bad sample (first with this reason in this process; later ones are counted): '
                      f'{err}', logger='current', level=logging.WARNING)
        total = len(self.failed)
        if total > self.max_bad_fraction * self.num_distinct:
            raise TooManyBadSamplesError(
                f'{total} samples failed to load in this process, over max_bad_fraction={self.max_bad_fraction} '
                f'of {self.num_distinct}: {dict(self.failures)}; last: {err}. Run tools/check_dataset.py for the '
                f'full list.')

    def __len__(self) -> int:
        return len(self._index)

    def __getitem__(self, index: int) -> Dict[str, torch.Tensor]:
        """The sample at ``index``; a bad one is counted and replaced by a sample drawn with a generator seeded
        by ``seed`` and ``index`` (the same replacement in every run). ``skipped`` lists what was skipped. An
        index from training's sampler carries its epoch (``data/epochs.py``), which this data set takes."""
        take_epoch(self, index)
        n, skipped = len(self._index), []
        for position, scanning in self._candidates(int(index), n):
            record = self.record_at(position)
            if scanning and self.where(record) in self.failed:
                continue
            try:
                item = self.load_sample(record)
                item['skipped'] = skipped
                return item
            except SampleError as err:
                self.count_failure(err.with_source(self.where(record)))
                skipped.append((err.source, err.reason))
        raise TooManyBadSamplesError(f'none of the {n} samples could be loaded: {dict(self.failures)}')

    def _candidates(self, index: int, n: int) -> Iterator[Tuple[int, bool]]:
        """``(position, scanning)``: ``index``, then n - 1 replacement draws seeded by ``seed`` and ``index``, then
        (most samples bad: the draws can miss the good ones) every position in turn from ``index``, scanning."""
        yield index % n, False
        rng = random.Random(self.seed * 1_000_003 + index)
        for _ in range(n - 1):
            yield rng.randrange(n), False
        for k in range(n):
            yield (index + k) % n, True

    @property
    def geometry(self) -> Dict[str, object]:
        """Tile size, tokens per tile, image mode and mean colour, as ``VisionLanguageModel.geometry``."""
        return dict(image_size=self.image_size, num_image_token=self.num_image_token, image_mode=self.image_mode,
                    image_mean=self.image_mean)
