"""
Independent-oracle tests of duo.Duo (uniform-state diffusion, UDLM's NELBO in Duo's closed form, Duo's Gaussian
curriculum) and of duo.py's module functions.

The network is a fixed random time-conditioned DiT (conftest.randomize_weights) whose time embedding keeps only
slow frequencies, on a vocabulary of V = 3 and sequences of L = 2 (9 clean sequences, 9 noisy states). Everything
else is recomputed here from the math of duo.py's docstring and ../shared/reference/model-families.md section 5:

- plain_integrand: UDLM's per-token NELBO integrand as written in model-families.md, with the vectors xbar and
  xbar_theta built explicitly and the sum over j done term by term (x_theta from model.logits with our own
  float64 softmax). It parametrises alpha = 1 - t by t itself, so that 1 - alpha is exact near t = 0.
- Oracle A, the continuous NELBO: the exact expectation over z_t (all 9 states, q(z_t | x) a product over the
  positions) of the summed plain integrand, averaged over the 9 clean sequences, integrated over t in [0, 1] by
  composite Gauss-Legendre on geometric panels towards t = 0. (The expected integrand is NOT bounded there: it
  grows like ((V - 1)/V) log(1/t) per token, because a corrupted token makes the true reverse rate towards x of
  order 1/t; the geometric panels integrate that logarithm.)
- Oracle B, the T-step bound, by brute force and without the UDLM formula: the transition matrices
  Q_{t|s} = (a_t/a_s) I + (1 - a_t/a_s) 11^T / V, the true posterior q(z_s | z_t, x) by Bayes from the column
  z_t of Q_{t|s} and q(z_s | x) = a_s x + (1 - a_s)/V, the model's step by the same Bayes with x_theta in place of
  onehot(x), positions independent given z_t, the KL summed over the positions, exact over z_t, summed over the
  T steps (the last one is -log p(x | z_{1/T})). It tends to oracle A like c/T: a Richardson extrapolation of
  T = 256 and 1024 agrees with oracle A to 1e-6.
- The sampler: its exact output distribution by propagating the distribution over the 9 states through the chain
  (the per-position step from our Bayes-matrix posterior, given positions fixed; greedy tail: the argmax of
  x_theta; top_p: our own nucleus on x_theta), compared with 20000 samples by a chi-square test whose power
  against a deliberately wrong chain is checked too.
- The duality: our own trapezoid quadrature of P(argmax w = x) = int phi(u - nu) Phi(u)^(V-1) du (nu = e^{-gamma/2})
  and its finite differences; Monte Carlo of argmax(at onehot + st eps) drawn here, and of curriculum_latents.
- The curriculum: the expected training loss under the curriculum is oracle A's integral restricted to the
  t' = 1 - alpha range that the curriculum covers (a change of variables, see the test), with alpha from our
  quadrature; pointwise at a fixed t, E[loss] = -dalpha/dt * (the plain expected integrand at t' = 1 - alpha).

Every unbiasedness check (mean of many estimates within 4 standard errors of the exact value) also asserts that
the same band excludes the values of plausibly wrong implementations (8 standard errors).
"""
import itertools
import math

import numpy as np
import pytest
import torch

import duo
from conftest import assert_unbiased, chi2_pvalue, chisquare_pvalue, estimates, randomize_weights
from duo import Duo

V, L = 3, 2
M = V                                                  # mask_id: "generate this position" in sample()'s input
SEQS = list(itertools.product(range(V), repeat=L))     # the 9 clean sequences, also the 9 noisy states
X = np.array(SEQS)                                     # (9, L)
GMIN, GMAX, T_EPS = -2.68, 1.59, 1e-3                  # the curriculum's gamma range in these tests

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny tensors, 2 cores shared


def make(seed=3, **kw):
    """A fixed random network; its time embedding keeps only the frequencies with 1000 f <= 20 (a few
    oscillations over t in [0, 1], so that a modest quadrature in t converges). Eval mode."""
    torch.manual_seed(0)
    model = randomize_weights(Duo(V, 16, 2, 1, 8, 0.0, **kw), seed)
    with torch.no_grad():
        first = model.net.c_embed.mlp[0].weight  # (n_cond, 256): cos then sin of t_in f_j, f_j = 10^(-4j/128)
        fast = 1000 * 10 ** (-4 * torch.arange(128) / 128) > 20
        first[:, torch.cat([fast, fast])] = 0
    return model.eval()


def gauss_legendre(edges, order=8):
    """Composite Gauss-Legendre nodes and weights on the panels between consecutive edges."""
    x, w = np.polynomial.legendre.leggauss(order)
    edges = np.asarray(edges, dtype=np.float64)
    mid, half = (edges[1:] + edges[:-1]) / 2, (edges[1:] - edges[:-1]) / 2
    return (mid[:, None] + half[:, None] * x).ravel(), (half[:, None] * w).ravel()


def edges_0_1(panels=20, lo=-14):
    """Panels on [0, 1]: geometric (ratio 10^(1/2)) from 10^lo up to 0.1 (the log singularity at t = 0), then
    `panels` equal ones."""
    return np.concatenate([[0.0], np.logspace(lo, -1, 2 * (-lo - 1) + 1), np.linspace(0.1, 1, panels + 1)[1:]])


# ---- the oracles ------------------------------------------------------------------------------------------
@torch.no_grad()
def x_theta_table(model, times):
    """xth[n, z, l, v] = x_theta(z)[l, v] for every noisy state z = SEQS[z] at network time times[n]: float64
    softmax (ours) of model.logits."""
    times = np.atleast_1d(np.asarray(times, dtype=np.float64))
    z = torch.tensor(SEQS).repeat(len(times), 1)
    t = torch.tensor(times).repeat_interleave(len(SEQS))
    lg = model.logits(z, t).double()
    p = torch.exp(lg - lg.max(-1, keepdim=True).values)
    return (p / p.sum(-1, keepdim=True)).numpy().reshape(len(times), len(SEQS), L, V)


def plain_integrand(x_theta, z, x, t, dalpha, variant="right"):
    """UDLM's integrand (model-families.md section 5) at alpha = 1 - t, written out: xbar = V a onehot(x) + 1 - a,
    xbar_theta = V a x_theta + 1 - a (vectors over the V tokens), a'/(V a) [V/xbar[z] - V/xbar_theta[z]
    - sum_j xbar_j/xbar[z] log(xbar_theta[z] xbar_j / (xbar_theta[j] xbar[z]))]. x_theta (..., V); z, x, t, dalpha
    broadcastable to (...). variant "1/a": the coefficient a'/a instead of a'/(V a)."""
    vocab = x_theta.shape[-1]
    t = np.asarray(t, dtype=np.float64)
    a = 1 - t
    onehot = np.eye(vocab)[x]
    xbar = vocab * a[..., None] * onehot + t[..., None]
    xbar_theta = vocab * a[..., None] * x_theta + t[..., None]
    xbar_z = np.take_along_axis(xbar, np.asarray(z)[..., None], -1)
    xbar_theta_z = np.take_along_axis(xbar_theta, np.asarray(z)[..., None], -1)
    total = np.zeros(np.broadcast_shapes(xbar.shape, xbar_theta.shape)[:-1])
    for j in range(vocab):  # the sum over j, term by term
        total = total + xbar[..., j] / xbar_z[..., 0] * np.log(
            xbar_theta_z[..., 0] * xbar[..., j] / (xbar_theta[..., j] * xbar_z[..., 0]))
    bracket = vocab / xbar_z[..., 0] - vocab / xbar_theta_z[..., 0] - total
    coefficient = dalpha / a if variant == "1/a" else dalpha / (vocab * a)
    return coefficient * bracket


def q_state(t):
    """q(z | x, t)[x, z] = prod_l (a 1[z_l = x_l] + (1 - a)/V) for the 9 x 9 (clean, noisy) pairs, at times t:
    (N, 9, 9)."""
    t = np.asarray(t, dtype=np.float64)[:, None, None, None]
    same = X[None, :, None, :] == X[None, None, :, :]
    return np.where(same, 1 - t + t / V, t / V).prod(-1)


def expected_integrand(model, t, net_time=None, variant="right"):
    """E_{z_t ~ q(. | x)} [sum_l integrand_l] / L, exact over the 9 states, mean over the 9 clean sequences, at
    times t (N,) with alpha = 1 - t, alpha' = -1; the network at net_time (default t). (N,)"""
    t = np.atleast_1d(np.asarray(t, dtype=np.float64))
    xth = x_theta_table(model, t if net_time is None else net_time)              # (N, z, L, V)
    n = len(t)
    f = plain_integrand(xth[:, None], X[None, None, :, :], X[None, :, None, :],  # (N, x, z, L)
                        np.broadcast_to(t[:, None, None, None], (n, 9, 9, L)), -1.0, variant)
    return (q_state(t) * f.sum(-1)).sum(-1).mean(-1) / L


def nelbo_exact(model, a=0.0, b=1.0, panels=20, order=8, variant="right", lo=-14):
    """Oracle A: int_a^b of expected_integrand dt (nats per token, mean over the 9 sequences)."""
    edges = edges_0_1(panels, lo) if a == 0.0 and b == 1.0 else np.linspace(a, b, panels + 1)
    t, w = gauss_legendre(edges, order)
    return float(w @ expected_integrand(model, t, variant=variant))


def bayes_step(x, z_t, a_s, a_t):
    """q(z_s = k | z_t, x) for x a probability vector (..., V) (onehot: the true posterior; x_theta: the model's
    step), z_t ids (...), by Bayes from the matrices: column z_t of Q_{t|s} (Q[k, m] = P(z_t = m | z_s = k)) times
    q(z_s | x) = a_s x + (1 - a_s)/V, normalised. a_s, a_t broadcastable to (...)."""
    r = np.asarray(a_t / a_s, dtype=np.float64)[..., None, None]
    Q = r * np.eye(V) + (1 - r) / V * np.ones((V, V))
    z_t = np.asarray(z_t)
    shape = np.broadcast_shapes(Q.shape[:-2], z_t.shape, x.shape[:-1])
    column = np.take_along_axis(np.broadcast_to(Q, shape + (V, V)),
                                np.broadcast_to(z_t[..., None, None], shape + (V, 1)), -1)[..., 0]
    joint = column * (np.asarray(a_s)[..., None] * x + (1 - np.asarray(a_s)[..., None]) / V)
    return joint / joint.sum(-1, keepdims=True)


def n_step_bound(model, N, variant="right"):
    """Oracle B: sum_j E_{z_t ~ q(. | x)} [sum_l KL(q(z_s | z_t, x) || p(z_s | z_t))] / L, t = j/N, s = t - 1/N,
    exact over z_t, mean over the 9 sequences. Variants: "last step -log x_theta" (the last step's KL taken as
    -log x_theta(x) instead of -log p(x | z_t)); "no z_t" (the model's step q(z_s | x_theta), z_t ignored)."""
    j = np.arange(1, N + 1)
    t, s = j / N, (j - 1) / N
    a_t, a_s = (1 - t)[:, None, None, None], (1 - s)[:, None, None, None]   # (N, x, z, L)
    xth = np.broadcast_to(x_theta_table(model, t)[:, None], (N, 9, 9, L, V))
    z = np.broadcast_to(X[None, None], (N, 9, 9, L))
    q = bayes_step(np.broadcast_to(np.eye(V)[X][None, :, None], (N, 9, 9, L, V)), z, a_s, a_t)
    p = bayes_step(xth, z, a_s, a_t)
    if variant == "last step -log x_theta":
        p = p.copy()
        p[0] = xth[0]
    elif variant == "no z_t":
        p = a_s[..., None] * xth + (1 - a_s[..., None]) / V
    with np.errstate(divide="ignore", invalid="ignore"):
        kl = np.where(q > 0, q * np.log(q / p), 0.0).sum((-1, -2))                  # (N, x, z)
    return float((q_state(t) * kl).sum(-1).mean(-1).sum()) / L



def bound_estimates(model, copies, n, seed, T=None):
    """model.batch_bound on batches of `copies` copies of SEQS in random order, each with a fresh offset."""
    base = torch.tensor(SEQS).repeat(copies, 1)
    g = torch.Generator().manual_seed(seed)

    def one(_):
        offset = float(torch.rand((), generator=g))
        with torch.no_grad():
            value = model.batch_bound(base[torch.randperm(len(base), generator=g)], offset, g, T=T)
        assert value.dtype == torch.float64 and value.dim() == 0
        return value
    return estimates(one, n)


@pytest.fixture(scope="module")
def model():
    return make()


@pytest.fixture(scope="module")
def nelbo(model):
    return nelbo_exact(model)


# ---- 1. the closed form is the plain form -----------------------------------------------------------------
def bracket_scale(x_theta, z, x, t, dalpha):
    """|alpha'|/(V a) times the sum of the magnitudes of the bracket's terms: float64 rounding in any form of the
    integrand is a small multiple of 2.2e-16 times this (the bracket cancels to O(a^2) as a -> 0)."""
    vocab, a = x_theta.shape[-1], 1 - t
    xbar = vocab * a[..., None] * np.eye(vocab)[x] + t[..., None]
    xbar_theta = vocab * a[..., None] * x_theta + t[..., None]
    xbar_z = np.take_along_axis(xbar, z[..., None], -1)
    xbar_theta_z = np.take_along_axis(xbar_theta, z[..., None], -1)
    logs = np.abs(xbar / xbar_z * np.log(xbar_theta_z * xbar / (xbar_theta * xbar_z))).sum(-1)
    return np.abs(dalpha) / (vocab * a) * (vocab / xbar_z[..., 0] + vocab / xbar_theta_z[..., 0] + logs)


@pytest.mark.parametrize("vocab", [3, 11])
def test_closed_form_equals_plain_form(vocab):
    """nelbo_integrand (Duo's closed form) equals the written-out UDLM integrand (in long double where numpy has it)
    on random logits, z_t equal to and different from x0, alpha log-spread over (1e-4, 1 - 1e-4), arbitrary
    alpha': to 1e-10 relative for alpha >= 1/2, and for every alpha to 1e-10 relative plus 64 ulps of the
    bracket's terms (for alpha -> 0 the bracket is O(alpha^2) out of O(1) terms, so no float64 form can keep
    1e-10 relative there: duo's error is ~5 ulps of the terms, as is a float64 plain form's)."""
    g = np.random.default_rng(vocab)
    B, Lq = 400, 3
    logits = g.normal(0, 2.0, (B, Lq, vocab))
    x0 = g.integers(0, vocab, (B, Lq))
    z_t = np.where(g.random((B, Lq)) < 0.5, x0, g.integers(0, vocab, (B, Lq)))
    assert (z_t == x0).mean() > 0.4 and (z_t != x0).mean() > 0.3
    t = np.concatenate([10 ** g.uniform(-4, np.log10(0.5), B // 2), 1 - 10 ** g.uniform(-4, np.log10(0.5), B // 2)])
    a = 1 - t
    dalpha = g.normal(0, 3.0, B)
    log_x_theta = torch.tensor(logits).log_softmax(-1)
    got = duo.nelbo_integrand(log_x_theta, torch.tensor(z_t), torch.tensor(x0), torch.tensor(a)[:, None],
                              torch.tensor(dalpha)[:, None])
    assert got.dtype == torch.float64 and got.shape == (B, Lq)
    got = got.numpy()
    ld = np.longdouble
    x_theta = np.exp(logits.astype(ld) - logits.max(-1, keepdims=True))
    x_theta /= x_theta.sum(-1, keepdims=True)
    want = plain_integrand(x_theta, z_t, x0, 1 - a.astype(ld)[:, None], dalpha.astype(ld)[:, None]).astype(np.float64)
    high = a >= 0.5
    np.testing.assert_allclose(got[high], want[high], rtol=1e-10, atol=0)
    scale = bracket_scale(x_theta.astype(np.float64), z_t, x0, 1 - a[:, None], dalpha[:, None])
    excess = np.abs(got - want) / (1e-10 * np.abs(want) + 64 * 2.2e-16 * scale)
    assert excess.max() < 1, f"closed form vs plain form: worst at {np.unravel_index(excess.argmax(), excess.shape)}"
    assert np.abs(want).max() > 1 and np.abs(want).min() < 1e-3  # a non-trivial range of values
    # the closed form in float32 (the training loss) follows the same values, away from alpha -> 0
    got32 = duo.nelbo_integrand(log_x_theta.float(), torch.tensor(z_t), torch.tensor(x0),
                                torch.tensor(a)[:, None], torch.tensor(dalpha)[:, None])
    assert got32.dtype == torch.float32
    keep = t < 0.9
    np.testing.assert_allclose(got32.numpy()[keep], want[keep], rtol=2e-3, atol=1e-3)


# ---- 2. the continuous NELBO ------------------------------------------------------------------------------
def test_oracles_agree(model, nelbo):
    """Oracle A has converged (a finer, higher-order rule reaching further down agrees to 1e-8); its integrand
    grows like ((V-1)/V) log(1/t) at t -> 0 (why the geometric panels). Oracle B approaches it like c/T: with
    B_T - A = c/T + c'/T^2 + ..., the Richardson value (4 B_1024 - B_256)/3 - A = -4 c'/1024^2 + ..., and c' ~ 0.05
    here (T (B_T - A) moves from 0.0595 to 0.0594 between T = 256 and 1024), i.e. ~2e-7: it must agree to 1e-6.
    One step (T = 1) is the cross-entropy of x_theta(z_1) at t = 1, z_1 uniform."""
    assert abs(nelbo_exact(model, panels=40, order=10, lo=-16) - nelbo) < 1e-8
    near0 = expected_integrand(model, [1e-10, 1e-8])
    assert abs((near0[0] - near0[1]) - (V - 1) / V * math.log(100)) < 2e-3, near0
    b256, b1024 = n_step_bound(model, 256), n_step_bound(model, 1024)
    gaps = np.array([b256 - nelbo, b1024 - nelbo])
    assert (gaps > 0).all() and 3.5 < gaps[0] / gaps[1] < 4.5, gaps  # ~ c/T
    richardson = (4 * b1024 - b256) / 3
    assert abs(richardson - nelbo) < 1e-6, (richardson, nelbo, gaps)
    xth1 = x_theta_table(model, [1.0])[0]                              # (z, L, V): at a_t = 0 the step is x_theta
    ce = -np.log(xth1[:, None, np.arange(L), X]).sum(-1).mean() / L      # mean over z (uniform) and x
    assert abs(n_step_bound(model, 1) - ce) < 1e-12


def test_batch_bound_is_the_nelbo(model, nelbo):
    """The mean of batch_bound(T=None) (random offsets, 100 shuffled copies of the 9 sequences) is oracle A; the
    band excludes the coefficient a'/a for a'/(V a) and UDLM's t = 0 reconstruction term -log x_theta(x | x) added.
    A row at small t with z_t != x contributes ~ log(1/t)/t with probability ~ t: under uniform t the second
    moment would diverge like log(1/t_min)^3; batch_bound draws t = u^2 (weight 2u), which keeps it finite."""
    mean, se = bound_estimates(model, 100, 200, seed=1)
    xth0 = x_theta_table(model, [0.0])[0]
    reconstruction = -np.log(xth0[np.arange(9)[:, None], np.arange(L), X]).sum(-1).mean() / L
    wrong = {"1/a": nelbo_exact(model, variant="1/a"), "with -log x_theta(x) at t = 0": nelbo + reconstruction}
    assert_unbiased(mean, se, nelbo, wrong, "continuous NELBO")


# ---- 3. the T-step bound ----------------------------------------------------------------------------------
@pytest.mark.parametrize("N", [4, 16])
def test_batch_bound_n_steps(model, nelbo, N):
    """The mean of batch_bound(T=N) is oracle B at N; rejects the last step's KL as -log x_theta(x) (not the
    posterior p(x | z_t)) and the model's step without z_t."""
    exact = n_step_bound(model, N)
    mean, se = bound_estimates(model, 40, 150, seed=10 + N, T=N)
    wrong = {v: n_step_bound(model, N, v) for v in ("last step -log x_theta", "no z_t")}
    assert_unbiased(mean, se, exact, wrong, f"{N}-step bound")
    assert exact > nelbo  # the bound is looser than the NELBO


# ---- 4. the sampler ---------------------------------------------------------------------------------------
def nucleus(p, top_p):
    """Our nucleus: per row, keep the most probable tokens in order until their mass reaches top_p; renormalise."""
    if top_p >= 1:
        return p
    out = np.zeros_like(p)
    for idx in np.ndindex(p.shape[:-1]):
        mass = 0.0
        for k in np.argsort(-p[idx], kind="stable"):
            out[idx + (k,)] = p[idx + (k,)]
            mass += p[idx + (k,)]
            if mass >= top_p:
                break
    return out / out.sum(-1, keepdims=True)


def chain_times(N, greedy=False):
    """The sampler's grid: j/N for j = N..0; greedy: Duo's linspace(1, 1e-5, N + 1) (their generate_samples' eps)."""
    return np.linspace(1, 1e-5, N + 1) if greedy else np.arange(N, -1, -1) / N


def exact_chain(model, N, given=(None, None), variant="right", top_p=1.0, greedy=False):
    """The distribution over the 9 states after the sampler: positions with given = None start uniform, the rest are
    fixed; from t to s (chain_times) each free position moves by our Bayes step with the (nucleus-filtered)
    x_theta(state, t), independently given the state; greedy (Duo's noise_removal=greedy): the N steps go down
    to 1e-5, then one more call replaces every free position by argmax x_theta(state, 1e-5).
    Variants: "no z_t" (step q(z_s | x_theta)), "network at s" (x_theta at time s, not t), "argmax last step" (our
    earlier greedy tail: the grid j/N with its last step replaced by argmax x_theta(state, 1/N))."""
    free = np.array([g is None for g in given])
    dist = np.array([all(g is None or st[l] == g for l, g in enumerate(given)) for st in SEQS], dtype=np.float64)
    dist /= dist.sum()

    def move(dist, step):  # P[z, z'] = prod_l step_l(z)[z'_l], the given positions fixed
        step = np.where(free[None, :, None], step, np.eye(V)[X])
        return dist @ (step[:, 0, X[:, 0]] * step[:, 1, X[:, 1]])

    greedy = greedy and variant != "argmax last step"
    times = chain_times(N, greedy)
    for t, s in zip(times[:-1], times[1:]):
        xth = nucleus(x_theta_table(model, [s if variant == "network at s" else t])[0], top_p)   # (z, L, V)
        if variant == "argmax last step" and s == 0:
            step = np.eye(V)[xth.argmax(-1)]
        elif variant == "no z_t":
            step = (1 - s) * xth + s / V
        else:
            step = bayes_step(xth, X, 1 - s, 1 - t)
        dist = move(dist, step)
    if greedy:
        dist = move(dist, np.eye(V)[x_theta_table(model, [times[-1]])[0].argmax(-1)])
    assert abs(dist.sum() - 1) < 1e-12
    return {st: float(p) for st, p in zip(SEQS, dist)}


def rejects(samples, probs):
    """The chi-square test rejects probs (p < 1e-6), or a sample has probability 0 under it."""
    try:
        return chisquare_pvalue(samples, probs) < 1e-6
    except AssertionError:
        return True


@pytest.mark.parametrize("given,N,opts,wrong", [
    ((None, None), 1, {}, "network at s"),
    ((None, None), 3, {}, "no z_t"),
    ((1, None), 3, {}, "no z_t"),
    ((None, None), 1, {"sampler": "greedy_tail"}, "argmax last step"),
    ((None, None), 4, {"sampler": "greedy_tail"}, "argmax last step"),
    ((1, None), 4, {"sampler": "greedy_tail"}, "argmax last step"),
    ((None, None), 4, {"sampler": "greedy_tail", "top_p": 0.6}, "argmax last step"),
    ((None, None), 3, {"top_p": 0.6}, "no top_p"),
    ((1, None), 1, {"top_p": 0.6}, "no top_p"),
])
def test_sampler_matches_exact_chain(model, given, N, opts, wrong):
    """Chi-square of 20000 samples (p > 1e-3) against the exact chain; the same test rejects a wrong chain
    (p < 1e-6). Given tokens never change, no mask_id is left, one network call per step (greedy_tail: N + 1,
    the last at 1e-5), the callback sees every call."""
    greedy = opts.get("sampler") == "greedy_tail"
    exact = exact_chain(model, N, given, top_p=opts.get("top_p", 1.0), greedy=greedy)
    start = [M if g is None else g for g in given]
    x = torch.tensor([start] * 20_000)
    seen = []
    samples, calls = model.sample(x, steps=N, generator=torch.Generator().manual_seed(7),
                                  callback=lambda z, t: seen.append(float(t[0])), **opts)
    times = chain_times(N, greedy)
    want = list(times[:-1]) + ([times[-1]] if greedy else [])
    assert calls == N + greedy and np.allclose(seen, want, rtol=0, atol=1e-15)
    assert samples.shape == x.shape and ((samples >= 0) & (samples < V)).all()
    fixed = [l for l in range(L) if given[l] is not None]
    assert torch.equal(samples[:, fixed], x[:, fixed]), "a given token changed"
    assert sum(p > 0.02 for p in exact.values()) >= 2  # a non-degenerate target
    p = chisquare_pvalue(samples, exact)
    assert p > 1e-3, f"the samples do not follow the exact chain (p = {p:.3g})"
    if wrong == "no top_p":
        alternative = exact_chain(model, N, given, greedy=greedy)
    else:
        alternative = exact_chain(model, N, given, wrong, top_p=opts.get("top_p", 1.0), greedy=greedy)
    assert rejects(samples, alternative), f"the chi-square test cannot tell the chain with '{wrong}'"
    if greedy:  # and the greedy tail is neither the plain ancestral chain nor our earlier argmax last step
        assert rejects(samples, exact_chain(model, N, given, top_p=opts.get("top_p", 1.0)))
        assert rejects(samples, exact_chain(model, N, given, "argmax last step", top_p=opts.get("top_p", 1.0)))


def test_sampler_refuses_other_samplers(model):
    x = torch.tensor([[M, M]])
    for sampler in ("confidence", "remask", "threshold", "nonsense"):
        with pytest.raises(ValueError):
            model.sample(x, steps=2, sampler=sampler)
    with pytest.raises(ValueError):
        model.sample(x, steps=2, remask_eta=0.1)
    out, calls = model.sample(x, steps=2, generator=torch.Generator().manual_seed(0))  # the defaults work
    assert calls == 2 and (out < V).all()


# ---- 5. the duality ---------------------------------------------------------------------------------------
def accuracy(gamma, vocab, n=601, half=12.0):
    """Our P(argmax(at onehot(x) + st eps) = x) = int phi(u - nu) Phi(u)^(vocab-1) du, nu = exp(-gamma/2)
    (= at/st), by the trapezoid rule on u in nu +- half (the integrand is smooth and decays like a Gaussian, so
    the rule converges geometrically); float64, one value per gamma."""
    gamma = np.atleast_1d(np.asarray(gamma, dtype=np.float64))
    nu = np.exp(-gamma / 2)
    u = nu[:, None] + np.linspace(-half, half, n)[None, :]
    log_Phi = torch.special.log_ndtr(torch.from_numpy(u)).numpy()
    f = np.exp(-(u - nu[:, None]) ** 2 / 2 + (vocab - 1) * log_Phi) / math.sqrt(2 * math.pi)
    return (f.sum(-1) - (f[:, 0] + f[:, -1]) / 2) * (u[:, 1] - u[:, 0])


def alpha_of(gamma, vocab, **kw):
    return (vocab * accuracy(gamma, vocab, **kw) - 1) / (vocab - 1)


def sigmoid(x):
    return 1 / (1 + math.exp(-x))


@pytest.mark.parametrize("vocab,gammas,n", [(27, (-3.55, -1.85, 1.59), 100_000), (1000, (-3.0, -2.0, -1.0), 12_000)])
def test_gaussian_accuracy_monte_carlo(vocab, gammas, n):
    """gaussian_accuracy's p against the frequency of argmax(at onehot + st eps) = x (at^2 = sigmoid(-gamma),
    st^2 = sigmoid(gamma)) within 4 SE; the band excludes nu = SNR = exp(-gamma) (for sqrt(SNR)) at 8 SE for some
    gamma. Our quadrature equals gaussian_accuracy to 1e-10 (a different form of the integral)."""
    g = torch.Generator().manual_seed(vocab)
    z_wrong = []
    for gamma in gammas:
        at, st = math.sqrt(sigmoid(-gamma)), math.sqrt(sigmoid(gamma))
        w = st * torch.randn(n, vocab, generator=g)
        w[:, 0] += at
        hit = (w.argmax(-1) == 0).double()
        mean, se = float(hit.mean()), float(hit.std()) / math.sqrt(n)
        p = float(duo.gaussian_accuracy(gamma, vocab)[0])
        assert abs(p - accuracy(gamma, vocab)[0]) < 1e-10
        assert abs(mean - p) < 4 * se, (vocab, gamma, mean, p, se)
        z_wrong.append(abs(accuracy(2 * gamma, vocab)[0] - p) / se)  # nu = exp(-gamma) is gamma' = 2 gamma
    assert max(z_wrong) > 8, z_wrong


@pytest.mark.parametrize("vocab", [27, 1000])
def test_gaussian_alpha_and_derivatives(vocab):
    """gaussian_accuracy's dp/dnu against a 5-point central difference in nu of our quadrature (1e-7); gaussian_alpha
    (alpha and dalpha/dgamma, linearly interpolated on a grid of step h = 32/4096) against our quadrature and its
    central difference in gamma at random gammas in (-10, 10), within the linear interpolation error bound
    h^2/8 max|f''| (f = alpha, then dalpha/dgamma; max over (-10, 10) from our own values), which is 3.2e-6 for
    alpha at V = 27 and 6.6e-6 at V = 1000: the "~1e-6" that one might hope for is not reachable on this grid."""
    rng = np.random.default_rng(vocab)
    gammas = rng.uniform(-10, 10, 60)
    nu = np.exp(-gammas / 2)
    d = 1e-3
    p_at = lambda v: accuracy(-2 * np.log(v), vocab)   # noqa: E731  p as a function of nu
    fd_nu = (-p_at(nu + 2 * d) + 8 * p_at(nu + d) - 8 * p_at(nu - d) + p_at(nu - 2 * d)) / (12 * d)
    p, dp = duo.gaussian_accuracy(torch.tensor(gammas), vocab)
    np.testing.assert_allclose(p.numpy(), accuracy(gammas, vocab), atol=1e-10)
    np.testing.assert_allclose(dp.numpy(), fd_nu, atol=1e-7)
    # the interpolation error bounds, from our alpha on a fine gamma grid
    grid = np.linspace(-10.5, 10.5, 1051)
    step = grid[1] - grid[0]
    a_grid = alpha_of(grid, vocab)
    a1 = np.gradient(a_grid, step)
    a2 = np.gradient(a1, step)
    a3 = np.gradient(a2, step)
    h = (duo.GAMMA_RANGE[1] - duo.GAMMA_RANGE[0]) / (duo.GAMMA_POINTS - 1)
    tol_alpha = 1.1 * h ** 2 / 8 * np.abs(a2).max() + 1e-10
    tol_dalpha = 1.1 * h ** 2 / 8 * np.abs(a3).max() + 2e-8
    assert tol_alpha < 1e-5
    alpha, dalpha = duo.gaussian_alpha(torch.tensor(gammas), vocab)
    assert alpha.dtype == torch.float64 and dalpha.dtype == torch.float64
    err = np.abs(alpha.numpy() - alpha_of(gammas, vocab))
    assert err.max() < tol_alpha, (err.max(), tol_alpha)
    e = 1e-3
    fd = (-alpha_of(gammas + 2 * e, vocab) + 8 * alpha_of(gammas + e, vocab) - 8 * alpha_of(gammas - e, vocab)
          + alpha_of(gammas - 2 * e, vocab)) / (12 * e)
    derr = np.abs(dalpha.numpy() - fd)
    assert derr.max() < tol_dalpha, (derr.max(), tol_dalpha)
    # power: a grid index off by one (or nearest-neighbour lookup) errs by ~h |alpha'| >> the tolerance
    assert h * np.abs(a1).max() > 100 * tol_alpha
    # a scalar gamma and the derivative's sign: alpha decreases as the noise (gamma) grows
    a0, d0 = duo.gaussian_alpha(0.3, vocab)
    assert a0.dim() == 0 and float(d0) < 0 and abs(float(a0) - alpha_of(0.3, vocab)[0]) < tol_alpha


def test_curriculum_latents_follow_the_uniform_state_process():
    """z_t = argmax w_t from curriculum_latents (V = 27, fixed t): P(z_t = x) = p (= alpha + (1 - alpha)/V) within
    4 SE and the band excludes alpha = p (no (V p - 1)/(V - 1)); given z_t != x, z_t is uniform over the other
    26 tokens (chi-square; the same test rejects a 10% tilt); the soft input is one-hot at argmax w up to near
    ties (tau = 1e-3); alpha, dalpha/dt = dalpha/dgamma (gamma_max - gamma_min) and the network time 1 - alpha
    are our quadrature's."""
    vocab = 27
    m = Duo(vocab, 16, 2, 1, 8, 0.0, curriculum_iters=10, gamma_min=GMIN, gamma_max=GMAX)
    gen = torch.Generator().manual_seed(5)
    x0 = torch.randint(0, vocab, (400, 250), generator=gen)
    t = torch.full((400,), 0.45, dtype=torch.float64)
    gamma = GMIN + 0.45 * (GMAX - GMIN)
    torch.manual_seed(11)
    soft, z, alpha, dalpha, t_net = m.curriculum_latents(x0, t)
    assert soft.shape == (400, 250, vocab) and torch.equal(z, soft.argmax(-1))
    assert (soft.max(-1).values > 0.99).float().mean() > 0.98
    assert torch.allclose(soft.sum(-1), torch.ones(()), atol=1e-5)
    mine = alpha_of(gamma, vocab)[0]
    e = 1e-3
    mine_d = (alpha_of(gamma + e, vocab)[0] - alpha_of(gamma - e, vocab)[0]) / (2 * e) * (GMAX - GMIN)
    assert np.abs(alpha.numpy() - mine).max() < 1e-5 and np.abs(dalpha.numpy() - mine_d).max() < 1e-4
    assert torch.allclose(t_net, 1 - alpha)
    p = accuracy(gamma, vocab)[0]
    assert abs(mine + (1 - mine) / vocab - p) < 1e-12  # the identity behind the test
    hit = (z == x0).double()
    n = hit.numel()
    mean, se = float(hit.mean()), math.sqrt(p * (1 - p) / n)
    assert 0.2 < p < 0.8
    assert abs(mean - p) < 4 * se, (mean, p, se)
    assert abs(p + (1 - p) / vocab - p) > 8 * se  # alpha = p would give P(z = x) = p + (1 - p)/V
    offset = ((z - x0) % vocab)[z != x0]  # which other token, relative to x: 1..26
    counts = torch.bincount(offset, minlength=vocab)[1:].numpy()
    assert chi2_pvalue(counts, np.full(vocab - 1, 1 / (vocab - 1))) > 1e-3
    tilt = 1 + 0.1 * (np.arange(vocab - 1) >= (vocab - 1) // 2)
    assert chi2_pvalue(counts, tilt / tilt.sum()) < 1e-6


# ---- 6. the curriculum ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def curriculum_model():
    """The same random network (make's weights) with the curriculum over [GMIN, GMAX] for 10 iterations."""
    return make(curriculum_iters=10, gamma_min=GMIN, gamma_max=GMAX, t_eps=T_EPS)


def loss_estimates(m, n, seed, copies=200, t=None):
    """forward's loss on `copies` copies of SEQS, n times (times drawn by forward, or all equal to t)."""
    torch.manual_seed(seed)
    x0 = torch.tensor(SEQS).repeat(copies, 1)
    tt = None if t is None else torch.full((len(x0),), t, dtype=torch.float64)
    used = float(m.training and m.in_curriculum)

    def one(_):
        with torch.no_grad():
            _, loss, metrics = m(x0, tt)
        assert loss.dim() == 0 and torch.equal(loss, metrics["bound"])
        assert float(metrics.get("curriculum", used)) == used  # the logged flag, where forward reports it
        return loss
    return estimates(one, n)


def test_start_iteration_switches_the_curriculum(curriculum_model):
    m = curriculum_model
    for i, on in ((0, True), (9, True), (10, False), (500, False)):
        m.start_iteration(i)
        assert m.in_curriculum is on
    plain = Duo(V, 16, 2, 1, 8, 0.0)  # curriculum_iters = 0: never
    plain.start_iteration(0)
    assert not plain.in_curriculum


def test_curriculum_loss_is_the_nelbo_over_its_range(curriculum_model):
    """Under the curriculum (train mode, start_iteration(0)), E[loss] = (1/(1 - t_eps)) int_{t'_lo}^{t'_hi} h(t') dt',
    h the plain expected integrand (oracle A's), t'_lo = 1 - alpha(gamma(t_eps)), t'_hi = 1 - alpha(gamma_max),
    alpha = (V p - 1)/(V - 1) from our quadrature. Why: the loss at t is alpha'(t)/(V a) bracket(a, z_t, x_theta)
    with a = alpha(gamma(t)), z_t = argmax w_t ~ Cat(a onehot(x) + (1 - a)/V) (the duality), and x_theta = the
    network at time 1 - a on the soft input softmax(w_t / tau), which is onehot(z_t) up to near ties (tau = 1e-3:
    a fraction ~1e-3 of the tokens, far below the standard error). So E[loss | t] = alpha'(t) G(alpha(t)) with
    G(a) = E_z[bracket]/(V a) at network time 1 - a, and E_t uniform on [t_eps, 1] of it is
    (1/(1 - t_eps)) int_{alpha(t_eps)}^{alpha(1)} G(a) da: invariant under the reparametrisation of alpha; with
    a = 1 - t' that is the integral of the plain integrand h(t') = -G(1 - t') over [t'_lo, t'_hi]. The band
    excludes the plain NELBO on [t_eps, 1] (the curriculum ignored) and the range from alpha = p."""
    m = curriculum_model
    m.train()
    m.start_iteration(0)
    lo, hi = 1 - alpha_of(GMIN + T_EPS * (GMAX - GMIN), V)[0], 1 - alpha_of(GMAX, V)[0]
    assert 0 < lo < 0.05 and 0.6 < hi < 0.9
    exact = nelbo_exact(m, lo, hi, panels=24) / (1 - T_EPS)
    assert abs(nelbo_exact(m, lo, hi, panels=12, order=6) / (1 - T_EPS) - exact) < 1e-6
    try:
        mean, se = loss_estimates(m, 100, seed=21)
    finally:
        m.eval()
    p_lo, p_hi = 1 - accuracy(GMIN + T_EPS * (GMAX - GMIN), V)[0], 1 - accuracy(GMAX, V)[0]
    wrong = {"no curriculum": nelbo_exact(m, T_EPS, 1.0, panels=24) / (1 - T_EPS),
             "alpha = p": nelbo_exact(m, p_lo, p_hi, panels=24) / (1 - T_EPS)}
    assert_unbiased(mean, se, exact, wrong, "curriculum loss")


@pytest.mark.parametrize("t", [0.3, 0.7])
def test_loss_at_a_fixed_time_curriculum_and_eval(curriculum_model, t):
    """At a fixed t for every row: under the curriculum E[loss] = -dalpha/dt h(1 - alpha), alpha = alpha(gamma(t)) and
    dalpha/dt = dalpha/dgamma (gamma_max - gamma_min) ours, h the plain expected integrand; in eval mode (with
    in_curriculum still set) forward ignores the curriculum: E[loss] = h(t). Each band excludes the other's value
    and, for the curriculum, dalpha/dgamma without the factor (gamma_max - gamma_min)."""
    m = curriculum_model
    gamma = GMIN + t * (GMAX - GMIN)
    a = alpha_of(gamma, V)[0]
    e = 1e-3
    da_dt = (alpha_of(gamma + e, V)[0] - alpha_of(gamma - e, V)[0]) / (2 * e) * (GMAX - GMIN)
    h_curr, h_plain = expected_integrand(m, [1 - a])[0], expected_integrand(m, [t])[0]
    curriculum, plain = -da_dt * h_curr, h_plain
    m.train()
    m.start_iteration(0)
    try:
        mean, se = loss_estimates(m, 40, seed=31, t=t)
    finally:
        m.eval()
    assert_unbiased(mean, se, curriculum, {"plain": plain, "no (gamma_max - gamma_min)": curriculum / (GMAX - GMIN)},
                    f"curriculum loss at t = {t}")
    assert m.in_curriculum and not m.training
    mean, se = loss_estimates(m, 40, seed=32, t=t)
    assert_unbiased(mean, se, plain, {"curriculum": curriculum}, f"eval loss at t = {t}")


# ---- 7. the soft input ------------------------------------------------------------------------------------
def test_soft_input_of_a_one_hot_is_the_token(model):
    """net(onehot(ids)) = net(ids), and model.logits too; a genuinely soft vector enters the first block as
    probs @ E (E the embedding table), which differs from its argmax's embedding."""
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, V, (16, 5), generator=g)
    t = 1000 * torch.rand(16, generator=g)
    seen = []
    hook = model.net.blocks[0].register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().clone()))
    try:
        with torch.no_grad():
            hard = model.net(ids, t)
            soft = model.net(torch.nn.functional.one_hot(ids, V).float(), t)
            assert torch.allclose(soft, hard, rtol=0, atol=1e-6)
            tt = torch.rand(16, generator=g, dtype=torch.float64)
            assert torch.allclose(model.logits(torch.nn.functional.one_hot(ids, V).float(), tt),
                                  model.logits(ids, tt), rtol=0, atol=1e-6)
            probs = torch.softmax(2 * torch.randn(16, 5, V, generator=g), -1)
            seen.clear()
            mixed = model.net(probs, t)
            E = model.net.vocab_embed.weight
            assert torch.allclose(seen[0], probs @ E, rtol=1e-6, atol=1e-6)
            assert (seen[0] - E[probs.argmax(-1)]).abs().max() > 1e-2
            assert (mixed - model.net(probs.argmax(-1), t)).abs().max() > 1e-2
    finally:
        hook.remove()


def test_duality_alpha_stays_in_0_1():
    """For gamma below ~-4.8 the quadrature's (V p - 1)/(V - 1) rounds above 1 (by ~1.6e-13), where log1p(-alpha)
    is NaN: alpha is clamped to [0, 1]. It still follows our quadrature (capped at 1) there."""
    gammas = torch.linspace(-16, -5, 111, dtype=torch.float64)
    for vocab in (27, 50257):
        assert 0 <= float(duo.duality_table(vocab)[0].min()) and float(duo.duality_table(vocab)[0].max()) <= 1
        alpha, _ = duo.gaussian_alpha(gammas, vocab)
        assert ((alpha >= 0) & (alpha <= 1)).all() and not torch.log1p(-alpha).isnan().any()
        np.testing.assert_allclose(alpha.numpy(), np.minimum(alpha_of(gammas.numpy(), vocab), 1), rtol=0, atol=1e-9)


# ---- 8. the sampler in chunks, and DCD's grid ---------------------------------------------------------------
@pytest.mark.parametrize("opts", [{}, {"top_p": 0.6, "temperature": 0.7}, {"sampler": "greedy_tail", "top_k": 2},
                                  {"temperature": 0}])
def test_sample_chunks_do_not_change_the_samples(model, monkeypatch, opts):
    """sample(chunk=c) draws exactly the tokens of one chunk holding every generated position (same seed), and no
    float64 piece (filter_logits, posterior, draw) ever sees more than c rows."""
    rows = []

    def spy(fn):
        def wrapped(first, *a, **k):
            rows.append(first.shape[0])
            return fn(first, *a, **k)
        return wrapped
    for name in ("filter_logits", "posterior", "draw"):
        monkeypatch.setattr(duo, name, spy(getattr(duo, name)))
    x = torch.full((9, 7), M)
    x[:, 2] = 1
    x[3, 5] = 0
    n = int((x == M).sum())
    out = {}
    for chunk in (10 ** 6, 5, 1):
        rows.clear()
        out[chunk] = model.sample(x, steps=3, generator=torch.Generator().manual_seed(4), chunk=chunk, **opts)
        assert max(rows, default=0) <= min(chunk, n) and (rows or opts.get("temperature") == 0)
        if chunk > n and rows:
            assert max(rows) == n  # the spies see the work
    assert torch.equal(out[10 ** 6][0], out[5][0]) and torch.equal(out[10 ** 6][0], out[1][0])
    assert out[1][1] == out[5][1] == 3 + (opts.get("sampler") == "greedy_tail")
    assert torch.equal(out[1][0][:, 2], x[:, 2]) and out[1][0][3, 5] == 0
    assert len(set(map(tuple, out[1][0].tolist()))) > (3 if opts.get("temperature", 1) else 0)  # not degenerate


def dcd_network_times(vocab, steps, n=4000, **kw):
    """The (student, teacher) network times of Duo.distill_loss on n rows of 2 tokens, recorded at the calls."""
    torch.manual_seed(0)
    student = Duo(vocab, 16, 2, 1, 8, 0.0, **kw)
    teacher = Duo(vocab, 16, 2, 1, 8, 0.0).eval()
    times = {}
    for name, m in (("student", student), ("teacher", teacher)):
        inner = m.logits
        m.logits = lambda z, t, inner=inner, name=name: times.setdefault(name, t.clone()) is not None and inner(z, t)
    student.distill_loss(teacher, torch.randint(0, vocab, (n, 2)), steps)
    return times["student"].numpy(), times["teacher"].numpy()


def test_dcd_pairs_follow_duos_gamma_grid():
    """Duo's distillation (distillation.yaml gamma_min -4, gamma_max -1): t = min(t' + 1/steps, 1), t' uniform on
    [t_eps, 1], s = t - 1/steps, gamma = -4 + 3 t, and the network reads 1 - alpha(gamma). From our quadrature: the
    student's time 1 - alpha(gamma_t) falls uniformly into the bins of gamma between -4 + 3 (t_eps + 1/steps) and -1
    (chi-square), with mass (1/steps)/(1 - t_eps) at gamma = -1; inverting alpha (our quadrature on a fine grid)
    gives gamma_s = gamma_t - 3/steps row by row. Power: the earlier grid (alpha = 1 - t uniform in t,
    dcd_gamma_min=None) fails the same chi-square."""
    vocab, steps, t_eps, n = 27, 8, 1e-3, 4000
    t_net, s_net = dcd_network_times(vocab, steps, n)
    lo = -4 + 3 * (t_eps + 1 / steps)
    edges = 1 - alpha_of(np.linspace(lo, -1, 11), vocab)  # increasing in gamma
    top = 1 - alpha_of(-1.0, vocab)[0]

    def fit(times):
        at_top = np.abs(times - top) < 1e-6
        counts = np.histogram(times[~at_top], bins=edges)[0]
        return at_top.sum(), counts, chi2_pvalue(counts, np.full(10, 0.1)) if counts.sum() else 0.0

    at_top, counts, p = fit(t_net)
    p1 = (1 / steps) / (1 - t_eps)
    assert abs(at_top - n * p1) < 4 * math.sqrt(n * p1 * (1 - p1)) and counts.sum() + at_top == n
    assert p > 1e-3, (counts, p)
    grid = np.linspace(-4.5, -0.5, 8001)
    a_grid = alpha_of(grid, vocab)
    gamma_of = lambda a: np.interp(a, a_grid[::-1], grid[::-1])  # noqa: E731  alpha decreases in gamma
    ok = 1 - s_net < 0.999  # where alpha(gamma) is not flat at 1
    assert ok.mean() > 0.5
    np.testing.assert_allclose(gamma_of(1 - s_net[ok]), gamma_of(1 - t_net[ok]) - 3 / steps, atol=2e-3)
    old_t, _ = dcd_network_times(vocab, steps, n, dcd_gamma_min=None)
    assert fit(old_t)[2] < 1e-6
