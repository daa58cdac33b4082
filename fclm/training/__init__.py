"""Training FCLM: typed run configs, the trainability policy, checkpoints, the SAM embedding cache,
the loop on accelerate (+ DeepSpeed) and export. The program is ``python -m train`` (``fclm-train``).

Submodules are imported on demand (``from fclm.training.config import TrainConfig``) so that parsing
and checking a config never imports torch-heavy code.
"""
