"""
SEDD's published checkpoints (louaaron/sedd-small, louaaron/sedd-medium) through convert.py: a tiny checkpoint in their
layout (config.json = their whole training config, pytorch_model.bin or model.safetensors = their SEDD module's state
dict, no "backbone." prefix) with random weights, loaded by common.open_model(DIRECTORY), gives the log score of a
reference forward written here from their model/transformer.py (float64, explicit attention, nothing from model.py or
sedd.py): embedding, c = SiLU(sigma_map(sigma)), rotary q and k, adaLN blocks, the final layer, then scale_by_sigma
(minus log(e^sigma - 1), expm1 below 0.5, minus log(K - 1)) and 0 at the current token. Their one-line errors too, and
sample.py / evaluate.py on the converted model, in process. Nothing touches the network.
"""
import contextlib
import io
import math

import pytest
import torch

import convert
import evaluate
import sample
from common import UserError, open_model
from conftest import call_main
from test_convert import published_state, write_char_dataset, write_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")

CPU = torch.device("cpu")
TOKENS, L, HID, HEADS, COND, NBLK = 10, 12, 32, 2, 24, 2


def sedd_config(graph="absorb", noise="loglinear", **model):
    """Their hydra config as SEDD.save_pretrained writes it (the parts their loader reads, and some it does not)."""
    return {"ngpus": 8, "tokens": TOKENS, "training": {"batch_size": 512, "ema": 0.9999},
            "data": {"train": "openwebtext", "valid": "wikitext103"},
            "graph": {"type": graph, "file": "data", "report_all": False},
            "noise": {"type": noise, "sigma_min": 1e-4, "sigma_max": 20},
            "sampling": {"predictor": "euler", "steps": 128, "noise_removal": True},
            "model": {"name": "small", "type": "ddit", "hidden_size": HID, "cond_dim": COND, "length": L,
                      "n_blocks": NBLK, "n_heads": HEADS, "scale_by_sigma": graph == "absorb", "dropout": 0.1, **model}}


def their_state(graph="absorb", seed=0):
    """A random state dict of their SEDD module (absorb: K = tokens + 1 rows, the mask last)."""
    K = TOKENS + (graph == "absorb")
    return {k[len("backbone."):]: v for k, v in published_state(vocab=K, seed=seed, n=HID, c=COND, n_blocks=NBLK,
                                                                 n_heads=HEADS).items()}


def reference_log_score(W, x, sigma, scale_by_sigma, mutation=None):
    """Their SEDD.forward(indices, sigma) in float64. mutation: "no_scale", "log_K" (log K instead of log(K - 1)),
    "no_zero" (the current token's entry kept)."""
    W = {k: v.double() for k, v in W.items()}

    def layer_norm(h, w):
        return torch.nn.functional.layer_norm(h, (h.shape[-1],)) * w

    def rotate(v):  # rotate_half on the last dim
        half = v.shape[-1] // 2
        return torch.cat([-v[..., half:], v[..., :half]], -1)

    h = W["vocab_embed.embedding"][x]
    B, S, n = h.shape
    d = n // HEADS
    freqs = torch.exp(-math.log(10000) * torch.arange(128, dtype=torch.float64) / 128)
    args = sigma.double()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], -1)
    c = torch.nn.functional.silu(emb @ W["sigma_map.mlp.0.weight"].T + W["sigma_map.mlp.0.bias"])
    c = torch.nn.functional.silu(c @ W["sigma_map.mlp.2.weight"].T + W["sigma_map.mlp.2.bias"])
    angles = torch.arange(S, dtype=torch.float64)[:, None] * W["rotary_emb.inv_freq"][None]
    cos, sin = torch.cat([angles, angles], -1).cos()[:, None], torch.cat([angles, angles], -1).sin()[:, None]
    for i in range(NBLK):
        b = f"blocks.{i}."
        shift1, scale1, gate1, shift2, scale2, gate2 = (c @ W[b + "adaLN_modulation.weight"].T
                                                        + W[b + "adaLN_modulation.bias"])[:, None].chunk(6, dim=2)
        qkv = (layer_norm(h, W[b + "norm1.weight"]) * (1 + scale1) + shift1) @ W[b + "attn_qkv.weight"].T
        q, k, v = qkv.view(B, S, 3, HEADS, d).unbind(2)
        q, k = q * cos + rotate(q) * sin, k * cos + rotate(k) * sin
        att = torch.softmax(torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(d), -1)
        h = h + gate1 * (torch.einsum("bhqk,bkhd->bqhd", att, v).reshape(B, S, n) @ W[b + "attn_out.weight"].T)
        m = layer_norm(h, W[b + "norm2.weight"]) * (1 + scale2) + shift2
        m = torch.nn.functional.gelu(m @ W[b + "mlp.0.weight"].T + W[b + "mlp.0.bias"], approximate="tanh")
        h = h + gate2 * (m @ W[b + "mlp.2.weight"].T + W[b + "mlp.2.bias"])
    shift, scale = (c @ W["output_layer.adaLN_modulation.weight"].T
                    + W["output_layer.adaLN_modulation.bias"])[:, None].chunk(2, dim=2)
    out = layer_norm(h, W["output_layer.norm_final.weight"]) * (1 + scale) + shift
    out = out @ W["output_layer.linear.weight"].T + W["output_layer.linear.bias"]
    if scale_by_sigma and mutation != "no_scale":
        esigm1 = torch.where(sigma < 0.5, torch.expm1(sigma), sigma.exp() - 1).double()
        out = out - esigm1.log()[:, None, None] - math.log(out.shape[-1] - (mutation != "log_K"))
    return out if mutation == "no_zero" else out.scatter(-1, x[..., None], 0.0)


@pytest.mark.parametrize("graph,fmt", [("absorb", "bin"), ("absorb", "safetensors"), ("uniform", "bin")])
def test_log_score_matches_their_forward(tmp_path, graph, fmt):
    """The converted model's log score = their SEDD.forward at sigma(t) of their log-linear noise, t from 0.05 to 1
    (both branches of their expm1 / exp - 1), absorb (tokens + mask, scaled) and uniform (tokens, unscaled); a
    reference with the scaling dropped, with log K for log(K - 1) or without the zero at the current token is far."""
    state = their_state(graph, seed=1)
    model = open_model(write_checkpoint(tmp_path / graph, sedd_config(graph), state, fmt), ema=True, dev=CPU)
    assert type(model).__name__ == "SEDD" and not model.training
    assert model.vocab_size == TOKENS and model.mask_id == TOKENS and model.absorb == (graph == "absorb")
    assert model.checkpoint_meta["training_args"]["seq_len"] == L
    K = TOKENS + (graph == "absorb")
    g = torch.Generator().manual_seed(2)
    x = torch.randint(0, K, (4, L), generator=g)
    t = torch.tensor([0.05, 0.3, 0.7, 1.0], dtype=torch.float64)
    sigma = -torch.log1p(-(1 - 1e-3) * t)
    with torch.no_grad():
        ours = model.log_score(x, t, torch.float64)
    ref = reference_log_score(state, x, sigma, graph == "absorb")
    assert torch.allclose(ours, ref, atol=5e-5, rtol=1e-5), (ours - ref).abs().max()
    for mutation in (["no_scale", "log_K", "no_zero"] if graph == "absorb" else ["no_zero"]):
        wrong = reference_log_score(state, x, sigma, graph == "absorb", mutation)
        assert (ours - wrong).abs().max() > 1e-2, mutation


def one_line(excinfo, *words):
    msg = str(excinfo.value)
    assert "\n" not in msg.strip(), msg
    for w in words:
        assert w in msg, (w, msg)


FAULTS = {
    "missing": (lambda s, c: ({k: v for k, v in s.items() if k != "blocks.1.mlp.2.bias"}, c),
                "missing tensor blocks.1.mlp.2.bias"),
    "unexpected": (lambda s, c: ({**s, "blocks.0.attn_qkv.bias": torch.zeros(3 * HID)}, c),
                   "unexpected tensor blocks.0.attn_qkv.bias"),
    "prefixed": (lambda s, c: ({"backbone." + k: v for k, v in s.items()}, c), "unexpected tensor backbone."),
    "shape": (lambda s, c: ({**s, "output_layer.linear.bias": torch.zeros(TOKENS)}, c),
              "output_layer.linear.bias has shape"),
    "graph": (lambda s, c: (s, {**c, "graph": {"type": "star"}}), "star"),
    "noise": (lambda s, c: (s, {**c, "noise": {"type": "cosine"}}), "cosine"),
    "no_hidden_size": (lambda s, c: (s, {**c, "model": {k: v for k, v in c["model"].items() if k != "hidden_size"}}),
                       "hidden_size"),
    "uniform_scaled": (lambda s, c: (s, {**c, "graph": {"type": "uniform"}}), "scale_by_sigma"),
}


@pytest.mark.parametrize("fault", list(FAULTS))
def test_one_line_errors(tmp_path, fault):
    """A missing, unexpected (a "backbone." prefix too) or misshapen tensor, named as in their file; an unknown graph or
    noise type; a missing model setting; scale_by_sigma on the uniform graph (their model asserts it away): one line."""
    change, words = FAULTS[fault]
    state, config = change(their_state(seed=3), sedd_config())
    with pytest.raises(UserError) as e:
        open_model(write_checkpoint(tmp_path / fault, config, state, "bin"), ema=True, dev=CPU)
    one_line(e, words)


def test_published_ids_and_scripts(tmp_path):
    """Both ids are known published checkpoints; sample.py (analytic and Euler) and evaluate.py (continuous and 4-step
    bounds) run on a converted directory, in process: samples of the model's tokens, finite bounds."""
    assert convert.PUBLISHED["louaaron/sedd-small"] == convert.PUBLISHED["louaaron/sedd-medium"] == "SEDD"
    assert convert.is_published("louaaron/sedd-small")
    ckpt = write_checkpoint(tmp_path / "sedd", sedd_config(), their_state(seed=4), "bin")
    data = write_char_dataset(tmp_path / "data", TOKENS, seed=5)
    with contextlib.redirect_stdout(io.StringIO()) as out, contextlib.redirect_stderr(io.StringIO()):
        for sampler in ("ancestral", "euler"):
            call_main(sample, [ckpt, "--device", "cpu", "--batch_size", "2", "--steps", "4", "--data_dir", data,
                               "--json", "--seed", "3", "--sampler", sampler])
    import json
    for line in out.getvalue().strip().splitlines()[-2:]:
        ids = json.loads(line)["ids"]
        assert len(ids) == 2 and all(len(row) == L and all(0 <= i < TOKENS for i in row) for row in ids)
    for T in ([], ["--T", "4"]):
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            res = call_main(evaluate, [ckpt, "--device", "cpu", "--data_dir", data, "--max_batches", "2",
                                       "--batch_size", "4", "--seq_len", str(L), "--json", *T])
        assert res["model"] == "SEDD" and math.isfinite(res["bpt"]) and res["bpt"] > 0, res
