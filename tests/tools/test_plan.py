"""tools/plan.py's refusals (xtuner_plugins/cli/plan.py): --cfg-options keys named like the batch settings, configs
MMEngine fails on, and numbers no device holds, each one line naming the option or the file, exit status 2."""

import os
import re

import pytest

from xtuner_plugins.cli.plan import main
from xtuner_plugins.tiny import make_tiny_models

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LORA = os.path.join(ROOT, 'configs', 'finetune_lora.py')


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
    return make_tiny_models(str(tmp_path_factory.mktemp('plan')))


def plan(tiny, capsys, config=LORA, *options, gpus='1', mem='24'):
    rc = main([config, '--gpus', gpus, '--gpu-mem', mem, '--vision', tiny['internvit'], '--llm', tiny['llm'],
               *options])
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.mark.parametrize('option, said', [
    ('model.max_tiles=-1', "model.max_tiles: VisionLanguageModel has no setting 'max_tiles'"),
    ('model.batch_size=2', "model.batch_size: VisionLanguageModel has no setting 'batch_size'"),
    ('max_length=4096', 'max_length: a variable of the config file, already used when the file was read'),
    ('bogus.max_length=-1', "bogus.max_length: 'bogus' is not a setting the run reads"),
])
def test_a_batch_settings_name_elsewhere_is_checked_as_any_key(tiny, capsys, option, said):
    """Before, a key ending in max_length, batch_size, max_tiles, ... skipped the check: a TypeError traceback
    (model.max_tiles) or the option dropped without a word (max_length=4096: a plan at 8192)."""
    rc, out, err = plan(tiny, capsys, LORA, '--cfg-options', option)
    assert rc == 2 and err.startswith(f'plan: error: --cfg-options: {said}') and err.count('\n') == 1, err
    assert 'total' not in out


def test_the_batch_settings_at_their_places_are_planned(tiny, capsys):
    rc, out, err = plan(tiny, capsys, LORA, '--cfg-options', 'train_dataloader.dataset.max_length=4096',
                        'train_dataloader.batch_size=2')
    assert rc == 0 and 'batch per device: 2 rows of 4096 tokens' in out, err


def _configs(folder):
    import shutil
    shutil.copytree(os.path.join(ROOT, 'configs'), folder)
    (folder / 'list.json').write_text('[1, 2]')
    (folder / 'self.py').write_text("_base_ = ['self.py']\n")
    (folder / 'a.py').write_text("_base_ = ['b.py']\n")
    (folder / 'b.py').write_text("_base_ = ['a.py']\n")
    (folder / 'mixed.py').write_text(f"_base_ = [{LORA!r}]\n")
    (folder / 'missing.py').write_text('from mmengine.config import read_base\nwith read_base():\n'
                                       '    from .finetune_lora import *\n'
                                       'from no_such_module_here import thing\nmodel.update(thing=thing)\n')
    (folder / 'packaged.py').write_text('from mmengine.config import read_base\nwith read_base():\n'
                                        '    from configs.finetune_lora import *\n')
    return folder


def test_a_config_mmengine_fails_on_is_one_line(tiny, capsys, tmp_path):
    """Before: AttributeError ('list' object has no attribute 'get'), RecursionError, MMEngine's RuntimeError
    (lazy_import) and ModuleNotFoundError tracebacks; model=None an AttributeError."""
    folder = _configs(tmp_path / 'c')
    for name, said in (('list.json', 'holds a list, not a mapping of settings'),
                       ('self.py', 'its base configs (_base_ or read_base()) lead back to a file already in the chain'),
                       ('a.py', 'its base configs (_base_ or read_base()) lead back to a file already in the chain'),
                       ('mixed.py', "its chain of base configs mixes MMEngine's two config styles"),
                       ('missing.py', 'Failed to import no_such_module_here'),
                       ('packaged.py', 'a base config imported by a package name in read_base()')):
        rc, out, err = plan(tiny, capsys, str(folder / name))
        assert rc == 2 and err.startswith(f'plan: error: {folder / name}') and said in err, (name, err)
        assert err.count('\n') == 1, err
    for key in ('model', 'train_dataloader', 'train_dataloader.dataset', 'optim_wrapper'):
        rc, out, err = plan(tiny, capsys, LORA, '--cfg-options', f'{key}=None')
        assert (rc, err) == (2, f'plan: error: {key} is None (in {LORA} with its --cfg-options), not a dict of '
                                'settings: plan needs its settings\n')


@pytest.mark.parametrize('options, said', [
    (['--cfg-options', 'train_dataloader.dataset.max_length=100000000000000000000'],
     'train_dataloader.dataset.max_length 100000000000000000000 is past the most the planner takes (16,777,216)'),
    (['--zero', '3', '--gpus', '100000000000000000000'],
     '--gpus 100000000000000000000 is past the most the planner takes (1,048,576 devices)'),
    (['--reserve', '1e300'], '--reserve 1e+300 GiB is all of --gpu-mem 24 GiB: nothing is left for training'),
])
def test_numbers_no_device_holds_are_refused_naming_the_option(tiny, capsys, options, said):
    """Before: a table of 2688169479370118.50 GiB, a plan for 10**20 devices, 'not even the images fit'."""
    gpus = options[options.index('--gpus') + 1] if '--gpus' in options else '1'
    options = [o for i, o in enumerate(options) if o != '--gpus' and (i == 0 or options[i - 1] != '--gpus')]
    rc, out, err = plan(tiny, capsys, LORA, *options, gpus=gpus)
    assert rc == 2 and err.startswith(f'plan: error: {said}') and err.count('\n') == 1, err


def test_a_budget_the_weights_alone_pass_says_so(tiny, capsys):
    rc, out, err = plan(tiny, capsys, LORA, '--reserve', '0', mem='1e-30')
    assert rc == 1 and 'largest max_length at 4 per device: none (the weights, optimizer states and --reserve ' \
                       'alone are' in out and 'not even the images fit' not in out, out


def test_a_next_stage_is_planned_on_the_model_its_pretrained_pth_trained(tiny, capsys, tmp_path):
    """As training builds it (engine/previous_settings.py): the plan of a LoRA stage after a SigLIP + bilinear MLP
    warm-up, given the warm-up's checkpoint alone, was of the config's InternViT and pixel-shuffle projector."""
    import torch
    from xtuner_plugins.tiny.vision import write_tiny_siglip
    siglip = write_tiny_siglip(str(tmp_path / 'siglip'))
    warm = tmp_path / 'iter_2.pth'
    torch.save({'meta': {'cfg': f"model = dict(type='VisionLanguageModel', vision_encoder=dict(type='siglip', "
                                f"path={siglip!r}), llm={tiny['llm']!r}, projector='bilinear_mlp', "
                                "image_mode='resize')"}, 'state_dict': {}}, warm)
    rc = main([LORA, '--gpus', '1', '--gpu-mem', '24', '--cfg-options', f'model.pretrained_pth={warm}'])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert f"model.pretrained_pth={warm}: the model that stage trained: model.vision_encoder=" \
           f"{dict(type='siglip', path=siglip)!r} (the config: 'models/InternViT-300M-448px-V2_5'); model.llm=" \
           f"'{tiny['llm']}' (the config: 'models/Qwen2.5-1.5B-Instruct'); model.projector='bilinear_mlp' (the " \
           "config: 'pixel_shuffle_mlp'); model.image_mode='resize' (the config: 'tile')" in out, out
    # a resized image a sample (SigLIP's one tile of 4 tokens through the bilinear MLP), not InternViT's 12 + 1 tiles
    assert 'batch per device: 4 rows of 8192 tokens, 4 tiles (4 tokens each)' in out, out
    assert main([LORA, '--gpus', '1', '--gpu-mem', '24', '--vision', tiny['internvit'], '--llm', tiny['llm'],
                 '--cfg-options', f'model.pretrained_pth={warm}']) == 0   # named: the command line's
    taken = capsys.readouterr().out.splitlines()[0]
    assert taken.endswith("the model that stage trained: model.projector='bilinear_mlp' (the config: "
                          "'pixel_shuffle_mlp'); model.image_mode='resize' (the config: 'tile')"), taken


def test_the_configs_torch_dtype_is_planned(tiny, capsys):
    """A config's model.torch_dtype='float32' was planned in bf16 (--dtype's default), the run's activations and
    frozen weights at half their size, without a word; a --dtype against it is one line naming both."""
    def header(*options):
        rc, out, err = plan(tiny, capsys, LORA, *options)
        assert rc == 0, err
        return next(line for line in out.splitlines() if line.startswith('plan: '))
    assert header('--cfg-options', 'model.torch_dtype=float32').endswith(', fp32')
    assert header('--dtype', 'fp32').endswith(', fp32')
    assert header().endswith(', bf16')   # 'auto': bf16, as on a GPU
    rc, out, err = plan(tiny, capsys, LORA, '--dtype', 'bf16', '--cfg-options', 'model.torch_dtype=float32')
    assert (rc, err) == (2, "plan: error: --dtype bf16, and the config's model.torch_dtype is 'float32' (with its "
                            "--cfg-options), which the run trains in: give one of them\n")


def test_a_config_of_another_model_is_one_line(tiny, capsys, tmp_path):
    """XTuner's own LLaVA config (its LLaVAModel's settings) ended in 'TypeError: VisionLanguageModel.__init__() got an
    unexpected keyword argument' after a traceback: plan plans this project's model alone."""
    config = tmp_path / 'other.py'
    config.write_text('from torch.nn import Linear\nmodel = dict(type=Linear, in_features=2, out_features=2)\n'
                      'train_dataloader = dict(dataset=dict())\noptim_wrapper = dict()\n')
    rc, out, err = plan(tiny, capsys, str(config))
    assert rc == 2 and err.startswith(f"plan: error: {config}: model.type is torch.nn.modules.linear.Linear, not "
                                      "VisionLanguageModel") and err.count('\n') == 1, err


def test_a_config_calling_what_it_imports_is_one_line(tiny, capsys, tmp_path):
    """MMEngine reads a config with imports lazily, and a call of what it imports raised a bare RuntimeError after a
    traceback ('plan: error' never said; training: 'train: FAILED: RuntimeError: ')."""
    config = tmp_path / 'calls.py'
    config.write_text("import os\n\ndata_root = os.path.join('data', 'x')\n")
    rc, out, err = plan(tiny, capsys, str(config))
    assert rc == 2 and err.startswith(f"plan: error: {config}: line 3 (data_root = os.path.join('data', 'x')) calls "
                                      "what the config imports") and err.count('\n') == 1, err


def test_a_packed_length_at_the_searchs_limit_says_more_would_fit(tiny, capsys):
    """A pack has no context to stop the search at: on 140 GiB the tiny models' largest max_tokens was printed as
    1048576, the search's limit, as if it were the most that fits. It says so now, as the batch line does at its
    limit; a length the budget stops stays a plain number."""
    packed = os.path.join(ROOT, 'configs', 'finetune_full_packed.py')
    rc, out, err = plan(tiny, capsys, packed, mem='140')
    assert rc == 0 and 'largest max_tokens (tokens per pack) at 1 per device: 1048576 (as far as the search goes: ' \
                       'more would fit)\n' in out, out + err
    rc, out, err = plan(tiny, capsys, packed, mem='1.5')
    line = next(x for x in out.splitlines() if x.startswith('largest max_tokens'))
    assert rc == 0 and re.fullmatch(r'largest max_tokens \(tokens per pack\) at 1 per device: \d+', line), out + err
