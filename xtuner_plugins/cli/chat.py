"""Chat with a vision-language model: a converted folder of any format, or a training config plus checkpoint.

Usage::

    # one shot, from a converted folder (tools/convert_to_official.py)
    python tools/chat.py work_dirs/my_internvl --image photo.jpg --prompt "What is in the picture?"
    # several images in one prompt: one <image> tag each (added in front when the prompt has none)
    python tools/chat.py work_dirs/my_internvl --image a.jpg b.jpg --prompt $'Image-1: <image>\\nImage-2: <image>\\nCompare.'
    # ($'...' makes \\n a newline in bash; inside "..." it stays a backslash and an n)
    # straight from training: the checkpoint alone (it records its config; --remap OLD=NEW for moved folders)
    python tools/chat.py --checkpoint work_dirs/finetune_lora/iter_1000.pth --image photo.jpg
    # a video (a file, a GIF or a folder of frames): --frames frames at the middles of equal spans, one tile each,
    # a Frame{i}: <image> line each in place of <video> (added in front when the prompt has none)
    python tools/chat.py work_dirs/my_internvl --video clip.mp4 --frames 8 --prompt "What happens?"
    # interactive (no --prompt): answers stream as they are generated; /image PATH ..., /video PATH, /reset, /exit

The folder's format is read from its ``config.json``: ``official`` and ``remote`` folders load with
``trust_remote_code`` and answer through their ``chat``; ``llava`` and ``hf`` folders through transformers' own
classes and the folder's processor (``xtuner_plugins.models.inference``); a GGUF folder (``--format gguf``) through
llama.cpp, greedily (``xtuner_plugins.models.gguf_model``). Tiling flags (``--max-num``,
``--min-num``, ``--image-size``, ``--no-thumbnail``) default to the folder's ``config.json`` (official/remote).
Decoding is greedy unless ``--do-sample`` (with ``--temperature``, ``--top-p``, ``--top-k``).
A config plus checkpoint is converted into a temporary folder first (the converter's code path), so both
ways run the same model code.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import threading
from typing import List, Sequence

import torch

from xtuner_plugins.data.errors import SampleError
from xtuner_plugins.data.image_io import frame_note, load_image
from xtuner_plugins.data.video import load_video, probe_video
from xtuner_plugins.cli.tool_args import (add_image_limit_argument, add_model_arguments, add_tiling_arguments,
                                          check_model_arguments, count_argument, image_limit, run_tool,
                                          sampling_argument, tool_error, top_k_argument)
from xtuner_plugins.models.inference import ConvertedModel, empty_answer_hint, frames_note


def generation_settings(args) -> dict:
    generation = dict(max_new_tokens=args.max_new_tokens, do_sample=args.do_sample)
    if args.do_sample:
        generation.update(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k)
    if args.repetition_penalty != 1.0:
        generation['repetition_penalty'] = args.repetition_penalty
    return generation


def image_problem(paths: Sequence[str]) -> str:
    """``FILE: what is wrong [reason]`` for the first image that does not decode in full, or ''."""
    for path in paths:
        try:
            load_image(path)
        except SampleError as err:
            return str(err.with_source(path))
    return ''


def frame_notes(paths: Sequence[str]) -> List[str]:
    """A line for each image of several frames (an animated GIF: the model sees its first frame)."""
    return [note for note in map(frame_note, paths) if note]


def empty_hint(answer: str, generation: dict) -> str:
    """What to try when ``answer`` is empty (``''`` otherwise), in this tool's flags."""
    advice = 'try another --seed or a higher --temperature' if generation.get('do_sample') else 'try --do-sample'
    return empty_answer_hint(answer, advice)


HELP = ('Type a message; /image PATH ... attaches images to the next message, /video PATH a video, /reset clears the '
        'history, /help shows this, /exit quits.')


def typed_paths(rest: str) -> List[str]:
    """The paths typed after ``/image`` or ``/video``: the whole rest when it names a file (a name with spaces or
    an apostrophe: 'my photo.jpg' was two missing files), else its words, quoted as in a shell."""
    rest = rest.strip()
    if os.path.isfile(rest):
        return [rest]
    try:
        return shlex.split(rest)
    except ValueError:  # an unmatched quote
        return rest.split()


def video_frames(chat: ConvertedModel, path: str, frames: int):
    """``(frames, None)`` of a video, or ``(None, 'FILE: what is wrong [reason]')``; frames the model cannot take
    (over its context, a folder that reads no video) are refused before one is decoded (``--frames 1000000000``
    built a list of a billion frame numbers first). More frames than the model was trained with are a note on
    stderr (:func:`frames_note`)."""
    try:
        loaded = load_video(path, frames, check=chat.check_video)[0]
    except SampleError as err:
        return None, str(err.with_source(path))
    except ValueError as err:
        return None, str(err)
    except Exception as err:  # noqa: BLE001 -- a file the decoder trips on: not attached, the conversation kept
        return None, f'{path}: cannot read it as a video ({type(err).__name__}: {err})'
    note = frames_note(getattr(chat, 'config', None), len(loaded))   # (a GGUF folder has none)
    if note:
        print(f'chat: note: {note}', file=sys.stderr)
    return loaded, None


def with_video(frames) -> dict:
    """``ask``'s video argument, only when there is a video."""
    return {} if frames is None else dict(video=frames)


def interactive(chat: ConvertedModel, images: Sequence[str], generation: dict, video=None, frames: int = 8) -> None:
    from transformers import TextIteratorStreamer
    pending = list(images)
    print(HELP, flush=True)
    while True:
        try:
            line = input('you> ').strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return
        if not line:
            continue
        if line in ('/exit', '/quit'):
            return
        command = line.split()[0]
        if command.startswith('/') and command not in ('/image', '/video', '/reset'):
            print(HELP if command == '/help' else f'(unknown command {command}) ' + HELP)
            continue
        if line == '/reset':
            chat.reset()
            pending, video = [], None
            print('(history cleared)')
            continue
        if line in ('/image', '/video'):   # (said 'video not found: ', or the images attached already)
            print(f'(nothing attached: give a path after {line}: {line} PATH)')
            continue
        if command == '/image':
            paths = typed_paths(line[len('/image'):])
            problem = image_problem(paths)
            if problem:
                print(f'(not attached: {problem})')
                continue
            pending.extend(paths)
            for note in frame_notes(paths):
                print(f'(note: {note})')
            print(f'(attached to the next message: {", ".join(pending)})')
            continue
        if command == '/video':
            typed = typed_paths(line[len('/video'):])
            loaded, problem = video_frames(chat, typed[0] if len(typed) == 1 else line[len('/video'):].strip(),
                                           frames)
            if problem:
                print(f'(not attached: {problem})')
                continue
            video = loaded
            print(f'(video attached to the next message: {len(video)} frames)')
            continue
        streamer = chat.text_streamer() if hasattr(chat, 'text_streamer') else TextIteratorStreamer(  # GGUF: its own
            chat.tokenizer, skip_prompt=True, skip_special_tokens=True)
        result = {}

        def run(line=line, images=tuple(pending), video=video):
            try:
                result['answer'] = chat.ask(line, images, generation, streamer=streamer, **with_video(video))
            except Exception as exc:  # reported below, after the stream ends
                result['error'] = exc
                streamer.end()

        thread = threading.Thread(target=run)
        thread.start()
        print('model> ', end='', flush=True)
        for piece in streamer:
            print(piece.replace('<|im_end|>', ''), end='', flush=True)
        thread.join()
        print()
        if 'error' in result:   # what was attached goes with the failed message, and is said to
            dropped = ', '.join(pending) or ('the video' if video is not None else '')
            print(f'(error: {result["error"]})' + (f' (not kept for the next message: {dropped}; attach again '
                                                     f'with /image or /video)' if dropped else ''))
        elif empty_hint(result['answer'], generation):
            print(empty_hint(result['answer'], generation))
        pending, video = [], None


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument('--image', nargs='+', default=[], help='image file(s) for the (first) prompt')
    parser.add_argument('--video', help='a video (file, GIF or folder of frames) for the (first) prompt')
    parser.add_argument('--frames', type=count_argument, default=8,
                        help='frames taken from --video (default 8, as the model card; one tile each)')
    parser.add_argument('--prompt', help='answer this and exit (otherwise: interactive)')
    add_tiling_arguments(parser)
    parser.add_argument('--no-thumbnail', action='store_true', help='no thumbnail tile')
    parser.add_argument('--max-new-tokens', type=count_argument, default=512,
                        help='most tokens to generate (default 512; generation stops sooner at the end token, or '
                             'after 32 whitespace-only tokens in a row)')
    parser.add_argument('--do-sample', action='store_true', help='sample instead of greedy decoding')
    parser.add_argument('--temperature', type=sampling_argument(0), default=0.7)
    parser.add_argument('--top-p', type=sampling_argument(0, 1), default=0.9)
    parser.add_argument('--top-k', type=top_k_argument, default=50, help='0: no top-k filtering')
    parser.add_argument('--repetition-penalty', type=sampling_argument(0), default=1.0)
    parser.add_argument('--seed', type=int, default=0)
    add_image_limit_argument(parser)
    args = parser.parse_args(argv)
    check_model_arguments(parser, args)
    if args.video and args.image:
        parser.error('give --image or --video, not both: a turn holds images or one video')
    if args.prompt is None and (sys.stdin is None or sys.stdin.closed):   # (the model loaded, then a traceback)
        parser.error('no --prompt, and stdin is closed: there is nothing to read the conversation from; give '
                     '--prompt, or run it from a terminal or with a pipe')
    if args.prompt is not None and not args.prompt.strip():   # (asked as nothing; the web demo refuses it)
        parser.error('--prompt is empty: give a question (or leave --prompt out to chat interactively)')
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    with image_limit(args):
        return _chat(args)


def _chat(args) -> int:
    problem = image_problem(args.image)  # before the model loads
    if problem:
        return tool_error('chat', problem)
    for note in frame_notes(args.image):
        print(f'chat: note: {note}', file=sys.stderr)
    if args.video:
        try:
            probe_video(args.video)  # a bad file is named before the model loads (headers only)
        except SampleError as err:
            return tool_error('chat', str(err.with_source(args.video)))

    def answer(chat: ConvertedModel) -> None:
        # seeded once the model is loaded: building it from --checkpoint draws random numbers (its fresh layers'
        # initialisation), and --do-sample --seed N then answered otherwise than the converted folder with that seed
        torch.manual_seed(args.seed)
        video = None
        if args.video:  # decoded once the model says how many frames its context holds
            video, problem = video_frames(chat, args.video, args.frames)
            if problem:
                raise ValueError(problem)
        if args.prompt is None:
            interactive(chat, args.image, generation_settings(args), video, args.frames)
        else:
            generation = generation_settings(args)
            answer = chat.ask(args.prompt, args.image, generation, **with_video(video))
            print(answer)
            if empty_hint(answer, generation):  # on stderr: the output stays the answer alone
                print(empty_hint(answer, generation), file=sys.stderr)

    return run_tool(args, 'chat', answer, (ValueError, SampleError), image_size=args.image_size, max_num=args.max_num,
                    min_num=args.min_num, use_thumbnail=False if args.no_thumbnail else None)


if __name__ == '__main__':
    sys.exit(main())
