"""
evaluate.py --choices: multiple choice on a pair dataset by the model's own conditional bound.

The oracle, by brute force on a tiny character pair dataset (alphabet abc, end-of-answer id 3, mask id 4, rows of
L = 6) and a tiny time-free MDLM: for a row x_0 with prompt C (never masked) and answer region U (n = |U|), and every
non-empty S of U (k = |S|), CE_S = sum_{l in S} -log p(x_0^l | x_0 with S masked) (float64 softmax of the network's
first V logits). With u = 1 - alpha(t) and w(t) dt = du / u, the continuous NELBO of the answer given the prompt is
    int_0^1 (1/u) sum_S u^k (1 - u)^(n-k) CE_S du = sum_S (k-1)! (n-k)! / n! CE_S = sum_S CE_S / (k C(n, k))
(the any-order form: k uniform on 1..n, S uniform of size k, (n/k) CE_S), divided by n per answer token. The mean
of many independent --choices estimates (evaluate.choice_bound) must lie within 4 standard errors of it, and at
least 8 away from plausibly wrong values: the prompt masked too (the unconditional NELBO of the row per token), and
the conditional NELBO divided by L instead of n.
"""
import contextlib
import io
import itertools
import json
import math
import os
import pickle

import numpy as np
import pytest
import torch

import evaluate
from common import UserError, load_codec
from conftest import assert_one_line_error, call_main, randomize_weights, run_script, write_tiny_text8
from mdlm import MDLM

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny tensors, 2 cores shared

L = 6
ARGS = dict(vocab_size=4, n_embed=16, n_heads=2, n_blocks=1, n_cond=8, dropout=0.0)  # a, b, c, end-of-answer
TRAIN = [("ab", "ba"), ("ca", "cc"), ("bb", "a"), ("cb", "abc")]
TEST = [("ab", "ba"), ("ac", "c")]


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """A character pair dataset (data/prepare_pairs.prepare) with rows of 6, a tiny random MDLM saved as a
    checkpoint of it; (data_dir, checkpoint path, model)."""
    from data.prepare_pairs import prepare
    root = tmp_path_factory.mktemp("choices")
    with contextlib.redirect_stdout(io.StringIO()):
        meta = prepare(TRAIN, TEST, str(root / "abc"), tokenizer="chars", seq_len=L)
    assert meta["vocab_size"] == ARGS["vocab_size"] and meta["eoa_id"] == 3
    torch.manual_seed(0)
    model = randomize_weights(MDLM(**ARGS), 19).eval()
    ckpt = root / "m.pt"
    torch.save({"model": model.state_dict(), "model_cls": "MDLM", "model_args": ARGS,
                "training_args": {"dataset": "abc", "seq_len": L}}, ckpt)
    return str(root / "abc"), str(ckpt), model


def write_questions(path, questions):
    path.write_text("".join(json.dumps(q) + "\n" for q in questions))
    return str(path)


def run_choices(ckpt, data_dir, questions_file, *extra):
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return call_main(evaluate, [ckpt, "--no_ema", "--data_dir", data_dir, "--choices", questions_file,
                                    "--device", "cpu", "--json", *extra])


# ---- the brute-force oracle -----------------------------------------------------------------------------------
@torch.no_grad()
def exact_nelbo(model, x0, U, norm=None):
    """sum over non-empty S of U of CE_S / (k C(n, k)), divided by n (norm: by that instead), nats per token."""
    n, total = len(U), 0.0
    for k in range(1, n + 1):
        for S in itertools.combinations(U, k):
            x_t = x0.clone()
            x_t[list(S)] = model.mask_id
            logp = model.logits(x_t[None], torch.zeros(1))[0, :, :model.vocab_size].double().log_softmax(-1)
            total += float(-logp[list(S), x0[list(S)]].sum()) / (k * math.comb(n, k))
    return total / (n if norm is None else norm)


def test_rows_are_the_training_rows(pairs):
    """choice_rows builds a choice's row exactly as prepare_pairs builds the training row of (prompt, choice)."""
    data_dir, _, _ = pairs
    codec = load_codec(ARGS["vocab_size"], "", data_dir)
    rows = np.load(os.path.join(data_dir, "test.npy"))
    prompt_len = np.load(os.path.join(data_dir, "test_prompt_len.npy"))
    got, p = evaluate.choice_rows(codec, "ab", ["ba", "c"], L, "q")
    assert got[0].tolist() == rows[0].tolist() == [0, 1, 1, 0, 3, 3] and p == prompt_len[0] == 2
    assert got[1].tolist() == [0, 1, 2, 3, 3, 3]


def test_estimate_is_unbiased(pairs):
    """The mean of 300 independent 32-draw estimates matches the exact conditional NELBO per answer token; the
    prompt masked too, or / L instead of / n, is rejected; the reported standard error is the estimates' spread."""
    data_dir, _, model = pairs
    codec = load_codec(ARGS["vocab_size"], "", data_dir)
    rows, p = evaluate.choice_rows(codec, "ab", ["ba", "c"], L, "q")
    for row in rows:
        runs = [evaluate.choice_bound(model, row, p, 32, 64, torch.Generator().manual_seed(s)) for s in range(300)]
        est = np.array([r[0] for r in runs]) * math.log(2)  # nats
        mean, se = est.mean(), est.std(ddof=1) / math.sqrt(len(est))
        exact = exact_nelbo(model, row, list(range(p, L)))
        assert abs(mean - exact) < 4 * se, (mean, exact, se)
        for wrong in (exact_nelbo(model, row, list(range(L))), exact_nelbo(model, row, list(range(p, L)), norm=L)):
            assert abs(mean - wrong) > 8 * se, (mean, wrong, se)
        reported = np.median([r[1] for r in runs]) * math.log(2)
        assert 0.5 < reported / est.std(ddof=1) < 2.0


def test_cli_output_and_out_lines(pairs, tmp_path):
    """--json: accuracy, its Wilson interval, counts and mc; --out: a line per question, the pick the lowest."""
    data_dir, ckpt, _ = pairs
    questions = [{"prompt": "ab", "choices": ["ba", "c", "aa"], "label": 0},
                 {"prompt": "ca", "choices": ["cc", "b"], "label": 1}]
    out = tmp_path / "picks.jsonl"
    res = run_choices(ckpt, data_dir, write_questions(tmp_path / "q.jsonl", questions), "--mc", "8",
                      "--batch_size", "4", "--out", str(out))
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert res["questions"] == 2 and res["mc"] == 8 and "conditional" in res["bound"]
    assert res["correct"] == sum(r["pick"] == r["label"] for r in lines) and res["accuracy"] == res["correct"] / 2
    assert res["ci95"] == list(evaluate.wilson(res["correct"], 2))
    for q, r in zip(questions, lines):
        assert {k: r[k] for k in q} == q and r["correct"] == (r["pick"] == q["label"])
        assert len(r["bpt"]) == len(r["se"]) == len(q["choices"]) and r["pick"] == int(np.argmin(r["bpt"]))
        assert all(b > 0 and s > 0 for b, s in zip(r["bpt"], r["se"]))
    assert run_choices(ckpt, data_dir, str(tmp_path / "q.jsonl"), "--mc", "8", "--batch_size", "4") == res  # seeded


def test_fake_models_pick_what_they_favour(pairs, tmp_path, monkeypatch):
    """A network whose logits put all mass on the labelled choice's row picks every label; one that favours choice 0
    picks 0 everywhere."""
    data_dir, ckpt, _ = pairs
    codec = load_codec(ARGS["vocab_size"], "", data_dir)
    questions = [{"prompt": "ab", "choices": ["ba", "c", "aa"], "label": 1},
                 {"prompt": "ca", "choices": ["cc", "b"], "label": 0},
                 {"prompt": "bc", "choices": ["a", "ab", "cba"], "label": 2}]
    path = write_questions(tmp_path / "q.jsonl", questions)

    def favouring(pick):
        rows = {q["prompt"]: evaluate.choice_rows(codec, q["prompt"], q["choices"], L, "q")[0][pick(q)]
                for q in questions}

        def logits(self, x_t, t):
            out = torch.full((*x_t.shape, self.vocab_size + 1), -1e4)
            for i, x in enumerate(x_t):
                out[i, torch.arange(L), rows[codec.decode(x[:2].tolist())]] = 0.0
            out[..., self.mask_id] = float("-inf")
            return out
        return logits

    monkeypatch.setattr(MDLM, "logits", favouring(lambda q: q["label"]))
    out = tmp_path / "picks.jsonl"
    res = run_choices(ckpt, data_dir, path, "--out", str(out))
    assert res["accuracy"] == 1.0 and res["correct"] == res["questions"] == 3
    assert [json.loads(line)["pick"] for line in out.read_text().splitlines()] == [1, 0, 2]
    monkeypatch.setattr(MDLM, "logits", favouring(lambda q: 0))
    res = run_choices(ckpt, data_dir, path, "--out", str(out))
    assert [json.loads(line)["pick"] for line in out.read_text().splitlines()] == [0, 0, 0]
    assert res["correct"] == 1 and res["ci95"] == list(evaluate.wilson(1, 3))


@pytest.mark.parametrize("line, words", [
    ({"prompt": "ab", "choices": ["a", "b"]}, "missing: label"),
    ({"prompt": "ab", "choices": ["a", "b"], "label": 2}, "label must be"),
    ({"prompt": "ab", "choices": ["a", "b"], "label": True}, "label must be"),
    ({"prompt": "ab", "choices": ["a"], "label": 0}, "at least 2 choices"),
    ({"prompt": "ab", "choices": ["a", 3], "label": 0}, "non-empty strings"),
    ({"prompt": "abc", "choices": ["a", "bbb"], "label": 0}, "q.jsonl:2: prompt and choice 1"),
    ({"prompt": "ab", "choices": ["a", "d"], "label": 0}, "q.jsonl:2: character 'd'"),
])
def test_bad_questions(pairs, tmp_path, line, words):
    data_dir, ckpt, _ = pairs
    path = write_questions(tmp_path / "q.jsonl", [{"prompt": "ab", "choices": ["a", "b"], "label": 0}, line])
    with pytest.raises(UserError, match=words):
        run_choices(ckpt, data_dir, path)


def test_one_line_errors(pairs, tmp_path):
    """A text dataset and --mc 0 are one-line errors; as a child process, a bad label is one line on stderr."""
    data_dir, ckpt, _ = pairs
    path = write_questions(tmp_path / "q.jsonl", [{"prompt": "ab", "choices": ["a", "b"], "label": 0}])
    text = os.path.join(write_tiny_text8(tmp_path / "root"), "text8")
    with pytest.raises(UserError, match="pair dataset"):
        run_choices(ckpt, text, path)
    with pytest.raises(UserError, match="--mc"):
        run_choices(ckpt, data_dir, path, "--mc", "0")
    bad = write_questions(tmp_path / "bad.jsonl", [{"prompt": "ab", "choices": ["a", "b"], "label": 5}])
    proc = run_script(["evaluate.py", ckpt, "--no_ema", "--data_dir", data_dir, "--choices", bad, "--device", "cpu"],
                      timeout=120)
    assert_one_line_error(proc, "bad.jsonl:1", "label must be")
