"""duo.py through the scripts, like every family: train.py runs the curriculum for exactly --curriculum_iters
steps (also across a resume), evaluate.py scores the NELBO and the N-step bound, sample.py samples with prompts,
infills, greedy tail and --length, and refuses the masked families' samplers in one line."""
import json
import os

import pytest
import torch

import common
import families
import sample
from conftest import run_script
from test_families import evaluate_json, sample_json


@pytest.fixture(scope="module")
def duo_run(tmp_path_factory, tiny_text8_shared):
    """duo_tiny for 4 steps with the curriculum for the first 3, then resumed to 6 steps."""
    out = tmp_path_factory.mktemp("duo") / "run"
    args = [f"--data_root_dir={tiny_text8_shared}", "--log_interval=1", "--eval_interval=3"]
    proc = run_script(["train.py", "duo_tiny", "--curriculum_iters=3", "--max_iters=4", f"--out_dir={out}", *args])
    assert proc.returncode == 0, proc.stderr
    proc = run_script(["train.py", f"--resume={out}", "--max_iters=6", *args])
    assert proc.returncode == 0, proc.stderr
    return dict(dir=out, data_dir=os.path.join(tiny_text8_shared, "text8"))


def test_curriculum_runs_for_its_steps_across_a_resume(duo_run):
    records = [json.loads(line) for line in open(duo_run["dir"] / "log.jsonl")]
    train = {r["iter"]: r["curriculum"] for r in records if r["split"] == "train"}
    assert train == {1: 1.0, 2: 1.0, 3: 1.0, 4: 0.0, 5: 0.0, 6: 0.0}
    model = families.load_checkpoint(str(duo_run["dir"] / "last.pt"))
    assert type(model).__name__ == "Duo" and model.curriculum_iters == 3 and not model.in_curriculum


def test_evaluate_duo(duo_run, capsys):
    d = duo_run["data_dir"]
    nelbo = evaluate_json(capsys, duo_run["dir"], "--data_dir", d, "--split", "val")
    assert nelbo["model"] == "Duo" and nelbo["bound"] == "continuous NELBO" and nelbo["se"] > 0
    assert 1.0 < nelbo["bpt"] < 30
    steps = evaluate_json(capsys, duo_run["dir"], "--data_dir", d, "--split", "val", "--T", "8")
    assert steps["bound"] == "8-step bound" and steps["se"] > 0


def test_sample_duo(duo_run, capsys):
    run_dir = duo_run["dir"]
    plain = sample_json(capsys, run_dir, "--batch_size", "2", "--steps", "5", "--prompt", "the cat")
    assert plain["network_calls"] == 5
    assert all(s.startswith("the cat") and len(s) == 32 and "\u2588" not in s for s in plain["samples"])
    infill = sample_json(capsys, run_dir, "--batch_size", "2", "--infill", "the ??? sat on ???", "--steps", "3")
    assert all(s[:4] == "the " and s[7:15] == " sat on " and len(s) == 18 for s in infill["samples"])
    greedy = sample_json(capsys, run_dir, "--sampler", "greedy_tail", "--steps", "4", "--seed", "5")  # + the argmax call
    assert greedy["network_calls"] == 5 and len(greedy["samples"][0]) == 32
    default = sample_json(capsys, run_dir)
    assert default["network_calls"] == 32  # steps default to the length
    long = sample_json(capsys, run_dir, "--length", "60", "--steps", "2", "--prompt", "a")
    assert len(long["samples"][0]) == 61 and long["samples"][0][0] == "a"
    for bad in (["--sampler", "confidence"], ["--sampler", "remask"]):
        with pytest.raises(common.UserError, match="ancestral or greedy_tail"):
            sample.main([str(run_dir), "--device", "cpu", *bad])


def test_same_seed_same_samples(duo_run):
    model = families.load_checkpoint(str(duo_run["dir"] / "ckpt.pt"))
    x = torch.full((3, 32), model.mask_id)
    a, _ = model.sample(x, steps=6, generator=torch.Generator().manual_seed(1))
    b, _ = model.sample(x, steps=6, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and a.max() < model.vocab_size
