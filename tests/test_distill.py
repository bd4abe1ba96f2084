"""
Independent-oracle tests of the few-step distillation losses: sampling.sdtt_loss (SDTT), MDLM.distill_loss,
D3PMAbsorbing.distill_loss (SDTT on the integer grid) and Duo.distill_loss (DCD), from the math of
../shared/reference/model-families.md section 6; distill.py itself is tests/test_distill_cli.py's.

- The SDTT target, by exact enumeration. On V = 3 tokens (mask id 3) and L = 3 positions the teacher is a fixed
  random table of logits per (x, t) (context and time dependent: 64 states, logits A[x] + t B[x], its mask column
  finite and large, so that anything that does not drop it is caught). The target of a masked position depends
  only on the teacher's FIRST step: it is the step-1 prediction if the position unmasked there, else the step-2
  prediction at the state x_1 that step 1 produced (whatever step 2 does). Enumerating step 1 (each masked
  position stays masked or unmasks to one of the 3 tokens) gives E[loss] = E[mean_l KL(q_l || target_l)] exactly,
  compared with the Monte-Carlo mean of sdtt_loss within 4 standard errors, a band that excludes (by 8 se) the
  plausible wrong targets: always step 1's prediction; step 2's for every position; step 2 called at the time t
  instead of t - dt; step 2 at x_t (step 1's draws not fed back). The geometry: the minimiser over q of
  E[KL(q || target)] is q* = softmax(E[log target]) (the normalised geometric mean); the oracle checks that
  perturbations of q* increase its expected loss, and sdtt_loss's per-row gradients average to 0 at q*, while at
  the arithmetic mean E[target] (the forward-KL minimiser) they average to the oracle's non-zero gradient.
- Zero loss and one-step reproduction (test_zero_loss_student_reproduces_teacher_in_half_the_steps): see there
  for why the statement "a student trained to zero loss reproduces the teacher's two-step distribution in one
  step" cannot hold in general with SDTT's reverse KL and what precise statement is tested instead.
- DCD's pairs: the student's and the teacher's logits calls inside Duo.distill_loss are recorded; with one
  shared eps the joint law of (z_t, z_s) per position given x is P(z_t = x = z_s) = p_t, P(z_t != x = z_s) =
  p_s - p_t, P(z_s = z_t != x) = 1 - p_s, and never anything else, with p = P(argmax w = x) from our own
  quadrature at the gammas gaussian_gamma gives (which must be the gammas where (V p - 1)/(V - 1) = alpha).
  Tested by a Wald chi-square over the rows' own (t, s), with a power check against plausible wrong pairs.
- The D3PM's SDTT grid: times, mask rates (binomial z tests), the teacher's step-1 unmask rate, and a student
  equal to a context- and time-free teacher has loss 0.
"""
import copy
import itertools
import math

import numpy as np
import pytest
import torch

import d3pm
import duo
import mdlm
import sampling
from conftest import chi2_pvalue, chi2_sf, chisquare_pvalue, randomize_weights
from d3pm import D3PMAbsorbing
from duo import Duo
from mdlm import MDLM

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny tensors, 2 cores shared

V = 3
M = V  # the mask id


def softmax(z):
    z = np.asarray(z, dtype=np.float64)
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def log_softmax(z):
    z = np.asarray(z, dtype=np.float64)
    m = z.max(-1, keepdims=True)
    return z - m - np.log(np.exp(z - m).sum(-1, keepdims=True))


def cosine_keep(t):
    """Our own cosine schedule: P(clean at t) = 1 - cos(pi/2 (1 - t))."""
    return 1 - math.cos(math.pi / 2 * (1 - t))


# ---- 1. the SDTT target ----------------------------------------------------------------------------------
LT = 3                                     # positions in the table teacher
TIMES = (0.5, 0.2)                         # t and dt: the steps t -> 0.3 -> 0.1


class TableTeacher:
    """logits(x, t) = A[x] + t B[x] over the 4^LT states x (mask included), mask column +3 (finite: a wrong
    implementation that keeps it changes targets and draws)."""

    def __init__(self, seed):
        g = np.random.default_rng(seed)
        self.A = g.normal(0, 1.5, (4 ** LT, LT, V)).astype(np.float32)
        self.B = g.normal(0, 2.0, (4 ** LT, LT, V)).astype(np.float32)
        self.At, self.Bt = torch.tensor(self.A), torch.tensor(self.B)
        self.calls = 0

    @staticmethod
    def index(x):
        return sum(int(v) * 4 ** i for i, v in enumerate(x))

    def __call__(self, x, t):
        self.calls += 1
        idx = (x * torch.tensor([4 ** i for i in range(LT)])).sum(1)
        logits = self.At[idx] + t.float()[:, None, None] * self.Bt[idx]
        return torch.cat([logits, torch.full((*x.shape, 1), 3.0)], -1)

    def logp(self, x, t):
        """Our float64 log p(x_0 | x) (LT, V), from the same float32 tables."""
        i = self.index(x)
        return log_softmax(self.A[i].astype(np.float64) + np.float32(t) * self.B[i].astype(np.float64))


def step1_outcomes(teacher, x_t, t, dt, keep):
    """Every outcome of the teacher's first step from x_t: (probability, x_1, unmasked-at-step-1 flags)."""
    masked = [l for l in range(LT) if x_t[l] == M]
    pi = (keep(t - dt) - keep(t)) / (1 - keep(t))
    p1 = np.exp(teacher.logp(x_t, t))
    for choice in itertools.product([None, *range(V)], repeat=len(masked)):
        prob, x1, unm = 1.0, list(x_t), [False] * LT
        for l, c in zip(masked, choice):
            if c is None:
                prob *= 1 - pi
            else:
                prob *= pi * p1[l, c]
                x1[l], unm[l] = c, True
        yield prob, x1, unm


def expected_targets(teacher, x_t, t, dt, keep, variant="right"):
    """[(probability, log target (LT, V))] over step 1's outcomes. Variants: the plausible wrong targets."""
    out = []
    lp1 = teacher.logp(x_t, t)
    for prob, x1, unm in step1_outcomes(teacher, x_t, t, dt, keep):
        if variant == "step 1 always":
            tgt = lp1
        else:
            lp2 = {"step 2 at time t": lambda: teacher.logp(x1, t),
                   "step 2 at x_t": lambda: teacher.logp(x_t, t - dt)}.get(variant, lambda: teacher.logp(x1, t - dt))()
            if variant == "step 2 always":
                tgt = lp2
            else:
                tgt = np.where(np.array(unm)[:, None], lp1, lp2)
        out.append((prob, tgt))
    assert abs(sum(p for p, _ in out) - 1) < 1e-12
    return out


def kl_rows(log_q, log_target):
    """KL(q || target) per position, float64."""
    return (np.exp(log_q) * (log_q - log_target)).sum(-1)


def expected_loss(targets, log_q, masked):
    """E[mean over the masked positions of KL(q_l || target_l)]; log_q (LT, V)."""
    return sum(p * kl_rows(log_q, tgt)[masked].mean() for p, tgt in targets)


def torch_cosine_keep(s):
    return 1 - torch.cos(math.pi / 2 * (1 - s))


def sdtt_calls(teacher, x_t, student_logits, n_calls, rows, seed, keep=torch_cosine_keep):
    t, dt = TIMES
    x = torch.tensor(x_t).repeat(rows, 1)
    times = [torch.full((rows,), v, dtype=torch.float64) for v in (t, t - dt, t - 2 * dt)]
    g = torch.Generator().manual_seed(seed)
    sl = torch.as_tensor(student_logits, dtype=torch.float32).expand(rows, LT, V + 1)
    return np.array([float(sampling.sdtt_loss(sl, teacher, x, times, keep, M, g)) for _ in range(n_calls)])


@pytest.mark.parametrize("x_t", [(M, M, M), (M, 2, M)])
def test_sdtt_expected_loss_by_enumeration(x_t):
    """The mean of sdtt_loss over many calls is the exact E[KL(student || target)] (the student a fixed random
    distribution per position whose mask logit is large and finite: it must be dropped), and no wrong target fits."""
    teacher = TableTeacher(seed=1)
    t, dt = TIMES
    masked = np.array(x_t) == M
    g = np.random.default_rng(7)
    student = np.concatenate([g.normal(0, 1.5, (LT, V)), np.full((LT, 1), 4.0)], -1)
    log_q = log_softmax(student[:, :V])
    exact = expected_loss(expected_targets(teacher, x_t, t, dt, cosine_keep), log_q, masked)
    vals = sdtt_calls(teacher, x_t, student, n_calls=30, rows=3000, seed=3)
    mean, se = vals.mean(), vals.std(ddof=1) / math.sqrt(len(vals))
    assert teacher.calls == 2 * 30  # one teacher call per step
    assert abs(mean - exact) < 4 * se, f"sdtt_loss mean {mean:.5f} vs exact {exact:.5f} (se {se:.5f})"
    for variant in ("step 1 always", "step 2 always", "step 2 at time t", "step 2 at x_t"):
        wrong = expected_loss(expected_targets(teacher, x_t, t, dt, cosine_keep, variant), log_q, masked)
        assert abs(wrong - exact) > 8 * se, f"cannot tell '{variant}' ({wrong:.5f}) from {exact:.5f} (se {se:.5f})"


def test_sdtt_minimiser_is_the_geometric_mean_of_the_targets():
    """E[KL(q || target)] = sum q log q - sum q E[log target] is minimised by q* = softmax(E[log target]) (checked on
    the oracle by perturbations); sdtt_loss's gradient wrt the student's logits, row by row, averages to 0 at q*
    and to the oracle's gradient q_k (log q_k - E[log target_k] - E[KL]) at the arithmetic mean E[target], which is
    NOT the minimiser (8 se away from 0): SDTT's reverse KL fits the geometric mean of the random targets."""
    teacher = TableTeacher(seed=2)
    t, dt = TIMES
    x_t = (M, 1, M)
    masked = np.array(x_t) == M
    targets = expected_targets(teacher, x_t, t, dt, cosine_keep)
    mean_log = sum(p * tgt for p, tgt in targets)
    q_star = log_softmax(mean_log)
    q_arith = np.log(sum(p * np.exp(tgt) for p, tgt in targets))
    best = expected_loss(targets, q_star, masked)
    g = np.random.default_rng(0)
    for _ in range(20):
        assert expected_loss(targets, log_softmax(q_star + g.normal(0, 0.05, q_star.shape)), masked) > best
    assert expected_loss(targets, q_arith, masked) > best + 1e-3

    rows = 20_000
    x = torch.tensor(x_t).repeat(rows, 1)
    times = [torch.full((rows,), v, dtype=torch.float64) for v in (t, t - dt, t - 2 * dt)]
    n_masked = rows * masked.sum()
    for log_q, zero in ((q_star, True), (q_arith, False)):
        logits = torch.tensor(np.concatenate([log_q, np.zeros((LT, 1))], -1), dtype=torch.float32)
        logits = logits.repeat(rows, 1, 1).requires_grad_(True)
        sampling.sdtt_loss(logits, teacher, x, times, torch_cosine_keep, M, torch.Generator().manual_seed(5)).backward()
        mt = torch.tensor(masked)
        per_row = logits.grad[:, mt, :V].double().numpy() * n_masked              # (rows, masked, V)
        assert (logits.grad[:, ~mt] == 0).all() and (logits.grad[..., V] == 0).all()
        mean, se = per_row.mean(0), per_row.std(0, ddof=1) / math.sqrt(rows)
        q = np.exp(log_q[masked])
        kl = (q * (log_q[masked] - mean_log[masked])).sum(-1, keepdims=True)
        want = q * (log_q[masked] - mean_log[masked] - kl)
        assert np.all(np.abs(mean - want) < 4.5 * se + 1e-7), (mean, want, se)
        if zero:
            assert np.abs(want).max() < 1e-12
        else:
            assert (np.abs(want) > 8 * se).any(), "the check cannot tell the arithmetic mean from the minimiser"


# ---- 2. zero loss and one-step reproduction -------------------------------------------------------------
def exact_law(logits_fn, N, L, keep=lambda t: 1 - t):
    """The exact output law {sequence: probability} of the N-step ancestral sampler from all masks (t_j = j/N),
    by propagating the distribution over partially masked states: at each step every masked position unmasks
    w.p. (keep(s) - keep(t)) / (1 - keep(t)) to a draw from p(x_0 | x) (our float64 softmax of logits_fn)."""
    dist = {(M,) * L: 1.0}
    for j in range(N, 0, -1):
        t, s = j / N, (j - 1) / N
        pi = 1.0 if j == 1 else (keep(s) - keep(t)) / (1 - keep(t))
        states = list(dist)
        with torch.no_grad():
            logits = logits_fn(torch.tensor(states), torch.full((len(states),), t, dtype=torch.float64))
        probs = softmax(logits[..., :V].double().numpy())
        new = {}
        for x, pr, px in zip(states, probs, dist.values()):
            masked = [l for l in range(L) if x[l] == M]
            for choice in itertools.product([None, *range(V)], repeat=len(masked)):
                p, y = px, list(x)
                for l, c in zip(masked, choice):
                    p *= (1 - pi) if c is None else pi * pr[l, c]
                    if c is not None:
                        y[l] = c
                if p > 0:
                    new[tuple(y)] = new.get(tuple(y), 0.0) + p
        dist = new
    assert abs(sum(dist.values()) - 1) < 1e-9 and all(M not in k for k in dist)
    return dist


def context_free(model):
    """Zero the attention's output projection: each position's prediction then depends on its own token only
    (and on t through adaLN); the DiT has no other path between positions (rotary positions live in attention)."""
    with torch.no_grad():
        for block in model.net.blocks:
            block.attn_out.weight.zero_()
    return model


def test_zero_loss_student_reproduces_teacher_in_half_the_steps():
    """Why not "any student trained to zero loss reproduces the teacher's two steps in one":
    (a) SDTT's target is random (which positions unmask at the teacher's step 1 and to what), and the reverse KL's
        minimiser is its normalised geometric mean (test above), whose loss is > 0 and whose samples are not the
        teacher's mixture; (b) a student step draws the positions independently from its p(x_0 | x_t), while the
        teacher's step 2 conditions on step 1's draws: from all masks a one-step student can only produce a product
        law, and a context-dependent teacher's two-step law is not one (checked below on the oracle: L = 2,
        mutual information of the two positions > 0.02 nats). (c) Even forward KL would not do: a still-masked
        position's target is step 2's prediction although the student's step leaves it masked.
    The target is deterministic only if the teacher's prediction at x_t's masked positions does not change along
    its two steps (no time input, and no dependence on the positions that step 1 fills), and then it is the
    teacher's own p(x_0 | x_t). Tested: a time-free, context-free teacher (an MDLM whose attention output is
    zeroed); a different student (time-conditioned, attention intact, default initialisation) trained with
    MDLM.distill_loss to (near) zero loss; its exact 2-step law (our DP over partially masked states) is within
    0.01 in total variation of the teacher's exact 4-step law, and 20000 samples of student.sample(steps=2) pass a
    chi-square against the teacher's 4-step law (p > 1e-3) while the untrained student's fail (p < 1e-6)."""
    L = 2
    torch.manual_seed(0)
    full = randomize_weights(MDLM(V, 16, 2, 1, 8, 0.0), 8).eval()
    two_step = exact_law(full.logits, 2, L)  # (b): the context-dependent teacher's two-step law
    pm = np.array([[sum(p for k, p in two_step.items() if k[l] == v) for v in range(V)] for l in range(L)])
    mi = sum(p * math.log(p / (pm[0, k[0]] * pm[1, k[1]])) for k, p in two_step.items())
    assert mi > 0.02, mi

    teacher = context_free(copy.deepcopy(full))
    law4 = exact_law(teacher.logits, 4, L)
    torch.manual_seed(0)
    student = MDLM(V, 16, 2, 1, 8, 0.0, time_conditioning=True)  # default initialisation: far from the target
    untrained = copy.deepcopy(student).eval()
    opt = torch.optim.Adam(student.parameters(), lr=1e-2)
    torch.manual_seed(1)
    for _ in range(100):
        loss = student.distill_loss(teacher, torch.randint(0, V, (32, L)), 4)
        opt.zero_grad()
        loss.backward()
        opt.step()
    student.eval()
    with torch.no_grad():
        final = np.mean([float(student.distill_loss(teacher, torch.randint(0, V, (256, L)), 4)) for _ in range(4)])
        start = float(untrained.distill_loss(teacher, torch.randint(0, V, (256, L)), 4))
    assert final < 1e-3 < start, (final, start)
    law2 = exact_law(student.logits, 2, L)
    tv = 0.5 * sum(abs(law2.get(k, 0) - law4[k]) for k in law4)
    assert tv < 0.01, tv
    x = torch.full((20_000, L), M)
    samples, calls = student.sample(x, steps=2, generator=torch.Generator().manual_seed(2))
    assert calls <= 2
    assert chisquare_pvalue(samples, law4) > 1e-3
    off, _ = untrained.sample(x, steps=2, generator=torch.Generator().manual_seed(2))
    assert chisquare_pvalue(off, law4) < 1e-6


def test_mdlm_distill_loss_grid_and_student_equal_to_teacher():
    """MDLM.distill_loss passes sdtt_loss the student's logits at x_t ~ q(. | x0, t), t = 2j/steps with j uniform on
    1..steps/2, times [t, t - 1/steps, t - 2/steps] and the schedule's alpha; a student equal to a time-free,
    context-free teacher has loss 0, a student equal to a context-dependent teacher does not."""
    steps, B, L = 8, 400, 6
    torch.manual_seed(0)
    teacher = context_free(randomize_weights(MDLM(8, 16, 2, 1, 8, 0.0, schedule="cosine"), 4)).eval()
    seen = []

    def recorder(student_logits, teacher_logits, x_t, times, keep, mask_id, generator=None):
        seen.append((x_t.clone(), [t.clone() for t in times], keep(times[0]), mask_id))
        return sampling.sdtt_loss(student_logits, teacher_logits, x_t, times, keep, mask_id, generator)

    mp = pytest.MonkeyPatch()
    mp.setattr(mdlm, "sdtt_loss", recorder)
    try:
        with torch.no_grad():
            losses = [float(copy.deepcopy(teacher).distill_loss(teacher, torch.randint(0, 8, (B, L)), steps))
                      for _ in range(3)]
    finally:
        mp.undo()
    assert max(losses) < 1e-6, losses
    t = torch.cat([s[1][0] for s in seen])
    for x_t, times, keep_t, mask_id in seen:
        assert mask_id == 8
        assert torch.equal(times[1], times[0] - 1 / steps) and torch.equal(times[2], times[0] - 2 / steps)
        assert torch.allclose(keep_t, 1 - torch.cos(math.pi / 2 * (1 - times[0])), atol=1e-12)
    j = (t * steps / 2).round()
    assert torch.allclose(t, 2 * j / steps, atol=1e-12)
    counts = np.array([(j == v).sum().item() for v in range(1, steps // 2 + 1)])
    assert counts.sum() == 3 * B and chi2_pvalue(counts, np.full(steps // 2, 2 / steps)) > 1e-3
    # masking rate per t: 1 - alpha(t) (our cosine), binomial z-test summed over rows
    x_t = torch.cat([s[0] for s in seen])
    masked = (x_t == 8).sum(1).double().numpy()
    rate = np.array([1 - cosine_keep(float(v)) for v in t])
    z = (masked.sum() - L * rate.sum()) / math.sqrt((L * rate * (1 - rate)).sum())
    assert abs(z) < 4, z
    wrong = np.array([1 - cosine_keep(float(v) - 1 / steps) for v in t])  # the rate at the teacher's step 2
    assert abs(L * (wrong.sum() - rate.sum())) > 8 * math.sqrt((L * rate * (1 - rate)).sum())
    torch.manual_seed(1)
    full = randomize_weights(MDLM(8, 16, 2, 1, 8, 0.0), 4).eval()
    with torch.no_grad():
        assert float(copy.deepcopy(full).distill_loss(full, torch.randint(0, 8, (B, L)), steps)) > 1e-3


# ---- 3. the DCD pair -------------------------------------------------------------------------------------
VD = 27
_PHI_GRID = np.linspace(-30, 30, 60_001)
_PHI = np.array([0.5 * math.erfc(-u / math.sqrt(2)) for u in _PHI_GRID])


def accuracy(nu, vocab=VD, n=1201):
    """Our P(argmax(a onehot(x) + s eps) = x) = int phi(v) Phi(v + nu)^(V - 1) dv (trapezoid, v in [-9, 9]),
    for an array of nu = a/s."""
    v = np.linspace(-9, 9, n)
    nu = np.asarray(nu, dtype=np.float64)[..., None]
    cdf = np.interp(v + nu, _PHI_GRID, _PHI)
    f = np.exp(-v ** 2 / 2) / math.sqrt(2 * math.pi) * cdf ** (vocab - 1)
    return ((f[..., 1:] + f[..., :-1]) / 2 * (v[1] - v[0])).sum(-1)


def nu_of(gamma):
    return np.exp(-np.asarray(gamma, dtype=np.float64) / 2)  # a/s with a^2 = sigmoid(-gamma), s^2 = sigmoid(gamma)


def test_gaussian_gamma_is_where_the_argmax_follows_alpha():
    """Our quadrature at gaussian_gamma(alpha) gives p with (V p - 1)/(V - 1) = alpha (V = 27)."""
    alphas = np.array([0.001, 0.05, 0.3, 0.6, 0.9, 0.99, 0.999])
    p = accuracy(nu_of(duo.gaussian_gamma(torch.tensor(alphas), VD).numpy()))
    np.testing.assert_allclose((VD * p - 1) / (VD - 1), alphas, atol=2e-4)
    wrong = accuracy(nu_of(duo.gaussian_gamma(torch.tensor(alphas), VD).numpy() + 0.1))  # power: gamma off by 0.1
    assert np.abs((VD * wrong - 1) / (VD - 1) - alphas)[1:-1].min() > 1e-3


def wald_pvalue(counts, probs, weights):
    """Goodness of fit of category counts summed over independent multinomials (row r: weights[r] draws with
    probabilities probs[r]): d = counts - sum_r w_r p_r, Cov = sum_r w_r (diag p_r - p_r p_r^T), the Wald statistic
    on all but the last category ~ chi2(k - 1)."""
    probs = np.asarray(probs, dtype=np.float64)
    w = np.asarray(weights, dtype=np.float64)
    d = np.asarray(counts, dtype=np.float64) - (w[:, None] * probs).sum(0)
    cov = np.diag((w[:, None] * probs).sum(0)) - np.einsum("r,ri,rj->ij", w, probs, probs)
    k = probs.shape[1] - 1
    stat = float(d[:k] @ np.linalg.solve(cov[:k, :k], d[:k]))
    return chi2_sf(stat, k)


@pytest.fixture(scope="module")
def dcd_record():
    """Duo.distill_loss on 8 batches of 256 x 8 random ids at steps = 8, the student's and the teacher's logits
    calls recorded (inputs and outputs)."""
    torch.manual_seed(0)
    student = randomize_weights(Duo(VD, 16, 2, 1, 8, 0.0, dcd_gamma_min=None), 1)
    teacher = randomize_weights(Duo(VD, 16, 2, 1, 8, 0.0, dcd_gamma_min=None), 2).eval().requires_grad_(False)
    calls = {"student": [], "teacher": []}

    def wrap(model, key):
        inner = model.logits

        def logits(z, t):
            out = inner(z, t)
            calls[key].append((z.clone(), t.clone(), out))
            return out
        model.logits = logits

    wrap(student, "student")
    wrap(teacher, "teacher")
    torch.manual_seed(1)
    x0s, losses = [], []
    for _ in range(8):
        x0 = torch.randint(0, VD, (256, 8))
        loss = student.distill_loss(teacher, x0, 8)
        x0s.append(x0)
        losses.append(loss)
    losses[0].backward()
    return dict(student=student, teacher=teacher, calls=calls, x0=x0s, losses=losses, steps=8)


def test_dcd_times(dcd_record):
    """The old grid (dcd_gamma_min=None; Duo's own is tested in test_duo.py): s = t - 1/steps exactly; t = min(t_eps + (1 - t_eps) u + 1/steps, 1): t in [t_eps + 1/steps, 1], equal to 1
    w.p. (1/steps) / (1 - t_eps) (binomial), uniform below (chi-square on 10 bins)."""
    steps, t_eps = dcd_record["steps"], 1e-3
    t = torch.cat([c[1] for c in dcd_record["calls"]["student"]])
    s = torch.cat([c[1] for c in dcd_record["calls"]["teacher"]])
    assert t.dtype == torch.float64 and len(dcd_record["calls"]["student"]) == 8 == len(dcd_record["calls"]["teacher"])
    assert torch.equal(s, t - 1 / steps)
    lo = t_eps + 1 / steps
    assert t.min() >= lo - 1e-12 and t.max() <= 1
    n, at_one = len(t), int((t == 1).sum())
    p1 = (1 / steps) / (1 - t_eps)
    assert abs(at_one - n * p1) < 4 * math.sqrt(n * p1 * (1 - p1)), at_one
    below = t[t < 1].numpy()
    counts = np.histogram(below, bins=np.linspace(lo, 1, 11))[0]
    assert counts.sum() == len(below) and chi2_pvalue(counts, np.full(10, 0.1)) > 1e-3
    for z, _, _ in dcd_record["calls"]["student"] + dcd_record["calls"]["teacher"]:
        assert z.dtype == torch.long and z.shape == (256, 8)


def test_dcd_loss_is_the_kl_of_the_recorded_calls(dcd_record):
    """loss = mean over positions of KL(softmax(student) || softmax(teacher)) of the recorded logits (ours, float64);
    the teacher's logits carry no graph; the student's gradient exists, the teacher's does not."""
    for (_, _, q), (_, _, p), loss in zip(dcd_record["calls"]["student"], dcd_record["calls"]["teacher"],
                                          dcd_record["losses"]):
        lq, lp = log_softmax(q.detach().double().numpy()), log_softmax(p.double().numpy())
        want = (np.exp(lq) * (lq - lp)).sum(-1).mean()
        assert abs(loss.item() - want) < 1e-5 * max(1, want), (loss.item(), want)
        assert not p.requires_grad and q.requires_grad
    assert all(p.grad is not None for p in dcd_record["student"].parameters())
    assert all(p.grad is None for p in dcd_record["teacher"].parameters())


def test_dcd_pairs_share_eps(dcd_record):
    """Per position, relative to x = x0: (z_t, z_s) in A = (x, x), B = (other, x), C = (z, z) with z != x, never
    D = (x, other) nor E = two different others; P(A, B, C) = (p_t, p_s - p_t, 1 - p_s) with p from our quadrature
    at each row's gaussian_gamma(alpha(t)), alpha(t) = 1 - t (Wald test over the rows, p > 1e-3); in C the token is
    uniform over the V - 1 others. Power: independent eps for t and s (D, E > 0 by far), and the pairs of a wrong
    s = t - 2/steps or of gammas from alpha at 1 - t/2 are rejected (p < 1e-6)."""
    cat_counts, rows_t, rows_s, others = np.zeros(5), [], [], np.zeros(VD - 1)
    for x0, (zt, t, _), (zs, s, _) in zip(dcd_record["x0"], dcd_record["calls"]["student"],
                                          dcd_record["calls"]["teacher"]):
        a, b = zt == x0, zs == x0
        c = ~a & (zs == zt)
        d = a & ~b
        e = ~a & ~b & (zs != zt)
        cat_counts += [int((a & b).sum()), int((~a & b).sum()), int(c.sum()), int(d.sum()), int(e.sum())]
        others += np.bincount(((zt - x0) % VD)[c].numpy(), minlength=VD)[1:]
        rows_t.append(t.numpy())
        rows_s.append(s.numpy())
    t, s = np.concatenate(rows_t), np.concatenate(rows_s)
    L = dcd_record["x0"][0].shape[1]
    assert cat_counts[3] == 0 and cat_counts[4] == 0, cat_counts

    def probs(tt, ss):
        pt = accuracy(nu_of(duo.gaussian_gamma(torch.tensor(1 - tt), VD).numpy()))
        ps = accuracy(nu_of(duo.gaussian_gamma(torch.tensor(1 - ss), VD).numpy()))
        return np.stack([pt, ps - pt, 1 - ps], -1)

    right = probs(t, s)
    assert (right[:, 1] >= -1e-9).all()
    np.testing.assert_allclose(right[:, 0], (1 + (VD - 1) * (1 - t)) / VD, atol=2e-4)  # duality: P(z_t = x)
    w = np.full(len(t), L)
    assert wald_pvalue(cat_counts[:3], right, w) > 1e-3
    assert chi2_pvalue(others, np.full(VD - 1, 1 / (VD - 1))) > 1e-3
    for wrong in (probs(t, np.maximum(t - 2 / 8, 1e-3)), probs(1 - (1 - t) / 2, s)):
        assert wald_pvalue(cat_counts[:3], wrong, w) < 1e-6
    pt, ps = right[:, 0], right[:, 0] + right[:, 1]   # independent eps: D = p_t (1 - p_s) per position
    assert (L * pt * (1 - ps)).sum() > 50


# ---- 4. the D3PM's SDTT grid -----------------------------------------------------------------------------
def make_d3pm(T, seed, free=False, vocab=V):
    torch.manual_seed(0)
    model = randomize_weights(D3PMAbsorbing(vocab, 16, 2, 1, 8, 0.0, T=T, lambda_ce=0.05), seed)
    if free:  # context-free (attention output zeroed) and time-free (the time embedding's last layer zeroed)
        context_free(model)
        with torch.no_grad():
            model.net.c_embed.mlp[2].weight.zero_()
    return model


@pytest.mark.parametrize("T,steps", [(50, 10), (50, 8)])
def test_d3pm_sdtt_grid(T, steps):
    """D3PMAbsorbing.distill_loss: with G_k = round(k T / steps) the teacher's sampler grid (np.round of linspace,
    as D3PMAbsorbing.sample builds it), the times are [G_2j, G_2j-1, G_2j-2], j uniform on 1..steps/2; the teacher
    is called at (x_t, G_2j) then (x_1, G_2j-1) with x_1 = x_t where x_t is not masked; x_t is masked at rate
    1 - alpha_bar_t = t/T (binomial z test, excluding the rate at G_2j-1), and step 1 unmasks a masked position at
    rate (alpha_bar(mid) - alpha_bar(t)) / (1 - alpha_bar(t))."""
    B, L = 300, 8
    student, teacher = make_d3pm(T, 1), make_d3pm(T, 2).eval()
    grid = np.round(np.linspace(0, T, steps + 1)).astype(int)
    seen, teacher_calls = [], []
    inner = teacher.logits

    def logits(x, t):
        teacher_calls.append((x.clone(), t.clone()))
        return inner(x, t)
    teacher.logits = logits

    def recorder(student_logits, teacher_logits, x_t, times, keep, mask_id, generator=None):
        seen.append((x_t.clone(), [t.clone() for t in times], keep(times[0]), keep(times[2])))
        return sampling.sdtt_loss(student_logits, teacher_logits, x_t, times, keep, mask_id, generator)

    mp = pytest.MonkeyPatch()
    mp.setattr(d3pm, "sdtt_loss", recorder)
    try:
        torch.manual_seed(3)
        for _ in range(4):
            loss = student.distill_loss(teacher, torch.randint(0, V, (B, L)), steps)
            assert loss.requires_grad and math.isfinite(loss.item())
    finally:
        mp.undo()
    assert len(teacher_calls) == 2 * len(seen) == 8
    ts, masked_counts, rates, unmask_obs, unmask_exp, unmask_var = [], 0, [], 0, 0.0, 0.0
    for i, (x_t, (t, mid, s), keep_t, keep_s) in enumerate(seen):
        assert t.dtype == mid.dtype == s.dtype == torch.long
        j = np.array([np.flatnonzero(grid == v)[-1] for v in t.numpy()])
        assert (j % 2 == 0).all() and (j >= 2).all()
        assert np.array_equal(t.numpy(), grid[j]) and np.array_equal(mid.numpy(), grid[j - 1])
        assert np.array_equal(s.numpy(), grid[j - 2])
        np.testing.assert_allclose(keep_t.numpy(), 1 - t.numpy() / T, atol=1e-12)
        np.testing.assert_allclose(keep_s.numpy(), 1 - s.numpy() / T, atol=1e-12)
        (x1, t1), (x2, t2) = teacher_calls[2 * i], teacher_calls[2 * i + 1]
        assert torch.equal(x1, x_t) and torch.equal(t1, t) and torch.equal(t2, mid)
        m = x_t == M
        assert torch.equal(x2[~m], x_t[~m])
        pi = (t - mid).double().numpy() / t.double().numpy()       # (ab(mid) - ab(t)) / (1 - ab(t)), ab(u) = 1 - u/T
        k = m.sum(1).numpy()
        unmask_obs += int((m & (x2 != M)).sum())
        unmask_exp += float((k * pi).sum())
        unmask_var += float((k * pi * (1 - pi)).sum())
        ts.append(t.numpy())
        masked_counts += int(m.sum())
        rates.append(t.double().numpy() / T)
    ts, rates = np.concatenate(ts), np.concatenate(rates)
    counts = np.array([(ts == grid[2 * j]).sum() for j in range(1, steps // 2 + 1)])
    assert counts.sum() == len(ts) and chi2_pvalue(counts, np.full(steps // 2, 2 / steps)) > 1e-3
    sd = math.sqrt((L * rates * (1 - rates)).sum())
    assert abs(masked_counts - L * rates.sum()) < 4 * sd
    mids = np.concatenate([s[1][1].numpy() for s in seen]) / T
    assert abs(L * (mids.sum() - rates.sum())) > 8 * sd  # power: the rate at the teacher's mid point
    assert abs(unmask_obs - unmask_exp) < 4 * math.sqrt(unmask_var)


def test_d3pm_student_equal_to_free_teacher_has_zero_loss():
    """A student equal to a context- and time-free teacher: every target is the teacher's own p(x_0 | x_t), loss 0;
    the same with the teacher's time input (or its attention) restored is > 0 (power)."""
    teacher = make_d3pm(50, 4, free=True).eval()
    torch.manual_seed(0)
    x0 = torch.randint(0, V, (256, 8))
    with torch.no_grad():
        assert float(copy.deepcopy(teacher).distill_loss(teacher, x0, 10)) < 1e-6
        timed = make_d3pm(50, 4).eval()
        context_free(timed)
        assert float(copy.deepcopy(timed).distill_loss(timed, x0, 10)) > 1e-3
