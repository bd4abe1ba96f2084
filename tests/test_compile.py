"""torch.compile as a GPU run uses it, checked on CPU with the aot_eager backend (the graphs dynamo captures and
AOTAutograd's joint forward/backward, without code generation; it keeps the eager RNG stream): one compiled
training step of every family equals the eager step (loss and every gradient), and a compiled network samples
exactly what the eager one samples (common.compile_network, as sample.py/evaluate.py --compile use it).
Inductor's generated code and FlexAttention's backward only run where bench.py --mode=suite runs (a GPU)."""
import pytest
import torch

import configs
from common import compile_network
from conftest import randomize_weights

pytestmark = pytest.mark.usefixtures("one_thread")

FAMILY_CONFIGS = ["d3pm_tiny", "mdlm_tiny", "ar_tiny", "bd3lm_tiny", "genmd4_tiny", "duo_tiny"]


def tiny(config, seed=0):
    model_cls, model_args, _ = getattr(configs, config)()
    torch.manual_seed(seed)
    model = model_cls(**{**model_args, "dropout": 0.0})
    return randomize_weights(model, seed + 1)


def step(model, x, seed, run=None):
    """One training step's loss and the model's gradients, the forward run by run (default: the model)."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    loss = (model if run is None else run)(x)[1]
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("config", FAMILY_CONFIGS)
def test_compiled_training_step_equals_eager(config):
    torch._dynamo.reset()
    model = tiny(config).train()
    if hasattr(model, "start_iteration"):
        model.start_iteration(0)  # Duo: the curriculum (its duality table) is the part that used to trip dynamo
    x = torch.randint(0, model.vocab_size, (4, 32), generator=torch.Generator().manual_seed(5))
    eager_loss, eager_grads = step(model, x, seed=11)
    compiled = torch.compile(model, backend="aot_eager")
    for _ in range(2):  # the second call runs the cached graph
        loss, grads = step(model, x, seed=11, run=compiled)
        torch.testing.assert_close(loss, eager_loss, rtol=1e-5, atol=1e-6)
        assert grads.keys() == eager_grads.keys()
        for name in grads:
            torch.testing.assert_close(grads[name], eager_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    # the comparison can fail: other data and another seed (other times and masks) give another loss
    assert not torch.equal(step(model, x.roll(1, dims=1), seed=12)[0], eager_loss)


@pytest.mark.parametrize("config,opts", [("mdlm_tiny", {}), ("bd3lm_tiny", dict(window=32))])
def test_compiled_network_samples_what_the_eager_one_samples(config, opts):
    torch._dynamo.reset()
    model = tiny(config).eval()
    x = torch.full((3, 32), model.mask_id)
    x[:, :4] = torch.arange(4)  # a prompt
    eager, eager_calls = model.sample(x, steps=8, generator=torch.Generator().manual_seed(3), **opts)
    compile_network(model, "aot_eager")
    samples, calls = model.sample(x, steps=8, generator=torch.Generator().manual_seed(3), **opts)
    assert calls == eager_calls and torch.equal(samples, eager)
    assert torch.equal(samples[:, :4], x[:, :4]) and (samples != model.mask_id).all()
    assert "net._orig_mod" not in "".join(model.state_dict())  # compiled in place: the weights keep their names
