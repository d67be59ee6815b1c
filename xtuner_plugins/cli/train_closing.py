"""What ``tools/train.py`` (``cli/train.py``) says after the cause in a stopped or failed run's closing line:
:func:`interrupted_line`, a stop's whole line (the iteration, the last checkpoint and the command that resumes), and
:func:`next_steps`, a failure's tail (where the run's log is, and what to do: fix and run again, resume, or start
from the weights). The cause itself is named by ``train_failures.py``.
"""

import glob
import os
import sys

from xtuner_plugins.cli.train_args import resume_command, resumed_from, resuming
from xtuner_plugins.outcome import find_checkpoints


def interrupted_line(work_dir: str, argv, how: str = 'interrupted') -> str:
    """``train: interrupted at iteration N; last checkpoint PATH (or none); resume: COMMAND``: the iteration under
    way (MMEngine's message hub), the work folder's last checkpoint (its newest where the pointer names another) and
    ``argv`` run again from it (``how``: ``stopped by SIGTERM`` in place of ``interrupted``)."""
    from mmengine.logging import MessageHub

    from xtuner_plugins.engine.progress import last_checkpoint
    info = MessageHub.get_current_instance().runtime_info
    where = f'at iteration {info["iter"] + 1}' if isinstance(info.get('iter'), int) else 'before training started'
    checkpoint = last_checkpoint(work_dir) if os.path.isdir(work_dir) else None
    saved = find_checkpoints(work_dir)
    if saved and not _pointer_names(work_dir, saved[-1]):   # a stop between a save and its pointer: --resume of the
        checkpoint = saved[-1]                              # pointer's would be refused (later checkpoints here)
    given = resumed_from(argv)
    if checkpoint is None and given:   # (the command without its --resume started over: the progress lost)
        return (f'train: {how} {where}; nothing saved in {work_dir}; resume: {resume_command(argv, given)} '
                'continues from the checkpoint it was given')
    if checkpoint is None:
        return (f'train: {how} {where}; last checkpoint none; resume: nothing saved to resume from, '
                f'{resume_command(argv, None)} starts over')
    return f'train: {how} {where}; last checkpoint {checkpoint}; resume: {resume_command(argv, checkpoint)}'


def _pointer_names(work_dir: str, checkpoint: str) -> bool:
    """Whether ``resume=True`` in ``work_dir`` takes ``checkpoint``: its ``last_checkpoint`` names it (a disk that
    filled as the pointer was written leaves it naming the checkpoint before, or leaves none)."""
    from xtuner_plugins.engine.resume import ResumeError, resume_target
    try:
        taken = resume_target(work_dir)[0]
    except ResumeError:
        return False
    return taken is not None and os.path.realpath(taken) == os.path.realpath(checkpoint)


def next_steps(work_dir: str, since: float, traceback: bool = True, argv=None) -> str:
    """Where this run's log is, and what to do (``traceback``: one was printed above). A resume that failed before
    it saved a checkpoint is not told to resume (it recommended the command that had just failed)."""
    logs = [p for p in glob.glob(os.path.join(work_dir, '*', '*.log')) if os.path.getmtime(p) >= since - 1]
    where = f'the run\'s log: {max(logs, key=os.path.getmtime)}' if logs else \
        f'no run log was written (the run stopped before it started; its log would be under {work_dir}/<timestamp>/)'
    checkpoints = find_checkpoints(work_dir) if os.path.isdir(work_dir) else []
    resume = f'; --cfg-options resume=True continues from {checkpoints[-1]}' if checkpoints else ''
    if checkpoints and not _pointer_names(work_dir, checkpoints[-1]):   # resume=True would take another, or none
        resume = (f'; --resume {checkpoints[-1]} continues from it ({os.path.join(work_dir, "last_checkpoint")}, which '
                  'resume=True follows, does not name it)')
    saved_here = bool(checkpoints) and os.path.getmtime(checkpoints[-1]) >= since - 1
    if resuming(sys.argv[1:] if argv is None else argv) and not saved_here:   # the resume itself failed
        resume = ('; this run was a resume: if the checkpoint is the problem, start a new run from its weights '
                  '(--cfg-options load_from=CHECKPOINT, without --resume, another --work-dir)')
    return f'{where}; {"the traceback is above: " if traceback else ""}fix its cause and run again{resume}'
