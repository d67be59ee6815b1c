"""Model classes: vision encoder + pixel-shuffle MLP projector + LLM, as MMEngine models.

They are imported on first use: the inference side (``models.inference``: the chat, eval and web demo tools on
a converted folder) starts without MMEngine's training stack.
"""

from xtuner_plugins.lazy import lazy_exports

_EXPORTS = {
    'VisionLanguageModel': '.internvl',
    'InternVLModel': '.internvl',  # VisionLanguageModel's old name, for configs written before it
    'InternVLProjector': '.projector',
    'pixel_shuffle': '.projector',
}
__all__ = list(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
