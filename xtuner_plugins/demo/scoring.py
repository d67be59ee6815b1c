"""The demo's answers and what they score: every held-out question asked through the converted folder and
scored by the project's one scorer (:func:`xtuner_plugins.eval.evaluate`, what ``tools/eval.py`` runs), with the
blind control; accuracies, the per-kind table and the summary line the demo ends with."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Dict, List, Optional, Sequence

from .console import Console

if TYPE_CHECKING:
    from .stages import StageResult

__all__ = ['Answer', 'DemoResult', 'PreferenceResult', 'SUMMARY_FORMAT', 'accuracy', 'answer_questions',
           'answer_table', 'kind_changes', 'per_kind', 'single_frame_accuracy', 'summary_line']

SUMMARY_FORMAT = 'demo accuracy: {accuracy:.3f} ({n} questions); blind control: {blind:.3f}'


@dataclass
class Answer:
    id: str
    kind: str
    question: str
    expected: str
    given: str
    blind: str = ''
    score: float = 0.0        # by the project's scorer (xtuner_plugins.eval): exact match after normalisation
    blind_score: float = 0.0
    single: Optional[str] = None          # a video question asked on its middle frame alone
    single_score: Optional[float] = None

    @property
    def correct(self) -> bool:
        return self.score == 1.0

    @property
    def blind_correct(self) -> bool:
        return self.blind_score == 1.0


def answer_questions(folder: str, test_path: str, image_folder: str, console: Console,
                     max_new_tokens: int = 8, num_frames: int = 8) -> List[Answer]:
    """Every question of ``test_path`` through the converted folder, loaded the way its format is meant to be
    (:class:`~xtuner_plugins.models.inference.ConvertedModel`: ``chat`` of the remote code, or transformers'
    LLaVA with its processor), and scored, by ``xtuner_plugins.eval`` (what ``tools/eval.py`` runs): once with
    its image, once with a blank grey image of the same size (the blind control; the scenes' background)."""
    import torch

    from xtuner_plugins.eval import evaluate, read_open_questions
    from xtuner_plugins.models.inference import ConvertedModel
    torch.manual_seed(0)
    model = ConvertedModel(folder)
    questions = read_open_questions(test_path, image_folder)
    step = max(1, len(questions) // 10)

    def progress(i, n, results):
        if i % step == 0 or i == n:
            console(f'  answered {i}/{n} ({sum(r.score == 1.0 for r in results)} right so far)')

    results = evaluate(model, questions, blind=True, max_new_tokens=max_new_tokens, progress=progress,
                       num_frames=num_frames)
    return [Answer(r.id, r.category, r.prompt.replace('<image>\n', '').replace('<video>\n', ''), r.reference,
                   r.answer, r.blind_answer, r.score, r.blind_score, r.single_answer, r.single_score)
            for r in results]


def single_frame_accuracy(answers: Sequence[Answer]) -> Optional[float]:
    """The video questions' accuracy on their middle frame alone (None without video questions)."""
    scores = [a.single_score for a in answers if a.single_score is not None]
    return sum(scores) / len(scores) if scores else None


def accuracy(answers: Sequence[Answer], blind: bool = False) -> float:
    if not answers:
        return 0.0
    return sum(a.blind_correct if blind else a.correct for a in answers) / len(answers)


def per_kind(answers: Sequence[Answer]) -> Dict[str, Dict[str, float]]:
    groups: Dict[str, List[Answer]] = defaultdict(list)
    for a in answers:
        groups[a.kind].append(a)
    return {k: {'n': len(v), 'accuracy': accuracy(v), 'blind': accuracy(v, blind=True)}
            for k, v in groups.items()}


def answer_table(answers: Sequence[Answer], max_rows: Optional[int] = 24) -> str:
    """A short table: a few questions of every kind with expected, given and blind answers, then per kind."""
    rows = []
    if max_rows is None:
        chosen = list(answers)
    else:
        by_kind: Dict[str, List[Answer]] = defaultdict(list)
        for a in answers:
            by_kind[a.kind].append(a)
        per = max(1, max_rows // max(1, len(by_kind)))
        chosen = [a for kind in by_kind for a in by_kind[kind][:per]]
    wq = max([len('question')] + [len(a.question) for a in chosen])
    header = f'  {"kind":<12} {"question":<{wq}}  {"expected":<9} {"given":<9} {"blind":<9}'
    rows.append(header)
    rows.append('  ' + '-' * (len(header) - 2))
    for a in chosen:
        mark = 'ok' if a.correct else 'WRONG'
        rows.append(f'  {a.kind:<12} {a.question:<{wq}}  {a.expected:<9} {a.given[:9]:<9} {a.blind[:9]:<9} {mark}')
    rows.append('')
    rows.append(f'  {"kind":<12} {"questions":>9} {"accuracy":>9} {"blind":>9}')
    for kind, s in per_kind(answers).items():
        rows.append(f'  {kind:<12} {s["n"]:>9d} {s["accuracy"]:>9.3f} {s["blind"]:>9.3f}')
    return '\n'.join(rows)


def kind_changes(before: Sequence[Answer], after: Sequence[Answer]) -> str:
    """Per kind, the questions answered right before and after a stage (the same questions), and the change,
    so that a loss on one kind cannot hide behind a gain on another."""
    counts: Dict[str, List[int]] = defaultdict(lambda: [0, 0, 0])   # kind -> questions, right before, after
    for a in before:
        counts[a.kind][0] += 1
        counts[a.kind][1] += a.correct
    for a in after:
        counts[a.kind][2] += a.correct
    rows = [f'  {"kind":<12} {"questions":>9} {"before":>7} {"after":>7} {"change":>7}']
    for kind, (n, was, now) in counts.items():
        rows.append(f'  {kind:<12} {n:>9d} {was:>7d} {now:>7d} {now - was:>+7d}')
    return '\n'.join(rows)


def summary_line(accuracy_value: float, n: int, blind_value: float) -> str:
    return SUMMARY_FORMAT.format(accuracy=accuracy_value, n=n, blind=blind_value)


@dataclass
class DemoResult:
    accuracy: float
    blind: float
    chance: float
    n: int
    answers: List[Answer]
    stages: Dict[str, StageResult]
    converted_dir: str
    converted_format: str
    work_dir: str
    wall_s: float
    timings: Dict[str, float]
    preference: Optional['PreferenceResult'] = None
    single: Optional[float] = None  # the video recipe: the single-frame control's accuracy

    def summary(self) -> str:
        line = summary_line(self.accuracy, self.n, self.blind)
        return line if self.single is None else f'{line}; single-frame control: {self.single:.3f}'


@dataclass
class PreferenceResult:
    accuracy: float          # held-out pairs whose chosen answer the policy's implicit reward prefers
    before: float            # the same before preference training
    n: int
    answers: List[Answer]    # the demo's questions, answered by the preference-trained model
    converted: str
    converted_format: str
    sft_accuracy: float = 0.0
    sft_answers: List[Answer] = field(default_factory=list)   # the same questions, before the stage
    pairs: Dict[str, Dict[str, int]] = field(default_factory=dict)  # training pairs per kind (pair_counts)
    by_kind: Dict[str, float] = field(default_factory=dict)          # held-out preference accuracy per kind

    def line(self) -> str:
        return (f'preference accuracy: {self.accuracy:.3f} ({self.n} held-out pairs); '
                f'before preference training: {self.before:.3f}')
