"""Evaluate a vision-language model, and measure how much it relies on the image.

The same as ``xtuner-plugins-eval``; its code and usage are in ``xtuner_plugins/cli/eval.py``.
"""

import sys

from xtuner_plugins.cli.eval import main

if __name__ == '__main__':
    sys.exit(main())
