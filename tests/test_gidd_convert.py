"""
Loading GIDD's published checkpoints (dvruette/gidd-{small,base}-p_unif-{0.0,0.1,0.2}: their Hugging Face DIT,
gidd/models/modeling_dit.py, and its DITConfig) through common.open_model(DIRECTORY), as tests/test_convert.py does for
the other papers: a tiny checkpoint in their layout with random weights (bare keys, their rotary tables cos_cached /
sin_cached as buffers, an untied output layer with a bias over every id) against a reference forward written here
from their modeling_dit.py (float64, the rotary from THEIR tables, the time t read as is); then the one-line errors.
"""
import math

import pytest
import torch

from common import UserError, open_model
from conftest import randomize_weights
from convert import PUBLISHED
from test_convert import _gelu_tanh, _layer_norm, _rotate_half, one_line_error, write_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")

CPU = torch.device("cpu")
K, MAX_LEN, HID, HEADS, COND, NBLK = 13, 24, 32, 2, 24, 2  # their vocab_size (GPT-2 + [PAD] + [MASK]: mask last)


def their_config(**kw):
    cfg = {"architectures": ["DIT"], "auto_map": {"AutoConfig": "configuration_dit.DITConfig",
                                                  "AutoModelForMaskedLM": "modeling_dit.DIT"},
           "model_type": "dit", "vocab_size": K, "max_seq_len": MAX_LEN, "hidden_size": HID, "timestep_cond_dim": COND,
           "num_hidden_layers": NBLK, "num_attention_heads": HEADS, "attention_dropout": 0.0, "p_uniform": 0.1,
           "t_eps": 1e-4, "torch_dtype": "float32", "transformers_version": "4.49.0"}
    cfg.update(kw)
    return cfg


def rotary_tables(head_dim, length):
    """Their Rotary buffers: (1, length, 3, 1, head_dim) cos / sin of pos * 10000^(-2i/d), duplicated over the halves;
    the v slot (index 2) the identity (cos 1, sin 0)."""
    inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    freqs = torch.outer(torch.arange(length).float(), inv_freq)
    emb = torch.cat([freqs, freqs], -1)
    cos, sin = emb.cos()[None, :, None, None, :].repeat(1, 1, 3, 1, 1), emb.sin()[None, :, None, None, :].repeat(1, 1, 3, 1, 1)
    cos[:, :, 2], sin[:, :, 2] = 1.0, 0.0
    return cos, sin


def their_state(seed=0, tables=True):
    """A random state dict with the keys of their DIT (from a model of ours with random weights, renamed)."""
    from gidd import GIDD
    ours = randomize_weights(GIDD(K - 1, HID, HEADS, NBLK, COND, 0.0, tied_output=False), seed).state_dict()
    rename = {"net.vocab_embed.weight": "vocab_embed.embedding", "net.c_embed.": "sigma_map.",
              "net.output.": "output_layer.linear.", "net.norm_final.": "output_layer.norm_final.",
              "net.adaLN_modulation.": "output_layer.adaLN_modulation.", "net.": ""}
    state = {}
    for key, value in ours.items():
        if key == "net.rotary_emb.inv_freq":
            continue
        prefix = next(p for p in rename if key.startswith(p))
        state[rename[prefix] + key[len(prefix):]] = value
    if tables:
        state["rotary_emb.cos_cached"], state["rotary_emb.sin_cached"] = rotary_tables(HID // HEADS, MAX_LEN)
    return state


def reference_logits(state, x, t, mutation=None):
    """Their DIT.forward in float64: embed, c = silu(sigma_map(t)) (t itself), blocks with the rotary of their cached
    tables over (b, s, 3, h, d), the final adaLN layer, logits over all K ids. mutation: "time_1000t" (the time read as
    1000 t), "rotary_v" (their tables' v slot rotated too)."""
    W = {k: v.double() for k, v in state.items()}
    h = W["vocab_embed.embedding"][x]
    B, S, n = h.shape
    d = n // HEADS
    t = 1000 * t.double() if mutation == "time_1000t" else t.double()
    freqs = torch.exp(-math.log(10000) * torch.arange(128, dtype=torch.float64) / 128)
    feats = torch.cat([torch.cos(t[:, None] * freqs), torch.sin(t[:, None] * freqs)], -1)
    c = torch.nn.functional.silu(feats @ W["sigma_map.mlp.0.weight"].T + W["sigma_map.mlp.0.bias"])
    c = torch.nn.functional.silu(c @ W["sigma_map.mlp.2.weight"].T + W["sigma_map.mlp.2.bias"])
    cos, sin = rotary_tables(d, S) if "rotary_emb.cos_cached" not in W else (W["rotary_emb.cos_cached"][:, :S],
                                                                                W["rotary_emb.sin_cached"][:, :S])
    cos, sin = cos.double(), sin.double()
    if mutation == "rotary_v":
        cos, sin = cos[:, :, :1].expand_as(cos), sin[:, :, :1].expand_as(sin)
    for i in range(NBLK):
        b = f"blocks.{i}."
        mod = c @ W[b + "adaLN_modulation.weight"].T + W[b + "adaLN_modulation.bias"]
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod[:, None, :].chunk(6, -1)
        a = _layer_norm(h, W[b + "norm1.weight"]) * (1 + scale_msa) + shift_msa
        qkv = (a @ W[b + "attn_qkv.weight"].T).view(B, S, 3, HEADS, d)
        qkv = qkv * cos + _rotate_half(qkv) * sin
        q, k, v = (qkv[:, :, j].transpose(1, 2) for j in range(3))
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), -1)
        h = h + gate_msa * ((att @ v).transpose(1, 2).reshape(B, S, n) @ W[b + "attn_out.weight"].T)
        a = _layer_norm(h, W[b + "norm2.weight"]) * (1 + scale_mlp) + shift_mlp
        h = h + gate_mlp * (_gelu_tanh(a @ W[b + "mlp.0.weight"].T + W[b + "mlp.0.bias"]) @ W[b + "mlp.2.weight"].T
                            + W[b + "mlp.2.bias"])
    shift, scale = (c @ W["output_layer.adaLN_modulation.weight"].T
                    + W["output_layer.adaLN_modulation.bias"])[:, None, :].chunk(2, -1)
    h = _layer_norm(h, W["output_layer.norm_final.weight"]) * (1 + scale) + shift
    return h @ W["output_layer.linear.weight"].T + W["output_layer.linear.bias"]


def test_every_published_gidd_id_is_known():
    ids = [f"dvruette/gidd-{size}-p_unif-{p}" for size in ("small", "base") for p in ("0.0", "0.1", "0.2")]
    assert all(PUBLISHED.get(i) == "GIDD" for i in ids)


@pytest.mark.parametrize("fmt,tables", [("safetensors", True), ("bin", False)])
def test_gidd_logits_match_their_dit(tmp_path, fmt, tables):
    """vocab_size = K - 1 ([PAD] a token never in the data), mask id K - 1; p_uniform, t_eps and the length from
    config.json; logits(z_t, t) = their DIT(z_t, t) at every id but the mask's, at t in their range."""
    state = their_state(seed=1, tables=tables)
    model = open_model(write_checkpoint(tmp_path / "gidd", their_config(p_uniform=0.2, t_eps=1e-3), state, fmt),
                       ema=True, dev=CPU)
    assert type(model).__name__ == "GIDD" and not model.training
    assert model.vocab_size == K - 1 and model.mask_id == K - 1 and model.p_uniform == 0.2 and model.t_eps == 1e-3
    assert model.checkpoint_meta["training_args"]["seq_len"] == MAX_LEN
    g = torch.Generator().manual_seed(2)
    x = torch.randint(0, K, (3, 16), generator=g)
    t = torch.tensor([0.001, 0.4, 0.999], dtype=torch.float64)
    with torch.no_grad():
        ours = model.logits(x, t)
        ref = reference_logits(state, x, t)
        assert ours.shape == (3, 16, K)
        assert torch.allclose(ours.double(), ref, atol=2e-5, rtol=1e-5), (ours.double() - ref).abs().max()
        for mutation in ("time_1000t", "rotary_v"):
            assert (ours.double() - reference_logits(state, x, t, mutation)).abs().max() > 1e-2, mutation
        samples, calls = model.sample(torch.full((2, 8), K - 1), steps=3, generator=g)
        assert calls == 3 and (samples < K - 1).all()


def test_gidd_conversion_errors_are_one_line(tmp_path):
    state = their_state(seed=3)
    bad_tables = dict(state, **{"rotary_emb.cos_cached": state["rotary_emb.cos_cached"] * 0.5})
    cases = [
        (their_config(), {k: v for k, v in state.items() if k != "blocks.1.mlp.0.bias"}, ("missing", "blocks.1.mlp.0.bias")),
        (their_config(), dict(state, **{"blocks.0.extra": torch.zeros(2)}), ("unexpected", "blocks.0.extra")),
        (their_config(vocab_size=K + 1), state, ("vocab_embed.embedding", "shape")),
        (their_config(), bad_tables, ("rotary_emb.cos_cached", "rotary")),
        ({k: v for k, v in their_config().items() if k != "timestep_cond_dim"}, state, ("timestep_cond_dim",)),
        (their_config(p_uniform=1.5), state, ("p_uniform",)),
    ]
    for i, (config, st, words) in enumerate(cases):
        with pytest.raises(UserError) as e:
            open_model(write_checkpoint(tmp_path / f"bad{i}", config, st), ema=True, dev=CPU)
        one_line_error(e, *words)
