"""What PyTorch's autograd graph of the reference network holds for a training step: the bytes of
every distinct storage saved for the backward pass (caught with `saved_tensors_hooks`), per
batch size, and per image. The Rust side: `cargo run --release -p unet --example saved_memory`.

    python scripts/saved_memory_torch.py [--ref-dir ../shared/bench] [batch ...]
"""
import argparse
import sys

import torch


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ref-dir", default="../shared/bench")
    ap.add_argument("batches", nargs="*", type=int, default=[2, 4])
    a = ap.parse_args()
    sys.path.insert(0, a.ref_dir)
    import ref_unet as R

    torch.manual_seed(0)
    model = R.RefUNet(**R.TRAINED_CONFIG).train()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    rows = []
    for b in a.batches:
        x = torch.randn(b, 3, 64, 64)
        noise = torch.randn_like(x)
        t = torch.full((b,), 500, dtype=torch.long)
        seen = {}
        by_kind = {}

        def pack(tensor):
            s = tensor.untyped_storage()
            ptr = s.data_ptr()
            if ptr not in params and ptr not in seen:
                seen[ptr] = s.nbytes()
                shape = tuple(tensor.shape)
                by_kind[shape] = by_kind.get(shape, 0) + s.nbytes()
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = torch.nn.functional.mse_loss(model(x, t), noise)
        held = sum(seen.values())
        print(f"batch {b}: saved for backward {held / 1e6:.1f} MB in {len(seen)} storages")
        rows.append((b, held))
        del loss
    if len(rows) >= 2:
        (b0, h0), (b1, h1) = rows[0], rows[-1]
        print(f"per image: {(h1 - h0) / (b1 - b0) / 1e6:.1f} MB saved")


if __name__ == "__main__":
    main()
