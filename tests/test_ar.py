"""
Independent-oracle tests of ar.AR (the autoregressive baseline on the causal DiT).

The oracle is the chain rule computed the slow way: log p(x) = sum_i log p(x^i | x^{<i}), each factor
from model.net called on [s, x^0, ..., x^{i-1}] alone (start token s = V, the network's time input the
constant 0 that ar.py documents), with our own float64 softmax over the V token columns. On V = 3 and
L <= 4 every sequence can be enumerated, so the exact sequence probabilities are known; the sampler's
output is compared with them by a chi-square test whose power against a context-free sampler is checked.
"""
import itertools
import math

import numpy as np
import pytest
import torch

from ar import AR
from conftest import chisquare_pvalue, randomize_weights

V = 3
M = V  # mask id = start token


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny tensors, 2 cores shared


def make(seed=5, dropout=0.0):
    torch.manual_seed(0)
    return randomize_weights(AR(V, 16, 2, 1, 8, dropout), seed).eval()


@pytest.fixture(scope="module")
def model():
    return make()


def all_seqs(L):
    return torch.tensor(list(itertools.product(range(V), repeat=L)))


@torch.no_grad()
def chain_rule(model, x):
    """log p(x^i | x^{<i}) (n, L) float64, one network call per prefix length on that prefix alone."""
    n, L = x.shape
    out = torch.zeros(n, L, dtype=torch.float64)
    for i in range(L):
        inp = torch.cat([torch.full((n, 1), M), x[:, :i]], dim=1)
        logp = model.net(inp, torch.zeros(n))[:, -1, :V].double().log_softmax(-1)
        out[:, i] = logp.gather(1, x[:, i:i + 1])[:, 0]
    return out


def test_nll_matches_the_chain_rule(model):
    """Catches: targets not shifted (x^i predicted from x^{<=i}), no start token (first token predicted from
    nothing but a pad, or the window shifted), non-causal attention, a mask column that is not -inf, and a
    loss that is a sum instead of a per-token mean."""
    x = all_seqs(4)
    oracle = chain_rule(model, x)
    with torch.no_grad():
        logits, loss, metrics = model(x)
        bound = model.batch_bound(x, 0.3, torch.Generator().manual_seed(0))
    assert logits.shape == (81, 4, V + 1) and torch.isneginf(logits[..., M]).all()
    torch.testing.assert_close(logits.double().log_softmax(-1).gather(2, x[..., None])[..., 0], oracle,
                               atol=2e-5, rtol=0)
    nll = -oracle.mean().item()
    assert loss.item() == pytest.approx(nll, abs=2e-5)
    assert bound.dtype == torch.float64 and bound.dim() == 0
    assert bound.item() == pytest.approx(nll, abs=2e-5)
    assert metrics["bpt"].item() == pytest.approx(nll / math.log(2), abs=3e-5)
    # per row too: batch_bound of a one-row batch is that row's NLL per token, for any offset
    for i in (0, 17, 80):
        with torch.no_grad():
            b = model.batch_bound(x[i:i + 1], 0.9, None)
        assert b.item() == pytest.approx(-oracle[i].mean().item(), abs=2e-5)


def test_causality(model):
    """logits[:, i] does not change when x^i, ..., x^{L-1} change; logits[:, 0] is the same for every
    sequence; and logits[:, i] does change with x^{i-1} (so the check has something to detect)."""
    g = torch.Generator().manual_seed(1)
    L = 6
    x = torch.randint(V, (64, L), generator=g)
    with torch.no_grad():
        base = model(x)[0]
        for i in range(L):
            y = x.clone()
            y[:, i:] = torch.randint(V, (64, L - i), generator=g)
            torch.testing.assert_close(model(y)[0][:, :i + 1], base[:, :i + 1], atol=1e-5, rtol=0)
            if i >= 1:
                z = x.clone()
                z[:, i - 1] = (z[:, i - 1] + 1) % V
                assert (model(z)[0][:, i, :V] - base[:, i, :V]).abs().max() > 1e-2, i
        assert (base[:, 0, :V] - base[:1, 0, :V]).abs().max() < 1e-5


def test_probabilities_sum_to_one(model):
    """sum over all V^L sequences of the model's p(x) = 1 (its logits normalised over all K columns, and
    batch_bound row by row); catches probability mass on the mask/start id and a missing first factor."""
    x = all_seqs(4)
    with torch.no_grad():
        logits = model(x)[0]
        logp = logits.double().log_softmax(-1).gather(2, x[..., None])[..., 0].sum(1)
        per_row = torch.stack([model.batch_bound(x[i:i + 1], 0.0, None) for i in range(len(x))])
    assert logp.exp().sum().item() == pytest.approx(1.0, abs=1e-5)
    assert (-4 * per_row).exp().sum().item() == pytest.approx(1.0, abs=1e-5)
    assert logp.exp().max().item() < 0.5  # not a degenerate model


# ---- sampling -----------------------------------------------------------------------------------------------
def exact_distribution(model, prompt, L):
    """{sequence: p(sequence | prompt)} over the V^(L - len(prompt)) continuations, by the chain rule oracle."""
    rest = list(itertools.product(range(V), repeat=L - len(prompt)))
    x = torch.tensor([tuple(prompt) + r for r in rest])
    logp = chain_rule(model, x)[:, len(prompt):].sum(1)
    return {tuple(int(v) for v in row): float(p) for row, p in zip(x, logp.exp())}


@pytest.mark.parametrize("prompt", [(), (2,)])
def test_sample_distribution_matches_exact(model, prompt):
    L, n = 3, 16_000
    exact = exact_distribution(model, prompt, L)
    assert sum(exact.values()) == pytest.approx(1.0, abs=1e-9)
    x = torch.tensor([list(prompt) + [M] * (L - len(prompt))] * n)
    samples, calls = model.sample(x, generator=torch.Generator().manual_seed(3))
    assert calls == L - len(prompt)
    assert (samples[:, :len(prompt)] == torch.tensor(prompt, dtype=torch.long)).all()
    p = chisquare_pvalue(samples, exact)
    assert p > 1e-4, f"samples do not follow the model's distribution (p = {p:.3g})"
    # power: a sampler that ignores the generated context (every token from the first position's prediction
    # given the prompt) is rejected
    with torch.no_grad():
        first = model.net(torch.tensor([[M, *prompt]]), torch.zeros(1))[0, -1, :V].double().softmax(-1)
    context_free = {k: float(np.prod([first[t].item() for t in k[len(prompt):]])) for k in exact}
    assert chisquare_pvalue(samples, context_free) < 1e-6, "the check cannot tell a context-free sampler"


def test_sample_kv_cache_identical_and_prompt_kept(model):
    """cache=True (one new token per call after the prompt) and cache=False (the whole prefix each call)
    give identical tokens from the same seed: catches wrong rotary positions or a wrong causal mask for the
    cached queries. Given prompts are kept; no masks means nothing to do."""
    L = 7
    g = torch.Generator().manual_seed(4)
    for start in (0, 1, 3, 6):
        x = torch.randint(V, (50, L), generator=g)
        x[:, start:] = M
        a, calls_a = model.sample(x, generator=torch.Generator().manual_seed(start))
        b, calls_b = model.sample(x, generator=torch.Generator().manual_seed(start), cache=False)
        assert torch.equal(a, b), f"KV cache changes the samples (prompt length {start})"
        assert calls_a == calls_b == L - start
        assert torch.equal(a[:, :start], x[:, :start]) and (a != M).all()
    full = torch.randint(V, (5, L), generator=g)
    out, calls = model.sample(full, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, full) and calls == 0


def test_infill_raises(model):
    g = torch.Generator().manual_seed(0)
    bad = [
        torch.tensor([[0, M, 1]]),                 # a mask before a given token
        torch.tensor([[M, 1, M]]),
        torch.tensor([[0, M, M], [0, 1, M]]),      # prompts of different lengths
    ]
    for x in bad:
        with pytest.raises(ValueError):
            model.sample(x, generator=g)


# ---- learning a known answer --------------------------------------------------------------------------------
def test_iid_tokens_nll_reaches_entropy():
    """On i.i.d. tokens the best NLL per token is the entropy H; the trained model's exact NLL approaches
    it from above (and can never be below it by more than the sampling error)."""
    torch.manual_seed(0)
    probs = torch.tensor([0.7, 0.15, 0.1, 0.05])
    H = -(probs * probs.log()).sum().item()
    L = 16
    model = AR(len(probs), 16, 2, 1, 8, 0.0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)

    def batch(n):
        return torch.multinomial(probs, n * L, replacement=True).view(n, L)

    def nll(n):
        model.eval()
        x = batch(n)
        with torch.no_grad():
            logits = model(x)[0]
            per_seq = -logits.double().log_softmax(-1).gather(2, x[..., None])[..., 0].mean(1)
            assert model.batch_bound(x, 0.0, None).item() == pytest.approx(per_seq.mean().item(), abs=1e-5)
        model.train()
        return per_seq.mean().item(), per_seq.std().item() / math.sqrt(n)

    start, _ = nll(256)
    for _ in range(250):
        _, loss, _ = model(batch(64))
        opt.zero_grad()
        loss.backward()
        opt.step()
    value, se = nll(2048)
    print(f"H {H:.4f} start {start:.4f} trained {value:.4f} se {se:.4f}")
    assert start > 1.2 * H, "the untrained model should be far from the entropy"
    assert value > H - 4 * se, f"NLL {value:.4f} below the entropy {H:.4f} (se {se:.4f})"
    assert value < 1.05 * H, f"NLL {value:.4f} not within 5% of the entropy {H:.4f}"


def test_training_forward_traces_as_one_graph():
    import torch._dynamo
    torch._dynamo.reset()
    model = AR(5, 16, 2, 1, 8, 0.1)
    explanation = torch._dynamo.explain(model)(torch.randint(5, (4, 8)))
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1
    torch._dynamo.reset()


def test_first_given_scores_positions_1_to_L_minus_1(model):
    """first_given=True (the papers' AR rule: the window's first token, a BOS, is given): the bound is the mean of
    -log p(x^i | x^{<i}) over i = 1..L-1 of the chain-rule oracle, i.e. (-log p(x) + log p(x^0)) / (L - 1); a one-row
    batch gives that row's; the default still pays for all L tokens; a window of one token is a ValueError."""
    x = all_seqs(4)
    oracle = chain_rule(model, x)
    with torch.no_grad():
        given = model.batch_bound(x, 0.3, None, first_given=True)
        full = model.batch_bound(x, 0.3, None)
        row = model.batch_bound(x[5:6], 0.0, None, first_given=True)
    assert given.dtype == torch.float64 and given.dim() == 0
    by_hand = -sum(float(oracle[:, i].sum()) for i in range(1, 4)) / (len(x) * 3)
    assert given.item() == pytest.approx(by_hand, abs=2e-5)
    assert row.item() == pytest.approx(-float(oracle[5, 1:].sum()) / 3, abs=2e-5)
    assert full.item() == pytest.approx(-oracle.mean().item(), abs=2e-5) and abs(full.item() - given.item()) > 1e-3
    with pytest.raises(ValueError, match="one token"):
        model.batch_bound(x[:, :1], 0.0, None, first_given=True)
