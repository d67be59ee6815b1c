"""tools/train.py at its edges (round four of the adversarial sweep): a Ctrl-C that code on the way turns into
another error still ends as an interrupt; a MASTER_PORT that is no port is refused in one line."""

import os
import subprocess
import sys

import pytest

from tests.train_utils import REPO_ROOT
from xtuner_plugins import malloc

GUARDED = os.path.join(REPO_ROOT, 'tests', 'engine', 'toy_configs', 'toy_guarded.py')
TRAIN_TOOL = os.path.join(REPO_ROOT, 'tools', 'train.py')

# SIGINT arrives inside code that catches every exception and raises its own, as MMEngine's Config.pretty_text
# does around yapf (``except: raise SyntaxError('Failed to format the config file ...')``) and numpy's import
# does (``ImportError: cannot load module more than once per process``)
SWALLOWING = '''
import os, signal, sys, time
from xtuner_plugins.cli import train

def swallowing(error):
    def run(*args, **kwargs):
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(30)
        except:  # noqa: E722 -- as the code named above
            raise error('Failed to format the config file, please check the syntax of: ...')
    return run

def going_on(*args, **kwargs):   # an import that catches the KeyboardInterrupt and goes on
    try:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(30)
    except BaseException:
        pass

where, config, work = sys.argv[1:4]
if where == 'load':
    train._load = swallowing(ImportError)
elif where == 'caught':
    train._load = going_on
else:
    from xtuner.tools import train as xtuner_train
    xtuner_train.main = swallowing(SyntaxError)
sys.argv[1:] = [config, '--work-dir', work]
sys.exit(train.main())
'''


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ('LD_PRELOAD', 'MALLOC_CONF', 'MASTER_PORT')}
    return dict(env, PYTHONPATH=REPO_ROOT, **{malloc.OFF: 'glibc'}, **extra)


@pytest.mark.parametrize('where,last', [
    ('load', 'train: interrupted before training started; nothing saved'),
    ('caught', 'train: interrupted before training started; nothing saved'),
    ('run', 'train: interrupted before training started; last checkpoint none; resume: nothing saved to resume '
            'from, ')])
def test_a_ctrl_c_turned_into_another_error_is_still_an_interrupt(tmp_path, where, last):
    """Before, Ctrl-C while MMEngine formatted the config (at start-up, and at every save) ended as
    ``train: FAILED: SyntaxError: Failed to format the config file``, exit code 1, after two screens of traceback
    and the whole config; Ctrl-C while numpy imported ended in an ImportError's traceback; and a Ctrl-C that an
    import caught and went on from let the rank go on to the rendezvous, where it waited for peers that had
    stopped."""
    out = subprocess.run([sys.executable, '-c', SWALLOWING, where, GUARDED, str(tmp_path / 'w')], env=_env(),
                         cwd=tmp_path, capture_output=True, text=True, timeout=300)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 130, out.stderr[-3000:]
    assert 'Traceback' not in out.stderr and 'Failed to format' not in out.stderr, out.stderr[-3000:]
    assert lines[-1].startswith(last), out.stderr[-3000:]


# SIGTERM while the libraries load (D7: raised inside Triton's import, whose C++ called back into Python, it aborted
# the process, SIGABRT, 1 in 60 tries), and in a finished run's exit (D4: -15 and no line after its last save)
SIGTERM_AT = '''
import atexit, os, signal, sys, time
from xtuner_plugins.cli import train

def loading(argv):
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.5)
    print('the libraries loaded', file=sys.stderr, flush=True)

def in_a_callback():   # where importlib drops a module lock (its _bootstrap's cb): a weakref callback
    import weakref

    class Held:
        pass

    def callback(ref):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.5)
    held = Held()
    ref = weakref.ref(held, callback)
    del held
    time.sleep(30)
    print('went on past the SIGTERM', file=sys.stderr, flush=True)
    return 0

def teardown():
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.5)
    print('the exit went on', file=sys.stderr, flush=True)

if sys.argv[1] == 'load':
    train._load = loading
elif sys.argv[1] == 'callback':
    train._train = in_a_callback
else:
    train._train = lambda: 0   # a run that finished
    atexit.register(teardown)
sys.argv[1:] = ['config.py']
sys.exit(train.main())
'''


@pytest.mark.parametrize('when,code,said', [
    ('load', 143, 'the libraries loaded\n\ntrain: stopped by SIGTERM before training started; nothing saved'),
    ('exit', 0, 'the exit went on'),
    ('callback', 143, 'train: stopped by SIGTERM before training started; nothing saved')])
def test_sigterm_while_the_libraries_load_or_a_finished_run_exits(tmp_path, when, code, said):
    """While the libraries load, SIGTERM is held until they have, then stops the run with its line (143); in the
    exit of a run that finished, it is ignored (exit code 0, not -15). Taken inside a weakref callback (CI: a rank
    the launcher stopped, in importlib's module-lock callback), it printed 'Exception ignored' and a traceback
    before the closing line, and a run alone went on past it: sent again, it stops the run with its line alone."""
    out = subprocess.run([sys.executable, '-c', SIGTERM_AT, when], env=_env(), cwd=tmp_path, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == code and 'Traceback' not in out.stderr, (out.returncode, out.stderr[-3000:])
    assert 'Exception ignored' not in out.stderr and 'went on past' not in out.stderr, out.stderr[-3000:]
    assert out.stderr.strip().endswith(said), out.stderr[-3000:]


@pytest.mark.parametrize('port', ['abc', '99999', '0x10', '-1'])
def test_a_master_port_that_is_no_port_is_refused_before_any_rank_starts(tmp_path, port):
    """Before, MASTER_PORT=abc was dropped without a word (a free port taken instead) and 99999 ended in
    ``OverflowError: bind(): port must be 0-65535`` with its traceback."""
    out = subprocess.run([sys.executable, TRAIN_TOOL, GUARDED, '--nproc-per-node', '2'], env=_env(MASTER_PORT=port),
                         cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and out.stderr.strip() == (
        f"train: MASTER_PORT={port!r}: give a port number from 1 to 65535 for the ranks' rendezvous, or unset "
        'MASTER_PORT for a free one'), out.stderr


def test_a_deepspeed_run_started_alone_goes_through_the_launcher_as_one_rank(tmp_path, monkeypatch):
    """``tools/train.py CONFIG --deepspeed NAME`` (docs/training.md's form, no --nproc-per-node): DeepSpeed found no
    launcher's variables, looked for MPI's and ended in a raw ``ModuleNotFoundError: mpi4py``. It now goes through
    the launcher as one rank: the launcher's own check of MASTER_PORT answers, before any rank starts."""
    from xtuner_plugins.cli.train_args import started_by_a_launcher
    out = subprocess.run([sys.executable, TRAIN_TOOL, GUARDED, '--deepspeed', 'deepspeed_zero2'],
                         env=_env(MASTER_PORT='abc'), cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and out.stderr.strip().startswith("train: MASTER_PORT='abc': give a port number"), \
        out.stderr[-2000:]
    for name in ('RANK', 'LOCAL_RANK'):
        monkeypatch.delenv(name, raising=False)
    assert not started_by_a_launcher(['c.py', '--deepspeed', 'deepspeed_zero2'])
    assert not started_by_a_launcher(['c.py', '--launcher', 'none'])
    assert started_by_a_launcher(['c.py', '--launcher', 'slurm']) and started_by_a_launcher(['--launcher=pytorch'])
    monkeypatch.setenv('LOCAL_RANK', '0')   # torchrun's rank: launched already
    assert started_by_a_launcher(['c.py', '--deepspeed', 'deepspeed_zero2'])


def test_a_deepspeed_config_it_cannot_use_is_one_line_before_any_rank_starts(tmp_path):
    """--deepspeed deepspeed_zero9 (a typo), a path not there, a file that is not JSON, a list, a ZeRO stage 7: each
    rank ended in XTuner's FileNotFoundError ('Cannot find X'), json's or DeepSpeed's validation traceback."""
    from xtuner_plugins.cli.train_args import deepspeed_refusal
    names = ('deepspeed_zero1, deepspeed_zero2, deepspeed_zero2_offload, deepspeed_zero3, deepspeed_zero3_offload')
    (tmp_path / 'cut.json').write_text('{"zero_optimization": {"stage": 2},')
    (tmp_path / 'list.json').write_text('[1, 2]')
    (tmp_path / 'stage.json').write_text('{"zero_optimization": {"stage": 7}}')
    (tmp_path / 'ok.json').write_text('{"zero_optimization": {"stage": 2}}')
    for given, said in [('deepspeed_zero9', f"--deepspeed 'deepspeed_zero9': no such file, nor one of XTuner's "
                                            f'DeepSpeed configs ({names})'),
                        (str(tmp_path / 'gone.json'), f"--deepspeed '{tmp_path}/gone.json': no such file"),
                        (str(tmp_path / 'cut.json'), f'--deepspeed {tmp_path}/cut.json: not a JSON file DeepSpeed can '
                                                     'read (Expecting property name'),
                        (str(tmp_path / 'list.json'), f'--deepspeed {tmp_path}/list.json: a DeepSpeed config is a '
                                                      'JSON object of settings'),
                        (str(tmp_path / 'stage.json'), f'--deepspeed {tmp_path}/stage.json: zero_optimization.stage 7; '
                                                       'ZeRO has stages 0, 1, 2 and 3')]:
        assert deepspeed_refusal(['c.py', '--deepspeed', given]).startswith(f'train: refused: {said}'), given
    for fine in ('deepspeed_zero2', str(tmp_path / 'ok.json'), os.path.join(REPO_ROOT, 'configs', 'deepspeed',
                                                                            'zero2_cpu.json')):
        assert deepspeed_refusal(['c.py', f'--deepspeed={fine}']) is None, fine
    assert deepspeed_refusal(['c.py']) is None
    out = subprocess.run([sys.executable, TRAIN_TOOL, GUARDED, '--deepspeed', 'deepspeed_zero9'], env=_env(),
                         cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and out.stderr.strip().startswith("train: refused: --deepspeed 'deepspeed_zero9'") \
        and len(out.stderr.strip().splitlines()) == 1, out.stderr[-2000:]


def test_local_launch_refuses_a_port_over_65535_in_one_line(tmp_path):
    out = subprocess.run([sys.executable, '-m', 'xtuner_plugins.cli.local_launch', '--nproc-per-node', '1',
                          '--master-port', '99999', TRAIN_TOOL], env=_env(), cwd=tmp_path, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 1 and 'Traceback' not in out.stderr, out.stderr
    assert out.stderr.strip() == ('local_launch: port 99999 on 127.0.0.1 (--master-port, or MASTER_PORT): no such '
                                  'port (0 to 65535): choose another port'), out.stderr


# rank 1 blocked where a signal is not seen (SIGINT held pending, as in a C++ collective or the rendezvous waiting
# for rank 0); rank 0 ends on SIGINT
DEAF_RANK = '''import os, signal, sys, time
rank = os.environ["RANK"]
if rank == "1":
    signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGINT])
open(sys.argv[1] + rank, "w").write(str(os.getpid()))
time.sleep(120)
'''


def test_ctrl_c_does_not_wait_the_full_grace_for_a_rank_blocked_on_an_ended_peer(tmp_path):
    """Ctrl-C within about a second of the ranks' start (``--nproc-per-node 2`` with the ranks started anew): one
    rank ended on it, the other, in the rendezvous waiting for it, never saw it, and the launcher waited its
    15 s grace before SIGKILL (exit 137). Now the others get 5 s once one rank has ended."""
    import signal
    import time
    script = tmp_path / 'rank.py'
    script.write_text(DEAF_RANK)
    proc = subprocess.Popen([sys.executable, '-m', 'xtuner_plugins.cli.local_launch', '--nproc-per-node', '2',
                             str(script), str(tmp_path / 'r')], env=_env(), stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not all((tmp_path / f'r{k}').is_file() for k in range(2)):
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.1)
    time.sleep(0.5)
    started = time.monotonic()
    proc.send_signal(signal.SIGINT)
    code = proc.wait(60)
    took = time.monotonic() - started
    err = proc.stderr.read()
    assert code == 130 and took < 10, (code, took, err)
    assert ('local_launch: rank 1 still running 5 s after another rank ended on SIGINT: killed (waiting on the '
            'ended rank in a collective, it could not see the signal)') in err, err


def test_a_failed_resume_is_not_told_to_resume(tmp_path):
    """Every failed resume ended with '--cfg-options resume=True continues from ...': the command that had just
    failed. A resume that saved nothing is told to start a new run from the weights; one that saved a checkpoint
    of its own before failing is told to resume from it."""
    import time

    from xtuner_plugins.cli.train_closing import next_steps
    (tmp_path / 'iter_4.pth').write_text('x')
    (tmp_path / 'last_checkpoint').write_text(str(tmp_path / 'iter_4.pth'))
    os.utime(tmp_path / 'iter_4.pth', (time.time() - 100, time.time() - 100))
    since = time.time()
    fresh = next_steps(str(tmp_path), since, argv=['cfg.py'])
    assert fresh.endswith(f'--cfg-options resume=True continues from {tmp_path}/iter_4.pth'), fresh
    for argv in (['cfg.py', '--resume', 'x/iter_4.pth'], ['cfg.py', '--cfg-options', 'resume=True']):
        said = next_steps(str(tmp_path), since, argv=argv)
        assert 'resume=True continues' not in said and 'start a new run from its weights' in said, said
    (tmp_path / 'iter_6.pth').write_text('x')   # saved by this run before it failed
    (tmp_path / 'last_checkpoint').write_text(str(tmp_path / 'iter_6.pth'))
    said = next_steps(str(tmp_path), since, argv=['cfg.py', '--resume', 'x/iter_4.pth'])
    assert said.endswith(f'resume=True continues from {tmp_path}/iter_6.pth'), said


def test_a_failed_run_whose_pointer_is_behind_is_told_the_resume_that_takes_its_newest_checkpoint(tmp_path):
    """A disk that filled as ``last_checkpoint`` was written after iter_4.pth: the closing line said
    '--cfg-options resume=True continues from WORK/iter_4.pth', yet without a pointer resume=True started over
    (now refused), and with one naming a file that is gone it is refused. It names the command that continues from
    iter_4.pth now; a pointer naming the older iter_3.pth: resume=True takes iter_4.pth (engine/resume.py)."""
    from xtuner_plugins.cli.train_closing import next_steps
    for name in ('iter_3.pth', 'iter_4.pth'):
        (tmp_path / name).write_text('x')
    newest = tmp_path / 'iter_4.pth'
    (tmp_path / 'last_checkpoint').write_text(str(tmp_path / 'iter_3.pth'))
    said = next_steps(str(tmp_path), 0.0, argv=['cfg.py'])
    assert said.endswith(f'; --cfg-options resume=True continues from {newest}'), said
    for pointer in (None, str(tmp_path / 'gone' / 'iter_9.pth')):
        if pointer:
            (tmp_path / 'last_checkpoint').write_text(pointer)
        elif (tmp_path / 'last_checkpoint').exists():
            (tmp_path / 'last_checkpoint').unlink()
        said = next_steps(str(tmp_path), 0.0, argv=['cfg.py'])
        assert said.endswith(f'; --resume {newest} continues from it ({tmp_path / "last_checkpoint"}, which '
                             'resume=True follows, does not name it)'), (pointer, said)


def test_a_resume_path_that_names_no_checkpoint_is_one_line(tmp_path):
    """``--resume auto`` (MMEngine's word is resume=True), ``--resume ''`` or a work folder: MMEngine's loader
    raised after the model was built (FileNotFoundError: Cannot find auto)."""
    from xtuner_plugins.cli.train_args import resume_refusal
    assert resume_refusal(None) is None
    for given in ('auto', '', str(tmp_path / 'iter_9.pth')):
        said = resume_refusal(given)
        assert said.startswith(f'train: refused: --resume {given!r}: no such checkpoint') and 'resume=True' in said
    assert 'a folder, not a checkpoint' in resume_refusal(str(tmp_path))
    (tmp_path / 'iter_2.pth').write_text('x')
    (tmp_path / 'iter_4.pth').mkdir()
    (tmp_path / 'iter_4.pth' / 'mp_rank_00_model_states.pt').write_text('x')
    assert resume_refusal(str(tmp_path / 'iter_2.pth')) is None and resume_refusal(str(tmp_path / 'iter_4.pth')) is None


def test_a_resume_from_a_file_no_run_saved_is_one_line(tmp_path):
    """``--resume`` of a state dict (no ``meta``) ended in XTuner's seed reader with ``KeyError: 'meta'`` and
    its traceback; of a data or .safetensors file it was called 'cut short, perhaps'."""
    import torch
    torch.save({'w': torch.zeros(2)}, tmp_path / 'plain.pth')
    (tmp_path / 'data.jsonl').write_text('{"a": 1}\n')
    for name, said in (('plain.pth', f"train: refused: --resume {tmp_path}/plain.pth: not a checkpoint a training "
                                     f"run saved (no 'meta' in it: a weights file or a state dict?); resume from a "
                                     f"run's iter_N.pth, or start from weights with "
                                     f"model.pretrained_pth={tmp_path}/plain.pth"),
                       ('data.jsonl', f'train: refused: {tmp_path}/data.jsonl is not a checkpoint torch.save wrote '
                                      f'(not a zip archive nor a pickle: a .safetensors, a data or text file?); '
                                      f"resume from a run's iter_N.pth (--resume PATH)")):
        result = subprocess.run([sys.executable, TRAIN_TOOL, os.path.join(REPO_ROOT, 'configs', 'pretrain_mlp.py'),
                                 '--work-dir', str(tmp_path / 'work'), '--resume', str(tmp_path / name)],
                                capture_output=True, text=True, timeout=300, cwd=REPO_ROOT)
        assert result.returncode == 2 and result.stderr.strip().splitlines()[-1] == said, result.stderr[-3000:]
        assert 'Traceback' not in result.stderr and not (tmp_path / 'work').exists()


def test_a_config_calling_what_it_imports_is_one_line(tmp_path):
    """MMEngine reads a config with imports lazily: ``os.path.join(...)`` in it ended in a traceback and
    'train: FAILED: RuntimeError: ' (its message empty)."""
    (tmp_path / 'calls.py').write_text("import os\n\ndata_root = os.path.join('data', 'x')\n")
    out = subprocess.run([sys.executable, TRAIN_TOOL, str(tmp_path / 'calls.py')], env=_env(), cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and 'Traceback' not in out.stderr, out.stderr[-2000:]
    assert out.stderr.strip().splitlines()[-1].startswith(
        f"train: refused: {tmp_path / 'calls.py'}: line 3 (data_root = os.path.join('data', 'x')) calls what the "
        'config imports')


def test_a_config_outside_the_checkout_importing_configs_by_package_name_is_one_line(tmp_path):
    """``from configs.finetune_lora import *`` in read_base() of a file outside the checkout ended in a traceback
    about pkg_resources (MMEngine reads the name as an installed package's)."""
    (tmp_path / 'mine.py').write_text('from mmengine.config import read_base\nwith read_base():\n'
                                      '    from configs.finetune_lora import *  # noqa\n')
    out = subprocess.run([sys.executable, TRAIN_TOOL, str(tmp_path / 'mine.py')], env=_env(), cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and 'Traceback' not in out.stderr, out.stderr[-2000:]
    assert out.stderr.strip().splitlines()[-1].startswith(
        f'train: refused: {tmp_path / "mine.py"}: a base config imported by a package name in read_base()')
