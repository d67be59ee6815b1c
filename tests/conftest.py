"""Shared fixtures (an offline tiny tokenizer, built in code, saved once per session) and how the suite runs on
pytest-xdist's workers (``make test``: ``-n 2 --maxschedchunk 1``: one shared queue, in order).

On workers, each worker and every process it starts computes on one thread: two workers whose OpenMP pools
both spread over the two cores spin against each other, and the suite took longer on two workers than on one;
on one thread each, two of the shortened demo tests ran side by side in 142 s against 270 s one after the
other (2026-11-23, this 2-core machine). The longest tests are taken first, so that neither worker finishes
a long test alone while the other idles.
"""

import os

import pytest

os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('TRANSFORMERS_OFFLINE', '1')
if os.environ.get('PYTEST_XDIST_WORKER'):
    os.environ['OMP_NUM_THREADS'] = '1'  # inherited by the training runs and tools the tests start
    import torch
    torch.set_num_threads(1)

# The longest tests (minutes each; `pytest --durations=20` shows them), started before all others.
LONGEST = ('tests/test_readme.py', 'tests/demo/test_demo.py', 'tests/configs/test_resume.py', 'tests/test_launch.py',
           'tests/benchmarks/test_gpu.py', 'tests/models/test_preference.py')


def pytest_collection_modifyitems(config, items):
    """Order (a stable sort): the modules of ``LONGEST`` in that order, then the other slow tests, then the rest."""
    def rank(item):
        path = os.path.relpath(str(item.path), config.rootpath)
        if path in LONGEST:
            return LONGEST.index(path)
        return len(LONGEST) + (item.get_closest_marker('slow') is None)
    items.sort(key=rank)


@pytest.fixture(scope='session')
def tiny_tokenizer():
    from xtuner_plugins.tiny.tokenizer import build_tiny_tokenizer
    return build_tiny_tokenizer()


@pytest.fixture(scope='session')
def tiny_tokenizer_dir(tmp_path_factory, tiny_tokenizer):
    path = tmp_path_factory.mktemp('tokenizer')
    tiny_tokenizer.save_pretrained(path)
    return str(path)
