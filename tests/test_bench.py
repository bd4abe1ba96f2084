"""bench.py in smoke mode: every benchmark runs on a tiny config and prints well-formed JSON lines.
No timing assertions: only that the numbers exist and are consistent."""
import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_bench(*args):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "bench.py", "d3pm_tiny", *args], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return [json.loads(line) for line in out.stdout.splitlines() if line.strip()]


def test_bench_all_modes_emit_json():
    records = run_bench("--steps=2", "--warmup=1", "--eval_batches=4", "--eval_batch_size=4")
    by_name = {r["bench"]: r for r in records}
    assert set(by_name) == {"train", "sample", "eval"}
    train = by_name["train"]
    assert train["tokens_per_s"] > 0 and train["peak_mem_MB"] > 0 and train["mfu"] is None  # CPU: no MFU
    assert train["flops_per_token"] > 6 * train["params_M"] * 1e6
    sample = by_name["sample"]
    assert sample["plain_calls"] == sample["T"] and 0 < sample["fast_calls"] <= sample["T"]
    ev = by_name["eval"]
    assert ev["stratified_calls_for_target"] > 0 and ev["plain_calls_for_target"] > 0


def test_bench_memory_compares_two_losses():
    (rec,) = run_bench("--mode=memory", "--vocab_size=2000", "--batch_size=2", "--seq_len=16")
    assert rec["K"] == 2001
    assert rec["closed_step_MB"] is not None and rec["posterior_step_MB"] is not None


def test_bench_bad_option_is_one_line():
    out = subprocess.run([sys.executable, "bench.py", "--nope=1"], cwd=REPO, capture_output=True, text=True)
    assert out.returncode != 0 and len(out.stderr.strip().splitlines()) == 1 and "Traceback" not in out.stderr
