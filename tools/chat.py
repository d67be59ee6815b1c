"""Chat with a vision-language model: a converted folder of any format, or a config plus checkpoint.

The same as ``xtuner-plugins-chat``; its code and usage are in ``xtuner_plugins/cli/chat.py``.
"""

import sys

from xtuner_plugins.cli.chat import main

if __name__ == '__main__':
    sys.exit(main())
