"""A GGUF folder (``tools/convert_to_official.py ... --format gguf``) answering through llama.cpp, for
``tools/chat.py`` and ``tools/eval.py``::

    model = GGUFModel('work_dirs/my_gguf')          # NAME-<QUANT>.gguf + mmproj-NAME-<TYPE>.gguf
    print(model.ask('What is in the picture?', ['photo.jpg'], dict(max_new_tokens=64)))

The model runs in ``.venv-gguf`` (``make gguf``), in a worker process (``gguf_worker.py``) this class talks to one
JSON line at a time; this venv's torch and transformers are not involved. The prompt is the GGUF's own chat template
(the one the model was trained with) rendered by llama-cpp-python's ``MTMDChatHandler``, each image where its
``<image>`` tag stands (``<img>``, its tiles' features, ``</img>``, as InternVL's ``chat`` writes it); decoding is
greedy; the tiles are llama.cpp's (docs/conversion.md, "GGUF": they differ from InternVL's for most images).
Images are read by the package's one pixel rule (``load_image``) and handed over as PNG, losslessly. A video's
frames (``ask(..., video=frames)``) are each stretched to one tile first, as InternVL's video path makes them, and
written after the frame prefix the mmproj records (``Frame{i}: <image>`` lines in place of ``<video>``).
"""

from __future__ import annotations

import base64
import glob
import io
import json
import os
import queue
import subprocess
import tempfile
from typing import Optional, Sequence, Tuple

from xtuner_plugins.data.image_io import load_image


#: the bytes of each scalar value type of a GGUF key (GGUF's own numbering: 8 is a string, 9 an array)
SCALARS = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


def gguf_keys(path: str, wanted=('general.architecture', 'general.file_type')) -> Optional[dict]:
    """The ``wanted`` keys of a GGUF file's header that hold a string or a whole number (``general.architecture``:
    ``clip`` for an mmproj; ``general.file_type``: 0 for all-F32); None for a file that is not GGUF (another format,
    or cut short in its header)."""
    import struct

    def skip(f, kind):
        if kind in SCALARS:
            f.seek(SCALARS[kind], 1)
        elif kind == 8:
            f.seek(struct.unpack('<Q', f.read(8))[0], 1)
        elif kind == 9:
            item, count = struct.unpack('<IQ', f.read(12))
            if item in SCALARS:
                f.seek(SCALARS[item] * count, 1)
            else:
                for _ in range(count):
                    skip(f, item)
        else:
            raise ValueError(kind)

    found = {}
    try:
        with open(path, 'rb') as f:
            magic, version = f.read(4), struct.unpack('<I', f.read(4))[0]
            if magic != b'GGUF' or version < 2:
                return None
            _, keys = struct.unpack('<QQ', f.read(16))
            for _ in range(min(keys, 64)):  # the converter writes the general.* keys first
                key = f.read(struct.unpack('<Q', f.read(8))[0]).decode('utf-8')
                kind = struct.unpack('<I', f.read(4))[0]
                if key in wanted and kind == 8:
                    found[key] = f.read(struct.unpack('<Q', f.read(8))[0]).decode('utf-8')
                elif key in wanted and kind in (4, 5):
                    found[key] = struct.unpack('<I' if kind == 4 else '<i', f.read(4))[0]
                else:
                    skip(f, kind)
                if len(found) == len(wanted):
                    break
    except (OSError, struct.error, UnicodeDecodeError, ValueError):
        return None
    return found if 'general.architecture' in found else None


def gguf_pair(folder: str) -> Optional[Tuple[str, str]]:
    """``(model, mmproj)`` of a GGUF folder, told apart by their headers (an mmproj's architecture is ``clip``;
    its name may be anything: ``OUT_DIR`` named ``mmproj-...`` names both files so); None for a folder with no
    ``.gguf`` file; ``ValueError`` for one whose ``.gguf`` files are not one model and one mmproj."""
    if not os.path.isdir(folder):
        return None
    files = sorted(f for f in glob.glob(os.path.join(folder, '*.gguf')) if os.path.isfile(f))
    if not files:
        return None
    kinds = {f: (gguf_keys(f) or {}).get('general.architecture') for f in files}
    unread = [os.path.basename(f) for f, kind in kinds.items() if kind is None]
    if unread:
        raise ValueError(f'{folder}: {", ".join(unread)} {"is" if len(unread) == 1 else "are"} not a GGUF file '
                         f'(another format, or cut short: no general.architecture in its header); convert again '
                         f'with tools/convert_to_official.py --format gguf')
    mmproj = [f for f in files if kinds[f] == 'clip']
    text = [f for f in files if f not in mmproj]
    if len(mmproj) != 1 or len(text) != 1:
        raise ValueError(f'{folder}: a GGUF folder holds one model .gguf and one mmproj (a clip .gguf); found '
                         f'{len(text)} and {len(mmproj)} ({", ".join(os.path.basename(f) for f in files)}); '
                         f'convert again with tools/convert_to_official.py --format gguf')
    return text[0], mmproj[0]


#: the mmproj's keys read for videos (``clip.vision.*``: llama.cpp's; the frame prefix: ``gguf_convert.py``'s)
VISION_KEYS = ('general.architecture', 'clip.vision.image_size', 'clip.vision.patch_size',
               'clip.vision.projector.scale_factor', 'xtuner_plugins.frame_prefix')


def data_url(image) -> str:
    buffer = io.BytesIO()
    load_image(image).save(buffer, format='PNG')
    return 'data:image/png;base64,' + base64.b64encode(buffer.getvalue()).decode('ascii')


def user_content(question: str, images: int, first: int = 0) -> list:
    """The turn's parts: text, and each of its ``images`` where its ``<image>`` tag stands (``<image>\\n`` in front
    of the question when it has none, as InternVL's ``chat`` adds it), as ``{'type': 'image', 'index': k}``: the
    conversation's image ``k`` (``first`` the turn's first), made a data URL for each request
    (:meth:`GGUFModel.request_messages`)."""
    if images and '<image>' not in question:
        question = '<image>\n' * images + question
    if question.count('<image>') != images:
        raise ValueError(f'the prompt has {question.count("<image>")} <image> tags for {images} images')
    parts = []
    for i, text in enumerate(question.split('<image>')):
        if i:
            parts.append({'type': 'image', 'index': first + i - 1})
        if text:
            parts.append({'type': 'text', 'text': text})
    return parts


class TextStreamer:
    """What ``tools/chat.py`` iterates to print an answer as it comes (``put`` a piece, ``end``)."""

    def __init__(self):
        self.pieces = queue.Queue()

    def put(self, piece: str) -> None:
        self.pieces.put(piece)

    def end(self) -> None:
        self.pieces.put(None)

    def __iter__(self):
        while True:
            piece = self.pieces.get()
            if piece is None:
                return
            yield piece


class GGUFModel:
    """A GGUF folder ready to answer (:meth:`ask`, :meth:`reset`, :meth:`conversation`, :meth:`resume`, as
    ``ConvertedModel``'s)."""

    format = 'gguf'

    def __init__(self, folder: str, **tiling):
        from .export.gguf import WORKER, tools
        flags = {'max_num': '--max-num', 'min_num': '--min-num', 'image_size': '--image-size',
                 'use_thumbnail': '--no-thumbnail'}
        given = sorted(flags.get(k, k) for k, v in tiling.items() if v is not None)
        if given:
            raise ValueError(f'{folder} is a GGUF folder: llama.cpp tiles the images as its mmproj says, and the '
                             f'tiling options ({", ".join(given)}) are for official and remote folders')
        self.folder, (self.model_file, self.mmproj_file) = folder, gguf_pair(folder)
        python, _ = tools()
        self.log = tempfile.TemporaryFile(mode='w+', encoding='utf-8', errors='replace')  # llama.cpp's own lines
        # an F32 export (general.file_type 0, whatever the file's name) keeps its KV cache in F32 too
        exact = ['f32'] if (gguf_keys(self.model_file) or {}).get('general.file_type') == 0 else []
        self.worker = subprocess.Popen([python, WORKER, 'serve', self.model_file, self.mmproj_file, *exact],
                                       stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True,
                                       encoding='utf-8', bufsize=1)
        self.ready = self._read()
        if 'ready' not in self.ready:
            problem = self._problem()
            self.close()
            raise ValueError(f'{folder}: llama.cpp did not load it: {problem}')
        self.context = self.ready['ready']['n_ctx']
        self.vision = gguf_keys(self.mmproj_file, VISION_KEYS) or {}   # a video's frame size and prefix
        self.control = tuple(self.ready['ready']['control'])  # what llama.cpp reads as a control token in a prompt
        self.reset()

    def _read(self) -> dict:
        line = self.worker.stdout.readline()
        return json.loads(line) if line.strip() else {}

    def _problem(self) -> str:
        """What the worker said last: llama.cpp's error lines and the exception, without a traceback's frames (a
        cut model file read as 'File ".../_internals.py", line 62, in __init__; raise ValueError(...); ...')."""
        self.worker.poll()
        self.log.seek(0)
        lines = [line.strip() for line in self.log.read().splitlines() if line.strip()]
        if 'Traceback (most recent call last):' in lines:
            start = lines.index('Traceback (most recent call last):')
            errors = [line for line in lines[:start] if 'error' in line.lower()][-2:]
            return '; '.join(errors + lines[-1:])
        return '; '.join(lines[-3:]) or f'the worker exited with {self.worker.returncode}'

    def reset(self) -> None:
        self.messages, self.images, self.frames, self.last_tokens = [], [], [], []
        self._urls = {}   # image index -> its data URL, made once per conversation held here

    def conversation(self) -> dict:
        """The multi-turn state (messages, images so far, which of them are video frames), for a caller that keeps
        several conversations on one model (the web demo); see :meth:`resume`. The messages name images by their
        index, so the images may be replaced by anything ``load_image`` reads to the same pixels (a file's bytes)."""
        return dict(messages=[dict(m) for m in self.messages], images=list(self.images), frames=list(self.frames))

    def resume(self, conversation: Optional[dict]) -> None:
        """Continue a conversation saved by :meth:`conversation` (``None``: a new one)."""
        self.reset()
        if conversation:
            self.messages = [dict(m) for m in conversation['messages']]
            self.images = list(conversation['images'])
            self.frames = list(conversation.get('frames') or [False] * len(self.images))

    def image_url(self, index: int) -> str:
        """The conversation's image ``index`` as llama.cpp gets it: a PNG data URL; a video's frame stretched to one
        tile first (:meth:`frames_of`)."""
        if index not in self._urls:
            image = self.images[index]
            self._urls[index] = data_url(self.frames_of([image])[0] if self.frames[index] else image)
        return self._urls[index]

    def request_messages(self, messages: Sequence[dict]) -> list:
        """``messages`` with each image part made the ``image_url`` part llama-cpp-python's handler reads."""
        return [dict(m, content=[{'type': 'image_url', 'image_url': {'url': self.image_url(p['index'])}}
                                 if p.get('type') == 'image' else p for p in m['content']])
                if isinstance(m['content'], list) else m for m in messages]

    def frame_prefix(self) -> str:
        """The text before each frame's ``<image>`` the model was trained with, as its mmproj records it; a
        :class:`~xtuner_plugins.models.prompt.NoVideo` for an mmproj that records none usable (one written before
        videos were answered here, or by another converter)."""
        from .export.gguf_convert import FRAME_PREFIX_KEY
        from .prompt import NoVideo
        prefix = self.vision.get(FRAME_PREFIX_KEY)
        usable = isinstance(prefix, str) and '{i}' in prefix
        try:   # {i} its one field, as training checks it (a GGUF from elsewhere may hold anything)
            usable = usable and isinstance(prefix.format(i=1), str)
        except (KeyError, IndexError, ValueError, AttributeError):
            usable = False
        if not usable or not self.vision.get('clip.vision.image_size'):
            raise NoVideo(f'{os.path.basename(self.mmproj_file)} records no video frame prefix ({FRAME_PREFIX_KEY}'
                          f'{": " + repr(prefix)[:80] if prefix is not None else ""}) or tile size: convert the '
                          f'official folder to GGUF again with this project\'s tools/convert_to_official.py, or ask '
                          f'the official folder about videos')
        return prefix

    def frame_tokens(self) -> int:
        """The fewest tokens a frame takes (one tile's vision tokens, ``<img>`` and ``</img>``), from the mmproj's
        tile, patch and pixel-shuffle sizes."""
        v = self.vision
        side = v['clip.vision.image_size'] // max(1, v.get('clip.vision.patch_size') or 1)
        return (side // max(1, v.get('clip.vision.projector.scale_factor') or 1)) ** 2 + 2

    def check_video(self, num_frames: int) -> None:
        """``ConvertedModel.check_video``'s: before a frame is decoded, a ``NoVideo`` for an mmproj without the
        frame prefix, a :class:`~xtuner_plugins.models.prompt.PromptTooLong` for more frames than the context
        holds."""
        self.frame_prefix()
        least = num_frames * self.frame_tokens()
        if least > self.context:
            from .prompt import PromptTooLong
            raise PromptTooLong(least, 0, self.context, self.source(), turns=len(self.messages) // 2, least=True,
                                tiles=None, media=['video'])

    def source(self) -> str:
        """Where the context's size comes from, for :class:`~xtuner_plugins.models.prompt.PromptTooLong`."""
        return f'{self.model_file} (its context as llama.cpp loads it)'

    def frames_of(self, video: Sequence) -> list:
        """A video's frames as InternVL's video path reads them, one tile each: each stretched to the mmproj's tile
        size (``dynamic_preprocess`` with one tile), which llama.cpp then takes as it is (one tile, no thumbnail)."""
        from xtuner_plugins.data.tiling import dynamic_preprocess
        size = int(self.vision['clip.vision.image_size'])
        return [dynamic_preprocess(load_image(f), 1, 1, size)[0] for f in video]

    def video_question(self, question: str, num_frames: int) -> str:
        """``question`` (checked by ``media_question``: ``<video>`` in it) with ``<video>`` written as a ``<image>``
        line per frame."""
        from xtuner_plugins.data.video import VIDEO_PLACEHOLDER, video_prompt
        return question.replace(VIDEO_PLACEHOLDER, video_prompt(num_frames, self.frame_prefix()))

    def ask(self, question: str, images: Sequence = (), generation: Optional[dict] = None, streamer=None,
            video=None) -> str:
        """One greedy turn (the conversation's earlier turns and images are part of the prompt);
        ``streamer`` (:meth:`text_streamer`) gets the answer's pieces as they come."""
        generation = dict(generation or {})
        known = len(self.images)
        try:
            from .prompt import check_question, media_question
            if video is not None:
                self.check_video(len(video))
            asked = media_question(question, len(images), None if video is None else len(video))
            if generation.get('do_sample'):
                raise ValueError(f'{self.folder}: a GGUF folder answers greedily only (leave --do-sample out)')
            check_question(question, extra=self.control)  # the templates' markers, image tokens, the vocabulary's
            new = list(images) if video is None else list(video)
            if video is not None:
                asked = self.video_question(asked, len(video))
            messages = self.messages + [{'role': 'user', 'content': user_content(asked, len(new), known)}]
            self.images, self.frames = self.images + new, self.frames + [video is not None] * len(new)
            request = {'messages': self.request_messages(messages),
                       'max_tokens': int(generation.get('max_new_tokens') or 512)}
            try:
                self.worker.stdin.write(json.dumps(request) + '\n')
                self.worker.stdin.flush()
            except (BrokenPipeError, OSError):
                raise ValueError(f'{self.folder}: llama.cpp\'s worker stopped: {self._problem()}') from None
            while True:
                reply = self._read()
                if 'piece' in reply:
                    if streamer is not None:
                        streamer.put(reply['piece'])
                elif 'answer' in reply:
                    answer, self.last_tokens = reply['answer'].strip(), reply['tokens']
                    break
                elif 'too_long' in reply:
                    from .prompt import PromptTooLong
                    raise PromptTooLong(reply['too_long'][0], request['max_tokens'], reply['too_long'][1],
                                        self.source(),
                                        turns=len(self.messages) // 2, tiles=None,   # llama.cpp's mmproj tiles
                                        media=['video' if video is not None else 'image'])
                elif 'error' in reply:
                    raise ValueError(f'{self.folder}: llama.cpp: {reply["error"]}')
                else:
                    raise ValueError(f'{self.folder}: llama.cpp\'s worker stopped: {self._problem()}')
        except BaseException:   # the turn not asked: its images are not the conversation's
            del self.images[known:], self.frames[known:]
            for index in [k for k in self._urls if k >= known]:
                del self._urls[index]
            raise
        finally:
            if streamer is not None:
                streamer.end()
        from .prompt import history_text   # its control text given back as text, not as tags or tokens
        self.messages = messages + [{'role': 'assistant', 'content': history_text(answer, extra=self.control)}]
        return answer

    @staticmethod
    def text_streamer() -> TextStreamer:
        return TextStreamer()

    def option_logprobs(self, question, images, texts):
        raise ValueError(f'{self.folder}: --mc likelihood reads the model\'s log-likelihoods, which this GGUF path '
                         f'does not; leave --mc at its default (the answer is generated)')

    def close(self) -> None:
        if self.worker.poll() is None:
            self.worker.stdin.close()
            try:
                self.worker.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.worker.kill()
                self.worker.wait()
        self.log.close()
