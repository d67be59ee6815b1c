"""evaluate() and Report with a question that fails when asked: counted and named, its circular group left out
whole, the other questions scored; a batch with it answered one at a time to tell which; without a
``failures`` list (the training hook: equal forward counts on every rank) the error stops the evaluation."""

import pytest
from PIL import Image

from xtuner_plugins.data.errors import SampleError
from xtuner_plugins.data.image_io import load_image
from xtuner_plugins.eval import Failure, Question, Report, evaluate


class Model:
    """Answers 'A' to everything; an image named 'bad' fails as a truncated file does."""

    def __init__(self):
        self.batches = 0

    def reset(self):
        pass

    def ask(self, prompt, images, generation):
        if 'bad' in images:
            raise SampleError('corrupt_image', 'cannot decode image bad: image file is truncated')
        return 'A'

    def ask_batch(self, prompts, images, generation):
        self.batches += 1
        return [self.ask(p, i, generation) for p, i in zip(prompts, images)]


def questions():
    options = {'A': 'red', 'B': 'green'}
    out = [Question(f'{g}-{s}', 'c', 'Which?', [Image.new('RGB', (4, 4))], ['A'], options, group=str(g),
                    source=f'm.tsv:{g + 2}') for g in range(3) for s in range(2)]
    out[3].images = ['bad']  # the second rotation of group 1
    return out


@pytest.mark.parametrize('batch_size', [1, 4])
def test_a_failed_question_leaves_its_group_out_and_is_named(batch_size):
    failures, seen = [], []
    results = evaluate(Model(), questions(), blind=False, batch_size=batch_size, failures=failures,
                       on_answer=seen.append)
    assert [r.id for r in results] == ['0-0', '0-1', '1-0', '2-0', '2-1']
    assert failures == [Failure('1-1', 'c', 'm.tsv:3', 'corrupt_image',
                                'cannot decode image bad: image file is truncated', '1')]
    assert [getattr(x, 'id') for x in seen] == ['0-0', '0-1', '1-0', '1-1', '2-0', '2-1']
    report = Report(results, failures)
    # group 1 neither right nor wrong; each answer 'A' read by its letter
    assert report.summary() == dict(n=2, accuracy=1.0, not_scored=1, by_letter=5, by_text=0, unmatched=0)
    assert report.closing_line() == 'accuracy: 1.000 (2 questions); 1 not scored'
    assert report.not_scored() == 'not scored: m.tsv:3 (id 1-1): cannot decode image bad: image file is ' \
                                  'truncated [corrupt_image]'


@pytest.mark.parametrize('batch_size', [1, 4])
def test_a_question_too_long_for_the_context_is_counted_not_the_end_of_the_run(batch_size):
    """A prompt over the LLM's context (a long question, a video of many frames) is that question's problem: it is
    named and counted as ``too_long``; the other questions are still asked (before, it ended the run)."""
    from xtuner_plugins.models.prompt import PromptTooLong

    class LongModel(Model):
        def ask(self, prompt, images, generation):
            if 'bad' in images:
                raise PromptTooLong(9000, 64, 8192, 'config.json max_position_embeddings')
            return 'A'

    failures = []
    results = evaluate(LongModel(), questions(), blind=False, batch_size=batch_size, failures=failures)
    assert [r.id for r in results] == ['0-0', '0-1', '1-0', '2-0', '2-1']
    assert [(f.id, f.reason) for f in failures] == [('1-1', 'too_long')]
    assert failures[0].message.startswith('the prompt is 9000 tokens, over the LLM\'s context of 8192 tokens')
    assert '--max-num' not in failures[0].message  # eval has no such option
    with pytest.raises(PromptTooLong):
        evaluate(LongModel(), questions(), blind=False)


def test_without_a_failures_list_the_error_stops_it():
    with pytest.raises(SampleError, match='truncated'):
        evaluate(Model(), questions(), blind=False)


class FreeFormModel:
    """Answers in words, as a model trained on free-form answers does: the colour of the image's top-left pixel,
    whatever the prompt asks; its log-likelihood of an option is 0 for that colour, -1 for any other."""

    NAMES = {(255, 0, 0): 'red', (0, 128, 0): 'green', (0, 0, 255): 'blue', (128, 128, 128): 'grey'}

    def __init__(self):
        self.asked, self.ranked = [], []

    def reset(self):
        pass

    def colour(self, images):
        return self.NAMES[load_image(images[0]).getpixel((0, 0))]

    def ask(self, prompt, images, generation):
        self.asked.append(prompt)
        return {'red': 'Red.', 'green': 'It is green', 'blue': 'B'}.get(self.colour(images), 'no idea')

    def option_logprobs(self, prompt, images, texts):
        self.ranked.append((prompt, list(texts)))
        return [0.0 if t == self.colour(images) else -1.0 for t in texts]


def colour_rows():
    from tests.eval.test_data import b64_png
    return [dict(index=i, question='What colour is the square?', hint='', A='red', B='green', C='blue', D='grey',
                 answer=answer, category='colour', image=b64_png(colour))
            for i, (colour, answer) in enumerate([('red', 'A'), ('green', 'B'), ('blue', 'C'), ('grey', 'D')])]


def test_multiple_choice_read_as_vlmevalkit_reads_it_and_counted(tmp_path):
    """A free-form answer is read by its letter ('B'), else by the option's text ('Red.', 'It is green'), else
    not at all ('no idea'); the report counts each way, and the answers file keeps how."""
    from tests.eval.test_data import write_tsv
    from xtuner_plugins.eval import read_questions
    questions = read_questions(write_tsv(tmp_path / 'mmb.tsv', colour_rows()))
    model = FreeFormModel()
    results = evaluate(model, questions, blind=False)
    assert [(r.answer, r.read_by, r.score) for r in results] == [
        ('Red.', 'text', 1.0), ('It is green', 'text', 1.0), ('B', 'letter', 0.0), ('no idea', 'unmatched', 0.0)]
    report = Report(results)
    assert report.summary() == dict(n=4, accuracy=0.5, by_letter=1, by_text=2, unmatched=1)
    assert report.read_line() == "multiple choice: 1 read by the letter, 2 by the option's text, 1 unmatched"
    assert all('Options:' in p for p in model.asked) and not model.ranked


def test_multiple_choice_by_likelihood_ranks_the_options_on_the_stem(tmp_path):
    """--mc likelihood: nothing generated for multiple choice; the options' texts are ranked on the question
    without its options; every rotation of a circular question gets its own letters."""
    from tests.eval.test_data import write_tsv
    from xtuner_plugins.eval import read_questions
    questions = read_questions(write_tsv(tmp_path / 'mmb.tsv', colour_rows()), circular=True)
    model = FreeFormModel()
    results = evaluate(model, questions, blind=False, mc='likelihood', batch_size=4)
    assert not model.asked and len(model.ranked) == 16
    assert {p for p, _ in model.ranked} == {'What colour is the square?'}
    assert all(r.score == 1.0 and r.read_by == 'likelihood' for r in results)
    assert results[1].answer == 'D' and results[1].option_scores == {'A': -1.0, 'B': -1.0, 'C': -1.0, 'D': 0.0}
    report = Report(results)
    assert report.summary() == dict(n=4, accuracy=1.0, by_likelihood=16)
    assert report.read_line() == 'multiple choice: 16 ranked by likelihood'
    with pytest.raises(ValueError, match='unknown multiple-choice mode'):
        evaluate(model, questions, mc='loglik')


def test_a_model_that_answers_nothing_scores_nothing():
    """References of articles only ('A', 'an') once matched the empty answer: 0.667 for a silent model."""

    class Silent(Model):
        def ask(self, prompt, images, generation):
            return ''

    qs = [Question(str(i), 'c', 'Which?', [], [ref]) for i, ref in enumerate(['A', 'an', 'cat'])]
    report = Report(evaluate(Silent(), qs, blind=True))
    assert report.closing_line() == 'accuracy: 0.000 (3 questions); blind: 0.000; image reliance: 0.000'


def test_questions_without_categories_give_one_total_row():
    """Uncategorised questions (category 'all') printed two equal rows, 'all' and '(all)'; named categories keep
    their rows above the total."""

    class Echo(Model):
        def ask(self, prompt, images, generation):
            return 'cat'

    def rows(category):
        qs = [Question(str(i), category, 'Which?', [], [ref]) for i, ref in enumerate(['cat', 'dog'])]
        return [line.split()[0] for line in Report(evaluate(Echo(), qs)).table().splitlines()[1:]]
    assert rows('all') == ['(all)']
    assert rows('colour') == ['colour', '(all)']
