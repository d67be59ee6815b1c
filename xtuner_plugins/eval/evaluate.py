"""Ask every question, score the answers, and tell how much the model relies on the image.

``evaluate(model, questions)`` asks each :class:`~xtuner_plugins.eval.questions.Question` through a model with an
``ask(prompt, images, generation)`` and a ``reset()`` (:class:`~xtuner_plugins.models.inference.ConvertedModel`:
every export format), greedily, one question at a time, and with ``blind=True`` once more with every image
replaced by a blank one of the same size (mid grey: zero after the usual normalisation). The blind accuracy is
what the model gets from the text alone; **image reliance** = accuracy - blind accuracy. A video question
(``Question.video``) is asked with ``num_frames`` frames (``middle`` sampling, one tile each, ``ask(...,
video=frames)``); its blind control blanks every frame, and with ``single_frame=True`` it is asked once more with
every frame replaced by the middle one: **time reliance** = accuracy - single-frame accuracy, what the order of
the frames adds (over the video questions).

Open questions are scored by :data:`~xtuner_plugins.eval.scoring.METRICS` (``exact`` or ``anls``); multiple
choice (``mc='generate'``) by the option read from the answer as VLMEvalKit reads it (its letter, else the
option's text; :func:`~xtuner_plugins.eval.scoring.read_option`), each result saying how (``read_by``), which
the report counts; circular groups count right when every rotation is. ``mc='likelihood'`` generates nothing for
multiple choice: the model's ``option_logprobs(stem, images, texts)`` gives the log-likelihood of each option's
text as the answer to the question without its options (lm-eval-harness's way), and the highest is the choice
(``read_by`` ``likelihood``, the figures in ``option_scores``): a model that never learned to answer with a
letter, or one in mid-training, is still measured.

Given a ``failures`` list, a question whose image fails to decode when it is asked (a truncated file whose
header reads) becomes a :class:`Failure` there (counted and named in the :class:`Report`, with its circular
group left out of the scores) instead of stopping the evaluation; ``on_answer`` sees every result and failure
as it comes (``tools/eval.py`` appends them to its answers file).
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

from PIL import Image

from xtuner_plugins.data.errors import SampleError
from xtuner_plugins.data.image_io import read_image_size
from xtuner_plugins.data.video import load_video
from xtuner_plugins.models.prompt import NoVideo, PromptTooLong

from .questions import Question
from .scoring import METRICS, READ_BY, read_option

__all__ = ['Result', 'Failure', 'Report', 'Ranked', 'evaluate', 'judge', 'score', 'BLANK', 'MC_MODES']

#: How multiple choice is answered: generated and read (``generate``), or ranked by likelihood.
MC_MODES = ('generate', 'likelihood')

BLANK: Tuple[int, int, int] = (128, 128, 128)


@dataclass
class Result:
    id: str
    category: str
    prompt: str
    reference: str
    answer: str
    score: float
    blind_answer: Optional[str] = None
    blind_score: Optional[float] = None
    group: str = ''
    source: str = ''
    single_answer: Optional[str] = None  # a video question asked on its middle frame only
    single_score: Optional[float] = None
    read_by: str = ''  # multiple choice: letter, text, unmatched (generated) or likelihood
    option_scores: Optional[Dict[str, float]] = None  # --mc likelihood: each option's log-likelihood


@dataclass
class Ranked:
    """A multiple-choice answer by likelihood: the letter of the likeliest option, and each option's figure."""
    letter: str
    scores: Dict[str, float]

    def __str__(self) -> str:
        return self.letter


@dataclass
class Failure:
    """A question that could not be asked: not scored, counted and named."""
    id: str
    category: str
    source: str
    reason: str
    message: str
    group: str = ''

    def __str__(self) -> str:
        return f'{self.source} (id {self.id}): {self.message} [{self.reason}]'


def judge(question: Question, answer: Union[str, Ranked], metric: str = 'exact') -> Tuple[float, str]:
    """``(score, read_by)``: ``read_by`` says how a multiple-choice answer was read ('' for open questions)."""
    if isinstance(answer, Ranked):
        return float(answer.letter == question.references[0]), 'likelihood'
    if question.multiple_choice:
        letter, how = read_option(answer, question.options)
        return float(letter == question.references[0]), how
    return METRICS[metric](answer, question.references), ''


def score(question: Question, answer: Union[str, Ranked], metric: str = 'exact') -> float:
    return judge(question, answer, metric)[0]


def rank_options(model, question: Question, images) -> Ranked:
    """The question's options ranked by ``model.option_logprobs`` on its stem (module docstring)."""
    letters = list(question.options)
    figures = model.option_logprobs(question.stem or question.prompt, images,
                                    [question.options[k] for k in letters])
    scores = {k: float(v) for k, v in zip(letters, figures)}
    return Ranked(max(letters, key=lambda k: scores[k]), scores)


def _blank(image) -> Image.Image:
    size = image.size if isinstance(image, Image.Image) else read_image_size(image)
    return Image.new('RGB', size, BLANK)


def evaluate(model, questions: Sequence[Question], blind: bool = True, metric: str = 'exact',
             max_new_tokens: int = 64, batch_size: int = 1,
             progress: Optional[Callable[[int, int, List[Result]], None]] = None,
             failures: Optional[List[Failure]] = None,
             on_answer: Optional[Callable[[Union[Result, Failure]], None]] = None,
             num_frames: int = 8, single_frame: bool = True, mc: str = 'generate') -> List[Result]:
    """Ask every question (``batch_size`` at a time through ``model.ask_batch`` where the model has it) and
    score the answers; with ``blind``, ask again on blank images; multiple choice as ``mc`` says (module
    docstring). A :class:`SampleError` while asking goes to ``failures`` when given (the module docstring), else
    it is raised."""
    if metric not in METRICS:
        raise ValueError(f'unknown metric {metric!r}; use one of {sorted(METRICS)}')
    if mc not in MC_MODES:
        raise ValueError(f'unknown multiple-choice mode {mc!r}; use one of {", ".join(MC_MODES)}')
    generation = dict(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1)
    pad = getattr(getattr(model, 'tokenizer', None), 'pad_token_id', None)
    if pad is not None:
        generation['pad_token_id'] = pad

    frames_of: Dict[int, list] = {}

    def frames(q: Question) -> list:  # a video question's frames, read once for the question and its controls
        if id(q) not in frames_of:
            frames_of.clear()
            frames_of[id(q)] = load_video(q.video, num_frames, 'middle', q.clip,  # frames over the context
                                          check=getattr(model, 'check_video', None))[0]  # refused before decoding
        return frames_of[id(q)]

    def ask(q: Question, images) -> Union[str, Ranked, SampleError]:
        model.reset()
        try:
            images = images() if callable(images) else images
            if q.video is not None:
                return model.ask(q.prompt, [], generation, video=images)
            if mc == 'likelihood' and q.multiple_choice:
                return rank_options(model, q, images)
            return model.ask(q.prompt, images, generation)
        except SampleError as err:
            if failures is None:
                raise
            return err
        except PromptTooLong as err:  # this question's prompt is too long: counted, the others still asked
            if failures is None:
                raise
            return SampleError('too_long', err.message(tiles=None))
        except NoVideo as err:  # a video question to a folder that reads none: counted, the images still asked
            if failures is None:
                raise
            return SampleError('no_video', str(err))

    def answer(batch: Sequence[Question], images: Sequence) -> List[Union[str, SampleError]]:
        ranked = mc == 'likelihood' and any(q.multiple_choice for q in batch)
        if batch_size > 1 and len(batch) > 1 and hasattr(model, 'ask_batch') and not ranked \
                and not any(q.video for q in batch):
            try:
                return model.ask_batch([q.prompt for q in batch], [i() if callable(i) else i for i in images],
                                       generation)
            except (SampleError, PromptTooLong):
                if failures is None:
                    raise  # else one at a time, to tell which question it was
        out = [ask(q, imgs) for q, imgs in zip(batch, images)]
        model.reset()
        return out

    results: List[Result] = []
    done = 0
    for start in range(0, len(questions), max(1, batch_size)):
        batch = questions[start:start + max(1, batch_size)]
        answers = answer(batch, [(lambda q=q: frames(q)) if q.video else list(q.images) for q in batch])
        asked = [(q, a) for q, a in zip(batch, answers) if not isinstance(a, SampleError)]
        blinds = (answer([q for q, _ in asked], [lambda q=q: [_blank(im) for im in (frames(q) if q.video else q.images)]
                                                 for q, _ in asked]) if blind else [None] * len(asked))
        blinds = iter(blinds)
        videos = [q for q, _ in asked if q.video] if single_frame else []
        singles = dict(zip(map(id, videos), answer(videos, [lambda q=q: [frames(q)[len(frames(q)) // 2]] * len(
            frames(q)) for q in videos])))
        for q, given in zip(batch, answers):
            blank = None if isinstance(given, SampleError) else next(blinds)
            single = singles.get(id(q))
            error = next((e for e in (given, blank, single) if isinstance(e, SampleError)), None)
            if error is not None:
                item = Failure(q.id, q.category, q.source, error.reason, error.message, q.group)
                failures.append(item)
            else:
                value, how = judge(q, given, metric)
                item = Result(q.id, q.category, q.prompt, q.references[0], str(given), value,
                              None if blank is None else str(blank), None if blank is None else score(q, blank, metric),
                              group=q.group, source=q.source, read_by=how,
                              option_scores=given.scores if isinstance(given, Ranked) else None,
                              single_answer=None if single is None else str(single),
                              single_score=None if single is None else score(q, single, metric))
                results.append(item)
            if on_answer is not None:
                on_answer(item)
        done += len(batch)
        if progress is not None:
            progress(done, len(questions), results)
    return results


class Report:
    """Accuracy (mean score), blind accuracy and image reliance, overall and per category; circular groups
    count once, right only when every rotation is. ``failures``: the questions not scored (a group with one
    is left out whole), counted as ``not_scored`` and named."""

    def __init__(self, results: Sequence[Result], failures: Sequence[Failure] = ()):
        self.results, self.failures = list(results), list(failures)
        self.blind = bool(self.results) and all(r.blind_score is not None for r in self.results)
        self.single = any(r.single_score is not None for r in self.results)

    def _units(self, results) -> List[Tuple[str, float, Optional[float]]]:
        failed = {f.group or f.id for f in self.failures}
        groups: Dict[str, List[Result]] = defaultdict(list)
        for r in results:
            if (r.group or r.id) not in failed:
                groups[r.group or r.id].append(r)
        return [(g[0].category, min(r.score for r in g),
                 min(r.blind_score for r in g) if self.blind else None) for g in groups.values()]

    def summary(self, results=None, category: Optional[str] = None) -> Dict[str, float]:
        units = self._units(self.results if results is None else results)
        n = len(units)
        out = dict(n=n, accuracy=sum(u[1] for u in units) / n if n else 0.0)
        if self.blind:
            out['blind'] = sum(u[2] for u in units) / n if n else 0.0
            out['reliance'] = out['accuracy'] - out['blind']
        videos = [r for r in (self.results if results is None else results) if r.single_score is not None]
        if self.single and videos:  # over the video questions (circular groups are multiple choice, not videos)
            out['videos'] = len(videos)
            out['video_accuracy'] = sum(r.score for r in videos) / len(videos)
            out['single_frame'] = sum(r.single_score for r in videos) / len(videos)
            out['time_reliance'] = out['video_accuracy'] - out['single_frame']
        if self.failures:
            out['not_scored'] = len({f.group or f.id for f in self.failures
                                     if category is None or f.category == category})
        out.update(self.read_counts(self.results if results is None else results))
        return out

    @staticmethod
    def read_counts(results: Sequence[Result]) -> Dict[str, int]:
        """How the multiple-choice answers were read, each answer (each rotation) once: ``by_letter``,
        ``by_text``, ``unmatched`` for generated answers, ``by_likelihood`` for ranked ones; empty without
        multiple choice."""
        hows = [r.read_by for r in results if r.read_by]
        out = {}
        if any(h in READ_BY for h in hows):
            out.update({('unmatched' if h == 'unmatched' else f'by_{h}'): hows.count(h) for h in READ_BY})
        if 'likelihood' in hows:
            out['by_likelihood'] = hows.count('likelihood')
        return out

    def read_line(self) -> str:
        """``multiple choice: L read by the letter, T by the option's text, U unmatched`` (or ``N ranked by
        likelihood``); empty without multiple choice."""
        counts = self.read_counts(self.results)
        parts = []
        if 'by_letter' in counts:
            parts.append(f'{counts["by_letter"]} read by the letter, {counts["by_text"]} by the option\'s text, '
                         f'{counts["unmatched"]} unmatched')
        if 'by_likelihood' in counts:
            parts.append(f'{counts["by_likelihood"]} ranked by likelihood')
        return 'multiple choice: ' + '; '.join(parts) if parts else ''

    def per_category(self) -> Dict[str, Dict[str, float]]:
        by: Dict[str, List[Result]] = defaultdict(list)
        for r in self.results:
            by[r.category].append(r)
        for f in self.failures:
            by.setdefault(f.category, [])
        return {c: self.summary(rs, c) for c, rs in sorted(by.items())}

    def closing_line(self) -> str:
        s = self.summary()
        line = f'accuracy: {s["accuracy"]:.3f} ({s["n"]} questions)'
        if self.blind:
            line += f'; blind: {s["blind"]:.3f}; image reliance: {s["reliance"]:.3f}'
        if 'videos' in s:
            line += (f'; videos: {s["video_accuracy"]:.3f} ({s["videos"]}), single frame: {s["single_frame"]:.3f}, '
                     f'time reliance: {s["time_reliance"]:.3f}')
        if self.failures:
            line += f'; {s["not_scored"]} not scored'
        return line

    def not_scored(self) -> str:
        """One line per question not scored (empty when none)."""
        return '\n'.join(f'not scored: {f}' for f in self.failures)

    def table(self) -> str:
        rows = [f'  {"category":<24} {"questions":>9} {"accuracy":>9}' + (f' {"blind":>9} {"reliance":>9}'
                                                                         if self.blind else '')
                + (f' {"not scored":>10}' if self.failures else '')]
        categories = self.per_category()
        if list(categories) == ['all']:   # questions without categories: their one row would repeat (all)'s
            categories = {}
        for category, s in list(categories.items()) + [('(all)', self.summary())]:
            row = f'  {category[:24]:<24} {s["n"]:>9d} {s["accuracy"]:>9.3f}'
            if self.blind:
                row += f' {s["blind"]:>9.3f} {s["reliance"]:>9.3f}'
            if self.failures:
                row += f' {s["not_scored"]:>10d}'
            rows.append(row)
        return '\n'.join(rows)

    def write(self, path: str, **settings) -> None:
        """The report as JSON at ``path``, whole or not at all (written beside it, then moved over it: an
        interrupted or failed write leaves an earlier report as it was)."""
        path = os.path.realpath(path)  # a link's target is replaced, not the link
        part = f'{path}.part-{os.getpid()}'
        try:
            with open(part, 'w', encoding='utf-8') as f:
                json.dump(dict(settings=settings, summary=self.summary(), per_category=self.per_category(),
                               results=[asdict(r) for r in self.results],
                               not_scored=[asdict(f) for f in self.failures]), f, indent=1, ensure_ascii=False)
            os.replace(part, path)
        finally:
            if os.path.exists(part):
                os.remove(part)
