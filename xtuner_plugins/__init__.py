"""XTuner/MMEngine plugins for training InternVL-style vision-language models."""

from .filemodes import home_caches as _home_caches
from .quiet import install as _install_quiet

__version__ = '0.1.0'

_install_quiet()  # before any third-party import of a tool or config: see ``xtuner_plugins.quiet``
_home_caches()  # a home that cannot be written: Triton's cache elsewhere (DeepSpeed makes it as it is imported)
