"""Write tiny, randomly initialised look-alikes of the real checkpoints, offline, in seconds.

The same as ``xtuner-plugins-make-tiny-models``; its code and usage are in ``xtuner_plugins/cli/make_tiny_models.py``.
"""

import sys

from xtuner_plugins.cli.make_tiny_models import main

if __name__ == '__main__':
    sys.exit(main())
