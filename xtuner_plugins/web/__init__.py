"""The web demo (``tools/web_demo.py``): a gradio app over a converted folder."""

from xtuner_plugins.web.app import WebChat, build_app, launch  # noqa: F401
