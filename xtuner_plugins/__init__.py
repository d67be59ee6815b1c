"""XTuner/MMEngine plugins for training InternVL-style vision-language models."""

from .quiet import install as _install_quiet

__version__ = '0.1.0'

_install_quiet()  # before any third-party import of a tool or config: see ``xtuner_plugins.quiet``
