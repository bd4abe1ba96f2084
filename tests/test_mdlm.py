"""
Independent-oracle tests of mdlm.MDLM (masked diffusion in continuous time).

The network is a fixed random DiT (conftest.randomize_weights: outputs depend on x_t and, with time
conditioning, on t); everything else is recomputed here from the math of mdlm.py's docstring and
../shared/reference/model-families.md sections 1-2, on a vocabulary of V = 3 and sequences of L = 3:

- ce_table: the summed cross-entropy -log p(x_0^l | x_t) over the masked positions, for every clean
  sequence x_0, every non-empty mask pattern and any times t, from model.logits' first V columns with our
  own float64 softmax (so a mask column that is not -inf changes the model's numbers but not ours).
- The continuous NELBO: Gauss-Legendre over t of w(t) E_{x_t}[...], the expectation over masks an exact
  sum over the 2^L patterns (u = 1 - alpha(t) the masking probability, our own alpha and w). Without
  time conditioning the integrand is a polynomial in u divided by u, so the NELBO has a closed form
  (a Beta integral per pattern): a second, independent oracle.
- The N-step bound: the sum over the grid t_i = i/N, exact over the mask patterns.
- The samplers: exact output distributions by dynamic programming over partially masked states (the
  N-step ancestral chain; the continuous process as a uniformly random unmasking order, and with time
  conditioning a nested Gauss-Legendre integral over the ordered unmask times), compared with the
  samples by a chi-square test whose power against plausible wrong samplers is checked too.

Every unbiasedness check (mean of many estimates within 4 standard errors of the exact value) also
asserts that the same band excludes the values of plausibly wrong implementations.
"""
import itertools
import math

import numpy as np
import pytest
import torch

from conftest import assert_unbiased, chisquare_pvalue, estimates, randomize_weights
from mdlm import MDLM

V, L = 3, 3
M = V                                                  # the mask id
SEQS = list(itertools.product(range(V), repeat=L))     # all 27 clean sequences
PATTERNS = np.array([p for p in itertools.product((False, True), repeat=L) if any(p)])  # 7 non-empty masks
K = PATTERNS.sum(1)                                    # number of masked positions of each pattern
SUB = [(0, 0, 0), (1, 2, 0), (2, 1, 1)]                # the clean sequences used with time conditioning
GL_PANELS = 200                                        # t-quadrature panels (a time-conditioned net oscillates in t)
SAMPLER_SEED = 9                                       # weights with clear context and time dependence (power)


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny tensors, 2 cores shared


def make(tc, schedule="linear", seed=3, **kw):
    torch.manual_seed(0)
    model = MDLM(V, 16, 2, 1, 8, 0.0, schedule=schedule, time_conditioning=tc, **kw)
    return randomize_weights(model, seed).eval()


# ---- the schedule, from the formulas (not from the model) ---------------------------------------------------
def alpha(schedule, t):
    t = np.asarray(t, dtype=np.float64)
    return 1 - t if schedule == "linear" else 1 - np.cos(np.pi / 2 * (1 - t))


def weight(schedule, t):
    """w(t) = -alpha'(t) / (1 - alpha(t))."""
    t = np.asarray(t, dtype=np.float64)
    return 1 / t if schedule == "linear" else np.pi / 2 * np.tan(np.pi / 2 * (1 - t))


def du_dt(schedule, u):
    """d(1 - alpha)/dt as a function of u = 1 - alpha(t)."""
    u = np.asarray(u, dtype=np.float64)
    return np.ones_like(u) if schedule == "linear" else np.pi / 2 * np.sqrt(1 - u ** 2)


def gauss_legendre(a, b, panels, order=8):
    """Composite Gauss-Legendre nodes and weights on [a, b]."""
    x, w = np.polynomial.legendre.leggauss(order)
    edges = np.linspace(a, b, panels + 1)
    mid, half = (edges[1:] + edges[:-1]) / 2, (edges[1:] - edges[:-1]) / 2
    return (mid[:, None] + half[:, None] * x).ravel(), (half[:, None] * w).ravel()


# ---- the bound oracles --------------------------------------------------------------------------------------
@torch.no_grad()
def ce_table(model, seqs, times, chunk=24_000):
    """ce[n, s, p] = sum over the masked positions of pattern p of -log p(x_0^l | x_t) for clean sequence
    seqs[s] at time times[n]: float64 (N, S, P)."""
    x0 = torch.tensor(seqs)
    pat = torch.tensor(PATTERNS)
    xt = torch.where(pat[None], M, x0[:, None]).reshape(-1, L)
    target = x0[:, None].expand(-1, len(PATTERNS), -1).reshape(-1, L)
    masked = pat[None].expand(len(seqs), -1, -1).reshape(-1, L)
    R = xt.shape[0]
    times = np.atleast_1d(np.asarray(times, dtype=np.float64))
    per = max(1, chunk // R)
    out = []
    for i in range(0, len(times), per):
        tt = torch.tensor(times[i:i + per])
        n = len(tt)
        logp = model.logits(xt.repeat(n, 1), tt.repeat_interleave(R))[..., :V].double().log_softmax(-1)
        nll = -logp.gather(-1, target.repeat(n, 1)[..., None])[..., 0]
        out.append((nll * masked.repeat(n, 1)).sum(-1).view(n, len(seqs), len(PATTERNS)).numpy())
    return np.concatenate(out)


def expected_ce(table, u):
    """E_{x_t}[sum over masked of -log p] for masking probabilities u (N,): (N, S), exact over the patterns."""
    u = np.asarray(u, dtype=np.float64)[:, None]
    prob = u ** K * (1 - u) ** (L - K)
    return (table * prob[:, None, :]).sum(-1)


def nelbo_closed_form(table1):
    """Time-free network (table1: (S, P)): int_0^1 (1/u) u^k (1-u)^(L-k) du = (k-1)! (L-k)! / L! per pattern."""
    beta = np.array([math.factorial(k - 1) * math.factorial(L - k) / math.factorial(L) for k in K])
    return table1 @ beta


def nelbo_integral(model, schedule, seqs, a=0.0, b=1.0, panels=GL_PANELS, order=8, w_fn=weight):
    """int_a^b w(t) E_{x_t}[sum_masked -log p(x_0 | x_t)] dt per sequence (nats per sequence), quadrature in t."""
    t, w = gauss_legendre(a, b, panels, order)
    return (w * w_fn(schedule, t)) @ expected_ce(ce_table(model, seqs, t), 1 - alpha(schedule, t))


def n_step_bound(table_fn, schedule, N):
    """sum_i (alpha(s_i) - alpha(t_i)) / (1 - alpha(t_i)) E_{x_{t_i}}[sum_masked -log p], t_i = i/N: (S,)."""
    t = np.arange(1, N + 1) / N
    s = np.arange(0, N) / N
    coef = (alpha(schedule, s) - alpha(schedule, t)) / (1 - alpha(schedule, t))
    return coef @ expected_ce(table_fn(t), 1 - alpha(schedule, t))



# ---- module fixtures: the models and their exact bounds ---------------------------------------------------
@pytest.fixture(scope="module")
def free():
    """Time-free network, linear schedule; its CE table (no t dependence) for all 27 sequences."""
    model = make(False)
    return model, ce_table(model, SEQS, [0.5])[0]


@pytest.fixture(scope="module")
def tc_exact():
    """Time-conditioned networks (same weights) with the cosine and linear schedules, and their exact
    continuous NELBOs (per sequence, SUB) by quadrature in t."""
    out = {}
    for schedule in ("cosine", "linear"):
        model = make(True, schedule)
        out[schedule] = (model, nelbo_integral(model, schedule, SUB))
    return out


# ---- schedule, weight, logits -------------------------------------------------------------------------------
def test_schedule_weight_and_logits():
    t = np.array([1e-4, 0.01, 0.3, 0.5, 0.77, 0.999])
    for schedule in ("linear", "cosine"):
        m = make(False, schedule)
        # catches a cosine with the wrong phase (cos(pi t / 2)), or a weight of -alpha' alone (no 1/(1-alpha))
        np.testing.assert_allclose(m.alpha(torch.tensor(t)).numpy(), alpha(schedule, t), rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(m.weight(torch.tensor(t)).numpy(), weight(schedule, t), rtol=1e-10)
        np.testing.assert_allclose(m.alpha_inverse(torch.tensor(alpha(schedule, t))).numpy(), t, rtol=1e-7)
        eps = 1e-6  # the weight is -alpha'/(1 - alpha): a finite difference of our own alpha
        fd = -(alpha(schedule, t + eps) - alpha(schedule, t - eps)) / (2 * eps) / (1 - alpha(schedule, t))
        np.testing.assert_allclose(weight(schedule, t), fd, rtol=1e-5)
    x = torch.tensor([[M, M, M], [0, M, 2], [1, M, 2], [M, M, M]])
    free_m, tc_m = make(False), make(True)
    for m in (free_m, tc_m):
        lg = m.logits(x, torch.tensor([0.1, 0.5, 0.5, 0.9], dtype=torch.float64))
        assert torch.isneginf(lg[..., M]).all() and torch.isfinite(lg[..., :V]).all()
    with torch.no_grad():
        a = free_m.logits(x, torch.full((4,), 0.1, dtype=torch.float64))
        b = free_m.logits(x, torch.full((4,), 0.9, dtype=torch.float64))
        assert torch.equal(a, b), "without time conditioning the prediction must not depend on t"
        # preconditions of the power checks below: the predictions depend on the context and on t
        p = a[..., :V].softmax(-1)
        assert (p[1, 1] - p[2, 1]).abs().max() > 0.02
        c = tc_m.logits(x, torch.full((4,), 0.1, dtype=torch.float64))[..., :V].softmax(-1)
        d = tc_m.logits(x, torch.full((4,), 0.6, dtype=torch.float64))[..., :V].softmax(-1)
        assert (c - d).abs().max() > 0.02


# ---- the continuous NELBO and the N-step bound (oracles) ---------------------------------------------------
def test_nelbo_oracles_agree_and_schedule_invariance(free, tc_exact):
    """Time-free network: quadrature in t with the linear and the cosine weight both equal the closed form
    (the NELBO does not depend on the schedule). Time-conditioned: the quadrature has converged, and the
    NELBO now depends on the schedule (the network sees different t for the same masking probability)."""
    model, table = free
    closed = nelbo_closed_form(table)
    for schedule in ("linear", "cosine"):
        t, w = gauss_legendre(0, 1, 16)
        by_t = (w * weight(schedule, t)) @ expected_ce(np.broadcast_to(table, (len(t),) + table.shape),
                                                       1 - alpha(schedule, t))
        np.testing.assert_allclose(by_t, closed, rtol=1e-9)
    # the schedule changes nothing for a time-free network: the cosine model (same weights) has the same table
    np.testing.assert_allclose(ce_table(make(False, "cosine"), SEQS, [0.3])[0], table, rtol=1e-6)
    # time-conditioned: a finer, higher-order quadrature gives the same numbers (one sequence, to save time)
    model, exact = tc_exact["cosine"]
    finer = nelbo_integral(model, "cosine", SUB[:1], panels=150, order=12)
    np.testing.assert_allclose(finer, exact[:1], rtol=2e-4)
    assert np.abs(tc_exact["linear"][1] - exact).max() > 0.05


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_n_step_bound_converges_like_one_over_n(free, schedule):
    """L_N - NELBO is a Riemann-sum error: N (L_N - NELBO) -> (1/2) int_0^1 h'(u) du/dt du with
    h(u) = E_u[sum_masked -log p] / u, a polynomial here (time-free network). Catches an oracle or a grid
    that is off by one step (error O(1), not O(1/N))."""
    _, table = free
    closed = nelbo_closed_form(table)
    u, w = gauss_legendre(0, 1, 4, 8)
    km = K[None, :]
    dh = (km - 1) * u[:, None] ** np.maximum(km - 2, 0) * (1 - u[:, None]) ** (L - km) \
        - (L - km) * u[:, None] ** (km - 1) * (1 - u[:, None]) ** np.maximum(L - km - 1, 0)
    limit = 0.5 * (w * du_dt(schedule, u)) @ (dh @ table.T)
    if schedule == "linear":
        np.testing.assert_allclose(limit, 0.5 * (table[:, K == L].sum(1) - table[:, K == 1].sum(1)), atol=1e-12)
    errs = []
    for N in (4, 16, 64, 1024):
        gap = n_step_bound(lambda t: np.broadcast_to(table, (len(t),) + table.shape), schedule, N) - closed
        errs.append(np.abs(N * gap - limit).max())
        if N == 1024:
            np.testing.assert_allclose(N * gap, limit, atol=2e-3)
    assert errs[0] > errs[1] > errs[2] > errs[3] and errs[3] < errs[0] / 50, errs  # the next order, O(1/N^2)
    assert np.abs(limit).max() > 0.01  # the gap is not trivially zero for this network


# ---- model.batch_bound --------------------------------------------------------------------------------------
def batch_bound_estimates(model, seqs, copies, n, seed, T=None):
    """Estimates of model.batch_bound(..., T) on batches whose rows are a random permutation of `copies` copies of
    seqs (exchangeable rows, like random data windows), each with a fresh uniform offset."""
    base = torch.tensor(seqs).repeat(copies, 1)
    g = torch.Generator().manual_seed(seed)

    def one(_):
        perm = torch.randperm(base.shape[0], generator=g)
        offset = float(torch.rand((), generator=g))
        with torch.no_grad():
            value = model.batch_bound(base[perm], offset, g, T=T)
        assert value.dtype == torch.float64 and value.dim() == 0
        return value
    return estimates(one, n)


def test_batch_bound_continuous_unbiased_time_free(free):
    model, table = free
    exact = nelbo_closed_form(table).mean() / L
    mean, se = batch_bound_estimates(model, SEQS, 20, 100, seed=1)
    k_means = np.array([table[:, K == k].mean(1) / k for k in range(1, L + 1)]).mean(0)  # per seq, = exact
    np.testing.assert_allclose(k_means.mean(), exact, rtol=1e-12)
    wrong = {
        # the mean of the summed masked CE divided by L instead of by the number masked k
        "sum / L instead of / k": np.mean([table[:, K == k].mean(1).mean() / L for k in range(1, L + 1)]),
        # no weight w(t) = 1/u: the plain masked cross-entropy, E_{u ~ U[0,1]} E_{x_t}[sum_masked CE] / L
        "no weight": (table @ np.array([math.factorial(k) * math.factorial(L - k) / math.factorial(L + 1)
                                        for k in K])).mean() / L,
    }
    assert_unbiased(mean, se, exact, wrong, "T=0, time-free")


def test_batch_bound_continuous_unbiased_time_conditioned(tc_exact):
    """Cosine schedule: the network must be called at t = alpha^{-1}(1 - u). Calling it at t = u (the
    linear-schedule time) estimates the linear model's NELBO instead, which the check rejects."""
    model, exact_seq = tc_exact["cosine"]
    exact = exact_seq.mean() / L
    mean, se = batch_bound_estimates(model, SUB, 100, 100, seed=2)
    wrong = {"t = u (ignores the schedule)": tc_exact["linear"][1].mean() / L}
    assert_unbiased(mean, se, exact, wrong, "T=0, time-conditioned cosine")


@pytest.mark.parametrize("tc,schedule,N", [(False, "linear", 4), (True, "cosine", 16)])
def test_batch_bound_n_step_unbiased(free, tc_exact, tc, schedule, N):
    model = make(tc, schedule)
    seqs = SUB if tc else SEQS
    if tc:
        table_fn = lambda t: ce_table(model, seqs, t)  # noqa: E731
        continuous = tc_exact[schedule][1].mean() / L
    else:
        table_fn = lambda t: np.broadcast_to(free[1], (len(t),) + free[1].shape)  # noqa: E731
        continuous = nelbo_closed_form(free[1]).mean() / L
    exact = n_step_bound(table_fn, schedule, N).mean() / L
    mean, se = batch_bound_estimates(model, seqs, 100 if tc else 20, 100, seed=3, T=N)
    wrong = {f"weight {N + 1} instead of {N}": exact * (N + 1) / N}
    if tc:
        wrong["the continuous NELBO (T ignored)"] = continuous
    assert_unbiased(mean, se, exact, wrong, f"T={N}")


# ---- model.forward (the training loss) ---------------------------------------------------------------------
def forward_estimates(model, seqs, copies, n, seed):
    torch.manual_seed(seed)
    x0 = torch.tensor(seqs).repeat(copies, 1)
    with torch.no_grad():
        return estimates(lambda _: model(x0)[1], n)


@pytest.mark.parametrize("antithetic", [True, False])
def test_forward_loss_unbiased_time_conditioned(tc_exact, antithetic):
    """t ~ U[t_eps, 1] and loss = w(t) sum_masked CE / L: its expectation is
    (NELBO - int_0^t_eps) / (1 - t_eps), within 0.2% of the NELBO at t_eps = 1e-3."""
    _, exact_seq = tc_exact["cosine"]
    model = make(True, "cosine", antithetic=antithetic)
    eps = model.t_eps
    assert eps == 1e-3
    dropped = nelbo_integral(model, "cosine", SUB, 0.0, eps, panels=1)
    exact = ((exact_seq - dropped) / (1 - eps)).mean() / L
    assert abs(exact - exact_seq.mean() / L) < 2e-3 * exact
    mean, se = forward_estimates(model, SUB, 80, 150, seed=4)
    wrong = {  # the linear schedule's weight 1/t with the cosine schedule's masks
        "weight 1/t": nelbo_integral(model, "cosine", SUB, eps, 1.0, w_fn=lambda s, t: 1 / t).mean() / L / (1 - eps)}
    assert_unbiased(mean, se, exact, wrong, f"forward, antithetic={antithetic}")


def test_forward_loss_target_with_a_large_t_eps(free):
    """t_eps = 0.25 makes the convention visible: E[loss] = E_{t ~ U[t_eps, 1]}[w(t) E_{x_t} CE] / L
    = int_{t_eps}^1 / (1 - t_eps) (MDLM's convention: at t_eps = 1e-3 the 1/(1 - t_eps) roughly offsets the
    dropped [0, t_eps]). Rejects the integral over [t_eps, 1] without the 1 / (1 - t_eps) of the uniform
    density (a t_eps that is ignored, t ~ U[0, 1], gives the full NELBO: for this network too close to
    the target to test)."""
    _, table = free
    model = make(False, t_eps=0.25)
    eps = 0.25

    def integral(a, b):  # int_a^b w(t) E_{x_t}[sum_masked CE] dt / L, mean over the sequences
        t, w = gauss_legendre(a, b, 4)
        f = weight("linear", t) * expected_ce(np.broadcast_to(table, (len(t),) + table.shape),
                                              1 - alpha("linear", t)).T
        return (f @ w).mean() / L
    exact = integral(eps, 1) / (1 - eps)
    mean, se = forward_estimates(model, SEQS, 10, 150, seed=5)
    wrong = {"integral over [t_eps, 1], no 1/(1 - t_eps)": integral(eps, 1)}
    assert_unbiased(mean, se, exact, wrong, "forward, t_eps=0.25")


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_masked_ce_weighting_loss_and_bound(free, schedule):
    """loss_weighting="masked_ce": E[loss] = int_{t_eps}^1 E_{x_t}[sum_masked CE] dt / ((1 - t_eps) L), no w(t)
    (exact over the mask patterns, quadrature over t; rejects the ELBO-weighted value, and a mean over the masked
    tokens instead of a sum / L); on the same draws metrics["bound"] is the ELBO weighting's loss."""
    _, table = free
    model = make(False, schedule, t_eps=0.25, loss_weighting="masked_ce")
    elbo = make(False, schedule, t_eps=0.25)
    t, w = gauss_legendre(0.25, 1, 8)
    ce = expected_ce(np.broadcast_to(table, (len(t),) + table.shape), 1 - alpha(schedule, t)).T  # (S, N)
    exact = (ce @ w).mean() / L / 0.75
    mean, se = forward_estimates(model, SEQS, 10, 150, seed=5)
    masked_share = 1 - alpha(schedule, t)
    wrong = {"ELBO weighting": ((weight(schedule, t) * ce) @ w).mean() / L / 0.75,
             "mean over the masked tokens": (ce @ w).mean() / L / 0.75 / (masked_share @ w / 0.75)}
    assert_unbiased(mean, se, exact, wrong, f"masked_ce loss, {schedule}")
    x0 = torch.tensor(SEQS).repeat(4, 1)
    torch.manual_seed(7)
    _, loss, metrics = model(x0)
    torch.manual_seed(7)
    _, elbo_loss, elbo_metrics = elbo(x0)
    assert torch.equal(metrics["bound"], elbo_loss) and torch.equal(elbo_metrics["bound"], elbo_loss)
    assert not torch.equal(loss, elbo_loss)
    with pytest.raises(ValueError, match="loss_weighting"):
        make(False, loss_weighting="nope")


# ---- learning a known answer --------------------------------------------------------------------------------
def test_iid_tokens_nelbo_reaches_entropy():
    """On i.i.d. tokens the best NELBO per token is the entropy H (every masked token costs at least H);
    the trained model's exact bound (batch_bound, unbiased) approaches H from above."""
    torch.manual_seed(0)
    probs = torch.tensor([0.7, 0.15, 0.1, 0.05])
    H = -(probs * probs.log()).sum().item()
    Lt = 16
    model = MDLM(len(probs), 16, 2, 1, 8, 0.0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)

    def batch(n):
        return torch.multinomial(probs, n * Lt, replacement=True).view(n, Lt)

    def bound(n_batches, seed):
        model.eval()
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            vals = np.array([float(model.batch_bound(batch(128), float(torch.rand((), generator=g)), g))
                             for _ in range(n_batches)])
        model.train()
        return vals.mean(), vals.std(ddof=1) / math.sqrt(n_batches)

    start, _ = bound(10, 0)
    for _ in range(200):
        _, loss, _ = model(batch(64))
        opt.zero_grad()
        loss.backward()
        opt.step()
    value, se = bound(60, 1)
    print(f"H {H:.4f} start {start:.4f} trained {value:.4f} se {se:.4f}")
    assert start > 1.2 * H, "the untrained model should be far from the entropy"
    assert value > H - 4 * se, f"NELBO {value:.4f} below the entropy {H:.4f} (se {se:.4f}): not a bound"
    assert value < 1.05 * H, f"NELBO {value:.4f} not within 5% of the entropy {H:.4f}"


# ---- the sampler --------------------------------------------------------------------------------------------
@torch.no_grad()
def predict(model, states, times):
    """p(x_0 | x_t) for states (n, L) at times (n,): float64 (n, L, V), our softmax over the first V logits."""
    x = torch.tensor(states).view(-1, L)
    t = torch.as_tensor(np.asarray(times, dtype=np.float64)).expand(x.shape[0])
    return model.logits(x, t)[..., :V].double().softmax(-1).numpy()


def exact_ancestral(model, start, schedule, N, time_of=lambda t, s: t, step_prob=None):
    """Output distribution of the N-step ancestral sampler: from t_j = j/N to s = (j-1)/N each masked token
    unmasks w.p. (alpha(s) - alpha(t)) / (1 - alpha(t)) to a draw from p(x_0 | x_t) (network at time_of(t, s)).
    time_of and step_prob (the unmask probability, a function of t, s; all the rest unmask at the last
    step) describe wrong variants for the power checks."""
    if step_prob is None:
        step_prob = lambda t, s: (alpha(schedule, s) - alpha(schedule, t)) / (1 - alpha(schedule, t))  # noqa: E731
    dist = {tuple(start): 1.0}
    for j in range(N, 0, -1):
        t, s = j / N, (j - 1) / N
        p = 1.0 if j == 1 else float(step_prob(t, s))
        states = [st for st in dist if M in st]
        preds = dict(zip(states, predict(model, states, [time_of(t, s)] * len(states)))) if states else {}
        new = {}
        for st, mass in dist.items():
            if st not in preds:
                new[st] = new.get(st, 0.0) + mass
                continue
            options = [[(tok, 1.0)] if tok != M else
                       [(k, p * preds[st][l, k]) for k in range(V)] + ([(M, 1 - p)] if p < 1 else [])
                       for l, tok in enumerate(st)]
            for combo in itertools.product(*options):
                key = tuple(tok for tok, _ in combo)
                new[key] = new.get(key, 0.0) + mass * math.prod(q for _, q in combo)
        dist = new
    assert all(M not in k for k in dist) and abs(sum(dist.values()) - 1) < 1e-9
    return dist


def exact_any_order(model, start):
    """Continuous process of a time-free network: one position at a time, uniformly at random among the
    masked ones, drawn from p(x_0 | current state)."""
    dist = {tuple(start): 1.0}
    for _ in range(sum(tok == M for tok in start)):
        states = list(dist)
        new = {}
        for st, pred in zip(states, predict(model, states, [0.5] * len(states))):
            masked = [l for l in range(L) if st[l] == M]
            for l in masked:
                for k in range(V):
                    key = st[:l] + (k,) + st[l + 1:]
                    new[key] = new.get(key, 0.0) + dist[st] / len(masked) * pred[l, k]
        dist = new
    assert abs(sum(dist.values()) - 1) < 1e-9
    return dist


def unmask_density(schedule, tau):
    """Density of an unmask time tau = alpha^{-1}(U), U uniform: P(tau <= t) = 1 - alpha(t), so -alpha'(t)."""
    tau = np.asarray(tau, dtype=np.float64)
    return np.ones_like(tau) if schedule == "linear" else np.pi / 2 * np.sin(np.pi / 2 * (1 - tau))


def exact_continuous_two_masks(model, start, schedule, time_of=lambda tau: tau, panels=GL_PANELS, order=8):
    """Continuous process with exactly two masked positions and any network: each position unmasks at its
    own tau, i.i.d. with density -alpha'(tau) (the later tau first), so with r = 1 - tau
    P(x) = sum over the two orders of int_{r1 < r2} rho(r1) p(x_first | start, t(r1)) rho(r2)
    p(x_second | state_1, t(r2)) dr, by nested composite Gauss-Legendre (the inner integral up to each outer
    node on that node's panel). time_of (the network's time for an unmask time) describes a wrong variant."""
    l1, l2 = [l for l in range(L) if start[l] == M]
    xg, wg = np.polynomial.legendre.leggauss(order)
    edges = np.linspace(0, 1, panels + 1)
    a, half = edges[:-1], (edges[1:] - edges[:-1]) / 2
    r = (a + half)[:, None] + half[:, None] * xg                     # outer nodes (panels, order)
    wr = half[:, None] * wg * unmask_density(schedule, 1 - r)
    inner = a[:, None, None] + (r - a[:, None])[..., None] * (xg + 1) / 2
    w_inner = ((r - a[:, None]) / 2)[..., None] * wg * unmask_density(schedule, 1 - inner)
    p0 = predict(model, [start] * r.size, time_of(1 - r.ravel())).reshape(panels, order, L, V)
    p0_in = predict(model, [start] * inner.size, time_of(1 - inner.ravel())).reshape(panels, order, order, L, V)
    full = (wr[..., None, None] * p0).sum(1)
    F = (np.cumsum(full, 0) - full)[:, None] + (w_inner[..., None, None] * p0_in).sum(2)  # int_0^r rho p0
    dist = {}
    for first, second in ((l1, l2), (l2, l1)):
        for k in range(V):
            st = start[:first] + (k,) + start[first + 1:]
            p1 = predict(model, [st] * r.size, time_of(1 - r.ravel())).reshape(panels, order, L, V)
            for k2 in range(V):
                key = st[:second] + (k2,) + st[second + 1:]
                dist[key] = dist.get(key, 0.0) + float((wr * F[..., first, k] * p1[..., second, k2]).sum())
    assert abs(sum(dist.values()) - 1) < 1e-6, sum(dist.values())
    return dist


def draw_samples(model, start, n, seed, **kw):
    x = torch.tensor([start] * n)
    out, calls = model.sample(x, generator=torch.Generator().manual_seed(seed), **kw)
    return out, calls


def tv(p, q):
    return 0.5 * sum(abs(p.get(k, 0.0) - q.get(k, 0.0)) for k in set(p) | set(q))


ALL = (M, M, M)
PROMPT = (M, 1, M)


@pytest.mark.parametrize("tc,schedule,start,N", [(False, "linear", ALL, 3), (True, "cosine", ALL, 4),
                                                 (True, "linear", PROMPT, 5)])
def test_sampler_n_steps_matches_exact(tc, schedule, start, N):
    """Catches: steps ignored (the continuous process; time-free), the network called at s instead of t, and
    the unmask probability alpha(s) - alpha(t) not divided by 1 - alpha(t), left-overs unmasked at the end
    (time-conditioned: for a time-free network the latter changes the distribution too little to test)."""
    model = make(tc, schedule, seed=SAMPLER_SEED)
    exact = exact_ancestral(model, start, schedule, N)
    samples, calls = draw_samples(model, start, 16_000, seed=7, steps=N)
    assert calls <= N
    assert (samples[:, [l for l in range(L) if start[l] != M]] ==
            torch.tensor([tok for tok in start if tok != M])).all(), "a given token changed"
    p = chisquare_pvalue(samples, exact)
    assert p > 1e-4, f"steps={N} samples do not follow the {N}-step ancestral chain (p = {p:.3g})"
    wrong = {}
    if tc:
        wrong["network at s"] = exact_ancestral(model, start, schedule, N, time_of=lambda t, s: s)
        wrong["alpha(s) - alpha(t) undivided"] = exact_ancestral(
            model, start, schedule, N, step_prob=lambda t, s: alpha(schedule, s) - alpha(schedule, t))
    else:
        wrong["continuous process"] = exact_any_order(model, start)
    for name, dist in wrong.items():
        assert tv(dist, exact) > 0.01, name
        q = chisquare_pvalue(samples, dist)
        assert q < 1e-6, f"the chi-square test cannot tell '{name}' (p = {q:.3g})"


def test_sampler_continuous_time_free_matches_exact():
    model = make(False, seed=SAMPLER_SEED)
    exact = exact_any_order(model, ALL)
    samples, calls = draw_samples(model, ALL, 16_000, seed=8, steps=None)
    assert calls <= L
    p = chisquare_pvalue(samples, exact)
    assert p > 1e-4, f"steps=None samples do not follow the continuous process (p = {p:.3g})"
    # power: the one-shot sampler (every position from the all-masked prediction), a fixed left-to-right
    # order instead of a uniformly random one, and the 2-step chain
    pred = predict(model, [ALL], [0.5])[0]
    one_shot = {s: float(np.prod([pred[l, s[l]] for l in range(L)])) for s in SEQS}
    left_to_right = {}
    for s in SEQS:
        states = [tuple(s[:l]) + (M,) * (L - l) for l in range(L)]
        p = predict(model, states, [0.5] * L)
        left_to_right[s] = float(np.prod([p[l, l, s[l]] for l in range(L)]))
    for name, dist in (("one shot", one_shot), ("left to right", left_to_right),
                       ("2 steps", exact_ancestral(model, ALL, "linear", 2))):
        assert chisquare_pvalue(samples, dist) < 1e-6, name


def test_sampler_continuous_time_conditioned_matches_exact():
    """Two masked positions around a given token, cosine schedule: the unmask times must be
    tau = alpha^{-1}(U). Catches tau = U (the inverse schedule forgotten: uniform unmask times) and the
    network fed the reversed time (1 - tau)."""
    # the nested oracle reproduces the exact any-order distribution for a time-free network
    free_m = make(False, "cosine", seed=SAMPLER_SEED)
    a = exact_continuous_two_masks(free_m, PROMPT, "cosine", panels=4)
    b = exact_any_order(free_m, PROMPT)
    assert max(abs(a[k] - b[k]) for k in b) < 1e-7
    model = make(True, "cosine", seed=SAMPLER_SEED)
    exact = exact_continuous_two_masks(model, PROMPT, "cosine")
    samples, calls = draw_samples(model, PROMPT, 16_000, seed=9, steps=None)
    assert calls <= 2 and (samples[:, 1] == 1).all()
    p = chisquare_pvalue(samples, exact)
    assert p > 1e-4, f"steps=None samples do not follow the continuous process (p = {p:.3g})"
    wrong = {"tau = U": exact_continuous_two_masks(model, PROMPT, "linear"),
             "network at 1 - tau": exact_continuous_two_masks(model, PROMPT, "cosine", time_of=lambda tau: 1 - tau)}
    for name, dist in wrong.items():
        assert tv(dist, exact) > 0.01, name
        q = chisquare_pvalue(samples, dist)
        assert q < 1e-6, f"the chi-square test cannot tell '{name}' (p = {q:.3g})"


@pytest.mark.parametrize("tc", [False, True])
def test_sampler_cache_given_tokens_and_calls(tc):
    model = make(tc, "cosine")
    x = torch.tensor([[M, M, M], [0, M, 2], [M, 1, M], [2, 2, M], [1, 0, 2]]).repeat(40, 1)
    for N in (1, 3, 8):
        a, calls_a = model.sample(x, steps=N, generator=torch.Generator().manual_seed(N))
        b, calls_b = model.sample(x, steps=N, generator=torch.Generator().manual_seed(N), cache=False)
        assert torch.equal(a, b), f"cache=True and cache=False differ at steps={N}"
        assert calls_a <= N and calls_b == N, (calls_a, calls_b)
        assert (a != M).all() and torch.equal(a[x != M], x[x != M])
    c, calls_c = model.sample(x, steps=None, generator=torch.Generator().manual_seed(0))
    assert calls_c <= L and (c != M).all() and torch.equal(c[x != M], x[x != M])
    d, calls_d = model.sample(x[4:5], steps=4, generator=torch.Generator().manual_seed(0))
    assert calls_d == 0 and torch.equal(d, x[4:5])  # nothing to generate: no network call


# ---- the reference sampler (sample_ancestral) and the fast one agree --------------------------------------
@pytest.mark.parametrize("tc,schedule,start,N,wrong_names", [
    (False, "linear", ALL, 3, ("N - 1 steps", "continuous")),
    (False, "cosine", PROMPT, 2, ("N - 1 steps", "continuous")),
    (True, "cosine", ALL, 4, ("network at s", "undivided", "N - 1 steps")),
    (True, "linear", PROMPT, 5, ("network at s", "undivided", "N - 1 steps"))])
def test_sample_ancestral_and_fast_sampler_same_distribution(tc, schedule, start, N, wrong_names):
    """sample_ancestral (the plain N-call loop) and sample(steps=N) (first-hitting) both follow the exact
    N-step chain (exact_ancestral), each by its own chi-square test. The two cannot share uniforms (the fast
    one draws each position's unmask step by one multinomial), so they are compared through the oracle. Power:
    each sample is rejected against plausible wrong references: a grid off by one step, and with time
    conditioning the network at s = t_{j-1} and the unmask probability alpha(s) - alpha(t) not divided by
    1 - alpha(t); for a time-free network (where the network's time is moot and the undivided probability
    moves the distribution too little to test) the continuous process instead (steps ignored)."""
    model = make(tc, schedule, seed=SAMPLER_SEED)
    exact = exact_ancestral(model, start, schedule, N)
    wrong = {
        "network at s": lambda: exact_ancestral(model, start, schedule, N, time_of=lambda t, s: s),
        "undivided": lambda: exact_ancestral(model, start, schedule, N,
                                             step_prob=lambda t, s: alpha(schedule, s) - alpha(schedule, t)),
        "N - 1 steps": lambda: exact_ancestral(model, start, schedule, N - 1),
        "continuous": lambda: exact_any_order(model, start)}
    wrong = {name: wrong[name]() for name in wrong_names}
    x = torch.tensor([start] * 16_000)
    given = [l for l in range(L) if start[l] != M]
    ref = model.sample_ancestral(x, N, generator=torch.Generator().manual_seed(11))
    fast, calls = model.sample(x, steps=N, generator=torch.Generator().manual_seed(12))
    assert calls <= N
    for name, samples in (("sample_ancestral", ref), ("sample", fast)):
        assert torch.equal(samples[:, given], x[:, given]), f"{name}: a given token changed"
        p = chisquare_pvalue(samples, exact)
        assert p > 1e-4, f"{name}(steps={N}) does not follow the {N}-step ancestral chain (p = {p:.3g})"
        for wrong_name, dist in wrong.items():
            assert tv(dist, exact) > 0.04, wrong_name
            q = chisquare_pvalue(samples, dist)
            assert q < 1e-6, f"{name}: the chi-square test cannot tell '{wrong_name}' (p = {q:.3g})"


@pytest.mark.parametrize("tc", [False, True])
def test_sample_ancestral_calls_at_the_grid_and_fast_sampler_calls_fewer(tc):
    """The reference calls the network exactly N times, at t_j = j/N for j = N..1, every row, even with
    nothing to generate; the fast sampler at most N times (and at most L: one call per distinct unmask
    step). Both fill every mask and keep the given tokens."""
    model = make(tc, "cosine")
    x = torch.tensor([[M, M, M], [0, M, 2], [M, 1, M], [2, 2, M], [1, 0, 2]]).repeat(20, 1)
    seen = []
    net = model.logits
    model.logits = lambda x_t, t: seen.append((x_t.shape[0], t.clone())) or net(x_t, t)
    for N in (1, 2, 7, 40):
        seen.clear()
        ref = model.sample_ancestral(x, N, generator=torch.Generator().manual_seed(N))
        assert [n for n, _ in seen] == [len(x)] * N
        assert all(torch.equal(t, torch.full((len(x),), j / N, dtype=torch.float64))
                   for (_, t), j in zip(seen, range(N, 0, -1))), "not the grid t_j = j/N, j = N..1"
        fast, calls = model.sample(x, steps=N, generator=torch.Generator().manual_seed(N))
        assert calls <= min(N, L), (N, calls)
        for out in (ref, fast):
            assert (out != M).all() and torch.equal(out[x != M], x[x != M])
    seen.clear()
    assert torch.equal(model.sample_ancestral(x[4:5], 3), x[4:5]) and len(seen) == 3


# ---- torch.compile ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("tc", [False, True])
def test_training_forward_traces_as_one_graph(tc):
    import torch._dynamo
    torch._dynamo.reset()
    model = MDLM(5, 16, 2, 1, 8, 0.1, schedule="cosine", time_conditioning=tc)
    explanation = torch._dynamo.explain(model)(torch.randint(5, (4, 8)))
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1
    torch._dynamo.reset()
