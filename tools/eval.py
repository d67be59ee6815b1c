"""Evaluate a vision-language model, and measure how much it relies on the image.

``xtuner-plugins-eval`` when the package is installed; the code and its usage are in ``xtuner_plugins/cli/eval.py``.
"""

import sys

from xtuner_plugins.cli.eval import main

if __name__ == '__main__':
    sys.exit(main())
