"""
Independent-oracle tests of zeroshot.py (the zero-shot suite of MDLM / BD3-LM / Duo). No network: every corpus is a
tiny file written here in its hub layout and format, and the hub is never asked.

- Detokenizers: hand-written input -> output pairs in each corpus's style, worked out by hand from the reference
  repos' rules (kuleshov-group/mdlm dataloader.py), quirks included; some pairs only come out right in the right
  rule order.
- wrap: a token-by-token construction written here (numpy's array_split for the shards), against which the
  papers' batching (1000 documents per datasets.map batch, the remainder of each dropped) is checked.
- load_texts / zero_shot_windows: the documents expected from each file are written out by hand; window counts are
  computed from byte counts with a byte-level tiktoken Encoding built here.
"""
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tiktoken

import zeroshot
from common import UserError
from zeroshot import (DATASETS, lambada_detokenize, lm1b_detokenize, load_texts, parse_data_files, parse_names,
                      ptb_detokenize, scientific_papers_detokenize, wikitext_detokenize, wrap, zero_shot_windows)


# ---- detokenizers ---------------------------------------------------------------------------------------
PTB = [
    ("mr. <unk> said the company did n't expect N to N layoffs", "mr. ? said the company didn't expect 1 to 1 layoffs"),
    # " N " -> " 1 " runs before "$ 1" -> "$1"; a final N without a space after it stays
    ("investors ' shares rose $ N million or N N", "investors' shares rose $1 million or 1 N"),
    # a run of N: one pass would give "1 N 1 N"
    ("between N N N N and", "between 1 1 1 1 and"),
    ("the company 's # N spot in a\\/b", "the company's #1 spot in a/b"),
]
WIKITEXT = [
    (" = = Gameplay = = \n", " == Gameplay ==\n"),
    # "= = =" is replaced before "= =" (the other order leaves "== =")
    (" = = = Release = = = \n", " === Release ===\n"),
    (" The 2 @,@ 500 @-@ year @-@ old bridge is 3 @.@ 5 km long . \n", " The 2,500-year-old bridge is 3.5 km long.\n"),
    ('the " Black Album " ( 1991 ) sold well', 'the "Black Album" (1991) sold well'),
    # the reference's '...' rule pairs the two apostrophes: "players'union" is what the papers fed the model
    ("the players ' union and the band 's album , at 15 \u00b0 C ; ok",
     "the players'union and the band's album, at 15\u00b0C; ok"),
]
LM1B = [
    ("I don 't know , he said .", "I don't know, he said."),
    ("Visit http : / / www.example.com / news for more .", "Visit http://www.example.com/news for more."),
    ('The " Fed " ( central bank ) raised rates by $ 5 billion ?', 'The "Fed" (central bank) raised rates by $5 billion?'),
    ("the ' best ' team !", "the 'best' team!"),
    ("Is it ? Yes . It cost \u00a3 3 ! Really : no ; fine", "Is it? Yes. It cost \u00a33! Really: no; fine"),
]
LAMBADA = [
    ("  He said \u201c stop \u201d  ", '\nHe said " stop "'),
    ("plain text", "\nplain text"),
]
SCIENTIFIC = [
    # WikiText's " : " rule first, so the LM1B URL rule no longer matches (LM1B first would give "http://arxiv.org")
    ("see http : / / arxiv.org for details .", "see http:// arxiv.org for details."),
    ("the mean age was 45 @xmath0 ( range : 20 - 70 ) years .", "the mean age was 45 @xmath0 (range: 20 - 70) years."),
    ("first paragraph . \n second one .", "first paragraph.\nsecond one."),
]


@pytest.mark.parametrize("detokenize, pairs", [
    (ptb_detokenize, PTB), (wikitext_detokenize, WIKITEXT), (lm1b_detokenize, LM1B),
    (lambada_detokenize, LAMBADA), (scientific_papers_detokenize, SCIENTIFIC)],
    ids=["ptb", "wikitext", "lm1b", "lambada", "scientific_papers"])
def test_detokenizers_match_hand_worked_examples(detokenize, pairs):
    """Catches: a missing or changed rule, rules in another order (the pairs marked above), one " N " pass instead
    of ten, LM1B's end-of-line rules anchored elsewhere, scientific papers composed the other way round."""
    for raw, expected in pairs:
        assert detokenize(raw) == expected, raw


def test_scientific_papers_order_matters():
    """The composition is WikiText then LM1B; the reverse gives a different text on the URL example."""
    raw = SCIENTIFIC[0][0]
    assert scientific_papers_detokenize(raw) == lm1b_detokenize(wikitext_detokenize(raw))
    assert scientific_papers_detokenize(raw) != wikitext_detokenize(lm1b_detokenize(raw))


def test_datasets_table():
    """The eight names, their splits, columns and detokenizers as the papers' dataloaders use them."""
    assert list(DATASETS) == ["ptb", "wikitext103", "wikitext2", "lm1b", "lambada", "ag_news", "pubmed", "arxiv"]
    table = {k: (v.split, v.column, v.detokenizer) for k, v in DATASETS.items()}
    assert table == {
        "ptb": ("validation", "sentence", "ptb"), "wikitext103": ("validation", "text", "wikitext"),
        "wikitext2": ("validation", "text", "wikitext"), "lm1b": ("test", "text", "lm1b"),
        "lambada": ("test", "text", "lambada"), "ag_news": ("test", "text", None),
        "pubmed": ("validation", "article", "scientific_papers"),
        "arxiv": ("validation", "article", "scientific_papers")}
    assert DATASETS["wikitext103"].config == "wikitext-103-raw-v1" and DATASETS["wikitext2"].config == "wikitext-2-raw-v1"
    assert (DATASETS["pubmed"].config, DATASETS["arxiv"].config) == ("pubmed", "arxiv")
    assert DATASETS["lambada"].path.endswith("gpt-2/data/lambada_test.jsonl")


# ---- wrap ---------------------------------------------------------------------------------------------------
def windows_by_hand(docs, seq_len, bos, eos, doc_eos=False, batch_docs=1000, shards=1):
    """The oracle: shards from np.array_split, batches of batch_docs documents, tokens fed one at a time into a
    chunk that is emitted as [bos] chunk [eos] when it holds seq_len - 2 tokens; a batch's unfinished chunk is
    thrown away."""
    rows = []
    for shard in np.array_split(np.arange(len(docs)), min(shards, len(docs))):
        shard = list(shard)
        size = batch_docs or len(shard)
        for start in range(0, len(shard), size):
            chunk = []
            for d in shard[start:start + size]:
                for tok in list(docs[d]) + ([eos] if doc_eos else []):
                    chunk.append(tok)
                    if len(chunk) == seq_len - 2:
                        rows.append([bos] + chunk + [eos])
                        chunk = []
    return np.array(rows, dtype=np.int64).reshape(-1, seq_len)


def test_wrap_small_cases_by_hand():
    """Whole concatenation, per-document end-of-text, and batches of 2 documents, written out."""
    docs = [[1, 2, 3], [4, 5], [6, 7, 8, 9]]
    w = wrap(docs, 4, 50, 51, batch_docs=None)
    assert w.dtype == np.int64
    assert w.tolist() == [[50, 1, 2, 51], [50, 3, 4, 51], [50, 5, 6, 51], [50, 7, 8, 51]]  # 9 dropped
    w = wrap(docs, 4, 50, 51, doc_eos=True, batch_docs=None)  # 1 2 3 51 4 5 51 6 7 8 9 51: no remainder
    assert w[:, 1:-1].ravel().tolist() == [1, 2, 3, 51, 4, 5, 51, 6, 7, 8, 9, 51]
    w = wrap(docs, 4, 50, 51, batch_docs=2)  # batch [1..5] loses 5, batch [6..9] loses nothing
    assert w[:, 1:-1].tolist() == [[1, 2], [3, 4], [6, 7], [8, 9]]


@pytest.mark.parametrize("seed", range(6))
def test_wrap_matches_token_by_token_construction(seed):
    """Random corpora (empty documents included) over seq_len, doc_eos, batch sizes and shard counts, with
    remainders in most batches. Catches: one concatenation where the papers had batches, shards split
    differently, the remainder kept or padded, BOS/EOS missing or doubled, doc_eos ignored."""
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 60))
    docs = [rng.integers(0, 9, int(rng.integers(0, 12))).tolist() for _ in range(n)]
    for seq_len in (3, 7, 16):
        for doc_eos in (False, True):
            for batch_docs in (None, 1, 4, 1000):
                for shards in (1, 2, 3):
                    args = (docs, seq_len, 50256, 50257, doc_eos, batch_docs, shards)
                    expected = windows_by_hand(*args)
                    if len(expected) == 0:
                        with pytest.raises(UserError):
                            wrap(*args)
                        continue
                    got = wrap(*args)
                    assert got.shape == expected.shape and (got == expected).all(), args[1:]


def test_wrap_default_batches_of_1000_documents():
    """2001 documents of 4 tokens, windows of 6 + 2: each batch of 1000 gives 666 chunks and drops 4 tokens, the
    last document alone gives none: 1332 windows (one concatenation would give 1334)."""
    docs = [[1, 2, 3, 4]] * 2001
    assert len(wrap(docs, 8, 0, 0)) == 1332
    assert len(wrap(docs, 8, 0, 0, batch_docs=None)) == 1334


def test_wrap_errors():
    """Fewer tokens than one window's body, a seq_len with no room for text, and batches too small to fill a
    window although the total would: one-line UserErrors."""
    with pytest.raises(UserError, match="fewer than"):
        wrap([[1, 2], [3]], 6, 0, 0)
    with pytest.raises(UserError, match="seq_len"):
        wrap([[1, 2, 3]], 2, 0, 0)
    with pytest.raises(UserError, match="no batch"):
        wrap([[1, 2]] * 4, 6, 0, 0, batch_docs=1)
    assert wrap([[1, 2]] * 4, 6, 0, 0, batch_docs=None).shape == (2, 6)


# ---- local files in each corpus's hub layout -----------------------------------------------------------------
def write_parquet(path, **columns):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pq.write_table(pa.table(columns), path)


def write_jsonl(path, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


PTB_VALID = ["the company 's shares fell N N", "he did n't say <unk>"]
WT103_VALID = ["", " = Valkyria Chronicles III = \n", "", " It sold 1 @,@ 000 copies . \n"]
WT2_VALID = ["", " = = Plot = = \n"]
LM1B_TEST = ["I don 't know , he said .", "Prices rose 5 % ."]
LAMBADA_TEST = ["\u201cYes,\u201d she said. He nodded", "The end of the story"]
AG_NEWS_TEST = ["Wall St. Bears Claw Back Into the Black (Reuters)", "Oil prices soar , again"]
PUBMED_VALID = ["the mean age was 45 ( range : 20 - 70 ) years .", "we conclude that it works ."]
ARXIV_VALID = ["see http : / / arxiv.org for details .", "the model @xcite is exact ."]

EXPECTED = {
    "ptb": ["the company's shares fell 1 N", "he didn't say ?"],
    "wikitext103": ["", " = Valkyria Chronicles III =\n", "", " It sold 1,000 copies.\n"],
    "wikitext2": ["", " == Plot ==\n"],
    "lm1b": ["I don't know, he said.", "Prices rose 5 % ."],  # " word ." only after a word character
    "lambada": ['\n"Yes," she said. He nodded', "\nThe end of the story"],
    "ag_news": AG_NEWS_TEST,  # no detokenizer: " , " stays
    "pubmed": ["the mean age was 45 (range: 20 - 70) years.", "we conclude that it works."],
    "arxiv": ["see http:// arxiv.org for details.", "the model @xcite is exact."],
}


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    """name -> the --data_files path, each written in its hub layout (other splits and configs beside it, holding
    text that must not be read) and format."""
    root = tmp_path_factory.mktemp("zeroshot")
    other = ["NOT THIS SPLIT"]
    for split in ("train", "validation", "test"):  # ptb: the parquet export layout CONFIG/SPLIT/0000.parquet
        write_parquet(root / "ptb" / "penn_treebank" / split / "0000.parquet",
                      sentence=PTB_VALID if split == "validation" else other)
    for config, valid in (("wikitext-103-raw-v1", WT103_VALID), ("wikitext-2-raw-v1", WT2_VALID)):  # main branch
        for split in ("train", "validation", "test"):
            write_parquet(root / "wikitext" / config / f"{split}-00000-of-00001.parquet",
                          text=valid if split == "validation" else other)
    write_parquet(root / "lm1b" / "plain_text" / "partial-train" / "0000.parquet", text=other)
    write_parquet(root / "lm1b" / "plain_text" / "test" / "0000.parquet", text=LM1B_TEST)
    write_jsonl(root / "lambada" / "lambada_test.jsonl", [{"text": t} for t in LAMBADA_TEST])
    for split in ("train", "test"):
        write_parquet(root / "ag_news" / "data" / f"{split}-00000-of-00001.parquet",
                      text=AG_NEWS_TEST if split == "test" else other, label=[2] * (2 if split == "test" else 1))
    for config, valid in (("pubmed", PUBMED_VALID), ("arxiv", ARXIV_VALID)):
        for split in ("train", "validation", "test"):
            articles = valid if split == "validation" else other
            write_parquet(root / "scientific_papers" / config / split / "0000.parquet", article=articles,
                          abstract=["an abstract ."] * len(articles), section_names=["introduction"] * len(articles))
    return {"ptb": root / "ptb", "wikitext103": root / "wikitext", "wikitext2": root / "wikitext",
            "lm1b": root / "lm1b", "lambada": root / "lambada" / "lambada_test.jsonl", "ag_news": root / "ag_news",
            "pubmed": root / "scientific_papers", "arxiv": root / "scientific_papers"}


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A private datasets cache, and the hub reported unreachable (nothing here may go online)."""
    monkeypatch.setattr(zeroshot, "hub_online", lambda: False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    return str(tmp_path / "hf_cache")


@pytest.mark.parametrize("name", list(DATASETS))
def test_load_texts_offline_in_hub_layouts(name, corpora, cache):
    """Each corpus from its files: the right config folder, split and column, the documents in order (empty
    WikiText lines kept: they count in the 1000-document batches), the right detokenizer (none for ag_news)."""
    assert load_texts(name, str(corpora[name]), cache_dir=cache) == EXPECTED[name]


def test_load_texts_other_formats(tmp_path, cache):
    """A single CSV file (AG News's original format), and a folder written by datasets' save_to_disk (arrow, with
    its JSON metadata beside it, which must not be read as data)."""
    import datasets
    csv = tmp_path / "test.csv"
    csv.write_text('label,text\n3,"Oil prices soar , again"\n4,"Fed: rates, up"\n', encoding="utf-8")
    assert load_texts("ag_news", str(csv), cache_dir=cache) == ["Oil prices soar , again", "Fed: rates, up"]
    datasets.Dataset.from_dict({"sentence": PTB_VALID}).save_to_disk(str(tmp_path / "saved"))
    assert load_texts("ptb", str(tmp_path / "saved"), cache_dir=cache) == EXPECTED["ptb"]


def one_line_error(fn, *args, **kw):
    with pytest.raises(UserError) as e:
        fn(*args, **kw)
    msg = str(e.value)
    assert "\n" not in msg and msg, msg
    return msg


def test_load_texts_errors(corpora, tmp_path, cache):
    """A wrong column, a missing file, a folder without the split, an unknown name, and no hub without
    --data_files: each a one-line UserError naming the dataset (and, where it helps, --data_files NAME=PATH)."""
    msg = one_line_error(load_texts, "ptb", str(corpora["lambada"]), cache_dir=cache)  # 'text', not 'sentence'
    assert "ptb" in msg and "'sentence'" in msg and "--data_files ptb=" in msg
    msg = one_line_error(load_texts, "lm1b", str(tmp_path / "missing.parquet"), cache_dir=cache)
    assert "lm1b" in msg and "--data_files lm1b=" in msg
    write_parquet(tmp_path / "only_train" / "train-00000-of-00001.parquet", sentence=["x"])
    msg = one_line_error(load_texts, "ptb", str(tmp_path / "only_train"), cache_dir=cache)
    assert "validation" in msg and "--data_files ptb=" in msg
    msg = one_line_error(load_texts, "penn", cache_dir=cache)
    assert "penn" in msg and "ptb" in msg
    for name in ("ptb", "lambada"):
        msg = one_line_error(load_texts, name, cache_dir=cache)
        assert name in msg and f"--data_files {name}=" in msg and "cannot be reached" in msg


def test_parse_data_files_and_names():
    assert parse_data_files("ptb=/x/ptb.parquet, lm1b = /y ") == {"ptb": "/x/ptb.parquet", "lm1b": "/y"}
    assert parse_data_files("") == {} and parse_data_files("lambada=/a=b.jsonl") == {"lambada": "/a=b.jsonl"}
    for bad in ("ptb", "=/x", "ptb=", "foo=/x", "ptb=/a,ptb=/b"):
        one_line_error(parse_data_files, bad)
    assert parse_names("ptb, lm1b") == ["ptb", "lm1b"] and parse_names("all") == list(DATASETS)
    for bad in ("", "ptb,wiki"):
        one_line_error(parse_names, bad)


# ---- end to end -------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def byte_bpe():
    """One token per byte, <|endoftext|> = 256: a text's token count is its UTF-8 length."""
    return tiktoken.Encoding(name="tiny_bytes", pat_str=r"\S+|\s+", mergeable_ranks={bytes([i]): i for i in range(256)},
                             special_tokens={"<|endoftext|>": 256})


def test_zero_shot_windows_end_to_end(corpora, cache, byte_bpe):
    """PubMed through load_texts, encode and wrap: the count of windows from the byte counts of the hand-detokenized
    documents; every window [256] ... [256] and the interiors the byte stream in order."""
    stream = b"".join(t.encode("utf-8") for t in EXPECTED["pubmed"])
    for seq_len in (8, 20):
        windows, n_docs = zero_shot_windows("pubmed", byte_bpe.encode_ordinary, seq_len, 256, 256,
                                            data_files=str(corpora["pubmed"]), cache_dir=cache)
        body = seq_len - 2
        assert n_docs == 2 and windows.shape == (len(stream) // body, seq_len)
        assert (windows[:, 0] == 256).all() and (windows[:, -1] == 256).all()
        assert bytes(windows[:, 1:-1].ravel().tolist()) == stream[:len(windows) * body]
    windows, _ = zero_shot_windows("pubmed", byte_bpe.encode_ordinary, 8, 256, 256, doc_eos=True,
                                   data_files=str(corpora["pubmed"]), cache_dir=cache)
    ends = [len(t.encode("utf-8")) for t in EXPECTED["pubmed"]]
    assert len(windows) == (sum(ends) + 2) // 6
    flat = windows[:, 1:-1].ravel()
    assert flat[ends[0]] == 256 and (flat[:ends[0]] != 256).all()


def test_zero_shot_windows_batches_and_errors(tmp_path, cache, byte_bpe):
    """2001 PTB sentences of 4 bytes under the default 1000-document batches: 1332 windows of 6 + 2, not the 1334
    of one concatenation; a corpus too short for one window is a one-line UserError naming it."""
    write_parquet(tmp_path / "many" / "validation.parquet", sentence=["abcd"] * 2001)
    windows, n_docs = zero_shot_windows("ptb", byte_bpe.encode_ordinary, 8, 256, 256,
                                        data_files=str(tmp_path / "many"), cache_dir=cache)
    assert n_docs == 2001 and windows.shape == (1332, 8)
    write_parquet(tmp_path / "short" / "validation.parquet", sentence=["ab"])
    msg = one_line_error(zero_shot_windows, "ptb", byte_bpe.encode_ordinary, 8, 256, 256,
                         data_files=str(tmp_path / "short"), cache_dir=cache)
    assert "ptb" in msg and "fewer than" in msg


def test_wrap_shards_as_datasets_map_with_num_proc():
    """wrap(shards=N) against the `datasets` library itself: Dataset.shard(N, s, contiguous=True) (what map(num_proc=N)
    hands each worker) then map(batched=True) (batches of 1000) of a group_texts written here, shard by shard. 2501
    documents: shards of 834, 834, 833 for N = 3 (the first n % N one larger, counted by hand), 1251 and 1250 for N = 2
    (a batch of 1000 and a rest in each); N > n gives n shards, as map lowers num_proc to n."""
    datasets = pytest.importorskip("datasets")
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 50, int(rng.integers(0, 9))).tolist() for _ in range(2501)]
    ds = datasets.Dataset.from_dict({"input_ids": docs, "i": list(range(len(docs)))})
    body = 5

    def group(batch):
        flat = [t for d in batch["input_ids"] for t in d]
        k = len(flat) // body
        return {"w": [[7] + flat[j * body:(j + 1) * body] + [7] for j in range(k)]}

    assert [len(ds.shard(3, s, contiguous=True)) for s in range(3)] == [834, 834, 833]
    assert ds.shard(3, 1, contiguous=True)["i"][0] == 834
    for N in (1, 2, 3, 7):
        expected = [w for s in range(N) for w in ds.shard(N, s, contiguous=True).map(
            group, batched=True, remove_columns=ds.column_names)["w"]]
        got = wrap(docs, body + 2, 7, 7, shards=N)
        assert got.tolist() == expected, N
    assert wrap(docs, 7, 7, 7, shards=1).tolist() != wrap(docs, 7, 7, 7, shards=3).tolist()  # windows depend on N
    few = [[1, 2, 3], [4, 5, 6, 7]]
    assert wrap(few, 5, 0, 0, shards=8).tolist() == wrap(few, 5, 0, 0, shards=2).tolist() == [[0, 1, 2, 3, 0],
                                                                                              [0, 4, 5, 6, 0]]
