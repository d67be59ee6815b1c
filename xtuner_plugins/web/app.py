"""The web demo: a gradio app over a :class:`~xtuner_plugins.models.inference.ConvertedModel`.

``tools/web_demo.py`` builds it with :func:`build_app` and serves it on 127.0.0.1. In the page: upload one or more
images (they go with the next message, as ``/image`` does in ``tools/chat.py``), chat over several turns with the
answer streamed as it is generated, stop an answer (``Stop``: the turn leaves the chat, its question goes back in
the box), change tiling and sampling settings, clear the history. A video upload (a file
or a GIF) goes with the next message instead: its frames (``Frames`` of them, at the middles of equal spans, one
tile each, as ``tools/chat.py --video``) are shown in the chat and asked about (their PNGs written for the request
and removed after it); an animated image uploaded as an image is its first frame, and the status line says so. A
prompt longer than the LLM's context is an error on the page that names the settings to
lower. Each browser session has its own conversation (kept in a ``gr.State`` and swapped into the one model under
a lock); the images conversations keep are held within one budget for the server (``web/kept.py``).

For scripts, the app's API has one public endpoint, ``/chat``: an image file and a question in, the answer out
(streamed: ``predict`` returns it whole; a caller that goes away stops it), asked greedily in a new conversation
with the folder's tiling, so it equals ``tools/chat.py FOLDER --image IMG --prompt Q`` with the same
``--max-new-tokens``::

    from gradio_client import Client, handle_file
    Client('http://127.0.0.1:7860/').predict(handle_file('photo.jpg'), 'What is in the picture?', api_name='/chat')

gradio is a library for exactly this (components, streaming, queueing, the API and its client), so only the
wiring to the model is ours.
"""

from __future__ import annotations

import os
import tempfile
import threading
import time
from typing import Iterator, Optional, Sequence, Tuple

from xtuner_plugins.data.errors import SampleError
from xtuner_plugins.data.image_io import DEFAULT_MAX_IMAGE_PIXELS, frame_note, read_image_size
from xtuner_plugins.data.video import load_video, probe_video
from xtuner_plugins.models.inference import ConvertedModel, empty_answer_hint, frames_note
from xtuner_plugins.models.prompt import PromptTooLong
from xtuner_plugins.web.guard import CONVERSATION_TTL_S, question_problem, settings_problem
from xtuner_plugins.web.kept import DEFAULT_KEPT_BYTES, Kept, KeptImages, stored

#: gradio's cache of uploads: every hour, the files over a day old are removed (gradio kept them all, for ever)
DELETE_CACHE = (3600, 86400)
#: the page's status while an answer is generated (what its Stop button stops)
GENERATING = 'Generating...'
#: the largest upload the page and /chat take by default (gradio took any size into its cache, on /tmp's disk)
MAX_FILE_SIZE = '1gb'
#: pixels one conversation may hold, summed over its images and a video's frames, every turn decoding them all
#: again (six uploads of a 22 kB 9400 x 9400 PNG in one message held 3 GB; Pillow's own limit is per image):
#: sixteen 12-megapixel photos, or a 4K video's 8 frames
MAX_CONVERSATION_PIXELS = 192_000_000
#: pixels an uploaded video may take to decode, the frames decoded to reach those shown included: a GIF cannot seek
#: (every frame up to the last one asked for, on its full canvas), a file seeks to the keyframe before each frame
#: (a 460 kB GIF of 20,000 frames of 4000 x 4000 held the one model for 52 s, a 1 MB MP4 of one 4K keyframe and
#: 30,000 frames that change nothing 58 s); a few seconds of its time
MAX_DECODED_PIXELS = 20_000_000_000


class WebChat:
    """One model shared by every browser session; answers one question at a time (``lock``). The sessions'
    conversations keep their images in ``kept``, at most ``kept_bytes`` of them (``web/kept.py``)."""

    def __init__(self, model: ConvertedModel, max_new_tokens: int = 512, kept_bytes: int = DEFAULT_KEPT_BYTES):
        self.model, self.max_new_tokens = model, max_new_tokens
        self.lock = threading.Lock()
        self.kept = KeptImages(kept_bytes)

    @property
    def tiles_apply(self) -> bool:
        """Whether the tiling settings are ours to set (official/remote); llava/hf folders use their processor."""
        return self.model.format in ('official', 'remote')

    def _ask(self, question: str, images: Sequence[str], conversation: Optional[dict], generation: dict,
             tiling: Optional[dict] = None, streamer=None, video: Optional[list] = None):
        """Answer one turn of ``conversation`` under the lock; returns the answer and the conversation after it.
        ``ValueError`` when its images would pass :data:`MAX_CONVERSATION_PIXELS` (read from their headers), ``LetGo``
        when they were let go (``web/kept.py``)."""
        check_pixels(list(images) + list(video or ()), conversation)
        with self.lock:
            resumed = self.kept.resolve(conversation)
            saved = dict(getattr(self.model, 'tiling', {}))
            if tiling and self.tiles_apply:
                self.model.tiling.update(tiling)
            self.model.resume(resumed)
            try:
                answer = self.model.ask(question, list(images), generation, streamer=streamer,
                                        **({} if video is None else dict(video=video)))
                return answer, self._kept(self.model.conversation(), conversation,
                                          list(images if video is None else video), video is not None)
            finally:
                if self.tiles_apply:
                    self.model.tiling = saved
                self.model.reset()

    def _kept(self, conversation: dict, before: Optional[dict], sources: list, video: bool) -> dict:
        """``conversation`` with the images ``before`` held as it held them (:class:`Kept`), and this turn's images
        (or video frames) kept in ``self.kept``: each file's bytes (a path), else a PNG of its pixels, which the
        model reads back to the same pixels next turn (kept decoded, a 280 kB PNG of 9400 x 9400 held 340 MB)."""
        for key in ('images', 'videos'):
            earlier = (before or {}).get(key)
            if earlier:
                conversation[key][:len(earlier)] = earlier
        if not sources:
            return conversation
        key = 'videos' if video and self.model.format in ('hf', 'llava') else 'images'
        held = conversation[key][-1] if key == 'videos' else conversation[key][-len(sources):]
        owner = self.kept.owner(before)
        kept = [self.kept.keep(owner, data, pixels_of(data))
                for data in (stored(source, image) for source, image in zip(sources, held))]
        if key == 'videos':
            conversation[key][-1] = kept
        else:
            conversation[key][-len(sources):] = kept
        return conversation

    def answer(self, image: Optional[str], question: str) -> str:
        """The ``/chat`` endpoint's answer: a new conversation, greedy, the folder's tiling."""
        *_, answer = self.answer_stream(image, question)
        return answer

    def answer_stream(self, image: Optional[str], question: str) -> Iterator[str]:
        """:meth:`answer` as it is generated (the text so far, then the answer): the ``/chat`` endpoint streams
        it, so a caller that goes away stops it (:meth:`stream`) where a whole answer went on for no one."""
        if not question or not question.strip():
            raise ValueError('the question is empty')
        for text, _ in self.stream(question, [image] if image else [], None,
                                   dict(max_new_tokens=self.max_new_tokens, do_sample=False)):
            yield text

    def stream(self, question: str, images: Sequence[str], conversation: Optional[dict], generation: dict,
               tiling: Optional[dict] = None, video: Optional[list] = None) -> Iterator[tuple]:
        """Yield ``(text so far, None)`` while generating, then ``(answer, conversation after it)``; an error in
        generation is raised here, after the stream ends. ``video``: a video's frames, instead of images."""
        if hasattr(self.model, 'text_streamer'):   # a GGUF folder: llama.cpp's pieces, no transformers tokenizer
            streamer = given = self.model.text_streamer()   # its worker's answer is read to the end (see Stoppable)
        else:
            from transformers import TextIteratorStreamer
            streamer = TextIteratorStreamer(self.model.tokenizer, skip_prompt=True, skip_special_tokens=True)
            given = Stoppable(streamer)
        result = {}

        def run():
            try:
                result['answer'], result['conversation'] = self._ask(question, images, conversation, generation,
                                                                     tiling, given, video)
            except Exception as exc:  # raised below, in the caller's thread
                result['error'] = exc
            finally:   # generate ends it, but not a failure or a model that answered without it: no wait for ever
                streamer.end()

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        text = ''
        try:
            for piece in streamer:
                text += piece.replace('<|im_end|>', '')
                yield text, None
        except GeneratorExit:   # closed: the page's request went away (gradio closes its handler's generator)
            if isinstance(given, Stoppable):
                given.stopped.set()
            raise
        thread.join()
        if 'error' in result:
            raise result['error']
        yield result['answer'], result['conversation']


class Stopped(Exception):
    """The answer's request went away before it was generated: :class:`Stoppable` ended ``generate``."""


class Stoppable:
    """The streamer ``generate`` is given: ``streamer``'s ``put`` and ``end``, until ``stopped`` is set; then
    ``put``, which ``generate`` calls at every token, raises :class:`Stopped`. An answer whose request went away
    (a closed tab, a dropped connection) went on to its max new tokens for no one, holding the one model (five such
    requests at 4096 kept a tiny model busy 35 s). A GGUF folder's answer is not stopped: its worker would still
    send the rest, which the next question would read."""

    def __init__(self, streamer):
        self.streamer, self.stopped = streamer, threading.Event()

    def put(self, value) -> None:
        if self.stopped.is_set():
            raise Stopped('the request went away')
        self.streamer.put(value)

    def end(self) -> None:
        self.streamer.end()


def pixels_of(source) -> int:
    """An image's pixels from its header (a path or a file's bytes), before anything is decoded, whatever its size
    (one Pillow would refuse as a decompression bomb was counted as 384 megapixels, whatever it had); one that does
    not open, 0 (its loading names it)."""
    from PIL import Image
    if isinstance(source, Kept):   # an image a conversation keeps
        return source.pixels
    if isinstance(source, Image.Image):   # a video's frame, decoded already
        return source.width * source.height
    try:
        width, height = read_image_size(source, None)
    except SampleError:
        return 0
    return width * height


def check_pixels(new: Sequence, conversation: Optional[dict], budget: Optional[int] = None,
                 frames: Optional[Tuple[int, int]] = None) -> None:
    """``ValueError`` when this turn's images (``new``; or ``frames``: a video's count and pixels each) and those
    ``conversation`` holds pass ``budget`` pixels (:data:`MAX_CONVERSATION_PIXELS`), saying how many; or when one
    of ``new`` passes the loader's limit for one image, said for the page's user (the loader's words told them to
    raise ``max_image_pixels``, a setting of the server's, which the web demo has no option for)."""
    budget = MAX_CONVERSATION_PIXELS if budget is None else budget
    held = [i for i in (conversation or {}).get('images') or []]
    held += [f for v in (conversation or {}).get('videos') or [] for f in v]
    before, each = sum(pixels_of(i) for i in held), [pixels_of(i) for i in new]
    now = frames[0] * frames[1] if frames else sum(each)
    if before + now > budget:
        raise ValueError(f'too many pixels: this message brings {now / 1e6:.1f} megapixels and the conversation '
                         f'holds {before / 1e6:.1f}; the server takes {budget / 1e6:.0f} per conversation (each turn '
                         'reads them all again): send smaller images or fewer frames, or clear the history')
    for source, pixels in zip(new, each):
        if pixels > DEFAULT_MAX_IMAGE_PIXELS:
            name = os.path.basename(source) if isinstance(source, str) else 'an image'
            raise ValueError(f'{name} has {pixels:,} pixels, more than this server takes in one image '
                             f'({DEFAULT_MAX_IMAGE_PIXELS:,}): send a smaller image (scaled down)')


def video_frames(path: str, num_frames: int, folder: str):
    """``(frames, files)``: ``num_frames`` frames of the video at ``path`` (as ``tools/chat.py --video`` takes
    them) and each saved as a PNG in ``folder``, for the page to show; ``ValueError`` naming what is wrong."""
    try:
        # each frame within the conversation's budget shared out (a codec may make frames larger than the size the
        # stream declares, which check_pixels took): 32 frames of 8000 x 8000 behind a 64 x 48 header held 6 GB
        each = min(DEFAULT_MAX_IMAGE_PIXELS, MAX_CONVERSATION_PIXELS // max(1, int(num_frames)))
        frames, _ = load_video(path, int(num_frames), max_pixels=each, max_decoded_pixels=MAX_DECODED_PIXELS)
    except SampleError as err:
        raise ValueError(str(err.with_source(os.path.basename(path)))) from None
    os.makedirs(folder, exist_ok=True)
    files = []
    for i, frame in enumerate(frames):
        files.append(os.path.join(folder, f'frame_{i + 1:03d}.png'))
        frame.save(files[-1])
    return frames, files


def for_client(message: str, paths: Sequence[str]) -> str:
    """``message`` with each of the server's files in ``paths`` (uploads in gradio's cache, a video's frames in a
    request's folder) named by its file name only: the client sent the file, and the server's folders are not
    theirs to learn (gradio serves its cache by path)."""
    for path in sorted({p for p in paths if p}, key=len, reverse=True):
        for form in {path, os.path.realpath(path)}:
            message = message.replace(form, os.path.basename(form))
            # as a repr writes it (Pillow's 'cannot identify image file %r'): a name with a character repr escapes
            # (macOS screenshots' U+202F before 'AM') was not matched, and the cache's path went to the client
            message = message.replace(repr(form)[1:-1], repr(os.path.basename(form))[1:-1])
    return message


def user_message(question: str, images: Sequence[str]) -> dict:
    return {'role': 'user', 'content': [{'path': p} for p in images] + ([question] if question else [])}


def build_app(chat: WebChat, title: str = 'InternVL chat'):
    """The gradio Blocks app: chat page plus the ``/chat`` API endpoint. Launch it with :func:`launch`."""
    import gradio as gr

    model = chat.model
    tiling = getattr(model, 'tiling', {})

    def refused(message: str):
        # the client's one-line error; gradio printed each one's traceback into the server's log (about 60 lines a
        # bad request: any client could flood it)
        return gr.Error(message, print_exception=False)

    def send(question, files, history, conversation, max_num, thumbnail, do_sample, temperature, top_p,
             max_new_tokens, video_file=None, num_frames=8):
        # a video's frames are shown from a folder of this request: gradio copies what it shows into its cache
        with tempfile.TemporaryDirectory(prefix='internvl-web-') as frame_dir:
            yield from turn(question, files, history, conversation, max_num, thumbnail, do_sample, temperature,
                            top_p, max_new_tokens, video_file, num_frames, frame_dir)

    def turn(question, files, history, conversation, max_num, thumbnail, do_sample, temperature, top_p,
             max_new_tokens, video_file, num_frames, frame_dir):
        images = [f if isinstance(f, str) else f.name for f in (files or [])]
        question = (question or '').strip()
        if not question:
            raise refused('Type a question first.')
        # before the question is shown or given back (gradio keeps both in the session); any client sends these
        problem = question_problem(question) or settings_problem({
            "'Most tiles per image'": max_num, "'Temperature'": temperature, "'Top-p'": top_p,
            "'Max new tokens'": max_new_tokens, "'Frames of the video'": num_frames})
        if problem:
            raise refused(problem)
        frames, shown = None, images
        if video_file:
            if images:
                raise refused('Upload images or a video for one message, not both.')
            path = video_file if isinstance(video_file, str) else video_file.name
            try:
                size = probe_video(path).size   # before a frame is decoded
                check_pixels((), conversation, frames=(int(num_frames), size[0] * size[1]))
                frames, shown = video_frames(path, num_frames, frame_dir)
            except SampleError as err:
                raise refused(for_client(str(err.with_source(os.path.basename(path))), [path]))
            except ValueError as exc:
                raise refused(for_client(str(exc), [path]))
            except Exception as exc:  # noqa: BLE001 -- a file the decoder trips on: one line, no traceback in the log
                raise refused(for_client(f'{path}: cannot read it as a video ({type(exc).__name__})', [path]))
        history = list(history or []) + [user_message(question, shown), {'role': 'assistant', 'content': ''}]
        generation = dict(max_new_tokens=int(max_new_tokens), do_sample=bool(do_sample))
        if do_sample:
            generation.update(temperature=float(temperature), top_p=float(top_p))
        start = time.perf_counter()
        yield history, conversation, '', None, None, GENERATING
        try:
            for text, after in chat.stream(question, images, conversation, generation,
                                           dict(max_num=int(max_num), use_thumbnail=bool(thumbnail)),
                                           **({} if frames is None else dict(video=shown))):  # the frames' PNGs
                history[-1] = {'role': 'assistant', 'content': text}
                if after is None:
                    yield history, conversation, '', None, None, GENERATING
                else:
                    conversation = after
        except PromptTooLong as exc:  # named by the page's settings
            problem = for_client(exc.message(frames="'Frames of the video'", tiles="'Most tiles per image'",
                                             new="'Max new tokens'", reset="'Clear history'"), [model.folder])
        except (ValueError, SampleError) as exc:  # <image> tags that do not match the images, control tokens
            problem = for_client(str(exc), images + list(shown or ()))
        else:
            problem = None
        if problem:  # the turn taken back: the page shows what the model saw; the question and uploads to edit
            yield history[:-2], conversation, question, files or None, video_file or None, f'Not asked: {problem}'
            raise refused(problem)
        hint = empty_answer_hint(history[-1]['content'], "tick 'Sample (otherwise greedy)', or ask another question")
        # an animated image was seen as its first frame: said, with where its frames go (the page's video upload)
        notes = [for_client(n.replace('give it as a video', "upload it as the 'Video'"), [p])
                 for p, n in ((p, frame_note(p)) for p in images) if n]
        trained = frames_note(getattr(model, 'config', None), len(shown) if frames is not None else None)
        notes += [trained] if trained else []   # more frames than training drew for a video
        status = f'Answered in {time.perf_counter() - start:.1f} s. {hint}'.strip()
        yield history, conversation, '', None, None, ' '.join([status] + [f'Note: {n}.' for n in notes])

    def clear(conversation=None):
        chat.kept.release(conversation)
        return [], None, '', None, None, 'History cleared.'

    def stopped(history, status_text):
        # After a turn: one still 'Generating...' was stopped (the Stop button cancels it; gradio closes its
        # generator and Stoppable ends generate). It never reached the session's conversation, so it leaves the
        # chat too, and its question goes back in the box. A turn answered or refused is left as it is.
        if str(status_text or '') != GENERATING or len(history or []) < 2:
            return gr.skip(), gr.skip(), gr.skip()
        asked = history[-2].get('content') if isinstance(history[-2], dict) else None
        texts = [c.get('text') if isinstance(c, dict) else c for c in (asked if isinstance(asked, list) else [asked])]
        texts = [t for t in texts if isinstance(t, str)]   # gradio gives the text parts as {'type': 'text', ...}
        return (history[:-2], texts[-1] if texts else '',
                'Stopped: the answer was not kept (the model does not remember that turn); the question is back '
                'in the box (add its images or video again to ask it again).')

    # uploads are copied into gradio's cache and kept there; sessions keep their images' bytes, so older copies go
    with gr.Blocks(title=title, delete_cache=DELETE_CACHE) as app:
        shown = os.path.basename(os.path.normpath(model.folder))   # its name only: the server's folders are not said
        gr.Markdown(f'## {title}\n`{shown}` ({model.format} format). Images you upload go with your next message; '
                    'every later turn still sees them.')
        conversation = gr.State(None, time_to_live=CONVERSATION_TTL_S)
        with gr.Row():
            with gr.Column(scale=1):
                files = gr.File(label='Images', file_count='multiple', file_types=['image'], type='filepath',
                                elem_id='images')
                video = gr.File(label='Video (instead of images; its frames are shown in the chat)',
                                file_count='single', file_types=['video', '.gif'], type='filepath', elem_id='video')
                num_frames = gr.Slider(1, 32, value=8, step=1, label='Frames of the video')
                with gr.Accordion('Settings', open=False):
                    max_num = gr.Slider(1, 40, value=int(tiling.get('max_num', 12)), step=1,
                                        label='Most tiles per image', interactive=chat.tiles_apply)
                    thumbnail = gr.Checkbox(value=bool(tiling.get('use_thumbnail', True)), label='Thumbnail tile',
                                            interactive=chat.tiles_apply)
                    do_sample = gr.Checkbox(value=False, label='Sample (otherwise greedy)',   # GGUF: greedy only
                                            interactive=model.format != 'gguf')
                    temperature = gr.Slider(0.05, 2.0, value=0.7, step=0.05, label='Temperature')
                    top_p = gr.Slider(0.05, 1.0, value=0.9, step=0.05, label='Top-p')
                    max_new_tokens = gr.Slider(1, 4096, value=chat.max_new_tokens, step=1, label='Max new tokens')
            with gr.Column(scale=3):
                chatbot = gr.Chatbot(elem_id='chatbot', height=560, label='Chat', buttons=['copy', 'copy_all'])
                question = gr.Textbox(label='Question', elem_id='question', placeholder='Ask about the images')
                with gr.Row():
                    send_button = gr.Button('Send', variant='primary', elem_id='send')
                    stop_button = gr.Button('Stop', elem_id='stop')
                    clear_button = gr.Button('Clear history', elem_id='clear')
                status = gr.Markdown('', elem_id='status')
        inputs = [question, files, chatbot, conversation, max_num, thumbnail, do_sample, temperature, top_p,
                  max_new_tokens, video, num_frames]
        outputs = [chatbot, conversation, question, files, video, status]
        sent = [trigger(send, inputs, outputs, api_visibility='private', concurrency_id='model', concurrency_limit=1)
                for trigger in (send_button.click, question.submit)]
        for event in sent:   # after each turn, stopped or not (the page's updates of a stopped one are its last)
            event.then(stopped, [chatbot, status], [chatbot, question, status], api_visibility='private',
                       queue=False)
        stop_button.click(None, None, None, cancels=sent, api_visibility='private', queue=False)
        clear_button.click(clear, conversation, outputs, api_visibility='private')
        chatbot.clear(clear, conversation, outputs, api_visibility='private')  # the chat panel's own bin button
        # The scripted endpoint: components that never show, an event no button on the page fires.
        with gr.Row(visible=False):
            # The upload as a file: gr.Image would decode it and, for any mode but RGB, rotate it by its EXIF tag
            # and re-encode it as RGB (a 16-bit PNG white, a CMYK JPEG re-compressed) before our loader runs.
            api_image = gr.File(type='filepath', file_count='single', label='image')
            api_question = gr.Textbox(label='question')
            api_answer = gr.Textbox(label='answer')
            api_button = gr.Button(visible=False)
        def api_chat(image, question):  # a bad request is the caller's one-line error, not a traceback in the log
            problem = question_problem(question or '')
            if problem:
                raise refused(problem)
            try:
                yield from chat.answer_stream(image, question)   # streamed: a caller gone stops it
            except PromptTooLong as exc:
                raise refused(for_client(exc.message(tiles=None, new="tools/web_demo.py's --max-new-tokens"),
                                         [model.folder]))
            except (ValueError, SampleError) as exc:
                raise refused(for_client(str(exc), [image]))   # a path (type='filepath'), or None

        api_button.click(api_chat, [api_image, api_question], api_answer, api_name='chat',
                         concurrency_id='model', concurrency_limit=1)
    return app
