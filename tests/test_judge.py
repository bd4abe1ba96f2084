"""judge.py: our GPT-2 against an independent forward from an HF-layout state dict, the judge's NLL against
brute-force chain-rule computations (one network call per prefix), the sliding windows, the unigram entropy,
in_vocab, the one-line errors offline and for non-AR checkpoints. Tiny random models; no download."""
import math
import os
import pickle
import socket
import time

import numpy as np
import pytest
import torch

from conftest import TEXT8_CHARS, randomize_weights

import judge as J  # noqa: E402
from ar import AR  # noqa: E402
from common import UserError  # noqa: E402

TINY = J.GPT2Config(n_layer=2, n_head=2, n_embd=16, n_ctx=16, vocab_size=50)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models, many small calls: one thread is several times faster on a shared machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ---- GPT-2 ------------------------------------------------------------------------------------------
def random_hf_state(cfg, seed=0):
    """A random GPT-2 state dict in the HF layout: 'transformer.' keys, Conv1D weights (in, out), the
    attention-mask buffers and a tied lm_head.weight. float32 values (compared in float64 below)."""
    g = torch.Generator().manual_seed(seed)
    n = cfg.n_embd

    def r(*shape, scale=1.0):
        return torch.randn(*shape, generator=g) * scale

    sd = {"transformer.wte.weight": r(cfg.vocab_size, n, scale=0.5),
          "transformer.wpe.weight": r(cfg.n_ctx, n, scale=0.3)}
    for i in range(cfg.n_layer):
        p = f"transformer.h.{i}."
        for ln in ("ln_1", "ln_2"):
            sd[p + ln + ".weight"], sd[p + ln + ".bias"] = 1 + r(n, scale=0.3), r(n, scale=0.3)
        for name, (fan_in, fan_out) in {"attn.c_attn": (n, 3 * n), "attn.c_proj": (n, n),
                                        "mlp.c_fc": (n, 4 * n), "mlp.c_proj": (4 * n, n)}.items():
            sd[p + name + ".weight"] = r(fan_in, fan_out, scale=fan_in ** -0.5)
            sd[p + name + ".bias"] = r(fan_out, scale=0.3)
        sd[p + "attn.bias"] = torch.tril(torch.ones(cfg.n_ctx, cfg.n_ctx)).view(1, 1, cfg.n_ctx, cfg.n_ctx)
        sd[p + "attn.masked_bias"] = torch.tensor(-1e4)
    sd["transformer.ln_f.weight"], sd["transformer.ln_f.bias"] = 1 + r(n, scale=0.3), r(n, scale=0.3)
    sd["lm_head.weight"] = sd["transformer.wte.weight"].clone()
    return sd


def reference_gpt2(sd, idx, n_head):
    """GPT-2's forward written out with plain float64 tensor ops on the HF layout (x @ W + b for Conv1D,
    an explicit lower-triangular mask, the tanh GELU formula, layer norm with eps 1e-5). idx: (L,)."""
    sd = {k: v.double() for k, v in sd.items()}
    L = len(idx)
    h = sd["transformer.wte.weight"][idx] + sd["transformer.wpe.weight"][:L]

    def ln(x, p):
        mu = x.mean(-1, keepdim=True)
        var = ((x - mu) ** 2).mean(-1, keepdim=True)
        return (x - mu) / torch.sqrt(var + 1e-5) * sd[p + ".weight"] + sd[p + ".bias"]

    def conv1d(x, p):
        return x @ sd[p + ".weight"] + sd[p + ".bias"]

    def gelu(x):
        return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))

    n = h.shape[1]
    d = n // n_head
    future = torch.triu(torch.ones(L, L, dtype=torch.bool), diagonal=1)
    for i in range(sum(k.endswith("ln_1.weight") for k in sd)):
        p = f"transformer.h.{i}."
        q, k, v = conv1d(ln(h, p + "ln_1"), p + "attn.c_attn").split(n, dim=-1)
        heads = []
        for hd in range(n_head):
            cols = slice(hd * d, (hd + 1) * d)
            att = (q[:, cols] @ k[:, cols].T / math.sqrt(d)).masked_fill(future, float("-inf"))
            heads.append(torch.softmax(att, dim=-1) @ v[:, cols])
        h = h + conv1d(torch.cat(heads, dim=-1), p + "attn.c_proj")
        h = h + conv1d(gelu(conv1d(ln(h, p + "ln_2"), p + "mlp.c_fc")), p + "mlp.c_proj")
    return ln(h, "transformer.ln_f") @ sd["transformer.wte.weight"].T


def test_gpt2_reproduces_reference_forward():
    """Catches: a Conv1D weight not transposed (c_proj is square, so only the values show it), q/k/v or
    heads split in the wrong order, the exact (erf) GELU instead of tanh, post-LN, non-causal attention,
    an untied or missing output layer, positions not added; the raw-file layout (no 'transformer.'
    prefix, no lm_head) must load the same."""
    sd = random_hf_state(TINY)
    idx = torch.tensor([[3, 41, 7, 7, 0, 49, 12, 5, 33, 2, 18, 9]])
    model = J.GPT2.from_hf_state_dict(sd, TINY).double()
    ref = reference_gpt2(sd, idx[0], TINY.n_head)
    with torch.no_grad():  # (not torch.testing.assert_close: it imports torch.distributed.tensor, seconds)
        assert (model(idx)[0] - ref).abs().max() < 1e-9 and ref.std() > 0.5
        raw = {k.removeprefix("transformer."): v for k, v in sd.items() if k != "lm_head.weight"}
        assert torch.equal(J.GPT2.from_hf_state_dict(raw, TINY).double()(idx), model(idx))
        # causal: a prefix's logits do not depend on what follows it
        assert (model(idx[:, :5])[0] - ref[:5]).abs().max() < 1e-9


def test_gpt2_judge_scores_like_reference():
    """The GPT-2 judge's NLL is the reference chain rule with <|endoftext|> first (here the tiny model's
    id 49 stands in for it). Catches a missing start token or a shift by one in the GPT-2 path."""
    sd = random_hf_state(TINY, seed=1)
    model = J.GPT2.from_hf_state_dict(sd, TINY)
    judge = J.GPT2Judge(model)
    judge.start_id = 49
    x = [3, 41, 7, 7, 0, 12, 5]
    logp = torch.log_softmax(reference_gpt2(sd, torch.tensor([49] + x[:-1]), TINY.n_head), dim=-1)
    expected = -float(sum(logp[i, t] for i, t in enumerate(x)))
    total, n = judge.nll(x)
    assert n == len(x) and total == pytest.approx(expected, rel=1e-5)


# ---- the judge's NLL --------------------------------------------------------------------------------
def tiny_ar(seed=0):
    model = AR(vocab_size=27, n_embed=32, n_heads=2, n_blocks=2, n_cond=16, dropout=0.0)
    return randomize_weights(model, seed).eval()


def brute_force_nll(model, x, context=None):
    """-sum_i log p(x_i | context_i), one network call per token. context=None: everything before x_i,
    after the start token. Else the window rule written out per token: x_i with i < C is read from
    [s, x_0..x_{i-1}]; later, x_i falls in window k = (i - C) // S + 1 (S = C // 2), which ends at
    b = min(C + k S, n) and reads the C inputs s[b - C:b], so x_i is read from s[b - C:i + 1]."""
    s = [model.mask_id] + list(x)
    total = 0.0
    with torch.no_grad():
        for i, tok in enumerate(x):
            a = 0
            if context is not None and i >= context:
                stride = context // 2
                b = min(context + ((i - context) // stride + 1) * stride, len(x))
                a = b - context
                assert i + 1 - a >= context / 2 and i + 1 - a <= context
            logp = torch.log_softmax(model.logits(torch.tensor([s[a:i + 1]]))[0, -1].double(), dim=-1)
            total -= float(logp[tok])
    return total


def test_ar_judge_nll_is_the_chain_rule():
    """Samples of different lengths scored together in one padded batch equal the per-prefix chain rule,
    and score_samples pools them. Catches: a shift by one (x_i scored from a context that holds x_i, or
    from one token too few), no start token (first token unscored or scored from padding), padding that
    leaks into scored positions, bits vs nats, a mean of per-sample perplexities instead of pooling."""
    model = tiny_ar()
    judge = J.ARJudge(model, context=64)
    rng = np.random.default_rng(0)
    samples = [rng.integers(0, 27, n).tolist() for n in (1, 5, 13, 9)]
    expected = [brute_force_nll(model, x) for x in samples]
    got = J.token_nlls(judge, samples, batch_tokens=64)  # several batches, padded rows
    for x, e, g in zip(samples, expected, got):
        assert len(g) == len(x) and g.sum() == pytest.approx(e, rel=1e-5)
    res = J.score_samples(judge, samples, batch_tokens=64)
    tokens = sum(map(len, samples))
    assert res["tokens"] == tokens and res["nll_nats"] == pytest.approx(sum(expected), rel=1e-5)
    assert res["gen_bpt"] == pytest.approx(sum(expected) / tokens / math.log(2), rel=1e-5)
    assert res["gen_ppl"] == pytest.approx(math.exp(sum(expected) / tokens), rel=1e-5)
    assert judge.nll(samples[2])[0] == pytest.approx(expected[2], rel=1e-5)


def test_windows_cover_every_token_once():
    """Catches overlapping windows scoring a token twice, a dropped tail, inputs longer than the context,
    and less than C/2 of context after the first window."""
    for C in (2, 3, 7, 8, 16):
        for n in range(0, 50):
            scored = []
            for a, b, t in J.windows(n, C):
                assert 0 <= a <= t <= b and b - a <= C
                if t > 0:
                    assert t + 1 - a >= C / 2  # the context of the window's first scored token
                scored += range(t, b)
            assert scored == list(range(n))
    assert J.windows(8, 8) == [(0, 8, 0)]


def test_windowed_nll():
    """A sample that fits gives the one-pass NLL whatever the context (C = n exactly or C large); a longer
    one equals the per-token brute force of the window rule and differs from the full-context NLL (so the
    context really is limited). Catches: the start token repeated at each window, windows that restart
    from no context, double-scored overlaps, the tail scored with a short window."""
    model = tiny_ar(1)
    rng = np.random.default_rng(1)
    x = rng.integers(0, 27, 12).tolist()
    full = brute_force_nll(model, x)
    assert J.ARJudge(model, context=12).nll(x)[0] == pytest.approx(full, rel=1e-5)
    assert J.ARJudge(model, context=500).nll(x)[0] == pytest.approx(full, rel=1e-5)
    long = rng.integers(0, 27, 29).tolist()
    long_full = brute_force_nll(model, long)
    expected = {C: brute_force_nll(model, long, context=C) for C in (8, 7)}
    for C in (8, 7):
        total, n = J.ARJudge(model, context=C).nll(long)
        assert n == len(long) and total == pytest.approx(expected[C], rel=1e-5)
        assert abs(total - long_full) > 1e-3
    # batched with other samples and short batches: the same
    many = J.token_nlls(J.ARJudge(model, context=8), [x, long, long[:3]], batch_tokens=20)
    assert many[1].sum() == pytest.approx(expected[8], rel=1e-5)


# ---- load_judge -------------------------------------------------------------------------------------
def save_ckpt(path, model, cls="AR", args=None, training_args=None):
    torch.save({"model": model.state_dict(), "model_cls": cls, "model_args": args,
                "training_args": training_args or {}, "iter_num": 0}, path)


def test_load_judge_ar_checkpoint_and_errors(tmp_path):
    """An AR run directory gives a judge with the checkpoint's seq_len as context, the mask id as start
    token and the dataset's codec (raw weights when there is no EMA); an MDLM checkpoint and a missing file
    give one-line UserErrors. Catches a judge built from a diffusion model, a default context."""
    from mdlm import MDLM
    args = dict(vocab_size=27, n_embed=32, n_heads=2, n_blocks=1, n_cond=16, dropout=0.0)
    model = randomize_weights(AR(**args), 2)
    run = tmp_path / "run"
    run.mkdir()
    save_ckpt(run / "ckpt.pt", model, "AR", args, dict(seq_len=12, dataset="text8"))
    judge = J.load_judge(str(run))
    assert isinstance(judge, J.ARJudge) and judge.context == 12 and judge.start_id == 27
    assert judge.encode("ab c") == [1, 2, 0, 3]
    x = [1, 2, 0, 3, 5]
    assert judge.nll(x)[0] == pytest.approx(brute_force_nll(model, x), rel=1e-5)
    md_args = args
    save_ckpt(tmp_path / "mdlm.pt", MDLM(**md_args), "MDLM", md_args)
    for bad in (tmp_path / "mdlm.pt", tmp_path / "nothing.pt"):
        with pytest.raises(UserError) as e:
            J.load_judge(str(bad))
        assert "\n" not in str(e.value)
    assert "MDLM" in str(pytest.raises(UserError, J.load_judge, str(tmp_path / "mdlm.pt")).value)


# ---- entropy and words ------------------------------------------------------------------------------
def test_unigram_entropy_bits():
    """Catches nats instead of bits (abab -> 0.693), pooling all samples' tokens instead of the mean over
    samples (abab + aaaa pooled -> 0.811), a per-vocabulary instead of per-sample distribution."""
    assert J.unigram_entropy_bits(["abab"]) == pytest.approx(1.0)
    assert J.unigram_entropy_bits([[7, 7, 7]]) == 0.0
    assert J.unigram_entropy_bits([[0, 1, 2, 3]]) == pytest.approx(2.0)
    assert J.unigram_entropy_bits(["abab", "aaaa"]) == pytest.approx(0.5)
    assert J.unigram_entropy_bits([torch.tensor([3, 3, 4, 4]), []]) == pytest.approx(1.0)


def write_char_corpus(data_dir, text):
    os.makedirs(data_dir, exist_ok=True)
    stoi = {c: i for i, c in enumerate(TEXT8_CHARS)}
    np.save(os.path.join(data_dir, "train.npy"), np.array([stoi[c] for c in text], dtype=np.uint16))
    with open(os.path.join(data_dir, "meta.pkl"), "wb") as f:
        pickle.dump({"vocab_size": 27, "itos": dict(enumerate(TEXT8_CHARS)), "stoi": stoi}, f)


def test_in_vocab(tmp_path, monkeypatch):
    """Train words decoded with itos, in chunks that cut words (chunk_chars=5); a sample's partial last
    word counts (and misses); the share pools all words. Catches words cut at chunk boundaries, a stale
    cache after train.npy changes, a mean over samples (here 0.625) instead of pooling (0.4)."""
    d = str(tmp_path / "corpus")
    text = " the cat sat on the mat and the dog  ran"
    write_char_corpus(d, text)
    words = J.train_words(d, chunk_chars=5)
    assert words == set(text.split())
    assert J.in_vocab(["the cat sa"], words) == pytest.approx(2 / 3)  # 'sa' is a cut word: counted, missed
    assert J.in_vocab(["the", "dog cat x y"], words) == pytest.approx(3 / 5)
    assert J.in_vocab(["the", "dogs cat x y"], words) == pytest.approx(2 / 5)
    assert os.path.exists(os.path.join(d, "train_words.txt"))
    monkeypatch.setattr(np, "load", lambda *a, **k: pytest.fail("the cache was not used"))
    assert J.train_words(d) == words
    monkeypatch.undo()
    write_char_corpus(d, "zebra crossing")
    assert J.train_words(d) == {"zebra", "crossing"}
    with pytest.raises(UserError):
        J.train_words(str(tmp_path))  # no meta.pkl / train.npy


# ---- offline ----------------------------------------------------------------------------------------
def test_load_gpt2_offline_fails_fast(tmp_path, monkeypatch):
    """HF_HUB_OFFLINE=1 and an empty cache: a one-line UserError in well under a second, without touching
    the network (any connection attempt fails the test); the same when the hub is unreachable. Catches a
    download attempt offline (which retries for long), a raw huggingface_hub traceback."""
    def no_network(*a, **k):
        raise AssertionError("network access")

    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    t0 = time.time()
    with pytest.raises(UserError) as e:
        J.load_gpt2("gpt2", cache_dir=str(tmp_path / "hub"))
    assert time.time() - t0 < 5 and "\n" not in str(e.value) and "gpt2" in str(e.value)

    def unreachable(*a, **k):
        raise OSError("no route")

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(socket, "create_connection", unreachable)
    import huggingface_hub
    calls = []
    real = huggingface_hub.hf_hub_download

    def spy(*a, **k):
        calls.append(k.get("local_files_only"))
        return real(*a, **k)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", spy)
    with pytest.raises(UserError):
        J.load_gpt2("gpt2-xl", cache_dir=str(tmp_path / "hub"))
    assert calls and all(calls)  # only the cache was asked
    with pytest.raises(UserError):
        J.load_gpt2("gpt3")


def test_load_gpt2_from_a_cached_file(tmp_path, monkeypatch):
    """load_gpt2 end to end on a file as the hub serves it (the legacy, non-zip torch format of 2019, keys
    without 'transformer.'), the hub replaced by a function returning its path: a 2-layer GPT-2 of the
    real vocabulary and context. Catches torch.load failing on the legacy format, the model left off the
    requested device/eval mode, a corrupt file surfacing as a traceback instead of a UserError."""
    cfg = J.GPT2Config(n_layer=2, n_head=2, n_embd=16)
    sd = {k.removeprefix("transformer."): v for k, v in random_hf_state(cfg, seed=3).items() if k != "lm_head.weight"}
    path = tmp_path / "pytorch_model.bin"
    torch.save(sd, path, _use_new_zipfile_serialization=False)
    import huggingface_hub
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda **k: str(path))
    monkeypatch.setattr(J, "GPT2_SIZES", {"gpt2": (2, 2, 16)})
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = J.load_gpt2("gpt2")
    assert not model.training and model.config.n_ctx == 1024 and model.config.vocab_size == 50257
    idx = torch.tensor([[50256, 464, 3290, 318]])
    with torch.no_grad():
        assert torch.equal(model(idx), J.GPT2.from_hf_state_dict(sd, cfg)(idx))
    judge = J.GPT2Judge(model)
    assert judge.start_id == 50256 and judge.context == 1024
    path.write_bytes(b"not a torch file")
    with pytest.raises(UserError):
        J.load_gpt2("gpt2")
