"""
The bound estimator of evaluate.py against the exact T-step bound of a tiny model.

The exact bound of a sequence x_0 (nats per token, ../shared/reference/nanodd-compat.md section 4)
    L_T(x_0) = sum_{t=1}^{T-1} E_{x_{t+1} ~ q(.|x_0)} [ sum_pos KL(q(x_t | x_{t+1}, x_0) || p(x_t | x_{t+1})) ]
             + E_{x_1 ~ q(.|x_0)} [ sum_pos -log p(x_0 | x_1) ]          (divided by L)
is computed here by enumerating all 2^L mask patterns of x_{t+1} (each position masked w.p.
1 - alpha_bar_{t+1}) with the KL taken between full K-class posteriors built from the
one-step transition matrices Q_t (float64), so it uses neither loss_terms nor the closed form
w_t * CE. evaluate.estimate's batch estimates are then checked for unbiasedness and for the
calibration of their standard error, and the same check is shown to catch biased estimators.
"""
import itertools
import math
import os
import sys

import numpy as np
import pytest
import torch

from conftest import randomize_weights

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import evaluate  # noqa: E402
from d3pm import D3PMAbsorbing  # noqa: E402
from common import open_split  # noqa: E402

V, T, L = 3, 6, 4
M = V
K = V + 1


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny tensors, 2 cores shared


def make_toy_model(seed=2):
    """Tiny D3PMAbsorbing, every parameter random (the zero-initialised adaLN layers included)."""
    torch.manual_seed(0)
    model = D3PMAbsorbing(vocab_size=V, n_embed=16, n_heads=2, n_blocks=1, n_cond=8, dropout=0.0,
                          T=T, lambda_ce=0.05)
    return randomize_weights(model, seed).eval()


# ---- the exact bound -----------------------------------------------------------------------------
def transition_matrices(T):
    """Q[t][i, j] = q(x_t = j | x_{t-1} = i), Qbar[t] = Q[1] ... Q[t] (float64), beta_t = 1/(T-t+1)."""
    Q, Qbar = [np.eye(K)], [np.eye(K)]
    for t in range(1, T + 1):
        beta = 1.0 / (T - t + 1)
        q = np.zeros((K, K))
        for i in range(V):
            q[i, i], q[i, M] = 1 - beta, beta
        q[M, M] = 1.0
        Q.append(q)
        Qbar.append(Qbar[-1] @ q)
    return Q, Qbar


@torch.no_grad()
def exact_bound(model, x0):
    """L_T(x0) in nats per token by enumeration (see the module docstring)."""
    Q, Qbar = transition_matrices(T)
    patterns = list(itertools.product([False, True], repeat=len(x0)))
    total = 0.0
    for s in range(1, T + 1):  # the network sees x_s at time s; s = t + 1
        m = 1 - Qbar[s][0, 0]  # P(masked at time s) = 1 - alpha_bar_s
        xs = [[M if masked else tok for masked, tok in zip(pat, x0)] for pat in patterns]
        logits = model.net(torch.tensor(xs), torch.full((len(xs),), float(s)))
        p0 = torch.softmax(logits[..., :V].double(), -1).numpy()  # (2^L, L, V)
        for pat, x, pred in zip(patterns, xs, p0):
            prob = np.prod([m if masked else 1 - m for masked in pat])
            if prob == 0:
                continue
            if s == 1:  # reconstruction: -log p(x_0 | x_1) at every position
                total += prob * sum(-math.log(pred[i, x0[i]]) for i in range(len(x0)))
                continue
            t = s - 1
            for i in range(len(x0)):
                back = Q[s][:, x[i]]                              # q(x_s | x_t = .)
                q_post = back * Qbar[t][x0[i], :]
                q_post = q_post / q_post.sum()
                p_post = back * (pred[i] @ Qbar[t][:V, :])      # sum_x0' p(x0') q(x_t | x0') q(x_s | x_t)
                p_post = p_post / p_post.sum()
                nz = q_post > 0
                total += prob * float((q_post[nz] * np.log(q_post[nz] / p_post[nz])).sum())
    return total / len(x0)


@pytest.fixture(scope="module")
def toy():
    return make_toy_model()


# a tiny "dataset": 8 tokens, so 5 windows of length 4, each drawn w.p. 1/5
DATA = np.array([0, 2, 1, 1, 0, 2, 2, 1], dtype=np.uint16)


@pytest.fixture(scope="module")
def exact_data_bpt(toy):
    windows = [tuple(int(v) for v in DATA[i:i + L]) for i in range(len(DATA) - L + 1)]
    return float(np.mean([exact_bound(toy, w) for w in windows])) / math.log(2)


def test_exact_bound_oracle_agrees_with_closed_form(toy):
    """Sanity of the oracle itself: the posterior KL equals w_t * CE on masked positions, the
    model-independent identity the objective rests on (checked here on the full matrices)."""
    Q, Qbar = transition_matrices(T)
    rng = np.random.default_rng(0)
    for t in range(1, T):
        pred = rng.dirichlet(np.ones(V))
        for x0 in range(V):
            back = Q[t + 1][:, M]
            q_post = back * Qbar[t][x0, :]
            q_post /= q_post.sum()
            p_post = back * (pred @ Qbar[t][:V, :])
            p_post /= p_post.sum()
            nz = q_post > 0
            kl = float((q_post[nz] * np.log(q_post[nz] / p_post[nz])).sum())
            w = 1.0 / (t + 1)
            assert kl == pytest.approx(-w * math.log(pred[x0]), rel=1e-10, abs=1e-12)
    assert 0 < exact_bound(toy, (0, 1, 2, 0)) < 20


# ---- the stratified time schedule ---------------------------------------------------------------
@pytest.mark.parametrize("B", [2, 4, 6, 13])
def test_batch_times_cover_1_to_T_minus_1_uniformly(toy, monkeypatch, B):
    """Row 0 is seen at time 1 (t = 0); over a uniform offset the KL rows' t is uniform on 1..T-1."""
    seen = []
    orig = toy.logits

    def logits(x, t):
        seen.append(t.clone())
        return orig(x, t)

    monkeypatch.setattr(toy, "logits", logits)
    hist = np.zeros(T + 1)
    n_u = 150  # evenly spaced offsets: the histogram is uniform up to 1/n_u; a wrong schedule is off by ~1/(T-1)
    x0 = torch.zeros((B, L), dtype=torch.long)
    for k in range(n_u):
        toy.batch_bound(x0, (k + 0.5) / n_u, torch.Generator().manual_seed(k))
        t = seen[-1].long()
        assert len(seen) == k + 1, "one network call per batch"
        assert t[0] == 1 and t.shape == (B,)
        assert ((t[1:] >= 2) & (t[1:] <= T)).all()
        assert (t[1:].diff() >= 0).all()
        hist += np.bincount(t[1:].numpy() - 1, minlength=T + 1)
    freq = hist[1:T] / hist.sum()
    assert np.allclose(freq, 1 / (T - 1), atol=0.5 / n_u), freq


# ---- unbiasedness and calibration ----------------------------------------------------------------
N_REPS, N_BATCHES, BATCH = 200, 20, 8


def run_estimates(model, reps=N_REPS):
    """`reps` independent runs of evaluate.estimate (N_BATCHES batch estimates each, bits)."""
    return [evaluate.estimate(model, DATA, BATCH, L, target_se=0.0, max_batches=N_BATCHES, seed=seed)
            for seed in range(reps)]


def check_unbiased(runs, exact):
    pooled = [e for run in runs for e in run]
    mean, se = evaluate.summarize(pooled)
    return abs(mean - exact) < 4 * se, mean, se


@pytest.fixture(scope="module")
def runs(toy):
    with torch.no_grad():
        return run_estimates(toy)


def test_estimate_is_unbiased(runs, exact_data_bpt):
    assert all(len(r) == N_BATCHES for r in runs)
    ok, mean, se = check_unbiased(runs, exact_data_bpt)
    assert ok, f"mean {mean:.5f} +- {se:.5f} bits vs exact {exact_data_bpt:.5f}"
    assert se < 0.02 * exact_data_bpt  # the test is sharp enough to mean something


def test_standard_error_is_calibrated(runs, exact_data_bpt):
    covered = 0
    for run in runs:
        mean, se = evaluate.summarize(run)
        covered += mean - 1.96 * se <= exact_data_bpt <= mean + 1.96 * se
    frac = covered / len(runs)
    assert 0.88 <= frac <= 0.99, f"95% intervals cover the exact bound in {frac:.3f} of runs"


def biased_batch_estimate(variant):
    """D3PMAbsorbing.batch_bound with one plausible mistake."""
    def fn(model, x0, offset, generator=None, **protocol_options):  # (T=None from evaluate.estimate)
        B = x0.shape[0]
        i = torch.arange(B - 1, dtype=torch.float64)
        t_kl = 1 + torch.floor((i + offset) / (B - 1) * (T - 1)).long().clamp(max=T - 2)
        t = torch.cat([torch.zeros(1, dtype=torch.long), t_kl])
        x_noisy = model.q_sample(x0, t + 1, generator)
        kl, ce = model.loss_terms(model.logits(x_noisy, t + 1), x0, x_noisy, t)
        if variant == "weight_T":
            return T * kl[1:].double().mean() + ce[0].double().mean()
        if variant == "no_t0_term":
            return (T - 1) * kl[1:].double().mean()
        raise ValueError(variant)
    return fn


@pytest.mark.parametrize("variant", ["weight_T", "no_t0_term"])
def test_unbiasedness_check_detects_biased_estimators(toy, exact_data_bpt, monkeypatch, variant):
    """The check of test_estimate_is_unbiased, with a fifth of its runs (so a standard error sqrt(5) times
    larger: harder to tell a bias apart), still rejects each plausible mistake (by 20+ standard errors)."""
    monkeypatch.setattr(D3PMAbsorbing, "batch_bound", biased_batch_estimate(variant))
    with torch.no_grad():
        runs = run_estimates(toy, reps=N_REPS // 5)
    ok, mean, se = check_unbiased(runs, exact_data_bpt)
    assert not ok, f"{variant}: mean {mean:.5f} +- {se:.5f} not told apart from exact {exact_data_bpt:.5f}"


def test_single_sequence_batch_estimate_unbiased(toy):
    """Direct calls: a batch of 3 copies of one sequence (strata of width 5/2 t-values)."""
    x = (2, 0, 0, 1)
    exact = exact_bound(toy, x)
    x0 = torch.tensor([x] * 3)
    g = torch.Generator().manual_seed(123)
    vals = []
    with torch.no_grad():
        for _ in range(3000):
            vals.append(float(toy.batch_bound(x0, float(torch.rand((), generator=g)), g)))
    mean, se = evaluate.summarize(vals)
    assert abs(mean - exact) < 4 * se, (mean, se, exact)


# ---- stopping rule of estimate --------------------------------------------------------------------
@pytest.fixture
def tiny_split(tmp_path):
    d = tmp_path / "toy"
    d.mkdir()
    rng = np.random.default_rng(0)
    np.save(d / "test.npy", rng.integers(0, V, 500).astype(np.uint16))
    return open_split(str(d), "test")


def test_estimate_stops_at_max_batches(toy, tiny_split):
    est = evaluate.estimate(toy, tiny_split, 4, 8, target_se=0.0, max_batches=7, seed=1)
    assert len(est) == 7
    assert all(math.isfinite(e) and e > 0 for e in est)
    # huge target: stops as soon as min_batches (10) estimates are in
    est = evaluate.estimate(toy, tiny_split, 4, 8, target_se=1e9, max_batches=100, seed=1)
    assert len(est) == 10


def test_estimate_stops_when_se_below_target(toy, tiny_split):
    pilot = evaluate.estimate(toy, tiny_split, 4, 8, target_se=0.0, max_batches=60, seed=3)
    ses = [evaluate.summarize(pilot[:n])[1] for n in range(1, 61)]
    # a target between the standard errors at some n > 10 and the largest one after it
    n_stop = next(n for n in range(20, 60) if ses[n - 1] < min(ses[9:n - 1]) - 1e-6)
    target = (ses[n_stop - 1] + min(ses[9:n_stop - 1])) / 2
    est = evaluate.estimate(toy, tiny_split, 4, 8, target_se=target, max_batches=0, seed=3)
    assert est == pilot[:n_stop]
    assert evaluate.summarize(est)[1] < target
    assert all(evaluate.summarize(est[:n])[1] >= target for n in range(10, n_stop))


def test_estimate_same_seed_same_result(toy, tiny_split):
    a = evaluate.estimate(toy, tiny_split, 4, 8, target_se=0.0, max_batches=3, seed=5)
    b = evaluate.estimate(toy, tiny_split, 4, 8, target_se=0.0, max_batches=3, seed=5)
    c = evaluate.estimate(toy, tiny_split, 4, 8, target_se=0.0, max_batches=3, seed=6)
    assert a == b and a != c


def test_summarize():
    assert evaluate.summarize([1.0, 3.0]) == (2.0, 1.0)
    mean, se = evaluate.summarize([5.0])
    assert mean == 5.0 and se == math.inf


# ---- batches of one window -------------------------------------------------------------------------
def test_one_row_batch_estimate_unbiased(toy):
    """A one-window batch (a zero-shot set of one window): the row takes t = floor(U T), weight T; the mean over
    offsets and masks is the exact bound of the enumeration, and each offset stratum shows its own time t + 1."""
    x = (2, 0, 0, 1)
    exact = exact_bound(toy, x)
    x0 = torch.tensor([x])
    g = torch.Generator().manual_seed(7)
    vals = []
    with torch.no_grad():
        for _ in range(3000):
            vals.append(float(toy.batch_bound(x0, float(torch.rand((), generator=g)), g)))
    assert all(math.isfinite(v) for v in vals)
    mean, se = evaluate.summarize(vals)
    assert abs(mean - exact) < 4 * se, (mean, se, exact)
    seen = []
    orig = toy.logits
    try:
        toy.logits = lambda x, t: seen.append(int(t[0])) or orig(x, t)
        with torch.no_grad():
            for k in range(T):
                toy.batch_bound(x0, (k + 0.5) / T, g)
    finally:
        del toy.logits
    assert seen == [k + 1 for k in range(T)]


def tiny_family(name, V=5):
    import families
    args = dict(vocab_size=V, n_embed=16, n_heads=2, n_blocks=1, n_cond=8, dropout=0.0)
    args.update({"D3PMAbsorbing": dict(T=6, lambda_ce=0.05), "BD3LM": dict(block_size=2)}.get(name, {}))
    torch.manual_seed(0)
    return randomize_weights(families.FAMILIES[name](**args), seed=1).eval()


@pytest.mark.parametrize("name", ["D3PMAbsorbing", "MDLM", "AR", "BD3LM", "GenMD4", "Duo"])
def test_every_family_one_row_batch_matches_larger_batches(name):
    """Every family's batch_bound takes a batch of one row: finite, and its mean over offsets and draws agrees with
    the mean of batches of 4 copies of the row (both unbiased for the row's bound)."""
    model = tiny_family(name)
    x = torch.tensor([[1, 4, 0, 2, 2, 3, 0, 1]])
    g = torch.Generator().manual_seed(11)
    means = {}
    with torch.no_grad():
        for B, n in ((1, 2400), (4, 600)):
            vals = [float(model.batch_bound(x.repeat(B, 1), float(torch.rand((), generator=g)), g)) for _ in range(n)]
            assert all(math.isfinite(v) for v in vals), (name, B)
            means[B] = evaluate.summarize(vals)
    (m1, s1), (m4, s4) = means[1], means[4]
    assert abs(m1 - m4) < 4.5 * math.hypot(s1, s4) + 1e-6, (name, means)  # AR: exact, float32 batching


def test_batches_of_one_window(tmp_path, tiny_text8):
    """--batch_size 1 is allowed now that every family's batch_bound takes one row (the D3PM's used to be NaN)."""
    import contextlib
    import io

    import evaluate
    from conftest import call_main
    from test_distill_cli import write_untrained
    ckpt = write_untrained(tmp_path / "d3pm.pt", "d3pm_tiny")
    with contextlib.redirect_stdout(io.StringIO()):
        res = call_main(evaluate, [ckpt, "--data_dir", os.path.join(tiny_text8, "text8"), "--batch_size", "1",
                                   "--max_batches", "20", "--device", "cpu", "--json"])
    assert res["batches"] == 20 and math.isfinite(res["bpt"]) and math.isfinite(res["se"])
