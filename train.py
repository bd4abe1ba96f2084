r"""
Train an absorbing D3PM. One process (CPU or one GPU):

    python train.py d3pm_text8_cpu
    python train.py d3pm_text8 --batch_size=64 --gradient_accumulation_steps=16

Many GPUs, one node or several, with DistributedDataParallel (gloo on CPU, NCCL on CUDA):

    torchrun --standalone --nproc_per_node=4 train.py d3pm_text8_4gpu
    torchrun --nnodes=2 --node_rank=0 --nproc_per_node=8 --master_addr=IP --master_port=29500 \
        train.py d3pm_openwebtext_8gpu --out_dir=/shared/runs/owt

The globals below are the defaults; the config function named first overrides them, then any
--key=value on the command line (type-checked against the default, configs.parse_overrides; --no_compile is
--compile=False). --resume=DIR continues a run.
"""
import contextlib
import json
import math
import os
import signal
import sys
import time

import numpy as np
import torch

import configs
from common import (EMA, Pairs, UserError, all_gather, all_reduce, atomic_save, check_length, clean_positions,
                    comm_buffer, dataset_vocab_size, ddp_shutdown, is_pair_dataset, newest_checkpoint, open_pairs,
                    open_model, open_split, rng_states, set_rng_states, start_processes)
from families import FAMILIES
from sampling import null_prompt_input

# ---- defaults: every one can be set by a config function or by --key=value -------------------
# I/O
out_dir = ""  # default: out/<config name> (or the --resume directory)
log_interval = 10  # iterations between train log lines
eval_interval = 1000  # iterations between val evaluations (and best-checkpoint saves)
eval_iters = 100  # val batches per evaluation, shared across ranks
eval_key = "bound"  # val metric that picks the best checkpoint: bound (the model's own, nats/token) or loss
always_save_checkpoint = False  # write ckpt.pt after every evaluation, not only on improvement
ckpt_interval = 1000  # iterations between last.pt writes (the resume point after a crash)
resume = ""  # a run directory to continue (its newest checkpoint)
init_from = ""  # a new run starting from this checkpoint's weights (EMA if it has them), class and model_args: fine-tuning
# data
dataset = "text8"
data_root_dir = "data"  # datasets live in data_root_dir/dataset
gradient_accumulation_steps = 1  # micro-steps per optimizer step (per rank)
batch_size = 256  # sequences per micro-step per rank
seq_len = 256
cond_drop = 0.0  # pair datasets: each training row's prompt dropped w.p. cond_drop (classifier-free guidance)
# AdamW and the learning-rate schedule (linear warmup, cosine decay to min_lr)
learning_rate = 1e-3
max_iters = 500_000
weight_decay = 0.1  # applied to >= 2-D parameters only
beta1 = 0.9
beta2 = 0.98
grad_clip = 0.1  # the largest gradient norm (0: no clipping); each family's configs set their own
decay_lr = True
warmup_iters = 2500
lr_decay_iters = 0  # 0: decay over max_iters
min_lr = 1e-5
# EMA of the weights (used by sampling and evaluation)
ema_beta = 0.9999
ema_update_after_step = 100
# system
backend = ""  # DDP backend; "" picks nccl on CUDA, gloo on CPU
device = "auto"  # auto, cpu, cuda, cuda:N
compile = True  # torch.compile (CUDA only)
training_seed = 1
# faults
max_bad_steps = 20  # stop after this many consecutive steps with a non-finite loss or gradient
# ------------------------------------------------------------------------------------------------
CONFIG_KEYS = [k for k, v in list(globals().items())
               if not k.startswith("_") and isinstance(v, (int, float, bool, str))]
CONFIG_NAMES = configs.NAMES


# ---- command line -------------------------------------------------------------------------------
def print_help():
    """The usage, the configs, and every option with its default."""
    print(__doc__)
    print("configs: " + ", ".join(CONFIG_NAMES))
    print("options (--key=value; the defaults are shown):")
    for k in CONFIG_KEYS:
        print(f"  --{k}={globals()[k]!r}")
    print("  --no_compile   same as --compile=False\n  --debug        show tracebacks")
    print("  --KEY=VALUE for any key of the config's model_args (e.g. --time_conditioning=True) sets it too")


def parse_args(argv):
    """[CONFIG] [--key=value ...] [--no_compile] [--debug] -> (config name or None, {key: text}); --help prints the
    options and exits. (--no-compile, nanoDD's spelling, works too.)"""
    if "-h" in argv or "--help" in argv:
        print_help()
        sys.exit(0)
    argv = ["--compile=False" if arg in ("--no_compile", "--no-compile") else arg for arg in argv if arg != "--debug"]
    return configs.split_command_line(argv)


def load_config(config_name, texts):
    """Apply the config function, then the overrides ({key: text}, type-checked by configs.parse_overrides), to the
    globals; an override of a key of the config's model_args changes the model instead. Returns (model_cls,
    model_args, changed, typed overrides)."""
    model_cls, model_args, training_args = getattr(configs, config_name or "d3pm_text8")()
    for key in training_args:
        if key not in CONFIG_KEYS:
            raise UserError(f"config {config_name} sets unknown key {key!r}")
    defaults = {k: globals()[k] for k in CONFIG_KEYS}
    model_defaults = {k: v for k, v in model_args.items() if k not in defaults}
    typed = configs.parse_overrides(texts, {**defaults, **model_defaults})
    overrides = {k: v for k, v in typed.items() if k in defaults}
    model_overrides = {k: v for k, v in typed.items() if k in model_defaults}
    changed = {**training_args, **overrides}
    globals().update(changed)
    return model_cls, {**model_args, **model_overrides}, changed, overrides


# ---- data ---------------------------------------------------------------------------------------
def ensure_dataset(data_dir, is_master, ddp):
    """Prepare text8 automatically if it is missing; for other datasets say how to prepare them."""
    ready = os.path.exists(os.path.join(data_dir, "meta.pkl")) or all(  # nanoGPT-prepared .bin have no meta
        os.path.exists(os.path.join(data_dir, f"{split}.bin")) for split in ("train", "val"))
    if not ready and dataset == "text8":
        if is_master:
            print(f"text8 not found in {data_dir}: preparing it (download, split, encode)...")
            from data.prepare_text8 import PrepareError, prepare
            try:
                prepare(None, data_dir)
            except PrepareError as e:
                raise UserError(f"{e} to: python data/prepare_text8.py --out {data_dir}")
        if ddp:
            torch.distributed.barrier()
    elif not ready:
        raise UserError(f"dataset {dataset!r} not found in {data_dir}; prepare it first: "
                        f"python data/prepare_{dataset}.py")


def open_data(ddp, changed, overrides):
    """The train and val splits of data_root_dir/dataset (text8 is prepared if missing), and its vocabulary size.
    A pair dataset (data/prepare_pairs.py) gives common.Pairs, validated on its val split or else its test split,
    and sets seq_len to its row length (another --seq_len is a UserError)."""
    data_dir = os.path.join(data_root_dir, dataset)
    ensure_dataset(data_dir, is_master(), ddp)
    if is_pair_dataset(data_dir):
        val_name = "val" if os.path.exists(os.path.join(data_dir, "val.npy")) else "test"
        train_data, val_data = open_pairs(data_dir, "train"), open_pairs(data_dir, val_name)
        row = train_data.rows.shape[1]
        if "seq_len" in overrides and overrides["seq_len"] != row:
            raise UserError(f"--seq_len={seq_len}, but the pair dataset {data_dir} has rows of {row} tokens")
        globals()["seq_len"] = changed["seq_len"] = row
        say(f"pair dataset {data_dir}: rows of {row} tokens, prompts held clean; validating on its {val_name} split")
        return train_data, val_data, dataset_vocab_size(data_dir)
    train_data, val_data = open_split(data_dir, "train"), open_split(data_dir, "val")
    for name, split in (("train", train_data), ("val", val_data)):
        if len(split) < seq_len:
            raise UserError(f"the {name} split of {data_dir} has {len(split)} tokens, fewer than seq_len={seq_len}")
    return train_data, val_data, dataset_vocab_size(data_dir)


def get_batch(data, generator, vocab_size, dev):
    """(x, extra): batch_size random windows of seq_len tokens of a text split, or random rows of a pair split
    (common.Pairs), as a (B, L) long tensor on dev; extra holds the forward's keyword arguments: {} for text,
    {"clean": the prompt positions} for pairs (families.py)."""
    if isinstance(data, Pairs):
        ix = torch.randint(len(data.rows), (batch_size,), generator=generator).numpy()
        x = data.rows[ix].astype(np.int64)
        prompt_len = torch.from_numpy(data.prompt_len[ix].astype(np.int64))
    else:
        ix = torch.randint(len(data) - seq_len + 1, (batch_size,), generator=generator).numpy()
        x = np.stack([data[i:i + seq_len] for i in ix]).astype(np.int64)
    if x.max() >= vocab_size:
        raise UserError(f"token id {x.max()} in dataset {dataset} is outside the model's vocabulary "
                        f"(vocab_size={vocab_size}); the data and the model do not match")
    x = torch.from_numpy(x)
    if dev.type == "cuda":
        x = x.pin_memory().to(dev, non_blocking=True)
    return x, ({"clean": clean_positions(prompt_len, x.shape[1]).to(dev)} if isinstance(data, Pairs) else {})


def drop_prompts(model, extra, generator):
    """Context manager for a training step on a batch with extra = get_batch's: each row's prompt is dropped w.p.
    cond_drop (drawn from generator, the batch generator: reproducible and resumable), i.e. the network reads the
    family's no-prompt input there (sampling.null_prompt_input; its random tokens, if any, from the global RNG);
    the clean mask is unchanged (never noised, never scored). Nothing for text or cond_drop = 0."""
    if not cond_drop or "clean" not in extra:
        return contextlib.nullcontext()
    clean = extra["clean"]
    dropped = torch.rand(clean.shape[0], generator=generator) < cond_drop
    return null_prompt_input(model, clean & dropped[:, None].to(clean.device))


# ---- optimisation -------------------------------------------------------------------------------
def get_lr(it):
    """Linear warmup to learning_rate over warmup_iters, then cosine decay to min_lr."""
    if not decay_lr:
        return learning_rate
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    decay_iters = lr_decay_iters or max_iters
    if it >= decay_iters:
        return min_lr
    ratio = (it - warmup_iters) / max(1, decay_iters - warmup_iters)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (learning_rate - min_lr)


def make_optimizer(model, dev):
    """AdamW with weight decay on >= 2-D parameters (matrices, embeddings) only; fused on CUDA."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [dict(params=[p for p in params if p.dim() >= 2], weight_decay=weight_decay),
              dict(params=[p for p in params if p.dim() < 2], weight_decay=0.0)]
    return torch.optim.AdamW(groups, lr=learning_rate, betas=(beta1, beta2), fused=dev.type == "cuda")


RNG_KEYS = ("torch", "data", "cuda")


def rng_state(data_gen, dev):
    """common.rng_states (torch, cuda) and the batch generator's state (data)."""
    return {**rng_states(dev), "data": data_gen.get_state()}


def gather_rng_states(data_gen, dev, bufs):
    """Every rank's rng_state(), one per rank: under DDP (bufs: comm_buffers()) gathered as one uint8 tensor per
    rank through the comm buffers rather than as pickled objects (see common.py: teardown)."""
    state = rng_state(data_gen, dev)
    if not bufs:
        return [state]
    sizes = [state[k].numel() for k in RNG_KEYS]
    bufs["rng_send"].copy_(torch.cat([state[k] for k in RNG_KEYS]))
    return [dict(zip(RNG_KEYS, (t.clone() for t in r.cpu().split(sizes))))
            for r in all_gather(bufs["rng_recv"], bufs["rng_send"])]


def set_rng_state(state, data_gen, dev):
    set_rng_states(state, dev)
    data_gen.set_state(state["data"])


# ---- a run: resume, processes, evaluation, checkpoints, signals ------------------------------------------
def is_master():
    """Whether this is rank 0 (or the only process): the one that prints and writes files."""
    return int(os.environ.get("RANK", 0)) == 0


def say(*args):
    """print, on rank 0 only."""
    if is_master():
        print(*args)


def resume_point(changed, overrides):
    """The (path, checkpoint) to continue from: the newest in --resume, or in out_dir when torchrun restarted the
    workers after a failure (TORCHELASTIC_RESTART_COUNT > 0); None for a new run. The run's own settings apply
    again (to the globals and `changed`), except those given on the command line."""
    start = None
    if not resume and int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0)) > 0:
        start = newest_checkpoint(out_dir)
    elif resume:
        start = newest_checkpoint(resume)
        if start is None:
            raise UserError(f"--resume={resume}: no readable last.pt or ckpt.pt there")
    if start is not None:
        for key, value in start[1].get("training_args", {}).items():
            if key in CONFIG_KEYS and key not in overrides and key not in ("resume", "out_dir"):
                globals()[key] = changed[key] = value
    return start


def check_settings(changed):
    """eval_key is bound or loss (l_T, the bound's name in runs of earlier versions, becomes bound); counts and
    sizes are at least 1. Anything else is a UserError."""
    if eval_key == "l_T":
        globals()["eval_key"] = changed["eval_key"] = "bound"
    if eval_key not in ("bound", "loss"):
        raise UserError(f"--eval_key={eval_key}: expected bound or loss")
    if not 0 <= cond_drop < 1:
        raise UserError(f"--cond_drop={cond_drop}: a probability in [0, 1) is required")
    for key in ("log_interval", "eval_interval", "eval_iters", "ckpt_interval", "batch_size", "seq_len",
                "gradient_accumulation_steps", "max_bad_steps"):
        if globals()[key] < 1:
            raise UserError(f"--{key}={globals()[key]}: must be at least 1")


def model_spec(start, model_cls, model_args, data_vocab):
    """(model class, model_args, weights or None): a resumed run's own (its vocabulary must be the dataset's), or
    --init_from's class, arguments and weights (fine-tuning, e.g. a text model on pairs: the same vocabulary), else
    the config's with the dataset's vocab_size."""
    if start is None and init_from:
        try:
            source = open_model(init_from, True, torch.device("cpu"))
        except UserError as e:
            if "no EMA weights" not in str(e):
                raise
            source = open_model(init_from, False, torch.device("cpu"))
        if data_vocab != source.vocab_size:
            raise UserError(f"--init_from={init_from} has vocab_size {source.vocab_size} but dataset {dataset} has "
                            f"{data_vocab}: fine-tune on data of its tokenizer")
        say(f"starting from the weights of {init_from} ({type(source).__name__})")
        return type(source), source.checkpoint_meta["model_args"], source.state_dict()
    if start is not None:
        model_cls, model_args = FAMILIES[start[1]["model_cls"]], start[1]["model_args"]
        if data_vocab != model_args["vocab_size"]:
            raise UserError(f"dataset {dataset} has vocab_size {data_vocab} but the checkpoint {start[0]} has "
                            f"{model_args['vocab_size']}: resume on the dataset it was trained on")
    elif data_vocab != model_args["vocab_size"]:
        say(f"note: the model's vocab_size is the dataset's, {data_vocab} (config had {model_args['vocab_size']})")
        model_args = {**model_args, "vocab_size": data_vocab}
    return model_cls, model_args, None


def restore(start, model, ema, optimizer, data_gen, dev, rank, world_size):
    """Load a checkpoint's weights, EMA, optimizer and this rank's RNG states (fresh seeds if another world size
    wrote it); returns (iter_num, best_val)."""
    path, ckpt = start
    model.load_state_dict(ckpt["model"])
    ema.load_state_dict(ckpt["ema"])
    optimizer.load_state_dict(ckpt["optimizer"])
    iter_num, best_val = ckpt["iter_num"], ckpt["best_val_loss"]
    rngs = ckpt.get("rng", [])
    if len(rngs) == world_size:
        set_rng_state(rngs[rank], data_gen, dev)
    else:
        say("note: the checkpoint's RNG states are for another world size; using fresh seeds")
        torch.manual_seed(training_seed + rank + 7919 * iter_num)
        data_gen.manual_seed(10_000 * training_seed + rank + 7919 * iter_num)
    say(f"resuming from {path} at iteration {iter_num}")
    return iter_num, best_val


def comm_buffers(data_gen, dev, world_size):
    """The tensors the collectives of a DDP run go through, allocated once (see common.py: teardown): the step's
    status, estimate_loss's sums, and the send and receive buffers of gather_rng_states."""
    bufs = dict(status=comm_buffer(torch.zeros(2, device=dev)),
                sums=comm_buffer(torch.zeros(3, dtype=torch.float64, device=dev)),
                rng_send=comm_buffer(torch.cat(list(rng_state(data_gen, dev).values())).to(dev)))
    bufs["rng_recv"] = [comm_buffer(torch.zeros_like(bufs["rng_send"])) for _ in range(world_size)]
    return bufs


def open_log():
    """On rank 0: out_dir, cleared of half-written checkpoints, and its log.jsonl opened for appending; None on the
    other ranks."""
    if not is_master():
        return None
    try:
        os.makedirs(out_dir, exist_ok=True)
        for name in os.listdir(out_dir):  # half-written checkpoints of a killed run
            if name.startswith(("ckpt.pt.tmp", "last.pt.tmp")):
                os.remove(os.path.join(out_dir, name))
        return open(os.path.join(out_dir, "log.jsonl"), "a")
    except OSError as e:
        raise UserError(f"cannot write to out_dir {out_dir}: {e.strerror}")


def log(log_file, record):
    """Append record to log.jsonl as strict JSON (NaN and inf become null); nothing without a log_file (ranks > 0)."""
    if log_file is not None:
        record = {k: v if not isinstance(v, float) or math.isfinite(v) else None for k, v in record.items()}
        log_file.write(json.dumps(record) + "\n")
        log_file.flush()


@torch.no_grad()
def estimate_loss(net, val_data, vocab_size, dev, rank, world_size, bufs):
    """Mean val loss and bound of net (the EMA weights) over eval_iters batches shared by all ranks (summed through
    bufs under DDP). Uses its own seeded RNG so that training randomness is untouched."""
    my_iters = len(range(rank, eval_iters, world_size))
    sums = bufs["sums"].zero_() if bufs else torch.zeros(3, dtype=torch.float64, device=dev)
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
        torch.manual_seed(12345 + rank)
        gen = torch.Generator().manual_seed(54321 + rank)
        for _ in range(my_iters):
            x, extra = get_batch(val_data, gen, vocab_size, dev)
            _, loss, metrics = net(x, **extra)
            sums += torch.stack([loss.double(), metrics["bound"].double(), torch.ones((), device=dev)])
    if bufs:
        all_reduce(sums)
    loss, bound = (sums[:2] / sums[2]).tolist()
    return {"loss": loss, "bound": bound, "bpt": bound / math.log(2)}


def save_checkpoint(name, model, ema, optimizer, iter_num, best_val, meta, rngs):
    """Rank 0 writes out_dir/name atomically: weights, EMA, optimizer, meta (model class and arguments, settings),
    progress and every rank's RNG states (rngs: gather_rng_states, called on every rank); nothing if the weights
    are non-finite."""
    if not all(torch.isfinite(p).all() for p in model.parameters()):
        say(f"not writing {name}: the model has non-finite weights")
        return
    if is_master():
        atomic_save({"model": model.state_dict(), "ema": ema.state_dict(), "optimizer": optimizer.state_dict(), **meta,
                     "iter_num": iter_num, "best_val_loss": best_val, "rng": rngs}, os.path.join(out_dir, name))


@contextlib.contextmanager
def stop_on_signal(rank):
    """Within: SIGTERM and SIGINT (pre-emption, Ctrl-C) are noted in the yielded list, so that training finishes the
    step, writes last.pt and exits cleanly; a second Ctrl-C stops at once. The previous handlers come back after."""
    received = []

    def on_signal(signum, frame):
        received.append(signum)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        print(f"rank {rank}: got signal {signum}; stopping after this step", file=sys.stderr, flush=True)

    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    for sig in previous:
        signal.signal(sig, on_signal)
        signal.siginterrupt(sig, False)  # restart interrupted system calls (gloo/NCCL sockets) instead of failing
    try:
        yield received
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def loss_hook(iter_num, loss):
    """The loss of a micro-step of iteration iter_num (counted from 1) before backward: unchanged. The fault tests
    replace it (a NaN loss: tests/test_faults.py; a worker that dies: tests/recorder.py)."""
    return loss


# ---- main ---------------------------------------------------------------------------------------
def main(argv):
    global out_dir
    config_name, texts = parse_args(argv)
    model_cls, model_args, changed, overrides = load_config(config_name, texts)
    if not out_dir:
        out_dir = resume or os.path.join("out", config_name or "d3pm_text8")
    start = resume_point(changed, overrides)
    check_settings(changed)

    # devices and processes
    ddp, rank, world_size, dev = start_processes(device, backend)
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    # data; model, EMA, optimizer, possibly from a checkpoint
    train_data, val_data, data_vocab = open_data(ddp, changed, overrides)
    if cond_drop and not isinstance(train_data, Pairs):
        raise UserError(f"--cond_drop drops prompts of a pair dataset (data/prepare_pairs.py); {dataset} is text")
    model_cls, model_args, weights = model_spec(start, model_cls, model_args, data_vocab)
    torch.manual_seed(training_seed + rank)
    data_gen = torch.Generator().manual_seed(10_000 * training_seed + rank)
    model = model_cls(**model_args)
    if weights is not None:
        model.load_state_dict(weights)
    model = model.to(dev)
    check_length(model, seq_len)
    ema = EMA(model, ema_beta, ema_update_after_step)
    ema_model = model_cls(**model_args).to(dev).eval()
    optimizer = make_optimizer(model, dev)
    iter_num, best_val = 0, float("inf")
    if start is not None:
        iter_num, best_val = restore(start, model, ema, optimizer, data_gen, dev, rank, world_size)
    del start
    n_params = sum(p.numel() for p in model.parameters())
    tokens_per_iter = gradient_accumulation_steps * world_size * batch_size * seq_len
    say(f"{model_cls.__name__} {model_args}: {n_params / 1e6:.2f}M parameters, device {dev}, "
        f"world size {world_size}, {tokens_per_iter:,} tokens per iteration")
    meta = dict(model_cls=model_cls.__name__, model_args=model_args, training_args=changed,
                total_batch_size=gradient_accumulation_steps * world_size * batch_size)

    train_model, bufs = model, None
    if ddp:
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[dev.index] if dev.type == "cuda" else None)
        bufs = comm_buffers(data_gen, dev, world_size)
    if compile and dev.type == "cuda":
        say("compiling the model...")
        train_model = torch.compile(train_model)
    log_file = open_log()

    # training loop: iter_num counts completed optimizer steps
    with stop_on_signal(rank) as signals:
        model.train()
        bad_in_a_row, bad_total = 0, 0
        t_last, tokens_since, steps_since = time.time(), 0, 0
        clipped = torch.zeros((), device=dev)  # steps since the last log line whose gradient norm was above grad_clip
        while iter_num < max_iters:
            lr = get_lr(iter_num)
            if hasattr(model, "start_iteration"):  # an objective that changes during training (duo.py's curriculum)
                model.start_iteration(iter_num)
            for group in optimizer.param_groups:
                group["lr"] = lr
            for micro_step in range(gradient_accumulation_steps):
                last_micro = micro_step == gradient_accumulation_steps - 1
                sync = train_model.no_sync() if ddp and not last_micro else contextlib.nullcontext()
                with sync:
                    x, extra = get_batch(train_data, data_gen, model_args["vocab_size"], dev)
                    with drop_prompts(model, extra, data_gen):
                        loss, metrics = train_model(x, **extra)[1:]  # drop the logits now: backward does not need them
                    loss = loss_hook(iter_num + 1, loss)
                    (loss / gradient_accumulation_steps).backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip if grad_clip > 0 else float("inf"))
            clipped += grad_norm > grad_clip if grad_clip > 0 else 0  # grad_norm is the norm before clipping
            iter_num += 1
            tokens_since, steps_since = tokens_since + tokens_per_iter, steps_since + 1
            # one host sync per step: is the gradient finite, and was any rank asked to stop? (The gradient
            # is all-reduced already, so every rank takes the same decisions.) No tensor is built from host data.
            if ddp:
                bufs["status"][0].copy_(torch.isfinite(grad_norm).logical_not())
                bufs["status"][1].fill_(len(signals))
                bad, stop = all_reduce(bufs["status"], "max").tolist()
            else:
                bad, stop = not torch.isfinite(grad_norm).item(), bool(signals)
            if not bad:
                optimizer.step()
                ema.update()
                bad_in_a_row = 0
            else:
                bad_in_a_row, bad_total = bad_in_a_row + 1, bad_total + 1
                say(f"iter {iter_num}: non-finite loss or gradient, update skipped ({bad_total} so far)")
                log(log_file, {"iter": iter_num, "split": "train", "skipped": True, "bad_steps": bad_total})
                if bad_in_a_row >= max_bad_steps:  # the weights are still the last good ones: updates were skipped
                    save_checkpoint("last.pt", model, ema, optimizer, iter_num, best_val, meta,
                                    gather_rng_states(data_gen, dev, bufs))
                    raise UserError(f"{bad_in_a_row} consecutive non-finite steps at iteration {iter_num}; stopping "
                                    f"(last.pt holds the last good state; lower learning_rate or check the data)")
            optimizer.zero_grad(set_to_none=True)

            if iter_num % log_interval == 0 or iter_num == max_iters:
                dt = time.time() - t_last
                record = {"iter": iter_num, "split": "train", "loss": loss.item(), "lr": lr,
                          "grad_norm": grad_norm.item(), "clipped": clipped.item() / steps_since,
                          **{k: v.item() for k, v in metrics.items()},
                          "tokens_per_s": tokens_since / dt, "ms_per_iter": 1000 * dt * tokens_per_iter / tokens_since}
                say(f"iter {iter_num}: loss {record['loss']:.4f}, bpt {record['bpt']:.3f}, lr {lr:.2e}, "
                    f"grad norm {record['grad_norm']:.3g} (clipped {record['clipped']:.0%}), "
                    f"{record['ms_per_iter']:.0f} ms/iter, {record['tokens_per_s']:,.0f} tok/s")
                log(log_file, record)
                t_last, tokens_since, steps_since = time.time(), 0, 0
                clipped.zero_()

            t_pause = time.time()  # evaluation and checkpoint time does not count towards tokens/s
            if iter_num % eval_interval == 0 or iter_num == max_iters:
                val = estimate_loss(ema.averaged_model(ema_model), val_data, model_args["vocab_size"], dev, rank,
                                    world_size, bufs)
                improved = val[eval_key] < best_val
                best_val = min(best_val, val[eval_key])
                say(f"val @ {iter_num}: loss {val['loss']:.4f}, bound {val['bound']:.4f}, bpt {val['bpt']:.4f}"
                    + (" (best)" if improved else ""))
                log(log_file, {"iter": iter_num, "split": "val", **val})
                if improved or always_save_checkpoint:
                    save_checkpoint("ckpt.pt", model, ema, optimizer, iter_num, best_val, meta,
                                    gather_rng_states(data_gen, dev, bufs))
            if iter_num % ckpt_interval == 0 or iter_num == max_iters or stop:
                save_checkpoint("last.pt", model, ema, optimizer, iter_num, best_val, meta,
                                gather_rng_states(data_gen, dev, bufs))
            if stop:
                say(f"stopped by signal at iteration {iter_num}; resume with --resume={out_dir}")
                break
            t_last += time.time() - t_pause

    say(f"done: {iter_num} iterations, best val {eval_key} {best_val:.4f}, checkpoints in {out_dir}")
    if ddp:
        del train_model  # DDP holds the process group; ddp_shutdown() destroys it
        ddp_shutdown()
    return model


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except UserError as e:
        if "--debug" in sys.argv:
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
