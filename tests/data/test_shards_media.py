"""Tar shards with videos (the video file's bytes, decoded from memory as the file is) and damaged shards: a
truncated tar, a shard missing a member, a corrupt video, each named (data/shards.py, cli/shard_dataset.py)."""

import json
import os
import tarfile
from types import SimpleNamespace

import pytest
import torch

from tests.helpers import conv, write_image, write_jsonl, write_video
from xtuner_plugins.cli.shard_dataset import write_shards
from xtuner_plugins.data import InternVLDataset
from xtuner_plugins.data.shard_check import check_shards
from xtuner_plugins.data.shards import INDEX, ShardDataset, read_index, read_shard

SETTINGS = dict(image_size=28, max_bad_fraction=1, min_num_frame=3, max_num_frame=5)


@pytest.fixture(scope='module')
def media(tmp_path_factory, tiny_tokenizer):
    root = tmp_path_factory.mktemp('shard_media')
    folder = root / 'm'
    write_video(folder / 'up.mp4', [6 * i for i in range(30)], size=(40, 30))
    write_video(folder / 'down.gif', [200 - 8 * i for i in range(12)], size=(32, 32))
    write_video(folder / 'frames', [10 * i for i in range(6)])
    write_image(folder / 'i.png', size=(56, 28))
    (folder / 'garbage.mp4').write_bytes(b'not a video at all' * 10)
    samples = [{'video': 'up.mp4', 'conversations': conv('Brighter?', 'brighter', image=False)},
               {'image': 'i.png', 'conversations': conv()},
               {'video': 'down.gif', 'clip': [0.2, 1.0], 'conversations': conv('<video>\nDarker?', 'yes', image=False)},
               {'video': 'frames', 'conversations': conv('Frames?', 'folder', image=False)},
               {'video': 'garbage.mp4', 'conversations': conv('Broken?', 'broken', image=False)},
               {'conversations': conv('Say something.', 'something', image=False)}]
    path = write_jsonl(root / 'd.jsonl', samples)
    source = InternVLDataset(path, image_folders=str(folder), tokenizer=tiny_tokenizer, **SETTINGS)
    out = str(root / 'out')
    # the writer skips a video file it cannot read; this set keeps one (as a set written before it checked, or
    # damaged since), for its readers to name
    probe = source.probe
    source.probe = lambda checked: probe(checked) if not checked.video.endswith('garbage.mp4') else None
    skipped = write_shards(source, out, samples_per_shard=2, max_shard_bytes=1 << 20, seed=None)  # in order
    del source.probe
    return SimpleNamespace(root=root, folder=folder, path=path, source=source, out=out, skipped=skipped,
                           settings=dict(SETTINGS, tokenizer=tiny_tokenizer))


def items(folder, settings, n):
    ds = ShardDataset(folder, dict(settings), shuffle=False, rank=0, world_size=1)
    return [item for _, item in zip(range(n), ds)]


def test_videos_are_sharded_as_their_files_and_give_the_annotations_items(media):
    assert dict(media.skipped) == {}
    with tarfile.open(os.path.join(media.out, 'shard-000000.tar')) as tar:
        assert tar.getnames() == ['000000000.json', '000000000.video.mp4', '000000001.img0.png', '000000001.json']
        assert tar.extractfile('000000000.video.mp4').read() == (media.folder / 'up.mp4').read_bytes()
        assert json.loads(tar.extractfile('000000000.json').read())['video'] == 'video.mp4'
    with tarfile.open(os.path.join(media.out, 'shard-000001.tar')) as tar:
        frames = [f'000000003.frame{k:04d}.png' for k in range(6)]
        assert tar.getnames() == ['000000002.json', '000000002.video.gif', *frames, '000000003.json']
        assert tar.extractfile(frames[5]).read() == (media.folder / 'frames' / '0006.png').read_bytes()
    src = media.source
    good = [src.where(src.record_at(i)) for i in (0, 1, 2, 3, 5)]
    got = items(media.out, media.settings, 5)
    assert [x['samples'] for x in got] == [[w] for w in good]
    for x, i in zip(got, (0, 1, 2, 3, 5)):
        y = src.load_sample(src.record_at(i))
        for key in ('input_ids', 'labels', 'pixel_values', 'image_flags'):
            assert torch.equal(x[key], y[key]), (i, key)
    assert got[0]['pixel_values'].shape[0] >= 3 and got[3]['pixel_values'].shape[0] >= 3  # frames, a tile each
    # the corrupt video is a counted skip, named by its line and its shard member
    assert [s for x in got for s in x['skipped']] == [(f'{media.path}:5', 'corrupt_video')]


def test_check_dataset_reads_the_videos_in_shards(media, tiny_tokenizer_dir, capsys):
    from xtuner_plugins.cli.check_dataset import main
    code = main(['--data', media.out, '--tokenizer', tiny_tokenizer_dir, '--image-size', '28',
                 '--num-image-token', '4', '--min-num-frame', '3', '--max-num-frame', '5'])
    out = capsys.readouterr().out
    assert code == 1, out  # the corrupt video
    assert f'{media.path}:5: corrupt_video: cannot read video {media.out}/shard-000002.tar:000000004.video.mp4' \
        in out, out
    assert f'{media.path}:1: video {media.out}/shard-000000.tar:000000000.video.mp4: 30 frames, 3.00 s at 10 fps, ' \
        f'40x30, ' in out, out
    assert f'{media.path}:4: video {media.out}/shard-000001.tar:000000003.frame*: 6 frames, a folder of frames, ' \
        f'32x24, ' in out, out
    assert 'video samples: 4' in out and 'videos found: 3' in out and 'image samples: 1' in out, out
    assert 'left out when sharded: none' in out
    assert main(['--data', media.out, '--image-size', '28', '--min-num-frame', '3']) == 1  # no tokenizer
    out = capsys.readouterr().out
    assert 'videos found: 3' in out and 'not checked without --tokenizer' in out, out


def copy_shards(media, tmp_path, edit):
    """The shard set copied, ``edit(tar_name, members) -> members`` rewriting each shard (members as
    ``(TarInfo, bytes)``), the index's sizes brought up to date."""
    out = tmp_path / 'edited'
    out.mkdir()
    index = read_index(media.out)
    for shard in index['shards']:
        with tarfile.open(os.path.join(media.out, shard['file'])) as tar:
            members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
        with tarfile.open(out / shard['file'], 'w') as tar:
            for info, data in edit(shard['file'], members):
                info.size = len(data)
                tar.addfile(info, __import__('io').BytesIO(data))
        shard['bytes'] = os.path.getsize(out / shard['file'])
        shard.pop('media')   # as a set written before its media's digest was recorded (test_a_changed_image_...)
    (out / INDEX).write_text(json.dumps(index))
    return str(out)


def test_a_member_missing_from_a_shard_is_a_named_counted_skip(media, tmp_path):
    gone = ('000000001.img0.png', '000000002.video.gif', '000000003.frame0002.png')
    out = copy_shards(media, tmp_path, lambda name, members: [(i, d) for i, d in members if i.name not in gone])
    ds = ShardDataset(out, dict(media.settings), shuffle=False, rank=0, world_size=1)
    got = [item for _, item in zip(range(2), ds)]
    assert [x['samples'] for x in got] == [[f'{media.path}:1'], [f'{media.path}:6']]
    assert [s for x in got for s in x['skipped']] == [(f'{media.path}:2', 'missing_image'),
                                                      (f'{media.path}:3', 'missing_video'),
                                                      (f'{media.path}:4', 'missing_video'),
                                                      (f'{media.path}:5', 'corrupt_video')]
    assert ds.samples.failed == {f'{media.path}:2': 'missing_image', f'{media.path}:3': 'missing_video',
                                 f'{media.path}:4': 'missing_video', f'{media.path}:5': 'corrupt_video'}
    report = check_shards(out, **media.settings)
    assert [(p.source, p.reason, p.message) for p in report['problems']][:3] == [
        (f'{media.path}:2', 'missing_image', f'{out}/shard-000000.tar:000000001: no member 000000001.img0.png in the '
                                             f'shard'),
        (f'{media.path}:3', 'missing_video', f'{out}/shard-000001.tar:000000002: no member 000000002.video.gif in '
                                             f'the shard'),
        (f'{media.path}:4', 'missing_video', f'{out}/shard-000001.tar:000000003: no member 000000003.frame0002.png '
                                             f'in the shard')]


def test_a_shard_missing_a_samples_json_is_one_line(media, tmp_path):
    out = copy_shards(media, tmp_path, lambda name, members: [(i, d) for i, d in members
                                                              if i.name != '000000001.json'])
    with pytest.raises(ValueError) as err:
        items(out, media.settings, 3)
    assert str(err.value).startswith(f'{out}/shard-000000.tar:000000001: no 000000001.json (the sample\'s '
                                     f'annotation) in the shard, only [\'img0.png\']: damaged; write the shard set '
                                     f'again with tools/shard_dataset.py'), err.value


def test_a_truncated_shard_is_refused_at_start_up_and_while_read(media, tmp_path):
    out = copy_shards(media, tmp_path, lambda name, members: members)
    shard = os.path.join(out, 'shard-000001.tar')
    data = open(shard, 'rb').read()
    with tarfile.open(shard) as tar:   # inside the last member's data (not in the tar's zero padding)
        last = tar.getmembers()[-1]
        cut = last.offset_data + last.size // 2
    open(shard, 'wb').write(data[:cut])
    with pytest.raises(ValueError) as err:
        read_index(out)
    assert str(err.value) == (f'{shard}: {cut} bytes, shards.json says {len(data)}: truncated or changed '
                              f'after it was written; write the shard set again with tools/shard_dataset.py')
    with pytest.raises(ValueError, match=r'shard-000001.tar: (the tar cannot be read after its \d samples .*|the tar '
                                         r'ends after \d of its 2 samples: truncated|a member \S+ claims \d+ bytes '
                                         r'from byte \d+, past the end of the shard .*); write the shard set again'):
        list(read_shard(shard, expected=2))
    open(shard, 'wb').write(data[:512 * 3])  # cut at a member's end: the tar reader alone would stop quietly
    with pytest.raises(ValueError, match=r'shard-000001.tar: (the tar ends after \d of its 2 samples|the tar cannot be '
                                         r'read|a member \S+ claims \d+ bytes from byte \d+, past the end)'):
        list(read_shard(shard, expected=2))


def test_a_changed_image_of_the_same_size_stops_the_shard_once_read_through(tmp_path, tiny_tokenizer):
    """The records' digest covers no image: one image of a shard written over by another of the same size (two BMPs
    of one size) was trained on without a word. ``shards.json``'s ``media`` digest names it once the shard is read
    through (hashing costs about 0.3% of decoding a 270 KB JPEG); a set written before it was recorded reads on."""
    from xtuner_plugins.data.shard_index import ShardDamaged
    for k in range(2):
        write_image(tmp_path / 'i' / f'{k}.bmp', size=(28, 28), seed=k, fmt='BMP')
    assert os.path.getsize(tmp_path / 'i' / '0.bmp') == os.path.getsize(tmp_path / 'i' / '1.bmp')
    path = write_jsonl(tmp_path / 'd.jsonl', [{'image': f'{k}.bmp', 'conversations': conv()} for k in range(2)])
    settings = dict(SETTINGS, tokenizer=tiny_tokenizer)
    source = InternVLDataset(path, image_folders=str(tmp_path / 'i'), **settings)
    out = str(tmp_path / 'out')
    write_shards(source, out, samples_per_shard=2, max_shard_bytes=1 << 20, seed=None)
    assert len(read_index(out)['shards']) == 1
    assert len(items(out, settings, 3)) == 3   # as written: read through, and on
    shard = os.path.join(out, 'shard-000000.tar')
    raw = bytearray(open(shard, 'rb').read())
    with tarfile.open(shard) as tar:
        member = tar.getmember('000000000.img0.bmp')
    raw[member.offset_data:member.offset_data + member.size] = (tmp_path / 'i' / '1.bmp').read_bytes()
    open(shard, 'wb').write(raw)
    with pytest.raises(ShardDamaged) as said:
        items(out, settings, 3)
    assert str(said.value).startswith(f'{shard}: its images or videos are not the ones shards.json records (their '
                                      'digest '), said.value
    assert str(said.value).endswith('): one changed or put in the place of another after the shard was written (its '
                                    'samples were read up to its end); write the shard set again with '
                                    'tools/shard_dataset.py'), said.value
    with pytest.raises(ShardDamaged, match='its images or videos are not the ones'):
        check_shards(out, **settings)
    index = json.loads(open(os.path.join(out, INDEX)).read())
    del index['shards'][0]['media']
    open(os.path.join(out, INDEX), 'w').write(json.dumps(index))
    assert len(items(out, settings, 3)) == 3
