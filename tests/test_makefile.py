"""``make setup``: what it leaves behind so that the tests and ranks that start next do not race."""

import glob
import os
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_setup_writes_yapfs_grammar_cache(tmp_path):
    """MMEngine imports yapf, which writes its grammar cache on first import and not atomically: two pytest workers
    importing it at once on a fresh machine read a half-written pickle (EOFError, a CI failure). ``make setup``
    writes it first."""
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path))
    proc = subprocess.run(['make', '-s', 'setup'], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    written = sorted(os.path.basename(p).split('-py')[0] for p in glob.glob(str(tmp_path / 'YAPF' / '*' / '*.pickle')))
    assert written == ['Grammar', 'PatternGrammar'], written
