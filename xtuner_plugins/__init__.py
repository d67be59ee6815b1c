"""XTuner/MMEngine plugins for training InternVL-style vision-language models."""

__version__ = '0.1.0'
