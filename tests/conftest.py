"""Shared fixtures (an offline tiny tokenizer, built in code, saved once per session) and how the suite runs on
pytest-xdist's workers (``make test``: ``-n 2 --dist loadfile --no-loadscope-reorder``: whole modules, so a
module's fixtures are built once, handed out in the order below as workers come free).

On workers, each worker and every process it starts computes on one thread: two workers whose OpenMP pools
both spread over the two cores spin against each other, and the suite took longer on two workers than on one;
on one thread each, two of the shortened demo tests ran side by side in 142 s against 270 s one after the
other (2026-11-23, this 2-core machine). The longest modules are taken first, so that neither worker finishes
a long one alone while the other idles.
"""

import os

import pytest

os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('TRANSFORMERS_OFFLINE', '1')
if os.environ.get('PYTEST_XDIST_WORKER'):
    os.environ['OMP_NUM_THREADS'] = '1'  # inherited by the training runs and tools the tests start
    import torch
    torch.set_num_threads(1)

# The longest modules, longest first (minutes each on two workers; `pytest --durations=30` shows their tests).
LONGEST = ('tests/demo/test_demo.py', 'tests/test_readme.py', 'tests/serve/test_vllm.py',
           'tests/test_slurm.py', 'tests/configs/test_resume.py', 'tests/test_launch.py', 'tests/engine/test_cpu_training.py',
           'tests/configs/test_pretrain_mlp.py', 'tests/benchmarks/test_gpu.py', 'tests/models/test_preference.py',
           'tests/configs/test_mpo_full.py', 'tests/configs/test_dpo.py')


def pytest_collection_modifyitems(config, items):
    """Order whole modules (a stable sort, so each module's tests stay together, in their order): those of
    ``LONGEST`` in that order, then the modules with a slow test, then the rest."""
    slow = {item.path for item in items if item.get_closest_marker('slow')}

    def rank(item):
        path = os.path.relpath(str(item.path), config.rootpath)
        return LONGEST.index(path) if path in LONGEST else len(LONGEST) + (item.path not in slow)
    items.sort(key=rank)


@pytest.fixture(scope='session', autouse=True)
def _caches_in_a_temporary_folder(tmp_path_factory):
    """What the tests cache (the data sets' indexes, checks and lengths, the CPU attention kernel, yapf's grammar)
    goes to a temporary folder of the session (``$XDG_CACHE_HOME``; pytest keeps the last three sessions'), not to
    ``~/.cache``: a run of the suite left about 2,000 files there for the tests' own annotation files, for good.
    yapf's grammar is written first, by one process: its file is not written atomically, and processes importing
    MMEngine's config at once could read it half-written (``make setup`` writes it for the same reason)."""
    import subprocess
    import sys
    os.environ['XDG_CACHE_HOME'] = str(tmp_path_factory.mktemp('xdg_cache'))
    subprocess.run([sys.executable, '-c', 'import yapf'], check=True, timeout=120)


@pytest.fixture(autouse=True)
def _no_log_handler_on_a_closed_stream():
    """An MMLogger made while a test captured its output (``capsys``) writes to that capture, which is closed when
    the test ends; a later test's ``print_log`` would then print a logging error among its own output (seen when the
    modules' order on the workers changed). Such handlers are dropped after each test."""
    yield
    import logging
    import sys
    if 'mmengine.logging' not in sys.modules:
        return
    from mmengine.logging import MMLogger
    for logger in [*MMLogger._instance_dict.values(), logging.getLogger()]:
        for handler in list(logger.handlers):
            if getattr(getattr(handler, 'stream', None), 'closed', False):
                logger.removeHandler(handler)


@pytest.fixture(scope='session')
def tiny_tokenizer():
    from xtuner_plugins.tiny.tokenizer import build_tiny_tokenizer
    return build_tiny_tokenizer()


@pytest.fixture(scope='session')
def tiny_tokenizer_dir(tmp_path_factory, tiny_tokenizer):
    path = tmp_path_factory.mktemp('tokenizer')
    tiny_tokenizer.save_pretrained(path)
    return str(path)
