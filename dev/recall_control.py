"""
A control for the path-star result: single-hop associative recall, the one lookup path-star needs at each step,
on its own. `make` writes 8 random pairs "a>b" of distinct labels (0-9a-z) and one source as the prompt, its
target as the answer (JSON lines, for data/prepare_pairs.py); `gpt` trains an independent plain causal GPT
(learned absolute positions, pre-LayerNorm, no diffusion, no adaLN) of the task networks' size on the answers
only, to see whether the repo's DiT learns the lookup slower than a textbook transformer (RESULTS.md:
conditional generation).

    python dev/recall_control.py make --out /tmp/recall
    python data/prepare_pairs.py --input /tmp/recall/train.jsonl --test /tmp/recall/test.jsonl --tokenizer chars \
        --seq_len 40 --out data/recall
    python train.py mdlm_addition_cpu --dataset=recall --max_iters=3000 --batch_size=32 --eval_interval=250
    python dev/recall_control.py gpt --data_dir data/recall --steps 2000
"""
import argparse
import json
import os
import random
import sys

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import open_pairs  # noqa: E402

LABELS = "0123456789abcdefghijklmnopqrstuvwxyz"


def make(out, n_train, n_test, n_pairs=8, seed=0):
    rng = random.Random(seed)
    os.makedirs(out, exist_ok=True)
    for split, n in (("train", n_train), ("test", n_test)):
        with open(os.path.join(out, f"{split}.jsonl"), "w") as f:
            for _ in range(n):
                nodes = rng.sample(LABELS, 2 * n_pairs)
                pairs = list(zip(nodes[::2], nodes[1::2]))
                source, target = rng.choice(pairs)
                prompt = ",".join(f"{a}>{b}" for a, b in pairs) + "|" + source
                f.write(json.dumps({"prompt": prompt, "answer": target}) + "\n")


class Block(nn.Module):
    def __init__(self, n, heads):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(n), nn.LayerNorm(n)
        self.qkv, self.out = nn.Linear(n, 3 * n), nn.Linear(n, n)
        self.mlp = nn.Sequential(nn.Linear(n, 4 * n), nn.GELU(), nn.Linear(4 * n, n))

    def forward(self, x):
        B, T, n = x.shape
        q, k, v = (z.transpose(1, 2) for z in self.qkv(self.ln1(x)).view(B, T, 3, self.heads, n // self.heads).unbind(2))
        x = x + self.out(F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, n))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    def __init__(self, vocab, length, n=128, heads=2, blocks=4):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, n), nn.Embedding(length, n)
        self.blocks = nn.ModuleList(Block(n, heads) for _ in range(blocks))
        self.ln, self.head = nn.LayerNorm(n), nn.Linear(n, vocab, bias=False)

    def forward(self, x):
        h = self.tok(x) + self.pos(torch.arange(x.shape[1]))
        for block in self.blocks:
            h = block(h)
        return self.head(self.ln(h))


def gpt(data_dir, steps, lr, batch_size=32, seed=0):
    """Answer-only next-token loss; prints the test loss in bits per row (the answer char + its padding)."""
    torch.manual_seed(seed)
    train, test = open_pairs(data_dir, "train"), open_pairs(data_dir, "test")
    length = train.rows.shape[1]
    model = GPT(int(max(train.rows.max(), test.rows.max())) + 1, length)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.99))

    def loss_of(pairs, ix):
        x = torch.from_numpy(pairs.rows[ix].astype(np.int64))
        answer = torch.arange(length)[None, 1:] >= torch.from_numpy(pairs.prompt_len[ix].astype(np.int64))[:, None]
        ce = F.cross_entropy(model(x[:, :-1]).transpose(1, 2), x[:, 1:], reduction="none")
        return (ce * answer).sum() / answer.sum(), answer.sum(1).float().mean()

    g = torch.Generator().manual_seed(seed)
    for it in range(steps + 1):
        if it % 250 == 0:
            with torch.no_grad():
                loss, per_row = loss_of(test, np.arange(len(test.rows)))
            print(f"iter {it}: test {loss.item() / np.log(2) * per_row.item():.2f} bits per answer row", flush=True)
        loss, _ = loss_of(train, torch.randint(len(train.rows), (batch_size,), generator=g).numpy())
        opt.zero_grad()
        loss.backward()
        opt.step()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("make")
    m.add_argument("--out", required=True)
    m.add_argument("--n_train", type=int, default=50_000)
    m.add_argument("--n_test", type=int, default=500)
    g = sub.add_parser("gpt")
    g.add_argument("--data_dir", required=True)
    g.add_argument("--steps", type=int, default=2000)
    g.add_argument("--lr", type=float, default=1e-3)
    args = p.parse_args()
    if args.cmd == "make":
        make(args.out, args.n_train, args.n_test)
    else:
        gpt(args.data_dir, args.steps, args.lr)


if __name__ == "__main__":
    main()
