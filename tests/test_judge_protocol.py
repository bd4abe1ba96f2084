"""judge.py's two rules of generative perplexity: "pooled" (this repo's) and "mdlm" (MDLM / Duo's
compute_generative_perplexity), by hand on a judge whose next-token law is a table over the previous token,
then against a chunk-by-chunk reference on tiny random GPT-2 and AR judges. No download, no network."""
import math

import numpy as np
import pytest
import torch

import judge as J
from ar import AR
from common import Codec, UserError
from conftest import TEXT8_CHARS, randomize_weights

A, B, C, E = 0, 1, 2, 3  # a tiny vocabulary: three letters and <|endoftext|> (EOS, also the start token)
P = {A: {A: .1, B: .5, C: .3, E: .1},  # P[previous][next]
     B: {A: .2, B: .1, C: .6, E: .1},
     C: {A: .5, B: .2, C: .1, E: .2},
     E: {A: .4, B: .3, C: .2, E: .1}}


def lp(prev, nxt):
    return math.log(P[prev][nxt])


def abc_encoding():
    """A tiktoken.Encoding with a=0, b=1, c=2 and <|endoftext|>=3, one character per token."""
    import tiktoken
    return tiktoken.Encoding("abc", pat_str=r".", mergeable_ranks={b"a": A, b"b": B, b"c": C},
                             special_tokens={"<|endoftext|>": E})


class MarkovJudge(J.Judge):
    """logits[:, i] = log P[x_i]: the next token depends on the previous token only; context 4."""
    name, start_id, context, vocab_size = "markov", E, 4, 4

    def __init__(self):
        self.encoding = abc_encoding()
        self.table = torch.log(torch.tensor([[P[i][j] for j in range(4)] for i in range(4)]))

    def logits(self, x):
        return self.table[x]

    def encode(self, text):
        return self.encoding.encode(text, allowed_special={"<|endoftext|>"})


TEXTS = ["a<|endoftext|>b<|endoftext|>cb",  # a E b E c b: EOS in the middle, then more (and a second EOS)
         "cabcaab",                         # c a b c a a b: longer than the context (4)
         "bc"]                              # b c: shorter, no EOS
IDS = [[A, E, B, E, C, B], [C, A, B, C, A, A, B], [B, C]]


def ppl(log_probs):
    return math.exp(-sum(log_probs) / len(log_probs))


def test_both_rules_by_hand():
    """Catches, for "pooled": a missing start token, a first token left unscored, EOS tokens skipped. For
    "mdlm": a start token added, a chunk's first token scored, the tokens after the first EOS dropped (main.py's
    comment in MDLM), a second EOS counted, the first EOS counted once per sample instead of once per chunk,
    the padding EOS not counted (or counted more than once), no truncation to the context by default,
    chunks that keep their context across the boundary, per-sample means instead of pooling."""
    judge = MarkovJudge()
    assert judge.encode(TEXTS[0]) == IDS[0] and judge.eos_id == E
    pooled = [lp(E, A), lp(A, E), lp(E, B), lp(B, E), lp(E, C), lp(C, B),  # start token first, all scored
              lp(E, C), lp(C, A), lp(A, B), lp(B, C), lp(C, A), lp(A, A), lp(A, B),
              lp(E, B), lp(B, C)]
    # mdlm, default max_length = context = 4: rows a E b E | c a b c | b c E E (padded); one chunk each
    mdlm4 = [lp(A, E), lp(E, B),            # a unscored, first EOS counts, b counts, the second EOS not
             lp(C, A), lp(A, B), lp(B, C),  # c unscored
             lp(B, C), lp(C, E)]            # b unscored, the first padding EOS counts, the second not
    # mdlm, max_length 8: padded to 7, chunks [0:4] and [4:7]
    mdlm8 = [lp(A, E), lp(E, B), lp(C, B), lp(B, E),  # chunk 2 = c b E(pad): its own first EOS counts again
             lp(C, A), lp(A, B), lp(B, C), lp(A, A), lp(A, B),  # chunk 2 = a a b: a unscored
             lp(B, C), lp(C, E)]  # chunk 2 = E E E: begins with EOS, so no EOS in it counts
    assert (len(pooled), len(mdlm4), len(mdlm8)) == (15, 7, 11)
    for samples in (TEXTS, IDS):
        for bt in (4, 4096):  # one chunk per network call, or all at once
            got = J.score_samples(judge, samples, batch_tokens=bt)
            assert got["protocol"] == "pooled" and got["tokens"] == 15 and got["samples"] == 3
            assert got["gen_ppl"] == pytest.approx(ppl(pooled), rel=1e-6)
            assert got["nll_nats"] == pytest.approx(-sum(pooled), rel=1e-6)
            got4 = J.score_samples(judge, samples, batch_tokens=bt, protocol="mdlm")
            assert got4["protocol"] == "mdlm" and got4["tokens"] == 7
            assert got4["gen_ppl"] == pytest.approx(ppl(mdlm4), rel=1e-6)
            assert got4["gen_bpt"] == pytest.approx(-sum(mdlm4) / 7 / math.log(2), rel=1e-6)
            got8 = J.score_samples(judge, samples, batch_tokens=bt, protocol="mdlm", max_length=8)
            assert got8["tokens"] == 11 and got8["gen_ppl"] == pytest.approx(ppl(mdlm8), rel=1e-6)
    per_sample = J.mdlm_token_nlls(judge, IDS, max_length=8)
    assert [len(x) for x in per_sample] == [4, 5, 2]
    assert per_sample[0] == pytest.approx([-lp(A, E), -lp(E, B), -lp(C, B), -lp(B, E)], rel=1e-6)
    # the rules differ here, and so do the two truncations
    assert abs(math.log(got["gen_ppl"]) - math.log(got4["gen_ppl"])) > 0.05
    assert abs(math.log(got4["gen_ppl"]) - math.log(got8["gen_ppl"])) > 0.05
    # a sample that begins with EOS (as MDLM's samples usually do): the unscored first token is the first
    # EOS, so no EOS counts; the pooled rule scores all three tokens after its start token
    lone = J.score_samples(judge, ["<|endoftext|>a<|endoftext|>"], protocol="mdlm")
    assert lone["tokens"] == 1 and lone["nll_nats"] == pytest.approx(-lp(E, A), rel=1e-6)
    lone = J.score_samples(judge, ["<|endoftext|>a<|endoftext|>"])
    assert lone["tokens"] == 3 and lone["nll_nats"] == pytest.approx(-(lp(E, E) + lp(E, A) + lp(A, E)), rel=1e-6)


def chunkwise_mdlm(judge, samples, max_length):
    """The mdlm rule written out one chunk at a time, each chunk alone in a network call, float64:
    (total nats, tokens)."""
    eos, K = judge.eos_id, judge.context
    rows = [list(s)[:max_length] for s in samples]
    n = max(map(len, rows))
    total, tokens = 0.0, 0
    with torch.no_grad():
        for row in rows:
            row = row + [eos] * (n - len(row))
            for c in range(0, n, K):
                x = row[c:c + K]
                logp = torch.log_softmax(judge.logits(torch.tensor([x]))[0].double(), dim=-1)
                eos_seen = 0
                for k, tok in enumerate(x):
                    eos_seen += tok == eos
                    if k > 0 and (tok != eos or (eos_seen == 1 and eos < judge.vocab_size)):
                        total -= float(logp[k - 1, tok])
                        tokens += 1
    return total, tokens


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models, one torch thread


def test_mdlm_rule_on_tiny_models():
    """A tiny random GPT-2 (EOS 49 standing in for 50256) and a character AR judge (EOS = its start token,
    which it cannot predict: the padding never counts), many chunks in several padded batches, equal the
    chunk-by-chunk reference. Catches padding that leaks into scored positions, chunks mixed up between
    samples or batches, a start token added before a chunk, an AR judge's padding scored (inf)."""
    cfg = J.GPT2Config(n_layer=2, n_head=2, n_embd=16, n_ctx=16, vocab_size=50)
    torch.manual_seed(0)
    gpt2 = J.GPT2Judge(J.GPT2(cfg))
    gpt2.start_id = 49
    assert gpt2.eos_id == 49
    rng = np.random.default_rng(0)
    samples = [rng.integers(0, 49, n).tolist() for n in (3, 16, 17, 40, 29)]
    samples[1][5] = samples[1][9] = 49          # two EOS in the middle
    samples[3][0], samples[3][20] = 49, 49      # begins with EOS; another one in its second chunk
    for max_length in (None, 40, 23):
        total, tokens = chunkwise_mdlm(gpt2, samples, max_length or 16)
        got = J.score_samples(gpt2, samples, batch_tokens=20, protocol="mdlm", max_length=max_length)
        assert got["tokens"] == tokens and got["nll_nats"] == pytest.approx(total, rel=1e-5)
    model = randomize_weights(AR(vocab_size=27, n_embed=32, n_heads=2, n_blocks=2, n_cond=16, dropout=0.0), 0)
    char = J.ARJudge(model.eval(), context=8, codec=Codec(27, itos=dict(enumerate(TEXT8_CHARS))))
    assert char.eos_id == char.start_id == 27
    samples = [rng.integers(0, 27, n).tolist() for n in (1, 5, 29, 9)]
    total, tokens = chunkwise_mdlm(char, samples, 40)
    got = J.score_samples(char, samples, batch_tokens=20, protocol="mdlm", max_length=40)
    assert tokens == 0 + 4 + 25 + 7 and got["tokens"] == tokens  # every token but each chunk's first
    assert math.isfinite(got["nll_nats"]) and got["nll_nats"] == pytest.approx(total, rel=1e-5)


def test_eos_of_a_bpe_ar_judge(tiny_bpe):
    """An AR judge on BPE uses <|endoftext|> as EOS, not its start (mask) id; GPT-2's is 50256."""
    model = AR(vocab_size=tiny_bpe.n_vocab, n_embed=16, n_heads=2, n_blocks=1, n_cond=8, dropout=0.0)
    judge = J.ARJudge(model, context=8, codec=Codec(tiny_bpe.n_vocab, bpe=tiny_bpe))
    assert judge.eos_id == tiny_bpe.eot_token != judge.start_id
    assert J.ARJudge(model, context=8).eos_id == judge.start_id  # no codec: the start id
    assert J.GPT2Judge(J.GPT2(J.GPT2Config(n_layer=1, n_head=1, n_embd=8, n_ctx=4, vocab_size=8))).eos_id == 50256


def test_protocol_errors_and_quality():
    """PROTOCOLS names the rules; an unknown one, or max_length under the pooled rule, is a one-line
    UserError; quality passes the rule through."""
    judge = MarkovJudge()
    assert J.PROTOCOLS == ("pooled", "mdlm")
    for kwargs in (dict(protocol="duo"), dict(protocol=None), dict(max_length=8),
                   dict(protocol="mdlm", max_length=0)):
        with pytest.raises(UserError) as e:
            J.score_samples(judge, IDS, **kwargs)
        assert "\n" not in str(e.value)
    assert "pooled, mdlm" in str(pytest.raises(UserError, J.score_samples, judge, IDS, protocol="x").value)
    with pytest.raises(UserError):
        J.score_samples(judge, [[]], protocol="mdlm")  # nothing to score
    q = J.quality(TEXTS, IDS, judge, protocol="mdlm", max_length=8)
    assert q["protocol"] == "mdlm" and q["tokens"] == 11 and "entropy" in q
    assert J.quality(TEXTS, IDS, judge)["protocol"] == "pooled"


def test_entropy_unit_follows_the_protocol(tmp_path, capsys):
    """The papers report sample entropy in nats (torch.special.entr); this repo's default is bits. By hand:
    [a, a, b, c] has p = (1/2, 1/4, 1/4), H = 1.5 bits = 1.5 ln 2 = 1.03972 nats; [c, c] has H = 0; the mean over the
    two samples is 0.75 bits = 0.51986 nats. quality and evaluate.py --samples name the unit."""
    ids = [[A, A, B, C], [C, C]]
    texts = ["aabc", "cc"]
    q = J.quality(texts, ids, MarkovJudge())
    assert q["entropy_unit"] == "bits" and q["entropy"] == pytest.approx(0.75, abs=1e-12)
    q = J.quality(texts, ids, MarkovJudge(), protocol="mdlm")
    assert q["entropy_unit"] == "nats" and q["entropy"] == pytest.approx(0.75 * math.log(2), abs=1e-12)
    assert J.unigram_entropy([[A, A, B, C]], "nats") == pytest.approx(0.5 * math.log(2) + 0.5 * math.log(4))
    assert "\n" not in str(pytest.raises(UserError, J.unigram_entropy, ids, "dits").value)
    import json

    import evaluate
    from conftest import call_main
    samples = tmp_path / "s.jsonl"
    samples.write_text("".join(json.dumps({"text": t, "ids": i}) + "\n" for t, i in zip(texts, ids)))
    judge = MarkovJudge()
    for protocol, unit, value in (("pooled", "bits", 0.75), ("mdlm", "nats", 0.75 * math.log(2))):
        import unittest.mock
        with unittest.mock.patch("judge.load_judge", lambda *a, **k: judge):
            result = call_main(evaluate, ["--samples", samples, "--judge", "markov", "--protocol", protocol])
            assert f"unigram entropy {value:.3f} {unit}" in capsys.readouterr().out
            call_main(evaluate, ["--samples", samples, "--judge", "markov", "--protocol", protocol, "--json"])
            out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert result["entropy_unit"] == out["entropy_unit"] == unit
        assert out["entropy"] == pytest.approx(value, abs=1e-12)
