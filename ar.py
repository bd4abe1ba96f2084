"""
An autoregressive baseline on the same transformer (model.py) with causal attention and no time input.

    log p(x_0) = sum_{i=0}^{L-1} log p(x^i | x^{<i}),   input [s, x^0, ..., x^{L-2}], targets [x^0, ..., x^{L-1}]

s is a start token (the id V, which the diffusion models use as the mask): the first token of a window is
predicted from s alone, with no context from outside the window, so the model pays for all L tokens like
the diffusion models do and its bits/token are directly comparable with their bounds. The network's time
input is a constant 0 (its adaLN modulation becomes a learned constant). The loss is the exact NLL:
evaluate.py's "bound" for this model is its exact negative log-likelihood.

Conditional (families.py's clean mask C, the prompt): only the factors of the positions outside C are scored,
    -log p(x^U | x^C) = - sum_{i not in C} log p(x^i | x^{<i})   (the chain rule, when C is a prefix),
per row divided by |U|, then the mean over rows. The prompt is still the input of every later factor. When C is not
a prefix the same sum is scored (the unclean factors of the chain rule; a left-to-right model cannot condition on
later tokens), which is then not -log p(x^U | x^C).

Sampling is left to right with a KV cache: one network call per generated token (plus one for the prompt).
"""
import math

import torch
import torch.nn as nn

from model import CrossEntropy, DiT, KVCache, row_mean, scored_positions
from sampling import draw


class AR(nn.Module):
    def __init__(self, vocab_size, n_embed, n_heads, n_blocks, n_cond, dropout):
        super().__init__()
        self.vocab_size = vocab_size
        self.mask_id = vocab_size  # "to generate" in sample(); also the start token s
        self.net = DiT(vocab_size + 1, n_embed, n_heads, n_blocks, n_cond, dropout, causal=True)

    def logits(self, x, cache=None):
        """Next-token logits for every position of x (B, n): logits[:, i] predicts the token after x[:, i].
        The start/mask id is never predicted."""
        t = torch.zeros(x.shape[0], device=x.device)
        logits = self.net(x, t, cache=cache)
        logits[..., self.mask_id] = float("-inf")
        return logits

    def shifted_logits(self, x0):
        """logits[:, i] = the prediction of x0[:, i] from x0[:, :i] alone (B, L, K)."""
        start = torch.full_like(x0[:, :1], self.mask_id)
        return self.logits(torch.cat([start, x0[:, :-1]], dim=1))

    def forward(self, x0, clean=None):
        """Returns (logits, loss, metrics): loss = mean next-token cross-entropy (nats/token) = the exact
        NLL per token; metrics ce, bound (= loss) and bpt, 0-dim tensors. clean (B, L) bool: the cross-entropy of
        the unclean positions only, per row over its unclean count, then the mean over rows (see the top)."""
        logits = self.shifted_logits(x0)
        ce = CrossEntropy.apply(logits.flatten(0, 1), x0.flatten())
        loss = ce.mean() if clean is None else row_mean(ce.view(x0.shape), scored_positions(x0, clean))
        metrics = dict(ce=loss.detach(), bound=loss.detach(), bpt=loss.detach() / math.log(2))
        return logits, loss, metrics

    def bound_name(self, T=None):
        return "exact NLL"

    def batch_bound(self, x0, offset=0.0, generator=None, T=None, first_given=False, clean=None):
        """The exact NLL (nats/token, float64 0-dim) of a (B, L) batch; deterministic. T: not applicable.
        first_given=True: x^0 of each window is given (a BOS) and not scored, as the papers' AR baseline scores
        windows (MDLM diffusion.py: input x[:, :-1], targets x[:, 1:]): the mean of -log p(x^i | s, x^{<i}) over
        i = 1..L-1, i.e. (-log p(x) + log p(x^0)) / (L - 1).
        clean (B, L) bool: -log p(x^U | x^C) per unclean token, row by row, then the mean over rows (see the top);
        with first_given too, position 0 counts as clean as well (the prompt's first token: redundant when the prompt
        holds it). A row with nothing to score is a ValueError."""
        if T is not None:
            raise ValueError("the autoregressive model's NLL is exact; --T applies to continuous-time models")
        if clean is not None:
            scored = scored_positions(x0, clean, check=True)
            if first_given:
                scored = scored.clone()
                scored[:, 0] = False
                if not scored.any(1).all():
                    raise ValueError("first_given with clean: a row has no position left to score")
            ce = CrossEntropy.apply(self.shifted_logits(x0).flatten(0, 1), x0.flatten()).view(x0.shape)
            return row_mean(ce.double(), scored)
        if first_given and x0.shape[1] < 2:
            raise ValueError("first_given: a window of one token has nothing to score")
        logits = self.shifted_logits(x0)
        if first_given:
            logits, x0 = logits[:, 1:], x0[:, 1:]
        return CrossEntropy.apply(logits.flatten(0, 1), x0.flatten()).double().mean()

    @torch.no_grad()
    def sample(self, x, steps=None, generator=None, callback=None, cache=True, sampler="ancestral", **opts):
        """Fill the masked positions of x (B, L) left to right; they must form a suffix of the same length
        in every row (a prompt, then the generation): an autoregressive model cannot infill.
        With the KV cache (cache=True) each call feeds only the newest token; without it the whole prefix.
        opts: temperature, top_k, top_p (sampling.draw); steps does not apply. Returns (samples, network calls)."""
        if sampler != "ancestral":
            raise ValueError("the autoregressive model samples left to right only (--sampler ancestral)")
        B, L = x.shape
        masked = x == self.mask_id
        start = int(masked.int().argmax(dim=1)[0]) if masked.any() else L
        if not masked[:, start:].all() or masked[:, :start].any():
            raise ValueError("the autoregressive model can only continue a prompt (masks after the given tokens, "
                             "the same prompt length in every row); it cannot infill")
        x = x.clone()
        kv = KVCache() if cache else None
        prefix = torch.cat([torch.full_like(x[:, :1], self.mask_id), x[:, :start]], dim=1)
        calls = 0
        for i in range(start, L):
            inp = prefix if (kv is None or i == start) else x[:, i - 1:i]
            logits = self.logits(inp, kv)[:, -1]
            x[:, i] = draw(logits, generator, **opts)
            if kv is None:
                prefix = torch.cat([prefix, x[:, i:i + 1]], dim=1)
            calls += 1
            if callback is not None:
                callback(x, None)
        return x, calls
