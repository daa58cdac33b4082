"""Prompt and answer templates shared by the data builders, the processor and inference.

Every builder writes its prompts through these functions, so that training data, evaluation and the
chat tools ask the same questions in the same words:

=================  ==========================================================  ==========================
task               user turn                                                   assistant turn
=================  ==========================================================  ==========================
res / rec          ``Please segment: {expr}.``                                 ``[SEG]``
gres / grec        ``Please segment: {expr}.``                                 ``[SEG]`` (0..n instances)
dlres              one of :data:`DLRES_PROMPTS`, chosen by the record id       ``[SEG]``
region_caption     ``Describe <region> in detail.``                            the caption
roc                ``What is the category of <region>? Answer with its name.`` the category as spelled
gcg                ``Describe the image in detail and segment each object …``  ``… <p>phrase</p> [SEG] …``
reason_seg         ``{question} Please answer and segment each object …``      ``… name [SEG] …``
=================  ==========================================================  ==========================
"""

from __future__ import annotations

import re
import zlib

SEG_TOKEN = "[SEG]"
"""Written by the assistant once per grounding target."""
REGION_PLACEHOLDER = "<region>"
"""Written in a user turn where a region (mask) is shown to the model; ``<region1>``, ``<region2>`` … too."""

RES_PROMPT = "Please segment: {expr}."
DLRES_PROMPTS: tuple[str, ...] = (
    "Please segment: {expr}.",
    "Please segment {expr} in this image.",
    "Segment {expr}.",
)
REGION_CAPTION_PROMPT = "Describe <region> in detail."
ROC_PROMPT = "What is the category of <region>? Answer with its name."
GCG_PROMPT = "Describe the image in detail and segment each object you mention."
REASON_SEG_SUFFIX = "Please answer and segment each object you mention."
NO_TARGET_ANSWER = "There is no such object in the image."
"""Assistant text of a reasoning question whose answer holds no object (no ``[SEG]``)."""

_WS_RE = re.compile(r"\s+")
GCG_PHRASE_RE = re.compile(r"<p>(.*?)</p>\s*\[SEG\]", re.DOTALL)
"""Matches one grounded phrase of a GCG answer; group 1 is the phrase."""


def normalize_expression(expr: str) -> str:
    """Collapse white space and drop a trailing full stop: ``"  the man on the left. "`` → ``"the man on the left"``."""
    expr = _WS_RE.sub(" ", str(expr)).strip()
    while expr.endswith("."):
        expr = expr[:-1].rstrip()
    return expr


def res_prompt(expr: str) -> str:
    """User turn of a res / rec / gres / grec record."""
    return RES_PROMPT.format(expr=normalize_expression(expr))


def dlres_prompt(expr: str, key: str) -> str:
    """User turn of a dlres record; the template is picked from :data:`DLRES_PROMPTS` by a stable hash of ``key``."""
    template = DLRES_PROMPTS[zlib.crc32(key.encode("utf-8")) % len(DLRES_PROMPTS)]
    return template.format(expr=normalize_expression(expr))


def reason_seg_prompt(question: str) -> str:
    """User turn of a reason_seg record."""
    return f"{_WS_RE.sub(' ', question).strip()} {REASON_SEG_SUFFIX}"


def gcg_phrase(phrase: str) -> str:
    """One grounded phrase of a GCG answer: ``<p>phrase</p> [SEG]``."""
    return f"<p>{phrase}</p> {SEG_TOKEN}"


def gcg_phrases(answer: str) -> list[str]:
    """The grounded phrases of a GCG answer, in order (the order of their ``[SEG]`` targets)."""
    return [m.group(1) for m in GCG_PHRASE_RE.finditer(answer)]


def join_names(names: list[str]) -> str:
    """``["a", "b", "c"]`` → ``"a, b and c"``."""
    if len(names) <= 1:
        return "".join(names)
    return ", ".join(names[:-1]) + " and " + names[-1]
