"""Conditional generation end to end on a tiny task, for every family: data/prepare_pairs.py writes an addition task,
train.py trains on its rows (the prompt positions passed to the family as the protocol's clean mask, the row length
from the dataset), and evaluate.py scores the conditional bound per answer token on the test rows. The families'
conditional losses and bounds are checked against exact enumerations in their own test files; this checks the
scripts around them (what reaches forward and batch_bound, the one-line errors)."""
import contextlib
import io
import json
import os

import numpy as np
import pytest
import torch

import evaluate
import train
from common import UserError
from conftest import REPO_ROOT, call_main

pytestmark = pytest.mark.usefixtures("one_thread")

FAMILIES = ["d3pm_tiny", "mdlm_tiny", "ar_tiny", "bd3lm_tiny", "genmd4_tiny", "duo_tiny"]


@pytest.fixture(scope="module")
def addition(tmp_path_factory):
    """data_root/add: 200 training and 40 test additions of 1-2 digit numbers, characters, rows of 16."""
    import sys
    sys.path.insert(0, str(REPO_ROOT / "data"))
    import prepare_pairs
    root = tmp_path_factory.mktemp("pairs")
    with contextlib.redirect_stdout(io.StringIO()):
        assert prepare_pairs.main(["--task", "addition", "--n_train", "200", "--n_test", "40", "--max_digits", "2",
                                   "--seed", "3", "--out", str(root / "add")]) == 0
    return str(root)


def train_args(root, config, out_dir, *extra):
    return [config, "--device=cpu", f"--data_root_dir={root}", "--dataset=add", f"--out_dir={out_dir}",
            "--max_iters=3", "--eval_interval=3", "--eval_iters=1", "--batch_size=8", "--log_interval=1", *extra]


@pytest.mark.parametrize("config", FAMILIES)
def test_train_and_evaluate_on_pairs(addition, tmp_path, config, monkeypatch):
    """Every training batch reaches forward with clean = the rows' prompt positions; evaluate.py reports the
    conditional bound on the test rows, finite, given each row's prompt."""
    rows = np.load(os.path.join(addition, "add", "train.npy"))
    prompt_len = np.load(os.path.join(addition, "add", "train_prompt_len.npy"))
    seen = []
    real_get_batch = train.get_batch

    def recorded(data, generator, vocab_size, dev):
        x, extra = real_get_batch(data, generator, vocab_size, dev)
        seen.append((x.clone(), extra["clean"].clone()))
        return x, extra

    monkeypatch.setattr(train, "get_batch", recorded)
    with contextlib.redirect_stdout(io.StringIO()):
        call_main(train, train_args(addition, config, tmp_path / "run"))
    assert seen
    by_row = {tuple(r): p for r, p in zip(rows.tolist(), prompt_len.tolist())}
    for x, clean in seen:
        assert x.shape[1] == rows.shape[1] == clean.shape[1]  # the row length came from the dataset
        for row, mask in zip(x.tolist(), clean.tolist()):
            if tuple(row) in by_row:  # a training row (validation draws test rows)
                assert mask == [i < by_row[tuple(row)] for i in range(len(row))]
    with contextlib.redirect_stdout(io.StringIO()):
        res = call_main(evaluate, [str(tmp_path / "run"), "--data_dir", os.path.join(addition, "add"), "--split",
                                   "test", "--batch_size", "8", "--device", "cpu", "--json"])
    assert res["rows"] == 40 and np.isfinite(res["bpt"]) and res["bpt"] > 0 and "conditional" in res["bound"]
    out = tmp_path / "answers.jsonl"
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        acc = call_main(evaluate, [str(tmp_path / "run"), "--data_dir", os.path.join(addition, "add"), "--accuracy",
                                   "--max_answers", "10", "--batch_size", "4", "--steps", "4", "--device", "cpu",
                                   "--json", "--out", str(out)])
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    with open(os.path.join(addition, "add", "test_pairs.jsonl")) as f:
        reference = [json.loads(line) for line in f][:10]
    assert acc["answers"] == 10 and 0 <= acc["accuracy"] <= 1 and acc["judged_by"] == "the addition checker"
    assert [r["prompt"] for r in lines] == [r["prompt"] for r in reference]
    assert [r["reference"] for r in lines] == [r["answer"] for r in reference]
    assert all(r["network_calls"] >= 1 and set(r["answer"]) <= set("0123456789+=") for r in lines)
    lo, hi = acc["ci95"]
    assert lo <= acc["accuracy"] <= hi


def test_answers_of_a_model_that_knows_them(addition, tmp_path, monkeypatch):
    """sample.py --prompts and evaluate.py --accuracy on a fake model whose every draw is the reference answer (its
    logits put all mass on the row's true continuation): every answer is right, cut at its end-of-answer, in the
    prompts' order; a prompt too long for the rows is a one-line error."""
    import pickle
    import families
    import sample
    from conftest import assert_one_line_error, run_script
    from test_distill_cli import write_untrained
    data_dir = os.path.join(addition, "add")
    with open(os.path.join(data_dir, "meta.pkl"), "rb") as f:
        meta = pickle.load(f)
    ckpt = torch.load(write_untrained(tmp_path / "m.pt", "mdlm_tiny"), weights_only=True)
    ckpt["model_args"]["vocab_size"] = meta["vocab_size"]
    model = families.FAMILIES["MDLM"](**ckpt["model_args"])
    ckpt["model"] = model.state_dict()  # the weights do not matter: logits is replaced below
    ckpt["training_args"] = {"dataset": "add", "seq_len": meta["seq_len"]}
    del ckpt["ema"]
    torch.save(ckpt, tmp_path / "pair.pt")
    rows = np.load(os.path.join(data_dir, "test.npy"))
    truth = torch.from_numpy(rows.astype(np.int64))

    def knowing(self, x_t, t):
        """All mass on the one test row that agrees with every visible token of x_t (the prompt identifies it)."""
        logits = torch.full((*x_t.shape, self.vocab_size + 1), -1e4)
        for i, row in enumerate(x_t):
            agree = ((truth == row) | (row == self.mask_id)).all(1)
            assert agree.sum() == 1
            logits[i, torch.arange(len(row)), truth[agree][0]] = 0.0
        logits[..., self.mask_id] = float("-inf")
        return logits

    monkeypatch.setattr(families.FAMILIES["MDLM"], "logits", knowing)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        acc = call_main(evaluate, [str(tmp_path / "pair.pt"), "--no_ema", "--data_dir", data_dir, "--accuracy",
                                   "--batch_size", "16", "--device", "cpu", "--json"])
    assert acc["accuracy"] == 1.0 and acc["answers"] == 40
    prompts = tmp_path / "p.jsonl"
    with open(os.path.join(data_dir, "test_pairs.jsonl")) as f:
        pairs = [json.loads(line) for line in f][:5]
    prompts.write_text("".join(json.dumps({"prompt": p["prompt"]}) + "\n" for p in pairs))
    with contextlib.redirect_stdout(io.StringIO()) as stdout, contextlib.redirect_stderr(io.StringIO()):
        call_main(sample, [str(tmp_path / "pair.pt"), "--no_ema", "--data_dir", data_dir, "--prompts", str(prompts),
                           "--device", "cpu"])
    assert stdout.getvalue().split() == [p["answer"] for p in pairs]
    proc = run_script(["sample.py", str(tmp_path / "pair.pt"), "--no_ema", "--data_dir", data_dir, "--prompt",
                       "1+" + "9" * 20 + "=", "--device", "cpu"], timeout=120)
    assert_one_line_error(proc, "no room for an answer")


def test_the_row_length_comes_from_the_dataset(addition, tmp_path):
    with pytest.raises(UserError, match="rows of 16 tokens"), contextlib.redirect_stdout(io.StringIO()):
        call_main(train, train_args(addition, "mdlm_tiny", tmp_path / "r", "--seq_len=32"))


def test_clean_positions_are_the_prompt():
    from common import clean_positions
    got = clean_positions(torch.tensor([0, 2, 5]), 4)
    assert got.tolist() == [[False] * 4, [True, True, False, False], [True] * 4]


def test_init_from_starts_from_a_checkpoints_weights(addition, tmp_path):
    """--init_from: a new run with the class, arguments and (EMA) weights of a checkpoint; at learning rate 0 its
    weights stay those. A checkpoint of another vocabulary is a one-line error."""
    import families
    from test_distill_cli import write_untrained
    with contextlib.redirect_stdout(io.StringIO()):
        call_main(train, train_args(addition, "mdlm_tiny", tmp_path / "a", "--ema_update_after_step=0",
                                    "--ema_beta=0.5"))
        call_main(train, train_args(addition, "d3pm_tiny", tmp_path / "b", f"--init_from={tmp_path / 'a'}",
                                    "--max_iters=1", "--learning_rate=0", "--min_lr=0", "--decay_lr=False"))
    source = families.load_checkpoint(str(tmp_path / "a" / "ckpt.pt"))  # its EMA weights
    started = torch.load(tmp_path / "b" / "last.pt", weights_only=True)
    assert started["model_cls"] == "MDLM"  # the checkpoint's class, not the config's
    assert all(torch.equal(started["model"][k], v) for k, v in source.state_dict().items())
    text8 = write_untrained(tmp_path / "text8.pt", "mdlm_tiny")  # vocab_size 27
    with pytest.raises(UserError, match="vocab_size 27"), contextlib.redirect_stdout(io.StringIO()):
        call_main(train, train_args(addition, "mdlm_tiny", tmp_path / "c", f"--init_from={text8}"))
