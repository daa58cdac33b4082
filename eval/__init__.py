"""``fclm-eval`` (``python -m eval``): the evaluation program. The metrics live in :mod:`fclm.metrics`."""
