"""Evaluation: questions (``data``), the one scorer (``scoring``), asking and reporting (``evaluate``)."""

from .data import Question, read_mmbench_tsv, read_open_questions, read_questions
from .evaluate import BLANK, Report, Result, evaluate, score
from .hook import EvalHook, TrainingModelAnswerer
from .scoring import anls, exact_match, extract_option, normalize_answer

__all__ = ['BLANK', 'EvalHook', 'Question', 'TrainingModelAnswerer', 'Report', 'Result', 'anls', 'evaluate', 'exact_match', 'extract_option',
           'normalize_answer', 'read_mmbench_tsv', 'read_open_questions', 'read_questions', 'score']
