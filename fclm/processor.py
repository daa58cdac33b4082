"""Records + images → model batches: Qwen2.5-VL chat encoding, image patches, the SAM frame, regions and targets.

:class:`FCLMProcessor` turns one JSONL record (DESIGN.md §4) and its image into tensors
(:meth:`~FCLMProcessor.encode_record`) and stacks several into a batch (:meth:`~FCLMProcessor.collate`).

Conversation (Qwen2.5-VL chat format; the image sits at the start of the first user turn)::

    <|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n
    <|im_start|>user\\n<|vision_start|><|image_pad|>×n<|vision_end|>{user text}<|im_end|>\\n
    <|im_start|>assistant\\n{answer}<|im_end|>\\n            (repeated per turn)

``input_ids`` are built piece by piece, never by parsing a rendered string:

* structural tokens are inserted by id; ``n = grid_h · grid_w / merge²`` image pads per image;
* user and system text is encoded with ``split_special_tokens=True``, so a literal "[SEG]", "<mask>" or
  "<|im_start|>" typed by a user is ordinary text; in user text only, ``<region>`` / ``<regionN>``
  (1-based index into the in-prompt regions) become the ids of ``<mask><pos>``;
* assistant text from the dataset: "[SEG]" becomes the special token, nothing else is special;
* ``role\\n`` headers are encoded on their own. For usual text this is exactly what the Qwen2.5-VL
  chat template + tokenizer give (tested with the real vocabulary); when a message *starts* with
  whitespace, the template's single-string tokenization may merge it with the header's newline,
  while ours keeps the header as the model sees it when generating.

Labels: -100 everywhere except each assistant answer's tokens and its closing ``<|im_end|>`` (the
token that ends generation). The ``\\n`` after ``<|im_end|>``, headers, system and user turns are not
labelled.

Records: :func:`fclm.data.schema.parse_record` parses and checks the conversation (placeholders,
``[SEG]`` count, structure); masks, boxes and ``target_index`` are checked with the schema's rules
(:func:`~fclm.data.schema.decode_record_mask`, :func:`~fclm.data.schema.box_problem`,
:func:`~fclm.data.schema.box_mask_problem`, :func:`~fclm.data.schema.target_index_problem`) where they
are decoded. An encodable record may omit what only a stored record needs (``image``, ``task``, boxes).

Regions: the mask (RLE or polygon, ``fclm.masks.decode_mask``) is the truth; its tight box gives
``region_boxes`` and the crop. A record's ``box`` is only checked against it: IoU below
``ProcessorConfig.box_check_iou`` (and a corner more than 2 px off) is an error — it catches xywh/xyxy
mix-ups and masks paired with the wrong box.
The crop is the box enlarged by ``context_margin`` × its width/height on each side, clipped to the image.
Regions of a sample are ordered by the placeholders that reference them (``<regionN>`` may repeat a
region: each occurrence is one ``<mask><pos>`` pair and one row of the region tensors), then the
regions with ``in_prompt: false`` in record order. ``latent_pairs`` pair a region's first row with the
``[SEG]`` given by its ``target_index``.

SAM frame (size S = ``sam_img_size``; :mod:`fclm.image_ops`): the image resized so its longest side is S with PIL bilinear
(as ``segment_anything.utils.transforms.ResizeLongestSide``), normalised with SAM's pixel mean/std,
zero-padded bottom/right. Masks are resized with the same bilinear filter and thresholded at 0.5; a
non-empty mask that would vanish keeps its highest-coverage pixels.

Batch (output of :meth:`FCLMProcessor.collate`; B samples, L tokens, R regions, N ``[SEG]``;
order: sample by sample, then order of appearance)::

    input_ids, attention_mask, labels, mm_token_type_ids   B×L long (right padding; pad = <|endoftext|>)
    pixel_values            P×(3·T·p·p) float   Qwen2.5-VL patches of all images
    image_grid_thw          B×3 long
    sam_images              B×3×S×S float;  sam_valid_hw B×2 long;  original_hw B×2 long (H, W)
    image_keys              list[str]   sha1 of the pixels + SAM preprocessing (embedding cache key)
    region_masks            R×S×S float {0,1};  region_boxes R×4 normalised xyxy of the original image
    region_batch_index      R long;  region_in_prompt R bool
    region_crops            R×3×S×S float;  region_crop_masks R×S×S float;  region_crop_keys list[str]
    target_masks            N×S×S float (union of instances);  target_exists N bool
    target_instance_masks   list of N tensors n_i×S×S;  target_instance_boxes list of N tensors n_i×4
    seg_batch_index         N long
    latent_pairs            P×2 long (global [SEG] index, global region index)
    heads, ids              list[str] per sample
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image
from qwen_vl_utils import smart_resize
from transformers import AutoTokenizer, PreTrainedTokenizerBase
from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor

from fclm import image_ops
from fclm.config import FCLMConfig, from_dict, to_dict
from fclm.data.schema import (
    BOX_MASK_TOLERANCE,
    ParsedRecord,
    Placeholder,
    Turn,
    box_mask_problem,
    box_problem,
    decode_record_mask,
    parse_record,
    record_head,
    target_entry_problem,
    target_index_problem,
)
from fclm.image_ops import SAM_PIXEL_MEAN, SAM_PIXEL_STD, load_image, sha1_key, to_rgb
from fclm.io import RecordError, write_json
from fclm.masks import encode_mask, mask_to_box
from fclm.tokenizer import DEFAULT_SYSTEM_PROMPT, QWEN2_5_VL_CHAT_TEMPLATE, add_fclm_tokens, token_ids

# load_image, to_rgb and the SAM constants live in fclm.image_ops; they stay importable from here.
__all__ = [
    "BATCH_KEYS", "BOX_TOLERANCE_PX", "IGNORE_INDEX", "PROCESSOR_CONFIG_NAME", "SAM_PIXEL_MEAN", "SAM_PIXEL_STD",
    "FCLMProcessor", "ProcessorConfig", "load_image", "to_rgb",
]

PROCESSOR_CONFIG_NAME = "fclm_processor_config.json"
IGNORE_INDEX = -100
BOX_TOLERANCE_PX = BOX_MASK_TOLERANCE
"""A record box within this many pixels of its mask's box always passes the check (tiny objects)."""

BATCH_KEYS: tuple[str, ...] = (
    "input_ids", "attention_mask", "labels", "pixel_values", "image_grid_thw", "mm_token_type_ids",
    "sam_images", "sam_valid_hw", "original_hw", "image_keys",
    "region_masks", "region_boxes", "region_batch_index", "region_in_prompt", "region_crops", "region_crop_masks",
    "region_crop_keys",
    "target_masks", "target_exists", "target_instance_masks", "target_instance_boxes", "seg_batch_index",
    "latent_pairs", "heads", "ids",
)
"""Exactly the keys of a batch (CONTRACTS.md, Batch)."""


@dataclass
class ProcessorConfig:
    """Settings of :class:`FCLMProcessor` (saved as ``fclm_processor_config.json``)."""

    patch_size: int = 14
    """Qwen vision patch size (pixels)."""
    spatial_merge_size: int = 2
    """Qwen merges merge×merge patches into one LLM token."""
    temporal_patch_size: int = 2
    min_pixels: int = 112 * 112
    """Smallest image area after Qwen resizing (qwen-vl-utils ``smart_resize``)."""
    max_pixels: int = 112 * 112
    """Largest image area after Qwen resizing."""
    sam_img_size: int = 1024
    """Side S of the square SAM frame."""
    context_margin: float = 0.25
    """Region crop = mask box enlarged by this fraction of its width/height on each side, clipped."""
    default_head: str = "sam"
    """Head used when a record names none."""
    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    """System turn used when a record's messages start without one (Qwen2.5-VL's default)."""
    box_check_iou: float = 0.5
    """A record region's ``box`` must have at least this IoU with its mask's tight box, or lie within
    ``BOX_TOLERANCE_PX`` of it on every side (0 disables the check)."""

    def __post_init__(self) -> None:
        for name in ("patch_size", "spatial_merge_size", "temporal_patch_size", "sam_img_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"processor.{name} must be positive")
        if self.min_pixels > self.max_pixels:
            raise ValueError("processor.min_pixels must be <= processor.max_pixels")
        if not 0.0 <= self.box_check_iou <= 1.0:
            raise ValueError("processor.box_check_iou must be in [0, 1]")
        if self.context_margin < 0:
            raise ValueError("processor.context_margin must be >= 0")

    @classmethod
    def from_fclm_config(cls, cfg: FCLMConfig) -> "ProcessorConfig":
        """The processor settings implied by a model config (backbone sizes, SAM frame, crop margin, default head)."""
        b = cfg.backbone
        return cls(
            patch_size=b.patch_size,
            spatial_merge_size=b.spatial_merge_size,
            temporal_patch_size=b.temporal_patch_size,
            min_pixels=b.min_pixels,
            max_pixels=b.max_pixels,
            sam_img_size=cfg.sam.img_size,
            context_margin=cfg.region_extractor.context_margin,
            default_head=cfg.heads.default,
        )


class FCLMProcessor:
    """Tokenizer + Qwen2-VL image processor + SAM preprocessing + region/target handling.

    Arguments:
        tokenizer: a Qwen2.5-VL tokenizer (real, or ``fclm.tokenizer.build_tiny_tokenizer``); the FCLM
            tokens are added to it if missing (resize the model's embeddings to ``len(tokenizer)``).
        config: :class:`ProcessorConfig`; :meth:`from_config` derives it from an :class:`FCLMConfig`.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, config: ProcessorConfig | None = None) -> None:
        self.tokenizer = tokenizer
        self.config = config if config is not None else ProcessorConfig()
        add_fclm_tokens(tokenizer)
        self.token_ids = token_ids(tokenizer)
        if not getattr(tokenizer, "chat_template", None):
            tokenizer.chat_template = QWEN2_5_VL_CHAT_TEMPLATE
        c = self.config
        # The image arrives already resized by smart_resize (qwen-vl-utils' sizing and PIL bicubic, exactly
        # as qwen_vl_utils.fetch_image); the HF processor then only rescales, normalises and patchifies.
        self.image_processor = Qwen2VLImageProcessor(
            patch_size=c.patch_size,
            temporal_patch_size=c.temporal_patch_size,
            merge_size=c.spatial_merge_size,
            min_pixels=c.min_pixels,
            max_pixels=c.max_pixels,
        )
        self._text_cache: dict[str, list[int]] = {}

    # ------------------------------------------------------------------------------------------
    # construction, save / load
    # ------------------------------------------------------------------------------------------

    @classmethod
    def from_config(cls, cfg: FCLMConfig, tokenizer: PreTrainedTokenizerBase | None = None) -> "FCLMProcessor":
        """A processor for a model config; the tokenizer defaults to ``fclm.tokenizer.load_tokenizer(cfg.backbone)``."""
        if tokenizer is None:
            from fclm.tokenizer import load_tokenizer

            tokenizer = load_tokenizer(cfg.backbone)
        return cls(tokenizer, ProcessorConfig.from_fclm_config(cfg))

    def save_pretrained(self, directory: str | Path) -> None:
        """Write the tokenizer, ``fclm_processor_config.json`` and the HF image processor's config."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save_pretrained(directory)
        self.image_processor.save_pretrained(directory)
        write_json(directory / PROCESSOR_CONFIG_NAME, to_dict(self.config))

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> "FCLMProcessor":
        """Load a directory written by :meth:`save_pretrained` (local files only)."""
        directory = Path(directory)
        cfg_file = directory / PROCESSOR_CONFIG_NAME
        if not cfg_file.is_file():
            raise FileNotFoundError(f"{directory} has no {PROCESSOR_CONFIG_NAME}; was it written by FCLMProcessor?")
        config = from_dict(ProcessorConfig, json.loads(cfg_file.read_text()), prefix=str(cfg_file))
        tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
        return cls(tokenizer, config)

    # ------------------------------------------------------------------------------------------
    # images
    # ------------------------------------------------------------------------------------------

    def qwen_image_size(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) the Qwen vision tower sees: qwen-vl-utils ``smart_resize`` with this config."""
        c = self.config
        return smart_resize(height, width, factor=c.patch_size * c.spatial_merge_size,
                            min_pixels=c.min_pixels, max_pixels=c.max_pixels)

    def qwen_image_inputs(self, image: Image.Image) -> tuple[torch.Tensor, torch.Tensor]:
        """``pixel_values`` (grid_h·grid_w × 3·T·p·p) and ``image_grid_thw`` (3,) for one RGB image."""
        h, w = self.qwen_image_size(image.height, image.width)
        resized = image.resize((w, h), Image.BICUBIC) if (h, w) != (image.height, image.width) else image
        out = self.image_processor(images=[resized], do_resize=False, return_tensors="pt")
        return out["pixel_values"].float(), out["image_grid_thw"][0].long()

    def num_image_tokens(self, image_grid_thw: torch.Tensor | Sequence[int]) -> int:
        """Number of ``<|image_pad|>`` tokens for one image: t·h·w / merge²."""
        t, h, w = (int(v) for v in image_grid_thw)
        return t * h * w // (self.config.spatial_merge_size ** 2)

    def sam_resize_shape(self, height: int, width: int) -> tuple[int, int]:
        """Size of an image inside the SAM frame (``ResizeLongestSide.get_preprocess_shape``)."""
        return image_ops.sam_resize_shape(height, width, self.config.sam_img_size)

    def sam_preprocess(self, image: Image.Image) -> tuple[torch.Tensor, tuple[int, int]]:
        """RGB image → (3×S×S normalised, zero-padded SAM input, (h, w) of the resized image inside it)."""
        return image_ops.sam_preprocess(image, self.config.sam_img_size)

    def mask_to_frame(self, mask: np.ndarray, resized_hw: tuple[int, int]) -> torch.Tensor:
        """Boolean H×W mask → S×S float {0,1} in the SAM frame of an image resized to ``resized_hw``
        (:func:`fclm.image_ops.mask_to_frame`)."""
        return image_ops.mask_to_frame(mask, resized_hw, self.config.sam_img_size)

    def crop_box(self, box: Sequence[float], height: int, width: int) -> tuple[int, int, int, int]:
        """Integer crop ``(x1, y1, x2, y2)``: ``box`` enlarged by ``context_margin`` of its size per side, clipped."""
        return image_ops.crop_box(box, height, width, self.config.context_margin)

    def sam_signature(self) -> str:
        """What the SAM embedding of an image depends on besides its pixels."""
        return image_ops.sam_signature(self.config.sam_img_size)

    # ------------------------------------------------------------------------------------------
    # text
    # ------------------------------------------------------------------------------------------

    def _text(self, text: str) -> list[int]:
        """Token ids of plain text: no added token (special or not) is ever produced from it.

        Runs the tokenizer's own normaliser → pre-tokenizer → BPE without its added-token matching, i.e.
        ``encode(text, split_special_tokens=True)`` also for added tokens that are not marked special
        (Qwen2.5's ``<tool_call>``, ``<|fim_prefix|>`` …).
        """
        if not text:
            return []
        cached = self._text_cache.get(text)
        if cached is not None:
            return cached
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is None:  # a slow tokenizer: the library's own switch
            ids = self.tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True)
        else:
            normalized = backend.normalizer.normalize_str(text) if backend.normalizer is not None else text
            pieces = (
                [p for p, _ in backend.pre_tokenizer.pre_tokenize_str(normalized)]
                if backend.pre_tokenizer is not None
                else [normalized]
            )
            ids = [t.id for p in pieces for t in backend.model.tokenize(p)]
        if len(text) < 64:
            self._text_cache[text] = ids
        return ids

    # ------------------------------------------------------------------------------------------
    # one record
    # ------------------------------------------------------------------------------------------

    def encode_image(self, image: Image.Image) -> dict[str, Any]:
        """The per-image part of an encoding, computed once and reusable for several records of one image.

        Returns ``pixel_values``, ``image_grid_thw`` (Qwen), ``sam_images`` (3×S×S), ``sam_valid_hw``,
        ``original_hw`` (H, W), ``image_keys`` (the SAM embedding cache key) and ``pixel_hash``.
        """
        if image.mode != "RGB":
            image = to_rgb(image)
        pixel_values, grid_thw = self.qwen_image_inputs(image)
        sam_image, resized_hw = self.sam_preprocess(image)
        pixel_hash = sha1_key(f"{image.width}x{image.height}", image.tobytes())
        return {
            "pixel_values": pixel_values,
            "image_grid_thw": grid_thw,
            "sam_images": sam_image,
            "sam_valid_hw": torch.tensor(resized_hw, dtype=torch.long),
            "original_hw": torch.tensor([image.height, image.width], dtype=torch.long),
            "image_keys": sha1_key(pixel_hash, self.sam_signature()),
            "pixel_hash": pixel_hash,
        }

    def encode_record(
        self,
        record: dict,
        image: Image.Image,
        *,
        add_generation_prompt: bool = False,
        image_inputs: dict[str, Any] | None = None,
    ) -> dict:
        """Encode one record with its (RGB) image into per-sample tensors; :meth:`collate` batches them.

        With ``add_generation_prompt=True`` the conversation must end with a user turn; the assistant
        header is appended, nothing is labelled, the record's ``targets`` are not read, and any ``[SEG]``
        in earlier assistant turns gets an empty target (so ``N`` still counts every ``[SEG]`` token).

        ``image_inputs`` (from :meth:`encode_image` of the same image) skips the per-image preprocessing.

        Raises :class:`~fclm.io.RecordError` (a ``ValueError``) naming the record and the problem, found
        by the rules of :mod:`fclm.data.schema` (module docstring): ``[SEG]`` count ≠ number of targets,
        ``<region>`` placeholders ≠ in-prompt regions, ``<regionN>`` out of range, a mask whose size differs
        from the image, an empty region mask, a box outside the image or far from its mask, a malformed field.
        """
        rid = str(record.get("id", "<no id>"))
        where = f"record {rid!r}" + (f" ({record['_where']})" if record.get("_where") else "")

        def fail(problem: str) -> RecordError:
            return RecordError(where, problem)

        if not isinstance(image, Image.Image):
            raise fail(f"expected a PIL image, got {type(image).__name__}")
        if image.mode != "RGB":
            image = to_rgb(image)
        try:
            parsed = parse_record(record, add_generation_prompt=add_generation_prompt)
        except ValueError as e:
            raise fail(str(e)) from None
        image_inputs = self._checked_image_inputs(image, image_inputs, fail)
        system = parsed.system if parsed.system is not None else self.config.system_prompt
        n_image_tokens = self.num_image_tokens(image_inputs["image_grid_thw"])
        input_ids, labels, _ = self._conversation_ids(system, parsed.turns, n_image_tokens, add_generation_prompt)
        input_ids_t = torch.tensor(input_ids, dtype=torch.long)
        regions = self._encode_regions(parsed, image, image_inputs, fail)
        targets = self._encode_targets(parsed.targets, image, image_inputs, fail)
        latent_pairs = self._latent_pairs(parsed, add_generation_prompt, fail)
        try:
            head = record_head(record, self.config.default_head)
        except ValueError as e:
            raise fail(str(e)) from None
        return {
            "input_ids": input_ids_t,
            "labels": torch.tensor(labels, dtype=torch.long),
            "mm_token_type_ids": (input_ids_t == self.token_ids["image_pad"]).long(),
            **{k: image_inputs[k] for k in ("pixel_values", "image_grid_thw", "sam_images", "sam_valid_hw",
                                            "original_hw", "image_keys")},
            **regions,
            **targets,
            "latent_pairs": latent_pairs,
            "heads": head,
            "ids": rid,
        }

    def _checked_image_inputs(self, image: Image.Image, image_inputs: dict[str, Any] | None,
                              fail: Any) -> dict[str, Any]:
        """``image_inputs`` if given (they must be of an image of this size), else :meth:`encode_image`."""
        if image_inputs is None:
            return self.encode_image(image)
        hw = tuple(image_inputs["original_hw"].tolist())
        if hw != (image.height, image.width):
            raise fail(f"image_inputs are for a {hw} image, not {(image.height, image.width)}")
        return image_inputs

    def _conversation_ids(self, system: str, turns: Sequence[Turn], n_image_tokens: int,
                          add_generation_prompt: bool) -> tuple[list[int], list[int], int]:
        """Token ids and labels of the chat (module docstring), and the number of ``[SEG]`` tokens in it.

        ``turns`` are :attr:`ParsedRecord.turns <fclm.data.schema.ParsedRecord.turns>`: user text with its
        ``<region>`` placeholders (→ ``<mask><pos>``), assistant text with its ``[SEG]`` (→ the token).
        """
        ids = self.token_ids
        input_ids: list[int] = []
        labels: list[int] = []

        def put(tokens: Sequence[int], labelled: bool = False) -> None:
            input_ids.extend(tokens)
            labels.extend(tokens if labelled else [IGNORE_INDEX] * len(tokens))

        newline = self._text("\n")
        answer = not add_generation_prompt  # assistant turns are labelled
        put([ids["im_start"]] + self._text("system\n") + self._text(system) + [ids["im_end"]] + newline)
        n_seg = 0
        image_placed = False
        for role, pieces in turns:
            put([ids["im_start"]] + self._text(f"{role}\n"))
            if role == "user" and not image_placed:
                put([ids["vision_start"]] + [ids["image_pad"]] * n_image_tokens + [ids["vision_end"]])
                image_placed = True
            for piece in pieces:
                if not isinstance(piece, Placeholder):
                    put(self._text(piece), labelled=answer and role == "assistant")
                elif piece.kind == "region":
                    put([ids["mask"], ids["pos"]])
                else:
                    put([ids["seg"]], labelled=answer)
                    n_seg += 1
            put([ids["im_end"]], labelled=answer and role == "assistant")
            put(newline)
        if add_generation_prompt:
            put([ids["im_start"]] + self._text("assistant\n"))
        return input_ids, labels, n_seg

    def _encode_regions(self, parsed: ParsedRecord, image: Image.Image, image_inputs: dict[str, Any],
                        fail: Any) -> dict[str, Any]:
        """The ``region_*`` tensors: a row per entry of ``parsed.region_rows`` (a region named twice decoded once)."""
        resized_hw = tuple(image_inputs["sam_valid_hw"].tolist())
        decoded: dict[int, tuple] = {}
        rows = []
        for i in parsed.region_rows:
            if i not in decoded:
                decoded[i] = self._encode_region(parsed.regions[i], i, image, image_inputs["pixel_hash"], resized_hw,
                                                 fail)
            rows.append(decoded[i])
        masks, boxes, crops, crop_masks, crop_keys = [list(col) for col in zip(*rows)] if rows else [[] for _ in range(5)]
        s = self.config.sam_img_size
        return {
            "region_masks": torch.stack(masks) if masks else torch.zeros((0, s, s)),
            "region_boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "region_in_prompt": torch.tensor([k < parsed.n_prompt_rows for k in range(len(rows))], dtype=torch.bool),
            "region_crops": torch.stack(crops) if crops else torch.zeros((0, 3, s, s)),
            "region_crop_masks": torch.stack(crop_masks) if crop_masks else torch.zeros((0, s, s)),
            "region_crop_keys": crop_keys,
        }

    def _encode_region(self, region: dict, i: int, image: Image.Image, pixel_hash: str,
                       resized_hw: tuple[int, int], fail: Any) -> tuple:
        """(mask in the SAM frame, normalised box, crop, crop mask, crop key) of ``regions[i]``."""
        width, height = image.size
        try:
            mask = decode_record_mask(f"regions[{i}].mask", region["mask"], (height, width), nonempty=True)
            box = mask_to_box(mask)
            given = region.get("box")
            if given is not None:
                problem = (box_problem(f"regions[{i}].box", given, (height, width))
                           or box_mask_problem(f"regions[{i}].box", given, box, self.config.box_check_iou))
                if problem:
                    raise ValueError(problem)
        except ValueError as e:
            raise fail(str(e)) from None
        box_norm = [box[0] / width, box[1] / height, box[2] / width, box[3] / height]
        mask_t = self.mask_to_frame(mask, resized_hw)
        cx1, cy1, cx2, cy2 = self.crop_box(box, height, width)
        crop_img, crop_hw = self.sam_preprocess(image.crop((cx1, cy1, cx2, cy2)))
        crop_mask = self.mask_to_frame(mask[cy1:cy2, cx1:cx2], crop_hw)
        crop_key = sha1_key(pixel_hash, f"crop:{cx1},{cy1},{cx2},{cy2}", self.sam_signature())
        return mask_t, box_norm, crop_img, crop_mask, crop_key

    def _encode_targets(self, targets: list, image: Image.Image, image_inputs: dict[str, Any],
                        fail: Any) -> dict[str, Any]:
        """The ``target_*`` tensors: one row per target (= per ``[SEG]``)."""
        resized_hw = tuple(image_inputs["sam_valid_hw"].tolist())
        rows = [self._encode_target(t, k, image.height, image.width, resized_hw, fail) for k, t in enumerate(targets)]
        s = self.config.sam_img_size
        return {
            "target_masks": torch.stack([r[0] for r in rows]) if rows else torch.zeros((0, s, s)),
            "target_exists": torch.tensor([r[1] for r in rows], dtype=torch.bool),
            "target_instance_masks": [r[2] for r in rows],
            "target_instance_boxes": [r[3] for r in rows],
        }

    def _encode_target(self, target: Any, k: int, height: int, width: int, resized_hw: tuple[int, int],
                       fail: Any) -> tuple[torch.Tensor, bool, torch.Tensor, torch.Tensor]:
        """(union mask, exists, instance masks, normalised instance boxes) of ``targets[k]``; boxes default
        to the masks' boxes."""
        s = self.config.sam_img_size
        problem = target_entry_problem(k, target, boxes_required=False)
        if problem:
            raise fail(problem)
        masks = target.get("masks") or []
        boxes = target.get("boxes") or []
        frames, norm_boxes = [], []
        for j, m in enumerate(masks):
            try:
                mask = decode_record_mask(f"targets[{k}].masks[{j}]", m, (height, width))
                problem = box_problem(f"targets[{k}].boxes[{j}]", boxes[j], (height, width)) if boxes else None
                if problem:
                    raise ValueError(problem)
            except ValueError as e:
                raise fail(str(e)) from None
            frames.append(self.mask_to_frame(mask, resized_hw))
            b = boxes[j] if boxes else mask_to_box(mask)
            norm_boxes.append([
                min(max(b[0] / width, 0.0), 1.0), min(max(b[1] / height, 0.0), 1.0),
                min(max(b[2] / width, 0.0), 1.0), min(max(b[3] / height, 0.0), 1.0),
            ])
        inst = torch.stack(frames) if frames else torch.zeros((0, s, s))
        union = inst.amax(dim=0) if frames else torch.zeros((s, s))
        return union, bool(frames), inst, torch.tensor(norm_boxes, dtype=torch.float32).reshape(-1, 4)

    def _latent_pairs(self, parsed: ParsedRecord, add_generation_prompt: bool, fail: Any) -> torch.Tensor:
        """``(target index, region row)`` of each region with a ``target_index``: its first row (none for a prompt)."""
        pairs = []
        for i, r in enumerate(parsed.regions if not add_generation_prompt else []):
            k = r.get("target_index")
            if k is None:
                continue
            problem = target_index_problem(i, k, len(parsed.targets))
            if problem:
                raise fail(problem)
            pairs.append((k, parsed.region_rows.index(i)))
        return torch.tensor(pairs, dtype=torch.long).reshape(-1, 2)

    # ------------------------------------------------------------------------------------------
    # batches
    # ------------------------------------------------------------------------------------------

    def collate(self, encoded: Sequence[dict], *, padding_side: str = "right") -> dict[str, Any]:
        """Stack per-sample encodings (from :meth:`encode_record`) into one batch with exactly :data:`BATCH_KEYS`.

        Token tensors are padded (``pad`` id, attention 0, label -100, type 0) on the right for training,
        or on the left (``padding_side="left"``) for batched generation; region and target rows are
        concatenated sample by sample; index tensors and ``latent_pairs`` are made global.
        """
        if not encoded:
            raise ValueError("cannot collate an empty list of samples")
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        b = len(encoded)
        length = max(int(e["input_ids"].shape[0]) for e in encoded)
        input_ids = torch.full((b, length), self.token_ids["pad"], dtype=torch.long)
        attention_mask = torch.zeros((b, length), dtype=torch.long)
        labels = torch.full((b, length), IGNORE_INDEX, dtype=torch.long)
        mm_token_type_ids = torch.zeros((b, length), dtype=torch.long)
        for i, e in enumerate(encoded):
            n = int(e["input_ids"].shape[0])
            cols = slice(0, n) if padding_side == "right" else slice(length - n, length)
            input_ids[i, cols] = e["input_ids"]
            attention_mask[i, cols] = 1
            labels[i, cols] = e["labels"]
            mm_token_type_ids[i, cols] = e["mm_token_type_ids"]
        n_regions = [int(e["region_masks"].shape[0]) for e in encoded]
        n_segs = [int(e["target_masks"].shape[0]) for e in encoded]
        region_offsets = np.concatenate([[0], np.cumsum(n_regions)[:-1]]).astype(int)
        seg_offsets = np.concatenate([[0], np.cumsum(n_segs)[:-1]]).astype(int)
        latent = [
            e["latent_pairs"] + torch.tensor([[int(so), int(ro)]], dtype=torch.long)
            for e, so, ro in zip(encoded, seg_offsets, region_offsets)
        ]
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
            "pixel_values": torch.cat([e["pixel_values"] for e in encoded]),
            "image_grid_thw": torch.stack([e["image_grid_thw"] for e in encoded]),
            "mm_token_type_ids": mm_token_type_ids,
            "sam_images": torch.stack([e["sam_images"] for e in encoded]),
            "sam_valid_hw": torch.stack([e["sam_valid_hw"] for e in encoded]),
            "original_hw": torch.stack([e["original_hw"] for e in encoded]),
            "image_keys": [e["image_keys"] for e in encoded],
            "region_masks": torch.cat([e["region_masks"] for e in encoded]),
            "region_boxes": torch.cat([e["region_boxes"] for e in encoded]),
            "region_batch_index": torch.repeat_interleave(torch.arange(b), torch.tensor(n_regions)),
            "region_in_prompt": torch.cat([e["region_in_prompt"] for e in encoded]),
            "region_crops": torch.cat([e["region_crops"] for e in encoded]),
            "region_crop_masks": torch.cat([e["region_crop_masks"] for e in encoded]),
            "region_crop_keys": [k for e in encoded for k in e["region_crop_keys"]],
            "target_masks": torch.cat([e["target_masks"] for e in encoded]),
            "target_exists": torch.cat([e["target_exists"] for e in encoded]),
            "target_instance_masks": [m for e in encoded for m in e["target_instance_masks"]],
            "target_instance_boxes": [m for e in encoded for m in e["target_instance_boxes"]],
            "seg_batch_index": torch.repeat_interleave(torch.arange(b), torch.tensor(n_segs)),
            "latent_pairs": torch.cat(latent),
            "heads": [e["heads"] for e in encoded],
            "ids": [e["ids"] for e in encoded],
        }

    def __call__(self, records: Sequence[dict], images: Sequence[Image.Image], *,
                 add_generation_prompt: bool = False) -> dict[str, Any]:
        """Encode and collate ``records`` with their ``images`` (same order); any bad record raises."""
        if len(records) != len(images):
            raise ValueError(f"{len(records)} records but {len(images)} images")
        return self.collate([
            self.encode_record(r, im, add_generation_prompt=add_generation_prompt) for r, im in zip(records, images)
        ])

    def prompt_for_generation(
        self,
        image: Image.Image,
        text: str | Sequence[dict],
        *,
        regions: Sequence[Any] = (),
        head: str | None = None,
        record_id: str = "prompt",
    ) -> dict[str, Any]:
        """A one-sample batch ending with the assistant header, for ``FCLM.generate`` (no labels, no targets).

        Arguments:
            image: the RGB image.
            text: the user's message, or a whole conversation (``[{role, content}]``) ending with a user turn.
            regions: masks for the ``<region>`` placeholders, in order: boolean H×W arrays, COCO RLE or polygons.
            head: grounding head for the answer's ``[SEG]`` tokens (default ``config.default_head``).
        """
        messages = [{"role": "user", "content": text}] if isinstance(text, str) else [dict(m) for m in text]
        region_entries = []
        for r in regions:
            is_array = isinstance(r, (np.ndarray, torch.Tensor))
            mask = encode_mask(np.asarray(r, dtype=bool)) if is_array else r
            region_entries.append({"mask": mask})
        record = {"id": record_id, "messages": messages, "regions": region_entries}
        if head is not None:
            record["head"] = head
        return self.collate([self.encode_record(record, image, add_generation_prompt=True)])
