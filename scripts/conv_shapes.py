"""PyTorch's side of `cargo run --release -p unet --example conv_shapes`: the same 3x3 convolution
shapes, forward and backward (input and weight gradients), medians of 7 runs after 2 warm-ups.

    .venv-bench/bin/python scripts/conv_shapes.py [reduced|reference] [--threads 2]
"""
import sys, time, statistics
import torch

which = sys.argv[1] if len(sys.argv) > 1 and not sys.argv[1].startswith("--") else "reduced"
threads = int(sys.argv[sys.argv.index("--threads") + 1]) if "--threads" in sys.argv else 2
torch.set_num_threads(threads)
shapes = {
    "reference": [(8, 64, 64, 64), (8, 128, 64, 64), (8, 128, 32, 128), (8, 256, 16, 256), (8, 256, 8, 256), (8, 512, 8, 256)],
    "reduced": [(32, 3, 32, 32), (32, 32, 32, 32), (32, 64, 32, 32), (32, 96, 32, 32), (32, 32, 16, 64), (32, 64, 16, 64), (32, 128, 16, 64), (32, 64, 8, 64), (32, 128, 8, 64)],
}[which]
print(f"{'b x c x h x h -> o':>24} {'fwd ms':>10} {'bwd ms':>10}")
for b, c, h, o in shapes:
    x = torch.randn(b, c, h, h, requires_grad=True)
    w = (torch.randn(o, c, 3, 3) / (9 * c) ** 0.5).requires_grad_()
    r = torch.randn(b, o, h, h)
    fwd, bwd = [], []
    for i in range(9):
        t = time.perf_counter()
        y = torch.nn.functional.conv2d(x, w, padding=1)
        t1 = time.perf_counter() - t
        loss = (y * r).sum()
        t = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter() - t
        x.grad = None
        w.grad = None
        if i >= 2:
            fwd.append(t1 * 1e3)
            bwd.append(t2 * 1e3)
    print(f"{f'{b}x{c}x{h}x{h} -> {o}':>24} {statistics.median(fwd):10.2f} {statistics.median(bwd):10.2f}")
