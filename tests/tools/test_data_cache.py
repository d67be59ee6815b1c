"""tools/data_cache.py: the data sets' cache, its unused entries, and removing them."""

import fcntl
import os
import time

from tests.data.test_dataset import make_ds
from tests.helpers import conv, write_jsonl
from xtuner_plugins.cli.data_cache import main, read_entries

DAY = 86400


def _age(folder, days):
    """Every file of the cache last modified ``days`` ago (as if no run had read them since)."""
    then = time.time() - days * DAY
    for name in os.listdir(folder):
        os.utime(os.path.join(folder, name), (then, then))


def _data(tmp_path, n, word='word'):
    rows = [{'conversations': conv(f'q{i}', f'{word} ' * (1 + i), image=False)} for i in range(n)]
    return write_jsonl(tmp_path / 'a.jsonl', rows)


def test_an_edited_files_old_entries_are_pruned_and_the_ones_in_use_kept(tmp_path, tiny_tokenizer, capsys):
    """An annotation file edited gets new entries (index, check and lengths) and the old ones stayed for good. A
    start that reads an entry marks it used; --prune removes what no start read for --unused-days, and the data set
    then starts from what is left without building it again."""
    cache = str(tmp_path / 'cache')
    path = _data(tmp_path, 4)
    make_ds(path, tiny_tokenizer, tmp_path).length
    old = set(read_entries(cache))
    assert len(old) == 2 and {e.kind for e in read_entries(cache).values()} == {'index', 'check and lengths'}
    _age(cache, 40)
    _data(tmp_path, 5, word='other')   # the file edited: new entries
    make_ds(path, tiny_tokenizer, tmp_path).length
    new = set(read_entries(cache)) - old
    assert len(new) == 2
    _age(cache, 40)
    make_ds(path, tiny_tokenizer, tmp_path).length   # a start reading the new entries marks them used
    assert main(['--cache-dir', cache]) == 0   # without --prune: said, not removed
    out = capsys.readouterr().out
    assert 'data_cache: unused for 30 days or more: 2 entries' in out and '--prune removes them' in out, out
    assert set(read_entries(cache)) == old | new
    assert main(['--cache-dir', cache, '--prune']) == 0
    out = capsys.readouterr().out
    assert set(read_entries(cache)) == new and 'removed 2 entries' in out, out
    assert not [n for n in os.listdir(cache) if any(n.startswith(o) or n.startswith(o, 6) for o in old)]
    built = set(os.listdir(cache))
    stamps = {n: os.stat(os.path.join(cache, n)).st_ino for n in built}
    assert make_ds(path, tiny_tokenizer, tmp_path).length   # from the cache left: nothing built again
    assert {n: os.stat(os.path.join(cache, n)).st_ino for n in os.listdir(cache)} == stamps


def test_an_entry_a_run_is_building_is_skipped_and_every_other_goes_with_unused_days_0(tmp_path, tiny_tokenizer,
                                                                                        capsys):
    """An entry whose lock a run holds (building it now) is left; --unused-days 0 removes every other, and a
    writer's half-written file a day old goes too. A data set built after finds no cache and builds it."""
    cache = str(tmp_path / 'cache')
    path = _data(tmp_path, 3)
    make_ds(path, tiny_tokenizer, tmp_path).length
    entries = read_entries(cache)
    busy = next(name for name, e in entries.items() if e.kind == 'index')
    dead = os.path.join(cache, 'tmpab12cd34.tmp')
    open(dead, 'w').close()
    os.utime(dead, (time.time() - 2 * DAY,) * 2)
    fresh = os.path.join(cache, 'tmpnew_0000.tmp')   # a writer at work: left
    open(fresh, 'w').close()
    with open(entries[busy].locks[0]) as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert main(['--cache-dir', cache, '--prune', '--unused-days', '0']) == 0
    out = capsys.readouterr().out
    assert 'removed 1 entries and 1 half-written file(s); 1 skipped, a run building them now' in out, out
    assert set(read_entries(cache)) == {busy} and os.path.exists(fresh) and not os.path.exists(dead)
    ds = make_ds(path, tiny_tokenizer, tmp_path)
    assert ds.length and len(read_entries(cache)) == 2


def test_no_cache_folder_and_a_bad_setting(tmp_path, capsys):
    assert main(['--cache-dir', str(tmp_path / 'none')]) == 0
    assert 'no cache there' in capsys.readouterr().out
    assert main(['--cache-dir', str(tmp_path), '--unused-days', 'nan']) == 2
    assert '--unused-days must be 0 or more, got nan' in capsys.readouterr().err


def test_a_link_leading_nowhere_or_no_name_is_refused(tmp_path, capsys):
    """Before: '...: no cache there (nothing has been cached yet)', exit 0, as for a folder not made yet."""
    os.symlink(tmp_path / 'loop2', tmp_path / 'loop1')
    os.symlink(tmp_path / 'loop1', tmp_path / 'loop2')
    os.symlink(tmp_path / 'gone', tmp_path / 'dangling')
    for given, said in ((tmp_path / 'loop1', f'{tmp_path / "loop1"} is a symbolic link loop ({tmp_path / "loop1"} -> '
                                             f'{tmp_path / "loop2"} -> ...): no data set can cache there'),
                        (tmp_path / 'dangling', f'{tmp_path / "dangling"} is a symbolic link to {tmp_path / "gone"}, '
                                                'which does not exist: no data set can cache there'),
                        (tmp_path / 'dangling' / 'sub', f'lies under {tmp_path / "dangling"}, a symbolic link to '),
                        ('', "--cache-dir '': give a folder")):
        assert main(['--cache-dir', str(given)]) == 2
        out, err = capsys.readouterr()
        assert said in err and err.count('\n') == 1 and 'no cache there' not in out, err


def test_a_folder_that_is_no_data_cache_is_never_pruned(tmp_path, capsys):
    """--cache-dir given a data folder by mistake: images named by their hash (40 hex digits, as some data sets
    store them) and a file of its own. Only names a cache writes are entries, and a folder holding anything else is
    refused for --prune, whole: nothing in it is removed."""
    folder = tmp_path / 'images'
    folder.mkdir()
    names = ['3f786850e387550fdab836ed7e6dc881de23001b.jpg', 'index-3f786850e387550fdab836ed7e6dc881de23001b.npy',
             'tmp_notes.tmp', 'train.jsonl']
    for name in names:
        (folder / name).write_bytes(b'x')
        os.utime(folder / name, (time.time() - 400 * DAY,) * 2)
    assert main(['--cache-dir', str(folder)]) == 0
    assert '1 entries, 1 B (and 3 other file(s) or folder(s), no cache\'s' in capsys.readouterr().out
    assert main(['--cache-dir', str(folder), '--prune', '--unused-days', '0']) == 2
    err = capsys.readouterr().err
    assert 'holds 3 file(s) or folder(s) no data cache writes (3f786850e387550fdab836ed7e6dc881de23001b.jpg, ' \
           'tmp_notes.tmp, train.jsonl): not a data cache folder, nothing removed' in err, err
    assert sorted(os.listdir(folder)) == sorted(names)


def test_a_user_who_may_not_set_an_entrys_time_marks_it_used_beside_it(tmp_path, tiny_tokenizer, monkeypatch,
                                                                        capsys):
    """A cache folder a group shares, written under umask 022: another user's start could not set the time of the
    files it read (a PermissionError, dropped), and the owner's --prune removed entries read that same day. That
    user's own mark beside the file (``.used-UID``) now says so, and goes with the entry."""
    cache = str(tmp_path / 'cache')
    path = _data(tmp_path, 3)
    make_ds(path, tiny_tokenizer, tmp_path).length
    _age(cache, 40)
    utime = os.utime

    def not_ours(target, *args, **kwargs):   # the entries' files are another user's
        if '.used-' not in str(target):
            raise PermissionError(1, 'Operation not permitted', str(target))
        return utime(target, *args, **kwargs)
    monkeypatch.setattr(os, 'utime', not_ours)
    make_ds(path, tiny_tokenizer, tmp_path).length
    monkeypatch.setattr(os, 'utime', utime)
    marks = [n for n in os.listdir(cache) if '.used-' in n]
    assert marks and all(n.endswith(f'.used-{os.getuid()}') for n in marks), os.listdir(cache)
    assert main(['--cache-dir', cache, '--prune']) == 0
    assert 'unused for 30 days or more: 0 entries' in capsys.readouterr().out
    assert len(read_entries(cache)) == 2
    assert main(['--cache-dir', cache, '--prune', '--unused-days', '0']) == 0
    assert os.listdir(cache) == []   # the marks go with their entries
