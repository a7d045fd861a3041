"""Loads one of our model files into the PyTorch reference network and compares its output with
ours: the file's tensors carry the reference's parameter names, so PyTorch takes them as they are.

    cargo run --release -p unet --example forward_io -- runs/x/model.safetensors /tmp/io.safetensors [--ema]
    python scripts/check_weights_in_pytorch.py runs/x/model.safetensors /tmp/io.safetensors [--ema] \
        [--ref <folder of ref_unet.py>]   # default: shared/bench beside the repository

Exits 1 when a key or shape differs or the outputs differ by more than 1e-4 of their largest value.
"""
import argparse
import json
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file


def state_dict(path, ema):
    """The file's tensors as the reference's state_dict: `ema.*` copies in place of the trained
    weights when asked for (the frozen time table has no EMA copy)."""
    tensors = load_file(path)
    plain = {k: v for k, v in tensors.items() if not k.startswith("ema.")}
    if ema:
        copies = {k[len("ema."):]: v for k, v in tensors.items() if k.startswith("ema.")}
        if not copies:
            sys.exit(f"{path} has no ema.* tensors (trained without train.ema_decay)")
        plain.update(copies)
    return plain


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("io", help="forward_io's output for the same model file")
    ap.add_argument("--ema", action="store_true")
    # The project's shared folder sits beside the repository root.
    default_ref = Path(__file__).resolve().parent.parent.parent / "shared" / "bench"
    ap.add_argument("--ref", default=str(default_ref), help=f"folder of the PyTorch reference's ref_unet.py (default {default_ref})")
    a = ap.parse_args()
    if not (Path(a.ref) / "ref_unet.py").is_file():
        sys.exit(f"error: no ref_unet.py in {a.ref}: pass --ref <folder of the PyTorch reference's ref_unet.py>")
    for f in (a.model, a.io):
        if not Path(f).is_file():
            sys.exit(f"error: {f}: no such file")
    sys.path.insert(0, a.ref)
    from ref_unet import RefUNet

    with safe_open(a.model, "pt") as f:
        cfg = json.loads(f.metadata()["unet_config"])
    net = RefUNet(cfg["num_steps"], cfg["ch"], cfg["ch_mult"], cfg["attn"], cfg["num_res_blocks"], cfg["dropout"])
    state = state_dict(a.model, a.ema)
    net.load_state_dict(state, strict=True)
    net.eval()
    io = load_file(a.io)
    with torch.no_grad():
        eps = net(io["x"], io["t"].long())
    ours = io["eps"]
    diff = (eps - ours).abs().max().item()
    scale = ours.abs().max().item()
    print(f"{len(state)} tensors, {sum(v.numel() for v in state.values())} values loaded (strict); output max |diff| {diff:.3e} (largest value {scale:.3f})")
    if not diff <= 1e-4 * max(scale, 1e-12):
        sys.exit("outputs differ")


if __name__ == "__main__":
    main()
