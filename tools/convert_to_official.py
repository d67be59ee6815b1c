"""Convert a training checkpoint into an InternVL Hugging Face folder.

The same as ``xtuner-plugins-convert``; its code and usage are in ``xtuner_plugins/cli/convert.py``.
"""

import sys

from xtuner_plugins.cli.convert import main

if __name__ == '__main__':
    sys.exit(main())
