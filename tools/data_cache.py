"""The data sets' cache: its size, what no run has used for a while, and --prune to remove that.

The same as ``xtuner-plugins-data-cache``; its code and usage are in ``xtuner_plugins/cli/data_cache.py``.
"""

import sys

from xtuner_plugins.cli.data_cache import main

if __name__ == '__main__':
    sys.exit(main())
