"""Ask every question, score the answers, and tell how much the model relies on the image.

``evaluate(model, questions)`` asks each :class:`~xtuner_plugins.eval.data.Question` through a model with an
``ask(prompt, images, generation)`` and a ``reset()`` (:class:`~xtuner_plugins.models.inference.ConvertedModel`:
every export format), greedily, one question at a time, and with ``blind=True`` once more with every image
replaced by a blank one of the same size (mid grey: zero after the usual normalisation). The blind accuracy is
what the model gets from the text alone; **image reliance** = accuracy - blind accuracy.

Open questions are scored by :data:`~xtuner_plugins.eval.scoring.METRICS` (``exact`` or ``anls``); multiple
choice by the option read from the answer; circular groups count right when every rotation is.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from PIL import Image

from .data import Question
from .scoring import METRICS, extract_option

__all__ = ['Result', 'Report', 'evaluate', 'score', 'BLANK']

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


def score(question: Question, answer: str, metric: str = 'exact') -> float:
    if question.multiple_choice:
        return float(extract_option(answer, question.options) == question.references[0])
    return METRICS[metric](answer, question.references)


def _blank(image) -> Image.Image:
    size = image.size if isinstance(image, Image.Image) else Image.open(image).size
    return Image.new('RGB', size, BLANK)


def evaluate(model, questions: Sequence[Question], blind: bool = True, metric: str = 'exact',
             max_new_tokens: int = 64, batch_size: int = 1,
             progress: Optional[Callable[[int, int, List[Result]], None]] = None) -> List[Result]:
    """Ask every question (``batch_size`` at a time through ``model.ask_batch`` where the model has it) and
    score the answers; with ``blind``, ask again on blank images."""
    if metric not in METRICS:
        raise ValueError(f'unknown metric {metric!r}; use one of {sorted(METRICS)}')
    generation = dict(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1)
    pad = getattr(getattr(model, 'tokenizer', None), 'pad_token_id', None)
    if pad is not None:
        generation['pad_token_id'] = pad

    def answer(batch: Sequence[Question], images: Sequence[list]) -> List[str]:
        if batch_size > 1 and hasattr(model, 'ask_batch'):
            return model.ask_batch([q.prompt for q in batch], images, generation)
        out = []
        for q, imgs in zip(batch, images):
            model.reset()
            out.append(model.ask(q.prompt, imgs, generation))
        model.reset()
        return out

    results: List[Result] = []
    for start in range(0, len(questions), max(1, batch_size)):
        batch = questions[start:start + max(1, batch_size)]
        answers = answer(batch, [list(q.images) for q in batch])
        blinds = answer(batch, [[_blank(im) for im in q.images] for q in batch]) if blind else [None] * len(batch)
        for q, given, blank in zip(batch, answers, blinds):
            results.append(Result(q.id, q.category, q.prompt, q.references[0], given, score(q, given, metric),
                                  blank, None if blank is None else score(q, blank, metric), group=q.group))
        if progress is not None:
            progress(len(results), len(questions), results)
    return results


class Report:
    """Accuracy (mean score), blind accuracy and image reliance, overall and per category; circular groups
    count once, right only when every rotation is."""

    def __init__(self, results: Sequence[Result]):
        self.results = list(results)
        self.blind = bool(self.results) and all(r.blind_score is not None for r in self.results)

    def _units(self, results) -> List[Tuple[str, float, Optional[float]]]:
        groups: Dict[str, List[Result]] = defaultdict(list)
        for r in results:
            groups[r.group or r.id].append(r)
        return [(g[0].category, min(r.score for r in g),
                 min(r.blind_score for r in g) if self.blind else None) for g in groups.values()]

    def summary(self, results=None) -> Dict[str, float]:
        units = self._units(self.results if results is None else results)
        n = len(units)
        out = dict(n=n, accuracy=sum(u[1] for u in units) / n if n else 0.0)
        if self.blind:
            out['blind'] = sum(u[2] for u in units) / n if n else 0.0
            out['reliance'] = out['accuracy'] - out['blind']
        return out

    def per_category(self) -> Dict[str, Dict[str, float]]:
        by: Dict[str, List[Result]] = defaultdict(list)
        for r in self.results:
            by[r.category].append(r)
        return {c: self.summary(rs) for c, rs in sorted(by.items())}

    def closing_line(self) -> str:
        s = self.summary()
        line = f'accuracy: {s["accuracy"]:.3f} ({s["n"]} questions)'
        if self.blind:
            line += f'; blind: {s["blind"]:.3f}; image reliance: {s["reliance"]:.3f}'
        return line

    def table(self) -> str:
        rows = [f'  {"category":<24} {"questions":>9} {"accuracy":>9}' + (f' {"blind":>9} {"reliance":>9}'
                                                                         if self.blind else '')]
        for category, s in list(self.per_category().items()) + [('(all)', self.summary())]:
            row = f'  {category[:24]:<24} {s["n"]:>9d} {s["accuracy"]:>9.3f}'
            if self.blind:
                row += f' {s["blind"]:>9.3f} {s["reliance"]:>9.3f}'
            rows.append(row)
        return '\n'.join(rows)

    def write(self, path: str, **settings) -> None:
        with open(path, 'w', encoding='utf-8') as f:
            json.dump(dict(settings=settings, summary=self.summary(), per_category=self.per_category(),
                           results=[asdict(r) for r in self.results]), f, indent=1, ensure_ascii=False)
