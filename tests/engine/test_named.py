"""The keys a run's command line named, recorded in its checkpoints (``engine/named.py``) by ``LineageHook``, for a
resume to tell a setting given on the command line from one its config file gave (``engine/resumed_settings.py``)."""

from xtuner_plugins.engine import named
from xtuner_plugins.engine.hooks import LineageHook


def _saved(monkeypatch, record):
    monkeypatch.setattr(named, '_NAMED', record)
    runner = type('Runner', (), {'model': type('Model', (), {'lineage': None})()})()
    checkpoint = {'meta': {'cfg': 'x = 1'}}
    LineageHook().before_save_checkpoint(runner, checkpoint)
    return checkpoint['meta']


def test_the_lineage_hook_records_the_keys_named_where_known(monkeypatch):
    named.remember(['max_iters', 'model.llm'], ['save_every', 'model.llm'])
    assert _saved(monkeypatch, named._NAMED)[named.KEY] == ['max_iters', 'model.llm', 'save_every']
    assert named.KEY not in _saved(monkeypatch, None)   # a runner built in code: unknown, not 'none named'


def test_a_record_not_a_list_of_keys_is_none():
    assert named.recorded({named.KEY: ['a.b']}) == ['a.b'] and named.recorded({named.KEY: []}) == []
    for meta in ({}, {named.KEY: 'a.b'}, {named.KEY: [1]}, {named.KEY: None}):
        assert named.recorded(meta) is None
