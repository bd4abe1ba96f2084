"""
Absorbing ("masking") D3PM (Austin et al. 2021) with T discrete steps.

Forward process. Token ids 0..V-1, mask id m = V, K = V + 1 classes.
    beta_t = 1 / (T - t + 1),  alpha_bar_t = prod_{s<=t} (1 - beta_s) = 1 - t/T,  alpha_bar_T = 0
    q(x_t | x_0): each token independently stays x_0 w.p. alpha_bar_t, else becomes m.

Reverse model. The DiT predicts p(x_0 | x_t) (mask logit forced to -inf). The posterior of one
step for a masked x_{t+1} puts mass w_t on x_0 and 1 - w_t on m, with
    w_t = (alpha_bar_t - alpha_bar_{t+1}) / (1 - alpha_bar_{t+1})        (= 1/(t+1) here),
and the model's posterior puts w_t * p(x_0 = k | x_{t+1}) on each k and 1 - w_t on m. Hence
    KL(q(x_t | x_{t+1}, x_0) || p(x_t | x_{t+1})) = w_t * (-log p(x_0 | x_{t+1}))  if x_{t+1} = m
                                                   = 0                              otherwise,
a weighted cross-entropy: no (B, L, K) posterior tensor is ever built.

Objective (nanoDD): t ~ U{0..T-1} per sequence, the network sees (x_{t+1}, t+1); per token
    loss = kl + lambda_ce * ce   (t >= 1),     loss = ce   (t = 0, the reconstruction term),
with ce = -log p(x_0 | x_{t+1}) at every position. The T-step bound in nats per token is
    L_T = sum_{t=1}^{T-1} E[kl_t] + E[ce_0] = (T-1) E_{t~U{1..T-1}}[kl_t] + E[ce_0].

Conditional (families.py's clean: the prompt P given, the answer A = the other positions). q masks only A; the
network always sees the prompt; per row the bound on -log p(x_A | x_P) is
    L_T(A | P) = sum_{t=1}^{T-1} E[sum_{l in A} kl_t,l] + E[sum_{l in A} ce_0,l],
and the loss, the metrics and batch_bound report the mean over rows of L_T(A | P) / |A| (clean=None: A = all).
"""
import math

import torch
import torch.nn as nn

from model import CrossEntropy, DiT
from sampling import confidence_decode, draw, remask_decode, sdtt_loss, threshold_decode, unmask_at_event_times


class D3PMAbsorbing(nn.Module):
    def __init__(self, vocab_size, n_embed, n_heads, n_blocks, n_cond, dropout, T, lambda_ce):
        super().__init__()
        self.vocab_size = vocab_size
        self.mask_id = vocab_size
        self.T = T
        self.lambda_ce = lambda_ce
        self.net = DiT(vocab_size + 1, n_embed, n_heads, n_blocks, n_cond, dropout)
        t = torch.arange(T + 1, dtype=torch.float64)
        betas = torch.where(t == 0, torch.zeros_like(t), 1.0 / (T - t + 1))
        alpha_bars = torch.cumprod(1 - betas, dim=0)
        self.register_buffer("betas", betas.float())  # float32 copies: the checkpoints hold these
        self.register_buffer("alpha_bars", alpha_bars.float())
        self.register_buffer("ab64", alpha_bars, persistent=False)  # float64, used in all the math

    # ---- forward process -------------------------------------------------------------------
    def q_sample(self, x0, t, generator=None):
        """Draw x_t ~ q(x_t | x_0): mask each token independently w.p. 1 - alpha_bar_t. t: (B,) long."""
        keep = self.ab64[t][:, None]
        u = torch.rand(x0.shape, dtype=torch.float64, device=x0.device, generator=generator)
        return torch.where(u < keep, x0, torch.full_like(x0, self.mask_id))

    def unmask_prob(self, t):
        """P(a masked x_t becomes unmasked in x_{t-1}) = (alpha_bar_{t-1} - alpha_bar_t) / (1 - alpha_bar_t)."""
        ab = self.ab64
        return (ab[t - 1] - ab[t]) / (1 - ab[t])

    # ---- objective -------------------------------------------------------------------------
    def logits(self, x, t):
        """Network logits for p(x_0 | x_t) with time t (float step index), mask logit set to -inf."""
        logits = self.net(x, t.float())
        logits[..., self.mask_id] = float("-inf")
        return logits

    def loss_terms(self, logits, x0, x_noisy, t):
        """Per-token (kl, ce), each (B, L), for the KL term of index t (B,) given x_noisy = x_{t+1}.

        kl = w_t * ce on masked positions (0 elsewhere and for t = 0); ce at every position.
        """
        ce = CrossEntropy.apply(logits.flatten(0, 1), x0.flatten()).view(x0.shape)  # float32
        ab = self.ab64
        w = ((ab[t] - ab[t + 1]) / (1 - ab[t + 1])).float()
        w = torch.where(t >= 1, w, torch.zeros_like(w))
        kl = w[:, None] * ce * (x_noisy == self.mask_id)
        return kl, ce

    @staticmethod
    def row_means(v, clean):
        """(B,) mean of v (B, L) over each row's scored positions (~clean; at least one counted)."""
        scored = ~clean
        return (v * scored).sum(1) / scored.sum(1).clamp(min=1)

    def noise(self, x0, t, generator=None, clean=None):
        """x_t ~ q(x_t | x_0) with the clean positions kept (the draws of q_sample for every position: the same
        random stream as without clean)."""
        x_noisy = self.q_sample(x0, t, generator) if generator is not None else self.q_sample(x0, t)
        return x_noisy if clean is None else torch.where(clean, x0, x_noisy)

    def forward(self, x0, t=None, clean=None):
        """x0: (B, L) clean ids. t: (B,) long in {0..T-1}, drawn uniformly if None. clean: (B, L) bool or None,
        the prompt (never noised, never scored; each row normalised by its unclean positions).

        Returns (logits, loss, metrics) with metrics kl, ce, l_T (nats/token), bpt (bits/token),
        all 0-dim tensors (no host sync here).
        """
        B = x0.shape[0]
        if t is None:
            t = torch.randint(0, self.T, (B,), device=x0.device)
        x_noisy = self.noise(x0, t + 1, clean=clean)
        logits = self.logits(x_noisy, t + 1)
        kl, ce = self.loss_terms(logits, x0, x_noisy, t)

        is_kl = (t >= 1)[:, None]  # (B, 1)
        per_tok = torch.where(is_kl, kl + self.lambda_ce * ce, ce)
        n_kl, n_ce = is_kl.sum(), (~is_kl).sum()
        if clean is None:
            loss = per_tok.mean()
            L = x0.shape[1]
            kl_mean = (kl * is_kl).sum() / (n_kl * L).clamp(min=1)
            ce0_mean = (ce * ~is_kl).sum() / (n_ce * L).clamp(min=1)
            ce_mean = ce.mean()
        else:  # per row: sums over the answer / its length, then the mean over rows
            kl_r, ce_r = self.row_means(kl, clean), self.row_means(ce, clean)
            loss = self.row_means(per_tok, clean).mean()
            kl_mean = (kl_r * is_kl[:, 0]).sum() / n_kl.clamp(min=1)
            ce0_mean = (ce_r * ~is_kl[:, 0]).sum() / n_ce.clamp(min=1)
            ce_mean = ce_r.mean()
        l_T = torch.where(n_ce > 0, kl_mean * (self.T - 1) + ce0_mean, kl_mean * self.T)
        metrics = dict(kl=kl_mean.detach(), ce=ce_mean.detach(), l_T=l_T.detach(), bound=l_T.detach(),
                       bpt=l_T.detach() / math.log(2))
        return logits, loss, metrics

    distill_defaults = ("SDTT", 1024, 7)  # distill.py: the method, its first teacher steps and rounds (SDTT's paper)

    def distill_loss(self, teacher, x0, steps):
        """SDTT (sampling.sdtt_loss) for distill.py: the student (self) learns to take in one step from t the
        teacher's two steps of T/steps, at t drawn per sequence on the student's grid {2j T / steps} (rounded)."""
        j = torch.randint(1, steps // 2 + 1, (x0.shape[0],), device=x0.device)
        t, mid, s = ((2 * j - k) * self.T / steps for k in (0, 1, 2))
        t, mid, s = t.round().long(), mid.round().long(), s.round().long()
        x_t = self.q_sample(x0, t)
        return sdtt_loss(self.logits(x_t, t), teacher.logits, x_t, [t, mid, s], lambda i: self.ab64[i], self.mask_id)

    def bound_name(self, T=None):
        return f"{self.T}-step bound"

    def batch_bound(self, x0, offset, generator=None, T=None, clean=None):
        """One unbiased, stratified estimate of L_T (nats/token, float64 0-dim) from a (B, L) batch; offset U in
        [0, 1). B >= 2: row 0 is scored at t = 0 (the reconstruction term, weight 1); rows i = 1..B-1 at
        t_i = 1 + floor((i - 1 + U)(T - 1)/(B - 1)): every stratum of {1..T-1} once, each t_i uniform in
        its stratum, so (T - 1) mean_i kl_{t_i} + ce_0 has expectation L_T. B = 1: the row takes t = floor(U T),
        uniform on {0..T-1}, and scores T ce_0 (t = 0) or T kl_t, whose expectation is ce_0 + sum_t kl_t = L_T.
        clean (B, L) bool: the prompt is never noised, and each row scores the sums over its answer / its length,
        so the expectation (rows in random order) is the mean over rows of L_T(A | P) / |A|. T: only the model's own."""
        if T not in (None, self.T):
            raise ValueError(f"the D3PM's bound has its own T = {self.T}; --T applies to continuous-time models")
        B, T = x0.shape[0], self.T

        def per_row(v):  # (B,) float64: the mean over each row's scored positions
            return v.double().mean(1) if clean is None else self.row_means(v.double(), clean)
        if B == 1:
            t = torch.full((1,), min(int(offset * T), T - 1), dtype=torch.long, device=x0.device)
            x_noisy = self.noise(x0, t + 1, generator, clean)
            kl, ce = self.loss_terms(self.logits(x_noisy, t + 1), x0, x_noisy, t)
            return T * per_row(ce if int(t) == 0 else kl)[0]
        i = torch.arange(B - 1, device=x0.device, dtype=torch.float64)
        t_kl = 1 + torch.floor((i + offset) / (B - 1) * (T - 1)).long().clamp(max=T - 2)
        t = torch.cat([torch.zeros(1, dtype=torch.long, device=x0.device), t_kl])
        x_noisy = self.noise(x0, t + 1, generator, clean)
        kl, ce = self.loss_terms(self.logits(x_noisy, t + 1), x0, x_noisy, t)
        if clean is None:
            return (T - 1) * kl[1:].double().mean() + ce[0].double().mean()
        return (T - 1) * per_row(kl)[1:].mean() + per_row(ce)[0]

    # ---- sampling ----------------------------------------------------------------------------
    @torch.no_grad()
    def sample_ancestral(self, x, generator=None):
        """The reference T-step sampler. x: (B, L) ids with mask_id where tokens are to be generated.
        For t = T..1, predict p(x_0 | x_t) and unmask each masked position w.p. unmask_prob(t) to a draw
        from it (unmask_prob(1) = 1, so nothing is masked at the end). T network calls."""
        x = x.clone()
        for t in range(self.T, 0, -1):
            logits = self.logits(x, torch.full((x.shape[0],), t, device=x.device))
            u = torch.rand(x.shape, dtype=torch.float64, device=x.device, generator=generator)
            unmask = (x == self.mask_id) & (u < self.unmask_prob(t))
            x[unmask] = draw(logits[unmask], generator)
        return x

    @torch.no_grad()
    def sample(self, x, steps=None, generator=None, callback=None, cache=True, sampler="ancestral", **opts):
        """Exact fast version of sample_ancestral (same output distribution), or a coarse-grid one.

        Which positions unmask at which step does not depend on the network: a position masked at T
        unmasks at step tau with P(tau = t) = alpha_bar_{t-1} - alpha_bar_t, independently. So draw
        every tau first, then call the network only at the distinct taus of each sequence
        (unmask_at_event_times). With steps=N < T, each tau is moved up to the next point of an N-step
        grid: that is the exact skip-step posterior between grid points,
        P(unmask from s to t) = (ab_t - ab_s)/(1 - ab_s).

        x: (B, L) ids, mask_id where to generate (given tokens are never changed).
        callback(x, t) is called after each network call. cache=False calls the network at every step
        of the grid instead (same samples: for comparison). opts: temperature, top_k, top_p (sampling.draw;
        the defaults keep the sampler exact). sampler="confidence": sampling.confidence_decode in `steps`
        calls (default T) instead, with opts score and schedule too; sampler="remask": sampling.remask_decode
        (ReMDM) on the `steps`-step grid, opt eta; sampler="threshold": sampling.threshold_decode, opt threshold
        (default 0.9; steps is ignored), a row with masked share s called at step round(s T) (at least 1), the
        step whose masked share 1 - alpha_bar_t = t/T is nearest. Returns (samples, network calls).
        """
        if sampler == "confidence":
            S = steps or self.T
            times = [self.T * (S - j) / S for j in range(S)]
            return confidence_decode(self.logits, x, times, self.mask_id, generator, callback, **opts)
        if sampler == "remask":
            S = steps or self.T
            times = [round(self.T * (S - j) / S) for j in range(S + 1)]
            return remask_decode(self.logits, x, times, lambda t: self.ab64[t], self.mask_id, generator, callback,
                                 **opts)
        if sampler == "threshold":
            return threshold_decode(self.logits, x, self.mask_id, opts.pop("threshold", 0.9), generator, callback,
                                    time_of=lambda s: (s * self.T).round().clamp(min=1), **opts)
        if sampler != "ancestral":
            raise ValueError(f"unknown sampler {sampler!r} (ancestral, confidence, remask or threshold)")
        B, L = x.shape
        ab = self.ab64
        p_tau = ab[:-1] - ab[1:]  # P(tau = t) for t = 1..T
        tau = torch.multinomial(p_tau, B * L, replacement=True, generator=generator).view(B, L) + 1
        grid = torch.arange(self.T + 1, device=x.device)
        if steps is not None and steps < self.T:
            grid = torch.linspace(0, self.T, steps + 1, dtype=torch.float64, device=x.device).round().long().unique()
            tau = grid[torch.searchsorted(grid, tau)]  # the smallest grid point >= tau
        u = torch.rand((B, L), dtype=torch.float64, device=x.device, generator=generator)
        every_step = None if cache else grid[1:].flip(0)
        return unmask_at_event_times(self.logits, x, tau, u, self.mask_id, callback, every_step, **opts)
