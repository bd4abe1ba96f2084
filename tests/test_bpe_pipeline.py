"""The whole BPE path without network: a hand-built tiktoken.Encoding, a local .jsonl corpus,
prepare -> train a few steps -> evaluate -> sample (with infilling), all through the scripts' main(argv)
in this process (conftest.call_main; the scripts as children are tested elsewhere)."""
import contextlib
import io
import json
import pickle
from types import SimpleNamespace

import numpy as np

import evaluate
import sample
import train
from conftest import call_main
from data import prepare_openwebtext

WORDS = "the cat sat on a mat and then there was another thin thing in her hand".split()
SCRIPTS = {"data/prepare_openwebtext.py": prepare_openwebtext, "train.py": train, "evaluate.py": evaluate,
           "sample.py": sample}


def run(script, *args):
    """SCRIPT's main(ARGS) in this process; returns an object with its stdout."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = call_main(SCRIPTS[script], args)
    assert not isinstance(code, int) or code == 0, f"{script} returned {code}"  # (prepare returns its exit code)
    return SimpleNamespace(stdout=out.getvalue())


def test_prepare_train_evaluate_sample_with_a_custom_bpe(tmp_path, tiny_bpe):
    rng = np.random.default_rng(0)
    docs = [" ".join(rng.choice(WORDS, size=rng.integers(5, 30))) for _ in range(120)]
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    enc_file = tmp_path / "tiny.pkl"
    enc_file.write_bytes(pickle.dumps(dict(name=tiny_bpe.name, pat_str=tiny_bpe._pat_str,
                                           mergeable_ranks=tiny_bpe._mergeable_ranks,
                                           special_tokens=tiny_bpe._special_tokens)))
    data_root = tmp_path / "data"
    run("data/prepare_openwebtext.py", "--input", str(corpus), "--out", str(data_root / "mine"),
        "--encoding_file", str(enc_file), "--val_fraction", "0.25")

    # the .bin files hold exactly the documents, each encoded and followed by end-of-text
    meta = pickle.load(open(data_root / "mine" / "meta.pkl", "rb"))
    assert meta["vocab_size"] == tiny_bpe.n_vocab
    eot = tiny_bpe.eot_token
    train = np.memmap(data_root / "mine" / "train.bin", dtype=np.uint16, mode="r")
    val = np.memmap(data_root / "mine" / "val.bin", dtype=np.uint16, mode="r")
    both = np.concatenate([train, val])
    assert (both == eot).sum() == len(docs)
    every_doc = sorted(tuple(tiny_bpe.encode_ordinary(d)) for d in docs)
    pieces = np.split(both, np.flatnonzero(both == eot) + 1)[:-1]
    assert sorted(tuple(p[:-1].tolist()) for p in pieces) == every_doc

    # train: the model takes its vocabulary from the dataset
    run_dir = tmp_path / "run"
    run("train.py", "d3pm_tiny", "--device=cpu", "--dataset=mine", f"--data_root_dir={data_root}",
        f"--out_dir={run_dir}", "--max_iters=4", "--eval_interval=2", "--seq_len=32", "--batch_size=4")
    ckpt = run_dir / "ckpt.pt"
    import torch
    assert torch.load(ckpt, weights_only=True)["model_args"]["vocab_size"] == tiny_bpe.n_vocab

    mine = str(data_root / "mine")
    result = json.loads(run("evaluate.py", str(ckpt), "--device", "cpu", "--data_dir", mine, "--split", "val",
                            "--seq_len", "32", "--batch_size", "4", "--max_batches", "3", "--json").stdout)
    assert result["network_calls"] == 3 and result["bpt"] > 0

    out = json.loads(run("sample.py", str(ckpt), "--device", "cpu", "--data_dir", mine, "--seq_len", "24",
                         "--batch_size", "2", "--json").stdout)
    for ids, text in zip(out["ids"], out["samples"]):
        assert len(ids) == 24 and max(ids) < tiny_bpe.n_vocab
        assert text == tiny_bpe.decode(ids)

    template = "the cat \u2588\u2588\u2588\u2588 on the mat"
    out = json.loads(run("sample.py", str(ckpt), "--device", "cpu", "--data_dir", mine, "--infill", template,
                         "--json").stdout)
    ids = out["ids"][0]
    head, tail = tiny_bpe.encode_ordinary("the cat "), tiny_bpe.encode_ordinary(" on the mat")
    assert ids[:len(head)] == head and ids[len(ids) - len(tail):] == tail and len(ids) == len(head) + 4 + len(tail)

    # block diffusion on the same data: any length, cut at the first end-of-text with --stop_at_eos
    bd_dir = tmp_path / "bd3lm"
    run("train.py", "bd3lm_tiny", "--device=cpu", "--dataset=mine", f"--data_root_dir={data_root}",
        f"--out_dir={bd_dir}", "--max_iters=4", "--eval_interval=2", "--seq_len=32", "--batch_size=4")
    args = [str(bd_dir / "ckpt.pt"), "--device", "cpu", "--data_dir", mine, "--prompt", "the cat", "--length", "70",
            "--batch_size", "3", "--json"]
    full = json.loads(run("sample.py", *args).stdout)
    cut = json.loads(run("sample.py", *args, "--stop_at_eos").stdout)
    prompt = tiny_bpe.encode_ordinary("the cat")
    for whole, ids in zip(full["ids"], cut["ids"]):
        assert len(whole) == len(prompt) + 70 and whole[:len(prompt)] == prompt
        n = whole.index(eot) if eot in whole else len(whole)
        assert ids == whole[:n]  # the same draws, cut before the first end-of-text
    assert any(eot in whole for whole in full["ids"])  # (the data ends every document with one)
