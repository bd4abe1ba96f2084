"""
The zero-shot perplexity suite of MDLM, BD3-LM and Duo: a model trained on OpenWebText is scored on eight other
corpora, each read, detokenized, tokenized with GPT-2 and cut into windows exactly as those papers' code does
(kuleshov-group/mdlm, kuleshov-group/bd3lms and s-sahoo/duo, `dataloader.py`; the three agree on all of it but the
end-of-text flag below):

    name         Hugging Face dataset (the papers' name)          config               split       column   detokenizer
    ptb          ptb-text-only/ptb_text_only (ptb_text_only)  *  penn_treebank        validation  sentence ptb
    wikitext103  Salesforce/wikitext (wikitext)                  wikitext-103-raw-v1  validation  text     wikitext
    wikitext2    Salesforce/wikitext (wikitext)                  wikitext-2-raw-v1    validation  text     wikitext
    lm1b         billion-word-benchmark/lm1b (lm1b)           *  plain_text           test        text     lm1b
    lambada      OpenAI's lambada_test.jsonl (LAMBADA_URL, as the papers download it)      all 5153    text     lambada
    ag_news      fancyzhx/ag_news (ag_news)                      -                    test        text     -
    pubmed       armanc/scientific_papers (scientific_papers) *  pubmed               validation  article  sci_papers
    arxiv        armanc/scientific_papers (scientific_papers) *  arxiv                validation  article  sci_papers

Splits: `validation`, except `test` for lm1b and ag_news (their `get_dataloaders`: valid in [text8, lm1b, ag_news] ->
test); lambada is OpenAI's test file. lm1b is the `lm1b-gpt2` data config (GPT-2, wrapped) the zero-shot scripts run.
sci_papers = scientific_papers: the wikitext rules, then the lm1b rules. ag_news has no detokenizer. *: script-only
datasets, which `datasets` >= 4 cannot run: read from the hub's parquet export (refs/convert/parquet,
CONFIG/SPLIT/*.parquet: the rows the script produced, in order). Besides the eight, `openwebtext` (TEST_SETS) is
the papers' OpenWebText test set: the last 100k documents of Skylion007/openwebtext's only split, each followed by
end-of-text (their openwebtext-valid; MDLM frames its windows with BOS/EOS, BD3-LM's OWT script does not).

Windows (`wrap`): each document is tokenized alone (no special tokens); with `doc_eos` an end-of-text token is
appended to it; the documents are concatenated and cut into chunks of L - 2 tokens, each written as [BOS] chunk [EOS]
(GPT-2: BOS = EOS = <|endoftext|> = 50256). The concatenation happens inside `datasets.map` batches of 1000 documents
(its default batch size), batch after batch, and the remainder of every batch is dropped; `map(num_proc=N)` first
splits the documents into N contiguous shards (`shards`, evaluate.py --wrap_shards N, default 1), as
Dataset.shard(contiguous=True): sizes n // N, the first n % N one larger (N > n: n shards, as map lowers num_proc),
so the windows change with N. The papers' N is the process's CPU count, len(os.sched_getaffinity(0)) (MDLM's
get_dataset default, Duo's loader.num_workers), of whichever run first built the cached grouped dataset
(cache_dir/NAME_SPLIT_bsL_wrapped*.dat, reused whatever N later): BD3-LM's zero-shot jobs (scripts/zs_ppl/*.sh)
ask SLURM for one CPU per task, so N = 1 where SLURM binds the task to it; Duo's scripts/zero_shot_*.sh ask for no
CPU count and MDLM released no zero-shot script, so theirs is unknown. doc_eos: MDLM's dataloader
always appends the end-of-text token, but the released zero-shot scripts (bd3lms scripts/zs_ppl/*.sh, duo
scripts/zero_shot_*.sh, Duo's rerun of MDLM included) pass insert_valid_eos=False, so the default here is False.
"""
import itertools
import os
import re
from typing import NamedTuple, Optional

import numpy as np

from common import UserError, hub_online


# ---- detokenizers ---------------------------------------------------------------------------------------
def _rewrite(text, rules):
    """Apply (pattern, replacement) rules in order: a str pattern is replaced literally (str.replace), a compiled
    pattern with re.sub."""
    for pattern, repl in rules:
        text = text.replace(pattern, repl) if isinstance(pattern, str) else pattern.sub(repl, text)
    return text


_WIKITEXT_RULES = [
    ("s '", "s'"),
    (re.compile(r"/' [0-9]/"), "/'[0-9]/"),  # sic: the replacement is the literal text /'[0-9]/
    (" @-@ ", "-"), (" @,@ ", ","), (" @.@ ", "."),
    (" : ", ": "), (" ; ", "; "), (" . ", ". "), (" ! ", "! "), (" ? ", "? "), (" , ", ", "),
    (re.compile(r"\(\s*([^)]*?)\s*\)"), r"(\1)"),
    (re.compile(r"\[\s*([^\]]*?)\s*\]"), r"[\1]"),
    (re.compile(r"{\s*([^}]*?)\s*}"), r"{\1}"),
    (re.compile(r"\"\s*([^\"]*?)\s*\""), r'"\1"'),
    (re.compile(r"'\s*([^']*?)\s*'"), r"'\1'"),
    ("= = = =", "===="), ("= = =", "==="), ("= =", "=="),
    (" \u00b0 ", "\u00b0"),
    (" \n", "\n"), ("\n ", "\n"),
    (" N ", " 1 "),
    (" 's", "'s"),
]


def wikitext_detokenize(text):
    """WikiText, in this order: "s '" -> "s'"; the regex /' [0-9]/ -> the literal /'[0-9]/; number separators
    " @-@ " -> "-", " @,@ " -> ",", " @.@ " -> "."; " X " -> "X " for X in : ; . ! ? ,; inside (), [], {}, "" and ''
    the spaces next to the delimiters are removed (shortest match, no nesting); "= = = =" -> "====", "= = =" -> "===",
    "= =" -> "=="; " ° " -> "°"; spaces before and after a newline are removed; " N " -> " 1 "; " 's" -> "'s"."""
    return _rewrite(text, _WIKITEXT_RULES)


_PTB_RULES = [(" 's", "'s"), ("s ' ", "s' "), (" n't", "n't"), (" \n ", "\n"), ("\\/", "/")]
_PTB_RULES += [(" N ", " 1 ")] * 10 + [("$ 1", "$1"), ("# 1", "#1"), ("<unk>", "?")]


def ptb_detokenize(text):
    """Penn Treebank, in this order: " 's" -> "'s"; "s ' " -> "s' "; " n't" -> "n't"; " \\n " -> "\\n"; "\\/" -> "/";
    " N " -> " 1 " ten times over (a single pass skips every other N of a run); then "$ 1" -> "$1", "# 1" -> "#1";
    "<unk>" -> "?"."""
    return _rewrite(text, _PTB_RULES)


_LM1B_RULES = [
    ("http : / / ", "http://"), ("https : / / ", "https://"),
    (re.compile(r" '(\w+)"), r"'\1"),
    (re.compile(r" (\w+) \. "), r" \1. "), (re.compile(r" (\w+) \.$"), r" \1."),
    (" ? ", "? "), (re.compile(r" \?$"), "?"),
    (" ! ", "! "), (re.compile(r" !$"), "!"),
    (" , ", ", "), (" : ", ": "), (" ; ", "; "), (" / ", "/"),
    (re.compile(r'" ([^"]+) "'), r'"\1"'),
    (re.compile(r"' ([^']+) '"), r"'\1'"),
    (re.compile(r"\( ([^()]+) \)"), r"(\1)"),
    (re.compile(r"\[ ([^\[\]]+) \]"), r"[\1]"),
    ("$ ", "$"), ("\u00a3 ", "\u00a3"),
]


def lm1b_detokenize(text):
    """One Billion Word, in this order: "http : / / " -> "http://" (and https); a space before an apostrophe that
    starts a word is removed (" 's" -> "'s"); " word . " -> " word. " and " word ." at the end -> " word."; " ? " ->
    "? ", " ?" at the end -> "?", the same for "!"; " , " -> ", ", " : " -> ": ", " ; " -> "; ", " / " -> "/";
    '" x "' -> '"x"', "' x '" -> "'x'", "( x )" -> "(x)", "[ x ]" -> "[x]" (exactly one space inside, x without the
    delimiter); "$ " -> "$", "£ " -> "£"."""
    return _rewrite(text, _LM1B_RULES)


def lambada_detokenize(text):
    """LAMBADA (OpenAI's file): curly double quotes “ ” -> ", surrounding whitespace stripped, then a newline
    prepended ("\\n" + text.strip())."""
    return "\n" + text.replace("\u201c", '"').replace("\u201d", '"').strip()


def scientific_papers_detokenize(text):
    """arXiv / PubMed articles: the WikiText rules, then the LM1B rules (in that order; e.g. "http : / / x" becomes
    "http:// x", since the WikiText " : " rule runs first)."""
    return lm1b_detokenize(wikitext_detokenize(text))


DETOKENIZERS = {"ptb": ptb_detokenize, "wikitext": wikitext_detokenize, "lm1b": lm1b_detokenize,
                "lambada": lambada_detokenize, "scientific_papers": scientific_papers_detokenize}


# ---- the datasets ---------------------------------------------------------------------------------------
class Source(NamedTuple):
    """Where a zero-shot corpus comes from: a hub dataset `path` (or the URL of a JSON-lines file), its config (for
    the parquet export: its directory), the split, the text column, the DETOKENIZERS key (None: raw text) and the
    revision (refs/convert/parquet: read CONFIG/SPLIT/*.parquet of the hub's parquet export)."""
    path: str
    config: Optional[str]
    split: str
    column: str
    detokenizer: Optional[str]
    revision: Optional[str] = None
    last: Optional[int] = None  # keep only the last rows of the split
    doc_eos: bool = False  # the default of wrap's doc_eos for this set


PARQUET_EXPORT = "refs/convert/parquet"
LAMBADA_URL = "https://openaipublic.blob.core.windows.net/gpt-2/data/lambada_test.jsonl"
DATASETS = {
    "ptb": Source("ptb-text-only/ptb_text_only", "penn_treebank", "validation", "sentence", "ptb", PARQUET_EXPORT),
    "wikitext103": Source("Salesforce/wikitext", "wikitext-103-raw-v1", "validation", "text", "wikitext"),
    "wikitext2": Source("Salesforce/wikitext", "wikitext-2-raw-v1", "validation", "text", "wikitext"),
    "lm1b": Source("billion-word-benchmark/lm1b", "plain_text", "test", "text", "lm1b", PARQUET_EXPORT),
    "lambada": Source(LAMBADA_URL, None, "test", "text", "lambada"),
    "ag_news": Source("fancyzhx/ag_news", None, "test", "text", None),
    "pubmed": Source("armanc/scientific_papers", "pubmed", "validation", "article", "scientific_papers",
                     PARQUET_EXPORT),
    "arxiv": Source("armanc/scientific_papers", "arxiv", "validation", "article", "scientific_papers",
                    PARQUET_EXPORT),
}

# the papers' OpenWebText test set (openwebtext-valid: the last 100k documents of the only split; end-of-text after
# each document, insert_valid_eos=True); not one of the zero-shot rows, so "all" leaves it out
TEST_SETS = {"openwebtext": Source("Skylion007/openwebtext", None, "train", "text", None, last=100_000, doc_eos=True)}

_FORMATS = {".parquet": "parquet", ".json": "json", ".jsonl": "json", ".arrow": "arrow", ".csv": "csv"}
_METADATA = {"dataset_info.json", "dataset_infos.json", "dataset_dict.json", "state.json"}
_SPLIT_WORDS = {"train": {"train", "training"}, "validation": {"validation", "valid", "val", "dev"},
                "test": {"test", "testing"}}


def _one_line(e):
    return f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"


def _source(name):
    known = {**DATASETS, **TEST_SETS}
    if name not in known:
        raise UserError(f"unknown zero-shot dataset {name!r}; known: {', '.join(known)}")
    return known[name]


def local_files(path, config, split):
    """The data files of a local path: a file is used as it is; in a directory (searched recursively, hidden
    folders and `datasets` metadata skipped) only files under a folder named `config` (or `default`) when there are
    any, and, when file names carry split words (train, validation/valid/val/dev, test), only those of `split`.
    Sorted, so shards keep their order."""
    if os.path.isfile(path):
        return [path]
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no such file or directory {path}")
    found = []
    for root, dirs, files in os.walk(path):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [os.path.relpath(os.path.join(root, f), path) for f in sorted(files)
                  if os.path.splitext(f)[1] in _FORMATS and f not in _METADATA]
    folders = {config or "default"}
    found = [f for f in found if folders & set(f.split(os.sep)[:-1])] or found
    words = {f: set(re.split(r"[^a-z]+", f.lower())) for f in found}
    if any(words[f] & w for f in found for w in _SPLIT_WORDS.values()):
        found = [f for f in found if words[f] & _SPLIT_WORDS[split]]
    if not found:
        raise FileNotFoundError(f"no {split} data file ({', '.join(sorted(set(_FORMATS)))}) under {path}")
    return [os.path.join(path, f) for f in found]


def load_texts(name, data_files=None, cache_dir=None):
    """The detokenized documents of a zero-shot dataset, in order (empty documents kept). data_files: a local file
    or directory (parquet, json/jsonl, arrow, csv; see local_files) read with the `datasets` packaged loaders;
    otherwise the hub (DATASETS). Any failure is a one-line UserError."""
    src = _source(name)
    hint = f"download it and pass --data_files {name}=PATH (a file or folder of parquet/jsonl/arrow/csv files)"
    try:
        import datasets
        if data_files:
            files = [os.path.abspath(f) for f in local_files(data_files, src.config, src.split)]
            formats = {_FORMATS[os.path.splitext(f)[1]] for f in files}
            if len(formats) > 1:
                raise ValueError(f"mixed formats {sorted(formats)} under {data_files}")
            ds = datasets.load_dataset(formats.pop(), data_files=files, split="train", cache_dir=cache_dir)
            where = data_files
        else:
            offline = os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")
            if not offline and not hub_online():
                raise UserError(f"zero-shot dataset {name}: the Hugging Face hub cannot be reached; {hint}")
            if src.path.startswith("https://"):
                ds = datasets.load_dataset("json", data_files=src.path, split="train", cache_dir=cache_dir)
            elif src.revision:
                ds = datasets.load_dataset(src.path, data_files=f"{src.config}/{src.split}/*.parquet",
                                           revision=src.revision, split="train", cache_dir=cache_dir)
            else:
                ds = datasets.load_dataset(src.path, src.config, split=src.split, cache_dir=cache_dir)
            where = src.path
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"cannot load zero-shot dataset {name} from {data_files or src.path} ({_one_line(e)}); {hint}")
    if src.column not in ds.column_names:
        raise UserError(f"zero-shot dataset {name}: no column {src.column!r} in {where} (columns: "
                        f"{', '.join(ds.column_names)}); pass --data_files {name}=PATH with the {src.column!r} column")
    if src.last and len(ds) > src.last:
        ds = ds.select(range(len(ds) - src.last, len(ds)))
    texts = ["" if t is None else t for t in ds[src.column]]
    if not texts:
        raise UserError(f"zero-shot dataset {name}: {where} holds no documents; pass --data_files {name}=PATH")
    detokenize = DETOKENIZERS[src.detokenizer] if src.detokenizer else None
    return [detokenize(t) for t in texts] if detokenize else texts


# ---- windows ----------------------------------------------------------------------------------------------
def wrap(token_lists, seq_len, bos, eos, doc_eos=False, batch_docs=1000, shards=1, frame=True):
    """(n, seq_len) int64 windows [BOS] chunk [EOS], as the papers' `_group_texts` under `datasets.map`: the
    documents (each + [eos] if doc_eos) are split into `shards` contiguous shards (sizes differ by at most one,
    the larger first), each shard into batches of `batch_docs` documents (None: the whole shard); each batch is
    concatenated and cut into chunks of seq_len - 2 tokens, its remainder dropped. Shard by shard, batch by
    batch, in order. frame=False: chunks of seq_len tokens, no BOS/EOS (insert_special_tokens=False)."""
    if seq_len < (3 if frame else 1):
        raise UserError(f"seq_len {seq_len}: a zero-shot window needs at least 3 tokens (BOS, text, EOS)")
    docs = [list(t) + [eos] if doc_eos else list(t) for t in token_lists]
    body, n, total = seq_len - 2 * frame, len(docs), sum(map(len, docs))
    what = "seq_len - 2" if frame else "seq_len"
    if total < body:
        raise UserError(f"only {total} tokens, fewer than the {body} ({what}) of one window")
    shards = max(1, min(shards, n))
    chunks = []
    for s in range(shards):
        lo = (n // shards) * s + min(s, n % shards)
        hi = lo + n // shards + (s < n % shards)
        step = batch_docs or max(hi - lo, 1)
        for b in range(lo, hi, step):
            flat = np.fromiter(itertools.chain.from_iterable(docs[b:min(b + step, hi)]), dtype=np.int64)
            k = len(flat) // body
            if k:
                chunks.append(flat[:k * body].reshape(k, body))
    if not chunks:
        raise UserError(f"no batch of {batch_docs} documents holds the {body} ({what}) tokens of one window")
    chunks = np.concatenate(chunks)
    if not frame:
        return chunks
    out = np.empty((len(chunks), seq_len), dtype=np.int64)
    out[:, 0], out[:, -1], out[:, 1:-1] = bos, eos, chunks
    return out


def zero_shot_windows(name, encode, seq_len, bos, eos, data_files=None, doc_eos=None, batch_docs=1000, shards=1,
                      cache_dir=None, frame=True):
    """(windows, number of documents) of a zero-shot dataset: load_texts, encode each document alone (encode:
    text -> list of ids, e.g. tiktoken's GPT-2 encode_ordinary), wrap (doc_eos None: the dataset's default)."""
    texts = load_texts(name, data_files, cache_dir=cache_dir)
    doc_eos = _source(name).doc_eos if doc_eos is None else doc_eos
    try:
        windows = wrap([encode(t) for t in texts], seq_len, bos, eos, doc_eos, batch_docs, shards, frame)
    except UserError as e:
        raise UserError(f"zero-shot dataset {name} ({len(texts)} documents): {e}")
    return windows, len(texts)


# ---- command line -------------------------------------------------------------------------------------------
def parse_names(spec):
    """"ptb,lm1b" -> ["ptb", "lm1b"] ("all": every dataset, in DATASETS order); UserError on an unknown name."""
    names = list(DATASETS) if spec.strip() == "all" else [s.strip() for s in spec.split(",") if s.strip()]
    if not names:
        raise UserError("--zero_shot needs dataset names: " + ",".join(DATASETS))
    for name in names:
        _source(name)
    return names


def parse_data_files(spec):
    """"ptb=/x/ptb.parquet,lm1b=/y" -> {"ptb": "/x/ptb.parquet", "lm1b": "/y"} ("" -> {}); UserError on a piece
    without NAME=PATH, an unknown or repeated name."""
    out = {}
    for piece in filter(None, (p.strip() for p in (spec or "").split(","))):
        name, sep, path = (s.strip() for s in piece.partition("="))
        if not sep or not name or not path:
            raise UserError(f"--data_files: {piece!r} is not NAME=PATH (e.g. ptb=/data/ptb.parquet,lm1b=/data/lm1b)")
        _source(name)
        if name in out:
            raise UserError(f"--data_files: {name} is given twice")
        out[name] = path
    return out
