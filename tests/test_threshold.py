"""Confidence-threshold parallel decoding (sampling.threshold_decode, Fast-dLLM) and the "drawn" confidence score
of sampling.confidence_decode, against hand-computed oracles: fake networks whose per-position distributions are
known (uniform over k classes: every draw has probability exactly 1/k, so which positions commit at each call is
known in advance even at temperature 1); then the D3PM, MDLM and BD3-LM end to end, sample.py --sampler threshold,
and bench.py's quality runs."""
import contextlib
import io
import json
import math

import pytest
import torch

import bench
import configs
import sample
from common import UserError
from conftest import call_main, randomize_weights
from sampling import confidence_decode, threshold_decode

K_SUPPORT = [1, 2, 4, 8, 5, 3]  # position i: uniform over K_SUPPORT[i] classes, so each draw has probability 1/k
V = 8  # classes 0..7, mask 8


class UniformNet:
    """Position i predicts classes (i + 0..k_i - 1) % V with probability 1/k_i each (mask at -inf), whatever the
    input. Records each call's batch size and times."""

    def __init__(self, support=K_SUPPORT):
        self.support, self.calls = support, []
        L = len(support)
        self.logits = torch.full((L, V + 1), float("-inf"), dtype=torch.float64)
        for i, k in enumerate(support):
            self.logits[i, [(i + c) % V for c in range(k)]] = 0.0

    def allowed(self, i):
        return {(i + c) % V for c in range(self.support[i])}

    def __call__(self, x, t):
        assert x.shape[1] == len(self.support) and t.shape == (x.shape[0],)
        self.calls.append((x.shape[0], t.tolist()))
        return self.logits[None].expand(x.shape[0], -1, -1).float()


def commit_order(x0, run, mask=V):
    """The set of positions of each row committed at each callback, from the states `run` saw."""
    out, prev = [], x0
    for state in run:
        out.append([{i for i in range(x0.shape[1]) if prev[r, i] == mask and state[r, i] != mask}
                    for r in range(x0.shape[0])])
        prev = state
    return out


@pytest.mark.parametrize("whole_batch", [False, True])
def test_threshold_commits_known_positions_and_rows_finish_independently(whole_batch):
    # catches: a wrong comparison (> for >=, max instead of drawn), no forced commit, the wrong forced one,
    # finished rows still called, the wrong time, changed given tokens
    # draw probabilities by position: 1, .5, .25, .125, .2, .333; threshold 0.3.
    # row 0 all masked: {0, 1, 5}, then one per call, most probable first: {2}, {4}, {3} -> 4 calls
    # row 1 with 2 and 4 given: {0, 1, 5}, then {3} -> 2 calls, then left out (or at t = 0 with whole_batch)
    net = UniformNet()
    x = torch.full((2, 6), V)
    x[1, 2], x[1, 4] = 6, 7
    run = []
    out, calls = threshold_decode(net, x, V, 0.3, torch.Generator().manual_seed(0),
                                  callback=lambda y, t: run.append(y.clone()), whole_batch=whole_batch)
    assert calls == 4 == len(net.calls) == len(run)
    assert commit_order(x, run) == [[{0, 1, 5}, {0, 1, 5}], [{2}, {3}], [{4}, set()], [{3}, set()]]
    if whole_batch:
        assert net.calls == [(2, [1.0, 1.0]), (2, [0.5, 0.25]), (2, [2 / 6, 0.0]), (2, [1 / 6, 0.0])]
    else:
        assert net.calls == [(2, [1.0, 1.0]), (2, [0.5, 0.25]), (1, [2 / 6]), (1, [1 / 6])]
    assert (out != V).all() and out[1, 2] == 6 and out[1, 4] == 7
    for r in range(2):
        for i in range(6):
            if not (r == 1 and i in (2, 4)):
                assert int(out[r, i]) in net.allowed(i), (r, i)


def test_threshold_is_inclusive():
    # position 1 draws with probability exactly 0.5: threshold 0.5 commits it with position 0 at the first call
    run = []
    threshold_decode(UniformNet(), torch.full((1, 6), V), V, 0.5, callback=lambda y, t: run.append(y.clone()))
    assert commit_order(torch.full((1, 6), V), run)[0] == [{0, 1}]


def test_threshold_one_is_one_position_per_call_most_confident_first():
    net = UniformNet()
    x = torch.full((3, 6), V)
    run = []
    out, calls = threshold_decode(net, x, V, 1.0, torch.Generator().manual_seed(1),
                                  callback=lambda y, t: run.append(y.clone()), time_of=lambda s: 10 * s)
    assert calls == 6
    assert commit_order(x, run) == [[{i}] * 3 for i in (0, 1, 5, 2, 4, 3)]
    assert [t for _, t in net.calls] == [[10 * (m / 6)] * 3 for m in range(6, 0, -1)]  # time_of(masked share)
    assert (out != V).all()


class PeakedNet:
    """Position i predicts class i % V with probability conf[i] (random in [0.3, 0.9]), the rest evenly: a draw
    has probability conf[i] if it is class i % V, else (1 - conf[i]) / (V - 1)."""

    def __init__(self, L, seed=0):
        self.conf = 0.3 + 0.6 * torch.rand(L, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        probs = ((1 - self.conf) / (V - 1))[:, None].repeat(1, V + 1)
        probs[:, V] = 0.0
        probs[torch.arange(L), torch.arange(L) % V] = self.conf
        self.probs, self.calls = probs, 0

    def __call__(self, x, t):
        self.calls += 1
        return self.probs.log()[None].expand(x.shape[0], -1, -1).float()


@pytest.mark.parametrize("threshold", [0.5, 0.8])
def test_threshold_invariants_at_temperature_one(threshold):
    # catches: a call that commits nothing, a commit below the threshold besides the forced one, given tokens
    # changed, more calls than masked positions, masks left at the end, no reproducibility with a seed
    L = 24
    net = PeakedNet(L)
    x = torch.full((4, L), V)
    given = torch.tensor([0, 5, 11])
    x[:, given] = torch.tensor([3, 4, 5])
    run = []
    out, calls = threshold_decode(net, x, V, threshold, torch.Generator().manual_seed(2),
                                  callback=lambda y, t: run.append(y.clone()))
    assert calls == net.calls == len(run) <= L - len(given)
    assert (out != V).all() and torch.equal(out[:, given], x[:, given])
    for step in commit_order(x, run):
        for r, newly in enumerate(step):
            if not newly:  # a finished row (checked below)
                continue
            p = [float(net.probs[i, run[-1][r, i]]) for i in newly]
            assert len(newly) == 1 or min(p) >= threshold, (r, newly, p)  # all likely enough, or the forced one
    for r in range(4):  # each call until a row is done commits at least one of its positions
        per_call = [len(step[r]) for step in commit_order(x, run)]
        done = per_call.index(0) if 0 in per_call else len(per_call)
        assert all(n >= 1 for n in per_call[:done]) and not any(per_call[done:])
    again, _ = threshold_decode(PeakedNet(L), x, V, threshold, torch.Generator().manual_seed(2))
    assert torch.equal(out, again)


def test_threshold_must_be_in_unit_interval():
    for bad in (0.0, -0.1, 1.5, math.nan):
        with pytest.raises(ValueError, match="threshold"):
            threshold_decode(UniformNet(), torch.full((1, 6), V), V, bad)


# ---- the "drawn" score: the drawn token's probability, not the best token's --------------------------------------
def tail_net(x, t):
    """Position 0: class 0 w.p. 0.9, classes 1..7 w.p. 0.1/7 (a confident top); position 1: classes 0, 1 w.p. 0.5."""
    p = torch.zeros(2, V + 1, dtype=torch.float64)
    p[0, 0], p[0, 1:V] = 0.9, 0.1 / 7
    p[1, :2] = 0.5
    return p.log()[None].expand(x.shape[0], -1, -1).float()


def test_drawn_score_does_not_commit_an_unlikely_draw_first():
    # a seed whose first uniform is > 0.9: draw inverts the CDF, so position 0 draws a tail class (1/70), while
    # position 1's draw has probability 0.5. "max" scores position 0 by its top (0.9) and commits the tail draw
    # at the first call; "drawn" scores it 1/70 and commits position 1 first.
    seed = next(s for s in range(1000)
                if torch.rand(2, dtype=torch.float64, generator=torch.Generator().manual_seed(s))[0] > 0.9)
    x = torch.full((1, 2), V)
    first = {}
    for score in ("max", "drawn", None):  # None: the default
        seen = []
        kw = {} if score is None else dict(score=score)
        confidence_decode(tail_net, x, [1.0, 0.5], V, torch.Generator().manual_seed(seed),
                          callback=lambda y, t: seen.append(y.clone()), **kw)
        first[score] = seen[0][0].tolist()
    assert first["max"][1] == V and first["max"][0] not in (0, V)  # the tail class of position 0, committed
    assert first["drawn"] == [V, first["drawn"][1]] and first["drawn"][1] in (0, 1)
    assert first[None] == first["drawn"]  # "drawn" is the default
    # the threshold sampler scores draws the same way: position 0's tail draw is not forced at the first call
    run = []
    threshold_decode(tail_net, x, V, 0.9, torch.Generator().manual_seed(seed),
                     callback=lambda y, t: run.append(y.clone()))
    assert run[0][0, 0] == V and run[0][0, 1] in (0, 1)


def test_drawn_score_at_temperature_zero_ranks_by_the_top_probability():
    # temperature 0 draws the argmax (a point mass): scored at temperature 1, so the confident position goes first
    x = torch.full((1, 2), V)
    seen = []
    confidence_decode(tail_net, x, [1.0, 0.5], V, callback=lambda y, t: seen.append(y.clone()), temperature=0)
    assert seen[0][0].tolist() == [0, V]
    with pytest.raises(ValueError, match="score"):
        confidence_decode(tail_net, x, [1.0], V, score="top")


# ---- the families end to end -----------------------------------------------------------------------------------
def tiny(name, seed=0):
    cls, model_args, _ = getattr(configs, name)()
    torch.manual_seed(seed)
    return randomize_weights(cls(**model_args), seed).eval()


def record_times(model):
    times = []
    logits = model.logits

    def wrapped(x, t):
        times.append(t.clone())
        return logits(x, t)
    model.logits = wrapped
    return times


@pytest.mark.parametrize("name", ["d3pm_tiny", "mdlm_tiny"])
def test_families_threshold_end_to_end(name):
    # catches: the sampler not wired, masks left, given tokens changed, more calls than masked positions, a
    # threshold that does not change the number of calls, the wrong network time
    model = tiny(name)
    L = 32
    x = torch.full((3, L), model.mask_id)
    x[1, :5] = torch.arange(5)
    n_calls = {}
    for thr in (1.0, 0.9, 0.05):
        times = record_times(model)
        out, calls = model.sample(x, steps=7, generator=torch.Generator().manual_seed(0), sampler="threshold",
                                  threshold=thr)
        del model.logits
        assert (out != model.mask_id).all() and torch.equal(out[1, :5], x[1, :5])
        assert 1 <= calls == len(times) <= L
        n_calls[thr] = calls
        if name == "d3pm_tiny":  # integer steps, T at the first call, at least 1
            assert all(torch.equal(t, t.round()) and t.min() >= 1 for t in times) and (times[0] == model.T).all()
        else:  # linear schedule: t = the masked share of the row's originally masked positions
            assert torch.allclose(times[0], torch.ones(3, dtype=torch.float64))
    assert n_calls[1.0] == L  # one position per call
    assert n_calls[0.05] < n_calls[1.0]  # a low threshold commits several positions per call


def test_mdlm_cosine_time_is_alpha_inverse_of_the_masked_share():
    cls, model_args, _ = configs.mdlm_tiny()
    model = randomize_weights(cls(**dict(model_args, schedule="cosine", time_conditioning=True)), 0).eval()
    times = record_times(model)
    x = torch.full((1, 8), model.mask_id)
    _, calls = model.sample(x, sampler="threshold", threshold=1.0, generator=torch.Generator().manual_seed(0))
    assert calls == 8
    for j, t in enumerate(times):  # 8 - j of 8 masked: 1 - alpha(t) = cos(pi/2 (1 - t)) = (8 - j) / 8
        assert math.isclose(math.cos(math.pi / 2 * (1 - float(t[0]))), (8 - j) / 8, abs_tol=1e-9), j


@pytest.mark.parametrize("prompt", [0, 3])
def test_bd3lm_threshold_with_and_without_the_kv_cache(prompt):
    # catches: the KV-cache path broken (whole_batch), calls not counted, the cache changing the samples
    # (window 8 of 16 tokens: the context slides, blocks of 4). Threshold 1: one call per masked position
    model = tiny("bd3lm_tiny")
    n, size = 16, model.block_size
    x = torch.full((4, n), model.mask_id)
    x[:, :prompt] = torch.arange(prompt)
    n_blocks = n // size
    masked_blocks = sum(1 for s in range(0, n, size) if (x[:, s:s + size] == model.mask_id).any())
    for thr in (1.0, 0.05):
        runs = {cache: model.sample(x, generator=torch.Generator().manual_seed(1), cache=cache, sampler="threshold",
                                    threshold=thr, window=8)
                for cache in (True, False)}
        (a, calls_a), (b, calls_b) = runs[True], runs[False]
        assert torch.equal(a, b) and (a != model.mask_id).all() and torch.equal(a[:, :prompt], x[:, :prompt])
        assert calls_a == calls_b + n_blocks - 1  # the cache: one store call per finished block but the last
        if thr == 1.0:
            assert calls_b == n - prompt
        else:  # several positions per call, at least one call per block with masks
            assert masked_blocks <= calls_b < n - prompt, calls_b


def test_genmd4_threshold_is_a_value_error():
    model = tiny("genmd4_tiny")  # its own sampler loop (per-token schedule): threshold is not offered
    with pytest.raises(ValueError):
        model.sample(torch.full((1, 8), model.mask_id), sampler="threshold", threshold=0.9)


# ---- sample.py and bench.py --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    cls, model_args, training_args = configs.d3pm_tiny()
    torch.manual_seed(0)
    model = randomize_weights(cls(**model_args), 0)
    path = tmp_path_factory.mktemp("threshold") / "ckpt.pt"
    torch.save({"model": model.state_dict(), "model_cls": cls.__name__, "model_args": model_args,
                "training_args": training_args}, path)
    return str(path)


def run_sample(argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        call_main(sample, argv)
    return out.getvalue(), err.getvalue()


def test_sample_cli_threshold(ckpt):
    out, _ = run_sample([ckpt, "--device", "cpu", "--no_ema", "--seq_len", "24", "--batch_size", "2", "--json",
                         "--sampler", "threshold", "--threshold", "0.3", "--prompt", "the"])
    record = json.loads(out)
    assert record["sampler"] == "threshold" and record["threshold"] == 0.3
    assert 1 <= record["network_calls"] <= 24 - 3
    assert all(len(s) == 24 and s.startswith("the") and set(s) <= set(" abcdefghijklmnopqrstuvwxyz")
               for s in record["samples"])


@pytest.mark.parametrize("bad", ["0", "1.5", "-1", "nan"])
def test_sample_cli_bad_threshold_is_one_line(ckpt, bad):
    with pytest.raises(UserError) as e:
        run_sample([ckpt, "--device", "cpu", "--no_ema", "--sampler", "threshold", "--threshold", bad])
    assert "--threshold" in str(e.value) and "\n" not in str(e.value)


def test_bench_threshold_samplers_run_once():
    assert bench.SAMPLERS["confidence"] == dict(sampler="confidence")  # the new default score, "drawn"
    assert bench.SAMPLERS["confidence_max"] == dict(sampler="confidence", score="max")
    assert all(bench.SAMPLERS[f"threshold{c}"] == dict(sampler="threshold", threshold=c) for c in (0.7, 0.8, 0.9))
    assert bench.quality_runs("confidence,threshold0.7,threshold0.9", "8,16") == [
        ("confidence", 8), ("confidence", 16), ("threshold0.7", None), ("threshold0.9", None)]
