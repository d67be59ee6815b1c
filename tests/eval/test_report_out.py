"""tools/eval.py's --out: an existing file that is not an earlier report of eval is refused before anything is asked
(notes.json was replaced by the report, exit 0); an earlier report is replaced, whole or not at all (the report is
written beside it and moved over it: an interrupted write left half a JSON file)."""

import json
import os

import pytest

from tests.tools.test_eval import ColourModel, write_questions
from tools.eval import main as eval_main
from xtuner_plugins.cli.eval import REPORT_START
from xtuner_plugins.eval.evaluate import Report


@pytest.fixture
def colour_model(monkeypatch):
    import xtuner_plugins.cli.eval as cli
    monkeypatch.setattr(cli, 'run_tool', lambda args, prog, use, errors=(): use(ColourModel()) or 0)


@pytest.mark.parametrize('content', ['{"my": "notes"}\n', 'plain text\n', '[1, 2]', '{"settings": 1}'])
def test_another_file_at_out_is_refused_and_kept(tmp_path, capsys, colour_model, content):
    data = write_questions(tmp_path, 2)
    out = tmp_path / 'notes.json'
    out.write_text(content)
    assert eval_main(['model', '--data', data, '--out', str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f'eval: error: --out {out} exists and is not a report of tools/eval.py (it starts '
                   f'{content[:len(REPORT_START)]!r}): eval would write over it; give another path, or remove the file']
    assert out.read_text() == content and not os.path.exists(tmp_path / 'notes.answers.jsonl')


def test_an_earlier_report_is_replaced(tmp_path, capsys, colour_model):
    data = write_questions(tmp_path, 2)
    out = tmp_path / 'report.json'
    for _ in range(2):
        assert eval_main(['model', '--data', data, '--out', str(out), '--no-blind']) == 0, capsys.readouterr()
        assert json.load(open(out))['summary']['n'] == 2
    empty = tmp_path / 'empty.json'
    empty.write_text('')  # made by `touch` to reserve the name
    assert eval_main(['model', '--data', data, '--out', str(empty), '--no-blind']) == 0
    assert json.load(open(empty))['summary']['n'] == 2


def test_a_failed_write_leaves_the_earlier_report(tmp_path, monkeypatch):
    out = tmp_path / 'report.json'
    Report([], []).write(str(out), data='first')
    before = out.read_bytes()

    def interrupted(obj, f, **kwargs):
        f.write('{\n "settings": {"data": "sec')
        raise KeyboardInterrupt

    monkeypatch.setattr(json, 'dump', interrupted)
    with pytest.raises(KeyboardInterrupt):
        Report([], []).write(str(out), data='second')
    assert out.read_bytes() == before and os.listdir(tmp_path) == ['report.json']
