"""Evaluation: questions (``questions``; read by ``data``, a jsonl, and ``mmbench``, a TSV), the one scorer
(``scoring``), asking and reporting (``evaluate``), the answers file an interrupted ``tools/eval.py`` resumes from
(``answers``), and the evaluation during training (``hook``, imported on first use: ``tools/eval.py`` starts
without MMEngine's runner).
"""

from xtuner_plugins.lazy import lazy_exports

from .data import read_open_questions, read_questions
from .mmbench import read_mmbench_tsv
from .questions import Question, QuestionsError
from .evaluate import BLANK, Failure, Report, Result, evaluate, score
from .scoring import anls, exact_match, extract_option, normalize_answer

__all__ = ['BLANK', 'EvalHook', 'Failure', 'Question', 'QuestionsError', 'TrainingModelAnswerer', 'Report', 'Result',
           'anls', 'evaluate', 'exact_match', 'extract_option', 'normalize_answer', 'read_mmbench_tsv',
           'read_open_questions', 'read_questions', 'score']
__getattr__, __dir__ = lazy_exports(__name__, {'EvalHook': '.hook', 'TrainingModelAnswerer': '.hook'})
