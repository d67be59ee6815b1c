"""Errors whose message says all a person needs: what is wrong, where (the setting, the file, the sample), the
numbers, and what to do. ``tools/train.py`` (``cli/train.py``) prints such an error in one line, without its
traceback, which would add nothing a user acts on; any other exception keeps its traceback (a bug's report
needs it).

* :class:`Refused`: a setting or an input of the run that cannot work (a model argument, a checkpoint that does
  not match the config, a work folder another run holds), found before training starts: ``train: refused: ...``,
  exit code 2, as the start-up checks (``engine/runstart.refuse``) end.
* :class:`Stated`: a failure during training that the message explains whole (an annotation file changed under
  the run, too many bad samples, a loss no longer finite): ``train: FAILED: ...`` and where the run's log and
  checkpoints are, exit code 1.

Both stay what they were to callers (a :class:`Refused` is a ``ValueError``; the others keep their own bases).
This module imports nothing, so any module may use it.
"""


class Stated(Exception):
    """A failure whose message is complete: printed in one line, without a traceback."""


class Refused(Stated, ValueError):
    """A setting or an input of the run that cannot work, named in the message with what to do instead."""


class NotFound(Refused, FileNotFoundError):
    """A path the run was given that is not there, or not of the kind it names (a file for a folder): a
    :class:`Refused` that callers catching ``FileNotFoundError`` still catch."""
