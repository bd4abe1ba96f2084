"""
Few-step distillation: a student learns to take in one step what its teacher takes in two, round after round.

    python distill.py out/mdlm_text8_cpu/ckpt.pt --out_dir out/mdlm_sdtt
    python distill.py out/duo_text8_cpu/ckpt.pt --out_dir out/duo_dcd --start_steps 512 --rounds 5
    python distill.py DUO_CKPT --out_dir DIR --model_arg dcd_gamma_min=-3   # DCD over another gamma range
    torchrun --standalone --nproc_per_node=8 distill.py CKPT --out_dir DIR

The family decides the loss, model.distill_loss(teacher, x0, steps): SDTT for the D3PM and the masked model
(the teacher takes two ancestral steps of 1/steps, the student one of 2/steps, reverse KL on the masked
positions; sampling.sdtt_loss), Duo's consistency distillation (DCD) for the uniform-state model (duo.py). Round
r = 0, 1, ... starts with the teacher a copy of the student's raw weights and teaches at steps = start_steps / 2^r:
after R rounds the student is meant to sample in start_steps / 2^R steps (`sample.py --steps`). The student
starts from the checkpoint's EMA weights (--no_ema: raw) and keeps an EMA of its own, which is what ckpt.pt's
"ema" holds. Defaults are the papers': AdamW at lr 6e-5, EMA 0.999, gradient clip 1, and SDTT's 1024 -> 8
steps in 7 rounds or DCD's 512 -> 16 in 5, with 10k iterations per round (on a GPU; a CPU wants fewer).

Writes DIR/ckpt.pt, a checkpoint of the teacher's class (sample.py, evaluate.py and bench.py take it as is) that
also holds the teacher, optimizer and RNG states, after every --ckpt_interval iterations and at the end of each
round; DIR/log.jsonl gets one line per --log_interval iterations. Run again with the same DIR to resume.
Under torchrun every rank draws its own batches and the gradients are averaged (gloo on CPU, NCCL on CUDA).
"""
import argparse
import copy
import inspect
import json
import os
import sys
import time

import numpy as np
import torch
from tqdm import tqdm

from common import (EMA, UserError, all_reduce, atomic_save, comm_buffer, ddp_shutdown, default_dataset, open_model,
                    open_split, random_windows, rng_states, set_rng_states, start_processes)
from configs import parse_value
from families import read_checkpoint

def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ckpt", help="the teacher: checkpoint file, run directory or Hugging Face repo id")
    p.add_argument("--out_dir", required=True, help="where ckpt.pt and log.jsonl go (and are resumed from)")
    p.add_argument("--rounds", type=int, default=None, help="rounds (default: the method's, SDTT 7, DCD 5)")
    p.add_argument("--start_steps", type=int, default=None, help="the teacher's steps in the first round, halved "
                   "every round (default: SDTT 1024, DCD 512)")
    p.add_argument("--iters_per_round", type=int, default=10_000)
    p.add_argument("--batch_size", type=int, default=32, help="sequences per step per rank")
    p.add_argument("--seq_len", type=int, default=0, help="default: the teacher's training length")
    p.add_argument("--lr", type=float, default=6e-5)
    p.add_argument("--ema", type=float, default=0.999, help="EMA decay of the student's weights")
    p.add_argument("--grad_clip", type=float, default=1.0)
    p.add_argument("--no_ema", dest="teacher_ema", action="store_false", help="start from the raw weights")
    p.add_argument("--data_dir", default=None, help="default: data/<the teacher's dataset>")
    p.add_argument("--log_interval", type=int, default=50)
    p.add_argument("--ckpt_interval", type=int, default=500)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--device", default="auto")
    p.add_argument("--model_arg", action="append", default=[], metavar="KEY=VALUE", help="change one of the model's "
                   "constructor arguments for the distillation (repeatable; stored in the checkpoint), e.g. Duo's DCD "
                   "time grid: --model_arg dcd_gamma_min=-3 (none: that option's alternative)")
    args = p.parse_args(argv)
    for key in ("rounds", "start_steps", "iters_per_round", "batch_size", "log_interval", "ckpt_interval"):
        if getattr(args, key) is not None and getattr(args, key) < 1:
            raise UserError(f"--{key} must be at least 1")
    if not args.lr > 0 or not 0 <= args.ema < 1:
        raise UserError("--lr > 0 and 0 <= --ema < 1 are required")
    return args


def say(*a):
    if int(os.environ.get("RANK", 0)) == 0:
        print(*a, flush=True)


def with_model_args(model, texts):
    """The model rebuilt with some constructor arguments changed ({key: text}: each read as the type of its current
    value or signature default, "none" as None), the same weights; checkpoint_meta's model_args updated."""
    meta = model.checkpoint_meta
    defaults = {k: p.default for k, p in inspect.signature(type(model)).parameters.items() if p.default is not p.empty}
    current = {**defaults, **meta["model_args"]}
    changed = {}
    for key, text in texts.items():
        if key not in current:
            raise UserError(f"--model_arg {key}: {type(model).__name__} has no such argument; it has {', '.join(current)}")
        like = next((v for v in (current[key], defaults.get(key)) if v is not None), 0.0)  # the type to read
        changed[key] = None if text.lower() == "none" else parse_value(f"model_arg {key}", text, like)
    rebuilt = type(model)(**{**meta["model_args"], **changed})
    rebuilt.load_state_dict(model.state_dict())
    rebuilt.checkpoint_meta = {**meta, "model_args": {**meta["model_args"], **changed}}
    return rebuilt.to(next(model.parameters()).device).eval()


def open_teacher(args, dev):
    """The model to distil (with --model_arg changes), its method name (SDTT / DCD) and the rounds' plan
    [(round, teacher steps)]."""
    model = open_model(args.ckpt, args.teacher_ema, dev)
    texts = {}
    for item in args.model_arg:
        key, eq, text = item.partition("=")
        if not eq:
            raise UserError(f"--model_arg {item}: expected KEY=VALUE")
        texts[key] = text
    if texts:
        model = with_model_args(model, texts)
    if getattr(model, "distill_loss", None) is None:
        raise UserError(f"{args.ckpt}: {type(model).__name__} has no few-step distillation (the D3PM, MDLM and Duo do)")
    method, start_steps, rounds = model.distill_defaults  # the family's method and its paper's plan
    start_steps, rounds = args.start_steps or start_steps, args.rounds or rounds
    if start_steps % 2 ** rounds:
        raise UserError(f"--start_steps {start_steps} must be divisible by 2^rounds = {2 ** rounds} (each round halves it)")
    return model, method, [(r, start_steps // 2 ** r) for r in range(rounds)]


def resume_state(path, meta, method, plan, args):
    """The checkpoint distill.py wrote to path for this run (the same teacher, method and iterations per round, its
    rounds a beginning of this plan's), or None if there is none; anything else there is a UserError."""
    if not os.path.exists(path):
        return None
    try:
        ckpt = read_checkpoint(path)
    except ValueError as e:
        raise UserError(str(e))
    if "distill" not in ckpt:
        raise UserError(f"{path} exists and was not written by distill.py: choose another --out_dir")
    mine = dict(model_cls=meta["model_cls"], model_args=meta["model_args"], method=method, plan=[list(p) for p in plan],
                iters_per_round=args.iters_per_round)
    theirs = dict(model_cls=ckpt["model_cls"], model_args=ckpt["model_args"], method=ckpt["distill"]["method"],
                  plan=[list(p) for p in ckpt["distill"]["plan"]], iters_per_round=ckpt["distill"]["iters_per_round"])
    continues = mine["plan"][:len(theirs["plan"])] == theirs["plan"]  # more rounds continue a run
    different = [k for k in mine if k != "plan" and mine[k] != theirs[k]] + ([] if continues else ["plan"])
    if different:
        raise UserError(f"{path} is another distillation run (its {', '.join(different)} differ): resume it with its "
                        f"own settings or choose another --out_dir")
    return ckpt


def main(argv=None):
    args = parse_args(argv)
    ddp, rank, world, dev = start_processes(args.device)
    student, method, plan = open_teacher(args, dev)
    meta = student.checkpoint_meta
    trained = meta.get("training_args", {})
    dataset = trained.get("dataset") or default_dataset(student.vocab_size)
    data = open_split(args.data_dir or os.path.join("data", dataset), "train")
    seq_len = args.seq_len or trained.get("seq_len") or 256
    total = len(plan) * args.iters_per_round

    student.train()
    teacher = copy.deepcopy(student).eval().requires_grad_(False)
    ema = EMA(student, args.ema, 0)
    optimizer = torch.optim.AdamW(student.parameters(), lr=args.lr, weight_decay=0.0)
    rng = np.random.default_rng([args.seed, rank])
    torch.manual_seed(args.seed * 1000 + rank)
    it = 0
    ckpt_path = os.path.join(args.out_dir, "ckpt.pt")
    state = resume_state(ckpt_path, meta, method, plan, args)
    if state is not None:
        student.load_state_dict(state["model"])
        teacher.load_state_dict(state["teacher"])
        ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        it = state["iter_num"]
        rngs = state["rng"]
        if len(rngs) == world:  # one process: the very streams it had (bit-identical), CUDA's too (as train.py)
            set_rng_states(rngs[rank], dev)
            rng.bit_generator.state = rngs[rank]["numpy"]
        else:  # torchrun: fresh streams, not a replay of the first iterations'
            rng = np.random.default_rng([args.seed, rank, it])
            torch.manual_seed(args.seed * 1000 + rank + 7919 * it)
        say(f"resuming {ckpt_path} at iteration {it} of {total}")
    if rank == 0:
        os.makedirs(args.out_dir, exist_ok=True)
    grads = comm_buffer(torch.zeros(sum(p.numel() for p in student.parameters()), device=dev)) if ddp else None
    settings = {k: v for k, v in vars(args).items() if k not in ("ckpt", "out_dir", "device")}
    say(f"distilling {type(student).__name__} by {method}: rounds (teacher steps) "
        f"{[s for _, s in plan]}, {args.iters_per_round} iterations each, world size {world}")

    def save():
        if rank != 0:
            return
        rngs = [{**rng_states(dev), "numpy": rng.bit_generator.state}]  # kept with one process only
        atomic_save({"model": student.state_dict(), "ema": ema.state_dict(), "teacher": teacher.state_dict(),
                     "optimizer": optimizer.state_dict(), "model_cls": meta["model_cls"],
                     "model_args": meta["model_args"], "training_args": trained, "iter_num": it,
                     "rng": rngs if world == 1 else [], "distill": dict(settings, method=method, teacher=args.ckpt,
                     plan=plan, round=min(it // args.iters_per_round, len(plan) - 1))}, ckpt_path)

    log = open(os.path.join(args.out_dir, "log.jsonl"), "a") if rank == 0 else None
    bar = tqdm(total=total, initial=it, disable=rank != 0, desc="distill", dynamic_ncols=True)
    t0, first_logged = time.time(), it
    loss_sum = torch.zeros((), dtype=torch.float64, device=dev)  # summed on the device: one host sync per log line
    finite = torch.ones((), dtype=torch.bool, device=dev)

    def check():
        """The one host sync: raise if any step since the last check had a non-finite loss or gradient."""
        if not finite.item():
            raise UserError(f"non-finite loss or gradient between iterations {first_logged + 1} and {it}; lower --lr")

    while it < total:
        r, steps = plan[it // args.iters_per_round]
        if it % args.iters_per_round == 0:  # a new round (also when resumed here): the teacher is the student now
            teacher.load_state_dict(student.state_dict())
        x0 = random_windows(data, args.batch_size, seq_len, student.vocab_size, rng, dev)
        loss = student.distill_loss(teacher, x0, steps)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if ddp:
            params = [p for p in student.parameters() if p.grad is not None]
            torch.cat([p.grad.flatten() for p in params], out=grads[:sum(p.numel() for p in params)])
            all_reduce(grads)
            for p, g in zip(params, grads.split([p.numel() for p in params])):
                p.grad.copy_(g.view_as(p) / world)
        norm = torch.nn.utils.clip_grad_norm_(student.parameters(), args.grad_clip)
        finite &= torch.isfinite(loss.detach()) & torch.isfinite(norm)
        loss_sum += loss.detach()
        optimizer.step()
        ema.update()
        it += 1
        bar.update(1)
        if it % args.log_interval == 0 or it == total:
            check()
            record = {"iter": it, "round": r, "teacher_steps": steps, "student_steps": steps // 2,
                      "loss": loss_sum.item() / (it - first_logged), "seconds": time.time() - t0}
            bar.set_postfix_str(f"round {r} ({steps} -> {steps // 2} steps) loss {record['loss']:.4f}")
            if log:
                log.write(json.dumps(record) + "\n")
                log.flush()
            loss_sum.zero_()
            first_logged = it
        if it % args.ckpt_interval == 0 or it % args.iters_per_round == 0:
            check()
            save()
    bar.close()
    say(f"done: a {plan[-1][1] // 2}-step student in {ckpt_path}: python sample.py {ckpt_path} --steps {plan[-1][1] // 2}")
    if ddp:
        ddp_shutdown()


if __name__ == "__main__":
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
