"""
train.py and evaluate.py under torchrun (2 gloo ranks on the CPU): gradient accumulation with DDP,
per-rank data, checkpoints, resuming on the same and on another world size, an elastic restart after a
worker crash, distributed evaluation, and a clean exit of every launch.

Every launch runs tests/recorder.py (train.main / evaluate.main with recording hooks: micro-batches,
times, masked inputs, DDP's sync flag, parameters and gradients at every optimizer step, evaluate's
batches) in a process group of its own with a timeout (conftest.run_script). The launches are few and
shared: one straight 2-rank run (A) serves the accumulation, data, checkpoint and restart tests; a
1-process run (S) in this process serves the single-process and 1 -> 2 tests.
"""
import functools
import json
import math
import os
import shutil

import pytest
import torch

import configs
import evaluate
import families
import train
from conftest import REPO_ROOT, call_main, describe, run_script, script_env
from recorder import (adamw, big_batch_gradient, load_rank, optimizer_step, recording, set_params,
                      split_steps)

pytestmark = pytest.mark.skipif(not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
                                reason="torch.distributed with gloo is not available")

TORCHRUN = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
RECORDER = str(REPO_ROOT / "tests" / "recorder.py")
EXIT_ABORT = "terminate called without an active exception"
GLOO_THREADS = ("pt_gloo_runloop", "gloo_tcp_loop")
STEPS, MICRO, B = 4, 2, 4  # optimizer steps, micro-steps per step (gradient_accumulation_steps), batch_size

LAUNCHES = []  # (name, CompletedProcess, record directory) of every torchrun launch of this module
EXIT_ABORTS = []


def train_args(data_root, **over):
    """d3pm_tiny without dropout (so that the tests can recompute an update from the recorded inputs),
    constant learning rate, 2 micro-steps of 4 sequences, a checkpoint every 2 steps."""
    args = dict(device="cpu", data_root_dir=data_root, dropout=0.0, batch_size=B, gradient_accumulation_steps=MICRO,
                decay_lr=False, learning_rate=1e-3, max_iters=STEPS, eval_interval=2, eval_iters=2,
                log_interval=2, ckpt_interval=2, ema_update_after_step=1, ema_beta=0.5)
    args.update(over)
    return ["d3pm_tiny"] + [f"--{k}={v}" for k, v in args.items()]


def torchrun(name, record_dir, what, args, launcher_args=(), **env):
    """Launch tests/recorder.py WHAT ARGS on 2 ranks (env: more environment variables for recorder.py, e.g.
    CRASH_AFTER). A launch whose ranks all finished and saved their records, then died at exit, is kept for
    test_torchrun_exits_cleanly; any other failure fails now."""
    proc = run_script([*TORCHRUN, *launcher_args, RECORDER, what, *map(str, args)],
                      env=script_env(RECORD_DIR=record_dir, **env))
    LAUNCHES.append((name, proc, record_dir))
    saved = all(os.path.exists(os.path.join(record_dir, f"rank{r}.pt")) for r in (0, 1))
    if proc.returncode != 0:
        if saved and EXIT_ABORT in proc.stderr:
            EXIT_ABORTS.append(f"{name}: {describe(proc)}")
        else:
            pytest.fail(f"{name}: {describe(proc)}")
    return [load_rank(record_dir, r) for r in (0, 1)]


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def tiny_model():
    return configs.d3pm_tiny()[0](**{**configs.d3pm_tiny()[1], "dropout": 0.0})


@functools.lru_cache(maxsize=None)
def names():
    return tuple(n for n, _ in tiny_model().named_parameters())


def as_list(state):
    """A model state_dict's parameters, in model.parameters() order."""
    return [state[n] for n in names()]


def assert_lists_equal(a, b, what):
    bad = [n for n, x, y in zip(names(), a, b) if not torch.equal(x, y)]
    assert not bad, f"{what}: {len(bad)} tensors differ, e.g. {bad[:3]}"


def assert_lists_close(a, b, what, rtol=1e-5, atol=1e-7):
    for n, x, y in zip(names(), a, b):
        torch.testing.assert_close(x, y, rtol=rtol, atol=atol, msg=lambda m: f"{what}, {n}: {m}")


def same_batch(a, b):
    return a.shape == b.shape and torch.equal(a, b)


def check_update(steps_by_rank, opt_state=None, final=None, first_params=None):
    """The accumulation contract on every recorded step: each rank skipped the gradient all-reduce on all
    micro-steps but the last (DDP no_sync); the ranks hold identical parameters before every step and
    identical all-reduced gradients; that gradient is the gradient of ONE forward pass over the union of
    the micro-batches all ranks drew (their sequences, times and masked inputs), and the next parameters
    are one clipped AdamW step with it (from opt_state, e.g. a checkpoint's, or fresh)."""
    model = tiny_model()
    opt = adamw(model)
    if opt_state is not None:
        opt.load_state_dict(opt_state)
    n_steps = len(steps_by_rank[0])
    assert all(len(s) == n_steps for s in steps_by_rank)
    for s in range(n_steps):
        (fwds0, step0), others = steps_by_rank[0][s], [r[s] for r in steps_by_rank[1:]]
        fwds = [f for rank in steps_by_rank for f in rank[s][0]]
        ddp = len(steps_by_rank) > 1
        for rank_fwds, _ in steps_by_rank[0][s:s + 1] + others:
            assert len(rank_fwds) == MICRO
            # no_sync() on all micro-steps but the last (a wrong implementation all-reduces every micro-step,
            # or none: then the ranks' weights drift apart)
            assert [f[4] for f in rank_fwds] == ([False] * (MICRO - 1) + [True] if ddp else [None] * MICRO)
        for fwds_r, step_r in others:
            assert_lists_equal(step_r[1], step0[1], f"step {s + 1}: parameters of rank 0 vs another rank")
            assert_lists_equal(step_r[2], step0[2], f"step {s + 1}: all-reduced gradients, rank 0 vs another rank")
        # every micro-batch is a new draw (a wrong implementation reuses one batch for all micro-steps)
        xs = [f[1] for f in fwds]
        assert not any(same_batch(xs[i], xs[j]) for i in range(len(xs)) for j in range(i)), "a micro-batch repeats"
        if s == 0 and first_params is not None:
            assert_lists_equal(step0[1], first_params, "the parameters the run started from")
        # the accumulated gradient = the union batch's gradient (a wrong implementation forgets to divide by
        # the number of micro-steps, zeroes the gradient between micro-steps, or averages over ranks twice)
        assert_lists_close(step0[2], big_batch_gradient(model, step0[1], fwds), f"step {s + 1}: gradient")
        new = optimizer_step(model, opt, step0[1], step0[2])
        after = steps_by_rank[0][s + 1][1][1] if s + 1 < n_steps else final
        if after is not None:  # (optimizer.step per micro-step, or a lost optimizer state, changes this)
            assert_lists_close(after, new, f"parameters after step {s + 1}", rtol=1e-5, atol=1e-6)
    return model, opt


# ---- the shared runs ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("ddp")


@pytest.fixture(scope="module")
def run_a(root, tiny_text8_shared):
    """A: 4 steps on 2 ranks, straight."""
    rec = root / "A_rec"
    ranks = torchrun("A", rec, "train", train_args(tiny_text8_shared, out_dir=root / "A"))
    return dict(out=root / "A", rec=rec, ranks=ranks, steps=[split_steps(r["events"]) for r in ranks])


@pytest.fixture(scope="module")
def run_s(root, tiny_text8_shared):
    """S: the same command as one plain process (in this process), 3 steps; last.pt at 2 kept."""
    rec = root / "S_rec"
    rec.mkdir()
    with recording(str(rec)) as r:
        model = call_main(train, train_args(tiny_text8_shared, out_dir=root / "S", max_iters=3))
    return dict(out=root / "S", rec=rec, events=r.events, steps=split_steps(r.events),
                final=[p.detach().clone() for p in model.parameters()])


def test_gradient_accumulation_under_torchrun(run_a):
    """2 ranks x 2 micro-steps: identical parameters on both ranks after every step, each step the
    update of the union of the 4 micro-batches the ranks drew, gradient all-reduced on the last
    micro-step only. Catches: the loss not divided by gradient_accumulation_steps, gradients zeroed between
    micro-steps or not between steps, an optimizer step per micro-step, an all-reduce on every micro-step
    (no no_sync) or on none, one batch reused for every micro-step, both ranks drawing the same data."""
    a = run_a
    assert [len(s) for s in a["steps"]] == [STEPS, STEPS]
    assert_lists_equal(as_list(a["ranks"][0]["final"]), as_list(a["ranks"][1]["final"]), "final weights, rank 0 vs 1")
    check_update(a["steps"], final=as_list(a["ranks"][0]["final"]))
    # the ranks drew different data
    for s in range(STEPS):
        for f0, f1 in zip(a["steps"][0][s][0], a["steps"][1][s][0]):
            assert not same_batch(f0[1], f1[1])


def test_rank0_draws_what_one_process_draws(run_a, run_s):
    """Per-rank seeds: rank 0 draws the batches, times and masks of a single process with the same
    seed, rank 1 others; the result still differs from the single process's (rank 1's gradients count).
    Catches: seeds that ignore the rank (see above) or that differ from a single process's for rank 0, and
    gradients that are not averaged over the ranks."""
    for (fa, _), (fs, _) in zip(run_a["steps"][0][:2], run_s["steps"][:2]):
        for x, y in zip(fa, fs):
            assert same_batch(x[1], y[1]) and torch.equal(x[2], y[2]) and torch.equal(x[3], y[3])
    assert any(not torch.equal(x, y) for x, y in zip(run_a["steps"][0][2][1][1], run_s["steps"][2][1][1]))


def test_single_process_accumulation_is_the_union_batch_update(run_s):
    """The same contract with one process: 2 micro-steps of 4 sequences give the update of one step on
    the 8 (same sequences, times and masks), within float tolerance. Catches the same mistakes as
    test_gradient_accumulation_under_torchrun (the 1/k scaling, zeroing, stepping per micro-step)."""
    check_update([run_s["steps"]], final=run_s["final"])


def test_checkpoints_and_log_written_once_by_rank0(run_a):
    """Catches: ranks other than 0 writing files, one RNG state for all ranks (or pickled objects instead
    of tensors), a total_batch_size without the world size or the accumulation steps."""
    out = run_a["out"]
    assert sorted(os.listdir(out)) == ["ckpt.pt", "last.pt", "log.jsonl"], os.listdir(out)
    last = load(out / "last.pt")
    assert last["iter_num"] == STEPS
    assert last["total_batch_size"] == MICRO * 2 * B
    assert len(last["rng"]) == 2 and not torch.equal(last["rng"][0]["data"], last["rng"][1]["data"])
    assert all(set(r) == {"torch", "data", "cuda"} and all(v.dtype == torch.uint8 for v in r.values())
               for r in last["rng"])
    assert_lists_equal(as_list(last["model"]), as_list(run_a["ranks"][0]["final"]), "last.pt vs the trained model")
    records = [json.loads(line) for line in open(out / "log.jsonl")]
    assert [r["iter"] for r in records if r["split"] == "train"] == [2, 4]
    assert [r["iter"] for r in records if r["split"] == "val"] == [2, 4]


def assert_resumed_state(run, ckpt, what):
    """The resumed run started from the checkpoint's weights, and its first step is an AdamW step from
    the checkpoint's optimizer state; its EMA continues the checkpoint's."""
    model, _ = check_update(run["steps"], opt_state=ckpt["optimizer"], final=run["final"],
                            first_params=as_list(ckpt["model"]))
    last = load(run["out"] / "last.pt")
    assert last["iter_num"] == ckpt["iter_num"] + 1
    set_params(model, run["final"])
    ema = train.EMA(model, beta=0.5, update_after_step=1)
    ema.load_state_dict(ckpt["ema"])
    ema.update()
    assert int(last["ema"]["step"]) == int(ckpt["ema"]["step"]) + 1, what
    for k, v in ema.state_dict().items():
        torch.testing.assert_close(last["ema"][k], v, rtol=1e-6, atol=1e-7, msg=lambda m: f"{what}: EMA {k}: {m}")


def test_resume_two_ranks_on_one(run_a, root, tiny_text8_shared, capsys):
    """A 2-rank checkpoint resumed by one process: it continues at the saved iteration with the saved
    model, EMA and optimizer state, says that the RNG streams are new, and draws new data (not rank 0's
    or rank 1's continuation). Catches: refusing the checkpoint or starting over, loading the weights but
    not the optimizer state (a fresh AdamW's first step differs) or not the EMA, silently reusing one
    rank's RNG state (its batches would replay that rank's stream)."""
    ckpt_dir = root / "A_at_2"
    ckpt_dir.mkdir()
    shutil.copyfile(run_a["rec"] / "last_2.pt", ckpt_dir / "last.pt")
    ckpt = load(ckpt_dir / "last.pt")
    assert ckpt["iter_num"] == 2 and len(ckpt["rng"]) == 2
    capsys.readouterr()
    with recording() as r:
        model = call_main(train, train_args(tiny_text8_shared, out_dir=root / "A21", max_iters=3)
                          + [f"--resume={ckpt_dir}"])
    out = capsys.readouterr().out
    assert "RNG states are for another world size" in out and "resuming from" in out and "iteration 2" in out
    run = dict(steps=[split_steps(r.events)], out=root / "A21", final=[p.detach().clone() for p in model.parameters()])
    assert len(run["steps"][0]) == 1
    assert_resumed_state(run, ckpt, "2 -> 1")
    new = [f[1] for f in run["steps"][0][0][0]]
    for rank in (0, 1):
        old = [f[1] for f in run_a["steps"][rank][2][0]]  # what that rank drew at step 3
        assert not any(same_batch(x, y) for x in new for y in old), f"replays rank {rank}'s data stream"


def test_resume_one_rank_on_two(run_s, root, tiny_text8_shared):
    """A 1-process checkpoint resumed by 2 ranks: both start from the saved weights, optimizer state and
    EMA and stay identical, rank 0 says (once) that the RNG streams are new, and each rank draws its own new
    data. Catches what the 2 -> 1 test does, and both ranks continuing the one saved stream (the same
    batches on both ranks, or the single process's next batches)."""
    ckpt_dir = root / "S_at_2"
    ckpt_dir.mkdir()
    shutil.copyfile(run_s["rec"] / "last_2.pt", ckpt_dir / "last.pt")
    ckpt = load(ckpt_dir / "last.pt")
    assert ckpt["iter_num"] == 2 and len(ckpt["rng"]) == 1
    ranks = torchrun("S12", root / "S12_rec", "train",
                     train_args(tiny_text8_shared, out_dir=root / "S12", max_iters=3) + [f"--resume={ckpt_dir}"])
    proc = LAUNCHES[-1][1]
    assert proc.stdout.count("RNG states are for another world size") == 1, describe(proc)
    run = dict(steps=[split_steps(r["events"]) for r in ranks], out=root / "S12", final=as_list(ranks[0]["final"]))
    assert [len(s) for s in run["steps"]] == [1, 1]
    assert_resumed_state(run, ckpt, "1 -> 2")
    new0, new1 = ([f[1] for f in run["steps"][rank][0][0]] for rank in (0, 1))
    old = [f[1] for f in run_s["steps"][2][0]]  # what the single process drew at step 3
    assert not any(same_batch(x, y) for x in new0 + new1 for y in old), "replays the saved data stream"
    assert not any(same_batch(x, y) for x in new0 for y in new1), "both ranks draw the same data"


def test_restart_after_a_worker_crash_resumes_bit_exactly(run_a, root, tiny_text8_shared):
    """torchrun --max-restarts=1: rank 1 dies hard after step 3 (before step 4's backward, recorder.crash_after);
    the restarted group resumes from last.pt (step 2) by itself and ends bit-identical to A, which never crashed:
    weights, EMA, optimizer, and rank 1 draws again exactly A's rank-1 batches of steps 3 and 4. Catches: a
    restarted group that starts over or reads the crashed attempt's process-group keys (fails or hangs), RNG
    states restored to the wrong rank or not at all."""
    rec = root / "C_rec"
    ranks = torchrun("C", rec, "train", train_args(tiny_text8_shared, out_dir=root / "C"),
                     launcher_args=["--max-restarts=1"], CRASH_AFTER=3)  # recorder.crash_after
    proc = LAUNCHES[-1][1]
    assert "exitcode: 13" in proc.stderr and "resuming from" in proc.stdout, describe(proc)
    a, c = load(run_a["out"] / "last.pt"), load(root / "C" / "last.pt")
    assert a["iter_num"] == c["iter_num"] == STEPS
    for key in ("model", "ema"):
        assert set(a[key]) == set(c[key]) and all(torch.equal(a[key][k], c[key][k]) for k in a[key]), key
    for i, sa in a["optimizer"]["state"].items():
        assert all(torch.equal(sa[k], c["optimizer"]["state"][i][k]) for k in sa)
    steps = split_steps(ranks[1]["events"])
    assert len(steps) == 2  # the restarted attempt did steps 3 and 4
    for (fc, _), (fa, _) in zip(steps, run_a["steps"][1][2:]):
        assert all(same_batch(x[1], y[1]) for x, y in zip(fc, fa))


# ---- evaluate.py -----------------------------------------------------------------------------------------
def test_distributed_evaluation_combines_the_ranks_exactly(run_a, root, tiny_text8_shared):
    """torchrun evaluate.py: the ranks score different windows, and the combined estimate (mean and
    standard error over both ranks' batches) equals a single-process estimate on the same windows,
    recomputed here batch by batch. Catches: ranks seeded alike (the same windows twice), keeping only
    rank 0's estimates, summing instead of gathering, a batch count off by the world size."""
    ckpt = run_a["out"] / "ckpt.pt"
    rec = root / "E_rec"
    ranks = torchrun("E", rec, "evaluate", [ckpt, "--data_dir", os.path.join(tiny_text8_shared, "text8"), "--split",
                                            "val", "--seq_len", "32", "--batch_size", "4", "--max_batches", "6",
                                            "--json", "--device", "cpu"])
    proc = LAUNCHES[-1][1]
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    assert len(lines) == 1, describe(proc)  # rank 0 alone prints
    result = json.loads(lines[0])
    bounds = [[e for e in r["events"] if e[0] == "bound"] for r in ranks]
    assert [len(b) for b in bounds] == [3, 3] and result["batches"] == 6
    for e0 in bounds[0]:  # different windows (a wrong implementation seeds every rank alike)
        assert not any(same_batch(e0[1], e1[1]) for e1 in bounds[1])
    model = families.load_checkpoint(str(ckpt))
    single = []
    for i in range(3):  # the order evaluate.py combines them in: batch i of rank 0, of rank 1, ...
        for rank in (0, 1):
            _, x0, offset, state, value = bounds[rank][i]
            gen = torch.Generator()
            gen.set_state(state)
            with torch.no_grad():
                mine = float(model.batch_bound(x0, offset, gen))
            assert mine == pytest.approx(value, rel=1e-6)
            single.append(mine / math.log(2))
    bpt, se = evaluate.summarize(single)
    assert result["bpt"] == pytest.approx(bpt, rel=1e-6) and result["se"] == pytest.approx(se, rel=1e-5)
    assert result["tokens"] == 6 * 4 * 32


# ---- teardown ----------------------------------------------------------------------------------------------
def test_torchrun_exits_cleanly(run_a, run_s):
    """Every torchrun launch of this module exited 0, and in every rank gloo's threads were gone when
    main() returned (common.ddp_shutdown joined them): nothing of the process group is left to run into
    interpreter shutdown, where a worker thread dropping the last reference to a tensor with a Python
    object cannot take the GIL and aborts the process ("terminate called without an active exception"),
    making torchrun report a failed run. A process group left alive (e.g. held by DDP through
    torch.distributed.nn's default arguments) fails here deterministically; stress_torchrun_exit.py
    counts the aborts over hundreds of launches."""
    assert LAUNCHES, "no launch ran"
    assert not EXIT_ABORTS, "\n\n".join(EXIT_ABORTS)
    for name, proc, rec in LAUNCHES:
        assert proc.returncode == 0, f"{name}: {describe(proc)}"
        for rank in (0, 1):
            threads = load_rank(rec, rank)["threads"]
            assert not [t for t in threads if t in GLOO_THREADS], f"{name}, rank {rank}: threads left {threads}"
