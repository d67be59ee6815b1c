import json
import os
from collections import Counter

import pytest

from tests.helpers import conv, write_jsonl
from xtuner_plugins.errors import Refused
from xtuner_plugins.data.entries import parse_record, read_records
from xtuner_plugins.data.sources import expand_sources, repeat_indices


class TestRepeatIndices:

    def test_fractional_part_is_a_seeded_subset(self):
        idx = repeat_indices(10, 2.5, seed=3)
        counts = Counter(idx)
        assert len(idx) == 25
        assert sorted(counts.values()) == [2] * 5 + [3] * 5  # two full copies plus a half
        assert repeat_indices(10, 2.5, seed=3) == idx  # deterministic
        extras = {i for i, c in counts.items() if c == 3}
        other = {i for i, c in Counter(repeat_indices(10, 2.5, seed=4)).items() if c == 3}
        assert extras != other  # the seed picks the half

    @pytest.mark.parametrize('repeat,expected', [(0, 0), (0.3, 3), (1, 10), (1.0, 10), (3, 30), (0.05, 0)])
    def test_sizes(self, repeat, expected):
        idx = repeat_indices(10, repeat, seed=0)
        assert len(idx) == expected
        if repeat < 1:
            assert len(set(idx)) == expected  # a subset, without replacement


class TestExpandSources:

    def test_per_file_values_and_meta(self, tmp_path):
        a = write_jsonl(tmp_path / 'a.jsonl', [{'conversations': conv(image=False)}])
        (tmp_path / 'sub' / 'imgs').mkdir(parents=True)  # image folders must exist
        (tmp_path / 'imgs').mkdir()
        write_jsonl(tmp_path / 'sub' / 'b.jsonl', [{'conversations': conv(image=False)}])
        meta = tmp_path / 'meta.json'
        meta.write_text(json.dumps({'bee': {'root': 'sub/imgs', 'annotation': 'sub/b.jsonl',
                                            'repeat_time': 0.5, 'max_dynamic_patch': 4,
                                            'data_augment': False, 'length': 1}}))
        imgs = str(tmp_path / 'imgs')
        sources = expand_sources([a, str(meta)], image_folders=[imgs, None], repeat_times=[2, 1],
                                 max_dynamic_patches=[6, None])
        assert [s.name for s in sources] == ['a.jsonl', 'bee']
        assert sources[0].image_folder == imgs and sources[0].repeat_time == 2 and sources[0].max_dynamic_patch == 6
        assert sources[1].annotation == str(tmp_path / 'sub' / 'b.jsonl')  # relative to the meta file
        assert sources[1].image_folder == str(tmp_path / 'sub' / 'imgs')
        assert sources[1].repeat_time == 0.5 and sources[1].max_dynamic_patch == 4

    def test_a_meta_path_naming_two_different_things_is_refused(self, tmp_path, monkeypatch):
        """A relative path found beside the meta file and, as another file, in the current folder: InternVL reads
        the current folder's, ours the one beside the meta file; neither is taken without a word."""
        (tmp_path / 'meta').mkdir()
        (tmp_path / 'run').mkdir()
        for folder in ('meta', 'run'):
            write_jsonl(tmp_path / folder / 'b.jsonl', [{'conversations': conv(image=False)}])
        meta = tmp_path / 'meta' / 'meta.json'
        meta.write_text(json.dumps({'bee': {'annotation': 'b.jsonl', 'repeat_time': 1}}))
        monkeypatch.chdir(tmp_path / 'run')
        with pytest.raises(ValueError) as info:
            expand_sources(str(meta))
        assert str(info.value) == (
            f'{meta}: entry \'bee\': "annotation" \'b.jsonl\' names two different things: {tmp_path}/meta/b.jsonl '
            f'(beside the meta file) and {tmp_path}/run/b.jsonl (in the current folder, where InternVL would read '
            f'it); write the one meant as an absolute path')
        (tmp_path / 'run' / 'b.jsonl').unlink()   # only the current folder's image folder is another one
        (tmp_path / 'meta' / 'imgs').mkdir()
        (tmp_path / 'run' / 'imgs').mkdir()
        meta.write_text(json.dumps({'bee': {'annotation': 'b.jsonl', 'root': 'imgs', 'repeat_time': 1}}))
        with pytest.raises(ValueError, match=r'"root" \'imgs\' names two different things: '):
            expand_sources(str(meta))
        (tmp_path / 'run' / 'imgs').rmdir()
        (src,) = expand_sources(str(meta))
        assert src.annotation == str(tmp_path / 'meta' / 'b.jsonl')
        assert src.image_folder == str(tmp_path / 'meta' / 'imgs')

    def test_a_meta_path_found_only_in_the_current_folder_or_the_same_there_is_taken(self, tmp_path, monkeypatch):
        write_jsonl(tmp_path / 'b.jsonl', [{'conversations': conv(image=False)}])
        (tmp_path / 'meta').mkdir()
        meta = tmp_path / 'meta' / 'meta.json'
        meta.write_text(json.dumps({'bee': {'annotation': 'b.jsonl', 'repeat_time': 1}}))
        monkeypatch.chdir(tmp_path)
        (src,) = expand_sources(str(meta))
        assert src.annotation == 'b.jsonl'   # InternVL's way: the current folder's
        meta.rename(tmp_path / 'meta.json')  # the meta file in the current folder: both are the same file
        (src,) = expand_sources('meta.json')
        assert src.annotation == str(tmp_path / 'b.jsonl')

    def test_an_image_folder_given_for_a_meta_file_is_said_to_be_unused(self, tmp_path, monkeypatch):
        write_jsonl(tmp_path / 'b.jsonl', [{'conversations': conv(image=False)}])
        meta = tmp_path / 'meta.json'
        meta.write_text(json.dumps({'bee': {'annotation': 'b.jsonl', 'repeat_time': 1}}))
        logs = []
        monkeypatch.setattr('mmengine.logging.print_log', lambda msg, **kw: logs.append(msg))
        (src,) = expand_sources(str(meta), image_folders=str(tmp_path))
        assert src.image_folder is None
        assert logs == [f'{meta}: a meta file: its entries\' "root" are the image folders, the image folder given for '
                        f'it ({tmp_path}) is not used']
        expand_sources(str(meta))
        assert len(logs) == 1
        (src,) = expand_sources(str(meta), repeat_times=2)
        assert src.repeat_time == 1 and logs[1] == (f'{meta}: a meta file: its entries\' "repeat_time" are the '
                                                    f'repeats, the repeat_times given for it (2) is not used')

    def test_a_meta_entry_without_repeat_time_is_refused_as_internvl_does(self, tmp_path):
        write_jsonl(tmp_path / 'b.jsonl', [{'conversations': conv(image=False)}])
        meta = tmp_path / 'meta.json'
        meta.write_text(json.dumps({'bee': {'annotation': 'b.jsonl', 'repeat_time': 1},
                                    'wasp': {'annotation': 'b.jsonl'}}))
        with pytest.raises(ValueError) as info:
            expand_sources(str(meta))
        assert str(info.value) == (f'{meta}: entry \'wasp\': no "repeat_time" (InternVL\'s meta files require it): 1 '
                                   f'uses each sample once, 2.5 two copies and a seeded half, 0.3 a seeded 30 %')

    def test_mismatched_lists(self, tmp_path):
        from xtuner_plugins.errors import Refused
        a = write_jsonl(tmp_path / 'a.jsonl', [])
        with pytest.raises(Refused, match='image_folders has 2 entries but data_files has 1: give one per file'):
            expand_sources([a], image_folders=['x', 'y'])
        with pytest.raises(Refused, match='repeat_times has 1 entries but data_files has 2: give one per file'):
            expand_sources([a, a], repeat_times=[2])

    def test_one_image_folder_in_a_list_is_one_for_all_files(self, tmp_path):
        """image_folders=[DIR] with three files was a ValueError traceback; a plain string served all three, and
        check_dataset's one --image-folder serves all files."""
        files = [write_jsonl(tmp_path / f'{k}.jsonl', [{'conversations': conv(image=False)}]) for k in 'abc']
        assert [s.image_folder for s in expand_sources(files, image_folders=[str(tmp_path)])] == [str(tmp_path)] * 3

    def test_missing_and_unknown_files(self, tmp_path):
        with pytest.raises(FileNotFoundError, match='nope.jsonl'):
            expand_sources(str(tmp_path / 'nope.jsonl'))
        (tmp_path / 'x.csv').write_text('a,b')
        with pytest.raises(ValueError, match='unknown annotation format'):
            expand_sources(str(tmp_path / 'x.csv'))

    def test_bad_meta_entry(self, tmp_path):
        meta = tmp_path / 'meta.json'
        meta.write_text(json.dumps({'x': {'root': 'imgs'}}))
        with pytest.raises(ValueError, match=r"meta.json: entry 'x': \"annotation\" must be the path of one "):
            expand_sources(str(meta))

    def test_a_meta_file_not_utf8_is_named_with_its_byte_offset(self, tmp_path):
        meta = tmp_path / 'meta.json'
        meta.write_bytes(b'\xef\xbb\xbf{"d": {"annotation": "a\xff.jsonl"}}')
        with pytest.raises(ValueError, match=r"meta.json: meta file is not UTF-8 text \(byte 0xff at byte offset 26\)"):
            expand_sources(str(meta))

    def test_a_json_file_holding_something_else_than_a_list_or_a_meta_file_says_what_it_holds(self, tmp_path):
        """JSON lines named .json, one sample, a list inside an object: each named for what it is, not as a bad
        meta file."""
        sample = {'id': 1, 'image': 'a.jpg', 'conversations': conv()}
        lines = tmp_path / 'lines.json'
        lines.write_text(json.dumps(sample) + '\n' + json.dumps(sample) + '\n')
        with pytest.raises(ValueError, match=r'lines.json: holds more than one JSON value \(a second starts at line '
                                             r'2\): one sample a line is JSON lines, name the file .jsonl'):
            expand_sources(str(lines))
        one = tmp_path / 'one.json'
        one.write_text(json.dumps(sample, indent=2))
        with pytest.raises(ValueError, match=r'one.json: holds one sample, not a list of samples'):
            expand_sources(str(one))
        wrapped = tmp_path / 'wrapped.json'
        wrapped.write_text(json.dumps({'data': [sample]}))
        with pytest.raises(ValueError, match=r"wrapped.json: 'data' holds a list inside an object"):
            expand_sources(str(wrapped))


class TestReadRecords:

    def test_jsonl_bad_lines_are_problems_with_line_numbers(self, tmp_path):
        path = write_jsonl(tmp_path / 'a.jsonl', [{'id': 1, 'conversations': []}, '{not json', '[1, 2]', '',
                                                   {'id': 2, 'conversations': []}])
        src = expand_sources(path)[0]
        records, problems = read_records(0, src)
        assert [r.line for r in records] == [1, 5]
        assert [parse_record(r)['id'] for r in records] == [1, 2]
        assert [p.source for p in problems] == [f'{path}:2', f'{path}:3']
        assert all(p.reason == 'bad_json' for p in problems)
        assert str(problems[0]) == (f"{path}:2: invalid JSON at column 2, at 'not json': Expecting property name "
                                    f"enclosed in double quotes [bad_json]")
        assert 'list, not an object' in str(problems[1])

    def test_bad_json_names_the_lines_own_column(self, tmp_path):
        """The column within the line, not the parser's "line 2 column 1" (the newline ending a cut line)."""
        path = tmp_path / 'a.jsonl'
        path.write_text('{"id": 1}\n{"id": "é",\n{"id": "é" "x": 2}\n')
        _, problems = read_records(0, expand_sources(str(path))[0])
        assert [str(p) for p in problems] == [
            f'{path}:2: invalid JSON at column 12, the end of the line: Expecting property name enclosed in double '
            f'quotes [bad_json]',
            f"{path}:3: invalid JSON at column 12, at '\"x\": 2}}': Expecting ',' delimiter [bad_json]"]

    def test_json_list(self, tmp_path):
        path = tmp_path / 'a.json'
        path.write_text(json.dumps([{'id': 'x'}, 7, {'id': 'y'}]))
        records, problems = read_records(0, expand_sources(str(path))[0])
        assert [r.line for r in records] == [1, 3]
        assert problems[0].source == f'{path}:2'

    def test_json_not_a_list(self, tmp_path):
        path = tmp_path / 'a.json'
        path.write_text('[{"id": 1},')
        with pytest.raises(ValueError, match='a.json: not valid JSON'):
            read_records(0, expand_sources(str(path))[0])


def test_a_missing_image_folder_is_named_at_start_up(tmp_path, monkeypatch):
    """Once one of the source's samples names an image: a text-only data set needs no folder (its config's default
    folder had to exist), and says so in a line."""
    from xtuner_plugins.data import InternVLDataset
    settings = dict(tokenizer=None, cache_dir=str(tmp_path / 'cache'))
    path = write_jsonl(tmp_path / 'a.jsonl', [{'conversations': conv(image=False)},
                                              {'image': 'x.png', 'conversations': conv()}])
    assert expand_sources([path], [str(tmp_path / 'nope')])[0].image_folder == str(tmp_path / 'nope')
    with pytest.raises(FileNotFoundError, match=r'a.jsonl: its image folder .*/nope does not exist \(set '
                                                r'train_dataloader.dataset.image_folders'):
        InternVLDataset(path, image_folders=str(tmp_path / 'nope'), **settings)
    meta = tmp_path / 'meta.json'
    meta.write_text(json.dumps({'d': {'root': 'gone', 'annotation': 'a.jsonl', 'repeat_time': 1}}))
    with pytest.raises(FileNotFoundError, match=rf"^{meta}: entry 'd': {tmp_path}/a.jsonl: its image folder "
                                                rf"{tmp_path}/gone does not exist"):
        InternVLDataset(str(meta), **settings)
    (tmp_path / 'imgs').mkdir()
    assert expand_sources([path], [str(tmp_path / 'imgs')])[0].image_folder == str(tmp_path / 'imgs')
    text = write_jsonl(tmp_path / 'text.jsonl', [{'conversations': conv(image=False)}] * 3)
    lines = []
    monkeypatch.setattr('xtuner_plugins.data.dataset.print_log', lambda msg, **kw: lines.append(msg))
    assert len(InternVLDataset(text, image_folders=str(tmp_path / 'nope'), **settings)) == 3
    assert f'{text}: its image folder {tmp_path}/nope does not exist: none of its samples names an image or a video, ' \
           'so it needs none' in lines


def _sample(text):
    return json.dumps({'conversations': conv(text, 'ok', image=False)})


def test_any_bytes_are_a_per_line_bad_json_and_a_bom_is_no_error(tmp_path):
    good, pair = _sample('hello'), _sample('\U0001F600')  # a valid surrogate pair (\ud83d\ude00) is text
    lone = good.replace('hello', '\\ud800 hi')          # valid JSON, a lone surrogate: not text
    assert '\\ud83d' in pair and '\\ud800' in lone
    path = tmp_path / 'a.jsonl'
    broken = good.encode().replace(b'hello', b'he\xff\xfello')  # not UTF-8, inside a string
    column = broken.index(b'\xff') + 1
    path.write_bytes(b'\xef\xbb\xbf' + good.encode() + b'\n' + broken + b'\n' + lone.encode() + b'\n' +
                     pair.encode() + b'\n')
    records, problems = read_records(0, expand_sources(str(path))[0])
    assert [r.line for r in records] == [1, 4]  # the BOM costs nothing
    assert [(p.source, p.reason) for p in problems] == [(f'{path}:2', 'bad_json'), (f'{path}:3', 'bad_json')]
    assert f'not UTF-8 text (byte 0xff at column {column})' in str(problems[0])
    assert "lone UTF-16 surrogate, not text: '\\ud800 hi" in str(problems[1])
    # a .json list: the items holding such bytes, not the whole file
    items = f'[{good}, '.encode() + broken + f', {lone}, {pair}]'.encode()
    (tmp_path / 'b.json').write_bytes(b'\xef\xbb\xbf' + items)
    records, problems = read_records(0, expand_sources(str(tmp_path / 'b.json'))[0])
    assert [r.line for r in records] == [1, 4] and [p.source for p in problems] == [f'{tmp_path}/b.json:2',
                                                                                   f'{tmp_path}/b.json:3']


def test_a_lone_surrogate_is_counted_in_training_and_in_check_dataset(tmp_path, tiny_tokenizer, capsys):
    from tools.check_dataset import main as check_main
    from xtuner_plugins.data import InternVLDataset
    lines = [_sample(f'q{i}') for i in range(4)] + [_sample('x').replace('"x"', '"\\udc80"')]
    path = tmp_path / 'a.jsonl'
    path.write_text('\n'.join(lines) + '\n')
    tiny_tokenizer.save_pretrained(tmp_path / 'tok')
    ds = InternVLDataset(str(path), tokenizer=str(tmp_path / 'tok'), max_bad_fraction=0.5, cache_dir=str(tmp_path))
    assert len(ds) == 4 and [p.source for p in ds.load_problems] == [f'{path}:5']
    ds.modality_length  # the lengths (tokenising every sample) run too
    assert check_main(['--data', str(path), '--tokenizer', str(tmp_path / 'tok')]) == 1
    assert f'{path}:5: ' in capsys.readouterr().out


@pytest.mark.parametrize('entry,key,message', [
    ({'annotation': 'a.jsonl', 'repeat_time': None}, 'repeat_time', 'a number >= 0 (2.5: two copies and a seeded '
                                                                    'half), got null'),
    ({'annotation': 'a.jsonl', 'repeat_time': 'twice'}, 'repeat_time', 'a number >= 0'),
    ({'annotation': 'a.jsonl', 'repeat_time': -1}, 'repeat_time', 'a number >= 0'),
    # JSON's integers have no bound: a 401-digit one was an OverflowError's traceback (math.isfinite)
    ({'annotation': 'a.jsonl', 'repeat_time': 10 ** 400}, 'repeat_time', 'a number >= 0'),
    ({'annotation': 'a.jsonl', 'root': 3, 'repeat_time': 1}, 'root', 'the image folder\'s path (a string), got 3'),
    ({'annotation': ['a.jsonl', 'b.jsonl']}, 'annotation', 'the path of one annotation file (one entry per file), '
                                                           'got ["a.jsonl", "b.jsonl"]'),
    ({'root': 'imgs'}, 'annotation', 'the path of one annotation file (one entry per file), got nothing'),
    ({'annotation': 'a.jsonl', 'repeat_time': 1, 'max_dynamic_patch': 'many'}, 'max_dynamic_patch',
     'a whole number from 1 to 4096'),
    # listing its tile grids took 18.6 s and 2.9 GB at 10**6 in every process: 10**9 was killed without a word
    ({'annotation': 'a.jsonl', 'repeat_time': 1, 'max_dynamic_patch': 10 ** 9}, 'max_dynamic_patch',
     'a whole number from 1 to 4096, got 1000000000'),
])
def test_a_bad_meta_entry_is_one_line_naming_the_file_the_entry_and_the_key(tmp_path, entry, key, message):
    write_jsonl(tmp_path / 'a.jsonl', [{'conversations': []}])
    meta = tmp_path / 'meta.json'
    meta.write_text(json.dumps({'good': {'annotation': 'a.jsonl', 'repeat_time': 1}, 'mine': entry}))
    with pytest.raises(Refused) as info:   # one line at training's start (it was a ValueError's 40-line traceback)
        expand_sources(str(meta))
    assert str(info.value).startswith(f'{meta}: entry \'mine\': "{key}" must be {message}')
    assert '\n' not in str(info.value)


def test_a_tile_count_past_the_most_is_refused_wherever_it_is_given(tmp_path, tiny_tokenizer, capsys):
    from tests.data.test_dataset import make_ds
    from xtuner_plugins.cli.chat import parse_args
    from xtuner_plugins.data.tile_grid import MOST_TILES, candidate_grids
    path = write_jsonl(tmp_path / 'a.jsonl', [{'conversations': []}])
    with pytest.raises(ValueError, match=r'a.jsonl: max_dynamic_patch: expected a whole number from 1 to 4096'):
        expand_sources([path], max_dynamic_patches=[5000])
    with pytest.raises(ValueError, match=r'^max_dynamic_patch: expected a whole number from 1 to 4096 \(tiles per '
                                         r'image\), got 1000000$'):
        make_ds(path, tiny_tokenizer, tmp_path, max_dynamic_patch=10 ** 6)
    with pytest.raises(SystemExit):
        parse_args(['folder', '--max-num', '100000'])
    assert '--max-num: expected a whole number from 1 to 4096' in capsys.readouterr().err
    assert len(candidate_grids(1, MOST_TILES)) > 30000
    with pytest.raises(ValueError):
        candidate_grids(1, MOST_TILES + 1)


def test_repeat_times_not_a_number_names_the_file(tmp_path):
    path = write_jsonl(tmp_path / 'a.jsonl', [{'conversations': []}])
    with pytest.raises(ValueError, match=r"a.jsonl: repeat_times gives it None; give a number >= 0 per file"):
        expand_sources([path], repeat_times=[None])


@pytest.mark.parametrize('raw, why', [('{"conversations": [', 'invalid JSON at column 20, the end of the line'),
                                      ('[1, 2]', 'line is JSON list, not an object')])
def test_a_line_no_longer_an_object_when_loaded_is_bad_json(raw, why):
    """A line checked at start-up and changed before it is loaded is counted as bad_json, not a raw traceback."""
    from xtuner_plugins.data.errors import SampleError
    from xtuner_plugins.data.sources import Record
    with pytest.raises(SampleError, match=why) as err:
        parse_record(Record(0, 3, raw))
    assert err.value.reason == 'bad_json'


def test_a_file_named_twice_is_used_twice_as_internvl_does_and_said(tmp_path, monkeypatch):
    write_jsonl(tmp_path / 'a.jsonl', [{'conversations': conv(image=False)}])
    meta = tmp_path / 'meta.json'
    meta.write_text(json.dumps({'x': {'annotation': 'a.jsonl', 'repeat_time': 1},
                                'y': {'annotation': './a.jsonl', 'repeat_time': 0.5}}))
    logs = []
    monkeypatch.setattr('mmengine.logging.print_log', lambda msg, **kw: logs.append(msg))
    assert len(expand_sources(str(meta))) == 2
    assert logs == [f"{tmp_path}/a.jsonl is named 2 times ('x', 'y'): the samples of each naming are used (1.5 times "
                    f"each on average: each naming's fraction is its own seeded draw, so some samples are used more "
                    f"often than others); if that is not meant, name it once with the repeat_time you mean"]
    expand_sources([str(tmp_path / 'a.jsonl')])
    assert len(logs) == 1
    expand_sources([str(tmp_path / 'a.jsonl')] * 2, repeat_times=[1, 2])
    assert logs[-1].endswith('are used (3 times each in all); if that is not meant, name it once with the '
                             'repeat_time you mean')


@pytest.mark.parametrize('make, says', [
    (lambda p: p.mkdir(), r'is a folder, not an annotation file'),
    (lambda p: os.mkfifo(p), r'annotation file is not a regular file \(a FIFO, socket or device\)'),
    (lambda p: os.symlink(p, p), r'annotation file is a symbolic link loop \(ELOOP\)'),
    (lambda p: os.symlink(p.parent / 'gone.jsonl', p), r'annotation file is a symbolic link to nothing'),
    (lambda p: None, r'annotation file not found'),
])
def test_a_meta_entry_whose_annotation_is_no_file_is_one_line(tmp_path, make, says):
    """A FIFO hung start-up and check_dataset without a word; a folder or a link loop was a raw traceback (numpy's
    memmap, os.stat); a missing one a bare '[Errno 2]' naming neither the meta file nor the entry."""
    make(tmp_path / 'a.jsonl')
    meta = tmp_path / 'meta.json'
    meta.write_text(json.dumps({'x': {'annotation': 'a.jsonl', 'repeat_time': 1}}))
    with pytest.raises(Refused, match=rf"^{meta}: entry 'x': \"annotation\": .*{says}"):
        expand_sources(str(meta))


def test_an_empty_meta_file_and_unknown_entry_keys_are_said(tmp_path, monkeypatch):
    """{} was an IndexError in check_dataset and numpy's 'need at least one array to concatenate' in training; a
    misspelt max_dynamic_patch, and InternVL's data_augment, were dropped without a word."""
    meta = tmp_path / 'meta.json'
    meta.write_text('{}')
    with pytest.raises(ValueError, match=rf'^{meta}: a meta file with no entries'):
        expand_sources(str(meta))
    write_jsonl(tmp_path / 'a.jsonl', [{'conversations': conv(image=False)}])
    meta.write_text(json.dumps({'x': {'annotation': 'a.jsonl', 'repeat_time': 1, 'max_dynamic_patchs': 2,
                                      'data_augment': True, 'length': 1}}))
    logs = []
    monkeypatch.setattr('mmengine.logging.print_log', lambda msg, **kw: logs.append(msg))
    (src,) = expand_sources(str(meta))
    assert src.max_dynamic_patch is None
    assert logs[0].startswith(f"{meta}: entry 'x': 'max_dynamic_patchs' (meant 'max_dynamic_patch'?) not read")
    assert logs[1].startswith(f"{meta}: entry 'x': \"data_augment\" is not done here") and len(logs) == 2


@pytest.mark.parametrize('sample, says', [
    ({'question': 'q', 'chosen': 'a', 'rejected': 'b'}, 'it is a preference pair ("chosen" / "rejected"): train it '
                                                        'with a DPO / MPO config'),
    ({'messages': [{'role': 'user', 'content': 'q'}]}, 'it has "messages" (OpenAI\'s, ms-swift\'s format)'),
    ({'id': 3, 'text': 'q'}, "its keys are 'id', 'text'"),
    # these trained without a word: a conversation-form pair (its conversations, chosen and rejected left out), a
    # top-level system beside a system turn (now the first turn where there is none); OpenAI's turns were not named
    ({'conversations': [{'from': 'human', 'value': 'q'}], 'chosen': 'a', 'rejected': 'b'},
     'the sample has "chosen" and "rejected": it is a preference pair'),
    ({'system': 'You are a pirate.', 'conversations': [{'from': 'system', 'value': 'Be brief.'}] + conv(image=False)},
     'a top-level "system" ("You are a pirate.") and a first "system" turn: give the system message once'),
    ({'system': ['You are a pirate.'], 'conversations': conv(image=False)},
     'a top-level "system" is text, the system message; got ["You are a pirate."]'),
    ({'conversations': [{'role': 'user', 'content': 'q'}, {'role': 'assistant', 'content': 'a'}]},
     'turn 0 must be a dict with "from" and "value" (OpenAI\'s "role" / "content" keys are not this format\'s: its '
     'turns are {"from": "human" | "gpt" | "system", "value": TEXT}'),
])
def test_a_sample_without_conversations_says_what_it_holds_instead(tmp_path, sample, says):
    from xtuner_plugins.data import InternVLDataset
    path = write_jsonl(tmp_path / 'a.jsonl', [{'conversations': conv(image=False)}, sample])
    ds = InternVLDataset(path, tokenizer=None, max_bad_fraction=1.0, cache_dir=str(tmp_path / 'cache'))
    (problem,) = ds.load_problems
    assert problem.reason == 'bad_conversation' and problem.source == f'{path}:2'
    assert problem.message.startswith((f'the sample has no "conversations": {says}', says)), problem.message


def test_a_folder_given_as_an_annotation_file_says_so_and_a_shard_set_where_it_is_read(tmp_path):
    """It was "annotation file not found" for a folder that is there (shard_dataset --data SHARDS too)."""
    (tmp_path / 'shards').mkdir()
    with pytest.raises(ValueError, match=r'shards: a folder, not an annotation file$'):
        expand_sources(str(tmp_path / 'shards'))
    (tmp_path / 'shards' / 'shards.json').write_text('{}')
    with pytest.raises(ValueError, match=r'shards: a folder, not an annotation file: a shard set .* it is not sharded '
                                         r'again'):
        expand_sources(str(tmp_path / 'shards'))


def test_a_meta_entry_naming_a_meta_file_or_a_root_that_is_a_file_says_so(tmp_path):
    """They were "not valid JSON (the top level is not a list)" and "its image folder ... does not exist"."""
    write_jsonl(tmp_path / 'a.jsonl', [{'conversations': conv(image=False)}])
    (tmp_path / 'x.png').write_bytes(b'')
    meta = tmp_path / 'meta.json'
    meta.write_text(json.dumps({'x': {'annotation': 'meta.json', 'repeat_time': 1}}))
    with pytest.raises(ValueError, match=rf"meta.json: entry 'x': \"annotation\" {meta} is a meta file itself"):
        expand_sources(str(meta))
    meta.write_text(json.dumps({'x': {'annotation': 'a.jsonl', 'root': 'x.png', 'repeat_time': 1}}))
    with pytest.raises(FileNotFoundError, match=r'its image folder .*x.png is a file, not a folder'):
        expand_sources(str(meta))
    # among a meta file's entries, the one whose root it is (it named the annotation file only)
    (tmp_path / 'y.png').write_bytes(b'')
    meta.write_text(json.dumps({'w': {'annotation': 'a.jsonl', 'repeat_time': 1},
                                'x': {'annotation': 'a.jsonl', 'root': 'y.png', 'repeat_time': 1}}))
    with pytest.raises(FileNotFoundError, match=rf"^{meta}: entry 'x': {tmp_path}/a.jsonl: its image folder "
                                                rf"{tmp_path}/y.png is a file"):
        expand_sources(str(meta))


def test_a_compressed_or_unknown_annotation_file_is_named_as_one(tmp_path):
    """A gzip file named in a meta file was 'UTF-16 text: ... iconv -f UTF-16'; named .jsonl, 'not UTF-8 text
    (byte 0x8b)'; a meta entry's .txt was read as a .json list."""
    import gzip
    data = gzip.compress(b'{"conversations": []}\n')
    (tmp_path / 'a.jsonl').write_bytes(data)
    (tmp_path / 'a.jsonl.gz').write_bytes(data)
    with pytest.raises(ValueError, match=r'a.jsonl is gzip-compressed: decompress it first \(gunzip\)'):
        expand_sources(str(tmp_path / 'a.jsonl'))
    meta = tmp_path / 'meta.json'
    meta.write_text(json.dumps({'x': {'annotation': 'a.jsonl.gz', 'repeat_time': 1}}))
    with pytest.raises(ValueError, match=rf"{meta}: entry 'x': \"annotation\": annotation file .*a.jsonl.gz is "
                                         r"gzip-compressed"):
        expand_sources(str(meta))
    write_jsonl(tmp_path / 'b.txt', [{'conversations': conv(image=False)}])
    meta.write_text(json.dumps({'x': {'annotation': 'b.txt', 'repeat_time': 1}}))
    with pytest.raises(ValueError, match=r'b.txt: unknown annotation format'):
        expand_sources(str(meta))



@pytest.mark.parametrize('head, kind', [(b'\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR', 'a PNG image'),
                                        (b'\xff\xd8\xff\xe0\x00\x10JFIF\x00', 'a JPEG image'),
                                        (b'\x00\x00\x00\x20ftypisom\x00\x00', 'an MP4/MOV video'),
                                        (b'RIFF\x10\x00\x00\x00WEBPVP8 ', r'a RIFF file \(a WebP image, an AVI video\)'),
                                        (b'PAR1\x15\x04\x15', r'a Parquet file \(convert it to .jsonl\)'),
                                        (b'a.json' + b'\x00' * 251 + b'ustar\x0000', 'a tar archive')])
def test_an_annotation_file_in_another_format_is_named_as_it_is(tmp_path, head, kind):
    """A PNG or an MP4 named .json read as 'UTF-16 text: ... iconv -f UTF-16', a Parquet file named .jsonl as 'not
    UTF-8 text (byte ...)'."""
    for name in ('a.json', 'a.jsonl'):
        (tmp_path / name).write_bytes(head + bytes(range(256)))
        with pytest.raises(ValueError, match=rf'annotation file .*{name} is {kind}, not JSON text'):
            expand_sources(str(tmp_path / name))



def test_json_text_with_a_format_s_mark_where_it_would_be_is_read(tmp_path):
    """The marks are looked for in files that are not JSON text only: an id "WEBP" at byte 8 of a .json list, or
    "ftyp" at byte 4 of an indented line, is no WebP and no MP4."""
    sample = {'conversations': conv(image=False)}
    (tmp_path / 'a.json').write_text('[{"id":"WEBP",' + json.dumps(sample)[1:] + ']')
    (tmp_path / 'b.jsonl').write_text('  {"ftyp": 1, ' + json.dumps(sample)[1:] + '\n')
    for name in ('a.json', 'b.jsonl'):
        assert len(expand_sources(str(tmp_path / name))) == 1
