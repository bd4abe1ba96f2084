"""
GIDD through the scripts, in this process (conftest.call_main): train.py gidd_tiny with --p_uniform overridden, then
sample.py with and without self-correction (--correction_steps), and evaluate.py's continuous and N-step bounds.
Another family refuses --correction_steps in one line.
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

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_text8_shared):
    out = tmp_path_factory.mktemp("gidd") / "run"
    with contextlib.redirect_stdout(io.StringIO()):
        call_main(train, ["gidd_tiny", "--device=cpu", f"--data_root_dir={tiny_text8_shared}", f"--out_dir={out}",
                          "--max_iters=4", "--eval_interval=2", "--eval_iters=1", "--p_uniform=0.2",
                          "--ema_update_after_step=1", "--ema_beta=0.5"])
    return dict(run=str(out), data_dir=os.path.join(tiny_text8_shared, "text8"))


def json_of(module, argv):
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(io.StringIO()):
        result = call_main(module, argv)
    return result if result is not None else json.loads(buf.getvalue())


def test_train_overrides_p_uniform_and_the_scripts_sample_and_score(run):
    ckpt = torch.load(os.path.join(run["run"], "ckpt.pt"), weights_only=True)
    assert ckpt["model_cls"] == "GIDD" and ckpt["model_args"]["p_uniform"] == 0.2
    base = [run["run"], "--device", "cpu", "--seq_len", "16", "--batch_size", "3", "--steps", "5", "--json"]
    plain = json_of(sample, base)
    corrected = json_of(sample, base + ["--correction_steps", "4"])
    assert plain["network_calls"] == 5 and 5 < corrected["network_calls"] <= 9
    for res in (plain, corrected):
        assert len(res["samples"]) == 3 and all(len(ids) == 16 and max(ids) < 27 for ids in res["ids"])
    ev = [run["run"], "--device", "cpu", "--data_dir", run["data_dir"], "--seq_len", "16",
          "--batch_size", "8", "--max_batches", "2", "--json"]
    for extra in ([], ["--T", "8"]):
        res = json_of(evaluate, ev + extra)
        assert np.isfinite(res["bpt"]) and 0 < res["bpt"] < 20
    with pytest.raises(UserError, match="--correction_steps >= 0"):
        json_of(sample, base + ["--correction_steps", "-1"])


def test_a_family_without_self_correction_refuses_it_in_one_line(tmp_path):
    import configs
    cls, args, _ = configs.mdlm_tiny()
    torch.save(dict(model=cls(**args).state_dict(), model_cls="MDLM", model_args=args), tmp_path / "m.pt")
    with pytest.raises(UserError, match="MDLM has no self-correction"):
        json_of(sample, [str(tmp_path / "m.pt"), "--no_ema", "--device", "cpu", "--seq_len", "8", "--correction_steps",
                         "2", "--json"])
