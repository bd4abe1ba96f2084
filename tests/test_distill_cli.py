"""distill.py end to end on tiny checkpoints: SDTT on an MDLM (the rounds' plan, the teacher refreshed from the
student's raw weights at each round and frozen within it, the student starting from the checkpoint's EMA weights
and keeping an EMA of its own, a checkpoint that sample.py and evaluate.py take), bit-identical resumes (after a
crash mid-round, and after a shorter run extended by one more round), DCD on a Duo, one-line errors, and 2 gloo
ranks under torchrun whose students stay identical although they draw different batches.

The teachers are trained in this process (train.main through conftest.call_main, mdlm_tiny and duo_tiny for 4
steps; the AR, BD3LM and GenMD4 checkpoints are written from their tiny configs without training: distill.py only
has to open them) and distill.py runs in this process too (distill.main), so that only the one-line-error contract
and torchrun cost a Python start: a subprocess and one torchrun launch, each in a process group of its own with a
timeout (conftest.run_script)."""
import contextlib
import io
import json
import math
import os
import shutil

import pytest
import torch

import common
import configs
import distill
import families
import train
from conftest import REPO_ROOT, assert_one_line_error, call_main, describe, run_script, script_env
from mdlm import MDLM
from test_families import evaluate_json, sample_json

DISTILL = ["--start_steps", "8", "--rounds", "2", "--iters_per_round", "3", "--batch_size", "4",
           "--log_interval", "1", "--ckpt_interval", "2", "--device", "cpu"]


def quiet(module, argv):
    with contextlib.redirect_stdout(io.StringIO()) as out:
        call_main(module, argv)
    return out.getvalue()


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def records(run_dir):
    with open(os.path.join(run_dir, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def ema_weights(ckpt):
    return {k[len(families.EMA_PREFIX):]: v for k, v in ckpt["ema"].items() if k.startswith(families.EMA_PREFIX)}


def assert_states_equal(a, b, what):
    assert a.keys() == b.keys(), what
    bad = [k for k in a if not torch.equal(a[k], b[k])]
    assert not bad, f"{what}: {len(bad)} tensors differ, e.g. {bad[:3]}"


def flat_tensors(obj, prefix=""):
    """Every tensor in a nested dict/list (an optimizer state), by path."""
    if isinstance(obj, torch.Tensor):
        return {prefix: obj}
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else []
    out = {}
    for k, v in items:
        out.update(flat_tensors(v, f"{prefix}/{k}"))
    return out


def write_untrained(path, config):
    """A checkpoint of config's class as train.py lays it out (model, ema, model_cls, model_args, training_args)."""
    cls, model_args, training_args = getattr(configs, config)()
    torch.manual_seed(0)
    model = cls(**model_args)
    torch.save({"model": model.state_dict(), "ema": common.EMA(model, 0.9, 0).state_dict(), "model_cls": cls.__name__,
                "model_args": model_args, "training_args": training_args, "iter_num": 0}, path)
    return str(path)


@pytest.fixture(scope="module")
def teachers(tmp_path_factory, tiny_text8_shared):
    root = tmp_path_factory.mktemp("distill")
    out = {"root": root, "data_dir": os.path.join(tiny_text8_shared, "text8")}
    for config in ("mdlm_tiny", "duo_tiny"):
        quiet(train, [config, "--device=cpu", f"--data_root_dir={tiny_text8_shared}", f"--out_dir={root / config}",
                      "--max_iters=4", "--eval_interval=4", "--eval_iters=1", "--ema_update_after_step=1",
                      "--ema_beta=0.5"])  # EMA weights that differ from the raw ones
        out[config] = str(root / config / "ckpt.pt")
    for config in ("ar_tiny", "bd3lm_tiny", "genmd4_tiny"):
        out[config] = write_untrained(root / f"{config}.pt", config)
    return out


def distill_args(teachers, ckpt, out_dir, *extra):
    return [teachers[ckpt], "--out_dir", str(out_dir), "--data_dir", teachers["data_dir"], *DISTILL, *extra]


def recorded_run(argv):
    """distill.main(argv) with every MDLM.distill_loss call recorded (student and teacher weights and modes, steps,
    batch, loss). Returns (calls, stdout)."""
    calls = []
    inner = MDLM.distill_loss

    def recorded(self, teacher, x0, steps):
        call = dict(steps=steps, x0=x0.clone(), student={k: v.clone() for k, v in self.state_dict().items()},
                    teacher={k: v.clone() for k, v in teacher.state_dict().items()}, student_training=self.training,
                    teacher_training=teacher.training, teacher_grad=any(p.requires_grad for p in teacher.parameters()))
        loss = inner(self, teacher, x0, steps)
        call["loss"] = loss.item()
        calls.append(call)
        return loss

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(MDLM, "distill_loss", recorded)
        stdout = quiet(distill, argv)
    return calls, stdout


@pytest.fixture(scope="module")
def mdlm_run(teachers):
    """The reference run: SDTT on mdlm_tiny, rounds of 8 -> 4 and 4 -> 2 steps, 3 iterations each, recorded."""
    out_dir = teachers["root"] / "sdtt"
    calls, stdout = recorded_run(distill_args(teachers, "mdlm_tiny", out_dir))
    return dict(dir=out_dir, calls=calls, stdout=stdout, ckpt=load(out_dir / "ckpt.pt"))


def test_sdtt_rounds_teacher_student_and_ema(mdlm_run, teachers):
    calls, ckpt = mdlm_run["calls"], mdlm_run["ckpt"]
    assert [c["steps"] for c in calls] == [8, 8, 8, 4, 4, 4]
    assert all(c["x0"].shape == (4, 32) and c["x0"].dtype == torch.long for c in calls)  # seq_len: the teacher's
    assert all(c["student_training"] and not c["teacher_training"] and not c["teacher_grad"] for c in calls)
    source = families.load_checkpoint(teachers["mdlm_tiny"]).state_dict()  # the teacher checkpoint's EMA weights
    assert_states_equal(calls[0]["student"], source, "the student starts from the checkpoint's EMA weights")
    raw = families.load_checkpoint(teachers["mdlm_tiny"], ema=False).state_dict()
    assert not torch.equal(raw["net.vocab_embed.weight"], source["net.vocab_embed.weight"])
    for c in calls[:3]:
        assert_states_equal(c["teacher"], source, "round 0's teacher")
    for c in calls[3:]:  # round 1's teacher: the student's raw weights when the round started
        assert_states_equal(c["teacher"], calls[3]["student"], "round 1's teacher")
    assert not torch.equal(calls[3]["student"]["net.vocab_embed.weight"], source["net.vocab_embed.weight"])
    # the checkpoint: raw weights after 6 steps, round 1's teacher, and the EMA (decay warm-up 1 - 1/(1 + n), from
    # the student's weights after step 2 on: the mean of the weights after steps 2..6)
    weights = [c["student"] for c in calls[1:]] + [ckpt["model"]]  # after steps 1..6
    assert_states_equal(ckpt["teacher"], calls[3]["student"], "ckpt.pt's teacher")
    mean = {k: sum(w[k].double() for w in weights[1:]) / 5 for k in ckpt["model"]}
    ema = ema_weights(ckpt)
    for k in ema:
        torch.testing.assert_close(ema[k].double(), mean[k], rtol=1e-5, atol=1e-7, msg=k)
    assert int(ckpt["ema"]["step"]) == 6
    assert ckpt["iter_num"] == 6 and ckpt["model_cls"] == "MDLM" and ckpt["rng"] and "optimizer" in ckpt
    d = ckpt["distill"]
    assert d["method"] == "SDTT" and [tuple(p) for p in d["plan"]] == [(0, 8), (1, 4)] and d["round"] == 1
    assert d["teacher"] == teachers["mdlm_tiny"] and d["iters_per_round"] == 3 and d["lr"] == 6e-5
    log = records(mdlm_run["dir"])
    assert [r["iter"] for r in log] == [1, 2, 3, 4, 5, 6]
    assert [(r["round"], r["teacher_steps"], r["student_steps"]) for r in log] == [(0, 8, 4)] * 3 + [(1, 4, 2)] * 3
    assert [r["loss"] for r in log] == pytest.approx([c["loss"] for c in calls], rel=1e-12)
    assert "SDTT" in mdlm_run["stdout"] and "--steps 2" in mdlm_run["stdout"]


def test_no_ema_starts_from_the_raw_weights(teachers, tmp_path):
    calls, _ = recorded_run(distill_args(teachers, "mdlm_tiny", tmp_path / "raw") + ["--no_ema", "--rounds", "1",
                                                                                     "--iters_per_round", "1"])
    raw = families.load_checkpoint(teachers["mdlm_tiny"], ema=False).state_dict()
    assert len(calls) == 1
    assert_states_equal(calls[0]["student"], raw, "--no_ema: the student")
    assert_states_equal(calls[0]["teacher"], raw, "--no_ema: the teacher")


def test_distilled_checkpoint_loads_samples_and_evaluates(mdlm_run, teachers, capsys):
    path = str(mdlm_run["dir"] / "ckpt.pt")
    model = families.load_checkpoint(path)
    assert type(model).__name__ == "MDLM" and not model.training
    assert_states_equal(model.state_dict(), ema_weights(mdlm_run["ckpt"]), "load_checkpoint: the EMA by default")
    raw = families.load_checkpoint(path, ema=False)
    assert_states_equal(raw.state_dict(), mdlm_run["ckpt"]["model"], "load_checkpoint(ema=False)")
    out = sample_json(capsys, mdlm_run["dir"], "--batch_size", "2", "--steps", "2", "--prompt", "the")
    assert out["network_calls"] <= 2 and all(len(s) == 32 and s.startswith("the") for s in out["samples"])
    ev = evaluate_json(capsys, mdlm_run["dir"], "--data_dir", teachers["data_dir"], "--split", "val", "--T", "2")
    assert ev["model"] == "MDLM" and ev["bound"] == "2-step bound" and math.isfinite(ev["bpt"]) and ev["se"] > 0


class Crash(Exception):
    pass


@pytest.mark.parametrize("how", ["crash after the iteration-2 checkpoint", "1 round, then 2"])
def test_resume_is_bit_identical(mdlm_run, teachers, tmp_path, how):
    """Interrupted and resumed (same --out_dir) = uninterrupted, bit for bit on the CPU: weights, EMA, teacher,
    optimizer state, the losses logged after the resume. Mid-round: the teacher comes from ckpt.pt; at a round
    boundary (a 1-round run extended to 2 rounds) it is the student."""
    out_dir = tmp_path / "run"
    if how.startswith("crash"):
        inner = distill.atomic_save

        def save_then_crash(obj, path):
            inner(obj, path)
            if obj["iter_num"] == 2:
                raise Crash
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(distill, "atomic_save", save_then_crash)
            with pytest.raises(Crash):
                quiet(distill, distill_args(teachers, "mdlm_tiny", out_dir))
        assert load(out_dir / "ckpt.pt")["iter_num"] == 2
        first = 2
    else:
        quiet(distill, distill_args(teachers, "mdlm_tiny", out_dir) + ["--rounds", "1"])
        assert load(out_dir / "ckpt.pt")["iter_num"] == 3
        first = 3
    stdout = quiet(distill, distill_args(teachers, "mdlm_tiny", out_dir))
    assert f"resuming {out_dir / 'ckpt.pt'} at iteration {first} of 6" in stdout
    got, want = load(out_dir / "ckpt.pt"), mdlm_run["ckpt"]
    assert got["iter_num"] == 6
    for key in ("model", "teacher", "ema"):
        assert_states_equal(got[key], want[key], f"{how}: {key}")
    assert_states_equal(flat_tensors(got["optimizer"]), flat_tensors(want["optimizer"]), f"{how}: optimizer")
    log, ref = records(out_dir), records(mdlm_run["dir"])
    assert [r["iter"] for r in log] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in log] == [r["loss"] for r in ref]


def test_duo_dcd_end_to_end(teachers, tmp_path, capsys):
    out_dir = tmp_path / "dcd"
    stdout = quiet(distill, distill_args(teachers, "duo_tiny", out_dir))
    assert "DCD" in stdout
    ckpt = load(out_dir / "ckpt.pt")
    assert ckpt["model_cls"] == "Duo" and ckpt["distill"]["method"] == "DCD" and ckpt["iter_num"] == 6
    assert [tuple(p) for p in ckpt["distill"]["plan"]] == [(0, 8), (1, 4)]
    source = families.load_checkpoint(teachers["duo_tiny"]).state_dict()
    assert not torch.equal(ckpt["model"]["net.vocab_embed.weight"], source["net.vocab_embed.weight"])
    model = families.load_checkpoint(str(out_dir / "ckpt.pt"))
    assert type(model).__name__ == "Duo"
    assert_states_equal(model.state_dict(), ema_weights(ckpt), "the EMA weights")
    log = records(out_dir)
    assert [(r["teacher_steps"], r["student_steps"]) for r in log] == [(8, 4)] * 3 + [(4, 2)] * 3
    assert all(math.isfinite(r["loss"]) and r["loss"] >= 0 for r in log)
    out = sample_json(capsys, out_dir, "--batch_size", "2", "--steps", "2")
    assert out["network_calls"] == 2 and all(len(s) == 32 for s in out["samples"])


def test_model_arg_changes_the_dcd_grid(teachers, tmp_path, monkeypatch):
    """--model_arg dcd_gamma_min=-3 (and none: the old grid) reaches the student that distill_loss runs on and is
    stored in the checkpoint's model_args; the weights are the teacher's EMA weights as without it."""
    from duo import Duo
    seen = []
    inner = Duo.distill_loss

    def recorded(self, teacher, x0, steps):
        seen.append((self.dcd_gamma_min, self.dcd_gamma_max, teacher.dcd_gamma_min))
        return inner(self, teacher, x0, steps)

    monkeypatch.setattr(Duo, "distill_loss", recorded)
    quiet(distill, distill_args(teachers, "duo_tiny", tmp_path / "a", "--model_arg", "dcd_gamma_min=-3",
                                "--iters_per_round", "1"))
    assert seen and all(s == (-3.0, -1.0, -3.0) for s in seen)
    ckpt = load(tmp_path / "a" / "ckpt.pt")
    assert ckpt["model_args"]["dcd_gamma_min"] == -3.0
    seen.clear()
    quiet(distill, distill_args(teachers, "duo_tiny", tmp_path / "b", "--model_arg", "dcd_gamma_min=none",
                                "--iters_per_round", "1"))
    assert seen and all(s[0] is None for s in seen)
    assert "has no such argument" in user_error(distill_args(teachers, "duo_tiny", tmp_path / "c", "--model_arg", "nope=1"))
    assert "expected float" in user_error(distill_args(teachers, "duo_tiny", tmp_path / "c", "--model_arg",
                                                       "dcd_gamma_min=abc"))


# ---- one-line errors -------------------------------------------------------------------------------------
def user_error(argv):
    """distill.main(argv) must raise common.UserError, which `python distill.py` prints as one line `error: ...`
    (its __main__ block; test_error_is_one_line_from_the_command_line checks that contract once)."""
    with pytest.raises(common.UserError) as e:
        quiet(distill, argv)
    message = str(e.value)
    assert message and "\n" not in message, message
    return message


def test_error_is_one_line_from_the_command_line(teachers, tmp_path):
    proc = run_script(["distill.py", *distill_args(teachers, "ar_tiny", tmp_path / "out")], timeout=120)
    assert proc.returncode == 2, describe(proc)
    assert_one_line_error(proc, "AR has no few-step distillation")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("config,cls", [("bd3lm_tiny", "BD3LM"), ("genmd4_tiny", "GenMD4")])
def test_families_without_distillation(teachers, tmp_path, config, cls):
    assert f"{cls} has no few-step distillation" in user_error(distill_args(teachers, config, tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_bad_arguments_and_paths(teachers, tmp_path):
    base = distill_args(teachers, "mdlm_tiny", tmp_path / "a")
    assert "divisible by 2^rounds = 8" in user_error(base + ["--start_steps", "12", "--rounds", "3"])
    assert "--rounds must be at least 1" in user_error(base + ["--rounds", "0"])
    missing = str(tmp_path / "missing" / "ckpt.pt")
    assert "does not exist" in user_error([missing] + base[1:])
    assert not (tmp_path / "a").exists()
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    shutil.copy(teachers["mdlm_tiny"], foreign / "ckpt.pt")  # train.py's checkpoint
    before = (foreign / "ckpt.pt").read_bytes()
    assert "was not written by distill.py" in user_error(distill_args(teachers, "mdlm_tiny", foreign))
    (foreign / "garbage").mkdir()
    (foreign / "garbage" / "ckpt.pt").write_bytes(b"not a checkpoint")
    assert "not a readable checkpoint" in user_error(distill_args(teachers, "mdlm_tiny", foreign / "garbage"))
    assert (foreign / "ckpt.pt").read_bytes() == before and not (foreign / "log.jsonl").exists()


def test_resuming_another_teachers_run_is_a_one_line_error(mdlm_run, teachers, tmp_path):
    """An --out_dir holding an SDTT run of the MDLM, resumed with the Duo as the teacher."""
    (tmp_path / "other").mkdir()
    shutil.copy(mdlm_run["dir"] / "ckpt.pt", tmp_path / "other" / "ckpt.pt")
    user_error(distill_args(teachers, "duo_tiny", tmp_path / "other"))



def test_resuming_with_another_plan_is_a_one_line_error(mdlm_run, teachers, tmp_path):
    """The same teacher's run resumed with other --start_steps: its plan differs, said in one line."""
    (tmp_path / "other").mkdir()
    shutil.copy(mdlm_run["dir"] / "ckpt.pt", tmp_path / "other" / "ckpt.pt")
    argv = distill_args(teachers, "mdlm_tiny", tmp_path / "other")
    argv[argv.index("--start_steps") + 1] = "16"
    assert "plan" in user_error(argv)


# ---- torchrun --------------------------------------------------------------------------------------------
RUNNER = '''
import os, sys
sys.path.insert(0, {repo!r})
import torch
import distill
from mdlm import MDLM
batches = []
inner = MDLM.distill_loss
def recorded(self, teacher, x0, steps):
    batches.append(x0.clone())
    return inner(self, teacher, x0, steps)
MDLM.distill_loss = recorded
students = []
class EMA(distill.EMA):
    def __init__(self, model, *args):
        super().__init__(model, *args)
        students.append(model)
distill.EMA = EMA
distill.main(sys.argv[1:])
torch.save(dict(student=students[0].state_dict(), batches=batches),
           os.path.join(os.environ["RECORD_DIR"], "rank%s.pt" % os.environ["RANK"]))
'''


@pytest.mark.skipif(not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
                    reason="torch.distributed with gloo is not available")
def test_torchrun_two_ranks(teachers, tmp_path):
    """2 gloo ranks: exit 0, a loadable ckpt.pt (rank 0's student), and after 4 steps both ranks' students are
    bit-identical although every rank drew its own batches (so the gradients were averaged); they moved from the
    teacher checkpoint's weights. (Each rank's final student is saved by a runner that wraps distill.main.)"""
    runner = tmp_path / "runner.py"
    runner.write_text(RUNNER.format(repo=str(REPO_ROOT)))
    rec = tmp_path / "rec"
    rec.mkdir()
    out_dir = tmp_path / "ddp"
    args = distill_args(teachers, "mdlm_tiny", out_dir)
    args[args.index("--iters_per_round") + 1] = "2"
    proc = run_script(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(runner), *args],
                      timeout=180, env=script_env(RECORD_DIR=rec))
    assert proc.returncode == 0, describe(proc)
    ranks = [load(rec / f"rank{r}.pt") for r in (0, 1)]
    assert all(len(r["batches"]) == 4 for r in ranks)
    assert not any(torch.equal(a, b) for a, b in zip(ranks[0]["batches"], ranks[1]["batches"])), "ranks share batches"
    assert_states_equal(ranks[0]["student"], ranks[1]["student"], "rank 0's vs rank 1's student")
    ckpt = load(out_dir / "ckpt.pt")
    assert ckpt["iter_num"] == 4 and ckpt["rng"] == []
    assert_states_equal(ckpt["model"], ranks[0]["student"], "ckpt.pt vs rank 0's student")
    source = families.load_checkpoint(teachers["mdlm_tiny"]).state_dict()
    assert not torch.equal(ckpt["model"]["net.vocab_embed.weight"], source["net.vocab_embed.weight"])
    assert type(families.load_checkpoint(str(out_dir / "ckpt.pt"))).__name__ == "MDLM"
    assert len(records(out_dir)) == 4 and "world size 2" in proc.stdout
