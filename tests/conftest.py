"""Shared fixtures: the repository root and a tiny fake text8 dataset."""
import os
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

TEXT8_CHARS = " abcdefghijklmnopqrstuvwxyz"  # id 0 = space, 1..26 = a..z
TINY_SPLIT_SIZES = {"train": 20_000, "val": 4_000, "test": 3_000}  # distinct, so a split is identifiable by length


def write_tiny_text8(data_root, seed=0):
    """Write data_root/text8/{train,val,test}.npy (uint16 ids 0..26) and meta.pkl as prepare_text8 does.
    Returns data_root as a str (the value for --data_root_dir)."""
    data_dir = os.path.join(str(data_root), "text8")
    os.makedirs(data_dir, exist_ok=True)
    rng = np.random.default_rng(seed)
    for split, n in TINY_SPLIT_SIZES.items():
        np.save(os.path.join(data_dir, f"{split}.npy"), rng.integers(0, 27, n).astype(np.uint16))
    meta = {"vocab_size": 27, "itos": dict(enumerate(TEXT8_CHARS)), "stoi": {c: i for i, c in enumerate(TEXT8_CHARS)}}
    with open(os.path.join(data_dir, "meta.pkl"), "wb") as f:
        pickle.dump(meta, f)
    return str(data_root)


def randomize_weights(model, seed):
    """Give every parameter a random value (the zero-initialised adaLN layers too), scaled so that
    predictions depend clearly on t and on the context without being extreme. Returns the model."""
    import torch
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=g, dtype=torch.float64).float()
            if "norm" in name:
                p.copy_(1 + 0.3 * r)
            elif name.startswith("net.c_embed"):
                p.copy_(0.3 * r)
            elif "adaLN" in name:
                p.copy_(0.5 * r / (p.shape[1] ** 0.5 if p.dim() == 2 else 1.0))
            elif p.dim() == 2:
                p.copy_(r / p.shape[1] ** 0.5)
            else:
                p.copy_(0.3 * r)
    return model


@pytest.fixture
def repo_root():
    return REPO_ROOT


@pytest.fixture
def tiny_text8(tmp_path):
    """A fake text8 dataset in tmp_path/data_root; returns the data root (a str)."""
    return write_tiny_text8(tmp_path / "data_root")


@pytest.fixture(scope="session")
def tiny_text8_shared(tmp_path_factory):
    """Like tiny_text8, written once per session (for module-scoped fixtures). Treat as read-only."""
    return write_tiny_text8(tmp_path_factory.mktemp("shared_data_root"))


# merges of the tiny BPE, in rank order 256, 257, ...; both parts of each merge are ranked before it
TINY_BPE_MERGES = [b"th", b"he", b"the", b" t", b" th", b" the", b"in", b"er", b"  "]
GPT2_PAT_STR = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


@pytest.fixture
def tiny_bpe():
    """A small hand-built tiktoken.Encoding ('tiny'): the 256 bytes, a few merges, <|endoftext|> last.
    Needs no download; GPT-2's split regex."""
    import tiktoken

    ranks = {bytes([i]): i for i in range(256)}
    for merge in TINY_BPE_MERGES:
        ranks[merge] = len(ranks)
    return tiktoken.Encoding("tiny", pat_str=GPT2_PAT_STR, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": len(ranks)})
