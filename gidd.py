"""
GIDD: Generalized Interpolating Discrete Diffusion (von Rutte et al., ICML 2025), its hybrid mask + uniform noise.

Forward process. Tokens 0..V-1, mask m = V. Each token independently, at time t in [0, 1]:
    q_t(z | x) = alpha_t onehot(x) + beta_t pi_t,  alpha_t = (1 - t) / C_t,  beta_t pi_t = (t onehot(m) + c_t u) / C_t,
    c_t = B t^(g/2) (1 - t)^(g/2),   C_t = 1 + c_t,   B = 2^g p / (1 - p),   g = 1,   u = uniform over the V tokens,
p = max(p_uniform, e^-20) (GIDD's code: p_uniform = 0 leaves c_t < 3e-9, masked diffusion up to ~1e-8). So z_t is the
mask w.p. t / C_t and a uniformly random token w.p. c_t / C_t, a share that is 0 at both ends and peaks at t = 1/2 at
exactly p. q_1 = onehot(m): the prior is all masks. The process is Markov: from s to t > s a token stays w.p.
alpha_t|s = alpha_t / alpha_s, else it is drawn from beta_t pi_t - alpha_t|s beta_s pi_s (>= 0: t/(1-t) and c_t/(1-t)
grow with t).

Reverse model. The DiT reads z_t and t (the time itself, clamped to [t_eps, 1 - t_eps], as GIDD's network) and predicts
x_hat = p(x | z_t) over the V tokens (the mask logit is dropped). With q_r(. | x_hat) = alpha_r x_hat + beta_r pi_r,
    p(z_s | z_t) = q_t|s(z_t | z_s) q_s(z_s | x_hat) / q_t(z_t | x_hat)          (GIDD's sampler step),
the true posterior q(z_s | z_t, x) at x_hat = onehot(x). At s = 0 it has no mask left (q_0(. | x_hat) = x_hat).

The ELBO (GIDD's, in closed form), with q = q_t(. | x), p = q_t(. | x_hat), r = q(z_t) / p(z_t):
    -log p(x) <= int_0^1 E_{z_t ~ q} w_t(z_t, x) [ KL(q || p) + r - log r - 1 ] dt        (KL + Itakura-Saito),
    w_t(z, x) = ((beta pi)'_t(z) - (alpha'_t / alpha_t) beta_t pi_t(z)) / q_t(z | x), which is
        1 / (t (1 - t)) at the mask,  (c_t + (1 - t) c'_t) / ((1 - t) c_t) at a token != x,
        (c_t + (1 - t) c'_t) / (V (1 - t) (1 - t + c_t / V)) at x;    c'_t = (g/2) (1 - 2t) / (t (1 - t)) c_t.
q takes three values (at x, at m where it equals p, and u_t = c_t / (V C_t) elsewhere), so the KL needs only log p at x
and the sum of log p over the tokens. Training weighs w_t (KL + IS) by GIDD's loss_weighting instead: "dynamic" (their
default) weight 2 at a mask, 1 at a token != x, B / (V + 1) exp((g/2) sigmoid(-t)) at x (their formula), "clip": w_t
clipped, both clipped to [min_loss_weight, max_loss_weight]; "elbo" (their "none"): w_t. t is drawn on
[t_eps, 1 - t_eps] (low discrepancy). metrics["bound"] is always the ELBO integrand's mean (nats/token).
Evaluation draws t = v^3 (dt = 3 v^2 dv, v stratified): a token != x appears w.p. ~sqrt(t) and then costs ~log(1/t)/t,
so uniform t has an infinite variance and v^3 a finite one. The N-step bound (T = N, the grid t_j = j/N of sample()):
    L_N = sum_j E_{z_tj} KL(q(z_t(j-1) | z_tj, x) || p(z_t(j-1) | z_tj)),   the last KL -log p(z_0 = x | z_t1);
q_1 is the prior exactly, so there is no prior term; L_N tends to the ELBO as N grows (error ~ 1/N).

Sampling: z_1 = all masks, then N steps of p(z_s | z_t) down the grid t_j = j/N (N calls), x_hat after temperature /
top_k / top_p (temperature 0: onehot(argmax)). Self-correction (GIDD's, correction_steps = K > 0): at t0 = 0.01, each
call draws z' ~ softmax(logits / correction_temperature) (0.1, theirs) at every generated position and replaces the
one token, per row, where z' != z has the largest probability; a row stops when nothing would change (a fixed point),
or after PATIENCE calls without the share of its generated tokens equal to the argmax rising above its best (the last
change undone), or after K calls.
Unlike their code: their sampler starts from the prior at t = 1 - 1/N (of a grid in [t_eps, 1 - t_eps]), ends at t_eps
with a step that changes nothing and may leave masks; ours runs the whole grid from t = 1 (the prior exactly) to s = 0
(no mask left), the network reading t clamped to their range. Their bound is a quadrature over t, ours an unbiased
estimate; their self-correction runs one sequence at a time, ours per row of a batch.

Conditional (families.py's clean mask C, the prompt): z_t^C = x^C at every t, the network reads it, and only the other
positions U are scored; the process and the model factorise over positions, so the ELBO of x^U given x^C is the same
integral summed over U; loss, bound and batch_bound are the mean over rows of (row sum over U) / |U|.
"""
import math

import torch
import torch.nn as nn

from model import DiT, row_mean, scored_positions
from sampling import draw, drawn_probability, filter_logits, row_chunks, step_grid

CORRECTION_T, PATIENCE = 0.01, 32  # GIDD's self-correction time t0 and early-stopping patience (self_correction.yaml)


class GIDD(nn.Module):
    def __init__(self, vocab_size, n_embed, n_heads, n_blocks, n_cond, dropout, p_uniform=0.0, t_eps=1e-4,
                 loss_weighting="dynamic", min_loss_weight=0.0, max_loss_weight=2.0, antithetic=True,
                 tied_output=True):
        super().__init__()
        if not 0 <= p_uniform < 1:
            raise ValueError(f"p_uniform must be in [0, 1), not {p_uniform}")
        if loss_weighting not in ("dynamic", "clip", "elbo"):
            raise ValueError(f"loss_weighting must be dynamic, clip or elbo, not {loss_weighting!r}")
        self.vocab_size, self.mask_id = vocab_size, vocab_size
        self.p_uniform, self.t_eps, self.antithetic = p_uniform, t_eps, antithetic
        self.loss_weighting = loss_weighting
        self.min_loss_weight, self.max_loss_weight = min_loss_weight, max_loss_weight
        self.gamma = 1.0
        p = max(p_uniform, math.exp(-20))
        self.B = math.exp(max(self.gamma * math.log(2) + math.log(p) - math.log1p(-p), -20))
        self.net = DiT(vocab_size + 1, n_embed, n_heads, n_blocks, n_cond, dropout, tied_output=tied_output)

    # ---- the schedule (float64 tensors of t's shape) ----------------------------------------------------------
    def schedule(self, t):
        """(alpha_t, mask probability t / C_t, u_t = c_t / (V C_t) the probability of each token by uniform noise)."""
        t = torch.as_tensor(t, dtype=torch.float64)
        c = self.B * (t * (1 - t)).pow(self.gamma / 2)
        C = 1 + c
        return (1 - t) / C, t / C, c / (self.vocab_size * C)

    def elbo_weights(self, t):
        """w_t at a mask, at a token != x and at x (float64, t's shape; t in (0, 1))."""
        t = torch.as_tensor(t, dtype=torch.float64)
        V, g = self.vocab_size, self.gamma
        c = self.B * (t * (1 - t)).pow(g / 2)
        dc = (g / 2) * (1 - 2 * t) / (t * (1 - t)) * c
        w_mask = 1 / (t * (1 - t))
        w_other = 1 / (1 - t) + (g / 2) * (1 - 2 * t) / (t * (1 - t))  # = (c + (1 - t) c') / ((1 - t) c), c cancelled
        w_x = (c + (1 - t) * dc) / (V * (1 - t) * (1 - t + c / V))
        return w_mask, w_other, w_x

    # ---- network ------------------------------------------------------------------------------------------------
    def logits(self, z_t, t):
        """Logits (B, L, V + 1) of x_hat (the mask's is unused). The network reads t clamped to [t_eps, 1 - t_eps]."""
        return self.net(z_t, t.clamp(self.t_eps, 1 - self.t_eps).float())

    def q_sample(self, x0, t, generator=None, clean=None):
        """z_t ~ q_t(. | x0), t (B,): x0 w.p. alpha_t, the mask w.p. t / C_t, else a uniformly random token.
        clean (B, L) bool: those positions stay x0 (the same draws: the other positions do not change)."""
        alpha, mask, _ = (v[:, None].to(x0.device) for v in self.schedule(t))
        r = torch.rand(x0.shape, dtype=torch.float64, device=x0.device, generator=generator)
        noise = torch.randint(0, self.vocab_size, x0.shape, device=x0.device, generator=generator)
        z = torch.where(r < alpha, x0, torch.where(r < alpha + mask, torch.full_like(x0, self.mask_id), noise))
        return z if clean is None else torch.where(clean, x0, z)

    def elbo_terms(self, logits, z_t, x0, t):
        """(KL + IS per token, w_t per token, the class of z_t: 0 mask, 1 a token != x, 2 x), each (B, L), in the
        dtype of logits (B, L, V + 1); t (B,)."""
        V, dtype = self.vocab_size, logits.dtype
        alpha, _, u = (v[:, None, None].to(logits.device, dtype) for v in self.schedule(t))
        log_u = torch.log(u)
        # log q_t(j | x_hat) - log u = log(1 + alpha x_hat_j / u) >= 0, over the V tokens
        lift = torch.logaddexp(torch.log(alpha) - log_u + logits[..., :V].log_softmax(-1), logits.new_zeros(()))
        lift_x = lift.gather(-1, x0[..., None]).squeeze(-1)
        log_u, u = log_u.squeeze(-1), u.squeeze(-1)
        log_q_x = torch.log(alpha.squeeze(-1) + u)
        kl = log_q_x.exp() * (log_q_x - log_u - lift_x) - u * (lift.sum(-1) - lift_x)  # q = p at the mask
        is_mask, is_x = z_t == self.mask_id, z_t == x0
        lift_z = lift.gather(-1, z_t.clamp(max=V - 1)[..., None]).squeeze(-1)
        log_r = torch.where(is_mask, 0.0, torch.where(is_x, log_q_x - log_u, 0.0) - lift_z)  # log q(z_t) / p(z_t)
        ims = torch.expm1(log_r) - log_r
        kind = torch.where(is_mask, 0, torch.where(is_x, 2, 1))
        w = torch.stack(self.elbo_weights(t), -1).to(logits.device, dtype)  # (B, 3)
        return kl + ims, w.gather(1, kind), kind

    def loss_weights(self, elbo_w, kind, t):
        """The training weights per token (loss_weighting; see the top of the file)."""
        if self.loss_weighting == "elbo":
            return elbo_w
        if self.loss_weighting == "clip":
            w = elbo_w
        else:
            x_scale = self.B / (self.vocab_size + 1) * torch.exp(self.gamma / 2 * torch.sigmoid(-t.double()))
            w = torch.where(kind == 2, x_scale[:, None].to(elbo_w), torch.where(kind == 0, 2.0, 1.0).to(elbo_w))
        return w.clamp(self.min_loss_weight, self.max_loss_weight)

    # ---- training -------------------------------------------------------------------------------------------------
    def draw_times(self, B, device):
        """t in [t_eps, 1 - t_eps]: low discrepancy (u + i/B) mod 1 with one u per batch (GIDD's), or i.i.d."""
        r = torch.rand((), dtype=torch.float64, device=device)
        r = (r + torch.arange(B, dtype=torch.float64, device=device) / B) % 1 if self.antithetic else \
            torch.rand(B, dtype=torch.float64, device=device)
        return self.t_eps + (1 - 2 * self.t_eps) * r

    def forward(self, x0, t=None, clean=None):
        """x0 (B, L); t (B,) drawn by draw_times if None; clean (B, L) bool: the prompt, or None. Returns (logits, loss,
        metrics: bound = mean w_t (KL + IS), bpt). loss = mean of loss_weights (KL + IS); both per scored token."""
        t = self.draw_times(x0.shape[0], x0.device) if t is None else t
        scored = None if clean is None else scored_positions(x0, clean)
        z_t = self.q_sample(x0, t, clean=clean)
        logits = self.logits(z_t, t)
        divergence, w, kind = self.elbo_terms(logits, z_t, x0, t)
        elbo, weighted = w * divergence, self.loss_weights(w, kind, t) * divergence
        bound, loss = (elbo.mean(), weighted.mean()) if clean is None else \
            (row_mean(elbo, scored), row_mean(weighted, scored))
        return logits, loss, dict(bound=bound.detach(), bpt=bound.detach() / math.log(2))

    # ---- the bound, for evaluate.py -------------------------------------------------------------------------------
    def bound_name(self, T=None):
        return f"{T}-step bound" if T else "continuous ELBO"

    def posterior(self, x_probs, z_t, s, t):
        """p(z_s | z_t) (N, V + 1) float64 for x_probs (N, V) (onehot(x): the true posterior; x_hat: the model's),
        z_t (N,) ids, s < t (N,) float64."""
        a_t, m_t, u_t = (v[:, None] for v in self.schedule(t))
        a_s, m_s, u_s = (v[:, None] for v in self.schedule(s))
        q_s = torch.cat([a_s * x_probs + u_s, m_s], -1)  # q_s(. | x_probs)
        a_ts = a_t / a_s
        noise_ts = torch.cat([(u_t - a_ts * u_s).expand_as(x_probs), m_t - a_ts * m_s], -1)  # beta pi_t|s
        to_z_t = noise_ts.gather(-1, z_t[:, None]) + a_ts * nn.functional.one_hot(z_t, q_s.shape[-1])  # q_t|s(z_t|.)
        joint = to_z_t * q_s
        return joint / joint.sum(-1, keepdim=True)

    def batch_bound(self, x0, offset, generator=None, T=None, clean=None):
        """One unbiased estimate (float64 0-dim, nats per scored token) on a (B, L) batch, offset in [0, 1) stratifying
        it. T = None: the ELBO, row i at t = v^3, v = (i + offset) / B, weight 3 v^2, the integrand in float64.
        T = N: the N-step bound, row i at step j = 1 + floor((i + offset) N / B) (t = j/N, s = t - 1/N), weight N, the
        KL of the step's posteriors over all V + 1 values. clean: each row's sum over its unclean positions / their
        number, then the mean over rows (a row with none: ValueError)."""
        B, L = x0.shape
        scored = None if clean is None else scored_positions(x0, clean, check=True)
        dev = x0.device
        i = torch.arange(B, dtype=torch.float64, device=dev)
        if T:
            t, s = step_grid(B, offset, T, i.device)
            z_t = self.q_sample(x0, t, generator, clean)
            logits = self.logits(z_t, t)
            kl = torch.empty((B, L), dtype=torch.float64, device=dev)
            rows = torch.arange(B, device=dev)[:, None].expand(B, L).flatten()
            for part in row_chunks(B * L, self.vocab_size + 1):
                r, z, x = rows[part], z_t.flatten()[part], x0.flatten()[part]
                x_hat = logits.flatten(0, 1)[part, :self.vocab_size].double().softmax(-1)
                q = self.posterior(nn.functional.one_hot(x, self.vocab_size).double(), z, s[r], t[r])
                p = self.posterior(x_hat, z, s[r], t[r])
                kl.view(-1)[part] = (torch.xlogy(q, q) - torch.xlogy(q, p)).sum(-1)
            return T * (kl.sum(1).mean() / L if clean is None else row_mean(kl, scored))
        v = (i + offset) / B
        t = (v ** 3).clamp(1e-30, 1 - 1e-12)
        z_t = self.q_sample(x0, t, generator, clean)
        divergence, w, _ = self.elbo_terms(self.logits(z_t, t).double(), z_t, x0, t)
        integrand = 3 * v[:, None] ** 2 * w * divergence
        return integrand.mean() if clean is None else row_mean(integrand, scored)

    # ---- sampling ---------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, x, steps=None, generator=None, callback=None, cache=True, sampler="ancestral", temperature=1.0,
               top_k=0, top_p=1.0, correction_steps=0, correction_temperature=0.1, **opts):
        """The mask_id positions of x (B, L) start as masks (the prior) and take `steps` (default L) steps of
        p(z_s | z_t) down t_j = j/steps, one call each; then up to correction_steps calls of self-correction (top of
        the file).
        Given tokens never change; cache is unused (a step may change any generated token). The float64 work goes a
        chunk of generated positions at a time. Returns (samples, network calls)."""
        if sampler != "ancestral":
            raise ValueError(f"GIDD samples with its ancestral sampler (and correction_steps), not {sampler!r}")
        if opts:
            raise ValueError(f"the GIDD sampler has no option {', '.join(opts)}")
        if correction_steps < 0 or correction_temperature < 0:
            raise ValueError("correction_steps and correction_temperature must be >= 0")
        B, L = x.shape
        V, steps = self.vocab_size, steps or L
        generate = x == self.mask_id
        rows, cols = generate.nonzero(as_tuple=True)
        z = x.clone()
        for j in range(steps, 0, -1):
            t = torch.full((B,), j / steps, dtype=torch.float64, device=x.device)
            logits = self.logits(z, t)
            z_gen = z[generate]
            u = torch.rand(len(z_gen), dtype=torch.float64, device=x.device, generator=generator)
            for part in row_chunks(len(z_gen), V + 1):
                lg = logits[rows[part], cols[part], :V]
                if temperature == 0:
                    x_hat = nn.functional.one_hot(lg.argmax(-1), V).double()
                else:
                    x_hat = filter_logits(lg, temperature, top_k, top_p).softmax(-1)
                n = len(lg)
                s_n, t_n = t.new_full((n,), (j - 1) / steps), t.new_full((n,), j / steps)
                probs = self.posterior(x_hat, z_gen[part], s_n, t_n)
                z_gen[part] = draw(probs.log(), u=u[part])
            del logits
            z[generate] = z_gen
            if callback is not None:
                callback(z, t)
        return self.correct(z, generate, correction_steps, correction_temperature, generator, callback, steps)

    def correct(self, z, generate, max_calls, temperature, generator=None, callback=None, calls=0):
        """GIDD's self-correction of the generated positions of z (top of the file). Returns (z, calls + its calls)."""
        z = z.clone()
        B = z.shape[0]
        active = generate.any(1)
        best = torch.zeros(B, dtype=torch.float64, device=z.device)
        waited = torch.zeros(B, dtype=torch.long, device=z.device)
        for _ in range(max_calls):
            rows = active.nonzero().squeeze(1)
            if rows.numel() == 0:
                break
            zr, gen = z[rows], generate[rows]
            t = torch.full((len(rows),), CORRECTION_T, dtype=torch.float64, device=z.device)
            logits = self.logits(zr, t)[..., :self.vocab_size].flatten(0, 1)
            new = draw(logits, generator, temperature=temperature).view_as(zr)
            prob = drawn_probability(logits, new.flatten(), temperature).view(zr.shape)
            score = torch.where(gen & (new != zr), prob, -1.0)
            pick = score.argmax(1, keepdim=True)
            change = score.gather(1, pick) > 0
            zr_next = zr.scatter(1, pick, torch.where(change, new.gather(1, pick), zr.gather(1, pick)))
            agree = ((zr_next == logits.argmax(-1).view_as(zr)) & gen).sum(1) / gen.sum(1)
            better = agree > best[rows]
            best[rows] = torch.where(better, agree.double(), best[rows])
            waited[rows] = torch.where(better, 0, waited[rows] + 1)
            keep = change.squeeze(1) & (waited[rows] <= PATIENCE)
            z[rows[keep]] = zr_next[keep]
            active[rows[~keep]] = False
            calls += 1
            if callback is not None:
                callback(z, torch.full((B,), CORRECTION_T, dtype=torch.float64, device=z.device))
        return z, calls
