"""Classifier-free guidance: train.py --cond_drop (each row's prompt dropped: the network reads the family's no-prompt
input there, sampling.null_prompt_input) and sample.py / evaluate.py --guidance (sampling.guided: two network passes
per call, mixed as out_c + w (out_c - out_u): for logits, log p(x|c) + w (log p(x|c) - log p(x)) up to a constant),
checked with fake networks and tiny runs."""
import contextlib
import io
import json
import os

import numpy as np
import pytest
import torch

import configs
import train
from common import UserError
from conftest import REPO_ROOT, assert_one_line_error, call_main, run_script
from sampling import answer_prompts, guided, null_prompt, null_prompt_input

pytestmark = pytest.mark.usefixtures("one_thread")

FAMILIES = ["d3pm_tiny", "mdlm_tiny", "ar_tiny", "bd3lm_tiny", "genmd4_tiny", "duo_tiny"]


def tiny(config, seed=0):
    cls, args, _ = getattr(configs, config)()
    torch.manual_seed(seed)
    return cls(**args).eval()


def recording(model):
    """model.net's forward, recording each call's input (the instance attribute: guided/null_prompt_input wrap it)."""
    seen, forward = [], model.net.forward

    def record(x, t, *args, **kwargs):
        seen.append(x.clone())
        return forward(x, t, *args, **kwargs)
    model.net.forward = record
    return seen


@pytest.mark.parametrize("config", FAMILIES)
def test_null_prompt_per_family(config):
    """mask_id at the prompt (a DiT row for it) by default; Duo (no mask class): uniformly random tokens there."""
    model = tiny(config)
    V, L = model.vocab_size, 16
    x0 = torch.randint(0, V, (64, L), generator=torch.Generator().manual_seed(1))
    clean = torch.arange(L)[None].expand(64, L) < 5
    null = null_prompt(model, x0, clean, torch.Generator().manual_seed(2))
    assert torch.equal(null[~clean], x0[~clean])
    if config == "duo_tiny":
        assert model.net.vocab_embed.num_embeddings == V and not hasattr(type(model), "mask_embed")
        assert ((null[clean] >= 0) & (null[clean] < V)).all() and (null[clean] != x0[clean]).float().mean() > 0.8
        assert len(null[clean].unique()) > V // 2  # spread over the vocabulary
    else:
        assert model.net.vocab_embed.num_embeddings > model.mask_id and (null[clean] == model.mask_id).all()


@pytest.mark.parametrize("config", FAMILIES)
def test_dropped_rows_reach_the_network_without_prompt(config):
    """Under null_prompt_input the network's input differs from the plain one exactly where it holds a prompt position
    of a dropped row (the autoregressive input shifted by its start token, block diffusion's [x_t, x_0] twice), with
    the null input there; the family's loss stays finite (the prompt never noised, never scored)."""
    model = tiny(config)
    V, L, B = model.vocab_size, 16, 8
    x0 = torch.randint(0, V, (B, L), generator=torch.Generator().manual_seed(1))
    clean = torch.arange(L)[None].expand(B, L) < 5
    dropped = clean & (torch.arange(B) < 3)[:, None]
    seen = recording(model)
    torch.manual_seed(5)
    plain_loss = model(x0, clean=clean)[1]
    torch.manual_seed(5)
    with null_prompt_input(model, dropped):
        loss = model(x0, clean=clean)[1]
    assert torch.isfinite(loss) and torch.isfinite(plain_loss)
    plain, nulled = seen
    assert plain.shape == nulled.shape
    if nulled.is_floating_point():
        plain, nulled = plain.argmax(-1), nulled.argmax(-1)
    rows = torch.arange(nulled.shape[0]) % B
    j = torch.arange(nulled.shape[1])
    row_pos = j - 1 if config == "ar_tiny" else j % L
    expected = (rows < 3)[:, None] & ((row_pos >= 0) & (row_pos < 5))[None]
    changed = plain != nulled
    assert not changed[~expected].any()
    if config == "duo_tiny":
        assert changed[expected].float().mean() > 0.8
    else:
        assert (nulled[expected] == model.mask_id).all()
        assert changed[expected & (plain != model.mask_id)].all()
    assert "forward" in model.net.__dict__ and model.net.forward.__name__ == "record"  # restored to the one before


def test_drop_share_and_determinism(monkeypatch):
    """train.drop_prompts drops each row w.p. cond_drop, drawn from the batch generator: the same seed, the same rows;
    a text batch (no clean) and cond_drop = 0 drop nothing."""
    masks = []
    monkeypatch.setattr(train, "null_prompt_input", lambda model, clean: masks.append(clean) or contextlib.nullcontext())
    monkeypatch.setattr(train, "cond_drop", 0.25)
    B, L = 4000, 6
    clean = (torch.arange(L) < 2)[None].expand(B, L)
    for seed in (7, 7, 8):
        with train.drop_prompts(None, {"clean": clean}, torch.Generator().manual_seed(seed)):
            pass
    a, b, c = masks
    assert torch.equal(a, b) and not torch.equal(a, c)
    rows = a.any(1)
    assert torch.equal(a, clean & rows[:, None])
    share = rows.float().mean().item()
    assert abs(share - 0.25) < 4 * (0.25 * 0.75 / B) ** 0.5
    assert isinstance(train.drop_prompts(None, {}, torch.Generator()), contextlib.nullcontext)
    monkeypatch.setattr(train, "cond_drop", 0.0)
    assert isinstance(train.drop_prompts(None, {"clean": clean}, torch.Generator()), contextlib.nullcontext)
    assert len(masks) == 3


class FakeNet(torch.nn.Module):
    """Logits it is told: `cond` when position 0 of the input holds a real token, `uncond` when it holds mask_id
    (the null prompt); records its inputs."""

    def __init__(self, cond, uncond, mask_id):
        super().__init__()
        self.cond, self.uncond, self.mask_id, self.inputs = cond, uncond, mask_id, []
        self.blocks = torch.nn.ModuleList()

    def forward(self, x, t, **kwargs):
        self.inputs.append(x.clone())
        nulled = (x[:, :1] == self.mask_id)[..., None]
        return torch.where(nulled, self.uncond[:x.shape[0], :x.shape[1]], self.cond[:x.shape[0], :x.shape[1]]).clone()


def fake_model(seed=0, B=2, L=8):
    model = tiny("mdlm_tiny")
    g = torch.Generator().manual_seed(seed)
    K = model.vocab_size + 1
    model.net = FakeNet(torch.randn(B, L, K, generator=g) * 3, torch.randn(B, L, K, generator=g) * 3, model.mask_id)
    return model


def test_guided_mixes_log_probabilities_exactly():
    """One call under guided(w) is two network passes, the second with the null prompt, returning
    out_c + w (out_c - out_u), whose softmax is that of log p(x|c) + w (log p(x|c) - log p(x)); the forward is the
    network's own again after."""
    model, w = fake_model(), 1.5
    net = model.net
    x = torch.tensor([[3, 4, 5, 27, 27, 27, 27, 27], [6, 7, 8, 27, 27, 27, 27, 27]])
    clean = torch.zeros(2, 8, dtype=torch.bool)
    clean[:, :3] = True
    with guided(model, w, clean) as passes:
        out = net(x, torch.zeros(2))
    assert passes == 2 and "forward" not in net.__dict__
    cond_in, uncond_in = net.inputs
    assert torch.equal(cond_in, x)
    assert (uncond_in[:, :3] == model.mask_id).all() and torch.equal(uncond_in[:, 3:], x[:, 3:])
    assert torch.allclose(out, (1 + w) * net.cond - w * net.uncond, atol=1e-5, rtol=0)
    lc, lu = net.cond.log_softmax(-1), net.uncond.log_softmax(-1)
    assert torch.allclose(out.log_softmax(-1), ((1 + w) * lc - w * lu).log_softmax(-1), atol=1e-5, rtol=0)


@pytest.mark.parametrize("config", ["mdlm_tiny", "sedd_tiny", "gidd_tiny", "duo_tiny"])
def test_guidance_without_a_prompt_effect_changes_nothing(config):
    """A network that ignores the prompt (out_c = out_u) is guided to itself: for every w the samples are the
    unguided ones, bit for bit. (Mixing log-softmaxed outputs failed this for SEDD, whose outputs are log scores
    with a scale: its absorbing steps unmasked about V times too slowly.)"""
    model = tiny(config).eval()
    torch.manual_seed(1)
    x = torch.randint(model.vocab_size, (3, 16))
    x[:, 5:] = model.mask_id
    clean = torch.zeros(3, 16, dtype=torch.bool)
    clean[:, :5] = True
    forward = model.net.forward
    model.net.forward = lambda inp, t, *a, **k: forward(torch.where(clean, 0, inp) if inp.dim() == 2 else inp, t, *a,
                                                        **k)
    plain, calls = model.sample(x.clone(), steps=6, generator=torch.Generator().manual_seed(2))
    with guided(model, 2.0, clean) as passes:
        mixed, guided_calls = model.sample(x.clone(), steps=6, generator=torch.Generator().manual_seed(2))
    assert passes == 2 and guided_calls == calls
    assert torch.equal(plain, mixed)


def test_guided_answers_count_both_passes_and_w0_is_off():
    """answer_prompts under guide: each batch's prompt mask reaches the guide, the calls count both passes; w = 0 is
    no guidance bit for bit (one pass, the same answers and calls); the forward comes back after an exception."""
    prompts = [[3, 4, 5], [6, 7, 8], [1, 2]]

    def run(w, guide=True):
        model = fake_model()
        gen = torch.Generator().manual_seed(0)
        masks = []

        def guide_fn(clean):
            masks.append(clean)
            return guided(model, w, clean)
        out = answer_prompts(lambda x: model.sample(x, steps=4, generator=gen), prompts, 8, model.mask_id, 0, 2,
                             guide=guide_fn if guide else None)
        assert "forward" not in model.net.__dict__
        return out, len(model.net.inputs), masks

    plain, plain_passes, _ = run(0, guide=False)
    off, off_passes, _ = run(0)
    assert off == plain and off_passes == plain_passes
    on, on_passes, masks = run(2.0)
    batch_calls = {len(p): c for p, (_, c) in zip(prompts, on)}
    assert sum(batch_calls.values()) == on_passes  # the calls reported are the network passes, both counted
    assert [m[0].sum().item() for m in masks] == [2, 3]  # one prompt length per batch, its positions

    model = fake_model()
    with pytest.raises(RuntimeError, match="boom"):
        with guided(model, 1.0, torch.ones(1, 8, dtype=torch.bool)):
            raise RuntimeError("boom")
    assert "forward" not in model.net.__dict__


def test_guided_refuses_a_kv_cache():
    """The autoregressive model with its KV cache would mix the two passes' keys: a ValueError naming --no_kv_cache;
    without the cache it runs, two passes per call."""
    model = tiny("ar_tiny")
    x = torch.tensor([[3, 4, 27, 27, 27, 27]])
    clean = x != model.mask_id
    with guided(model, 1.0, clean), pytest.raises(ValueError, match="--no_kv_cache"):
        model.sample(x, generator=torch.Generator().manual_seed(0))
    assert "forward" not in model.net.__dict__
    seen = recording(model)
    with guided(model, 1.0, clean):
        _, calls = model.sample(x, generator=torch.Generator().manual_seed(0), cache=False)
    assert calls == 4 and len(seen) == 2 * calls  # guided wraps the recording: two passes per call
    for cond, uncond in zip(seen[::2], seen[1::2]):  # the start token, then the prompt (nulled), then the answer so far
        assert cond[0, :3].tolist() == [27, 3, 4] and uncond[0, :3].tolist() == [27, 27, 27]
        assert torch.equal(cond[:, 3:], uncond[:, 3:])
    del model.net.forward


# ---- the scripts ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def addition(tmp_path_factory):
    """data_root/add: a tiny addition task (rows of 16)."""
    import sys
    sys.path.insert(0, str(REPO_ROOT / "data"))
    import prepare_pairs
    root = tmp_path_factory.mktemp("pairs")
    with contextlib.redirect_stdout(io.StringIO()):
        assert prepare_pairs.main(["--task", "addition", "--n_train", "100", "--n_test", "8", "--max_digits", "2",
                                   "--seed", "3", "--out", str(root / "add")]) == 0
    return str(root)


def train_pairs(root, config, out_dir, *extra):
    with contextlib.redirect_stdout(io.StringIO()):
        call_main(train, [config, "--device=cpu", f"--data_root_dir={root}", "--dataset=add", f"--out_dir={out_dir}",
                          "--max_iters=2", "--eval_interval=2", "--eval_iters=1", "--batch_size=8", *extra])
    return torch.load(os.path.join(out_dir, "last.pt"), weights_only=True)


def test_cond_drop_training_is_reproducible(addition, tmp_path, tiny_text8):
    """--cond_drop on pairs: recorded in training_args, the same seed the same weights; on text a one-line error."""
    a = train_pairs(addition, "mdlm_tiny", tmp_path / "a", "--cond_drop=0.5")
    b = train_pairs(addition, "mdlm_tiny", tmp_path / "b", "--cond_drop=0.5")
    c = train_pairs(addition, "mdlm_tiny", tmp_path / "c")
    assert a["training_args"]["cond_drop"] == 0.5 and "cond_drop" not in c["training_args"]
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert any(not torch.equal(a["model"][k], c["model"][k]) for k in a["model"])
    for bad, words in ((["--cond_drop=0.5", f"--data_root_dir={tiny_text8}"], "pair dataset"),
                       (["--cond_drop=1.5", f"--data_root_dir={addition}", "--dataset=add"], "[0, 1)")):
        with pytest.raises(UserError, match=None) as e:
            call_main(train, ["mdlm_tiny", "--device=cpu", f"--out_dir={tmp_path / 'bad'}", "--max_iters=1", *bad])
        assert words in str(e.value)


def test_guidance_on_the_command_line(addition, tmp_path):
    """sample.py --guidance: a model trained without cond_drop is refused in one line; the autoregressive model with
    its KV cache is refused in one line; with --no_kv_cache it answers, its calls twice those without guidance."""
    train_pairs(addition, "mdlm_tiny", tmp_path / "plain")
    train_pairs(addition, "ar_tiny", tmp_path / "ar", "--cond_drop=0.3")
    prompts = os.path.join(addition, "add", "test_pairs.jsonl")
    base = ["sample.py", "--prompts", prompts, "--data_dir", os.path.join(addition, "add"), "--device", "cpu",
            "--batch_size", "4", "--json"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = run_script([*base, tmp_path / "plain", "--guidance", "1"], timeout=120, env=env)  # the one-line contract
    assert_one_line_error(proc, "--cond_drop")
    import sample
    for args, words in (([tmp_path / "ar", "--guidance", "1"], "--no_kv_cache"), ([tmp_path / "ar", "--guidance", "-1"],
                                                                                  "--guidance")):
        with pytest.raises(UserError, match=words), contextlib.redirect_stdout(io.StringIO()), \
                contextlib.redirect_stderr(io.StringIO()):
            call_main(sample, [*base[1:], *args])
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        g = call_main(sample, [*base[1:], tmp_path / "ar", "--guidance", "1", "--no_kv_cache"])
        p = call_main(sample, [*base[1:], tmp_path / "ar", "--no_kv_cache"])
    assert len(g) == len(p) == 8
    assert [r["network_calls"] for r in g] == [2 * r["network_calls"] for r in p]
    import evaluate
    args = [tmp_path / "ar", "--data_dir", os.path.join(addition, "add"), "--accuracy", "--max_answers", "4",
            "--batch_size", "4", "--device", "cpu", "--json", "--no_kv_cache"]
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        on = call_main(evaluate, [*args, "--guidance", "1"])
        off = call_main(evaluate, args)
    assert on["guidance"] == 1 and off["guidance"] == 0 and on["network_calls"] == 2 * off["network_calls"]
    with pytest.raises(UserError, match="--accuracy"):
        call_main(evaluate, [tmp_path / "ar", "--data_dir", os.path.join(addition, "add"), "--guidance", "1"])
