"""The web demo (``tools/web_demo.py``): a gradio app over a converted folder."""

from xtuner_plugins.web.app import WebChat, build_app  # noqa: F401
from xtuner_plugins.web.server import launch  # noqa: F401
