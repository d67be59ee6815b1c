"""A key named twice in one JSON object is refused wherever data is read, never read last-wins."""

import json
import os

import pytest

from tests.helpers import conv, write_image
from xtuner_plugins.data.entries import read_records
from xtuner_plugins.data.sources import expand_sources
from xtuner_plugins.data.strictjson import DuplicateKey, loads

GOOD = json.dumps({'image': 'a.png', 'conversations': conv()})
TWO_IMAGES = GOOD.replace('"image": "a.png"', '"image": "a.png", "image": "b.png"')
TWO_TURN_VALUES = GOOD.replace('"value": "A red square."', '"value": "A red square.", "value": "No."')


def test_loads_refuses_a_key_named_twice_at_any_depth_and_is_json_loads_otherwise():
    assert loads(GOOD) == json.loads(GOOD)
    with pytest.raises(DuplicateKey, match=r'key "image" appears twice in one object \("a.png", then "b.png"\)'):
        loads(TWO_IMAGES)
    with pytest.raises(DuplicateKey, match=r'key "value" appears twice'):
        loads(TWO_TURN_VALUES)
    assert loads('{"a": {"x": 1}, "b": {"x": 2}}') == {'a': {'x': 1}, 'b': {'x': 2}}  # same key, other objects


def test_a_sample_naming_a_key_twice_is_a_bad_sample_named_file_and_line(tmp_path):
    """jsonl lines and .json items alike: counted as bad_json with FILE:LINE, the rest read."""
    path = tmp_path / 'a.jsonl'
    path.write_text('\n'.join([GOOD, TWO_IMAGES, GOOD, TWO_TURN_VALUES]) + '\n')
    records, problems = read_records(0, expand_sources(str(path))[0])
    assert [r.line for r in records] == [1, 3]
    assert [(p.source, p.reason) for p in problems] == [(f'{path}:2', 'bad_json'), (f'{path}:4', 'bad_json')]
    assert 'key "image" appears twice in one object ("a.png", then "b.png")' in problems[0].message
    listed = tmp_path / 'b.json'
    listed.write_text(f'[{GOOD}, {TWO_IMAGES}]')
    records, problems = read_records(0, expand_sources(str(listed))[0])
    assert [r.line for r in records] == [1] and [(p.source, p.reason) for p in problems] == [(f'{listed}:2',
                                                                                             'bad_json')]


def test_training_and_check_dataset_refuse_it_and_a_meta_file_naming_an_entry_twice_stops(tmp_path, capsys):
    from tools.check_dataset import main as check_main
    from xtuner_plugins.data import InternVLDataset
    write_image(tmp_path / 'a.png', size=(40, 30))
    write_image(tmp_path / 'b.png', size=(40, 30), seed=1)
    path = tmp_path / 'a.jsonl'
    path.write_text('\n'.join([GOOD, TWO_IMAGES, GOOD]) + '\n')
    ds = InternVLDataset(str(path), image_folders=str(tmp_path), tokenizer=None, max_bad_fraction=0.5,
                         cache_dir=str(tmp_path / 'cache'))
    assert len(ds) == 2 and [(p.source, p.reason) for p in ds.load_problems] == [(f'{path}:2', 'bad_json')]
    assert check_main(['--data', str(path), '--image-folder', str(tmp_path)]) == 1
    assert f'{path}:2: bad_json: key "image" appears twice in one object' in capsys.readouterr().out
    meta = tmp_path / 'meta.json'
    meta.write_text('{"mine": {"annotation": "a.jsonl", "repeat_time": 1},\n'
                    ' "mine": {"annotation": "a.jsonl", "repeat_time": 2}}')
    with pytest.raises(ValueError, match=r'meta.json: meta file: key "mine" appears twice in one object'):
        expand_sources(str(meta))


def test_a_shard_sample_or_shards_json_naming_a_key_twice_is_damage(tmp_path):
    from xtuner_plugins.data.shard_index import read_index
    from xtuner_plugins.data.shards import shard_record
    meta = {'sample': json.loads(GOOD), 'source': 0, 'line': 3, 'images': ['img0.png']}
    text = json.dumps(meta).replace('"line": 3', '"line": 3, "line": 7')
    record = shard_record({'__key__': '000000001', '__url__': 's.tar', 'json': text.encode()}, 1)
    assert record.problem.startswith('member 000000001.json is not the writer\'s: key "line" appears twice')
    os.makedirs(tmp_path / 'set')
    (tmp_path / 'set' / 'shards.json').write_text('{"format": "x", "format": "y"}')
    with pytest.raises(ValueError, match=r'shards.json: key "format" appears twice'):
        read_index(str(tmp_path / 'set'))
    (tmp_path / 'set' / 'shards.json').write_text('{"samples": ' + '9' * 5000 + '}')
    with pytest.raises(ValueError, match=r'shards.json: cannot be read \(Exceeds the limit'):
        read_index(str(tmp_path / 'set'))


def _refused(tmp_path, body: bytes, name='a.jsonl'):
    """The problems of reading ``body`` as an annotation file (``name``)."""
    path = tmp_path / name
    path.write_bytes(body)
    return read_records(0, expand_sources(str(path))[0])


def test_a_line_nested_past_the_parsers_depth_is_a_bad_sample_not_a_traceback(tmp_path):
    deep = '{"conversations": ' + '[' * 100000 + ']' * 100000 + '}'
    records, problems = _refused(tmp_path, f'{GOOD}\n{deep}\n{GOOD}\n'.encode())
    assert [r.line for r in records] == [1, 3]
    assert [(p.source, p.reason) for p in problems] == [(f'{tmp_path}/a.jsonl:2', 'bad_json')]
    assert 'nested deeper than the JSON reader follows' in problems[0].message
    records, problems = _refused(tmp_path, f'[{GOOD}, {deep}]'.encode(), 'b.json')
    assert [r.line for r in records] == [1] and [p.source for p in problems] == [f'{tmp_path}/b.json:2']


def test_a_bom_opening_any_line_is_read_over_as_files_joined_with_cat_bring_them(tmp_path):
    bom = b'\xef\xbb\xbf'
    records, problems = _refused(tmp_path, bom + GOOD.encode() + b'\n' + bom + GOOD.encode() + b'\r\n')
    assert [r.line for r in records] == [1, 2] and not problems


@pytest.mark.parametrize('body, name, says', [
    ((GOOD + '\n').encode('utf-16'), 'a.jsonl', 'the file is UTF-16 text'),
    ((GOOD + '\n').encode('utf-16-le'), 'a.jsonl', 'the file is UTF-16 text'),
    (f'{GOOD}\r{GOOD}\r'.encode(), 'a.jsonl', 'separated by a carriage return alone (\\r, old Mac line ends)'),
    (json.dumps([json.loads(GOOD)], indent=1).encode(), 'a.jsonl', 'one JSON list of samples ([...]) is a .json file'),
    (json.dumps([json.loads(GOOD)]).encode(), 'a.jsonl', 'one JSON list of samples ([...]) is a .json file'),
    (b'\0' * 300, 'a.jsonl', 'the line holds NUL bytes (a file cut short by a crash keeps zeros'),
    (json.dumps(json.loads(GOOD), indent=2).encode(), 'a.jsonl', 'an object spread over several lines (pretty-'),
])
def test_a_file_that_is_not_json_lines_says_what_it_most_likely_is(tmp_path, body, name, says):
    records, problems = _refused(tmp_path, body, name)
    assert not records and says in problems[0].message and problems[0].source == f'{tmp_path}/{name}:1'


def test_a_utf16_json_list_or_meta_file_says_so(tmp_path):
    for body in (json.dumps([json.loads(GOOD)]).encode('utf-16'),
                 json.dumps({'x': {'annotation': 'a.jsonl', 'repeat_time': 1}}).encode('utf-16')):
        (tmp_path / 'b.json').write_bytes(body)
        with pytest.raises(ValueError, match=r'b.json: not valid JSON \(UTF-16 text: .*iconv -f UTF-16 -t UTF-8'):
            read_records(0, expand_sources(str(tmp_path / 'b.json'))[0])


def test_a_number_past_pythons_digit_limit_is_a_bad_sample_not_a_traceback(tmp_path):
    """json.loads raises a bare ValueError (not JSONDecodeError) for an int of more than 4300 digits."""
    huge = GOOD.replace('{', '{"id": ' + '9' * 5000 + ', ', 1)
    records, problems = _refused(tmp_path, f'{GOOD}\n{huge}\n'.encode())
    assert [r.line for r in records] == [1] and [(p.source, p.reason) for p in problems] == [
        (f'{tmp_path}/a.jsonl:2', 'bad_json')]
    assert 'line cannot be read: Exceeds the limit (4300 digits)' in problems[0].message
    records, problems = _refused(tmp_path, f'[{GOOD}, {huge}]'.encode(), 'b.json')
    assert [r.line for r in records] == [1] and [p.source for p in problems] == [f'{tmp_path}/b.json:2']
    meta = tmp_path / 'meta.json'
    meta.write_text('{"x": {"annotation": "a.jsonl", "repeat_time": ' + '1' * 5000 + '}}')
    with pytest.raises(ValueError, match=r'meta.json: meta file cannot be read: Exceeds the limit'):
        expand_sources(str(meta))
