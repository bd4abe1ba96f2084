"""The scripts work for every model family through one interface: train.py trains MDLM, AR and BD3LM configs
(with model-arg overrides, and resumes them without a config name), evaluate.py scores each model's own
bound (and --T for the continuous-time model), sample.py samples each (prompts; infill where the model
can), bench.py's suite keeps its deadline. Training runs are subprocesses; evaluate/sample run in-process."""
import json
import math
import os
import signal
import subprocess
import sys

import pytest
import torch

from conftest import REPO_ROOT

import common  # noqa: E402
import families  # noqa: E402
import evaluate  # noqa: E402
import sample  # noqa: E402

TIMEOUT = 120


def run(*args):
    """python ARGS from the repository root in its own process group, killed whole on timeout."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    proc = subprocess.Popen([sys.executable, *map(str, args)], cwd=REPO_ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"{args} timed out")
    return proc.returncode, out, err


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_text8_shared):
    """6 steps of ar_tiny, of mdlm_tiny with time conditioning and the cosine schedule (model-arg
    overrides) and of bd3lm_tiny with blocks of 8, then the MDLM run resumed to 8 steps with --resume alone
    (no config name)."""
    root = tmp_path_factory.mktemp("families")
    common_args = [f"--data_root_dir={tiny_text8_shared}", "--max_iters=6", "--eval_interval=3"]
    dirs = {"ar": root / "ar", "mdlm": root / "mdlm", "bd3lm": root / "bd3lm"}
    for name, extra in (("ar", ["ar_tiny"]), ("mdlm", ["mdlm_tiny", "--time_conditioning=True", "--schedule=cosine"]),
                        ("bd3lm", ["bd3lm_tiny", "--block_size=8"])):
        rc, out, err = run("train.py", *extra, *common_args, f"--out_dir={dirs[name]}")
        assert rc == 0, err
    rc, out, err = run("train.py", f"--resume={dirs['mdlm']}", "--max_iters=8", f"--data_root_dir={tiny_text8_shared}")
    assert rc == 0, err
    return dict(dirs=dirs, data_dir=os.path.join(tiny_text8_shared, "text8"), resumed_stdout=out)


def test_checkpoints_name_their_class_and_overrides(runs):
    ar = torch.load(runs["dirs"]["ar"] / "last.pt", weights_only=True)
    md = torch.load(runs["dirs"]["mdlm"] / "last.pt", weights_only=True)
    assert ar["model_cls"] == "AR" and md["model_cls"] == "MDLM"
    assert md["model_args"]["time_conditioning"] is True and md["model_args"]["schedule"] == "cosine"
    assert md["iter_num"] == 8 and "resuming from" in runs["resumed_stdout"] and "MDLM" in runs["resumed_stdout"]
    model = families.load_checkpoint(str(runs["dirs"]["mdlm"] / "last.pt"))
    assert type(model).__name__ == "MDLM" and model.time_conditioning and model.schedule == "cosine"
    bd = families.load_checkpoint(str(runs["dirs"]["bd3lm"] / "last.pt"))
    assert type(bd).__name__ == "BD3LM" and bd.block_size == 8
    assert type(families.load_checkpoint(str(runs["dirs"]["ar"] / "ckpt.pt"))).__name__ == "AR"


def evaluate_json(capsys, *args):
    evaluate.main([*map(str, args), "--json", "--max_batches", "3", "--batch_size", "4", "--device", "cpu"])
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_evaluate_each_family(runs, capsys):
    d = runs["data_dir"]
    ar = evaluate_json(capsys, runs["dirs"]["ar"], "--data_dir", d, "--split", "val")
    assert ar["model"] == "AR" and ar["bound"] == "exact NLL" and ar["se"] > 0
    assert ar["tokens"] == 3 * 4 * 32  # seq_len from the checkpoint (d3pm_tiny's 32)
    md = evaluate_json(capsys, runs["dirs"]["mdlm"], "--data_dir", d, "--split", "val")
    assert md["bound"] == "continuous NELBO" and 1.0 < md["bpt"] < 10 and md["se"] > 0
    md16 = evaluate_json(capsys, runs["dirs"]["mdlm"], "--data_dir", d, "--split", "val", "--T", "16")
    assert md16["bound"] == "16-step bound" and md16["T"] == 16
    bd = evaluate_json(capsys, runs["dirs"]["bd3lm"], "--data_dir", d, "--split", "val")
    assert bd["model"] == "BD3LM" and bd["bound"] == "continuous NELBO, blocks of 8" and 1.0 < bd["bpt"] < 10
    bd16 = evaluate_json(capsys, runs["dirs"]["bd3lm"], "--data_dir", d, "--split", "val", "--T", "16")
    assert bd16["bound"] == "16-step bound, blocks of 8" and bd16["se"] > 0
    with pytest.raises(common.UserError, match="not a multiple of block_size 8"):
        evaluate.main([str(runs["dirs"]["bd3lm"]), "--data_dir", d, "--seq_len", "30", "--device", "cpu"])
    with pytest.raises(common.UserError, match="continuous-time"):
        evaluate.main([str(runs["dirs"]["ar"]), "--data_dir", d, "--T", "16", "--device", "cpu"])


def sample_json(capsys, *args):
    sample.main([*map(str, args), "--json", "--device", "cpu"])
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_sample_each_family(runs, capsys):
    ar = sample_json(capsys, runs["dirs"]["ar"], "--batch_size", "2", "--prompt", "the cat")
    assert all(s.startswith("the cat") and len(s) == 32 for s in ar["samples"])  # seq_len from the checkpoint
    assert ar["network_calls"] == 32 - 7
    with pytest.raises(common.UserError, match="cannot infill"):
        sample.main([str(runs["dirs"]["ar"]), "--infill", "the ??? sat", "--device", "cpu"])
    md = sample_json(capsys, runs["dirs"]["mdlm"], "--batch_size", "2", "--infill", "the ??? sat on ???")
    assert all(s[:4] == "the " and s[7:15] == " sat on " and len(s) == 18 for s in md["samples"])
    assert md["network_calls"] <= 6  # one call per distinct unmask time
    grid = sample_json(capsys, runs["dirs"]["mdlm"], "--batch_size", "2", "--steps", "4")
    assert grid["network_calls"] <= 4 and grid["steps"] == 4
    remask = sample_json(capsys, runs["dirs"]["mdlm"], "--batch_size", "2", "--sampler", "remask", "--steps", "8",
                         "--eta", "0.1", "--prompt", "the")
    assert remask["network_calls"] == 8 and all(s.startswith("the") and "\u2588" not in s for s in remask["samples"])
    with pytest.raises(common.UserError, match="eta"):
        sample.main([str(runs["dirs"]["mdlm"]), "--sampler", "remask", "--eta", "2", "--device", "cpu"])


def test_bench_suite_keeps_its_deadline():
    """With no time left every job is reported as skipped (a JSON line with "error" and a line on stderr),
    nothing runs and nothing hangs."""
    rc, out, err = run("bench.py", "--mode=suite", "--suite_configs=ar_tiny,mdlm_tiny", "--suite_seconds=0",
                       "--device=cpu")
    assert rc == 0, err
    records = [json.loads(line) for line in out.splitlines()]
    jobs = records[:-1]
    assert [r["bench"] for r in jobs] == ["train", "train", "torchrun", "sample", "sample", "sample_memory"]
    assert all("skipped" in r["error"] for r in jobs) and len(err.strip().splitlines()) == len(jobs)
    assert records[-1] == {**records[-1], "bench": "suite", "jobs": 6, "failed": 6}


def test_bench_suite_without_cuda_says_so_and_runs_the_tiny_configs():
    """On a machine without CUDA the default suite (published sizes) would run for minutes and print nothing:
    it says at once, in one line, that this is the GPU check list, and takes the families' tiny configs."""
    rc, out, err = run("bench.py", "--mode=suite", "--suite_seconds=0", "--device=cpu")
    assert rc == 0, err
    first = err.splitlines()[0]
    assert first.startswith("suite: no CUDA here") and "GPU check list" in first and "tiny" in first
    trained = [r["config"] for r in map(json.loads, out.splitlines()) if r["bench"] == "train"]
    assert trained == ["d3pm_tiny", "mdlm_tiny", "ar_tiny", "bd3lm_tiny"]


def test_samples_scored_by_a_judge(runs, capsys, tmp_path):
    """sample.py --out, then evaluate.py --samples --judge with the AR run as the judge: the pooled NLL equals
    the judge's own NLL of the same ids (batch_bound is its exact NLL per token)."""
    out = tmp_path / "s.jsonl"
    sample.main([str(runs["dirs"]["mdlm"]), "--batch_size", "3", "--steps", "4", "--out", str(out), "--json",
                 "--device", "cpu"])
    capsys.readouterr()
    res = evaluate.main(["--samples", str(out), "--judge", str(runs["dirs"]["ar"]), "--data_dir", runs["data_dir"],
                         "--json"])
    ids = torch.tensor([json.loads(line)["ids"] for line in out.read_text().splitlines()])
    judge_model = families.load_checkpoint(str(runs["dirs"]["ar"] / "ckpt.pt"))
    with torch.no_grad():
        exact = float(judge_model.batch_bound(ids))  # nats/token; 32 tokens fit the judge's context of 32
    assert res["tokens"] == ids.numel() and res["samples"] == 3
    assert abs(res["gen_bpt"] * math.log(2) - exact) < 1e-4 and abs(math.log(res["gen_ppl"]) - exact) < 1e-4
    assert 0 < res["entropy"] <= math.log2(27) and 0 <= res["in_vocab"] <= 1
    with pytest.raises(common.UserError, match="autoregressive"):
        evaluate.main(["--samples", str(out), "--judge", str(runs["dirs"]["mdlm"])])


def test_plot_draws_runs_or_says_what_is_missing(runs, tmp_path):
    import plot
    png = tmp_path / "curves.png"
    try:
        import matplotlib  # noqa: F401
    except ImportError:  # CI: matplotlib is not a requirement, so the error must say how to get it
        with pytest.raises(common.UserError, match="pip install matplotlib"):
            plot.main([str(runs["dirs"]["ar"]), str(runs["dirs"]["mdlm"]), "--out", str(png)])
        return
    plot.main([str(runs["dirs"]["ar"]), str(runs["dirs"]["mdlm"]), "--out", str(png)])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_block_diffusion_samples_any_length(runs, capsys):
    """--length N continues block after block past the training length (32): the prompt kept, exactly N new
    characters, the same text with --no_kv_cache, and calls = denoising calls + one per stored block."""
    d = runs["dirs"]["bd3lm"]
    args = ["--batch_size", "2", "--prompt", "the cat", "--length", "73", "--seed", "3"]
    cached = sample_json(capsys, d, *args)
    plain = sample_json(capsys, d, *args, "--no_kv_cache")
    assert all(s.startswith("the cat") and len(s) == 80 for s in cached["samples"])
    assert cached["samples"] == plain["samples"]
    blocks = 80 // 8
    # the first block holds the prompt (7 given, 1 masked); continuous sampling: one call per masked position
    assert plain["network_calls"] == 73 and cached["network_calls"] == 73 + blocks - 1
    md = sample_json(capsys, d, "--batch_size", "1", "--infill", "the ??? sat on ???")
    assert md["samples"][0][:4] == "the " and md["samples"][0][7:15] == " sat on "


def test_block_diffusion_stops_at_end_of_text():
    """stop_id: sampling stops after the first block by which every row has produced it (cut there)."""
    from bd3lm import BD3LM
    torch.manual_seed(0)
    model = BD3LM(4, 16, 2, 1, 8, 0.0, block_size=2).eval()
    with torch.no_grad():
        model.net.vocab_embed.weight[3] += 2.0  # make token 3 likely, so every row produces it soon
    x = torch.full((3, 40), model.mask_id)
    out, _ = model.sample(x, generator=torch.Generator().manual_seed(0), window=8, stop_id=3)
    full, _ = model.sample(x, generator=torch.Generator().manual_seed(0), window=8)
    n = out.shape[1]
    assert n < 40 and n % 2 == 0 and torch.equal(out, full[:, :n])
    assert (out == 3).any(dim=1).all() and not (out[:, :n - 2] == 3).any(dim=1).all()


# ---- the protocol of families.py, checked on every registered family ------------------------------------
def tiny(cls_name):
    """A tiny model of the family from its *_tiny config (each family registered in FAMILIES has one)."""
    import configs
    for name in configs.NAMES:
        if name.endswith("_tiny"):
            cls, model_args, _ = getattr(configs, name)()
            if cls.__name__ == cls_name:
                torch.manual_seed(0)
                return cls(**model_args)
    pytest.fail(f"{cls_name} is registered in families.FAMILIES but configs.py has no *_tiny config for it")


@pytest.mark.parametrize("cls_name", list(families.FAMILIES))
def test_every_family_provides_the_protocol(cls_name):
    """What families.py's docstring promises, for every class in FAMILIES: vocab_size, mask_id and net;
    forward -> (logits, loss, metrics with a 0-dim "bound"); batch_bound -> float64 0-dim, finite, T=None
    its own bound, T=N either the N-step bound or a ValueError; bound_name(T) a string; sample fills
    exactly the mask_id positions and returns (samples, calls); check_length (when present) rejects
    with a ValueError."""
    model = tiny(cls_name)
    assert isinstance(model.vocab_size, int) and isinstance(model.mask_id, int) and model.net is not None
    x0 = torch.randint(model.vocab_size, (4, 16), generator=torch.Generator().manual_seed(0))
    logits, loss, metrics = model(x0)
    assert loss.dim() == 0 and torch.isfinite(loss) and metrics["bound"].dim() == 0
    model.eval()
    with torch.no_grad():
        own = model.batch_bound(x0, 0.5, torch.Generator().manual_seed(1))
        assert own.dtype == torch.float64 and own.dim() == 0 and torch.isfinite(own)
        try:
            n_step = model.batch_bound(x0, 0.5, torch.Generator().manual_seed(1), T=4)
            assert n_step.dtype == torch.float64 and torch.isfinite(n_step)
        except ValueError:
            pass
    assert isinstance(model.bound_name(), str) and isinstance(model.bound_name(4), str)
    x = x0.clone()
    x[:, 8:] = model.mask_id
    samples, calls = model.sample(x, generator=torch.Generator().manual_seed(2))
    assert samples.shape == x.shape and torch.equal(samples[:, :8], x0[:, :8]) and calls >= 1
    assert (samples[:, 8:] < model.vocab_size).all()
    if hasattr(model, "check_length"):
        model.check_length(16)


SCRIPTS = ("train", "distill", "sample", "evaluate", "bench", "plot")


def top_level_imports():
    """{module: the repo's top-level modules it imports, anywhere in the file}."""
    import ast
    mods = {p.stem for p in REPO_ROOT.glob("*.py")}
    graph = {}
    for name in mods:
        deps = set()
        for node in ast.walk(ast.parse((REPO_ROOT / f"{name}.py").read_text())):
            if isinstance(node, ast.Import):
                deps |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                deps.add(node.module.split(".")[0])
        graph[name] = (deps & mods) - {name}
    return graph


def test_imports_flow_one_way_and_scripts_name_no_family():
    """No import circle among the top-level modules, no script imports a script, and no script imports a
    family's file: the scripts reach the families through families.py (and configs.py) only."""
    graph = top_level_imports()
    done, visiting = set(), []

    def visit(m):
        assert m not in visiting, f"import circle: {' -> '.join(visiting[visiting.index(m):] + [m])}"
        if m in done:
            return
        visiting.append(m)
        for d in graph[m]:
            visit(d)
        visiting.pop()
        done.add(m)
    for m in graph:
        visit(m)
    family_files = {cls.__module__ for cls in families.FAMILIES.values()}
    for s in SCRIPTS:
        assert not graph[s] & set(SCRIPTS), f"{s}.py imports the script(s) {graph[s] & set(SCRIPTS)}"
        assert not graph[s] & family_files, f"{s}.py imports a family's file directly: {graph[s] & family_files}"
