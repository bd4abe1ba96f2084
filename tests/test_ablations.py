"""dev/ablations.py: the settled ablations still run and still compare like with like. Each runs its
variants in children (bench.py's train mode in a fresh process, each with a timeout). No timing assertions."""
import json

import pytest

from conftest import REPO_ROOT, run_script


def run_ablation(*args):
    proc = run_script([str(REPO_ROOT / "dev" / "ablations.py"), "d3pm_tiny", "--device=cpu", *args])
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_memory_closed_form_equals_posterior_loss():
    """The memory ablation's two children train one step on the same data and times with the closed-form loss
    and with full (B, L, K) posterior tensors: the two losses must be the same number (a posterior
    formula that disagreed with d3pm.py, or children that drew different batches, would not be)."""
    rec = run_ablation("--mode=memory", "--vocab_size=2000", "--batch_size=2", "--seq_len=16")
    assert rec["K"] == 2001 and rec["batch_size"] == 2 and rec["seq_len"] == 16
    assert rec["closed_loss"] is not None and rec["posterior_loss"] is not None
    assert rec["posterior_loss"] == pytest.approx(rec["closed_loss"], rel=1e-5)
    if rec["closed_step_MB"] > 0:
        assert rec["step_mem_ratio"] == pytest.approx(rec["posterior_step_MB"] / rec["closed_step_MB"])
