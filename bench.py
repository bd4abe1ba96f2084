"""
Measure training, sampling and evaluation speed (and memory) on the current device.

    python bench.py d3pm_text8_cpu                          # all benchmarks, one JSON line each
    python bench.py d3pm_text8 --mode=train --compile=True  # CUDA: torch.compile on/off, --bf16=False
    python bench.py d3pm_openwebtext_8gpu --mode=memory --batch_size=4 --seq_len=256
    python bench.py d3pm_text8_cpu --mode=sample --ckpt=out/d3pm_text8_cpu/ckpt.pt
    python bench.py --mode=suite                            # a GPU's whole check list, < 8 minutes
    python bench.py --mode=quality --ckpt=out/mdlm_text8_cpu/ckpt.pt --judge=out/ar_text8_cpu --data_dir=data/text8

Modes:
  train   tokens/s of forward + backward + AdamW step after warm-up; peak memory (CUDA: max allocated,
          CPU: peak RSS of the process); on CUDA the model FLOPs utilisation, with
          FLOPs/token = 6 N + 12 n_blocks n_embed seq_len   (N = parameters incl. the tied output matrix;
          the second term is QK^T and AV of full, non-causal attention, forward + backward)
          divided by the GPU's dense bf16 peak (H100/H200: 989 TFLOP/s; override with --peak_tflops).
  memory  peak memory of one training step with the closed-form loss vs the same step with full
          (B, L, K) posterior tensors, each in a fresh process; step_mem is the peak minus what was
          in use before the step (model, optimizer state not yet allocated, data).
  sample  tokens/s and network calls of the model's sampler (first-hitting / KV cache) vs the same
          sampler calling the network at every step, or block diffusion re-reading its history at every call
          (cache=False; identical samples, checked: "identical"). --seq_len beyond the training length works
          for block diffusion (the context slides).
  eval    network calls needed to reach --target_se with evaluate.py's stratified estimator
          (model.batch_bound) vs the training-time estimate (forward's metrics["bound"], independent
          random times), from the spread of --eval_batches per-batch estimates of each.
  quality sample quality against network calls: every sampler of --quality_samplers at each of
          --quality_calls steps, and the exact sampler, scored by --judge (see bench_quality); --plot.
  backbone our DiTBlock vs a reference block with nanoDD's attention layout (bench_backbone): step
          memory (one step, fresh process) and tokens/s (--steps), each in fresh processes, with ratios.
  suite   everything only a GPU can show, in one command with a deadline (see bench_suite): each family
          of --suite_configs at its published size with torch.compile and bf16 on and off, a 1-process
          torchrun (NCCL) training run, sampling speed. One JSON line each; failures are JSON lines too.
"""
import json
import math
import os
import resource
import signal
import subprocess
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

import configs
from common import UserError, load_codec, open_split, pick_device
from families import load_checkpoint

CONFIG_NAMES = configs.NAMES

# ---- defaults, overridden by --key=value -------------------------------------------------------------
mode = "all"  # train, memory, sample, eval, all (= train, sample, eval), suite (the GPU check list below)
batch_size = 0  # 0: the config's
seq_len = 0  # 0: the config's
vocab_size = 0  # 0: the config's (e.g. 50257 to bench the BPE output layer on a small model)
steps = 10  # timed training steps
warmup = 3  # untimed steps first (compilation happens here)
compile = False  # torch.compile the model (CUDA)
bf16 = True  # bfloat16 autocast (CUDA)
loss = "closed"  # closed (d3pm.py) or posterior (full (B, L, K) posterior tensors, for comparison)
device = "auto"
peak_tflops = 0.0  # 0: detect H100/H200/A100, else no MFU
ckpt = ""  # sample/eval: a checkpoint instead of random weights
data_dir = ""  # eval: a dataset directory (default: random tokens)
sample_batch = 4
eval_batches = 30
eval_batch_size = 32
target_se = 0.01
seed = 0
suite_configs = "d3pm_text8,mdlm_text8,ar_text8,bd3lm_text8,d3pm_openwebtext_8gpu"  # suite: the families at published size
suite_seconds = 450  # suite: the deadline for the whole list; each child also has its own timeout
child_timeout = 900.0  # memory: seconds for each child process (its process group is killed after it)
judge = ""  # quality: the judge (an AR checkpoint or a GPT-2 name; see judge.py)
quality_samplers = "ancestral,top_p0.9,confidence,confidence_margin"  # quality: the curves
quality_calls = "8,16,32,64,128"  # quality: network calls (steps) per point; the exact sampler is added
quality_samples = 32  # quality: sequences per point
plot = ""  # quality: also draw the curve to this picture (needs matplotlib)
layout = ""  # backbone: set in the mode's children ("ours" or "reference"), not by hand
# -------------------------------------------------------------------------------------------------------
KEYS = [k for k, v in list(globals().items()) if not k.startswith("_") and isinstance(v, (int, float, bool, str))]


def parse(argv):
    config = None
    for arg in argv:
        if arg in ("-h", "--help"):
            print(__doc__ + "\nconfigs: " + ", ".join(CONFIG_NAMES) + "\noptions: "
                  + " ".join(f"--{k}={globals()[k]!r}" for k in KEYS))
            sys.exit(0)
        if not arg.startswith("--"):
            if arg not in CONFIG_NAMES:
                raise UserError(f"unknown config {arg!r}; valid: " + ", ".join(CONFIG_NAMES))
            config = arg
            continue
        key, _, text = arg[2:].partition("=")
        if key not in KEYS:
            raise UserError(f"unknown option --{key}; valid: " + ", ".join(KEYS))
        kind = type(globals()[key])
        try:
            value = (text.lower() in ("1", "true", "yes")) if kind is bool else kind(text)
        except ValueError:
            raise UserError(f"--{key}={text}: expected {kind.__name__}")
        globals()[key] = value
    return config or "d3pm_text8_cpu"


def emit(record):
    print(json.dumps(record), flush=True)


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def peak_memory_mb(dev):
    if dev.type == "cuda":
        return torch.cuda.max_memory_allocated(dev) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def detect_peak_tflops(dev):
    if peak_tflops:
        return peak_tflops
    if dev.type != "cuda":
        return 0.0
    name = torch.cuda.get_device_name(dev)
    return next((v for k, v in {"H100": 989.0, "H200": 989.0, "A100": 312.0}.items() if k in name), 0.0)


def posterior_loss_terms(model, logits, x0, x_noisy, t):
    """The long-form KL with full (B, L, K) posteriors q(x_t | x_{t+1}, x_0) and p(x_t | x_{t+1}),
    as a D3PM implementation without the closed form computes it (memory comparison only)."""
    K, m = logits.shape[-1], model.mask_id
    ab = model.ab64.float()
    a_t, a_next = ab[t][:, None, None], ab[t + 1][:, None, None]
    beta = 1 - a_next / a_t.clamp_min(1e-12)  # beta_{t+1}
    mask_col = F.one_hot(torch.tensor(m, device=x0.device), K).float()
    masked = (x_noisy == m)[..., None]
    # q(x_{t+1} | x_t = k) for the observed x_{t+1}, as a function of k
    fact1 = torch.where(masked, beta + (1 - beta) * mask_col, (1 - beta) * F.one_hot(x_noisy, K).float())
    q = fact1 * (a_t * F.one_hot(x0, K).float() + (1 - a_t) * mask_col)
    q = q / q.sum(-1, keepdim=True)
    p = fact1 * (a_t * logits.softmax(-1) + (1 - a_t) * mask_col)
    p = p / p.sum(-1, keepdim=True)
    kl = (q * (q.clamp_min(1e-30).log() - p.clamp_min(1e-30).log())).sum(-1)
    kl = torch.where((t >= 1)[:, None], kl, torch.zeros_like(kl))
    ce = F.cross_entropy(logits.flatten(0, 1), x0.flatten(), reduction="none").view(x0.shape)
    return kl, ce


def build(config, dev):
    model_cls, model_args, training_args = getattr(configs, config)()
    if vocab_size:
        model_args["vocab_size"] = vocab_size
    if ckpt:
        model = load_checkpoint(ckpt, map_location=dev)
        model_args = model.checkpoint_meta["model_args"]
    else:
        torch.manual_seed(seed)
        model = model_cls(**model_args).to(dev)
    model.net.bf16 = bf16
    if loss == "posterior":
        if not hasattr(model, "loss_terms"):
            raise UserError("--loss=posterior compares the D3PM's closed-form KL: use a d3pm_* config")
        model.loss_terms = lambda *a: posterior_loss_terms(model, *a)
    B = batch_size or training_args.get("batch_size", 8)
    L = seq_len or training_args.get("seq_len", 256)
    return model, model_args, B, L


def bench_train(config, dev):
    model, model_args, B, L = build(config, dev)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=dev.type == "cuda")
    step_model = torch.compile(model) if compile and dev.type == "cuda" else model
    x = torch.randint(model.vocab_size, (B, L), device=dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    base_mem = peak_memory_mb(dev) if dev.type == "cpu" else torch.cuda.memory_allocated(dev) / 2**20
    for i in range(warmup + steps):
        if i == warmup:
            sync(dev)
            t0 = time.time()
        loss_value, metrics = step_model(x)[1:]
        loss_value.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    sync(dev)
    dt = (time.time() - t0) / steps
    tokens_per_s = B * L / dt
    n_params = sum(p.numel() for p in model.parameters())
    flops_per_token = 6 * n_params + 12 * model_args["n_blocks"] * model_args["n_embed"] * L
    peak = detect_peak_tflops(dev)
    emit({"bench": "train", "config": config, "device": str(dev), "gpu": torch.cuda.get_device_name(dev)
          if dev.type == "cuda" else None, "batch_size": B, "seq_len": L, "K": model.vocab_size + 1,
          "params_M": n_params / 1e6, "compile": compile and dev.type == "cuda", "bf16": bf16 and dev.type == "cuda",
          "loss": loss, "ms_per_step": 1000 * dt, "tokens_per_s": tokens_per_s, "peak_mem_MB": peak_memory_mb(dev),
          "step_mem_MB": peak_memory_mb(dev) - base_mem,
          "flops_per_token": flops_per_token,
          "mfu": tokens_per_s * flops_per_token / (peak * 1e12) if peak else None,
          "final_loss": loss_value.item()})


def bench_memory(config, dev):
    """One training step (steps=1, warmup=0) per loss implementation, each in a fresh process."""
    results = {}
    for impl in ("closed", "posterior"):
        argv = [sys.executable, os.path.abspath(__file__), config, "--mode=train", f"--loss={impl}", "--steps=1",
                "--warmup=0", f"--batch_size={batch_size}", f"--seq_len={seq_len}", f"--vocab_size={vocab_size}",
                f"--device={device}", f"--bf16={bf16}"]
        rc, out, err = run_child(argv, child_timeout)
        if rc != 0:
            results[impl] = None
            why = "timed out" if rc is None else err.strip().splitlines()[-1] if err.strip() else f"exit {rc}"
            print(f"{impl}: failed ({why})", file=sys.stderr)
            continue
        results[impl] = json.loads(out.strip().splitlines()[-1])
    closed, post = results["closed"], results["posterior"]
    emit({"bench": "memory", "config": config, "device": str(dev),
          "batch_size": closed and closed["batch_size"], "seq_len": closed and closed["seq_len"],
          "K": closed and closed["K"], "closed_peak_MB": closed and closed["peak_mem_MB"],
          "posterior_peak_MB": post and post["peak_mem_MB"],
          "closed_step_MB": closed and closed["step_mem_MB"], "posterior_step_MB": post and post["step_mem_MB"],
          "closed_tokens_per_s": closed and closed["tokens_per_s"],
          "posterior_tokens_per_s": post and post["tokens_per_s"],
          "closed_loss": closed and closed["final_loss"], "posterior_loss": post and post["final_loss"],
          "step_mem_ratio": post["step_mem_MB"] / closed["step_mem_MB"]
          if closed and post and closed["step_mem_MB"] > 0 else None})  # (tiny shapes can stay within the RSS)


def bench_sample(config, dev):
    """The model's sampler as sample.py runs it (first-hitting for the masked models, KV cache for the
    autoregressive one) vs the same sampler without the shortcut (cache=False: identical samples)."""
    model, _, _, L = build(config, dev)
    model.eval()
    x = torch.full((sample_batch, L), model.mask_id, device=dev)
    trained = (model.checkpoint_meta if ckpt else {"training_args": getattr(configs, config)()[2]})["training_args"]
    opts = dict(window=trained["seq_len"]) if getattr(model, "any_length", False) else {}  # block diffusion
    result = {"bench": "sample", "config": config, "model": type(model).__name__, "device": str(dev),
              "batch": sample_batch, "seq_len": L, "compile": False, **opts}
    for name, cache in (("fast", True), ("plain", False)):
        gen = torch.Generator(device=dev).manual_seed(seed)
        sync(dev)
        t0 = time.time()
        samples, calls = model.sample(x, generator=gen, cache=cache, **opts)
        sync(dev)
        dt = time.time() - t0
        result.update({f"{name}_seconds": dt, f"{name}_calls": calls, f"{name}_seq_per_s": sample_batch / dt,
                       f"{name}_tokens_per_s": sample_batch * L / dt})
        result[f"{name}_samples"] = samples
    result["identical"] = bool((result.pop("fast_samples") == result.pop("plain_samples")).all())
    result["speedup"] = result["plain_seconds"] / result["fast_seconds"]
    emit(result)


@torch.no_grad()
def bench_eval(config, dev):
    """Spread of evaluate.py's per-batch estimate (model.batch_bound, stratified) vs the training-time
    estimate of the same bound (metrics["bound"] of forward: independent random times per sequence)."""
    model, _, _, L = build(config, dev)
    model.eval()
    rng = np.random.default_rng(seed)
    gen = torch.Generator(device=dev).manual_seed(seed)
    torch.manual_seed(seed)
    data = open_split(data_dir, "val") if data_dir else None
    stratified, plain = [], []
    for _ in range(eval_batches):
        if data is not None:
            ix = rng.integers(0, len(data) - L + 1, size=eval_batch_size)
            x0 = torch.from_numpy(np.stack([data[i:i + L] for i in ix]).astype(np.int64)).to(dev)
        else:
            x0 = torch.randint(model.vocab_size, (eval_batch_size, L), device=dev, generator=gen)
        stratified.append(float(model.batch_bound(x0, float(torch.rand((), generator=gen, device=dev)), gen)))
        plain.append(float(model(x0)[2]["bound"]))
    out = {"bench": "eval", "config": config, "model": type(model).__name__, "device": str(dev),
           "batch": eval_batch_size, "seq_len": L, "batches": eval_batches, "target_se_bits": target_se,
           "data": data_dir or "random tokens"}
    for name, ests in (("stratified", stratified), ("plain", plain)):
        bits = np.array(ests) / math.log(2)
        out[f"{name}_bpt"] = float(bits.mean())
        out[f"{name}_batch_std"] = float(bits.std(ddof=1))
        out[f"{name}_calls_for_target"] = math.ceil((bits.std(ddof=1) / target_se) ** 2)
    out["call_ratio"] = out["plain_calls_for_target"] / max(1, out["stratified_calls_for_target"])
    emit(out)


def run_child(argv, timeout):
    """Run a child process in its own process group; on timeout kill the whole group (nothing can hang).
    Returns (returncode or None on timeout, stdout, stderr)."""
    proc = subprocess.Popen(argv, cwd=os.path.dirname(os.path.abspath(__file__)), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
        return proc.returncode, out, err
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        return None, out, err


def bench_suite(config, dev):
    """Everything only a GPU can show, as one command: every family of --suite_configs at its published size,
    train tokens/s, MFU and peak memory with torch.compile on/off and bf16 on/off (on CPU only the one
    combination that applies), a short 1-process torchrun training run (NCCL on CUDA), and sampling speed.
    Each measurement is a child process with a timeout, all within --suite_seconds: one JSON line each, and
    a JSON line with "error" (plus a line on stderr) for anything that fails, times out or is skipped."""
    import pickle
    import tempfile
    deadline = time.time() + suite_seconds
    names = [c for c in suite_configs.split(",") if c]
    for c in names:
        if c not in CONFIG_NAMES:
            raise UserError(f"--suite_configs: unknown config {c!r}")
    me = [sys.executable, os.path.abspath(__file__)]
    combos = [(True, True), (False, True), (True, False), (False, False)] if dev.type == "cuda" else [(False, False)]
    jobs = [("train", c, *combos[0]) for c in names] + [("torchrun", "d3pm_tiny", dev.type == "cuda", True)]
    jobs += [("train", c, *combo) for combo in combos[1:2] for c in names] + [("sample", c, False, True) for c in names]
    jobs += [("train", c, *combo) for combo in combos[2:] for c in names]
    failures = 0
    with tempfile.TemporaryDirectory() as tmp:
        for kind, c, use_compile, use_bf16 in jobs:
            left = deadline - time.time()
            record = {"bench": kind, "config": c, "compile": use_compile, "bf16": use_bf16}
            if left < 5:
                rc, out, err = None, "", "skipped: the suite's deadline (--suite_seconds) was reached"
            elif kind == "torchrun":
                data = os.path.join(tmp, "text8")
                os.makedirs(data, exist_ok=True)
                for split in ("train", "val"):
                    np.save(os.path.join(data, f"{split}.npy"), np.random.default_rng(0).integers(0, 27, 20_000).astype(np.uint16))
                with open(os.path.join(data, "meta.pkl"), "wb") as f:
                    pickle.dump({"vocab_size": 27}, f)
                argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "train.py",
                        c, f"--data_root_dir={tmp}", f"--out_dir={os.path.join(tmp, 'out')}", "--max_iters=5",
                        "--eval_interval=5", f"--compile={use_compile}", f"--device={device}"]
                t0 = time.time()
                rc, out, err = run_child(argv, min(left, 300))
                record.update(backend="nccl" if dev.type == "cuda" else "gloo", seconds=time.time() - t0,
                              ok=rc == 0 and os.path.exists(os.path.join(tmp, "out", "last.pt")))
            else:
                argv = me + [c, f"--mode={kind}", f"--compile={use_compile}", f"--bf16={use_bf16}", f"--device={device}",
                             f"--steps={steps}", f"--warmup={warmup}", f"--sample_batch={sample_batch}"]
                rc, out, err = run_child(argv, min(left, 240))
                lines = [line for line in out.splitlines() if line.startswith("{")]
                if rc == 0 and lines:
                    record = json.loads(lines[-1])
            if rc != 0 or (kind == "torchrun" and not record["ok"]):
                failures += 1
                why = "timed out" if rc is None and "skipped" not in err else (err.strip().splitlines() or [f"exit {rc}"])[-1]
                record["error"] = why
                print(f"suite: {kind} {c} compile={use_compile} bf16={use_bf16} failed: {why}", file=sys.stderr)
            emit(record)
    emit({"bench": "suite", "jobs": len(jobs), "failed": failures, "seconds": suite_seconds - (deadline - time.time())})


SAMPLERS = {  # quality: name -> model.sample options
    "ancestral": {}, "top_p0.9": dict(top_p=0.9), "temp0.8": dict(temperature=0.8),
    "confidence": dict(sampler="confidence"), "confidence_margin": dict(sampler="confidence", score="margin"),
    "confidence_cosine": dict(sampler="confidence", schedule="cosine"),
    "remask": dict(sampler="remask"), "remask_top_p0.9": dict(sampler="remask", top_p=0.9),
    "remask_eta0.05": dict(sampler="remask", eta=0.05),
}


@torch.no_grad()
def bench_quality(config, dev):
    """Sample quality against network calls (--ckpt, judged by --judge): for each sampler of
    --quality_samplers at each number of steps in --quality_calls, plus the model's exact sampler,
    --quality_samples sequences of the checkpoint's length, scored by evaluate.quality (gen_ppl, gen_bpt,
    entropy, in_vocab for character corpora). The reference: the same measures on windows of real text
    (--data_dir's test split). One JSON line per point; --plot draws the curves."""
    from judge import load_judge, quality
    if not ckpt or not judge:
        raise UserError("--mode=quality needs --ckpt=GENERATOR and --judge=JUDGE (and --data_dir for the reference)")
    model = load_checkpoint(ckpt, map_location=dev)
    trained = model.checkpoint_meta.get("training_args", {})
    L = seq_len or trained.get("seq_len", 256)
    codec = load_codec(model.vocab_size, trained.get("dataset", ""), data_dir or None)
    the_judge = load_judge(judge, data_dir or None, dev)
    points = []
    if data_dir:
        data = open_split(data_dir, "test")
        ix = np.random.default_rng(seed).integers(0, len(data) - L + 1, size=quality_samples)
        rows = [data[i:i + L].astype(np.int64).tolist() for i in ix]
        points.append({"bench": "quality", "sampler": "data", "steps": None, "calls": None, "seconds": None,
                       **quality([codec.decode(r) for r in rows], rows, the_judge, data_dir)})
        emit(points[-1])
    x = torch.full((quality_samples, L), model.mask_id, device=dev)
    runs = [(name, int(n)) for name in quality_samplers.split(",") if name for n in quality_calls.split(",") if n]
    for name, n in runs + [("exact", None)]:
        if name != "exact" and name not in SAMPLERS:
            raise UserError(f"--quality_samplers: unknown sampler {name!r}; known: {', '.join(SAMPLERS)}")
        gen = torch.Generator(device=dev).manual_seed(seed)
        sync(dev)
        t0 = time.time()
        try:
            samples, calls = model.sample(x, steps=n, generator=gen, **SAMPLERS.get(name, {}))
        except ValueError as e:  # e.g. confidence decoding of an autoregressive model
            emit({"bench": "quality", "sampler": name, "steps": n, "error": str(e)})
            continue
        sync(dev)
        rows = samples.tolist()
        points.append({"bench": "quality", "sampler": name, "steps": n, "calls": calls, "seconds": time.time() - t0,
                       **quality([codec.decode(r) for r in rows], rows, the_judge, data_dir)})
        emit(points[-1])
    if plot:
        plot_quality(points, plot, f"{os.path.basename(os.path.dirname(os.path.abspath(ckpt)))}, judge {judge}")


def plot_quality(points, out, title):
    """Generative perplexity and entropy against network calls, one curve per sampler, real data as a line."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("--plot needs matplotlib, which the repo does not require: pip install matplotlib")
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, label in ((axes[0], "gen_ppl", "generative perplexity (judge)"), (axes[1], "entropy", "unigram entropy, bits")):
        for i, name in enumerate(dict.fromkeys(p["sampler"] for p in points if p["sampler"] not in ("data", "exact"))):
            curve = [p for p in points if p["sampler"] == name]
            ax.plot([p["calls"] for p in curve], [p[key] for p in curve], marker="o", color=f"C{i}", label=name)
        for p in points:
            if p["sampler"] == "exact":
                ax.plot([p["calls"]], [p[key]], marker="*", ms=14, color="k", ls="", label="exact sampler")
            if p["sampler"] == "data":
                ax.axhline(p[key], color="gray", ls="--", label="real text")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("network calls")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def bench_backbone(config, dev):
    """One training step of our DiTBlock ("ours") against a reference written here with the original nanoDD
    attention layout: rotate the contiguous (B, L, 3, H, d) qkv in one op, with cos, sin = 1, 0 on v, then
    permute it to (3, B, H, L, d) for SDPA (same parameters and outputs, same loss to the bit).
    step_MB is --mode=train's step_mem_MB of a one-step fresh process; on CPU that process runs with
    MALLOC_MMAP_THRESHOLD_=65536 so that glibc hands freed tensors back at once and the peak RSS follows
    the live tensors (with glibc's moving threshold it wanders by +-20% between identical runs).
    tokens_per_s is the best of 3 alternating fresh processes per layout (--warmup, --steps)."""
    if layout:  # a child: patch the reference in, then the ordinary train bench
        if layout == "reference":
            import model as M

            def forward(self, x, cond, cos, sin, mask=None, cache=None, store=True, index=0):
                assert mask is None and cache is None and not self.causal, "reference: training only"
                B, L, n = x.shape
                shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = \
                    self.adaLN_modulation(cond)[:, None, :].chunk(6, dim=-1)
                qkv = self.attn_qkv(M.modulate(self.norm1(x), shift_msa, scale_msa))
                cos3 = torch.stack([cos, cos, torch.ones_like(cos)], dim=2)  # (1, L, 3, 1, d)
                sin3 = torch.stack([sin, sin, torch.zeros_like(sin)], dim=2)
                qkv = M.apply_rotary(qkv.view(B, L, 3, self.n_heads, n // self.n_heads), cos3, sin3)
                q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
                h = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, L, n)
                x = x + gate_msa * self.dropout(self.attn_out(h))
                return x + gate_mlp * self.dropout(self.mlp(M.modulate(self.norm2(x), shift_mlp, scale_mlp)))

            M.DiTBlock.forward = forward
        return bench_train(config, dev)
    argv = [sys.executable, os.path.abspath(__file__), config, "--mode=backbone", f"--batch_size={batch_size}",
            f"--seq_len={seq_len}", f"--vocab_size={vocab_size}", f"--device={device}", f"--bf16={bf16}",
            f"--compile={compile}", f"--seed={seed}"]
    mem, speed = {}, {"ours": [], "reference": []}
    for i in range(4):  # round 0: memory (one step); rounds 1-3: speed, alternating
        for name in speed:
            more = ["--steps=1", "--warmup=0"] if i == 0 else [f"--steps={steps}", f"--warmup={warmup}"]
            env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"} if i == 0 else None
            try:
                out = subprocess.run(argv + [f"--layout={name}"] + more, capture_output=True, text=True, env=env,
                                     timeout=600)
            except subprocess.TimeoutExpired:
                print(f"backbone {name}: timed out after 600 s", file=sys.stderr)
                continue
            if out.returncode != 0:
                print(f"backbone {name}: failed ({(out.stderr.strip().splitlines() or [out.returncode])[-1]})",
                      file=sys.stderr)
                continue
            rec = json.loads(out.stdout.strip().splitlines()[-1])
            if i == 0:
                mem[name] = rec
            else:
                speed[name].append(rec["tokens_per_s"])
    ours, ref = mem.get("ours"), mem.get("reference")
    result = {"bench": "backbone", "config": config, "device": str(dev), "batch_size": ours and ours["batch_size"],
              "seq_len": ours and ours["seq_len"], "K": ours and ours["K"]}
    for name in speed:
        rec = mem.get(name)
        result.update({f"{name}_step_MB": rec and rec["step_mem_MB"], f"{name}_peak_MB": rec and rec["peak_mem_MB"],
                       f"{name}_tokens_per_s": max(speed[name], default=None)})
    result["step_mem_ratio"] = ours["step_mem_MB"] / ref["step_mem_MB"] if ours and ref else None
    result["speed_ratio"] = (result["ours_tokens_per_s"] / result["reference_tokens_per_s"]
                             if speed["ours"] and speed["reference"] else None)
    result["same_loss"] = ours["final_loss"] == ref["final_loss"] if ours and ref else None
    emit(result)


def main(argv):
    config = parse(argv)
    dev = pick_device(device)
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    runs = {"train": bench_train, "memory": bench_memory, "sample": bench_sample, "eval": bench_eval,
            "suite": bench_suite, "quality": bench_quality, "backbone": bench_backbone}
    if mode != "all" and mode not in runs:
        raise UserError(f"--mode={mode}: expected one of all, " + ", ".join(runs))
    for name in (["train", "sample", "eval"] if mode == "all" else [mode]):
        runs[name](config, dev)


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
