"""What the web demo keeps of its conversations' images between turns, within one budget for the whole server.

Every turn of a conversation reads all its images again, so a conversation keeps them, each as its file's bytes
(:func:`stored`). They were kept in the session's state, which gradio holds for a day, for up to 1,000 sessions that
any client can make up: a 108 MB noise PNG asked about in three new sessions took 140 MB more each, and a session's
192 megapixels allow about 0.5 GB. Now a conversation holds a :class:`Kept` handle for each image and one
:class:`KeptImages` for the server holds the bytes, at most ``budget`` of them: past it, the images of the
conversations that asked least recently are let go (whole conversations; never the one asking now, which may pass
the budget on its own while it is the newest). A question in a conversation whose images were let go is refused
with :class:`LetGo`, which says to upload them again.

In memory rather than in files under a bounded folder: the bytes are read back at every turn anyway, nothing is left
behind by a server that is killed, and the budget is counted in one place, under one lock.
"""

from __future__ import annotations

import dataclasses
import io
import itertools
import os
import threading
from collections import OrderedDict
from typing import Dict, Optional

#: bytes of images the server keeps for its conversations' later turns, all sessions together (--max-image-memory)
DEFAULT_KEPT_BYTES = 2 << 30


@dataclasses.dataclass(frozen=True)
class Kept:
    """One image of a conversation, held by a :class:`KeptImages`: its ``owner`` (the conversation), its number
    there, its bytes' size and its pixels (the conversation's pixel budget is counted without the bytes)."""
    owner: str
    number: int
    size: int
    pixels: int


class LetGo(ValueError):
    """A conversation's images were let go to keep the server within its budget."""


def size_text(size: int) -> str:
    return f'{size / (1 << 30):.1f} GiB' if size >= 1 << 30 else f'{size / (1 << 20):.1f} MiB'


class KeptImages:
    """The server's store of its conversations' images: ``{owner: {number: bytes}}``, the owner that asked last
    at the end; at most ``budget`` bytes but for the owner keeping now."""

    def __init__(self, budget: int = DEFAULT_KEPT_BYTES):
        self.budget, self.total = int(budget), 0
        self.lock = threading.Lock()
        self._owners: 'OrderedDict[str, Dict[int, bytes]]' = OrderedDict()
        self._numbers = itertools.count()

    def owner(self, conversation: Optional[dict]) -> str:
        """The owner of ``conversation``'s kept images, or a new one."""
        for item in _items(conversation):
            if isinstance(item, Kept):
                return item.owner
        return f'conversation-{next(self._numbers)}'

    def keep(self, owner: str, data: bytes, pixels: int) -> Kept:
        """Hold ``data`` for ``owner``; the least recently asking other owners' images go while over budget."""
        with self.lock:
            number = next(self._numbers)
            self._owners.setdefault(owner, {})[number] = data
            self._owners.move_to_end(owner)
            self.total += len(data)
            while self.total > self.budget and next(iter(self._owners)) != owner:
                self._drop(next(iter(self._owners)))
        return Kept(owner, number, len(data), pixels)

    def resolve(self, conversation: Optional[dict]) -> Optional[dict]:
        """``conversation`` with each :class:`Kept` as its bytes, its owner now the one that asked last;
        :class:`LetGo` when they were let go."""
        if not conversation:
            return conversation
        with self.lock:
            def data(item):
                if not isinstance(item, Kept):
                    return item
                owned = self._owners.get(item.owner, {})
                if item.number not in owned:
                    raise LetGo("this conversation's images were let go to make room for newer conversations' "
                                f'(the server keeps at most {size_text(self.budget)} of images); press '
                                "'Clear history' and upload them again to ask about them")
                self._owners.move_to_end(item.owner)
                return owned[item.number]

            resolved = dict(conversation)
            resolved['images'] = [data(i) for i in conversation.get('images') or []]
            if conversation.get('videos'):
                resolved['videos'] = [[data(f) for f in video] for video in conversation['videos']]
            return resolved

    def release(self, conversation: Optional[dict]) -> None:
        """Let ``conversation``'s images go (its history was cleared)."""
        owners = {item.owner for item in _items(conversation) if isinstance(item, Kept)}
        with self.lock:
            for owner in owners:
                self._drop(owner)

    def _drop(self, owner: str) -> None:
        self.total -= sum(map(len, self._owners.pop(owner, {}).values()))


def _items(conversation: Optional[dict]) -> list:
    """A conversation's images and its videos' frames."""
    conversation = conversation or {}
    return list(conversation.get('images') or []) + [f for v in conversation.get('videos') or [] for f in v]


def stored(source, image) -> bytes:
    """What a session keeps of an image it asked about: the bytes of its file (``source`` a path), or of a PNG of
    ``image``'s pixels (lossless); ``load_image`` reads either back to ``image``'s pixels. A file of more bytes than
    its pixels need (:func:`padded`: 300 MB after a 32 x 32 PNG's end, named twice a message, held 600 MB more each
    turn) is kept as the PNG."""
    if isinstance(source, (str, os.PathLike)) and not padded(os.path.getsize(source), image):
        with open(source, 'rb') as f:
            return f.read()
    if isinstance(source, (bytes, bytearray)) and not padded(len(source), image):
        return bytes(source)
    buffer = io.BytesIO()
    image.save(buffer, format='PNG', compress_level=1)
    return buffer.getvalue()


def padded(size: int, image) -> bool:
    """Whether a file of ``size`` bytes holds more than ``image``'s pixels could need (4 bytes a pixel, 1 MiB
    more for its headers and metadata)."""
    return hasattr(image, 'width') and size > 4 * image.width * image.height + (1 << 20)
