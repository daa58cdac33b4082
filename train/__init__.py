"""The training program ``python -m train`` (console script ``fclm-train``); the library is :mod:`fclm.training`."""
