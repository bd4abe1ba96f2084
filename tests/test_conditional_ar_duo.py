"""
Independent-oracle tests of conditional generation (families.py's clean mask: True = the prompt, given, never noised,
never scored; the bound per scored token, row by row, then the mean over rows) in ar.AR and duo.Duo.

AR. The oracle is the chain rule the slow way (one network call per prefix, our own float64 softmax over the V token
columns) and, for prefix prompts, the conditional by enumeration: p(answer | prompt) = p(x) / sum_{y: y^C = x^C} p(y)
over all V^L sequences, with p(x) the product of the chain-rule factors.

Duo. On V = 3, L = 3 everything is enumerated: the noisy states z (27) with the prompt held at x0 (q(z | x) =
prod over unclean l of (a 1[z_l = x_l] + (1 - a)/V), and 1[z_l = x_l] at the clean l), the NELBO integrand written
out (xbar and xbar_theta built explicitly, the sum over j term by term) summed over the unclean positions, integrated
over t by Gauss-Legendre on geometric panels towards t = 0; the T-step bound by Bayes from the transition matrices,
the KL summed over the unclean positions. Each row's value is divided by its number of unclean positions and the mean
taken over the rows of the batch. The network is a random DiT plus a fixed pull towards the token at position 0
(CopyFirst) and the batch's sequences have x^0 = x^1, so that a noised prompt costs clearly more than the noise of
the estimates. Unbiasedness checks: the mean of many estimates within 4 standard errors of the
exact value, and the same band excludes the values of plausibly wrong implementations (8 standard errors).
"""
import itertools
import math

import numpy as np
import pytest
import torch

import duo
from ar import AR
from conftest import assert_unbiased, estimates, randomize_weights
from duo import Duo

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny tensors, 2 cores shared

V = 3


# ==== AR =====================================================================================================
def make_ar(seed=5):
    torch.manual_seed(0)
    return randomize_weights(AR(V, 16, 2, 1, 8, 0.0), seed).eval()


@pytest.fixture(scope="module")
def ar():
    return make_ar()


def all_seqs(L):
    return torch.tensor(list(itertools.product(range(V), repeat=L)))


@torch.no_grad()
def chain_rule(model, x):
    """log p(x^i | x^{<i}) (n, L) float64: net on [s, x^0, ..., x^{i-1}] alone (s = V, time 0), our softmax over V."""
    n, L = x.shape
    out = torch.zeros(n, L, dtype=torch.float64)
    for i in range(L):
        inp = torch.cat([torch.full((n, 1), V), x[:, :i]], dim=1)
        logp = model.net(inp, torch.zeros(n))[:, -1, :V].double().log_softmax(-1)
        out[:, i] = logp.gather(1, x[:, i:i + 1])[:, 0]
    return out


def ar_masks(n, L, g):
    """n random clean masks (L,): prefixes of every length 0..L-1 and arbitrary masks, each row with an unclean one."""
    rows = []
    while len(rows) < n:
        if len(rows) % 2:
            c = torch.arange(L) < int(torch.randint(0, L, (), generator=g))
        else:
            c = torch.rand(L, generator=g) < 0.5
        if not c.all():
            rows.append(c)
    return torch.stack(rows)


def test_ar_conditional_is_the_chain_rule_over_unclean_positions(ar):
    """forward's loss and bound and batch_bound (any offset) = the mean over rows of -(sum of the chain-rule factors at
    the row's unclean positions) / their number, for prefix and arbitrary masks mixed in one batch; a one-row batch
    gives that row's value. Power: the global mean over all unclean tokens (not per row) and the mean over all L
    positions differ from it."""
    L = 4
    x = all_seqs(L)
    clean = ar_masks(len(x), L, torch.Generator().manual_seed(0))
    logp = chain_rule(ar, x)
    scored = ~clean
    per_row = -(logp * scored).sum(1) / scored.sum(1)
    want = per_row.mean().item()
    with torch.no_grad():
        logits, loss, metrics = ar(x, clean=clean)
        bound = ar.batch_bound(x, 0.7, None, clean=clean)
    assert bound.dtype == torch.float64 and bound.dim() == 0
    assert bound.item() == pytest.approx(want, abs=2e-6)
    assert loss.item() == pytest.approx(want, abs=2e-5) and torch.equal(metrics["bound"], loss.detach())
    assert metrics["bpt"].item() == pytest.approx(want / math.log(2), abs=3e-5)
    for i in (0, 5, 40, 80):
        with torch.no_grad():
            assert ar.batch_bound(x[i:i + 1], 0.1, None, clean=clean[i:i + 1]).item() == pytest.approx(
                per_row[i].item(), abs=2e-6)
    assert abs(-(logp * scored).sum().item() / scored.sum().item() - want) > 1e-3  # global mean: not it
    assert abs(-logp.mean().item() - want) > 1e-3                                   # every position: not it


def test_ar_prefix_prompt_is_minus_log_p_answer_given_prompt(ar):
    """For prefix prompts of different lengths in one batch, batch_bound = mean over rows of -log p(answer | prompt) /
    len(answer) with p(answer | prompt) = p(x) / sum_{y: y starts with the prompt} p(y), by enumeration of all V^L
    sequences (the joint from the chain rule); the conditionals of every prompt sum to 1 over the answers."""
    L = 4
    x = all_seqs(L)
    logp_x = chain_rule(ar, x).sum(1)
    p_x = logp_x.exp()
    assert p_x.sum().item() == pytest.approx(1.0, abs=1e-9)
    k = torch.arange(len(x)) % L                                   # prompt lengths 0, 1, 2, 3 in one batch
    clean = torch.arange(L)[None, :] < k[:, None]
    cond = torch.empty(len(x), dtype=torch.float64)
    for r in range(len(x)):
        same = (x[:, :k[r]] == x[r, :k[r]]).all(1)
        cond[r] = logp_x[r] - p_x[same].sum().log()
        if r < 3 ** k[r]:  # once per prompt length: the conditional is normalised over the answers
            assert (p_x[same] / p_x[same].sum()).sum().item() == pytest.approx(1.0, abs=1e-12)
    want = (-cond / (L - k)).mean().item()
    with torch.no_grad():
        assert ar.batch_bound(x, 0.0, None, clean=clean).item() == pytest.approx(want, abs=2e-6)
        assert ar(x, clean=clean)[1].item() == pytest.approx(want, abs=2e-5)


def test_ar_network_output_at_clean_positions_is_never_used(ar):
    """A hook adds large random values to the network's output wherever the target is a clean position (the
    prediction OF a prompt token; the prompt is still input to later positions): forward's loss, batch_bound and
    the gradient of everything else are unchanged and the loss's gradient there is 0. Power: the same perturbation at
    one unclean position changes the loss."""
    L = 5
    g = torch.Generator().manual_seed(1)
    x = torch.randint(V, (32, L), generator=g)
    clean = ar_masks(32, L, g)
    with torch.no_grad():
        base_loss = ar(x, clean=clean)[1]
        base_bound = ar.batch_bound(x, 0.0, None, clean=clean)
    kept = {}

    def perturb(where):
        def hook(module, args, out):
            out = out + 50 * torch.randn(out.shape, generator=g) * where[..., None]
            if out.requires_grad:
                out.retain_grad()
                kept["out"] = out
            return out
        return ar.net.register_forward_hook(hook)
    handle = perturb(clean)
    try:
        loss = ar(x, clean=clean)[1]
        loss.backward()
        with torch.no_grad():
            bound = ar.batch_bound(x, 0.0, None, clean=clean)
    finally:
        handle.remove()
        ar.zero_grad()
    assert loss.item() == pytest.approx(base_loss.item(), abs=1e-6)
    assert bound.item() == pytest.approx(base_bound.item(), abs=1e-9)
    grad = kept["out"].grad
    assert (grad[clean] == 0).all() and (grad[~clean].abs().sum(-1) > 0).all()
    one = torch.zeros_like(clean)
    one[0, int((~clean[0]).nonzero()[0])] = True                  # one unclean position of row 0
    handle = perturb(one)
    try:
        with torch.no_grad():
            assert abs(ar(x, clean=clean)[1].item() - base_loss.item()) > 1e-3
    finally:
        handle.remove()


def test_ar_first_given_with_clean_is_clean_or_first_position(ar):
    """first_given=True with clean = clean | position 0; with a prompt that holds position 0 it changes nothing; a row
    whose only unclean position is 0 is then a ValueError, as is a row with everything clean, or a mask of the wrong
    shape or dtype."""
    L = 4
    x = all_seqs(L)
    clean = ar_masks(len(x), L, torch.Generator().manual_seed(2))
    clean[:, 3] = False                                          # every row keeps an unclean position after 0
    first = clean.clone()
    first[:, 0] = True
    with torch.no_grad():
        a = ar.batch_bound(x, 0.0, None, first_given=True, clean=clean)
        b = ar.batch_bound(x, 0.0, None, clean=first)
        c = ar.batch_bound(x, 0.0, None, first_given=True, clean=first)
        d = ar.batch_bound(x, 0.0, None, clean=clean)
    assert a.item() == b.item() == c.item() and abs(a.item() - d.item()) > 1e-3
    only_first = torch.ones(1, L, dtype=torch.bool)
    only_first[0, 0] = False
    with pytest.raises(ValueError, match="no position left"):
        ar.batch_bound(x[:1], 0.0, None, first_given=True, clean=only_first)
    with pytest.raises(ValueError, match="nothing to score"):
        ar.batch_bound(x[:2], 0.0, None, clean=torch.tensor([[True] * L, [False] * L]))
    for bad in (clean[:, :3], clean.long()):
        with pytest.raises(ValueError, match="bool tensor"):
            ar.batch_bound(x, 0.0, None, clean=bad)


def test_ar_no_prompt_is_the_unconditional_nll(ar):
    """clean all False: the unconditional exact NLL (equal row lengths: the mean of row means is the mean)."""
    x = all_seqs(4)
    none = torch.zeros(x.shape, dtype=torch.bool)
    with torch.no_grad():
        assert ar.batch_bound(x, 0.0, None, clean=none).item() == pytest.approx(ar.batch_bound(x).item(), abs=1e-12)
        assert ar(x, clean=none)[1].item() == pytest.approx(ar(x)[1].item(), abs=1e-6)


# ==== Duo ====================================================================================================
L3 = 3
SEQS = list(itertools.product(range(V), repeat=L3))                      # the 27 clean sequences = the 27 states
X = np.array(SEQS)                                                        # (27, L3)
MASKS = np.array([[1, 0, 0], [1, 1, 0], [0, 1, 0], [0, 0, 0]], dtype=bool)  # prompts of length 1, 2, an infix, none
# the batch's sequences: x^0 = x^1. Over all 27 (x uniform) a noised prompt would go unseen: z^C of a uniform x^C is
# uniform whether noised or not, and the integrand at U depends on x only through x^U. Here x^C and x^U are dependent.
ROWS = np.array([i for i, x in enumerate(SEQS) if x[0] == x[1]])
GMIN, GMAX = -2.68, 1.59


class CopyFirst(Duo):
    """A Duo whose logits add COPY onehot(z_t^0) (the soft input's first vector) at every position to the random
    network's: its predictions lean on position 0, which the batch's sequences (x^0 = x^1) reward, so that noising the
    prompt costs clearly more than the standard errors (a random network barely reads its context)."""
    COPY = 8.0

    def logits(self, z_t, t):
        first = z_t[:, 0] if z_t.dim() == 3 else torch.nn.functional.one_hot(z_t[:, 0], self.vocab_size).float()
        return super().logits(z_t, t) + self.COPY * first[:, None, :]


def make_duo(seed=3, **kw):
    """A fixed random CopyFirst whose time embedding keeps only the frequencies 1000 f <= 20 (smooth in t). Eval mode."""
    torch.manual_seed(0)
    model = randomize_weights(CopyFirst(V, 16, 2, 1, 8, 0.0, **kw), seed)
    with torch.no_grad():
        first = model.net.c_embed.mlp[0].weight
        fast = 1000 * 10 ** (-4 * torch.arange(128) / 128) > 20
        first[:, torch.cat([fast, fast])] = 0
    return model.eval()


@pytest.fixture(scope="module")
def duo_model():
    return make_duo()


@torch.no_grad()
def x_theta_table(model, times):
    """xth[n, z, l, v] = x_theta(SEQS[z])[l, v] at network time times[n], our float64 softmax of model.logits."""
    times = np.atleast_1d(np.asarray(times, dtype=np.float64))
    z = torch.tensor(SEQS).repeat(len(times), 1)
    lg = model.logits(z, torch.tensor(times).repeat_interleave(len(SEQS))).double()
    p = torch.exp(lg - lg.max(-1, keepdim=True).values)
    return (p / p.sum(-1, keepdim=True)).numpy().reshape(len(times), len(SEQS), L3, V)


def plain_integrand(x_theta, z, x, t):
    """UDLM's integrand at alpha = 1 - t, alpha' = -1, written out: xbar = V a onehot(x) + 1 - a, xbar_theta = V a
    x_theta + 1 - a, a'/(V a) [V/xbar[z] - V/xbar_theta[z] - sum_j xbar_j/xbar[z] log(xbar_theta[z] xbar_j /
    (xbar_theta[j] xbar[z]))]. x_theta (..., V); z, x, t broadcastable to (...)."""
    a = 1 - t
    xbar = V * a[..., None] * np.eye(V)[x] + t[..., None]
    xbar_theta = V * a[..., None] * x_theta + t[..., None]
    xbar_z = np.take_along_axis(xbar, z[..., None], -1)[..., 0]
    xbar_theta_z = np.take_along_axis(xbar_theta, z[..., None], -1)[..., 0]
    total = 0.0
    for j in range(V):
        total = total + xbar[..., j] / xbar_z * np.log(xbar_theta_z * xbar[..., j] / (xbar_theta[..., j] * xbar_z))
    return -1.0 / (V * a) * (V / xbar_z - V / xbar_theta_z - total)


def q_states(t, clean):
    """q(z | x)[n, x, z] = prod_l (clean l: 1[z_l = x_l]; else (1 - t) 1[z_l = x_l] + t/V), (N, 27, 27)."""
    t = np.asarray(t, dtype=np.float64)[:, None, None, None]
    same = X[None, :, None, :] == X[None, None, :, :]
    noisy = np.where(same, 1 - t + t / V, t / V)
    return np.where(clean, same, noisy).prod(-1)


def row_values(per_pos, t, clean, score):
    """E_z[sum_{l in score} per_pos[n, x, z, l]] / |score| under q_states(t, clean): (N, 27)."""
    return (q_states(t, clean) * (per_pos * score).sum(-1)).sum(-1) / score.sum()


def expected_integrand(model, t, clean, variant="right", net_time=None):
    """(N, 27): for each clean sequence x, the expected conditional integrand per scored token at times t, the prompt
    held at x (variant "prompt noised": noised like the rest; "prompt scored": all L positions scored)."""
    t = np.atleast_1d(np.asarray(t, dtype=np.float64))
    xth = x_theta_table(model, t if net_time is None else net_time)
    n = len(t)
    f = plain_integrand(xth[:, None], np.broadcast_to(X[None, None], (n, 27, 27, L3)),
                        np.broadcast_to(X[None, :, None], (n, 27, 27, L3)),
                        np.broadcast_to(t[:, None, None, None], (n, 27, 27, L3)))
    held = np.zeros(L3, bool) if variant == "prompt noised" else clean
    score = np.ones(L3, bool) if variant == "prompt scored" else ~clean
    return row_values(f, t, held, score)


def gauss_legendre(edges, order=8):
    x, w = np.polynomial.legendre.leggauss(order)
    edges = np.asarray(edges, dtype=np.float64)
    mid, half = (edges[1:] + edges[:-1]) / 2, (edges[1:] - edges[:-1]) / 2
    return (mid[:, None] + half[:, None] * x).ravel(), (half[:, None] * w).ravel()


def nelbo_rows(model, variant="right", panels=20, order=8, lo=-14):
    """Oracle A per (mask, sequence in ROWS): int_0^1 of the expected conditional integrand per scored token,
    Gauss-Legendre on geometric panels towards t = 0 (the integrand grows like log(1/t) there). (4, 9)."""
    edges = np.concatenate([[0.0], np.logspace(lo, -1, 2 * (-lo - 1) + 1), np.linspace(0.1, 1, panels + 1)[1:]])
    t, w = gauss_legendre(edges, order)
    return np.stack([w @ expected_integrand(model, t, c, variant) for c in MASKS])[:, ROWS]


def bayes_step(x, z_t, a_s, a_t):
    """q(z_s = k | z_t, x) for x a probability vector (..., V): column z_t of Q_{t|s} = (a_t/a_s) I + (1 - a_t/a_s)
    11^T/V times a_s x + (1 - a_s)/V, normalised."""
    r = np.asarray(a_t / a_s, dtype=np.float64)[..., None]
    column = r * np.eye(V)[z_t] + (1 - r) / V
    joint = column * (np.asarray(a_s)[..., None] * x + (1 - np.asarray(a_s)[..., None]) / V)
    return joint / joint.sum(-1, keepdims=True)


def n_step_rows(model, N, variant="right"):
    """Oracle B per (mask, sequence): sum over the N steps of E_z[sum_{l unclean} KL(q(z_s | z_t, x) || p(z_s | z_t))]
    / |U|, t = j/N, s = t - 1/N, the prompt held at x in z_t (variant "prompt noised": noised). (4, 9)"""
    j = np.arange(1, N + 1)
    t, s = j / N, (j - 1) / N
    a_t, a_s = (1 - t)[:, None, None, None], (1 - s)[:, None, None, None]
    shape = (N, 27, 27, L3)
    xth = np.broadcast_to(x_theta_table(model, t)[:, None], shape + (V,))
    z = np.broadcast_to(X[None, None], shape)
    q = bayes_step(np.broadcast_to(np.eye(V)[X][None, :, None], shape + (V,)), z, a_s, a_t)
    p = bayes_step(xth, z, a_s, a_t)
    with np.errstate(divide="ignore", invalid="ignore"):
        kl = np.where(q > 0, q * np.log(q / p), 0.0).sum(-1)          # (N, x, z, L)
    out = []
    for c in MASKS:
        held = np.zeros(L3, bool) if variant == "prompt noised" else c
        out.append(row_values(kl, t, held, ~c).sum(0))
    return np.stack(out)[:, ROWS]



def pair_batch(copies):
    """Every (mask, sequence in ROWS) pair, `copies` times: x0 (4 * 9 * copies, L3) and clean."""
    x0 = torch.tensor(X[ROWS]).repeat(len(MASKS) * copies, 1)
    clean = torch.tensor(MASKS).repeat_interleave(len(ROWS), 0).repeat(copies, 1)
    return x0, clean


def global_mean(rows):
    """The wrong normalisation: one mean over all scored tokens of the batch instead of the mean of row means."""
    counts = (~MASKS).sum(1)[:, None]
    return float((rows * counts).sum() / (counts.sum() * rows.shape[1]))


def test_duo_batch_bound_is_the_conditional_nelbo(duo_model):
    """The mean of batch_bound(T=None, clean) over shuffled batches of every (mask, sequence) pair, fresh offsets, is
    oracle A: the mean over rows of the conditional NELBO per unclean token, prompts of lengths 0, 1, 2 and an infix in
    one batch. The band excludes: the prompt noised, the prompt scored, and one global mean over the scored tokens."""
    model = duo_model
    exact = nelbo_rows(model)
    assert abs(nelbo_rows(model, panels=30, order=10, lo=-16).mean() - exact.mean()) < 1e-8  # converged
    x0, clean = pair_batch(12)
    g = torch.Generator().manual_seed(1)

    def one(_):
        perm = torch.randperm(len(x0), generator=g)
        with torch.no_grad():
            v = model.batch_bound(x0[perm], float(torch.rand((), generator=g)), g, clean=clean[perm])
        assert v.dtype == torch.float64 and v.dim() == 0
        return v
    mean, se = estimates(one, 400)
    wrong = {"prompt noised": nelbo_rows(model, "prompt noised").mean(),
             "prompt scored": nelbo_rows(model, "prompt scored").mean(), "global mean": global_mean(exact)}
    print({k: round(v, 5) for k, v in wrong.items()}, exact.mean(), mean, se)
    assert_unbiased(mean, se, float(exact.mean()), wrong, "conditional NELBO")


@pytest.mark.parametrize("N", [3, 8])
def test_duo_batch_bound_n_steps_conditional(duo_model, N):
    """The mean of batch_bound(T=N, clean) is oracle B (the KLs of the unclean positions, the prompt held); the band
    excludes the prompt noised and the global mean."""
    model = duo_model
    exact = n_step_rows(model, N)
    x0, clean = pair_batch(20)
    g = torch.Generator().manual_seed(10 + N)

    def one(_):
        perm = torch.randperm(len(x0), generator=g)
        with torch.no_grad():
            return model.batch_bound(x0[perm], float(torch.rand((), generator=g)), g, T=N, clean=clean[perm])
    mean, se = estimates(one, 300)
    wrong = {"prompt noised": n_step_rows(model, N, "prompt noised").mean(), "global mean": global_mean(exact)}
    print({k: round(v, 5) for k, v in wrong.items()}, exact.mean(), mean, se)
    assert_unbiased(mean, se, float(exact.mean()), wrong, f"conditional {N}-step bound")


def prompt_held(x0, z, clean):
    """The check on latents: z = x0 at every clean position."""
    return bool((z[clean] == x0[clean]).all())


def test_duo_q_sample_never_noises_the_prompt():
    """q_sample(clean) on 400 x 40 tokens at t = 0.8: z = x0 at every clean position; the unclean ones are replaced at
    rate t (a token differs w.p. t (V - 1)/V, within 4 SE) and are exactly those of clean=None from the same seed (the
    same draws). Power: the check on the prompt rejects clean=None's latents (the prompt noised)."""
    m = Duo(V, 16, 2, 1, 8, 0.0)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randint(V, (400, 40), generator=g)
    clean = torch.arange(40)[None, :] < torch.randint(1, 40, (400, 1), generator=g)  # prompts of many lengths
    t = torch.full((400,), 0.8, dtype=torch.float64)
    z = m.q_sample(x0, t, torch.Generator().manual_seed(1), clean=clean)
    z_none = m.q_sample(x0, t, torch.Generator().manual_seed(1))
    assert prompt_held(x0, z, clean) and torch.equal(z[~clean], z_none[~clean])
    assert not prompt_held(x0, z_none, clean)
    diff = (z != x0)[~clean].double()
    p = 0.8 * (V - 1) / V
    assert abs(float(diff.mean()) - p) < 4 * math.sqrt(p * (1 - p) / diff.numel())


def test_duo_curriculum_latents_hold_the_prompt():
    """curriculum_latents(clean), 200 draws of 16 x 12 at times spread over [0, 1]: z_t = x0 and the soft input is
    exactly onehot(x0) at clean positions; elsewhere both are those of clean=None from the same seed, as are alpha,
    dalpha and the network time. Power: clean=None's latents fail the prompt check."""
    m = Duo(V, 16, 2, 1, 8, 0.0, curriculum_iters=10, gamma_min=GMIN, gamma_max=GMAX)
    g = torch.Generator().manual_seed(2)
    onehot = torch.nn.functional.one_hot
    noised_somewhere = False
    for k in range(200):
        x0 = torch.randint(V, (16, 12), generator=g)
        clean = torch.rand(16, 12, generator=g) < 0.5
        t = torch.rand(16, dtype=torch.float64, generator=g)
        torch.manual_seed(k)
        soft, z, alpha, dalpha, t_net = m.curriculum_latents(x0, t, clean)
        torch.manual_seed(k)
        soft0, z0, alpha0, dalpha0, t_net0 = m.curriculum_latents(x0, t)
        assert prompt_held(x0, z, clean) and torch.equal(soft[clean], onehot(x0[clean], V).to(soft.dtype))
        assert torch.equal(z[~clean], z0[~clean]) and torch.equal(soft[~clean], soft0[~clean])
        assert torch.equal(alpha, alpha0) and torch.equal(dalpha, dalpha0) and torch.equal(t_net, t_net0)
        noised_somewhere |= not prompt_held(x0, z0, clean)
    assert noised_somewhere


def accuracy(gamma, n=2001, half=12.0):
    """Our P(argmax(at onehot(x) + st eps) = x) at V = 3: int phi(u - nu) Phi(u)^2 du, nu = exp(-gamma/2), trapezoid."""
    nu = math.exp(-gamma / 2)
    u = nu + np.linspace(-half, half, n)
    Phi = np.array([0.5 * math.erfc(-v / math.sqrt(2)) for v in u])
    f = np.exp(-(u - nu) ** 2 / 2) * Phi ** (V - 1) / math.sqrt(2 * math.pi)
    return (f.sum() - (f[0] + f[-1]) / 2) * (u[1] - u[0])


def alpha_of(gamma):
    return (V * accuracy(gamma) - 1) / (V - 1)


@pytest.mark.parametrize("t", [0.3, 0.7])
def test_duo_forward_conditional_at_a_fixed_time(duo_model, t):
    """forward(x0, t, clean) at one t for every row of the (mask, sequence) batch: in eval mode E[loss] = the mean over
    rows of the expected conditional integrand per unclean token, h(t); under the curriculum (train mode)
    E[loss] = -dalpha/dt h(1 - alpha), alpha = alpha(gamma(t)) from our quadrature, the network at time 1 - alpha.
    Each band excludes the prompt noised; metrics["bound"] is the loss."""
    m = duo_model
    x0, clean = pair_batch(12)
    tt = torch.full((len(x0),), t, dtype=torch.float64)

    def loss_mean(seed, n):
        torch.manual_seed(seed)

        def one(_):
            with torch.no_grad():
                _, loss, metrics = m(x0, tt, clean=clean)
            assert torch.equal(loss, metrics["bound"])
            return loss
        return estimates(one, n)

    def h(tp, variant="right"):
        return float(np.mean([expected_integrand(m, [tp], c, variant)[0, ROWS] for c in MASKS]))
    mean, se = loss_mean(40, 100)
    assert_unbiased(mean, se, h(t), {"prompt noised": h(t, "prompt noised")}, f"eval loss at t = {t}")
    gamma = GMIN + t * (GMAX - GMIN)
    a, e = alpha_of(gamma), 1e-3
    da_dt = (alpha_of(gamma + e) - alpha_of(gamma - e)) / (2 * e) * (GMAX - GMIN)
    m.curriculum_iters, m.gamma_min, m.gamma_max = 10, GMIN, GMAX
    m.train()
    m.start_iteration(0)
    try:
        mean, se = loss_mean(41, 250)
    finally:
        m.eval()
        m.curriculum_iters = 0
        m.start_iteration(0)
    assert_unbiased(mean, se, -da_dt * h(1 - a), {"prompt noised": -da_dt * h(1 - a, "prompt noised")},
                    f"curriculum loss at t = {t}")


def test_duo_clean_none_and_errors(duo_model):
    """clean all False: the same draws and the same value as clean=None (to rounding: row means of equal rows); a row
    with every position clean, or a mask of the wrong shape, is a ValueError."""
    m = duo_model
    x0 = torch.tensor(SEQS).repeat(4, 1)
    none = torch.zeros(x0.shape, dtype=torch.bool)
    for T in (None, 5):
        with torch.no_grad():
            a = m.batch_bound(x0, 0.4, torch.Generator().manual_seed(3), T=T)
            b = m.batch_bound(x0, 0.4, torch.Generator().manual_seed(3), T=T, clean=none)
        assert abs(a.item() - b.item()) < 1e-12 * max(1.0, abs(a.item()))
    with pytest.raises(ValueError, match="nothing to score"):
        m.batch_bound(x0[:2], 0.0, None, clean=torch.tensor([[True] * L3, [False] * L3]))
    with pytest.raises(ValueError, match="bool tensor"):
        m.batch_bound(x0, 0.0, None, clean=none[:, :2])


def test_conditional_training_forward_traces_as_one_graph():
    """forward(x0, clean=...) has no host sync (no check that needs one): AR's, and Duo's under the curriculum, trace
    as one graph without breaks."""
    import torch._dynamo
    x = torch.randint(5, (4, 8))
    clean = torch.arange(8)[None, :] < torch.tensor([[1], [2], [3], [4]])
    duo_curriculum = Duo(5, 16, 2, 1, 8, 0.1, curriculum_iters=3).train()
    duo_curriculum.start_iteration(0)
    for m in (AR(5, 16, 2, 1, 8, 0.1), duo_curriculum):
        torch._dynamo.reset()
        explanation = torch._dynamo.explain(m)(x, clean=clean)
        assert explanation.graph_break_count == 0 and explanation.graph_count == 1, explanation.break_reasons
    torch._dynamo.reset()
