"""
Settled ablations, kept so that they can be run again. Each compares one training step of a D3PM config
against a variant of it, every measurement in a fresh process of `bench.py --mode=train` (one JSON line):

    python dev/ablations.py d3pm_owt_cpu --mode=memory
    OMP_NUM_THREADS=1 python dev/ablations.py d3pm_text8_cpu --mode=backbone --batch_size=16 --seq_len=256

memory    step memory of the closed-form D3PM loss (d3pm.py) vs the same step with full (B, L, K) posterior
          tensors q(x_t | x_{t+1}, x_0) and p(x_t | x_{t+1}), as an implementation without the closed form
          computes them. The two losses are the same number.
backbone  our DiTBlock vs a reference with nanoDD's attention layout: rotate the contiguous (B, L, 3, H, d)
          qkv in one op (cos, sin = 1, 0 on v), then permute it to (3, B, H, L, d) for SDPA (the same
          parameters, outputs and loss). Step memory from a one-step process, tokens/s the best of 3
          alternating processes per variant (--steps, --warmup).

On CPU each one-step process runs with MALLOC_MMAP_THRESHOLD_=65536, so that glibc hands freed tensors
back at once and the peak RSS follows the live tensors (with glibc's moving threshold it wanders by
+-20% between identical runs). step_MB is bench.py's step_mem_MB: the peak minus what was held before.
Options: --batch_size, --seq_len, --vocab_size, --device, --bf16, --compile, --steps, --warmup, --seed
(bench.py's) and --timeout (seconds per process).
"""
import json
import os
import subprocess
import sys

import torch
import torch.nn.functional as F

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


# ---- the variants, patched into a bench.py child -------------------------------------------------------
def posterior_loss_terms(self, logits, x0, x_noisy, t):
    """D3PMAbsorbing.loss_terms with full (B, L, K) posteriors: per-token (kl, ce)."""
    K, m = logits.shape[-1], self.mask_id
    ab = self.ab64.float()
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


def reference_block_forward(self, x, cond, cos, sin, mask=None, cache=None, store=True, index=0):
    """DiTBlock.forward with nanoDD's attention layout (training only)."""
    import model as M
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


def child(variant, bench_argv):
    """Run bench.py --mode=train in this process with the variant patched in."""
    import bench
    import d3pm
    import model
    if variant == "posterior":
        d3pm.D3PMAbsorbing.loss_terms = posterior_loss_terms
    elif variant == "reference":
        model.DiTBlock.forward = reference_block_forward
    bench.main(bench_argv + ["--mode=train"])


# ---- the comparisons ------------------------------------------------------------------------------------
def run(variant, config, options, steps, warmup, timeout, fresh_malloc):
    """One bench.py train measurement of a variant in a fresh process (its own group, killed on timeout):
    the JSON record, or None with a line on stderr."""
    argv = [sys.executable, os.path.abspath(__file__), config, f"--child={variant}", *options,
            f"--steps={steps}", f"--warmup={warmup}"]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"} if fresh_malloc else None
    proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        proc.communicate()
        print(f"{variant}: timed out after {timeout} s", file=sys.stderr)
        return None
    if proc.returncode != 0:
        print(f"{variant}: failed ({(err.strip().splitlines() or [proc.returncode])[-1]})", file=sys.stderr)
        return None
    return json.loads(out.strip().splitlines()[-1])


def compare(mode, config, options, steps, warmup, timeout):
    """Step memory (one step each) and, for backbone, tokens/s (best of 3 alternating runs) of the two
    variants; one JSON line with both, step_mem_ratio = variant / ours, speed_ratio = ours / variant and the
    relative difference of the two losses."""
    ours, other = ("closed", "posterior") if mode == "memory" else ("ours", "reference")
    mem = {v: run(v, config, options, 1, 0, timeout, True) for v in (ours, other)}
    speed = {ours: [], other: []}
    for _ in range(3 if mode == "backbone" else 0):
        for v in speed:
            rec = run(v, config, options, steps, warmup, timeout, False)
            if rec:
                speed[v].append(rec["tokens_per_s"])
    a, b = mem[ours], mem[other]
    result = {"ablation": mode, "config": config, "batch_size": a and a["batch_size"], "seq_len": a and a["seq_len"],
              "K": a and a["K"]}
    for v, rec in mem.items():
        result.update({f"{v}_step_MB": rec and rec["step_mem_MB"], f"{v}_peak_MB": rec and rec["peak_mem_MB"],
                       f"{v}_loss": rec and rec["final_loss"], f"{v}_tokens_per_s": max(speed[v], default=None)
                       if mode == "backbone" else rec and rec["tokens_per_s"]})
    result["step_mem_ratio"] = b["step_mem_MB"] / a["step_mem_MB"] if a and b and a["step_mem_MB"] > 0 else None
    if mode == "backbone" and speed[ours] and speed[other]:
        result["speed_ratio"] = max(speed[ours]) / max(speed[other])
    result["loss_rel_diff"] = abs(a["final_loss"] - b["final_loss"]) / abs(a["final_loss"]) if a and b else None
    print(json.dumps(result), flush=True)
    return result


def main(argv):
    config, mode, variant, steps, warmup, timeout, options = "d3pm_text8_cpu", "memory", "", 10, 3, 900.0, []
    for arg in argv:
        key, _, value = arg[2:].partition("=") if arg.startswith("--") else ("", "", arg)
        if arg in ("-h", "--help"):
            print(__doc__)
            return None
        if not key:
            config = value
        elif key in ("mode", "child"):
            mode, variant = (value, variant) if key == "mode" else (mode, value)
        elif key in ("steps", "warmup"):
            steps, warmup = (int(value), warmup) if key == "steps" else (steps, int(value))
        elif key == "timeout":
            timeout = float(value)
        else:
            options.append(arg)  # bench.py's options
    if variant:
        return child(variant, [config, *options, f"--steps={steps}", f"--warmup={warmup}"])
    if mode not in ("memory", "backbone"):
        sys.exit(f"error: --mode={mode}: expected memory or backbone")
    return compare(mode, config, options, steps, warmup, timeout)


if __name__ == "__main__":
    main(sys.argv[1:])
