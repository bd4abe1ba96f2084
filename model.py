"""
The Diffusion Transformer (DiT) that predicts clean tokens from a partly masked sequence.

    x_t (B, L) token ids, t (B,) float time
    h    = vocab_embed[x_t]                                  (B, L, n)
    cond = SiLU(MLP(sinusoid(t)))                            (B, c)
    for each block:
        shift, scale, gate (x2) = adaLN_modulation(cond)     (zero-initialised)
        h = h + gate_msa * Attn(modulate(LN(h), shift_msa, scale_msa))   (non-causal, rotary q/k)
        h = h + gate_mlp * MLP(modulate(LN(h), shift_mlp, scale_mlp))
    logits = modulate(LN(h), shift, scale) @ vocab_embed.T   (B, L, K), tied weights
             (tied_output=False: an untied Linear with a bias instead, as MDLM, BD3-LM and Duo publish)

CrossEntropy (at the end) is the memory-lean per-token loss every family uses.

Options for the other model families: causal=True (ar.py), an explicit attention mask (a bool tensor
for SDPA, or a FlexAttention BlockMask) and rotary positions (block diffusion), and a KVCache of earlier
positions' keys/values for left-to-right sampling.

Module and parameter names give exactly the state-dict keys of the published nanoDD checkpoints.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

try:  # torch >= 2.5
    from torch.nn.attention.flex_attention import BlockMask, flex_attention
except ImportError:
    BlockMask = flex_attention = None


def modulate(x, shift, scale):
    """adaLN: x * (1 + scale) + shift, with (B, n) shift/scale broadcast over the sequence."""
    return x * (1 + scale) + shift


class LayerNorm(nn.Module):
    """LayerNorm with a learned weight only (no bias), always computed in float32."""

    def __init__(self, dim):
        super().__init__()
        self.dim = dim
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        with torch.autocast(device_type=x.device.type, enabled=False):
            x = F.layer_norm(x.float(), (self.dim,))
        return x * self.weight


class TimestepEmbedder(nn.Module):
    """t -> [cos(t f_j), sin(t f_j)]_{j<128}, f_j = 10000^(-j/128) -> Linear -> SiLU -> Linear -> SiLU."""

    def __init__(self, n_cond, freq_dim=256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, n_cond), nn.SiLU(), nn.Linear(n_cond, n_cond))

    def forward(self, t):
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
        angles = t.float()[:, None] * freqs[None, :]
        features = torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)
        return F.silu(self.mlp(features))


class Rotary(nn.Module):
    """Rotary position embedding over the head dim d: x*cos + rotate_half(x)*sin."""

    def __init__(self, head_dim, base=10000):
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2).float() / head_dim))
        self.register_buffer("inv_freq", inv_freq)  # persistent: it is in the checkpoints

    def forward(self, positions):
        """cos, sin of pos * inv_freq for positions (L,), duplicated over the two halves: each (1, L, 1, d)."""
        angles = torch.outer(positions.float(), self.inv_freq.float())
        emb = torch.cat([angles, angles], dim=-1)
        return emb.cos()[None, :, None, :], emb.sin()[None, :, None, :]


def apply_rotary(x, cos, sin):
    """x: (B, L, H, d). rotate_half([x1, x2]) = [-x2, x1] over the halves of d."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


class KVCache:
    """Keys and values (B, H, n, d) of earlier positions, one pair per block, for sampling left to right."""

    def __init__(self):
        self.k, self.v = {}, {}

    def __len__(self):
        return next(iter(self.k.values())).shape[2] if self.k else 0

    def extend(self, i, k, v, store):
        """Block i: the cached keys/values followed by the new ones; store=True keeps the new ones."""
        if i in self.k:
            k, v = torch.cat([self.k[i], k], dim=2), torch.cat([self.v[i], v], dim=2)
        if store:
            self.k[i], self.v[i] = k, v
        return k, v

    def crop(self, n):
        """Keep only the newest n positions (a sliding window)."""
        for i in self.k:
            self.k[i], self.v[i] = self.k[i][:, :, -n:], self.v[i][:, :, -n:]


class DiTBlock(nn.Module):
    """One adaLN transformer block. Attention: one (B, L, 3, H, d) projection; q and k are rotated into new
    tensors and v gets its own storage, so that SDPA keeps only q, k, v for backward and the projection is freed."""

    def __init__(self, n_embed, n_heads, n_cond, dropout, causal=False):
        super().__init__()
        self.n_heads = n_heads
        self.causal = causal
        self.norm1 = LayerNorm(n_embed)
        self.attn_qkv = nn.Linear(n_embed, 3 * n_embed, bias=False)
        self.attn_out = nn.Linear(n_embed, n_embed, bias=False)
        self.norm2 = LayerNorm(n_embed)
        self.mlp = nn.Sequential(
            nn.Linear(n_embed, 4 * n_embed), nn.GELU(approximate="tanh"), nn.Linear(4 * n_embed, n_embed)
        )
        self.dropout = nn.Dropout(dropout)
        self.adaLN_modulation = nn.Linear(n_cond, 6 * n_embed)
        nn.init.zeros_(self.adaLN_modulation.weight)
        nn.init.zeros_(self.adaLN_modulation.bias)

    def forward(self, x, cond, cos, sin, mask=None, cache=None, store=True, index=0):
        B, L, n = x.shape
        mod = self.adaLN_modulation(cond)[:, None, :]  # (B, 1, 6n)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod.chunk(6, dim=-1)

        h = modulate(self.norm1(x), shift_msa, scale_msa)
        q, k, v = self.attn_qkv(h).view(B, L, 3, self.n_heads, n // self.n_heads).unbind(dim=2)
        q, k, v = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v.clone()  # v.clone(): see the docstring
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if cache is not None:
            k, v = cache.extend(index, k, v, store)
        if self.causal and mask is None and k.shape[2] != L:  # new queries after cached keys
            mask = torch.arange(k.shape[2], device=x.device) <= torch.arange(k.shape[2] - L, k.shape[2],
                                                                             device=x.device)[:, None]
        if BlockMask is not None and isinstance(mask, BlockMask):  # bd3lm.py on CUDA
            h = flex_attention(q, k, v, block_mask=mask)
        else:
            h = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=self.causal and mask is None)
        h = h.transpose(1, 2).reshape(B, L, n)
        x = x + gate_msa * self.dropout(self.attn_out(h))

        h = modulate(self.norm2(x), shift_mlp, scale_mlp)
        x = x + gate_mlp * self.dropout(self.mlp(h))
        return x


class DiT(nn.Module):
    """Maps (x_t, t) to K = vocab_size + 1 logits per position (the last id is the mask)."""

    def __init__(self, n_classes, n_embed, n_heads, n_blocks, n_cond, dropout, causal=False, tied_output=True):
        super().__init__()
        assert n_embed % n_heads == 0, "n_embed must be divisible by n_heads"
        self.vocab_embed = nn.Embedding(n_classes, n_embed)
        nn.init.trunc_normal_(self.vocab_embed.weight, std=n_embed ** -0.5,
                              a=-3 * n_embed ** -0.5, b=3 * n_embed ** -0.5)
        self.c_embed = TimestepEmbedder(n_cond)
        self.rotary_emb = Rotary(n_embed // n_heads)
        self.blocks = nn.ModuleList(DiTBlock(n_embed, n_heads, n_cond, dropout, causal) for _ in range(n_blocks))
        self.norm_final = LayerNorm(n_embed)
        self.adaLN_modulation = nn.Linear(n_cond, 2 * n_embed)
        nn.init.zeros_(self.adaLN_modulation.weight)
        nn.init.zeros_(self.adaLN_modulation.bias)
        self.output = None if tied_output else nn.Linear(n_embed, n_classes)
        self.bf16 = True  # bfloat16 autocast on CUDA (set False for float32/TF32)

    def forward(self, x, t, mask=None, positions=None, cache=None, store=True, outputs=None):
        """x: (B, L) long, or (B, L, K) probability vectors (a soft input for duo.py, embedded by soft_embed);
        t: (B,) time (float). Returns float32 logits (B, L, K).
        mask: (L, L_keys) bool attention mask, True = may attend (default: full, or causal), or a FlexAttention
        BlockMask; positions: (L,) rotary positions (default 0..L-1 after the cached ones); cache: a KVCache to
        attend to and, with store=True, to extend with this call's keys/values; outputs: a slice of the
        positions to compute logits for (default all)."""
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=self.bf16 and x.device.type == "cuda"):
            h = self.vocab_embed(x) if not x.is_floating_point() else self.soft_embed(x)
            cond = self.c_embed(t)
            if positions is None:
                start = len(cache) if cache is not None else 0
                positions = torch.arange(start, start + x.shape[1], device=x.device)
            cos, sin = self.rotary_emb(positions)
            for i, block in enumerate(self.blocks):
                h = block(h, cond, cos, sin, mask, cache, store, i)
            if outputs is not None:
                h = h[:, outputs]
            shift, scale = self.adaLN_modulation(cond)[:, None, :].chunk(2, dim=-1)
            h = modulate(self.norm_final(h), shift, scale)
            logits = h @ self.vocab_embed.weight.t() if self.output is None else self.output(h)
        return logits.float()

    def soft_embed(self, probs):
        """probs (B, L, K) @ vocab_embed in float32 even under autocast (as Duo's code): the soft input of duo.py's
        curriculum then enters the blocks in float32, as the embedding of ids does."""
        with torch.autocast(device_type=probs.device.type, enabled=False):
            return probs.float() @ self.vocab_embed.weight.float()


class CrossEntropy(torch.autograd.Function):
    """Per-row -log softmax(logits)[target] for (N, K) logits, as F.cross_entropy(reduction="none"), the loss
    of every family. Only the logits are kept for backward (grad = softmax - onehot, built in one new tensor):
    two (N, K) float32 tensors at the backward peak instead of three."""

    @staticmethod
    def forward(ctx, logits, target):
        lse = torch.logsumexp(logits, dim=-1)
        ctx.save_for_backward(logits, lse, target)
        return lse - logits.gather(-1, target[:, None]).squeeze(-1)

    @staticmethod
    def backward(ctx, grad):
        logits, lse, target = ctx.saved_tensors
        g = logits - lse[:, None]
        g.exp_()
        g.scatter_add_(-1, target[:, None], torch.full_like(lse[:, None], -1.0))
        g.mul_(grad[:, None])
        return g, None


# ---- conditional generation (families.py: clean, the prompt positions) ------------------------------------
def scored_positions(x0, clean, check=False):
    """~clean, the positions scored, after checking clean is a (B, L) bool tensor like x0; check=True (evaluation,
    a host sync): also that every row has at least one position to score (else ValueError)."""
    if clean.dtype != torch.bool or clean.shape != x0.shape:
        raise ValueError(f"clean must be a bool tensor of the batch's shape {tuple(x0.shape)}, "
                         f"not {clean.dtype} {tuple(clean.shape)}")
    scored = ~clean
    if check and not scored.any(1).all():
        raise ValueError("clean: a row has every position given (nothing to score)")
    return scored


def row_mean(values, scored):
    """mean over rows of (sum of values over the row's scored positions) / (their number): (B, L) -> 0-dim."""
    total = torch.where(scored, values, torch.zeros((), dtype=values.dtype, device=values.device)).sum(1)
    return (total / scored.sum(1)).mean()
