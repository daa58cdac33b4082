"""FCLM: one Qwen2.5-VL model that describes image regions and grounds text into masks and boxes.

The library never parses command-line arguments, reads environment paths or starts distributed
work; the programs in ``train/``, ``eval/``, ``data_builders/`` and ``scripts/`` do.
"""

__version__ = "0.1.0"
