"""bench.py on a tiny config, on the CPU (also on a machine with CUDA): every benchmark prints well-formed
JSON lines whose figures are right, checked against quantities recomputed here (parameter and FLOP
counts, network calls of the sampler, the estimators' spread). No timing assertions.

bench.main runs in this process (conftest.call_main); two bad options run `python bench.py` for the
one-line error contract."""
import contextlib
import io
import json
import math

import pytest
import torch

import bench
import configs
from common import UserError
from conftest import assert_one_line_error, call_main, run_script


def run_bench(*args):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        call_main(bench, ["d3pm_tiny", "--device=cpu", *args])
    return [json.loads(line) for line in out.getvalue().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def records():
    return {r["bench"]: r for r in run_bench("--steps=2", "--warmup=1", "--eval_batches=8", "--eval_batch_size=8",
                                             "--sample_batch=3", "--target_se=0.05")}


def tiny_model():
    torch.manual_seed(0)  # what bench.build does with the default --seed=0
    cls, model_args, training_args = configs.d3pm_tiny()
    return cls(**model_args), model_args, training_args


def test_bench_all_modes_emit_json(records):
    assert set(records) == {"train", "sample", "eval"}


def test_train_figures(records):
    """Parameter count, K, FLOPs per token (6 N + 12 n_blocks n_embed L) from the model and config built
    here; tokens/s consistent with ms/step; CPU: no MFU."""
    train = records["train"]
    model, model_args, training_args = tiny_model()
    B, L = training_args["batch_size"], training_args["seq_len"]
    n_params = sum(p.numel() for p in model.parameters())
    assert (train["batch_size"], train["seq_len"], train["K"]) == (B, L, model_args["vocab_size"] + 1)
    assert train["params_M"] == pytest.approx(n_params / 1e6, rel=1e-12)
    assert train["flops_per_token"] == 6 * n_params + 12 * model_args["n_blocks"] * model_args["n_embed"] * L
    assert train["tokens_per_s"] == pytest.approx(B * L / (train["ms_per_step"] / 1000), rel=1e-9)
    assert train["device"] == "cpu" and train["mfu"] is None and not train["compile"] and not train["bf16"]
    assert train["peak_mem_MB"] > 0 and math.isfinite(train["final_loss"]) and train["final_loss"] > 0


def test_sample_figures(records):
    """The plain sampler calls the network T times; the fast one as often as the model's own sampler does
    with the same seed (recomputed here), i.e. once per distinct unmasking time, at most T."""
    sample = records["sample"]
    model, model_args, _ = tiny_model()
    model.eval()
    x = torch.full((3, sample["seq_len"]), model.mask_id)
    _, calls = model.sample(x, generator=torch.Generator().manual_seed(0), cache=True)
    assert sample["plain_calls"] == model_args["T"]
    assert sample["fast_calls"] == calls and 0 < calls < model_args["T"]
    assert sample["speedup"] == pytest.approx(sample["plain_seconds"] / sample["fast_seconds"], rel=1e-9)


def test_sample_with_the_network_compiled():
    """--compile=True times the fast sampler again with the network compiled (aot_eager here: no code generation)
    and checks that it samples the same sequences."""
    torch._dynamo.reset()
    (rec,) = run_bench("--mode=sample", "--compile=True", "--compile_backend=aot_eager", "--sample_batch=2")
    assert rec["compile"] == "aot_eager" and rec["compiled_identical"] is True and rec["identical"] is True
    assert rec["compiled_speedup"] == pytest.approx(rec["fast_seconds"] / rec["compiled_seconds"], rel=1e-9)
    assert rec["compiled_first_seconds"] > 0


def test_eval_figures(records):
    """Both estimators estimate the same bound on the same batches: their means agree within their
    standard errors; the calls needed for the target standard error follow from each spread."""
    ev = records["eval"]
    n = ev["batches"]
    se = math.hypot(ev["stratified_batch_std"], ev["plain_batch_std"]) / math.sqrt(n)
    assert abs(ev["stratified_bpt"] - ev["plain_bpt"]) < 4 * se, ev
    for name in ("stratified", "plain"):
        assert ev[f"{name}_calls_for_target"] == math.ceil((ev[f"{name}_batch_std"] / ev["target_se_bits"]) ** 2)
    assert ev["call_ratio"] == ev["plain_calls_for_target"] / ev["stratified_calls_for_target"]


@pytest.mark.parametrize("arg,words", [("--nope=1", ["unknown option --nope", "steps", "mode"]),
                                      ("--compile=flase", ["--compile=flase: expected bool"])])
def test_bench_bad_option_is_one_line(arg, words):
    """train.py's parser (configs.parse_overrides): an unknown key lists the valid ones; a bad bool is refused."""
    assert_one_line_error(run_script(["bench.py", "d3pm_tiny", arg]), *words)


def test_bench_options_are_type_checked():
    """The same reading as train.py's: ints may hold _, bools are yes/no words, the wrong type is an error."""
    saved = dict(vars(bench))
    try:
        assert bench.parse(["d3pm_tiny", "--steps=1_000", "--compile=yes", "--bf16=off", "--target_se=1e-3"]) == \
            "d3pm_tiny"
        assert (bench.steps, bench.compile, bench.bf16, bench.target_se) == (1000, True, False, 1e-3)
        for arg in ("--steps=2.5", "--bf16=flase", "--steps"):
            with pytest.raises(UserError, match=arg.split("=")[0]):
                bench.parse(["d3pm_tiny", arg])
    finally:
        vars(bench).update(saved)
