"""evaluate() and Report with a question that fails when asked: counted and named, its circular group left out
whole, the other questions scored; a batch with it answered one at a time to tell which; without a
``failures`` list (the training hook: equal forward counts on every rank) the error stops the evaluation."""

import pytest
from PIL import Image

from xtuner_plugins.data.errors import SampleError
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
    assert report.summary() == dict(n=2, accuracy=1.0, not_scored=1)  # group 1 neither right nor wrong
    assert report.closing_line() == 'accuracy: 1.000 (2 questions); 1 not scored'
    assert report.not_scored() == 'not scored: m.tsv:3 (id 1-1): cannot decode image bad: image file is ' \
                                  'truncated [corrupt_image]'


def test_without_a_failures_list_the_error_stops_it():
    with pytest.raises(SampleError, match='truncated'):
        evaluate(Model(), questions(), blind=False)
