"""
Measure training, sampling and evaluation speed (and memory) on the current device.

    python bench.py d3pm_text8_cpu                          # all benchmarks, one JSON line each
    python bench.py d3pm_text8 --mode=train --compile=True  # CUDA: torch.compile on/off, --bf16=False
    python bench.py d3pm_text8_cpu --mode=sample --ckpt=out/d3pm_text8_cpu/ckpt.pt
    python bench.py --mode=suite                            # a GPU's whole check list, < 8 minutes
    python bench.py --mode=quality --ckpt=out/mdlm_text8_cpu/ckpt.pt --judge=out/ar_text8_cpu --data_dir=data/text8

Modes:
  train   tokens/s of forward + backward + AdamW step after warm-up; peak memory (CUDA: max allocated,
          CPU: peak RSS of the process); on CUDA the model FLOPs utilisation, with
          FLOPs/token = 6 N + 12 n_blocks n_embed seq_len   (N = parameters incl. the tied output matrix;
          the second term is QK^T and AV of full, non-causal attention, forward + backward)
          divided by the GPU's dense bf16 peak (H100/H200: 989 TFLOP/s; override with --peak_tflops).
          step_mem_MB is the peak minus what was in use before the step (model, data; the optimizer state
          is not yet allocated). dev/ablations.py compares variants of this step (settled ablations).
  sample  tokens/s and network calls of the model's sampler (first-hitting / KV cache) vs the same
          sampler calling the network at every step, or block diffusion re-reading its history at every call
          (cache=False; identical samples, checked: "identical"). --seq_len beyond the training length works
          for block diffusion (the context slides). --compile=True: the fast sampler again with the network
          compiled (common.compile_network, as sample.py --compile): its first call's seconds (with compilation),
          a second call's, and whether its samples are identical.
  eval    network calls needed to reach --target_se with evaluate.py's stratified estimator
          (model.batch_bound) vs the training-time estimate (forward's metrics["bound"], independent
          random times), from the spread of --eval_batches per-batch estimates of each.
  quality sample quality against network calls: every sampler of --quality_samplers at each of
          --quality_calls steps, and the exact sampler, scored by --judge (see bench_quality); --plot.
  suite   everything only a GPU can show, in one command with a deadline (see bench_suite): each family
          of --suite_configs at its published size with torch.compile and bf16 on and off, a 1-process
          torchrun (NCCL) training run, sampling speed; with the hub, the papers' published checkpoints
          (convert.py) on --published_zero_shot. One JSON line each; failures are JSON lines too.
  sample_memory  peak memory of one sampling call beyond a forward pass, in float32 logits, at K = 50258 (see the function)
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

import configs
from common import UserError, compile_network, hub_online, load_codec, open_model, open_split, pick_device
from convert import PUBLISHED

CONFIG_NAMES = configs.NAMES

# ---- defaults, overridden by --key=value -------------------------------------------------------------
mode = "all"  # train, sample, eval, all (= train, sample, eval), quality, suite (the GPU check list below)
batch_size = 0  # 0: the config's
seq_len = 0  # 0: the config's
vocab_size = 0  # 0: the config's (e.g. 50257 to bench the BPE output layer on a small model)
steps = 10  # timed training steps
warmup = 3  # untimed steps first (compilation happens here)
compile = False  # train: torch.compile the model (CUDA); sample: also time the sampler with the network compiled
compile_backend = "inductor"  # sample: the backend of --compile (aot_eager: no code generation, a quick check on CPU)
bf16 = True  # bfloat16 autocast (CUDA)
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
SUITE_DEFAULT = suite_configs
suite_seconds = 450  # suite: the deadline for the whole list; each child also has its own timeout
suite_published = "auto"  # suite: the papers' checkpoints (convert.PUBLISHED): auto (CUDA and hub), on, off, or a list
published_zero_shot = "wikitext2,ptb,lambada"  # suite: their zero-shot rows (evaluate.py --zero_shot) ...
published_batches = 20  # ... on this many batches of 16 windows each
published_data_files = ""  # ... from local copies (evaluate.py --data_files) instead of the hub
judge = ""  # quality: the judge (an AR checkpoint or a GPT-2 name; see judge.py)
quality_samplers = "ancestral,top_p0.9,confidence,confidence_margin"  # quality: the curves
quality_calls = "8,16,32,64,128"  # quality: network calls (steps) per point; the exact sampler is added
quality_samples = 32  # quality: sequences per point
plot = ""  # quality: also draw the curve to this picture (needs matplotlib)
# -------------------------------------------------------------------------------------------------------
KEYS = [k for k, v in list(globals().items()) if not k.startswith("_") and isinstance(v, (int, float, bool, str))]


def parse(argv):
    """[CONFIG] [--key=value ...] -> the config name (default d3pm_text8_cpu); the options, type-checked against the
    defaults (configs.parse_overrides, as train.py's), set the globals. --help prints them and exits."""
    if "-h" in argv or "--help" in argv:
        print(__doc__ + "\nconfigs: " + ", ".join(CONFIG_NAMES) + "\noptions: "
              + " ".join(f"--{k}={globals()[k]!r}" for k in KEYS))
        sys.exit(0)
    config, texts = configs.split_command_line(argv)
    globals().update(configs.parse_overrides(texts, {k: globals()[k] for k in KEYS}))
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


def build(config, dev):
    model_cls, model_args, training_args = getattr(configs, config)()
    if vocab_size:
        model_args["vocab_size"] = vocab_size
    if ckpt:
        model = open_model(ckpt, True, dev)
        model_args = model.checkpoint_meta["model_args"]
    else:
        torch.manual_seed(seed)
        model = model_cls(**model_args).to(dev)
    model.net.bf16 = bf16
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
          "ms_per_step": 1000 * dt, "tokens_per_s": tokens_per_s, "peak_mem_MB": peak_memory_mb(dev),
          "step_mem_MB": peak_memory_mb(dev) - base_mem,
          "flops_per_token": flops_per_token,
          "mfu": tokens_per_s * flops_per_token / (peak * 1e12) if peak else None,
          "final_loss": loss_value.item()})


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
    result["identical"] = bool((result["fast_samples"] == result.pop("plain_samples")).all())
    result["speedup"] = result["plain_seconds"] / result["fast_seconds"]
    if compile:
        compile_network(model, compile_backend)
        for name in ("compiled_first", "compiled"):
            gen = torch.Generator(device=dev).manual_seed(seed)
            sync(dev)
            t0 = time.time()
            samples, calls = model.sample(x, generator=gen, **opts)
            sync(dev)
            result[f"{name}_seconds"] = time.time() - t0
        result.update(compile=compile_backend, compiled_identical=bool((samples == result["fast_samples"]).all()),
                      compiled_speedup=result["fast_seconds"] / result["compiled_seconds"])
    del result["fast_samples"]
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
    Each measurement is a child process with a timeout, all within --suite_seconds: one JSON line each, as each
    finishes, and a JSON line with "error" (plus a line on stderr) for anything that fails, times out or is skipped.
    On CUDA a compiled block-diffusion training step runs FlexAttention's forward and backward (bd3lm.py), which
    no CPU can check; sampling is timed with and without the compiled network, and sample_memory measures the
    float64 sampling work at K = 50258. Without CUDA the default list becomes the families' tiny configs (said
    in one line at once): the published sizes would run for minutes on a CPU and show nothing a GPU shows."""
    import pickle
    import tempfile
    deadline = time.time() + suite_seconds
    names = [c for c in suite_configs.split(",") if c]
    for c in names:
        if c not in CONFIG_NAMES:
            raise UserError(f"--suite_configs: unknown config {c!r}")
    cuda = dev.type == "cuda"
    if not cuda and suite_configs == SUITE_DEFAULT:
        names = list(dict.fromkeys(f"{c.split('_')[0]}_tiny" for c in names))
        print(f"suite: no CUDA here. This is the GPU check list (published sizes, compile, bf16, NCCL, FlexAttention); "
              f"running the tiny configs on CPU instead ({','.join(names)}), which checks that each job runs; "
              f"--suite_configs=... chooses others", file=sys.stderr, flush=True)
    me = [sys.executable, os.path.abspath(__file__)]
    combos = [(True, True), (False, True), (True, False), (False, False)] if cuda else [(False, False)]
    jobs = [("train", c, *combos[0]) for c in names]
    if cuda and not any(c.startswith("bd3lm") for c in names):  # FlexAttention's backward: only a GPU runs it
        jobs += [("train", "bd3lm_tiny", True, True)]
    jobs += [("torchrun", "d3pm_tiny", cuda, True)] * bool(names)
    jobs += [("train", c, *combo) for combo in combos[1:2] for c in names] + [("sample", c, cuda, True) for c in names]
    jobs += [("sample_memory", "d3pm_tiny", False, True)] * bool(names)
    jobs += [("train", c, *combo) for combo in combos[2:] for c in names]
    if suite_published == "on" or (suite_published == "auto" and dev.type == "cuda" and hub_online()):
        jobs += [("published", repo_id, False, True) for repo_id in PUBLISHED]
    elif suite_published not in ("auto", "off", "on"):  # a comma list of ids or local copies
        jobs += [("published", spec, False, True) for spec in suite_published.split(",") if spec]
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
            elif kind == "published":
                argv = [sys.executable, "evaluate.py", c, f"--zero_shot={published_zero_shot}", "--batch_size=16",
                        f"--max_batches={published_batches}", f"--device={device}", "--json"]
                argv += [f"--data_files={published_data_files}"] * bool(published_data_files)
                argv += [f"--data_dir={data_dir}"] * bool(data_dir)  # its tokenizer (meta.pkl), if not GPT-2's
                rc, out, err = run_child(argv, min(left, 600))
                lines = [line for line in out.splitlines() if line.startswith("{")]
                if rc == 0 and lines:
                    record.update(json.loads(lines[-1]))
            else:
                argv = me + [c, f"--mode={kind}", f"--compile={use_compile}", f"--bf16={use_bf16}", f"--device={device}",
                             f"--steps={steps}", f"--warmup={warmup}", f"--sample_batch={sample_batch}"]
                rc, out, err = run_child(argv, min(left, 240))
                lines = [line for line in out.splitlines() if line.startswith("{")]
                if rc == 0 and lines:  # a mode may emit several lines (sample_memory: one per sampler)
                    for line in lines[:-1]:
                        emit(json.loads(line))
                    record = json.loads(lines[-1])
            if rc != 0 or (kind == "torchrun" and not record["ok"]):
                failures += 1
                why = "timed out" if rc is None and "skipped" not in err else (err.strip().splitlines() or [f"exit {rc}"])[-1]
                record["error"] = why
                print(f"suite: {kind} {c} compile={use_compile} bf16={use_bf16} failed: {why}", file=sys.stderr)
            emit(record)
    emit({"bench": "suite", "jobs": len(jobs), "failed": failures, "seconds": suite_seconds - (deadline - time.time())})


def bench_sample_memory(config, dev, child=None):
    """Peak memory of one sampling call beyond a plain forward pass, in units of the float32 logits, at GPT-2's
    K: a tiny DiT (n_embed 64, 1 block; MDLM with vocab 50257 + mask, Duo with vocab 50258), 2 rows x 1024
    positions all masked, one network call per sampler. Each peak is a fresh child process (ru_maxrss is per
    process; MALLOC_MMAP_THRESHOLD_=65536 returns freed memory; CUDA: max_memory_allocated): (a) model.logits
    on the input, (b) one model.sample call; ratio = (b - a) / logits size. The config is not used."""
    families = {"mdlm": ("mdlm_tiny", 50257), "duo": ("duo_tiny", 50258)}
    cases = {"mdlm_confidence": dict(sampler="confidence", steps=1),
             "mdlm_confidence_margin": dict(sampler="confidence", score="margin", steps=1),
             "mdlm_ancestral": dict(steps=1), "mdlm_ancestral_top_p0.9": dict(steps=1, top_p=0.9),
             "mdlm_remask": dict(sampler="remask", steps=1), "duo_ancestral": dict(steps=1)}
    B, L = 2, 1024
    if child is not None:  # one measurement: "FAMILY:forward" or "CASE:sample"
        name, what = child.split(":")
        family, V = families[name.split("_")[0]]
        model_cls, model_args, _ = getattr(configs, family)()
        torch.manual_seed(seed)
        model = model_cls(**dict(model_args, vocab_size=V, n_embed=64, n_heads=2, n_blocks=1, dropout=0.0))
        model = model.to(dev).eval()
        x = torch.full((B, L), model.mask_id, device=dev)
        gen = torch.Generator(device=dev).manual_seed(seed)
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        with torch.no_grad():
            if what == "forward":  # Duo's network reads tokens (its sampler starts from random ones), MDLM's the masks
                inp = torch.randint(V, (B, L), device=dev, generator=gen) if name == "duo" else x
                model.logits(inp, torch.ones(B, dtype=torch.float64, device=dev))
            else:
                model.sample(x, generator=gen, **cases[name])
        sync(dev)
        emit({"peak_MB": peak_memory_mb(dev)})
        return
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")

    def measure(what):
        code = f"import bench, torch; bench.bench_sample_memory(None, torch.device({str(dev)!r}), child={what!r})"
        proc = subprocess.run([sys.executable, "-c", code], cwd=os.path.dirname(os.path.abspath(__file__)), env=env,
                              capture_output=True, text=True, timeout=900)
        if proc.returncode != 0:
            raise RuntimeError(f"sample_memory {what}: {(proc.stderr.strip().splitlines() or ['exit'])[-1]}")
        return json.loads(proc.stdout.strip().splitlines()[-1])["peak_MB"]

    forward = {name: measure(f"{name}:forward") for name in families}
    for name, opts in cases.items():
        family = name.split("_")[0]
        K = families[family][1] + (family == "mdlm")  # MDLM's output has the mask class too
        logits_mb = B * L * K * 4 / 2**20
        peak = measure(f"{name}:sample")
        emit({"bench": "sample_memory", "sampler": name, "device": str(dev), "rows": B, "positions": L, "K": K,
              "opts": opts, "logits_MB": logits_mb, "forward_peak_MB": forward[family], "sample_peak_MB": peak,
              "ratio": (peak - forward[family]) / logits_mb})


SAMPLERS = {  # quality: name -> model.sample options
    "ancestral": {}, "top_p0.9": dict(top_p=0.9), "temp0.8": dict(temperature=0.8),
    "confidence": dict(sampler="confidence"), "confidence_max": dict(sampler="confidence", score="max"),
    "confidence_margin": dict(sampler="confidence", score="margin"),
    "confidence_cosine": dict(sampler="confidence", schedule="cosine"),
    "remask": dict(sampler="remask"), "remask_top_p0.9": dict(sampler="remask", top_p=0.9),
    "remask_eta0.05": dict(sampler="remask", eta=0.05),
    "greedy_tail": dict(sampler="greedy_tail"), "greedy_tail_top_p0.9": dict(sampler="greedy_tail", top_p=0.9),
    **{f"threshold{c}": dict(sampler="threshold", threshold=c) for c in (0.7, 0.8, 0.9)},  # the model picks the calls
}


def quality_runs(samplers, calls):
    """(sampler name, steps) for --quality_samplers x --quality_calls (comma lists): each sampler at each number
    of steps, except a threshold sampler, which ignores steps and picks its own calls: once, steps None."""
    runs = [(name, None) if SAMPLERS.get(name, {}).get("sampler") == "threshold" else (name, int(n))
            for name in samplers.split(",") if name for n in calls.split(",") if n]
    return list(dict.fromkeys(runs))


@torch.no_grad()
def bench_quality(config, dev):
    """Sample quality against network calls (--ckpt, judged by --judge): for each sampler of
    --quality_samplers at each number of steps in --quality_calls (a threshold sampler, which ignores steps and
    picks its own calls: once, steps None), plus the model's exact sampler,
    --quality_samples sequences of the checkpoint's length, scored by judge.quality (gen_ppl, gen_bpt,
    entropy, in_vocab for character corpora). The reference: the same measures on windows of real text
    (--data_dir's test split). One JSON line per point; --plot draws the curves."""
    from judge import load_judge, quality
    if not ckpt or not judge:
        raise UserError("--mode=quality needs --ckpt=GENERATOR and --judge=JUDGE (and --data_dir for the reference)")
    model = open_model(ckpt, True, dev)
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
    for name, n in quality_runs(quality_samplers, quality_calls) + [("exact", None)]:
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


def main(argv):
    config = parse(argv)
    dev = pick_device(device)
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    runs = {"train": bench_train, "sample": bench_sample, "eval": bench_eval,
            "suite": bench_suite, "quality": bench_quality, "sample_memory": bench_sample_memory}
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
