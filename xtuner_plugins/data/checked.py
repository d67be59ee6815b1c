"""What a data set makes of one record once it is checked (:class:`CheckedSample`), and its tokenizer built from
what a config gives (:func:`build_tokenizer`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

from .conversation import Conversation
from .errors import load_tokenizer_named

__all__ = ['CheckedSample', 'build_tokenizer']


@dataclass
class CheckedSample:
    """A record parsed and validated once (:meth:`InternVLDataset.check_record`)."""

    sample: dict                       # the parsed record
    image_paths: List[str]             # its images, resolved against the source's folders
    conversations: List[Conversation]  # what it is trained on, parsed for those images (a video's: ``<video>``)
    video: Optional[str] = None        # its video (file or frame folder), resolved like images
    clip: Optional[tuple] = None       # its clip, (start_s, end_s)
    links_within: Optional[str] = None  # the folder a frame folder's frames may not link out of (None: unchecked)
    image_names: Optional[List[str]] = None  # where images given as bytes come from, for messages (a shard's members)


def build_tokenizer(tokenizer, key: str = 'train_dataloader.dataset.tokenizer'):
    """Accept a tokenizer object, a tokenizer folder (loaded without its own code, which is refused naming ``key``;
    transformers otherwise asked on stdin, and a "y" ran the folder's Python), or an XTuner/MMEngine config dict
    for one."""
    if tokenizer is None or hasattr(tokenizer, 'convert_tokens_to_ids'):
        return tokenizer
    if isinstance(tokenizer, str):
        return load_tokenizer_named(tokenizer, key)
    from xtuner.registry import BUILDER
    return BUILDER.build(tokenizer)
