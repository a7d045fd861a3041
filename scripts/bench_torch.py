"""One case of the PyTorch reference, timed the way ../shared/bench/bench_cpu.py times it, in its
own process so that its peak memory is its own. Called by `cargo xtask bench`.

  python scripts/bench_torch.py --case forward|train8|train16|reduced-forward|reduced-train|ddim50
         [--ref-dir ../shared/bench] [--threads 2] [--runs 3] [--warmup 1]
Prints one JSON object: case, batch, median_s, runs_s, peak_rss_mb.
"""
import argparse
import json
import resource
import statistics
import sys
import time


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--case", required=True)
    ap.add_argument("--ref-dir", default="../shared/bench")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    a = ap.parse_args()
    sys.path.insert(0, a.ref_dir)
    import torch
    import ref_unet as R
    import bench_cpu as B

    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    sched = R.make_schedule(1000)
    cases = {
        "forward": (R.TRAINED_CONFIG, 16, 64, "forward"),
        "train8": (R.TRAINED_CONFIG, 8, 64, "train"),
        "train16": (R.TRAINED_CONFIG, 16, 64, "train"),
        "reduced-forward": (B.REDUCED, 32, 32, "forward"),
        "reduced-train": (B.REDUCED, 32, 32, "train"),
        "ddim50": (R.TRAINED_CONFIG, 16, 64, "ddim50"),
    }
    cfg, bs, hw, kind = cases[a.case]
    model = R.RefUNet(**cfg)
    if kind == "forward":
        ts, _ = B.bench_forward(model, bs, hw, a.warmup, a.runs)
    elif kind == "train":
        ts, _ = B.bench_train(model, bs, hw, a.warmup, a.runs, sched)
    else:
        model.eval()
        acp = sched["alphas_cumprod"]
        steps = [round(i * 999 / 49) for i in range(50)][::-1]
        x = torch.randn(bs, 3, hw, hw)

        def ddim():
            xt = x
            with torch.no_grad():
                for i, t in enumerate(steps):
                    eps = model(xt, torch.full((bs,), t, dtype=torch.long))
                    a_t = acp[t]
                    a_prev = acp[steps[i + 1]] if i + 1 < len(steps) else torch.tensor(1.0)
                    x0 = (xt - (1 - a_t).sqrt() * eps) / a_t.sqrt()
                    xt = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
            return xt

        ts = []
        for _ in range(min(a.runs, 1)):
            t0 = time.perf_counter()
            ddim()
            ts.append(time.perf_counter() - t0)
    med = statistics.median(ts)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    print(json.dumps(dict(case=a.case, batch=bs, median_s=med, runs_s=ts, images_per_s=bs / med,
                          peak_rss_mb=peak_mb, torch=torch.__version__, threads=torch.get_num_threads())))


if __name__ == "__main__":
    main()
