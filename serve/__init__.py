"""``fclm-serve`` (``python -m serve``): an OpenAI-compatible HTTP API over :class:`fclm.inference.FCLMPredictor`
that returns masks beside the text, and a web page to draw regions and see masks. See :mod:`serve.app`."""
