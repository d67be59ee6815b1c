"""The embedded demo: synthetic shapes-and-digits data that a tiny InternVL-style model learns on a CPU."""

from .data import make_demo_data
from .questions import QUESTIONS, chance_accuracy, read_questions
from .scenes import ANSWERS, KINDS

__all__ = ['ANSWERS', 'KINDS', 'QUESTIONS', 'chance_accuracy', 'make_demo_data', 'read_questions']
