"""Serve a converted model with vLLM's OpenAI-compatible server, in one command.

The same as ``xtuner-plugins-serve``; its code and usage are in ``xtuner_plugins/cli/serve.py``.
"""

import sys

from xtuner_plugins.cli.serve import main

if __name__ == '__main__':
    sys.exit(main())
