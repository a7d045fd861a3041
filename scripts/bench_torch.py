"""One case of the PyTorch reference, timed the way ../shared/bench/bench_cpu.py times it, in its
own process so that its peak memory is its own. Called by `cargo xtask bench`.

  python scripts/bench_torch.py --case forward|train8|train16|reduced-forward|reduced-train|ddim50|ddpm100
         |forward128|train128|ddim50x256|ddpm100x256|ddpm1000x256
         [--ref-dir ../shared/bench] [--threads 2] [--runs 3] [--warmup 1] [--device cpu|cuda] [--precision f32|bf16]
         [--profile FILE] [--compile] [--micro-batch N]
Prints one JSON object: case, batch, median_s, runs_s, peak_rss_mb, peak_gpu_mb on CUDA, and
queued_s (the median time to queue a run's work, before the wait for the device) for the cases
timed here rather than by bench_cpu.py: every case on CUDA, the sampling cases on the CPU.
On CUDA, bf16 is torch.autocast(bfloat16) around the forward pass, as a Lightning user would run it.
--profile runs the case once more under torch.profiler and writes its op table (self CUDA time,
top 30) to FILE: where PyTorch's time goes, to set beside ours.
--compile wraps the model in torch.compile (default mode) and calls it once, untimed, before the
warm-up; the JSON then has compiled=true and compile_s, the time of that first call.
--micro-batch N (training cases): the batch goes through the model N images at a time, each
part's loss weighted by its share and back-propagated into the same gradients before the one
Adam step (gradient accumulation, as `xtask bench --micro-batch` runs ours); the JSON then has
micro_batch. Timed here, not by bench_cpu.py, on the CPU too.
"""
import argparse
import json
import resource
import statistics
import sys
import time

# Steps in the timed training loops on CUDA (the same as ours: LOOP_STEPS in xtask's bench).
LOOP_STEPS = 6


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--case", required=True)
    ap.add_argument("--ref-dir", default="../shared/bench")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="f32")
    ap.add_argument("--profile", default=None)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--micro-batch", type=int, default=None)
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
        "ddim50": (R.TRAINED_CONFIG, 16, 64, "ddim"),
        "ddpm100": (R.TRAINED_CONFIG, 16, 64, "ddpm100"),
        "forward128": (R.TRAINED_CONFIG, 128, 64, "forward"),
        "train128": (R.TRAINED_CONFIG, 128, 64, "train"),
        "ddim50x256": (R.TRAINED_CONFIG, 256, 64, "ddim"),
        "ddpm1000x256": (R.TRAINED_CONFIG, 256, 64, "ddpm"),
        "ddpm100x256": (R.TRAINED_CONFIG, 256, 64, "ddpm100"),
    }
    cfg, bs, hw, kind = cases[a.case]
    if a.micro_batch is not None and a.micro_batch < 1:
        raise SystemExit("--micro-batch must be at least 1")
    micro = min(a.micro_batch or bs, bs)
    dev = torch.device(a.device)
    cuda = dev.type == "cuda"
    model = R.RefUNet(**cfg).to(dev)
    sched = {k: v.to(dev) for k, v in sched.items()}
    amp = torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda and a.precision == "bf16")
    if a.precision == "bf16" and not cuda:
        raise SystemExit("bf16 autocast is measured on CUDA only")
    compile_s = None
    if a.compile:
        if not cuda and kind in ("forward", "train"):
            raise SystemExit("--compile is measured on CUDA (bench_cpu.py times the CPU cases)")
        model = torch.compile(model)
        # Compiling happens at the first call, in train mode for training (the graph differs:
        # dropout) and under no_grad for the rest; it is timed on its own.
        model.train(kind == "train")
        xc = torch.randn(bs, 3, hw, hw, device=dev)
        tc = torch.randint(0, 1000, (bs,), device=dev)
        t0 = time.perf_counter()
        if kind == "train":
            with amp:
                model(xc, tc).float().square().mean().backward()
            model.zero_grad(set_to_none=True)
        else:
            with torch.no_grad(), amp:
                model(xc, tc)
        if cuda:
            torch.cuda.synchronize()
        compile_s = time.perf_counter() - t0

    def sync():
        if cuda:
            torch.cuda.synchronize()

    # The host's part of each timed run: until fn returned with the run's work queued, before
    # the wait for the device (ours reports the same, queued_s).
    queued = []
    training_loop_s = None

    def timed(fn, warmup, runs):
        for _ in range(warmup):
            fn()
        sync()
        ts = []
        for _ in range(runs):
            t0 = time.perf_counter()
            fn()
            queued.append(time.perf_counter() - t0)
            sync()
            ts.append(time.perf_counter() - t0)
        return ts

    if kind == "forward" and not cuda:
        ts, _ = B.bench_forward(model, bs, hw, a.warmup, a.runs)
    elif kind == "train" and not cuda and micro == bs:
        ts, _ = B.bench_train(model, bs, hw, a.warmup, a.runs, sched)
    elif kind == "forward":
        model.eval()
        x = torch.randn(bs, 3, hw, hw, device=dev)
        t = torch.randint(0, 1000, (bs,), device=dev)

        def fwd():
            with torch.no_grad(), amp:
                model(x, t)
        ts = timed(fwd, a.warmup, a.runs)
        profiled = fwd
    elif kind == "train":
        model.train()
        opt = torch.optim.Adam(model.parameters(), lr=1e-4)
        x0 = torch.rand(bs, 3, hw, hw, device=dev) * 2 - 1

        def step():
            t = torch.randint(0, 1000, (bs,), device=dev)
            noise = torch.randn_like(x0)
            xt = R.q_sample(sched, x0, t, noise)
            opt.zero_grad(set_to_none=True)
            for i in range(0, bs, micro):
                n = min(micro, bs - i)
                with amp:
                    loss = torch.nn.functional.mse_loss(model(xt[i:i + n], t[i:i + n]).float(), noise[i:i + n])
                (loss * (n / bs) if n < bs else loss).backward()
            opt.step()
            # (The last part's: reading it waits for the step as reading the whole loss would.)
            return loss
        ts = timed(step, a.warmup, a.runs)
        profiled = step
        if cuda:
            # Steps back to back, as a training loop takes them (beside ours, `training_loop_s`):
            # reading each step's loss before the next, as Lightning's progress bar does every
            # step, and not reading it at all (the card then never waits for the host).
            loop = {}
            for label, read in (("loss_read", True), ("unread", False)):
                step()
                sync()
                t0 = time.perf_counter()
                for _ in range(LOOP_STEPS):
                    loss = step()
                    if read:
                        loss.item()
                sync()
                loop[label] = (time.perf_counter() - t0) / LOOP_STEPS
            training_loop_s = loop
    else:
        model.eval()
        acp = sched["alphas_cumprod"]
        if kind == "ddim":
            steps = [round(i * 999 / 49) for i in range(50)][::-1]
        else:  # DDPM: every step from 999 (or, for ddpm100, from 99) down to 0
            steps = list(range(99 if kind == "ddpm100" else 999, -1, -1))
        x = torch.randn(bs, 3, hw, hw, device=dev)

        def sample():
            xt = x
            with torch.no_grad(), amp:
                for i, t in enumerate(steps):
                    eps = model(xt, torch.full((bs,), t, dtype=torch.long, device=dev)).float()
                    if kind == "ddim":
                        a_t = acp[t]
                        a_prev = acp[steps[i + 1]] if i + 1 < len(steps) else torch.tensor(1.0, device=dev)
                        x0 = (xt - (1 - a_t).sqrt() * eps) / a_t.sqrt()
                        xt = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
                    else:
                        z = torch.randn_like(xt) if t > 0 else torch.zeros_like(xt)
                        xt = R.p_step(sched, eps, xt, t, z, 1)
            return xt
        if a.warmup > 0:
            # One run is timed: its first-call costs (cuDNN set-up, allocator growth) go into one
            # untimed model call at its batch, as on our side.
            with torch.no_grad(), amp:
                model(x, torch.full((bs,), steps[0], dtype=torch.long, device=dev))
            sync()
        ts = timed(sample, 0, min(a.runs, 1))
    if a.profile:
        if not cuda or kind not in ("forward", "train"):
            raise SystemExit("--profile is for the CUDA forward and train cases")
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            profiled()
            sync()
        with open(a.profile, "w") as f:
            f.write(f"{a.case} {a.precision} on {torch.cuda.get_device_name()}, torch {torch.__version__}\n")
            f.write(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=30))
    med = statistics.median(ts)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    out = dict(case=a.case, batch=bs, median_s=med, runs_s=ts, images_per_s=bs / med,
               peak_rss_mb=peak_mb, torch=torch.__version__, threads=torch.get_num_threads(),
               device=a.device, precision=a.precision)
    if kind == "train":
        out["micro_batch"] = micro
    if compile_s is not None:
        out["compiled"] = True
        out["compile_s"] = compile_s
    if queued:
        out["queued_s"] = statistics.median(queued)
    if training_loop_s is not None:
        out["training_loop_s"] = training_loop_s
    if cuda:
        out["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
        out["peak_gpu_reserved_mb"] = torch.cuda.max_memory_reserved() / 2**20
        out["gpu"] = torch.cuda.get_device_name()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
