"""Chat with a vision-language model: a converted folder of any format, or a training config plus checkpoint.

``xtuner-plugins-chat`` when the package is installed; the code and its usage are in ``xtuner_plugins/cli/chat.py``.
"""

import sys

from xtuner_plugins.cli.chat import main

if __name__ == '__main__':
    sys.exit(main())
