"""
Block diffusion (BD3-LM, Arriola et al. 2025): autoregressive over blocks, masked diffusion inside a block.

A window of L tokens is cut into L / L' blocks of L' = block_size tokens, and
    log p(x) = sum_b log p(x^b | x^{<b}),
each term bounded by the masked-diffusion NELBO of mdlm.py for the block x^b, with the clean earlier blocks
x^{<b} as context. L' = L is MDLM; L' = 1 is an autoregressive model that predicts each token from a mask.

Training in one pass. The network reads [x_t, x_0] (2L tokens, both halves at positions 0..L-1) with one
attention mask (block_causal_mask): a noisy block b of x_t sees itself and the clean blocks < b of x_0; a
clean block b sees the clean blocks <= b. Each block b has its own time t_b (antithetic over the batch, per
block), optionally clipped to [t_min, t_max] (a lower-variance training signal; not a bound then), and
    loss = sum_b w(t_b) sum_{l in b, masked} -log p(x_0^l | x_t^b, x_0^{<b}) / L,
taken on the x_t half only. evaluate.py integrates all of [0, 1] per block (batch_bound, the any-order form
of mdlm.py, one random number of masked positions k_b ~ U{1..L'} per block), so the numbers are bounds
comparable with the other families.

Conditional (families.py's clean mask: the prompt C, given). The prompt stays clean inside whatever block it
ends in: x_t^C = x_0^C in the x_t half, so block b's term bounds -log p(x_0^{U_b} | x_0^{C_b}, x_0^{<b}), U_b
its unclean positions (n_b of them), by mdlm.py's conditional NELBO; summed over blocks it bounds
-log p(x_0^U | x_0^C). Per row: sum_b NELBO_b / n, n = sum_b n_b; a block with n_b = 0 adds nothing.

Sampling block by block, left to right, with any of mdlm.py's samplers inside a block. Clean blocks only
ever attend to clean blocks, so their keys and values are computed once (a KV cache, exact). Beyond the
training window the context slides: block j attends to blocks j - L/L' + 1 .. j, as in training (at every
layer; through the cached blocks' own keys older text still reaches deeper layers, as in any sliding-window
attention); the cache keeps the last L/L' - 1 blocks. Without the cache (cache=False) every call reads the
whole history with that banded mask instead: the same numbers, for comparison. The network has no time input.
"""
import math

import torch

from mdlm import MDLM, hold, scored
from model import KVCache

try:
    from torch.nn.attention.flex_attention import create_block_mask
except ImportError:  # torch < 2.5: SDPA with a bool mask everywhere
    create_block_mask = None


def block_causal_mask(b, h, q, k, L, block_size):
    """May query q attend to key k in [x_t, x_0] (positions 0..2L-1)? Also FlexAttention's mask_mod."""
    q_noisy, k_noisy = q < L, k < L
    q_block, k_block = (q % L) // block_size, (k % L) // block_size
    return ((q_noisy & k_noisy & (q_block == k_block))       # a noisy block sees itself,
            | (q_noisy & ~k_noisy & (k_block < q_block))     # and the clean blocks before it;
            | (~q_noisy & ~k_noisy & (k_block <= q_block)))  # a clean block sees the clean blocks up to itself


def sliding_block_mask(n, block_size, window_blocks, device):
    """(n, n) bool: token q sees token k iff k's block is one of the window_blocks blocks ending at q's."""
    block = torch.arange(n, device=device) // block_size
    return (block[None, :] <= block[:, None]) & (block[None, :] > block[:, None] - window_blocks)


class BD3LM(MDLM):
    """mdlm.py's schedule, weights and samplers, applied block by block (no time input)."""
    any_length = True  # sample() generates any number of tokens itself (sample.py --length)
    distill_loss = None  # MDLM's SDTT distils a whole window, not blocks: distill.py refuses

    def __init__(self, vocab_size, n_embed, n_heads, n_blocks, n_cond, dropout, block_size=4, schedule="linear",
                 antithetic=True, t_eps=1e-3, t_min=0.0, t_max=1.0, tied_output=True):
        super().__init__(vocab_size, n_embed, n_heads, n_blocks, n_cond, dropout, schedule=schedule,
                         time_conditioning=False, antithetic=antithetic, t_eps=t_eps, tied_output=tied_output)
        if block_size < 1 or not 0 <= t_min < t_max <= 1:
            raise ValueError(f"need block_size >= 1 and 0 <= t_min < t_max <= 1 (got {block_size}, {t_min}, {t_max})")
        self.block_size, self.t_min, self.t_max = block_size, t_min, t_max
        self.attention = "auto"  # auto: FlexAttention compiled on CUDA, else SDPA with a bool mask; or "flex", "sdpa"
        self._masks = {}

    def check_length(self, L):
        """Training and evaluation windows hold whole blocks (train.py and evaluate.py check this first)."""
        if L % self.block_size and self.block_size < L:
            raise ValueError(f"the sequence length {L} is not a multiple of block_size {self.block_size}")

    def block_count(self, L):
        """The number of blocks in a window of L tokens."""
        self.check_length(L)
        return max(L // self.block_size, 1)

    # ---- training and evaluation --------------------------------------------------------------------------
    @torch.compiler.disable  # built eagerly, once per length (under torch.compile: a graph break)
    def attention_mask(self, L, device, flex=False):
        """block_causal_mask for [x_t, x_0] of 2L tokens: a FlexAttention BlockMask (flex=True, where available)
        or a (2L, 2L) bool tensor for SDPA."""
        key = (L, str(device), flex and create_block_mask is not None)
        if key not in self._masks:
            if key[2]:
                def mask_mod(b, h, q, k):
                    return block_causal_mask(b, h, q, k, L, self.block_size)
                self._masks[key] = create_block_mask(mask_mod, None, None, 2 * L, 2 * L, device=device)
            else:
                i = torch.arange(2 * L, device=device)
                self._masks[key] = block_causal_mask(None, None, i[:, None], i[None, :], L, self.block_size)
        return self._masks[key]

    def train_logits(self, x_t, x0):
        """Logits of p(x_0^b | x_t^b, x_0^{<b}) at every position of x_t (B, L, K), mask at -inf."""
        B, L = x_t.shape
        t = torch.zeros(B, device=x_t.device)
        if self.block_count(L) == 1:  # one block: nothing clean to see, the x_0 half is not needed
            logits = self.net(x_t, t)
        else:
            # FlexAttention where it is fastest: compiled, on CUDA (eager it would materialise the scores)
            flex = self.attention == "flex" or (self.attention == "auto" and x_t.device.type == "cuda"
                                                and torch.compiler.is_compiling())
            positions = torch.arange(L, device=x_t.device).repeat(2)
            logits = self.net(torch.cat([x_t, x0], dim=1), t, mask=self.attention_mask(L, x_t.device, flex),
                              positions=positions, outputs=slice(0, L))
        logits[..., self.mask_id] = float("-inf")
        return logits

    def draw_times(self, B, device, generator=None, blocks=1):
        """(B, blocks) times in [max(t_eps, t_min), t_max]: per block antithetic over the batch,
        (u_b + i/B) mod 1 with one u_b per block, or i.i.d. uniform."""
        if self.antithetic:
            u = torch.rand(blocks, dtype=torch.float64, device=device, generator=generator)
            r = (u[None, :] + torch.arange(B, dtype=torch.float64, device=device)[:, None] / B) % 1
        else:
            r = torch.rand((B, blocks), dtype=torch.float64, device=device, generator=generator)
        lo = max(self.t_eps, self.t_min)
        return lo + (self.t_max - lo) * r

    def forward(self, x0, t=None, clean=None):
        """x0: (B, L); t: (B, L / block_size) block times (draw_times if None); clean: (B, L) bool, the prompt
        (kept unmasked in x_t, never scored) or None; n = the row's unclean positions (L without clean).
        loss = mean_rows sum_blocks w(t_block) sum_{l in block} masked_ce / n. Returns (logits, loss, metrics)."""
        B, L = x0.shape
        nb = self.block_count(L)
        if t is None:
            t = self.draw_times(B, x0.device, blocks=nb)
        t_tok = t.repeat_interleave(L // nb, dim=1)
        x_t = hold(self.q_sample(x0, t_tok), x0, clean)
        logits = self.train_logits(x_t, x0)
        ce = self.masked_ce(logits, x0, x_t)
        per_row = (self.weight(t_tok).float().to(x0.device) * ce).sum(1)
        if clean is None:
            loss = per_row.mean() / L
        else:
            loss = (per_row / scored(clean).clamp(min=1).float()).mean()
        n_masked = (x_t == self.mask_id).sum().clamp(min=1)
        metrics = dict(ce=(ce.sum() / n_masked).detach(), bound=loss.detach(), bpt=loss.detach() / math.log(2))
        return logits, loss, metrics

    def bound_name(self, T=None):
        return f"{super().bound_name(T)}, blocks of {self.block_size}"

    def batch_bound(self, x0, offset, generator=None, T=None, clean=None):
        """One unbiased estimate (nats/token) of mean_rows sum_b NELBO_b / n on a (B, L) batch, one network call;
        clean (B, L) bool: the prompt, given (n_b = block b's unclean positions, n = sum_b n_b; without clean
        n_b = L', n = L). Block b of row i is stratified by (i + offset_b) / B with offset_b = (offset + b/nb)
        mod 1 over the nb blocks. T = None: k = 1 + floor(n_b (i + offset_b) / B) of the block's unclean
        positions masked at random, NELBO_b / n_b = E[(1/k) sum_masked -log p] (k uniform on 1..n_b for rows
        in random order), so the row scores sum_b n_b (1/k) sum_masked / n; T = N: the N-step bound per block
        (see mdlm.py), sum_b N w_b sum_masked / n."""
        B, L = x0.shape
        nb = self.block_count(L)
        size = L // nb
        dev = x0.device
        i = torch.arange(B, dtype=torch.float64, device=dev)[:, None]
        offsets = (offset + torch.arange(nb, dtype=torch.float64, device=dev)[None, :] / nb) % 1
        strata = (i + offsets) / B  # (B, nb), uniform in [0, 1) for each block
        n = None if clean is None else scored(clean, True)  # (B,)
        if T:
            j = (1 + torch.floor(strata * T)).clamp(max=T)
            t, s = j / T, (j - 1) / T
            x_t = hold(self.q_sample(x0, t.repeat_interleave(size, dim=1), generator), x0, clean)
            w = (self.alpha(s) - self.alpha(t)) / (1 - self.alpha(t))
            ce = self.masked_ce(self.train_logits(x_t, x0), x0, x_t).double().view(B, nb, size).sum(2)
            return T * (w * ce).mean(0).sum() / L if clean is None else T * ((w * ce).sum(1) / n).mean()
        n_b = None if clean is None else (~clean).view(B, nb, size).sum(2).double()  # (B, nb)
        k = (1 + torch.floor(strata * size)).clamp(max=size) if clean is None else \
            torch.minimum(1 + torch.floor(strata * n_b), n_b)  # 0 in a block with nothing to score
        score = torch.rand((B, nb, size), dtype=torch.float64, device=dev, generator=generator)
        if clean is not None:
            score = torch.where(clean.view(B, nb, size), 2.0, score)  # the prompt last: k first ranks are unclean
        rank = score.argsort(dim=2).argsort(dim=2)  # a uniformly random order inside each block
        masked = (rank < k[..., None]).view(B, L)
        x_t = torch.where(masked, torch.full_like(x0, self.mask_id), x0)
        ce = self.masked_ce(self.train_logits(x_t, x0), x0, x_t).double().view(B, nb, size).sum(2)
        if clean is None:
            return (ce / k).mean(0).mean()
        return ((n_b * ce / k.clamp(min=1)).sum(1) / n).mean()

    # ---- sampling -------------------------------------------------------------------------------------------
    def sample_ancestral(self, x, steps, generator=None):
        """MDLM's reference loop does not apply to blocks: sample() runs MDLM's sampler block by block."""
        raise ValueError("block diffusion samples block by block: use sample()")

    def block_logits(self, x, start, end, kv, window_blocks):
        """logits_fn(x_block, t) for the block x[:, start:end]: with a KVCache kv, the block attends to the cached
        clean blocks; without one (kv None), the whole history x[:, :start] is read again with the sliding mask."""
        if kv is None:  # the banded mask over the history and this block, built once per block
            mask = sliding_block_mask(end, self.block_size, window_blocks, x.device)

        def logits_fn(block, t):
            zeros = torch.zeros(block.shape[0], device=block.device)
            if kv is not None:
                logits = self.net(block, zeros, positions=torch.arange(start, end, device=block.device),
                                  cache=kv, store=False)
            else:
                seq = torch.cat([x[:, :start], block], dim=1)
                logits = self.net(seq, zeros, mask=mask, outputs=slice(start, end))
            logits[..., self.mask_id] = float("-inf")
            return logits
        return logits_fn

    @torch.no_grad()
    def sample(self, x, steps=None, generator=None, callback=None, cache=True, sampler="ancestral", window=None,
               stop_id=None, **opts):
        """Fill the masked positions of x (B, n), any n, block by block from the left; given tokens are kept
        (a prompt is a run of given blocks). Inside a block: mdlm.py's sampler (ancestral with steps = None or
        N grid steps, confidence, or threshold; opts temperature, top_k, top_p, score, schedule, threshold); a
        block sees its earlier blocks, never later ones. window: the training length L (default n): a block sees
        at most L/L' - 1 earlier blocks. cache: keep the clean blocks' keys/values (one extra call per finished
        block) or re-read the history at every call. stop_id: stop after the first block by which every row has
        produced it (returns the tokens so far). Returns (samples, network calls)."""
        B, n = x.shape
        size = self.block_size
        window_blocks = max(-(-(window or n) // size), 1)  # blocks in a window (a partial last block counts)
        x = x.clone()
        generated = x == self.mask_id
        kv = KVCache() if cache else None
        calls = 0
        for start in range(0, n, size):
            end = min(start + size, n)
            block = x[:, start:end]
            if (block == self.mask_id).any():
                def show(xb, t):
                    callback(torch.cat([x[:, :start], xb, x[:, end:]], dim=1), t)
                block, c = self.denoise(self.block_logits(x, start, end, kv, window_blocks), block, steps, generator,
                                        show if callback else None, True, sampler, whole_batch=True, **opts)
                x[:, start:end] = block
                calls += c
            if stop_id is not None and ((x[:, :end] == stop_id) & generated[:, :end]).any(dim=1).all():
                return x[:, :end], calls
            if cache and end < n and window_blocks > 1:  # store the clean block's keys/values
                self.net(block, torch.zeros(B, device=x.device), positions=torch.arange(start, end, device=x.device),
                         cache=kv, store=True)
                kv.crop((window_blocks - 1) * size)
                calls += 1
        return x, calls
