import os

import numpy as np
import pytest
from PIL import Image

from tests.helpers import write_image
from xtuner_plugins.data.errors import SampleError
from xtuner_plugins.data.image_io import frame_note, load_image, read_image_size, resolve_image_path, to_rgb


class TestResolvePath:

    def test_inside_folder(self, tmp_path):
        assert resolve_image_path('a/b.jpg', str(tmp_path)) == os.path.join(str(tmp_path), 'a', 'b.jpg')

    @pytest.mark.parametrize('path', ['../secret.jpg', 'a/../../secret.jpg', '/etc/passwd'])
    def test_escape_is_refused(self, tmp_path, path):
        with pytest.raises(SampleError, match='escapes its image folder') as info:
            resolve_image_path(path, str(tmp_path / 'images'))
        assert info.value.reason == 'unsafe_image_path'

    def test_symlinked_folder_is_allowed(self, tmp_path):
        real = tmp_path / 'real'
        write_image(real / 'x.png')
        (tmp_path / 'link').symlink_to(real)
        path = resolve_image_path('x.png', str(tmp_path / 'link'))
        assert read_image_size(path) == (64, 48)

    def test_real_path_is_realpath_with_each_folder_resolved_once(self, tmp_path, monkeypatch):
        """The link check resolves a path from its folder's resolved path (kept a few seconds: samples share
        folders) and one look at its last part: always ``os.path.realpath``'s answer."""
        from xtuner_plugins.data import image_io
        write_image(tmp_path / 'outside' / 'o.png')
        write_image(tmp_path / 'i' / 'sub' / 'a.png')
        (tmp_path / 'i' / 'sub' / 'out.png').symlink_to(tmp_path / 'outside' / 'o.png')
        (tmp_path / 'i' / 'rel.png').symlink_to('sub/a.png')
        (tmp_path / 'i' / 'dirlink').symlink_to(tmp_path / 'outside')
        (tmp_path / 'i' / 'loop').symlink_to('loop')
        paths = [str(tmp_path / 'i' / p) for p in ('sub/a.png', 'sub/out.png', 'rel.png', 'dirlink/o.png',
                                                     'dirlink/none.png', 'none/x.png', 'loop')] + ['rel', '.']
        assert [image_io.real_path(p) for p in paths] == [os.path.realpath(p) for p in paths]
        with pytest.raises(SampleError, match='symbolic link to .*outside'):
            resolve_image_path('sub/out.png', str(tmp_path / 'i'))
        calls = []
        monkeypatch.setattr(image_io.os.path, 'realpath', lambda p: calls.append(p) or p)
        monkeypatch.setattr(image_io, '_real_dirs', {})
        for _ in range(3):
            resolve_image_path('sub/a.png', str(tmp_path / 'i'))
        assert sorted(calls) == sorted([str(tmp_path / 'i'), str(tmp_path / 'i' / 'sub')])

    def test_no_folder_resolves_against_base_dir(self, tmp_path):
        assert resolve_image_path('x.png', None, str(tmp_path)) == os.path.join(str(tmp_path), 'x.png')
        assert resolve_image_path('/abs/x.png', None, str(tmp_path)) == '/abs/x.png'   # written in full: as written

    def test_no_folder_keeps_relative_paths_inside_the_annotation_files_folder(self, tmp_path):
        """docs/data.md: image paths "may not leave" the file's folder; with no image folder set, ../ in a
        relative path was read as it was."""
        with pytest.raises(SampleError) as info:
            resolve_image_path('a/../../outside/x.png', None, str(tmp_path))
        assert info.value.reason == 'unsafe_image_path'
        assert f"leaves the annotation file's folder {str(tmp_path)!r}" in str(info.value)
        assert 'set the file\'s image folder (image_folders, a meta file\'s root, --image-folder)' in str(info.value)
        assert resolve_image_path('a/../x.png', None, str(tmp_path)) == str(tmp_path / 'x.png')

    @pytest.mark.parametrize('bad', ['', None, 3])
    def test_bad_field(self, bad):
        with pytest.raises(SampleError) as info:
            resolve_image_path(bad, '/data')
        assert info.value.reason == 'bad_image_field'


class TestReadAndLoad:

    def test_header_size_without_decoding(self, tmp_path):
        path = write_image(tmp_path / 'a.jpg', size=(300, 200))
        # Truncate the file: the header still gives the size, a full decode must fail.
        data = open(path, 'rb').read()
        open(path, 'wb').write(data[:len(data) // 2])
        assert read_image_size(path) == (300, 200)
        with pytest.raises(SampleError, match='cannot decode image .*a.jpg') as info:
            load_image(path)
        assert info.value.reason == 'corrupt_image'

    def test_missing(self, tmp_path):
        for fn in (read_image_size, load_image):
            with pytest.raises(SampleError, match='not found') as info:
                fn(str(tmp_path / 'nope.jpg'))
            assert info.value.reason == 'missing_image'

    def test_not_an_image(self, tmp_path):
        path = tmp_path / 'x.jpg'
        path.write_bytes(b'this is not an image at all')
        for fn in (read_image_size, load_image):
            with pytest.raises(SampleError) as info:
                fn(str(path))
            assert info.value.reason == 'corrupt_image'

    def test_pixel_limit_names_numbers(self, tmp_path):
        path = write_image(tmp_path / 'big.png', size=(40, 30))
        for fn in (read_image_size, load_image):
            with pytest.raises(SampleError, match=r'40x30 = 1200 pixels .* limit of 1000') as info:
                fn(path, max_pixels=1000)
            assert info.value.reason == 'image_too_large'
        assert load_image(path, max_pixels=1200).size == (40, 30)

    def test_the_setting_is_the_limit_not_pillows(self, tmp_path, monkeypatch):
        """max_image_pixels raised past Pillow's own limit (which raises at twice it, 358M pixels by default) met
        Pillow's error in Pillow's words: the setting is the limit while an image opens, and None lifts it."""
        path = write_image(tmp_path / 'big.png', size=(40, 30))
        monkeypatch.setattr(Image, 'MAX_IMAGE_PIXELS', 100)  # Pillow refuses > 2 * 100 pixels itself
        assert load_image(path, max_pixels=1200).size == (40, 30)
        assert load_image(path, max_pixels=None).size == (40, 30)
        assert Image.MAX_IMAGE_PIXELS == 100   # put back
        with pytest.raises(SampleError, match=r'40x30 = 1200 pixels is over the decompression-bomb limit of 500 '
                                              r'pixels \(raise max_image_pixels'):
            load_image(path, max_pixels=500)

    def test_pillow_bomb_error_is_a_sample_error_naming_the_setting(self, tmp_path, monkeypatch):
        path = write_image(tmp_path / 'big.png', size=(40, 30))

        def bomb(*args, **kwargs):   # as Pillow raises for a later frame larger than the first
            raise Image.DecompressionBombError('Image size (9000 pixels) exceeds limit of 4000 pixels')
        monkeypatch.setattr(Image, 'open', bomb)
        with pytest.raises(SampleError, match=r'big.png: Image size \(9000 pixels\) exceeds limit of 4000 pixels '
                                              r'\(the limit is max_image_pixels, 2000: raise it') as info:
            load_image(path, max_pixels=2000)
        assert info.value.reason == 'image_too_large'


class TestModes:

    @pytest.mark.parametrize('mode', ['RGBA', 'LA', 'P', 'CMYK', 'L', '1'])
    def test_pillow_modes_match_plain_convert(self, tmp_path, mode):
        fmt = 'JPEG' if mode == 'CMYK' else 'PNG'
        path = write_image(tmp_path / f'x_{mode}.img', mode=mode, fmt=fmt)
        img = load_image(path)
        assert img.mode == 'RGB'
        with Image.open(path) as ref:
            assert img.tobytes() == ref.convert('RGB').tobytes()  # identical to InternVL's loader

    def test_16_bit_is_scaled_not_clipped(self, tmp_path):
        arr = np.array([[0, 257 * 128, 65535]], dtype=np.uint16)
        path = str(tmp_path / 'x16.png')
        Image.fromarray(arr).save(path)  # uint16 -> mode I;16
        img = load_image(path)
        assert img.mode == 'RGB'
        assert np.asarray(img)[0, :, 0].tolist() == [0, 128, 255]
        with Image.open(path) as raw:
            assert raw.mode.startswith('I')

    def test_float_image(self):
        img = to_rgb(Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32)))
        assert np.asarray(img)[0, :, 1].tolist() == [0, 128, 255]


def test_load_image_tiles_is_internvl_load_image(tmp_path):
    """InternVL's model-card load_image: dynamic_preprocess tiles, each ToTensor + Normalize, stacked."""
    import torch
    import torchvision.transforms as T

    from xtuner_plugins.data.image_io import load_image_tiles
    from xtuner_plugins.data.tiling import IMAGENET_MEAN, IMAGENET_STD, dynamic_preprocess
    path = write_image(tmp_path / 'wide.png', size=(300, 110), seed=5)
    transform = T.Compose([T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    expected = torch.stack([transform(t) for t in dynamic_preprocess(Image.open(path).convert('RGB'), max_num=6,
                                                                      image_size=56, use_thumbnail=True)])
    got = load_image_tiles(path, image_size=56, max_num=6, use_thumbnail=True)
    assert got.shape == expected.shape and got.shape[0] > 1
    assert torch.equal(got, expected)


def exif_rotated_jpeg(path, mode='L', size=(90, 40)):
    """A JPEG stored ``size``, tagged EXIF orientation 6 (a viewer shows it turned 90 degrees clockwise)."""
    img = Image.open(write_image(path, size=size, mode=mode, fmt='JPEG', seed=3))
    exif = Image.Exif()
    exif[0x0112] = 6
    img.save(path, format='JPEG', exif=exif.tobytes())
    return str(path)


class TestOneRule:

    @pytest.mark.parametrize('mode', ['L', 'CMYK', 'RGB'])
    def test_exif_orientation_is_not_applied(self, tmp_path, mode):
        """The stored pixels, as InternVL's loader (Image.open().convert('RGB')) and the header size see them."""
        path = exif_rotated_jpeg(tmp_path / 'tagged.jpg', mode)
        with Image.open(path) as raw:
            assert raw.getexif()[0x0112] == 6
            expected = raw.convert('RGB').tobytes()
        img = load_image(path)
        assert img.size == read_image_size(path) == (90, 40)
        assert img.tobytes() == expected

    @pytest.mark.parametrize('mode,fmt', [('I;16', 'PNG'), ('P', 'PNG'), ('LA', 'PNG'), ('CMYK', 'JPEG')])
    def test_bytes_and_open_images_follow_the_same_rule(self, tmp_path, mode, fmt):
        path = write_image(tmp_path / f'x.{fmt.lower()}', size=(30, 20), mode=mode, fmt=fmt, seed=2)
        expected = load_image(path).tobytes()
        with open(path, 'rb') as f:
            assert load_image(f.read()).tobytes() == expected
        with Image.open(path) as img:
            assert load_image(img).tobytes() == expected

    def test_bad_bytes_are_a_corrupt_image(self):
        with pytest.raises(SampleError, match='cannot decode image row 3') as info:
            load_image(b'not an image', name='row 3')
        assert info.value.reason == 'corrupt_image'
        # Pillow's own words named the buffer ('<_io.BytesIO object at 0x7f...>'): the name says where the bytes are
        assert str(info.value) == 'cannot decode image row 3: cannot identify image file of 12 bytes [corrupt_image]'


IMPOSSIBLE = {'nul': ('a\x00b.png', 'NUL byte'), 'surrogate': ('\ud800.png', "character '\\\\ud800'"),
              'long_name': ('x' * 300 + '.png', '304-byte name part'),
              'long_path': ('/'.join(['d' * 200] * 25), 'bytes long')}


class TestImpossiblePaths:

    @pytest.mark.parametrize('case', sorted(IMPOSSIBLE))
    @pytest.mark.parametrize('folder', [True, False])
    def test_resolve_and_load_refuse_them(self, tmp_path, case, folder):
        path, words = IMPOSSIBLE[case]
        with pytest.raises(SampleError, match=words) as info:
            resolve_image_path(path, str(tmp_path) if folder else None, str(tmp_path))
        assert info.value.reason == 'bad_image_path'
        assert '\x00' not in str(info.value) and len(str(info.value)) < 400  # printable, shortened
        with pytest.raises(SampleError, match=words) as info:
            load_image(path)
        assert info.value.reason == 'bad_image_path'

    def nul_data(self, tmp_path):
        from tests.helpers import conv, write_jsonl
        write_image(tmp_path / 'images' / 'good.png', size=(56, 28))
        return write_jsonl(tmp_path / 'd.jsonl', [{'image': 'good.png', 'conversations': conv()},
                                                  {'image': 'bad\x00.png', 'conversations': conv()},
                                                  {'image': 'good.png', 'conversations': conv()}])

    def test_training_counts_a_nul_byte_path(self, tmp_path, tiny_tokenizer):
        from xtuner_plugins.data.dataset import InternVLDataset
        path = self.nul_data(tmp_path)
        ds = InternVLDataset(path, str(tmp_path / 'images'), tokenizer=tiny_tokenizer, image_size=28,
                             max_bad_fraction=0.5, cache_dir=str(tmp_path / 'cache'))
        assert [(p.reason, p.source) for p in ds.load_problems] == [('bad_image_path', f'{path}:2')]
        assert len(ds) == 2 and all(ds[i]['pixel_values'].shape[0] == 3 for i in range(2))

    def test_check_dataset_names_file_and_line(self, tmp_path, capsys):
        from tools import check_dataset
        path = self.nul_data(tmp_path)
        code = check_dataset.main(['--data', path, '--image-folder', str(tmp_path / 'images'), '--image-size', '28'])
        out = capsys.readouterr().out
        assert code == 1
        assert f"{path}:2: bad_image_path: image path 'bad\\x00.png' contains a NUL byte" in out, out


def test_mmbench_images_follow_the_same_rule(tmp_path):
    """tools/eval.py's MMBench rows (base64 image files) decode by load_image's rule: a 16-bit PNG is not white."""
    import base64

    from tests.eval.test_data import ROWS, write_tsv
    from xtuner_plugins.eval.mmbench import read_mmbench_tsv
    path = write_image(tmp_path / 'x16.png', size=(30, 20), mode='I;16', seed=4)
    with open(path, 'rb') as f:
        row = dict(ROWS[0], image=base64.b64encode(f.read()).decode())
    (question,) = read_mmbench_tsv(write_tsv(tmp_path / 'm.tsv', [row]))
    assert load_image(question.images[0]).tobytes() == load_image(path).tobytes()   # the file's bytes, kept


def test_a_near_miss_of_a_missing_path_and_a_fifo_are_named_as_such(tmp_path):
    """``sub\\a.png`` was "not found" / "is the image folder right?"; so were a name with spaces around it, a name
    in the other Unicode normal form (macOS writes NFD) and one in other letter case; a FIFO was "not found" (and is
    never opened)."""
    import unicodedata

    from xtuner_plugins.data.image_io import why_missing
    from xtuner_plugins.data.presence import missing_line
    from xtuner_plugins.data.sources import DataSource
    write_image(tmp_path / 'sub' / 'a.png')
    write_image(tmp_path / unicodedata.normalize('NFD', 'caf\u00e9.png'))
    write_image(tmp_path / 'Photo.JPG')
    gone = str(tmp_path / 'sub\\a.png')
    assert why_missing(gone, 'image file') == (f"image file not found: {gone} (it separates folders with \\ as Windows "
                                               f"does; '{tmp_path}/sub/a.png' exists: write that in the annotation)")
    assert why_missing(str(tmp_path / 'sub' / ' a.png '), 'x').endswith("(its name has spaces around it; "
                                                                       f"'{tmp_path}/sub/a.png' exists: write that "
                                                                       f"in the annotation)")
    assert 'the file\'s name is in Unicode NFD (macOS writes NFD)' in why_missing(str(tmp_path / 'caf\u00e9.png'), 'x')
    assert why_missing(str(tmp_path / 'nothing\\b.png'), 'image file').endswith('b.png')  # no such file: no hint
    # a Windows path climbing out of the folder: no hint (it told whether a file exists outside, and its advice
    # would be refused as unsafe)
    (tmp_path / 'imgs').mkdir()
    climbing = str(tmp_path / 'imgs' / '..\\sub\\a.png')   # tmp_path/sub/a.png exists
    assert why_missing(climbing, 'image file') == f'image file not found: {climbing}'

    def refusal(path):
        with pytest.raises(ValueError) as info:
            missing_line(DataSource('a', str(tmp_path / 'a.jsonl'), str(tmp_path)), 1, 0, 1, 'a.jsonl:1', path)
        return str(info.value)
    assert "a.jsonl:1: sub\\a.png (it separates folders with \\ as Windows does" in refusal(gone)
    assert "a.jsonl:1: photo.jpg ('Photo.JPG' is there: names differ in letter case here)" in refusal(
        str(tmp_path / 'photo.jpg'))
    os.mkfifo(tmp_path / 'pipe.png')
    with pytest.raises(SampleError, match=r'image file is not a regular file \(a FIFO, socket or device\)'):
        load_image(str(tmp_path / 'pipe.png'))


def test_an_empty_image_file_says_it_is_empty(tmp_path):
    (tmp_path / 'a.jpg').write_bytes(b'')
    for source in (str(tmp_path / 'a.jpg'), b''):
        with pytest.raises(SampleError, match=r'is an empty file \(0 bytes\): a download or copy that did not '
                                              r'finish\?') as info:
            load_image(source)
        assert info.value.reason == 'corrupt_image'


def test_a_wrong_image_folder_says_the_near_folder_where_the_first_image_is(tmp_path):
    """The whole-source refusal ("is the image folder right?") names the folder when the first path is under the
    folder's parent (paths repeating the folder's last part) or under the folder less the path's first part."""
    from xtuner_plugins.data.presence import missing_line
    from xtuner_plugins.data.sources import DataSource
    write_image(tmp_path / 'data' / 'coco' / 'x.jpg')
    folder = str(tmp_path / 'data' / 'coco')

    def refusal(rel):
        from xtuner_plugins.errors import Refused
        with pytest.raises(Refused) as info:   # one line at training's start, not a traceback
            missing_line(DataSource('a', str(tmp_path / 'a.jsonl'), folder), 1, 0, 1, 'a.jsonl:1',
                         os.path.join(folder, rel))
        return str(info.value)
    assert f'is the image folder right? coco/x.jpg is there under {tmp_path}/data: that is its folder' in \
        refusal('coco/x.jpg')
    assert f'right? x.jpg is there under {folder}: the paths name one folder too many' in refusal('train/x.jpg')
    assert 'right? (train_dataloader' in refusal('y.jpg')


def test_a_data_url_is_named_as_one():
    """A jsonl image given as a data URL was refused as 'a 401-byte name part, over the system's limit'."""
    from xtuner_plugins.data.errors import SampleError
    from xtuner_plugins.data.image_io import resolve_image_path
    with pytest.raises(SampleError, match=r"is a data URL: a sample names its images by their files"):
        resolve_image_path('data:image/png;base64,' + 'A' * 400, None, '/tmp')


def test_a_url_is_named_as_one():
    """An http(s):// or s3:// image was looked up as FOLDER/https:/host/x.jpg and counted as missing_image, without
    a word that nothing here fetches URLs."""
    from xtuner_plugins.data.errors import SampleError
    from xtuner_plugins.data.image_io import resolve_image_path
    for url in ('https://example.com/a/x.jpg', 'http://h/x.png', 's3://bucket/x.jpg'):
        with pytest.raises(SampleError, match=r"is a URL: images are read from files only") as info:
            resolve_image_path(url, '/data/images')
        assert info.value.reason == 'bad_image_path'
    assert resolve_image_path('a:b/x.jpg', '/data') == '/data/a:b/x.jpg'   # a colon in a name is still a path


def _frames(n):
    return [Image.new('RGB', (24, 16), (60 * i, 255 - 60 * i, 0)) for i in range(n)]


@pytest.mark.parametrize('ext,kind', [('gif', 'an animated GIF'), ('png', 'an animated PNG'),
                                      ('webp', 'an animated WEBP'), ('tif', 'a TIFF of several pages')])
def test_an_image_of_several_frames_is_its_first_frame_and_is_said(tmp_path, ext, kind):
    """An animated GIF, PNG or WebP and a TIFF of pages decode as their first frame, as InternVL's loader reads
    them: :func:`frame_note` says so (check_dataset's ``animated_image`` notes, chat); one frame, a camera's MPO
    (a JPEG and its preview) and a file that does not open say nothing."""
    first, *rest = _frames(3)
    path = str(tmp_path / f'a.{ext}')
    first.save(path, save_all=True, append_images=rest)
    assert load_image(path).getpixel((3, 3))[:2] == (0, 255)
    note = frame_note(path)
    assert note.startswith(f'{path}: {kind}: its first ') and "as InternVL's loader reads it" in note, note
    assert ('convert it to MP4 or GIF' in note) == (ext == 'webp')
    assert frame_note(open(path, 'rb').read(), 'shard-000000.tar:k.jpg').startswith('shard-000000.tar:k.jpg: ')
    single = str(tmp_path / f'one.{ext}')
    first.save(single)
    assert frame_note(single) == '' and frame_note(str(tmp_path / 'missing.png')) == ''


def test_a_cameras_mpo_is_no_image_of_several_frames(tmp_path):
    first, preview = _frames(2)
    path = str(tmp_path / 'photo.jpg')
    first.save(path, format='MPO', save_all=True, append_images=[preview])
    assert Image.open(path).is_animated
    assert frame_note(path) == ''
