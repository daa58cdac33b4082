"""``fclm-serve`` — serve a trained FCLM over HTTP: OpenAI-compatible chat completions with masks, and a web page.

    fclm-serve --model runs/demo/stage2/export                       # http://127.0.0.1:8000/
    fclm-serve --model fclm-3b --device cuda --dtype bfloat16 --allowed-root /data/images --api-key-file key.txt

Loopback only unless ``--host`` says otherwise. API: see :mod:`serve.app` (and ``/docs`` on the running server).
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

PROG = "fclm-serve"


def build_parser() -> argparse.ArgumentParser:
    from serve.app import ServeSettings

    d = ServeSettings()
    p = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, type=Path, help="exported model directory (fclm-train export)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--model-name", default=None, help="model id in /v1/models and responses (default: the folder name)")
    p.add_argument("--allowed-root", type=Path, help="file:// image URLs must lie under this folder (default: refuse them)")
    p.add_argument("--max-image-pixels", type=int, default=d.max_image_pixels, help=f"largest image, width × height (default {d.max_image_pixels})")
    p.add_argument("--max-regions", type=int, default=d.max_regions, help=f"most regions per request (default {d.max_regions})")
    p.add_argument("--max-body-bytes", type=int, default=d.max_body_bytes, help=f"largest request body (default {d.max_body_bytes})")
    p.add_argument("--max-tokens", type=int, default=d.max_tokens, help=f"largest max_tokens a request may ask (default {d.max_tokens})")
    p.add_argument("--max-queue", type=int, default=d.max_queue, help=f"requests waiting beyond this get 503 (default {d.max_queue})")
    key = p.add_mutually_exclusive_group()
    key.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1/* (visible in the process list: prefer --api-key-file)")
    key.add_argument("--api-key-file", type=Path, help="file holding the API key")
    p.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="run the model in this precision")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    return p


def settings_from_args(args: argparse.Namespace):
    from serve.app import ServeSettings

    for name in ("max_image_pixels", "max_regions", "max_body_bytes", "max_tokens", "max_queue", "port"):
        if getattr(args, name) < (0 if name == "port" else 1):
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    api_key = args.api_key
    if args.api_key_file is not None:
        if not args.api_key_file.is_file():
            raise ValueError(f"--api-key-file {args.api_key_file}: no such file")
        api_key = args.api_key_file.read_text(encoding="utf-8").strip()
        if not api_key:
            raise ValueError(f"--api-key-file {args.api_key_file} is empty")
    if args.allowed_root is not None and not args.allowed_root.is_dir():
        raise ValueError(f"--allowed-root {args.allowed_root}: no such folder")
    return ServeSettings(
        model_name=args.model_name or args.model.resolve().name,
        allowed_root=args.allowed_root.resolve() if args.allowed_root is not None else None,
        max_image_pixels=args.max_image_pixels, max_regions=args.max_regions, api_key=api_key,
        max_body_bytes=args.max_body_bytes, max_tokens=args.max_tokens, max_queue=args.max_queue,
    )


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run ``fclm-serve`` with ``argv`` (default ``sys.argv[1:]``); serves until interrupted."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format=f"[{PROG}] %(message)s")
    try:
        settings = settings_from_args(args)
        if not (args.model / "fclm_config.json").is_file():
            raise ValueError(f"--model {args.model}: not an exported FCLM model directory (no fclm_config.json)")
        import torch
        import uvicorn
        from transformers.utils import logging as hf_logging

        from fclm.inference import FCLMPredictor
        from serve.app import create_app, wrap

        hf_logging.disable_progress_bar()
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        if device.startswith("cpu"):
            torch.set_flush_denormal(True)
        predictor = FCLMPredictor.from_pretrained(args.model, device=device, dtype=args.dtype)
    except (ValueError, OSError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    if not _is_loopback(args.host) and settings.api_key is None:
        print(f"[{PROG}] warning: listening on {args.host} without --api-key: anyone who can reach it can use the model",
              file=sys.stderr)
    app = wrap(create_app(predictor, settings), settings)
    print(f"[{PROG}] serving {settings.model_name} on http://{args.host}:{args.port}/ (OpenAI API at /v1)", file=sys.stderr, flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_keep_alive=5)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
