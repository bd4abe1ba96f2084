"""
What the scripts (train.py, distill.py, sample.py, evaluate.py, bench.py) share, and nothing else: the one-line
user error, device choice, data splits and their tokenizers, process groups, the EMA of the weights, and finding,
writing and opening checkpoints (families.py reads them).
"""
import contextlib
import gc
import io
import inspect
import os
import pickle
import socket
from typing import NamedTuple
import sys
from urllib.parse import urlparse

import numpy as np
import torch

from convert import is_published, load_published
from families import load_checkpoint, read_checkpoint
from sampling import guided


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
            data = np.load(npy, mmap_mode="r")
            if data.ndim != 1:  # rows of prompt -> answer pairs (data/prepare_pairs.py), not a stream of text
                raise UserError(f"{data_dir} is a pair dataset (one prompt -> answer row each, data/prepare_pairs.py): "
                                f"conditional training and answering are not implemented yet")
            return data
        if os.path.exists(bin_):
            return np.memmap(bin_, dtype=np.uint16, mode="r")
    except (ValueError, OSError) as e:
        raise UserError(f"cannot read the {split} split in {data_dir} (truncated? prepare it again): {e}")
    raise UserError(f"no {split} split in {data_dir} ({split}.npy or {split}.bin)")


class Pairs(NamedTuple):
    """A split of a pair dataset (data/prepare_pairs.py): rows (N, L) of prompt | answer | end-of-answer padding, and
    each row's prompt length (N,)."""
    rows: np.ndarray
    prompt_len: np.ndarray


def is_pair_dataset(data_dir):
    """Whether data_dir's meta.pkl says it holds prompt -> answer rows (data/prepare_pairs.py)."""
    meta_path = os.path.join(data_dir, "meta.pkl")
    if not os.path.exists(meta_path):
        return False
    with open(meta_path, "rb") as f:
        return bool(pickle.load(f).get("pairs"))


def open_pairs(data_dir, split):
    """Memory-map a split of a pair dataset: Pairs(split.npy, split_prompt_len.npy)."""
    paths = [os.path.join(data_dir, f"{split}{suffix}.npy") for suffix in ("", "_prompt_len")]
    if not all(os.path.exists(p) for p in paths):
        raise UserError(f"no {split} split in the pair dataset {data_dir} ({split}.npy and {split}_prompt_len.npy)")
    try:
        pairs = Pairs(*(np.load(p, mmap_mode="r") for p in paths))
    except (ValueError, OSError) as e:
        raise UserError(f"cannot read the {split} split in {data_dir} (truncated? prepare it again): {e}")
    if pairs.rows.ndim != 2 or len(pairs.rows) != len(pairs.prompt_len) or len(pairs.rows) == 0:
        raise UserError(f"the {split} split in {data_dir} is not a set of rows with their prompt lengths: prepare it again")
    return pairs


def clean_positions(prompt_len, seq_len):
    """The protocol's clean mask (families.py) of rows whose first prompt_len (B,) positions are the prompt: (B, L) bool."""
    return torch.arange(seq_len, device=prompt_len.device)[None, :] < prompt_len[:, None]


def dataset_vocab_size(data_dir):
    """vocab_size from meta.pkl (text8-style datasets), else GPT-2's 50257 for .bin datasets."""
    meta_path = os.path.join(data_dir, "meta.pkl")
    if os.path.exists(meta_path):
        with open(meta_path, "rb") as f:
            return pickle.load(f)["vocab_size"]
    return 50257


def random_windows(data, batch_size, seq_len, vocab_size, rng, dev):
    """batch_size random windows of seq_len tokens of a split (rng: a numpy Generator), (B, L) long on dev."""
    ix = rng.integers(0, len(data) - seq_len + 1, size=batch_size)
    x = np.stack([data[i:i + seq_len] for i in ix]).astype(np.int64)
    if x.max() >= vocab_size:
        raise UserError(f"token id {x.max()} in the data is outside the model's vocabulary (vocab_size="
                        f"{vocab_size}): this checkpoint was not trained on this dataset")
    return torch.from_numpy(x).to(dev)


def default_dataset(vocab_size):
    """The dataset a vocabulary size implies: 27 -> text8, 50257 -> openwebtext (50258: Duo's published GPT-2
    vocabulary with a [PAD] id), else ''."""
    return {27: "text8", 50257: "openwebtext", 50258: "openwebtext"}.get(vocab_size, "")


# ---- text <-> ids -----------------------------------------------------------------------------------
MASK_GLYPH = "\u2588"


class Codec:
    """Token ids <-> text for a dataset: characters from meta.pkl's itos, or a tiktoken BPE. A pair dataset's
    (data/prepare_pairs.py) characters keep their case, and its end-of-answer id (eoa_id) reads as nothing."""

    def __init__(self, vocab_size, itos=None, bpe=None, eoa_id=None):
        self.vocab_size, self.mask_id, self.itos, self.bpe, self.eoa_id = vocab_size, vocab_size, itos, bpe, eoa_id
        self.stoi = {c: i for i, c in itos.items()} if itos else None
        self.placeholders = {MASK_GLYPH, "?"} if itos and "?" not in self.stoi else {MASK_GLYPH}

    def encode(self, text, template=False):
        """Text -> ids; with template=True each placeholder becomes the mask id (text8 lowercases the text)."""
        if self.itos:
            if not template and self.eoa_id is None:
                text = text.lower()
            bad = [c for c in text if c not in self.stoi and not (template and c in self.placeholders)]
            if bad:
                raise UserError(f"character {bad[0]!r} is not in this model's alphabet "
                                f"({''.join(sorted(self.stoi))!r})")
            return [self.mask_id if c in self.placeholders else self.stoi[c] for c in text]
        ids, piece = [], ""
        for c in text + "\0":
            if (template and c in self.placeholders) or c == "\0":
                ids += self.bpe.encode_ordinary(piece) if piece else []
                piece = ""
                if c != "\0":
                    ids.append(self.mask_id)
            else:
                piece += c
        return ids

    def decode(self, ids, view=False):
        """ids -> text; the mask shows as the glyph; view=True also shows space as _ (text8)."""
        if self.itos:
            out = "".join(MASK_GLYPH if i == self.mask_id else "" if i == self.eoa_id else self.itos[i] for i in ids)
            return out.replace(" ", "_") if view else out
        out, run = [], []
        for i in list(ids) + [None]:
            if i is not None and i != self.mask_id and i >= self.bpe.n_vocab:
                continue  # an id the BPE lacks: Duo's [PAD] state (50257), never data, shows as nothing
            if i is None or i == self.mask_id:
                if run:
                    out.append(self.bpe.decode(run))
                    run = []
                if i is not None:
                    out.append(MASK_GLYPH)
            else:
                run.append(i)
        text = "".join(out)
        return text.replace("\n", "\u21b5") if view else text


def load_codec(vocab_size, dataset, data_dir=None):
    """The codec for a model: data_dir/meta.pkl if given and present, else the dataset's default."""
    meta_path = os.path.join(data_dir or os.path.join("data", dataset or "text8"), "meta.pkl")
    meta = None
    if os.path.exists(meta_path):
        with open(meta_path, "rb") as f:
            meta = pickle.load(f)
    eoa_id = meta.get("eoa_id") if meta and meta.get("pairs") else None
    if meta and meta.get("itos"):
        return Codec(vocab_size, itos=meta["itos"], eoa_id=eoa_id)
    if meta and meta.get("tiktoken"):
        import tiktoken
        return Codec(vocab_size, bpe=tiktoken.Encoding(**meta["tiktoken"]), eoa_id=eoa_id)
    if vocab_size == 27:
        return Codec(vocab_size, itos={i: c for i, c in enumerate(" abcdefghijklmnopqrstuvwxyz")})
    if vocab_size in (50257, 50258):
        import tiktoken
        try:
            gpt2 = tiktoken.get_encoding("gpt2")
        except Exception as e:
            raise UserError(f"cannot load tiktoken's GPT-2 encoding ({type(e).__name__}); it is downloaded once "
                            f"and cached: run once with network access, or set TIKTOKEN_CACHE_DIR")
        return Codec(vocab_size, bpe=gpt2)
    raise UserError(f"no tokenizer for vocab_size {vocab_size}: pass --data_dir with its meta.pkl")


# ---- process groups (torchrun) -----------------------------------------------------------------------
# Teardown. A gloo worker thread keeps a finished collective's tensors a moment after wait() returns; if it
# drops the last reference to a tensor while the interpreter is finalizing, it cannot take the GIL and the
# process aborts after the script has finished ("terminate called without an active exception"). So:
# (1) every tensor handed to a collective comes from comm_buffer(), is reused and lives as long as the
# process (no collectives of temporary or pickled objects: RNG states travel as uint8 tensors);
# (2) collectives are waited for (all_reduce / all_gather below); (3) after the run the caller drops its DDP
# wrapper (it pins the group) and ddp_shutdown() destroys the group, joining the worker threads while
# Python still holds every tensor they saw.
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


def start_processes(device, backend=""):
    """This process's place in a torchrun group, or alone: (ddp, rank, world_size, device), the device picked for
    its LOCAL_RANK and made current, the process group joined (backend "" picks NCCL on CUDA, gloo on CPU)."""
    ddp = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    dev = pick_device(device, int(os.environ.get("LOCAL_RANK", 0)))
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if ddp:
        ddp_init(backend or ("nccl" if dev.type == "cuda" else "gloo"))
    return ddp, rank, world_size, dev


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


# ---- training ----------------------------------------------------------------------------------------
def rng_states(dev):
    """The global torch RNG states a training step draws from: the CPU generator's, and on CUDA the device's
    (uint8 tensors; empty off CUDA). train.py and distill.py save them in every checkpoint."""
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(dev) if dev.type == "cuda" else torch.tensor([], dtype=torch.uint8)}


def set_rng_states(state, dev):
    """Restore rng_states(dev): a resumed run continues the very streams it had (bit-identical)."""
    torch.set_rng_state(state["torch"])
    if dev.type == "cuda" and state.get("cuda") is not None and state["cuda"].numel():
        torch.cuda.set_rng_state(state["cuda"], dev)


class EMA:
    """Exponential moving average of a model's weights, in the nanoDD checkpoint layout
    (`initted`, `step`, `ema_model.<key>`). Decay warms up as 1 - 1/(1 + n) up to beta, n counting
    updates after `update_after_step`; before that the average is a copy of the model."""

    def __init__(self, model, beta, update_after_step):
        self.beta, self.update_after_step = beta, update_after_step
        self.model = model
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.initted = torch.tensor(False)
        self.step = torch.tensor(0)

    @torch.no_grad()
    def update(self):
        step = int(self.step)
        self.step += 1
        current = self.model.state_dict()
        if step <= self.update_after_step or not bool(self.initted):
            for k, v in current.items():
                self.shadow[k].copy_(v)
            self.initted = torch.tensor(step > self.update_after_step)
            return
        n = step - self.update_after_step - 1
        decay = min(self.beta, 1 - 1 / (1 + n)) if n > 0 else 0.0
        floats = [k for k, v in current.items() if v.is_floating_point()]
        torch._foreach_lerp_([self.shadow[k] for k in floats], [current[k] for k in floats], 1 - decay)
        for k, v in current.items():
            if k not in floats:
                self.shadow[k].copy_(v)

    def state_dict(self):
        state = {"initted": self.initted.clone(), "step": self.step.clone()}
        state.update({"ema_model." + k: v.clone() for k, v in self.shadow.items()})
        return state

    def load_state_dict(self, state):
        self.initted = state["initted"].clone().cpu()
        self.step = state["step"].clone().cpu()
        for k in self.shadow:
            self.shadow[k].copy_(state["ema_model." + k])

    def averaged_model(self, template):
        """A copy of `template` (an un-wrapped model) holding the averaged weights."""
        template.load_state_dict(self.shadow)
        return template


# ---- checkpoints ----------------------------------------------------------------------------------
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


def hub_online():
    """False when HF_HUB_OFFLINE is set or the hub cannot be reached within 5 s (so offline fails fast)."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE"):
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co").hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=5).close()
        return True
    except OSError:
        return False


def run_checkpoint(run_dir):
    """The checkpoint of a run directory: its ckpt.pt (best val bound), else the newest readable one (newest_checkpoint,
    as train.py --resume: a run stopped before its first evaluation has only last.pt), said on stderr with its
    iteration; a one-line UserError when there is none."""
    best = os.path.join(run_dir, "ckpt.pt")
    if os.path.exists(best):
        return best
    skipped = io.StringIO()
    with contextlib.redirect_stdout(skipped):  # newest_checkpoint prints the files it skips
        found = newest_checkpoint(run_dir)
    notes = "; ".join(skipped.getvalue().split("\n")).strip("; ")
    if found is None:
        raise UserError(f"run directory {run_dir} has no readable checkpoint (ckpt.pt or last.pt)"
                        f"{': ' + notes if notes else ''}")
    path, ckpt = found
    print(f"using {path} (iteration {ckpt.get('iter_num', '?')}): no ckpt.pt yet{'; ' + notes if notes else ''}",
          file=sys.stderr)
    return path


def resolve_checkpoint(spec):
    """A local file, a run directory (run_checkpoint: its ckpt.pt, else its newest readable checkpoint), or a Hugging
    Face model repo id (downloads ckpt.pt)."""
    if os.path.isdir(spec):
        return run_checkpoint(spec)
    if os.path.exists(spec) or spec.count("/") != 1 or spec.endswith(".pt"):
        return spec
    from huggingface_hub import hf_hub_download
    try:  # offline (fail fast instead of retrying for half a minute), a cached copy still works
        return hf_hub_download(repo_id=spec, filename="ckpt.pt", local_files_only=not hub_online())
    except Exception as e:
        raise UserError(f"{spec} is not a local file and could not be downloaded from the Hugging Face hub "
                        f"({type(e).__name__}); download ckpt.pt yourself and pass its path")


def download_published(repo_id):
    """The hub-cache directory of a published repo's config.json and weights (convert.py); offline, a cached copy."""
    from huggingface_hub import hf_hub_download
    online = hub_online()
    try:
        config = hf_hub_download(repo_id=repo_id, filename="config.json", local_files_only=not online)
    except Exception as e:
        raise UserError(f"{repo_id} could not be downloaded from the Hugging Face hub ("
                        f"{'online' if online else 'offline'}, {type(e).__name__}): run once with network access, or "
                        f"pass a local copy of the repo (config.json and model.safetensors)")
    for name in ("model.safetensors", "pytorch_model.bin"):
        try:
            hf_hub_download(repo_id=repo_id, filename=name, local_files_only=not online)
            return os.path.dirname(config)
        except Exception:
            continue
    raise UserError(f"{repo_id}: neither model.safetensors nor pytorch_model.bin could be downloaded")


# ---- sampling options (sample.py, evaluate.py --accuracy) --------------------------------------------------
def add_sampler_options(p):
    """The sampler options of model.sample (families.py, sampling.py) on an argparse parser."""
    p.add_argument("--sampler", default="ancestral",
                   choices=["ancestral", "confidence", "remask", "greedy_tail", "threshold", "euler"],
                   help="ancestral: the model's exact sampler (default); confidence: MaskGIT/LLaDA-style decoding "
                        "in --steps calls, most confident positions first; remask: ReMDM, the --steps grid with "
                        "generated tokens masked again w.p. --eta (masked models); greedy_tail: the ancestral "
                        "sampler, then one more call whose argmax is the sample (Duo's; uniform-state); threshold: "
                        "Fast-dLLM-style, each call commits every draw of probability >= --threshold, at least one "
                        "(masked models); euler: SEDD's Euler predictor (its ancestral is their analytic one)")
    p.add_argument("--steps", type=int, default=None, help="ancestral: a coarse grid of N steps (approximate); "
                   "confidence: the number of network calls; remask: the grid's steps (block diffusion: per block)")
    p.add_argument("--temperature", type=float, default=1.0, help="divide the logits by this (0: argmax)")
    p.add_argument("--top_p", type=float, default=1.0, help="nucleus sampling: draw from the smallest set of "
                   "tokens with probability >= p")
    p.add_argument("--top_k", type=int, default=0, help="draw from the k most likely tokens (0: all)")
    p.add_argument("--confidence", default="drawn", choices=["drawn", "max", "margin"],
                   help="confidence sampler: score a position by the probability of its drawn token (default), "
                        "its top probability, or its top-1 minus top-2 margin")
    p.add_argument("--schedule", default="linear", choices=["linear", "cosine"],
                   help="confidence sampler: how many positions each step commits")
    p.add_argument("--threshold", type=float, default=0.9, help="threshold sampler: commit every drawn token of "
                   "at least this probability, in (0, 1]")
    p.add_argument("--eta", type=float, default=0.02, help="remask sampler: the largest probability of masking a "
                   "generated token again at a step (ReMDM's eta_cap)")
    p.add_argument("--correction_steps", type=int, default=0, help="GIDD: after sampling, up to this many network "
                   "calls of self-correction (each changes the likeliest different draw, one token per row; 0: off)")
    p.add_argument("--correction_temperature", type=float, default=0.1, help="GIDD self-correction: the temperature "
                   "of its draws (GIDD's 0.1)")


def sampler_options(args):
    """model.sample's keyword arguments from add_sampler_options' values; a bad value is a one-line UserError."""
    if args.steps is not None and args.steps < 1:
        raise UserError("--steps must be at least 1")
    if args.temperature < 0 or not 0 < args.top_p <= 1 or args.top_k < 0:
        raise UserError("--temperature >= 0, 0 < --top_p <= 1 and --top_k >= 0 are required")
    if not 0 < args.threshold <= 1:
        raise UserError(f"--threshold must be in (0, 1], not {args.threshold}")
    if not 0 <= args.eta <= 1:
        raise UserError("--eta must be in [0, 1]")
    if args.correction_steps < 0 or args.correction_temperature < 0:
        raise UserError("--correction_steps >= 0 and --correction_temperature >= 0 are required")
    opts = dict(steps=args.steps, sampler=args.sampler, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    opts.update({"confidence": dict(score=args.confidence, schedule=args.schedule), "remask": dict(eta=args.eta),
                 "threshold": dict(threshold=args.threshold)}.get(args.sampler, {}))
    if args.correction_steps:  # only then: a family without self-correction refuses the option
        opts.update(correction_steps=args.correction_steps, correction_temperature=args.correction_temperature)
    return opts


def refuse_unsupported(model, opts):
    """opts, after a one-line UserError if they ask model.sample for self-correction and it has none (GIDD has)."""
    if opts.get("correction_steps") and "correction_steps" not in inspect.signature(model.sample).parameters:
        raise UserError(f"--correction_steps: {type(model).__name__} has no self-correction step (GIDD has)")
    return opts


def guidance(model, w, seed, dev):
    """guide(clean) for sampling.answer_prompts under --guidance w (None for w = 0), or a one-line error: w < 0, or a
    model not trained with cond_drop > 0 (its unconditional model is untrained). The no-prompt draws (if the family
    makes any) come from their own generator, seeded by seed + 1."""
    if w < 0:
        raise UserError(f"--guidance {w}: must be >= 0 (0: off)")
    if not w:
        return None
    if not model.checkpoint_meta.get("training_args", {}).get("cond_drop", 0) > 0:
        raise UserError("--guidance needs a model trained with --cond_drop > 0 (the unconditional model); this one was "
                        "trained without dropping prompts")
    generator = torch.Generator(device=dev).manual_seed(seed + 1)
    return lambda clean: guided(model, w, clean, generator)


def compile_network(model, backend="inductor"):
    """torch.compile the model's network in place (nn.Module.compile: the weights keep their names), not the
    sampler or estimator around it, whose generator draws and Python control flow would break the graph. Shapes
    that change between calls (first-hitting samplers call on fewer rows as they go) cost a recompile each, at
    most a few. Returns the model."""
    model.net.compile(backend=backend)
    return model


def open_model(spec, ema, dev):
    """load_checkpoint(resolve_checkpoint(spec)) with one-line errors; a paper's published checkpoint (an id of
    convert.PUBLISHED or a local copy of its repo) through convert.py (its weights are the EMA's already)."""
    try:
        if is_published(spec):
            return load_published(spec if os.path.isdir(spec) else download_published(spec), spec, dev)
        return load_checkpoint(resolve_checkpoint(spec), ema=ema, map_location=dev)
    except (ValueError, FileNotFoundError) as e:
        raise UserError(str(e))
