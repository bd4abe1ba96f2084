"""
Time of one Duo curriculum training step (forward + backward + AdamW) at duo_text8_cpu's size, eager against
torch.compile (aot_eager, inductor), one thread. The modes are timed in turn, round after round (interleaved).

    python dev/bench_duo_compile.py [--repo DIR] [--batch 16] [--rounds 3] [--steps 5] [--modes eager,aot_eager,inductor]

--repo: the checkout whose duo.py / configs.py to import (e.g. a `git worktree` of an older commit).
Prints one line per (round, mode) and the median ms per step of every mode.
"""
import argparse
import statistics
import sys
import time

p = argparse.ArgumentParser()
p.add_argument("--repo", default=".")
p.add_argument("--batch", type=int, default=16)
p.add_argument("--rounds", type=int, default=3)
p.add_argument("--steps", type=int, default=5)
p.add_argument("--modes", default="eager,aot_eager,inductor")
args = p.parse_args()
sys.path.insert(0, args.repo)

import torch  # noqa: E402

import configs  # noqa: E402

torch.set_num_threads(1)
cls, model_args, training_args = configs.duo_text8_cpu()
modes = args.modes.split(",")
torch.manual_seed(0)
base = cls(**model_args)
runs = {}
for mode in modes:
    model = cls(**model_args)
    model.load_state_dict(base.state_dict())
    model.train()
    model.start_iteration(0)
    assert model.in_curriculum
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.99), weight_decay=0.1)
    fn = model if mode == "eager" else torch.compile(model, backend=mode)
    runs[mode] = (model, fn, opt)

gen = torch.Generator().manual_seed(1)


def step(mode):
    model, fn, opt = runs[mode]
    x = torch.randint(0, model_args["vocab_size"], (args.batch, training_args["seq_len"]), generator=gen)
    loss = fn(x)[1]
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(loss.detach())


for mode in modes:  # compile and warm up
    t0 = time.perf_counter()
    step(mode)
    step(mode)
    print(f"{mode:10s} first two steps (compile): {time.perf_counter() - t0:.1f} s", flush=True)

times = {m: [] for m in modes}
for r in range(args.rounds):
    for mode in modes:
        t0 = time.perf_counter()
        for _ in range(args.steps):
            step(mode)
        ms = (time.perf_counter() - t0) / args.steps * 1000
        times[mode].append(ms)
        print(f"round {r} {mode:10s} {ms:8.1f} ms/step", flush=True)
eager = statistics.median(times["eager"]) if "eager" in times else None
for mode in modes:
    med = statistics.median(times[mode])
    ratio = f"  ({med / eager:.2f}x eager)" if eager else ""
    print(f"median {mode:10s} {med:8.1f} ms/step{ratio}  [{args.repo}]")
