"""
Tests of the samplers in d3pm.py against an independent exact oracle.

The oracle (`exact_distribution`) runs the T-step ancestral process of
../shared/reference/nanodd-compat.md section 5 by dynamic programming over the partially
masked sequences: for t = T..1, from every state with probability mass, each masked position
independently unmasks w.p. (ab_{t-1} - ab_t) / (1 - ab_t), ab_t = 1 - t/T (computed here in
float64, not read from the model), to token k w.p. softmax of the network's logits at
(state, t) over the non-mask columns. With vocab 3 and L <= 4 the final distribution over the
3^L sequences is exact; the samplers' empirical distributions are compared with it by a
chi-square goodness-of-fit test (p-value computed here, no scipy needed), and the same test is
shown to reject deliberately wrong samplers.
"""
import itertools
import math
import os
import sys

import numpy as np
import pytest
import torch

from conftest import chi2_sf, chisquare_pvalue, randomize_weights

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from d3pm import D3PMAbsorbing  # noqa: E402
from sampling import draw  # noqa: E402

V = 3          # vocabulary of the toy model; mask id = 3
M = V          # mask id
T_TOY = 6


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny tensors, 2 cores shared


# ---- the chi-square p-value of conftest.py (torch.special.gammaincc) against tables -----------------
def test_chi2_sf_matches_tables():
    # classic table values: the 95% / 99.9% quantiles
    for stat, df, p in [(3.841459, 1, 0.05), (18.307038, 10, 0.05), (10.827566, 1, 0.001),
                        (101.879474, 80, 0.05), (124.839224, 80, 0.001), (2.0, 2, math.exp(-1.0))]:
        assert chi2_sf(stat, df) == pytest.approx(p, rel=1e-5), (stat, df)
    assert chi2_sf(10_000.0, 20) < 1e-300 or chi2_sf(10_000.0, 20) == 0.0
    try:
        from scipy.stats import chi2
    except ImportError:
        return
    for df in (1, 2, 7, 26, 80):
        for stat in (0.1, 1.0, df * 0.5, df, df + 3 * math.sqrt(2 * df), 5.0 * df + 40):
            assert chi2_sf(stat, df) == pytest.approx(chi2.sf(stat, df), rel=1e-8, abs=1e-300)


# ---- the toy model -----------------------------------------------------------------------------
def make_toy_model(T=T_TOY, seed=2):
    """A tiny D3PMAbsorbing with every parameter random, the zero-initialised adaLN layers
    included, scaled so that the predictions depend clearly on t and on the context without
    being extreme (vocab 3, eval mode, dropout 0)."""
    torch.manual_seed(0)
    model = D3PMAbsorbing(vocab_size=V, n_embed=16, n_heads=2, n_blocks=1, n_cond=8, dropout=0.0,
                          T=T, lambda_ce=0.05)
    return randomize_weights(model, seed).eval()


@pytest.fixture(scope="module")
def toy():
    return make_toy_model()


def ab(t, T):
    """alpha_bar_t = 1 - t/T, float64, from the spec (not from the model's buffers)."""
    return 1.0 - t / T


@torch.no_grad()
def predict(model, states, t):
    """p(x_0 | x_t) for a list of states: float64 (n, L, V), softmax over the non-mask logits of
    the raw network (independent of D3PMAbsorbing.logits' masking)."""
    x = torch.tensor(states, dtype=torch.long)
    logits = model.net(x, torch.full((len(states),), float(t)))
    return torch.softmax(logits[..., :V].double(), dim=-1).numpy()


def exact_distribution(model, start, schedule, time_shift=0):
    """Exact output distribution {final tuple: prob} of the process that, for each (t, u) of
    `schedule` in order, predicts with the network at time t (+ time_shift) and unmasks each
    masked position w.p. u to a draw from that prediction."""
    dist = {tuple(start): 1.0}
    for t, u in schedule:
        states = list(dist)
        preds = predict(model, states, t + time_shift)
        new = {}
        for state, pred in zip(states, preds):
            mass = dist[state]
            options = []
            for pos, tok in enumerate(state):
                if tok != M:
                    options.append([(tok, 1.0)])
                else:
                    opts = [(k, u * pred[pos, k]) for k in range(V)]
                    if u < 1.0:
                        opts.append((M, 1.0 - u))
                    options.append(opts)
            for combo in itertools.product(*options):
                p = mass
                for _, q in combo:
                    p *= q
                key = tuple(tok for tok, _ in combo)
                new[key] = new.get(key, 0.0) + p
        dist = new
    assert all(M not in k for k in dist), "the oracle ended with masked positions"
    total = sum(dist.values())
    assert abs(total - 1.0) < 1e-9
    return dist


def plain_schedule(T):
    """t = T..1, unmask probability (ab_{t-1} - ab_t) / (1 - ab_t)."""
    return [(t, (ab(t - 1, T) - ab(t, T)) / (1 - ab(t, T))) for t in range(T, 0, -1)]


def grid_schedule(T, steps):
    """The coarse grid: round(i T / steps) (half to even, as Python and torch round), then the exact
    skip-step posterior between consecutive grid points s > r: (ab_r - ab_s) / (1 - ab_s)."""
    grid = sorted({round(i * T / steps) for i in range(steps + 1)}, reverse=True)
    return [(s, (ab(r, T) - ab(s, T)) / (1 - ab(s, T))) for s, r in zip(grid[:-1], grid[1:])]


def draw_many(fn, start, n, batch=4000, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    x = torch.tensor([start] * batch, dtype=torch.long)
    for _ in range(n // batch):
        out.append(fn(x, g))
    return torch.cat(out)


# ---- deliberately wrong samplers (for the power checks) ----------------------------------------
@torch.no_grad()
def wrong_time_shift(model, x, g):
    """Ancestral sampler that feeds the network t + 1 instead of t."""
    x = x.clone()
    T = model.T
    for t, u in plain_schedule(T):
        probs = torch.softmax(model.net(x, torch.full((x.shape[0],), float(t + 1)))[..., :V].double(), -1)
        tok = torch.multinomial(probs.view(-1, V), 1, generator=g).view(x.shape)
        unmask = (x == M) & (torch.rand(x.shape, dtype=torch.float64, generator=g) < u)
        x[unmask] = tok[unmask]
    return x


@torch.no_grad()
def wrong_one_step(model, x, g):
    """Every masked position drawn at the single step t = T from the first prediction."""
    x = x.clone()
    probs = torch.softmax(model.net(x, torch.full((x.shape[0],), float(model.T)))[..., :V].double(), -1)
    tok = torch.multinomial(probs.view(-1, V), 1, generator=g).view(x.shape)
    return torch.where(x == M, tok, x)


# ---- exactness ----------------------------------------------------------------------------------
def test_toy_model_depends_on_time_and_context(toy):
    """Precondition of the power checks: the predictions change with t and with the context."""
    states = [s for s in itertools.product(range(V + 1), repeat=4)]
    p = {t: predict(toy, states, t) for t in range(1, T_TOY + 2)}
    for t in range(1, T_TOY + 1):
        assert np.abs(p[t] - p[t + 1]).mean() > 0.01, t
    assert np.abs(p[3] - p[3].mean(axis=0)).mean() > 0.05
    assert all(v.min() > 1e-3 for v in p.values())


ALL_MASK = (M, M, M, M)


@pytest.fixture(scope="module")
def exact_all_mask(toy):
    return exact_distribution(toy, ALL_MASK, plain_schedule(T_TOY))


def test_fast_sampler_matches_exact_distribution(toy, exact_all_mask):
    samples = draw_many(lambda x, g: toy.sample(x, generator=g)[0], ALL_MASK, 40_000, seed=11)
    assert samples.shape == (40_000, 4)
    p = chisquare_pvalue(samples, exact_all_mask)
    assert p > 1e-4, f"sample() does not follow the ancestral distribution (p = {p:.3g})"


def test_chi_square_rejects_wrong_samplers(toy, exact_all_mask):
    """The same test, same sample size, rejects samplers that are wrong in plausible ways."""
    for wrong in (wrong_time_shift, wrong_one_step):
        samples = draw_many(lambda x, g: wrong(toy, x, g), ALL_MASK, 40_000, seed=12)
        p = chisquare_pvalue(samples, exact_all_mask)
        assert p < 1e-8, f"{wrong.__name__} not rejected (p = {p:.3g}): the test has no power"
    # and the oracle of the time-shifted process agrees with that process (the oracle is not rigged)
    shifted = exact_distribution(toy, ALL_MASK, plain_schedule(T_TOY), time_shift=1)
    samples = draw_many(lambda x, g: wrong_time_shift(toy, x, g), ALL_MASK, 20_000, seed=13)
    assert chisquare_pvalue(samples, shifted) > 1e-4


def test_reference_ancestral_sampler_matches_exact_distribution(toy, exact_all_mask):
    samples = draw_many(lambda x, g: toy.sample_ancestral(x, generator=g), ALL_MASK, 20_000, seed=21)
    p = chisquare_pvalue(samples, exact_all_mask)
    assert p > 1e-4, f"sample_ancestral() does not follow the ancestral distribution (p = {p:.3g})"


@pytest.mark.parametrize("start", [(2, M, M, M), (M, 0, M, 1), (M, M, M, 2)], ids=["prompt", "infill", "suffix"])
def test_samplers_match_exact_distribution_from_partial_state(toy, start):
    exact = exact_distribution(toy, start, plain_schedule(T_TOY))
    fast = draw_many(lambda x, g: toy.sample(x, generator=g)[0], start, 20_000, seed=31)
    p = chisquare_pvalue(fast, exact)
    assert p > 1e-4, f"sample() from {start}: p = {p:.3g}"
    ref = draw_many(lambda x, g: toy.sample_ancestral(x, generator=g), start, 8_000, seed=32)
    p = chisquare_pvalue(ref, exact)
    assert p > 1e-4, f"sample_ancestral() from {start}: p = {p:.3g}"


@pytest.mark.parametrize("steps", [1, 3, 4])
def test_coarse_grid_sampler_matches_skip_step_process(toy, steps):
    """steps=N < T: the exact skip-step process between the points of the N-step grid."""
    exact = exact_distribution(toy, ALL_MASK, grid_schedule(T_TOY, steps))
    samples = draw_many(lambda x, g: toy.sample(x, steps=steps, generator=g)[0], ALL_MASK, 20_000, seed=41)
    p = chisquare_pvalue(samples, exact)
    assert p > 1e-4, f"sample(steps={steps}): p = {p:.3g}"


# ---- network calls -------------------------------------------------------------------------------
class NetRecorder:
    """Wraps model.net.forward, recording (input ids, time) of every network call."""

    def __init__(self, model, monkeypatch):
        self.calls = []
        orig = model.net.forward

        def forward(x, t):
            self.calls.append((x.clone(), t.clone()))
            return orig(x, t)

        monkeypatch.setattr(model.net, "forward", forward)


def unmask_times(start, snapshots):
    """From the callback snapshots [(x after the call, times of the rows that took part)], the
    per-row list of times at which the row had at least one position unmasked. Also checks that
    the rows that took part are exactly those with masks left, that each of them gains at least
    one token, and that tokens never change once set."""
    prev = start.clone()
    per_row = [[] for _ in range(start.shape[0])]
    for x, tr in snapshots:
        active = (prev == M).any(dim=1).nonzero().squeeze(1).tolist()
        assert len(active) == len(tr), "callback times do not match the rows with masks left"
        for j, b in enumerate(active):
            newly = (prev[b] == M) & (x[b] != M)
            assert newly.any(), f"row {b} took part in a call at t={int(tr[j])} without unmasking anything"
            per_row[b].append(int(tr[j]))
        set_before = prev != M
        assert torch.equal(x[set_before], prev[set_before]), "a set token changed"
        inactive = sorted(set(range(start.shape[0])) - set(active))
        assert torch.equal(x[inactive], prev[inactive])
        prev = x.clone()
    return per_row


@pytest.mark.parametrize("seed", range(6))
def test_call_count_single_row(toy, monkeypatch, seed):
    rec = NetRecorder(toy, monkeypatch)
    snaps = []
    L = 12
    start = torch.full((1, L), M)
    out, calls = toy.sample(start, generator=torch.Generator().manual_seed(seed),
                            callback=lambda x, t: snaps.append((x.clone(), t.clone())))
    times = [float(t) for _, tt in rec.calls for t in tt]
    assert calls == len(rec.calls) == len(snaps)
    assert all(a > b for a, b in zip(times, times[1:])), f"times not strictly decreasing: {times}"
    assert all(1 <= t <= T_TOY and t == int(t) for t in times)
    per_row = unmask_times(start, snaps)
    assert per_row[0] == [int(t) for t in times]
    # each call unmasks something and each position unmasks once: calls = number of distinct times
    assert calls == len(set(per_row[0]))
    # the network sees, at time t, exactly the positions that unmasked at later times
    for c, (x_in, _) in enumerate(rec.calls):
        before = start if c == 0 else snaps[c - 1][0]
        assert torch.equal(x_in, before)
    assert (out != M).all()


def test_call_count_batch_is_max_over_rows(toy, monkeypatch):
    rec = NetRecorder(toy, monkeypatch)
    B, L = 16, 5
    g = torch.Generator().manual_seed(5)
    start = torch.full((B, L), M)
    start[3, :] = torch.tensor([0, 1, 2, 0, 1])          # a row with nothing to do
    start[4, :4] = torch.tensor([2, 2, 2, 2])            # one masked position
    start[5, ::2] = 1                                    # an infill pattern
    snaps = []
    out, calls = toy.sample(start, generator=g, callback=lambda x, t: snaps.append((x.clone(), t.clone())))
    per_row = unmask_times(start, snaps)
    for b, times in enumerate(per_row):
        assert all(a > b_ for a, b_ in zip(times, times[1:])), f"row {b}: {times}"
    assert per_row[3] == []
    assert len(per_row[4]) == 1
    assert calls == len(rec.calls) == max(len(tt) for tt in per_row)
    # each network call gets exactly the rows with masks left, each at its own next time
    for (x_in, t_in), (_, tr) in zip(rec.calls, snaps):
        assert torch.equal(t_in.long(), tr.long())
        assert x_in.shape[0] == len(tr)
    assert (out != M).all()


def stub_logits(model):
    """A network stand-in (uniform prediction) to count calls fast: zeros, mask column -inf."""
    def logits(x, t):
        out = torch.zeros(x.shape + (model.vocab_size + 1,))
        out[..., model.mask_id] = float("-inf")
        return out
    return logits


@pytest.mark.parametrize("sampler", ["sample", "sample_ancestral"])
def test_unmasking_times_follow_the_schedule(toy, monkeypatch, sampler):
    """Each masked position unmasks at step t w.p. ab_{t-1} - ab_t = 1/T, independently of the
    network (reference section 5): the per-position unmasking times, read off the states the
    network is given, are uniform on 1..T (chi-square) and consecutive positions are independent."""
    inputs = []
    stub = stub_logits(toy)

    def logits(x, t):
        inputs.append((x.clone(), t.clone()))
        return stub(x, t)

    monkeypatch.setattr(toy, "logits", logits)
    B, L = 2000, 8
    start = torch.full((B, L), M)
    g = torch.Generator().manual_seed(17)
    times = torch.zeros((B, L), dtype=torch.long)
    if sampler == "sample":
        snaps = []
        out, _ = toy.sample(start, generator=g, callback=lambda x, t: snaps.append((x.clone(), t.clone())))
        prev = start
        for x, tr in snaps:
            active = (prev == M).any(dim=1).nonzero().squeeze(1)
            newly = (prev == M) & (x != M)
            row_time = torch.zeros(B, dtype=torch.long)
            row_time[active] = tr.long()
            times[newly] = row_time[:, None].expand(B, L)[newly]
            prev = x
    else:
        out = toy.sample_ancestral(start, generator=g)
        assert [int(t[0]) for _, t in inputs] == list(range(T_TOY, 0, -1)), "T calls, t = T..1"
        states = [x for x, _ in inputs] + [out]
        for (x, t), nxt in zip(inputs, states[1:]):
            times[(x == M) & (nxt != M)] = int(t[0])
    assert (out != M).all() and (times >= 1).all()
    counts = torch.bincount(times.flatten() - 1, minlength=T_TOY).double()
    e = B * L / T_TOY
    stat = float(((counts - e) ** 2 / e).sum())
    assert chi2_sf(stat, T_TOY - 1) > 1e-4, counts.tolist()
    # independence of neighbours: the joint of (time of pos 0, time of pos 1) is the product
    joint = torch.bincount((times[:, 0] - 1) * T_TOY + times[:, 1] - 1, minlength=T_TOY ** 2).double()
    e2 = B / T_TOY ** 2
    stat2 = float(((joint - e2) ** 2 / e2).sum())
    assert chi2_sf(stat2, T_TOY ** 2 - 1) > 1e-4


@pytest.fixture
def big_stub(monkeypatch):
    model = D3PMAbsorbing(vocab_size=27, n_embed=8, n_heads=2, n_blocks=1, n_cond=4, dropout=0.0,
                          T=1000, lambda_ce=0.05).eval()
    monkeypatch.setattr(model, "logits", stub_logits(model))
    return model


def test_expected_call_count_L256_T1000(big_stub):
    """E[calls] for one row = sum_t P(some position unmasks at t) = T (1 - (1 - 1/T)^L) ~ 226."""
    T, L = 1000, 256
    expected = T * (1 - (1 - 1 / T) ** L)
    assert 225 < expected < 227
    g = torch.Generator().manual_seed(0)
    counts = []
    for _ in range(24):
        out, calls = big_stub.sample(torch.full((1, L), 27), generator=g)
        assert (out < 27).all() and (out >= 0).all()
        counts.append(calls)
    mean = sum(counts) / len(counts)
    sd = (sum((c - mean) ** 2 for c in counts) / (len(counts) - 1)) ** 0.5
    assert 215 <= mean <= 237, counts
    assert abs(mean - expected) < 4 * sd / len(counts) ** 0.5 + 1e-9, (mean, expected, sd)
    # a batch advances in lock step: calls = the largest per-row count, so a bit more than one row's
    _, calls4 = big_stub.sample(torch.full((4, L), 27), generator=g)
    assert 215 <= calls4 <= 270


@pytest.mark.parametrize("steps", [1, 5, 37, 999])
def test_coarse_grid_calls_and_fill(big_stub, monkeypatch, steps):
    times = []
    orig = big_stub.logits

    def logits(x, t):
        times.append(t.clone())
        return orig(x, t)

    monkeypatch.setattr(big_stub, "logits", logits)
    L = 64
    start = torch.full((3, L), 27)
    start[1, :10] = 5
    out, calls = big_stub.sample(start, steps=steps, generator=torch.Generator().manual_seed(steps))
    assert calls <= steps and calls == len(times)
    assert (out != 27).all()
    assert (out[1, :10] == 5).all()
    grid = {round(i * 1000 / steps) for i in range(steps + 1)}
    assert {int(t) for tt in times for t in tt} <= grid
    if steps == 1:
        assert calls == 1 and int(times[0][0]) == 1000


def test_steps_at_least_T_is_the_exact_sampler(toy):
    """steps >= T is the exact sampler: with the same generator state the same draws."""
    x = torch.full((50, 4), M)
    a, ca = toy.sample(x, generator=torch.Generator().manual_seed(3))
    b, cb = toy.sample(x, steps=T_TOY, generator=torch.Generator().manual_seed(3))
    c, cc = toy.sample(x, steps=10 * T_TOY, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and torch.equal(a, c) and ca == cb == cc


# ---- given tokens and ranges ---------------------------------------------------------------------
@pytest.mark.parametrize("sampler,steps", [("sample", None), ("sample", 2), ("sample_ancestral", None)])
def test_given_tokens_kept_and_outputs_valid(toy, sampler, steps):
    g = torch.Generator().manual_seed(7)
    B, L = 64, 10
    start = torch.full((B, L), M)
    given = torch.rand(B, L, generator=g) < 0.4
    given[:8, :] = False                                 # all-mask rows
    given[8:16, :4] = True                               # prompts
    given[8:16, 4:] = False
    given[16:24, :] = True                               # nothing to generate
    start[given] = torch.randint(0, V, (int(given.sum()),), generator=g)
    if sampler == "sample":
        out, calls = toy.sample(start, steps=steps, generator=g)
        assert calls <= (steps or T_TOY)
    else:
        out = toy.sample_ancestral(start, generator=g)
    assert out.shape == start.shape and out.dtype == start.dtype
    assert torch.equal(out[given], start[given]), "a given token was changed"
    assert (out != M).all(), "a mask survived"
    assert ((out >= 0) & (out < V)).all()
    assert torch.equal(start[16:24], out[16:24])


def test_sample_does_not_modify_its_input(toy):
    x = torch.full((4, 4), M)
    x[:, 0] = 1
    keep = x.clone()
    toy.sample(x, generator=torch.Generator().manual_seed(0))
    toy.sample_ancestral(x, generator=torch.Generator().manual_seed(0))
    assert torch.equal(x, keep)


def test_nothing_to_do_makes_no_call(toy, monkeypatch):
    rec = NetRecorder(toy, monkeypatch)
    x = torch.zeros((3, 4), dtype=torch.long)
    out, calls = toy.sample(x, generator=torch.Generator().manual_seed(0))
    assert calls == 0 and rec.calls == [] and torch.equal(out, x)


def test_sampling_is_reproducible_with_a_generator(toy):
    x = torch.full((200, 4), M)
    a, _ = toy.sample(x, generator=torch.Generator().manual_seed(9))
    b, _ = toy.sample(x, generator=torch.Generator().manual_seed(9))
    c, _ = toy.sample(x, generator=torch.Generator().manual_seed(10))
    assert torch.equal(a, b) and not torch.equal(a, c)


# ---- draw --------------------------------------------------------------------------------------
def test_draw_rare_classes_at_binomial_frequency(toy):
    """Gumbel-max in float64: classes of probability 1e-4 and 2e-5 come out at their rate,
    float32 logits with a large offset are fine, and the -inf mask column is never drawn."""
    probs = torch.tensor([1 - 1e-4 - 2e-5, 1e-4, 2e-5], dtype=torch.float64)
    n = 2_000_000
    logits = torch.empty(n, 4, dtype=torch.float32)
    logits[:, :3] = (probs.log() + 50.0).float()
    logits[:, 3] = float("-inf")
    out = draw(logits, generator=torch.Generator().manual_seed(1))
    assert out.shape == (n,)
    counts = torch.bincount(out, minlength=4).double()
    assert counts[3] == 0
    for k in range(3):
        p = float(logits[0, :3].double().softmax(-1)[k])
        sd = math.sqrt(n * p * (1 - p))
        assert abs(counts[k] - n * p) < 4.5 * sd, (k, counts[k], n * p)


def test_draw_matches_categorical_chi_square(toy):
    g = torch.Generator().manual_seed(2)
    logits = torch.tensor([[0.3, -1.2, 2.0, 0.0, float("-inf"), -4.0]]).repeat(200_000, 1)
    out = draw(logits, generator=g)
    p = torch.softmax(logits[0].double(), -1).numpy()
    counts = np.bincount(out.numpy(), minlength=6)
    assert counts[4] == 0
    keep = p > 0
    e = len(out) * p[keep]
    stat = float(((counts[keep] - e) ** 2 / e).sum())
    assert chi2_sf(stat, int(keep.sum()) - 1) > 1e-4
    # rows are independent and each uses its own logits
    rows = torch.tensor([[0.0, float("-inf"), float("-inf")], [float("-inf"), 0.0, float("-inf")]]).repeat(1000, 1)
    assert torch.equal(draw(rows, generator=g), torch.tensor([0, 1]).repeat(1000))


def test_draw_works_in_float64():
    """The Gumbel noise is float64: a difference of logits below float32 resolution still counts
    (float32 noise could not represent logits 1e-9 apart, float64 logits are kept as such)."""
    big = 1e8  # float32 spacing at 1e8 is 8: logits big and big + 1 are distinct only in float64
    logits = torch.tensor([[big, big + 1.0, float("-inf")]], dtype=torch.float64).repeat(100_000, 1)
    model = D3PMAbsorbing(vocab_size=2, n_embed=8, n_heads=2, n_blocks=1, n_cond=4, dropout=0.0, T=4, lambda_ce=0.05)
    out = draw(logits, generator=torch.Generator().manual_seed(0))
    frac1 = float((out == 1).double().mean())
    p1 = 1 / (1 + math.exp(-1.0))
    assert abs(frac1 - p1) < 4.5 * math.sqrt(p1 * (1 - p1) / len(out))
