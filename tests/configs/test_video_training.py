"""configs/finetune_lora.py on a data set mixing video, image and text-only samples: frames go through the same
vision tower, projector and <IMG_CONTEXT> path as images, in a real XTuner run on the tiny models (one process,
CPU); the loss falls and the run ends with a checkpoint."""

import os

import pytest

from tests.configs.conftest import ROOT, tiny_options
from tests.helpers import conv, write_jsonl, write_video
from tests.train_utils import run_train

CONFIG = os.path.join(ROOT, 'configs', 'finetune_lora.py')


@pytest.mark.slow
def test_lora_on_videos_images_and_text(tiny, tmp_path):
    folder = tiny['images']
    write_video(os.path.join(folder, 'video_up.mp4'), [8 * i for i in range(24)], size=(80, 60))
    write_video(os.path.join(folder, 'video_frames'), [200 - 8 * i for i in range(12)], size=(40, 40))
    data = write_jsonl(tmp_path / 'mixed.jsonl', [
        {'video': 'video_up.mp4', 'conversations': conv('Brighter or darker?', 'brighter', image=False)},
        {'video': 'video_frames', 'clip': None, 'conversations': conv('<video>\nAnd this?', 'darker', image=False)},
        {'image': 'a.png', 'conversations': conv('Describe the image.', 'a wide noisy picture')},
        {'conversations': conv('Say something.', 'something', image=False)},
    ])
    options = tiny_options(tiny, data, repeat=3, lr=0.01)
    options.update({'train_dataloader.dataset.min_num_frame': 3, 'train_dataloader.dataset.max_num_frame': 5})
    out = run_train(CONFIG, str(tmp_path / 'work'), cfg_options=options)
    assert out.ok, out.summary()
    losses = [out.losses[i] for i in sorted(out.losses)]
    assert len(losses) == 6 and losses[-1] < losses[0], losses
