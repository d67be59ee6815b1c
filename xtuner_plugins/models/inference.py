"""Answering questions with a converted folder of any format, loaded the way that format is meant to be loaded.

``tools/chat.py`` and the demo use :class:`ConvertedModel`::

    model = ConvertedModel('work_dirs/my_model')            # official, remote, llava or hf: read from config.json
    print(model.ask('What is in the picture?', ['photo.jpg'], dict(max_new_tokens=64)))

* ``official`` / ``remote``: ``AutoModel.from_pretrained(..., trust_remote_code=True)`` and its ``chat``; the
  tiles are made as the folder's ``config.json`` says (tile size, tiling, image mode, mean/std), as InternVL's
  ``load_image`` makes them for ``official``;
* ``llava`` / ``hf``: transformers' ``LlavaForConditionalGeneration`` / ``InternVLForConditionalGeneration`` with
  the folder's processor: ``apply_chat_template`` on list-of-parts messages, then ``generate``.

Every way builds the prompt the training pipeline builds for the same question (tested); multi-turn history
is kept until :meth:`ConvertedModel.reset`. A video (its frames, ``ask(..., video=frames)``) is asked about as
training sees it: one tile per frame and a ``Frame{i}: <image>`` line each in place of ``<video>`` (prepended when
the question has none): ``chat`` with ``num_patches_list`` of ones, as OpenGVLab's model card does, or the ``hf``
processor's video input; a ``llava`` folder refuses it.

Before anything runs, the folder's files are checked (``folder.py``) and a prompt that with ``max_new_tokens`` does
not fit the LLM's context is refused (``prompt.py``'s ``PromptTooLong``, a ``ValueError``); generation stops once
the answer's last 32 tokens are all whitespace (an untrained model's endless newlines, ``prompt.py``).
"""

from __future__ import annotations

import json
import os
from typing import List, Optional, Sequence, Tuple

import torch
from PIL import Image

from xtuner_plugins.data.image_io import ImageSource, load_image
from xtuner_plugins.data.template import DEFAULT_FRAME_PREFIX
from xtuner_plugins.data.tile_grid import num_tiles
from xtuner_plugins.data.tiling import IMAGENET_MEAN, IMAGENET_STD, image_tiles, normalize_tiles
from xtuner_plugins.data.video import VIDEO_PLACEHOLDER, video_prompt

from .folder import (AGAIN, MODEL_ERRORS, TOKENIZER_ERRORS, check_code, check_folder, config_whole,  # noqa: F401
                     check_processor_files, folder_format, from_folder, recorded_tile_size, tokenizer_fits,
                     weights_fit)
from .prompt import (NoVideo, QuestionTooLong, blank_run_stop, check_context, check_question, context_length,
                     encode_prompt, history_text, media_question, official_query, split_images)

ImageLike = ImageSource  # a path, a file's bytes, or an image already open


def empty_answer_hint(answer: str, advice: str) -> str:
    """A line that says why an answer shows nothing (``''`` for an answer with text): a greedy decode of an untrained
    or mismatched model often picks the end token first, and the decoded special tokens are dropped.
    ``advice``: what to try in the tool at hand (its flag or setting)."""
    if answer.strip():
        return ''
    return (f'(empty answer: the model generated no text, only special tokens such as its end token; an untrained or '
            f'mismatched model? {advice})')


class ConvertedModel:
    """A converted folder ready to answer; ``dtype``/``device`` as for ``from_pretrained``; a folder (of any format)
    whose Python files are not this project's is refused unless ``trust_remote_code``. ``tiling``
    overrides the folder's tiling for ``official``/``remote`` (``image_size``, ``max_num``, ``min_num``,
    ``use_thumbnail``)."""

    def __init__(self, folder: str, dtype: torch.dtype = torch.float32, device: str = 'cpu',
                 trust_remote_code: bool = False, **tiling):
        self.folder, self.format, self.device = folder, folder_format(folder), device
        check_folder(folder)
        # code in the folder is run (official/remote: its modeling code; hf/llava: transformers imports a local
        # folder's custom_generate/generate.py whatever trust_remote_code says, and an auto_map's module when told
        # 'y' on stdin): this project's only, unless trusted
        check_code(folder, trust_remote_code)
        if self.format not in ('official', 'remote'):
            check_processor_files(folder)
        with open(os.path.join(folder, 'config.json'), encoding='utf-8') as f:
            self.config = json.load(f)
        try:
            context, key = context_length(self.config)
        except ValueError as exc:
            raise ValueError(f'{os.path.join(folder, "config.json")}: {exc}; {AGAIN}') from None
        self.context = (context, f'{os.path.join(folder, "config.json")} {key}')  # the LLM's, and where it is read
        given = {k: v for k, v in tiling.items() if v is not None}
        if self.format in ('official', 'remote'):
            self.tiling, self.std = self._tiling(given), self.config.get('image_std', IMAGENET_STD)  # before loading
            from transformers import AutoModel, AutoTokenizer
            self.tokenizer = from_folder('tokenizer', folder, lambda: AutoTokenizer.from_pretrained(
                folder, trust_remote_code=True), TOKENIZER_ERRORS)
            self.model = weights_fit(folder, from_folder('model', folder, lambda: AutoModel.from_pretrained(
                folder, trust_remote_code=True, dtype=dtype, output_loading_info=True), MODEL_ERRORS)).eval().to(device)
        else:
            if given:
                raise ValueError(f'{folder} is a {self.format} folder: its processor tiles the images, and the '
                                 f'tiling options ({", ".join(sorted(given))}) are for official and remote folders')
            from transformers import AutoModelForImageTextToText, AutoProcessor
            self.processor = from_folder('processor', folder, lambda: AutoProcessor.from_pretrained(
                folder, trust_remote_code=trust_remote_code), TOKENIZER_ERRORS)
            # an LLM capping its attention logits (Gemma 2's) runs eager, as it trained (SDPA drops the cap)
            capped = dict(attn_implementation='eager') if (self.config.get('text_config') or {}).get(
                'attn_logit_softcapping') else {}
            self.model = weights_fit(folder, from_folder('model', folder, lambda: AutoModelForImageTextToText.
                                                         from_pretrained(folder, dtype=dtype, output_loading_info=True,
                                                                         trust_remote_code=trust_remote_code,
                                                                         **capped),
                                                         MODEL_ERRORS)).eval().to(device)
            self.tokenizer = self.processor.tokenizer
        tokenizer_fits(folder, self.tokenizer, self.model, processor=self.format in ('hf', 'llava'))
        self.dtype = dtype
        self.reset()

    def _tiling(self, given: dict) -> dict:
        """The folder's tiling (``config.json``) with ``given``'s settings over it; a tile size other than the
        folder's is refused: the model's vision tokens per tile (``num_image_token``) are fixed by it."""
        cfg, path = self.config, os.path.join(self.folder, 'config.json')
        size = recorded_tile_size(cfg, path)
        if not size and not given.get('image_size'):
            raise ValueError(f'{path}: no force_image_size nor vision_config.image_size; give the tile size '
                             f'(--image-size)')
        if size and given.get('image_size', size) != size:
            raise ValueError(f'--image-size {given["image_size"]}: this model takes tiles of {size} px only (its '
                             f'vision tokens per tile are fixed by {path}\'s tile size); leave --image-size out')
        tiling = dict(image_size=int(given.get('image_size') or size),
                      max_num=int(given.get('max_num') or config_whole(cfg, 'max_dynamic_patch', path, 12)),
                      min_num=int(given.get('min_num') or config_whole(cfg, 'min_dynamic_patch', path, 1)),
                      use_thumbnail=bool(given.get('use_thumbnail', cfg.get('use_thumbnail', True))),
                      mode=cfg.get('image_mode', 'tile'), mean=cfg.get('image_mean', IMAGENET_MEAN))
        if tiling['min_num'] > tiling['max_num']:
            which = {k: 'given' if k in given else f'{path}\'s {k[:3]}_dynamic_patch' for k in ('min_num', 'max_num')}
            raise ValueError(f'--min-num {tiling["min_num"]} ({which["min_num"]}) is over --max-num '
                             f'{tiling["max_num"]} ({which["max_num"]}); give a --min-num of at most '
                             f'{tiling["max_num"]}')
        return tiling

    def reset(self) -> None:
        self.history, self.messages, self.images, self.frames, self.videos = None, [], [], [], []

    def conversation(self) -> dict:
        """The multi-turn state (history, messages, images so far), for a caller that keeps several
        conversations on one model (the web demo: one per browser session); see :meth:`resume`. Its images may be
        replaced by anything :func:`~xtuner_plugins.data.image_io.load_image` reads to the same pixels (the web demo
        keeps each as its file's bytes: a 280 kB PNG decodes to 265 MB)."""
        history = None if self.history is None else list(self.history)
        return dict(history=history, messages=list(self.messages), images=list(self.images),
                    frames=list(self.frames), videos=list(self.videos))

    def resume(self, conversation: Optional[dict]) -> None:
        """Continue a conversation saved by :meth:`conversation` (``None``: a new one)."""
        self.reset()
        if conversation:  # copied: the model's chat() appends the next turn to the history it is given
            self.history = None if conversation['history'] is None else list(conversation['history'])
            self.messages, self.images = list(conversation['messages']), list(conversation['images'])
            self.frames = list(conversation.get('frames') or [False] * len(self.images))
            self.videos = list(conversation.get('videos') or [])

    def pixels(self, images: Sequence[Image.Image], frames: Sequence[bool] = ()) -> Tuple[Optional[torch.Tensor],
                                                                                          List[int]]:
        """Tiles of each image as the folder's config says, normalised; and the tile count of each. An image
        marked in ``frames`` is a video frame: one tile (resized; padded first in the ``pad`` mode)."""
        frames = list(frames) + [False] * (len(images) - len(frames))
        images = [load_image(i) for i in images]  # a conversation's earlier images may be kept as files' bytes
        one = dict(self.tiling, mode='pad' if self.tiling['mode'] == 'pad' else 'resize', max_num=1, min_num=1)
        tiles = [image_tiles(img, **(one if frame else self.tiling)) for img, frame in zip(images, frames)]
        if not tiles:
            return None, []
        pixels = normalize_tiles(torch.cat(tiles), self.tiling['mean'], self.std, dtype=self.dtype)
        return pixels.to(self.device), [t.shape[0] for t in tiles]

    def ask(self, question: str, images: Sequence[ImageLike] = (), generation: Optional[dict] = None,
            streamer=None, video: Optional[Sequence[ImageLike]] = None) -> str:
        """One turn; ``images`` are new in this turn (every turn sees all the conversation's images so far);
        ``video``: a video's frames (``data/video.py``'s ``load_video``) instead of images."""
        if video is not None:
            self.check_video(len(video))
        check_question(question, self.tokenizer)  # typed control tokens: a forged turn, image tokens without images
        # before anything is tokenized or tiled: a 40 MB question took 31 s and 6.7 GB to be found too long
        least = len(question.encode('utf-8')) // self.longest_token()
        if self.context[0] is not None and least > self.context[0]:
            raise QuestionTooLong(least, 0, *self.context, least=True)
        new = [load_image(i) for i in images]  # the package's one pixel rule, for paths and images alike
        frames = [load_image(f) for f in video] if video is not None else None
        question = media_question(question, len(new), None if frames is None else len(frames))
        generation = dict(generation or {})
        if streamer is not None:
            generation['streamer'] = streamer
        if self.format in ('official', 'remote'):
            if frames is not None:
                prefix = self.config.get('frame_prefix') or DEFAULT_FRAME_PREFIX  # the one trained with
                question = question.replace(VIDEO_PLACEHOLDER, video_prompt(len(frames), prefix))
                images, marks = self.images + frames, self.frames + [True] * len(frames)
            else:
                split_images(question, len(new))  # the tags must match the images
                if new and '<image>' not in question:
                    question = '<image>\n' * len(new) + question
                images, marks = self.images + new, self.frames + [False] * len(new)
                # the new images' vision tokens from their sizes, before they are tiled: 800 uploads of a 1 x 40 PNG
                # were cut into 41 tiles each (10 GB at 448 px) before the prompt was found too long
                t = self.tiling
                tiles = sum(num_tiles(i.width, i.height, t['min_num'], t['max_num'], t['image_size'],
                                      t['use_thumbnail']) if t['mode'] == 'tile' else 1 for i in new)
                self.check_context(tiles * (self.frame_tokens() - 2) + 2 * len(new), generation, least=True,
                                   images=len(new))
            pixel_values, num_patches = self.pixels(images, marks)
            query = official_query(self.model, question, num_patches, self.history)
            self.check_context(len(self.tokenizer(query, verbose=False)['input_ids']), generation, images=len(new),
                               video=frames is not None)
            generation.setdefault('stopping_criteria', blank_run_stop(self.tokenizer))
            answer, history = self.model.chat(self.tokenizer, pixel_values, question, generation,
                                              history=self.history, return_history=True,
                                              num_patches_list=num_patches)
            self.history = history[:-1] + [(history[-1][0], history_text(history[-1][1], self.tokenizer))]
            self.images, self.frames = images, marks
        else:
            videos = self.videos
            if frames is not None:
                before, _, after = question.partition(VIDEO_PLACEHOLDER)
                after = after[1:] if after.startswith('\n') else after  # the video part ends with a newline
                content = ([{'type': 'text', 'text': before}] if before else []) + [{'type': 'video'}] + (
                    [{'type': 'text', 'text': after}] if after else [])
                videos = videos + [frames]
            else:
                content = [{'type': kind} if kind == 'image' else {'type': 'text', 'text': text}
                           for kind, text in split_images(question, len(new))]
            messages = self.messages + [{'role': 'user', 'content': content}]
            prompt = self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            inputs = encode_prompt(self.processor, prompt, images=[load_image(i) for i in self.images + new] or None,
                                   videos=[[load_image(f) for f in v] for v in videos] or None, return_tensors='pt')
            inputs = {k: (v.to(self.device, self.dtype) if k == 'pixel_values' else v.to(self.device))
                      for k, v in inputs.items()}
            start = inputs['input_ids'].shape[1]
            self.check_context(start, generation, images=len(new), video=frames is not None)
            generation.setdefault('do_sample', False)
            generation.setdefault('stopping_criteria', blank_run_stop(self.tokenizer, start))
            with torch.no_grad():
                out = self.model.generate(**inputs, **generation)
            answer = self.tokenizer.decode(out[0, start:], skip_special_tokens=True).strip()
            self.messages = messages + [{'role': 'assistant',
                                         'content': [{'type': 'text', 'text': history_text(answer, self.tokenizer)}]}]
            self.images, self.videos = self.images + new, videos
        return answer

    def longest_token(self) -> int:
        """The most bytes one token of the vocabulary stands for (a text of B bytes is at least B / this many
        tokens), counted once."""
        if getattr(self, '_longest', None) is None:
            vocab = self.tokenizer.get_vocab()
            self._longest = max([len(t.encode('utf-8')) for t in vocab] + [1])
        return self._longest

    def check_context(self, prompt_tokens: int, generation: dict, least: bool = False, images: int = 0,
                      video: bool = False) -> None:
        """:class:`~xtuner_plugins.models.prompt.PromptTooLong` when the prompt and ``max_new_tokens`` do not fit
        the LLM's context (``least``: ``prompt_tokens`` is the fewest the prompt can be); ``images`` and ``video``:
        what this turn adds to the conversation's vision inputs (the message names the settings that lower them)."""
        official = self.format in ('official', 'remote')
        turns = len(self.history or []) if official else len(self.messages) // 2
        had_video = any(self.frames) if official else bool(self.videos)
        had_image = (not all(self.frames) if official else True) and bool(self.images)
        media = ['video'] * (had_video or video) + ['image'] * (had_image or images > 0)
        check_context(prompt_tokens, int(generation.get('max_new_tokens') or 0), *self.context, turns=turns,
                      least=least, media=media)

    def check_video(self, num_frames: int) -> None:
        """A ``ValueError`` when this folder reads no video (``llava``) or ``num_frames`` frames alone are over the
        LLM's context (:class:`~xtuner_plugins.models.prompt.PromptTooLong`), before a frame is decoded, read or
        tiled (the whole prompt is checked once built)."""
        if self.format == 'llava':
            from .export.files import NO_VIDEO
            raise NoVideo(f'{self.folder}: {NO_VIDEO}')
        self.check_context(num_frames * self.frame_tokens(), {}, least=True, video=True)

    def frame_tokens(self) -> int:
        """The fewest tokens a video frame takes: its vision tokens (one tile), ``<img>`` and ``</img>``
        (``tools/chat.py --frames 200000`` ran past 5 minutes and 12 GB before the prompt was found too long)."""
        per = getattr(self.model, 'num_image_token', None) or getattr(getattr(self, 'processor', None),
                                                                     'image_seq_length', None)
        return int(per or 0) + 2

    def option_logprobs(self, question: str, images: Sequence[ImageLike], texts: Sequence[str]) -> List[float]:
        """Each text's log-likelihood as the answer to ``question`` on ``images`` (a new single-turn conversation;
        ``likelihood.py``)."""
        from .likelihood import option_logprobs
        return option_logprobs(self, question, images, texts)

    def ask_batch(self, questions: Sequence[str], images: Sequence[Sequence[ImageLike]],
                  generation: Optional[dict] = None) -> List[str]:
        """Single-turn questions answered in one left-padded batch (``batch_chat`` of the remote code, or the
        processor's batch for ``llava``/``hf``) when each has exactly one image; otherwise one at a time.
        The conversation history is neither used nor kept."""
        for question in questions:
            check_question(question, self.tokenizer)
        loaded = [[load_image(i) for i in imgs] for imgs in images]
        generation = dict(generation or {})
        generation.setdefault('do_sample', False)
        if len(questions) < 2 or any(len(imgs) != 1 for imgs in loaded):
            answers = []
            for question, imgs in zip(questions, loaded):
                self.reset()
                answers.append(self.ask(question, imgs, generation))
            self.reset()
            return answers
        new_tokens = int(generation.get('max_new_tokens') or 0)
        if self.format in ('official', 'remote'):
            pixel_values, num_patches = self.pixels([imgs[0] for imgs in loaded])
            for question, tiles in zip(questions, num_patches):
                query = official_query(self.model, question, [tiles])
                check_context(len(self.tokenizer(query, verbose=False)['input_ids']), new_tokens, *self.context,
                              media=['image'])
            generation.setdefault('stopping_criteria', blank_run_stop(self.tokenizer))
            return self.model.batch_chat(self.tokenizer, pixel_values, list(questions), generation,
                                         num_patches_list=num_patches)
        prompts = []
        for question in questions:
            content = [{'type': kind} if kind == 'image' else {'type': 'text', 'text': text}
                       for kind, text in split_images(question, 1)]
            prompts.append(self.processor.apply_chat_template([{'role': 'user', 'content': content}],
                                                              add_generation_prompt=True, tokenize=False))
        side, self.tokenizer.padding_side = self.tokenizer.padding_side, 'left'
        try:
            inputs = encode_prompt(self.processor, prompts, images=[imgs[0] for imgs in loaded], return_tensors='pt',
                                   padding=True)
        finally:
            self.tokenizer.padding_side = side
        inputs = {k: (v.to(self.device, self.dtype) if k == 'pixel_values' else v.to(self.device))
                  for k, v in inputs.items()}
        start = inputs['input_ids'].shape[1]
        check_context(start, new_tokens, *self.context, media=['image'])  # the longest, the others padded to it
        generation.setdefault('stopping_criteria', blank_run_stop(self.tokenizer, start))
        with torch.no_grad():
            out = self.model.generate(**inputs, **generation)
        return [a.strip() for a in self.tokenizer.batch_decode(out[:, start:], skip_special_tokens=True)]


def tiling_note(config: Optional[dict], max_num: Optional[int]) -> str:
    """A note when ``--max-num`` allows more tiles per image than the model was trained with (its folder's
    ``config.json``, ``config``: ``max_dynamic_patch``, which the converter takes from the training data): allowed,
    as InternVL's own evaluation tiles more finely than it trained, but said, so that a changed answer is not a
    surprise."""
    trained = config.get('max_dynamic_patch') if isinstance(config, dict) else None
    if max_num is None or not isinstance(trained, int) or max_num <= trained:
        return ''
    return (f'--max-num {max_num} is over the {trained} tiles per image this model was trained with (its '
            f'config.json\'s max_dynamic_patch): a large image is cut into more tiles than training showed it')


def frames_note(config: Optional[dict], frames: Optional[int]) -> str:
    """A note when a video is asked about in more frames than training drew for one (the folder's ``config.json``,
    ``config``: ``max_num_frame``, which the converter takes from the training data set): allowed (InternVL's video
    benchmarks ask with 16 to 64 frames), but said, as :func:`tiling_note` says it of tiles."""
    trained = config.get('max_num_frame') if isinstance(config, dict) else None
    if frames is None or not isinstance(trained, int) or frames <= trained:
        return ''
    return (f'{frames} frames of a video are over the {trained} this model was trained with at most (its '
            f'config.json\'s max_num_frame): more frames than training showed it, each one tile')
