"""
SEDD (sedd.py) against oracles written here from the definitions, on V = 3 tokens and L = 2 positions, every state
enumerated:

    the chain      Q as a matrix (Q[x, y]: the rate from y into x), transitions exp(D Q) by torch.linalg.matrix_exp;
    a step         the analytic step p(x_s = y | x_t = x) = [exp(-D Q) ratio_x]_y exp(D Q)[x, y] and the Euler step
                   1 + (t - s) sigma' Q[x, y] ratio_y, clamped and normalised (the mask dropped at s = 0);
    the N-step bound     sum over steps and x_t of q(x_t | x_0) KL(q(x_s | x_t, x_0) || step), q's posterior by Bayes
                   on the matrices, x_t of the bound's process (absorb: masked by t = 1; uniform: sbar), plus the
                   uniform prior KL(exp(sbar(1) Q)[:, x_0] || 1/V);
    the continuous bound the path KL int sum_{y != x} [R - Rq + Rq log(Rq / R)] dt by Gauss-Legendre quadrature, with
                   the model's reverse rate R = sigma' Q[x, y] ratio_y and the bound process's own Rq = b'(t) Q[x, y]
                   q(y | x_0) / q(x | x_0) (b' by finite differences): nothing of sedd.py's closed forms; the N-step
                   bound extrapolated in N lands on it;
    the samplers   the exact law of the N-step chain, propagated over all states, against 4000 samples (chi-square).

The network is a fake: the exact log score of a fixed data law P (absorb: log(V p(x_0 | x_t)), which the model's
scale_by_sigma turns into the score) plus a fixed wobble that depends on the context and on sigma, so every step is a
distribution (finite bounds) and nothing is exact. Ou et al.'s identity (absorb: the score is p(x_0 | x_t) times a
time factor) is checked against mdlm.py's NELBO of the same network, enumerated.
"""
import functools
import itertools
import math

import numpy as np
import pytest
import torch

from conftest import assert_unbiased, chisquare_pvalue, estimates
from mdlm import MDLM
from sedd import SEDD

pytestmark = pytest.mark.usefixtures("one_thread")

V, L, EPS = 3, 2, 1e-3
X0 = torch.tensor([[2, 0]])
DATA = torch.tensor([[0.30, 0.02, 0.03], [0.01, 0.25, 0.04], [0.02, 0.03, 0.30]], dtype=torch.float64)  # P(x^0, x^1)


def make_model(graph, noise, wobble=0.4, net="fake"):
    """A SEDD on V = 3 whose network is FakeNet (net="fake") or NormalisedNet (net="normalised")."""
    model = SEDD(V, 8, 2, 1, 8, 0.0, graph=graph, noise=noise, scale_by_sigma=graph == "absorb").eval()
    model.net = FakeNet(graph, noise, wobble) if net == "fake" else NormalisedNet("sedd")
    return model


def sigma_of(noise, t):
    return -math.log1p(-(1 - EPS) * t) if noise == "loglinear" else 1e-4 ** (1 - t) * 20.0 ** t


def sbar_of(noise, t):
    return sigma_of(noise, t) - sigma_of(noise, 0.0)


def rate_matrix(graph):
    K = V + (graph == "absorb")
    if graph == "absorb":
        Q = -torch.eye(K, dtype=torch.float64)
        Q[V, :V], Q[V, V] = 1.0, 0.0
        return Q
    return torch.ones(K, K, dtype=torch.float64) / V - torch.eye(K, dtype=torch.float64)


def transition(graph, D):
    """exp(D Q): [x, y] = P(x | y after noise D); D = inf: the limit."""
    K = V + (graph == "absorb")
    if math.isinf(D):
        return torch.zeros(K, K, dtype=torch.float64).index_fill_(0, torch.tensor([V]), 1.0) if graph == "absorb" \
            else torch.full((K, K), 1.0 / V, dtype=torch.float64)
    return torch.linalg.matrix_exp(D * rate_matrix(graph))


def bound_noise(graph, noise, t, theirs=False):
    """The noise of the bound's process at t: absorb masked w.p. m(t) (masked for sure at t = 1), uniform sbar(t).
    theirs: sbar(t) for both (their training process)."""
    if graph == "uniform" or theirs:
        return sbar_of(noise, t)
    m = -math.expm1(-sbar_of(noise, t)) / -math.expm1(-sbar_of(noise, 1.0))
    return math.inf if m >= 1 else -math.log1p(-m)


class FakeNet(torch.nn.Module):
    def __init__(self, graph, noise, wobble):
        super().__init__()
        self.graph, self.noise, self.wobble = graph, noise, wobble
        g = torch.Generator().manual_seed(5)
        K = V + (graph == "absorb")
        self.table = torch.randn(L, K, K, K, generator=g, dtype=torch.float64)  # [l, x^l, x^(other), y]
        self.slope = torch.randn(L, K, generator=g, dtype=torch.float64)

    def forward(self, x, sigma, *args, **kwargs):
        sigma = sigma.double()
        out = self.exact(x, sigma)
        for l in range(L):
            out[:, l] += self.wobble * (self.table[l, x[:, l], x[:, 1 - l]] + 0.1 * sigma[:, None] * self.slope[l])
        return out.float()

    def exact(self, x, sigma):
        B, a, b = x.shape[0], x[:, 0], x[:, 1]
        if self.graph == "absorb":  # log(V p(x_0^l | x_t)), the mask column 0
            out = torch.zeros(B, L, V + 1, dtype=torch.float64)
            for l, (mine, other) in enumerate(((a, b), (b, a))):
                joint = DATA if l == 0 else DATA.T  # [x^l, x^(other)]
                p = torch.where((other < V)[:, None], joint.T[other.clamp(max=V - 1)], joint.sum(1))
                out[:, l, :V] = torch.log(V * p / p.sum(-1, keepdim=True))
            return out
        keep = torch.exp(-(sigma - sigma_of(self.noise, 0.0)))[:, None, None]
        M = keep * torch.eye(V, dtype=torch.float64) + (1 - keep) / V  # [b, x_t, x_0]
        p_t = M @ DATA @ M.transpose(1, 2)  # [b, x^0, x^1] at t
        here = p_t[torch.arange(B), a, b][:, None, None]
        return torch.stack([p_t[torch.arange(B), :, b], p_t[torch.arange(B), a, :]], 1).log() - here.log()


def oracle_ratio(model, x, t):
    """exp of the log score of x (N, L) at t: the network's output, scaled (absorb) as their SEDD.forward, 1 at x."""
    with torch.no_grad():
        out = model.net(x, torch.full((x.shape[0],), sigma_of(model.noise, t))).double()
    if model.absorb:
        out = out - math.log(math.expm1(sbar_of(model.noise, t))) - math.log(V)
    return out.scatter(-1, x[..., None], 0.0).exp()


def oracle_step(model, graph, ratio, x, t, s, predictor):
    """(N, L, K) step distributions from ratios (N, L, K) at x (N, L)."""
    Q = rate_matrix(graph)
    D = sbar_of(model.noise, t) - sbar_of(model.noise, s)
    if predictor == "analytic" or s == 0:
        p = (ratio @ torch.linalg.matrix_exp(-D * Q).T) * torch.linalg.matrix_exp(D * Q)[x]
    else:
        dsigma = (sigma_of(model.noise, t + 1e-7) - sigma_of(model.noise, t - 1e-7)) / 2e-7
        p = (t - s) * dsigma * Q[x] * ratio
        p = p.scatter(-1, x[..., None], 0.0)
        p = p.scatter(-1, x[..., None], 1 - p.sum(-1, keepdim=True))
    if graph == "absorb" and s == 0:
        p[..., V] = 0
    p = p.clamp(min=0)
    return p / p.sum(-1, keepdim=True)


def states(graph):
    K = V + (graph == "absorb")
    return torch.tensor(list(itertools.product(range(K), repeat=L)))


def q_marginal(graph, noise, x0, t, clean, theirs=False):
    """q(x_t | x_0) of the bound's process over states(graph) (clean positions held)."""
    M = transition(graph, bound_noise(graph, noise, t, theirs))
    S = states(graph)
    prob = torch.ones(len(S), dtype=torch.float64)
    for l in range(L):
        prob = prob * (((S[:, l] == x0[l]).double()) if l in clean else M[S[:, l], x0[l]])
    return S, prob


def prior_kl(graph, noise, x0):
    if graph == "absorb":
        return 0.0
    q = transition(graph, sbar_of(noise, 1.0))[:, x0]
    return float((q * torch.log(V * q)).sum())


@functools.lru_cache(maxsize=None)
def oracle_step_bound(graph, noise, T, x0=(2, 0), clean=(), hold=True, wobble=0.4, net="fake", predictor="analytic"):
    """The N-step bound per scored position, enumerated (clean: given; hold=False: noised all the same)."""
    model = make_model(graph, noise, wobble, net)
    scored = [l for l in range(L) if l not in clean]
    total = 0.0
    for j in range(1, T + 1):
        t, s = j / T, (j - 1) / T
        S, prob = q_marginal(graph, noise, x0, t, clean if hold else ())
        S, prob = S[prob > 0], prob[prob > 0]
        p = oracle_step(model, graph, oracle_ratio(model, S, t), S, t, s, predictor)
        bt, bs = bound_noise(graph, noise, t), bound_noise(graph, noise, s)
        back, fwd = transition(graph, bt - bs if bs < math.inf else math.inf), transition(graph, bs)
        for l in scored:
            q = back[S[:, l]] * fwd[:, x0[l]][None, :]  # q(x_s | x_t, x_0) up to normalisation
            q = q / q.sum(-1, keepdim=True)
            kl = (torch.xlogy(q, q) - torch.xlogy(q, p[:, l])).sum(-1)
            total += float((prob * kl).sum())
    return (total + sum(prior_kl(graph, noise, x0[l]) for l in scored)) / len(scored)


def oracle_integrand(model, graph, noise, x0, t, clean=(), hold=True):
    """The path-KL integrand at t summed over the scored positions (clean: given; hold=False: noised all the same)."""
    scored = [l for l in range(L) if l not in clean]
    Q = rate_matrix(graph).fill_diagonal_(0.0)  # the rates between distinct states
    S, prob = q_marginal(graph, noise, x0, t, clean if hold else ())
    S, prob = S[prob > 0], prob[prob > 0]
    ratio = oracle_ratio(model, S, t)
    dsigma = (sigma_of(noise, t + 1e-7) - sigma_of(noise, t - 1e-7)) / 2e-7
    h = 1e-7 * min(t, 1 - t)
    db = (bound_noise(graph, noise, t + h) - bound_noise(graph, noise, t - h)) / (2 * h)
    M = transition(graph, bound_noise(graph, noise, t))
    total = 0.0
    for l in scored:
        rates = dsigma * Q[S[:, l]] * ratio[:, l]
        true = db * Q[S[:, l]] * M[:, x0[l]][None, :] / M[S[:, l], x0[l]][:, None]
        total += float((prob * (rates - true + torch.xlogy(true, true) - torch.xlogy(true, rates)).sum(-1)).sum())
    return total


@functools.lru_cache(maxsize=None)
def oracle_continuous(graph, noise, x0=(2, 0), clean=(), hold=True, wobble=0.4, net="fake", nodes=80):
    """The bound per scored position: the integrand by Gauss-Legendre quadrature on t = u^3, plus the prior."""
    model = make_model(graph, noise, wobble, net)
    u, w = np.polynomial.legendre.leggauss(nodes)
    total = sum(wi * 3 * ui ** 2 * oracle_integrand(model, graph, noise, x0, float(ui) ** 3, clean, hold)
                for ui, wi in zip((u + 1) / 2, w / 2))
    scored = [l for l in range(L) if l not in clean]
    return (total + sum(prior_kl(graph, noise, x0[l]) for l in scored)) / len(scored)


class NormalisedNet(torch.nn.Module):
    """A time-independent network whose SEDD output reads as a normalised p(x_0 | x_t) (mode "sedd": log(V softmax z))
    and whose MDLM logits are z (mode "mdlm"): by Ou et al.'s identity the two bounds are then one."""

    def __init__(self, mode):
        super().__init__()
        self.mode = mode
        g = torch.Generator().manual_seed(7)
        self.z = 1.5 * torch.randn(L, V + 1, V + 1, V + 1, generator=g, dtype=torch.float64)

    def forward(self, x, t, *args, **kwargs):
        z = torch.stack([self.z[l, x[:, l], x[:, 1 - l]] for l in range(L)], 1)
        if self.mode == "mdlm":
            return z.float()
        return torch.cat([z[..., :V].log_softmax(-1) + math.log(V), torch.zeros_like(z[..., V:])], -1).float()


def mc(model, T=None, clean=None, n=100, B=256):
    """Mean and standard error of n batch_bound calls on B copies of X0 (clean: a (1, L) mask)."""
    x0 = X0.expand(B, L)
    c = None if clean is None else clean.expand(B, L)

    def one(i):
        g = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():
            return float(model.batch_bound(x0, float(torch.rand((), generator=g)), g, T=T, clean=c))
    return estimates(one, n)


# ---- the steps and the bounds --------------------------------------------------------------------------------------
@pytest.mark.parametrize("graph", ["absorb", "uniform"])
def test_steps_match_the_matrix_exponentials(graph):
    """step_probs (closed forms) = the matrix-built steps, analytic and Euler, at interior steps and the denoiser."""
    model = make_model(graph, "loglinear")
    S = states(graph)
    for t, s in ((1.0, 0.6), (0.5, 0.3), (0.2, 0.0)):
        ratio = oracle_ratio(model, S, t)
        for predictor in ("analytic", "euler"):
            ours = model.step_probs(ratio.log(), S, torch.tensor(t), torch.tensor(s), predictor)
            ref = oracle_step(model, graph, ratio, S, t, s, predictor)
            assert torch.allclose(ours, ref, atol=1e-9), (graph, t, s, predictor, (ours - ref).abs().max())


def test_n_step_bound_is_unbiased():
    """absorb: batch_bound(T = 3) is unbiased for the enumerated 3-step bound (the 1-step one told apart); the uniform
    graph has none (ValueError)."""
    model = make_model("absorb", "loglinear")
    mean, se = mc(model, T=3)
    assert_unbiased(mean, se, oracle_step_bound("absorb", "loglinear", 3),
                    {"T=1": oracle_step_bound("absorb", "loglinear", 1)}, "3-step bound")
    with pytest.raises(ValueError, match="continuous"):
        make_model("uniform", "loglinear").batch_bound(X0, 0.5, T=3)


@pytest.mark.parametrize("graph,noise", [("absorb", "loglinear"), ("absorb", "geometric"), ("uniform", "loglinear"),
                                         ("uniform", "geometric")])
def test_continuous_bound_is_unbiased(graph, noise):
    """batch_bound(T = None) is unbiased for the quadrature of the path KL (absorb: the 1-step bound, uniform: the
    bound under the other noise told apart)."""
    model = make_model(graph, noise)
    other = "geometric" if noise == "loglinear" else "loglinear"
    wrong = {"T=1": oracle_step_bound(graph, noise, 1)} if graph == "absorb" else \
        {"other noise": oracle_continuous(graph, other)}
    mean, se = mc(model)
    assert_unbiased(mean, se, oracle_continuous(graph, noise), wrong, f"{graph} {noise} continuous bound")


def test_n_step_bound_tends_to_the_continuous_one():
    """absorb: the enumerated N-step bounds approach the quadrature as N grows (N = 8, 128, 256), and their
    extrapolation as c / N from 128 and 256 lands ten times closer than the 256-step bound."""
    bounds = [oracle_step_bound("absorb", "loglinear", T) for T in (8, 128, 256)]
    exact = oracle_continuous("absorb", "loglinear")
    errors = [abs(b - exact) for b in bounds]
    assert errors[0] > errors[1] > errors[2], (bounds, exact)
    assert abs(2 * bounds[2] - bounds[1] - exact) < 0.1 * errors[2], (bounds, exact)


@pytest.mark.parametrize("graph,T", [("absorb", None), ("absorb", 3), ("uniform", None)])
def test_conditional_bound(graph, T):
    """clean = the first position (the prompt): batch_bound is unbiased for the bound of the second given the first,
    the prompt never noised and never scored: the unconditional bound and the bound with the prompt noised (but not
    scored) are told apart."""
    model = make_model(graph, "loglinear")
    exact = (lambda **kw: oracle_step_bound(graph, "loglinear", T, **kw)) if T else \
        (lambda **kw: oracle_continuous(graph, "loglinear", **kw))
    seen = []
    log_score = model.log_score
    model.log_score = lambda x_t, tt, *a: seen.append(x_t) or log_score(x_t, tt, *a)
    mean, se = mc(model, T=T, clean=torch.tensor([[True, False]]), **(dict(n=500, B=512) if graph == "uniform" else {}))
    assert all((x[:, 0] == X0[0, 0]).all() for x in seen)
    wrong = {"unconditional": exact(), "prompt noised": exact(clean=(0,), hold=False)}
    assert_unbiased(mean, se, exact(clean=(0,)), wrong, f"{graph} conditional bound (T={T})")


@pytest.mark.parametrize("graph", ["absorb", "uniform"])
@pytest.mark.parametrize("prompt", [False, True])
def test_forward_at_a_fixed_time(graph, prompt):
    """forward(x0, t) at t = 0.4: the loss is unbiased for the integrand at t per scored position (+ prior), every x_t
    the network sees keeps the prompt (clean), and the loss is what metrics["bound"] reports."""
    model = make_model(graph, "loglinear")
    B, t = 256, 0.4
    clean = torch.tensor([[True, False]]).expand(B, L) if prompt else None
    seen = []
    log_score = model.log_score
    model.log_score = lambda x_t, tt, *a: seen.append(x_t) or log_score(x_t, tt, *a)
    torch.manual_seed(0)

    def one(i):
        with torch.no_grad():
            _, loss, metrics = model(X0.expand(B, L), torch.full((B,), t, dtype=torch.float64), clean=clean)
        assert float(metrics["bound"]) == float(loss)
        return float(loss)
    mean, se = estimates(one, 60)
    clean_set = (0,) if prompt else ()
    scored = [l for l in range(L) if l not in clean_set]
    exact = (oracle_integrand(model, graph, "loglinear", (2, 0), t, clean_set)
             + sum(prior_kl(graph, "loglinear", int(X0[0, l])) for l in scored)) / len(scored)
    dsigma = (1 - 1e-3) / (1 - (1 - 1e-3) * t)
    wrong = {"no sigma' weight": exact - (1 - 1 / dsigma) * oracle_integrand(model, graph, "loglinear", (2, 0), t,
                                                                            clean_set) / len(scored)}
    assert_unbiased(mean, se, exact, wrong, f"{graph} forward at t = {t}")
    if prompt:
        assert all((x[:, 0] == X0[0, 0]).all() for x in seen)


def test_ou_identity_absorbing_score_is_the_clean_conditional():
    """Ou et al. 2024: with the absorbing graph the score is r(t) p(x_0 | x_t). A network whose exp(out)/V is a
    normalised p(x_0 | x_t) has SEDD's bound = MDLM's NELBO (linear schedule) of the network read as p(x_0 | x_t):
    the quadrature of SEDD's path KL = MDLM's NELBO enumerated over the mask patterns, SEDD's 3-step bound = MDLM's
    enumerated, and batch_bound is MDLM's estimate, batch for batch (the same draws)."""
    sedd = make_model("absorb", "loglinear", net="normalised")
    mdlm = MDLM(V, 8, 2, 1, 8, 0.0).eval()
    mdlm.net = NormalisedNet("mdlm")
    x0 = X0[0].tolist()

    def ce(x_t):  # -log p(x_0^l | x_t) for each position, of MDLM's logits
        with torch.no_grad():
            logits = mdlm.logits(torch.tensor([x_t]), torch.zeros(1, dtype=torch.float64))[0].double()
        return [-float(logits[l].log_softmax(-1)[x0[l]]) for l in range(L)]

    patterns = [S for k in range(1, L + 1) for S in itertools.combinations(range(L), k)]
    masked = {S: [V if l in S else x0[l] for l in range(L)] for S in patterns}
    nelbo = sum(sum(ce(masked[S])[l] for l in S) / len(S) / math.comb(L, len(S)) for S in patterns) / L
    assert abs(oracle_continuous("absorb", "loglinear", net="normalised") - nelbo) < 1e-6
    T = 3
    n_step = sum((1 / T) / t * t ** len(S) * (1 - t) ** (L - len(S)) * sum(ce(masked[S])[l] for l in S)
                 for t in (j / T for j in range(1, T + 1)) for S in patterns) / L
    assert abs(oracle_step_bound("absorb", "loglinear", T, net="normalised") - n_step) < 1e-6
    x = X0.expand(64, L)
    for seed in range(3):
        a, b = (m.batch_bound(x, 0.3 * seed, torch.Generator().manual_seed(seed)) for m in (sedd, mdlm))
        assert abs(float(a) - float(b)) < 1e-5, (float(a), float(b))


@pytest.mark.parametrize("graph", ["absorb", "uniform"])
@pytest.mark.parametrize("noise", ["loglinear", "geometric"])
def test_noise_and_prior(graph, noise):
    """The noise against their formulas (geometric with sigma_max = 1, so that a fifth of the tokens is clean at t = 1):
    sbar = sigma - sigma(0), sigma' by finite differences, the bound's hit probability (absorb: masked by t = 1,
    1 - e^-sbar rescaled; uniform: 1 - e^-sbar), time_of_mask_share its inverse, and the uniform prior
    KL(exp(sbar(1) Q)[:, x_0] || 1/V) built from the matrix (absorb: 0)."""
    model = SEDD(V, 8, 2, 1, 8, 0.0, graph=graph, noise=noise, sigma_max=1.0, scale_by_sigma=graph == "absorb")
    sig = (lambda t: -math.log1p(-(1 - EPS) * t)) if noise == "loglinear" else (lambda t: 1e-4 ** (1 - t) * 1.0 ** t)
    t = torch.tensor([1e-3, 0.2, 0.7, 1.0], dtype=torch.float64)
    sbar = torch.tensor([sig(float(x)) - sig(0.0) for x in t], dtype=torch.float64)
    assert torch.allclose(model.sigma(t), sbar + sig(0.0), rtol=1e-12, atol=0)
    assert torch.allclose(model.sbar(t), sbar, rtol=1e-9, atol=0)
    fd = torch.tensor([(sig(float(x) + 1e-6) - sig(float(x) - 1e-6)) / 2e-6 for x in t], dtype=torch.float64)
    assert torch.allclose(model.dsigma(t), fd, rtol=1e-6)
    hit = -torch.expm1(-sbar)
    if graph == "absorb":
        hit = hit / hit[-1]
        assert torch.allclose(model.time_of_mask_share(hit), t, rtol=1e-9)
        assert (model.q_sample(X0.expand(1000, L), torch.ones(1000)) == V).all()
    assert torch.allclose(model.hit(t), hit, rtol=1e-9)
    expected = 0.0 if graph == "absorb" else prior_kl(graph, noise, 0) if noise == "loglinear" else \
        float((lambda q: (q * torch.log(V * q)).sum())(transition(graph, sig(1.0) - sig(0.0))[:, 0]))
    assert model.prior() == pytest.approx(expected, rel=1e-6, abs=1e-15) and (noise == "loglinear" or expected > 0.05
                                                                             or graph == "absorb")


def test_compiled_training_step_equals_eager():
    """torch.compile as a GPU run uses it (aot_eager on CPU, as tests/test_compile.py), fullgraph: the training step of
    sedd_tiny traces as one graph and gives the eager loss and gradients (the uniform graph's: checked by hand)."""
    import configs
    from conftest import randomize_weights
    from test_compile import step
    torch._dynamo.reset()
    cls, args, _ = configs.sedd_tiny()
    torch.manual_seed(0)
    model = randomize_weights(cls(**dict(args, dropout=0.0)), 1).train()
    x = torch.randint(0, 27, (4, 32), generator=torch.Generator().manual_seed(5))
    eager_loss, eager_grads = step(model, x, seed=11)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    loss, grads = step(model, x, seed=11, run=compiled)
    torch.testing.assert_close(loss, eager_loss, rtol=1e-5, atol=1e-6)
    assert grads.keys() == eager_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], eager_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    assert not torch.equal(step(model, x.roll(1, dims=1), seed=12)[0], eager_loss)


# ---- the samplers ----------------------------------------------------------------------------------------------------
def chain_law(model, graph, N, predictor, prompt, hide_prompt=False):
    """{final state: probability} of the N-step chain from the start (absorb: masks; uniform: uniform tokens), the
    prompt (a token for position 0, or None) held; hide_prompt: the network sees a mask there (a wrong chain)."""
    S = states(graph)
    K = V + (graph == "absorb")
    index = {tuple(s.tolist()): i for i, s in enumerate(S)}
    law = torch.zeros(len(S), dtype=torch.float64)
    for i, s in enumerate(S.tolist()):
        start = (graph == "absorb" and s[1] == V) and (s[0] == (V if prompt is None else prompt))
        if graph == "uniform":
            start = prompt is None or s[0] == prompt
        law[i] = float(start)
    law /= law.sum()
    for j in range(N, 0, -1):
        t, s = j / N, (j - 1) / N
        seen = S.clone()
        if hide_prompt:
            seen[:, 0] = V
        p = oracle_step(model, graph, oracle_ratio(model, seen, t), seen, t, s, predictor)
        if prompt is not None:
            p[:, 0] = torch.nn.functional.one_hot(S[:, 0], K).double()
        step = p[:, 0, :, None] * p[:, 1, None, :]  # [x, y^0, y^1]
        law = torch.einsum("x,xab->ab", law, step).reshape(-1)
        assert abs(float(law.sum()) - 1) < 1e-9
    return {tuple(s.tolist()): float(law[index[tuple(s.tolist())]]) for s in S}


@pytest.mark.parametrize("graph,predictor,prompt", [("absorb", "analytic", None), ("absorb", "euler", None),
                                                    ("uniform", "analytic", None), ("uniform", "euler", None),
                                                    ("absorb", "analytic", 1)])
def test_samplers_match_the_exact_chain(graph, predictor, prompt):
    """sample(steps=3) draws (4000 rows) from the enumerated law of its chain (chi-square), not from the law of a wrong
    chain: the 1-step chain; uniform: the other predictor's; with a prompt, the chain whose network does not see it.
    (absorb, log-linear: Euler's step is the analytic one, sigma' r = 1/t.) A given token never changes."""
    model = make_model(graph, "loglinear")
    n, N = 4000, 3
    x = torch.full((n, L), V)
    if prompt is not None:
        x[:, 0] = prompt
    sampler = {"analytic": "ancestral", "euler": "euler"}[predictor]
    out, calls = model.sample(x, steps=N, generator=torch.Generator().manual_seed(11), sampler=sampler)
    assert calls == N and (out < V).all()
    if prompt is not None:
        assert (out[:, 0] == prompt).all()
    exact = chain_law(model, graph, N, predictor, prompt)
    assert chisquare_pvalue(out, exact) > 1e-3
    other = "euler" if predictor == "analytic" else "analytic"
    if prompt is not None:
        wrongs = [chain_law(model, graph, N, predictor, prompt, hide_prompt=True)]
    else:
        wrongs = [chain_law(model, graph, 1, predictor, prompt)]
        wrongs += [chain_law(model, graph, N, other, prompt)] if graph == "uniform" else []
    for wrong in wrongs:
        assert chisquare_pvalue(out, {k: max(v, 1e-12) for k, v in wrong.items()}) < 1e-6


def test_one_line_errors():
    """Bad model arguments, samplers and options: one-line ValueErrors."""
    for kwargs in (dict(graph="gaussian"), dict(noise="cosine"), dict(graph="uniform", scale_by_sigma=True),
                   dict(eps=0.0), dict(sigma_min=2.0, sigma_max=1.0)):
        with pytest.raises(ValueError) as e:
            SEDD(V, 8, 2, 1, 8, 0.0, **kwargs)
        assert "\n" not in str(e.value)
    model = make_model("absorb", "loglinear")
    x = torch.full((2, L), V)
    for kwargs in (dict(sampler="confidence"), dict(sampler="remask"), dict(temperature=0.5), dict(top_p=0.9),
                   dict(eta=0.1)):
        with pytest.raises(ValueError) as e:
            model.sample(x, steps=2, **kwargs)
        assert "\n" not in str(e.value)
