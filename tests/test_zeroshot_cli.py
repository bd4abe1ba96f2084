"""evaluate.py --zero_shot end to end, offline: a tiny autoregressive model (its bound, the exact NLL, is
deterministic) scored on a local WikiText-2-format file must give exactly the mean NLL that this test computes
itself over windows it builds itself; the batch weighting, the table and the one-line errors."""
import json
import math
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import evaluate
from ar import AR
from common import UserError
from conftest import call_main, randomize_weights

WORDS = "the cat sat on a mat and then there was another thin thing in her hand".split()
L = 16


@pytest.fixture
def setup(tmp_path, tiny_bpe):
    """(checkpoint path, data dir, wikitext-2 file, documents, model) for a random-weight AR on the tiny BPE."""
    data_dir = tmp_path / "mine"
    data_dir.mkdir()
    kwargs = dict(name=tiny_bpe.name, pat_str=tiny_bpe._pat_str, mergeable_ranks=tiny_bpe._mergeable_ranks,
                  special_tokens=tiny_bpe._special_tokens)
    (data_dir / "meta.pkl").write_bytes(pickle.dumps({"vocab_size": tiny_bpe.n_vocab, "tiktoken": kwargs}))
    args = dict(vocab_size=tiny_bpe.n_vocab, n_embed=32, n_heads=2, n_blocks=1, n_cond=16, dropout=0.0)
    model = randomize_weights(AR(**args), seed=3).eval()
    ckpt = tmp_path / "ar.pt"
    torch.save({"model": model.state_dict(), "model_cls": "AR", "model_args": args,
                "training_args": {"dataset": "mine", "seq_len": L}}, ckpt)
    rng = np.random.default_rng(0)
    docs = [" ".join(rng.choice(WORDS, size=rng.integers(3, 20))) for _ in range(40)]
    wiki = tmp_path / "wikitext-2-raw-v1" / "validation.jsonl"
    wiki.parent.mkdir()
    wiki.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return ckpt, data_dir, wiki, docs, model


def expected_bits(model, docs, enc, doc_eos=False, frame=True):
    """The mean NLL (bits/token) over all windows, built here: every document's tokens (+ end-of-text), one
    stream, cut into pieces of L - 2, each framed by end-of-text on both sides (frame=False: pieces of L as
    they are); the remainder dropped."""
    eot = enc.eot_token
    stream = []
    for d in docs:
        stream += enc.encode_ordinary(d) + ([eot] if doc_eos else [])
    n = L - 2 if frame else L
    pieces = [stream[i:i + n] for i in range(0, len(stream) - n + 1, n)]
    windows = torch.tensor([[eot] + p + [eot] if frame else p for p in pieces])
    start = torch.full((len(windows), 1), model.mask_id)
    with torch.no_grad():
        logits = model.logits(torch.cat([start, windows[:, :-1]], dim=1))
    nll = F.cross_entropy(logits.flatten(0, 1), windows.flatten(), reduction="mean")
    return float(nll) / math.log(2), len(windows)


@pytest.mark.parametrize("doc_eos,frame", [(False, True), (True, True), (True, False)])
def test_zero_shot_bits_equal_the_exact_nll_over_all_windows(setup, tiny_bpe, doc_eos, frame, capsys):
    ckpt, data_dir, wiki, docs, model = setup
    argv = [ckpt, "--no_ema", "--device", "cpu", "--data_dir", data_dir, "--zero_shot", "wikitext2",
            "--data_files", f"wikitext2={wiki}", "--batch_size", "4", "--json"]
    argv += ["--doc_eos"] * doc_eos + ["--no_frame"] * (not frame)
    result = call_main(evaluate, argv)
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["zero_shot"][0]
    bits, windows = expected_bits(model, docs, tiny_bpe, doc_eos, frame)
    assert row["dataset"] == "wikitext2" and row["documents"] == len(docs)
    assert row["windows"] == windows and row["tokens"] == windows * L
    assert row["bpt"] == pytest.approx(bits, abs=2e-5)
    assert row["ppl"] == pytest.approx(2 ** bits, rel=1e-4)
    lo, hi = row["ppl95"]
    assert lo < row["ppl"] < hi
    assert result["zero_shot"][0]["bpt"] == row["bpt"]


def test_the_table_and_max_batches(setup, capsys):
    ckpt, data_dir, wiki, docs, model = setup
    call_main(evaluate, [ckpt, "--no_ema", "--device", "cpu", "--data_dir", data_dir, "--zero_shot", "wikitext2",
                         "--data_files", f"wikitext2={wiki}", "--batch_size", "2", "--max_batches", "3"])
    out = capsys.readouterr().out
    line = next(ln for ln in out.splitlines() if ln.startswith("wikitext2"))
    fields = line.split()
    assert fields[1] == str(len(docs))
    windows = int(fields[2]) // L
    assert 3 * 2 <= windows <= 3 * 3  # three batches of 2 to 3 windows
    assert "95% interval" in out


def test_weighted_summary_against_brute_force():
    e, w = [1.0, 2.0, 4.0], [2, 2, 2]  # equal sizes: the plain mean and standard error
    mean, se = evaluate.weighted_summary(e, w)
    assert mean == pytest.approx(evaluate.summarize(e)[0]) and se == pytest.approx(evaluate.summarize(e)[1])
    mean, se = evaluate.weighted_summary([1.0, 3.0], [1, 3])  # a batch of 1 and a batch of 3 windows
    assert mean == pytest.approx((1 * 1 + 3 * 3) / 4)
    # sqrt(sum w^2 (e - m)^2 * k / (k - 1)) / sum w, k = 2: (1 * 1.5^2 + 9 * 0.5^2) * 2 = 9, sqrt = 3, / 4
    assert se == pytest.approx(3 / 4)
    assert evaluate.weighted_summary([2.0], [5]) == (2.0, float("inf"))


def test_one_line_errors(setup, tmp_path, tiny_text8):
    ckpt, data_dir, wiki, docs, model = setup
    base = [ckpt, "--no_ema", "--device", "cpu", "--data_dir", data_dir]
    with pytest.raises(UserError, match="unknown zero-shot dataset"):
        call_main(evaluate, base + ["--zero_shot", "wikitext4"])
    with pytest.raises(UserError, match="NAME=PATH"):
        call_main(evaluate, base + ["--zero_shot", "wikitext2", "--data_files", str(wiki)])
    with pytest.raises(UserError, match="wikitext2"):
        call_main(evaluate, base + ["--zero_shot", "wikitext2", "--data_files", f"wikitext2={tmp_path / 'none'}"])
    char_args = dict(vocab_size=27, n_embed=32, n_heads=2, n_blocks=1, n_cond=16, dropout=0.0)
    char_ckpt = tmp_path / "char.pt"
    torch.save({"model": AR(**char_args).state_dict(), "model_cls": "AR", "model_args": char_args,
                "training_args": {"dataset": "text8", "seq_len": L}}, char_ckpt)
    with pytest.raises(UserError, match="BPE"):
        call_main(evaluate, [char_ckpt, "--no_ema", "--device", "cpu", "--data_dir", f"{tiny_text8}/text8",
                             "--zero_shot", "wikitext2", "--data_files", f"wikitext2={wiki}"])


def test_samples_under_both_protocols(setup, tmp_path, capsys):
    """evaluate.py --samples --protocol: the papers' rule differs from the pooled default on samples that hold an
    end-of-text followed by more text (the mdlm rule does not score the first token and counts one EOS)."""
    ckpt, data_dir, wiki, docs, model = setup
    samples = tmp_path / "s.jsonl"
    samples.write_text("".join(json.dumps({"text": t}) + "\n" for t in
                               ["the cat sat<|endoftext|> on a mat", "then there was another thin thing"]))
    results = {}
    for protocol in ("pooled", "mdlm"):
        results[protocol] = call_main(evaluate, ["--samples", samples, "--judge", ckpt, "--no_ema", "--device", "cpu",
                                                 "--data_dir", data_dir, "--protocol", protocol])
        assert f"({protocol} rule)" in capsys.readouterr().out
        assert results[protocol]["protocol"] == protocol
    assert results["mdlm"]["tokens"] != results["pooled"]["tokens"]
    with pytest.raises(UserError, match="protocol"):
        call_main(evaluate, ["--samples", samples, "--judge", ckpt, "--no_ema", "--device", "cpu",
                             "--data_dir", data_dir, "--protocol", "bd3lm"])


def test_bench_suite_evaluates_a_published_checkpoint(setup, tmp_path, tiny_bpe):
    """bench.py --mode=suite --suite_published=DIR: a local copy of a published MDLM (test_convert's layout, on the
    tiny BPE) is scored on its zero-shot row from a local file, one JSON line, within the suite's deadline."""
    from conftest import run_script
    from test_convert import mdlm_config, published_state, write_checkpoint
    _, data_dir, wiki, _, _ = setup
    pub = write_checkpoint(tmp_path / "pub", mdlm_config(vocab_size=tiny_bpe.n_vocab + 1),
                           published_state(vocab=tiny_bpe.n_vocab + 1))
    proc = run_script(["bench.py", "--mode=suite", "--suite_configs=", f"--suite_published={pub}",
                       "--published_zero_shot=wikitext2", f"--published_data_files=wikitext2={wiki}",
                       "--published_batches=2", f"--data_dir={data_dir}", "--device=cpu", "--suite_seconds=200"],
                      timeout=240)
    assert proc.returncode == 0, proc.stderr
    records = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert records[-1]["bench"] == "suite" and records[-1]["failed"] == 0
    published = [r for r in records if r.get("bench") == "published"]
    assert len(published) == 1 and published[0]["model"] == "MDLM"
    row = published[0]["zero_shot"][0]
    assert row["dataset"] == "wikitext2" and row["windows"] >= 2 and math.isfinite(row["bpt"])


def test_codec_shows_nothing_for_an_id_the_bpe_lacks(tiny_bpe):
    """Duo's published vocabulary is GPT-2's plus a [PAD] state (id n_vocab): a sample may hold it; it decodes to
    nothing, while the mask id (vocab_size) still shows as the glyph."""
    from common import MASK_GLYPH, Codec
    codec = Codec(tiny_bpe.n_vocab + 1, bpe=tiny_bpe)
    ids = tiny_bpe.encode_ordinary("the cat") + [tiny_bpe.n_vocab] + tiny_bpe.encode_ordinary(" sat")
    assert codec.decode(ids) == "the cat sat"
    assert codec.decode(ids + [codec.mask_id]) == "the cat sat" + MASK_GLYPH


def test_openwebtext_test_set_keeps_the_last_documents_with_end_of_text(tmp_path, tiny_bpe, monkeypatch):
    """--zero_shot openwebtext: the last `last` documents of the split (100k in the papers; 3 here), each followed by
    end-of-text by default, framed as the zero-shot windows are; --doc_eos is not needed."""
    import zeroshot
    monkeypatch.setitem(zeroshot.TEST_SETS, "openwebtext", zeroshot.TEST_SETS["openwebtext"]._replace(last=3))
    docs = [f"doc {i} " + " ".join(WORDS[i:i + 6]) for i in range(7)]
    path = tmp_path / "owt" / "train.jsonl"
    path.parent.mkdir()
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    eot = tiny_bpe.eot_token
    windows, n = zeroshot.zero_shot_windows("openwebtext", tiny_bpe.encode_ordinary, 8, eot, eot, str(path.parent))
    stream = [t for d in docs[-3:] for t in tiny_bpe.encode_ordinary(d) + [eot]]
    k = len(stream) // 6
    assert n == 3 and windows.tolist() == [[eot] + stream[6 * i:6 * i + 6] + [eot] for i in range(k)]
    assert "openwebtext" not in zeroshot.parse_names("all")


@pytest.mark.skipif(not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
                    reason="torch.distributed with gloo is not available")
def test_zero_shot_under_torchrun_equals_one_process(setup, tiny_bpe):
    """torchrun --nproc_per_node=2 evaluate.py --zero_shot: the ranks take alternate batches (an odd number of them,
    so rank 1 idles in the last round) and rank 0 prints the same table as one process: the exact NLL over all
    windows (the AR bound is deterministic)."""
    from conftest import run_script, script_env
    ckpt, data_dir, wiki, docs, model = setup
    bits, windows = expected_bits(model, docs, tiny_bpe)
    B = next(b for b in range(2, 9) if (windows // b) % 2 == 1)
    proc = run_script(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "evaluate.py", ckpt,
                       "--no_ema", "--device", "cpu", "--data_dir", data_dir, "--zero_shot", "wikitext2",
                       "--data_files", f"wikitext2={wiki}", "--batch_size", B, "--json"], env=script_env(), timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    assert len(lines) == 1  # rank 0 alone prints
    row = json.loads(lines[0])["zero_shot"][0]
    assert row["windows"] == windows and row["bpt"] == pytest.approx(bits, abs=2e-5)


def test_a_set_of_one_window_gives_a_finite_d3pm_bound(setup, tmp_path, tiny_bpe, capsys):
    """A zero-shot set with one window is one batch of one row: the D3PM's estimate is finite (no NaN)."""
    from d3pm import D3PMAbsorbing
    _, data_dir, _, _, _ = setup
    args = dict(vocab_size=tiny_bpe.n_vocab, n_embed=32, n_heads=2, n_blocks=1, n_cond=16, dropout=0.0, T=8,
                lambda_ce=0.05)
    ckpt = tmp_path / "d3pm.pt"
    torch.save({"model": randomize_weights(D3PMAbsorbing(**args), seed=4).state_dict(), "model_cls": "D3PMAbsorbing",
                "model_args": args, "training_args": {"dataset": "mine", "seq_len": L}}, ckpt)
    text = " ".join(WORDS[:5])  # 14 to 27 tokens: one window of L - 2 = 14
    assert L - 2 <= len(tiny_bpe.encode_ordinary(text)) < 2 * (L - 2)
    one = tmp_path / "one" / "validation.jsonl"
    one.parent.mkdir()
    one.write_text(json.dumps({"text": text}) + "\n")
    call_main(evaluate, [ckpt, "--no_ema", "--device", "cpu", "--data_dir", data_dir, "--zero_shot", "wikitext2",
                         "--data_files", f"wikitext2={one}", "--json"])
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["zero_shot"][0]
    assert row["windows"] == 1 and math.isfinite(row["bpt"]) and row["bpt"] > 0 and row["se"] is None


def expected_bits_first_given(model, docs, enc):
    """The papers' AR rule over the windows built here: each window's first token (BOS) is given; the mean over
    windows of sum_{i=1}^{L-1} -log p(x_i | s, x_<i) from one network call per prefix, divided by L - 1."""
    eot, n = enc.eot_token, L - 2
    stream = [t for d in docs for t in enc.encode_ordinary(d)]
    windows = [[eot] + stream[i:i + n] + [eot] for i in range(0, len(stream) - n + 1, n)]
    total = 0.0
    with torch.no_grad():
        for w in windows:
            for i in range(1, L):
                inp = torch.tensor([[model.mask_id] + w[:i]])
                logp = model.net(inp, torch.zeros(1))[0, -1, :model.vocab_size].double().log_softmax(-1)
                total -= float(logp[w[i]])
    return total / (len(windows) * (L - 1)) / math.log(2), len(windows)


def test_protocol_mdlm_gives_the_ar_model_its_first_token(setup, tiny_bpe, capsys):
    """--zero_shot --protocol mdlm: the AR row scores L - 1 tokens of each window (the BOS given), as the papers'
    AR baseline, against a by-hand chain rule; the header and the JSON say which protocol; the default pays for all
    L tokens."""
    ckpt, data_dir, wiki, docs, model = setup
    base = [ckpt, "--no_ema", "--device", "cpu", "--data_dir", data_dir, "--zero_shot", "wikitext2",
            "--data_files", f"wikitext2={wiki}", "--batch_size", "4"]
    bits, windows = expected_bits_first_given(model, docs, tiny_bpe)
    call_main(evaluate, base + ["--protocol", "mdlm", "--json"])
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    row = out["zero_shot"][0]
    assert out["protocol"] == "mdlm" and out["first_given"] is True
    assert row["windows"] == windows and row["tokens"] == windows * (L - 1)
    assert row["bpt"] == pytest.approx(bits, abs=2e-5)
    call_main(evaluate, base + ["--protocol", "mdlm"])
    assert "the first token of each window given, not scored" in capsys.readouterr().out
    call_main(evaluate, base)
    assert "every token of each window scored" in capsys.readouterr().out
    default = call_main(evaluate, base + ["--json"])
    assert default["first_given"] is False and default["zero_shot"][0]["tokens"] == windows * L
    assert default["zero_shot"][0]["bpt"] == pytest.approx(expected_bits(model, docs, tiny_bpe)[0], abs=2e-5)
    with pytest.raises(UserError, match="protocol"):
        call_main(evaluate, base + ["--protocol", "bd3lm"])


def test_protocol_mdlm_scores_every_token_of_a_diffusion_model(setup, tmp_path, tiny_bpe, capsys):
    """A family whose batch_bound takes no first_given (the diffusion bounds) scores every token under --protocol mdlm
    too, as the papers score their diffusion models: the same estimate as the default, and the header says so."""
    from d3pm import D3PMAbsorbing
    _, data_dir, wiki, _, _ = setup
    args = dict(vocab_size=tiny_bpe.n_vocab, n_embed=32, n_heads=2, n_blocks=1, n_cond=16, dropout=0.0, T=8,
                lambda_ce=0.05)
    ckpt = tmp_path / "d3pm.pt"
    torch.save({"model": randomize_weights(D3PMAbsorbing(**args), seed=4).state_dict(), "model_cls": "D3PMAbsorbing",
                "model_args": args, "training_args": {"dataset": "mine", "seq_len": L}}, ckpt)
    base = [ckpt, "--no_ema", "--device", "cpu", "--data_dir", data_dir, "--zero_shot", "wikitext2",
            "--data_files", f"wikitext2={wiki}", "--batch_size", "4"]
    mdlm = call_main(evaluate, base + ["--protocol", "mdlm"])
    assert "mdlm protocol: every token of each window scored" in capsys.readouterr().out
    pooled = call_main(evaluate, base)
    assert mdlm["first_given"] is False and mdlm["zero_shot"] == pooled["zero_shot"]


def test_wrap_shards_groups_as_num_proc(setup, tiny_bpe, capsys):
    """--wrap_shards 3: the 40 documents in contiguous shards of 14, 13, 13 (by hand), each concatenated alone (one
    batch of 1000 each) and its remainder dropped; the exact NLL over those windows, built here, differs from one
    shard's; --wrap_shards 0 is a one-line error."""
    ckpt, data_dir, wiki, docs, model = setup
    base = [ckpt, "--no_ema", "--device", "cpu", "--data_dir", data_dir, "--zero_shot", "wikitext2",
            "--data_files", f"wikitext2={wiki}", "--batch_size", "4", "--json"]
    eot, n = tiny_bpe.eot_token, L - 2
    windows = []
    for lo, hi in ((0, 14), (14, 27), (27, 40)):
        stream = [t for d in docs[lo:hi] for t in tiny_bpe.encode_ordinary(d)]
        windows += [[eot] + stream[i:i + n] + [eot] for i in range(0, len(stream) - n + 1, n)]
    x = torch.tensor(windows)
    with torch.no_grad():
        logits = model.logits(torch.cat([torch.full((len(x), 1), model.mask_id), x[:, :-1]], dim=1))
    bits = float(F.cross_entropy(logits.flatten(0, 1), x.flatten())) / math.log(2)
    row = call_main(evaluate, base + ["--wrap_shards", "3"])["zero_shot"][0]
    assert row["windows"] == len(windows)
    assert row["bpt"] == pytest.approx(bits, abs=2e-5)
    assert abs(row["bpt"] - expected_bits(model, docs, tiny_bpe)[0]) > 1e-3  # other windows than one shard's
    capsys.readouterr()
    with pytest.raises(UserError, match="wrap_shards"):
        call_main(evaluate, base + ["--wrap_shards", "0"])
