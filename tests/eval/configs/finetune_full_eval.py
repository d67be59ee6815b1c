# configs/finetune_full.py with an EvalHook (the stage configs' commented example), for tests/eval/test_hook.py;
# point it at data with --cfg-options custom_hooks.5.data_file=... custom_hooks.5.image_folder=...
from mmengine.config import read_base

from xtuner_plugins.eval import EvalHook

with read_base():
    from ....configs.finetune_full import *  # noqa: F401,F403

custom_hooks.append(dict(type=EvalHook, data_file='', image_folder=None, interval=2, max_new_tokens=3,
                         max_questions=5))
