"""
Independent-oracle tests of genmd4.GenMD4 (masked diffusion with a learned schedule per token).

The network is a fixed random time-conditioned DiT (conftest.randomize_weights); the schedule exponents are
set to distinct values w = W. Everything else is recomputed here from the math of genmd4.py's docstring and
../shared/reference/model-families.md sections 1, 2 and 7, on a vocabulary of V = 3 and sequences of L = 2:

- mu_table: p_theta(x_0^l | x_t) for every clean sequence, every non-empty mask pattern and any times t, from
  model.logits' first V columns with our own float64 softmax.
- The NELBO: Gauss-Legendre over t (geometric panels towards t = 0, where the integrand behaves like
  t^(w - 1), then panels finer than the time embedding's period) of the exact sum over the mask patterns
  of prod_l (t^{w_x} or 1 - t^{w_x}) times sum_masked (1/t) [w_x (-log mu(x)) + sum_v w_v mu(v) - w_x].
- The N-step bound: the same sum over patterns at the grid times, of the KL between the true and the model's
  one-step distributions over the V + 1 outcomes, written out as a generic KL (not the closed form).
- The gradient of the training objective in w_hat: central finite differences of the exact objective.
- The sampler: its exact N-step output distribution by dynamic programming over partially masked states.

Every unbiasedness check (mean of many estimates within 4 standard errors of the exact value) also asserts
that the same band excludes the values of plausibly wrong implementations (8 standard errors).
"""
import itertools
import math

import numpy as np
import pytest
import torch

from conftest import assert_unbiased, chisquare_pvalue, estimates, randomize_weights
from genmd4 import GenMD4
from mdlm import MDLM

V, L = 3, 2
M = V                                                   # the mask id
SEQS = list(itertools.product(range(V), repeat=L))      # all 9 clean sequences
X = np.array(SEQS)                                      # (S, L)
PATTERNS = np.array([p for p in itertools.product((False, True), repeat=L) if any(p)])  # 3 non-empty masks
W = np.array([0.45, 1.0, 2.2])                          # distinct exponents (0.45 < 1/2: t = u^2 alone would
                                                        # have infinite variance)
SAMPLER_SEED = 9

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny tensors, 2 cores shared


def make(w=W, seed=3, **kw):
    """A fixed random network with exponents w; its time embedding keeps only the frequencies with
    1000 f <= 20 (a few oscillations over [0, 1], so that a modest quadrature in t converges)."""
    torch.manual_seed(0)
    model = randomize_weights(GenMD4(V, 16, 2, 1, 8, 0.0, **kw), seed)
    with torch.no_grad():
        first = model.net.c_embed.mlp[0].weight  # (n_cond, 256): cos then sin of t_in f_j, f_j = 10^(-4j/128)
        fast = 1000 * 10 ** (-4 * torch.arange(128) / 128) > 20
        first[:, torch.cat([fast, fast])] = 0
        model.w_hat.copy_(torch.log(torch.expm1(torch.tensor(w, dtype=torch.float64))))
    return model.eval()


def gauss_legendre(edges, order=8):
    """Composite Gauss-Legendre nodes and weights on the panels between consecutive edges."""
    x, w = np.polynomial.legendre.leggauss(order)
    edges = np.asarray(edges, dtype=np.float64)
    mid, half = (edges[1:] + edges[:-1]) / 2, (edges[1:] - edges[:-1]) / 2
    return (mid[:, None] + half[:, None] * x).ravel(), (half[:, None] * w).ravel()


def edges_from(a, panels=20):
    """Panels on [a, 1]: if a = 0, geometric (ratio 10^(1/2)) from 1e-14 up to 0.1, where the integrand behaves
    like t^(w - 1); then `panels` equal ones up to 1."""
    if a > 0:
        return np.linspace(a, 1, panels + 1)
    return np.concatenate([[0.0], np.logspace(-14, -1, 27), np.linspace(0.1, 1, panels + 1)[1:]])


# ---- the oracles --------------------------------------------------------------------------------------------
@torch.no_grad()
def mu_table(model, times, chunk=20_000):
    """mu[n, s, p, l, v] = p_theta(x_0^l = v | x_t) for SEQS[s] masked by PATTERNS[p] at times[n], float64."""
    x0 = torch.tensor(SEQS)
    xt = torch.where(torch.tensor(PATTERNS)[None], M, x0[:, None]).reshape(-1, L)
    R = xt.shape[0]
    times = np.atleast_1d(np.asarray(times, dtype=np.float64))
    per = max(1, chunk // R)
    out = []
    for i in range(0, len(times), per):
        tt = torch.tensor(times[i:i + per])
        logits = model.logits(xt.repeat(len(tt), 1), tt.repeat_interleave(R))
        out.append(logits[..., :V].double().softmax(-1).view(len(tt), len(SEQS), len(PATTERNS), L, V).numpy())
    return np.concatenate(out)


def pattern_prob(w, t):
    """P(pattern p | SEQS[s], t) = prod_l (t^{w_x} if masked else 1 - t^{w_x}): (N, S, P)."""
    m = np.asarray(t, dtype=np.float64)[:, None, None] ** w[X][None]                     # (N, S, L)
    return np.where(PATTERNS[None, None], m[:, :, None, :], 1 - m[:, :, None, :]).prod(-1)


def integrand(w, mu, t, variant="right"):
    """sum over the masked positions of f_l(t) = (1/t) [w_x (-log mu(x)) + sum_v w_v mu(v) - w_x]: (N, S, P).
    variant: the plausible mistakes the power checks use."""
    nll = -np.log(np.take_along_axis(mu, X[None, :, None, :, None], -1)[..., 0])    # (N, S, P, L)
    wx = w[X][None, :, None, :]
    mean_w = mu @ w
    f = {"right": wx * nll + mean_w - wx,
         "no w_x on -log mu": nll + mean_w - wx,
         "sum_v w_v mu(v) - w_x dropped": wx * nll,
         "MDLM's -log mu": nll}[variant]
    return (f * PATTERNS[None, None]).sum(-1) / np.asarray(t)[:, None, None]


def objective(w, mu, t, gw, variant="right", prob_w=None):
    """int E_{x_t}[sum_masked f] dt / L, the mean over SEQS (the quadrature nodes t, weights gw). prob_w: the
    masks' exponents, if not w (the pathwise part of the gradient)."""
    prob = pattern_prob(w if prob_w is None else prob_w, t)
    return float(((prob * integrand(w, mu, t, variant)).sum(-1) * gw[:, None]).sum(0).mean()) / L



def bound_estimates(model, copies, n, seed, T=None):
    """model.batch_bound on batches of `copies` copies of SEQS in random order, each with a fresh offset."""
    base = torch.tensor(SEQS).repeat(copies, 1)
    g = torch.Generator().manual_seed(seed)

    def one(_):
        offset = float(torch.rand((), generator=g))
        with torch.no_grad():
            value = model.batch_bound(base[torch.randperm(len(base), generator=g)], offset, g, T=T)
        assert value.dtype == torch.float64 and value.dim() == 0
        return float(value)
    return estimates(one, n)


@pytest.fixture(scope="module")
def full():
    """The model with W, and the quadrature of [0, 1] with mu at its nodes."""
    model = make()
    t, gw = gauss_legendre(edges_from(0.0))
    return model, t, gw, mu_table(model, t)


# ---- 1. the continuous NELBO --------------------------------------------------------------------------------
def test_batch_bound_is_the_state_dependent_nelbo(full):
    """Non-uniform w: the mean of batch_bound equals the NELBO by exact enumeration, and rejects the weight 1/t
    on -log mu without w_x, the term sum_v w_v mu(v) - w_x dropped, and MDLM's integrand under the learned masks.
    The quadrature has converged (a coarser rule agrees)."""
    model, t, gw, mu = full
    exact = objective(W, mu, t, gw)
    t2, gw2 = gauss_legendre(edges_from(0.0, panels=10), order=6)
    assert abs(objective(W, mu_table(model, t2), t2, gw2) - exact) < 1e-6
    mean, se = bound_estimates(model, 100, 200, seed=1)
    wrong = {v: objective(W, mu, t, gw, v) for v in ("no w_x on -log mu", "sum_v w_v mu(v) - w_x dropped",
                                                     "MDLM's -log mu")}
    assert_unbiased(mean, se, exact, wrong, "continuous NELBO")


# ---- 2. w = 1 is MDLM ---------------------------------------------------------------------------------------
def test_all_w_one_is_mdlm():
    """With every w = 1, GenMD4's NELBO is the linear MDLM's on the same network weights: the two oracles agree
    exactly, and both models' batch_bound means agree with them. Rejects the network fed u instead of t = u^2."""
    model = make(w=np.ones(V))
    mdlm = MDLM(V, 16, 2, 1, 8, 0.0, schedule="linear", time_conditioning=True)
    mdlm.load_state_dict({k: v for k, v in model.state_dict().items() if k != "w_hat"})
    mdlm.eval()
    x = torch.tensor([[M, M], [0, M], [M, 2]])
    tt = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    with torch.no_grad():
        assert torch.equal(model.logits(x, tt), mdlm.logits(x, tt))
    t, gw = gauss_legendre(edges_from(0.0))
    mu = mu_table(model, t)
    exact = objective(np.ones(V), mu, t, gw)
    ones = np.ones(V)
    mdlm_exact = float(((pattern_prob(ones, t) * integrand(ones, mu, t, "MDLM's -log mu")).sum(-1)
                        * gw[:, None]).sum(0).mean()) / L
    assert abs(exact - mdlm_exact) < 1e-12
    mean, se = bound_estimates(model, 80, 160, seed=2)
    at_u = objective(ones, mu_table(model, np.sqrt(t)), t, gw)  # the network at sqrt(t) = u
    assert_unbiased(mean, se, exact, {"network at u": at_u}, "GenMD4 with w = 1")
    mean_m, se_m = bound_estimates(mdlm, 40, 100, seed=3)
    assert abs(mean_m - exact) < 4 * se_m, (mean_m, exact, se_m)


# ---- 3. the training loss ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def train_quad():
    """The model with t_eps = 0.2 (the convention visible) and the quadrature of [0.2, 1] with mu."""
    model = make(t_eps=0.2)
    t, gw = gauss_legendre(edges_from(0.2, panels=16))
    return model, t, gw, mu_table(model, t)


def test_forward_loss_is_the_nelbo_on_t_eps_1(train_quad):
    """E[loss] = int_{t_eps}^1 E_{x_t}[sum_masked f] dt / ((1 - t_eps) L); the loss's value is metrics["bound"]
    (the score-function term is 0 in value). Rejects no 1 / (1 - t_eps) and the missing w_x."""
    model, t, gw, mu = train_quad
    exact = objective(W, mu, t, gw) / 0.8
    torch.manual_seed(4)
    x0 = torch.tensor(SEQS).repeat(30, 1)

    def one(_):
        with torch.no_grad():
            _, loss, metrics = model(x0)
        assert torch.equal(loss, metrics["bound"]) and float(metrics["w_min"]) == pytest.approx(W.min(), rel=1e-5)
        return float(loss)
    mean, se = estimates(one, 150)
    wrong = {"no 1/(1 - t_eps)": exact * 0.8, "no w_x on -log mu": objective(W, mu, t, gw, "no w_x on -log mu") / 0.8}
    assert_unbiased(mean, se, exact, wrong, "forward loss")


# ---- 4. the gradient in w_hat -------------------------------------------------------------------------------
def test_reinforce_gradient_is_the_true_gradient(train_quad):
    """The mean over batches of d loss / d w_hat (autograd) equals the gradient of the exact objective by
    central finite differences, per component within 4 SE; the pathwise gradient alone (no REINFORCE term) is
    rejected by more than 8 SE in some component."""
    model, t, gw, mu = train_quad
    w_hat = model.w_hat.detach().double().numpy()

    def J(wh, pathwise=False):
        w = np.log1p(np.exp(wh))
        return objective(w, mu, t, gw, prob_w=W if pathwise else None) / 0.8
    h = 1e-5
    true, path = np.zeros(V), np.zeros(V)
    for v in range(V):
        e = np.eye(V)[v] * h
        true[v] = (J(w_hat + e) - J(w_hat - e)) / (2 * h)
        path[v] = (J(w_hat + e, True) - J(w_hat - e, True)) / (2 * h)
    for p in model.net.parameters():
        p.requires_grad_(False)
    torch.manual_seed(5)
    x0 = torch.tensor(SEQS).repeat(30, 1)
    mean, se = estimates(lambda _: torch.autograd.grad(model(x0)[1], model.w_hat)[0].double().numpy(), 300)
    for p in model.net.parameters():
        p.requires_grad_(True)
    assert (np.abs(mean - true) < 4 * se).all(), f"gradient {mean} vs exact {true} (se {se})"
    assert (np.abs(path - true) / se).max() > 8, f"cannot tell the pathwise gradient {path} from {true} (se {se})"


# ---- the N-step bound ---------------------------------------------------------------------------------------
def n_step_bound(w, model, N, ignore_w_in_step=False):
    """sum_j E_{x_{t_j}}[sum_masked KL(true step || model step)] / L, mean over SEQS: each step's two
    distributions over the V + 1 outcomes (v, or still masked) written out, KL summed over them."""
    total = 0.0
    for j in range(1, N + 1):
        t, r = j / N, (j - 1) / j
        mu = mu_table(model, [t])
        ws = np.ones(V) if ignore_w_in_step else w
        model_p = np.concatenate([mu * (1 - r ** ws), (mu * r ** ws).sum(-1, keepdims=True)], -1)  # (1,S,P,L,V+1)
        true_p = np.zeros_like(model_p)
        for s, seq in enumerate(SEQS):
            for l, x in enumerate(seq):
                true_p[:, s, :, l, x] = 1 - r ** w[x]
                true_p[:, s, :, l, V] = r ** w[x]
        with np.errstate(divide="ignore", invalid="ignore"):  # 0 log 0 = 0
            kl = np.where(true_p > 0, true_p * np.log(true_p / model_p), 0.0).sum(-1)
        total += float((pattern_prob(w, [t]) * (kl * PATTERNS[None, None]).sum(-1)).sum(-1).mean())
    return total / L


def test_batch_bound_n_steps(full):
    """T = 4: the mean of batch_bound(T=4) is the 4-step bound; rejects the continuous NELBO (T ignored) and the
    step's unmask probabilities without w (1 - r for every token)."""
    model, t, gw, mu = full
    exact = n_step_bound(W, model, 4)
    mean, se = bound_estimates(model, 40, 100, seed=6, T=4)
    wrong = {"the continuous NELBO": objective(W, mu, t, gw), "w ignored in the step": n_step_bound(W, model, 4, True)}
    assert_unbiased(mean, se, exact, wrong, "4-step bound")
    with torch.no_grad():  # one step is the cross-entropy of the all-masked prediction
        one = model.batch_bound(torch.tensor(SEQS), 0.0, torch.Generator().manual_seed(0), T=1)
    assert abs(float(one) - n_step_bound(W, model, 1)) < 1e-6


# ---- 5. the sampler -----------------------------------------------------------------------------------------
@torch.no_grad()
def exact_sampler(model, start, N, w):
    """Output distribution of the N-step ancestral sampler: from t = j/N to s = (j-1)/N a masked position
    becomes v w.p. mu(v) (1 - (s/t)^{w_v}), else stays masked; mu = p_theta(x_0 | state) at t."""
    dist = {tuple(start): 1.0}
    for j in range(N, 0, -1):
        r = (j - 1) / j
        states = [st for st in dist if M in st]
        if states:
            logits = model.logits(torch.tensor(states), torch.full((len(states),), j / N, dtype=torch.float64))
            preds = dict(zip(states, logits[..., :V].double().softmax(-1).numpy()))
        new = {}
        for st, mass in dist.items():
            options = [[(tok, 1.0)] if tok != M else
                       [(v, preds[st][l, v] * (1 - r ** w[v])) for v in range(V)]
                       + [(M, float((preds[st][l] * r ** w).sum()))] for l, tok in enumerate(st)]
            for combo in itertools.product(*options):
                key = tuple(tok for tok, _ in combo)
                new[key] = new.get(key, 0.0) + mass * math.prod(q for _, q in combo)
        dist = new
    dist = {k: p for k, p in dist.items() if p > 0}
    assert all(M not in k for k in dist) and abs(sum(dist.values()) - 1) < 1e-9
    return dist


def tv(p, q):
    return 0.5 * sum(abs(p.get(k, 0.0) - q.get(k, 0.0)) for k in set(p) | set(q))


@pytest.mark.parametrize("start,N", [((M, M), 3), ((M, 1), 2)])
def test_sampler_matches_exact_chain(start, N):
    """Chi-square of 16000 samples against the exact N-step chain; rejects the chain that ignores the learned
    schedule (every w = 1). Given tokens never change, calls <= N, cache=False gives the same samples in N calls."""
    model = make(seed=SAMPLER_SEED)
    exact = exact_sampler(model, start, N, W)
    x = torch.tensor([start] * 16_000)
    samples, calls = model.sample(x, steps=N, generator=torch.Generator().manual_seed(7))
    assert calls <= N and (samples != M).all()
    given = [l for l in range(L) if start[l] != M]
    assert torch.equal(samples[:, given], x[:, given]), "a given token changed"
    p = chisquare_pvalue(samples, exact)
    assert p > 1e-4, f"steps={N} samples do not follow the {N}-step chain (p = {p:.3g})"
    wrong = exact_sampler(model, start, N, np.ones(V))
    assert tv(wrong, exact) > 0.01
    q = chisquare_pvalue(samples, wrong)
    assert q < 1e-6, f"the chi-square test cannot tell the schedule-ignoring chain (p = {q:.3g})"
    again, calls_all = model.sample(x[:200], steps=N, generator=torch.Generator().manual_seed(8), cache=False)
    same, _ = model.sample(x[:200], steps=N, generator=torch.Generator().manual_seed(8))
    assert torch.equal(again, same) and calls_all == N


def test_sampler_options_and_calls():
    model = make()
    x = torch.tensor([[M, M], [0, M], [2, 1]]).repeat(10, 1)
    for kw in (dict(temperature=0), dict(top_k=1), dict(top_p=0.5, temperature=0.7), dict(sampler="confidence")):
        out, calls = model.sample(x, steps=3, generator=torch.Generator().manual_seed(0), **kw)
        assert (out != M).all() and torch.equal(out[x != M], x[x != M]) and calls <= 3
    out, calls = model.sample(x, generator=torch.Generator().manual_seed(0))  # default: L steps
    assert calls <= L and (out != M).all()
    assert model.sample(x[2:3], steps=4)[1] == 0  # nothing to generate: no call
    with pytest.raises(ValueError, match="remask"):
        model.sample(x, steps=3, sampler="remask")


def test_configs_init_and_no_scalar_schedule():
    """The genmd4_* configs are the D3PM configs' network and budget with time conditioning and MDLM's
    grad_clip; a new model starts at w = 1 (the linear schedule); mdlm.py's scalar alpha(t) is refused."""
    import configs
    for name in ("genmd4_text8", "genmd4_text8_cpu", "genmd4_tiny"):
        cls, args, training = getattr(configs, name)()
        _, d3pm_args, d3pm_training = getattr(configs, name.replace("genmd4", "d3pm"))()
        assert cls is GenMD4 and args == dict({k: v for k, v in d3pm_args.items() if k not in ("T", "lambda_ce")},
                                              time_conditioning=True, antithetic=True, t_eps=1e-3)
        assert training == dict(d3pm_training, grad_clip=1.0)
    model = GenMD4(**configs.genmd4_tiny()[1])
    assert torch.allclose(model.w, torch.ones(model.vocab_size), atol=1e-6) and model.time_conditioning
    with pytest.raises(NotImplementedError):
        model.alpha(0.5)


# ---- 6. checkpoints -----------------------------------------------------------------------------------------
def test_checkpoint_round_trip(tmp_path):
    """A GenMD4 checkpoint (nanoDD layout) loads through families.load_checkpoint, EMA and raw weights, with its
    learned w_hat."""
    import families
    model = make()
    state = model.state_dict()
    assert "w_hat" in state
    raw = {k: v + 0.01 if k == "w_hat" else v for k, v in state.items()}
    path = tmp_path / "ckpt.pt"
    torch.save({"model": raw, "ema": {"initted": torch.tensor(True), "step": torch.tensor(3),
                                      **{"ema_model." + k: v for k, v in state.items()}},
                "model_cls": "GenMD4", "model_args": dict(vocab_size=V, n_embed=16, n_heads=2, n_blocks=1,
                                                          n_cond=8, dropout=0.0)}, path)
    ema = families.load_checkpoint(str(path))
    plain = families.load_checkpoint(str(path), ema=False)
    assert type(ema) is GenMD4 and torch.equal(ema.w_hat, model.w_hat) and torch.equal(plain.w_hat, raw["w_hat"])
    x0 = torch.tensor(SEQS)
    with torch.no_grad():
        assert torch.equal(ema.batch_bound(x0, 0.3, torch.Generator().manual_seed(1)),
                           model.batch_bound(x0, 0.3, torch.Generator().manual_seed(1)))
