"""Fault injection (CPU, no network): kill -9 at random moments, SIGTERM under torchrun,
non-finite losses, and bad input. Nothing is ever lost or corrupt, and errors are one line."""
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from conftest import REPO_ROOT

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
FAST = ["d3pm_tiny", "--lr_decay_iters=1000", "--eval_interval=100000", "--log_interval=1000"]


def train_cmd(data_root, out_dir, *extra):
    return [sys.executable, "train.py", *FAST, f"--data_root_dir={data_root}", f"--out_dir={out_dir}", *extra]


def run(cmd, **kw):
    return subprocess.run(cmd, cwd=REPO_ROOT, env=ENV, capture_output=True, text=True, timeout=240, **kw)


def params(path):
    return torch.load(path, weights_only=True)["model"]


def wait_for(path, proc, timeout=60):
    t0 = time.time()
    while not os.path.exists(path):
        assert proc.poll() is None, proc.communicate()
        assert time.time() - t0 < timeout, f"{path} never appeared"
        time.sleep(0.02)


def test_kill_9_at_random_moments_never_loses_the_run(tiny_text8, tmp_path):
    from common import newest_checkpoint
    rng = random.Random(0)
    for trial in range(4):
        out = tmp_path / f"run{trial}"
        # a checkpoint every iteration: a random kill very likely lands inside a write
        proc = subprocess.Popen(train_cmd(tiny_text8, out, "--max_iters=100000", "--ckpt_interval=1"),
                                cwd=REPO_ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        wait_for(out / "last.pt", proc)
        time.sleep(rng.uniform(0.0, 0.5))
        proc.kill()
        proc.wait()
        found = newest_checkpoint(str(out))
        assert found is not None, "no loadable checkpoint after kill -9"
        k = found[1]["iter_num"]
        assert k >= 1
        # resuming continues, and equals an uninterrupted run to the same iteration
        copy = tmp_path / f"copy{trial}"
        shutil.copytree(out, copy)
        r = run(train_cmd(tiny_text8, out, f"--resume={out}", f"--max_iters={k + 3}"))
        assert r.returncode == 0, r.stderr
        assert not [n for n in os.listdir(out) if ".tmp" in n], "stale temporary files left behind"
        r2 = run(train_cmd(tiny_text8, copy, f"--resume={copy}", f"--max_iters={k + 3}"))
        assert r2.returncode == 0, r2.stderr
        straight = tmp_path / f"straight{trial}"
        r3 = run(train_cmd(tiny_text8, straight, f"--max_iters={k + 3}", "--ckpt_interval=100000"))
        assert r3.returncode == 0, r3.stderr
        a, b, c = params(out / "last.pt"), params(copy / "last.pt"), params(straight / "last.pt")
        assert all(torch.equal(a[key], b[key]) and torch.equal(a[key], c[key]) for key in a)


def worker_pids(parent_pid):
    with open(f"/proc/{parent_pid}/task/{parent_pid}/children") as f:
        return [int(p) for p in f.read().split()]


def test_sigterm_under_torchrun_stops_every_rank_cleanly(tiny_text8, tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py", *FAST,
           f"--data_root_dir={tiny_text8}", f"--out_dir={out}", "--max_iters=100000", "--ckpt_interval=20"]
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(out / "last.pt", proc, timeout=120)
    workers = worker_pids(proc.pid)
    assert len(workers) == 2
    for pid in workers:  # as a cluster scheduler does: every process of the job gets SIGTERM
        os.kill(pid, signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr  # torchrun exits 0 only if both ranks did
    assert "rank 0: got signal 15" in stderr and "rank 1: got signal 15" in stderr
    stopped_at = int(stdout.split("stopped by signal at iteration ")[1].split(";")[0])
    ckpt = torch.load(out / "last.pt", weights_only=True)
    assert ckpt["iter_num"] == stopped_at >= 20  # last.pt was rewritten at the stop, not only every 20
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())


def test_injected_nan_is_skipped_and_reported(tiny_text8, tmp_path):
    import json
    out = tmp_path / "nan"
    r = run(train_cmd(tiny_text8, out, "--max_iters=10", "--inject_nan=3,4", "--log_interval=1"))
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("update skipped") == 2
    records = [json.loads(line) for line in open(out / "log.jsonl")]
    assert [rec["iter"] for rec in records if rec.get("skipped")] == [3, 4]
    clean = tmp_path / "clean"
    assert run(train_cmd(tiny_text8, clean, "--max_iters=10")).returncode == 0
    a, b = params(out / "last.pt"), params(clean / "last.pt")
    assert all(torch.isfinite(v).all() for v in a.values())
    assert any(not torch.equal(a[k], b[k]) for k in a), "the skipped steps should change the result"


def test_persistent_nan_stops_without_writing_a_bad_checkpoint(tiny_text8, tmp_path):
    out = tmp_path / "allnan"
    r = run(train_cmd(tiny_text8, out, "--max_iters=50", "--inject_nan=all", "--max_bad_steps=3"))
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "consecutive non-finite" in lines[0] and "Traceback" not in r.stderr
    for name in ("last.pt", "ckpt.pt"):
        if (out / name).exists():
            assert all(torch.isfinite(v).all() for v in params(out / name).values())


def one_line_error(r, *words):
    assert r.returncode != 0, r.stdout
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    for w in words:
        assert w in lines[0], lines[0]


@pytest.fixture
def broken_data(tmp_path):
    """A data root whose text8 splits can be damaged per test."""
    from conftest import write_tiny_text8
    return write_tiny_text8(tmp_path / "broken")


def test_bad_inputs_are_one_line_errors(broken_data, tiny_text8, tmp_path):
    d = os.path.join(broken_data, "text8")
    # truncated split
    with open(os.path.join(d, "val.npy"), "r+b") as f:
        f.truncate(100)
    one_line_error(run(train_cmd(broken_data, tmp_path / "a", "--max_iters=2")), "val")
    # split shorter than seq_len
    np.save(os.path.join(d, "val.npy"), np.zeros(10, dtype=np.uint16))
    one_line_error(run(train_cmd(broken_data, tmp_path / "b", "--max_iters=2")), "seq_len")
    # token ids outside the vocabulary
    np.save(os.path.join(d, "val.npy"), np.zeros(5000, dtype=np.uint16))
    np.save(os.path.join(d, "train.npy"), np.full(5000, 40, dtype=np.uint16))
    one_line_error(run(train_cmd(broken_data, tmp_path / "c", "--max_iters=2")), "40", "vocab")
    # missing split
    os.remove(os.path.join(d, "train.npy"))
    one_line_error(run(train_cmd(broken_data, tmp_path / "d", "--max_iters=2")), "train")
    # unwritable out_dir (a path below a regular file: fails even as root)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    one_line_error(run(train_cmd(tiny_text8, blocker / "run", "--max_iters=2")), "out_dir")
    # resume: a directory holding only a corrupt checkpoint
    bad = tmp_path / "badrun"
    bad.mkdir()
    (bad / "last.pt").write_bytes(b"\x00" * 100)
    one_line_error(run(train_cmd(tiny_text8, bad, f"--resume={bad}")), "resume")


def test_resume_on_a_dataset_with_another_vocabulary_is_refused(tiny_text8, tmp_path):
    import pickle
    out = tmp_path / "run"
    assert run(train_cmd(tiny_text8, out, "--max_iters=2")).returncode == 0
    other = tmp_path / "other"
    shutil.copytree(os.path.join(tiny_text8, "text8"), other / "text8")
    meta = pickle.load(open(other / "text8" / "meta.pkl", "rb"))
    pickle.dump({**meta, "vocab_size": 30}, open(other / "text8" / "meta.pkl", "wb"))
    one_line_error(run(train_cmd(other, out, f"--resume={out}", "--max_iters=4")), "vocab_size")


def test_torchrun_restart_after_a_worker_crash_resumes_by_itself(tiny_text8, tmp_path):
    """torchrun --max-restarts=1: rank 1 dies hard at iteration 8; the restarted group resumes from
    last.pt (iteration 5) without being told, and ends bit-identical to a run that never crashed."""
    common = [*FAST, f"--data_root_dir={tiny_text8}", "--max_iters=12", "--ckpt_interval=5", "--lr_decay_iters=12"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    crashed = run([*torchrun, "--max-restarts=1", "train.py", *common, f"--out_dir={tmp_path / 'a'}",
                   "--inject_crash=8"])
    assert crashed.returncode == 0, crashed.stderr
    assert "exitcode: 13" in crashed.stderr and "resuming from" in crashed.stdout
    clean = run([*torchrun, "train.py", *common, f"--out_dir={tmp_path / 'b'}"])
    assert clean.returncode == 0, clean.stderr
    a, b = params(tmp_path / "a" / "last.pt"), params(tmp_path / "b" / "last.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)
