"""
GIDD (gidd.py) against oracles built here from the definitions alone, on V = 3 tokens plus the mask and L <= 3:

    the process: marginals q_t(. | x) and the Markov transitions Q_t|s as (V + 1)-square matrices (numpy), written
                 from the formulas of the paper (c_t, C_t, alpha_t, beta_t pi_t), marginal-consistent
    the ELBO:    the closed-form integrand (elbo_terms, enumerated over every z_t) = the limit h -> 0 of
                 E KL(q(z_t-h | z_t, x) || p(z_t-h | z_t)) / h with those matrices (Richardson in h)
    N steps:     batch_bound(T=N) in expectation (every z_t enumerated, every step) = the N-step bound summed
                 from the matrices; conditional rows the same over the answer positions only
    p = 0:       the ELBO = MDLM's NELBO of the same network, by enumeration of the mask patterns
    sampler:     chi-square against the chain enumerated exactly with the matrices; a wrong chain rejected
    correction:  a fixed point stays, a planted unlikely token is replaced, the rule picks the likeliest change
A fake network (a table over the neighbour's and the own token, linear in t) stands in for the DiT.
"""
import itertools
import math

import numpy as np
import pytest
import torch

from conftest import assert_unbiased, chisquare_pvalue, estimates
from gidd import GIDD

pytestmark = pytest.mark.usefixtures("one_thread")
V = 3


# ---- the oracle: matrices from the paper's formulas ------------------------------------------------------------
def schedule(t, p):
    """(alpha_t, beta_t pi_t as a vector over the V + 1 states)."""
    p = max(p, math.exp(-20))
    c = 2 * p / (1 - p) * math.sqrt(t * (1 - t))
    return (1 - t) / (1 + c), np.array([c / (V * (1 + c))] * V + [t / (1 + c)])


def marginals(t, p):
    """M[x, z] = q_t(z | x), (V, V + 1)."""
    a, noise = schedule(t, p)
    return a * np.eye(V, V + 1) + noise


def transitions(s, t, p):
    """Q[z_s, z_t] = q(z_t | z_s) from s to t > s, (V + 1, V + 1)."""
    (a_s, noise_s), (a_t, noise_t) = schedule(s, p), schedule(t, p)
    return a_t / a_s * np.eye(V + 1) + (noise_t - a_t / a_s * noise_s)


def posterior(x_probs, z_t, s, t, p):
    """q(z_s | z_t, x) for x ~ x_probs (V,) as GIDD parametrises it: Q[:, z_t] * q_s(. | x_probs), normalised."""
    joint = transitions(s, t, p)[:, z_t] * (x_probs @ marginals(s, p))
    return joint / joint.sum()


def kl(q, p):
    m = q > 0
    return float((q[m] * np.log(q[m] / p[m])).sum())


class Fake:
    """logits[b, l] = A[l, z[b, l+1 mod L]] + B[l, z[b, l]] + t C[l] (mask column included, unused)."""

    def __init__(self, L, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.L = L
        self.A, self.B = (torch.randn(L, V + 1, V + 1, generator=g, dtype=torch.float64) for _ in range(2))
        self.C = torch.randn(L, V + 1, generator=g, dtype=torch.float64)

    def __call__(self, z, t):
        pos = torch.arange(self.L)
        return self.A[pos, z.roll(-1, 1)] + self.B[pos, z] + t.double()[:, None, None] * self.C

    def x_hat(self, z, t):
        """(L, V) p(x | z) of one sequence z (tuple) at network time t."""
        return self(torch.tensor([z]), torch.tensor([t], dtype=torch.float64))[0, :, :V].softmax(-1).numpy()


def gidd(p=0.2, **kw):
    model = GIDD(V, 8, 2, 1, 8, 0.0, p_uniform=p, **kw).eval()
    return model


def with_fake(model, fake):
    model.logits = lambda z, t: fake(z, t.clamp(model.t_eps, 1 - model.t_eps))
    return model


def states(L):
    return list(itertools.product(range(V + 1), repeat=L))


def prob_of(z, x, M, positions):
    return float(np.prod([M[x[l], z[l]] for l in positions]))


def step_bound(fake, x, s, t, p, eps, scored):
    """E_{z_t} sum over the scored positions of KL(q(z_s | z_t, x) || p(z_s | z_t)), the unscored ones held at x."""
    M, total = marginals(t, p), 0.0
    for z in states(len(x)):
        if any(z[l] != x[l] for l in range(len(x)) if l not in scored):
            continue
        w = prob_of(z, x, M, scored)
        if w == 0:
            continue
        x_hat = fake.x_hat(z, min(max(t, eps), 1 - eps))
        total += w * sum(kl(posterior(np.eye(V)[x[l]], z[l], s, t, p), posterior(x_hat[l], z[l], s, t, p))
                         for l in scored)
    return total


def closed_form(model, x, t, scored=None):
    """E_{z_t} sum over the scored positions of w_t (KL + IS), gidd.elbo_terms enumerated over z_t."""
    L = len(x)
    scored = list(range(L)) if scored is None else scored
    zs = [z for z in states(L) if all(z[l] == x[l] for l in range(L) if l not in scored)]
    z, x0 = torch.tensor(zs), torch.tensor([x] * len(zs))
    tt = torch.full((len(zs),), t, dtype=torch.float64)
    div, w, _ = model.elbo_terms(model.logits(z, tt).double(), z, x0, tt)
    M = marginals(t, model.p_uniform)
    pz = torch.tensor([prob_of(zz, x, M, scored) for zz in zs], dtype=torch.float64)
    return float((pz[:, None] * w * div)[:, scored].sum())


# ---- the process -------------------------------------------------------------------------------------------------
def test_the_oracle_process_is_a_marginal_consistent_markov_chain_with_the_uniform_share_peaking_at_p():
    for s, t in ((0.0, 0.3), (0.2, 0.7), (0.5, 1.0)):
        Q = transitions(s, t, 0.2)
        assert (Q >= 0).all() and np.allclose(Q.sum(1), 1) and np.allclose(marginals(s, 0.2) @ Q, marginals(t, 0.2))
    share = [schedule(t, 0.2)[1][:V].sum() for t in np.linspace(0.01, 0.99, 99)]
    assert np.argmax(share) == 49 and abs(max(share) - 0.2) < 1e-12
    assert np.allclose(marginals(1.0, 0.2), np.eye(V + 1)[V]) and np.allclose(marginals(0.0, 0.2), np.eye(V, V + 1))


def test_q_sample_draws_the_marginals_and_holds_the_prompt():
    model = gidd(0.3)
    n, t = 40_000, 0.4
    x0 = torch.tensor([[1, 2]]).expand(n, 2)
    clean = torch.tensor([[True, False]]).expand(n, 2)
    z = model.q_sample(x0, torch.full((n,), t, dtype=torch.float64), torch.Generator().manual_seed(0), clean)
    assert (z[:, 0] == 1).all()
    M = marginals(t, 0.3)[2]
    assert chisquare_pvalue(z[:, 1:], {(k,): M[k] for k in range(V + 1)}) > 1e-3


# ---- the ELBO ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("p", [0.0, 0.2])
def test_closed_form_integrand_is_the_limit_of_the_step_kls(p):
    """At each t, the closed form (enumerated over z_t, L = 2) = lim KL(step of h) / h from the matrices."""
    fake, x = Fake(2), (0, 2)
    model = with_fake(gidd(p), fake)
    for t in (0.02, 0.3, 0.5, 0.8, 0.97):
        h = min(t, 1 - t) / 200
        d1 = step_bound(fake, x, t - h, t, p, model.t_eps, [0, 1]) / h
        d2 = step_bound(fake, x, t - h / 2, t, p, model.t_eps, [0, 1]) / (h / 2)
        exact = closed_form(model, x, t)
        assert abs(2 * d2 - d1 - exact) < 2e-5 * exact, (t, exact, 2 * d2 - d1)


def test_n_step_bound_is_the_matrix_bound_in_expectation():
    """batch_bound(T=4) with every step j (offset) and every z_t (enumerated, weighted by q) = the 4-step bound of the
    matrices, sum_j E KL(q(z_s | z_t, x) || p(z_s | z_t)), per token."""
    T, fake, x = 4, Fake(2, seed=1), (2, 1)
    model = with_fake(gidd(0.2), fake)
    x0 = torch.tensor([x])
    exact = sum(step_bound(fake, x, (j - 1) / T, j / T, 0.2, model.t_eps, [0, 1]) for j in range(1, T + 1)) / 2
    total = 0.0
    for j in range(1, T + 1):
        M = marginals(j / T, 0.2)
        for z in states(2):
            if prob_of(z, x, M, [0, 1]) > 0:
                model.q_sample = lambda x0, t, g=None, clean=None, z=z: torch.tensor([z])
                total += prob_of(z, x, M, [0, 1]) * float(model.batch_bound(x0, (j - 0.5) / T, T=T)) / T
    assert abs(total - exact) < 1e-9 * exact


def test_conditional_bounds_score_the_answer_only_and_never_noise_the_prompt():
    """Two rows: prompt lengths 1 and 2 of L = 3. batch_bound(T=2) (row 0 at step 1, row 1 at step 2) and
    batch_bound(T=None) at a fixed offset, with every answer z_t enumerated (the prompt as q_sample left it) =
    the mean over rows of (the row's sum over its answer) / (its answer length), from the matrices."""
    fake, p = Fake(3, seed=2), 0.2
    model = with_fake(gidd(p), fake)
    x0 = torch.tensor([[1, 0, 2], [2, 2, 0]])
    clean = torch.tensor([[True, False, False], [True, True, False]])
    answers = [[1, 2], [2]]
    draw = model.q_sample

    def expectation(times, offset, T):
        M = [marginals(t, p) for t in times]
        total = 0.0
        for z0 in itertools.product(range(V + 1), repeat=2):
            for z1 in range(V + 1):
                w = prob_of((0,) + z0, x0[0].tolist(), M[0], [1, 2]) * M[1][0, z1]
                if w == 0:
                    continue

                def fixed(x, t, g=None, c=None, z0=z0, z1=z1):
                    z = draw(x, t, g, c)
                    z[0, 1:], z[1, 2] = torch.tensor(z0), z1
                    return z
                model.q_sample = fixed
                total += w * float(model.batch_bound(x0, offset, torch.Generator().manual_seed(0), T=T, clean=clean))
        model.q_sample = draw
        return total

    got = expectation([0.5, 1.0], 0.3, 2)
    exact = 2 * np.mean([step_bound(fake, x0[i].tolist(), (i + 0.0) / 2, (i + 1) / 2, p, model.t_eps, answers[i])
                         / len(answers[i]) for i in range(2)])
    assert abs(got - exact) < 1e-9 * exact
    v = (np.arange(2) + 0.3) / 2
    got = expectation(list(v ** 3), 0.3, None)
    exact = np.mean([3 * v[i] ** 2 * closed_form(model, x0[i].tolist(), v[i] ** 3, answers[i]) / len(answers[i])
                     for i in range(2)])
    assert abs(got - exact) < 1e-9 * exact


def elbo_by_quadrature(model, x, n=200, power=3):
    """int_0^1 of the closed form, t = v^power, Gauss-Legendre in v (power=3 with the weight 3 v^2 of t = v instead
    gives a plausibly wrong value)."""
    nodes, weights = np.polynomial.legendre.leggauss(n)
    v = (nodes + 1) / 2
    return sum(w / 2 * 3 * vi ** 2 * closed_form(model, x, vi ** power) for vi, w in zip(v, weights))


def test_continuous_estimate_is_unbiased_and_the_n_step_bounds_tend_to_it():
    """batch_bound (T = None, random offsets, L = 2) averages to the quadrature of the closed form; the matrix N-step
    bounds tend to it (error ~ 1/N: Richardson from N = 64 and 256)."""
    fake, x = Fake(2, seed=3), (1, 0)
    model = with_fake(gidd(0.2), fake)
    exact = elbo_by_quadrature(model, x) / 2
    x0 = torch.tensor([x] * 128)
    g = torch.Generator().manual_seed(1)
    mean, se = estimates(lambda i: float(model.batch_bound(x0, float(torch.rand((), generator=g)), g)), 400)
    wrong = {"15% off": 0.85 * exact, "the weight 3 v^2 at t = v": elbo_by_quadrature(model, x, power=1) / 2}
    assert_unbiased(mean, se, exact, wrong, "GIDD continuous ELBO")
    coarse, fine = (sum(step_bound(fake, x, (j - 1) / N, j / N, 0.2, model.t_eps, [0, 1]) for j in range(1, N + 1)) / 2
                    for N in (64, 256))
    assert abs(fine - exact) < abs(coarse - exact) / 3 and abs((4 * fine - coarse) / 3 - exact) < 3e-4 * exact


def test_p_uniform_zero_is_mdlm_nelbo_of_the_same_network():
    """p_uniform = 0: the GIDD ELBO (quadrature of the enumerated closed form) = MDLM's NELBO of the same network,
    sum over mask patterns S of sum_{l in S} -log x_hat_l(x masked at S) / (|S| C(L, |S|)), to ~1e-8."""
    fake = Fake(3, seed=4)
    fake.C.zero_()  # a network that ignores t (MDLM's)
    x, L = (2, 0, 1), 3
    model = with_fake(gidd(0.0), fake)
    nelbo = 0.0
    for k in range(1, L + 1):
        for S in itertools.combinations(range(L), k):
            z = tuple(V if l in S else x[l] for l in range(L))
            x_hat = fake.x_hat(z, 0.5)
            nelbo += sum(-math.log(x_hat[l, x[l]]) for l in S) / (k * math.comb(L, k))
    assert abs(elbo_by_quadrature(model, x, 60) - nelbo) < 1e-6 * nelbo


def test_forward_bound_is_the_elbo_and_the_loss_its_reweighting():
    """forward at a fixed t: metrics["bound"] = mean of w_t (KL + IS), the loss the dynamic weighting of the same
    terms (2 at a mask, 1 at a token != x, B/(V+1) e^(sigmoid(-t)/2) at x), clip and elbo likewise."""
    torch.manual_seed(0)
    x0 = torch.randint(V, (4, 6))
    t = torch.tensor([0.1, 0.4, 0.6, 0.9], dtype=torch.float64)
    for weighting in ("dynamic", "clip", "elbo"):
        model = with_fake(gidd(0.2, loss_weighting=weighting), Fake(6))
        captured = {}
        terms = model.elbo_terms

        def spy(logits, z_t, x, tt):
            out = terms(logits, z_t, x, tt)
            captured.update(div=out[0], w=out[1], z=z_t)
            return out
        model.elbo_terms = spy
        _, loss, metrics = model(x0, t)
        div, w, z = captured["div"], captured["w"], captured["z"]
        assert torch.allclose(metrics["bound"], (w * div).mean())
        if weighting == "dynamic":
            x_scale = model.B / (V + 1) * torch.exp(torch.sigmoid(-t) / 2)
            lw = torch.where(z == x0, x_scale[:, None], torch.where(z == V, 2.0, 1.0))
        else:
            lw = w if weighting == "elbo" else w.clamp(0, 2)
        assert torch.allclose(loss, (lw * div).mean())


def test_forward_with_a_prompt_never_noises_it_and_scores_per_answer_token():
    """clean rows: z_t = x0 at the prompt; bound and loss = mean over rows of (sum over the answer) / (its length)."""
    x0 = torch.randint(V, (3, 6), generator=torch.Generator().manual_seed(1))
    clean = torch.zeros((3, 6), dtype=torch.bool)
    clean[0, :2], clean[1, :5] = True, True
    t = torch.tensor([0.3, 0.6, 0.99], dtype=torch.float64)
    model = with_fake(gidd(0.4, loss_weighting="elbo"), Fake(6))
    captured = {}
    terms = model.elbo_terms

    def spy(logits, z_t, x, tt):
        out = terms(logits, z_t, x, tt)
        captured.update(values=out[0] * out[1], z=z_t)
        return out
    model.elbo_terms = spy
    for _ in range(20):
        _, loss, metrics = model(x0, t, clean)
        assert torch.equal(captured["z"][clean], x0[clean])
        values, n = captured["values"], (~clean).sum(1)
        per_row = torch.stack([values[i][~clean[i]].sum() / n[i] for i in range(3)])
        assert torch.allclose(metrics["bound"], per_row.mean()) and torch.allclose(loss, per_row.mean())


# ---- sampling ----------------------------------------------------------------------------------------------------
def exact_chain(fake, p, steps, eps, start, given=()):
    """The distribution of sample()'s output: the chain of p(z_s | z_t) from z_1 = start down t_j = j/steps."""
    dist = {start: 1.0}
    L = len(start)
    for j in range(steps, 0, -1):
        s, t, new = (j - 1) / steps, j / steps, {}
        for z, pz in dist.items():
            x_hat = fake.x_hat(z, min(max(t, eps), 1 - eps))
            per = [np.eye(V + 1)[z[l]] if l in given else posterior(x_hat[l], z[l], s, t, p) for l in range(L)]
            for zs in states(L):
                w = pz * np.prod([per[l][zs[l]] for l in range(L)])
                if w > 0:
                    new[zs] = new.get(zs, 0.0) + w
        dist = new
    return dist


def test_sampler_matches_the_exact_chain_and_rejects_a_wrong_one():
    fake, p, steps, n = Fake(3, seed=5), 0.3, 3, 6000
    model = with_fake(gidd(p), fake)
    x = torch.full((n, 3), V)
    x[:, 1] = 1  # a given token
    out, calls = model.sample(x, steps=steps, generator=torch.Generator().manual_seed(0))
    assert calls == steps and (out[:, 1] == 1).all() and (out < V).all()
    exact = exact_chain(fake, p, steps, model.t_eps, (V, 1, V), given=(1,))
    assert chisquare_pvalue(out, exact) > 1e-3
    wrong = exact_chain(fake, 0.0, steps, model.t_eps, (V, 1, V), given=(1,))  # the masked-only chain
    assert chisquare_pvalue(out, wrong) < 1e-6


def test_sampler_options_and_refusals():
    model = with_fake(gidd(0.2), Fake(4))
    x = torch.full((2, 4), V)
    g = torch.Generator().manual_seed(0)
    out, calls = model.sample(x, steps=5, generator=g, temperature=0.5, top_k=2, top_p=0.9, correction_steps=3)
    assert (out < V).all() and 5 < calls <= 8
    for bad in (dict(sampler="confidence"), dict(eta=0.1), dict(correction_steps=-1)):
        with pytest.raises(ValueError):
            model.sample(x, generator=g, **bad)


# ---- self-correction -----------------------------------------------------------------------------------------------
def knowing(target, margin=60.0):
    """A network sure of target (L,) in every row, whatever it reads."""
    def logits(z, t):
        return margin * torch.nn.functional.one_hot(target, V + 1).double().expand(len(z), -1, -1)
    return logits


def test_self_correction_fixed_point_and_planted_tokens():
    target = torch.tensor([[0, 1, 2, 0, 1]] * 2)
    generate = torch.ones_like(target, dtype=torch.bool)
    generate[:, 0] = False
    model = gidd(0.2)
    model.logits = knowing(target[0])
    z, calls = model.correct(target, generate, 10, 0.1)
    assert torch.equal(z, target) and calls == 1  # a fixed point: nothing to change, one call
    planted = target.clone()
    planted[0, 3], planted[1, 0] = 2, 2  # row 0: a generated position; row 1: a given one, never changed
    z, calls = model.correct(planted, generate, 10, 0.1)
    assert z[0].tolist() == target[0].tolist() and z[1, 0] == 2 and torch.equal(z[1, 1:], target[1, 1:])
    assert calls == 2


def test_self_correction_changes_the_likeliest_token_first_one_per_call():
    """Each call replaces, per row, the one position whose new draw != the current token is most probable."""
    target = torch.tensor([[0, 1, 2, 0]])
    sure = torch.nn.functional.one_hot(target, V + 1).double()
    sure = sure * torch.tensor([[9.0, 9.0, 1.5, 4.0]])[..., None]  # position 3 surer than position 2
    model = gidd(0.2)
    model.logits = lambda z, t: sure
    planted = torch.tensor([[0, 1, 0, 2]])
    seen = []
    z, calls = model.correct(planted, torch.ones_like(planted, dtype=torch.bool), 1, 0.0,
                             callback=lambda z, t: seen.append(z.clone()))
    assert calls == 1 and seen[0].tolist() == [[0, 1, 0, 0]] and torch.equal(z, seen[0])


def test_self_correction_stops_after_patience_without_progress():
    """A network that always wants another token (its argmax moves with the input) never reaches a fixed point: the
    row stops PATIENCE + 1 calls after its best agreement, with its last change undone."""
    from gidd import PATIENCE
    model = gidd(0.2)
    model.logits = lambda z, t: 30.0 * torch.nn.functional.one_hot((z + 1) % V, V + 1).double()
    z0 = torch.zeros((1, 3), dtype=torch.long)
    z, calls = model.correct(z0, torch.ones_like(z0, dtype=torch.bool), 500, 0.0)
    assert calls == PATIENCE + 2 and not torch.equal(z, z0)
