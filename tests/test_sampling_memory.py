"""The samplers' float64 work goes a chunk of rows at a time (sampling.CHUNK_ELEMENTS), without changing a draw:
every sampler path gives bit-identical outputs chunked (1 or 3 rows) and unchunked for a fixed seed, and draw /
drawn_probability / the max-margin scores equal the unchunked float64 formulas they replace. What memory they use:
no float64 tensor larger than a chunk, one float32 copy of the drawn rows' logits, the network's output freed
before its next call, and at GPT-2's K one confidence step needs at most 2.5x the float32 logits beyond a forward
pass (bench.py --mode=sample_memory's measurement, in fresh processes)."""
import json
import math
import os
import subprocess
import sys
import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import sampling
from sampling import (confidence_decode, draw, drawn_probability, filter_logits, remask_decode, threshold_decode,
                      top_two, unmask_at_event_times)

pytestmark = pytest.mark.usefixtures("one_thread")

K = 301  # classes, the last one the mask
MASK = K - 1
B, L = 3, 24


def reference_draw(logits, generator=None, temperature=1.0, top_k=0, top_p=1.0):
    """draw() as it was before chunking: the whole (N, K) block in float64 at once."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = filter_logits(logits, temperature, top_k, top_p).softmax(dim=-1)
    u = torch.rand(probs.shape[0], dtype=torch.float64, device=logits.device, generator=generator)
    cdf = probs.cumsum(dim=-1)
    return torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True).squeeze(1).clamp(max=probs.shape[1] - 1)


def reference_probability(logits, tokens, temperature=1.0, top_k=0, top_p=1.0):
    probs = filter_logits(logits, temperature or 1.0, top_k, top_p).softmax(dim=-1)
    return probs.gather(-1, tokens[:, None]).squeeze(-1)


def net(x, t):
    """A fake network: sharp logits that depend on every token of the row and on t; mask logit -inf."""
    g = torch.Generator().manual_seed(0)
    table = 4 * torch.randn(K, K, generator=g)
    logits = table[x] + (x.sum(1, keepdim=True) % 7)[..., None] * table[(x + 1) % K] / 10
    logits = logits + torch.as_tensor(t, dtype=torch.float32).reshape(-1, 1, 1) * table[:1]
    logits[..., MASK] = float("-inf")
    return logits


def start():
    """Rows with a few given tokens, the rest masked."""
    g = torch.Generator().manual_seed(1)
    x = torch.randint(MASK, (B, L), generator=g)
    return torch.where(torch.rand(B, L, generator=g) < 0.8, torch.full_like(x, MASK), x)


def run_draw(opts):
    logits = net(start(), torch.ones(B))[start() == MASK]
    gen = torch.Generator().manual_seed(2)
    drawn = draw(logits, gen, **opts)
    return drawn, drawn_probability(logits, drawn, **opts), top_two(logits)


def run_event_times(whole_batch):
    g = torch.Generator().manual_seed(3)
    tau = (torch.randint(1, 6, (B, L), generator=g) / 5).double()
    u = torch.rand(B, L, dtype=torch.float64, generator=g)
    return unmask_at_event_times(net, start(), tau, u, MASK, whole_batch=whole_batch, top_p=0.9)


SAMPLERS = {  # name -> run() -> outputs to compare
    **{f"draw_{name}": (lambda opts=opts: run_draw(opts)) for name, opts in {
        "plain": {}, "temperature": dict(temperature=0.7), "top_k": dict(top_k=5), "top_p": dict(top_p=0.8),
        "all": dict(temperature=1.3, top_k=40, top_p=0.95), "argmax": dict(temperature=0)}.items()},
    **{f"confidence_{score}": (lambda score=score: confidence_decode(
        net, start(), [1.0, 0.75, 0.5, 0.25], MASK, torch.Generator().manual_seed(4), score=score, top_p=0.9))
       for score in ("drawn", "max", "margin")},
    "confidence_temperature0": lambda: confidence_decode(net, start(), [1.0, 0.5], MASK,
                                                         torch.Generator().manual_seed(4), temperature=0),
    **{f"threshold_whole_batch{w}": (lambda w=w: threshold_decode(
        net, start(), MASK, 0.5, torch.Generator().manual_seed(5), whole_batch=w, temperature=0.8))
       for w in (False, True)},
    "remask": lambda: remask_decode(net, start(), [1.0, 0.75, 0.5, 0.25, 0.0], lambda t: 1 - t, MASK,
                                    torch.Generator().manual_seed(6), eta=0.3, top_k=20),
    **{f"event_times_whole_batch{w}": (lambda w=w: run_event_times(w)) for w in (False, True)},
}


def equal(a, b):
    return all(torch.equal(p, q) if torch.is_tensor(p) else p == q for p, q in zip(tree_leaves(a), tree_leaves(b)))


@pytest.mark.parametrize("name", SAMPLERS)
def test_chunked_samplers_are_bit_identical(name, monkeypatch):
    # catches: uniforms drawn per chunk (another order of the generator), rows mixed up between chunks
    unchunked = SAMPLERS[name]()
    for rows in (1, 3):
        monkeypatch.setattr(sampling, "CHUNK_ELEMENTS", rows * K)
        assert equal(SAMPLERS[name](), unchunked), f"{rows} rows per chunk changes the output"


@pytest.mark.parametrize("opts", [{}, dict(temperature=0.7, top_k=5), dict(top_p=0.8), dict(temperature=0)])
def test_chunked_draws_equal_the_float64_formulas(opts, monkeypatch):
    # catches: a chunked draw that no longer equals the whole-block float64 draw of before (another rounding)
    monkeypatch.setattr(sampling, "CHUNK_ELEMENTS", 3 * K)
    logits = net(start(), torch.ones(B))[start() == MASK]
    drawn, prob, top2 = run_draw(opts)
    assert torch.equal(drawn, reference_draw(logits, torch.Generator().manual_seed(2), **opts))
    assert torch.equal(prob, reference_probability(logits, drawn, **opts))
    assert torch.equal(top2, torch.softmax(logits.double(), -1).topk(2, -1).values)


class Allocations(TorchDispatchMode):
    """Every tensor an op creates outside the network (paused while it runs): (dtype, numel, is a view)."""
    def __init__(self):
        super().__init__()
        self.paused, self.made = False, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not self.paused:
            self.made += [(t.dtype, t.numel(), func.is_view) for t in tree_leaves(out) if torch.is_tensor(t)]
        return out


@pytest.mark.parametrize("name", [n for n in SAMPLERS if n != "draw_argmax"])
def test_float64_work_is_one_chunk_and_the_logits_are_copied_once(name, monkeypatch):
    # catches: a float64 copy of all N x K logits (softmax, cumsum, sort of the whole block), a second float32 copy
    # of the logits (logits[rows][masked])
    rows = 3
    monkeypatch.setattr(sampling, "CHUNK_ELEMENTS", rows * K)
    mode, plain, plain_draw, drawn_rows = Allocations(), net, sampling.draw, []

    def paused(x, t):
        mode.paused = True
        try:
            return plain(x, t)
        finally:
            mode.paused = False

    def counted(logits, *args, **kwargs):
        drawn_rows.append(logits.shape[0])
        return plain_draw(logits, *args, **kwargs)
    monkeypatch.setattr(sys.modules[__name__], "net", paused)
    monkeypatch.setattr(sampling, "draw", counted)
    monkeypatch.setattr(sys.modules[__name__], "draw", counted)
    with mode:
        SAMPLERS[name]()
    float64 = [m for dtype, m, _ in mode.made if dtype == torch.float64]
    assert max(float64) <= max(rows * K, B * L), "a float64 tensor larger than a chunk"
    float32 = sum(m for dtype, m, view in mode.made if dtype == torch.float32 and not view and m >= K)  # rows of logits
    assert float32 <= sum(drawn_rows) * K, "more float32 logits copied than the rows drawn"


@pytest.mark.parametrize("name", [n for n in SAMPLERS if not n.startswith("draw")])
def test_the_network_output_is_freed_before_the_next_call(name, monkeypatch):
    # catches: `logits = logits_fn(...)` keeping the previous step's logits (and their masked copy) alive while
    # the network runs again: twice the logits at every call
    alive = []
    plain = net

    def watched(x, t):
        assert all(r() is None for r in alive), "the previous call's logits are still alive"
        out = plain(x, t)
        alive.append(weakref.ref(out))
        return out
    monkeypatch.setattr(sys.modules[__name__], "net", watched)
    SAMPLERS[name]()
    assert len(alive) >= 2


def peak_mb(child):
    code = f"import bench, torch; bench.bench_sample_memory(None, torch.device('cpu'), child={child!r})"
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="1")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.splitlines()[-1])["peak_MB"]


def test_a_confidence_step_at_gpt2_vocabulary_needs_at_most_2_5x_the_logits():
    # catches: the float64 softmax / cumsum of all 2 x 1024 masked rows at K = 50258 (5x the logits before chunking)
    logits_mb = 2 * 1024 * 50258 * 4 / 2**20
    ratio = (peak_mb("mdlm_confidence:sample") - peak_mb("mdlm:forward")) / logits_mb
    assert ratio <= 2.5, f"one confidence step needs {ratio:.2f}x the logits beyond a forward pass"
