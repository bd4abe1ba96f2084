"""Fault injection (CPU, no network): kill -9 at random moments, SIGTERM under torchrun, non-finite
losses, and bad input. Nothing is ever lost or corrupt, and errors are one line.

Training runs in this process (conftest.call_main) except where a real process is the point: the run
killed with SIGKILL, the torchrun run stopped with SIGTERM, and one bad input for the script's own
one-line error. Children run in a process group of their own that is killed whatever happens.
(The elastic restart after a worker crash: tests/test_distributed.py.)"""
import contextlib
import copy
import io
import json
import os
import pickle
import random
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import train
from common import UserError, newest_checkpoint
from conftest import assert_one_line_error, call_main, child_group, kill_group, run_script, write_tiny_text8

FAST = ["d3pm_tiny", "--device=cpu", "--lr_decay_iters=1000", "--eval_interval=100000", "--log_interval=1000"]


def train_args(data_root, out_dir, *extra):
    return [*FAST, f"--data_root_dir={data_root}", f"--out_dir={out_dir}", *extra]


@contextlib.contextmanager
def nan_losses(iterations):
    """Within: the loss of those training iterations (counted from 1) is NaN (train.loss_hook replaced)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train, "loss_hook", lambda it, loss: loss * float("nan") if it in iterations else loss)
        yield


def train_here(*args):
    """train.main(ARGS) in this process; returns its stdout."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        call_main(train, args)
    return out.getvalue()


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same(a, b, what):
    assert set(a) == set(b), what
    bad = [k for k in a if not torch.equal(a[k], b[k])]
    assert not bad, f"{what}: {bad[:4]} differ"


def assert_same_optimizer(a, b, what):
    assert set(a["state"]) == set(b["state"]), what
    for i in a["state"]:
        assert_same(a["state"][i], b["state"][i], f"{what}, optimizer state {i}")


def wait_for(path, proc, timeout=120):
    t0 = time.time()
    while not os.path.exists(path):
        assert proc.poll() is None, f"exited {proc.returncode} before writing {path}"
        assert time.time() - t0 < timeout, f"{path} never appeared"
        time.sleep(0.02)


def test_kill_9_at_random_moments_never_loses_the_run(tiny_text8, tmp_path):
    """A run killed with SIGKILL (a checkpoint every step, so the kill very likely lands inside a write)
    always leaves a loadable checkpoint; resuming from it leaves no temporary files and ends bit-identical
    to a run that was never killed."""
    rng = random.Random(0)
    for trial in range(2):
        out = tmp_path / f"run{trial}"
        cmd = [sys.executable, "train.py", *train_args(tiny_text8, out, "--max_iters=100000", "--ckpt_interval=1")]
        with child_group(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) as proc:
            wait_for(out / "last.pt", proc)
            time.sleep(rng.uniform(0.0, 0.5))
            kill_group(proc)
            proc.wait()
        found = newest_checkpoint(str(out))
        assert found is not None, "no loadable checkpoint after kill -9"
        k = found[1]["iter_num"]
        assert k >= 1
        train_here(*train_args(tiny_text8, out, f"--resume={out}", f"--max_iters={k + 3}"))
        assert not [n for n in os.listdir(out) if ".tmp" in n], "stale temporary files left behind"
        straight = tmp_path / f"straight{trial}"
        train_here(*train_args(tiny_text8, straight, f"--max_iters={k + 3}", "--ckpt_interval=100000"))
        a, b = load(out / "last.pt"), load(straight / "last.pt")
        assert a["iter_num"] == b["iter_num"] == k + 3
        assert_same(a["model"], b["model"], "weights after resume")
        assert_same(a["ema"], b["ema"], "EMA after resume")
        assert_same_optimizer(a["optimizer"], b["optimizer"], "after resume")


def worker_pids(parent_pid):
    with open(f"/proc/{parent_pid}/task/{parent_pid}/children") as f:
        return [int(p) for p in f.read().split()]


@pytest.mark.skipif(not torch.distributed.is_available() or not os.path.exists("/proc/self/task"),
                    reason="needs torch.distributed and Linux /proc")
def test_sigterm_under_torchrun_stops_every_rank_cleanly(tiny_text8, tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py", *FAST,
           f"--data_root_dir={tiny_text8}", f"--out_dir={out}", "--max_iters=100000", "--ckpt_interval=20"]
    with child_group(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
        wait_for(out / "last.pt", proc, timeout=180)
        workers = worker_pids(proc.pid)
        assert len(workers) == 2
        for pid in workers:  # as a cluster scheduler does: every process of the job gets SIGTERM
            os.kill(pid, signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=180)
    assert proc.returncode == 0, stderr  # torchrun exits 0 only if both ranks did
    assert "rank 0: got signal 15" in stderr and "rank 1: got signal 15" in stderr
    stopped_at = int(stdout.split("stopped by signal at iteration ")[1].split(";")[0])
    ckpt = load(out / "last.pt")
    assert ckpt["iter_num"] == stopped_at >= 20  # last.pt was rewritten at the stop, not only every 20
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())


@pytest.fixture
def saves(monkeypatch):
    """Every checkpoint train.py writes, as (file name, a deep copy of what was written), in order."""
    written = []
    original = train.atomic_save

    def atomic_save(obj, path):
        original(obj, path)
        written.append((os.path.basename(path), copy.deepcopy(obj)))

    monkeypatch.setattr(train, "atomic_save", atomic_save)
    return written


EMA_NOW = ["--ema_update_after_step=0", "--ema_beta=0.5"]  # the EMA averages from the third update on


def test_injected_nan_is_skipped_and_reported(tiny_text8, tmp_path, saves):
    """Non-finite losses at iterations 4 and 5: both steps are skipped and reported, and nothing moves
    across them: weights, EMA (values and step count) and optimizer state after iterations 3, 4 and 5
    are identical (a wrong implementation that still steps the optimizer with zeroed gradients, or
    updates the EMA, changes them); training then continues."""
    out = tmp_path / "nan"
    with nan_losses({4, 5}):
        stdout = train_here(*train_args(tiny_text8, out, "--max_iters=7", "--log_interval=1", "--ckpt_interval=1",
                                        *EMA_NOW))
    assert stdout.count("update skipped") == 2
    records = [json.loads(line) for line in open(out / "log.jsonl")]
    assert [rec["iter"] for rec in records if rec.get("skipped")] == [4, 5]
    last = {obj["iter_num"]: obj for name, obj in saves if name == "last.pt"}
    assert sorted(last) == list(range(1, 8))
    for it in (4, 5):
        assert_same(last[it]["model"], last[3]["model"], f"weights after skipped iteration {it}")
        assert_same(last[it]["ema"], last[3]["ema"], f"EMA after skipped iteration {it}")
        assert_same_optimizer(last[it]["optimizer"], last[3]["optimizer"], f"after skipped iteration {it}")
    # not vacuous: the EMA lags the weights here, and the steps around the skipped ones do change both
    ema3 = {k[len("ema_model."):]: v for k, v in last[3]["ema"].items() if k.startswith("ema_model.")}
    assert any(not torch.equal(ema3[k], last[3]["model"][k]) for k in ema3)
    for before, after in ((2, 3), (5, 6)):
        assert any(not torch.equal(last[after]["model"][k], last[before]["model"][k]) for k in last[3]["model"])
        assert any(not torch.equal(last[after]["ema"][k], last[before]["ema"][k]) for k in last[3]["ema"])
    assert all(torch.isfinite(v).all() for v in last[7]["model"].values())


def test_persistent_nan_stops_with_the_last_good_state_in_last_pt(tiny_text8, tmp_path):
    """Non-finite from iteration 3 on, max_bad_steps=3: training stops at iteration 5 with an error, and
    last.pt exists (it was not due before: ckpt_interval is 1000) holding the last finite state, the one
    after iteration 2: the same weights, EMA and optimizer state as a clean run stopped at 2."""
    out, ref = tmp_path / "allnan", tmp_path / "ref"
    with nan_losses(range(3, 51)), pytest.raises(UserError, match="3 consecutive non-finite steps at iteration 5") as e:
        train_here(*train_args(tiny_text8, out, "--max_iters=50", "--max_bad_steps=3", *EMA_NOW))
    assert "last.pt" in str(e.value)
    assert (out / "last.pt").exists(), "the last good state was not written"
    assert not (out / "ckpt.pt").exists()
    train_here(*train_args(tiny_text8, ref, "--max_iters=2", *EMA_NOW))
    got, want = load(out / "last.pt"), load(ref / "last.pt")
    assert all(torch.isfinite(v).all() for v in got["model"].values())
    assert_same(got["model"], want["model"], "last.pt weights vs the state after iteration 2")
    assert_same(got["ema"], want["ema"], "last.pt EMA vs the state after iteration 2")
    assert_same_optimizer(got["optimizer"], want["optimizer"], "last.pt")


@pytest.fixture
def broken_data(tmp_path):
    """A data root whose text8 splits can be damaged per test."""
    return write_tiny_text8(tmp_path / "broken")


def test_truncated_split_is_one_line_on_stderr(broken_data, tmp_path):
    """The script itself (python train.py): one line on stderr naming the split, exit != 0, no traceback."""
    with open(os.path.join(broken_data, "text8", "val.npy"), "r+b") as f:
        f.truncate(100)
    assert_one_line_error(run_script(["train.py", *train_args(broken_data, tmp_path / "a", "--max_iters=2")]), "val")


def test_bad_inputs_are_user_errors(broken_data, tiny_text8, tmp_path):
    d = os.path.join(broken_data, "text8")

    def error(data_root, out, *extra):
        with pytest.raises(UserError) as e:
            train_here(*train_args(data_root, out, *extra))
        return str(e.value)

    with open(os.path.join(d, "val.npy"), "r+b") as f:  # truncated split
        f.truncate(100)
    assert "val" in error(broken_data, tmp_path / "a", "--max_iters=2")
    np.save(os.path.join(d, "val.npy"), np.zeros(10, dtype=np.uint16))  # split shorter than seq_len
    assert "seq_len" in error(broken_data, tmp_path / "b", "--max_iters=2")
    np.save(os.path.join(d, "val.npy"), np.zeros(5000, dtype=np.uint16))  # token ids outside the vocabulary
    np.save(os.path.join(d, "train.npy"), np.full(5000, 40, dtype=np.uint16))
    msg = error(broken_data, tmp_path / "c", "--max_iters=2")
    assert "40" in msg and "vocab" in msg
    os.remove(os.path.join(d, "train.npy"))  # missing split
    assert "train" in error(broken_data, tmp_path / "d", "--max_iters=2")
    blocker = tmp_path / "file"  # unwritable out_dir (a path below a regular file: fails even as root)
    blocker.write_text("x")
    assert "out_dir" in error(tiny_text8, blocker / "run", "--max_iters=2")
    bad = tmp_path / "badrun"  # resume: a directory holding only a corrupt checkpoint
    bad.mkdir()
    (bad / "last.pt").write_bytes(b"\x00" * 100)
    assert "resume" in error(tiny_text8, bad, f"--resume={bad}")


def test_resume_on_a_dataset_with_another_vocabulary_is_refused(tiny_text8, tmp_path):
    out = tmp_path / "run"
    train_here(*train_args(tiny_text8, out, "--max_iters=2"))
    other = tmp_path / "other"
    shutil.copytree(os.path.join(tiny_text8, "text8"), other / "text8")
    meta = pickle.load(open(other / "text8" / "meta.pkl", "rb"))
    pickle.dump({**meta, "vocab_size": 30}, open(other / "text8" / "meta.pkl", "wb"))
    with pytest.raises(UserError, match="vocab_size"):
        train_here(*train_args(other, out, f"--resume={out}", "--max_iters=4"))
