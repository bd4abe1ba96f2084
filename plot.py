"""
Draw the loss curves of one or more training runs from their log.jsonl (train.py writes one JSON line per
train log and per val evaluation):

    python plot.py out/d3pm_text8_cpu out/mdlm_text8_cpu out/ar_text8_cpu --out curves.png

Train bits/token (thin) and val bits/token (thick, with markers) against the iteration, one colour per run.
matplotlib is needed only here (it is not a requirement of the repo): pip install matplotlib.
"""
import argparse
import json
import os
import sys

from common import UserError


def read_log(run_dir):
    """(train records, val records) of a run directory or a log.jsonl path."""
    path = run_dir if run_dir.endswith(".jsonl") else os.path.join(run_dir, "log.jsonl")
    try:
        with open(path) as f:
            records = [json.loads(line) for line in f if line.strip()]
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror}")
    train = [r for r in records if r.get("split") == "train" and r.get("bpt") is not None]
    val = [r for r in records if r.get("split") == "val" and r.get("bpt") is not None]
    return train, val


def plot_runs(run_dirs, out, labels=None, title="bits per token"):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("plotting needs matplotlib, which the repo does not require: pip install matplotlib")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, run_dir in enumerate(run_dirs):
        train, val = read_log(run_dir)
        label = labels[i] if labels else os.path.basename(os.path.normpath(run_dir))
        color = f"C{i}"
        ax.plot([r["iter"] for r in train], [r["bpt"] for r in train], color=color, alpha=0.35, lw=1)
        ax.plot([r["iter"] for r in val], [r["bpt"] for r in val], color=color, marker="o", lw=2, label=label)
    ax.set_xlabel("iteration")
    ax.set_ylabel("bits/token (val: thick, train: thin)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="run directories (or log.jsonl files)")
    p.add_argument("--out", default="curves.png", help="the picture to write")
    p.add_argument("--labels", default="", help="comma-separated legend labels (default: directory names)")
    p.add_argument("--title", default="bits per token")
    args = p.parse_args(argv)
    labels = args.labels.split(",") if args.labels else None
    if labels and len(labels) != len(args.runs):
        raise UserError(f"--labels has {len(labels)} names for {len(args.runs)} runs")
    plot_runs(args.runs, args.out, labels, args.title)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
