"""Model classes: vision encoder + pixel-shuffle MLP projector + LLM, as MMEngine models."""

from .internvl import InternVLModel  # VisionLanguageModel's old name, for configs written before it
from .internvl import VisionLanguageModel
from .projector import InternVLProjector, pixel_shuffle

__all__ = ['VisionLanguageModel', 'InternVLModel', 'InternVLProjector', 'pixel_shuffle']
