"""
Uniform-state diffusion (UDLM, Schiff et al. 2024) trained with Duo's Gaussian curriculum (Sahoo et al. 2025).

Forward process. Token ids 0..V-1 and no mask token: a token stays clean w.p. alpha(t) = 1 - t, else it becomes
a uniformly random token (possibly itself),
    q(z_t | x) = Cat(alpha_t onehot(x) + (1 - alpha_t) / V),     q(z_1 | x) = uniform: the prior.
Every step of the reverse process may change every token, so a wrong token can still be repaired.

Reverse model. The DiT sees z_t and t and predicts x_theta = p(x | z_t) over the V tokens; the step from t to
s < t plugs x_theta into the true posterior (Bayes with q(z_t | z_s) = alpha_t/alpha_s onehot(z_s) + ...):
    q(z_s | z_t, x) = [V a_t x * z_t + (a_t/a_s - a_t) z_t + (a_s - a_t) x + (1 - a_t/a_s)(1 - a_s)/V]
                      / (V a_t x[z_t] + 1 - a_t),         (posterior; a = alpha, * elementwise, z_t one-hot)
which at s = 0 is x itself.

Objective: the continuous-time negative ELBO (UDLM), per token, with xbar = V a_t onehot(x) + 1 - a_t and
xbar_theta = V a_t x_theta + 1 - a_t (vectors over the V tokens),
    NELBO = int_0^1 E_{z_t} a'_t / (V a_t) [ V/xbar[z_t] - V/xbar_theta[z_t]
                     - sum_j xbar_j/xbar[z_t] log(xbar_theta[z_t] xbar_j / (xbar_theta[j] xbar[z_t])) ] dt.
There is no other term: z_0 = x exactly (the decoder is the identity) and q(z_1 | x) is the prior. Near t = 0 a
token is noisy w.p. ~t and then costs ~log(1/t)/t: the integrand's mean grows like log(1/t) (integrable) but its
second moment like log(1/t)^2/t (not), so evaluation draws t = u^2 (batch_bound). Since sum_j xbar_j = V, the sum needs only
log xbar_theta at z_t and at x and sum_j log xbar_theta[j] (Duo's closed form, nelbo_integrand): no one-hot
or xbar tensor is built, only the logits and their transform.

The duality (Duo). Gaussian latents w_t = at onehot(x) + st eps over the V tokens (at^2 = sigmoid(-gamma),
st^2 = sigmoid(gamma)) have argmax(w_t) = x w.p. p = int phi(z - nu) Phi(z)^(V-1) dz, nu = sqrt(SNR) =
exp(-gamma/2), and a uniformly random other token otherwise: argmax(w_t) is z_t of the uniform-state process
with alpha = (V p - 1)/(V - 1) (gaussian_alpha). The curriculum trains, for the first curriculum_iters steps,
on gamma linear in t over [gamma_min, gamma_max], feeding the network the soft input softmax(w_t / tau) (its
embedding is probs @ embedding) while the loss uses z_t = argmax(w_t) and that alpha: a low-variance,
nearly discrete input. Then the plain NELBO.

Conditional (families.py's clean mask C, the prompt): the noise never touches the prompt, z_t^C = x^C at every t
(q_sample; under the curriculum z_t = x0 there and the soft input is exactly onehot(x0)). The process factorises over
the positions, so the NELBO of the answer given the prompt is the same integral with the integrand summed over the
unclean positions U only (the network still reads the whole z_t, prompt included); likewise the T-step KLs:
    -log p(x^U | x^C) <= int_0^1 E_{z_t^U} sum_{l in U} integrand_l dt,
per row divided by |U|, then the mean over rows. clean=None: every position, the unconditional model.
"""
import functools
import math

import torch
import torch.nn as nn

from model import DiT, row_mean, scored_positions
from sampling import CHUNK_ELEMENTS, draw, filter_logits, step_grid


# ---- the math, as functions of tensors ---------------------------------------------------------------------
def nelbo_integrand(log_x_theta, z_t, x0, alpha, dalpha):
    """The NELBO integrand per token (B, L), Duo's closed form of the formula at the top of the file, in the dtype
    of log_x_theta (B, L, V). alpha, dalpha: alpha_t and its derivative in t, (B, 1) (or broadcastable to (B, L))."""
    V = log_x_theta.shape[-1]
    a = alpha.to(log_x_theta.dtype)
    log_xbar_theta = torch.logaddexp(torch.log(V * a)[..., None] + log_x_theta, torch.log1p(-a)[..., None])
    f_z = log_xbar_theta.gather(-1, z_t[..., None]).squeeze(-1)
    f_x = log_xbar_theta.gather(-1, x0[..., None]).squeeze(-1)
    f_sum = log_xbar_theta.sum(-1)
    xbar_z = torch.where(z_t == x0, V * a + 1 - a, 1 - a)
    # sum_j xbar_j log xbar_j (xbar_x = V a + 1 - a, the V - 1 others 1 - a)
    xbar_log_xbar = torch.xlogy(V * a + 1 - a, V * a + 1 - a) + (V - 1) * torch.xlogy(1 - a, 1 - a)
    cross = V * (f_z - torch.log(xbar_z)) + xbar_log_xbar - V * a * f_x - (1 - a) * f_sum
    bracket = V / xbar_z - V * torch.exp(-f_z) - cross / xbar_z
    return dalpha.to(log_x_theta.dtype) / (V * a) * bracket


def posterior(x, z_t, alpha_s, alpha_t):
    """q(z_s | z_t, x) (B, L, V) for x one-hot (the true posterior) or x_theta probabilities (the model's step),
    z_t (B, L) ids; alpha_s, alpha_t floats or tensors broadcastable to (B, L, 1). Float64 in, float64 out.
    No one-hot of z_t: (a_s - a_t) x + c everywhere (c = (1 - a_t/a_s)(1 - a_s)/V), and at z_t the two z_t terms
    added in the order of the formula (so the values are those of the one-hot form, bit for bit)."""
    V = x.shape[-1]
    x_z = x.gather(-1, z_t[..., None])
    c = (1 - alpha_t / alpha_s) * (1 - alpha_s) / V
    at_z = V * alpha_t * x_z + (alpha_t / alpha_s - alpha_t) + (alpha_s - alpha_t) * x_z + c
    numerator = ((alpha_s - alpha_t) * x).add_(c).scatter_(-1, z_t[..., None], at_z.expand_as(x_z).contiguous())
    return numerator.div_(V * alpha_t * x_z + 1 - alpha_t)


def gaussian_accuracy(gamma, V, points=4801):
    """P(argmax(w) = x) for w = at onehot(x) + st eps, float64, by quadrature (Simpson on u in [-12, 12]):
    p = int phi(u) Phi(u + nu)^(V - 1) du, nu = exp(-gamma / 2); and dp/dnu = (V - 1) int phi(u) phi(u + nu)
    Phi(u + nu)^(V - 2) du. Returns (p, dp/dnu), each of gamma's shape."""
    gamma = torch.as_tensor(gamma, dtype=torch.float64)
    u = torch.linspace(-12, 12, points, dtype=torch.float64)
    simpson = torch.ones(points, dtype=torch.float64)
    simpson[1:-1:2], simpson[2:-1:2] = 4, 2
    simpson *= (u[1] - u[0]) / 3
    nu = torch.exp(-gamma / 2).reshape(-1, 1)
    phi_u = torch.exp(-u ** 2 / 2) / math.sqrt(2 * math.pi)
    log_cdf = torch.special.log_ndtr(u + nu)
    p = (phi_u * torch.exp((V - 1) * log_cdf)) @ simpson
    log_pdf = -(u + nu) ** 2 / 2 - 0.5 * math.log(2 * math.pi)
    dp = (V - 1) * (phi_u * torch.exp(log_pdf + (V - 2) * log_cdf)) @ simpson
    return p.reshape(gamma.shape), dp.reshape(gamma.shape)


GAMMA_RANGE, GAMMA_POINTS = (-16.0, 16.0), 4097  # the grid of the duality table
GREEDY_EPS = 1e-5     # sample(sampler="greedy_tail"): Duo's last time (their generate_samples' eps)


@functools.lru_cache(maxsize=None)
def duality_table(V):
    """(2, GAMMA_POINTS) float64 on the CPU: alpha = (V p - 1)/(V - 1) clamped to [0, 1] (the quadrature overshoots 1
    by ~1.6e-13 for gamma < -4.8, where log1p(-alpha) would be NaN) and dalpha/dgamma, on the grid over GAMMA_RANGE.
    About 2 s per V, once per process; a Duo keeps a copy on its device (Duo.table)."""
    gamma = torch.linspace(*GAMMA_RANGE, GAMMA_POINTS, dtype=torch.float64)
    p, dp_dnu = gaussian_accuracy(gamma, V)
    dnu_dgamma = -torch.exp(-gamma / 2) / 2
    return torch.stack([((V * p - 1) / (V - 1)).clamp(0, 1), V / (V - 1) * dp_dnu * dnu_dgamma])


def gaussian_alpha(gamma, V, table=None):
    """The uniform-state alpha = T(at) = (V p - 1)/(V - 1) that argmax(w_t) follows at log-SNR -gamma, and
    dalpha/dgamma, both float64, linearly interpolated on the table (default duality_table(V); gamma clamped to
    GAMMA_RANGE) with tensor ops on gamma's device: no host copy, nothing a compiled graph must sync on."""
    gamma = torch.as_tensor(gamma, dtype=torch.float64)
    table = (duality_table(V) if table is None else table).to(gamma.device)
    lo, hi = GAMMA_RANGE
    pos = (gamma.clamp(lo, hi) - lo) / (hi - lo) * (GAMMA_POINTS - 1)
    i = pos.floor().long().clamp(max=GAMMA_POINTS - 2)
    frac = pos - i
    out = table[:, i] * (1 - frac) + table[:, i + 1] * frac
    return out[0], out[1]


def gaussian_gamma(alpha, V, table=None):
    """The inverse of gaussian_alpha: the gamma (float64) at which argmax(w_t) follows alpha, by linear
    interpolation on the table (alpha clamped to the table's range), on alpha's device."""
    a = torch.as_tensor(alpha, dtype=torch.float64)
    alphas = (duality_table(V) if table is None else table).to(a.device)[0].flip(0)  # non-decreasing in alpha
    gammas = torch.linspace(*GAMMA_RANGE, GAMMA_POINTS, dtype=torch.float64, device=a.device).flip(0)
    a = torch.minimum(torch.maximum(a, alphas[0]), alphas[-1])
    i = (torch.searchsorted(alphas, a) - 1).clamp(0, GAMMA_POINTS - 2)  # alphas[i] < a <= alphas[i + 1]
    frac = (a - alphas[i]) / (alphas[i + 1] - alphas[i]).clamp(min=1e-300)
    return gammas[i] + frac * (gammas[i + 1] - gammas[i])


def gaussian_latents(x0, gamma, V, eps):
    """w = at onehot(x0) + st eps (B, L, V) at log-SNR -gamma (B,), at^2 = sigmoid(-gamma), st^2 = sigmoid(gamma)."""
    a_tilde, s_tilde = torch.sigmoid(-gamma).sqrt().float(), torch.sigmoid(gamma).sqrt().float()
    w = eps * s_tilde[:, None, None]
    return w.scatter_add(-1, x0[..., None], a_tilde[:, None, None].expand(*x0.shape, 1).contiguous())


# ---- the model ---------------------------------------------------------------------------------------------
class Duo(nn.Module):
    def __init__(self, vocab_size, n_embed, n_heads, n_blocks, n_cond, dropout, antithetic=True, t_eps=1e-3,
                 curriculum_iters=0, gamma_min=-3.55, gamma_max=-1.85, tau=1e-3, time_input="1000t", tied_output=True,
                 dcd_gamma_min=-4.0, dcd_gamma_max=-1.0):
        super().__init__()
        self.vocab_size = vocab_size
        self.mask_id = vocab_size  # not a token: "generate this position" in sample()'s input
        self.antithetic, self.t_eps = antithetic, t_eps
        self.curriculum_iters, self.gamma_min, self.gamma_max, self.tau = curriculum_iters, gamma_min, gamma_max, tau
        self.in_curriculum = False  # set by start_iteration (train.py); never in evaluation
        self.dcd_gamma_min, self.dcd_gamma_max = dcd_gamma_min, dcd_gamma_max
        # the duality table on the model's device, filled by table(); not in the state dict (checkpoints unchanged)
        self.register_buffer("alpha_table", torch.zeros(0, dtype=torch.float64), persistent=False)
        if time_input not in ("1000t", "sigma"):
            raise ValueError(f"time_input must be 1000t or sigma, not {time_input!r}")
        self.time_input = time_input
        self.net = DiT(vocab_size, n_embed, n_heads, n_blocks, n_cond, dropout, tied_output=tied_output)

    def null_prompt(self, x0, clean, generator=None):
        """families.py: "no prompt" is uniformly random tokens at the clean positions (the prior, z_1; the DiT has
        no mask class to put there)."""
        noise = torch.randint(0, self.vocab_size, x0.shape, device=x0.device, generator=generator)
        return torch.where(clean, noise, x0)

    def alpha(self, t):
        """P(token still clean at time t) = 1 - t, float64."""
        return 1 - torch.as_tensor(t, dtype=torch.float64)

    def logits(self, z_t, t):
        """Logits (B, L, V) of x_theta. z_t: (B, L) ids, or (B, L, V) probability vectors (the soft input);
        t: (B,) in [0, 1]. The network reads 1000 t, or with time_input="sigma" (Duo's published weights)
        sigma = -log alpha(t), with alpha clamped at 1e-3 (their alpha(1))."""
        if self.time_input == "sigma":
            return self.net(z_t, -torch.log(self.alpha(t).clamp(min=1e-3)).float())
        return self.net(z_t, 1000 * t.float())

    def q_sample(self, x0, t, generator=None, clean=None):
        """z_t ~ q(z_t | x0): each token is replaced w.p. t by a uniformly random token. t: (B,). clean (B, L) bool:
        those tokens are never replaced (the same random draws as clean=None, so the other tokens are unchanged)."""
        u = torch.rand(x0.shape, dtype=torch.float64, device=x0.device, generator=generator)
        replace = u < t[:, None].to(x0.device)
        if clean is not None:
            replace = replace & ~clean
        noise = torch.randint(0, self.vocab_size, x0.shape, device=x0.device, generator=generator)
        return torch.where(replace, noise, x0)

    def table(self):
        """duality_table(V) on the model's device, copied there the first time (start_iteration and distill_loss
        call this outside any compiled code, so a compiled step only reads the buffer)."""
        if self.alpha_table.numel() == 0 or self.alpha_table.dtype != torch.float64:
            self.alpha_table = duality_table(self.vocab_size).to(self.alpha_table.device)
        return self.alpha_table

    def start_iteration(self, iter_num):
        """train.py calls this before every optimizer step: the first curriculum_iters steps use the curriculum."""
        self.in_curriculum = iter_num < self.curriculum_iters
        if self.in_curriculum:
            self.table()

    # ---- training ----------------------------------------------------------------------------------------------
    def draw_times(self, B, device):
        """t in [t_eps, 1]: antithetic (u + i/B) mod 1 with one u per batch, or i.i.d. uniform."""
        if self.antithetic:
            u = torch.rand((), dtype=torch.float64, device=device)
            r = (u + torch.arange(B, dtype=torch.float64, device=device) / B) % 1
        else:
            r = torch.rand(B, dtype=torch.float64, device=device)
        return self.t_eps + (1 - self.t_eps) * r

    def curriculum_latents(self, x0, t, clean=None):
        """The curriculum's inputs at times t in [0, 1] (gamma = gamma_min + t (gamma_max - gamma_min)):
        (soft input softmax(w_t / tau), z_t = argmax w_t, alpha, dalpha/dt, the network's time 1 - alpha).
        clean (B, L) bool: there the soft input is exactly onehot(x0) and z_t = x0 (the same draws of eps)."""
        gamma = self.gamma_min + t * (self.gamma_max - self.gamma_min)
        alpha, dalpha_dgamma = gaussian_alpha(gamma, self.vocab_size, self.table())
        w = gaussian_latents(x0, gamma, self.vocab_size, torch.randn(*x0.shape, self.vocab_size, device=x0.device))
        soft, z_t = (w / self.tau).softmax(-1), w.argmax(-1)
        if clean is not None:
            soft = soft.masked_fill(clean[..., None], 0.0).scatter_add_(-1, x0[..., None], clean[..., None].to(soft.dtype))
            z_t = torch.where(clean, x0, z_t)
        return soft, z_t, alpha, dalpha_dgamma * (self.gamma_max - self.gamma_min), 1 - alpha

    def forward(self, x0, t=None, clean=None):
        """x0: (B, L). loss = bound = mean over the batch of the NELBO integrand at t ~ draw_times (a one-sample
        estimate of the NELBO per token on [t_eps, 1]); under the curriculum (training only), the integrand at
        the curriculum's alpha and z_t with the soft input. clean (B, L) bool: the prompt is never noised and the
        integrand is averaged over each row's unclean positions, then over the rows (a row with none: NaN).
        Returns (logits, loss, metrics: bound, bpt, curriculum: 1.0 when the step used it)."""
        if t is None:
            t = self.draw_times(x0.shape[0], x0.device)
        curriculum = self.training and self.in_curriculum
        if curriculum:
            net_input, z_t, alpha, dalpha, t_net = self.curriculum_latents(x0, t, clean)
        else:
            z_t = net_input = self.q_sample(x0, t, clean=clean)
            alpha, dalpha, t_net = self.alpha(t), -torch.ones_like(t), t
        logits = self.logits(net_input, t_net.to(x0.device))
        integrand = nelbo_integrand(logits.log_softmax(-1), z_t, x0, alpha[:, None].to(x0.device),
                                    dalpha[:, None].to(x0.device))
        loss = integrand.mean() if clean is None else row_mean(integrand, scored_positions(x0, clean))
        return logits, loss, dict(bound=loss.detach(), bpt=loss.detach() / math.log(2),
                                  curriculum=torch.full((), float(curriculum), device=x0.device))  # a fill, no host copy

    distill_defaults = ("DCD", 512, 5)  # distill.py: the method, its first teacher steps and rounds (Duo's paper)

    def dcd_pairs(self, B, steps, device):
        """DCD's pairs of times for B rows, as Duo's distillation (their Distillation.nll; distillation.yaml's
        gamma_min: -4, gamma_max: -1): t from draw_times (their _sample_t) moved up by dt = 1/steps, t = min(t + dt, 1),
        s = t - dt, the Gaussian latents at gamma = dcd_gamma_min + t (dcd_gamma_max - dcd_gamma_min) and at s's
        gamma, where argmax follows alpha = gaussian_alpha(gamma); the network reads time 1 - alpha (their sigma
        from that alpha; our curriculum's convention). With [-4, -1] alpha runs from 0.999 down to 0.006 at
        V = 50257 (1 to 0.36 at V = 27), not uniformly in t. dcd_gamma_min=None: our earlier grid instead, alpha =
        1 - t uniform in t (gamma = gaussian_gamma(1 - t)), network times t and s.
        Returns (gamma_t, gamma_s, the network's times for t, for s), each (B,) float64."""
        t = (self.draw_times(B, device) + 1 / steps).clamp(max=1)
        s = t - 1 / steps
        if self.dcd_gamma_min is None:
            table = self.table()
            return gaussian_gamma(self.alpha(t), self.vocab_size, table), gaussian_gamma(self.alpha(s), self.vocab_size,
                                                                                         table), t, s
        gamma_t, gamma_s = (self.dcd_gamma_min + r * (self.dcd_gamma_max - self.dcd_gamma_min) for r in (t, s))
        alpha = gaussian_alpha(torch.stack([gamma_t, gamma_s]), self.vocab_size, self.table())[0]
        return gamma_t, gamma_s, 1 - alpha[0], 1 - alpha[1]

    def distill_loss(self, teacher, x0, steps):
        """Duo's discrete consistency distillation (DCD) for distill.py: one shared eps gives Gaussian latents at the
        two gammas of dcd_pairs, z_t and z_s their argmax; the student (self) at (z_t, its time) learns the teacher's
        x_theta at (z_s, its time): loss = mean over positions of KL(student || teacher) (their kl-bwd)."""
        B, V = x0.shape[0], self.vocab_size
        gamma_t, gamma_s, t, s = self.dcd_pairs(B, steps, x0.device)
        eps = torch.randn(*x0.shape, V, device=x0.device)
        z_t = gaussian_latents(x0, gamma_t, V, eps).argmax(-1)
        z_s = gaussian_latents(x0, gamma_s, V, eps).argmax(-1)
        with torch.no_grad():
            log_p = teacher.logits(z_s, s).log_softmax(-1)
        log_q = self.logits(z_t, t).log_softmax(-1)
        return (log_q.exp() * (log_q - log_p)).sum(-1).mean()

    # ---- the bound, for evaluate.py ----------------------------------------------------------------------------
    def bound_name(self, T=None):
        return f"{T}-step bound" if T else "continuous NELBO"

    def batch_bound(self, x0, offset, generator=None, T=None, clean=None):
        """One unbiased estimate (float64 0-dim, nats/token) on a (B, L) batch, offset in [0, 1) stratifying it.
        T = None: the NELBO over all of [0, 1] with t = u^2, int f(t) dt = int 2u f(u^2) du, row i at u_i = (i + offset)/B:
        near t = 0 a noisy token costs ~log(1/t)/t w.p. ~t, which under uniform t gives an infinite variance and
        under t = u^2 a finite one (2u log(1/u^2)/u^2 w.p. u^2). The integrand is computed in float64. Unlike the
        masked models' any-order form, which conditions the masking away exactly, every row here carries the
        noise of its z_t and the spread of the integrand over t: on corpus_a (batches of 64 x 128) the per-batch
        sd is 0.10 bits/char against the masked model's 0.054, so a standard error takes ~3.5x the batches.
        T = N: the N-step bound sum_j E KL(q(z_s | z_t, x) || q(z_s | z_t, x_theta)), s = t - 1/N (the last
        step's KL is -log p(x | z_{1/N})), row i at step j_i = 1 + floor((i + offset) N / B), weight N.
        clean (B, L) bool: the prompt is held at x0 in z_t and each row's integrand (or KL) is averaged over its
        unclean positions, then over the rows; a row with none is a ValueError."""
        B, L = x0.shape
        scored = None if clean is None else scored_positions(x0, clean, check=True)
        dev = x0.device
        i = torch.arange(B, dtype=torch.float64, device=dev)
        if T:
            t, s = step_grid(B, offset, T, i.device)
            z_t = self.q_sample(x0, t, generator, clean)
            x_theta = self.logits(z_t, t).double().softmax(-1)
            a_t, a_s = self.alpha(t)[:, None, None], self.alpha(s)[:, None, None]
            q = posterior(torch.nn.functional.one_hot(x0, self.vocab_size).double(), z_t, a_s, a_t)
            p = posterior(x_theta, z_t, a_s, a_t)
            kl = (torch.xlogy(q, q) - torch.xlogy(q, p)).sum(-1)
            return T * (kl.sum(1).mean() / L if clean is None else row_mean(kl, scored))
        u = (i + offset) / B
        t = (u * u).clamp(min=1e-12)
        z_t = self.q_sample(x0, t, generator, clean)
        log_x_theta = self.logits(z_t, t).double().log_softmax(-1)
        integrand = nelbo_integrand(log_x_theta, z_t, x0, self.alpha(t)[:, None], -torch.ones_like(t)[:, None])
        weighted = 2 * u[:, None] * integrand
        return weighted.mean() if clean is None else row_mean(weighted, scored)

    # ---- sampling ------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, x, steps=None, generator=None, callback=None, cache=True, sampler="ancestral", temperature=1.0,
               top_k=0, top_p=1.0, chunk=None, **opts):
        """Ancestral sampling of the mask_id positions of x (B, L) on the grid t_j = j/steps (default L steps), one
        network call per step: they start as uniformly random tokens; from t to s < t each takes a draw from
        posterior(x_theta, z_t, alpha(s), alpha(t)) in float64, x_theta = softmax of the logits after temperature /
        top_k / top_p (Duo applies the nucleus to x_theta, never to the posterior). At s = 0 the posterior is
        x_theta reweighted towards z_t.
        sampler="greedy_tail": Duo's noise_removal=greedy (their generate_samples): the steps go down
        linspace(1, eps, steps + 1) with eps = GREEDY_EPS (1e-5, their default), ending at eps, not 0, and then ONE
        MORE network call at t = eps whose argmax x_theta (of the raw logits; filtering never moves the argmax)
        replaces the generated positions: steps + 1 calls. (Their alpha is 1 - (1 - 1e-3) t, ours 1 - t.)
        Given tokens never change; cache is unused (every step changes tokens). The float64 work of a step is done
        chunk generated positions at a time (default max(1, sampling.CHUNK_ELEMENTS // V)), after drawing all of the
        step's uniforms at once, so that its memory is bounded by chunk x V and the samples do not depend on chunk.
        Returns (samples, network calls)."""
        if sampler not in ("ancestral", "greedy_tail"):
            raise ValueError(f"the uniform-state model samples with ancestral or greedy_tail, not {sampler!r}")
        if opts:
            raise ValueError(f"the uniform-state sampler has no option {', '.join(opts)}")
        B, L = x.shape
        steps = steps or L
        chunk = chunk or max(1, CHUNK_ELEMENTS // self.vocab_size)
        generate = x == self.mask_id
        rows, cols = generate.nonzero(as_tuple=True)
        noise = torch.randint(0, self.vocab_size, x.shape, device=x.device, generator=generator)
        z = torch.where(generate, noise, x)
        if sampler == "greedy_tail":
            times = torch.linspace(1, GREEDY_EPS, steps + 1, dtype=torch.float64).tolist()
        else:
            times = [j / steps for j in range(steps, -1, -1)]
        for t, s in zip(times[:-1], times[1:]):
            tt = torch.full((B,), t, dtype=torch.float64, device=x.device)
            logits = self.logits(z, tt)
            z_gen = z[generate]
            new = torch.empty_like(z_gen)
            u = None if temperature == 0 else torch.rand(len(new), dtype=torch.float64, device=x.device,
                                                         generator=generator)
            for c in range(0, len(new), chunk):
                part = slice(c, c + chunk)
                lg = logits[rows[part], cols[part]]
                if temperature == 0:
                    new[part] = lg.argmax(-1)
                    continue
                x_theta = filter_logits(lg, temperature, top_k, top_p).softmax(-1)
                probs = posterior(x_theta, z_gen[part], 1 - s, 1 - t)
                new[part] = draw(probs.log_(), u=u[part])
            z = z.clone()
            z[generate] = new
            if callback is not None:
                callback(z, tt)
        if sampler == "greedy_tail":
            tt = torch.full((B,), times[-1], dtype=torch.float64, device=x.device)
            z = torch.where(generate, self.logits(z, tt).argmax(-1), z)
            if callback is not None:
                callback(z, tt)
        return z, steps + (sampler == "greedy_tail")
