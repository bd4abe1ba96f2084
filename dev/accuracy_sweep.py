"""
Accuracy of conditional runs against training steps and against network calls at answer time: evaluate.py
--accuracy on every snapshot of each run directory (snap_ITER.pt, copied from last.pt while training; ckpt.pt
otherwise) under each sampler setting, one JSON line per (run, iteration, setting) on stdout.

    python dev/accuracy_sweep.py out/ps_mdlm_s1 out/ps_ar_s1 --data_dir data/path_star \
        --settings "confidence:1,2,4,8,17" "ancestral:17" --last_only
"""
import argparse
import glob
import json
import os
import re
import subprocess
import sys


def snapshots(run, last_only):
    snaps = sorted(glob.glob(os.path.join(run, "snap_*.pt")), key=lambda p: int(re.findall(r"\d+", p)[-1]))
    if not snaps:
        return [(None, os.path.join(run, "ckpt.pt"))]
    pairs = [(int(re.findall(r"\d+", p)[-1]), p) for p in snaps]
    return pairs[-1:] if last_only else pairs


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+")
    p.add_argument("--data_dir", required=True)
    p.add_argument("--settings", nargs="+", default=["confidence:8"], help="SAMPLER:STEPS[,STEPS...]")
    p.add_argument("--last_only", action="store_true", help="only each run's newest snapshot")
    p.add_argument("--every", type=int, default=1, help="every k-th snapshot (the last always)")
    p.add_argument("--extra", default="--temperature 0", help="more evaluate.py options")
    args = p.parse_args()
    for run in args.runs:
        snaps = snapshots(run, args.last_only)
        snaps = [s for i, s in enumerate(snaps) if i % args.every == 0 or i == len(snaps) - 1]
        for it, path in snaps:
            for setting in args.settings:
                sampler, steps = setting.split(":")
                for n in steps.split(","):
                    cmd = [sys.executable, "evaluate.py", path, "--data_dir", args.data_dir, "--accuracy", "--json",
                           "--batch_size", "100", "--sampler", sampler, "--steps", n] + args.extra.split()
                    out = subprocess.run(cmd, capture_output=True, text=True)
                    if out.returncode:
                        print(json.dumps({"run": run, "iter": it, "error": out.stderr.strip()[-300:]}), flush=True)
                        continue
                    r = json.loads(out.stdout.strip().splitlines()[-1])
                    print(json.dumps({"run": run, "iter": it, "sampler": sampler, "steps": int(n),
                                      "accuracy": r["accuracy"], "ci95": r["ci95"],
                                      "network_calls": r["network_calls"]}), flush=True)


if __name__ == "__main__":
    main()
