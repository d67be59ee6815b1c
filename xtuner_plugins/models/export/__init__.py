"""A trained model written as a Hugging Face folder, one module per job:

- ``build.py``: the config's model with the checkpoint's tensors; LoRA merged, a 4-bit base dequantised;
- ``layouts.py``: the tensors under each format's keys;
- ``files.py``: what every writer shares (safetensors shards, tokenizer + chat template, generation config);
- one writer per format: ``official.py`` (InternVL's remote-code layout), ``hf.py`` (transformers' InternVL),
  ``llava.py`` (transformers' LLaVA), ``remote.py`` (self-contained remote code for any encoder/projector);
- ``job.py``: the whole conversion, :func:`export_checkpoint` (``tools/convert_to_official.py``); ``outdir.py``: the
  folder it writes, checked, claimed and moved in whole;
- ``gguf.py``: llama.cpp's GGUF pair, by llama.cpp's own converter (``gguf_convert.py``) and quantiser;
  ``gguf_job.py``: an official folder converted to GGUF as it is.
"""

from .build import build_for_export, merge_adapters, tiling_settings, training_system_message
from .hf import write_hf
from .job import FORMATS, WRITERS, choose_format, export_checkpoint
from .layouts import official_state_dict
from .llava import write_llava
from .official import write_official
from .remote import write_remote

__all__ = ['build_for_export', 'merge_adapters', 'tiling_settings', 'training_system_message', 'FORMATS',
           'WRITERS', 'choose_format', 'export_checkpoint', 'official_state_dict', 'write_official', 'write_hf',
           'write_llava', 'write_remote']
