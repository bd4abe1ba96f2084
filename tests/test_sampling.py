"""sampling.py against independent oracles: nucleus / top-k / temperature draws (chi-square against the
renormalised distribution computed here), confidence decoding's schedule and invariants (with a fake network
whose confidences are known), and any-length generation's windows."""
import math

import numpy as np
import pytest
import torch

from conftest import chi2_pvalue
from sampling import confidence_decode, draw, filter_logits, generate_long


LOGITS = torch.tensor([2.0, 1.5, 0.3, 0.2, -0.5, -1.0, float("-inf"), -3.0])


def nucleus_oracle(logits, p):
    """The smallest set of classes, in order of probability, whose mass reaches p; renormalised."""
    probs = torch.softmax(logits.double(), -1).numpy()
    order = np.argsort(-probs, kind="stable")
    keep, mass = [], 0.0
    for i in order:
        if mass >= p:
            break
        keep.append(i)
        mass += probs[i]
    out = np.zeros_like(probs)
    out[keep] = probs[keep] / probs[keep].sum()
    return out


@pytest.mark.parametrize("p", [0.5, 0.8, 0.95])
def test_nucleus_draws_only_the_top_p_set_at_renormalised_frequencies(p):
    # catches: keeping the class that crosses p out (set too small), or not renormalising (frequencies off)
    n = 60_000
    out = draw(LOGITS.repeat(n, 1), torch.Generator().manual_seed(1), top_p=p).numpy()
    expected = nucleus_oracle(LOGITS, p)
    assert set(np.unique(out)) <= set(np.nonzero(expected)[0]), "a token outside the top-p set was drawn"
    counts = np.bincount(out, minlength=len(LOGITS)).astype(float)
    assert chi2_pvalue(counts, expected) > 1e-4


def test_top_k_and_temperature():
    # catches: temperature multiplying instead of dividing, top_k keeping k+1 classes or the wrong ones
    n = 60_000
    out = draw(LOGITS.repeat(n, 1), torch.Generator().manual_seed(2), top_k=3, temperature=0.5).numpy()
    logits = LOGITS.double().numpy() / 0.5
    keep = np.argsort(-logits)[:3]
    expected = np.zeros(len(LOGITS))
    expected[keep] = np.exp(logits[keep] - logits[keep].max())
    expected /= expected.sum()
    counts = np.bincount(out, minlength=len(LOGITS)).astype(float)
    assert set(np.unique(out)) <= set(keep) and chi2_pvalue(counts, expected) > 1e-4


def test_temperature_to_zero_is_the_argmax():
    logits = torch.randn(500, 9, generator=torch.Generator().manual_seed(3))
    assert torch.equal(draw(logits, temperature=0), logits.argmax(-1))
    # a tiny temperature converges to it too (float64: no overflow)
    assert torch.equal(draw(logits, torch.Generator().manual_seed(4), temperature=1e-4), logits.argmax(-1))


def test_filter_logits_keeps_at_least_one_class():
    f = filter_logits(torch.tensor([[5.0, 0.0, -1.0]]), top_p=1e-9)
    assert torch.isfinite(f).sum() == 1 and f[0, 0] == 5.0


class FakeNet:
    """A network whose prediction at each position is fixed: class pos % V with probability conf[pos]
    (the rest spread evenly), so the confidence order is known. Counts its calls and checks the times."""

    def __init__(self, L, V, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.conf = 0.3 + 0.6 * torch.rand(L, generator=g, dtype=torch.float64)
        self.L, self.V, self.calls, self.times = L, V, 0, []

    def __call__(self, x, t):
        self.calls += 1
        self.times.append(float(t[0]))
        probs = ((1 - self.conf) / (self.V - 1))[:, None].repeat(1, self.V + 1)
        probs[:, self.V] = 0.0
        probs[torch.arange(self.L), torch.arange(self.L) % self.V] = self.conf
        return probs.log()[None].expand(x.shape[0], -1, -1).float()


@pytest.mark.parametrize("S,schedule", [(4, "linear"), (5, "cosine"), (20, "linear")])
@pytest.mark.parametrize("opts", [dict(score="max"), dict(temperature=0)])
def test_confidence_decoding_schedule_and_invariants(S, schedule, opts):
    # catches: committing the least confident first, the wrong count per step, changing given tokens,
    # leaving positions masked at the end, an extra or missing call. Ranked by conf: score "max", or the
    # default "drawn" at temperature 0 (the argmax, scored at temperature 1: its probability is conf)
    L, V, mask = 20, 5, 5
    net = FakeNet(L, V)
    x = torch.full((3, L), mask)
    given = torch.tensor([0, 3, 7, 12])
    x[:, given] = torch.tensor([1, 2, 3, 4])
    M = L - len(given)
    history = []
    out, calls = confidence_decode(net, x, [(S - j) / S for j in range(S)], mask, torch.Generator().manual_seed(0),
                                   callback=lambda y, t: history.append(y.clone()), schedule=schedule, **opts)
    assert calls == S == net.calls and net.times == [(S - j) / S for j in range(S)]
    assert (out != mask).all() and torch.equal(out[:, given], x[:, given])
    frac = (lambda s: s) if schedule == "linear" else (lambda s: 1 - math.cos(math.pi * s / 2))
    filled_before = 0
    for j, state in enumerate(history):
        filled = int((state[0] != mask).sum()) - len(given)
        assert filled == (M if j == S - 1 else round(M * frac((j + 1) / S))), (j, filled)
        # the committed positions are the most confident masked ones
        newly = [i for i in range(L) if state[0, i] != mask and (j == 0 or history[j - 1][0, i] == mask)
                 and i not in given.tolist()]
        still = [i for i in range(L) if state[0, i] == mask]
        if newly and still:
            assert min(net.conf[newly]) >= max(net.conf[still])
        filled_before = filled
    assert filled_before == M
    again, _ = confidence_decode(FakeNet(L, V), x, [(S - j) / S for j in range(S)], mask,
                                 torch.Generator().manual_seed(0), schedule=schedule, **opts)
    assert torch.equal(out, again)  # reproducible with a seed


def test_confidence_margin_orders_by_top_two_gap():
    # position 0: probabilities (0.5, 0.45, ...): high max, small margin; position 1: (0.4, 0.1, ...): the reverse
    mask = 4

    def net(x, t):
        p = torch.tensor([[0.5, 0.45, 0.05, 0.0, 0.0], [0.4, 0.1, 0.25, 0.25, 0.0]], dtype=torch.float64)
        return p.log()[None].expand(x.shape[0], -1, -1).float()

    x = torch.full((1, 2), mask)
    for score, first in (("max", 0), ("margin", 1)):
        seen = []
        confidence_decode(net, x, [1.0, 0.5], mask, torch.Generator().manual_seed(0),
                          callback=lambda y, t: seen.append(y.clone()), score=score)
        assert (seen[0][0] != mask).tolist() == [first == 0, first == 1], score


@pytest.mark.parametrize("P,length,window,keep", [(0, 50, 16, 8), (3, 40, 16, 4), (5, 7, 16, 8), (2, 30, 10, 0)])
def test_generate_long_windows(P, length, window, keep):
    # catches: windows that do not start with the previous end, wrong lengths, overwritten context
    mask = 99
    seen = []

    def fill(x):  # a fake sampler: fill masks with a running counter, record the window
        seen.append(x.clone())
        assert x.shape[1] <= window
        out = x.clone()
        m = out == mask
        out[m] = torch.arange(1000, 1000 + int(m.sum())) + 100 * len(seen)
        return out, 1

    prefix = torch.arange(P)[None].repeat(2, 1)
    out, calls, starts = generate_long(fill, prefix, length, window, keep, mask)
    assert out.shape == (2, P + length) and torch.equal(out[:, :P], prefix) and calls == len(seen)
    for w, start in zip(seen, starts):
        n_ctx = int((w[0] != mask).sum())
        assert torch.equal(w[:, :n_ctx], out[:, start:start + n_ctx])  # context = what was generated before
        assert (w[:, n_ctx:] == mask).all()
    for w in seen[1:]:
        assert int((w[0] != mask).sum()) == keep  # each later window keeps exactly `keep` tokens


def test_generate_long_stops_at_eos():
    mask, eos = 9, 7

    def fill(x):
        out = x.clone()
        out[out == mask] = eos
        return out, 1

    out, calls, _ = generate_long(fill, torch.zeros((2, 0), dtype=torch.long), 100, 10, 5, mask, stop_id=eos)
    assert calls == 1 and out.shape[1] == 10


# ---- ReMDM remasking: the exact chain, enumerated ---------------------------------------------------------
class TableNet:
    """A fake network whose logits at each position are a fixed random function of the whole row (and not
    of t): logits[row] = table[code(row)], code = the row read as a base-(V+1) number. The mask logit is -inf."""

    def __init__(self, L, V, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.L, self.V = L, V
        self.table = 1.5 * torch.randn(((V + 1) ** L, L, V + 1), generator=g, dtype=torch.float64)
        self.table[..., V] = float("-inf")

    def code(self, x):
        return (x * (self.V + 1) ** torch.arange(self.L - 1, -1, -1)).sum(-1)

    def __call__(self, x, t):
        return self.table[self.code(x)]


def remask_chain_oracle(net, start, alphas, eta):
    """The exact output distribution of ReMDM from `start` (one row), by brute force: a dict state -> prob,
    propagated step by step with every position's transition written out separately (masked: stay masked,
    or unmask to token v w.p. p_unmask * softmax(logits)[v]; generated: masked again w.p. sigma, else kept;
    given: kept)."""
    V, mask = net.V, net.V
    given = [tok != mask for tok in start]
    dist = {tuple(start): 1.0}
    for a_t, a_s in zip(alphas[:-1], alphas[1:]):
        sigma = min(eta, (1 - a_s) / a_t) if a_t > 0 else eta
        new = {}
        for state, p in dist.items():
            probs = torch.softmax(net(torch.tensor([state]), None)[0], -1).tolist()
            options = []  # per position: list of (token, prob)
            for pos, tok in enumerate(state):
                if given[pos]:
                    options.append([(tok, 1.0)])
                elif tok == mask:
                    p_un = (a_s - (1 - sigma) * a_t) / (1 - a_t)
                    options.append([(mask, 1 - p_un)] + [(v, p_un * probs[pos][v]) for v in range(V)])
                else:
                    options.append([(mask, sigma), (tok, 1 - sigma)])
            for combo in np.ndindex(*[len(o) for o in options]):
                nxt = tuple(options[pos][c][0] for pos, c in enumerate(combo))
                q = p * math.prod(options[pos][c][1] for pos, c in enumerate(combo))
                new[nxt] = new.get(nxt, 0.0) + q
        dist = new
    return dist


@pytest.mark.parametrize("eta", [0.0, 0.3])
def test_remask_decoding_is_the_remdm_chain(eta):
    """remask_decode's output distribution equals the brute-force chain (chi-square), it never leaves a mask
    or changes a given token, calls the network S times, and eta changes the distribution (power check)."""
    from sampling import remask_decode
    V, L, S, n = 2, 3, 3, 40_000
    net = TableNet(L, V, seed=3)
    start = [V, 1, V]  # the middle token is given
    times = [(S - j) / S for j in range(S + 1)]
    alphas = [1 - t for t in times]
    x = torch.tensor([start] * n)
    out, calls = remask_decode(net, x, times, lambda t: 1 - t, V, torch.Generator().manual_seed(5), eta=eta)
    assert calls == S and not (out == V).any() and (out[:, 1] == 1).all()
    exact = remask_chain_oracle(net, start, alphas, eta)
    states = sorted(exact)
    assert all(V not in s for s in states if exact[s] > 1e-12)
    index = {s: i for i, s in enumerate(states)}
    counts = np.bincount([index[tuple(r)] for r in out.tolist()], minlength=len(states)).astype(float)
    probs = np.array([exact[s] for s in states])
    assert chi2_pvalue(counts, probs) > 1e-4
    other = remask_chain_oracle(net, start, alphas, 0.3 - eta)  # the other eta: must be rejected
    assert chi2_pvalue(counts, np.array([other.get(s, 0.0) for s in states])) < 1e-6


def test_remask_keeps_the_forward_marginals():
    """After every step of the grid a generated position is masked with probability 1 - alpha(s), whatever
    the network (binomial z-test over many positions): the property that lets ReMDM reuse a trained model."""
    from sampling import remask_decode
    V, L, S, n = 3, 2, 6, 30_000
    net = TableNet(L, V, seed=1)
    times = [(S - j) / S for j in range(S + 1)]
    alpha = lambda t: math.cos(math.pi / 2 * t)  # noqa: E731  (any decreasing schedule)
    fractions = []
    remask_decode(net, torch.full((n, L), V), times, alpha, V, torch.Generator().manual_seed(0), eta=0.2,
                  callback=lambda x, t: fractions.append(float((x == V).double().mean())))
    for frac, s in zip(fractions, times[1:]):
        p = 1 - alpha(s)
        assert abs(frac - p) < 5 * math.sqrt(max(p * (1 - p), 1e-12) / (n * L)) + 1e-12


@pytest.mark.parametrize("family", ["D3PMAbsorbing", "MDLM", "BD3LM"])
def test_every_masked_family_samples_with_remasking(family):
    """sampler="remask" through each masked family's sample(): S calls (per block for block diffusion), no mask
    left, the given tokens kept."""
    from families import FAMILIES
    args = dict(vocab_size=5, n_embed=16, n_heads=2, n_blocks=1, n_cond=8, dropout=0.0)
    extra = {"D3PMAbsorbing": dict(T=20, lambda_ce=0.05), "MDLM": {}, "BD3LM": dict(block_size=4)}[family]
    model = FAMILIES[family](**args, **extra).eval()
    x = torch.full((3, 8), model.mask_id)
    x[:, 0] = 2
    with torch.no_grad():
        out, calls = model.sample(x, steps=5, generator=torch.Generator().manual_seed(0), sampler="remask", eta=0.1)
    assert not (out == model.mask_id).any() and (out[:, 0] == 2).all()
    assert calls == (5 if family != "BD3LM" else 2 * 5 + 1)
