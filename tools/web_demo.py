"""A web page to chat with a vision-language model: a converted folder of any format, or a config plus checkpoint. (``xtuner-plugins-web-demo``; the code is ``xtuner_plugins/cli/web_demo.py``)."""

import sys

from xtuner_plugins.cli.web_demo import main

if __name__ == '__main__':
    sys.exit(main())
