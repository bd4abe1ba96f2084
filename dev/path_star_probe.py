"""
Has a masked model learned to follow one edge of a path-star graph? For each inner node k of the answer path
(data/tasks.py path_star, one-character labels: node k at answer position 2k), mask some answer nodes of test rows,
everything else given, and report how often the model's most likely token at node k is right:

    neighbours  only node k masked (both neighbours given: one lookup of the edge either way)
    from_goal   nodes 1..k masked, k+1..goal given (one step backwards from the known part)
    from_start  nodes k..M-1 masked, start..k-1 given (one step forwards; at k = 1 the D arms are a tie)

A network that follows edges scores near 1 on neighbours and from_goal; one that only knows which labels are
in the graph scores about 1/12 (RESULTS.md: conditional generation). An autoregressive model (one with
shifted_logits) gets only from_start, teacher-forced: its Clever-Hans step (near 1 from node 2 on if learned).

    python dev/path_star_probe.py out/ps_mdlm_s1 --data_dir data/path_star
"""
import argparse
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import open_model, open_pairs  # noqa: E402


PROBES = {  # name -> the answer nodes masked when node k is asked, for arm length M
    "neighbours": lambda k, M: [k],
    "from_goal": lambda k, M: range(1, k + 1),
    "from_start": lambda k, M: range(k, M),
}


def probe(model, rows, start, arm_length):
    """{probe name: [accuracy at inner node k for k = 1..M-1]} on rows (B, L) whose answers begin at start (B,).
    A causal model (one with shifted_logits) gets only from_start, teacher-forced on the whole row."""
    causal = hasattr(model, "shifted_logits")
    b = torch.arange(len(rows))
    if causal:  # teacher-forced: one call serves every k
        with torch.no_grad():
            logits = model.shifted_logits(rows)
        return {"from_start": [right(logits, rows, b, start + 2 * k) for k in range(1, arm_length)]}
    out = {}
    for name, masked in PROBES.items():
        out[name] = []
        for k in range(1, arm_length):
            x = rows.clone()
            for j in masked(k, arm_length):
                x[b, start + 2 * j] = model.mask_id
            with torch.no_grad():
                logits = model.logits(x, torch.full((len(rows),), 0.5))
            out[name].append(right(logits, rows, b, start + 2 * k))
    return out


def right(logits, rows, b, position):
    """The share of rows whose most likely token at position (B,) is the true one."""
    return (logits[b, position].argmax(-1) == rows[b, position]).float().mean().item()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ckpt")
    p.add_argument("--data_dir", default="data/path_star")
    p.add_argument("--rows", type=int, default=500)
    p.add_argument("--arm_length", type=int, default=5)
    args = p.parse_args()
    model = open_model(args.ckpt, True, "cpu").eval()
    pairs = open_pairs(args.data_dir, "test")
    rows = torch.from_numpy(np.array(pairs.rows[:args.rows], dtype=np.int64))
    start = torch.from_numpy(np.array(pairs.prompt_len[:args.rows], dtype=np.int64))  # answer position 0
    for name, accuracy in probe(model, rows, start, args.arm_length).items():
        print(f"{name:<11} node 1..{args.arm_length - 1}: {' '.join(f'{a:.2f}' for a in accuracy)}")


if __name__ == "__main__":
    main()
