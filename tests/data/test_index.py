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


def test_a_line_of_a_byte_order_mark_alone_is_blank(tmp_path):
    """Files joined with cat, one of them empty but saved with a BOM (Notepad's): its line, a BOM and a newline,
    was a bad_json sample ('Expecting value') where the same line opening the file, or a whitespace line, is blank."""
    path = tmp_path / 'a.jsonl'
    path.write_bytes(b'{"a": 1}\n' + BOM + b'\n' + BOM + b' \r\n' + BOM + b'{"b": 2}\n\xef\xbc\x9a\n')
    assert [int(x) for x in scan_jsonl(str(path))[:, 2]] == [1, 4, 5]


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


@pytest.mark.parametrize('window', [3, 1 << 24])
def test_runs_of_backslashes_before_quotes_of_any_length(tmp_path, monkeypatch, window):
    """Strings of random backslashes, quotes, brackets and commas: the elements found are the list's (the runs of
    backslashes before a quote, odd or even, are counted in arrays)."""
    import random
    monkeypatch.setattr(index_module, 'WINDOW', window)
    rng = random.Random(0)
    items = [{'v': ''.join(rng.choice('\\\\\\"a,[]') for _ in range(rng.randint(0, 12)))} for _ in range(300)]
    path = tmp_path / 'a.json'
    path.write_text(json.dumps(items))
    entries = scan_json_list(str(path))
    assert [json.loads(raw) for _, raw in entries_bytes(path, entries)] == items


def test_a_json_list_is_scanned_in_time_linear_in_its_size(tmp_path, monkeypatch):
    """Each window's escaped quotes are told from real ones by the backslashes of that window (and of a run going on
    into it): the whole file's backslashes were found again for every window, so a 844 MB file took 45 s, ten times a
    211 MB one. Counted here as the bytes compared: a few times the file's size, not its size times its windows."""
    compared = [0]

    class Counting(np.ndarray):
        def __eq__(self, other):
            compared[0] += self.size
            return np.asarray(self) == other

        def __ne__(self, other):
            compared[0] += self.size
            return np.asarray(self) != other
    opened = index_module._file
    monkeypatch.setattr(index_module, '_file', lambda path: opened(path).view(Counting))
    monkeypatch.setattr(index_module, 'WINDOW', 1024)
    items = [{'v': 'a \\"quoted\\" word, [and] \\\\ ' + 'x' * (i % 50)} for i in range(4000)]
    path = tmp_path / 'a.json'
    path.write_text(json.dumps(items))
    entries = scan_json_list(str(path))
    assert [json.loads(raw) for _, raw in entries_bytes(path, entries)] == items
    size = path.stat().st_size
    assert size > 200 * 1024 and compared[0] < 20 * size, (compared[0], size)


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


def test_a_file_changed_after_indexing_is_named_never_read_at_other_bytes(tmp_path):
    """Written back under the same size and modification time (a shuffle, ``cp -p``), the file is indexed again; one
    written over while a run reads it stops the read in one line; one replaced (``sed -i``) is not read at all."""
    import os
    path = tmp_path / 'a.jsonl'
    rows = [json.dumps({'n': 'x' * k}) for k in range(1, 9)]
    path.write_text('\n'.join(rows) + '\n')
    st = os.stat(path)
    first = source_index(str(path), str(tmp_path / 'cache'))
    path.write_text('\n'.join(rows[::-1]) + '\n')
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    again = source_index(str(path), str(tmp_path / 'cache'))
    assert [json.loads(again.read(i))['n'] for i in range(len(again))] == [json.loads(r)['n'] for r in rows[::-1]]
    with pytest.raises(index_module.AnnotationChanged, match=r'a.jsonl: changed after its samples were indexed '
                                                             r'\(line 1 is no longer 10 bytes at byte 0\)'):
        first.read(0)  # its file was written over in place
    (tmp_path / 'b.jsonl').write_text('{"n": "other"}\n')
    os.replace(tmp_path / 'b.jsonl', path)
    assert json.loads(again.read(7))['n'] == 'x'  # the file it indexed, still open
    assert pytest.raises(index_module.AnnotationChanged, index_module.SourceIndex(str(path), again.entries).read, 1)
    items = tmp_path / 'a.json'
    items.write_text(json.dumps([{'n': 1}, {'n': 22}]))
    listed = source_index(str(items), None)
    items.write_text(json.dumps([{'n': 22}, {'n': 1}]))
    with pytest.raises(index_module.AnnotationChanged, match=r'item 1 is no longer 8 bytes at byte 1'):
        listed.read(0)
