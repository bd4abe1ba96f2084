"""
SEDD through the scripts, in this process (conftest.call_main): train.py sedd_tiny (and with --graph=uniform
--scale_by_sigma=false --noise=geometric), sample.py with both predictors (--sampler ancestral / euler: --steps calls),
evaluate.py's continuous and N-step bounds (the uniform graph's N-step bound a one-line error), and the conditional
pipeline of tests/test_conditional_cli.py (train on prompt -> answer rows, the conditional bound, answers).
"""
import contextlib
import io
import json
import os

import numpy as np
import pytest
import torch

import evaluate
import sample
import train
from common import UserError
from conftest import call_main
from test_conditional_cli import addition, train_args  # noqa: F401 (a module fixture)

pytestmark = pytest.mark.usefixtures("one_thread")


def json_of(module, argv):
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(io.StringIO()):
        result = call_main(module, argv)
    return result if result is not None else json.loads(buf.getvalue())


@pytest.mark.parametrize("overrides", [[], ["--graph=uniform", "--scale_by_sigma=false", "--noise=geometric"]])
def test_train_sample_evaluate(tmp_path, tiny_text8_shared, overrides):
    out = tmp_path / "run"
    with contextlib.redirect_stdout(io.StringIO()):
        call_main(train, ["sedd_tiny", "--device=cpu", f"--data_root_dir={tiny_text8_shared}", f"--out_dir={out}",
                          "--max_iters=4", "--eval_interval=2", "--eval_iters=1", "--ema_update_after_step=1",
                          "--ema_beta=0.5", *overrides])
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert ckpt["model_cls"] == "SEDD" and ckpt["model_args"]["graph"] == ("uniform" if overrides else "absorb")
    base = [str(out), "--device", "cpu", "--seq_len", "16", "--batch_size", "3", "--steps", "5", "--json"]
    for sampler in ("ancestral", "euler"):
        res = json_of(sample, base + ["--sampler", sampler])
        assert res["network_calls"] == 5
        assert len(res["samples"]) == 3 and all(len(ids) == 16 and max(ids) < 27 for ids in res["ids"])
    with pytest.raises(UserError):
        json_of(sample, base + ["--sampler", "confidence"])
    ev = [str(out), "--device", "cpu", "--data_dir", os.path.join(tiny_text8_shared, "text8"), "--seq_len", "16",
          "--batch_size", "8", "--max_batches", "2", "--json"]
    res = json_of(evaluate, ev)
    assert np.isfinite(res["bpt"]) and res["bpt"] > 0 and res["model"] == "SEDD"  # (uniform, untrained: ~40 bits)
    if overrides:
        with pytest.raises(UserError, match="continuous"):
            json_of(evaluate, ev + ["--T", "8"])
    else:
        res = json_of(evaluate, ev + ["--T", "8"])
        assert 0 < res["bpt"] <= float("inf") and "8-step" in res["bound"]


def test_conditional_pipeline(addition, tmp_path):  # noqa: F811
    """train.py on prompt -> answer rows, evaluate.py's conditional bound per answer token and --accuracy."""
    with contextlib.redirect_stdout(io.StringIO()):
        call_main(train, train_args(addition, "sedd_tiny", tmp_path / "run"))
    data = os.path.join(addition, "add")
    res = json_of(evaluate, [str(tmp_path / "run"), "--data_dir", data, "--split", "test", "--batch_size", "8",
                             "--device", "cpu", "--json"])
    assert res["rows"] == 40 and np.isfinite(res["bpt"]) and res["bpt"] > 0 and "conditional" in res["bound"]
    acc = json_of(evaluate, [str(tmp_path / "run"), "--data_dir", data, "--accuracy", "--max_answers", "6",
                             "--batch_size", "3", "--steps", "4", "--device", "cpu", "--json"])
    assert acc["answers"] == 6 and 0 <= acc["accuracy"] <= 1
