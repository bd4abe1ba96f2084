"""
Command-line smoke tests of sample.py and evaluate.py on a checkpoint that train.py d3pm_tiny
writes in a few steps on a fake text8 dataset (conftest.py).

Every command is a subprocess from the repository root (OMP_NUM_THREADS=1, HF_HUB_OFFLINE=1).
To keep the file fast on two cores, all commands are declared up front (CASES) and run once,
a few at a time, by the module fixture `results`; each test then checks the outcome of its own
command(s).
"""
import json
import os
import pickle
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
TIMEOUT = 180
ALPHABET = set(" abcdefghijklmnopqrstuvwxyz")


def sub_env():
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
              "TORCHELASTIC_RUN_ID"):
        env.pop(k, None)
    return env


def run(args):
    return subprocess.run([sys.executable, *map(str, args)], cwd=REPO, env=sub_env(), capture_output=True,
                          text=True, timeout=TIMEOUT)


def describe(proc):
    return f"exit {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"


# ---- the checkpoint and the datasets ------------------------------------------------------------
@pytest.fixture(scope="module")
def env(tmp_path_factory, tiny_text8_shared):
    root = tmp_path_factory.mktemp("cli")
    out = root / "run"
    proc = run(["train.py", "d3pm_tiny", f"--data_root_dir={tiny_text8_shared}", f"--out_dir={out}",
                "--max_iters=4", "--eval_interval=2", "--ema_update_after_step=1", "--ema_beta=0.5"])
    assert proc.returncode == 0, describe(proc)
    ckpt = out / "ckpt.pt"
    assert ckpt.is_file(), describe(proc)

    garbage = root / "garbage.pt"
    garbage.write_bytes(b"this is not a torch checkpoint\n" * 64)
    bad_vocab = root / "bad_vocab"
    bad_vocab.mkdir()
    np.save(bad_vocab / "test.npy", np.full(500, 40, dtype=np.uint16))
    short = root / "short"
    short.mkdir()
    np.save(short / "test.npy", np.arange(10, dtype=np.uint16) % 27)
    with open(os.path.join(tiny_text8_shared, "text8", "meta.pkl"), "rb") as f:
        meta = pickle.load(f)
    for d in (bad_vocab, short):
        with open(d / "meta.pkl", "wb") as f:
            pickle.dump(meta, f)
    return dict(ckpt=str(ckpt), run_dir=str(out), data_dir=os.path.join(tiny_text8_shared, "text8"),
                garbage=str(garbage), missing=str(root / "missing" / "ckpt.pt"),
                bad_vocab=str(bad_vocab), short=str(short))


def cases(e):
    """name -> argv (after the interpreter)."""
    s = ["sample.py", e["ckpt"], "--seq_len", "32"]
    ev = ["evaluate.py", e["ckpt"], "--data_dir", e["data_dir"], "--seq_len", "32", "--batch_size", "8"]
    return {
        # sampling
        "plain": s + ["--batch_size", "2"],
        "other_seed": s + ["--batch_size", "2", "--seed", "7"],
        "json": s + ["--batch_size", "3", "--json"],
        "prompt": s + ["--batch_size", "3", "--prompt", "the cat", "--json"],
        "infill": s + ["--batch_size", "3", "--infill", "the ??? sat", "--json"],
        "steps": s + ["--batch_size", "2", "--steps", "5", "--json"],
        "no_ema": s + ["--batch_size", "2", "--no-ema"],
        "run_dir": ["sample.py", e["run_dir"], "--seq_len", "32", "--batch_size", "2"],
        # sampling errors
        "err_missing": ["sample.py", e["missing"]],
        "err_garbage": ["sample.py", e["garbage"]],
        "err_hub_offline": ["sample.py", "nobody/nothing"],
        "err_alphabet": s + ["--prompt", "Hello, world!"],
        "err_long_prompt": s + ["--prompt", "a" * 40],
        "err_prompt_eq_len": s + ["--prompt", "a" * 32],
        "err_no_placeholder": s + ["--infill", "no holes here"],
        "err_prompt_and_infill": s + ["--prompt", "the", "--infill", "the ???"],
        "err_cuda": s + ["--device", "cuda"],
        # evaluation
        "eval_json": ev + ["--max_batches", "5", "--json"],
        "eval_text": ev + ["--max_batches", "3"],
        "eval_one_batch": ev + ["--max_batches", "1", "--json"],
        "eval_err_split": ev + ["--max_batches", "2", "--split", "nope"],
        "eval_err_vocab": ["evaluate.py", e["ckpt"], "--data_dir", e["bad_vocab"], "--seq_len", "32",
                           "--batch_size", "8", "--max_batches", "2"],
        "eval_err_batch1": ev[:-1] + ["1", "--max_batches", "2"],
        "eval_err_short": ["evaluate.py", e["ckpt"], "--data_dir", e["short"], "--seq_len", "32",
                           "--batch_size", "8", "--max_batches", "2"],
        "eval_ddp": ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"] + ev
                    + ["--max_batches", "4", "--json"],
    }


@pytest.fixture(scope="module")
def results(env):
    todo = cases(env)
    # the two-process run first (it is the longest), then the rest, three at a time on two cores
    order = ["eval_ddp"] + [k for k in todo if k != "eval_ddp"]
    with ThreadPoolExecutor(max_workers=3) as pool:
        futures = {k: pool.submit(run, todo[k]) for k in order}
        return {k: f.result() for k, f in futures.items()}


def ok(results, name):
    proc = results[name]
    assert proc.returncode == 0, f"{name}: {describe(proc)}"
    assert "Traceback" not in proc.stderr, f"{name}: {describe(proc)}"
    return proc


def json_out(results, name):
    proc = ok(results, name)
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    assert len(lines) == 1, f"{name}: expected one JSON line on stdout: {describe(proc)}"
    return json.loads(lines[0])


def text_samples(proc):
    return proc.stdout.rstrip("\n").split("\n\n")


# ---- sample.py -----------------------------------------------------------------------------------
def test_plain_text_output(results):
    proc = ok(results, "plain")
    samples = text_samples(proc)
    assert len(samples) == 2, describe(proc)
    for s in samples:
        assert len(s) == 32 and set(s) <= ALPHABET, repr(s)
    assert "\x1b[" not in proc.stdout, "ANSI codes written to a pipe"
    assert "network calls" in proc.stderr


def test_run_directory_accepted(results):
    """A run directory means its ckpt.pt; same checkpoint and default seed: the very same samples."""
    assert text_samples(ok(results, "run_dir")) == text_samples(ok(results, "plain"))


def test_json_output(results):
    out = json_out(results, "json")
    assert {"samples", "ids", "network_calls", "seconds"} <= set(out)
    assert len(out["samples"]) == len(out["ids"]) == 3
    for text, ids in zip(out["samples"], out["ids"]):
        assert len(text) == len(ids) == 32 and set(text) <= ALPHABET
        assert all(0 <= i < 27 for i in ids), ids  # no mask id (27) left
        assert text == "".join(" abcdefghijklmnopqrstuvwxyz"[i] for i in ids)
    assert isinstance(out["network_calls"], int) and 1 <= out["network_calls"] <= 50  # d3pm_tiny has T = 50
    assert out["seconds"] >= 0


def test_prompt(results):
    out = json_out(results, "prompt")
    assert len(out["samples"]) == 3
    for s in out["samples"]:
        assert s.startswith("the cat") and len(s) == 32 and set(s) <= ALPHABET


def test_infill(results):
    out = json_out(results, "infill")
    template = "the ??? sat"
    for s in out["samples"]:
        assert len(s) == len(template) and set(s) <= ALPHABET
        for c, t in zip(s, template):
            if t != "?":
                assert c == t, (s, template)


def test_steps(results):
    out = json_out(results, "steps")
    assert out["network_calls"] <= 5
    assert all(len(s) == 32 and set(s) <= ALPHABET for s in out["samples"])


def test_seed_reproducible_and_no_ema(results):
    plain = text_samples(ok(results, "plain"))
    assert text_samples(ok(results, "run_dir")) == plain  # same checkpoint, same (default) seed
    assert text_samples(ok(results, "other_seed")) != plain
    raw = text_samples(ok(results, "no_ema"))
    assert len(raw) == 2 and all(len(s) == 32 and set(s) <= ALPHABET for s in raw)
    assert raw != plain, "--no-ema gave the same samples as the EMA weights (EMA differs after 4 steps)"


@pytest.mark.parametrize("name,needle", [
    ("err_missing", "does not exist"),
    ("err_garbage", "not a readable checkpoint"),
    ("err_hub_offline", "nobody/nothing"),
    ("err_alphabet", "alphabet"),
    ("err_long_prompt", "shorter than seq_len"),
    ("err_prompt_eq_len", "shorter than seq_len"),
    ("err_no_placeholder", "placeholder"),
    ("err_prompt_and_infill", "not both"),
    ("err_cuda", "CUDA"),
    ("eval_err_split", "nope"),
    ("eval_err_vocab", "40"),
    ("eval_err_batch1", "batch_size"),
    ("eval_err_short", "seq_len"),
])
def test_errors_are_one_line(results, name, needle):
    proc = results[name]
    assert proc.returncode != 0, f"{name}: {describe(proc)}"
    assert "Traceback" not in proc.stderr, f"{name}: {describe(proc)}"
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, f"{name}: expected one stderr line: {describe(proc)}"
    assert lines[0].startswith("error:") and needle in lines[0], lines[0]
    assert proc.stdout.strip() == "", f"{name}: {describe(proc)}"


# ---- evaluate.py ---------------------------------------------------------------------------------
def test_evaluate_json(results):
    out = json_out(results, "eval_json")
    assert {"bpt", "se", "ci95", "network_calls", "tokens"} <= set(out)
    assert out["network_calls"] == 5 and out.get("batches", 5) == 5
    assert out["tokens"] == 5 * 8 * 32
    assert 0 < out["bpt"] < 20 and 0 < out["se"] < 10
    lo, hi = out["ci95"]
    assert lo < out["bpt"] < hi
    assert abs((hi - lo) / 2 - 1.96 * out["se"]) < 1e-9 * max(1.0, out["se"])


def strict_json(text):
    """json.loads that rejects NaN / Infinity, which are not JSON (jq, JSON.parse refuse them)."""
    def bad(const):
        raise ValueError(f"non-standard JSON constant {const}")
    return json.loads(text, parse_constant=bad)


def test_evaluate_json_is_strict_json(results):
    strict_json(ok(results, "eval_json").stdout)


def test_evaluate_json_one_batch_is_strict_json(results):
    """One batch: the standard error is undefined and must come out as null, not Infinity."""
    out = strict_json(ok(results, "eval_one_batch").stdout)
    assert out["network_calls"] == 1
    assert out["se"] is None and out["ci95"] is None


def test_evaluate_text(results):
    proc = ok(results, "eval_text")
    assert any("bits/token" in ln for ln in proc.stdout.splitlines()), describe(proc)


def test_evaluate_distributed(results):
    """torchrun, 2 gloo processes: each iteration every rank scores its own batch and all ranks share
    the estimates, so --max_batches 4 is 2 iterations x 2 ranks = 4 network calls in all."""
    out = json_out(results, "eval_ddp")
    assert out["network_calls"] == 4 and out["network_calls"] % 2 == 0
    assert out["tokens"] == 4 * 8 * 32
    assert 0 < out["bpt"] < 20 and out["se"] > 0
