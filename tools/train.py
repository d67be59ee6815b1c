"""Train with XTuner's own train script, in this process, so the exit code is the run's.

The same as ``xtuner-plugins-train``; its code and usage are in ``xtuner_plugins/cli/train.py``.
"""

import sys

from xtuner_plugins.cli.train import main

if __name__ == '__main__':
    sys.exit(main())
