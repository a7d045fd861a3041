#!/usr/bin/env python3
"""How close `cargo xtask prepare-data` comes to the reference's Pillow preprocessing.

    cargo xtask prepare-data --raw RAW --out OURS
    python scripts/compare_prepare_pillow.py RAW OURS [--size 64]

For every image of OURS/packed.safetensors whose raw file Pillow opens, the reference's loop
(`Image.open(p).resize((64, 64)).convert("RGB").save(q, quality=100)`) runs in memory, and
three differences are printed (max and mean absolute, 8-bit levels per channel, over all images):
  resize   - our packed pixels against Pillow's resized image before saving (decoder + resize,
             and for .jpg outputs our JPEG re-encode as well);
  file     - our packed pixels against the reference's saved file read back by Pillow
             (what the reference trained on);
  re-save  - Pillow's own loss from saving that file (the floor for `file`).
Needs numpy and Pillow; reads the packed file without safetensors.
"""
import argparse
import io
import json
import os
import struct

import numpy as np
from PIL import Image


def load_packed(path):
    with open(path, "rb") as f:
        raw = f.read()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    names = json.loads(header["__metadata__"]["names"])
    info = header["images"]
    lo, hi = info["data_offsets"]
    pixels = np.frombuffer(raw[8 + n + lo:8 + n + hi], np.uint8).reshape(info["shape"])
    return dict(zip(names, pixels))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("raw")
    ap.add_argument("ours")
    ap.add_argument("--size", type=int, default=64)
    a = ap.parse_args()
    ours = load_packed(os.path.join(a.ours, "packed.safetensors"))
    # Output names are the input's stem plus .jpg/.png: map them back to the raw files.
    raw_by_stem = {}
    for name in sorted(os.listdir(a.raw)):
        raw_by_stem.setdefault(os.path.splitext(name)[0], name)
    stats = {"resize": [], "file": [], "re-save": []}
    for out_name, px in ours.items():
        src = raw_by_stem.get(os.path.splitext(out_name)[0])
        if src is None:
            continue
        try:
            mem = Image.open(os.path.join(a.raw, src)).resize((a.size, a.size)).convert("RGB")
        except Exception as e:  # the reference would have crashed here
            print(f"skipped {src}: Pillow cannot read it ({e})")
            continue
        buf = io.BytesIO()
        fmt = "JPEG" if out_name.lower().endswith((".jpg", ".jpeg")) else "PNG"
        mem.save(buf, fmt, quality=100)
        saved = np.asarray(Image.open(buf).convert("RGB")).astype(int)
        mem = np.asarray(mem).astype(int)
        ours_px = px.astype(int)
        for key, (x, y) in {"resize": (ours_px, mem), "file": (ours_px, saved), "re-save": (saved, mem)}.items():
            d = np.abs(x - y)
            stats[key].append((d.max(), d.mean()))
    if not stats["resize"]:
        raise SystemExit("no image of the packed file matched a raw file")
    print(f"{len(stats['resize'])} images")
    for key, v in stats.items():
        m = np.array(v)
        print(f"{key:8s} max {int(m[:, 0].max()):3d}  mean {m[:, 1].mean():.3f}  (images with max > 1: {(m[:, 0] > 1).sum()})")


if __name__ == "__main__":
    main()
