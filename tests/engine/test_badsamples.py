"""BadSampleHook: bad samples counted once each over DataLoader workers and ranks, against the run's limit;
each reason logged once per rank; a summary with every FILE:LINE in the work folder."""

import json
import os
import re
from types import SimpleNamespace

import pytest

from xtuner_plugins.data.errors import SampleError, TooManyBadSamplesError
from xtuner_plugins.engine.badsamples import BadSampleHook


def runner_for(tmp_path, total=10, limit=0.3, at_start=()):
    dataset = SimpleNamespace(max_bad_fraction=limit, num_distinct=total,
                              load_problems=[SampleError('bad_json', 'x', f'a.jsonl:{n}') for n in at_start])
    return SimpleNamespace(train_dataloader=SimpleNamespace(dataset=dataset), iter=0, epoch=0,
                           work_dir=str(tmp_path))


def batch(*skipped):
    return {'data': {'skipped': list(skipped)}}


def test_counted_once_each_over_workers_and_epochs_then_stopped_past_the_limit(tmp_path):
    hook, runner = BadSampleHook(), runner_for(tmp_path, total=10, limit=0.3)
    hook.before_train(runner)
    # two workers each met a.jsonl:3; one sample is met again in a later epoch: 3 distinct bad samples of 10
    for skipped in [('a.jsonl:3', 'missing_image'), ('a.jsonl:3', 'missing_image'), ('a.jsonl:5', 'corrupt_image'),
                    ('a.jsonl:8', 'missing_image'), ('a.jsonl:5', 'corrupt_image')]:
        hook.after_train_iter(runner, 0, batch(skipped))
    assert hook.bad == {'a.jsonl:3': 'missing_image', 'a.jsonl:5': 'corrupt_image', 'a.jsonl:8': 'missing_image'}
    hook.after_train_epoch(runner)
    with open(tmp_path / 'skipped_samples.json') as f:
        summary = json.load(f)
    assert summary['skipped'] == {'missing_image': ['a.jsonl:3', 'a.jsonl:8'], 'corrupt_image': ['a.jsonl:5']}
    runner.iter = 6
    with pytest.raises(TooManyBadSamplesError, match=r'4 of 10 samples are bad \(all workers and ranks, at iteration '
                                                     r"7\), over max_bad_fraction=0.3: \{'missing_image': 3, "):
        hook.after_train_iter(runner, 0, batch(('a.jsonl:9', 'missing_image')))


def test_samples_refused_at_start_up_count_too(tmp_path):
    hook, runner = BadSampleHook(), runner_for(tmp_path, total=8, limit=0.3, at_start=(1, 2))  # 2 of 10 at start
    hook.before_train(runner)
    hook.after_train_iter(runner, 0, batch(('a.jsonl:7', 'missing_image')))  # 3 of 10: at the limit
    with pytest.raises(TooManyBadSamplesError, match=r"4 of 10 samples .*'bad_json': 2"):
        hook.after_train_iter(runner, 0, batch(('a.jsonl:9', 'missing_image')))
    hook.after_train(runner)
    assert json.load(open(os.path.join(tmp_path, 'skipped_samples.json')))['at_start_up'] == {
        'a.jsonl:1': 'bad_json', 'a.jsonl:2': 'bad_json'}


def test_an_earlier_runs_list_is_removed_and_a_resumed_runs_taken_over(tmp_path):
    """A clean run in a folder where an earlier run skipped samples left that run's skipped_samples.json, which
    then passed for the clean run's (found by an adversarial sweep). A resumed run starts from the list the
    interrupted run wrote: its skips count for the whole run."""
    first, runner = BadSampleHook(), runner_for(tmp_path, total=10, limit=0.3)
    first.before_train(runner)
    first.after_train_iter(runner, 0, batch(('a.jsonl:4', 'missing_image')))
    first.after_train(runner)
    path = tmp_path / 'skipped_samples.json'
    resumed, runner._resume = BadSampleHook(), True
    resumed.before_train(runner)
    assert resumed.bad == {'a.jsonl:4': 'missing_image'}
    resumed.after_train_iter(runner, 0, batch(('a.jsonl:6', 'corrupt_image')))
    resumed.after_train(runner)
    assert json.load(open(path))['skipped'] == {'missing_image': ['a.jsonl:4'], 'corrupt_image': ['a.jsonl:6']}
    clean, runner._resume = BadSampleHook(), False
    clean.before_train(runner)
    clean.after_train(runner)
    assert not path.exists() and clean.bad == {}
    # --resume PATH into another --work-dir: the interrupted run's list is beside its checkpoint; this run's own
    # list goes into its own folder, the other left as it was
    first.after_train(runner)
    other = runner_for(tmp_path / 'other')
    other._resume, other._load_from = True, str(tmp_path / 'iter_4.pth')
    os.makedirs(other.work_dir)
    elsewhere = BadSampleHook()
    elsewhere.before_train(other)
    assert elsewhere.bad == {'a.jsonl:4': 'missing_image'}
    elsewhere.after_train_iter(other, 0, batch(('a.jsonl:8', 'corrupt_image')))
    elsewhere.after_train(other)
    assert json.load(open(tmp_path / 'other' / 'skipped_samples.json'))['skipped'] == {
        'missing_image': ['a.jsonl:4'], 'corrupt_image': ['a.jsonl:8']}
    assert json.load(open(path))['skipped'] == {'missing_image': ['a.jsonl:4']}


def test_a_file_of_that_name_that_is_no_runs_list_is_left_as_it_is(tmp_path, monkeypatch):
    """A user's skipped_samples.json in the --work-dir was removed at start-up as 'an earlier run's list' (an
    adversarial sweep); it is left as it is, said, and this run's list is not written over it."""
    import xtuner_plugins.engine.badsamples as module
    logs = []
    monkeypatch.setattr(module, 'print_log', lambda msg, **kw: logs.append(msg))
    path = tmp_path / 'skipped_samples.json'
    path.write_text('{"my": "notes"}')
    hook, runner = BadSampleHook(), runner_for(tmp_path, total=10, limit=0.3)
    hook.before_train(runner)
    hook.after_train_iter(runner, 0, batch(('a.jsonl:4', 'missing_image')))
    hook.after_train(runner)
    assert path.read_text() == '{"my": "notes"}'
    assert any(f"{path} is not a run's list of skipped samples" in line for line in logs), logs
    assert any(line.startswith('bad samples at the end of training: 1 of 10 (') and 'every FILE:LINE' not in line
               for line in logs), logs


def test_dataloader_workers_are_added_up(tmp_path):
    """8 bad images of 100 met by four DataLoader workers (each its own copy of the data set and its own
    counts): the run's summary has all 8, each once, with its FILE:LINE."""
    from tests.configs.conftest import ROOT, tiny_options
    from tests.helpers import conv, tiny_workspace, write_jsonl
    from tests.train_utils import run_train
    tiny = tiny_workspace(tmp_path / 'tiny')
    samples = [{'image': 'gone.png' if i % 12 == 5 else 'a.png', 'conversations': conv(f'q{i}', f'a{i}')}
               for i in range(100)]
    data = write_jsonl(str(tmp_path / 'data.jsonl'), samples)
    options = dict(tiny_options(tiny, data, repeat=1), **{
        'train_dataloader.num_workers': 4, 'train_dataloader.persistent_workers': True,
        'train_dataloader.dataset.max_bad_fraction': 0.1})
    out = run_train(os.path.join(ROOT, 'configs', 'pretrain_mlp.py'), str(tmp_path / 'work'), cfg_options=options,
                    script=os.path.join(ROOT, 'tools', 'train.py'))
    assert out.ok and out.returncode == 0, out.summary()
    assert "bad samples at the end of training: 8 of 100 ({'missing_image': 8})" in out.log, out.summary()
    with open(tmp_path / 'work' / 'skipped_samples.json') as f:
        summary = json.load(f)
    assert sorted(summary['skipped']['missing_image']) == sorted(f'{data}:{i + 1}' for i in range(5, 100, 12))


def test_a_manifest_of_the_data_and_resume_told_when_it_changed(tmp_path, tiny_tokenizer, capsys):
    from tests.helpers import conv, write_jsonl
    from xtuner_plugins.data import InternVLDataset
    path = write_jsonl(tmp_path / 'a.jsonl', [{'conversations': conv(f'q{i}', 'a', image=False)} for i in range(6)]
                       + ['{bad'])
    def runner(resume):
        ds = InternVLDataset(path, tokenizer=tiny_tokenizer, repeat_times=2, max_bad_fraction=0.5,
                             cache_dir=str(tmp_path / 'cache'))
        return SimpleNamespace(train_dataloader=SimpleNamespace(dataset=ds), iter=0, epoch=0,
                               work_dir=str(tmp_path / 'work'), _resume=resume)
    os.makedirs(tmp_path / 'work')
    BadSampleHook().before_train(runner(False))
    with open(tmp_path / 'work' / 'data_manifest.json') as f:
        (source,) = json.load(f)['sources']
    assert (source['samples'], source['used'], source['repeat_time']) == (6, 12, 2.0)
    assert source['refused_at_start_up'] == {'bad_json': 1} and source['size'] == os.path.getsize(path)
    BadSampleHook(on_data_change='stop').before_train(runner(True))  # unchanged: resumes
    with open(path, 'a') as f:
        f.write(json.dumps({'conversations': conv('new', 'a', image=False)}) + '\n')
    with pytest.raises(SystemExit):
        BadSampleHook().before_train(runner(True))   # the default
    assert re.search(r'^train: refused: resume: the data changed since the run being resumed started .*a.jsonl: '
                     r'size \d+ -> \d+, mtime_ns .*samples 6 -> 7, used 12 -> 14\. Resume with the data .*go on all '
                     r"the same.*\(BadSampleHook's on_data_change='warn'\)", capsys.readouterr().err)
    # --resume PATH into another --work-dir (what the refusal of a folder holding another run's checkpoints
    # advises): the resumed run's manifest is beside its checkpoint; the change went unchecked there
    other = runner(True)
    other.work_dir, other._load_from = str(tmp_path / 'elsewhere'), str(tmp_path / 'work' / 'iter_4.pth')
    os.makedirs(other.work_dir)
    with pytest.raises(SystemExit):
        BadSampleHook(on_data_change='stop').before_train(other)
    assert f'the data changed since the run being resumed started ({tmp_path}/work/data_manifest.json): ' in \
        capsys.readouterr().err
    before = (tmp_path / 'work' / 'data_manifest.json').read_text()
    # warned: its manifest is written into its own folder, never the other's
    BadSampleHook(on_data_change='warn').before_train(other)
    assert (tmp_path / 'work' / 'data_manifest.json').read_text() == before
    assert json.loads((tmp_path / 'elsewhere' / 'data_manifest.json').read_text())['sources'][0]['samples'] == 7


def test_the_manifest_is_replaced_whole_never_seen_half_written(tmp_path, monkeypatch):
    """On resume the other ranks read the manifest while rank 0 writes the new one: it is written to a temporary
    file and renamed (a rank once read it empty and crashed), so a write that fails leaves the old one whole."""
    work = tmp_path / 'work'
    os.makedirs(work)
    (work / 'data_manifest.json').write_text('{"sources": []}')
    runner = SimpleNamespace(work_dir=str(work), _resume=False)

    def crash(*args, **kwargs):
        raise KeyboardInterrupt('killed while writing')
    monkeypatch.setattr(os, 'fsync', crash)
    with pytest.raises(KeyboardInterrupt):
        BadSampleHook()._manifest(runner, {'sources': [{'samples': 6}]})
    assert json.loads((work / 'data_manifest.json').read_text()) == {'sources': []}
    assert os.listdir(work) == ['data_manifest.json']


def test_a_runs_own_manifest_cut_short_is_said_as_such_on_resume(tmp_path, monkeypatch):
    """A data_manifest.json in a run's folder that does not read (cut short: a failing disk, a copy cut) was said
    to be another program's file, and nothing said that this resume and every later one went unchecked. In a folder
    of checkpoints it is said as the run's, damaged, with what follows and what to do; it is never written over (it
    may still be a user's file, of a data folder given as the work folder)."""
    logs = []
    monkeypatch.setattr('xtuner_plugins.engine.badsamples.print_log', lambda msg, **kw: logs.append(msg))
    work = tmp_path / 'work'
    os.makedirs(work)
    (work / 'data_manifest.json').write_text('{"sources": [')
    runner = SimpleNamespace(work_dir=str(work), _resume=True, _load_from=None)
    BadSampleHook()._manifest(runner, {'sources': [{'annotation': 'a.jsonl', 'samples': 6}]})
    assert (work / 'data_manifest.json').read_text() == '{"sources": ['   # no checkpoint here: not a run's
    assert "is not a run's data manifest" in logs[-1], logs
    (work / 'iter_4.pth').write_bytes(b'x')
    BadSampleHook()._manifest(runner, {'sources': [{'annotation': 'a.jsonl', 'samples': 6}]})
    assert (work / 'data_manifest.json').read_text() == '{"sources": ['
    assert "does not read as the run's data manifest (cut short or edited since, or another program's file): left " \
           'as it is; this resume is not checked against the data the run started with, nor is a later one until ' \
           'it is moved away' in logs[-1], logs


def test_truncated_samples_are_listed_with_the_tokens_lost_not_counted_as_bad(tmp_path):
    hook, runner = BadSampleHook(), runner_for(tmp_path, total=10, limit=0.0)
    hook.before_train(runner)
    cut = ('a.jsonl:4', 19631, '20143 tokens cut to max_length=512: 19631 tokens lost, 19630 of its 19700 supervised')
    hook.after_train_iter(runner, 0, {'data': {'truncated': [cut], 'reduced': [('a.jsonl:2', 3)]}})
    hook.after_train_iter(runner, 0, {'data': {'truncated': [cut]}})  # met again: listed once
    hook.after_train(runner)  # limit 0 and no bad sample: a truncated one is not bad
    with open(tmp_path / 'skipped_samples.json') as f:
        summary = json.load(f)
    assert summary['truncated'] == {'a.jsonl:4': {'tokens_lost': 19631, 'detail': cut[2]}}
    assert summary['fewer_tiles'] == {'a.jsonl:2': 3} and summary['skipped'] == {}


def test_a_list_that_cannot_be_written_leaves_the_one_before_it(tmp_path):
    """skipped_samples.json was rewritten in place: a full disk or a file-size limit while writing it cut the
    interrupted run's good list (a helper's sweep: 413,053 bytes became 358,400 that did not read, and the resume
    counted its bad samples from nothing). Written whole or not at all; the failure is one line naming the file."""
    import subprocess
    import sys
    script = r'''
import json, resource, signal, sys
from types import SimpleNamespace
from xtuner_plugins.engine.badsamples import BadSampleHook
from xtuner_plugins.engine.checkpointing import WriteFailed
dataset = SimpleNamespace(max_bad_fraction=1.0, num_distinct=100000, load_problems=[])
runner = SimpleNamespace(train_dataloader=SimpleNamespace(dataset=dataset), iter=0, epoch=0, work_dir=sys.argv[1])
hook = BadSampleHook()
hook.before_train(runner)
for n in range(500):
    hook.after_train_iter(runner, 0, {'data': {'skipped': [(f'a.jsonl:{n}', 'empty_answer')]}})
hook.after_train_epoch(runner)
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)   # a write past the limit fails with EFBIG instead
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
for n in range(500, 1000):
    hook.after_train_iter(runner, 0, {'data': {'skipped': [(f'a.jsonl:{n}', 'empty_answer')]}})
try:
    hook.after_train_epoch(runner)
except WriteFailed as exc:
    print('WriteFailed:', exc)
'''
    done = subprocess.run([sys.executable, '-c', script, str(tmp_path)], capture_output=True, text=True,
                          timeout=120, cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    assert done.returncode == 0, done.stderr[-2000:]
    assert f'WriteFailed: could not write {tmp_path}/skipped_samples.json' in done.stdout, done.stdout
    assert 'the file of that name is unchanged' in done.stdout
    with open(tmp_path / 'skipped_samples.json') as f:
        assert len(json.load(f)['skipped']['empty_answer']) == 500
    assert [p.name for p in tmp_path.iterdir()] == ['skipped_samples.json']


def test_a_resumed_runs_list_of_skipped_samples_of_another_shape_is_a_warning(tmp_path, monkeypatch):
    """skipped_samples.json whose reasons map to no list of places ({"skipped": {"x": 5}}: a hand edit gone wrong)
    stopped a resume with "TypeError: 'int' object is not iterable" after a traceback; a file that is no JSON was
    a warning, and this is one too: the skipped samples are counted from here on."""
    from types import SimpleNamespace

    from xtuner_plugins.engine import badsamples as module
    said = []
    monkeypatch.setattr(module, 'print_log', lambda msg, logger=None, level=None: said.append(msg))
    (tmp_path / 'skipped_samples.json').write_text('{"skipped": {"x": 5}, "total_samples": 3}')
    hook = module.BadSampleHook()
    hook._earlier_summary(SimpleNamespace(work_dir=str(tmp_path), _resume=True))
    assert hook.bad == {} and len(said) == 1 and "the interrupted run's skipped samples do not read" in said[0]
