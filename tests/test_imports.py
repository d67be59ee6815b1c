"""Imports run downward (docs/development.md): no two modules of the package import each other, at module level
or inside a function (a function-level import hides a circle; it does not remove it)."""

from __future__ import annotations

import ast
import os
from typing import Dict, Set

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = 'xtuner_plugins'


def package_modules(root: str = ROOT, package: str = PACKAGE) -> Dict[str, str]:
    """``{dotted name: file}`` of every module of the package (a package by its ``__init__.py``)."""
    modules = {}
    for folder, _, files in os.walk(os.path.join(root, package)):
        for name in files:
            if name.endswith('.py'):
                path = os.path.join(folder, name)
                dotted = os.path.relpath(path, root)[:-3].replace(os.sep, '.')
                modules[dotted[:-len('.__init__')] if dotted.endswith('.__init__') else dotted] = path
    return modules


def imported_modules(name: str, path: str, modules: Dict[str, str]) -> Set[str]:
    """The package's modules that ``name`` imports anywhere in its file (``from a import b``: ``a.b`` when it is
    a module, else ``a``)."""
    with open(path, encoding='utf-8') as f:
        tree = ast.parse(f.read(), path)
    here = name.split('.') if path.endswith('__init__.py') else name.split('.')[:-1]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name in modules)
        elif isinstance(node, ast.ImportFrom):
            base = '.'.join(here[:len(here) - node.level + 1] + [node.module or ''] if node.level else
                            [node.module or '']).strip('.')
            for alias in node.names:
                if f'{base}.{alias.name}' in modules:
                    found.add(f'{base}.{alias.name}')
                elif base in modules:
                    found.add(base)
    found.discard(name)
    return found


def two_module_circles(root: str = ROOT, package: str = PACKAGE):
    modules = package_modules(root, package)
    graph = {name: imported_modules(name, path, modules) for name, path in modules.items()}
    return sorted({tuple(sorted((a, b))) for a, targets in graph.items() for b in targets if a in graph.get(b, ())})


def test_no_two_modules_import_each_other():
    circles = two_module_circles()
    assert not circles, 'modules that import each other (give each job one place): ' + '; '.join(
        f'{a} <-> {b}' for a, b in circles)


def test_the_finder_sees_relative_function_level_and_guarded_imports(tmp_path):
    pkg = tmp_path / 'pkg'
    (pkg / 'sub').mkdir(parents=True)
    (pkg / '__init__.py').write_text('')
    (pkg / 'sub' / '__init__.py').write_text('from .b import f\n')
    (pkg / 'a.py').write_text('def g():\n    from pkg.sub.b import f\n')
    (pkg / 'sub' / 'b.py').write_text('from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .. import a\n'
                                      'def f():\n    pass\n')
    (pkg / 'sub' / 'c.py').write_text('from . import b\nfrom pkg.sub import f\n')
    assert two_module_circles(str(tmp_path), 'pkg') == [('pkg.a', 'pkg.sub.b')]


def test_chat_eval_and_the_web_demo_import_no_engine():
    """The inference tools do not import the engine package: its import applies the CPU patches and logs them in
    an INFO line, which chat printed before its answer (tests/test_readme.py saw it)."""
    import subprocess
    import sys
    code = ('import sys, xtuner_plugins.cli.chat, xtuner_plugins.cli.eval, xtuner_plugins.cli.web_demo, '
            'xtuner_plugins.models.runconfig; print(sorted(m for m in sys.modules if ".engine" in m))')
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, cwd=ROOT, check=True).stdout
    assert out.strip() == '[]', out
