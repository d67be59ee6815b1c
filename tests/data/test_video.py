"""Videos: reading files / GIFs / frame folders by seeking, the Frame{i} prompt, the data
set's video samples (frame counts, lengths, packing, fewer frames for max_length) and every bad input named.

Videos are made here: frame i is a grey of level 6*i (lossless H.264), so a decoded frame tells its number."""

import json
import os
import re

import numpy as np
import pytest
import torch

from tests.helpers import conv, write_image, write_jsonl, write_video
from xtuner_plugins.data import dataset as dataset_module
from xtuner_plugins.data.dataset import InternVLDataset
from xtuner_plugins.data.errors import SampleError
from xtuner_plugins.data.packing import PackedInternVLDataset
from xtuner_plugins.data.template import IGNORE_INDEX, IMG_CONTEXT_TOKEN
from xtuner_plugins.data import video_decode
from tests.data.test_frame_sampling import reference_indices
from xtuner_plugins.data.video import choose_frames, load_video, probe_video, read_frames, video_prompt

S = 28
LEVELS = [6 * i for i in range(40)]


def numbers(frames):
    """The frame number each decoded frame shows."""
    return [int(round(np.asarray(f)[0, 0, 0] / 6)) for f in frames]


def write_vfr(path, levels, gaps_ms, size=(32, 24)):
    """An H.264 ``.mp4`` whose frame i (grey ``levels[i]``) is stamped after the gaps ``gaps_ms`` (cycled): a
    variable frame rate, as phones record."""
    import fractions

    import av
    w, h = size
    ms = fractions.Fraction(1, 1000)
    with av.open(str(path), 'w') as container:
        stream = container.add_stream('libx264', rate=10)
        stream.width, stream.height, stream.pix_fmt = w, h, 'yuv444p'
        stream.time_base = stream.codec_context.time_base = ms
        stream.options = {'g': '5', 'qp': '0', 'bf': '0'}
        t = 0
        for i, level in enumerate(levels):
            frame = av.VideoFrame.from_ndarray(np.full((h, w, 3), level, np.uint8), format='rgb24')
            frame.pts, frame.time_base = t, ms
            t += gaps_ms[i % len(gaps_ms)]
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return str(path)


@pytest.fixture(scope='module')
def videos(tmp_path_factory):
    root = tmp_path_factory.mktemp('videos')
    return {kind: write_video(root / name, LEVELS) for kind, name in
            (('file', 'v.mp4'), ('gif', 'v.gif'), ('folder', 'frames'))}


class TestReading:

    @pytest.mark.parametrize('kind', ['file', 'gif', 'folder'])
    def test_reads_the_sampled_frames(self, videos, kind):
        info = probe_video(videos[kind])
        assert (info.total, info.size, info.kind) == (40, (32, 24), kind)
        idx = choose_frames(info, 8, 'middle')
        assert idx == reference_indices(8, 40, 'middle')
        assert numbers(read_frames(info, idx)) == idx
        rand = choose_frames(info, 12, 'rand', np.random.default_rng(3))
        assert numbers(read_frames(info, rand)) == rand

    def test_short_video_is_padded_with_its_last_frame(self, tmp_path):
        info = probe_video(write_video(tmp_path / 's.mp4', LEVELS[:3]))
        frames = read_frames(info, choose_frames(info, 8, 'middle'))
        assert numbers(frames) == [0, 1, 2, 2, 2, 2, 2, 2]

    def test_seeks_instead_of_decoding_everything(self, tmp_path, monkeypatch):
        path = write_video(tmp_path / 'long.mp4', [i % 40 * 6 for i in range(400)], gop=10)
        decoded = []
        real = video_decode.open_stream

        class Counting:  # the container, counting the frames decoded
            def __init__(self, container):
                self.container = container

            def __getattr__(self, name):
                return getattr(self.container, name)

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                self.container.close()

            def decode(self, *args, **kw):
                for frame in self.container.decode(*args, **kw):
                    decoded.append(frame.pts)
                    yield frame

        def counting(p):
            container, stream = real(p)
            return Counting(container), stream
        monkeypatch.setattr(video_decode, 'open_stream', counting)
        info = probe_video(path)
        idx = choose_frames(info, 8, 'middle')
        assert [n % 40 for n in idx] == numbers(read_frames(info, idx))
        assert len(decoded) <= 8 * 10  # at most a keyframe interval per frame asked for, not 400

    def test_a_variable_frame_rate_gives_the_frames_asked_for(self, tmp_path):
        """Frame i is the i-th by presentation timestamp, not the one at i / average fps: bursts of 4 frames 10 ms
        apart, then 200 ms gaps (the average rate, 18 fps, lands between them)."""
        path = write_vfr(tmp_path / 'vfr.mp4', LEVELS, gaps_ms=[10, 10, 10, 200])
        info = probe_video(path)
        assert info.total == 40 and 15 < info.fps < 20
        everything = list(range(40))
        assert numbers(read_frames(info, everything)) == everything
        for idx in (choose_frames(info, 32, 'middle'), choose_frames(info, 12, 'rand', np.random.default_rng(5)),
                    [39, 0, 17, 17, 4]):
            assert numbers(read_frames(info, idx)) == idx

    @pytest.mark.parametrize('sample', ['fps2', 'fps0.5', 'middle', 'rand'])
    def test_a_short_frame_folder_gives_each_frame_once_at_any_sampling(self, tmp_path, sample):
        """InternVL's folder reader takes every frame when there are no more than the frames drawn, whatever the
        sampling: fpsX (a folder read at 1 fps) gave 9 frames of 5 with duplicates, or fewer than it holds."""
        from xtuner_plugins.data.video import frames_for
        info = probe_video(write_video(tmp_path / 'frames', LEVELS[:5]))
        assert frames_for(info, 12, sample, max_num=12) == 5
        idx = choose_frames(info, 5, sample, np.random.default_rng(0))
        assert idx == [0, 1, 2, 3, 4] and numbers(read_frames(info, idx)) == idx

    def test_a_frame_named_with_a_digit_int_cannot_read_is_ordered_not_a_traceback(self, tmp_path):
        """A frame file named '\u00b21.png' (a superscript two: str.isdigit, not int's) was a raw ValueError of the
        folder's ordering (``int('\u00b2')``) at every load of its sample, not a sample loaded or skipped."""
        folder = write_video(tmp_path / 'frames', LEVELS[:3])
        os.rename(os.path.join(folder, '0003.png'), os.path.join(folder, '\u00b21.png'))
        info = probe_video(folder)
        assert [os.path.basename(f) for f in info.frames] == ['0001.png', '0002.png', '\u00b21.png']
        assert numbers(read_frames(info, [0, 1, 2])) == [0, 1, 2]

    @pytest.mark.parametrize('gaps', [[10, 10, 10, 200], [10], [1000, 1000, 100]])
    def test_a_matroska_file_counts_its_frames_at_any_frame_rate(self, tmp_path, gaps):
        """Matroska and WebM carry no frame count: the duration times the declared rate (10 fps here) counted 3
        frames of 40 at 100 fps (the rest never sampled), 148 of 40 at 2.5 fps (the video dropped as truncated).
        The packets are counted; every frame reads as the one asked for."""
        path = write_vfr(tmp_path / 'vfr.mkv', LEVELS, gaps_ms=gaps)
        info = probe_video(path)
        assert info.total == 40
        everything = list(range(40))
        assert numbers(read_frames(info, everything)) == everything
        idx = choose_frames(info, 8, 'middle')
        assert numbers(read_frames(info, idx)) == idx and idx[-1] > 30
        # counted once per file as it is (a sample's video is probed at every load): the count kept is read back,
        # until the file changes
        (key,) = [k for k in video_decode._COUNTED if k[0] == os.path.abspath(path)]
        video_decode._COUNTED[key] = 41
        assert probe_video(path).total == 41
        os.utime(path, ns=(key[2] + 1000, key[2] + 1000))
        assert probe_video(path).total == 40
        from xtuner_plugins.data.video import VideoBytes   # a shard's member: its bytes, named SHARD:KEY.video.mkv
        with open(path, 'rb') as f:
            assert probe_video(VideoBytes('s.tar:000000001.video.mkv', f.read())).total == 40

    def test_clip(self, videos):
        frames, info = load_video(videos['file'], 4, clip=(1.0, 3.0))
        assert (info.start, info.length) == (10, 20)
        assert numbers(frames) == [10 + i for i in reference_indices(4, 20, 'middle')]


class TestPrompt:

    def test_frame_lines_as_the_model_card_and_internvl_sft(self, tiny_tokenizer, tmp_path, videos):
        # the model card: ''.join(f'Frame{i+1}: <image>\n' for each frame) + question
        assert video_prompt(3) + '\nWhat?' == ''.join(f'Frame{i + 1}: <image>\n' for i in range(3)) + 'What?'
        # InternVL's SFT script: '<video>\n' -> '\n'.join('Frame-{i}: <image>') + '\n'
        sft = '\n'.join(f'Frame-{i + 1}: <image>' for i in range(3)) + '\n'
        assert video_prompt(3, 'Frame-{i}: ') + '\n' == sft


# ---------------------------------------------------------------------------------------------- the data set
def make_ds(files, tokenizer, tmp_path, **kw):
    kw.setdefault('image_size', S)
    kw.setdefault('patch_size', 14)
    kw.setdefault('max_length', 4096)
    kw.setdefault('min_num_frame', 3)
    kw.setdefault('max_num_frame', 6)
    kw.setdefault('cache_dir', str(tmp_path / 'cache'))
    return InternVLDataset(files, tokenizer=tokenizer, **kw)


def question_of(item, tokenizer):
    ids = [i for i, l in zip(item['input_ids'].tolist(), item['labels'].tolist()) if l == IGNORE_INDEX]
    return tokenizer.decode(ids)


@pytest.fixture
def mixed(tmp_path, videos):
    folder = tmp_path / 'media'
    write_image(folder / 'i.png', size=(56, 28))
    for kind, path in videos.items():
        os.symlink(path, folder / os.path.basename(path))
    path = write_jsonl(tmp_path / 'mixed.jsonl', [
        {'video': 'v.mp4', 'conversations': conv('Where does it go?', 'VIDEO', image=False)},
        {'image': 'i.png', 'conversations': conv(answer='IMAGE')},
        {'conversations': conv('Hi', 'TEXT', image=False)},
        {'video': 'frames', 'conversations': [{'from': 'human', 'value': 'Look: <video>\nNow?'},
                                              {'from': 'gpt', 'value': 'FOLDER'}]},
        {'video': 'v.gif', 'clip': [1, 3], 'conversations': conv('Clip?', 'GIF', image=False)},
    ])
    return path, str(folder)


class TestDataset:

    def test_video_samples_beside_images_and_text(self, mixed, tiny_tokenizer, tmp_path):
        path, folder = mixed
        ds = make_ds(path, tiny_tokenizer, tmp_path, image_folders=folder, allow_links_outside=True)
        ctx = tiny_tokenizer.convert_tokens_to_ids(IMG_CONTEXT_TOKEN)
        for i in (0, 3, 4):
            item = ds[i]
            n = item['pixel_values'].shape[0]
            assert 3 <= n <= 6 and item['image_flags'].tolist() == [1] * n
            assert (item['input_ids'] == ctx).sum() == n  # one token per 28 px frame tile
            text = question_of(item, tiny_tokenizer)
            assert ''.join(f'Frame{k + 1}: <img><IMG_CONTEXT></img>\n' for k in range(n)) in text
        assert 'Look: Frame1: <img>' in question_of(ds[3], tiny_tokenizer)
        assert ds[1]['pixel_values'].shape[0] == 3 and ds[2]['image_flags'].tolist() == [0]
        # the frames are the sampled ones, each resized to one tile
        first = ds[0]['pixel_values'][:, 0, 0, 0].tolist()
        assert first == sorted(first) and len(set(first)) == len(first)
        # lengths (the sampler's, the length cache's) are the items' own, frames counted
        assert ds.length == [len(ds[i]['input_ids']) for i in range(len(ds))]
        assert ds.num_tiles_per_item == [ds[i]['pixel_values'].shape[0] for i in range(len(ds))]

    def test_deterministic_per_seed_and_epoch(self, mixed, tiny_tokenizer, tmp_path):
        path, folder = mixed
        a = make_ds(path, tiny_tokenizer, tmp_path, image_folders=folder, allow_links_outside=True,
                    min_num_frame=8, max_num_frame=8)
        b = make_ds(path, tiny_tokenizer, tmp_path, image_folders=folder, allow_links_outside=True,
                    min_num_frame=8, max_num_frame=8)
        assert torch.equal(a[0]['pixel_values'], b[0]['pixel_values'])
        b.set_epoch(1)
        assert not torch.equal(a[0]['pixel_values'], b[0]['pixel_values'])
        assert a[0]['input_ids'].shape == b[0]['input_ids'].shape  # the count stays: lengths hold every epoch
        c = make_ds(path, tiny_tokenizer, tmp_path, image_folders=folder, allow_links_outside=True, seed=5,
                    min_num_frame=8, max_num_frame=8)
        assert not torch.equal(a[0]['pixel_values'], c[0]['pixel_values'])

    def test_too_long_gets_fewer_frames_counted(self, mixed, tiny_tokenizer, tmp_path, monkeypatch):
        path, folder = mixed
        full = make_ds(path, tiny_tokenizer, tmp_path, image_folders=folder, allow_links_outside=True,
                       min_num_frame=30, max_num_frame=30)
        n = len(full[0]['input_ids'])
        logs = []
        monkeypatch.setattr(dataset_module, 'print_log', lambda msg, **kw: logs.append(msg))
        monkeypatch.setattr('xtuner_plugins.data.fitting.print_log', lambda msg, **kw: logs.append(msg))
        ds = make_ds(path, tiny_tokenizer, tmp_path, image_folders=folder, allow_links_outside=True,
                     min_num_frame=30, max_num_frame=30, max_length=n - 20)
        item = ds[0]
        kept = item['pixel_values'].shape[0]
        assert len(item['input_ids']) <= n - 20 and kept < 30
        # the most frames that fit: one more would not
        assert len(item['input_ids']) + len(full[0]['input_ids']) / 30 > n - 20
        assert ds.reduced == {f'{path}:1': kept} and item['reduced'] == [(f'{path}:1', kept)]
        assert any(f'{kept} of its 30 video frames' in m for m in logs)

    def test_a_huge_frame_setting_encodes_no_more_frames_than_can_fit(self, videos, tiny_tokenizer, tmp_path,
                                                                        monkeypatch):
        """max_num_frame=3000 with max_length=200: each sample's prompt was tokenized with all 3000 frames first,
        in the length pass and the fit (a million frames: millions of tokens a sample, a start-up that never ends);
        a frame takes at least num_image_token + 2 tokens, so more than max_length // that are not encoded. The fit
        and the length are the same."""
        from xtuner_plugins.data import fitting, record_lengths
        seen, real, count = [], fitting.tokenize_conversation, record_lengths.count_text_tokens
        monkeypatch.setattr(fitting, 'tokenize_conversation',
                            lambda conv, tok, counts, **kw: seen.append(len(counts)) or real(conv, tok, counts, **kw))
        monkeypatch.setattr(record_lengths, 'count_text_tokens',  # the length pass at start-up
                            lambda conv, tok, **kw: seen.append(conv.num_images) or count(conv, tok, **kw))
        path = write_jsonl(tmp_path / 'v.jsonl', [{'video': videos['file'], 'conversations': conv(image=False)}])
        ds = make_ds(path, tiny_tokenizer, tmp_path, min_num_frame=3000, max_num_frame=3000, max_length=200)
        item = ds[0]
        most = 200 // (ds.num_image_token + 2)
        assert max(seen) <= most, seen
        kept = item['pixel_values'].shape[0]
        assert 1 <= kept <= most and len(item['input_ids']) <= 200 and ds.reduced == {f'{path}:1': kept}
        assert ds.length == [200]  # as long as max_length, as before

    def test_packing_counts_frames(self, mixed, tiny_tokenizer, tmp_path):
        path, folder = mixed
        ds = make_ds(path, tiny_tokenizer, tmp_path, image_folders=folder, allow_links_outside=True)
        packed = PackedInternVLDataset(ds, max_tokens=100000, max_tiles=8, shuffle=False)
        tiles = ds.num_tiles_per_item
        assert all(sum(tiles[i] for i in p) <= 8 or len(p) == 1 for p in packed.packs)
        assert sum(packed[i]['pixel_values'].shape[0] for i in range(len(packed))) == sum(tiles)

    def test_meta_file_and_repeats(self, mixed, tiny_tokenizer, tmp_path):
        path, folder = mixed
        meta = tmp_path / 'meta.json'
        meta.write_text(json.dumps({'v': {'root': folder, 'annotation': path, 'repeat_time': 2}}))
        ds = make_ds(str(meta), tiny_tokenizer, tmp_path, allow_links_outside=True)
        assert len(ds) == 10 and ds[5]['pixel_values'].shape == ds[0]['pixel_values'].shape


# Each bad case: (sample, reason, at load or at use). The good samples around it stay aligned.
BAD = {
    'missing_video': ({'video': 'nope.mp4', 'conversations': conv(image=False)}, 'use'),
    'corrupt_video': ({'video': 'garbage.mp4', 'conversations': conv(image=False)}, 'use'),
    'truncated_video': ({'video': 'truncated.mp4', 'conversations': conv(image=False)}, 'use'),
    'empty_video': ({'video': 'empty', 'conversations': conv(image=False)}, 'use'),
    # a JPEG read by FFmpeg as a video: its one frame was not decoded after the seek ('truncated')
    'image_as_video': ({'video': 'i.jpg', 'conversations': conv(image=False)}, 'use'),
    # an SVG named .mp4: FFmpeg's svg_pipe demuxer opens it without a decoder (codec_context None): an
    # AttributeError traceback, which ended tools/chat.py's conversation at /video and wrote 48 lines a request into
    # the web demo's log
    'undecodable_video': ({'video': 'svg.mp4', 'conversations': conv(image=False)}, 'use'),
    'bad_clip': ({'video': 'v.mp4', 'clip': [3, 9], 'conversations': conv(image=False)}, 'use'),
    'malformed_clip': ({'video': 'v.mp4', 'clip': [3, 1], 'conversations': conv(image=False)}, 'load'),
    # numbers past float's range: OverflowError tracebacks at start-up (math.isfinite of a 401-digit integer;
    # int() of the end in frames, infinite)
    'huge_int_clip': ({'video': 'v.mp4', 'clip': [0, 10 ** 400], 'conversations': conv(image=False)}, 'load'),
    'huge_clip': ({'video': 'v.mp4', 'clip': [0, 1e308], 'conversations': conv(image=False)}, 'use'),
    'clip_on_frames': ({'video': 'frames', 'clip': [0, 1], 'conversations': conv(image=False)}, 'use'),
    'video_tag_without_video': ({'conversations': conv('<video>\nWhat?', image=False)}, 'load'),
    'two_video_tags': ({'video': 'v.mp4', 'conversations': conv('<video><video>', image=False)}, 'load'),
    'image_tag_in_video': ({'video': 'v.mp4', 'conversations': conv()}, 'load'),
    'image_and_video': ({'video': 'v.mp4', 'image': 'i.png', 'conversations': conv()}, 'load'),
    'bad_video_field': ({'video': ['a.mp4'], 'conversations': conv(image=False)}, 'load'),
}
REASON = {'truncated_video': 'corrupt_video', 'undecodable_video': 'corrupt_video', 'malformed_clip': 'bad_clip',
          'clip_on_frames': 'bad_clip',
          'huge_int_clip': 'bad_clip', 'huge_clip': 'bad_clip',
          'video_tag_without_video': 'video_tag_mismatch', 'two_video_tags': 'video_tag_mismatch',
          'image_tag_in_video': 'video_tag_mismatch'}


@pytest.mark.parametrize('case', sorted(BAD))
def test_bad_video_input_named(case, tmp_path, tiny_tokenizer, monkeypatch):
    folder = tmp_path / 'media'
    write_video(folder / 'v.mp4', LEVELS)
    write_video(folder / 'frames', LEVELS[:4])
    write_image(folder / 'i.png')
    write_image(folder / 'i.jpg', size=(640, 480))
    (folder / 'garbage.mp4').write_bytes(b'not a video at all' * 10)
    (folder / 'svg.mp4').write_text('<svg xmlns="http://www.w3.org/2000/svg" width="64" height="64"><circle cx="32" '
                                    'cy="32" r="20"/></svg>\n')
    (folder / 'empty').mkdir()
    data = open(write_video(folder / 'long.mp4', [i % 40 * 6 for i in range(200)]), 'rb').read()
    (folder / 'truncated.mp4').write_bytes(data[:len(data) // 3])
    bad, when = BAD[case]
    good = {'video': 'v.mp4', 'conversations': conv(answer='GOOD', image=False)}
    path = write_jsonl(tmp_path / 'd.jsonl', [good, bad, good])
    logs = []
    monkeypatch.setattr(dataset_module, 'print_log', lambda msg, **kw: logs.append(msg))
    ds = make_ds(path, tiny_tokenizer, tmp_path, image_folders=str(folder), max_bad_fraction=1.0)
    reason = REASON.get(case, case)
    if when == 'load':
        assert len(ds) == 2 and [p.reason for p in ds.load_problems] == [reason]
        assert ds.load_problems[0].source == f'{path}:2'
    else:
        with pytest.raises(SampleError) as err:
            ds.load_sample(ds.records[1])
        assert err.value.reason == reason
        assert len(ds) == 3
    answers = [ds[i] for i in range(len(ds))]
    assert all(tiny_tokenizer.decode([t for t, l in zip(a['input_ids'].tolist(), a['labels'].tolist())
                                      if l != IGNORE_INDEX]) == 'GOOD<|im_end|>' for a in answers)
    if when == 'use':
        assert dict(ds.failures) == {reason: 1}
    if case == 'missing_video':  # counted at start-up too (all missing: a wrong folder, refused)
        assert logs.pop(0) == (f'{path}: 1 of 3 samples name videos not found under {folder} (first: {path}:2: '
                               f'nope.mp4); each is skipped when drawn (missing_video)')
    assert len(logs) == 1 and f'{path}:2' in logs[0] and reason in logs[0]


@pytest.mark.parametrize('setting, value', [('min_num_frame', '8'), ('min_num_frame', 2.5), ('min_num_frame', True),
                                            ('max_num_frame', 10 ** 19), ('max_num_frame', float('inf')),
                                            ('min_num_frame', 0)])
def test_a_frame_setting_that_is_no_frame_count_is_named(setting, value, videos, tiny_tokenizer, tmp_path):
    """'8' was a raw TypeError, 2.5 silently 2 frames, True 1 frame, 10**19 numpy's "high is out of bounds for
    int64" and inf "cannot convert float infinity to integer", at start-up."""
    path = write_jsonl(tmp_path / 'v.jsonl', [{'video': videos['file'], 'conversations': conv(image=False)}])
    with pytest.raises(ValueError, match=f'^{setting}={value!r}: a whole number of frames, 1 to '):
        make_ds(path, tiny_tokenizer, tmp_path, **{setting: value})


@pytest.mark.parametrize('prefix, says', [('Frame {i} {x}: ', r'\{i\} is its one field.*KeyError'),
                                           ('F{i}{}: ', r'\{i\} is its one field.*IndexError'),
                                           ('F{i}<image>', 'holds <image>'), ('<video>{i}', 'holds <video>')])
def test_a_frame_prefix_the_prompt_cannot_take_is_named(prefix, says, videos, tiny_tokenizer, tmp_path):
    """A field besides {i} was a raw KeyError / IndexError from str.format as the data set was built; a tag in it
    skipped every video sample as image_tag_mismatch, naming the data, not the setting."""
    path = write_jsonl(tmp_path / 'v.jsonl', [{'video': videos['file'], 'conversations': conv(image=False)}])
    with pytest.raises(ValueError, match=f'^frame_prefix {re.escape(repr(prefix))}.*{says}'):
        make_ds(path, tiny_tokenizer, tmp_path, frame_prefix=prefix)
    ds = make_ds(path, tiny_tokenizer, tmp_path, frame_prefix='Frame {i} {{of}}: ')
    assert 'Frame 1 {of}: ' in question_of(ds[0], tiny_tokenizer)


def test_preference_pairs_on_a_video(tmp_path, tiny_tokenizer, videos):
    from xtuner_plugins.data.preference import InternVLPreferenceDataset
    path = write_jsonl(tmp_path / 'p.jsonl', [{'video': videos['file'], 'question': 'Where does it go?',
                                               'chosen': 'Left.', 'rejected': 'Right.'}])
    ds = InternVLPreferenceDataset(path, tokenizer=tiny_tokenizer, image_size=S, cache_dir=str(tmp_path / 'c'),
                                   min_num_frame=3, max_num_frame=3)
    item = ds[0]
    ctx = tiny_tokenizer.convert_tokens_to_ids(IMG_CONTEXT_TOKEN)
    assert item['pixel_values'].shape[0] == 3
    assert (item['chosen']['input_ids'] == ctx).sum() == (item['rejected']['input_ids'] == ctx).sum() == 3
    assert ds.length == [max(len(item['chosen']['input_ids']), len(item['rejected']['input_ids']))]


def test_a_frame_linked_out_of_the_image_folder_is_unsafe_unless_allowed(tmp_path, tiny_tokenizer):
    """A frame folder's frames follow the images' rule: a frame that is a symbolic link out of the image folder is
    refused (``unsafe_image_path``) unless ``allow_links_outside``; a link inside the folder is fine."""
    folder = tmp_path / 'media'
    write_video(folder / 'frames', LEVELS[:4])
    secret = write_image(tmp_path / 'outside' / 'secret.png', size=(32, 24))
    os.symlink(secret, folder / 'frames' / '0005.png')
    write_video(folder / 'inside', LEVELS[:3])
    os.symlink(folder / 'frames' / '0001.png', folder / 'inside' / '0004.png')
    path = write_jsonl(tmp_path / 'd.jsonl', [
        {'video': 'frames', 'conversations': conv(image=False)},
        {'video': 'inside', 'conversations': conv(image=False)}])
    ds = make_ds(path, tiny_tokenizer, tmp_path, image_folders=str(folder), max_bad_fraction=1.0)
    with pytest.raises(SampleError) as err:
        ds.load_sample(ds.records[0])
    assert err.value.reason == 'unsafe_image_path'
    assert f'frame 0005.png of frame folder {folder / "frames"} is a symbolic link to {secret}' in str(err.value)
    assert ds.load_sample(ds.records[1])['pixel_values'].shape[0] == 4  # linked inside: its 4 frames
    allowed = make_ds(path, tiny_tokenizer, tmp_path, image_folders=str(folder), allow_links_outside=True)
    assert allowed.load_sample(allowed.records[0])['pixel_values'].shape[0] == 5
    assert probe_video(str(folder / 'frames')).total == 5  # no image folder (chat, eval): nothing to leave


def test_a_video_naming_the_image_folder_itself_is_a_bad_sample(tmp_path, tiny_tokenizer):
    """``"video": "."`` (or ``./``, ``frames/..``) was read as one video whose frames were every image of the image
    folder, without a word; a frame folder inside it is read as ever. Without an image folder, the annotation
    file's folder itself is refused alike."""
    folder = tmp_path / 'media'
    write_video(folder / 'frames', LEVELS[:4])
    for i in range(3):
        write_image(folder / f'photo_{i}.png', size=(32, 24))
    lines = [{'video': v, 'conversations': conv(image=False)} for v in ('.', './', 'frames/..', 'frames')]
    path = write_jsonl(tmp_path / 'd.jsonl', lines)
    ds = make_ds(path, tiny_tokenizer, tmp_path, image_folders=str(folder), max_bad_fraction=1.0)
    said = [str(p) for p in ds.load_problems]
    assert said == [f'{path}:{n}: "video" {written!r} names the image folder itself ({folder}), not a video or a '
                    f'folder of frames in it [bad_video_field]'
                    for n, written in ((1, '.'), (2, './'), (3, 'frames/..'))]
    assert len(ds) == 1 and ds[0]['pixel_values'].shape[0] == 4   # the frame folder: its 4 frames
    alone = write_jsonl(folder / 'alone.jsonl', lines[:1] + lines[3:])   # no image folder: the file's folder
    ds = make_ds(alone, tiny_tokenizer, tmp_path, max_bad_fraction=1.0)
    assert len(ds) == 1 and "names the annotation file's folder itself" in str(ds.load_problems[0])


def test_a_symbolic_link_loop_or_a_link_to_nothing_is_named(tmp_path):
    from xtuner_plugins.data.image_io import load_image
    os.symlink(tmp_path / 'loop.mp4', tmp_path / 'loop.mp4')
    os.symlink(tmp_path / 'loop.png', tmp_path / 'loop.png')
    os.symlink(tmp_path / 'gone.mp4', tmp_path / 'dangling.mp4')
    cases = [(probe_video, 'loop.mp4', 'missing_video', 'video is a symbolic link loop (ELOOP): '),
             (load_image, 'loop.png', 'missing_image', 'image file is a symbolic link loop (ELOOP): '),
             (probe_video, 'dangling.mp4', 'missing_video', 'video is a symbolic link to nothing: ')]
    for fn, name, reason, message in cases:
        with pytest.raises(SampleError) as err:
            fn(str(tmp_path / name))
        assert err.value.reason == reason and f'{message}{tmp_path / name}' in str(err.value)
    frames = write_video(tmp_path / 'frames', LEVELS[:3])
    os.symlink(os.path.join(frames, '0009.png'), os.path.join(frames, '0009.png'))
    with pytest.raises(SampleError) as err:  # not a frame silently left out
        probe_video(frames)
    assert err.value.reason == 'corrupt_video'
    assert f'frame folder {frames}: frame 0009.png is a symbolic link loop (ELOOP): {frames}/0009.png' in str(err.value)


def test_a_fifo_among_the_frames_is_named_not_read_or_left_out(tmp_path):
    """A FIFO named as a frame was left out of the video without a word (and opening it would block)."""
    frames = write_video(tmp_path / 'frames', LEVELS[:3])
    os.mkfifo(os.path.join(frames, '0002b.png'))
    os.mkdir(os.path.join(frames, 'old.png'))  # a sub-folder is not a frame
    with pytest.raises(SampleError) as err:
        probe_video(frames)
    assert err.value.reason == 'corrupt_video'
    assert (f'frame folder {frames}: frame 0002b.png is not a regular file (a FIFO, socket or device): '
            f'{frames}/0002b.png') in str(err.value)
    os.unlink(os.path.join(frames, '0002b.png'))
    assert probe_video(frames).total == 3


def test_an_empty_video_file_and_a_clip_shorter_than_a_frame_say_so(tmp_path):
    """A 0-byte file was "Invalid data found when processing input"; clip [0, 0.01] at 10 fps was "outside the
    video ... frames 0..-1 asked for"."""
    (tmp_path / 'zero.mp4').write_bytes(b'')
    with pytest.raises(SampleError, match=r'zero.mp4 is an empty file \(0 bytes\)') as info:
        probe_video(str(tmp_path / 'zero.mp4'))
    assert info.value.reason == 'corrupt_video'
    path = write_video(tmp_path / 'v.mp4', list(range(0, 200, 10)))
    with pytest.raises(SampleError, match=r'clip \[0, 0.01\] s of .*v.mp4 is shorter than one frame \(0.1 s at 10 '
                                          r'fps\): no frame to take') as info:
        probe_video(path, clip=(0.0, 0.01))
    assert info.value.reason == 'bad_clip'
    with pytest.raises(SampleError, match=r'clip \[5, 5.01\] s is outside'):  # past the end: outside, as before
        probe_video(path, clip=(5.0, 5.01))



@pytest.mark.parametrize('rotation, turned', [
    (None, 0), (0, 0), (90, 90), (-90, -90), (180, 180), (45, 0),
    # decord's arithmetic on PyAV's whole degrees (89.6 reads 89, 90.4 reads 90; decord, on the exact angle,
    # turns the first and not the second: documented in clockwise_turn); a horizontal flip alone reads as 180
    (89.6, 0), (90.4, 90), (-90.4, -90), (-89.6, 0), (dict(degrees=0, hflip=True), 180),
    # decord reads the stream's rotate tag first (clockwise; Matroska keeps it as ROTATE), then the matrix
    ('tag 90', -90), ('tag 270', 90)])
def test_a_video_tagged_as_rotated_is_turned_upright_as_decord_does(tmp_path, rotation, turned):
    """A phone's portrait video is stored landscape with a display rotation; decord (which InternVL reads videos
    with) turns the frames by it when it comes to 90, 180 or 270 degrees and leaves other angles. The frames were
    used as stored (sideways): a model fine-tuned here saw other pixels than InternVL's training and model card."""
    from PIL import Image
    stored = np.full((24, 48, 3), 40, np.uint8)
    stored[:, :12] = 255  # a white band on the left
    stored[:4, 12:] = 140  # a grey band at the top: a flip would show
    if isinstance(rotation, str):
        path = write_video(tmp_path / 'v.mkv', [stored] * 4, tags={'rotate': rotation.split()[1]})
    else:
        path = write_video(tmp_path / 'v.mp4', [stored] * 4, rotation=rotation)
    frames, info = load_video(path, 2)
    assert info.size == (48, 24)  # the probe reads headers only: the stored size
    expected = np.asarray(Image.fromarray(stored).rotate(turned, expand=True))  # counter-clockwise
    for frame in frames:
        got = np.asarray(frame)
        assert got.shape == expected.shape, (rotation, got.shape)
        assert np.abs(got.astype(int) - expected).max() <= 8, rotation


def test_reading_a_video_leaves_no_frame_for_a_forked_process_to_collect(tmp_path):
    """Reading a frame's side data (``frame.side_data``) made a reference cycle with the frame: the frame and its
    FFmpeg scaler outlived the read, and a DataLoader worker forked later collected them and hung for good on the
    scaler's threads, which a forked process does not have (a CI run stopped there). No cycle is left now."""
    import gc
    path = write_video(tmp_path / 'v.mp4', [10, 90, 200, 30], rotation=90)
    gc.collect()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)   # what a collection finds is kept in gc.garbage, to be looked at
    try:
        frames, _ = load_video(path, 4)
        assert frames[0].size == (24, 32)   # turned
        gc.collect()
        # PyAV's objects only: another test's thread may leave cycles of its own meanwhile (seen in a CI run)
        left = [type(o).__name__ for o in gc.garbage if type(o).__module__.startswith('av')]
        assert left == []
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
    from types import SimpleNamespace
    assert video_decode.clockwise_turn(SimpleNamespace(rotation=-90)) == 90
    assert video_decode.clockwise_turn(SimpleNamespace(rotation=0)) == 0
    assert video_decode.clockwise_turn(SimpleNamespace(rotation=0), ' 270.9abc') == 270   # read as C's atof
    assert video_decode.clockwise_turn(SimpleNamespace(rotation=-90), '0') == 90   # "0": no tag, the matrix
