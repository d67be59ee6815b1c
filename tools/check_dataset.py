"""Check a training data set without training: every sample, every image, every problem.

``xtuner-plugins-check-dataset`` when the package is installed; the code and its usage are in ``xtuner_plugins/cli/check_dataset.py``.
"""

import sys

from xtuner_plugins.cli.check_dataset import main

if __name__ == '__main__':
    sys.exit(main())
