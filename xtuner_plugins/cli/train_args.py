"""What ``tools/train.py``'s command line says, read before anything loads (``cli/train.py`` acts on it): the
refusals of ``--cfg-options``, ``--resume``, ``--deepspeed`` and ``--nproc-per-node`` in one line each, the
launcher a rank was started by, and the command that resumes a run (the interrupted line's and the failure
summary's)."""

import os
import shlex
import sys
from typing import List, Optional, Tuple

from xtuner_plugins.outcome import deepspeed_checkpoint

NPROC_OPTIONS = ('--nproc-per-node', '--nproc_per_node')


def options_refusal(args, argv) -> Optional[str]:
    """The line refusing the ``--cfg-options`` of ``argv`` (``args``: XTuner's reading of it), or an
    ``--option=~/path`` the shell left unexpanded; None: none given, or nothing wrong with them."""
    from xtuner_plugins.cfg_words import cfg_options_words, comma_paths, spaced_values, tilde_values
    dashed = tilde_values([w for w in argv if w.startswith('--') and '=' in w])   # --work-dir=~/runs
    if dashed:
        return f'train: refused: {"; ".join(dashed)}'
    if not (args.cfg_options and os.path.isfile(args.config)):
        return None
    words = cfg_options_words(argv)
    problems = (spaced_values(words) or comma_paths(words) or tilde_values(words)
                or option_problems(args.config, args.cfg_options))
    return (f'train: FAILED before loading anything: --cfg-options: {"; ".join(problems)} (fix the keys named '
            'and run again)') if problems else None


def unpaired_refusal(argv) -> Optional[str]:
    """The line refusing ``--cfg-options`` words of ``argv`` that are not ``KEY=VALUE`` (``cfg_words.unpaired_words``)
    or call a name (``cfg_words.call_values``), read before XTuner's parser, which raises on them, or give a key twice
    with different values (``cfg_words.twice_given``: MMEngine kept the last); None when there are none."""
    from xtuner_plugins.cfg_words import call_values, cfg_options_words, twice_given, unpaired_words
    words = cfg_options_words(argv)
    problems = unpaired_words(words) or call_values(words) or twice_given(words)
    return f'train: FAILED before loading anything: --cfg-options: {"; ".join(problems)}' if problems else None


def resume_refusal(path: Optional[str]) -> Optional[str]:
    """The line refusing ``--resume PATH`` that names no checkpoint (``auto``, a work folder, a typo), before
    anything loads (a traceback of MMEngine's loader came after the model was built); None: none given, or one."""
    if path is None:
        return None
    auto = ('; to continue from the work folder\'s last checkpoint: --cfg-options resume=True (without --resume)')
    if not path or not os.path.exists(path):
        return f'train: refused: --resume {path!r}: no such checkpoint (work_dirs/<config>/iter_N.pth){auto}'
    if os.path.isdir(path) and not deepspeed_checkpoint(path):
        return (f'train: refused: --resume {path}: a folder, not a checkpoint (a file iter_N.pth, or the folder '
                f'DeepSpeed saves, holding *model_states.pt){auto}')
    return None


def deepspeed_refusal(argv) -> Optional[str]:
    """The line refusing ``--deepspeed NAME|JSON`` that is neither a file nor one of XTuner's names, a file that is
    not a JSON object, or a ZeRO stage other than 0-3; read before any rank starts (each rank ended in XTuner's
    ``FileNotFoundError: Cannot find X``, json's or DeepSpeed's validation traceback). None otherwise."""
    import importlib.util
    import json
    given = flag_values(argv, '--deepspeed')
    if not given:
        return None
    value = given[-1]
    spec = importlib.util.find_spec('xtuner')
    folder = os.path.join(list(spec.submodule_search_locations)[0], 'configs', 'deepspeed') if spec else ''
    names = sorted(n[:-5] for n in os.listdir(folder) if n.endswith('.json')) if os.path.isdir(folder) else []
    path = value if os.path.isfile(value) else os.path.join(folder, f'{value}.json') if value in names else None
    if path is None:
        return (f'train: refused: --deepspeed {value!r}: no such file, nor one of XTuner\'s DeepSpeed configs '
                f'({", ".join(names)}); give one of those names or the path of a .json file')
    try:
        with open(path, encoding='utf-8') as f:
            config = json.load(f)
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        return f'train: refused: --deepspeed {value}: not a JSON file DeepSpeed can read ({exc})'
    if not isinstance(config, dict) or not isinstance(config.get('zero_optimization', {}), dict):
        return f'train: refused: --deepspeed {value}: a DeepSpeed config is a JSON object of settings'
    stage = config.get('zero_optimization', {}).get('stage', 0)
    if isinstance(stage, bool) or stage not in (0, 1, 2, 3):
        return f'train: refused: --deepspeed {value}: zero_optimization.stage {stage!r}; ZeRO has stages 0, 1, 2 and 3'
    return None


def flag_values(argv, flag: str = '--launcher') -> List[str]:
    """The values given to ``flag`` in ``argv`` (``--launcher X`` and ``--launcher=X``), in order."""
    return [argv[i + 1] if a == flag and i + 1 < len(argv) else a.partition('=')[2]
            for i, a in enumerate(argv) if a == flag or a.startswith(flag + '=')]


def started_by_a_launcher(argv) -> bool:
    """Whether this process is a rank a launcher started: ``--launcher`` other than ``none`` (torchrun's
    ``pytorch``, srun's ``slurm``, ``mpi``; the last given, as argparse takes it), or torchrun's variables in the
    environment."""
    given = flag_values(argv)
    return (bool(given) and given[-1] not in ('none', '')) or any(k in os.environ for k in ('RANK', 'LOCAL_RANK'))


def nproc_option(argv) -> Tuple[Optional[int], List[str]]:
    """``(N of --nproc-per-node N, argv without it)``; ``(None, argv)`` without the option. A value that is not
    a whole number >= 1, or two different values, end the program with one line, exit code 2."""
    nproc, rest, words = None, [], list(argv)
    while words:
        word = words.pop(0)
        name, eq, value = word.partition('=')
        if name not in NPROC_OPTIONS:
            rest.append(word)
            continue
        if not eq:
            value = words.pop(0) if words else ''
        if not (value.isascii() and value.isdigit()) or int(value) < 1 or nproc not in (None, int(value)):
            print(f'train: {name} {value!r}: give the number of processes on this machine (1 or more), once',
                  file=sys.stderr)
            raise SystemExit(2)
        nproc = int(value)
    return nproc, rest


def resumed_from(argv) -> Optional[str]:
    """The checkpoint ``--resume PATH`` (or ``--resume=PATH``) of ``argv`` names, the last one given; None: none."""
    given = [argv[i + 1] if a == '--resume' else a.partition('=')[2] for i, a in enumerate(argv)
             if (a == '--resume' and i + 1 < len(argv)) or a.startswith('--resume=')]
    return given[-1] if given and given[-1] and not given[-1].startswith('-') else None


def resume_command(argv, checkpoint) -> str:
    """``argv`` (this process's, ``sys.argv``) as a command to type, continuing from ``checkpoint``: ``--resume``
    and a ``resume=`` of ``--cfg-options`` replaced by ``--resume CHECKPOINT``."""
    words, option, skip = [], None, False
    for word in argv[1:]:
        if skip or word == '--resume' or word.startswith('--resume='):
            skip = word == '--resume'
            continue
        if word.startswith('-'):
            option = word
        elif option == '--cfg-options' and word.split('=', 1)[0] == 'resume':
            continue
        words.append(word)
    words = [w for i, w in enumerate(words)  # a --cfg-options left without a value
             if w != '--cfg-options' or (i + 1 < len(words) and not words[i + 1].startswith('-'))]
    if checkpoint:
        words += ['--resume', checkpoint]
    script = argv[0]
    launcher = f'python {script}' if script.endswith('.py') else os.path.basename(script)
    world, local = int(os.environ.get('WORLD_SIZE', '1')), int(os.environ.get('LOCAL_WORLD_SIZE', '1'))
    if 'SLURM_PROCID' in os.environ and 'slurm' in argv:  # a task of srun (--launcher slurm): srun starts it again
        launcher = f'srun <your srun options> python {script}'
    elif world > 1 and os.environ.get('XTUNER_PLUGINS_LAUNCHER') == 'local_launch':  # --nproc-per-node N
        launcher = f'python {script} --nproc-per-node {local}'
        words = [w for i, w in enumerate(words) if w != '--launcher' and (i == 0 or words[i - 1] != '--launcher')]
    elif world > 1:  # a rank of torchrun: its launcher options are torchrun's
        launcher = (f'torchrun --nproc_per_node={local} {script}' if world == local else
                    f'torchrun <your launcher options> {script}')
    return ' '.join([launcher, shlex.join(words)]).strip()


def option_problems(config: str, options: dict) -> list:
    """What is wrong with ``--cfg-options`` for ``config``, one line each: the keys and values
    (``engine/options.py``) and the training length they give (``engine/length.py``)."""
    import copy

    from mmengine.config import Config

    from xtuner_plugins.engine.length import resolve_training_length
    from xtuner_plugins.engine.options import check_cfg_options
    from xtuner_plugins.cfg_words import option_into_unset
    written = Config.fromfile(config)
    problems = check_cfg_options(written, options)
    if not problems and option_into_unset(written, options):   # MMEngine's merge would stop with a traceback
        problems.append(option_into_unset(written, options))
    nested = [(a, b) for a in options for b in options if b.startswith(a + '.')]
    if not problems and nested:   # MMEngine's merge: a TypeError (a str does not support item assignment)
        a, b = nested[0]
        problems.append(f'{a}={options[a]} gives {a} a value and {b}={options[b]} a key inside it: '
                        f'give one of them')
    if not problems:
        merged = copy.deepcopy(written)
        merged.merge_from_dict(options)
        try:
            resolve_training_length(merged._cfg_dict, options)
        except ValueError as exc:
            problems.append(str(exc))
    return problems


def resuming(argv) -> bool:
    """Whether the command line resumes (``--resume``, ``resume=True`` among its options)."""
    return any(a == '--resume' or a.startswith('--resume=') or a.replace(' ', '') in ('resume=True', 'resume=true')
               for a in argv)
