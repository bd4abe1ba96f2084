"""
Independent-oracle tests of conditional MDLM and BD3-LM (families.py's `clean` mask: the prompt, given, never
noised, never scored; the bound per scored token).

The oracle, by brute force on a tiny vocabulary (V = 3, mask id 3) and length (L = 3 for MDLM, L = 4 in blocks
of 2 for BD3-LM): for every row (x_0, prompt C), every non-empty subset S of its unclean positions U (of its
block's unclean positions U_b for BD3-LM; the prompt never masked) and any time t, CE_S(t) = sum_{l in S}
-log p(x_0^l | x_0 with S masked) from the network's first V logits with our own float64 softmax (BD3-LM:
test_bd3lm.oracle_logp, its own loop-built attention mask). Then, with n = |U| (n_b = |U_b|), k = |S| and
u = 1 - alpha(t):
    continuous NELBO(x_0^U | x_0^C) = int_0^1 w(t) sum_S u^k (1 - u)^(n-k) CE_S(t) dt
        (time-free network: sum_S (k-1)! (n-k)! / n! CE_S; time-conditioned: Gauss-Legendre in t),
    N-step bound = sum_i (alpha(s_i) - alpha(t_i)) / (1 - alpha(t_i)) sum_S u_i^k (1 - u_i)^(n-k) CE_S(t_i),
    forward at a fixed t: E[loss] = w(t) sum_S u^k (1 - u)^(n-k) CE_S(t) / n,
each row divided by its n, then averaged over the rows; batches mix prompt lengths. Unbiasedness as in
test_mdlm: the mean of many estimates within 4 standard errors, plausibly wrong values (the prompt noised,
i.e. the unconditional bound; / L instead of / n; MDLM's Beta(k, L - k + 1) time) at least 8 away, and the
estimator run with clean=None (the mutation that noises the prompt) rejected by the same criterion.
"""
import itertools
import math

import numpy as np
import pytest
import torch

from bd3lm import BD3LM
from conftest import randomize_weights
from mdlm import MDLM
from test_bd3lm import oracle_logp
from test_mdlm import alpha, assert_unbiased, du_dt, estimates, gauss_legendre, weight

V = M = 3
pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny tensors, 2 cores shared


MDLM_SEED = 19  # weights for which the prompt's own cross-entropy differs clearly from the rest (power)


def make_mdlm(tc=False, schedule="linear", seed=MDLM_SEED, **kw):
    torch.manual_seed(0)
    return randomize_weights(MDLM(V, 16, 2, 1, 8, 0.0, schedule=schedule, time_conditioning=tc, **kw), seed).eval()


def make_bd3lm(seed=14, schedule="linear"):
    torch.manual_seed(0)
    return randomize_weights(BD3LM(V, 16, 2, 1, 8, 0.0, block_size=2, schedule=schedule), seed).eval()


def prompt_rows(seqs, prompt_lengths, L):
    """Every sequence with every prompt length (a prefix held clean): x0 (R, L) long, clean (R, L) bool."""
    x0 = torch.tensor([s for p in prompt_lengths for s in seqs])
    clean = torch.tensor([[l < p for l in range(L)] for p in prompt_lengths for _ in seqs])
    return x0, clean


def subsets(positions):
    return [S for r in range(1, len(positions) + 1) for S in itertools.combinations(positions, r)]


# ---- the brute-force oracles ------------------------------------------------------------------------------
def mdlm_pairs(x0, clean):
    """Every (row, S), S a non-empty subset of the row's unclean positions: x_t (P, L), row (P,), k, n (P,)."""
    xts, rows, ks, ns = [], [], [], []
    for r in range(x0.shape[0]):
        U = [l for l in range(x0.shape[1]) if not clean[r, l]]
        for S in subsets(U):
            xt = x0[r].clone()
            xt[list(S)] = M
            xts.append(xt), rows.append(r), ks.append(len(S)), ns.append(len(U))
    return torch.stack(xts), np.array(rows), np.array(ks), np.array(ns)


@torch.no_grad()
def mdlm_ce(model, x0, clean, times, logits_fn=None):
    """CE_S(t) for every pair of mdlm_pairs at every time: float64 (N, P), and the pairs."""
    xt, rows, k, n = mdlm_pairs(x0, clean)
    target = x0[rows]
    logits_fn = logits_fn or model.logits
    out = []
    for t in np.atleast_1d(times):
        logp = logits_fn(xt, torch.full((len(xt),), float(t), dtype=torch.float64))[..., :V].double().log_softmax(-1)
        nll = -logp.gather(-1, target[..., None])[..., 0]
        out.append((nll * (xt == M)).sum(1).numpy())
    return np.array(out), rows, k, n


def per_row_mean(values, rows, R):
    """mean over the R rows of the per-pair values summed per row."""
    return float(np.bincount(rows, weights=values, minlength=R).mean())


def beta_fn(k, n):
    """int_0^1 (1/u) u^k (1 - u)^(n-k) du = (k-1)! (n-k)! / n!."""
    return np.array([math.factorial(a - 1) * math.factorial(b - a) / math.factorial(b) for a, b in zip(k, n)])


def mdlm_nelbo_free(model, x0, clean, norm=None):
    """Time-free network: mean over rows of NELBO(x_0^U | x_0^C) / n (norm: divide by that instead of n)."""
    ce, rows, k, n = mdlm_ce(model, x0, clean, [0.5])
    return per_row_mean(beta_fn(k, n) * ce[0] / (n if norm is None else norm), rows, x0.shape[0])


def mdlm_nelbo_quadrature(model, schedule, x0, clean, panels=100):
    """Any network: int_0^1 w(t) sum_S u^k (1-u)^(n-k) CE_S(t) dt / n, Gauss-Legendre in t, mean over rows."""
    t, w = gauss_legendre(0, 1, panels)
    ce, rows, k, n = mdlm_ce(model, x0, clean, t)
    u = (1 - alpha(schedule, t))[:, None]
    integrand = (w * weight(schedule, t))[:, None] * u ** k * (1 - u) ** (n - k) * ce
    return per_row_mean(integrand.sum(0) / n, rows, x0.shape[0])


def mdlm_any_order(model, schedule, x0, clean, beta_n=None, panels=100):
    """The any-order form E_{k ~ U{1..n}} E_{u ~ Beta(k, beta_n - k + 1)} E_{|S| = k}[(1/k) CE_S(t(u))] per row;
    beta_n = n is the conditional NELBO / n, beta_n = L the wrong Beta of the unconditional model. The integral
    over u by Gauss-Legendre in t, u = 1 - alpha(t), du = u'(t) dt (smooth in t: the cosine's t(u) is not)."""
    t, w = gauss_legendre(0, 1, panels)
    u = 1 - alpha(schedule, t)
    ce, rows, k, n = mdlm_ce(model, x0, clean, t)
    b = n if beta_n is None else np.full_like(n, beta_n)
    dens = u[:, None] ** (k - 1) * (1 - u[:, None]) ** (b - k) / beta_fn(k, b)[None]  # Beta(k, b-k+1) pdf
    n_subsets = np.array([math.comb(a, c) for a, c in zip(n, k)])
    per_pair = ((w * du_dt(schedule, u))[:, None] * dens * ce).sum(0) / k / n_subsets / n
    return per_row_mean(per_pair, rows, x0.shape[0])


def mdlm_n_step(model, schedule, N, x0, clean):
    t, s = np.arange(1, N + 1) / N, np.arange(0, N) / N
    coef = (alpha(schedule, s) - alpha(schedule, t)) / (1 - alpha(schedule, t))
    ce, rows, k, n = mdlm_ce(model, x0, clean, t)
    u = (1 - alpha(schedule, t))[:, None]
    return per_row_mean((coef[:, None] * u ** k * (1 - u) ** (n - k) * ce).sum(0) / n, rows, x0.shape[0])


def permuted_estimates(fn, x0, clean, n, seed, **kw):
    """fn(x0[perm], offset, g, clean=clean[perm], **kw) over n batches in random row order, fresh offsets."""
    g = torch.Generator().manual_seed(seed)

    def one(_):
        perm = torch.randperm(x0.shape[0], generator=g)
        offset = float(torch.rand((), generator=g))
        with torch.no_grad():
            value = fn(x0[perm], offset, g, clean=None if clean is None else clean[perm], **kw)
        assert value.dtype == torch.float64 and value.dim() == 0
        return value
    return estimates(one, n)


def assert_mutation_rejected(mean, se, exact, what):
    assert abs(mean - exact) > 4 * se, f"{what}: the mutated estimator ({mean:.5f}) is not rejected ({exact:.5f})"


# ---- MDLM: q_sample, forward and batch_bound never touch the prompt ----------------------------------------
SEQS3 = list(itertools.product(range(V), repeat=3))


def test_mdlm_prompt_never_masked():
    """q_sample (many draws) masks only unclean positions, each w.p. 1 - alpha(t); forward's and batch_bound's
    network inputs keep the prompt (and batch_bound masks k in 1..n of the unclean positions)."""
    model = make_mdlm(True, "cosine")
    x0, clean = prompt_rows(SEQS3, (1, 2), 3)
    x0, clean = x0.repeat(40, 1), clean.repeat(40, 1)
    t = torch.full((x0.shape[0],), 0.4, dtype=torch.float64)
    xt = model.q_sample(x0, t, torch.Generator().manual_seed(0), clean=clean)
    assert torch.equal(xt[clean], x0[clean])
    freq = (xt[~clean] == M).double().mean().item()
    p = 1 - model.alpha(0.4).item()
    assert abs(freq - p) < 4 * math.sqrt(p * (1 - p) / (~clean).sum().item())
    seen = []
    net = model.logits
    model.logits = lambda x_t, tt: seen.append(x_t.clone()) or net(x_t, tt)
    with torch.no_grad():
        for i in range(20):
            torch.manual_seed(i)
            model(x0, clean=clean)
            model.batch_bound(x0, i / 20, torch.Generator().manual_seed(i), clean=clean)
            model.batch_bound(x0, i / 20, torch.Generator().manual_seed(i), T=3, clean=clean)
    for j, x_t in enumerate(seen):
        assert torch.equal(x_t[clean], x0[clean]), "a prompt token was masked"
        assert (x_t[~clean] == M).any()
        if j % 3 == 1:  # the continuous batch_bound: k of the row's unclean positions, 1 <= k <= n
            k, n = (x_t == M).sum(1), (~clean).sum(1)
            assert (k >= 1).all() and (k <= n).all() and set(k[n == 2].tolist()) == {1, 2}


def test_mdlm_prompt_logits_never_scored():
    """Changing the network's logits at the prompt positions changes neither the loss nor the bound (same
    seeds); at an unclean position, or with the prompt noised (clean=None), it does (controls)."""
    model = make_mdlm(True, "cosine")
    x0, clean = prompt_rows(SEQS3, (1, 2), 3)
    net = model.logits

    def run(where, c):
        model.logits = lambda x_t, t: net(x_t, t) + 5 * where[..., None] * torch.randn(x_t.shape + (V + 1,))
        torch.manual_seed(1)
        with torch.no_grad():
            out = [model(x0, clean=c)[1].item()]
            out += [model.batch_bound(x0, 0.3, torch.Generator().manual_seed(2), T=T, clean=c).item()
                    for T in (None, 4)]
        return out
    none = torch.zeros_like(clean)
    base = run(none, clean)
    assert run(clean.float(), clean) == base
    other = torch.zeros_like(clean)
    other[:, 2] = True
    assert all(a != b for a, b in zip(run(other.float(), clean), base))
    unconditional = run(none, None)
    assert all(a != b for a, b in zip(run(clean.float(), None), unconditional))


def test_mdlm_clean_none_is_the_old_model():
    """clean=None gives the numbers of the model before the clean mask (recorded from it, same seeds), and an
    all-False clean mask gives them bit for bit (the same random stream)."""
    model = make_mdlm(True, "cosine", seed=3)  # the weights the old numbers were recorded with
    x0 = torch.randint(3, (8, 4), generator=torch.Generator().manual_seed(1))
    old = {"fwd": (0.6904781460762024, 0.6904781460762024, 1.3148016929626465), "bb": 1.0484943501651287,
           "bb4": 1.790086343562113}
    for c in (None, torch.zeros_like(x0, dtype=torch.bool)):
        with torch.no_grad():
            torch.manual_seed(5)
            _, loss, met = model(x0, clean=c)
            bb = model.batch_bound(x0, 0.3, torch.Generator().manual_seed(2), clean=c).item()
            bb4 = model.batch_bound(x0, 0.3, torch.Generator().manual_seed(2), T=4, clean=c).item()
        got = {"fwd": (loss.item(), met["bound"].item(), met["ce"].item()), "bb": bb, "bb4": bb4}
        if c is None:
            np.testing.assert_allclose(got["fwd"], old["fwd"], rtol=1e-6)
            np.testing.assert_allclose([bb, bb4], [old["bb"], old["bb4"]], rtol=1e-12)
            first = got
        else:
            assert got == first


def test_mdlm_empty_row_refused():
    model = make_mdlm()
    x0 = torch.zeros(2, 3, dtype=torch.long)
    clean = torch.tensor([[True, False, False], [True, True, True]])
    with pytest.raises(ValueError):
        model.batch_bound(x0, 0.5, clean=clean)


# ---- MDLM: the conditional bounds are unbiased -------------------------------------------------------------
def test_mdlm_oracles_agree():
    """The time-free closed form equals the quadrature in t, and (time-conditioned, cosine) the any-order form
    with Beta(k, n - k + 1) equals the quadrature in t: the identity batch_bound relies on, per row's n."""
    x0, clean = prompt_rows(SEQS3[:5], (1, 2), 3)
    free = make_mdlm()
    assert mdlm_nelbo_quadrature(free, "linear", x0, clean, panels=8) == pytest.approx(
        mdlm_nelbo_free(free, x0, clean), rel=1e-9)
    tc = make_mdlm(True, "cosine")
    assert mdlm_any_order(tc, "cosine", x0, clean, panels=60) == pytest.approx(
        mdlm_nelbo_quadrature(tc, "cosine", x0, clean, panels=60), rel=1e-4)


def test_mdlm_batch_bound_continuous_time_free():
    model = make_mdlm()
    x0, clean = prompt_rows(SEQS3, (1, 2), 3)
    x0, clean = x0.repeat(4, 1), clean.repeat(4, 1)
    exact = mdlm_nelbo_free(model, x0, clean)
    mean, se = permuted_estimates(model.batch_bound, x0, clean, 100, seed=1)
    wrong = {"prompt noised": mdlm_nelbo_free(model, x0, torch.zeros_like(clean)),
             "/ L instead of / n": mdlm_nelbo_free(model, x0, clean, norm=3)}
    assert_unbiased(mean, se, exact, wrong, "MDLM conditional continuous, time-free")
    mean_mut, se_mut = permuted_estimates(model.batch_bound, x0, None, 40, seed=2)
    assert_mutation_rejected(mean_mut, se_mut, exact, "batch_bound with clean=None")


def test_mdlm_batch_bound_continuous_time_conditioned():
    """Cosine schedule, time-conditioned network: u ~ Beta(k, n - k + 1) with the row's n; Beta(k, L - k + 1)
    (the unconditional time) is rejected."""
    model = make_mdlm(True, "cosine")
    x0, clean = prompt_rows(SEQS3[::4], (1, 2), 3)
    exact = mdlm_nelbo_quadrature(model, "cosine", x0, clean)
    x0r, cleanr = x0.repeat(30, 1), clean.repeat(30, 1)
    mean, se = permuted_estimates(model.batch_bound, x0r, cleanr, 100, seed=3)
    wrong = {"Beta(k, L - k + 1)": mdlm_any_order(model, "cosine", x0, clean, beta_n=3),
             "prompt noised": mdlm_nelbo_quadrature(model, "cosine", x0, torch.zeros_like(clean))}
    assert_unbiased(mean, se, exact, wrong, "MDLM conditional continuous, time-conditioned cosine")


@pytest.mark.parametrize("tc,schedule,N", [(False, "linear", 4), (True, "cosine", 3)])
def test_mdlm_batch_bound_n_step(tc, schedule, N):
    model = make_mdlm(tc, schedule)
    x0, clean = prompt_rows(SEQS3, (1, 2), 3)
    exact = mdlm_n_step(model, schedule, N, x0, clean)
    x0r, cleanr = x0.repeat(4, 1), clean.repeat(4, 1)
    mean, se = permuted_estimates(model.batch_bound, x0r, cleanr, 100, seed=4, T=N)
    wrong = {"prompt noised": mdlm_n_step(model, schedule, N, x0, torch.zeros_like(clean)),
             "weight N + 1": exact * (N + 1) / N}
    assert_unbiased(mean, se, exact, wrong, f"MDLM conditional {N}-step")
    mean_mut, se_mut = permuted_estimates(model.batch_bound, x0r, None, 40, seed=5, T=N)
    assert_mutation_rejected(mean_mut, se_mut, exact, "batch_bound T with clean=None")


@pytest.mark.parametrize("loss_weighting", ["elbo", "masked_ce"])
def test_mdlm_forward_at_fixed_t(loss_weighting):
    """forward(x0, t, clean) at a fixed t per row: E[loss] = mean_rows c(t) sum_S u^k (1-u)^(n-k) CE_S / n with
    c = w(t) (elbo) or 1 (masked_ce); metrics["bound"] always with w(t)."""
    model = make_mdlm(True, "cosine", loss_weighting=loss_weighting)
    x0, clean = prompt_rows(SEQS3, (1, 2), 3)
    tval = 0.55
    ce, rows, k, n = mdlm_ce(model, x0, clean, [tval])
    u = 1 - alpha("cosine", tval)
    base = u ** k * (1 - u) ** (n - k) * ce[0]
    bound_exact = per_row_mean(weight("cosine", tval) * base / n, rows, x0.shape[0])
    loss_exact = bound_exact if loss_weighting == "elbo" else per_row_mean(base / n, rows, x0.shape[0])
    t = torch.full((x0.shape[0],), tval, dtype=torch.float64)
    torch.manual_seed(6)
    outs = []
    with torch.no_grad():
        for _ in range(150):
            perm = torch.randperm(x0.shape[0])
            _, loss, met = model(x0[perm], t, clean=clean[perm])
            outs.append((loss.item(), met["bound"].item()))
    outs = np.array(outs)
    se = outs.std(0, ddof=1) / math.sqrt(len(outs))
    wrong = {"prompt noised": per_row_mean(*_fixed_t_unconditional(model, x0, tval, loss_weighting))}
    assert_unbiased(outs[:, 0].mean(), se[0], loss_exact, wrong, f"forward loss {loss_weighting}")
    assert_unbiased(outs[:, 1].mean(), se[1], bound_exact, {}, "forward bound")


def _fixed_t_unconditional(model, x0, tval, loss_weighting):
    ce, rows, k, n = mdlm_ce(model, x0, torch.zeros_like(x0, dtype=torch.bool), [tval])
    u = 1 - alpha("cosine", tval)
    c = weight("cosine", tval) if loss_weighting == "elbo" else 1.0
    return c * u ** k * (1 - u) ** (n - k) * ce[0] / n, rows, x0.shape[0]


# ---- BD3-LM: L = 4, blocks of 2, prompts of 1 and 3 tokens (each ends inside a block) -----------------------
SEQS4 = list(itertools.product(range(V), repeat=4))
BLOCK = 2


def bd_pairs(x0, clean):
    """Every (row, block b, S), S a non-empty subset of block b's unclean positions: x_t (P, L) (S masked,
    the rest clean: block b reads only its own x_t and the clean blocks before it), row, k, n_b, n (P,)."""
    xts, rows, ks, nbs, ns = [], [], [], [], []
    L = x0.shape[1]
    for r in range(x0.shape[0]):
        n = int((~clean[r]).sum())
        for b in range(L // BLOCK):
            U = [l for l in range(b * BLOCK, (b + 1) * BLOCK) if not clean[r, l]]
            for S in subsets(U):
                xt = x0[r].clone()
                xt[list(S)] = M
                xts.append(xt), rows.append(r), ks.append(len(S)), nbs.append(len(U)), ns.append(n)
    return torch.stack(xts), np.array(rows), np.array(ks), np.array(nbs), np.array(ns)


def bd_ce(model, x0, clean):
    xt, rows, k, nb, n = bd_pairs(x0, clean)
    target = x0[rows]
    logp = oracle_logp(model, xt, target)
    ce = -(logp.gather(-1, target[..., None])[..., 0] * (xt == M)).sum(1).numpy()
    return ce, rows, k, nb, n


def bd_nelbo(model, x0, clean, norm=None):
    """mean over rows of sum_b NELBO_b / n (the network has no time input: Beta closed forms)."""
    ce, rows, k, nb, n = bd_ce(model, x0, clean)
    return per_row_mean(beta_fn(k, nb) * ce / (n if norm is None else norm), rows, x0.shape[0])


def bd_n_step(model, schedule, N, x0, clean):
    t, s = np.arange(1, N + 1) / N, np.arange(0, N) / N
    coef = (alpha(schedule, s) - alpha(schedule, t)) / (1 - alpha(schedule, t))
    ce, rows, k, nb, n = bd_ce(model, x0, clean)
    u = (1 - alpha(schedule, t))[:, None]
    return per_row_mean((coef[:, None] * u ** k * (1 - u) ** (nb - k)).sum(0) * ce / n, rows, x0.shape[0])


@pytest.fixture(scope="module")
def bd_rows():
    return prompt_rows(SEQS4, (1, 3), 4)


def test_bd3lm_prompt_never_masked_nor_scored(bd_rows):
    """The x_t half keeps the prompt (forward and batch_bound, many draws); logits changed at the prompt change
    nothing, at an unclean position they do (control); clean=None is the old model (recorded numbers) and an
    all-False mask the same bit for bit."""
    model = make_bd3lm()
    x0, clean = bd_rows
    seen = []
    net = model.train_logits
    perturb = {"where": torch.zeros_like(clean)}

    def logits(x_t, x):
        seen.append(x_t.clone())
        return net(x_t, x) + 5 * perturb["where"][..., None] * torch.randn(x_t.shape + (V + 1,))
    model.train_logits = logits

    def run(c):
        torch.manual_seed(1)
        with torch.no_grad():
            return [model(x0, clean=c)[1].item()] + [
                model.batch_bound(x0, 0.3, torch.Generator().manual_seed(2), T=T, clean=c).item() for T in (None, 4)]
    base = run(clean)
    for x_t in seen:
        assert torch.equal(x_t[clean], x0[clean]) and (x_t[~clean] == M).any()
    perturb["where"] = clean
    assert run(clean) == base
    perturb["where"] = torch.zeros_like(clean)
    perturb["where"][:, 3] = True
    assert all(a != b for a, b in zip(run(clean), base))
    model.train_logits = net
    old = [0.8725981712341309, 1.127001816406846, 1.3934404868632555]
    ref = make_bd3lm(seed=3)
    x8 = torch.randint(3, (8, 4), generator=torch.Generator().manual_seed(1))
    got = {}
    for name, c in (("none", None), ("zeros", torch.zeros_like(x8, dtype=torch.bool))):
        torch.manual_seed(5)
        with torch.no_grad():
            got[name] = [ref(x8, clean=c)[1].item()] + [
                ref.batch_bound(x8, 0.3, torch.Generator().manual_seed(2), T=T, clean=c).item() for T in (None, 4)]
    np.testing.assert_allclose(got["none"], old, rtol=1e-6)
    assert got["none"] == got["zeros"]


def test_bd3lm_batch_bound_continuous(bd_rows):
    model = make_bd3lm()
    x0, clean = bd_rows
    exact = bd_nelbo(model, x0, clean)
    wrong = {"prompt noised": bd_nelbo(model, x0, torch.zeros_like(clean)),
             "/ L instead of / n": bd_nelbo(model, x0, clean, norm=4)}
    mean, se = permuted_estimates(model.batch_bound, x0, clean, 100, seed=7)
    assert_unbiased(mean, se, exact, wrong, "BD3LM conditional continuous")
    mean_mut, se_mut = permuted_estimates(model.batch_bound, x0, None, 40, seed=8)
    assert_mutation_rejected(mean_mut, se_mut, exact, "BD3LM batch_bound with clean=None")


@pytest.mark.parametrize("schedule,N", [("linear", 2), ("cosine", 5)])
def test_bd3lm_batch_bound_n_step(bd_rows, schedule, N):
    model = make_bd3lm(schedule=schedule)
    x0, clean = bd_rows
    exact = bd_n_step(model, schedule, N, x0, clean)
    wrong = {"prompt noised": bd_n_step(model, schedule, N, x0, torch.zeros_like(clean)),
             "weight N + 1": exact * (N + 1) / N}
    mean, se = permuted_estimates(model.batch_bound, x0.repeat(2, 1), clean.repeat(2, 1), 100, seed=9, T=N)
    assert_unbiased(mean, se, exact, wrong, f"BD3LM conditional {N}-step {schedule}")


def test_bd3lm_forward_at_fixed_t(bd_rows):
    """forward(x0, t, clean) with fixed block times (0.3, 0.7): E[loss] = mean_rows sum_b w(t_b) sum_S
    u_b^k (1 - u_b)^(n_b - k) CE / n."""
    model = make_bd3lm(schedule="cosine")
    x0, clean = bd_rows
    tb = np.array([0.3, 0.7])
    ce, rows, k, nb, n = bd_ce(model, x0, clean)
    blocks = np.array(_pair_blocks(clean))
    u = 1 - alpha("cosine", tb[blocks])
    per_pair = weight("cosine", tb[blocks]) * u ** k * (1 - u) ** (nb - k) * ce
    exact = per_row_mean(per_pair / n, rows, x0.shape[0])
    t = torch.tensor(tb).expand(x0.shape[0], 2)
    torch.manual_seed(10)
    with torch.no_grad():
        mean, se = estimates(lambda _: model(x0, t, clean=clean)[1], 120)
        mean_mut, se_mut = estimates(lambda _: model(x0, t)[1], 40)
    assert_unbiased(mean, se, exact, {"/ L instead of / n": per_row_mean(per_pair / 4, rows, x0.shape[0])},
                    "BD3LM forward")
    assert_mutation_rejected(mean_mut, se_mut, exact, "BD3LM forward with clean=None")


def _pair_blocks(clean):
    """The block of every pair of bd_pairs, in the same order."""
    out = []
    for r in range(clean.shape[0]):
        for b in range(clean.shape[1] // BLOCK):
            U = [l for l in range(b * BLOCK, (b + 1) * BLOCK) if not clean[r, l]]
            out += [b] * len(subsets(U))
    return out


def test_mdlm_conditional_forward_traces_as_one_graph():
    """forward(x0, clean=...) has no host sync (train.py compiles it): one graph, no break."""
    import torch._dynamo
    torch._dynamo.reset()
    model = MDLM(5, 16, 2, 1, 8, 0.1, schedule="cosine")
    clean = torch.arange(8)[None, :] < torch.tensor([[2], [5], [1], [3]])
    explanation = torch._dynamo.explain(lambda x, c: model(x, clean=c))(torch.randint(5, (4, 8)), clean)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1
    torch._dynamo.reset()
