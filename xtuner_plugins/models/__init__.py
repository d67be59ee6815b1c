"""Model classes: vision encoder + pixel-shuffle MLP projector + LLM, as MMEngine models."""

from .internvl import InternVLModel
from .projector import InternVLProjector, pixel_shuffle

__all__ = ['InternVLModel', 'InternVLProjector', 'pixel_shuffle']
