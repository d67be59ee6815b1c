"""A hook that writes what each rank trained on, for tests/configs/test_streams_two_ranks.py: one line per
iteration in ``WORK_DIR/samples_rank{R}.jsonl`` with the batch's samples (``FILE:LINE``) and its items' stream
states (``(unit, state)``, data/streaming.py)."""

import json
import os

from mmengine.dist import get_rank
from mmengine.hooks import Hook


class RecordSamplesHook(Hook):
    """Appends ``{"iter", "samples", "stream_state"}`` per trained batch to this rank's file."""

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None) -> None:
        data = (data_batch or {}).get('data') or {}
        line = dict(iter=runner.iter + 1, samples=list(data.get('samples') or ()),
                    stream_state=[[int(u), s] for u, s in data.get('stream_state') or ()])
        with open(os.path.join(runner.work_dir, f'samples_rank{get_rank()}.jsonl'), 'a', encoding='utf-8') as f:
            f.write(json.dumps(line) + '\n')
