"""Builder throughput on generated Describe Anything shards, and peak memory as the input grows.

    python scripts/bench/builder_throughput.py [--sizes 1000,10000,100000] [--image-size 128]

For each size N, writes N regions (4 per image, JPEG images, ``annotations.json`` + webdataset
shards of 1,000 images holding ``{id}.jpg`` + ``{id}.pickle``) into a temporary folder, then runs
``dam`` (shards → region_caption) and ``dlres --rewriter rule`` (→ dlres) each in a fresh process,
and prints records/s and the process's peak resident memory (``VmHWM``). Streaming means the
peak stays flat as N grows.
"""

from __future__ import annotations

import argparse
import io
import json
import pickle
import resource
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

REGIONS_PER_IMAGE = 4
IMAGES_PER_SHARD = 1000
CAPTION = ("A {c} ceramic mug with a blue floral pattern and a curved handle, standing on a wooden table. "
           "It has a glossy finish and a small chip on the rim. The background is blurry.")


def generate(root: Path, n_regions: int, image_size: int, seed: int = 0) -> None:
    from fclm.masks import encode_mask

    rng = np.random.default_rng(seed)
    src = root / "Bench"
    (src / "images").mkdir(parents=True, exist_ok=True)
    n_images = (n_regions + REGIONS_PER_IMAGE - 1) // REGIONS_PER_IMAGE
    base = rng.integers(0, 255, (image_size, image_size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(base).save(buf, format="JPEG", quality=85)
    jpg = buf.getvalue()  # one JPEG for all images: generation cost is not what is measured
    annotations = {}
    tar = None
    left = n_regions
    for i in range(n_images):
        if i % IMAGES_PER_SHARD == 0:
            if tar is not None:
                tar.close()
            tar = tarfile.open(src / "images" / f"shard-{i // IMAGES_PER_SHARD:06d}.tar", "w")
        regions = []
        for j in range(min(REGIONS_PER_IMAGE, left)):
            m = np.zeros((image_size, image_size), bool)
            y, x = rng.integers(0, image_size // 2, 2)
            h, w = rng.integers(4, image_size // 2, 2)
            m[y : y + h, x : x + w] = True
            regions.append({"caption": CAPTION.format(c=("white", "red", "green", "blue")[j % 4]), "mask_rle": encode_mask(m)})
        left -= len(regions)
        key = f"img{i:08d}"
        annotations[key] = regions
        for name, data in ((f"{key}.jpg", jpg), (f"{key}.pickle", pickle.dumps(regions, protocol=4))):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    tar.close()
    (src / "annotations.json").write_text(json.dumps(annotations))


def peak_rss_mb() -> float:
    """This process's peak resident memory. ``VmHWM`` belongs to the process image (``ru_maxrss``
    would also count the parent's memory at the time of the fork)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(argv: list[str]) -> None:
    """Run one builder in this (fresh) process; print records, seconds and peak RSS as JSON."""
    from data_builders.__main__ import main

    t0 = time.perf_counter()
    import contextlib

    with contextlib.redirect_stdout(io.StringIO()) as out:
        rc = main(argv)
    dt = time.perf_counter() - t0
    records = int(out.getvalue().split("wrote ")[1].split(" ")[0])
    peak_mb = peak_rss_mb()
    print(json.dumps({"rc": rc, "records": records, "seconds": dt, "peak_mb": peak_mb}))


def run_child(argv: list[str]) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", *argv], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="1000,10000,100000", help="comma-separated region counts")
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--child", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child is not None:
        child(args.child)
        return
    rows = []
    for n in [int(s) for s in args.sizes.split(",") if s]:
        with tempfile.TemporaryDirectory(prefix="dam_bench_") as tmp:
            tmp = Path(tmp)
            t0 = time.perf_counter()
            generate(tmp / "dam", n, args.image_size)
            gen = time.perf_counter() - t0
            d = run_child(["dam", "--root", str(tmp / "dam"), "--out", str(tmp / "caps.jsonl")])
            r = run_child(["dlres", "--src", str(tmp / "caps.jsonl"), "--out", str(tmp / "dlres.jsonl")])
            rows.append((n, gen, d, r))
            print(f"[{n} regions: generated in {gen:.1f}s]", file=sys.stderr)
    print("| regions | dam records/s | dam peak RSS (MB) | dlres (rule) records/s | dlres peak RSS (MB) |")
    print("|---:|---:|---:|---:|---:|")
    for n, _, d, r in rows:
        print(f"| {n:,} | {d['records'] / d['seconds']:,.0f} | {d['peak_mb']:.0f} | {r['records'] / r['seconds']:,.0f} | {r['peak_mb']:.0f} |")


if __name__ == "__main__":
    main()
