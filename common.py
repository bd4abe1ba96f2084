"""
What the scripts (train.py, sample.py, evaluate.py, bench.py) share, and nothing else: the one-line
user error, device choice, data splits, process groups, and reading/writing checkpoints of every
model class (d3pm.py, mdlm.py, ar.py).
"""
import gc
import os
import pickle

import numpy as np
import torch


class UserError(Exception):
    """A problem with the user's input: the scripts print it as one line, no traceback."""


def pick_device(name, local_rank=0):
    """'auto' -> cuda if available else cpu; plain 'cuda' -> this process's GPU under torchrun;
    a one-line error when CUDA is asked for but absent."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device={name} but CUDA is not available; use --device=cpu")
    return torch.device(f"cuda:{local_rank}" if name == "cuda" else name)


# ---- data -------------------------------------------------------------------------------------------
def open_split(data_dir, split):
    """Memory-map a split: data_dir/split.npy (text8) or data_dir/split.bin (flat uint16, nanoGPT style)."""
    npy, bin_ = os.path.join(data_dir, f"{split}.npy"), os.path.join(data_dir, f"{split}.bin")
    try:
        if os.path.exists(npy):
            return np.load(npy, mmap_mode="r")
        if os.path.exists(bin_):
            return np.memmap(bin_, dtype=np.uint16, mode="r")
    except (ValueError, OSError) as e:
        raise UserError(f"cannot read the {split} split in {data_dir} (truncated? prepare it again): {e}")
    raise UserError(f"no {split} split in {data_dir} ({split}.npy or {split}.bin)")


def dataset_vocab_size(data_dir):
    """vocab_size from meta.pkl (text8-style datasets), else GPT-2's 50257 for .bin datasets."""
    meta_path = os.path.join(data_dir, "meta.pkl")
    if os.path.exists(meta_path):
        with open(meta_path, "rb") as f:
            return pickle.load(f)["vocab_size"]
    return 50257


def default_dataset(vocab_size):
    """The dataset a vocabulary size implies: 27 -> text8, 50257 -> openwebtext, else ''."""
    return {27: "text8", 50257: "openwebtext"}.get(vocab_size, "")


# ---- process groups (torchrun) -----------------------------------------------------------------------
# Teardown. Every gloo collective runs on one of the process group's worker threads, which keeps the
# finished work (and with it the work's tensors) a moment after wait() has returned. If that thread drops
# the last reference to a tensor that Python also had, it must take the GIL to free the Python object;
# once the interpreter is finalizing it cannot, and the process aborts ("terminate called without an
# active exception", SIGABRT) after the script has finished: torchrun then reports a failed run (about 3%
# of 2-rank launches). The threads lived that long because the process group was never destroyed:
# destroy_process_group() only drops torch's own references, and DDP had pinned the group (see ddp_init).
# So: (1) every tensor handed to a collective comes from comm_buffer(), is reused, and lives as long as
# the process (no collective of temporary or pickled Python objects: the RNG states travel as uint8
# tensors); (2) collectives are waited for (all_reduce / all_gather below); (3) after the run the caller
# drops its DDP wrapper and ddp_shutdown() destroys the group, which joins the worker threads before
# main() returns, while Python still holds every tensor they saw (so joining cannot wait on the GIL).
_COMM_BUFFERS = []


def ddp_init(backend):
    """init_process_group for torchrun. torchrun >= 2.5 lends its own rendezvous store to the workers
    and keeps it across restarts, so a restarted group would read the previous attempt's addresses
    (pytorch#135712) and fail or hang; each attempt therefore gets keys of its own.

    torch.distributed.nn is imported first: DDP imports it on first use, and its functions take
    `group=group.WORLD` as a default argument, which, evaluated while a group exists, holds that group
    (and gloo's threads) until interpreter shutdown, where destroying it races with finalization."""
    import torch.distributed.nn  # noqa: F401  (before init_process_group: see the docstring)
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        torch.distributed.init_process_group(backend=backend)
        return
    store, rank, world_size = next(torch.distributed.rendezvous("env://"))
    store = torch.distributed.PrefixStore(f"nanodd/attempt{os.environ.get('TORCHELASTIC_RESTART_COUNT', 0)}", store)
    torch.distributed.init_process_group(backend=backend, store=store, rank=rank, world_size=world_size)


def comm_buffer(tensor):
    """Register `tensor` as a buffer for collectives (kept alive until the process exits) and return it."""
    _COMM_BUFFERS.append(tensor)
    return tensor


def _registered(*tensors):
    for t in tensors:
        if not any(t is b for b in _COMM_BUFFERS):
            raise ValueError("collectives take buffers from common.comm_buffer() (see the note above ddp_init)")


def all_reduce(buf, op="sum"):
    """In-place all_reduce (sum or max) of a comm_buffer, waited for; returns buf."""
    _registered(buf)
    op = {"sum": torch.distributed.ReduceOp.SUM, "max": torch.distributed.ReduceOp.MAX}[op]
    torch.distributed.all_reduce(buf, op=op, async_op=True).wait()
    return buf


def all_gather(outs, buf):
    """all_gather of a comm_buffer into a list of comm_buffers (one per rank), waited for; returns outs."""
    _registered(buf, *outs)
    torch.distributed.all_gather(outs, buf, async_op=True).wait()
    return outs


def ddp_shutdown():
    """Tear the process group down after a finished run, on every rank. The caller drops its DDP wrapper
    first (it holds the group). Waits for every rank (rank 0 may still be writing), then destroys the
    group, which joins gloo's worker threads: no thread of it is left to touch Python objects during
    interpreter shutdown."""
    torch.distributed.barrier()
    gc.collect()  # a DDP wrapper can sit in a reference cycle
    torch.distributed.destroy_process_group()


# ---- checkpoints --------------------------------------------------------------------------------------
EMA_PREFIX = "ema_model."


def model_classes():
    """Every model class a checkpoint can name (model_cls), by class name."""
    from ar import AR
    from bd3lm import BD3LM
    from d3pm import D3PMAbsorbing
    from mdlm import MDLM
    return {cls.__name__: cls for cls in (D3PMAbsorbing, MDLM, AR, BD3LM)}


def descendants(pid):
    """The processes below pid (Linux /proc; [] elsewhere or once pid is gone). torchrun starts each worker in a
    session of its own, so killing torchrun's process group alone leaves them running."""
    found, todo = [], [pid]
    while todo:
        parent = todo.pop()
        try:
            for tid in os.listdir(f"/proc/{parent}/task"):
                with open(f"/proc/{parent}/task/{tid}/children") as f:
                    kids = [int(k) for k in f.read().split()]
                found += kids
                todo += kids
        except OSError:
            pass
    return found


def check_length(model, seq_len):
    """A one-line error if the model cannot take windows of seq_len tokens (block diffusion: a multiple of its
    block size); models without a check_length method take any length."""
    try:
        getattr(model, "check_length", lambda L: None)(seq_len)
    except ValueError as e:
        raise UserError(f"seq_len {seq_len}: {e}")


def atomic_save(obj, path):
    """torch.save to a temporary file in the same directory, fsync, then rename over path."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def read_checkpoint(path, map_location="cpu"):
    """torch.load a checkpoint in the nanoDD layout, or raise ValueError / FileNotFoundError saying why."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated zip, pickle garbage, not a torch file...
        raise ValueError(f"{path} is not a readable checkpoint: truncated, corrupt or not a torch file "
                         f"({type(e).__name__})") from None
    if not isinstance(ckpt, dict) or not {"model", "model_cls", "model_args"} <= set(ckpt):
        raise ValueError(f"{path} is not a nanoDD checkpoint (needs keys model, model_cls, model_args)")
    known = model_classes()
    if ckpt["model_cls"] not in known:
        raise ValueError(f"{path}: unknown model class {ckpt['model_cls']!r} (known: {', '.join(known)})")
    return ckpt


def load_checkpoint(path, ema=True, map_location="cpu"):
    """Build the model stored in a nanoDD checkpoint, with its EMA weights (default) or raw weights.

    Returns the model in eval mode on map_location; the raw dict is on model.checkpoint_meta
    (without weights) for callers that want model_args / training_args / iter_num.
    """
    ckpt = read_checkpoint(path, map_location)
    model = model_classes()[ckpt["model_cls"]](**ckpt["model_args"])
    state = ckpt["model"]
    if ema:
        if "ema" not in ckpt:
            raise ValueError(f"{path} has no EMA weights; use the raw weights (--no-ema)")
        state = {k[len(EMA_PREFIX):]: v for k, v in ckpt["ema"].items() if k.startswith(EMA_PREFIX)}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ValueError(f"{path}: weights do not match {ckpt['model_cls']}"
                         f"({ckpt['model_args']}): {str(e).splitlines()[0]}") from None
    model.checkpoint_meta = {k: v for k, v in ckpt.items() if k not in ("model", "ema", "optimizer")}
    return model.to(map_location).eval()


def newest_checkpoint(run_dir):
    """The readable checkpoint (last.pt or ckpt.pt) in run_dir with the highest iter_num, or None."""
    best = None
    for name in ("last.pt", "ckpt.pt"):
        path = os.path.join(run_dir, name)
        if not os.path.exists(path):
            continue
        try:
            ckpt = read_checkpoint(path)
        except (ValueError, FileNotFoundError) as e:
            print(f"skipping {path}: {e}")
            continue
        if best is None or ckpt["iter_num"] > best[1]["iter_num"]:
            best = (path, ckpt)
    return best


def resolve_checkpoint(spec):
    """A local file, a run directory (its ckpt.pt), or a Hugging Face model repo id (downloads ckpt.pt)."""
    if os.path.isdir(spec):
        spec = os.path.join(spec, "ckpt.pt")
    if os.path.exists(spec) or spec.count("/") != 1 or spec.endswith(".pt"):
        return spec
    import socket
    from huggingface_hub import hf_hub_download
    online = not os.environ.get("HF_HUB_OFFLINE")
    if online:
        try:  # fail fast offline instead of retrying for half a minute; a cached copy still works
            socket.create_connection(("huggingface.co", 443), timeout=5).close()
        except OSError:
            online = False
    try:
        return hf_hub_download(repo_id=spec, filename="ckpt.pt", local_files_only=not online)
    except Exception as e:
        raise UserError(f"{spec} is not a local file and could not be downloaded from the Hugging Face hub "
                        f"({type(e).__name__}); download ckpt.pt yourself and pass its path")


def open_model(spec, ema, dev):
    """load_checkpoint(resolve_checkpoint(spec)) with one-line errors."""
    try:
        return load_checkpoint(resolve_checkpoint(spec), ema=ema, map_location=dev)
    except (ValueError, FileNotFoundError) as e:
        raise UserError(str(e))
