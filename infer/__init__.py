"""Programs that run a trained FCLM: ``fclm-infer`` (``python -m infer``, batched predictions over a JSONL)
and ``fclm-chat`` (``python -m infer.chat``, a REPL and one-shot questions). Thin: the work is in
:mod:`fclm.inference`."""
