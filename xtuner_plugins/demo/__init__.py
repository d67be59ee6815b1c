"""The embedded demo: synthetic shapes-and-digits data that a tiny InternVL-style model learns on a CPU."""

from .data import ANSWERS, KINDS, QUESTIONS, chance_accuracy, make_demo_data, read_questions

__all__ = ['ANSWERS', 'KINDS', 'QUESTIONS', 'chance_accuracy', 'make_demo_data', 'read_questions']
