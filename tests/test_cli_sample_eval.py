"""
Command-line tests of sample.py and evaluate.py on a checkpoint that train.py d3pm_tiny writes in a
few steps on a fake text8 dataset (conftest.py).

To keep the file fast on two cores, all commands are declared up front (CASES) and run once by the
module fixture `results`, in this process (conftest.call_main: sample.main / evaluate.main, stdout and
stderr captured, a UserError printed as the scripts print it); each test then checks the outcome of
its own command(s). Two error cases (SCRIPT_CASES) run the scripts as real children, for their own
one-line error contract.
"""
import contextlib
import io
import json
import os
import pickle
import subprocess

import numpy as np
import pytest
import torch

import evaluate
import sample
import train
from common import UserError
from conftest import REPO_ROOT, call_main, describe, run_script

ALPHABET = set(" abcdefghijklmnopqrstuvwxyz")
SCRIPT_CASES = ("err_garbage", "eval_err_split")  # run as `python SCRIPT ...` children
MODULES = {"sample.py": sample, "evaluate.py": evaluate}


def run_here(argv):
    """`python SCRIPT ARGS` as the scripts' __main__ would run it, but in this process."""
    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            call_main(MODULES[argv[0]], argv[1:])
        except UserError as e:
            print(f"error: {e}", file=err)
            code = 2
    return subprocess.CompletedProcess(argv, code, out.getvalue(), err.getvalue())


# ---- the checkpoint and the datasets ------------------------------------------------------------
@pytest.fixture(scope="module")
def env(tmp_path_factory, tiny_text8_shared):
    root = tmp_path_factory.mktemp("cli")
    out = root / "run"
    with contextlib.redirect_stdout(io.StringIO()):
        call_main(train, ["d3pm_tiny", "--device=cpu", f"--data_root_dir={tiny_text8_shared}", f"--out_dir={out}",
                          "--max_iters=4", "--eval_interval=2", "--ema_update_after_step=1", "--ema_beta=0.5"])
    ckpt = out / "ckpt.pt"
    assert ckpt.is_file()

    garbage = root / "garbage.pt"
    garbage.write_bytes(b"this is not a torch checkpoint\n" * 64)
    bad_vocab = root / "bad_vocab"
    bad_vocab.mkdir()
    np.save(bad_vocab / "test.npy", np.full(500, 40, dtype=np.uint16))
    short = root / "short"
    short.mkdir()
    np.save(short / "test.npy", np.arange(10, dtype=np.uint16) % 27)
    with open(os.path.join(tiny_text8_shared, "text8", "meta.pkl"), "rb") as f:
        meta = pickle.load(f)
    for d in (bad_vocab, short):
        with open(d / "meta.pkl", "wb") as f:
            pickle.dump(meta, f)
    return dict(ckpt=str(ckpt), run_dir=str(out), data_dir=os.path.join(tiny_text8_shared, "text8"),
                garbage=str(garbage), missing=str(root / "missing" / "ckpt.pt"),
                bad_vocab=str(bad_vocab), short=str(short))


def cases(e):
    """name -> argv (after the interpreter)."""
    s = ["sample.py", e["ckpt"], "--device", "cpu", "--seq_len", "32"]  # (a later --device wins: err_cuda)
    ev = ["evaluate.py", e["ckpt"], "--device", "cpu", "--data_dir", e["data_dir"], "--seq_len", "32", "--batch_size",
          "8"]
    return {
        # sampling
        "plain": s + ["--batch_size", "2"],
        "other_seed": s + ["--batch_size", "2", "--seed", "7"],
        "json": s + ["--batch_size", "3", "--json"],
        "prompt": s + ["--batch_size", "3", "--prompt", "the cat", "--json"],
        "infill": s + ["--batch_size", "3", "--infill", "the ??? sat", "--json"],
        "steps": s + ["--batch_size", "2", "--steps", "5", "--json"],
        "no_ema": s + ["--batch_size", "2", "--no_ema"],
        "no_ema_alias": s + ["--batch_size", "2", "--no-ema"],  # nanoDD's spelling, not in --help
        "load_ema_false": s + ["--batch_size", "2", "--load_ema", "false"],  # nanoDD's flag, the shared bool rule
        "run_dir": ["sample.py", e["run_dir"], "--device", "cpu", "--seq_len", "32", "--batch_size", "2"],
        # sampling errors
        "err_missing": ["sample.py", e["missing"]],
        "err_garbage": ["sample.py", e["garbage"]],
        "err_hub_offline": ["sample.py", "nobody/nothing"],
        "err_alphabet": s + ["--prompt", "Hello, world!"],
        "err_long_prompt": s + ["--prompt", "a" * 40],
        "err_prompt_eq_len": s + ["--prompt", "a" * 32],
        "err_no_placeholder": s + ["--infill", "no holes here"],
        "err_prompt_and_infill": s + ["--prompt", "the", "--infill", "the ???"],
        "err_load_ema": s + ["--load_ema", "flase"],
        **({} if torch.cuda.is_available() else {"err_cuda": s + ["--device", "cuda"]}),
        # evaluation
        "eval_json": ev + ["--max_batches", "5", "--json"],
        "eval_text": ev + ["--max_batches", "3"],
        "eval_one_batch": ev + ["--max_batches", "1", "--json"],
        "eval_no_ema": ev + ["--max_batches", "1", "--json", "--no_ema"],
        "eval_no_ema_alias": ev + ["--max_batches", "1", "--json", "--no-ema"],
        "eval_err_split": ev + ["--max_batches", "2", "--split", "nope"],
        "eval_err_vocab": ["evaluate.py", e["ckpt"], "--device", "cpu", "--data_dir", e["bad_vocab"], "--seq_len", "32",
                           "--batch_size", "8", "--max_batches", "2"],
        "eval_err_batch0": ev[:-1] + ["0", "--max_batches", "2"],
        "eval_err_short": ["evaluate.py", e["ckpt"], "--device", "cpu", "--data_dir", e["short"], "--seq_len", "32",
                           "--batch_size", "8", "--max_batches", "2"],
    }


@pytest.fixture(scope="module")
def results(env):
    todo = cases(env)
    done = {k: run_script(todo[k]) for k in SCRIPT_CASES}
    cwd, hub = os.getcwd(), os.environ.get("HF_HUB_OFFLINE")
    os.chdir(REPO_ROOT)
    os.environ["HF_HUB_OFFLINE"] = "1"  # err_hub_offline: no network
    try:
        done.update({k: run_here(argv) for k, argv in todo.items() if k not in done})
    finally:
        os.chdir(cwd)
        if hub is None:
            os.environ.pop("HF_HUB_OFFLINE")
        else:
            os.environ["HF_HUB_OFFLINE"] = hub
    return done


def ok(results, name):
    proc = results[name]
    assert proc.returncode == 0, f"{name}: {describe(proc)}"
    assert "Traceback" not in proc.stderr, f"{name}: {describe(proc)}"
    return proc


def json_out(results, name):
    proc = ok(results, name)
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    assert len(lines) == 1, f"{name}: expected one JSON line on stdout: {describe(proc)}"
    return json.loads(lines[0])


def text_samples(proc):
    return proc.stdout.rstrip("\n").split("\n\n")


# ---- sample.py -----------------------------------------------------------------------------------
def test_plain_text_output(results):
    proc = ok(results, "plain")
    samples = text_samples(proc)
    assert len(samples) == 2, describe(proc)
    for s in samples:
        assert len(s) == 32 and set(s) <= ALPHABET, repr(s)
    assert "\x1b[" not in proc.stdout, "ANSI codes written to a pipe"
    assert "network calls" in proc.stderr


def test_run_directory_accepted(results):
    """A run directory means its ckpt.pt; same checkpoint and default seed: the very same samples."""
    assert text_samples(ok(results, "run_dir")) == text_samples(ok(results, "plain"))


def test_json_output(results):
    out = json_out(results, "json")
    assert {"samples", "ids", "network_calls", "seconds"} <= set(out)
    assert len(out["samples"]) == len(out["ids"]) == 3
    for text, ids in zip(out["samples"], out["ids"]):
        assert len(text) == len(ids) == 32 and set(text) <= ALPHABET
        assert all(0 <= i < 27 for i in ids), ids  # no mask id (27) left
        assert text == "".join(" abcdefghijklmnopqrstuvwxyz"[i] for i in ids)
    assert isinstance(out["network_calls"], int) and 1 <= out["network_calls"] <= 50  # d3pm_tiny has T = 50
    assert out["seconds"] >= 0


def test_prompt(results):
    out = json_out(results, "prompt")
    assert len(out["samples"]) == 3
    for s in out["samples"]:
        assert s.startswith("the cat") and len(s) == 32 and set(s) <= ALPHABET


def test_infill(results):
    out = json_out(results, "infill")
    template = "the ??? sat"
    for s in out["samples"]:
        assert len(s) == len(template) and set(s) <= ALPHABET
        for c, t in zip(s, template):
            if t != "?":
                assert c == t, (s, template)


def test_steps(results):
    out = json_out(results, "steps")
    assert out["network_calls"] <= 5
    assert all(len(s) == 32 and set(s) <= ALPHABET for s in out["samples"])


def test_seed_reproducible_and_no_ema(results):
    plain = text_samples(ok(results, "plain"))
    assert text_samples(ok(results, "run_dir")) == plain  # same checkpoint, same (default) seed
    assert text_samples(ok(results, "other_seed")) != plain
    raw = text_samples(ok(results, "no_ema"))
    assert len(raw) == 2 and all(len(s) == 32 and set(s) <= ALPHABET for s in raw)
    assert raw != plain, "--no_ema gave the same samples as the EMA weights (EMA differs after 4 steps)"


def test_no_ema_spellings(results, capsys):
    """--no_ema, like every flag; nanoDD's --no-ema works the same in both scripts but is not in --help."""
    assert text_samples(ok(results, "no_ema_alias")) == text_samples(ok(results, "no_ema"))
    assert text_samples(ok(results, "load_ema_false")) == text_samples(ok(results, "no_ema"))
    raw, alias, ema = (json_out(results, name) for name in ("eval_no_ema", "eval_no_ema_alias", "eval_one_batch"))
    assert raw["bpt"] == alias["bpt"] != ema["bpt"]
    for module in (sample, evaluate):
        with pytest.raises(SystemExit):
            module.main(["--help"])
        out = capsys.readouterr().out
        assert "--no_ema" in out and "--no-ema" not in out


@pytest.mark.parametrize("name,needle", [
    ("err_missing", "does not exist"),
    ("err_garbage", "not a readable checkpoint"),
    ("err_hub_offline", "nobody/nothing"),
    ("err_alphabet", "alphabet"),
    ("err_long_prompt", "shorter than seq_len"),
    ("err_prompt_eq_len", "shorter than seq_len"),
    ("err_no_placeholder", "placeholder"),
    ("err_prompt_and_infill", "not both"),
    ("err_load_ema", "expected bool"),
    pytest.param("err_cuda", "CUDA", marks=pytest.mark.skipif(torch.cuda.is_available(),
                                                              reason="needs a machine without CUDA")),
    ("eval_err_split", "nope"),
    ("eval_err_vocab", "40"),
    ("eval_err_batch0", "batch_size"),
    ("eval_err_short", "seq_len"),
])
def test_errors_are_one_line(results, name, needle):
    proc = results[name]
    assert proc.returncode != 0, f"{name}: {describe(proc)}"
    assert "Traceback" not in proc.stderr, f"{name}: {describe(proc)}"
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, f"{name}: expected one stderr line: {describe(proc)}"
    assert lines[0].startswith("error:") and needle in lines[0], lines[0]
    assert proc.stdout.strip() == "", f"{name}: {describe(proc)}"


# ---- evaluate.py ---------------------------------------------------------------------------------
def test_evaluate_json(results):
    out = json_out(results, "eval_json")
    assert {"bpt", "se", "ci95", "network_calls", "tokens"} <= set(out)
    assert out["network_calls"] == 5 and out.get("batches", 5) == 5
    assert out["tokens"] == 5 * 8 * 32
    assert 0 < out["bpt"] < 20 and 0 < out["se"] < 10
    lo, hi = out["ci95"]
    assert lo < out["bpt"] < hi
    assert abs((hi - lo) / 2 - 1.96 * out["se"]) < 1e-9 * max(1.0, out["se"])


def strict_json(text):
    """json.loads that rejects NaN / Infinity, which are not JSON (jq, JSON.parse refuse them)."""
    def bad(const):
        raise ValueError(f"non-standard JSON constant {const}")
    return json.loads(text, parse_constant=bad)


def test_evaluate_json_is_strict_json(results):
    strict_json(ok(results, "eval_json").stdout)


def test_evaluate_json_one_batch_is_strict_json(results):
    """One batch: the standard error is undefined and must come out as null, not Infinity."""
    out = strict_json(ok(results, "eval_one_batch").stdout)
    assert out["network_calls"] == 1
    assert out["se"] is None and out["ci95"] is None


def test_evaluate_text(results):
    proc = ok(results, "eval_text")
    assert any("bits/token" in ln for ln in proc.stdout.splitlines()), describe(proc)


# ---- a run directory without ckpt.pt ----------------------------------------------------------------
def test_run_directory_with_only_last_pt(env, tmp_path):
    """A run stopped before its first evaluation has only last.pt: sample.py RUN and evaluate.py RUN (children) take
    it and say so on stderr with its iteration (stdout stays the plain result); a directory with no checkpoint, or
    only an unreadable one, is a one-line error."""
    from conftest import assert_one_line_error
    run = tmp_path / "early"
    run.mkdir()
    ckpt = torch.load(env["ckpt"], weights_only=True)
    ckpt["iter_num"] = 40
    torch.save(ckpt, run / "last.pt")
    with contextlib.redirect_stdout(io.StringIO()) as out, contextlib.redirect_stderr(io.StringIO()) as err:
        call_main(sample, [run, "--device", "cpu", "--seq_len", "32", "--batch_size", "2", "--seed", "3"])
    assert f"using {run / 'last.pt'} (iteration 40): no ckpt.pt yet" in err.getvalue()
    assert len([t for t in out.getvalue().split("\n\n") if t.strip()]) == 2
    proc = run_script(["evaluate.py", run, "--device", "cpu", "--data_dir", env["data_dir"], "--seq_len", "32",
                       "--batch_size", "8", "--max_batches", "1", "--json"], timeout=120)  # a child: stdout alone
    assert proc.returncode == 0, describe(proc)
    assert f"using {run / 'last.pt'} (iteration 40)" in proc.stderr
    assert json.loads(proc.stdout)["network_calls"] == 1  # stdout: the JSON alone
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_one_line_error(run_script(["sample.py", empty, "--device", "cpu"], timeout=120), str(empty),
                          "no readable checkpoint")
    (empty / "last.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="no readable checkpoint") as e:
        call_main(evaluate, [empty, "--device", "cpu"])
    assert "last.pt is not a readable checkpoint" in str(e.value) and "\n" not in str(e.value)
