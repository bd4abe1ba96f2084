"""
Launch train.py (and evaluate.py) under `torchrun --nproc_per_node=2` (gloo, CPU) many times and count
the launches that do not exit 0, in particular those where every rank finished its work and then died
in interpreter shutdown ("terminate called without an active exception", SIGABRT): the exit crash that
common.ddp_shutdown() removes. Not a test (it takes long); run it after touching the distributed code:

    OMP_NUM_THREADS=1 nice -n 10 python tests/stress_torchrun_exit.py --launches=330 --what=both --jobs=2
    python tests/stress_torchrun_exit.py --launches=40 --what=evaluate

--what=train alternates a fresh 4-step run and a run resumed from the previous one (which loads per-rank
RNG states and gathers them again), so every distributed code path of train.py runs: DDP with gradient
accumulation, evaluation (all_reduce), checkpoints (RNG gather), the stop-flag all_reduce, the teardown.
--what=evaluate launches evaluate.py on a checkpoint (an all_gather per batch); --what=both cycles
fresh, resumed, evaluate. Everything on the CPU (gloo), also on a machine with GPUs.
Each launch runs in its own process group with a timeout, after which its processes (the workers, in
sessions of their own, included) are killed; with gdb installed their stacks are dumped first.
Prints one line per failed launch and a JSON summary; exits 1 if any launch failed.
"""
import argparse
import json
import os
import pickle
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from conftest import descendants

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXIT_ABORT = "terminate called without an active exception"


def write_data(root):
    """A tiny text8-like dataset (uint16 ids 0..26) in root/text8."""
    d = os.path.join(root, "text8")
    os.makedirs(d, exist_ok=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", 20_000), ("val", 4_000), ("test", 3_000)):
        np.save(os.path.join(d, f"{split}.npy"), rng.integers(0, 27, n).astype(np.uint16))
    with open(os.path.join(d, "meta.pkl"), "wb") as f:
        pickle.dump({"vocab_size": 27}, f)
    return d


def tree(pid):
    """pid and the processes below it (conftest.descendants)."""
    return [pid] + descendants(pid)


def kill_tree(pids):
    for pid in pids:
        for kill, target in ((os.killpg, pid), (os.kill, pid)):
            try:
                if kill is os.kill or os.getpgid(pid) == pid:
                    kill(target, signal.SIGKILL)
            except OSError:
                pass


def dump_stacks(pids, run_dir):
    """Every thread's C/C++ backtrace of each process (gdb, if installed), into run_dir."""
    if not shutil.which("gdb"):
        return
    for pid in pids:
        with open(os.path.join(run_dir, f"stacks_{pid}.txt"), "w") as f:
            subprocess.run(["gdb", "-p", str(pid), "-batch", "-ex", "thread apply all bt"], stdout=f,
                           stderr=subprocess.STDOUT, timeout=120)


def launch(argv, cwd, timeout, cores):
    """Run argv in its own process group; on timeout dump the stacks of its processes (torchrun and the
    workers), then kill them all. Returns (rc or None, stdout, stderr)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)

    def preexec():
        if cores:  # core files of crashed ranks land in cwd (kernel.core_pattern permitting)
            resource.setrlimit(resource.RLIMIT_CORE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))

    proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, preexec_fn=preexec)
    try:
        out, err = proc.communicate(timeout=timeout)
        return proc.returncode, out, err
    except subprocess.TimeoutExpired:
        pids = tree(proc.pid)
        dump_stacks(pids, cwd)
        kill_tree(pids)
        out, err = proc.communicate()
        return None, out, err


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--launches", type=int, default=300)
    p.add_argument("--what", default="train", choices=["train", "evaluate", "both"],
                   help="both: alternate train (fresh / resumed) and evaluate launches")
    p.add_argument("--jobs", type=int, default=1, help="launches at a time")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--timeout", type=float, default=600, help="seconds per launch (a launch takes ~10 s on an "
                   "idle 2-core machine); after it the stacks of the hung processes are dumped next to its run")
    p.add_argument("--cores", action="store_true", help="allow core dumps, kept in the run directories")
    p.add_argument("--keep", default="", help="keep the run directories here (default: a temporary directory)")
    args = p.parse_args()

    root = args.keep or tempfile.mkdtemp(prefix="stress_torchrun_")
    os.makedirs(root, exist_ok=True)
    data_root = os.path.join(root, "data")
    data_dir = write_data(data_root)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}"]
    train = [os.path.join(REPO, "train.py"), "d3pm_tiny", "--device=cpu", f"--data_root_dir={data_root}",
             "--max_iters=4", "--eval_interval=2", "--eval_iters=4", "--log_interval=2", "--gradient_accumulation_steps=2"]
    # a checkpoint for the evaluate launches
    seed_dir = os.path.join(root, "seed_run")
    rc, out, err = launch([sys.executable, *train, f"--out_dir={seed_dir}"], root, args.timeout, False)
    if rc != 0:
        sys.exit(f"could not write the checkpoint for evaluate.py: exit {rc}\n{err[-2000:]}")

    def one(i):
        run_dir = os.path.join(root, f"launch{i}")
        os.makedirs(run_dir, exist_ok=True)
        # train: fresh, resumed, fresh, resumed, ...; both: fresh, resumed, evaluate, fresh, resumed, ...
        cycle = {"train": ["fresh", "resume"], "evaluate": ["evaluate"], "both": ["fresh", "resume", "evaluate"]}
        step = cycle[args.what][i % len(cycle[args.what])]
        kind = "evaluate" if step == "evaluate" else "train"
        if step == "evaluate":
            argv = torchrun + [os.path.join(REPO, "evaluate.py"), os.path.join(seed_dir, "ckpt.pt"), "--data_dir",
                               data_dir, "--split", "val", "--seq_len", "32", "--batch_size", "4",
                               "--max_batches", "6", "--json", "--device", "cpu"]
            done = '"bpt"'
        elif step == "fresh":  # a fresh run of 4 iterations
            argv = torchrun + train + [f"--out_dir={run_dir}"]
            done = "done:"
        else:  # resume the previous launch's run to 6 iterations
            prev = os.path.join(root, f"launch{i - 1}")
            argv = torchrun + train + [f"--out_dir={run_dir}", f"--resume={prev}", "--max_iters=6"]
            done = "done:"
            deadline = time.time() + args.timeout
            while not os.path.exists(os.path.join(prev, "finished")) and time.time() < deadline:
                time.sleep(0.2)  # with --jobs > 1 the run to resume may still be going
        t0 = time.time()
        rc, out, err = launch(argv, run_dir, args.timeout, args.cores)
        open(os.path.join(run_dir, "finished"), "w").close()
        if rc == 0:
            verdict = "ok"
        elif rc is None:
            verdict = "timeout"
        elif EXIT_ABORT in err and done in out:
            verdict = "exit_abort"  # finished its work, then died at exit
        else:
            verdict = "failed"
        if verdict != "ok":
            print(f"launch {i} ({kind}): {verdict}, exit {rc} after {time.time() - t0:.0f} s\nstdout: "
                  f"{out[-1000:]}\nstderr: {err[-2000:]}", flush=True)
        return kind, verdict, time.time() - t0

    t0 = time.time()
    counts = {}
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        for n, (kind, verdict, dt) in enumerate(pool.map(one, range(args.launches)), 1):
            counts.setdefault(kind, {}).setdefault(verdict, 0)
            counts[kind][verdict] += 1
            if n % 10 == 0 or n == args.launches:
                print(f"{n}/{args.launches} launches, {time.time() - t0:.0f} s: {json.dumps(counts)}", flush=True)
    failed = sum(v for c in counts.values() for k, v in c.items() if k != "ok")
    aborts = sum(c.get("exit_abort", 0) for c in counts.values())
    print(json.dumps({"launches": args.launches, "exit_aborts": aborts, "failed": failed, "by_kind": counts,
                      "seconds": round(time.time() - t0), "dir": root}))
    if not failed and not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
