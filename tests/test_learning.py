"""Learning sanity with a known answer: on i.i.d. tokens the best achievable T-step bound is the
entropy H of the token distribution (context carries no information, unmasked tokens are copied),
so a trained model's bound must approach H from above and can never go below it."""
import math

import torch

from d3pm import D3PMAbsorbing


def exact_bound_estimate(model, x0):
    """sum_{t=1}^{T-1} E[kl_t] + E[ce_0] in nats/token, every t evaluated on the same clean batch x0.
    Returns (bound, standard error from the per-sequence spread)."""
    B = x0.shape[0]
    per_seq = torch.zeros(B, dtype=torch.float64)
    with torch.no_grad():
        for t in range(model.T):
            tt = torch.full((B,), t)
            xn = model.q_sample(x0, tt + 1)
            kl, ce = model.loss_terms(model.logits(xn, tt + 1), x0, xn, tt)
            per_seq += (kl if t >= 1 else ce).double().mean(dim=1)
    return per_seq.mean().item(), per_seq.std().item() / math.sqrt(B)


def test_iid_tokens_bound_reaches_entropy():
    torch.manual_seed(0)
    probs = torch.tensor([0.7, 0.15, 0.1, 0.05])
    H = -(probs * probs.log()).sum().item()  # nats
    V, L, T = len(probs), 16, 20
    model = D3PMAbsorbing(vocab_size=V, n_embed=32, n_heads=2, n_blocks=1, n_cond=16, dropout=0.0, T=T,
                          lambda_ce=0.05)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)

    def batch(n):
        return torch.multinomial(probs, n * L, replacement=True).view(n, L)

    model.eval()
    start, _ = exact_bound_estimate(model, batch(256))
    model.train()
    for step in range(400):
        _, loss, _ = model(batch(64))
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    bound, se = exact_bound_estimate(model, batch(2048))
    assert start > 1.2 * H, "the untrained model should be far from the entropy"
    assert bound > H - 4 * se, f"bound {bound:.4f} below the entropy {H:.4f} (se {se:.4f}): not a bound"
    print(f"H {H:.4f} start {start:.4f} bound {bound:.4f} se {se:.4f}")
    assert bound < 1.05 * H, f"bound {bound:.4f} not within 5% of the entropy {H:.4f}"
