"""What a first GPU run would hit, checked without a GPU: a checkpoint is read into CPU memory and only the model
moves to the device; train.py and distill.py save and restore the CUDA RNG state through one shared function
(its CUDA branch driven here by a stand-in for torch.cuda); the training loops synchronise with the host once per
step (train.py: its finite/stop decision) or once per logged step (distill.py), and build no tensor from host
data per step; sample.py --compile runs."""
import contextlib
import io
import os
import sys

import pytest
import torch

import common
import distill
import families
import sample
import train
from conftest import call_main

pytestmark = pytest.mark.usefixtures("one_thread")


def test_checkpoint_is_read_to_cpu_and_only_the_model_moves(tmp_path, monkeypatch):
    from test_distill_cli import write_untrained
    path = write_untrained(tmp_path / "m.pt", "mdlm_tiny")
    seen = []
    real_load = torch.load

    def load(*args, **kwargs):
        seen.append(kwargs.get("map_location"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", load)
    model = common.open_model(path, True, torch.device("meta"))  # "meta": a device that is not the CPU
    assert seen == ["cpu"]
    assert {p.device.type for p in model.parameters()} == {"meta"}


class FakeCuda:
    """torch.cuda's RNG functions for a machine without a GPU: a state per device, recorded."""

    def __init__(self):
        self.states, self.calls = {}, []

    def get_rng_state(self, dev):
        self.calls.append(("get", str(dev)))
        return self.states.get(str(dev), torch.arange(8, dtype=torch.uint8))

    def set_rng_state(self, state, dev):
        self.calls.append(("set", str(dev)))
        self.states[str(dev)] = state.clone()


def test_rng_states_cover_cuda(monkeypatch):
    fake = FakeCuda()
    monkeypatch.setattr(torch.cuda, "get_rng_state", fake.get_rng_state)
    monkeypatch.setattr(torch.cuda, "set_rng_state", fake.set_rng_state)
    dev = torch.device("cuda:1")
    fake.states["cuda:1"] = torch.tensor([7, 7, 7], dtype=torch.uint8)
    state = common.rng_states(dev)
    assert torch.equal(state["cuda"], torch.tensor([7, 7, 7], dtype=torch.uint8))
    torch.rand(3)  # move the CPU stream on
    fake.states["cuda:1"] = torch.zeros(3, dtype=torch.uint8)
    after = torch.rand(3)
    common.set_rng_states(state, dev)
    assert torch.equal(fake.states["cuda:1"], torch.tensor([7, 7, 7], dtype=torch.uint8))
    torch.rand(3)
    assert torch.equal(torch.rand(3), after)  # the CPU stream is back where it was
    # off CUDA the device state is empty and never touched
    fake.calls.clear()
    assert common.rng_states(torch.device("cpu"))["cuda"].numel() == 0
    common.set_rng_states(state, torch.device("cpu"))
    assert fake.calls == []


def test_train_and_distill_save_the_shared_rng_states(monkeypatch):
    """Both scripts take their RNG states from common.rng_states and give them back through common.set_rng_states
    (so distill.py's CUDA branch is train.py's): their module globals are the shared functions."""
    assert train.rng_states is common.rng_states and train.set_rng_states is common.set_rng_states
    assert distill.rng_states is common.rng_states and distill.set_rng_states is common.set_rng_states
    assert set(train.rng_state(torch.Generator(), torch.device("cpu"))) == {"torch", "cuda", "data"}


@contextlib.contextmanager
def host_calls(script):
    """Count Tensor.item / Tensor.tolist (host syncs) and torch.tensor (a tensor from host data) called from
    `script`'s main(); yields the counts."""
    counts = {"sync": 0, "tensor": 0}
    real = {"item": torch.Tensor.item, "tolist": torch.Tensor.tolist, "tensor": torch.tensor}

    def from_main():
        frame = sys._getframe(2)
        return frame.f_code.co_name == "main" and os.path.basename(frame.f_code.co_filename) == script

    def counted(name, kind):
        def f(*args, **kwargs):
            if from_main():
                counts[kind] += 1
            return real[name](*args, **kwargs)
        return f

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.Tensor, "item", counted("item", "sync"))
        mp.setattr(torch.Tensor, "tolist", counted("tolist", "sync"))
        mp.setattr(torch, "tensor", counted("tensor", "tensor"))
        yield counts


def test_train_syncs_once_per_step(tmp_path, tiny_text8):
    steps = 12
    with host_calls("train.py") as counts, contextlib.redirect_stdout(io.StringIO()):
        call_main(train, ["d3pm_tiny", "--device=cpu", f"--data_root_dir={tiny_text8}", f"--out_dir={tmp_path}",
                          f"--max_iters={steps}", "--log_interval=100", "--eval_interval=100", "--ckpt_interval=100"])
    assert counts["tensor"] == 0
    # one per step, plus the one log line at the last step (loss, lr, grad norm, clipped and the metrics)
    assert steps <= counts["sync"] <= steps + 8, counts


def test_distill_syncs_once_per_logged_step(tmp_path, tiny_text8):
    from test_distill_cli import write_untrained
    teacher = write_untrained(tmp_path / "t.pt", "mdlm_tiny")
    iters = 8
    with host_calls("distill.py") as counts, contextlib.redirect_stdout(io.StringIO()), \
            contextlib.redirect_stderr(io.StringIO()):
        call_main(distill, [teacher, "--out_dir", tmp_path / "d", "--data_dir", os.path.join(tiny_text8, "text8"),
                            "--start_steps", "8", "--rounds", "1", "--iters_per_round", iters, "--batch_size", "2",
                            "--log_interval", 4, "--ckpt_interval", 100, "--device", "cpu"])
    # two log lines (loss and the finite check each) and the checkpoint at the round's end (one check)
    assert counts["tensor"] == 0 and counts["sync"] <= 2 * 2 + 1, counts


def test_distill_stops_on_a_non_finite_loss(tmp_path, tiny_text8, monkeypatch):
    from mdlm import MDLM
    from test_distill_cli import write_untrained
    teacher = write_untrained(tmp_path / "t.pt", "mdlm_tiny")
    inner = MDLM.distill_loss
    monkeypatch.setattr(MDLM, "distill_loss", lambda self, *a: inner(self, *a) * float("nan"))
    with pytest.raises(common.UserError, match="non-finite loss or gradient between iterations 1 and 2"), \
            contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        call_main(distill, [teacher, "--out_dir", tmp_path / "d", "--data_dir", os.path.join(tiny_text8, "text8"),
                            "--start_steps", "8", "--rounds", "1", "--iters_per_round", 4, "--batch_size", "2",
                            "--log_interval", 2, "--ckpt_interval", 100, "--device", "cpu"])
    assert not os.path.exists(tmp_path / "d" / "ckpt.pt")  # nothing non-finite was saved


def test_sample_compile_option(tmp_path, capsys):
    from test_distill_cli import write_untrained
    ckpt = write_untrained(tmp_path / "m.pt", "mdlm_tiny")
    torch._dynamo.reset()
    common_args = [ckpt, "--batch_size", "2", "--steps", "4", "--device", "cpu", "--json", "--seed", "5"]
    call_main(sample, common_args)
    eager = capsys.readouterr().out
    call_main(sample, common_args + ["--compile", "--compile_backend", "aot_eager"])
    assert capsys.readouterr().out.split('"seconds"')[0] == eager.split('"seconds"')[0]  # the same samples


def test_evaluate_compile_option(tmp_path, tiny_text8):
    import evaluate
    from test_distill_cli import write_untrained
    ckpt = write_untrained(tmp_path / "m.pt", "mdlm_tiny")
    torch._dynamo.reset()
    argv = [ckpt, "--data_dir", os.path.join(tiny_text8, "text8"), "--batch_size", "4", "--max_batches", "3",
            "--device", "cpu", "--json"]
    with contextlib.redirect_stdout(io.StringIO()):
        eager = call_main(evaluate, argv)
        compiled = call_main(evaluate, argv + ["--compile", "--compile_backend", "aot_eager"])
    assert compiled["bpt"] == pytest.approx(eager["bpt"], rel=1e-5) and compiled["batches"] == 3

