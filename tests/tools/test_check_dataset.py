import json
import os
import shutil
import subprocess
import sys

import pytest

from tests.helpers import conv, write_image, write_jsonl
from tools import check_dataset

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def good_data(tmp_path, n=3):
    img = tmp_path / 'images'
    for i in range(n):
        write_image(img / f'{i}.png', size=(60 + 10 * i, 40), seed=i)
    path = write_jsonl(tmp_path / 'good.jsonl', [
        {'id': i, 'image': f'{i}.png', 'conversations': conv(answer=f'answer {i}')} for i in range(n)])
    return path, str(img)


def test_clean_data_exits_zero(tmp_path, tiny_tokenizer_dir, capsys):
    path, img = good_data(tmp_path)
    code = check_dataset.main(['--data', path, '--image-folder', img, '--tokenizer', tiny_tokenizer_dir,
                               '--image-size', '28'])
    out = capsys.readouterr().out
    assert code == 0, out
    assert 'images found: 3' in out and 'samples: 3' in out
    assert 'tokens trained on (text + image): min' in out and 'kept: 3' in out
    assert 'problems: 0' in out


def test_an_image_made_a_link_out_of_its_folder_after_the_cache_is_named_not_a_traceback(tmp_path, capsys):
    """A second check reads the first one's cached start-up check, which looks at no sample: an image replaced by a
    link out of its folder since then stopped the check with the SampleError's traceback; it is that sample's
    problem now, as a first check names it."""
    path, img = good_data(tmp_path)
    assert check_dataset.main(['--data', path, '--image-folder', img, '--workers', '1']) == 0
    outside = tmp_path / 'elsewhere' / '1.png'
    outside.parent.mkdir()
    os.replace(os.path.join(img, '1.png'), outside)
    os.symlink(outside, os.path.join(img, '1.png'))
    capsys.readouterr()
    code = check_dataset.main(['--data', path, '--image-folder', img, '--workers', '1'])
    out = capsys.readouterr().out
    assert code == 1, out
    assert f"{path}:2: unsafe_image_path: image path '1.png' is a symbolic link to {outside}" in out
    assert 'dropped (unsafe image path): 1' in out and 'samples: 3' in out and 'images found: 2' in out


def test_every_problem_is_listed_with_file_and_line(tmp_path, tiny_tokenizer_dir, capsys):
    path, img = good_data(tmp_path, n=1)
    (tmp_path / 'images' / 'broken.jpg').write_bytes(b'not an image')
    bad = write_jsonl(tmp_path / 'bad.jsonl', [
        {'image': '0.png', 'conversations': conv()},
        '{oops',
        {'image': 'missing.png', 'conversations': conv()},
        {'image': 'broken.jpg', 'conversations': conv()},
        {'image': '0.png', 'conversations': [{'from': 'human', 'value': '<image><image>'},
                                             {'from': 'gpt', 'value': 'x'}]},
        {'image': '0.png', 'conversations': conv(answer='word ' * 200)},
    ])
    code = check_dataset.main(['--data', bad, '--image-folder', img, '--tokenizer', tiny_tokenizer_dir,
                               '--image-size', '28', '--max-length', '300'])
    out = capsys.readouterr().out
    assert code == 1
    for line, reason in [(2, 'bad_json'), (3, 'missing_image'), (4, 'corrupt_image'), (5, 'image_tag_mismatch'),
                         (6, 'truncated')]:
        assert f'{bad}:{line}: {reason}:' in out, out
    assert 'images missing image: 1' in out and 'images corrupt image: 1' in out
    assert 'kept truncated: 1' in out
    assert check_dataset.main(['--data', bad, '--image-folder', img, '--tokenizer', tiny_tokenizer_dir,
                               '--image-size', '28', '--max-length', '300', '--allow-truncation']) == 1


def test_dropped_when_images_do_not_fit(tmp_path, tiny_tokenizer_dir, capsys):
    path, img = good_data(tmp_path, n=1)
    code = check_dataset.main(['--data', path, '--image-folder', img, '--tokenizer', tiny_tokenizer_dir,
                               '--max-length', '50'])  # 448 px tiles: 256 tokens each, cannot fit
    out = capsys.readouterr().out
    assert code == 1
    assert f'{path}:1: too_long:' in out and 'dropped (too long): 1' in out and 'kept' not in out


def test_meta_file_without_tokenizer(tmp_path, capsys):
    path, img = good_data(tmp_path)
    meta = tmp_path / 'meta.json'
    meta.write_text(json.dumps({'good': {'root': 'images', 'annotation': 'good.jsonl', 'repeat_time': 2}}))
    assert check_dataset.main(['--data', str(meta)]) == 0
    out = capsys.readouterr().out
    assert '6 samples after repeats' in out and 'images found: 3' in out


def test_a_file_named_twice_is_reported_per_naming(tmp_path, capsys):
    """Both blocks printed the merged totals (samples: 6 for a 3-line file, the other root's missing images under
    the naming whose folder has them all)."""
    path, img = good_data(tmp_path)
    (tmp_path / 'few').mkdir()
    shutil.copy(os.path.join(img, '0.png'), tmp_path / 'few' / '0.png')
    meta = tmp_path / 'meta.json'
    meta.write_text(json.dumps({'all': {'root': 'images', 'annotation': 'good.jsonl', 'repeat_time': 1},
                                'few': {'root': 'few', 'annotation': 'good.jsonl', 'repeat_time': 2}}))
    check_dataset.main(['--data', str(meta)])
    summary = capsys.readouterr().out.split('\nSummary\n')[1]
    first, second = summary.split(f'{path} (')[1:3]
    assert first.startswith("'all': ") and '  samples: 3\n' in first and 'missing' not in first, summary
    assert second.startswith("'few': ") and '  samples: 3\n' in second and 'dropped (missing image): 2' in second


def test_runs_as_a_script_with_help():
    result = subprocess.run([sys.executable, 'tools/check_dataset.py', '--help'], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0
    assert '--max-dynamic-patch' in result.stdout and '--tokenizer' in result.stdout


def test_one_tile_modes_count_the_projectors_tokens(tmp_path, tiny_tokenizer_dir, capsys):
    """--image-mode resize/pad: one tile per image of --num-image-token tokens (100 more tokens per tile, 100
    more per sample); tile mode would cut the 60..80 x 40 images into several 28 px tiles."""
    import re
    path, img = good_data(tmp_path)
    maxima = {}
    for mode, tokens in (('pad', 10), ('pad', 110), ('resize', 10), ('tile', 10)):
        assert check_dataset.main(['--data', path, '--image-folder', img, '--tokenizer', tiny_tokenizer_dir,
                                   '--image-size', '28', '--image-mode', mode, '--num-image-token',
                                   str(tokens)]) == 0
        out = capsys.readouterr().out
        found = re.search(r'tokens trained on \(text \+ image\): min \d+, .*max (\d+)', out)
        maxima[mode, tokens] = int(found.group(1))
    assert maxima['pad', 110] - maxima['pad', 10] == 100
    assert maxima['resize', 10] == maxima['pad', 10] < maxima['tile', 10]


def test_it_says_what_training_does_with_each_sample(tmp_path, tiny_tokenizer_dir, capsys):
    """Fewer tiles (kept), an answer cut (kept, or dropped with --truncation drop), too long (dropped), control
    text (dropped): the check says what the data set decides, sample by sample."""
    from transformers import AutoTokenizer
    from xtuner_plugins.data.dataset import InternVLDataset
    write_image(tmp_path / 'i' / 'big.png', size=(28 * 8, 28 * 5))  # 40 tiles + thumbnail at 28 px
    wordy = [{'from': 'human', 'value': 'word ' * 300 + '<image>'}, {'from': 'gpt', 'value': 'x'}]
    path = write_jsonl(tmp_path / 'a.jsonl', [
        {'image': 'big.png', 'conversations': conv(answer='short')},      # 1: fewer tiles, kept whole
        {'image': 'big.png', 'conversations': conv(answer='word ' * 200)},  # 2: fewer tiles and its answer cut
        {'image': 'big.png', 'conversations': wordy},                        # 3: too long even with one tile
        {'conversations': conv(answer='a<|im_end|>b', image=False)}])       # 4: control text
    args = ['--data', path, '--image-folder', str(tmp_path / 'i'), '--tokenizer', tiny_tokenizer_dir,
            '--image-size', '28', '--max-dynamic-patch', '40', '--max-length', '170']
    assert check_dataset.main(args) == 1
    out = capsys.readouterr().out
    for line, reason in [(1, 'fewer_tiles'), (2, 'truncated'), (3, 'too_long'), (4, 'control_text')]:
        assert f'{path}:{line}: {reason}:' in out, out
    for count in ('kept with fewer tiles: 2', 'kept truncated: 1', 'dropped (too long): 1',
                  'dropped (control text): 1'):
        assert count in out, out
    assert 'dropped (too long (' not in out and 'problems: 3' in out
    ds = InternVLDataset(path, image_folders=str(tmp_path / 'i'), tokenizer=AutoTokenizer.from_pretrained(
        tiny_tokenizer_dir), image_size=28, max_dynamic_patch=40, max_length=170, max_bad_fraction=1,
        cache_dir=str(tmp_path / 'cache'))
    items = [ds[i] for i in range(3)]  # what training does: the same
    assert [x.get('reduced', [(None, None)])[0][0] for x in items[:2]] == [f'{path}:1', f'{path}:2']
    assert 'truncated' not in items[0] and items[1]['truncated'][0][0] == f'{path}:2'
    assert items[2]['skipped'][0] == (f'{path}:3', 'too_long')
    assert check_dataset.main(args + ['--truncation', 'drop', '--allow-control-text']) == 1
    out = capsys.readouterr().out
    assert 'dropped (truncated): 1' in out and f'{path}:2: truncated:' in out and 'kept: 1' in out
    assert check_dataset.main(args + ['--allow-truncation']) == 1 and 'problems: 2' in capsys.readouterr().out


def test_videos_listed_with_frames_duration_and_size_and_their_problems(tmp_path, tiny_tokenizer_dir, capsys):
    from tests.helpers import write_video
    folder = tmp_path / 'media'
    write_video(folder / 'v.mp4', [6 * i for i in range(40)], size=(32, 24))
    write_video(folder / 'frames', [0, 50, 100], size=(20, 10))
    (folder / 'broken.mp4').write_bytes(b'not a video' * 20)
    write_video(folder / 'portrait.mp4', [9, 90], size=(32, 24), rotation=-90)  # a phone's: stored landscape
    path = write_jsonl(tmp_path / 'v.jsonl', [
        {'video': 'portrait.mp4', 'conversations': conv(image=False)},
        {'video': 'v.mp4', 'conversations': conv(image=False)},
        {'video': 'frames', 'conversations': conv(image=False)},
        {'video': 'v.mp4', 'clip': [1, 2.5], 'conversations': conv(image=False)},
        {'video': 'v.mp4', 'clip': [3, 9], 'conversations': conv(image=False)},
        {'video': 'broken.mp4', 'conversations': conv(image=False)},
        {'video': 'v.mp4', 'image': 'x.png', 'conversations': conv()},
        {'conversations': conv('<video>\nWhat?', image=False)},
    ])
    code = check_dataset.main(['--data', path, '--image-folder', str(folder), '--tokenizer', tiny_tokenizer_dir,
                               '--image-size', '28', '--min-num-frame', '4', '--max-num-frame', '4'])
    out = capsys.readouterr().out
    assert code == 1, out
    assert (f'{path}:1: video {folder}/portrait.mp4: 2 frames, 0.20 s at 10 fps, 24x32 (turned upright by its '
            f'rotation tag), 4 frames trained on') in out
    assert f'{path}:2: video {folder}/v.mp4: 40 frames, 4.00 s at 10 fps, 32x24, 4 frames trained on' in out
    assert f'{path}:3: video {folder}/frames: 3 frames, a folder of frames, 20x10, 3 frames trained on' in out
    assert f'{path}:4: video {folder}/v.mp4: 40 frames, 4.00 s at 10 fps, 32x24, clip frames 10..24' in out
    for line, reason in [(5, 'bad_clip'), (6, 'corrupt_video'), (7, 'image_and_video'), (8, 'video_tag_mismatch')]:
        assert f'{path}:{line}: {reason}: ' in out
    assert 'videos found: 4' in out and 'kept: 4' in out


def test_a_huge_frame_setting_decodes_each_frame_once(tmp_path, capsys, monkeypatch):
    """--max-num-frame 1000000 on a 40-frame video: a list of a million frame numbers was read (a billion: 8 GB);
    the frames past the video's 40 repeat its last, so its 40 frames are read, once."""
    from tests.helpers import write_video
    from xtuner_plugins.cli import check_dataset as cli
    write_video(tmp_path / 'media' / 'v.mp4', [6 * i for i in range(40)])
    path = write_jsonl(tmp_path / 'v.jsonl', [{'video': 'v.mp4', 'conversations': conv(image=False)}])
    asked, real = [], cli.read_frames
    monkeypatch.setattr(cli, 'read_frames', lambda info, idx: asked.append(len(idx)) or real(info, idx))
    code = check_dataset.main(['--data', path, '--image-folder', str(tmp_path / 'media'), '--workers', '1',
                               '--min-num-frame', '1000000', '--max-num-frame', '1000000'])
    out = capsys.readouterr().out
    assert code == 0 and asked == [40], (asked, out)
    assert f'{path}:1: video {tmp_path}/media/v.mp4: 40 frames, 4.00 s at 10 fps, 32x24' in out


def test_a_tokenizer_that_is_not_there_is_one_line_naming_the_option(tmp_path, capsys):
    """A mistyped --tokenizer: one error line naming the option and the path, exit 2 (transformers would raise
    about an internet connection)."""
    path, img = good_data(tmp_path, n=1)
    code = check_dataset.main(['--data', path, '--image-folder', img, '--tokenizer', str(tmp_path / 'nonexistent')])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: --tokenizer: '") and 'nonexistent' in err, err
    assert 'neither a folder nor in the local Hugging Face cache' in err and 'Traceback' not in err


def test_preference_pairs_are_checked_as_preference_training_reads_them(tmp_path, tiny_tokenizer_dir, capsys):
    """MMPR-style pairs (which the SFT reader refuses whole, as bad_conversation): checked as DPO / MPO training
    reads them, so a pair with the same answers is named bad_pair at FILE:LINE and the good ones are kept."""
    write_image(tmp_path / 'images' / '0.png', size=(60, 40))
    pairs = write_jsonl(tmp_path / 'pairs.jsonl', [
        {'id': 0, 'image': '0.png', 'question': '<image>\nWhat colour?', 'chosen': 'Red.', 'rejected': 'Blue.'},
        {'id': 1, 'image': '0.png', 'question': '<image>\nWhat colour?', 'chosen': 'Red.', 'rejected': 'Red.'},
        {'id': 2, 'question': 'Name a colour.', 'chosen': 'Green.', 'rejected': 'A cat.'}])
    code = check_dataset.main(['--data', pairs, '--image-folder', str(tmp_path / 'images'), '--tokenizer',
                               tiny_tokenizer_dir, '--image-size', '28'])
    out = capsys.readouterr().out
    assert code == 1, out
    assert out.startswith('preference pairs: checked as DPO / MPO training reads them')
    assert f'{pairs}:2: bad_pair: chosen and rejected are the same answer' in out
    assert '  kept: 2' in out and 'problems: 1' in out and 'bad_conversation' not in out
    assert check_dataset.main(['--data', pairs, '--image-folder', str(tmp_path / 'images'), '--pairs', 'no']) == 2
    assert '3 were refused' in capsys.readouterr().err   # as SFT samples: none has conversations
    # a first pair missing its rejected answer: the file was checked as SFT samples, every good pair refused
    first = write_jsonl(tmp_path / 'first_bad.jsonl', [
        {'id': 0, 'question': 'Name a colour.', 'chosen': 'Green.'},
        {'id': 1, 'question': 'Name a colour.', 'chosen': 'Green.', 'rejected': 'A cat.'}])
    check_dataset.main(['--data', first, '--tokenizer', tiny_tokenizer_dir])
    out = capsys.readouterr().out
    assert out.startswith('preference pairs: checked as DPO / MPO training reads them') and '  kept: 1' in out


def test_the_data_sets_image_settings_are_options_and_a_folder_is_no_image(tmp_path, capsys):
    """The settings its messages name are the checker's options: images linked out of their folder (the Hugging
    Face cache's layout) with --allow-links-outside, a pixel limit with --max-image-pixels; an image path that
    is a folder says so; without --tokenizer the summary says what was not checked."""
    os.rename(write_image(tmp_path / 'blobs' / 'x.png', size=(60, 40)), tmp_path / 'blobs' / 'abc123')
    (tmp_path / 'snap').mkdir()
    os.symlink(tmp_path / 'blobs' / 'abc123', tmp_path / 'snap' / 'a.png')
    (tmp_path / 'snap' / 'dir.png').mkdir()
    data = write_jsonl(tmp_path / 'd.jsonl', [{'image': 'a.png', 'conversations': conv()},
                                              {'image': 'dir.png', 'conversations': conv()}])
    args = ['--data', data, '--image-folder', str(tmp_path / 'snap')]
    assert check_dataset.main(args) == 1
    out = capsys.readouterr().out
    assert f'{data}:1: unsafe_image_path: ' in out and f'{data}:2: missing_image: image file expected, found a ' \
        f'folder: {tmp_path / "snap" / "dir.png"}' in out
    # shard_dataset says it in the same words (it said 'image file not found')
    from xtuner_plugins.cli import shard_dataset
    assert shard_dataset.main(args + ['--allow-links-outside', '--out', str(tmp_path / 'shards')]) == 0
    assert f'{data}:2: missing_image: image file expected, found a folder: {tmp_path / "snap" / "dir.png"}' in \
        capsys.readouterr().out
    assert 'not checked without --tokenizer: token lengths' in out
    assert check_dataset.main(args + ['--allow-links-outside']) == 1
    out = capsys.readouterr().out
    assert 'unsafe_image_path' not in out and 'problems: 1' in out
    assert check_dataset.main(args + ['--allow-links-outside', '--max-image-pixels', '100']) == 1
    assert f'{data}:1: image_too_large: ' in capsys.readouterr().out


def test_a_wrong_image_folder_is_one_line_with_the_count(tmp_path, capsys):
    """Every image missing: the folder is wrong, said once with the count (exit 2), not once per sample."""
    path, img = good_data(tmp_path)
    (tmp_path / 'wrong').mkdir()
    assert check_dataset.main(['--data', path, '--image-folder', str(tmp_path / 'wrong')]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith(f'error: {path}: 3 of 3 samples name images not found under '
                                   f'{tmp_path / "wrong"} (first: {path}:1: 0.png): is the image folder right?')
    assert 'missing_image' not in captured.out


def test_a_frame_linked_out_of_the_image_folder_is_listed_unless_allowed(tmp_path, capsys):
    from tests.helpers import write_video
    frames = write_video(tmp_path / 'media' / 'frames', [0, 60, 120])
    write_image(tmp_path / 'outside' / 'x.png', size=(32, 24))
    os.symlink(tmp_path / 'outside' / 'x.png', os.path.join(frames, '0004.png'))
    data = write_jsonl(tmp_path / 'd.jsonl', [{'video': 'frames', 'conversations': conv(image=False)}])
    args = ['--data', data, '--image-folder', str(tmp_path / 'media'), '--min-num-frame', '2', '--max-num-frame', '2']
    assert check_dataset.main(args) == 1
    assert f'{data}:1: unsafe_image_path: frame 0004.png of frame folder {frames} is a symbolic link to ' \
        f'{tmp_path / "outside" / "x.png"}' in capsys.readouterr().out
    assert check_dataset.main(args + ['--allow-links-outside']) == 0
    assert f'{data}:1: video {frames}: 4 frames' in capsys.readouterr().out


def test_workers_give_the_same_report(tmp_path, tiny_tokenizer_dir, capsys, monkeypatch):
    """--workers 2 (every slice in a pool of processes) prints what one process prints: problems in file order,
    counts, lengths; --workers 0 is refused."""
    from xtuner_plugins.data import nodepass
    monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'cache'))
    monkeypatch.setattr(nodepass, 'MIN_SLICE', 1)
    _, img = good_data(tmp_path, n=3)
    rows = [{'image': f'{i % 4}.png' if i % 4 < 3 else 'missing.png', 'conversations': conv(answer='x ' * (i % 9))}
            if i % 5 else {'conversations': conv(answer=f'text {i}', image=False)} for i in range(40)]
    rows[11] = '{oops'
    path = write_jsonl(tmp_path / 'mixed.jsonl', rows)
    args = ['--data', path, '--image-folder', img, '--tokenizer', tiny_tokenizer_dir, '--image-size', '28',
            '--max-length', '40', '--show', '0']
    reports = []
    for workers in ('1', '2'):
        assert check_dataset.main(args + ['--workers', workers]) == 1
        reports.append([line for line in capsys.readouterr().out.splitlines() if ' - mmengine - ' not in line])
    assert reports[0] == reports[1]
    reports = ['\n'.join(r) for r in reports]
    assert f'{path}:12: bad_json' in reports[0] and f'{path}:4: missing_image' in reports[0]
    assert 'too_long' in reports[0] and '  samples: ' in reports[0], reports[0]
    assert check_dataset.main(args + ['--workers', '0']) == 2
    assert '--workers must be at least 1, got 0' in capsys.readouterr().err


def test_a_shard_folder_gets_the_report_of_the_annotation_it_came_from(tmp_path, tiny_tokenizer_dir, capsys):
    """``--data SHARD_FOLDER`` (tools/shard_dataset.py's --out): every sample read from its shard, the same counts
    and token lengths as the annotation file gives; a folder that is no shard set is one line."""
    from xtuner_plugins.cli import shard_dataset
    path, img = good_data(tmp_path, n=4)
    options = ['--tokenizer', tiny_tokenizer_dir, '--image-size', '28']
    assert check_dataset.main(['--data', path, '--image-folder', img] + options) == 0
    direct = capsys.readouterr().out
    assert shard_dataset.main(['--data', path, '--image-folder', img, '--out', str(tmp_path / 'shards'),
                               '--samples-per-shard', '3']) == 0
    capsys.readouterr()
    assert check_dataset.main(['--data', str(tmp_path / 'shards')] + options) == 0
    sharded = capsys.readouterr().out
    assert f'from the shards in {tmp_path / "shards"}' in sharded and 'left out when sharded: none' in sharded

    def counts(out):
        return sorted(x.strip() for x in out.split('\nSummary\n')[1].splitlines() if x.startswith('  '))
    assert counts(sharded) == counts(direct) and 'samples: 4' in sharded, (direct, sharded)
    (tmp_path / 'empty').mkdir()
    assert check_dataset.main(['--data', str(tmp_path / 'empty')] + options) == 2
    err = capsys.readouterr().err
    assert err.startswith('error: ') and str(tmp_path / 'empty') in err and err.count('\n') == 1, err


def test_a_json_item_that_is_not_json_is_named_as_training_names_it(tmp_path, capsys):
    """The N-th item, counted from 1 (the pair check reads the first items before the data set does)."""
    path = tmp_path / 'a.json'
    path.write_text('[{"conversations": tru}, {"conversations": []}]')
    assert check_dataset.main(['--data', str(path)]) == 2
    assert f'error: {path}: not valid JSON (item 1: Expecting value' in capsys.readouterr().err


def shard_set(tmp_path, n=3):
    """good_data(n) written as a shard set (tools/shard_dataset.py) in ``tmp_path/shards``."""
    from xtuner_plugins.cli import shard_dataset
    path, img = good_data(tmp_path, n)
    assert shard_dataset.main(['--data', path, '--image-folder', img, '--out', str(tmp_path / 'shards')]) == 0
    return path, str(tmp_path / 'shards')


def test_a_sample_json_in_a_shard_that_is_not_the_writers_is_listed_as_training_skips_it(tmp_path, capsys):
    """A shard sample's KEY.json with a ``source`` out of shards.json's sources: ``bad_shard_json`` named SHARD:KEY,
    counted under its shard, exit 1 (an IndexError before)."""
    from webdataset import TarWriter

    from tests.data.test_shards import records_digest
    from xtuner_plugins.data.shards import read_shard
    path, shards = shard_set(tmp_path)
    tar = os.path.join(shards, 'shard-000000.tar')
    samples = list(read_shard(tar))
    samples[1]['json'] = json.dumps(dict(json.loads(samples[1]['json']), source=5)).encode()
    written = tmp_path / 'edited.tar'
    with TarWriter(str(written), encoder=False) as writer:
        for sample in samples:
            writer.write({k: v for k, v in sample.items() if k == '__key__' or not k.startswith('_')})
    os.replace(written, tar)
    index = json.loads((tmp_path / 'shards' / 'shards.json').read_text())
    index['shards'][0]['bytes'] = os.path.getsize(tar)
    index['shards'][0]['digest'] = records_digest(samples)
    (tmp_path / 'shards' / 'shards.json').write_text(json.dumps(index))
    capsys.readouterr()
    assert check_dataset.main(['--data', shards]) == 1
    out = capsys.readouterr().out
    assert (f'{tar}:000000001: bad_shard_json: member 000000001.json "source" is 5, expected the number of one of '
            f'shards.json\'s 1 sources (0..0): damaged; write the shard set again with tools/shard_dataset.py') in out
    assert f'{tar} (from the shards in {shards})\n  dropped (bad shard json): 1\n  samples: 1\n' in out
    assert f'{path} (from the shards in {shards})\n' in out and "problems: 1 ({'bad_shard_json': 1})" in out


def test_a_shard_set_given_with_other_data_or_an_image_folder_is_refused_saying_how(tmp_path, capsys):
    """--data SHARDS FILE said 'a shard set ..., read as one by check_dataset.py --data; it is not sharded again',
    telling the user to do what they did; --image-folder with a shard set was dropped without a word."""
    path, shards = shard_set(tmp_path)
    capsys.readouterr()
    for argv, given in (([shards, path], 'the other --data'), ([path, shards], 'the other --data'),
                        ([shards, '--image-folder', str(tmp_path)], '--image-folder')):
        assert check_dataset.main(['--data', *argv]) == 2
        assert capsys.readouterr().err.strip() == (
            f'error: {shards} is a shard set: it is checked on its own, and holds its images (check_dataset.py '
            f'--data {shards}, without {given})')
    assert check_dataset.main(['--data', shards]) == 0
    # shards hold no pairs (shard_dataset refuses them): --pairs yes was dropped and the set checked as SFT samples
    capsys.readouterr()
    assert check_dataset.main(['--data', shards, '--pairs', 'yes']) == 2
    assert capsys.readouterr().err.strip() == (
        f'error: {shards} is a shard set, which holds conversations: tools/shard_dataset.py shards no preference '
        f'pairs, so --pairs yes does not apply (check the pairs\' annotation file with it)')


def test_a_tokenizer_only_its_own_code_loads_is_refused_without_asking(tmp_path, tiny_tokenizer_dir, capsys,
                                                                      monkeypatch):
    """--tokenizer was loaded without trust_remote_code=False: transformers asked on stdin whether to run the
    folder's code, and a "y" (typed, or piped in by a script) ran it. It is refused in one line, never asked."""
    import io
    path, img = good_data(tmp_path, n=1)
    folder = tmp_path / 'own'
    shutil.copytree(tiny_tokenizer_dir, folder)
    config = json.loads((folder / 'tokenizer_config.json').read_text())
    config.update(tokenizer_class='OwnTokenizer', auto_map={'AutoTokenizer': [None, 'own_tok.OwnTokenizer']})
    (folder / 'tokenizer_config.json').write_text(json.dumps(config))
    ran = tmp_path / 'ran'
    (folder / 'own_tok.py').write_text(f'open({str(ran)!r}, "w").close()\n'
                                       'from transformers import PreTrainedTokenizerFast as OwnTokenizer\n')
    monkeypatch.setenv('HF_MODULES_CACHE', str(tmp_path / 'modules'))
    monkeypatch.setattr('sys.stdin', io.StringIO('y\n'))
    assert check_dataset.main(['--data', path, '--image-folder', img, '--tokenizer', str(folder)]) == 2
    out, err = capsys.readouterr()
    assert not ran.exists(), 'the folder\'s code ran'
    assert err.startswith(f'error: --tokenizer: {folder} is loaded only by its own code'), err
    assert 'run the custom code' not in out + err


def test_allow_links_outside_reaches_a_shard_sets_check(tmp_path, capsys):
    """--allow-links-outside is the shard set's allow_links_outside too, as in training: shards that are symbolic
    links out of their folder are refused without it (one line, exit 2) and checked with it (refused either way
    before)."""
    _, shards = shard_set(tmp_path)
    links = tmp_path / 'links'
    links.mkdir()
    for name in os.listdir(shards):
        if name.endswith('.tar'):
            os.symlink(os.path.join(shards, name), links / name)
        else:
            (links / name).write_bytes(open(os.path.join(shards, name), 'rb').read())
    capsys.readouterr()
    assert check_dataset.main(['--data', str(links)]) == 2
    err = capsys.readouterr().err
    assert err == (f'error: {links}/shards.json: shards[0].file \'shard-000000.tar\' is a symbolic link to '
                   f'{shards}/shard-000000.tar, outside the shard set\'s folder {links}: not read (set the data set\'s '
                   f'allow_links_outside=True to allow it)\n')
    assert check_dataset.main(['--data', str(links), '--allow-links-outside']) == 0
    out = capsys.readouterr().out
    assert 'samples: 3' in out and 'images found: 3' in out and 'problems: 0' in out, out


@pytest.mark.parametrize('option, says', [
    (['--max-length', '0'], 'max_length=0: a whole number of tokens >= 1'),
    (['--max-length', '-5'], 'max_length=-5: a whole number of tokens >= 1'),
    (['--patch-size', '0'], 'patch_size=0: a whole number of pixels >= 1'),
    (['--downsample-ratio', '0'], 'downsample_ratio=0.0: a number > 0'),
    (['--image-size', '14'], 'image_size=14, patch_size=14 and downsample_ratio=0.5 give a tile 0 LLM tokens'),
    (['--num-image-token', '0'], 'num_image_token=0: a whole number of LLM tokens per tile >= 1'),
    (['--max-image-pixels', '-1'], 'max_image_pixels=-1: a number of pixels >= 1'),
])
def test_a_setting_no_sample_can_have_is_one_line_before_any_sample(tmp_path, tiny_tokenizer_dir, capsys, option,
                                                                    says):
    """Each was a raw ValueError or ZeroDivisionError at the first sample (max_image_pixels -1: every image
    "too large"), in training too."""
    path, img = good_data(tmp_path, n=1)
    assert check_dataset.main(['--data', path, '--image-folder', img, '--tokenizer', tiny_tokenizer_dir,
                               '--workers', '1', *option]) == 2
    err = capsys.readouterr().err
    assert f'error: {says}' in err and 'Traceback' not in err, err


def test_an_animated_image_is_a_note_that_its_first_frame_is_used(tmp_path, capsys):
    """An animated GIF named as an image trains on its first frame (InternVL's loader reads it so): said as an
    ``animated_image`` note, counted, in the annotation's report and in its shard set's; not a problem."""
    from PIL import Image

    from xtuner_plugins.cli import shard_dataset
    path, img = good_data(tmp_path, n=2)
    frames = [Image.new('RGB', (40, 30), (80 * i, 0, 0)) for i in range(3)]
    frames[0].save(os.path.join(img, 'moving.gif'), save_all=True, append_images=frames[1:])
    with open(path, 'a') as f:
        f.write(json.dumps({'id': 9, 'image': 'moving.gif', 'conversations': conv(answer='a')}) + '\n')
    for data in (path, str(tmp_path / 'shards')):
        if data != path:
            assert shard_dataset.main(['--data', path, '--image-folder', img, '--out', data]) == 0
            capsys.readouterr()
        assert check_dataset.main(['--data', data] + (['--image-folder', img] if data == path else [])) == 0
        out = capsys.readouterr().out
        notes = [line for line in out.splitlines() if ': animated_image: ' in line]
        assert len(notes) == 1 and notes[0].split(': animated_image: ')[0].endswith(':3'), out
        assert 'an animated GIF: its first frame is used' in notes[0], out
        assert 'images of several frames (the first used): 1' in out and 'problems: 0' in out, out
        assert 'notes: 1 image(s) of several frames' in out, out


def test_an_image_size_past_any_tile_and_a_negative_show_are_one_line(tmp_path, capsys):
    """Before: --image-size 10**20 an OverflowError traceback; --show -1 hid the last problem of each reason."""
    path, img = good_data(tmp_path, n=1)
    for options, line in ((['--image-size', '100000000000000000000'], 'error: --image-size 100000000000000000000: '
                           'give a tile side in pixels from 1 to 8192'),
                          (['--show', '-1'], 'error: --show -1: give 0 (every problem) or more')):
        assert check_dataset.main(['--data', path, '--image-folder', img] + options) == 2
        err = capsys.readouterr().err
        assert err.startswith(line) and err.count('\n') == 1, err


def test_a_stop_while_checking_is_one_line(tmp_path, capsys, monkeypatch):
    """Ctrl-C while its workers check (a KeyboardInterrupt out of run_slices): one line, exit 130 (before: a
    traceback through nodepass.imap_parts)."""
    import xtuner_plugins.cli.check_dataset as cli
    path, img = good_data(tmp_path, n=1)

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt
        yield
    monkeypatch.setattr(cli, 'run_slices', stopped)
    assert check_dataset.main(['--data', path, '--image-folder', img, '--workers', '2']) == 130
    err = capsys.readouterr().err   # (beside the progress bar)
    assert 'error: stopped before the check finished; no report\n' in err and 'Traceback' not in err, err
