"""Package exports imported on first use (PEP 562), so that importing one light module of a package does not
import its heavy siblings (MMEngine's training stack for the model classes and the evaluation hook).

In a package's ``__init__.py``::

    __getattr__, __dir__ = lazy_exports(__name__, {'VisionLanguageModel': '.internvl'})
"""

from __future__ import annotations

import importlib
import sys
from typing import Callable, Dict, List, Tuple


def lazy_exports(package: str, exports: Dict[str, str]) -> Tuple[Callable[[str], object], Callable[[], List[str]]]:
    """``(__getattr__, __dir__)`` for ``package``: ``exports`` maps a name to the module (relative to the
    package) that defines it; a name is imported when first read and kept in the package."""

    def __getattr__(name: str):
        if name not in exports:
            raise AttributeError(f'module {package!r} has no attribute {name!r}')
        value = getattr(importlib.import_module(exports[name], package), name)
        setattr(sys.modules[package], name, value)
        return value

    def __dir__() -> List[str]:
        return sorted(set(vars(sys.modules[package])) | set(exports))

    return __getattr__, __dir__
