"""
Score entropy discrete diffusion (SEDD: Lou, Meng & Ermon 2024), in continuous time.

Forward process. Each token runs its own Markov chain with rates sigma'(t) Q (Q(x, y): the rate from y into x), so
q(x_t | x_0) = exp(sbar(t) Q)(., x_0), sbar(t) = sigma(t) - sigma(0) the noise since t = 0. The graph Q (model arg):
    absorb   ids 0..V-1 and the mask m = V: a token turns into m at rate 1 and stays there:
             q(x_t = x_0) = e^-sbar, q(x_t = m) = 1 - e^-sbar;
    uniform  ids 0..V-1: at rate 1 a token is replaced by a uniformly random one (possibly itself), Q = 11^T / V - I:
             q(x_t = y) = e^-sbar [y = x_0] + (1 - e^-sbar) / V.
The total noise (their noise_lib; model arg noise): loglinear sigma(t) = -log(1 - (1 - eps) t) (eps = 1e-3: e^-sigma(1)
= eps; sbar = sigma), or geometric sigma(t) = sigma_min^(1-t) sigma_max^t. The network reads sigma(t).

The concrete score. The DiT reads x_t and sigma and outputs s(x_t, t)^l_y ~ log p_t(x_t with y at l) / p_t(x_t) for
each position l and state y; s at y = x_t^l is set to 0 (ratio 1, used nowhere). scale_by_sigma (absorb, as their
model): s = out - log(e^sbar - 1) - log V. At a mask the true score is r p(x_0^l = y | x_t), r = 1 / (e^sbar - 1)
(Ou et al. 2024), so exp(out) / V reads as p(x_0 | x_t).

Objective: denoising score entropy (their DWDSE); r_y = q(x_t^l = y | x_0) / q(x_t^l | x_0), K(a) = a (log a - 1):
    -log p(x_0) <= int_0^1 sbar'(t) E sum_l e^l dt + prior, e = sum_{y != x_t} Q(x_t, y) [e^s_y - r_y s_y + K(r_y)]
    absorb (masked positions only; Q(m, y) = 1; r_y = r at y = x_0, else 0):  e = sum_{y<V} e^s_y - r s_x0 + K(r);
    uniform (Q = 1/V; x_t = x_0: every r_y = rho = (e^sbar - 1) / (e^sbar - 1 + V); else r_x0 = 1/rho, the others 1):
        e = mean_y e^s_y - e^s_xt / V - [x_t = x_0] rho (mean_y s_y - s_xt / V) + [x_t = x_0] (V - 1) / V K(rho)
            - [x_t != x_0] (mean_y s_y - s_xt / V + s_x0 / (e^sbar - 1)) + [x_t != x_0] (K(1/rho) - (V - 2)) / V.
The ends. absorb: the sampler starts from all masks, so the bound's x_t is q's conditioned on being masked at t = 1:
masked w.p. m(t) = (1 - e^-sbar(t)) / (1 - e^-sbar(1)) (loglinear: m = t), with the same integrand (a reverse rate
given x_0 does not depend on that conditioning) and no prior term. Their training masks w.p. 1 - e^-sbar: a bound with
a mask start would be infinite (x_1 stays clean w.p. eps). uniform: the prior KL(q(x_1^l | x_0^l) || 1/V) per
position, exact. At t = 0 the data are clean (sbar(0) = 0; their geometric noise starts at sigma_min, and their model
scales by sigma: ours by sbar, 1e-4 less). Training draws t in [t_eps, 1] (antithetic, as mdlm.py): loss =
metrics["bound"] = sbar'(t) e, + prior, per scored position.

Evaluation (batch_bound), unbiased. absorb: with u = m(t), sbar' r = m'/m, so sbar' e dt = (e/r) du/u where
e/r = sum_y p_y - log p_x0 - 1 (p = exp(out)/V): mdlm.py's any-order form, k ~ U{1..n} masked, u ~ Beta(k, n-k+1),
(1/k) sum_masked e/r; with p normalised, mdlm.py's NELBO (linear schedule) of the same network. uniform: t = u^2
(weight 2u), as duo.py. T = N (absorb): the N-step bound of sample(steps=N) (analytic predictor), rows stratified over
the steps, weight N: sum_j E KL(q(x_s | x_t, x_0) || p(x_s | x_t)), t_j = j/N, s = t - 1/N; +inf where the network's
step cannot leave a position masked as the data need (loglinear: sum_y p_y > t / (t - s)). The uniform graph has no
N-step bound (a ValueError): near t = 1 its steps of any inexact score have negative numbers where q has mass (+inf).

Sampling. On t_j = j/N from 1 down to 0 (N network calls; default N = L): absorb starts from masks, uniform from
uniformly random tokens at the mask_id positions. Each step from t to s draws each generated position independently:
    sampler="ancestral": their "analytic" predictor (Tweedie tau-leaping, their run_sample.py's), D = sbar(t) - sbar(s):
        p(x_s = y) = [exp(-D Q) e^s]_y exp(D Q)(x_t, y):  absorb: (e^D - 1) e^s_y for y < V, the rest stays m;
        uniform: [(e^-D - 1) / (V e^-D) sum_z e^s_z + e^s_y / e^-D] [(1 - e^-D) / V + e^-D [y = x_t]];
    sampler="euler": their Euler predictor, p(x_s = y) = (t - s) sigma'(t) Q(x_t, y) e^s_y for y != x_t, else x_t.
The last step (s = 0) is their denoiser: the analytic step to sbar = 0, the mask excluded (absorb). A step's numbers
are clamped at 0 and normalised (what their Gumbel-argmax draw does with a negative entry). Their grid
linspace(1, 1e-5, N + 1), then the denoiser, is, up to 1e-5, this one with one more call; ours ends at 0 so that the
N-step bound is this sampler's (theirs would be +inf whenever the step to 1e-5 unmasks more than it can). Other
samplers (confidence, remask...) and temperature / top_k / top_p are ValueErrors.

Conditional (families.py's clean mask C, the prompt; U = the other positions, n = |U| >= 1 per row): C is never
noised (x_t^C = x_0^C, the network sees it) and never scored; the process factorises over positions, so
-log p(x_0^U | x_0^C) is bounded by the same integral summed over U (absorb: the any-order form over U), per row
divided by n, then the mean over rows; likewise the N-step KLs and the uniform prior.
"""
import math

import torch
import torch.nn as nn

from mdlm import MDLM, beta_sample
from model import DiT, row_mean, scored_positions
from sampling import draw, row_chunks, step_grid

PREDICTORS = {"ancestral": "analytic", "euler": "euler"}  # sample()'s sampler -> the predictor of their code


def log_expm1(x):
    """log(e^x - 1) for x > 0 without overflow or cancellation."""
    return x + torch.log(-torch.expm1(-x))


def xlogx(a):
    return torch.xlogy(a, a)


class SEDD(nn.Module):
    def __init__(self, vocab_size, n_embed, n_heads, n_blocks, n_cond, dropout, graph="absorb", noise="loglinear",
                 eps=1e-3, sigma_min=1e-4, sigma_max=20.0, scale_by_sigma=None, antithetic=True, t_eps=1e-3,
                 tied_output=True):
        super().__init__()
        if graph not in ("absorb", "uniform"):
            raise ValueError(f"graph must be absorb or uniform, not {graph!r}")
        if noise not in ("loglinear", "geometric"):
            raise ValueError(f"noise must be loglinear or geometric, not {noise!r}")
        if not (0 < eps < 1 and 0 < sigma_min < sigma_max):
            raise ValueError(f"need 0 < eps < 1 and 0 < sigma_min < sigma_max (eps={eps}, sigma_min={sigma_min}, "
                             f"sigma_max={sigma_max})")
        scale_by_sigma = graph == "absorb" if scale_by_sigma is None else scale_by_sigma
        if scale_by_sigma and graph != "absorb":
            raise ValueError("scale_by_sigma works with graph=absorb only (as in their model)")
        self.vocab_size, self.mask_id = vocab_size, vocab_size  # absorb: the mask; uniform: only "to generate"
        self.absorb, self.noise, self.eps = graph == "absorb", noise, eps
        self.sigma_min, self.sigma_max, self.scale_by_sigma = sigma_min, sigma_max, scale_by_sigma
        self.antithetic, self.t_eps = antithetic, t_eps
        self.n_states = vocab_size + self.absorb
        self.sbar_1 = -math.log(eps) if noise == "loglinear" else sigma_max - sigma_min  # sbar(1), a float
        self.net = DiT(self.n_states, n_embed, n_heads, n_blocks, n_cond, dropout, tied_output=tied_output)

    def null_prompt(self, x0, clean, generator=None):
        """No prompt is the mask (absorb) or uniformly random tokens (uniform: its DiT has no mask row)."""
        if self.absorb:
            return torch.where(clean, torch.full_like(x0, self.mask_id), x0)
        noise = torch.randint(0, self.vocab_size, x0.shape, device=x0.device, generator=generator)
        return torch.where(clean, noise, x0)

    # ---- noise, float64 -----------------------------------------------------------------------------------------
    def sigma(self, t):
        """Their total noise sigma(t), the network's time input."""
        t = torch.as_tensor(t, dtype=torch.float64)
        if self.noise == "loglinear":
            return -torch.log1p(-(1 - self.eps) * t)
        return self.sigma_min ** (1 - t) * self.sigma_max ** t

    def sbar(self, t):
        """The noise since t = 0, sigma(t) - sigma(0)."""
        t = torch.as_tensor(t, dtype=torch.float64)
        if self.noise == "loglinear":
            return self.sigma(t)
        return self.sigma_min * torch.expm1(t * math.log(self.sigma_max / self.sigma_min))

    def dsigma(self, t):
        """sigma'(t) = sbar'(t)."""
        t = torch.as_tensor(t, dtype=torch.float64)
        if self.noise == "loglinear":
            return (1 - self.eps) / (1 - (1 - self.eps) * t)
        return self.sigma(t) * math.log(self.sigma_max / self.sigma_min)

    def hit(self, t):
        """P(x_t^l is noise): absorb masked, m(t) (conditioned on masked at t = 1); uniform replaced, 1 - e^-sbar."""
        p = -torch.expm1(-self.sbar(t))
        return p / -math.expm1(-self.sbar_1) if self.absorb else p

    def time_of_mask_share(self, u):
        """absorb: the t with m(t) = u."""
        sbar = -torch.log1p(u * math.expm1(-self.sbar_1))
        if self.noise == "loglinear":
            return -torch.expm1(-sbar) / (1 - self.eps)
        return torch.log1p(sbar / self.sigma_min) / math.log(self.sigma_max / self.sigma_min)

    def prior(self):
        """uniform: KL(q(x_1^l | x_0^l) || uniform) per position (nats, a float); absorb: 0."""
        if self.absorb:
            return 0.0
        V, a = self.vocab_size, math.exp(-self.sbar_1)
        same, other = a + (1 - a) / V, (1 - a) / V
        return same * math.log(V * same) + (V - 1) * other * math.log(V * other)

    # ---- the network and the score entropy ----------------------------------------------------------------------
    def log_score(self, x_t, t, dtype=torch.float32):
        """s(x_t, t) (B, L, n_states) in dtype, 0 at x_t. t: (B,) in [0, 1]."""
        out = self.net(x_t, self.sigma(t).float().to(x_t.device)).to(dtype)
        if self.scale_by_sigma:
            shift = log_expm1(self.sbar(t)) + math.log(self.n_states - 1)
            out = out - shift.to(device=out.device, dtype=dtype)[:, None, None]
        return out.scatter(-1, x_t[..., None], 0.0)

    def score_entropy(self, s, x_t, x0, t):
        """e per position (B, L) in s's dtype (the formulas at the top of the file); absorb: 0 at unmasked positions."""
        esm1 = torch.expm1(self.sbar(t)).to(device=s.device, dtype=s.dtype)[:, None]  # e^sbar - 1
        s_x0 = s.gather(-1, x0[..., None]).squeeze(-1)
        if self.absorb:
            r = 1 / esm1
            e = s[..., :self.vocab_size].exp().sum(-1) - r * s_x0 + r * (torch.log(r) - 1)
            return torch.where(x_t == self.mask_id, e, torch.zeros((), dtype=s.dtype, device=s.device))
        V = self.vocab_size
        rho = esm1 / (esm1 + V)
        s_xt = s.gather(-1, x_t[..., None]).squeeze(-1)
        neg = s.mean(-1) - s_xt / V
        same = x_t == x0
        neg = torch.where(same, rho * neg, neg + s_x0 / esm1)
        const = torch.where(same, (V - 1) / V * rho * (torch.log(rho) - 1), ((-torch.log(rho) - 1) / rho - (V - 2)) / V)
        exp_s = s.exp()
        pos = exp_s.mean(-1) - exp_s.gather(-1, x_t[..., None]).squeeze(-1) / V
        return pos - neg + const

    def q_sample(self, x0, t, generator=None, clean=None):
        """x_t for the bound: each position noised w.p. hit(t) (t: (B,)); clean (B, L) bool positions never."""
        noised = torch.rand(x0.shape, dtype=torch.float64, device=x0.device, generator=generator) \
            < self.hit(t)[:, None].to(x0.device)
        if clean is not None:
            noised = noised & ~clean
        if self.absorb:
            noise = torch.full_like(x0, self.mask_id)
        else:
            noise = torch.randint(0, self.vocab_size, x0.shape, device=x0.device, generator=generator)
        return torch.where(noised, noise, x0)

    # ---- training -----------------------------------------------------------------------------------------------
    draw_times = MDLM.draw_times  # t in [t_eps, 1]: antithetic (u + i/B) mod 1 with one u per batch, or i.i.d.

    def forward(self, x0, t=None, clean=None):
        """x0: (B, L); t: (B,) (draw_times if None); clean: (B, L) bool, the prompt, or None. loss = bound = one-sample
        estimate of the bound per scored token on [t_eps, 1]: sigma'(t) e + prior, the mean over positions (clean:
        over each row's scored positions, then over rows). Returns (log score, loss, metrics: bound, bpt)."""
        if t is None:
            t = self.draw_times(x0.shape[0], x0.device)
        x_t = self.q_sample(x0, t, clean=clean)
        s = self.log_score(x_t, t)
        integrand = self.dsigma(t).float().to(x0.device)[:, None] * self.score_entropy(s, x_t, x0, t) + self.prior()
        loss = integrand.mean() if clean is None else row_mean(integrand, scored_positions(x0, clean))
        return s, loss, dict(bound=loss.detach(), bpt=loss.detach() / math.log(2))

    # ---- the bound, for evaluate.py -----------------------------------------------------------------------------
    def bound_name(self, T=None):
        return f"{T}-step bound (analytic sampler)" if T else "continuous score-entropy bound"

    def batch_bound(self, x0, offset, generator=None, T=None, clean=None):
        """One unbiased estimate (float64 0-dim, nats per scored token) on a (B, L) batch, offset in [0, 1) stratifying
        it (the top of the file). T = None: absorb, row i masks k_i = 1 + floor((i + offset) n_i / B) of its scored
        positions at u_i ~ Beta(k_i, n_i - k_i + 1) and scores (1/k_i) sum e/r; uniform, row i at t = u_i^2,
        u_i = (i + offset)/B, weight 2 u_i. T = N: row i at step j_i = 1 + floor((i + offset) N / B), weight N."""
        B, L = x0.shape
        dev = x0.device
        scored = torch.ones_like(x0, dtype=torch.bool) if clean is None else scored_positions(x0, clean, check=True)
        i = torch.arange(B, dtype=torch.float64, device=dev)
        if T and not self.absorb:
            raise ValueError("the uniform graph has no finite N-step bound: near t = 1 its analytic and Euler steps of "
                             "any inexact score clamp away mass the data need; use the continuous bound (no --T)")
        if T:
            t, s = step_grid(B, offset, T, i.device)
            x_t = self.q_sample(x0, t, generator, clean)
            p = self.step_probs(self.log_score(x_t, t, torch.float64), x_t, t[:, None], s[:, None], "analytic")
            q = self.posterior(x0, x_t, t[:, None], s[:, None])
            kl = T * (xlogx(q) - torch.xlogy(q, p)).sum(-1) + self.prior()
            return row_mean(kl, scored)
        if self.absorb:
            n = scored.sum(1).double()
            k = torch.minimum(1 + torch.floor((i + offset) / B * n), n)
            t = self.time_of_mask_share(beta_sample(k, n - k + 1, generator))
            order = torch.rand((B, L), dtype=torch.float64, device=dev, generator=generator).masked_fill(~scored, 2.0)
            rank = order.argsort(dim=1).argsort(dim=1)  # the k first ranks: k random scored positions
            x_t = torch.where(rank < k[:, None], torch.full_like(x0, self.mask_id), x0)
            e = self.score_entropy(self.log_score(x_t, t, torch.float64), x_t, x0, t)
            return (e.sum(1) * torch.expm1(self.sbar(t)).to(dev) / k).mean()
        u = (i + offset) / B
        t = (u * u).clamp(min=1e-12)
        x_t = self.q_sample(x0, t, generator, clean)
        e = self.score_entropy(self.log_score(x_t, t, torch.float64), x_t, x0, t)
        return row_mean(2 * (u * self.dsigma(t))[:, None] * e + self.prior(), scored)

    def posterior(self, x0, x_t, t, s):
        """q(x_s | x_t, x_0) (B, L, n_states) float64 of the bound's process; t, s broadcastable to (B, L)."""
        if self.absorb:
            unmask = ((self.hit(t) - self.hit(s)) / self.hit(t)).expand(x_t.shape)
            q = torch.zeros(*x_t.shape, self.n_states, dtype=torch.float64, device=x_t.device)
            q.scatter_(-1, x0[..., None], unmask[..., None].to(q))
            q[..., self.mask_id] = 1 - unmask.to(q)
            still = torch.nn.functional.one_hot(x_t, self.n_states).double()
            return torch.where((x_t == self.mask_id)[..., None], q, still)
        V = self.vocab_size
        D, a_s = (self.sbar(t) - self.sbar(s)).to(x_t.device), torch.exp(-self.sbar(s)).to(x_t.device)
        forward_t = torch.exp(-D)[..., None] * torch.nn.functional.one_hot(x_t, V) + (-torch.expm1(-D) / V)[..., None]
        from_x0 = a_s[..., None] * torch.nn.functional.one_hot(x0, V) + ((1 - a_s) / V)[..., None]
        q = forward_t * from_x0
        return q / q.sum(-1, keepdim=True)

    # ---- sampling -----------------------------------------------------------------------------------------------
    def step_probs(self, s, x_t, t, s_time, predictor):
        """p(x_s | x_t) per position, (..., n_states) float64, from the log score s (..., n_states) at x_t (...);
        t, s_time broadcastable to x_t's shape, s_time = 0: the denoiser. Clamped at 0 and normalised."""
        ratio = s.double().exp()
        t, s_time = torch.as_tensor(t, dtype=torch.float64), torch.as_tensor(s_time, dtype=torch.float64)
        last = (s_time == 0).to(x_t.device).expand(x_t.shape)[..., None]
        stay = torch.nn.functional.one_hot(x_t, self.n_states).double()
        D = (self.sbar(t) - self.sbar(s_time)).to(x_t.device).expand(x_t.shape)[..., None]
        if self.absorb:  # the analytic step, which is also the denoiser
            p = torch.expm1(D) * ratio
            p[..., self.mask_id] = 1 - p[..., :self.vocab_size].sum(-1)
            p = torch.where((x_t == self.mask_id)[..., None], p, stay)
        else:
            e = torch.exp(-D)
            staggered = (e - 1) / (self.vocab_size * e) * ratio.sum(-1, keepdim=True) + ratio / e
            p = staggered * (stay * e - torch.expm1(-D) / self.vocab_size)
        if predictor == "euler":
            move = ratio.scatter(-1, x_t[..., None], 0.0)
            if self.absorb:
                move = move * (x_t == self.mask_id)[..., None]
                move[..., self.mask_id] = 0
            else:
                move = move / self.vocab_size
            move = move * ((t - s_time) * self.dsigma(t)).to(x_t.device).expand(x_t.shape)[..., None]
            p = torch.where(last, p, move + stay * (1 - move.sum(-1, keepdim=True)))
        elif predictor != "analytic":
            raise ValueError(f"unknown predictor {predictor!r} (analytic or euler)")
        if self.absorb:
            p[..., self.mask_id] = p[..., self.mask_id].masked_fill(last[..., 0], 0.0)
        p = p.clamp(min=0)
        return p / p.sum(-1, keepdim=True)

    @torch.no_grad()
    def sample(self, x, steps=None, generator=None, callback=None, cache=True, sampler="ancestral", temperature=1.0,
               top_k=0, top_p=1.0, **opts):
        """Fill the mask_id positions of x (B, L) in N = steps calls (default L) on t_j = j/N, the predictor of
        PREDICTORS[sampler] and the denoiser last (the top of the file); given tokens never change, cache is unused.
        Each step's float64 work goes a chunk of generated positions at a time (sampling.row_chunks), its uniforms
        drawn first (the samples do not depend on the chunks). Returns (samples, network calls)."""
        if sampler not in PREDICTORS:
            raise ValueError(f"SEDD samples with ancestral (their analytic predictor) or euler, not {sampler!r}")
        if opts or (temperature, top_k, top_p) != (1.0, 0, 1.0):
            raise ValueError("the SEDD samplers draw from the model's steps as they are: no temperature, top_k, top_p "
                             f"or {', '.join(opts) or 'other option'}")
        B, L = x.shape
        steps = steps or L
        generate = x == self.mask_id
        rows, cols = generate.nonzero(as_tuple=True)
        z = x.clone()
        if not self.absorb:
            z[generate] = torch.randint(0, self.vocab_size, (len(rows),), device=x.device, generator=generator)
        for j in range(steps, 0, -1):
            t = torch.full((B,), j / steps, dtype=torch.float64, device=x.device)
            s = self.log_score(z, t)
            u = torch.rand(len(rows), dtype=torch.float64, device=x.device, generator=generator)
            new = torch.empty_like(rows)
            for part in row_chunks(len(rows), self.n_states):
                p = self.step_probs(s[rows[part], cols[part]], z[rows[part], cols[part]], t[rows[part]],
                                    t[rows[part]] - 1 / steps if j > 1 else 0.0, PREDICTORS[sampler])
                new[part] = draw(p.log(), u=u[part])
            del s
            z[rows, cols] = new
            if callback is not None:
                callback(z, t)
        return z, steps
