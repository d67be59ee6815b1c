"""No third-party start-up noise: the lines ``xtuner_plugins.quiet`` lists are dropped from every tool's output,
and every other message of the same loggers still shows."""

import os
import subprocess
import sys

import pytest

from xtuner_plugins.quiet import SILENCED_LOGS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BNB = 'bitsandbytes.backends.cpu.ops'
# bitsandbytes' own call (bitsandbytes/backends/cpu/ops.py), with the exception it gets without `kernels`
BNB_CALL = ('logging.getLogger({name!r}).warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s. '
            'Please make sure you already `pip install kernels` and the kernels >= 0.11.1", {exc})')
# DeepSpeed's (deepspeed/accelerator/real_accelerator.py, through deepspeed.utils.logger) and torch's data loader's
DEEPSPEED_CALL = ('from deepspeed.utils import logger; logger.warning("Setting accelerator to CPU. If you have GPU or '
                  'other accelerator, we were unable to detect it.")')
PIN_MEMORY_CALL = ('import warnings; warnings.warn_explicit("\'pin_memory\' argument is set as true but no accelerator '
                   'is found, then device pinned memory won\'t be used.", UserWarning, "dataloader.py", 1, '
                   'module="torch.utils.data.dataloader")')
SCHEDULER_CALL = ('import warnings; warnings.warn_explicit("Detected call of `scheduler.step()` before '
                  '`optimizer.step()`. In PyTorch 1.1.0 and later, you should call them in the opposite order", '
                  'UserWarning, "param_scheduler.py", 198, module="mmengine.optim.scheduler.param_scheduler")')
SILENCED = ["'pin_memory' argument is set as true but no accelerator is found",
            'Detected call of `scheduler.step()` before `optimizer.step()`'] + [
    start for starts in SILENCED_LOGS.values() for start in starts]
TOOLS = sorted(n for n in os.listdir(os.path.join(ROOT, 'tools')) if n.endswith('.py'))


def run(args, **kwargs):
    env = dict(os.environ, OMP_NUM_THREADS='1')
    out = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300, cwd=ROOT, env=env,
                         **kwargs)
    return out.returncode, out.stdout + out.stderr


@pytest.mark.parametrize('tool', TOOLS)
def test_a_tool_starts_without_the_silenced_lines(tool):
    """``tools/X.py --help``, then bitsandbytes imported in the same process (the tools import it when a model
    loads, this CPU permitting) and its line logged as bitsandbytes logs it."""
    code = ('import logging, runpy, sys\n'
            f'sys.argv = [{tool!r}, "--help"]\n'
            'try:\n'
            f'    runpy.run_path("tools/{tool}", run_name="__main__")\n'
            'except SystemExit as exit:\n'
            '    assert exit.code in (0, None), exit.code\n'
            'import bitsandbytes\n'
            + BNB_CALL.format(name=BNB, exc='ModuleNotFoundError("No module named \'kernels\'")') + '\n'
            + PIN_MEMORY_CALL + '\n' + SCHEDULER_CALL + '\n')
    code_, output = run(['-c', code])
    assert code_ == 0, output[-3000:]
    assert 'usage:' in output.lower()
    for start in SILENCED:
        assert start not in output, f'tools/{tool}: {output[-2000:]}'


def test_the_same_loggers_other_messages_still_show():
    """Each silenced line (DeepSpeed's as it logs it when imported here without CUDA) against another message of
    the same logger or module."""
    code = ('import logging, xtuner_plugins\n'
            + BNB_CALL.format(name=BNB, exc='ModuleNotFoundError("No module named \'kernels\'")') + '\n'
            + BNB_CALL.format(name=BNB, exc='RuntimeError("kernel built for another torch")') + '\n'
            f'logging.getLogger({BNB!r}).warning("a genuine warning")\n'
            + DEEPSPEED_CALL + '\nlogger.warning("a genuine DeepSpeed warning")\n'
            + PIN_MEMORY_CALL + '\n' + PIN_MEMORY_CALL.replace('pin_memory', 'num_workers') + '\n'
            + SCHEDULER_CALL + '\n' + SCHEDULER_CALL.replace('mmengine.optim', 'my_project') + '\n')
    code_, output = run(['-c', code])
    assert code_ == 0, output
    assert output.count('Detected call of `scheduler.step()`') == 1, output  # another module's warning shows
    assert 'Setting accelerator to CPU' not in output and 'a genuine DeepSpeed warning' in output
    assert "'pin_memory' argument" not in output and "'num_workers' argument is set as true" in output
    assert "No module named 'kernels'" not in output
    assert 'Failed to load CPU gemm_4bit_forward from kernels-community: kernel built for another torch' in output
    assert 'a genuine warning' in output


def test_xtuner_trains_imports_are_quiet_too():
    """``xtuner train`` imports bitsandbytes and DeepSpeed before any config imports this package: the start-up
    file ``make setup`` writes (``xtuner_plugins_quiet.pth``) imports it first, in every process of the venv."""
    import sysconfig

    from xtuner_plugins.quiet import STARTUP_FILE
    assert os.path.isfile(os.path.join(sysconfig.get_paths()['purelib'], STARTUP_FILE)), 'run `make setup`'
    code = ('import sys; assert "xtuner_plugins" in sys.modules\nimport logging, bitsandbytes\n'
            + BNB_CALL.format(name=BNB, exc='ModuleNotFoundError("No module named \'kernels\'")') + '\n'
            + DEEPSPEED_CALL + '\n')
    code_, output = run(['-c', code])
    assert code_ == 0, output
    assert "No module named 'kernels'" not in output and 'Setting accelerator to CPU' not in output, output


@pytest.fixture(scope='module')
def qwen25_tokenizer(tmp_path_factory):
    from xtuner_plugins.tiny.realsize import build_qwen25_tokenizer
    folder = tmp_path_factory.mktemp('qwen25')
    build_qwen25_tokenizer().save_pretrained(folder)
    return folder


@pytest.mark.parametrize('types, shown', [
    (dict(model_type='internvl_chat', llm_config=dict(model_type='qwen2')), False),
    (dict(model_type='qwen2'), False),
    (dict(model_type='internvl_chat', llm_config=dict(model_type='mistral')), True),
    (dict(), True)])
def test_transformers_mistral_regex_warning_shows_for_mistral_folders_only(qwen25_tokenizer, tmp_path, types, shown):
    """transformers 4.57.3+ warns of Mistral's tokenizer regex for any local folder a 4.57.3+ wrote (every folder
    this project writes) with a vocabulary over 100,000 (Qwen2.5's length here): dropped where config.json names
    no Mistral type, kept where it does or names none."""
    import json
    import shutil
    folder = tmp_path / 'model'
    shutil.copytree(qwen25_tokenizer, folder)
    (folder / 'config.json').write_text(json.dumps(dict(types, transformers_version='4.57.6')))
    code, out = run(['-c', f'from transformers import AutoTokenizer; AutoTokenizer.from_pretrained({str(folder)!r})'])
    assert code == 0, out
    assert ('with an incorrect regex pattern' in out) == shown, out[-2000:]
