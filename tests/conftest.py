"""Shared fixtures and helpers: the repository root, tiny datasets, chi-square goodness of fit, processes."""
import os
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

TEXT8_CHARS = " abcdefghijklmnopqrstuvwxyz"  # id 0 = space, 1..26 = a..z
TINY_SPLIT_SIZES = {"train": 20_000, "val": 4_000, "test": 3_000}  # distinct, so a split is identifiable by length


def write_tiny_text8(data_root, seed=0):
    """Write data_root/text8/{train,val,test}.npy (uint16 ids 0..26) and meta.pkl as prepare_text8 does.
    Returns data_root as a str (the value for --data_root_dir)."""
    data_dir = os.path.join(str(data_root), "text8")
    os.makedirs(data_dir, exist_ok=True)
    rng = np.random.default_rng(seed)
    for split, n in TINY_SPLIT_SIZES.items():
        np.save(os.path.join(data_dir, f"{split}.npy"), rng.integers(0, 27, n).astype(np.uint16))
    meta = {"vocab_size": 27, "itos": dict(enumerate(TEXT8_CHARS)), "stoi": {c: i for i, c in enumerate(TEXT8_CHARS)}}
    with open(os.path.join(data_dir, "meta.pkl"), "wb") as f:
        pickle.dump(meta, f)
    return str(data_root)


def randomize_weights(model, seed):
    """Give every parameter a random value (the zero-initialised adaLN layers too), scaled so that
    predictions depend clearly on t and on the context without being extreme. Returns the model."""
    import torch
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=g, dtype=torch.float64).float()
            if "norm" in name:
                p.copy_(1 + 0.3 * r)
            elif name.startswith("net.c_embed"):
                p.copy_(0.3 * r)
            elif "adaLN" in name:
                p.copy_(0.5 * r / (p.shape[1] ** 0.5 if p.dim() == 2 else 1.0))
            elif p.dim() == 2:
                p.copy_(r / p.shape[1] ** 0.5)
            else:
                p.copy_(0.3 * r)
    return model


@pytest.fixture
def repo_root():
    return REPO_ROOT


@pytest.fixture
def tiny_text8(tmp_path):
    """A fake text8 dataset in tmp_path/data_root; returns the data root (a str)."""
    return write_tiny_text8(tmp_path / "data_root")


@pytest.fixture(scope="session")
def tiny_text8_shared(tmp_path_factory):
    """Like tiny_text8, written once per session (for module-scoped fixtures). Treat as read-only."""
    return write_tiny_text8(tmp_path_factory.mktemp("shared_data_root"))


# merges of the tiny BPE, in rank order 256, 257, ...; both parts of each merge are ranked before it
TINY_BPE_MERGES = [b"th", b"he", b"the", b" t", b" th", b" the", b"in", b"er", b"  "]
GPT2_PAT_STR = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


@pytest.fixture
def tiny_bpe():
    """A small hand-built tiktoken.Encoding ('tiny'): the 256 bytes, a few merges, <|endoftext|> last.
    Needs no download; GPT-2's split regex."""
    import tiktoken

    ranks = {bytes([i]): i for i in range(256)}
    for merge in TINY_BPE_MERGES:
        ranks[merge] = len(ranks)
    return tiktoken.Encoding("tiny", pat_str=GPT2_PAT_STR, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": len(ranks)})


# ---- running the scripts: as children in a process group of their own, or in this process ----------
import contextlib  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402

SCRIPT_TIMEOUT = 240  # seconds for one child (a torchrun launch included); the group is killed after it
TORCHRUN_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK", "MASTER_ADDR",
                 "MASTER_PORT", "TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT", "TORCHELASTIC_USE_AGENT_STORE")


def script_env(**extra):
    """os.environ for a child: one OpenMP thread, offline, no torchrun variables inherited; plus extra."""
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_VARS}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               PYTHONUNBUFFERED="1")
    env.update({k: str(v) for k, v in extra.items()})
    return env


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


def kill_group(proc):
    """SIGKILL proc's process group (proc was started with start_new_session=True) and every process below
    proc with its own group: torchrun starts each worker in a session of its own, so killing torchrun's
    group alone would leave the workers training."""
    mine = os.getpgrp()
    for pid in descendants(proc.pid):
        for kill, target in ((os.killpg, _pgid(pid)), (os.kill, pid)):
            if target is not None and target != mine:
                try:
                    kill(target, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _pgid(pid):
    try:
        return os.getpgid(pid)
    except (ProcessLookupError, PermissionError):
        return None


@contextlib.contextmanager
def child_group(cmd, env=None, cwd=None, **popen_kw):
    """Popen(cmd) as the leader of a new process group. However the block is left (an assertion, a
    timeout, Ctrl-C), whatever is left of the group (torchrun's workers included) is killed, so that a
    failing test never leaves training running."""
    proc = subprocess.Popen(cmd, cwd=cwd or REPO_ROOT, env=env or script_env(), start_new_session=True, **popen_kw)
    try:
        yield proc
    finally:
        kill_group(proc)
        if proc.poll() is None:
            proc.wait()
        for f in (proc.stdout, proc.stderr):
            if f is not None:
                f.close()


def run_script(args, timeout=SCRIPT_TIMEOUT, env=None, cwd=None):
    """`python ARGS` (a script and its arguments, or -m MODULE ...) from the repository root, in a process
    group of its own, with a timeout; fails the test on timeout. Returns a subprocess.CompletedProcess."""
    cmd = [sys.executable, *map(str, args)]
    with child_group(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_group(proc)
            out, err = proc.communicate()
            pytest.fail(f"timed out after {timeout} s: {' '.join(cmd)}\nstdout:\n{out[-3000:]}\nstderr:\n{err[-3000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def describe(proc):
    """A CompletedProcess's exit status and output tails, for assertion messages."""
    return f"exit {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"


def assert_one_line_error(proc, *words):
    """The scripts' contract for bad input: a non-zero exit, one line on stderr, no traceback."""
    assert proc.returncode not in (0, None), describe(proc)
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout, describe(proc)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), describe(proc)
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]


def call_main(module, argv):
    """module.main(argv) in this process, as `python module.py ARGV` with OMP_NUM_THREADS=1 would run it:
    one thread; the module's globals (train.py and bench.py keep their settings there), torch's global RNG
    and the thread count are restored afterwards. Exceptions (common.UserError...) propagate."""
    import torch
    saved = dict(vars(module))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=[]):
            return module.main(list(map(str, argv)))
    finally:
        torch.set_num_threads(threads)
        vars(module).update(saved)


# ---- chi-square goodness of fit (no scipy) -------------------------------------------------------------------
def chi2_sf(stat, df):
    """P(chi2_df > stat) = Q(df/2, stat/2), the regularized upper incomplete gamma function."""
    import torch
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64),
                                         torch.tensor(stat / 2, dtype=torch.float64)))


def chi2_pvalue(counts, probs):
    """Goodness of fit of observed counts (array) against class probabilities (array); classes of
    probability 0 are left out (the caller checks that none was drawn)."""
    counts, probs = np.asarray(counts, dtype=float), np.asarray(probs, dtype=float)
    keep = probs > 0
    expected = counts.sum() * probs[keep]
    if keep.sum() < 2:
        return 1.0
    return chi2_sf(float(((counts[keep] - expected) ** 2 / expected).sum()), int(keep.sum()) - 1)


def chisquare_pvalue(samples, probs, min_expected=5.0):
    """Goodness of fit of samples (n, L) against exact probabilities {tuple: p}; cells with expected count
    < min_expected pooled into one; a sample of probability 0 fails outright."""
    n = samples.shape[0]
    keys, counts = np.unique(samples.numpy(), axis=0, return_counts=True)
    observed = {tuple(int(v) for v in k): int(c) for k, c in zip(keys, counts)}
    impossible = [k for k in observed if probs.get(k, 0.0) <= 0.0]
    assert not impossible, f"sampled sequences of probability 0: {impossible[:5]}"
    cells, pooled_o, pooled_e = [], 0, 0.0
    for k, p in probs.items():
        if p <= 0:
            continue
        e, o = n * p, observed.get(k, 0)
        if e < min_expected:
            pooled_o, pooled_e = pooled_o + o, pooled_e + e
        else:
            cells.append((o, e))
    if pooled_e > 0:
        cells.append((pooled_o, pooled_e))
    stat = sum((o - e) ** 2 / e for o, e in cells)
    return chi2_sf(stat, len(cells) - 1)


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a whole module (pytestmark = pytest.mark.usefixtures("one_thread")): its tensors
    are tiny and the 2 CI cores are shared."""
    import torch
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ---- Monte-Carlo checks against an exact value ------------------------------------------------------------------
def estimates(fn, n):
    """The mean of fn(0), ..., fn(n - 1) (numbers, or arrays: elementwise) and its standard error."""
    import math
    vals = np.array([np.asarray(fn(i), dtype=np.float64) for i in range(n)])
    return vals.mean(0), vals.std(0, ddof=1) / math.sqrt(n)


def assert_unbiased(mean, se, exact, wrong, what):
    """mean within 4 SE of exact, and every plausibly wrong value outside 8 SE of it (the check has power)."""
    assert abs(mean - exact) < 4 * se, f"{what}: mean {mean:.5f} vs exact {exact:.5f} (se {se:.5f})"
    for name, value in wrong.items():
        assert abs(value - exact) > 8 * se, f"{what}: the check cannot tell '{name}' ({value:.5f}) from {exact:.5f}"
