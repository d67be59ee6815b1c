"""A web page to chat with a vision-language model (a converted folder, or a config plus checkpoint).

The same as ``xtuner-plugins-web-demo``; its code and usage are in ``xtuner_plugins/cli/web_demo.py``.
"""

import sys

from xtuner_plugins.cli.web_demo import main

if __name__ == '__main__':
    sys.exit(main())
