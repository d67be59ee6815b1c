"""The sample index: byte offsets of every jsonl line and json list element, as the old whole-file readers found
them, with windows small enough that lines, strings and escapes cross them; cached once, memory-mapped."""

import json

import numpy as np
import pytest

from xtuner_plugins.data import index as index_module
from xtuner_plugins.data.index import scan_json_list, scan_jsonl, source_index

BOM = b'\xef\xbb\xbf'


def old_jsonl_lines(path):
    """(line, bytes) of each non-blank line, as read_records read them before the index."""
    out = []
    with open(path, 'rb') as f:
        for line_no, raw in enumerate(f, 1):
            if line_no == 1 and raw.startswith(BOM):
                raw = raw[len(BOM):]
            if raw.strip():
                out.append((line_no, raw.rstrip(b'\n')))
    return out


def entries_bytes(path, entries):
    data = open(path, 'rb').read()
    return [(int(line), data[int(o):int(o) + int(n)]) for o, n, line in entries]


@pytest.mark.parametrize('window', [3, 7, 1 << 24])
def test_jsonl_lines_blank_lines_bom_crlf_and_no_final_newline(tmp_path, monkeypatch, window):
    monkeypatch.setattr(index_module, 'WINDOW', window)
    path = tmp_path / 'a.jsonl'
    path.write_bytes(BOM + b'{"a": 1}\n\n   \n{"b": "x\\ny"}\r\n\t{"c": 3}\n \t\r\n{"d": "\xc3\xa9"}\n{"e": 5}')
    entries = scan_jsonl(str(path))
    assert entries.dtype == np.int64 and entries.shape == (5, 3)
    assert entries_bytes(path, entries) == old_jsonl_lines(path)
    assert [int(x) for x in entries[:, 2]] == [1, 4, 5, 7, 8]


def test_an_empty_or_blank_jsonl_has_no_entries(tmp_path):
    (tmp_path / 'e.jsonl').write_bytes(b'')
    (tmp_path / 'b.jsonl').write_bytes(b'\n  \n\r\n')
    assert scan_jsonl(str(tmp_path / 'e.jsonl')).shape == (0, 3)
    assert scan_jsonl(str(tmp_path / 'b.jsonl')).shape == (0, 3)


TRICKY = [{'id': 'a,b', 'conversations': [{'from': 'human', 'value': 'brackets ] } [ { and "quotes", a \\ slash'}]},
          {'id': 'é\\', 'nested': [[1, 2], {'x': [3]}]}, 7, 'a "string" item, with, commas', [],
          {'end': '\\"\\\\'}, {}]


@pytest.mark.parametrize('window', [2, 5, 1 << 24])
@pytest.mark.parametrize('indent', [None, 2])
def test_json_list_elements_follow_strings_escapes_and_depth(tmp_path, monkeypatch, window, indent):
    monkeypatch.setattr(index_module, 'WINDOW', window)
    path = tmp_path / 'a.json'
    path.write_bytes(BOM + json.dumps(TRICKY, indent=indent, ensure_ascii=False).encode() + b'\n')
    entries = scan_json_list(str(path))
    assert [json.loads(raw) for _, raw in entries_bytes(path, entries)] == TRICKY
    assert [int(x) for x in entries[:, 2]] == list(range(1, len(TRICKY) + 1))


@pytest.mark.parametrize('text, why', [
    ('[{"id": 1},', 'the list is not closed at the end of the file'),
    ('[{"id": 1}] [2]', 'more data after the list'),
    ('[{"id": 1}]]', 'a closing bracket with none open'),
    ('"a string"', 'the top level is not a list'),
    ('  ', 'the file is empty'),
    ('[{"id": "1]"}', 'the list is not closed'),
])
def test_a_json_file_that_is_not_one_list_is_named(tmp_path, text, why):
    path = tmp_path / 'a.json'
    path.write_text(text)
    with pytest.raises(ValueError, match=rf'a.json: not valid JSON \({why}'):
        scan_json_list(str(path))


def test_empty_list(tmp_path):
    (tmp_path / 'a.json').write_text(' [ \n ] ')
    assert scan_json_list(str(tmp_path / 'a.json')).shape == (0, 3)


def test_the_index_is_built_once_and_memory_mapped_then_rebuilt_when_the_file_changes(tmp_path, monkeypatch):
    path = tmp_path / 'a.jsonl'
    path.write_text('{"a": 1}\n{"a": 2}\n')
    first = source_index(str(path), str(tmp_path / 'cache'))
    assert isinstance(first.entries.base, np.memmap) or isinstance(first.entries, np.memmap)
    monkeypatch.setattr(index_module, 'scan', lambda p: pytest.fail('the cached index should have been used'))
    again = source_index(str(path), str(tmp_path / 'cache'))
    assert np.array_equal(again.entries, first.entries) and again.read(1) == b'{"a": 2}'
    monkeypatch.undo()
    with open(path, 'a') as f:
        f.write('{"a": 3}\n')
    assert len(source_index(str(path), str(tmp_path / 'cache'))) == 3
