"""tools/train.py's closing summary: the reason a run failed, on one line."""

import torch

from xtuner_plugins.cli.train import failure_message
from xtuner_plugins.data.errors import TooManyBadSamplesError


class _BadData(torch.utils.data.Dataset):
    def __len__(self):
        return 2

    def __getitem__(self, index):
        raise TooManyBadSamplesError("2 of 2 samples are bad: {'missing_image': 2}; last: d.jsonl:2: image file not "
                                     "found: x.jpg\nRun tools/check_dataset.py for the full list.")


def test_a_data_loader_worker_error_is_summed_up_by_the_worker_message():
    """torch re-raises a worker's error as "Caught X in DataLoader worker process 0." with the worker's traceback
    below: the summary gives the worker's message (which file, line and reason), not that first line."""
    loader = torch.utils.data.DataLoader(_BadData(), num_workers=1)
    try:
        next(iter(loader))
    except TooManyBadSamplesError as exc:
        raised = exc
    assert str(raised).startswith('Caught TooManyBadSamplesError in DataLoader worker process 0')
    assert failure_message(raised) == ("2 of 2 samples are bad: {'missing_image': 2}; last: d.jsonl:2: image file "
                                       "not found: x.jpg")
    assert failure_message(ValueError('model.llm: no such folder\nmore')) == 'model.llm: no such folder'
    assert failure_message(RuntimeError()) == ''
