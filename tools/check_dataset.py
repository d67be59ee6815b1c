"""Check a training data set without training: every sample, every image, every problem.

The same as ``xtuner-plugins-check-dataset``; its code and usage are in ``xtuner_plugins/cli/check_dataset.py``.
"""

import sys

from xtuner_plugins.cli.check_dataset import main

if __name__ == '__main__':
    sys.exit(main())
