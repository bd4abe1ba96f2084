"""
Masked diffusion in continuous time (MDLM, Sahoo et al. 2024; MD4, Shi et al. 2024).

Forward process. Token ids 0..V-1, mask id m = V. A schedule alpha(t), t in [0, 1], decreasing from
alpha(0) = 1 to alpha(1) = 0, is the probability that a token is still clean at time t:
    linear: alpha(t) = 1 - t          cosine: alpha(t) = 1 - cos(pi/2 (1 - t))
    q(x_t | x_0): each token independently stays x_0 w.p. alpha(t), else becomes m.

Reverse model ("SUBS"). The DiT predicts p(x_0 | x_t) with the mask logit at -inf; unmasked positions
are carried over and cost nothing. With time_conditioning=False the network sees a constant time (the
true p(x_0 | x_t) does not depend on t: masking is independent of content).

Objective: the continuous-time negative ELBO (the T -> inf limit of the D3PM bound), nats per sequence,
    NELBO(x_0) = int_0^1 w(t) E_{x_t ~ q(.|x_0)} [ sum_{l: x_t^l = m} -log p(x_0^l | x_t) ] dt,
    w(t) = -alpha'(t) / (1 - alpha(t))            (linear: 1/t).
Training draws t per sequence, antithetically by default (t_i = (u + i/B) mod 1, one u per batch),
squeezed into [t_eps, 1] (the weight 1/t makes t -> 0 draws rare but huge). loss_weighting="masked_ce"
trains on the unweighted masked cross-entropy instead (weight 1 for every masked token, as the D3PM's
auxiliary term weighs it: same minimiser, another path); the bound and its evaluation stay the NELBO.

Evaluation integrates all of [0, 1] exactly, without the 1/t variance. Substitute u = 1 - alpha(t) (the
masking probability, w(t) dt = du / u) and condition on k = the number of masked tokens, k ~ Bin(L, u):
    int_0^1 (1/u) C(L,k) u^k (1-u)^(L-k) du = 1/k,   and given k, u ~ Beta(k, L - k + 1), so
    NELBO(x_0) / L = E_{k ~ U{1..L}} E_{u ~ Beta(k, L-k+1)} E_{k random positions masked}
                     [ (1/k) sum_{masked l} -log p(x_0^l | x_t) ],   t = alpha^{-1}(1 - u):
the mean cross-entropy over the masked positions of a uniformly random number of masked positions
(the "any-order autoregressive" form), with k stratified over the batch. Every term is bounded.
The discrete T-step bound (what a T-step ancestral sampler is scored by) is
    L_T = sum_{i=1}^T E[ (alpha(s_i) - alpha(t_i)) / (1 - alpha(t_i)) sum_{masked} -log p(x_0 | x_{t_i}) ],
    t_i = i/T, s_i = (i-1)/T,  and L_T decreases to the NELBO as T grows.

Conditional (families.py's clean mask C, the prompt; U = the other positions, n = |U| >= 1 per row). Only U
is noised: x_t^C = x_0^C always, and the network sees it. Everything above holds for the masked positions
of U with x_0^C as fixed context, so
    -log p(x_0^U | x_0^C) <= NELBO(x_0^U | x_0^C) = int_0^1 w(t) E[ sum_{l in U, masked} -log p(x_0^l | x_t) ] dt,
with k ~ Bin(n, u), the any-order form E_{k ~ U{1..n}} E_{u ~ Beta(k, n-k+1)} E_{k random of U masked}[(1/k) sum]
of NELBO / n, and L_T likewise. Loss, metrics["bound"] and batch_bound are mean over rows of (row bound) / n.
"""
import math

import torch
import torch.nn as nn

from model import CrossEntropy, DiT
from sampling import (confidence_decode, draw, remask_decode, sdtt_loss, step_grid, threshold_decode,
                      unmask_at_event_times)


class MDLM(nn.Module):
    def __init__(self, vocab_size, n_embed, n_heads, n_blocks, n_cond, dropout, schedule="linear",
                 time_conditioning=False, antithetic=True, t_eps=1e-3, loss_weighting="elbo",
                 tied_output=True):
        super().__init__()
        if schedule not in ("linear", "cosine"):
            raise ValueError(f"schedule must be linear or cosine, not {schedule!r}")
        if loss_weighting not in ("elbo", "masked_ce"):
            raise ValueError(f"loss_weighting must be elbo or masked_ce, not {loss_weighting!r}")
        self.loss_weighting = loss_weighting
        self.vocab_size = vocab_size
        self.mask_id = vocab_size
        self.schedule, self.time_conditioning = schedule, time_conditioning
        self.antithetic, self.t_eps = antithetic, t_eps
        self.net = DiT(vocab_size + 1, n_embed, n_heads, n_blocks, n_cond, dropout, tied_output=tied_output)

    # ---- schedule -----------------------------------------------------------------------------------
    def alpha(self, t):
        """P(token still clean at time t), float64."""
        t = torch.as_tensor(t, dtype=torch.float64)
        if self.schedule == "linear":
            return 1 - t
        return 1 - torch.cos(math.pi / 2 * (1 - t))

    def alpha_inverse(self, a):
        """The t with alpha(t) = a, float64."""
        a = torch.as_tensor(a, dtype=torch.float64)
        if self.schedule == "linear":
            return 1 - a
        return 1 - torch.acos((1 - a).clamp(-1, 1)) * 2 / math.pi

    def weight(self, t):
        """w(t) = -alpha'(t) / (1 - alpha(t)), float64."""
        t = torch.as_tensor(t, dtype=torch.float64)
        if self.schedule == "linear":
            return 1 / t
        return (math.pi / 2) * torch.sin(math.pi / 2 * (1 - t)) / torch.cos(math.pi / 2 * (1 - t))

    # ---- network --------------------------------------------------------------------------------------
    def logits(self, x_t, t):
        """Logits of p(x_0 | x_t), mask at -inf. t: (B,) float in [0, 1] (ignored without time conditioning)."""
        t_in = 1000 * t.float() if self.time_conditioning else torch.zeros(x_t.shape[0], device=x_t.device)
        logits = self.net(x_t, t_in)
        logits[..., self.mask_id] = float("-inf")
        return logits

    def q_sample(self, x0, t, generator=None, clean=None):
        """x_t ~ q(x_t | x_0): mask each token independently w.p. 1 - alpha(t). t: (B,) or per token (B, L).
        clean (B, L) bool: those positions stay x_0 (the same uniforms are drawn: the stream is unchanged)."""
        keep = self.alpha(t).to(x0.device)
        keep = keep[:, None] if keep.dim() == 1 else keep
        u = torch.rand(x0.shape, dtype=torch.float64, device=x0.device, generator=generator)
        return hold(torch.where(u < keep, x0, torch.full_like(x0, self.mask_id)), x0, clean)

    def masked_ce(self, logits, x0, x_t):
        """Per-token -log p(x_0 | x_t) on masked positions, 0 elsewhere: (B, L) float32."""
        ce = CrossEntropy.apply(logits.flatten(0, 1), x0.flatten()).view(x0.shape)
        return ce * (x_t == self.mask_id)

    # ---- training -------------------------------------------------------------------------------------
    def draw_times(self, B, device, generator=None):
        """t in [t_eps, 1]: antithetic (u + i/B) mod 1 with one u per batch, or i.i.d. uniform."""
        if self.antithetic:
            u = torch.rand((), dtype=torch.float64, device=device, generator=generator)
            r = (u + torch.arange(B, dtype=torch.float64, device=device) / B) % 1
        else:
            r = torch.rand(B, dtype=torch.float64, device=device, generator=generator)
        return self.t_eps + (1 - self.t_eps) * r

    def forward(self, x0, t=None, clean=None):
        """x0: (B, L). t: (B,) float times, drawn by draw_times if None. clean: (B, L) bool, the prompt (never
        masked, never scored), or None; n_b = the row's unclean positions (L without clean).
        bound = mean_b w(t_b) sum_l masked_ce / n_b  (a one-sample estimate of NELBO/n on [t_eps, 1]);
        loss = bound (loss_weighting "elbo"), or mean_b sum_l masked_ce / n_b ("masked_ce": every masked token
        weighs 1 whatever its t, the weighting the D3PM's auxiliary cross-entropy gives it; not a bound).
        Returns (logits, loss, metrics): ce (mean masked cross-entropy), bound and bpt, all 0-dim tensors."""
        B, L = x0.shape
        if t is None:
            t = self.draw_times(B, x0.device)
        x_t = hold(self.q_sample(x0, t), x0, clean)
        logits = self.logits(x_t, t)
        ce = self.masked_ce(logits, x0, x_t)
        n = L if clean is None else scored(clean).clamp(min=1).float()  # (a row with none would score 0)
        bound = (self.weight(t).float().to(x0.device) * ce.sum(1) / n).mean()
        if self.loss_weighting == "elbo":
            loss = bound
        else:
            loss = ce.sum() / (B * L) if clean is None else (ce.sum(1) / n).mean()
        n_masked = (x_t == self.mask_id).sum().clamp(min=1)
        metrics = dict(ce=(ce.sum() / n_masked).detach(), bound=bound.detach(), bpt=bound.detach() / math.log(2))
        return logits, loss, metrics

    distill_defaults = ("SDTT", 1024, 7)  # distill.py: the method, its first teacher steps and rounds (SDTT's paper)

    def distill_loss(self, teacher, x0, steps):
        """SDTT (sampling.sdtt_loss) for distill.py: the student (self) learns to take in one step from t the
        teacher's two steps of 1/steps, at t drawn per sequence on the student's grid {2j / steps}."""
        j = torch.randint(1, steps // 2 + 1, (x0.shape[0],), device=x0.device)
        t = 2 * j.double() / steps
        x_t = self.q_sample(x0, t)
        return sdtt_loss(self.logits(x_t, t), teacher.logits, x_t, [t, t - 1 / steps, t - 2 / steps], self.alpha,
                         self.mask_id)

    # ---- the bound, for evaluate.py ---------------------------------------------------------------------
    def bound_name(self, T=None):
        return f"{T}-step bound" if T else "continuous NELBO"

    def batch_bound(self, x0, offset, generator=None, T=None, clean=None):
        """One unbiased estimate (float64 0-dim, nats/token) of the bound on a (B, L) batch; offset in [0, 1)
        stratifies the batch. clean (B, L) bool: the prompt, given (see the top of this file); n_i = row i's
        unclean positions (L without clean): the estimate is of mean_i NELBO(x_0^U | x_0^C)_i / n_i.
        T = None: the whole continuous NELBO: row i gets k_i = 1 + floor((i + offset) n_i / B) of its unclean
        positions masked at random, u_i ~ Beta(k_i, n_i - k_i + 1), and scores the mean masked cross-entropy.
        With the rows in random order each row's stratum (i + offset)/B is uniform on [0, 1), so its k_i is
        uniform on 1..n_i and the batch mean is unbiased. T = N: the N-step bound, row i at step
        j_i = 1 + floor((i + offset) N / B), weight N, its masked cross-entropy divided by n_i."""
        B, L = x0.shape
        dev = x0.device
        i = torch.arange(B, dtype=torch.float64, device=dev)
        n = torch.full((B,), float(L), dtype=torch.float64, device=dev) if clean is None else scored(clean, True)
        if T:
            t, s = step_grid(B, offset, T, i.device)
            x_t = hold(self.q_sample(x0, t, generator), x0, clean)
            w = (self.alpha(s) - self.alpha(t)) / (1 - self.alpha(t))
            ce = self.masked_ce(self.logits(x_t, t), x0, x_t).double().sum(1)
            return T * (w.to(dev) * ce).mean() / L if clean is None else T * (w.to(dev) * ce / n).mean()
        k = torch.minimum(1 + torch.floor((i + offset) / B * n), n)
        u = beta_sample(k, n - k + 1, generator)
        t = self.alpha_inverse(1 - u)
        score = torch.rand((B, L), dtype=torch.float64, device=dev, generator=generator)
        if clean is not None:
            score = torch.where(clean, 2.0, score)  # the prompt last: the k first ranks are unclean positions
        rank = score.argsort(dim=1).argsort(dim=1)  # a uniformly random order of the (unclean) positions
        x_t = torch.where(rank < k[:, None].to(dev), torch.full_like(x0, self.mask_id), x0)
        ce = self.masked_ce(self.logits(x_t, t.to(dev)), x0, x_t).double().sum(1)
        return (ce / k.to(dev)).mean()

    # ---- sampling ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def sample_ancestral(self, x, steps, generator=None):
        """The reference `steps`-step ancestral sampler, line by line as in the MDLM paper. x: (B, L) ids with
        mask_id where tokens are to be generated. For j = steps..1, t_j = j/steps: predict p(x_0 | x_t) at t_j
        and unmask each masked position w.p. (alpha(t_{j-1}) - alpha(t_j)) / (1 - alpha(t_j)) to a draw from it;
        at j = 1 that is 1 (alpha(0) = 1, set exactly: the float cosine gives 1 - 1e-16), so nothing stays
        masked. Given tokens never change. `steps` network calls."""
        x = x.clone()
        for j in range(steps, 0, -1):
            t, s = j / steps, (j - 1) / steps
            logits = self.logits(x, torch.full((x.shape[0],), t, dtype=torch.float64, device=x.device))
            p = (self.alpha(s) - self.alpha(t)) / (1 - self.alpha(t)) if j > 1 else 1.0  # alpha(0) = 1
            u = torch.rand(x.shape, dtype=torch.float64, device=x.device, generator=generator)
            unmask = (x == self.mask_id) & (u < p)
            x[unmask] = draw(logits[unmask], generator)
        return x

    @torch.no_grad()
    def sample(self, x, steps=None, generator=None, callback=None, cache=True, sampler="ancestral", **opts):
        """Ancestral sampling of the masked positions of x (B, L); given tokens are never changed.
        steps=N: the exact fast version of sample_ancestral(x, N) (same output distribution, <= N calls).

        Which positions unmask when does not depend on the network, so the unmask time tau of every
        masked position (and the uniform that draws its token) is drawn first; then the network is called
        only at the distinct taus of each row (first-hitting: a step where nothing unmasks changes nothing,
        and without time conditioning the prediction could not change either: exact caching).
        steps=N: the ancestral sampler on the grid t_j = j/N; from t_j to t_{j-1} a masked token unmasks
        w.p. (alpha(t_{j-1}) - alpha(t_j)) / (1 - alpha(t_j)), i.e. P(tau = t_j) = alpha(t_{j-1}) - alpha(t_j).
        cache=False calls the network at all N steps instead (identical samples, for comparison).
        steps=None: the continuous process, tau = alpha^{-1}(U) with U uniform: positions unmask one at a
        time, in a uniformly random order (every call has an event: cache changes nothing).
        opts: temperature, top_k, top_p (sampling.draw; the defaults keep the sampler exact).
        sampler="confidence": sampling.confidence_decode in `steps` calls (default L) at t = (S - j)/S,
        with opts score and schedule too. sampler="remask": sampling.remask_decode (ReMDM) on the `steps`-step grid
        (default L), opt eta. sampler="threshold": sampling.threshold_decode, opt threshold (default 0.9; steps is
        ignored), a row with masked share s called at t = alpha^{-1}(1 - s), the time whose masking probability
        is s. Returns (samples, network calls)."""
        return self.denoise(self.logits, x, steps, generator, callback, cache, sampler, **opts)

    def denoise(self, logits_fn, x, steps=None, generator=None, callback=None, cache=True, sampler="ancestral",
                whole_batch=False, **opts):
        """sample() with logits_fn(x_t, t) for the network (bd3lm.py denoises one block with it)."""
        B, L = x.shape
        if sampler == "confidence":
            S = steps or L
            times = [(S - j) / S for j in range(S)]
            return confidence_decode(logits_fn, x, times, self.mask_id, generator, callback, **opts)
        if sampler == "remask":
            S = steps or L
            times = [(S - j) / S for j in range(S + 1)]
            return remask_decode(logits_fn, x, times, self.alpha, self.mask_id, generator, callback, **opts)
        if sampler == "threshold":
            return threshold_decode(logits_fn, x, self.mask_id, opts.pop("threshold", 0.9), generator, callback,
                                    time_of=lambda s: self.alpha_inverse(1 - s), whole_batch=whole_batch, **opts)
        if sampler != "ancestral":
            raise ValueError(f"unknown sampler {sampler!r} (ancestral, confidence, remask or threshold)")
        dev = x.device
        every_step = None
        if steps is None:
            tau = self.alpha_inverse(torch.rand((B, L), dtype=torch.float64, device=dev, generator=generator))
            tau = tau.clamp(min=1e-300)  # 0 means "nothing to do"
        else:
            grid = torch.arange(steps + 1, dtype=torch.float64, device=dev) / steps
            p = (self.alpha(grid[:-1]) - self.alpha(grid[1:])).clamp(min=0)
            j = torch.multinomial(p, B * L, replacement=True, generator=generator).view(B, L) + 1
            tau = j.double() / steps
            every_step = None if cache else grid[1:].flip(0)
        u = torch.rand((B, L), dtype=torch.float64, device=dev, generator=generator)
        return unmask_at_event_times(logits_fn, x, tau, u, self.mask_id, callback, every_step, whole_batch, **opts)


def hold(x_t, x0, clean):
    """x_t with the clean positions (the prompt, (B, L) bool, or None: none) reset to x_0."""
    return x_t if clean is None else torch.where(clean, x0, x_t)


def scored(clean, check=False):
    """The number of unclean (scored) positions per row, (B,) float64. check: raise ValueError if a row has
    none (its bound per scored token is undefined; a host sync, for evaluation only)."""
    n = (~clean).sum(1).double()
    if check and bool((n == 0).any()):
        raise ValueError("clean: every row needs at least one position that is not given")
    return n


def beta_sample(a, b, generator):
    """Beta(a, b) draws for integer a, b >= 1 (float64 tensors) with a generator: the a-th smallest of
    a + b - 1 uniforms."""
    n = int((a + b - 1).max())
    u = torch.rand((a.shape[0], n), dtype=torch.float64, generator=generator, device=a.device)
    valid = torch.arange(n, device=a.device)[None, :] < (a + b - 1)[:, None]
    u = torch.where(valid, u, torch.full_like(u, 2.0)).sort(dim=1).values
    return u.gather(1, (a.long() - 1)[:, None]).squeeze(1)
