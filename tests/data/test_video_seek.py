"""Videos the seeking reader was not written around (an adversarial sweep's finds): B-frames shown before the
keyframe a seek lands on, a cut that hides frames the header counts, one keyframe for thousands of frames, frames
that grow past the header's size, a name FFmpeg reads as a protocol; and images padded or converted at a cost far
beyond their file's.

Frame ``i`` of a video made here shows its number in 8 black or white bars (bit ``b`` at columns ``8b..8b+7``), which
survive lossy coding, so a decoded frame tells which one it is."""

import fractions
import os
import tracemalloc

import numpy as np
import pytest
from PIL import Image

from tests.helpers import write_video
from xtuner_plugins.data.errors import SampleError
from xtuner_plugins.data.image_io import load_image, to_rgb
from xtuner_plugins.data.tiling import image_tiles
from xtuner_plugins.data.video import choose_frames, load_video, probe_video, read_frames

BITS, W, H = 8, 96, 64


def barcode(i):
    a = np.zeros((H, W, 3), np.uint8)
    for b in range(BITS):
        if (i >> b) & 1:
            a[:, b * 8:(b + 1) * 8] = 255
    return a


def number(image):
    a = np.asarray(image.convert('L'), dtype=float)
    return sum(1 << b for b in range(BITS) if a[16:48, b * 8 + 2:b * 8 + 6].mean() > 128)


def encode(path, codec, options, n):
    import av
    with av.open(str(path), 'w') as container:
        stream = container.add_stream(codec, rate=30)
        stream.width, stream.height, stream.pix_fmt = W, H, 'yuv420p'
        stream.options = options
        for i in range(n):
            for packet in stream.encode(av.VideoFrame.from_ndarray(barcode(i), format='rgb24')):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return str(path)


@pytest.mark.parametrize('name, codec, options', [
    ('open_gop.mp4', 'libx264', {'g': '30', 'bf': '3', 'x264-params': 'open-gop=1'}),
    ('b_frames.avi', 'mpeg4', {'g': '12', 'bf': '2'}),   # Xvid/DivX-style MPEG-4 Part 2
])
def test_frames_shown_before_the_keyframe_a_seek_lands_on_are_the_ones_asked_for(tmp_path, name, codec, options):
    """A seek lands on a keyframe by its decode time; the B-frames shown just before it need the keyframe before
    and were dropped by the decoder, and the next frame shown was taken in their place (asked for 29, got 30)."""
    import av
    path = encode(tmp_path / name, codec, options, 120)
    with av.open(path) as container:
        assert [number(f.to_image()) for f in container.decode(video=0)] == list(range(120))  # the file is right
    info = probe_video(path)
    assert [number(read_frames(info, [i])[0]) for i in range(120)] == list(range(120))
    wanted = choose_frames(info, 8, 'middle')
    assert [number(f) for f in read_frames(info, wanted)] == wanted


@pytest.mark.parametrize('name, codec, options', [
    ('mpeg2.ts', 'mpeg2video', {'g': '9', 'bf': '2'}),   # broadcast / camcorder MPEG-TS (.ts, .mts)
    ('h264.ts', 'libx264', {'g': '12', 'bf': '3'}),
    ('mpeg2.mpg', 'mpeg2video', {'g': '15', 'bf': '2'}),   # MPEG-PS (.mpg, .vob)
    ('h264.avi', 'libx264', {'g': '12', 'bf': '3'}),   # B-frames in an AVI: its frames' stamps out of order
])
def test_files_ffmpeg_seeks_by_decode_time_give_the_frames_asked_for(tmp_path, name, codec, options):
    """MPEG-TS and MPEG-PS seek by decode time, and an AVI stamps H.264's B-frames out of the order shown: a seek
    landed after the frame asked for with no earlier keyframe to try, and the next frame shown was taken in its place
    (an MPEG-TS file gave its frame 12 for each of frames 0 to 11), or past the last frames (dropped as
    'truncated'); the AVI gave frame 1 for frame 2. Such a file is now read in order where a seek misplaces frames."""
    import av
    path = encode(tmp_path / name, codec, options, 60)
    with av.open(path) as container:
        assert [number(f.to_image()) for f in container.decode(video=0)] == list(range(60))  # the file is right
    info = probe_video(path)
    assert info.total == 60
    assert [number(read_frames(info, [i])[0]) for i in range(60)] == list(range(60))
    for n in (8, 32):
        wanted = choose_frames(info, n, 'rand', np.random.default_rng(n))
        assert [number(f) for f in read_frames(info, wanted)] == wanted


def test_a_cut_that_hides_frames_the_header_counts_is_read_as_the_frames_shown(tmp_path):
    """A stream copy cut ('ffmpeg -ss ... -c copy') writes an edit list: the header counts 100 frames, 85 are
    shown. It was dropped as truncated ('says 100 frames but holds 85')."""
    import av
    source = encode(tmp_path / 'source.mp4', 'libx264', {'g': '10', 'bf': '0'}, 100)
    cut = str(tmp_path / 'cut.mp4')
    with av.open(source) as src, av.open(cut, 'w') as out:
        stream = src.streams.video[0]
        copy = out.add_stream_from_template(stream)
        tick = int(1 / (30 * stream.time_base))
        for packet in src.demux(stream):
            if packet.dts is None:
                continue
            packet.pts -= 15 * tick
            packet.dts -= 15 * tick
            packet.stream = copy
            out.mux(packet)
    with av.open(cut) as container:
        assert container.streams.video[0].frames == 100   # what the header says
    frames, info = load_video(cut, 8)
    assert info.total == 85
    assert [number(f) for f in frames] == [15 + i for i in choose_frames(info, 8, 'middle')]


def one_keyframe_video(path, n, size=(64, 48)):
    """An ``.mp4`` of one keyframe and ``n - 1`` frames that change nothing (a few bytes each)."""
    import av
    w, h = size
    seed = str(path) + '.seed.mkv'
    with av.open(seed, 'w') as container:
        stream = container.add_stream('libx264', rate=30)
        stream.width, stream.height, stream.pix_fmt = w, h, 'yuv420p'
        stream.options = {'g': '100000', 'bf': '0', 'preset': 'ultrafast'}
        frame = av.VideoFrame.from_ndarray(np.full((h, w, 3), 128, np.uint8), format='rgb24')
        for i in range(2):
            frame.pts = i
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    with av.open(seed) as src, av.open(str(path), 'w') as out:
        stream = src.streams.video[0]
        key, same = [bytes(p) for p in src.demux(stream) if p.size][:2]
        copy = out.add_stream_from_template(stream)
        tick = int(round(1 / (30 * stream.time_base)))
        for i in range(n):
            packet = av.Packet(key if i == 0 else same)
            packet.stream, packet.pts, packet.dts, packet.duration = copy, i * tick, i * tick, tick
            packet.time_base, packet.is_keyframe = stream.time_base, i == 0
            out.mux(packet)
    return str(path)


def test_a_video_of_one_keyframe_is_refused_once_its_decoding_passes_the_budget(tmp_path):
    """Only GIFs had a decode budget: a 1 MB MP4 of one 4K keyframe and 30,000 frames that change nothing held the
    web demo's one model for 58 s (every frame decoded to reach the last one asked for)."""
    path = one_keyframe_video(tmp_path / 'one_key.mp4', 3000)
    frame = 64 * 48
    with pytest.raises(SampleError, match=r'one_key.mp4: reaching frame \d+ of 3000 decodes over .* gigapixels, the '
                                          r'most taken here .* few keyframes') as info:
        load_video(path, 8, max_decoded_pixels=500 * frame)
    assert info.value.reason == 'video_too_large'
    frames, _ = load_video(path, 8, max_decoded_pixels=3000 * frame)
    assert len(frames) == 8


def test_frames_that_grow_past_the_stream_size_are_held_to_the_pixel_limit(tmp_path):
    """The codec may change the frame size mid-stream: a header (and first frame) of 64 x 48 then 2000 x 2000
    frames passed every check, which read the header's size."""
    import io

    import av

    def jpeg(w, h):
        out = io.BytesIO()
        Image.new('RGB', (w, h), (0, 255, 0)).save(out, 'JPEG', quality=50)
        return out.getvalue()
    path = str(tmp_path / 'grows.mkv')
    small, big = jpeg(64, 48), jpeg(2000, 2000)
    with av.open(path, 'w') as container:
        stream = container.add_stream('mjpeg', rate=30)
        stream.width, stream.height, stream.pix_fmt = 64, 48, 'yuvj420p'
        for i in range(9):
            packet = av.Packet(small if i == 0 else big)
            packet.stream, packet.pts, packet.dts = stream, i, i
            packet.time_base, packet.is_keyframe = fractions.Fraction(1, 30), True
            container.mux(packet)
    assert probe_video(path, max_pixels=1_000_000).size == (64, 48)
    with pytest.raises(SampleError, match=r'grows.mkv: a 2000x2000 frame \(the stream says 64x48\) is over the '
                                          r'decompression-bomb limit of 1000000 pixels \[image_too_large\]'):
        load_video(path, 8, max_pixels=1_000_000)
    assert (2000, 2000) in {f.size for f in load_video(path, 8, max_pixels=5_000_000)[0]}


def test_every_frame_of_a_frame_folder_is_held_to_the_data_sets_pixel_limit(tmp_path):
    """The limit was checked on the first frame only (the probe's); the others were loaded at Pillow's."""
    folder = tmp_path / 'frames'
    folder.mkdir()
    Image.new('RGB', (64, 48)).save(folder / '0001.png')
    Image.new('RGB', (1200, 1000)).save(folder / '0002.png')
    info = probe_video(str(folder), max_pixels=1_000_000)
    assert read_frames(info, [0])[0].size == (64, 48)
    with pytest.raises(SampleError, match=r'0002.png: 1200x1000 = 1200000 pixels is over the decompression-bomb '
                                          r'limit of 1000000'):
        read_frames(info, [1])
    assert read_frames(probe_video(str(folder), max_pixels=2_000_000), [1])[0].size == (1200, 1000)


@pytest.mark.parametrize('name', ['clip:1.mp4', 'pipe:0'])
def test_a_video_named_as_an_ffmpeg_protocol_is_read_as_the_file(tmp_path, monkeypatch, name):
    """A relative name with a colon went to FFmpeg as a URL: 'clip:1.mp4' was 'Protocol not found' (a corrupt
    video), and a file named 'pipe:0' read standard input (a hang)."""
    write_video(tmp_path / 'v.mp4', [6 * i for i in range(12)])
    os.rename(tmp_path / 'v.mp4', tmp_path / name)
    monkeypatch.chdir(tmp_path)
    frames, info = load_video(name, 4)
    assert info.total == 12 and len(frames) == 4


def test_padding_an_image_of_extreme_shape_does_not_build_its_full_square(monkeypatch):
    """image_mode='pad' made a square of the longer side first: a 340-byte PNG of 1 x 65000 asked for 12.7 GB. Such
    an image is resized first; its tile differs from padding at full size only by the resampling's rounding."""
    from xtuner_plugins.data import tiling
    tracemalloc.start()
    try:
        tiles = image_tiles(Image.new('RGB', (1, 65000), (10, 20, 30)), 'pad', image_size=448)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert tiles.shape == (1, 3, 448, 448) and peak < 64 * 2 ** 20
    assert tuple(tiles[0, :, 224, 0].tolist()) == (123, 116, 103)   # the padding: the ImageNet mean
    ramp = np.linspace(0, 255, 40 * 1200 * 3).reshape(1200, 40, 3).astype(np.uint8)
    tall = Image.fromarray(ramp)
    full = image_tiles(tall, 'pad', image_size=28).int()   # a 1200 x 1200 square: padded at full size
    monkeypatch.setattr(tiling, 'MAX_PAD_SQUARE', 1 << 16)
    shrunk = image_tiles(tall, 'pad', image_size=28).int()   # resized to 112 on its longer side first
    assert (full - shrunk).abs().float().mean() < 1.5 and (full - shrunk).abs().max() < 40
    small = Image.fromarray(ramp[:300])   # a longer side under 4 tiles': never resized first (nor enlarged)
    assert image_tiles(small, 'pad', image_size=100).equal(tiling.tile_image(
        tiling.pad_to_square(small, tiling.pad_colour(tiling.IMAGENET_MEAN)), min_num=1, max_num=1, image_size=100))


def test_a_16_bit_image_is_converted_without_float_copies_of_it_whole():
    """A 16-bit greyscale image went through float64 whole (six copies): 2.2 GB for a 9400 x 9400 PNG of 172 kB."""
    rows = np.arange(2000 * 2000, dtype=np.uint32).reshape(2000, 2000) * 16 % 65536
    image = Image.fromarray(rows.astype(np.uint16))
    assert image.mode.startswith('I;16')
    tracemalloc.start()
    try:
        rgb = to_rgb(image)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    expected = np.clip(np.rint(rows / 257.0), 0, 255).astype(np.uint8)
    assert np.array_equal(np.asarray(rgb)[..., 0], expected)
    assert peak < 8 * 2000 * 2000   # the old path: four float64 arrays of it at once, 32 bytes a pixel


def test_a_16_bit_file_still_loads_scaled(tmp_path):
    Image.fromarray(np.full((8, 8), 65535, np.uint16)).save(tmp_path / 'white16.png')
    assert np.asarray(load_image(str(tmp_path / 'white16.png'))).min() == 255


def test_the_video_stream_read_is_ffmpegs_best_not_the_first(tmp_path):
    """A file whose first video stream is a one-frame still (a cover) gave that still for every frame; decord, which
    InternVL reads videos with, takes FFmpeg's best stream."""
    import av
    path = str(tmp_path / 'two.mkv')
    with av.open(path, 'w') as container:
        still, main = (container.add_stream('libx264', rate=10) for _ in range(2))
        still.width, still.height, still.pix_fmt, still.options = 32, 24, 'yuv444p', {'qp': '0'}
        main.width, main.height, main.pix_fmt, main.options = W, H, 'yuv444p', {'qp': '0', 'g': '5'}
        for stream, frames in ((still, [barcode(200)[:24, :32]]), (main, [barcode(i) for i in range(40)])):
            for a in frames:
                for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(a), format='rgb24')):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
    frames, info = load_video(path, 4)
    assert (info.total, info.size) == (40, (W, H))
    assert [number(f) for f in frames] == choose_frames(info, 4, 'middle')
