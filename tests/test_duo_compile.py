"""
Duo's curriculum under torch.compile (aot_eager: the same aten ops as eager, so the same random numbers): one
training step of a tiny Duo, compiled, gives the eager step's loss and gradients, and the compiled graph reads the
duality table from the model's buffer instead of recomputing the quadrature (gaussian_accuracy raises once the
table is in place, and no graph holds the quadrature's log_ndtr). The table stays out of the state dict.
"""
import pytest
import torch

import duo
from duo import Duo

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def step(fn, model, x, seed):
    """Loss and gradients of one curriculum training step, the randomness fixed by seed."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    loss = fn(x)[1]
    loss.backward()
    return loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters()}


def test_compiled_curriculum_step_equals_eager(monkeypatch):
    torch.manual_seed(0)
    model = Duo(7, 16, 2, 1, 8, 0.0, curriculum_iters=10, gamma_min=-2.68, gamma_max=1.59).train()
    for p in model.parameters():  # adaLN starts at zero: make every parameter matter
        torch.nn.init.normal_(p, std=0.2)
    model.start_iteration(0)
    assert model.in_curriculum and model.alpha_table.shape == (2, duo.GAMMA_POINTS)
    assert "alpha_table" not in model.state_dict()  # checkpoints and strict loading unchanged

    def no_quadrature(*args, **kwargs):
        raise AssertionError("the quadrature ran again after start_iteration")
    monkeypatch.setattr(duo, "gaussian_accuracy", no_quadrature)
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm.code)
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)

    torch._dynamo.reset()
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    x = torch.randint(0, 7, (4, 6), generator=torch.Generator().manual_seed(1))
    for seed in (3, 4):
        loss_e, grads_e = step(model, model, x, seed)
        loss_c, grads_c = step(compiled, model, x, seed)
        assert torch.allclose(loss_c, loss_e, rtol=1e-5, atol=1e-6), (loss_c, loss_e)
        for k in grads_e:
            assert torch.allclose(grads_c[k], grads_e[k], rtol=1e-5, atol=1e-6), k
    assert len(graphs) == 1 and not any("log_ndtr" in g for g in graphs)
    assert float(loss_e) != float(step(model, model, x, 5)[0])  # the seed matters: the check is not vacuous
