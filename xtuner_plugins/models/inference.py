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
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from typing import Callable, List, Optional, Sequence, Tuple, Union

import torch
from PIL import Image

from xtuner_plugins.data.image_io import ImageSource, load_image
from xtuner_plugins.data.template import DEFAULT_FRAME_PREFIX
from xtuner_plugins.data.tiling import IMAGENET_MEAN, IMAGENET_STD, image_tiles, normalize_tiles
from xtuner_plugins.data.video import VIDEO_PLACEHOLDER, video_prompt

from .dtypes import resolve_dtype
from .prompt import context_length, split_images

FOLDER_FORMATS = {'internvl_chat': 'official', 'xtuner_vlm_chat': 'remote', 'llava': 'llava', 'internvl': 'hf'}
ImageLike = ImageSource  # a path, a file's bytes, or an image already open


def folder_format(folder: str) -> str:
    """The format of a converted folder, from its ``config.json``; a clear error for anything else."""
    path = os.path.join(folder, 'config.json')
    if not os.path.isdir(folder):
        raise ValueError(f'{folder}: no such folder; give a folder written by tools/convert_to_official.py')
    if not os.path.isfile(path):
        raise ValueError(f'{folder}: no config.json; give a folder written by tools/convert_to_official.py')
    try:
        with open(path, encoding='utf-8') as f:
            model_type = json.load(f).get('model_type')
    except (ValueError, AttributeError) as exc:  # not JSON, not UTF-8, not an object
        raise ValueError(f'{path}: not a JSON object ({exc}); {AGAIN}') from None
    if model_type not in FOLDER_FORMATS:
        raise ValueError(f'{path}: model_type {model_type!r} is not a converted vision-language model '
                         f'(expected one of {sorted(FOLDER_FORMATS)}); give a folder written by '
                         f'tools/convert_to_official.py')
    return FOLDER_FORMATS[model_type]


#: Files one of which a folder's tokenizer is read from (fast tokenizers, sentencepiece, BPE, WordPiece, tiktoken).
TOKENIZER_FILES = ('tokenizer.json', 'tokenizer.model', 'vocab.json', 'vocab.txt', 'tokenizer.tiktoken')
# A tokenizer class given a missing file's path as None fails anywhere in its __init__ (TypeError, ...).
TOKENIZER_ERRORS = (OSError, ValueError, TypeError, KeyError, AttributeError)
AGAIN = 'convert the model again (tools/convert_to_official.py) or copy the folder whole'


def safetensors_problem(path: str) -> Optional[str]:
    """Why ``path`` is not a whole safetensors file (the size its header promises, against the file's), or
    ``None``. Reads the header only: 8 bytes of length, then the JSON naming each tensor's byte range."""
    size = os.path.getsize(path)
    with open(path, 'rb') as f:
        head = f.read(8)
        length = int.from_bytes(head, 'little') if len(head) == 8 else None
        if length is None or 8 + length > size:
            return f'{size} bytes, shorter than its own header: a truncated (half-written) file'
        try:
            header = json.loads(f.read(length))
            end = max([int(t['data_offsets'][1]) for k, t in header.items() if k != '__metadata__'] or [0])
        except (ValueError, TypeError, KeyError, IndexError, AttributeError) as exc:
            return f'its header does not read ({type(exc).__name__}: {exc}): a corrupt file'
    if 8 + length + end != size:
        return (f'{size} bytes where its header promises {8 + length + end}: a '
                f'{"truncated (half-written)" if size < 8 + length + end else "corrupt"} file')
    return None


def check_folder(folder: str) -> None:
    """A converted folder's weights and tokenizer files there and whole, before transformers reads them (whose
    errors, for a half-written copy, are tracebacks from deep inside); ``ValueError`` naming what is wrong."""
    def there(name):
        return os.path.isfile(os.path.join(folder, name))

    shards = []
    for index, single in (('model.safetensors.index.json', 'model.safetensors'),
                          ('pytorch_model.bin.index.json', 'pytorch_model.bin')):
        if there(index):
            try:
                with open(os.path.join(folder, index), encoding='utf-8') as f:
                    shards = sorted(set(json.load(f)['weight_map'].values()))
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                raise ValueError(f'{os.path.join(folder, index)}: not a weight index ({type(exc).__name__}: '
                                 f'{exc}); {AGAIN}') from None
            missing = [s for s in shards if not there(s)]
            if missing:
                raise ValueError(f'{folder}: {len(missing)} of the {len(shards)} weight files {index} lists are '
                                 f'missing ({", ".join(missing[:3])}{", ..." if len(missing) > 3 else ""}); {AGAIN}')
            break
        if there(single):
            shards = [single]
            break
    if not shards:
        raise ValueError(f'{folder}: no weights (model.safetensors, model.safetensors.index.json with its shards, '
                         f'or pytorch_model.bin); {AGAIN}')
    for shard in shards:
        problem = safetensors_problem(os.path.join(folder, shard)) if shard.endswith('.safetensors') else None
        if problem:
            raise ValueError(f'{os.path.join(folder, shard)}: {problem}; {AGAIN}')
    if not any(there(name) for name in TOKENIZER_FILES):
        raise ValueError(f'{folder}: no tokenizer files (one of {", ".join(TOKENIZER_FILES)}); {AGAIN}')


def from_folder(what: str, folder: str, load: Callable, errors: Tuple[type, ...] = (OSError, ValueError)):
    """``load()``; an error of the folder's files (``errors``, or safetensors' own) as one ``ValueError`` naming
    the folder and what did not load, not transformers' traceback from deep inside."""
    try:
        return load()
    except Exception as exc:
        if not isinstance(exc, errors) and type(exc).__module__.split('.')[0] != 'safetensors':
            raise
        raise ValueError(f'{folder}: the {what} does not load ({type(exc).__name__}: {str(exc).strip()}); '
                         f'{AGAIN}') from None


def model_folder(folder: Optional[str], config: Optional[str], checkpoint: Optional[str], cfg_options, tmp: str,
                 dtype: torch.dtype, log=print) -> str:
    """The folder to load: ``folder`` itself, or a training ``config`` + ``checkpoint`` converted into ``tmp``
    first (the converter's code path, so both ways run the same model code)."""
    if config is None:
        return folder
    from xtuner_plugins.models.export import export_checkpoint
    return export_checkpoint(config, checkpoint, os.path.join(tmp, 'model'), dtype=dtype, cfg_options=cfg_options,
                             log=log)


def empty_answer_hint(answer: str, advice: str) -> str:
    """A line that says why an answer shows nothing (``''`` for an answer with text): a greedy decode of an untrained
    or mismatched model often picks the end token first, and the decoded special tokens are dropped.
    ``advice``: what to try in the tool at hand (its flag or setting)."""
    if answer.strip():
        return ''
    return (f'(empty answer: the model generated no text, only special tokens such as its end token; an untrained or '
            f'mismatched model? {advice})')


def tool_error(prog: str, problem: Union[str, Exception]) -> int:
    """A tool's error printed as argparse prints its own (``PROG: error: ...``); the exit status 2."""
    print(f'{prog}: error: {problem}', file=sys.stderr)
    return 2


def run_tool(args, prog: str, use: Callable[['ConvertedModel'], None], errors: Tuple[type, ...] = (),
             **tiling) -> int:
    """A tool's run on the model it names (:func:`add_model_arguments`' ``args``): the model loaded as a
    :class:`ConvertedModel` (``tiling`` as there; a config + checkpoint converted into a temporary folder
    first, removed after), then ``use(model)``. The exit status: 0, or 2 with the error printed
    (:func:`tool_error`) when the folder does not load or ``use`` raises one of ``errors``."""
    dtype = resolve_dtype(args.dtype)
    with tempfile.TemporaryDirectory(prefix=f'internvl-{prog}-') as tmp:
        folder = model_folder(args.folder, args.config, args.checkpoint, args.cfg_options, tmp, dtype,
                              log=lambda m: print(m, file=sys.stderr))
        try:
            model = ConvertedModel(folder, dtype, args.device, **tiling)
        except ValueError as exc:
            return tool_error(prog, exc)
        try:
            use(model)
        except errors as exc:
            return tool_error(prog, exc)
    return 0


def add_model_arguments(parser) -> None:
    """The arguments by which every tool (chat, eval, web demo) names its model: a converted folder, or a
    training ``--config`` + ``--checkpoint`` (+ the run's ``--cfg-options``); ``--dtype``, ``--device``.
    :func:`check_model_arguments` checks them after parsing."""
    from xtuner_plugins.launch import CfgOptions
    parser.add_argument('folder', nargs='?', help='a converted folder (tools/convert_to_official.py)')
    parser.add_argument('--config', help='a training config (instead of a folder), with --checkpoint')
    parser.add_argument('--checkpoint', help='the training checkpoint (.pth or DeepSpeed folder) with --config')
    parser.add_argument('--cfg-options', nargs='+', action=CfgOptions, default=None,
                        help='the training run\'s config overrides (key=value)')
    parser.add_argument('--dtype', default='auto', help='auto (bf16 on a GPU, fp32 on a CPU), bf16, fp16, fp32')
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')


def check_model_arguments(parser, args) -> None:
    if (args.folder is None) == (args.config is None):
        parser.error('give a converted folder, or --config (with --checkpoint), not both')
    if args.config and not args.checkpoint:
        parser.error('--config needs --checkpoint')


class ConvertedModel:
    """A converted folder ready to answer; ``dtype``/``device`` as for ``from_pretrained``. ``tiling``
    overrides the folder's tiling for ``official``/``remote`` (``image_size``, ``max_num``, ``min_num``,
    ``use_thumbnail``)."""

    def __init__(self, folder: str, dtype: torch.dtype = torch.float32, device: str = 'cpu', **tiling):
        self.folder, self.format, self.device = folder, folder_format(folder), device
        check_folder(folder)
        with open(os.path.join(folder, 'config.json'), encoding='utf-8') as f:
            self.config = json.load(f)
        context, key = context_length(self.config)
        self.context = (context, f'{os.path.join(folder, "config.json")} {key}')  # the LLM's, and where it is read
        if self.format in ('official', 'remote'):
            from transformers import AutoModel, AutoTokenizer
            self.tokenizer = from_folder('tokenizer', folder, lambda: AutoTokenizer.from_pretrained(
                folder, trust_remote_code=True), TOKENIZER_ERRORS)
            self.model = from_folder('model', folder, lambda: AutoModel.from_pretrained(
                folder, trust_remote_code=True, dtype=dtype)).eval().to(device)
            cfg = self.config
            given = {k: v for k, v in tiling.items() if v is not None}
            # the tile size the folder records: InternVL's force_image_size, else its vision tower's own
            tower_size = (cfg.get('vision_config') or {}).get('image_size')
            tower_size = tower_size[0] if isinstance(tower_size, (list, tuple)) else tower_size
            size = given.get('image_size') or cfg.get('force_image_size') or tower_size
            if not size:
                raise ValueError(f'{folder}/config.json: no force_image_size nor vision_config.image_size; '
                                 f'give the tile size (--image-size)')
            self.tiling = dict(image_size=int(size),
                               max_num=int(given.get('max_num') or cfg.get('max_dynamic_patch', 12)),
                               min_num=int(given.get('min_num') or cfg.get('min_dynamic_patch', 1)),
                               use_thumbnail=bool(given.get('use_thumbnail', cfg.get('use_thumbnail', True))),
                               mode=cfg.get('image_mode', 'tile'), mean=cfg.get('image_mean', IMAGENET_MEAN))
            self.std = cfg.get('image_std', IMAGENET_STD)
        else:
            from transformers import AutoModelForImageTextToText, AutoProcessor
            self.processor = from_folder('processor', folder, lambda: AutoProcessor.from_pretrained(folder),
                                         TOKENIZER_ERRORS)
            self.model = from_folder('model', folder, lambda: AutoModelForImageTextToText.from_pretrained(
                folder, dtype=dtype)).eval().to(device)
            self.tokenizer = self.processor.tokenizer
        self.dtype = dtype
        self.reset()

    def reset(self) -> None:
        self.history, self.messages, self.images, self.frames, self.videos = None, [], [], [], []

    def conversation(self) -> dict:
        """The multi-turn state (history, messages, images so far), for a caller that keeps several
        conversations on one model (the web demo: one per browser session); see :meth:`resume`."""
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
        if video is not None and self.format == 'llava':
            from .export.files import NO_VIDEO
            raise ValueError(f'{self.folder}: {NO_VIDEO}')
        new = [load_image(i) for i in images]  # the package's one pixel rule, for paths and images alike
        frames = [load_image(f) for f in video] if video is not None else None
        if frames is not None and (new or not frames):
            raise ValueError('a turn takes images or one video (at least one frame), not both')
        if frames is None and VIDEO_PLACEHOLDER in question:
            raise ValueError(f'the question has {VIDEO_PLACEHOLDER} but no video is given')
        generation = dict(generation or {})
        if streamer is not None:
            generation['streamer'] = streamer
        if frames is not None:
            if question.count(VIDEO_PLACEHOLDER) > 1:
                raise ValueError(f'the question has {question.count(VIDEO_PLACEHOLDER)} {VIDEO_PLACEHOLDER} tags '
                                 f'for one video')
            if VIDEO_PLACEHOLDER not in question:
                question = f'{VIDEO_PLACEHOLDER}\n' + question
            if '<image>' in question:
                raise ValueError('a question about a video has no <image> tags (its frames take their place)')
        if frames is not None and self.format in ('official', 'remote'):
            question = question.replace(VIDEO_PLACEHOLDER, video_prompt(len(frames), DEFAULT_FRAME_PREFIX))
            pixel_values, num_patches = self.pixels(self.images + frames, self.frames + [True] * len(frames))
            answer, self.history = self.model.chat(self.tokenizer, pixel_values, question, generation,
                                                   history=self.history, return_history=True,
                                                   num_patches_list=num_patches)
            self.images, self.frames = self.images + frames, self.frames + [True] * len(frames)
        elif self.format in ('official', 'remote'):
            split_images(question, len(new))  # the tags must match the images
            if new and '<image>' not in question:
                question = '<image>\n' * len(new) + question
            pixel_values, num_patches = self.pixels(self.images + new, self.frames)
            answer, self.history = self.model.chat(self.tokenizer, pixel_values, question, generation,
                                                   history=self.history, return_history=True,
                                                   num_patches_list=num_patches)
            self.images, self.frames = self.images + new, self.frames + [False] * len(new)
        else:
            if frames is not None:
                before, _, after = question.partition(VIDEO_PLACEHOLDER)
                after = after[1:] if after.startswith('\n') else after  # the video part ends with a newline
                content = ([{'type': 'text', 'text': before}] if before else []) + [{'type': 'video'}] + (
                    [{'type': 'text', 'text': after}] if after else [])
                self.videos = self.videos + [frames]
            else:
                content = [{'type': kind} if kind == 'image' else {'type': 'text', 'text': text}
                           for kind, text in split_images(question, len(new))]
            messages = self.messages + [{'role': 'user', 'content': content}]
            prompt = self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            inputs = self.processor(text=prompt, images=(self.images + new) or None, videos=self.videos or None,
                                    return_tensors='pt')
            inputs = {k: (v.to(self.device, self.dtype) if k == 'pixel_values' else v.to(self.device))
                      for k, v in inputs.items()}
            generation.setdefault('do_sample', False)
            with torch.no_grad():
                out = self.model.generate(**inputs, **generation)
            answer = self.tokenizer.decode(out[0, inputs['input_ids'].shape[1]:], skip_special_tokens=True).strip()
            self.messages = messages + [{'role': 'assistant', 'content': [{'type': 'text', 'text': answer}]}]
            self.images += new
        return answer

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
        if self.format in ('official', 'remote'):
            pixel_values, num_patches = self.pixels([imgs[0] for imgs in loaded])
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
            inputs = self.processor(text=prompts, images=[imgs[0] for imgs in loaded], return_tensors='pt',
                                    padding=True)
        finally:
            self.tokenizer.padding_side = side
        inputs = {k: (v.to(self.device, self.dtype) if k == 'pixel_values' else v.to(self.device))
                  for k, v in inputs.items()}
        with torch.no_grad():
            out = self.model.generate(**inputs, **generation)
        return [a.strip() for a in self.tokenizer.batch_decode(out[:, inputs['input_ids'].shape[1]:],
                                                               skip_special_tokens=True)]
