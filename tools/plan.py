"""Will it fit: per-device memory of a training config, and the largest sequence length and batch that fit.

The same as ``xtuner-plugins-plan``; its code and usage are in ``xtuner_plugins/cli/plan.py``.
"""

import sys

from xtuner_plugins.cli.plan import main

if __name__ == '__main__':
    sys.exit(main())
