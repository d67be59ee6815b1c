"""The command-line tools, one module each, with its ``main``: console scripts ``xtuner-plugins-<tool>``
(``pyproject.toml``) and the shims ``tools/<tool>.py`` run them."""
