"""
Independent-oracle tests of conditional generation (families.py's clean mask: True = the prompt, given, never noised,
never scored; the bound per scored token, row by row, then the mean over rows) in ar.AR and duo.Duo.

AR. The oracle is the chain rule the slow way (one network call per prefix, our own float64 softmax over the V token
columns) and, for prefix prompts, the conditional by enumeration: p(answer | prompt) = p(x) / sum_{y: y^C = x^C} p(y)
over all V^L sequences, with p(x) the product of the chain-rule factors.

Duo. On V = 3, L = 3 everything is enumerated: the noisy states z (27) with the prompt held at x0 (q(z | x) =
prod over unclean l of (a 1[z_l = x_l] + (1 - a)/V), and 1[z_l = x_l] at the clean l), the NELBO integrand written
out (xbar and xbar_theta built explicitly, the sum over j term by term) summed over the unclean positions, integrated
over t by Gauss-Legendre on geometric panels towards t = 0; the T-step bound by Bayes from the transition matrices,
the KL summed over the unclean positions. Each row's value is divided by its number of unclean positions and the mean
taken over the rows of the batch. Unbiasedness checks: the mean of many estimates within 4 standard errors of the
exact value, and the same band excludes the values of plausibly wrong implementations (8 standard errors).
"""
import itertools
import math

import numpy as np
import pytest
import torch

import duo
from ar import AR
from conftest import randomize_weights
from duo import Duo

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny tensors, 2 cores shared

V = 3


# ==== AR =====================================================================================================
def make_ar(seed=5):
    torch.manual_seed(0)
    return randomize_weights(AR(V, 16, 2, 1, 8, 0.0), seed).eval()


@pytest.fixture(scope="module")
def ar():
    return make_ar()


def all_seqs(L):
    return torch.tensor(list(itertools.product(range(V), repeat=L)))


@torch.no_grad()
def chain_rule(model, x):
    """log p(x^i | x^{<i}) (n, L) float64: net on [s, x^0, ..., x^{i-1}] alone (s = V, time 0), our softmax over V."""
    n, L = x.shape
    out = torch.zeros(n, L, dtype=torch.float64)
    for i in range(L):
        inp = torch.cat([torch.full((n, 1), V), x[:, :i]], dim=1)
        logp = model.net(inp, torch.zeros(n))[:, -1, :V].double().log_softmax(-1)
        out[:, i] = logp.gather(1, x[:, i:i + 1])[:, 0]
    return out


def ar_masks(n, L, g):
    """n random clean masks (L,): prefixes of every length 0..L-1 and arbitrary masks, each row with an unclean one."""
    rows = []
    while len(rows) < n:
        if len(rows) % 2:
            c = torch.arange(L) < int(torch.randint(0, L, (), generator=g))
        else:
            c = torch.rand(L, generator=g) < 0.5
        if not c.all():
            rows.append(c)
    return torch.stack(rows)


def test_ar_conditional_is_the_chain_rule_over_unclean_positions(ar):
    """forward's loss and bound and batch_bound (any offset) = the mean over rows of -(sum of the chain-rule factors at
    the row's unclean positions) / their number, for prefix and arbitrary masks mixed in one batch; a one-row batch
    gives that row's value. Power: the global mean over all unclean tokens (not per row) and the mean over all L
    positions differ from it."""
    L = 4
    x = all_seqs(L)
    clean = ar_masks(len(x), L, torch.Generator().manual_seed(0))
    logp = chain_rule(ar, x)
    scored = ~clean
    per_row = -(logp * scored).sum(1) / scored.sum(1)
    want = per_row.mean().item()
    with torch.no_grad():
        logits, loss, metrics = ar(x, clean=clean)
        bound = ar.batch_bound(x, 0.7, None, clean=clean)
    assert bound.dtype == torch.float64 and bound.dim() == 0
    assert bound.item() == pytest.approx(want, abs=2e-6)
    assert loss.item() == pytest.approx(want, abs=2e-5) and torch.equal(metrics["bound"], loss.detach())
    assert metrics["bpt"].item() == pytest.approx(want / math.log(2), abs=3e-5)
    for i in (0, 5, 40, 80):
        with torch.no_grad():
            assert ar.batch_bound(x[i:i + 1], 0.1, None, clean=clean[i:i + 1]).item() == pytest.approx(
                per_row[i].item(), abs=2e-6)
    assert abs(-(logp * scored).sum().item() / scored.sum().item() - want) > 1e-3  # global mean: not it
    assert abs(-logp.mean().item() - want) > 1e-3                                   # every position: not it


def test_ar_prefix_prompt_is_minus_log_p_answer_given_prompt(ar):
    """For prefix prompts of different lengths in one batch, batch_bound = mean over rows of -log p(answer | prompt) /
    len(answer) with p(answer | prompt) = p(x) / sum_{y: y starts with the prompt} p(y), by enumeration of all V^L
    sequences (the joint from the chain rule); the conditionals of every prompt sum to 1 over the answers."""
    L = 4
    x = all_seqs(L)
    logp_x = chain_rule(ar, x).sum(1)
    p_x = logp_x.exp()
    assert p_x.sum().item() == pytest.approx(1.0, abs=1e-9)
    k = torch.arange(len(x)) % L                                   # prompt lengths 0, 1, 2, 3 in one batch
    clean = torch.arange(L)[None, :] < k[:, None]
    cond = torch.empty(len(x), dtype=torch.float64)
    for r in range(len(x)):
        same = (x[:, :k[r]] == x[r, :k[r]]).all(1)
        cond[r] = logp_x[r] - p_x[same].sum().log()
        if r < 3 ** k[r]:  # once per prompt length: the conditional is normalised over the answers
            assert (p_x[same] / p_x[same].sum()).sum().item() == pytest.approx(1.0, abs=1e-12)
    want = (-cond / (L - k)).mean().item()
    with torch.no_grad():
        assert ar.batch_bound(x, 0.0, None, clean=clean).item() == pytest.approx(want, abs=2e-6)
        assert ar(x, clean=clean)[1].item() == pytest.approx(want, abs=2e-5)


def test_ar_network_output_at_clean_positions_is_never_used(ar):
    """A hook adds large random values to the network's output wherever the target is a clean position (the
    prediction OF a prompt token; the prompt is still input to later positions): forward's loss, batch_bound and
    the gradient of everything else are unchanged and the loss's gradient there is 0. Power: the same perturbation at
    one unclean position changes the loss."""
    L = 5
    g = torch.Generator().manual_seed(1)
    x = torch.randint(V, (32, L), generator=g)
    clean = ar_masks(32, L, g)
    with torch.no_grad():
        base_loss = ar(x, clean=clean)[1]
        base_bound = ar.batch_bound(x, 0.0, None, clean=clean)
    kept = {}

    def perturb(where):
        def hook(module, args, out):
            out = out + 50 * torch.randn(out.shape, generator=g) * where[..., None]
            if out.requires_grad:
                out.retain_grad()
                kept["out"] = out
            return out
        return ar.net.register_forward_hook(hook)
    handle = perturb(clean)
    try:
        loss = ar(x, clean=clean)[1]
        loss.backward()
        with torch.no_grad():
            bound = ar.batch_bound(x, 0.0, None, clean=clean)
    finally:
        handle.remove()
        ar.zero_grad()
    assert loss.item() == pytest.approx(base_loss.item(), abs=1e-6)
    assert bound.item() == pytest.approx(base_bound.item(), abs=1e-9)
    grad = kept["out"].grad
    assert (grad[clean] == 0).all() and (grad[~clean].abs().sum(-1) > 0).all()
    one = torch.zeros_like(clean)
    one[0, int((~clean[0]).nonzero()[0])] = True                  # one unclean position of row 0
    handle = perturb(one)
    try:
        with torch.no_grad():
            assert abs(ar(x, clean=clean)[1].item() - base_loss.item()) > 1e-3
    finally:
        handle.remove()


def test_ar_first_given_with_clean_is_clean_or_first_position(ar):
    """first_given=True with clean = clean | position 0; with a prompt that holds position 0 it changes nothing; a row
    whose only unclean position is 0 is then a ValueError, as is a row with everything clean, or a mask of the wrong
    shape or dtype."""
    L = 4
    x = all_seqs(L)
    clean = ar_masks(len(x), L, torch.Generator().manual_seed(2))
    clean[:, 3] = False                                          # every row keeps an unclean position after 0
    first = clean.clone()
    first[:, 0] = True
    with torch.no_grad():
        a = ar.batch_bound(x, 0.0, None, first_given=True, clean=clean)
        b = ar.batch_bound(x, 0.0, None, clean=first)
        c = ar.batch_bound(x, 0.0, None, first_given=True, clean=first)
        d = ar.batch_bound(x, 0.0, None, clean=clean)
    assert a.item() == b.item() == c.item() and abs(a.item() - d.item()) > 1e-3
    only_first = torch.ones(1, L, dtype=torch.bool)
    only_first[0, 0] = False
    with pytest.raises(ValueError, match="no position left"):
        ar.batch_bound(x[:1], 0.0, None, first_given=True, clean=only_first)
    with pytest.raises(ValueError, match="nothing to score"):
        ar.batch_bound(x[:2], 0.0, None, clean=torch.tensor([[True] * L, [False] * L]))
    for bad in (clean[:, :3], clean.long()):
        with pytest.raises(ValueError, match="bool tensor"):
            ar.batch_bound(x, 0.0, None, clean=bad)


def test_ar_no_prompt_is_the_unconditional_nll(ar):
    """clean all False: the unconditional exact NLL (equal row lengths: the mean of row means is the mean)."""
    x = all_seqs(4)
    none = torch.zeros(x.shape, dtype=torch.bool)
    with torch.no_grad():
        assert ar.batch_bound(x, 0.0, None, clean=none).item() == pytest.approx(ar.batch_bound(x).item(), abs=1e-12)
        assert ar(x, clean=none)[1].item() == pytest.approx(ar(x)[1].item(), abs=1e-6)
