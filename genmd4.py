"""
GenMD4: masked diffusion with a learned schedule per token (Shi et al. 2024, "Simplified and generalized
masked diffusion for discrete data"; google-deepmind/md4, genmd4.py).

Forward process. Token ids 0..V-1, mask id m = V. Every vocabulary entry v has its own schedule
    alpha_{t,v} = 1 - t^{w_v},   w = softplus(w_hat), one learned w_hat per token id (init: w = 1, linear),
the probability that a token v is still clean at time t: q(x_t | x_0) masks each position independently,
a clean token x w.p. t^{w_x} (small w_x: masked early, so generated late). alpha_{1,v} = 0, alpha_{0,v} = 1.

Reverse process and NELBO. A masked position with clean token x unmasks, under the true backward
process, at rate -alpha'_{t,x} / (1 - alpha_{t,x}) = w_x / t, to x. The model plugs its prediction
mu = p_theta(x_0 | x_t) (softmax over the V real tokens, mask logit -inf) into that rate: it unmasks to v
at rate (w_v / t) mu(v). The continuous-time ELBO of a CTMC charges, per masked position, the model's total
rate minus the true one plus R_true log(R_true / R_model):
    NELBO(x_0) = int_0^1 E_{x_t ~ q(.|x_0)} [ sum_{l: x_t^l = m} f_l(t) ] dt        (nats per sequence)
    f_l(t) = (1/t) [ w_x (-log mu(x)) + sum_v w_v mu(v) - w_x ],   x = x_0^l,  mu = p_theta(x_0^l | x_t),
each f_l >= 0 (-log mu(x) >= 1 - mu(x) and sum_v w_v mu(v) >= w_x mu(x)). Equal w = c gives
(c/t)(-log mu(x)), for c = 1 MDLM's linear loss (mdlm.py). The masking now depends on the token, so the
true p(x_0 | x_t) depends on t: the network has a time input (time_conditioning, on by default).
No prior and no reconstruction term: alpha_{1,v} = 0, so x_1 is all-mask (where the sampler starts), and
alpha_{0,v} = 1, so the NELBO above is an exact bound on -log p_theta(x_0) (eps = 0). MD4's code squeezes
the schedule to 1 - (1 - eps) t^{w_v}, eps = 1e-4, for numerical safety at t -> 1 (log alpha) and adds a
reconstruction term at t1 = 1e-3; x_1 then keeps x_0 w.p. eps, unlike the all-mask start of its sampler,
and its prior term is counted as zero. This repo keeps eps = 0 (an exact bound, nothing dropped) and does
the numerics instead: log(1 - t^w) = log(-expm1(w log t)), and the 1/t of t -> 0 by the substitution below.

Training. t per sequence as mdlm.py draws it (antithetic, in [t_eps, 1]); x_t is drawn twice at that t
(one network call on the doubled batch), giving two estimates L_k = (1/L) sum_masked f_l(t) (nats/token),
whose expectation is int_{t_eps}^1 E[sum_masked f] dt / (L (1 - t_eps)), as in mdlm.py. The masks depend on
w, so d/dw E_z[L(z; w)] = E[dL/dw] + E[L d log q_w(z | x_0)/dw] (pathwise + score function). Leave one out:
E[L_2 d log q(z_1)] = 0 (z_2 independent of z_1, E[d log q] = 0), so
    loss = (L_1 + L_2)/2 + 0.5 stopgrad(L_1 - L_2) (g_1 - g_2),   g_k = lq_k - stopgrad(lq_k),
    lq = log q(z | x_0) = sum_l [ w_x log t if z_l = m else log(1 - t^{w_x}) ],
has the objective's gradient in expectation; g_k is 0 in value, so the loss's value is the bound
estimate (L_1 + L_2)/2 (metrics["bound"]).

Evaluation over all of [0, 1] (batch_bound). Drawing t ~ U[0, 1], the estimate (1/t) sum_masked t f_l has
second moment ~ int_0 t^{-2} P(masked) dt = int_0 t^{w_x - 2} dt per position: infinite for w_x <= 1 (for
w = 1, log-divergent). With t = u^k, u uniform (dt = k u^{k-1} du) the estimate is (k/u) (1/L) sum_masked t f_l,
t f_l bounded, a position masked w.p. u^{k w_x}: second moment ~ int_0^1 u^{k w_x - 2} du, finite iff
k w_x > 1. k = 2 (t = u^2, weight 2u: the density of t is 1/(2 sqrt t)) is finite while w > 1/2; as a learned
w may fall below that, each row takes k = max(2, 2 / min_l w_{x_l}): k w_x >= 2, a bounded integrand. k
depends on x_0 only, so every row stays unbiased; u_i = (i + offset)/B stratifies the batch.
T = N: the bound of the N-step sampler below, sum_{j=1}^N E_{x_{t_j}}[sum_masked KL_j], with r = t_{j-1}/t_j,
    KL_j = (1 - r^{w_x}) (-log mu(x)) + r^{w_x} (w_x log r - log sum_v mu(v) r^{w_v})    (r = 0: -log mu(x)),
the KL of the true step (unmask to x w.p. 1 - r^{w_x}) from the model's (to v w.p. mu(v)(1 - r^{w_v}));
it tends to the NELBO as N grows.

Conditional (families.py's clean: the prompt P given, the answer A the other positions). q masks only A, by the
same per-token schedule; the bound on -log p(x_A | x_P) is the NELBO above with the sum over masked l in A, and the
loss, metrics["bound"] and batch_bound report the mean over rows of (that bound) / |A|. The REINFORCE term uses
lq = log q(z_A | x_0), a sum over A only: a prompt position's mask is not drawn, so it carries no score. (A token
seen only in prompts still gets the pathwise gradient of sum_v w_v mu(v): the model's rate of unmasking to it.)

Sampling on the grid t_j = j/N (N = steps, default L). From t to s < t a masked position becomes v w.p.
mu(v) (alpha_{s,v} - alpha_{t,v}) / (1 - alpha_{t,v}) = mu(v) (1 - (s/t)^{w_v}) and stays masked otherwise,
w.p. sum_v mu(v) (s/t)^{w_v}; at s = 0 everything unmasks, to v ~ mu. Whether a position unmasks now depends
on mu, i.e. on the network, so its unmask time cannot be drawn in advance and mdlm.py's first-hitting sampler
does not apply: the network is called once per grid step (leaving out rows with nothing masked; no call
once nothing is), and each masked position draws "v or stay" in one float64 inverse-CDF draw.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from mdlm import MDLM
from model import CrossEntropy
from sampling import confidence_decode, filter_logits


class GenMD4(MDLM):
    """mdlm.py's network, logits and training times, with a learned schedule alpha_{t,v} = 1 - t^{w_v}."""
    distill_loss = None  # MDLM's SDTT assumes one schedule for every token: distill.py refuses

    def __init__(self, vocab_size, n_embed, n_heads, n_blocks, n_cond, dropout, time_conditioning=True,
                 antithetic=True, t_eps=1e-3):
        super().__init__(vocab_size, n_embed, n_heads, n_blocks, n_cond, dropout, schedule="linear",
                         time_conditioning=time_conditioning, antithetic=antithetic, t_eps=t_eps)
        self.schedule = "learned"
        self.w_hat = nn.Parameter(torch.full((vocab_size,), math.log(math.expm1(1.0))))  # softplus = 1

    @property
    def w(self):
        """The per-token exponents w = softplus(w_hat), (V,)."""
        return F.softplus(self.w_hat)

    def _scalar_schedule(self, *args, **kwargs):
        raise NotImplementedError("GenMD4's schedule is per token (mask_prob): mdlm.py's scalar alpha(t) "
                                  "does not apply")

    alpha = alpha_inverse = weight = denoise = sample_ancestral = _scalar_schedule

    def mask_prob(self, x0, t):
        """P(x_t^l = m | x_0) = 1 - alpha_{t, x0} = t^{w_x}: float64 (B, L) for t (B,) (no gradient)."""
        w_x = self.w.detach().double()[x0]
        return torch.exp(w_x * torch.log(t.double().to(x0.device))[:, None])

    def q_sample(self, x0, t, generator=None):
        """x_t ~ q(x_t | x_0): mask each token x independently w.p. t^{w_x}. t: (B,)."""
        u = torch.rand(x0.shape, dtype=torch.float64, device=x0.device, generator=generator)
        return torch.where(u < self.mask_prob(x0, t), torch.full_like(x0, self.mask_id), x0)

    def noise_answer(self, x0, t, generator=None, clean=None):
        """q_sample with the clean positions kept (the same draws for every position: clean=None's random stream)."""
        x_t = self.q_sample(x0, t, generator)
        return x_t if clean is None else torch.where(clean, x0, x_t)

    # ---- the NELBO integrand --------------------------------------------------------------------------
    def masked_terms(self, logits, x0, x_t):
        """(t f_l, -log mu(x)) on masked positions, 0 elsewhere: t f_l = w_x (-log mu(x)) + sum_v w_v mu(v) - w_x,
        two (B, L) float32, differentiable in w (and in the logits)."""
        w = self.w
        ce = self.masked_ce(logits, x0, x_t)
        real = logits[..., :self.vocab_size].float()
        mean_w = torch.exp(torch.logsumexp(real + torch.log(w), -1) - torch.logsumexp(real, -1))  # sum_v w_v mu(v)
        return (w[x0] * ce + (mean_w - w[x0]) * (x_t == self.mask_id)), ce

    def log_q(self, x0, x_t, t, clean=None):
        """log q(x_t | x_0) per sequence: sum_l [w_x log t if masked else log(1 - t^{w_x})], float64 (B,),
        differentiable in w; the sum over the unclean l only if clean (B, L) is given. t < 1 where anything
        is unmasked (t = 1 masks everything)."""
        w_x = self.w.double()[x0]
        wlogt = w_x * torch.log(t.double())[:, None]
        masked = x_t == self.mask_id
        fixed = masked if clean is None else masked | clean  # no log(1 - t^w) needed there
        kept = torch.log(-torch.expm1(torch.where(fixed, torch.full_like(wlogt, -1.0), wlogt)))
        lq = torch.where(masked, wlogt, kept)
        return lq.sum(1) if clean is None else lq.masked_fill(clean, 0.0).sum(1)

    # ---- training -------------------------------------------------------------------------------------
    def forward(self, x0, t=None, clean=None):
        """x0: (B, L). t: (B,) float times, drawn by draw_times if None. Two x_t per sequence at its t, in one
        network call; loss = (L_1 + L_2)/2 + the leave-one-out score-function term for w (0 in value), see the
        top of this file. clean (B, L) bool: the prompt, never masked, not in lq, each row's L_k divided by its
        |A| instead of L. Returns (logits of the first draw, loss, metrics): ce (mean masked cross-entropy),
        bound = (L_1 + L_2)/2 averaged (nats/token on [t_eps, 1]), bpt, w_min, w_max."""
        B, L = x0.shape
        if t is None:
            t = self.draw_times(B, x0.device)
        x0_2, t_2 = x0.repeat(2, 1), t.repeat(2)
        clean_2 = None if clean is None else clean.repeat(2, 1)
        x_t = self.noise_answer(x0_2, t_2, clean=clean_2)
        logits = self.logits(x_t, t_2)
        terms, ce = self.masked_terms(logits, x0_2, x_t)
        n = L if clean is None else (~clean_2).sum(1).clamp(min=1)  # scored positions per row
        per_seq = terms.sum(1) / (n * t_2.float().to(x0.device))
        est1, est2 = per_seq[:B], per_seq[B:]
        lq = self.log_q(x0_2, x_t, t_2.to(x0.device), clean_2)
        g = lq - lq.detach()  # value 0, gradient d log q / dw
        score = 0.5 * (est1 - est2).detach() * (g[:B] - g[B:]).float()
        bound = (est1 + est2).mean() / 2
        loss = bound + score.mean()
        w = self.w.detach()
        metrics = dict(ce=ce.detach().sum() / (x_t == self.mask_id).sum().clamp(min=1), bound=bound.detach(),
                       bpt=bound.detach() / math.log(2), w_min=w.min(), w_max=w.max())
        return logits[:B], loss, metrics

    # ---- the bound, for evaluate.py ---------------------------------------------------------------------
    def batch_bound(self, x0, offset, generator=None, T=None, clean=None):
        """One unbiased estimate (float64 0-dim, nats/token) of the bound on a (B, L) batch; offset in [0, 1)
        stratifies it. T = None: the continuous NELBO over all of [0, 1], row i at t_i = u_i^k_i,
        u_i = (i + offset)/B, k_i = max(2, 2 / min w over its tokens), scoring (k_i/u_i) sum_masked t f_l / L.
        T = N: the N-step bound, row i at step j_i = 1 + floor((i + offset) N / B), weight N.
        clean (B, L) bool: the prompt is never masked, k_i takes the min over the answer's tokens, and each row
        divides by its |A| instead of L (the mean over rows of the conditional bound per answer token)."""
        B, L = x0.shape
        dev = x0.device
        i = torch.arange(B, dtype=torch.float64, device=dev)
        w = self.w.detach().double()
        n = L if clean is None else (~clean).sum(1).clamp(min=1).double()
        if T:
            j = (1 + torch.floor((i + offset) / B * T)).clamp(max=T)
            t, r = j / T, (j - 1) / j
            x_t = self.noise_answer(x0, t, generator, clean)
            logits = self.logits(x_t, t)
            ce = CrossEntropy.apply(logits.flatten(0, 1), x0.flatten()).view(x0.shape).double()
            real = logits[..., :self.vocab_size].float()
            log_r = torch.log(r)[:, None, None]  # -inf at j = 1
            log_stay = (torch.logsumexp(real + (w.float() * log_r.float()), -1)
                        - torch.logsumexp(real, -1)).double()  # log sum_v mu(v) r^{w_v}
            r_x = torch.exp(w[x0] * log_r[..., 0])  # r^{w_x}, 0 at j = 1
            kl = (1 - r_x) * ce + torch.where(r_x > 0, r_x * (w[x0] * log_r[..., 0] - log_stay), 0.0)
            if clean is None:
                return T * (kl * (x_t == self.mask_id)).sum(1).mean() / L
            return T * ((kl * (x_t == self.mask_id)).sum(1) / n).mean()
        u = ((i + offset) / B).clamp(min=1e-300)  # u = 0: t = 0, nothing masked, a 0 term
        w_x = w[x0] if clean is None else w[x0].masked_fill(clean, math.inf)
        k = (2 / w_x.min(1).values).clamp(min=2)
        t = u ** k
        x_t = self.noise_answer(x0, t, generator, clean)
        terms = self.masked_terms(self.logits(x_t, t), x0, x_t)[0].double().sum(1)
        if clean is None:
            return (k / u * terms).mean() / L
        return (k / u * terms / n).mean()

    # ---- sampling ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, x, steps=None, generator=None, callback=None, cache=True, sampler="ancestral", **opts):
        """Ancestral sampling of the masked positions of x (B, L) on the grid t_j = j/N, N = steps (default L),
        as at the top of this file; given tokens never change. One network call per grid step for the rows
        that still hold a mask (cache=False: every row at every step; the same samples). opts: temperature,
        top_k, top_p applied to mu (sampling.filter_logits; temperature 0: mu the argmax). sampler="confidence":
        sampling.confidence_decode in N calls; "remask" (ReMDM) is not offered: its remasking rates assume one
        alpha(t) for every token. Returns (samples, network calls)."""
        B, L = x.shape
        N = steps or L
        if sampler == "confidence":
            return confidence_decode(self.logits, x, [(N - j) / N for j in range(N)], self.mask_id, generator,
                                     callback, **opts)
        if sampler == "remask":
            raise ValueError("GenMD4 does not offer --sampler remask (ReMDM assumes one schedule for every "
                             "token); use ancestral or confidence")
        if sampler != "ancestral":
            raise ValueError(f"unknown sampler {sampler!r} (ancestral or confidence)")
        x, calls = x.clone(), 0
        w = self.w.double()
        for j in range(N, 0, -1):
            masked = x == self.mask_id
            rows = (masked.any(1) if cache else torch.ones_like(masked[:, 0])).nonzero().squeeze(1)
            if cache and not masked.any():
                break
            u = torch.rand((B, L), dtype=torch.float64, device=x.device, generator=generator)
            t_rows = torch.full((rows.numel(),), j / N, dtype=torch.float64, device=x.device)
            logits = self.logits(x[rows], t_rows)
            calls += 1
            xr, now = x[rows], masked[rows]
            mu = self.predict(logits[now][:, :self.vocab_size], **opts)
            stay = ((j - 1) / j) ** w  # (s/t)^{w_v}, 0 at the last step
            p = torch.cat([mu * (1 - stay), (mu * stay).sum(-1, keepdim=True)], -1)  # v = 0..V-1, then m = V
            cdf = p.cumsum(-1)
            pick = torch.searchsorted(cdf, (u[rows][now] * cdf[:, -1])[:, None], right=True).squeeze(1)
            xr[now] = pick.clamp(max=self.vocab_size - (1 if j == 1 else 0))
            x[rows] = xr
            if callback is not None:
                callback(x, t_rows)
        return x, calls

    @staticmethod
    def predict(logits, temperature=1.0, top_k=0, top_p=1.0):
        """mu from (n, V) logits: float64 probabilities after filter_logits, or one-hot argmax at temperature 0."""
        if temperature == 0:
            return F.one_hot(logits.argmax(-1), logits.shape[-1]).double()
        return filter_logits(logits, temperature, top_k, top_p).softmax(-1)
