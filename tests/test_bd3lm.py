"""
Independent-oracle tests of bd3lm.BD3LM (block diffusion: autoregressive over blocks of L' tokens, masked
diffusion inside a block; vocabulary 0..V-1, mask id V).

The network is a fixed random DiT (conftest.randomize_weights), tiny (V = 3 or 5, L <= 20). The oracles
never go through bd3lm.py's own masks or samplers:

- oracle_logp: model.net on [x_t, x_0] (both halves at rotary positions 0..L-1) with an attention mask
  built here with explicit Python loops from the rule "a noisy block b sees itself and the clean blocks
  < b; a clean block b sees the clean blocks <= b", and our own float64 softmax over the V token columns.
- prefix_logp: the same conditionals the slow way, model.net on [clean earlier blocks, noisy block] alone.
- The per-block NELBO: an exact sum over every masked subset S of the block, times the time integral
  int_0^1 w(t) (1 - alpha)^|S| alpha^(L'-|S|) dt (Gauss-Legendre in t, checked against the closed form
  Beta(|S|, L'-|S|+1)); the N-step bound: the sum over the grid with binomial masking probabilities.
- Samplers: exact output distributions by enumeration (chi-square with a power check), a slow greedy
  decoder with a banded mask built here, and cache / no-cache equality.

Unbiasedness checks use test_mdlm's helpers: the mean of many estimates within 4 standard errors of the
exact value, and plausibly wrong values at least 8 standard errors away (so the check has power).
"""
import itertools
import math

import numpy as np
import pytest
import torch

from bd3lm import BD3LM
from conftest import chisquare_pvalue, randomize_weights
from mdlm import MDLM
from test_mdlm import alpha, assert_unbiased, estimates, gauss_legendre, weight

CPU = torch.device("cpu")


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny tensors, 2 cores shared


def make(V=3, block_size=2, n_layers=1, seed=3, schedule="linear", **kw):
    """A tiny BD3LM (n_embed 16, 2 heads, n_cond 8, no dropout) with random weights, in eval mode.
    (float32: model.double() is not possible, the DiT's time embedding casts t to float32.)"""
    torch.manual_seed(0)
    model = BD3LM(V, 16, 2, n_layers, 8, 0.0, block_size=block_size, schedule=schedule, **kw)
    return randomize_weights(model, seed).eval()


# ---- oracles for the network's conditionals -------------------------------------------------------------------
def loop_mask(L, size, context=True):
    """(2L, 2L) bool attention mask for [x_t, x_0], by explicit loops. context=False: a noisy block sees only
    itself (a plausible bug: no clean context), for power checks."""
    m = torch.zeros(2 * L, 2 * L, dtype=torch.bool)
    for q in range(2 * L):
        for k in range(2 * L):
            qb, kb = (q % L) // size, (k % L) // size
            if q < L:  # a noisy query
                m[q, k] = (k < L and kb == qb) or (context and k >= L and kb < qb)
            else:      # a clean query: clean keys only, blocks up to its own
                m[q, k] = k >= L and kb <= qb
    return m


@torch.no_grad()
def oracle_logp(model, x_t, x0, context=True):
    """log p(x_0^l = v | x_t^b, x_0^{<b}) for every position l of x_t: float64 (B, L, V)."""
    B, L = x_t.shape
    positions = torch.cat([torch.arange(L), torch.arange(L)])
    out = model.net(torch.cat([x_t, x0], dim=1), torch.zeros(B), mask=loop_mask(L, model.block_size, context),
                    positions=positions)
    return out[:, :L, :model.vocab_size].double().log_softmax(-1)


@torch.no_grad()
def prefix_logp(model, prefix, block):
    """log p(x_0 | block, clean prefix) at the positions of `block` (B, L', V) float64: model.net on
    [prefix, block] alone (positions 0..P+L'-1); prefix tokens see the prefix blocks up to their own, the
    block's tokens see everything."""
    P, size = prefix.shape[1], model.block_size
    n = P + block.shape[1]
    m = torch.zeros(n, n, dtype=torch.bool)
    for q in range(n):
        for k in range(n):
            m[q, k] = q >= P or (k < P and k // size <= q // size)
    out = model.net(torch.cat([prefix, block], dim=1), torch.zeros(prefix.shape[0]), mask=m)
    return out[:, P:, :model.vocab_size].double().log_softmax(-1)


# ---- block causality of the training input -----------------------------------------------------------------
def test_train_logits_block_causality():
    """train_logits equals both oracles, and changing a token of block c changes exactly what the block mask
    allows: x_t of block c only block c's logits, x_0 of block c only the blocks > c; the clean half of the
    network's output never depends on x_t nor on later clean blocks. Positive controls show each checked
    dependence exists, so the test can fail."""
    V, L, size = 3, 8, 2
    model = make(V, size, n_layers=2, seed=4)
    nb = L // size
    g = torch.Generator().manual_seed(0)
    x0 = torch.randint(V, (3, L), generator=g)
    x_t = torch.where(torch.rand(3, L, generator=g) < 0.5, V, x0)
    assert torch.equal(model.attention_mask(L, CPU), loop_mask(L, size))
    with torch.no_grad():
        base = model.train_logits(x_t, x0)
    assert torch.isneginf(base[..., V]).all()
    ours = oracle_logp(model, x_t, x0)
    torch.testing.assert_close(base[..., :V].double().log_softmax(-1), ours, atol=1e-5, rtol=0)
    for b in range(nb):  # the 2L layout equals the short "prefix + block" computation
        s, e = b * size, (b + 1) * size
        torch.testing.assert_close(prefix_logp(model, x0[:, :s], x_t[:, s:e]), ours[:, s:e], atol=1e-5, rtol=0)

    positions = torch.arange(L).repeat(2)

    @torch.no_grad()
    def both(xt, x):
        full = model.net(torch.cat([xt, x], 1), torch.zeros(3), mask=model.attention_mask(L, CPU),
                         positions=positions)
        return model.train_logits(xt, x), full[:, L:]

    def blocks(y, which):
        return torch.cat([y[:, :0]] + [y[:, c * size:(c + 1) * size] for c in which], dim=1)

    base_clean = both(x_t, x0)[1]
    for p in range(L):
        c = p // size
        others = [d for d in range(nb) if d != c]
        later, up_to = [d for d in range(nb) if d > c], [d for d in range(nb) if d <= c]
        xt2 = x_t.clone()
        xt2[:, p] = (xt2[:, p] + 1) % (V + 1)  # a different id, the mask included
        noisy, clean = both(xt2, x0)
        assert torch.equal(blocks(noisy, others), blocks(base, others)), f"x_t[{p}] leaks out of block {c}"
        assert torch.equal(clean, base_clean), f"the clean half depends on x_t[{p}]"
        assert (blocks(noisy, [c]) - blocks(base, [c]))[..., :V].abs().max() > 1e-3  # control: block c reads x_t
        x2 = x0.clone()
        x2[:, p] = (x2[:, p] + 1) % V
        noisy, clean = both(x_t, x2)
        assert torch.equal(blocks(noisy, up_to), blocks(base, up_to)), f"x_0[{p}] reaches noisy blocks <= {c}"
        assert torch.equal(blocks(clean, up_to[:-1]), blocks(base_clean, up_to[:-1])), \
            f"x_0[{p}] reaches clean blocks < {c}"
        if later:  # controls: the next noisy block and the next clean block do see clean block c
            assert (blocks(noisy, later[:1]) - blocks(base, later[:1]))[..., :V].abs().max() > 1e-3
            assert (blocks(clean, later[:1]) - blocks(base_clean, later[:1])).abs().max() > 1e-3


# ---- block size = sequence length is MDLM -------------------------------------------------------------------
@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_one_block_is_mdlm(schedule):
    """BD3LM with L' = L: forward(x0, t[:, None]) and forward(x0) give MDLM's logits, loss and metrics (same
    weights, same global RNG state); and the 2L-token masked path equals the single-block short-cut."""
    V, L = 3, 6
    bd = make(V, L, schedule=schedule, seed=5)
    md = MDLM(V, 16, 2, 1, 8, 0.0, schedule=schedule)
    md.load_state_dict(bd.state_dict())
    md.eval()
    x0 = torch.randint(V, (16, L), generator=torch.Generator().manual_seed(1))
    t = torch.rand(16, dtype=torch.float64, generator=torch.Generator().manual_seed(2)) * 0.9 + 0.05
    outs = []
    for m, tt in ((bd, t[:, None]), (md, t), (bd, None), (md, None)):
        torch.manual_seed(11)
        with torch.no_grad():
            outs.append(m(x0) if tt is None else m(x0, tt))
    for a, b in (outs[:2], outs[2:]):
        torch.testing.assert_close(a[0], b[0], atol=1e-6, rtol=0)
        assert a[1].item() == pytest.approx(b[1].item(), rel=1e-6)
        for key in ("ce", "bound", "bpt"):
            assert a[2][key].item() == pytest.approx(b[2][key].item(), rel=1e-6), key
    assert outs[0][1].item() != pytest.approx(outs[2][1].item(), rel=1e-3)  # the times do matter
    x_t = torch.where(torch.rand(16, L, generator=torch.Generator().manual_seed(3)) < 0.5, V, x0)
    with torch.no_grad():
        full = bd.net(torch.cat([x_t, x0], 1), torch.zeros(16), mask=bd.attention_mask(L, CPU),
                      positions=torch.arange(L).repeat(2))[:, :L]
        short = bd.net(x_t, torch.zeros(16))
    torch.testing.assert_close(full, short, atol=1e-5, rtol=0)


# ---- block size 1 is the autoregressive chain rule ----------------------------------------------------------
def test_block_size_one_bound_is_the_ar_nll():
    """With one token per block the continuous bound is exact: the only masked subset of a block is the
    block itself (k = 1 always), its time integral int_0^1 w(t) (1 - alpha(t)) dt = int_0^1 du/u * u = 1, so
    NELBO_b = -log p(x^b | x^{<b}) given a mask at position b: no Monte Carlo left, for any offset and
    generator. Oracle: for every l, model.net on [x0[:l], mask] alone with a causal mask, the last position."""
    V, L = 3, 5
    model = make(V, 1, n_layers=2, seed=6)
    x0 = torch.tensor(list(itertools.product(range(V), repeat=L)))  # all 243 sequences
    n = x0.shape[0]
    nll = torch.zeros(n, L, dtype=torch.float64)
    with torch.no_grad():
        for l in range(L):
            seq = torch.cat([x0[:, :l], torch.full((n, 1), V)], dim=1)
            out = model.net(seq, torch.zeros(n), mask=torch.ones(l + 1, l + 1).tril().bool())
            logp = out[:, -1, :V].double().log_softmax(-1)  # the mask column dropped: its logit at -inf
            nll[:, l] = -logp.gather(1, x0[:, l:l + 1])[:, 0]
    exact = nll.mean().item()
    for offset, seed in ((0.0, 0), (0.37, 1), (0.99, None)):
        g = None if seed is None else torch.Generator().manual_seed(seed)
        with torch.no_grad():
            bound = model.batch_bound(x0, offset, g)
        assert bound.dtype == torch.float64 and bound.dim() == 0
        assert abs(bound.item() - exact) < 1e-6, (offset, bound.item(), exact)
    with torch.no_grad():  # one row: that row's NLL per token
        assert abs(model.batch_bound(x0[100:101], 0.5).item() - nll[100].mean().item()) < 1e-6


# ---- the per-block NELBO, the N-step bound and the training loss --------------------------------------------
L5, BS5, NB5 = 4, 2, 2                                   # sequence length, block size, blocks
SEQS5 = list(itertools.product(range(3), repeat=L5))     # all 81 clean sequences (V = 3)
SUBSETS = [(0,), (1,), (0, 1)]                           # the non-empty masked subsets of a block
K5 = np.array([len(S) for S in SUBSETS])
NELBO_SEED = 14                                          # weights with a clear context dependence


def ce_table(model, context=True):
    """ce[s, b, j] = sum_{l in S_j} -log p(x_0^l | x_t^b, x_0^{<b}) for sequence s with the subset S_j of
    block b masked (everything else clean): float64 (81, NB5, 3)."""
    x0 = torch.tensor(SEQS5)
    xts, x0s, masks = [], [], []
    for b in range(NB5):
        for S in SUBSETS:
            masked = torch.zeros(L5, dtype=torch.bool)
            masked[[b * BS5 + i for i in S]] = True
            xts.append(torch.where(masked, 3, x0))
            x0s.append(x0)
            masks.append(masked.expand_as(x0))
    xt, xx, mk = torch.cat(xts), torch.cat(x0s), torch.cat(masks)
    logp = oracle_logp(model, xt, xx, context)
    ce = -(logp.gather(-1, xx[..., None])[..., 0] * mk).sum(1)
    return ce.view(NB5, len(SUBSETS), len(SEQS5)).permute(2, 0, 1).numpy()


def beta_closed(k, size=BS5):
    """int_0^1 (1/u) u^k (1-u)^(L'-k) du = (k-1)! (L'-k)! / L'!  (u = 1 - alpha(t), any schedule)."""
    return math.factorial(k - 1) * math.factorial(size - k) / math.factorial(size)


def time_integral(schedule, k, a=0.0, b=1.0):
    """int_a^b w(t) (1 - alpha(t))^k alpha(t)^(L'-k) dt by composite Gauss-Legendre in t (the integrand is
    smooth: w's 1/t singularity is cancelled by (1 - alpha)^k, k >= 1)."""
    t, w = gauss_legendre(a, b, 8, 10)
    u = 1 - alpha(schedule, t)
    return float((w * weight(schedule, t) * u ** k * (1 - u) ** (BS5 - k)).sum())


def n_step_coef(schedule, N, k, at_s=False):
    """sum_i (alpha(s_i) - alpha(t_i)) / (1 - alpha(t_i)) u_i^k (1 - u_i)^(L'-k), t_i = i/N, s_i = (i-1)/N,
    u_i = 1 - alpha(t_i) (at_s: a wrong variant that masks at s_i instead)."""
    t = np.arange(1, N + 1) / N
    s = t - 1 / N
    c = (alpha(schedule, s) - alpha(schedule, t)) / (1 - alpha(schedule, t))
    u = 1 - alpha(schedule, s if at_s else t)
    return float((c * u ** k * (1 - u) ** (BS5 - k)).sum())


def per_token(table, coef):
    """mean over the 81 sequences of sum_b sum_S coef(|S|) ce / L."""
    return float((table @ np.asarray(coef)).sum(1).mean() / L5)


@pytest.fixture(scope="module")
def nelbo5():
    """The model (linear schedule), its CE table with the clean context and without it, and the exact
    continuous NELBO per token."""
    model = make(seed=NELBO_SEED)
    table = ce_table(model)
    return model, table, ce_table(model, context=False), per_token(table, [beta_closed(k) for k in K5])


def batch_bound_estimates(model, copies, n, seed, T=None):
    """model.batch_bound(..., T) on batches of `copies` copies of the 81 sequences in a random order, each with a
    fresh offset and the same generator."""
    base = torch.tensor(SEQS5).repeat(copies, 1)
    g = torch.Generator().manual_seed(seed)

    def one(_):
        perm = torch.randperm(base.shape[0], generator=g)
        with torch.no_grad():
            return model.batch_bound(base[perm], float(torch.rand((), generator=g)), g, T=T)
    return estimates(one, n)


def test_time_integral_oracle_matches_closed_form(nelbo5):
    """The quadrature in t (linear weight 1/t, cosine weight pi/2 tan(pi/2 (1 - t))) equals the Beta closed
    form for every subset size, and the per-block NELBO equals its any-order form E_k E_{|S|=k}[(1/k) sum CE]
    * L' (what batch_bound estimates)."""
    for schedule in ("linear", "cosine"):
        for k in (1, 2):
            assert time_integral(schedule, k) == pytest.approx(beta_closed(k), rel=1e-9), (schedule, k)
    _, table, _, exact = nelbo5
    any_order = np.mean([table[..., K5 == k].mean(-1) / k for k in (1, 2)], axis=0) * BS5  # (81, NB5)
    assert any_order.sum(1).mean() / L5 == pytest.approx(exact, rel=1e-12)


def test_batch_bound_continuous_unbiased(nelbo5):
    """mean of batch_bound (T = 0) -> sum_b NELBO_b / L. Rejects: dividing the masked CE by L' instead of k,
    and noisy blocks that do not see the clean blocks before them. For a time-free network the continuous
    NELBO does not depend on the schedule (the time integrals are Beta integrals in u = 1 - alpha): the
    cosine model (same weights) gives the very same estimates."""
    model, table, table_free, exact = nelbo5
    x0 = torch.tensor(SEQS5)
    with torch.no_grad():
        a = model.batch_bound(x0, 0.3, torch.Generator().manual_seed(0))
        b = make(seed=NELBO_SEED, schedule="cosine").batch_bound(x0, 0.3, torch.Generator().manual_seed(0))
    assert a.item() == pytest.approx(b.item(), rel=1e-12)
    mean, se = batch_bound_estimates(model, 2, 120, seed=1)
    wrong = {"/ L' instead of / k": np.mean([table[..., K5 == k].mean(-1) for k in (1, 2)], axis=0).sum(1).mean()
             / L5,
             "no clean context": per_token(table_free, [beta_closed(k) for k in K5])}
    assert_unbiased(mean, se, exact, wrong, "batch_bound T=0")


@pytest.mark.parametrize("schedule,N", [("linear", 2), ("cosine", 5)])
def test_batch_bound_n_step_unbiased(nelbo5, schedule, N):
    """T = N: the mean of batch_bound -> the brute-force N-step bound (per block, the sum over the grid
    of the step weights times the binomial masking probabilities). Rejects a weight N+1, masking at s instead
    of t, and (at N = 2, where it is far enough away for this sample size) the continuous NELBO: T ignored."""
    _, table, _, continuous = nelbo5
    model = make(seed=NELBO_SEED, schedule=schedule)
    exact = per_token(table, [n_step_coef(schedule, N, k) for k in K5])
    mean, se = batch_bound_estimates(model, 4, 100, seed=2, T=N)
    wrong = {f"weight {N + 1}": exact * (N + 1) / N,
             "masked at s": per_token(table, [n_step_coef(schedule, N, k, at_s=True) for k in K5])}
    if N == 2:
        wrong["the continuous NELBO"] = continuous
    assert_unbiased(mean, se, exact, wrong, f"batch_bound T={N} {schedule}")


def test_n_step_bound_decreases_to_the_nelbo(nelbo5):
    """Linear schedule, blocks of 2: the N-step coefficients are Riemann sums of the Beta integrands, so
    L_N - NELBO = D / (2N) exactly, D = E[CE(both masked) - CE(first alone) - CE(second alone)] / L per
    block: for a model with the true conditionals D is twice the mutual information of the two tokens (>= 0);
    for random weights its sign is a property of the network, asserted here as a precondition. Then L_N >
    NELBO, strictly decreasing in N, and within 1e-3 of it at N = 1024."""
    _, table, _, exact = nelbo5
    D = float((table[..., 2] - table[..., 0] - table[..., 1]).sum(1).mean() / L5)
    assert D > 0.05, f"precondition: D = {D} (choose another NELBO_SEED)"
    bounds = [per_token(table, [n_step_coef("linear", N, k) for k in K5]) for N in (1, 2, 4, 8, 64, 1024)]
    for N, b in zip((1, 2, 4, 8, 64, 1024), bounds):
        assert b == pytest.approx(exact + D / (2 * N), rel=1e-9)
    assert all(b > exact for b in bounds) and all(x > y for x, y in zip(bounds, bounds[1:]))
    assert bounds[-1] - exact < 1e-3


@pytest.mark.parametrize("schedule,kw", [("linear", dict(t_eps=0.5)),
                                         ("cosine", dict(t_min=0.5, t_max=0.9))])
def test_forward_loss_unbiased_on_its_time_range(nelbo5, schedule, kw):
    """forward draws t_b ~ U[lo, hi] per block (lo = max(t_eps, t_min), hi = t_max): E[loss] =
    sum_b int_lo^hi w(t) E_{x_t}[sum_masked CE] dt / (hi - lo) / L, per block the subset sum times the
    time integral on [lo, hi]. A range away from 0 keeps w bounded (w = 1/t near 0 has a variance
    ~ log(1/t_eps)) and makes the restriction visible: rejects the full NELBO (the range ignored) and the
    integral without the uniform density 1/(hi - lo)."""
    _, table, _, continuous = nelbo5
    model = make(seed=NELBO_SEED, schedule=schedule, **kw)
    lo, hi = max(model.t_eps, model.t_min), model.t_max
    integral = per_token(table, [time_integral(schedule, k, lo, hi) for k in K5])
    exact = integral / (hi - lo)
    torch.manual_seed(3)  # forward uses the global RNG
    x0 = torch.tensor(SEQS5).repeat(2, 1)
    with torch.no_grad():
        mean, se = estimates(lambda _: model(x0[torch.randperm(x0.shape[0])])[1], 120)
    wrong = {"the full NELBO": continuous, "no 1/(hi - lo)": integral}
    assert_unbiased(mean, se, exact, wrong, f"forward {schedule} {kw}")


# ---- the sampler's distribution inside a block --------------------------------------------------------------
SAMPLER_SEED = 8
PROMPT = (2, 0)


def test_in_block_sampler_distribution():
    """V = 3, blocks of 2, L = 4, the first block given. steps=None (the continuous process): the two
    positions unmask in a uniformly random order, each drawn from p(. | current block, clean first block):
        P(a, b) = 1/2 p1(a | m m) p2(b | a m) + 1/2 p2(b | m m) p1(a | m b);
    steps=1 (one grid step): both at once from p(. | m m), the product of the marginals. Conditionals from
    prefix_logp. Each sample set must fit its own distribution (chi-square p > 1e-4) and reject the other
    one and a sampler that ignores the first block (p < 1e-6)."""
    V, M = 3, 3
    model = make(V, 2, seed=SAMPLER_SEED)
    states = [(M, M)] + [(a, M) for a in range(V)] + [(M, b) for b in range(V)]

    def conditionals(prompt):
        pre = torch.tensor([prompt] * len(states))
        p = prefix_logp(model, pre, torch.tensor(states)).exp().numpy()
        return {st: p[i] for i, st in enumerate(states)}

    def distributions(prompt):
        c = conditionals(prompt)
        cont = {(a, b): 0.5 * c[(M, M)][0, a] * c[(a, M)][1, b] + 0.5 * c[(M, M)][1, b] * c[(M, b)][0, a]
                for a in range(V) for b in range(V)}
        prod = {(a, b): c[(M, M)][0, a] * c[(M, M)][1, b] for a in range(V) for b in range(V)}
        return cont, prod

    cont, prod = distributions(PROMPT)
    other_prompt = distributions((1, 1))[0]
    assert abs(sum(cont.values()) - 1) < 1e-9 and abs(sum(prod.values()) - 1) < 1e-9
    tv = lambda p, q: 0.5 * sum(abs(p[k] - q[k]) for k in p)  # noqa: E731
    assert tv(cont, prod) > 0.03 and tv(cont, other_prompt) > 0.03, "precondition: weights with clear dependence"
    x = torch.tensor([list(PROMPT) + [M, M]] * 20_000)
    for steps, exact, wrong in ((None, cont, {"product of marginals": prod, "prompt ignored": other_prompt}),
                                (1, prod, {"continuous": cont})):
        out, calls = model.sample(x, steps=steps, generator=torch.Generator().manual_seed(5))
        assert torch.equal(out[:, :2], x[:, :2]) and (out != M).all()
        assert calls == (2 if steps is None else 1) + 1  # denoising calls + the first block stored
        p = chisquare_pvalue(out[:, 2:], exact)
        assert p > 1e-4, f"steps={steps}: samples do not follow the exact distribution (p = {p:.3g})"
        for name, dist in wrong.items():
            q = chisquare_pvalue(out[:, 2:], dist)
            assert q < 1e-6, f"steps={steps}: the chi-square test cannot tell '{name}' (p = {q:.3g})"


# ---- the KV cache and the sliding window ---------------------------------------------------------------------
CACHE_V = 5      # vocabulary of the cache and window tests (mask id 5)
CACHE_SEED = 12  # 2-layer weights for which one block more or less of context changes the samples


def expected_calls(x, size, sampler, steps):
    """Denoising calls without the cache (steps=None): per block with masks, the continuous sampler one call
    per distinct unmask time (the max over rows of the block's masked count), confidence one per position."""
    total = 0
    for s in range(0, x.shape[1], size):
        n_masked = (x[:, s:s + size] == CACHE_V).sum(1)
        if n_masked.max() > 0:
            total += int(n_masked.max()) if sampler == "ancestral" else (steps or min(size, x.shape[1] - s))
    return total


@pytest.mark.parametrize("n,window,prompt", [(8, None, 0), (8, None, 3), (18, 8, 0), (19, 8, 3)])
def test_kv_cache_gives_identical_samples(n, window, prompt):
    """cache=True and cache=False give identical tokens with the same generator, within the training length
    and beyond it (window 8, blocks of 2: a block sees the 3 blocks before it), with and without a prompt
    (3 given tokens: a partly given block), for the continuous and the 3-step ancestral samplers and the
    confidence sampler; 2 layers, so the stored keys of the second layer depend on the context. Calls: the
    cache costs one extra call per stored block (all but the last). Power: beyond the training length, a
    window of one block more changes the samples (so a cache that keeps a block too many would be seen)."""
    size = 2
    model = make(CACHE_V, size, n_layers=2, seed=CACHE_SEED)
    g = torch.Generator().manual_seed(n + prompt)
    x = torch.full((16, n), CACHE_V)
    x[:, :prompt] = torch.randint(CACHE_V, (16, prompt), generator=g)
    n_blocks = -(-n // size)
    for sampler, steps in (("ancestral", None), ("ancestral", 3), ("confidence", None), ("confidence", 3)):
        runs = {}
        for cache in (True, False):
            runs[cache] = model.sample(x, steps=steps, generator=torch.Generator().manual_seed(1), cache=cache,
                                       sampler=sampler, window=window)
        (a, calls_a), (b, calls_b) = runs[True], runs[False]
        assert torch.equal(a, b), f"cache changes the samples ({sampler}, steps={steps})"
        if window is not None:
            wider, _ = model.sample(x, steps=steps, generator=torch.Generator().manual_seed(1), cache=False,
                                    sampler=sampler, window=window + size)
            assert not torch.equal(wider, b), f"control: the window changes nothing ({sampler}, steps={steps})"
        assert torch.equal(a[:, :prompt], x[:, :prompt]) and (a != CACHE_V).all()
        assert calls_a == calls_b + n_blocks - 1, (sampler, steps, calls_a, calls_b)
        if steps is None:
            assert calls_b == expected_calls(x, size, sampler, steps), (sampler, steps, calls_b)
        else:  # at most `steps` calls per block with masks, at least one
            masked_blocks = expected_calls(x, size, "confidence", 1)
            assert masked_blocks <= calls_b <= steps * masked_blocks, (sampler, steps, calls_b)


@torch.no_grad()
def greedy_oracle(model, x, W):
    """Greedy confidence decoding the slow way: block by block, every token of block j attending to the tokens
    of blocks j - W + 1 .. j (a banded mask built here with loops over the whole history); inside a block the
    most confident masked position first (largest probability), filled with its argmax."""
    y, (R, n), size, V = x.clone(), x.shape, model.block_size, model.vocab_size
    for s in range(0, n, size):
        e = min(s + size, n)
        mask = torch.zeros(e, e, dtype=torch.bool)
        for q in range(e):
            for k in range(e):
                mask[q, k] = q // size - W < k // size <= q // size
        while (y[:, s:e] == V).any():
            logits = model.net(y[:, :e], torch.zeros(R), mask=mask)[:, s:e, :V].double()
            conf = logits.softmax(-1).max(-1).values.masked_fill(y[:, s:e] != V, -1.0)
            for r in range(R):
                if (y[r, s:e] == V).any():
                    i = int(conf[r].argmax())
                    y[r, s + i] = int(logits[r, i].argmax())
    return y


@pytest.mark.parametrize("n,window", [(20, 8), (7, None)])
def test_greedy_decoding_matches_oracle(n, window):
    """Greedy confidence decoding (temperature 0, blocks of 2: one position per step, the most confident
    first) is deterministic; greedy_oracle reproduces it from the documented rule. Beyond the training length
    (window 8, 20 tokens after a 3-token prompt) block j sees blocks j - 3 .. j; the oracle with a window of
    one block more or less gives other tokens (power). Within the training length (the default window = n,
    here n = 7: a last block of one token) every block sees all the blocks before it."""
    size, R = 2, 16
    model = make(CACHE_V, size, n_layers=2, seed=CACHE_SEED)
    g = torch.Generator().manual_seed(4)
    x = torch.full((R, n), CACHE_V)
    x[:, :3] = torch.randint(CACHE_V, (R, 3), generator=g)
    out, _ = model.sample(x, sampler="confidence", temperature=0, window=window, generator=g)
    W = window // size if window else n  # no window: all the blocks
    expected = greedy_oracle(model, x, W)
    assert torch.equal(out, expected), (f"greedy decoding (window {window}) differs from the oracle at positions "
                                        f"{(out != expected).nonzero()[:, 1].unique().tolist()}")
    if window:
        for w in (W - 1, W + 1):  # power: the window matters
            assert not torch.equal(greedy_oracle(model, x, w), expected), w


# ---- FlexAttention ----------------------------------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_attention_matches_sdpa():
    """Under no_grad, attention="flex" (a FlexAttention BlockMask, L = 8: not a multiple of 128) gives the
    train_logits of attention="sdpa" (a bool mask) and of our loop-mask oracle."""
    fa = pytest.importorskip("torch.nn.attention.flex_attention")
    V, L = 3, 8
    model = make(V, 2, n_layers=2, seed=10)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randint(V, (4, L), generator=g)
    x_t = torch.where(torch.rand(4, L, generator=g) < 0.5, V, x0)
    masks = []
    net_forward = model.net.forward

    def spy(*args, **kw):  # record the attention mask train_logits hands the network
        masks.append(kw.get("mask"))
        return net_forward(*args, **kw)
    model.net.forward = spy
    with torch.no_grad():
        model.attention = "sdpa"
        a = model.train_logits(x_t, x0)
        model.attention = "flex"
        b = model.train_logits(x_t, x0)
    assert isinstance(masks[0], torch.Tensor) and isinstance(masks[1], fa.BlockMask), [type(m) for m in masks]
    torch.testing.assert_close(b, a, atol=1e-5, rtol=0)
    torch.testing.assert_close(b[..., :V].double().log_softmax(-1), oracle_logp(model, x_t, x0), atol=1e-5, rtol=0)


# ---- training times -------------------------------------------------------------------------------------------
def test_draw_times_clipped_antithetic_and_mdlm_compatible():
    """t_min = 0.3, t_max = 0.8: every time in [0.3, 0.8], and per block column the sorted times are evenly
    spaced by 0.5 / B (antithetic), with a different shift per block. i.i.d. draws stay in range too.
    t_min = 0, t_max = 1, one block: exactly MDLM.draw_times (same generator state)."""
    B, nb = 16, 3
    model = make(t_min=0.3, t_max=0.8)
    t = model.draw_times(B, CPU, torch.Generator().manual_seed(0), blocks=nb)
    assert t.shape == (B, nb) and t.dtype == torch.float64
    assert (t >= 0.3).all() and (t <= 0.8).all()
    gaps = t.sort(dim=0).values.diff(dim=0)
    torch.testing.assert_close(gaps, torch.full_like(gaps, 0.5 / B), atol=1e-12, rtol=0)
    assert len({round(float(v), 9) for v in t.min(dim=0).values}) == nb, "one shift per block"
    iid = make(t_min=0.3, t_max=0.8, antithetic=False).draw_times(B, CPU, torch.Generator().manual_seed(0), nb)
    assert (iid >= 0.3).all() and (iid <= 0.8).all() and iid.sort(0).values.diff(0).std() > 1e-3
    bd = make()
    md = MDLM(3, 16, 2, 1, 8, 0.0)
    for seed in range(3):
        a = bd.draw_times(B, CPU, torch.Generator().manual_seed(seed), blocks=1)
        assert a.shape == (B, 1)
        assert torch.equal(a[:, 0], md.draw_times(B, CPU, torch.Generator().manual_seed(seed)))
