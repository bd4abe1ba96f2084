"""
Conditional generation (families.py's clean mask) for the absorbing D3PM (d3pm.py) and GenMD4 (genmd4.py), against
independent oracles on V = 3, L = 3 with a fixed random network (conftest.randomize_weights).

The bound of a row with prompt P (clean) and answer A is that of -log p(x_A | x_P): only A is ever masked, only A
is scored, and the batch value is the mean over rows of (the row's bound) / |A|.

- D3PM: the row's bound by enumerating every forward trajectory of the answer positions (the prompt held fixed)
  with the full K x K transition matrices of test_d3pm_loss.AbsorbingOracle, E_q[log q(x_{1:T} | x_0) -
  log p(x_{0:T})] over A, the model's step the generic posterior mixture.
- GenMD4: Gauss-Legendre over t of the exact sum over the mask patterns of A, prod_{l in A} (t^{w_x} or
  1 - t^{w_x}) times sum_{masked l} f_l(t), with mu from the network on every such x_t.

Unbiasedness checks: the mean of many estimates within 4 standard errors of the exact value, and the same band
excludes the value of the mutation that noises the prompt too (by 8 standard errors).
"""
import itertools
import math

import numpy as np
import pytest
import torch

from conftest import assert_unbiased, estimates, randomize_weights
from d3pm import D3PMAbsorbing
from genmd4 import GenMD4
from test_d3pm_loss import AbsorbingOracle, softmax64

pytestmark = pytest.mark.usefixtures("one_thread")

V, L, T = 3, 3, 3
M = V
# rows with prompts of different lengths (one with none): (x0, clean)
ROWS = [((0, 1, 2), (True, False, False)),
        ((2, 0, 1), (True, True, False)),
        ((1, 1, 0), (True, False, False)),
        ((2, 2, 1), (False, False, False))]
X0 = torch.tensor([r[0] for r in ROWS])
CLEAN = torch.tensor([r[1] for r in ROWS])



def batches(copies, g):
    """The ROWS `copies` times, in a random order: (x0, clean)."""
    perm = torch.randperm(len(ROWS) * copies, generator=g)
    return X0.repeat(copies, 1)[perm], CLEAN.repeat(copies, 1)[perm]


# ==== D3PM ======================================================================================================
def d3pm(steps=T):
    torch.manual_seed(0)
    return randomize_weights(D3PMAbsorbing(V, 16, 2, 1, 8, 0.0, steps, 0.3), 5).eval()


@torch.no_grad()
def d3pm_row_bound(model, x0, clean, noise_prompt=False):
    """-log p(x_A | x_P) bounded, by enumerating the trajectories x_1..x_T of the noised positions (A, or all with
    noise_prompt: the mutation), scoring A only: E_q[sum_{l in A} log q(x^l_{1:T} | x^l_0) - log p(x^l_{0:T})]."""
    orc = AbsorbingOracle(V, T)
    noised = [l for l in range(L) if noise_prompt or not clean[l]]
    scored = [l for l in range(L) if not clean[l]]
    cache = {}

    def probs(state, time):
        if (state, time) not in cache:
            cache[state, time] = softmax64(model.logits(torch.tensor([state]), torch.tensor([time])))[0]
        return cache[state, time]

    total = 0.0

    def dfs(traj, prob):
        nonlocal total
        k = len(traj) - 1
        if k == T:
            assert all(traj[T][l] == M for l in noised) and all(traj[T][l] == x0[l] for l in range(L) if l not in noised)
            cost = 0.0
            for l in scored:
                for s in range(1, T + 1):  # log q(x_s | x_{s-1})
                    cost += math.log(orc.Q[s][traj[s - 1][l], traj[s][l]])
                for s in range(T, 1, -1):  # - log p(x_{s-1} | x_s)
                    cost -= math.log(orc.model_posterior(probs(traj[s], s)[l], traj[s][l], s - 1)[traj[s - 1][l]])
                cost -= math.log(probs(traj[1], 1)[l][x0[l]])
            total += prob * cost
            return
        options = [[(v, orc.Q[k + 1][traj[-1][l], v]) for v in range(V + 1)] if l in noised else [(traj[-1][l], 1.0)]
                   for l in range(L)]
        for combo in itertools.product(*options):
            p = math.prod(q for _, q in combo)
            if p > 0:
                dfs(traj + [tuple(v for v, _ in combo)], prob * p)
    dfs([tuple(x0)], 1.0)
    return total / len(scored)


@pytest.fixture(scope="module")
def d3pm_exact():
    model = d3pm()
    exact = np.mean([d3pm_row_bound(model, x, c) for x, c in ROWS])
    noised = np.mean([d3pm_row_bound(model, x, c, noise_prompt=True) for x, c in ROWS])
    return model, exact, noised


def test_d3pm_oracle_without_prompt_is_the_unconditional_bound(d3pm_exact):
    """The enumeration with no prompt is the unconditional sum of expected KL terms of loss_terms (a check of the
    oracle against test_d3pm_loss's closed form): the row (2, 2, 1) by both routes."""
    model = d3pm_exact[0]
    x0 = torch.tensor([ROWS[3][0]])
    total = 0.0
    for s in range(T):  # E over the 2^L mask patterns of x_{s+1}
        keep = 1 - (s + 1) / T
        for pat in itertools.product((False, True), repeat=L):
            pr = math.prod((1 - keep) if m else keep for m in pat)
            if pr == 0:
                continue
            xn = torch.where(torch.tensor([pat]), M, x0)
            with torch.no_grad():
                kl, ce = model.loss_terms(model.logits(xn, torch.tensor([s + 1])), x0, xn, torch.tensor([s]))
            total += pr * float((ce if s == 0 else kl).double().sum())
    assert abs(total / L - d3pm_row_bound(model, ROWS[3][0], ROWS[3][1])) < 1e-5


@pytest.mark.parametrize("copies,n", [(6, 1500), (None, 3000)])
def test_d3pm_batch_bound_is_the_conditional_bound(d3pm_exact, copies, n):
    """The mean of batch_bound(clean=...) over batches of the ROWS (prompts of 0, 1 and 2 tokens) in random order
    and random offsets is the mean over rows of L_T(A | P) / |A|; copies=None: one-row batches, a random row each.
    Rejects the bound with the prompt noised too."""
    model, exact, noised = d3pm_exact
    g = torch.Generator().manual_seed(1)

    def one(_):
        if copies is None:
            r = int(torch.randint(len(ROWS), (), generator=g))
            x0, clean = X0[r:r + 1], CLEAN[r:r + 1]
        else:
            x0, clean = batches(copies, g)
        with torch.no_grad():
            value = model.batch_bound(x0, float(torch.rand((), generator=g)), g, clean=clean)
        assert value.dtype == torch.float64 and value.dim() == 0
        return value
    mean, se = estimates(one, n)
    assert_unbiased(mean, se, exact, {"prompt noised": noised}, "D3PM conditional batch_bound")


def test_d3pm_forward_terms_sum_to_the_conditional_bound(d3pm_exact):
    """forward(x0, t = s for every row, clean): E[metrics kl] at s = 1..T-1 plus E[metrics ce] at s = 0 is the
    conditional bound; the loss is kl + lambda_ce ce per row (ce alone at s = 0) and bound = l_T."""
    model, exact, noised = d3pm_exact
    torch.manual_seed(2)
    x0, clean = X0.repeat(8, 1), CLEAN.repeat(8, 1)
    total, var = 0.0, 0.0
    for s in range(T):
        t = torch.full((len(x0),), s)

        def one(_):
            with torch.no_grad():
                _, loss, met = model(x0, t, clean=clean)
            assert torch.equal(met["bound"], met["l_T"])
            if s == 0:
                assert abs(float(loss) - float(met["ce"])) < 1e-6 and float(met["kl"]) == 0
                assert abs(float(met["l_T"]) - float(met["ce"])) < 1e-6
                return met["ce"]
            assert abs(float(loss) - float(met["kl"] + model.lambda_ce * met["ce"])) < 1e-5
            assert abs(float(met["l_T"]) - T * float(met["kl"])) < 1e-5
            return met["kl"]
        mean, se = estimates(one, 150 if s else 3)
        total, var = total + mean, var + se ** 2
    se = max(math.sqrt(var), 1e-4)
    assert_unbiased(total, se, exact, {"prompt noised": noised}, "D3PM conditional forward terms")


def spy_logits(model, perturb=None):
    """Record every network input; perturb(x, logits) may change the logits returned."""
    seen, orig = [], model.logits

    def logits(x, t):
        seen.append(x.clone())
        out = orig(x, t)
        return out if perturb is None else perturb(x, out)
    model.logits = logits
    return seen


def perturb_at(clean):
    """Add large random numbers to the real-token logits at the clean positions."""
    def perturb(x, out):
        noise = torch.randn(out.shape[:-1] + (V,), generator=torch.Generator().manual_seed(len(x))) * 5
        out = out.clone()
        out[..., :V] += noise * clean[:len(x), :, None]
        return out
    return perturb


def test_d3pm_prompt_never_noised_and_never_scored():
    """Over many forward and batch_bound calls the network always sees the prompt (answer positions masked at
    the schedule's rate); logits perturbed at the prompt leave loss, metrics and batch_bound (and the gradient)
    unchanged, same seed."""
    model = d3pm()
    x0, clean = X0.repeat(50, 1), CLEAN.repeat(50, 1)
    seen = spy_logits(model)
    torch.manual_seed(3)
    t = torch.randint(0, T, (len(x0),))
    with torch.no_grad():
        for k in range(20):
            model(x0, t, clean=clean)
            model.batch_bound(x0, k / 20, torch.Generator().manual_seed(k), clean=clean)
            model.batch_bound(x0[:1], k / 20, torch.Generator().manual_seed(k), clean=clean[:1])
    for x in seen:
        c = clean[:len(x)]
        assert torch.equal(x[c], x0[:len(x)][c])
    fwd = torch.stack(seen[0::3])[:, ~clean]
    rate = (fwd == M).double().mean(0)
    expect = ((t + 1) / T).double()[:, None].expand(-1, L)[~clean]
    assert ((rate - expect).abs() <= 5 * (expect * (1 - expect) / 20).sqrt() + 1e-9).all()
    del model.logits

    def run(m):
        torch.manual_seed(4)
        _, loss, met = m(x0, t, clean=clean)
        grads = torch.autograd.grad(loss, list(m.net.parameters()), allow_unused=True)
        b = [m.batch_bound(x0[:n], 0.3, torch.Generator().manual_seed(5), clean=clean[:n]) for n in (len(x0), 1)]
        return [loss.detach()] + list(met.values()) + b, grads
    plain, g_plain = run(model)
    spy_logits(model, perturb_at(clean))
    moved, g_moved = run(model)
    assert all(torch.equal(a, b) for a, b in zip(plain, moved))
    assert all(torch.allclose(a, b, atol=1e-7) for a, b in zip(g_plain, g_moved) if a is not None)
    spy_logits(model, perturb_at(~clean))  # the check sees the answer's logits
    assert not torch.equal(run(model)[0][0], plain[0])


D3PM_OLD = [0.7934007048606873, 2.12078595161438, 1.1121201515197754, 1.8877635846535363, 1.4530173540115356]
GEN_OLD = [2.4584593772888184, 1.857631802558899, 0.14504648745059967, 0.00641205906867981, 0.6530048847198486,
           3.784204117374968, 1.4119226364030413, 0.9781358079674121]
X_OLD = torch.tensor([[0, 1, 2], [2, 2, 1], [1, 0, 0], [0, 2, 1]])


def d3pm_numbers(model, clean=None):
    torch.manual_seed(11)
    _, loss, met = model(X_OLD, clean=clean)
    out = [float(loss.detach()), float(met["bound"]), float(met["ce"])]
    with torch.no_grad():
        out += [float(model.batch_bound(X_OLD, 0.37, torch.Generator().manual_seed(12), clean=clean)),
                float(model.batch_bound(X_OLD[:1], 0.6, torch.Generator().manual_seed(13),
                                        clean=None if clean is None else clean[:1]))]
    return out, float(torch.rand(()))


def test_d3pm_clean_none_is_the_old_model():
    """clean=None gives the numbers of the unconditional implementation before clean existed (recorded from it,
    same seeds), and an all-False clean gives the same values from the same random stream."""
    model = d3pm(steps=4)
    none, after = d3pm_numbers(model)
    assert np.allclose(none, D3PM_OLD, rtol=1e-6, atol=0), (none, D3PM_OLD)
    no_prompt, after2 = d3pm_numbers(model, torch.zeros(X_OLD.shape, dtype=torch.bool))
    assert np.allclose(no_prompt, none, rtol=1e-6) and after == after2


def test_d3pm_one_row_with_long_prompt_and_mixed_rows():
    """One-row batches at every t, and rows whose answer is one token: finite values, and a row's value does not
    depend on the other rows' prompts (same draws for the rows: the same generator state)."""
    model = d3pm()
    x0 = torch.tensor([[0, 1, 2], [2, 0, 1]])
    with torch.no_grad():
        for off in (0.0, 0.4, 0.9):
            for clean in ([[True, True, False]], [[False, False, False]]):
                v = model.batch_bound(x0[:1], off, torch.Generator().manual_seed(0), clean=torch.tensor(clean))
                assert math.isfinite(float(v)) and float(v) >= 0
        a = model.batch_bound(x0, 0.5, torch.Generator().manual_seed(1), clean=torch.tensor([[1, 1, 0], [1, 0, 0]]) > 0)
        b = model.batch_bound(x0, 0.5, torch.Generator().manual_seed(1), clean=torch.tensor([[1, 1, 0], [0, 0, 0]]) > 0)
    assert float(a) != float(b)


# ==== GenMD4 ====================================================================================================
from test_genmd4 import W, edges_from, gauss_legendre, make  # noqa: E402

# token 0 occurs only in prompts; prompts of 0, 1 and 2 tokens
ROWS_G = [((0, 1, 2), (True, False, False)),
          ((0, 2, 1), (True, True, False)),
          ((1, 2, 2), (False, False, False)),
          ((0, 2, 2), (True, False, False))]
X0_G = torch.tensor([r[0] for r in ROWS_G])
CLEAN_G = torch.tensor([r[1] for r in ROWS_G])


@torch.no_grad()
def genmd4_tables(model, t, noise_prompt=False):
    """Per row: (x0, scored (L,) bool, patterns (P, L) bool over the noised positions, mu (N, P, L, V) float64 =
    p_theta(x_0^l | x_t) for x_0 masked by each pattern at each time t[n])."""
    out = []
    for x0, clean in ROWS_G:
        noised = [l for l in range(L) if noise_prompt or not clean[l]]
        pats = []
        for bits in itertools.product((False, True), repeat=len(noised)):
            p = [False] * L
            for l, b in zip(noised, bits):
                p[l] = b
            pats.append(p)
        pats = np.array(pats)
        xt = torch.where(torch.tensor(pats), M, torch.tensor(x0)[None])
        P, N = len(pats), len(t)
        logits = model.logits(xt.repeat(N, 1), torch.tensor(t).repeat_interleave(P))
        mu = logits[..., :V].double().softmax(-1).view(N, P, L, V).numpy()
        out.append((np.array(x0), ~np.array(clean), pats, mu))
    return out


def genmd4_objective(w, tables, t, gw, prob_w=None):
    """mean over rows of int E_{x_t}[sum_{masked l in A} f_l(t)] dt / |A| (quadrature nodes t, weights gw);
    prob_w: the masks' exponents if not w (the pathwise gradient)."""
    pw = w if prob_w is None else prob_w
    total = 0.0
    for x0, scored, pats, mu in tables:
        m = np.asarray(t)[:, None] ** pw[x0][None]                                     # (N, L)
        prob = np.where(pats[None], m[:, None], 1 - m[:, None])                        # (N, P, L)
        prob = np.where(pats.any(0)[None, None], prob, 1.0).prod(-1)  # over the noised positions only
        nll = -np.log(np.take_along_axis(mu, x0[None, None, :, None], -1)[..., 0])     # (N, P, L)
        f = (w[x0] * nll + mu @ w - w[x0]) * (pats & scored)[None] / np.asarray(t)[:, None, None]
        total += float(((prob * f.sum(-1)).sum(-1) * gw).sum()) / scored.sum()
    return total / len(tables)


def pattern_check(tables):
    for x0, scored, pats, mu in tables:  # the patterns cover exactly the noised positions, all combinations
        assert len(pats) == 2 ** pats.any(0).sum()


@pytest.fixture(scope="module")
def gen_full():
    model = make()
    t, gw = gauss_legendre(edges_from(0.0))
    tables = genmd4_tables(model, t)
    pattern_check(tables)
    exact = genmd4_objective(W, tables, t, gw)
    noised = genmd4_objective(W, genmd4_tables(model, t, noise_prompt=True), t, gw)
    return model, exact, noised


def test_genmd4_oracle_quadrature_has_converged():
    """The conditional oracle's quadrature agrees with a coarser rule (to 1e-5 nats), and the prompt matters:
    the prompt-noised value differs."""
    model = make()
    t, gw = gauss_legendre(edges_from(0.0))
    t2, gw2 = gauss_legendre(edges_from(0.0, panels=10), order=6)
    a = genmd4_objective(W, genmd4_tables(model, t), t, gw)
    b = genmd4_objective(W, genmd4_tables(model, t2), t2, gw2)
    assert abs(a - b) < 1e-5 and a > 0
    assert abs(genmd4_objective(W, genmd4_tables(model, t, noise_prompt=True), t, gw) - a) > 1e-3


@pytest.mark.parametrize("copies,n", [(25, 200), (None, 3000)])
def test_genmd4_batch_bound_is_the_conditional_nelbo(gen_full, copies, n):
    """The mean of batch_bound(clean=...) (rows in random order, random offsets; copies=None: one-row batches of a
    random row) is the mean over rows of NELBO(A | P) / |A|; the batched estimate rejects the prompt masked by its
    schedule too."""
    model, exact, noised = gen_full
    g = torch.Generator().manual_seed(7)

    def one(_):
        if copies is None:
            r = int(torch.randint(len(ROWS_G), (), generator=g))
            x0, clean = X0_G[r:r + 1], CLEAN_G[r:r + 1]
        else:
            perm = torch.randperm(len(ROWS_G) * copies, generator=g)
            x0, clean = X0_G.repeat(copies, 1)[perm], CLEAN_G.repeat(copies, 1)[perm]
        with torch.no_grad():
            value = model.batch_bound(x0, float(torch.rand((), generator=g)), g, clean=clean)
        assert value.dtype == torch.float64 and value.dim() == 0
        return value
    mean, se = estimates(one, n)
    wrong = {"prompt noised": noised} if copies else {}  # one-row batches (u = offset): too noisy for the power check
    assert_unbiased(mean, se, exact, wrong, "GenMD4 conditional batch_bound")


@pytest.fixture(scope="module")
def gen_train():
    model = make(t_eps=0.2)
    t, gw = gauss_legendre(edges_from(0.2, panels=16))
    return model, t, gw, genmd4_tables(model, t)


def test_genmd4_forward_loss_is_the_conditional_nelbo_on_t_eps_1(gen_train):
    """E[loss] = mean over rows of int_{t_eps}^1 E[sum_{masked l in A} f_l] dt / ((1 - t_eps) |A|); the value of
    the loss is metrics["bound"]. Rejects the prompt masked too."""
    model, t, gw, tables = gen_train
    exact = genmd4_objective(W, tables, t, gw) / 0.8
    noised = genmd4_objective(W, genmd4_tables(model, t, noise_prompt=True), t, gw) / 0.8
    torch.manual_seed(8)
    x0, clean = X0_G.repeat(30, 1), CLEAN_G.repeat(30, 1)

    def one(_):
        with torch.no_grad():
            _, loss, met = model(x0, clean=clean)
        assert torch.equal(loss, met["bound"])
        return loss
    mean, se = estimates(one, 150)
    assert_unbiased(mean, se, exact, {"prompt noised": noised}, "GenMD4 conditional forward")


def test_genmd4_conditional_gradient_is_the_true_gradient(gen_train):
    """The mean of d loss / d w_hat (pathwise + leave-one-out REINFORCE over the answer's masks) is the gradient
    of the exact conditional objective (central differences), per component within 4 SE; the pathwise part
    alone is rejected."""
    model, t, gw, tables = gen_train
    w_hat = model.w_hat.detach().double().numpy()

    def J(wh, pathwise=False):
        return genmd4_objective(np.log1p(np.exp(wh)), tables, t, gw, prob_w=W if pathwise else None) / 0.8
    h = 1e-5
    true, path = np.zeros(V), np.zeros(V)
    for v in range(V):
        e = np.eye(V)[v] * h
        true[v] = (J(w_hat + e) - J(w_hat - e)) / (2 * h)
        path[v] = (J(w_hat + e, True) - J(w_hat - e, True)) / (2 * h)
    for p in model.net.parameters():
        p.requires_grad_(False)
    torch.manual_seed(9)
    x0, clean = X0_G.repeat(40, 1), CLEAN_G.repeat(40, 1)
    vals = np.array([torch.autograd.grad(model(x0, clean=clean)[1], model.w_hat)[0].double().numpy()
                     for _ in range(300)])
    for p in model.net.parameters():
        p.requires_grad_(True)
    mean, se = vals.mean(0), vals.std(0, ddof=1) / math.sqrt(len(vals))
    assert (np.abs(mean - true) < 4 * se).all(), f"gradient {mean} vs exact {true} (se {se})"
    assert (np.abs(path - true) / se).max() > 8, f"cannot tell the pathwise gradient {path} from {true} (se {se})"


def test_genmd4_prompt_only_token_gets_no_score_gradient():
    """Token 0 occurs only in the prompts. With its logit pushed to -1e4 (mu(0) = 0 exactly, so the pathwise
    route through sum_v w_v mu(v) is closed) d loss / d w_hat[0] is exactly 0: the prompt's masks are not drawn
    and carry no score. Its pathwise gradient with the logit left alone is not 0 (the check is not vacuous) and
    the other tokens' gradients are nonzero."""
    model = make()
    x0, clean = X0_G.repeat(10, 1), CLEAN_G.repeat(10, 1)
    torch.manual_seed(10)
    free = torch.autograd.grad(model(x0, clean=clean)[1], model.w_hat)[0]
    assert free[0] != 0
    orig = model.logits

    def closed(x, tt):
        out = orig(x, tt).clone()
        out[..., 0] = -1e4
        return out
    model.logits = closed
    for seed in range(5):
        torch.manual_seed(seed)
        grad = torch.autograd.grad(model(x0, clean=clean)[1], model.w_hat)[0]
        assert grad[0] == 0 and (grad[1:] != 0).all(), grad


def test_genmd4_prompt_never_masked_and_never_scored():
    """Many forward / batch_bound (continuous and T = 3) calls: the network always sees the prompt, and the
    answer positions are masked at rate t^{w_x} in forward; logits perturbed at the prompt leave loss, metrics,
    bounds and the gradients (w_hat and network) unchanged, same seed."""
    model = make()
    x0, clean = X0_G.repeat(50, 1), CLEAN_G.repeat(50, 1)
    seen = spy_logits(model)
    t = torch.rand(len(x0), generator=torch.Generator().manual_seed(11), dtype=torch.float64) * 0.8 + 0.1
    torch.manual_seed(12)
    with torch.no_grad():
        for k in range(20):
            model(x0, t, clean=clean)
            model.batch_bound(x0, k / 20, torch.Generator().manual_seed(k), clean=clean)
            model.batch_bound(x0, k / 20, torch.Generator().manual_seed(k), T=3, clean=clean)
            model.batch_bound(x0[:1], k / 20, torch.Generator().manual_seed(k), clean=clean[:1])
    for x in seen:
        c = clean.repeat(2, 1)[:len(x)]
        assert torch.equal(x[c], x0.repeat(2, 1)[:len(x)][c])
    fwd = torch.stack([s[:len(x0)] for s in seen[0::4]])  # forward's first draws
    rate = (fwd == M).double().mean(0)[~clean]
    expect = (t[:, None] ** torch.tensor(W)[x0])[~clean]
    assert ((rate - expect).abs() <= 5 * (expect * (1 - expect) / 20).sqrt() + 1e-9).all()
    del model.logits

    def run(m):
        torch.manual_seed(13)
        _, loss, met = m(x0, clean=clean)
        grads = torch.autograd.grad(loss, [m.w_hat] + list(m.net.parameters()), allow_unused=True)
        with torch.no_grad():
            b = [m.batch_bound(x0[:n], 0.3, torch.Generator().manual_seed(14), T=T_, clean=clean[:n])
                 for n in (len(x0), 1) for T_ in (None, 3)]
        return [loss.detach()] + list(met.values()) + b, grads
    plain, g_plain = run(model)
    spy_logits(model, perturb_at(clean.repeat(2, 1)))
    moved, g_moved = run(model)
    assert all(torch.equal(a, b) for a, b in zip(plain, moved))
    assert all(torch.allclose(a, b, atol=1e-7) for a, b in zip(g_plain, g_moved) if a is not None)
    spy_logits(model, perturb_at(~clean.repeat(2, 1)))
    assert not torch.equal(run(model)[0][0], plain[0])


def gen_old_model():
    torch.manual_seed(0)
    model = randomize_weights(GenMD4(V, 16, 2, 1, 8, 0.0, t_eps=0.2), 6).eval()
    with torch.no_grad():
        model.w_hat.copy_(torch.tensor([-0.5, 0.3, 1.2]))
    return model


def gen_numbers(model, clean=None):
    torch.manual_seed(14)
    _, loss, met = model(X_OLD, clean=clean)
    out = [float(loss.detach()), float(met["ce"])] + torch.autograd.grad(loss, model.w_hat)[0].tolist()
    c1 = None if clean is None else clean[:1]
    with torch.no_grad():
        out += [float(model.batch_bound(X_OLD, 0.37, torch.Generator().manual_seed(15), clean=clean)),
                float(model.batch_bound(X_OLD[:1], 0.6, torch.Generator().manual_seed(16), clean=c1)),
                float(model.batch_bound(X_OLD, 0.37, torch.Generator().manual_seed(17), T=3, clean=clean))]
    return out, float(torch.rand(()))


def test_genmd4_clean_none_is_the_old_model():
    """clean=None gives the numbers recorded from the implementation before clean existed (loss, ce, the w_hat
    gradient, batch_bound continuous / one row / T = 3); an all-False clean the same from the same random stream."""
    model = gen_old_model()
    none, after = gen_numbers(model)
    assert np.allclose(none, GEN_OLD, rtol=1e-6, atol=0), (none, GEN_OLD)
    no_prompt, after2 = gen_numbers(model, torch.zeros(X_OLD.shape, dtype=torch.bool))
    assert np.allclose(no_prompt, none, rtol=1e-5, atol=1e-7) and after == after2


def genmd4_n_step(model, N, w, noise_prompt=False):
    """The conditional N-step bound: mean over rows of sum_j E_{x_{t_j}}[sum_{masked l in A} KL_j] / |A|, each
    step's true and model distributions over the V + 1 outcomes (v, or still masked) written out."""
    total = 0.0
    for j in range(1, N + 1):
        t, r = j / N, (j - 1) / j
        for x0, scored, pats, mu in genmd4_tables(model, [t], noise_prompt):
            mu = mu[0]                                                                   # (P, L, V)
            model_p = np.concatenate([mu * (1 - r ** w), (mu * r ** w).sum(-1, keepdims=True)], -1)
            true_p = np.zeros_like(model_p)
            for l, x in enumerate(x0):
                true_p[:, l, x], true_p[:, l, V] = 1 - r ** w[x], r ** w[x]
            with np.errstate(divide="ignore", invalid="ignore"):
                kl = np.where(true_p > 0, true_p * np.log(true_p / model_p), 0.0).sum(-1)   # (P, L)
            m = t ** w[x0]
            prob = np.where(pats.any(0)[None], np.where(pats, m, 1 - m), 1.0).prod(-1)   # (P,)
            total += float((prob * (kl * (pats & scored)).sum(-1)).sum()) / scored.sum() / len(ROWS_G)
    return total


def test_genmd4_batch_bound_n_steps_is_the_conditional_n_step_bound(gen_full):
    """T = 3: the mean of batch_bound(T=3, clean=...) is the conditional 3-step bound; rejects the prompt noised."""
    model = gen_full[0]
    exact, noised = genmd4_n_step(model, 3, W), genmd4_n_step(model, 3, W, noise_prompt=True)
    g = torch.Generator().manual_seed(17)

    def one(_):
        perm = torch.randperm(len(ROWS_G) * 15, generator=g)
        with torch.no_grad():
            return model.batch_bound(X0_G.repeat(15, 1)[perm], float(torch.rand((), generator=g)), g, T=3,
                                     clean=CLEAN_G.repeat(15, 1)[perm])
    mean, se = estimates(one, 200)
    assert_unbiased(mean, se, exact, {"prompt noised": noised}, "GenMD4 conditional 3-step bound")
