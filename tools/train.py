"""Train with XTuner's own train script, in this process, so the exit code is the run's.

``xtuner-plugins-train`` when the package is installed; the code and its usage are in ``xtuner_plugins/cli/train.py``.
"""

import sys

from xtuner_plugins.cli.train import main

if __name__ == '__main__':
    sys.exit(main())
