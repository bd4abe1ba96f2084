"""
Teachers against their distilled students: generative perplexity and unigram entropy against network calls,
from bench.py --mode=quality JSON lines (RESULTS.md, few-step generation).

    python dev/plot_distill.py --out assets/distill_corpus_a.png \
        "D3PM teacher=out/q19_d3pm_teacher.jsonl" "D3PM student=out/q19_d3pm_student.jsonl" ...

Each argument is LABEL=FILE; the curve is FILE's `--sampler` points (default ancestral, `LABEL=FILE:SAMPLER` for
another), and real text (the file's "data" line) is the dashed line. Needs matplotlib.
"""
import argparse
import json


def curves(specs):
    """{label: [(calls, gen_ppl, entropy)]} and the real-text (gen_ppl, entropy) of the first file."""
    out, data = {}, None
    for spec in specs:
        label, _, path = spec.partition("=")
        path, _, sampler = path.partition(":")
        points = [json.loads(line) for line in open(path)]
        data = data or next(((p["gen_ppl"], p["entropy"]) for p in points if p["sampler"] == "data"), None)
        out[label] = sorted((p["calls"], p["gen_ppl"], p["entropy"]) for p in points
                            if p["sampler"] == (sampler or "ancestral") and "gen_ppl" in p)
    return out, data


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("curves", nargs="+", help="LABEL=FILE[:SAMPLER]")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    lines, data = curves(args.curves)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, k, name in ((axes[0], 1, "generative perplexity (judge)"), (axes[1], 2, "unigram entropy, bits")):
        for label, pts in lines.items():
            ax.plot([q[0] for q in pts], [q[k] for q in pts], marker="o", ls="--" if "student" in label else "-",
                    label=label)
        if data:
            ax.axhline(data[k - 1], color="gray", ls=":", label="real text")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("network calls")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out, dpi=100)


if __name__ == "__main__":
    main()
