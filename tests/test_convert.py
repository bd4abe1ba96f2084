"""
Loading the papers' published Hugging Face checkpoints (MDLM: kuleshov-group/mdlm-owt; BD3-LM:
kuleshov-group/bd3lm-owt-block_size{4,8,16}; Duo: s-sahoo/duo, s-sahoo/duo-distilled) into this repo's
families through common.open_model(DIRECTORY) (config.json + model.safetensors or pytorch_model.bin).

Each test writes a tiny checkpoint in the published layout with random weights (adaLN and output layers
included, so that a wrong chunk order or a dropped bias shows) and compares our model's logits with a
reference forward written here from the published sources (models/dit.py of MDLM and Duo,
models/hf/modeling_bd3lm.py of BD3-LM): plain float64 functions over the state dict, explicit softmax
attention, nothing from model.py. The safetensors files come from a minimal writer below (no dependency).
Nothing touches the network.
"""
import contextlib
import json
import math
import os
import pickle
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch

from common import UserError, open_model
from conftest import child_group, script_env

pytestmark = pytest.mark.usefixtures("one_thread")

CPU = torch.device("cpu")
V, L, HID, HEADS, COND, NBLK = 11, 16, 32, 2, 24, 2  # config vocab_size (mask / [PAD] included), length, sizes
ATOL, RTOL = 2e-5, 1e-5  # float32 model against the float64 reference


# ---- a minimal safetensors writer --------------------------------------------------------------------------
ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int64: "I64"}


def write_safetensors(path, tensors, metadata=None):
    """8-byte little-endian header length N, N bytes of JSON {name: {dtype, shape, data_offsets}} (padded with
    spaces to a multiple of 8), then the raw little-endian bytes; offsets count from the end of the header."""
    assert sys.byteorder == "little"
    header, blobs, offset = {}, [], 0
    for name, t in tensors.items():
        t = t.detach().contiguous().cpu()
        raw = t.reshape(-1).view(torch.uint8).numpy().tobytes()
        header[name] = {"dtype": ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    if metadata is not None:
        header["__metadata__"] = metadata
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for raw in blobs:
            f.write(raw)


# ---- tiny checkpoints in the published layout ----------------------------------------------------------------
def default_inv_freq(head_dim, base=10000.0):
    return 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))


def published_state(vocab=V, seed=0, n=HID, c=COND, n_blocks=NBLK, n_heads=HEADS, inv_freq=True, eps=None):
    """A random state dict with the published keys (float32). eps=(min, max): BD3-LM's sampling_eps buffers."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=1.0, mean=0.0):
        return (mean + scale * torch.randn(shape, generator=g, dtype=torch.float64)).float()

    p = "backbone."
    sd = {p + "vocab_embed.embedding": r(vocab, n),
          p + "sigma_map.mlp.0.weight": r(c, 256, scale=256 ** -0.5), p + "sigma_map.mlp.0.bias": r(c, scale=0.3),
          p + "sigma_map.mlp.2.weight": r(c, c, scale=c ** -0.5), p + "sigma_map.mlp.2.bias": r(c, scale=0.3)}
    if inv_freq:
        sd[p + "rotary_emb.inv_freq"] = default_inv_freq(n // n_heads)
    for i in range(n_blocks):
        b = f"{p}blocks.{i}."
        sd.update({b + "norm1.weight": r(n, scale=0.3, mean=1.0),
                   b + "attn_qkv.weight": r(3 * n, n, scale=n ** -0.5),
                   b + "attn_out.weight": r(n, n, scale=n ** -0.5),
                   b + "norm2.weight": r(n, scale=0.3, mean=1.0),
                   b + "mlp.0.weight": r(4 * n, n, scale=n ** -0.5), b + "mlp.0.bias": r(4 * n, scale=0.3),
                   b + "mlp.2.weight": r(n, 4 * n, scale=(4 * n) ** -0.5), b + "mlp.2.bias": r(n, scale=0.3),
                   b + "adaLN_modulation.weight": r(6 * n, c, scale=0.5 * c ** -0.5),
                   b + "adaLN_modulation.bias": r(6 * n, scale=0.3)})
    o = p + "output_layer."
    sd.update({o + "norm_final.weight": r(n, scale=0.3, mean=1.0),
               o + "linear.weight": r(vocab, n, scale=n ** -0.5), o + "linear.bias": r(vocab, scale=0.5),
               o + "adaLN_modulation.weight": r(2 * n, c, scale=0.5 * c ** -0.5),
               o + "adaLN_modulation.bias": r(2 * n, scale=0.3)})
    if eps is not None:
        sd["sampling_eps_min"], sd["sampling_eps_max"] = torch.tensor(eps[0]), torch.tensor(eps[1])
    return sd


def hf_extras(name):
    return {"architectures": [name], "auto_map": {"AutoConfig": f"configuration_{name.lower()}.{name}Config"},
            "return_dict": False, "torch_dtype": "float32", "transformers_version": "4.49.0"}


def mdlm_config(**kw):
    cfg = dict(hf_extras("MDLM"), model_type="mdlm", vocab_size=V, model_length=L, hidden_dim=HID, cond_dim=COND,
               n_blocks=NBLK, n_heads=HEADS, dropout=0.1, time_conditioning=False)
    cfg.update(kw)
    return cfg


def bd3lm_config(block_size, **kw):
    cfg = dict(hf_extras("BD3LM"), model_type="bd3lm", block_size=block_size, vocab_size=V, model_length=L,
               cross_attn=True, adaln=True, attn_backend="flex", causal=False, hidden_dim=HID, cond_dim=COND,
               n_blocks=NBLK, n_heads=HEADS, dropout=0.1, time_conditioning=False, var_min=True,
               sampling_eps_min=1e-3, sampling_eps_max=0.999)
    cfg.update(kw)
    return cfg


def duo_config(**kw):
    cfg = dict(hf_extras("DUO"), model_type="DUO", vocab_size=V, model_length=L, hidden_dim=HID, cond_dim=COND,
               n_blocks=NBLK, n_heads=HEADS, dropout=0.1, causal=False)
    cfg.update(kw)
    return cfg


def write_checkpoint(directory, config, state, fmt="safetensors", dtype=None):
    """directory/config.json and model.safetensors (tensors cast to dtype, if given) or pytorch_model.bin."""
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    if fmt == "safetensors":
        tensors = {k: v.to(dtype) if dtype is not None else v for k, v in state.items()}
        write_safetensors(os.path.join(directory, "model.safetensors"), tensors, {"format": "pt"})
    else:
        torch.save(state, os.path.join(directory, "pytorch_model.bin"))
    return str(directory)


# ---- the reference forward (the published DiT, written from its sources) --------------------------------------
def _layer_norm(x, weight):
    """LayerNorm over the last dim, eps 1e-5, weight and no bias."""
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + 1e-5) * weight


def _gelu_tanh(x):
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def reference_logits(state, x, sigma, n_heads=HEADS, mask=None, positions=None, mutation=None):
    """The published backbone's logits (float64). x: (B, S) ids, or (B, S, V) logits that the embedding layer
    softmaxes (Duo's soft input); sigma: (B,) its time input; mask: (S, S) bool, True = may attend;
    positions: (S,) rotary positions (default 0..S-1). mutation: a deliberate error, to show the comparison
    can fail ("final_scale_shift": shift and scale swapped in the output layer; "no_output_bias"; "block_chunks":
    the block's adaLN chunks read as (scale, shift, ...); "sigma_1000t": sigma replaced by 1000 (1 - exp(-sigma)))."""
    W = {k[len("backbone."):]: v.double() for k, v in state.items() if k.startswith("backbone.")}
    emb = W["vocab_embed.embedding"]
    h = torch.softmax(x.double(), dim=-1) @ emb if x.is_floating_point() else emb[x]
    B, S, n = h.shape
    d = n // n_heads

    sigma = sigma.double()
    if mutation == "sigma_1000t":
        sigma = 1000 * (1 - torch.exp(-sigma))
    half = 128
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float64) / half)
    args = sigma[:, None] * freqs[None, :]
    feats = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    c = torch.nn.functional.silu(feats @ W["sigma_map.mlp.0.weight"].T + W["sigma_map.mlp.0.bias"])
    c = c @ W["sigma_map.mlp.2.weight"].T + W["sigma_map.mlp.2.bias"]
    c = torch.nn.functional.silu(c)  # the DiT applies SiLU to the embedder's output

    inv_freq = W.get("rotary_emb.inv_freq", default_inv_freq(d).double())
    pos = torch.arange(S) if positions is None else positions
    angles = pos.double()[:, None] * inv_freq[None, :]
    emb_rot = torch.cat([angles, angles], dim=-1)
    cos, sin = emb_rot.cos()[None, :, None, :], emb_rot.sin()[None, :, None, :]

    n_blocks = len({k.split(".")[1] for k in W if k.startswith("blocks.")})
    for i in range(n_blocks):
        b = f"blocks.{i}."
        mod = c @ W[b + "adaLN_modulation.weight"].T + W[b + "adaLN_modulation.bias"]
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod[:, None, :].chunk(6, dim=-1)
        if mutation == "block_chunks":
            shift_msa, scale_msa = scale_msa, shift_msa
        a = _layer_norm(h, W[b + "norm1.weight"]) * (1 + scale_msa) + shift_msa
        qkv = (a @ W[b + "attn_qkv.weight"].T).view(B, S, 3, n_heads, d)  # 'b s (three h d)'
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(d)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        att = torch.softmax(scores, dim=-1)
        o = torch.einsum("bhqk,bkhd->bqhd", att, v).reshape(B, S, n)
        h = h + gate_msa * (o @ W[b + "attn_out.weight"].T)
        a = _layer_norm(h, W[b + "norm2.weight"]) * (1 + scale_mlp) + shift_mlp
        m = _gelu_tanh(a @ W[b + "mlp.0.weight"].T + W[b + "mlp.0.bias"]) @ W[b + "mlp.2.weight"].T + W[b + "mlp.2.bias"]
        h = h + gate_mlp * m

    shift, scale = (c @ W["output_layer.adaLN_modulation.weight"].T
                    + W["output_layer.adaLN_modulation.bias"])[:, None, :].chunk(2, dim=-1)
    if mutation == "final_scale_shift":
        shift, scale = scale, shift
    h = _layer_norm(h, W["output_layer.norm_final.weight"]) * (1 + scale) + shift
    logits = h @ W["output_layer.linear.weight"].T
    if mutation != "no_output_bias":
        logits = logits + W["output_layer.linear.bias"]
    return logits


def bd3lm_reference_mask(n, block_size):
    """The published training mask over [x_t, x_0] (2n positions): block diagonal within each half, a noisy block
    sees the clean blocks before it, a clean block sees the clean blocks up to itself."""
    i = torch.arange(2 * n)
    q, k = i[:, None], i[None, :]
    q_clean, k_clean = q >= n, k >= n
    bq, bk = torch.where(q_clean, q - n, q) // block_size, torch.where(k_clean, k - n, k) // block_size
    return (((bq == bk) & (q_clean == k_clean)) | ((bq > bk) & k_clean & ~q_clean)
            | ((bq >= bk) & k_clean & q_clean))


def assert_close(ours, ref, what):
    ours, ref = ours.double(), ref.double()
    err = (ours - ref).abs().max().item()
    assert torch.allclose(ours, ref, atol=ATOL, rtol=RTOL), f"{what}: max |ours - reference| = {err:.3g}"


def assert_differs(ours, ref, what):
    """The comparison can fail: a mutated reference is far from our logits."""
    err = (ours.double() - ref.double()).abs().max().item()
    assert err > 1e-2, f"{what}: the mutated reference still matches (max diff {err:.3g})"


def one_line_error(excinfo, *words):
    msg = str(excinfo.value)
    assert msg.strip() and "\n" not in msg.strip(), f"not one line: {msg!r}"
    for w in words:
        assert w in msg, f"{w!r} not in the message: {msg!r}"
    return msg


def ids_with_mask(B, S, vocab, seed, mask_share=0.3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, vocab - 1, (B, S), generator=g)
    x[torch.rand((B, S), generator=g) < mask_share] = vocab - 1  # the published mask id: the last one
    x[0, 0] = vocab - 1
    return x


# ---- 1. logits against the reference ------------------------------------------------------------------------
@pytest.mark.parametrize("fmt,inv_freq", [("safetensors", True), ("safetensors", False), ("bin", True)])
def test_mdlm_logits_match_published(tmp_path, fmt, inv_freq):
    """MDLM: vocab_size = V - 1, mask id = V - 1; net(x, 0) equals the published backbone at sigma = 0 (no time
    conditioning); logits() carries them over with the mask at -inf, at any t."""
    state = published_state(seed=1, inv_freq=inv_freq)
    model = open_model(write_checkpoint(tmp_path / "mdlm", mdlm_config(), state, fmt), ema=True, dev=CPU)
    assert type(model).__name__ == "MDLM"
    assert model.vocab_size == V - 1 and model.mask_id == V - 1
    assert not model.training and isinstance(model.checkpoint_meta, dict)
    x = ids_with_mask(3, L, V, seed=2)
    with torch.no_grad():
        ours = model.net(x, torch.zeros(3))
        assert ours.shape == (3, L, V) and ours.dtype == torch.float32
        ref = reference_logits(state, x, torch.zeros(3))
        assert_close(ours, ref, "MDLM net(x, 0)")
        logits = model.logits(x, torch.tensor([0.1, 0.5, 0.9]))
        assert torch.isneginf(logits[..., V - 1]).all()
        assert_close(logits[..., :V - 1], ref[..., :V - 1], "MDLM logits(x, t)")
        for mutation in ("final_scale_shift", "no_output_bias", "block_chunks"):
            assert_differs(ours, reference_logits(state, x, torch.zeros(3), mutation=mutation), mutation)


@pytest.mark.parametrize("inv_freq", ["f32", "rounded"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_safetensors(tmp_path, dtype, inv_freq):
    """F16 / BF16 safetensors load (as float32 weights): logits equal the reference on the same rounded weights.
    inv_freq "f32": the buffer kept in float32 in the same file (mixed dtypes); "rounded": in the file's half
    dtype, as a model cast to half and saved whole carries it (the values agree with head_dim up to that
    rounding: it must load, and either the file's values or the exact ones may be used)."""
    state = published_state(seed=3)
    tensors = {k: v.to(dtype) for k, v in state.items()}
    if inv_freq == "f32":  # last, after the 11-element half bias: its offset is not a multiple of 4
        del tensors["backbone.rotary_emb.inv_freq"]
        tensors["backbone.rotary_emb.inv_freq"] = state["backbone.rotary_emb.inv_freq"]
    d = tmp_path / "half"
    write_checkpoint(d, mdlm_config(), {})
    write_safetensors(d / "model.safetensors", tensors, {"format": "pt"})
    model = open_model(str(d), ema=True, dev=CPU)
    rounded = {k: v.float() for k, v in tensors.items()}
    exact_rotary = {**rounded, "backbone.rotary_emb.inv_freq": state["backbone.rotary_emb.inv_freq"]}
    x = ids_with_mask(2, L, V, seed=4)
    with torch.no_grad():
        ours = model.net(x, torch.zeros(2))
    assert ours.dtype == torch.float32
    if inv_freq == "f32":
        assert_close(ours, reference_logits(rounded, x, torch.zeros(2)), f"MDLM from {dtype}")
    else:
        ref_file, ref_exact = reference_logits(rounded, x, torch.zeros(2)), reference_logits(exact_rotary, x, torch.zeros(2))
        errs = [(ours.double() - r).abs().max().item() for r in (ref_file, ref_exact)]
        assert min(errs) < ATOL * 10, f"MDLM from {dtype}, {dtype} inv_freq: max diff {errs} (file's, exact values)"


def open_bd3lm(tmp_path, block_size, eps=(0.3, 0.8), fmt="safetensors"):
    state = published_state(seed=10 + block_size, eps=eps)
    model = open_model(write_checkpoint(tmp_path / f"bd3lm{block_size}", bd3lm_config(block_size), state, fmt),
                       ema=True, dev=CPU)
    return model, state


@pytest.mark.parametrize("block_size", [4, 8])
def test_bd3lm_training_logits_match_published(tmp_path, block_size):
    """BD3-LM: block_size, vocab as MDLM, the sampling_eps buffers (not the config's defaults) as t_min / t_max;
    the training pass over [x_t, x_0] equals the published training forward (2L tokens, both halves at rotary
    positions 0..L-1, its block mask), first L positions."""
    model, state = open_bd3lm(tmp_path, block_size)
    assert type(model).__name__ == "BD3LM" and not model.training
    assert model.block_size == block_size and model.vocab_size == V - 1 and model.mask_id == V - 1
    assert model.t_min == pytest.approx(0.3, rel=1e-6) and model.t_max == pytest.approx(0.8, rel=1e-6)
    x_t = ids_with_mask(3, L, V, seed=5, mask_share=0.5)
    g = torch.Generator().manual_seed(6)
    x0 = torch.randint(0, V - 1, (3, L), generator=g)
    mask = bd3lm_reference_mask(L, block_size)
    positions = torch.arange(L).repeat(2)
    with torch.no_grad():
        ours = model.train_logits(x_t, x0)
        ref = reference_logits(state, torch.cat([x_t, x0], dim=1), torch.zeros(3), mask=mask, positions=positions)[:, :L]
        assert ours.shape == (3, L, V)
        assert torch.isneginf(ours[..., V - 1]).all()
        assert_close(ours[..., :V - 1], ref[..., :V - 1], f"BD3-LM (block {block_size}) training pass")
        # the clean half matters: another x_0 changes the noisy half's logits (except in the first block)
        other = reference_logits(state, torch.cat([x_t, (x0 + 1) % (V - 1)], dim=1), torch.zeros(3), mask=mask,
                                 positions=positions)[:, :L]
        assert_differs(ours[:, block_size:, :V - 1], other[:, block_size:, :V - 1], "another x_0")
        assert_differs(ours[..., :V - 1], reference_logits(state, torch.cat([x_t, x0], dim=1), torch.zeros(3),
                                                           mask=mask, positions=positions,
                                                           mutation="final_scale_shift")[:, :L, :V - 1],
                       "final_scale_shift")


@pytest.mark.parametrize("cache", [False, True])
@pytest.mark.parametrize("block_size", [4, 8])
def test_bd3lm_sampling_logits_match_published(tmp_path, block_size, cache):
    """BD3-LM sampling: for each block our sampler denoises, the logits it computes (with and without the KV cache)
    equal the published sampling-mode forward on the clean blocks before it followed by the noisy block
    (rotary positions 0..S-1, the clean-clean part of the published mask restricted to those positions)."""
    model, state = open_bd3lm(tmp_path, block_size)
    check_bd3lm_sampling(model, state, block_size, cache)


def check_bd3lm_sampling(model, state, block_size, cache):
    B = 2
    g = torch.Generator().manual_seed(7)
    full = torch.randint(0, V - 1, (B, L), generator=g)  # what each block is filled with
    x = full.clone()
    later = torch.rand((B, L), generator=g) < 0.6
    later[:, :block_size] = False  # the first block is a given prompt
    later[:, block_size] = True  # every later block has something to generate
    later[:, -1] = True
    x[later] = V - 1
    records = []

    def fake_denoise(logits_fn, block, steps=None, generator=None, callback=None, cache=True, sampler="ancestral",
                     whole_batch=False, **opts):
        start = block_size * (1 + len(records))
        with torch.no_grad():
            logits = logits_fn(block, torch.full((B,), 0.5, dtype=torch.float64))
        records.append((start, block.clone(), logits))
        return full[:, start:start + block.shape[1]].clone(), 1

    model.denoise = fake_denoise  # the instance attribute: records what the sampler's network calls give
    out, _ = model.sample(x, cache=cache, window=L)
    assert torch.equal(out, full)
    assert [r[0] for r in records] == list(range(block_size, L, block_size))
    full_mask = bd3lm_reference_mask(L, block_size)
    for start, block, logits in records:
        seq = torch.cat([full[:, :start], block], dim=1)
        S = seq.shape[1]
        ref = reference_logits(state, seq, torch.zeros(B), mask=full_mask[L:L + S, L:L + S])[:, start:]
        assert torch.isneginf(logits[..., V - 1]).all()
        assert_close(logits[..., :V - 1], ref[..., :V - 1], f"BD3-LM sampling block at {start} (cache={cache})")


@pytest.mark.parametrize("model_type", ["DUO", "duo"])
def test_duo_logits_match_published(tmp_path, model_type):
    """Duo: vocab_size = V (every id a state); logits(z_t, t) equals the published backbone at
    sigma = -log(1 - t) (alpha clamped at 1e-3: t = 1 reads -log 1e-3); the soft input: ours(probs) equals the
    published embedding layer's ref(log probs), which softmaxes its 3-dim input."""
    state = published_state(seed=20)
    model = open_model(write_checkpoint(tmp_path / "duo", duo_config(model_type=model_type), state), ema=True, dev=CPU)
    assert type(model).__name__ == "Duo" and not model.training
    assert model.vocab_size == V
    g = torch.Generator().manual_seed(21)
    z = torch.randint(0, V, (4, L), generator=g)
    t = torch.tensor([0.0, 0.25, 0.6, 0.99])
    sigma = -torch.log1p(-t.double())
    with torch.no_grad():
        ours = model.logits(z, t)
        assert ours.shape == (4, L, V)
        ref = reference_logits(state, z, sigma)
        assert_close(ours, ref, "Duo logits(z_t, t)")
        for mutation in ("sigma_1000t", "final_scale_shift", "no_output_bias"):
            assert_differs(ours, reference_logits(state, z, sigma, mutation=mutation), mutation)
        t1 = torch.ones(2)
        assert_close(model.logits(z[:2], t1), reference_logits(state, z[:2], torch.full((2,), -math.log(1e-3))),
                     "Duo logits at t = 1 (alpha clamped at 1e-3)")
        probs = torch.softmax(3 * torch.randn(4, L, V, generator=g), dim=-1)
        soft = model.logits(probs, t)
        assert_close(soft, reference_logits(state, probs.log(), sigma), "Duo soft input")


# ---- 2. strict loading, one-line errors ------------------------------------------------------------------------
def _drop(state, key):
    state = dict(state)
    del state[key]
    return state


STATE_FAULTS = {
    "missing": (lambda s: _drop(s, "backbone.blocks.1.mlp.2.bias"), "backbone.blocks.1.mlp.2.bias"),
    "unexpected": (lambda s: {**s, "backbone.blocks.0.attn_qkv.bias": torch.zeros(3 * HID)},
                   "backbone.blocks.0.attn_qkv.bias"),
    "missing_embedding": (lambda s: _drop(s, "backbone.vocab_embed.embedding"), "backbone.vocab_embed.embedding"),
    "missing_sigma_map": (lambda s: _drop(s, "backbone.sigma_map.mlp.0.bias"), "backbone.sigma_map.mlp.0.bias"),
    "missing_final_norm": (lambda s: _drop(s, "backbone.output_layer.norm_final.weight"),
                           "backbone.output_layer.norm_final.weight"),
    "missing_final_adaln": (lambda s: _drop(s, "backbone.output_layer.adaLN_modulation.bias"),
                            "backbone.output_layer.adaLN_modulation.bias"),
    "missing_output": (lambda s: _drop(s, "backbone.output_layer.linear.weight"), "backbone.output_layer.linear.weight"),
    "unexpected_top_level": (lambda s: {**s, "sampling_eps_min": torch.tensor(0.1)}, "sampling_eps_min"),
    # keys that are not in the published layout although their names would map onto ours (backbone. + our name):
    # an extra copy must not silently replace the published tensor, nor stand in for a missing one
    "alias_extra_output": (lambda s: {**s, "backbone.output.weight": torch.zeros(V, HID)}, "backbone.output.weight"),
    "alias_extra_embedding": (lambda s: {**s, "backbone.vocab_embed.weight": torch.zeros(V, HID)},
                              "backbone.vocab_embed.weight"),
    "alias_extra_final_norm": (lambda s: {**s, "backbone.norm_final.weight": torch.zeros(HID)},
                               "backbone.norm_final.weight"),
    "alias_instead_of_output": (lambda s: {**_drop(s, "backbone.output_layer.linear.weight"),
                                           "backbone.output.weight": s["backbone.output_layer.linear.weight"]},
                                "backbone.output"),
    "wrong_shape": (lambda s: {**s, "backbone.blocks.0.attn_out.weight": torch.zeros(HID, HID + 1)},
                    "backbone.blocks.0.attn_out.weight"),
    "wrong_output_shape": (lambda s: {**s, "backbone.output_layer.linear.bias": torch.zeros(V + 1)},
                           "backbone.output_layer.linear.bias"),
    "inv_freq_shape": (lambda s: {**s, "backbone.rotary_emb.inv_freq": default_inv_freq(HID // HEADS * 2)},
                       "inv_freq"),
}


@pytest.mark.parametrize("fault,fmt", [(f, "safetensors") for f in STATE_FAULTS]
                         + [(f, "bin") for f in ("missing", "unexpected", "wrong_shape")])
def test_bad_weights_one_line_error(tmp_path, fault, fmt):
    """A missing key, an unexpected key, a wrong shape (an inv_freq for another head_dim too): a one-line
    UserError naming the key."""
    change, key = STATE_FAULTS[fault]
    state = change(published_state(seed=30))
    with pytest.raises(UserError) as e:
        open_model(write_checkpoint(tmp_path / fault, mdlm_config(), state, fmt), ema=True, dev=CPU)
    one_line_error(e, key)


def test_bad_weights_other_families(tmp_path):
    """The same strictness for BD3-LM (a missing block key) and Duo (an unexpected key)."""
    state = _drop(published_state(seed=31, eps=(0.3, 0.8)), "backbone.blocks.0.norm2.weight")
    with pytest.raises(UserError) as e:
        open_model(write_checkpoint(tmp_path / "bd3", bd3lm_config(4), state), ema=True, dev=CPU)
    one_line_error(e, "backbone.blocks.0.norm2.weight")
    state = {**published_state(seed=32), "backbone.extra.weight": torch.zeros(3)}
    with pytest.raises(UserError) as e:
        open_model(write_checkpoint(tmp_path / "duo", duo_config(), state), ema=True, dev=CPU)
    one_line_error(e, "backbone.extra.weight")


CONFIG_FAULTS = {
    "unknown_model_type": (lambda c: {**c, "model_type": "gpt2"}, "gpt2"),
    "no_model_type": (lambda c: {k: v for k, v in c.items() if k != "model_type"}, "model_type"),
    "no_hidden_dim": (lambda c: {k: v for k, v in c.items() if k != "hidden_dim"}, "hidden_dim"),
    "time_conditioning": (lambda c: {**c, "time_conditioning": True}, "time_conditioning"),
    "heads_do_not_divide": (lambda c: {**c, "n_heads": 3}, None),
    "not_an_object": (lambda c: [c], None),
    "bd3lm_no_block_size": (lambda c: {k: v for k, v in {**c, **bd3lm_config(4)}.items() if k != "block_size"},
                            "block_size"),
}


@pytest.mark.parametrize("fault", list(CONFIG_FAULTS))
def test_bad_config_one_line_error(tmp_path, fault):
    """An unknown or missing model_type, a missing required field (hidden_dim; BD3-LM's block_size), MDLM with
    time_conditioning (our MDLM does not feed the published time input), n_heads that do not divide hidden_dim,
    a config.json that is not an object: a one-line UserError (naming what is wrong where there is a name)."""
    change, word = CONFIG_FAULTS[fault]
    with pytest.raises(UserError) as e:
        open_model(write_checkpoint(tmp_path / fault, change(mdlm_config()), published_state(seed=33)), ema=True,
                   dev=CPU)
    one_line_error(e, *([word] if word else []))


def test_no_weights_file_one_line_error(tmp_path):
    """A config.json without model.safetensors or pytorch_model.bin: one-line UserError."""
    d = tmp_path / "empty"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(mdlm_config()))
    with pytest.raises(UserError) as e:
        open_model(str(d), ema=True, dev=CPU)
    one_line_error(e)


def test_inv_freq_other_values(tmp_path):
    """An inv_freq of the right shape but other values (another rotary base) is either refused (one line) or
    used: never silently replaced by ours."""
    state = published_state(seed=34)
    state["backbone.rotary_emb.inv_freq"] = default_inv_freq(HID // HEADS, base=50.0)
    try:
        model = open_model(write_checkpoint(tmp_path / "base50", mdlm_config(), state), ema=True, dev=CPU)
    except UserError as e:
        assert "\n" not in str(e).strip() and "inv_freq" in str(e), str(e)
        return
    x = ids_with_mask(2, L, V, seed=35)
    with torch.no_grad():
        assert_close(model.net(x, torch.zeros(2)), reference_logits(state, x, torch.zeros(2)), "inv_freq base 50")


def test_garbage_safetensors_one_line_error(tmp_path):
    """A truncated safetensors file: one-line UserError."""
    d = write_checkpoint(tmp_path / "trunc", mdlm_config(), published_state(seed=36))
    path = os.path.join(d, "model.safetensors")
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[:len(data) // 2])
    with pytest.raises(UserError) as e:
        open_model(d, ema=True, dev=CPU)
    one_line_error(e)


# ---- 3. a hub id, offline and not cached ------------------------------------------------------------------------
def test_offline_hub_id_one_line_error(tmp_path, monkeypatch):
    empty = tmp_path / "hf_home"
    empty.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(empty))
    monkeypatch.setenv("HF_HUB_CACHE", str(empty / "hub"))
    monkeypatch.setenv("HUGGINGFACE_HUB_CACHE", str(empty / "hub"))
    monkeypatch.chdir(tmp_path)  # no local directory of that name
    try:  # huggingface_hub reads these when first imported: point an already imported copy at them too
        from huggingface_hub import constants
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True, raising=False)
        monkeypatch.setattr(constants, "HF_HOME", str(empty), raising=False)
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(empty / "hub"), raising=False)
    except ImportError:
        pass
    with pytest.raises(UserError) as e:
        open_model("kuleshov-group/mdlm-owt", True, CPU)
    one_line_error(e, "kuleshov-group/mdlm-owt")


# ---- 4. sample.py and evaluate.py end to end ------------------------------------------------------------------
def write_char_dataset(directory, vocab, seed):
    """train/val/test.bin (uint16 ids < vocab) and meta.pkl with a character alphabet of vocab entries."""
    os.makedirs(directory, exist_ok=True)
    rng = np.random.default_rng(seed)
    for split, n in (("train", 2000), ("val", 600), ("test", 500)):
        rng.integers(0, vocab, n).astype(np.uint16).tofile(os.path.join(directory, f"{split}.bin"))
    chars = "abcdefghijklmnopqrstuvwxyz"[:vocab]
    meta = {"vocab_size": vocab, "itos": dict(enumerate(chars)), "stoi": {ch: i for i, ch in enumerate(chars)}}
    with open(os.path.join(directory, "meta.pkl"), "wb") as f:
        pickle.dump(meta, f)
    return str(directory)


def test_sample_and_evaluate_cli(tmp_path):
    """python sample.py DIR and python evaluate.py DIR on the tiny MDLM and Duo checkpoints, and sample.py on a
    BD3-LM one (children, run side by side): exit 0, the samples are ids of the model's vocabulary, the bound is
    finite over 2 batches. Duo and BD3-LM sample without --seq_len: the length is config.json's model_length."""
    cases = {"mdlm": (mdlm_config(), V - 1), "duo": (duo_config(), V), "bd3lm": (bd3lm_config(4), V - 1)}
    cmds = {}
    for name, (cfg, vocab) in cases.items():
        state = published_state(seed=40, eps=(0.3, 0.8) if name == "bd3lm" else None)
        ckpt = write_checkpoint(tmp_path / name, cfg, state)
        data = write_char_dataset(tmp_path / f"data_{name}", vocab, seed=41)
        length = [] if name in ("duo", "bd3lm") else ["--seq_len", str(L)]
        cmds[(name, "sample")] = ["sample.py", ckpt, "--device", "cpu", "--batch_size", "2", "--steps", "4",
                                  *length, "--data_dir", data, "--json", "--seed", "3"]
        if name != "bd3lm":
            cmds[(name, "evaluate")] = ["evaluate.py", ckpt, "--device", "cpu", "--data_dir", data, "--max_batches",
                                        "2", "--batch_size", "4", "--seq_len", str(L), "--json"]
    results = {}
    with contextlib.ExitStack() as stack:
        procs = {key: stack.enter_context(child_group([sys.executable, *argv], env=script_env(),
                                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
                 for key, argv in cmds.items()}
        for key, proc in procs.items():
            try:
                out, err = proc.communicate(timeout=120)
            except subprocess.TimeoutExpired:
                pytest.fail(f"{key} timed out after 120 s")
            results[key] = (proc.returncode, out, err)
    for key, (code, out, err) in results.items():
        assert code == 0, f"{key}: exit {code}\nstdout:\n{out[-2000:]}\nstderr:\n{err[-2000:]}"
    for name, (_, vocab) in cases.items():
        s = json.loads(results[(name, "sample")][1].strip().splitlines()[-1])
        assert len(s["ids"]) == 2 and all(len(row) == L for row in s["ids"]), s
        assert all(0 <= i < vocab for row in s["ids"] for i in row), s["ids"]
        assert len(s["samples"]) == 2 and all(len(text) == L for text in s["samples"]), s["samples"]
        if name == "bd3lm":
            continue
        ev = json.loads(results[(name, "evaluate")][1].strip().splitlines()[-1])
        assert ev["batches"] == 2 and math.isfinite(ev["bpt"]) and ev["bpt"] > 0, ev
        assert ev["model"] == {"mdlm": "MDLM", "duo": "Duo"}[name], ev
