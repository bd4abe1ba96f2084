"""
Tests for train.py: checkpoint layout (nanoDD compatibility, ../shared/reference/nanodd-compat.md
section 1), exact resume, command-line errors, the learning-rate schedule, the optimizer's weight-decay
groups and the EMA recursion. (Under torchrun: tests/test_distributed.py.)

Training runs call train.main in this process (conftest.call_main: one thread, globals restored), on a
tiny fake text8 dataset (conftest.py); every run is a few dozen steps of a 20k-parameter model.
"""
import json
import math
import os
import shutil
import signal

import numpy as np
import pytest
import torch
import torch.nn as nn

import configs
import d3pm
import families
import train
from common import UserError, open_split
from conftest import call_main

TINY_MODEL_ARGS = configs.d3pm_tiny()[1]
MODEL_ARG_KEYS = {"vocab_size", "n_embed", "n_heads", "n_blocks", "n_cond", "dropout", "T", "lambda_ce"}
# the nanoDD layout (reference section 1) plus the one documented extra: per-rank RNG states for resume
REFERENCE_KEYS = {"model", "ema", "optimizer", "model_cls", "model_args", "training_args",
                  "total_batch_size", "iter_num", "best_val_loss"}
EXTRA_KEYS = {"rng"}


# ---- helpers ------------------------------------------------------------------------------------
def run_train(*args):
    """train.main(ARGS) in this process; returns what it printed on stdout."""
    import contextlib
    import io
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        call_main(train, ["--device=cpu", *args])  # (a later --device=... wins)
    return out.getvalue()


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def strict_json(line):
    """json.loads that rejects NaN / Infinity (not valid JSON)."""
    def bad(const):
        raise ValueError(f"non-standard JSON constant {const}")
    return json.loads(line, parse_constant=bad)


def read_log(out_dir):
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return [strict_json(line) for line in f if line.strip()]


def assert_states_equal(a, b, what):
    assert set(a) == set(b), f"{what}: keys differ: {sorted(set(a) ^ set(b))}"
    differing = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differing, f"{what}: {len(differing)} of {len(a)} tensors differ, e.g. {differing[:4]}"


def states_differ(a, b):
    return any(not torch.equal(a[k], b[k]) for k in a)


def tmp_files(out_dir):
    return [p for p in os.listdir(out_dir) if ".tmp" in p]


# ---- shared runs: A = 20 steps straight; B = 10 steps, then resumed to 20 ---------------------------
@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_text8_shared):
    root = tmp_path_factory.mktemp("runs")
    common = ["d3pm_tiny", f"--data_root_dir={tiny_text8_shared}", "--lr_decay_iters=20", "--eval_interval=7",
              "--ema_update_after_step=3", "--ema_beta=0.9"]  # EMA actually averages within 20 steps
    a_dir, b_dir = root / "A", root / "B"
    run_train(*common, f"--out_dir={a_dir}", "--max_iters=20")
    run_train(*common, f"--out_dir={b_dir}", "--max_iters=10", "--ckpt_interval=5")
    b10 = root / "B_last_at_10.pt"
    shutil.copyfile(b_dir / "last.pt", b10)
    resumed = run_train(*common, f"--resume={b_dir}", "--max_iters=20")
    return dict(a=a_dir, b=b_dir, b10=b10, resumed_stdout=resumed)


# ---- 1. checkpoint layout -----------------------------------------------------------------------
@pytest.mark.parametrize("name", ["last.pt", "ckpt.pt"])
def test_checkpoint_layout(runs, name):
    path = runs["a"] / name
    ckpt = load(path)  # weights_only=True must work
    assert isinstance(ckpt, dict)
    assert set(ckpt) == REFERENCE_KEYS | EXTRA_KEYS

    assert ckpt["model_cls"] == "D3PMAbsorbing"
    assert isinstance(ckpt["model_args"], dict) and set(ckpt["model_args"]) == MODEL_ARG_KEYS
    assert ckpt["model_args"] == TINY_MODEL_ARGS

    ref_state = d3pm.D3PMAbsorbing(**ckpt["model_args"]).state_dict()
    assert set(ckpt["model"]) == set(ref_state)
    for k, v in ref_state.items():
        assert ckpt["model"][k].shape == v.shape and ckpt["model"][k].dtype == v.dtype, k

    ema = ckpt["ema"]
    assert set(ema) == {"initted", "step"} | {"ema_model." + k for k in ref_state}
    assert ema["initted"].dtype == torch.bool
    assert not ema["step"].is_floating_point() and not ema["step"].is_complex() and ema["step"].dtype != torch.bool
    assert int(ema["step"]) == ckpt["iter_num"]  # one EMA update per optimizer step
    assert bool(ema["initted"])  # ema_update_after_step=3 < iter_num
    for k, v in ref_state.items():
        assert ema["ema_model." + k].shape == v.shape, k

    opt = ckpt["optimizer"]
    assert set(opt) >= {"state", "param_groups"}
    assert sorted(g["weight_decay"] for g in opt["param_groups"]) == [0.0, 0.1]

    ta = ckpt["training_args"]
    assert isinstance(ta, dict)
    assert ta["max_iters"] == 20 and ta["lr_decay_iters"] == 20 and ta["eval_interval"] == 7
    assert ta["batch_size"] == 8 and ta["dataset"] == "text8"  # from the d3pm_tiny config
    assert all(isinstance(v, (int, float, bool, str)) for v in ta.values())

    assert isinstance(ckpt["total_batch_size"], int) and ckpt["total_batch_size"] == 8  # 1 accum x 1 rank x 8
    assert isinstance(ckpt["iter_num"], int)
    assert isinstance(ckpt["best_val_loss"], float) and math.isfinite(ckpt["best_val_loss"])

    assert isinstance(ckpt["rng"], list) and len(ckpt["rng"]) == 1  # one entry per rank
    assert all(isinstance(v, torch.Tensor) for v in ckpt["rng"][0].values())

    # families.load_checkpoint: EMA weights by default, raw weights on request
    m_ema = families.load_checkpoint(str(path))
    m_raw = families.load_checkpoint(str(path), ema=False)
    assert not m_ema.training and not m_raw.training
    assert_states_equal(m_raw.state_dict(), ckpt["model"], "raw weights")
    assert_states_equal(m_ema.state_dict(), {k[len("ema_model."):]: v for k, v in ema.items()
                                             if k.startswith("ema_model.")}, "EMA weights")
    assert states_differ(m_ema.state_dict(), m_raw.state_dict()), "EMA and raw weights should differ"
    assert m_ema.checkpoint_meta["iter_num"] == ckpt["iter_num"]


def test_checkpoint_iters_best_val_and_log(runs):
    out = runs["a"]
    assert sorted(os.listdir(out)) == ["ckpt.pt", "last.pt", "log.jsonl"], os.listdir(out)
    last, best = load(out / "last.pt"), load(out / "ckpt.pt")
    assert last["iter_num"] == 20

    records = read_log(out)
    train_recs = [r for r in records if r["split"] == "train"]
    val_recs = [r for r in records if r["split"] == "val"]
    assert [r["iter"] for r in train_recs] == [5, 10, 15, 20]  # log_interval=5 in d3pm_tiny
    assert [r["iter"] for r in val_recs] == [7, 14, 20]  # eval_interval=7, and at max_iters
    for r in train_recs:
        for k in ("loss", "lr", "grad_norm", "kl", "ce", "l_T", "bound", "bpt"):
            assert isinstance(r[k], float) and math.isfinite(r[k]), (k, r)
    for r in val_recs:
        for k in ("loss", "bound", "bpt"):
            assert isinstance(r[k], float) and math.isfinite(r[k]) and r[k] > 0, (k, r)
        assert r["bpt"] == pytest.approx(r["bound"] / math.log(2))

    # best checkpoint: selected by the val bound (eval_key default); ckpt.pt is the best evaluation
    best_rec = min(val_recs, key=lambda r: r["bound"])
    assert last["best_val_loss"] == best_rec["bound"]
    assert best["best_val_loss"] == best_rec["bound"]
    assert best["iter_num"] == best_rec["iter"]


# ---- 3. exact resume ----------------------------------------------------------------------------
def test_resume_is_bit_exact(runs):
    assert TINY_MODEL_ARGS["dropout"] > 0  # dropout RNG is part of what must be restored
    assert "resuming from" in runs["resumed_stdout"] and "iteration 10" in runs["resumed_stdout"]
    a, b, b10 = load(runs["a"] / "last.pt"), load(runs["b"] / "last.pt"), load(runs["b10"])
    assert b10["iter_num"] == 10 and a["iter_num"] == b["iter_num"] == 20

    # not vacuous: 10 more steps change the weights and the EMA weights, and the EMA is not a copy
    def ema_weights(ckpt):
        return {k[len("ema_model."):]: v for k, v in ckpt["ema"].items() if k.startswith("ema_model.")}
    assert states_differ(a["model"], b10["model"])
    assert states_differ(ema_weights(a), ema_weights(b10))
    assert states_differ(ema_weights(a), a["model"])

    assert_states_equal(a["model"], b["model"], "model after resume")
    assert_states_equal(a["ema"], b["ema"], "EMA after resume")
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert set(sa) == set(sb)
    for i in sa:
        assert_states_equal(sa[i], sb[i], f"optimizer state {i}")
    for k in ("torch", "data"):
        assert torch.equal(a["rng"][0][k], b["rng"][0][k]), k

    # the resumed run appends to the same log; its records from iteration 14 on match run A's
    def after10(out):
        return [r for r in read_log(out) if r["iter"] > 10 and r["split"] == "val"]
    assert after10(runs["a"]) == after10(runs["b"])
    # B's log: 10 steps, then the resumed part, in one file
    assert [r["iter"] for r in read_log(runs["b"]) if r["split"] == "train"] == [5, 10, 15, 20]


# ---- 4. command-line errors ---------------------------------------------------------------------
# train.main raises UserError; the script prints it as one line on stderr (checked on a real child in
# tests/test_faults.py::test_truncated_split_is_one_line_on_stderr).
def user_error(*args):
    with pytest.raises(UserError) as e:
        run_train(*args)
    return str(e.value)


def test_unknown_config(tmp_path):
    msg = user_error("d3pm_nonexistent", f"--out_dir={tmp_path / 'o'}")
    assert "d3pm_nonexistent" in msg
    for name in ("d3pm_text8_cpu", "d3pm_tiny", "d3pm_text8", "mdlm_tiny", "ar_tiny"):
        assert name in msg


def test_unknown_override_key(tmp_path):
    msg = user_error("d3pm_tiny", "--bogus_key=1", f"--out_dir={tmp_path / 'o'}")
    assert "bogus_key" in msg
    for key in ("batch_size", "learning_rate", "max_iters", "data_root_dir", "out_dir", "resume", "n_embed"):
        assert key in msg


@pytest.mark.parametrize("arg,key", [("--batch_size=abc", "batch_size"), ("--learning_rate=fast", "learning_rate"),
                                     ("--max_iters=2.5", "max_iters"), ("--decay_lr=maybe", "decay_lr"),
                                     ("--compile=flase", "compile"), ("--n_embed=wide", "n_embed")])
def test_wrong_override_type(tmp_path, arg, key):
    msg = user_error("d3pm_tiny", arg, f"--out_dir={tmp_path / 'o'}")
    assert f"{arg}: expected" in msg and key in msg and "\n" not in msg


def configured(*argv):
    """(model_args, train.py's settings) after the command line ARGV (parse_args, load_config); the module's
    globals are restored afterwards."""
    saved = dict(vars(train))
    try:
        model_args = train.load_config(*train.parse_args(list(argv)))[1]
        return model_args, {k: getattr(train, k) for k in train.CONFIG_KEYS}
    finally:
        vars(train).update(saved)


def test_shared_override_parser():
    """configs.parse_overrides (train.py's and bench.py's): each value read as its default's type, strictly."""
    assert configs.parse_overrides({"n": "1_000", "x": "2e-3", "b": "Off", "c": "YES", "s": "1_0"},
                                   {"n": 1, "x": 0.5, "b": True, "c": False, "s": "a"}) == \
        {"n": 1000, "x": 2e-3, "b": False, "c": True, "s": "1_0"}
    for text, default in (("flase", True), ("", False), ("2.5", 1), ("fast", 0.1)):
        with pytest.raises(UserError, match=f"^--k={text}: expected {type(default).__name__} "):
            configs.parse_overrides({"k": text}, {"k": default})
    with pytest.raises(UserError, match="^unknown option --nope; valid: a, b$"):
        configs.parse_overrides({"nope": "1"}, {"a": 1, "b": 2})
    with pytest.raises(UserError, match="--batch_size needs a value"):
        configs.split_command_line(["d3pm_tiny", "--batch_size"])
    model_args, settings = configured("d3pm_tiny", "--max_iters=1_000", "--decay_lr=off", "--n_embed=64")
    assert settings["max_iters"] == 1000 and settings["decay_lr"] is False and model_args["n_embed"] == 64


@pytest.mark.parametrize("flag", ["--no_compile", "--no-compile"])
def test_no_compile_spellings(flag):
    """--no_compile, like every flag; nanoDD's --no-compile works too (not shown in --help)."""
    assert configured("d3pm_text8")[1]["compile"] is True
    assert configured("d3pm_text8", flag)[1]["compile"] is False
    assert configured("d3pm_text8", flag, "--compile=True")[1]["compile"] is True  # the last one wins


def test_missing_dataset_says_how_to_prepare(tmp_path):
    empty_root = tmp_path / "empty_root"
    empty_root.mkdir()
    msg = user_error("d3pm_tiny", "--dataset=openwebtext", f"--data_root_dir={empty_root}",
                     f"--out_dir={tmp_path / 'o'}")
    assert "openwebtext" in msg and "python data/prepare_openwebtext.py" in msg
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("arg", ["--log_interval=0", "--eval_iters=0", "--gradient_accumulation_steps=0"])
def test_nonpositive_values_are_user_errors(tmp_path, tiny_text8, arg):
    assert arg[2:].split("=")[0] in user_error("d3pm_tiny", arg, "--max_iters=2", f"--data_root_dir={tiny_text8}",
                                                f"--out_dir={tmp_path / 'o'}")
    assert not (tmp_path / "o").exists()


def test_resume_empty_directory(tmp_path, tiny_text8):
    empty = tmp_path / "empty_run"
    empty.mkdir()
    assert str(empty) in user_error("d3pm_tiny", f"--data_root_dir={tiny_text8}", f"--resume={empty}")
    assert os.listdir(empty) == []


def test_resume_corrupt_checkpoint(tmp_path, tiny_text8):
    bad = tmp_path / "bad_run"
    bad.mkdir()
    (bad / "last.pt").write_bytes(b"this is not a torch checkpoint")
    assert str(bad) in user_error("d3pm_tiny", f"--data_root_dir={tiny_text8}", f"--resume={bad}")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_device_cuda_without_cuda(tmp_path, tiny_text8):
    msg = user_error("d3pm_tiny", "--device=cuda", f"--data_root_dir={tiny_text8}", f"--out_dir={tmp_path / 'o'}")
    assert "cuda" in msg.lower()


def test_help_lists_configs(capsys):
    with pytest.raises(SystemExit) as e:
        call_main(train, ["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for name in train.CONFIG_NAMES:
        assert name in out
    assert "d3pm_text8_cpu" in out and "--learning_rate" in out
    assert "--no_compile" in out and "--no-compile" not in out and "--inject" not in out


def test_main_restores_signal_handlers(tmp_path, tiny_text8):
    before = [signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)]
    run_train("d3pm_tiny", "--max_iters=2", f"--data_root_dir={tiny_text8}", f"--out_dir={tmp_path / 'o'}")
    assert [signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)] == before


def test_collectives_take_registered_buffers():
    """common.all_reduce / all_gather refuse a tensor that did not come from comm_buffer() (a temporary
    handed to a gloo collective is what used to abort torchrun runs at exit; see common.py)."""
    import common
    with pytest.raises(ValueError, match="comm_buffer"):
        common.all_reduce(torch.zeros(2))
    buf = common.comm_buffer(torch.zeros(1))
    with pytest.raises(ValueError, match="comm_buffer"):
        common.all_gather([torch.zeros(1)], buf)


# ---- 5. learning-rate schedule and optimizer groups ---------------------------------------------
@pytest.fixture
def schedule(monkeypatch):
    cfg = dict(learning_rate=1e-3, min_lr=1e-4, warmup_iters=10, max_iters=100, lr_decay_iters=0, decay_lr=True)
    for k, v in cfg.items():
        monkeypatch.setattr(train, k, v)
    return cfg


def test_lr_warmup_and_cosine(schedule):
    lr, min_lr, warm, n = (schedule[k] for k in ("learning_rate", "min_lr", "warmup_iters", "max_iters"))
    lrs = [train.get_lr(it) for it in range(2 * n)]
    # warmup: positive, strictly increasing, ends (almost) at learning_rate
    assert lrs[0] > 0
    assert all(x < y for x, y in zip(lrs[:warm], lrs[1:warm + 1]))
    assert lrs[warm - 1] == pytest.approx(lr, rel=1.0 / warm)
    assert lrs[warm] == pytest.approx(lr, rel=1e-12)
    # cosine decay: non-increasing, the midpoint halfway, min_lr at max_iters and after, never below
    assert all(x >= y for x, y in zip(lrs[warm:], lrs[warm + 1:]))
    assert train.get_lr((warm + n) // 2) == pytest.approx((lr + min_lr) / 2)
    assert lrs[n] == pytest.approx(min_lr, rel=1e-12)
    assert all(x == min_lr for x in lrs[n:])
    assert all(x >= min_lr * (1 - 1e-12) for x in lrs[warm:])
    # an independent form of the cosine at a few points
    for it in (warm, 20, 37, 64, 99):
        ratio = (it - warm) / (n - warm)
        assert lrs[it] == pytest.approx(min_lr + (lr - min_lr) * (math.cos(math.pi * ratio) + 1) / 2, rel=1e-12)


def test_lr_decay_iters_and_constant(schedule, monkeypatch):
    monkeypatch.setattr(train, "lr_decay_iters", 50)
    assert train.get_lr(50) == pytest.approx(schedule["min_lr"])
    assert train.get_lr(75) == schedule["min_lr"]
    assert train.get_lr(30) == pytest.approx((schedule["learning_rate"] + schedule["min_lr"]) / 2)
    monkeypatch.setattr(train, "decay_lr", False)
    assert all(train.get_lr(it) == schedule["learning_rate"] for it in (0, 5, 10, 50, 1000))


def test_make_optimizer_decays_only_matrices(monkeypatch):
    monkeypatch.setattr(train, "weight_decay", 0.1)
    monkeypatch.setattr(train, "learning_rate", 3e-4)
    torch.manual_seed(0)
    model = d3pm.D3PMAbsorbing(**TINY_MODEL_ARGS)
    opt = train.make_optimizer(model, torch.device("cpu"))
    assert isinstance(opt, torch.optim.AdamW)
    decayed = [g for g in opt.param_groups if g["weight_decay"] > 0]
    plain = [g for g in opt.param_groups if g["weight_decay"] == 0]
    assert len(decayed) == 1 and len(plain) == 1 and decayed[0]["weight_decay"] == 0.1
    ids = lambda ps: sorted(id(p) for p in ps)  # noqa: E731
    assert ids(decayed[0]["params"]) == ids(p for p in model.parameters() if p.dim() >= 2)
    assert ids(plain[0]["params"]) == ids(p for p in model.parameters() if p.dim() < 2)
    assert len(decayed[0]["params"]) > 0 and len(plain[0]["params"]) > 0
    names_2d = {n for n, p in model.named_parameters() if p.dim() >= 2}
    assert "net.vocab_embed.weight" in names_2d and "net.blocks.0.norm1.weight" not in names_2d
    assert opt.param_groups[0]["betas"] == (train.beta1, train.beta2) and opt.param_groups[0]["lr"] == 3e-4


# ---- 6. EMA -------------------------------------------------------------------------------------
class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)
        self.register_buffer("scale", torch.ones(2))  # a float buffer: averaged like the weights
        self.register_buffer("count", torch.zeros((), dtype=torch.long))  # not float: copied

    def perturb(self, gen):
        with torch.no_grad():
            for p in self.lin.parameters():
                p.add_(torch.randn(p.shape, generator=gen))
            self.scale.add_(torch.randn(2, generator=gen))
            self.count.add_(1)


def test_ema_copies_then_follows_recursion():
    gen = torch.Generator().manual_seed(0)
    model = Tiny()
    u, beta = 3, 0.6  # beta small enough that the clamp min(beta, .) is reached within the test
    ema = train.EMA(model, beta=beta, update_after_step=u)
    expected = {}
    for s in range(12):  # s: EMA updates done so far (the `step` counter before this update)
        model.perturb(gen)
        ema.update()
        cur = {k: v.detach().double() for k, v in model.state_dict().items() if v.is_floating_point()}
        if s <= u:
            expected = {k: v.clone() for k, v in cur.items()}
        else:
            n = s - u - 1
            decay = min(beta, 1 - 1 / (1 + n))
            expected = {k: decay * expected[k] + (1 - decay) * cur[k] for k in cur}
        state = ema.state_dict()
        assert int(state["step"]) == s + 1
        assert bool(state["initted"]) == (s > u)
        for k, v in model.state_dict().items():
            got = state["ema_model." + k]
            assert got.dtype == v.dtype
            if s <= u or not v.is_floating_point():
                assert torch.equal(got, v), (s, k)  # a plain copy before update_after_step
            else:
                torch.testing.assert_close(got.double(), expected[k], rtol=1e-6, atol=1e-6)
    assert states_differ({k[len("ema_model."):]: v for k, v in ema.state_dict().items() if k.startswith("ema_model.")},
                         model.state_dict())


def test_ema_warmup_is_a_running_mean():
    """With beta ~ 1 the decay 1 - 1/(1+n) makes the EMA the plain mean of the weights since step u+1."""
    gen = torch.Generator().manual_seed(1)
    model, u = Tiny(), 2
    ema = train.EMA(model, beta=0.9999, update_after_step=u)
    history = []
    for s in range(9):
        model.perturb(gen)
        ema.update()
        history.append(model.lin.weight.detach().double().clone())
    mean = torch.stack(history[u + 1:]).mean(0)
    torch.testing.assert_close(ema.state_dict()["ema_model.lin.weight"].double(), mean, rtol=1e-6, atol=1e-6)


def test_ema_state_dict_roundtrip():
    gen = torch.Generator().manual_seed(2)
    model = Tiny()
    ema = train.EMA(model, beta=0.9, update_after_step=1)
    for _ in range(5):
        model.perturb(gen)
        ema.update()
    state = ema.state_dict()
    other = train.EMA(model, beta=0.9, update_after_step=1)
    other.load_state_dict(state)
    assert_states_equal(other.state_dict(), state, "EMA state after load_state_dict")
    model.perturb(gen)
    ema.update()
    other.update()
    assert_states_equal(other.state_dict(), ema.state_dict(), "EMA after one more update")
    avg = ema.averaged_model(Tiny())
    assert_states_equal(avg.state_dict(), {k[len("ema_model."):]: v for k, v in ema.state_dict().items()
                                           if k.startswith("ema_model.")}, "averaged_model")


# ---- gradient clipping: logged, and each family's own ------------------------------------------------
def test_clip_share_is_logged_against_the_norm_before_clipping(tiny_text8_shared, tmp_path):
    """Step 1 is the same whatever grad_clip is (clipping acts on the update), so its logged grad_norm g
    must be the norm before clipping, and step 1 counts as clipped exactly when grad_clip < g; the train
    line prints both; grad_clip=0 never clips."""
    def first_record(clip, name):
        out = run_train("mdlm_tiny", f"--data_root_dir={tiny_text8_shared}", f"--out_dir={tmp_path / name}",
                        "--max_iters=1", "--log_interval=1", f"--grad_clip={clip}")
        rec = [r for r in read_log(tmp_path / name) if r["split"] == "train"][0]
        return rec, out
    free, _ = first_record(0, "free")
    g = free["grad_norm"]
    assert g > 0 and free["clipped"] == 0
    below, out = first_record(g * 0.99, "below")
    above, _ = first_record(g * 1.01, "above")
    assert below["grad_norm"] == pytest.approx(g, rel=1e-6) and below["clipped"] == 1.0
    assert above["grad_norm"] == pytest.approx(g, rel=1e-6) and above["clipped"] == 0.0
    assert "(clipped 100%)" in out


def test_each_family_clips_as_its_paper():
    """D3PM 0.1 (nanoDD), MDLM / BD3-LM / AR / Duo / SEDD / GIDD 1.0, GenMD4 1.0 (as the MDLM it is compared with), in
    every config."""
    expected = {"D3PMAbsorbing": 0.1, "MDLM": 1.0, "BD3LM": 1.0, "AR": 1.0, "GenMD4": 1.0, "Duo": 1.0, "SEDD": 1.0,
                "GIDD": 1.0}
    for name in configs.NAMES:
        cls, _, training_args = getattr(configs, name)()
        assert training_args.get("grad_clip") == expected[cls.__name__], name


def test_task_configs_are_the_family_configs_on_each_task():
    """<family>_<task>_cpu / <family>_<task>: the network and recipe of <family>_text8_cpu / <family>_text8 on
    data/<task>, at the task's budget; one network for all families of a task (equal parameters)."""
    from data import tasks
    for task in tasks.TASKS:
        networks = set()
        for name in configs.NAMES:
            if name.endswith("_text8_cpu") or name.endswith("_text8"):
                base_cls, base_args, base_training = getattr(configs, name)()
                cls, model_args, training_args = getattr(configs, name.replace("text8", task))()
                assert cls is base_cls and training_args["dataset"] == task
                budget = configs.TASK_BUDGETS_CPU[task] if name.endswith("_cpu") else configs.TASK_BUDGET_GPU
                assert all(training_args[k] == v for k, v in budget.items())
                assert {k: v for k, v in model_args.items() if k != "curriculum_iters"} == \
                    {k: v for k, v in base_args.items() if k != "curriculum_iters"}
                assert model_args.get("curriculum_iters", 0) in (0, training_args["max_iters"] // 2)
                assert training_args["learning_rate"] == base_training["learning_rate"]
                if name.endswith("_cpu"):
                    networks.add(tuple(model_args[k] for k in ("n_embed", "n_heads", "n_blocks", "n_cond")))
        assert len(networks) == 1, (task, networks)


def test_a_pair_dataset_is_refused_in_one_line(tmp_path):
    """Rows of prompt -> answer pairs (a 2-D array) are not a text stream: the scripts refuse them until conditional
    training lands, instead of cutting windows across rows."""
    np.save(tmp_path / "train.npy", np.zeros((4, 16), dtype=np.uint16))
    with pytest.raises(UserError, match="pair dataset"):
        open_split(str(tmp_path), "train")
