"""
Oracle tests for the DiT network (model.py) and nanoDD checkpoint compatibility (d3pm.py).

The state-dict layout and the network forward are re-derived from
../shared/reference/nanodd-compat.md sections 1-3 only: the forward below is a functional
float64 implementation on the raw state-dict tensors (no nn modules, no SDPA, no
F.layer_norm / F.gelu), and checkpoints are assembled by hand as plain dicts.
"""
import math
import os
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import families  # noqa: E402
from d3pm import D3PMAbsorbing  # noqa: E402

ARGS = dict(vocab_size=5, n_embed=16, n_heads=2, n_blocks=2, n_cond=8, dropout=0.0, T=20, lambda_ce=0.05)


# ------------------------------------------------------------------------------------------
# Expected state dict, written out from spec section 2
# ------------------------------------------------------------------------------------------
def expected_state_shapes(vocab_size, n_embed, n_heads, n_blocks, n_cond, T, **_):
    K, n, c, d = vocab_size + 1, n_embed, n_cond, n_embed // n_heads
    shapes = {
        "betas": (T + 1,),
        "alpha_bars": (T + 1,),
        "net.vocab_embed.weight": (K, n),
        "net.c_embed.mlp.0.weight": (c, 256),
        "net.c_embed.mlp.0.bias": (c,),
        "net.c_embed.mlp.2.weight": (c, c),
        "net.c_embed.mlp.2.bias": (c,),
        "net.rotary_emb.inv_freq": (d // 2,),
    }
    for i in range(n_blocks):
        p = f"net.blocks.{i}."
        shapes.update({
            p + "norm1.weight": (n,),
            p + "attn_qkv.weight": (3 * n, n),
            p + "attn_out.weight": (n, n),
            p + "norm2.weight": (n,),
            p + "mlp.0.weight": (4 * n, n),
            p + "mlp.0.bias": (4 * n,),
            p + "mlp.2.weight": (n, 4 * n),
            p + "mlp.2.bias": (n,),
            p + "adaLN_modulation.weight": (6 * n, c),
            p + "adaLN_modulation.bias": (6 * n,),
        })
    shapes.update({
        "net.norm_final.weight": (n,),
        "net.adaLN_modulation.weight": (2 * n, c),
        "net.adaLN_modulation.bias": (2 * n,),
    })
    return shapes


@pytest.mark.parametrize("args", [
    ARGS,
    dict(vocab_size=27, n_embed=24, n_heads=3, n_blocks=3, n_cond=12, dropout=0.025, T=7, lambda_ce=0.05),
])
def test_state_dict_keys_and_shapes_exact(args):
    m = D3PMAbsorbing(**args)
    sd = m.state_dict()
    exp = expected_state_shapes(**args)
    assert set(sd) == set(exp), (sorted(set(sd) - set(exp)), sorted(set(exp) - set(sd)))
    for k, shape in exp.items():
        assert tuple(sd[k].shape) == shape, (k, tuple(sd[k].shape), shape)
        assert sd[k].dtype == torch.float32, (k, sd[k].dtype)


def test_init_facts():
    """Zero-initialised adaLN (blocks start as identity), inv_freq values, trunc-normal embedding."""
    n = 64
    m = D3PMAbsorbing(vocab_size=2000, n_embed=n, n_heads=4, n_blocks=2, n_cond=8, dropout=0.0, T=10,
                      lambda_ce=0.05)
    sd = m.state_dict()
    for k, v in sd.items():
        if "adaLN_modulation" in k:
            assert torch.all(v == 0), k
        if k.endswith("norm1.weight") or k.endswith("norm2.weight") or k.endswith("norm_final.weight"):
            assert torch.all(v == 1), k
    d = n // 4
    inv = 10000.0 ** (-np.arange(0, d, 2) / d)
    np.testing.assert_allclose(sd["net.rotary_emb.inv_freq"].double().numpy(), inv, rtol=1e-6)
    w = sd["net.vocab_embed.weight"].double()
    std = n ** -0.5
    assert w.abs().max().item() <= 3 * std + 1e-6
    # truncated at 3 std the standard deviation shrinks only by ~1.4%
    assert abs(w.std().item() / std - 0.9866) < 0.03
    assert w.abs().max().item() > 2.5 * std  # truly spread out to the cut, not a narrower init


# ------------------------------------------------------------------------------------------
# Functional oracle of the network (float64, state-dict tensors only)
# ------------------------------------------------------------------------------------------
def _ln(x, w, eps=1e-5):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * w


def _silu(x):
    return x / (1 + torch.exp(-x))


def _gelu_tanh(x):
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))


def _mod(x, shift, scale):
    return x * (1 + scale) + shift


def oracle_net(sd, x, t, n_heads):
    """logits (B, L, K) float64 of the spec's DiT; sd: state dict with or without 'net.' prefix."""
    W = {k[4:] if k.startswith("net.") else k: v.detach().to(torch.float64) for k, v in sd.items()}
    B, L = x.shape
    E = W["vocab_embed.weight"]
    n = E.shape[1]
    d = n // n_heads
    n_blocks = len({k.split(".")[1] for k in W if k.startswith("blocks.")})

    # time conditioning
    j = torch.arange(128, dtype=torch.float64)
    f = torch.exp(-math.log(10000.0) * j / 128)
    ang = t.to(torch.float64)[:, None] * f[None, :]
    feat = torch.cat([torch.cos(ang), torch.sin(ang)], dim=-1)  # (B, 256), cos half first
    c = _silu(feat @ W["c_embed.mlp.0.weight"].T + W["c_embed.mlp.0.bias"])
    c = _silu(c @ W["c_embed.mlp.2.weight"].T + W["c_embed.mlp.2.bias"])  # (B, c)

    # rotary tables (independent of the stored inv_freq buffer)
    inv = 10000.0 ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    pa = torch.arange(L, dtype=torch.float64)[:, None] * inv[None, :]
    pa = torch.cat([pa, pa], dim=-1)  # (L, d)
    cos, sin = torch.cos(pa), torch.sin(pa)

    def rope(z):  # z: (B, L, H, d)
        z1, z2 = z[..., : d // 2], z[..., d // 2:]
        rot = torch.cat([-z2, z1], dim=-1)
        return z * cos[None, :, None, :] + rot * sin[None, :, None, :]

    h = E[x]  # (B, L, n)
    for i in range(n_blocks):
        p = f"blocks.{i}."
        mod = c @ W[p + "adaLN_modulation.weight"].T + W[p + "adaLN_modulation.bias"]  # (B, 6n)
        sh1, sc1, g1, sh2, sc2, g2 = [mod[:, k * n:(k + 1) * n][:, None, :] for k in range(6)]

        a = _mod(_ln(h, W[p + "norm1.weight"]), sh1, sc1)
        qkv = a @ W[p + "attn_qkv.weight"].T  # (B, L, 3n)
        qkv = qkv.reshape(B, L, 3, n_heads, d)
        q, k, v = rope(qkv[:, :, 0]), rope(qkv[:, :, 1]), qkv[:, :, 2]
        out = torch.zeros(B, L, n_heads, d, dtype=torch.float64)
        for b in range(B):
            for hh in range(n_heads):
                s = q[b, :, hh] @ k[b, :, hh].T / math.sqrt(d)  # (L, L), no causal mask
                s = s - s.max(-1, keepdim=True).values
                pr = torch.exp(s)
                pr = pr / pr.sum(-1, keepdim=True)
                out[b, :, hh] = pr @ v[b, :, hh]
        out = out.reshape(B, L, n) @ W[p + "attn_out.weight"].T
        h = h + g1 * out

        a = _mod(_ln(h, W[p + "norm2.weight"]), sh2, sc2)
        a = _gelu_tanh(a @ W[p + "mlp.0.weight"].T + W[p + "mlp.0.bias"])
        a = a @ W[p + "mlp.2.weight"].T + W[p + "mlp.2.bias"]
        h = h + g2 * a

    mod = c @ W["adaLN_modulation.weight"].T + W["adaLN_modulation.bias"]
    shift, scale = mod[:, None, :n], mod[:, None, n:]
    h = _mod(_ln(h, W["norm_final.weight"]), shift, scale)
    return h @ E.T


def randomise_(module, gen, scale=0.3):
    """Random values for every parameter, the zero-initialised adaLN ones included."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=gen))
            elif p.dim() == 1:
                p.copy_(scale * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p.shape[1]))
    return module


def make_model(seed=0, **over):
    args = dict(ARGS, **over)
    torch.manual_seed(seed)
    m = D3PMAbsorbing(**args)
    randomise_(m, torch.Generator().manual_seed(1000 + seed))
    return m


def inputs(args, B=3, L=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    K = args["vocab_size"] + 1
    x = torch.randint(0, K, (B, L), generator=g)  # mask tokens included in the input
    x[0, :3] = K - 1
    t = torch.tensor([1.0, float(args["T"]), 7.0])[:B]
    return x, t


def assert_logits_close(got, ref):
    assert got.dtype == torch.float32
    assert got.shape == ref.shape
    scale = ref.abs().max().item()
    err = (got.double() - ref).abs().max().item()
    assert err <= 2e-5 * max(1.0, scale), f"max |diff| {err:.3e} (logit scale {scale:.2f})"


@pytest.mark.parametrize("over", [{}, dict(n_heads=4, n_blocks=1), dict(n_embed=12, n_heads=3, n_cond=5)])
def test_network_matches_functional_oracle(over):
    m = make_model(seed=len(over), **over).eval()
    args = dict(ARGS, **over)
    x, t = inputs(args, seed=len(over))
    with torch.no_grad():
        got = m.net(x, t)
    ref = oracle_net(m.state_dict(), x, t, args["n_heads"])
    assert_logits_close(got, ref)
    # the blocks, time and positions really matter here (the oracle is not trivially satisfied)
    sd0 = {k: (torch.zeros_like(v) if "blocks" in k and "adaLN" in k else v) for k, v in m.state_dict().items()}
    ref0 = oracle_net(sd0, x, t, args["n_heads"])
    assert (ref - ref0).abs().max() > 1e-2
    ref_t = oracle_net(m.state_dict(), x, t + 3, args["n_heads"])
    assert (ref - ref_t).abs().max() > 1e-2


def test_network_position_sensitivity_and_noncausality():
    """Rotary makes the output depend on positions; attention is non-causal (later tokens matter)."""
    m = make_model(seed=5).eval()
    x, t = inputs(ARGS, seed=5)
    with torch.no_grad():
        base = m.net(x, t)
        x2 = x.clone()
        x2[:, -1] = (x2[:, -1] + 1) % (ARGS["vocab_size"] + 1)
        changed = m.net(x2, t)
    # changing the last token changes the first position's logits (non-causal)
    assert (base[:, 0] - changed[:, 0]).abs().max() > 1e-4
    ref2 = oracle_net(m.state_dict(), x2, t, ARGS["n_heads"])
    assert_logits_close(changed, ref2)


def test_dropout_train_vs_eval():
    m = make_model(seed=2, dropout=0.3)
    x, t = inputs(ARGS, seed=2)
    with torch.no_grad():
        m.train()
        a, b = m.net(x, t), m.net(x, t)
        assert not torch.allclose(a, b), "dropout > 0 in train mode must make calls differ"
        m.eval()
        c, d = m.net(x, t), m.net(x, t)
        assert torch.equal(c, d)
        assert_logits_close(c, oracle_net(m.state_dict(), x, t, ARGS["n_heads"]))
    m0 = make_model(seed=2, dropout=0.0).train()
    with torch.no_grad():
        assert torch.equal(m0.net(x, t), m0.net(x, t))


def _zero_gate_(m, which):
    """Zero the gate_msa (chunk 2) or gate_mlp (chunk 5) rows of every block's adaLN."""
    n = ARGS["n_embed"]
    k = {"msa": 2, "mlp": 5}[which]
    with torch.no_grad():
        for blk in m.net.blocks:
            blk.adaLN_modulation.weight[k * n:(k + 1) * n] = 0
            blk.adaLN_modulation.bias[k * n:(k + 1) * n] = 0


@pytest.mark.parametrize("closed", [("msa",), ("mlp",), ("msa", "mlp")])
def test_dropout_sits_on_each_residual_branch(closed):
    """Spec: dropout after attn_out and after the MLP's second Linear, nowhere else.

    With one branch gated off, the other branch alone must still make train-mode calls differ;
    with both gated off the network is deterministic even in train mode.
    """
    m = make_model(seed=6, dropout=0.3)
    for w in closed:
        _zero_gate_(m, w)
    x, t = inputs(ARGS, seed=6)
    with torch.no_grad():
        m.eval()
        assert_logits_close(m.net(x, t), oracle_net(m.state_dict(), x, t, ARGS["n_heads"]))
        m.train()
        a, b = m.net(x, t), m.net(x, t)
    if len(closed) == 2:
        assert torch.equal(a, b), "dropout outside the two residual branches"
    else:
        assert not torch.allclose(a, b), f"no dropout on the branch left open (closed: {closed})"


# ------------------------------------------------------------------------------------------
# Checkpoints, assembled from spec section 1
# ------------------------------------------------------------------------------------------
def build_checkpoint(args, raw_sd, ema_sd, optimizer):
    ema = {"initted": torch.tensor(True), "step": torch.tensor(1234)}
    for k, v in ema_sd.items():
        ema["ema_model." + k] = v.clone()
    return {
        "model": {k: v.clone() for k, v in raw_sd.items()},
        "ema": ema,
        "optimizer": optimizer,
        "model_cls": "D3PMAbsorbing",
        "model_args": dict(args),
        "training_args": {"dataset": "text8", "batch_size": 4, "learning_rate": 3e-4, "compile": False},
        "total_batch_size": 2048,
        "iter_num": 50,
        "best_val_loss": 1.234,
    }


@pytest.fixture
def ckpt_setup(tmp_path):
    raw = make_model(seed=10)
    ema = make_model(seed=11)
    opt = torch.optim.AdamW(raw.parameters(), lr=1e-3)
    x0 = torch.randint(0, ARGS["vocab_size"], (2, 6))
    _, loss, _ = raw(x0)
    loss.backward()
    opt.step()
    ck = build_checkpoint(ARGS, raw.state_dict(), ema.state_dict(), opt.state_dict())
    path = tmp_path / "ckpt.pt"
    torch.save(ck, path)
    # the file is loadable the way the published checkpoints are
    torch.load(path, map_location="cpu", weights_only=True)
    return path, ck


def test_load_checkpoint_ema_and_raw(ckpt_setup):
    path, ck = ckpt_setup
    raw_sd = ck["model"]
    ema_sd = {k[len("ema_model."):]: v for k, v in ck["ema"].items() if k.startswith("ema_model.")}
    x, t = inputs(ARGS, seed=3)
    ref_raw = oracle_net(raw_sd, x, t, ARGS["n_heads"])
    ref_ema = oracle_net(ema_sd, x, t, ARGS["n_heads"])
    assert (ref_raw - ref_ema).abs().max() > 1e-2  # the two weight sets are distinguishable

    m = families.load_checkpoint(str(path))
    assert isinstance(m, D3PMAbsorbing)
    assert not m.training, "loaded model must be in eval mode"
    with torch.no_grad():
        got = m.net(x, t)
    assert_logits_close(got, ref_ema)  # EMA weights by default
    for k, v in ema_sd.items():
        assert torch.equal(m.state_dict()[k], v), k

    m_raw = families.load_checkpoint(str(path), ema=False)
    assert not m_raw.training
    with torch.no_grad():
        got_raw = m_raw.net(x, t)
    assert_logits_close(got_raw, ref_raw)
    for k, v in raw_sd.items():
        assert torch.equal(m_raw.state_dict()[k], v), k


def test_load_checkpoint_with_empty_optimizer(tmp_path):
    raw, ema = make_model(seed=20), make_model(seed=21)
    ck = build_checkpoint(ARGS, raw.state_dict(), ema.state_dict(), {})
    path = tmp_path / "ck.pt"
    torch.save(ck, path)
    m = families.load_checkpoint(path)  # pathlib path is fine too
    x, t = inputs(ARGS, seed=4)
    with torch.no_grad():
        assert_logits_close(m.net(x, t), oracle_net(ema.state_dict(), x, t, ARGS["n_heads"]))


def _assert_value_error(path, *must_contain):
    with pytest.raises(ValueError) as ei:
        families.load_checkpoint(str(path))
    msg = str(ei.value)
    assert msg.strip(), "empty error message"
    assert "\n" not in msg.strip(), f"message must be a single line: {msg!r}"
    for s in must_contain:
        assert s.lower() in msg.lower(), (s, msg)
    return msg


def test_load_checkpoint_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        families.load_checkpoint(str(tmp_path / "nope.pt"))


def test_load_checkpoint_random_bytes(tmp_path):
    p = tmp_path / "garbage.pt"
    p.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    _assert_value_error(p, "garbage.pt")


def test_load_checkpoint_truncated(ckpt_setup, tmp_path):
    path, _ = ckpt_setup
    data = path.read_bytes()
    for frac in (0.5, 0.95):
        p = tmp_path / f"trunc{int(frac * 100)}.pt"
        p.write_bytes(data[: int(len(data) * frac)])
        _assert_value_error(p, p.name)


def test_load_checkpoint_dict_without_keys(tmp_path):
    p = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(3), "step": 5}, p)
    _assert_value_error(p, "model")
    p2 = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), p2)
    _assert_value_error(p2)


def test_load_checkpoint_unknown_model_cls(ckpt_setup, tmp_path):
    _, ck = ckpt_setup
    ck = dict(ck, model_cls="SEDDAbsorbingXYZ")
    p = tmp_path / "unk.pt"
    torch.save(ck, p)
    _assert_value_error(p, "SEDDAbsorbingXYZ")


def test_training_forward_compiles_as_one_graph():
    """torch.compile friendliness (checked on CPU with dynamo's tracer; CUDA compiles the same graph):
    the whole training forward, block loop and loss included, is one graph with no breaks."""
    import torch._dynamo
    torch._dynamo.reset()
    m = D3PMAbsorbing(27, 32, 2, 2, 16, 0.1, 50, 0.05)
    explanation = torch._dynamo.explain(m)(torch.randint(27, (4, 16)))
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1
    torch._dynamo.reset()


@pytest.mark.parametrize("soft", [False, True])
def test_hidden_states_enter_the_blocks_in_float32_under_autocast(soft):
    """Under bf16 autocast (CPU here; DiT.forward's own autocast is CUDA's), ids and a soft input (probs @ embedding,
    duo.py's curriculum) both give float32 hidden states entering the first block: the soft embedding's matmul runs
    in float32, as Duo's code does, so the curriculum does not train with a bf16 residual stream. The value is the
    float64 probs @ embedding to float32 rounding."""
    net = make_model().net
    x, t = inputs(ARGS)
    if soft:
        g = torch.Generator().manual_seed(1)
        x = torch.softmax(3 * torch.randn(*x.shape, ARGS["vocab_size"] + 1, generator=g), -1)
    seen = []
    hook = net.blocks[0].register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    try:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            net(x, t)
    finally:
        hook.remove()
    assert seen[0].dtype == torch.float32
    E = net.vocab_embed.weight.double()
    want = x.double() @ E if soft else E[x]
    assert torch.allclose(seen[0].double(), want, rtol=1e-6, atol=1e-6)
