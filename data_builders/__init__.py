"""Builders that turn each benchmark's own format into FCLM records (``python -m data_builders``, ``fclm-data``).

One module per source, each with an options dataclass, ``build(options) -> BuildResult`` (callable
from Python and tests), and ``add_arguments`` / ``run`` for the command line:

==============  ====================================================  ==========================
command         reads                                                 writes (task)
==============  ====================================================  ==========================
refcoco         refer format ``refs(X).p`` + ``instances.json``        res / rec
grefcoco        ``grefs(unc).json`` + ``instances.json``               gres / grec
rrefcoco        R-RefCOCO refer format with ``exist``                 gres
refzom          Ref-ZOM ``refs(final).p`` (``source`` zero/one/many)   gres
dam             Describe Anything ``annotations.json`` + tar shards    region_caption
dlres           region_caption JSONL (rule or LLM rewriter)           dlres
lvis-roc        Osprey LVIS/PACO eval json or LVIS instances          roc
gcg             GranD-f GCG json (train or eval layout)               gcg
muse            MUSE json (PixelLM)                                   reason_seg
osprey          Osprey-724K json                                      conversation / region_caption
synthetic       (generated) ShapesRef                                 every task above
validate        any schema JSONL                                      (report)
stats           any schema JSONL                                      (table)
==============  ====================================================  ==========================

Every builder reports a bad input with its file and line/key, skips it and prints the count at the
end (``--strict`` fails instead), and writes its output atomically.

Hostile input costs only the entry it is in, never the run or the machine: JSON Lines are decoded line
by line (invalid UTF-8, lone surrogate escapes, nesting deeper than ``fclm.io.MAX_JSON_DEPTH`` are
reported as ``file:line``); a whole-file JSON that cannot be read is one error line naming the file
(and the byte/line of invalid UTF-8); pickles load through :mod:`fclm.data.safe_pickle` (no code, and
size/depth/object/time limits); masks go through :mod:`fclm.masks` (non-finite or far-out polygons and
oversized RLE refused before pycocotools); image sizes must be positive integers; every record passes
:class:`~data_builders.common.RecordGate` (schema, unique id) and is written as strict UTF-8 JSON, or is
reported with the entry it came from. ``dam`` extracts only regular tar members, under ``--image-dir``,
and resumes only from parts built from the same inputs and options.
"""
