"""Evaluate a vision-language model, and measure how much it relies on the image.

Usage::

    # open questions in the training format (the last gpt turn is the reference), exact match after VQA's
    # normalisation (or --metric anls)
    python tools/eval.py work_dirs/my_internvl --data data/test.jsonl --image-folder data/images --out report.json
    # multiple choice in MMBench's TSV layout (base64 images), with CircularEval
    python tools/eval.py work_dirs/my_internvl --data MMBench_DEV_EN.tsv --circular
    # the same ranked by each option's log-likelihood (nothing generated; small or mid-training models)
    python tools/eval.py work_dirs/my_internvl --data MMBench_DEV_EN.tsv --mc likelihood
    # straight from training: the checkpoint alone (it records its config)
    python tools/eval.py --checkpoint work_dirs/finetune_lora/iter_N.pth --data data/test.jsonl

Every question is asked greedily through the converted folder (any format: official, remote, llava, hf, or a GGUF
folder through llama.cpp; loaded as ``tools/chat.py`` loads it), then again with each image replaced by a blank one of the same size (the
blind control; ``--no-blind`` skips it). The console shows a per-category table; the last line is
``accuracy: A (N questions); blind: B; image reliance: R`` (reliance = accuracy - blind accuracy: what the
image adds). A jsonl sample with a ``video`` (and ``clip``) is a video question: asked with ``--frames`` frames
(one tile each, at the middles of equal spans), blind on blank frames, and again with every frame replaced by the
middle one (the single-frame control; ``--no-single-frame`` skips it): the last line adds ``videos: V (N),
single frame: F, time reliance: T`` (what the order of the frames adds). Multiple choice is read from the
generated answer as VLMEvalKit reads it: the option's letter,
else the option's text found in the answer; the line before the last counts each way (``multiple choice: L
read by the letter, T by the option's text, U unmatched``). ``--mc likelihood`` generates nothing for multiple
choice: each option's text is scored by the model's log-likelihood as the answer to the question without its
options (the sum over its tokens, as lm-eval-harness's ``acc``), and the likeliest is the choice. ``--out``
writes a JSON report with every answer, reference and score (and how each multiple-choice answer was read).

Nothing is asked before the input is checked: the data (every problem listed at once: duplicate ids, image
paths leaving ``--image-folder``, missing images or images whose header does not decode; see
``xtuner_plugins.eval.data``) and the output paths (their folders created; an output that is one of eval's
inputs, the data, an image or a model file, refused). Each answer is appended to the answers file as it comes
(``--answers``; by default ``OUT.answers.jsonl`` next to ``--out``, removed once the report is written): after an
interruption, the same command with ``--resume`` asks only the questions not answered yet (and again those whose
images were replaced since), and the report counts them all (``xtuner_plugins.eval.answers``). A question whose
image fails to decode when it is asked is not scored: named in the report (``FILE:LINE``) and counted on the
last line (``; K not scored``).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Iterator, Optional, Tuple

import torch

from xtuner_plugins.eval import Report, evaluate, read_questions
from xtuner_plugins.eval.data import context_note
from xtuner_plugins.eval.mmbench import rotations_note
from xtuner_plugins.eval.questions import first_questions, folder_markers
from xtuner_plugins.eval.evaluate import MC_MODES
from xtuner_plugins.eval.answers import AnswersFile, AnswersUnwritten, model_identity
from xtuner_plugins.eval.scoring import METRICS
from xtuner_plugins.models.inference import frames_note
from xtuner_plugins.cli.tool_args import (add_image_limit_argument, add_model_arguments, check_model_arguments,
                                          image_limit, run_tool, tool_error)


def count(text: str) -> int:
    """An argparse type: a whole number of at least 1 (``--limit -1`` asked 5 of 6 questions, ``--frames 0`` failed
    mid-run)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f'{text!r} is not a whole number') from None
    if value < 1:
        raise argparse.ArgumentTypeError(f'must be at least 1, got {value}')
    return value


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(p)
    p.add_argument('--data', required=True, help='a training-format .jsonl, or an MMBench-layout .tsv')
    p.add_argument('--image-folder', help='folder the jsonl\'s image paths are relative to (default: its folder)')
    p.add_argument('--metric', choices=sorted(METRICS), default='exact', help='open questions: exact or anls')
    p.add_argument('--circular', action='store_true', help='MMBench: ask every rotation of the options')
    p.add_argument('--mc', choices=MC_MODES, default='generate',
                   help='multiple choice: generate and read the answer (letter, else option text), or rank the '
                        'options by log-likelihood')
    blind = p.add_mutually_exclusive_group()
    blind.add_argument('--blind', dest='blind', action='store_true', default=True,
                       help='also ask on blank images (the default)')
    blind.add_argument('--no-blind', dest='blind', action='store_false', help='skip the blind control')
    p.add_argument('--frames', type=count, default=8, help='frames of each video question (default 8)')
    p.add_argument('--no-single-frame', dest='single_frame', action='store_false',
                   help='skip the single-frame control of video questions (every frame the middle one)')
    p.add_argument('--limit', type=count, default=None, help='the first N questions only (a circular question with all its '
                   'rotations)')
    p.add_argument('--max-new-tokens', type=count, default=64)
    p.add_argument('--batch-size', type=count, default=1,
                   help='questions per generation batch (one image each; others go one at a time)')
    p.add_argument('--out', help='write a JSON report here')
    p.add_argument('--answers', help='append each answer here as it comes (default with --out: OUT.answers.jsonl, '
                                     'removed once the report is written)')
    p.add_argument('--resume', action='store_true',
                   help='continue the evaluation whose answers file exists: ask only the questions not answered')
    add_image_limit_argument(p)
    args = p.parse_args(argv)
    check_model_arguments(p, args)  # --dtype and --device: checked by their types (add_model_arguments)
    if args.answers is None and args.out:
        args.answers = os.path.splitext(args.out)[0] + '.answers.jsonl'
        args.keep_answers = False
    else:
        args.keep_answers = True
    if args.answers and args.out and os.path.realpath(args.answers) == os.path.realpath(args.out):   # links too
        p.error('--answers and --out must be two files (the report would overwrite the answers)')
    if args.resume and not args.answers:
        p.error('--resume needs the answers file: --out (or --answers) as in the interrupted run')
    return args


def check_output(path: str) -> None:
    """``path`` can be written: its folder created, not a folder itself nor named as one (``newdir/``), not a device,
    a FIFO or a socket (``/dev/null``: the report replaces the file there); before anything is asked."""
    import stat
    if path.endswith(('/', os.sep)):
        raise OSError(f'{path}: names a folder; give a file name (such as {os.path.join(path, "report.json")})')
    try:
        mode = os.stat(path).st_mode
    except OSError:
        mode = None
    if mode is not None and not stat.S_ISREG(mode) and not stat.S_ISDIR(mode):
        raise OSError(f'{path}: not a regular file (a device, a FIFO or a socket), which eval would replace with '
                      f'its file; give a file name')
    # the folder of the file written: a link's target's (the report is written there, beside it), which a dangling
    # link's was not made for: the whole evaluation ran, then the report could not be written, again on --resume
    folder = os.path.dirname(os.path.realpath(path))
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as exc:
        raise OSError(f'{path}: cannot create its folder ({exc})') from None
    if os.path.isdir(path):
        raise OSError(f'{path}: is a folder; give a file name')
    if not os.access(folder, os.W_OK):
        raise OSError(f'{path}: its folder {folder} is not writable')


REPORT_START = '{\n "settings": '  # how every report eval writes begins (Report.write: json.dump, indent 1)


def check_report(path: str) -> None:
    """An existing ``--out`` is replaced only when it is an earlier report of eval: another file there (notes,
    another tool's results) was written over without a word."""
    if not os.path.isfile(path):
        return
    try:
        with open(path, 'rb') as f:
            start = f.read(len(REPORT_START)).decode('utf-8', 'replace')
    except OSError as exc:
        raise OSError(f'--out {path}: cannot read it ({exc.strerror or exc})') from None
    if start != REPORT_START and os.path.getsize(path):
        raise OSError(f'--out {path} exists and is not a report of tools/eval.py (it starts {start!r}): eval '
                      f'would write over it; give another path, or remove the file')


def inputs(args, questions) -> Iterator[Tuple[str, str]]:
    """``(what, path)`` of every file eval reads: the data, each question's images or video, the model (a folder's
    files, or the config and checkpoint; a folder walked)."""
    yield f'the --data file {args.data}', args.data
    for q in questions:
        for image in q.images:
            if isinstance(image, str):
                yield f'an image of {q.source} ({image})', image
        if q.video:
            yield f'the video of {q.source} ({q.video})', q.video
            if os.path.isdir(q.video):   # a folder of frames: each file in it
                for name in sorted(os.listdir(q.video)):
                    yield f'a frame of the video of {q.source} ({os.path.join(q.video, name)})', os.path.join(
                        q.video, name)
    for what, path in (('the model folder', args.folder), ('the --config file', args.config),
                       ('the --checkpoint', args.checkpoint)):
        if path and os.path.isdir(path):
            for root, _, files in os.walk(path):
                for name in files:
                    yield f'{os.path.join(root, name)} of {what} {path}', os.path.join(root, name)
        elif path:
            yield f'{what} {path}', path


def check_not_inputs(args, questions) -> None:
    """No output (``--out``, the answers file) is one of eval's inputs, symlinks and hard links included (the
    report written over the data file once lost it, exit 0), nor a new file in a video's frame folder (read as one
    of its frames next time), nor a file inside the model's folder. Checked before the model loads."""
    named = [(f'--out {args.out}', args.out), (f'the answers file {args.answers}', args.answers)]
    outputs = [(name, path, os.stat(path)) for name, path in named if path and os.path.exists(path)]
    if len(outputs) == 2 and os.path.samestat(outputs[0][2], outputs[1][2]):
        raise ValueError(f'--out {args.out} and --answers {args.answers} are one file (the report would overwrite '
                         f'the answers); give two')
    for what, path in inputs(args, questions) if outputs else ():
        try:
            st = os.stat(path)
        except OSError:
            continue
        for name, out, out_st in outputs:
            if os.path.samestat(st, out_st):
                raise ValueError(f'{name} is {what}: eval would write over its input; give another path')
    for where, folder in (('the model folder', args.folder), ('the --checkpoint folder', args.checkpoint)):
        inside = folder and os.path.isdir(folder) and [
            name for name, path in named if path and os.path.realpath(path).startswith(
                os.path.join(os.path.realpath(folder), ''))]
        if inside:   # a new file there too: the resume that follows would read it as one of the model's
            raise ValueError(f'{inside[0]} is inside {where} {folder}: eval would add a file to the model it reads; '
                             f'give a path outside it')
    from xtuner_plugins.data.video import FRAME_EXTENSIONS
    folders = {}
    for q in questions:
        if q.video and isinstance(q.video, str) and os.path.isdir(q.video):
            folders.setdefault(os.path.realpath(q.video), q)
    for name, path in named:   # where the file lands (through a link): a frame there when its name is one
        real = os.path.realpath(path) if path else ''
        q = folders.get(os.path.dirname(real)) if real.lower().endswith(FRAME_EXTENSIONS) else None
        if q is not None:
            raise ValueError(f'{name} is in the frame folder of the video of {q.source} ({q.video}), named as a '
                             f'frame: eval would add a frame to its input; give another path')


class NoneScored(ValueError):
    """Every question failed when asked (a wrong image folder, prompts over the LLM's context): eval fails."""


class ReportUnwritten(ValueError):
    """The report could not be written once every question was asked (a full disk): eval fails, the answers kept."""


def checkpoint_llm(args) -> Optional[str]:
    """The LLM folder a ``--checkpoint`` was trained with (its recorded config, found as the conversion finds it), for
    its tokenizer's special tokens; None without a checkpoint, or when it does not say (the conversion then names
    what is wrong)."""
    if not args.checkpoint:
        return None
    from xtuner_plugins.models.runconfig import parse_remap, run_config
    try:
        llm = run_config(args.checkpoint, args.config, args.cfg_options, parse_remap(args.remap),
                         log=lambda m: None).model.get('llm')
    except Exception:   # noqa: BLE001 -- said by the conversion, in its words
        return None
    return llm if isinstance(llm, str) else None


def settings(args) -> dict:
    """What an evaluation's answers depend on: resuming needs the same."""
    model = os.path.abspath(args.folder or args.checkpoint)  # a checkpoint records its config
    return dict(model=model, model_files=model_identity(model),
                cfg_options=args.cfg_options, dtype=args.dtype, data=os.path.abspath(args.data),
                image_folder=args.image_folder and os.path.abspath(args.image_folder), metric=args.metric,
                circular=args.circular, blind=args.blind, max_new_tokens=args.max_new_tokens, frames=args.frames,
                single_frame=args.single_frame, mc=args.mc)


def shown_of(sources) -> str:
    """The first three of ``sources``, and how many more."""
    return ', '.join(sources[:3]) + (f' and {len(sources) - 3} more' if len(sources) > 3 else '')


def main(argv=None) -> int:
    args = parse_args(argv)
    with image_limit(args):
        return _evaluate(args)


def mc_note(mc: str, questions) -> str:
    """A line when ``--mc likelihood`` is given and no question is multiple choice (a jsonl holds open questions
    only): the option changed nothing, and the answers were generated without a word of it."""
    if mc != 'likelihood' or any(q.options for q in questions):
        return ''
    return (f'--mc likelihood: none of the {len(questions)} questions is multiple choice (options A, B, ...: an '
            'MMBench-layout .tsv); each is answered by generation')


def _evaluate(args) -> int:
    try:
        for path in (args.out, args.answers):
            if path:
                check_output(path)
        questions = read_questions(args.data, args.image_folder, circular=args.circular,
                                   markers=folder_markers(args.folder or checkpoint_llm(args)))   # its tokenizer's
        # special tokens: refused before a --checkpoint is converted (minutes at real size), as for a folder
        check_not_inputs(args, questions)
        if args.out:
            check_report(args.out)
        answers = AnswersFile(args.answers, settings(args), args.resume) if args.answers else None
        if answers is not None:
            answers.check(questions)
    except (OSError, ValueError) as exc:
        return tool_error('eval', exc)
    questions = first_questions(questions, args.limit)
    for note in (context_note(questions), rotations_note(questions), mc_note(args.mc, questions)):
        if note:
            print(note, file=sys.stderr)
    todo = [q for q in questions if answers is None or q.id not in answers.done]
    if answers is not None and answers.changed:
        print(f'resuming {args.answers}: {len(answers.changed)} kept answers dropped and asked again: their images '
              f'changed since they were answered (size or modification time): {shown_of(answers.changed)}',
              file=sys.stderr)
    if answers is not None and answers.rescored:
        print(f'resuming {args.answers}: {len(answers.rescored)} kept answers scored again: the score recorded was '
              f'not that of the answer there (the file edited since?): {shown_of(answers.rescored)}', file=sys.stderr)
    if len(todo) < len(questions):
        print(f'resuming {args.answers}: {len(questions) - len(todo)} of {len(questions)} questions answered, '
              f'asking the other {len(todo)}', file=sys.stderr, flush=True)
    torch.manual_seed(0)

    def run(model) -> None:
        note = frames_note(getattr(model, 'config', None), args.frames if any(q.video for q in todo) else None)
        if note:
            print(f'eval: note: {note}', file=sys.stderr)
        start = time.perf_counter()
        step = max(1, len(todo) // 20)
        printed = [0]

        def progress(i, n, results):
            if i // step > printed[0] or i == n:
                printed[0] = i // step
                right = sum(r.score for r in results)
                print(f'  {i}/{n} questions, {right:.0f} right so far, {i / (time.perf_counter() - start):.2f} '
                      f'questions/s', file=sys.stderr, flush=True)

        failures = []
        results = evaluate(model, todo, blind=args.blind, metric=args.metric, max_new_tokens=args.max_new_tokens,
                           batch_size=args.batch_size, progress=progress, failures=failures,
                           on_answer=answers and answers.append, num_frames=args.frames,
                           single_frame=args.single_frame, mc=args.mc)
        report = Report(answers.results(questions, results) if answers else results, failures)
        unwritten = None
        if args.out:
            try:
                report.write(args.out, folder=args.folder or args.checkpoint, data=args.data,
                             metric=args.metric, circular=args.circular, blind=args.blind, mc=args.mc)
            except OSError as exc:   # a full disk after the last question: said below, the answers kept
                unwritten = exc
        if answers is not None:
            answers.close()
            beyond = answers.beyond(questions)   # answers --limit left out of the report: the file keeps them
            if not args.keep_answers and unwritten is None and not beyond:
                os.remove(args.answers)  # the report holds every answer
            elif beyond and not args.keep_answers:
                print(f'{args.answers} is kept: it holds {beyond} answers to questions past --limit, which the report '
                      f'leaves out', file=sys.stderr)
        if failures:
            print(report.not_scored())
        print(report.table())
        if report.read_line():
            print(report.read_line())
        print(report.closing_line())
        if unwritten is not None:
            raise ReportUnwritten(f'the report {args.out} could not be written ({unwritten})' + (
                f'; the answers are kept in {args.answers}: the same command with --resume writes it without '
                f'asking them again' if answers is not None else ''))
        if failures and not report.results:  # nothing scored, this run or a resumed one's: not a result
            first = failures[0]
            raise NoneScored(f'none of the {len(failures)} questions could be scored; the first, {first.source}: '
                             f'{first.message} [{first.reason}]')

    def kept(answers) -> str:
        """What an interrupted evaluation leaves to resume from (nothing: the file goes, below)."""
        n = len(answers.done) + answers.written
        if not n and not args.keep_answers:
            return 'no answer was kept; the same command starts again'
        return f'{n} answers are kept in {args.answers}: the same command with --resume asks the rest'

    try:
        code = run_tool(args, 'eval', run, (NoneScored, ReportUnwritten, AnswersUnwritten))
        if code == 143 and answers is not None:   # SIGTERM: run_tool said so; what is kept, as for Ctrl-C
            print(f'eval: {kept(answers)}', file=sys.stderr)
        return code
    except KeyboardInterrupt:
        if answers is None:
            print('eval: interrupted (no answers file kept: give --out or --answers to resume)', file=sys.stderr)
        else:
            print(f'eval: interrupted; {kept(answers)}', file=sys.stderr)
        return 130
    finally:
        if answers is not None:
            answers.close()
            if not answers.done and not answers.written and not args.keep_answers and os.path.isfile(args.answers):
                os.remove(args.answers)  # the settings line alone (the model did not load): nothing to resume


if __name__ == '__main__':
    sys.exit(main())
