"""
Prepare OpenWebText, or your own corpus, as GPT-2 BPE tokens for training.

Every document is tokenised with a tiktoken BPE (`encode_ordinary`, so text that looks like a
special token is encoded as plain text) and followed by the end-of-text token (GPT-2: 50256).
A small random share of the documents goes to the validation split; the rest is train.

Writes to the output dir:
    train.bin, val.bin   the token ids of all documents of the split, back to back, as a flat
                         np.uint16 array (read it with np.memmap(path, dtype=np.uint16, mode='r'))
    meta.pkl             {'vocab_size': encoding.n_vocab,       # GPT-2: 50257; the mask id is vocab_size
                          'tiktoken': {'name', 'pat_str', 'mergeable_ranks', 'special_tokens'},
                          'eot_token': id,                      # GPT-2: 50256
                          'n_tokens': {'train': n, 'val': n}}
                         meta['tiktoken'] rebuilds the tokenizer offline: tiktoken.Encoding(**meta['tiktoken'])
Each .bin is written under a temp name and renamed when both are complete; meta.pkl is written
last, so its presence means the dataset is complete (a .bin without meta.pkl is not finished).
A run first deletes meta.pkl and the old train.bin / val.bin in the output dir.

Sources (one of):
    (default)              the Hugging Face dataset 'openwebtext' (split train), into data/openwebtext/;
                           val = 0.05% of the documents (seed 2357), as nanoGPT splits it
    --input PATH [PATH ...]  local files: .txt (the whole file is one document; with --txt_lines
                           every non-empty line is one), .jsonl (one JSON object per line, text in
                           --text_column) or .parquet (column --text_column). Documents that are
                           empty or only whitespace are skipped.
    --hf_dataset NAME      any Hugging Face dataset (--hf_config, --hf_split), text in --text_column
For --input and --hf_dataset, --out DIR is required (train with the dir's name as the dataset).

The validation split: ceil(val_fraction * n_documents) documents, at least 1, and at most
n_documents - 1 so that train keeps at least one (a corpus needs 2 documents or more). The
documents are picked by the permutation np.random.default_rng(seed).permutation(n_documents),
the same rule as datasets' train_test_split(test_size=..., seed=seed): its first n_val entries
are val. Hugging Face splits keep that shuffled order; local files keep the file order.

The tokenizer: --encoding NAME (a tiktoken encoding, default gpt2; tiktoken downloads its BPE
file once and caches it), or --encoding_file PATH: a tiktoken Encoding saved as a pickle of its
constructor kwargs (a dict name, pat_str, mergeable_ranks, special_tokens; a meta.pkl written by
this script works too), for a custom BPE or an offline machine. The encoding needs the special
token <|endoftext|> and ids below 65536 (they are stored as uint16).

Examples:
    python data/prepare_openwebtext.py                                   # OpenWebText (needs the HF hub or its cache)
    python data/prepare_openwebtext.py --input books/*.txt --out data/books
    python data/prepare_openwebtext.py --input tweets.txt --txt_lines --out data/tweets --val_fraction 0.01
    python data/prepare_openwebtext.py --input a.jsonl b.parquet --text_column content --out data/mix
    python data/prepare_openwebtext.py --hf_dataset roneneldan/TinyStories --out data/tinystories

From Python (run from the repo root), with any tiktoken.Encoding:
    from data.prepare_openwebtext import prepare
    prepare(['train doc', 'another'], ['val doc'], 'data/mine', tiktoken.get_encoding('gpt2'))
"""

import argparse
import json
import math
import os
import pickle
import sys
import time

import numpy as np
import tiktoken
from tqdm import tqdm

DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'openwebtext')
OWT_DATASET = 'openwebtext'
OWT_VAL_FRACTION = 0.0005    # 0.05% of the documents: about 4,000 of OpenWebText's 8 million
SEED = 2357
SPLITS = ('train', 'val')
MAX_ID = int(np.iinfo(np.uint16).max)  # 65535: the ids are stored as uint16
EOT = '<|endoftext|>'
EXTENSIONS = ('.txt', '.jsonl', '.parquet')
BATCH_DOCS = 1024            # documents tokenised at a time
MAX_SHARDS = 1024            # a Hugging Face split is copied into its .bin in up to this many pieces
HF_HINT = ('run once with network access so that it is in the Hugging Face cache, '
           'or pass --input with local files')


class PrepareError(Exception):
    """A problem the user can fix (bad input, no network); main() prints it as one line."""


def _one_line(e, limit=300):
    """An exception as 'Type: message', on one line and not too long."""
    msg = ' '.join(str(e).split())
    msg = msg if len(msg) <= limit else msg[:limit] + '...'
    return f'{type(e).__name__}: {msg}' if msg else type(e).__name__


# -----------------------------------------------------------------------------
# the tokenizer

def encoding_kwargs(encoding):
    """The keyword arguments that rebuild encoding: tiktoken.Encoding(**encoding_kwargs(encoding))."""
    return {'name': encoding.name, 'pat_str': encoding._pat_str,
            'mergeable_ranks': encoding._mergeable_ranks, 'special_tokens': encoding._special_tokens}


def save_encoding_file(encoding, path):
    """Save encoding for --encoding_file: a pickle of its constructor kwargs."""
    _atomic_write(path, lambda f: pickle.dump(encoding_kwargs(encoding), f))


def load_encoding(name='gpt2', path=None):
    """A tiktoken encoding by name, or from path (a pickle of its kwargs, or a meta.pkl from this script)."""
    if path is None:
        try:
            return tiktoken.get_encoding(name)
        except Exception as e:  # no network and no cached BPE file, or an unknown name
            raise PrepareError(
                f'cannot load the tiktoken encoding {name!r} ({_one_line(e, 150)}); tiktoken downloads its '
                f'BPE file once and caches it: run once with network access, set TIKTOKEN_CACHE_DIR to a '
                f'cache that has it, or pass --encoding_file') from None
    if not os.path.isfile(path):
        raise PrepareError(f'encoding file not found: {path}')
    try:
        with open(path, 'rb') as f:
            kwargs = pickle.load(f)
        if isinstance(kwargs, dict) and isinstance(kwargs.get('tiktoken'), dict):
            kwargs = kwargs['tiktoken']  # a meta.pkl
        return tiktoken.Encoding(**kwargs)
    except Exception as e:
        raise PrepareError(f'{path}: not a tiktoken Encoding saved as a pickle of its constructor kwargs '
                           f'(name, pat_str, mergeable_ranks, special_tokens) ({_one_line(e, 150)})') from None


def check_encoding(encoding):
    """Refuse an encoding without <|endoftext|> or with ids that do not fit uint16."""
    if EOT not in encoding._special_tokens:
        raise PrepareError(f'the encoding {encoding.name!r} has no {EOT} special token, needed to end each document')
    if encoding.max_token_value > MAX_ID:
        raise PrepareError(f'the encoding {encoding.name!r} has token id {encoding.max_token_value:,}, '
                           f'which does not fit the uint16 .bin files (ids must be below {MAX_ID + 1:,})')


# -----------------------------------------------------------------------------
# reading the documents

def val_count(n_docs, val_fraction):
    """Number of validation documents: ceil(val_fraction * n_docs), kept within 1 .. n_docs - 1."""
    if n_docs < 2:
        raise PrepareError(f'the corpus has {n_docs} document{"" if n_docs == 1 else "s"}; at least 2 are '
                           f'needed (one for train, one for val); with one .txt file, --txt_lines makes '
                           f'every line a document')
    return min(max(math.ceil(val_fraction * n_docs), 1), n_docs - 1)


def val_mask(n_docs, n_val, seed=SEED):
    """Boolean array marking the val documents: the first n_val entries of the seeded permutation."""
    is_val = np.zeros(n_docs, dtype=bool)
    is_val[np.random.default_rng(seed).permutation(n_docs)[:n_val]] = True
    return is_val


def check_inputs(paths, text_column):
    """Fail early on a missing file, an unsupported extension or a parquet file without the column."""
    for path in paths:
        ext = os.path.splitext(path)[1].lower()
        if ext not in EXTENSIONS:
            raise PrepareError(f'{path}: unsupported file type {ext or "(no extension)"!r}; '
                               f'use {", ".join(EXTENSIONS)}')
        if not os.path.isfile(path):
            raise PrepareError(f'input file not found: {path}')
        if ext == '.parquet':
            import pyarrow.parquet as pq
            try:
                columns = pq.ParquetFile(path).schema_arrow.names
            except Exception as e:
                raise PrepareError(f'{path}: cannot read parquet ({_one_line(e, 150)})') from None
            if text_column not in columns:
                raise PrepareError(f'{path}: no column {text_column!r} (columns: {", ".join(columns)}); '
                                   f'pick one with --text_column')


def _lines(path):
    """Yield (line number, line without its end) of a UTF-8 file; lines end at \\n only."""
    try:
        with open(path, encoding='utf-8', newline='\n') as f:
            for lineno, line in enumerate(f, 1):
                yield lineno, line.rstrip('\r\n')
    except UnicodeDecodeError as e:
        raise PrepareError(f'{path}: not UTF-8 text ({_one_line(e, 150)})') from None


def json_objects(path):
    """Yield (line number, object) for each non-blank line of a JSON-lines file; a line that is not a JSON object is a
    PrepareError naming it."""
    for lineno, line in _lines(path):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise PrepareError(f'{path}:{lineno}: invalid JSON ({e.msg})') from None
        if not isinstance(obj, dict):
            raise PrepareError(f'{path}:{lineno}: expected a JSON object, got {type(obj).__name__}')
        yield lineno, obj


def iter_file_documents(path, text_column='text', txt_lines=False):
    """Yield the non-blank documents of one .txt / .jsonl / .parquet file (see the module docstring)."""
    ext = os.path.splitext(path)[1].lower()
    if ext == '.txt' and not txt_lines:
        try:
            with open(path, encoding='utf-8', newline='') as f:
                text = f.read()  # the whole file, line ends untouched
        except UnicodeDecodeError as e:
            raise PrepareError(f'{path}: not UTF-8 text ({_one_line(e, 150)})') from None
        if text.strip():
            yield text
    elif ext == '.txt':
        yield from (line for _, line in _lines(path) if line.strip())
    elif ext == '.jsonl':
        for lineno, obj in json_objects(path):
            if text_column not in obj:
                raise PrepareError(f'{path}:{lineno}: no field {text_column!r} (fields: {", ".join(obj)}); '
                                   f'pick one with --text_column')
            text = obj[text_column]
            if text is not None and not isinstance(text, str):
                raise PrepareError(f'{path}:{lineno}: field {text_column!r} is {type(text).__name__}, not a string')
            if text and text.strip():
                yield text
    elif ext == '.parquet':
        import pyarrow.parquet as pq
        for batch in pq.ParquetFile(path).iter_batches(columns=[text_column]):
            for text in batch.column(0).to_pylist():
                if text is not None and not isinstance(text, str):
                    raise PrepareError(f'{path}: column {text_column!r} holds {type(text).__name__}, not strings')
                if text and text.strip():
                    yield text
    else:
        raise PrepareError(f'{path}: unsupported file type {ext!r}; use {", ".join(EXTENSIONS)}')


def iter_documents(paths, text_column='text', txt_lines=False):
    """Yield the documents of all the files, in order."""
    for path in paths:
        yield from iter_file_documents(path, text_column, txt_lines)


def local_splits(paths, text_column='text', txt_lines=False, val_fraction=OWT_VAL_FRACTION, seed=SEED):
    """Split local files into (train documents, val documents), two iterables of str.

    A first pass reads (and so checks) every file and counts the documents; iterating the
    returned objects reads the files again, so that a large corpus never has to fit in memory.
    """
    check_inputs(paths, text_column)
    # this bar shows on a terminal only and is erased when done: an input error stays a one-line message
    with tqdm(iter_documents(paths, text_column, txt_lines), desc='reading', unit=' docs',
              leave=False, disable=None) as docs:
        n_docs = sum(1 for _ in docs)
    if n_docs == 0:
        raise PrepareError(f'empty corpus: no non-blank documents in {", ".join(paths)}')
    is_val = val_mask(n_docs, val_count(n_docs, val_fraction), seed)

    return (_Documents(paths, text_column, txt_lines, ~is_val),
            _Documents(paths, text_column, txt_lines, is_val))


class _Documents:
    """The documents of local files whose entry in keep is True: iterable (re-reads the files), with a len."""

    def __init__(self, paths, text_column, txt_lines, keep):
        self.paths, self.text_column, self.txt_lines, self.keep = paths, text_column, txt_lines, keep

    def __len__(self):
        return int(self.keep.sum())

    def __iter__(self):
        for doc, keep in zip(iter_documents(self.paths, self.text_column, self.txt_lines), self.keep):
            if keep:
                yield doc


def hf_splits(name, config=None, split='train', text_column='text', val_fraction=OWT_VAL_FRACTION,
              seed=SEED, num_proc=1):
    """Load a Hugging Face dataset split and split it into (train, val) datasets.Dataset objects."""
    import datasets
    what = f'{name!r}' + (f' (config {config!r})' if config else '') + f' split {split!r}'
    try:
        ds = datasets.load_dataset(name, config, split=split, num_proc=num_proc)
    except Exception as e:  # offline, not on the hub, a bad config or split name, a legacy script dataset...
        raise PrepareError(f'could not load the Hugging Face dataset {what} ({_one_line(e, 200)}): {HF_HINT}') from None
    if text_column not in ds.column_names:
        raise PrepareError(f'the Hugging Face dataset {what} has no column {text_column!r} '
                           f'(columns: {", ".join(ds.column_names)}); pick one with --text_column')
    if len(ds) == 0:
        raise PrepareError(f'empty corpus: the Hugging Face dataset {what} has no rows')
    n_val = val_count(len(ds), val_fraction)  # = ceil(test_size * n), as train_test_split computes it
    parts = ds.train_test_split(test_size=n_val, seed=seed, shuffle=True)
    return parts['train'], parts['test']  # 'test' is our val


# -----------------------------------------------------------------------------
# tokenising and writing

def _tokenize_batch(batch, encoding, text_column):
    """datasets.map function: texts -> uint16 ids with end-of-text appended, and their lengths."""
    eot = encoding.eot_token
    ids = [np.array(encoding.encode_ordinary(text or '') + [eot], dtype=np.uint16) for text in batch[text_column]]
    return {'ids': ids, 'len': [len(x) for x in ids]}


def write_dataset_split(ds, path, encoding, text_column='text', num_proc=1, desc=''):
    """Tokenise a datasets.Dataset in parallel and write its ids to path; return (n_docs, n_tokens).

    The dataset is tokenised with map (batched, num_proc processes; cached by datasets), then the
    ids are copied into a uint16 memmap of the exact total size, a contiguous shard at a time.
    """
    check_encoding(encoding)  # the map below stores uint16 ids
    if text_column not in ds.column_names:
        raise PrepareError(f'no column {text_column!r} in the dataset (columns: {", ".join(ds.column_names)})')
    if len(ds) == 0:
        raise PrepareError(f'{desc or path}: no documents')
    tokenized = ds.map(_tokenize_batch, batched=True, batch_size=BATCH_DOCS,
                       fn_kwargs={'encoding': encoding, 'text_column': text_column},
                       remove_columns=ds.column_names, num_proc=num_proc if num_proc > 1 else None,
                       desc=f'tokenizing {desc}')
    n_tokens = int(tokenized.with_format('numpy', columns=['len'])[:]['len'].sum())  # [:]: one bulk read
    out = np.memmap(path, dtype=np.uint16, mode='w+', shape=(n_tokens,))
    num_shards = min(MAX_SHARDS, len(tokenized))
    pos = 0
    for i in tqdm(range(num_shards), desc=f'writing {desc}', unit=' shards'):
        shard = tokenized.shard(num_shards=num_shards, index=i, contiguous=True)
        ids = np.concatenate(shard.with_format('numpy', columns=['ids'])[:]['ids'])
        out[pos:pos + len(ids)] = ids
        pos += len(ids)
    out.flush()
    del out
    assert pos == n_tokens, (pos, n_tokens)
    return len(tokenized), n_tokens


def write_iterable_split(documents, path, encoding, num_proc=1, desc=''):
    """Tokenise an iterable of str (BATCH_DOCS at a time, num_proc threads) and append the ids to path.

    Returns (n_docs, n_tokens).
    """
    check_encoding(encoding)
    if isinstance(documents, (str, bytes)):
        raise TypeError('documents must be an iterable of str (one per document), not a single string')
    eot = encoding.eot_token
    total = len(documents) if hasattr(documents, '__len__') else None
    n_docs = n_tokens = 0
    with open(path, 'wb') as f, tqdm(total=total, desc=f'tokenizing {desc}', unit=' docs') as bar:
        for batch in _batches(documents, BATCH_DOCS):
            for i, doc in enumerate(batch):
                if not isinstance(doc, str):
                    raise PrepareError(f'{desc or path}: document {n_docs + i} is {type(doc).__name__}, not str')
            flat = []
            for ids in encoding.encode_ordinary_batch(batch, num_threads=max(1, num_proc)):
                flat.extend(ids)
                flat.append(eot)
            f.write(np.array(flat, dtype=np.uint16).tobytes())
            n_docs, n_tokens = n_docs + len(batch), n_tokens + len(flat)
            bar.update(len(batch))
    if n_docs == 0:
        raise PrepareError(f'{desc or path}: no documents')
    return n_docs, n_tokens


def _batches(items, size):
    """Lists of up to size consecutive items."""
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _is_hf_dataset(documents):
    # datasets is slow to import; if nobody imported it, documents cannot be a datasets.Dataset
    return 'datasets' in sys.modules and isinstance(documents, sys.modules['datasets'].Dataset)


def _atomic_write(path, write_fn):
    """Write a file via a temp name in the same dir, then rename it into place."""
    tmp = f'{path}.tmp{os.getpid()}'
    try:
        with open(tmp, 'wb') as f:
            write_fn(f)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _remove_old_outputs(out_dir):
    """Delete meta.pkl first (it marks a complete dataset), then the old .bin files and stale temp files."""
    names = ['meta.pkl'] + [f'{split}.bin' for split in SPLITS]
    names += sorted(n for n in os.listdir(out_dir) if n.startswith(tuple(f'{s}.bin.tmp' for s in SPLITS)))
    for name in names:
        path = os.path.join(out_dir, name)
        if os.path.exists(path):
            os.remove(path)


def prepare(documents_train, documents_val, out_dir, encoding, *, text_column='text', num_proc=1):
    """Tokenise two splits of documents into out_dir/train.bin, val.bin and meta.pkl; return the token counts.

    documents_train, documents_val: iterables of str (one per document) or datasets.Dataset objects
    with the text in text_column. encoding: any tiktoken.Encoding with <|endoftext|> and ids < 65536.
    Raises PrepareError for problems the user can fix.
    """
    t0 = time.time()
    check_encoding(encoding)
    os.makedirs(out_dir, exist_ok=True)
    _remove_old_outputs(out_dir)

    sizes, tmp_paths = {}, {}
    try:
        for split, documents in zip(SPLITS, (documents_train, documents_val)):
            final = os.path.join(out_dir, f'{split}.bin')
            tmp_paths[split] = tmp = f'{final}.tmp{os.getpid()}'
            if _is_hf_dataset(documents):
                sizes[split] = write_dataset_split(documents, tmp, encoding, text_column, num_proc, split)
            else:
                sizes[split] = write_iterable_split(documents, tmp, encoding, num_proc, split)
        for split, tmp in tmp_paths.items():
            os.replace(tmp, os.path.join(out_dir, f'{split}.bin'))
    finally:
        for tmp in tmp_paths.values():
            if os.path.exists(tmp):
                os.remove(tmp)

    n_tokens = {split: n for split, (_, n) in sizes.items()}
    meta = {'vocab_size': encoding.n_vocab, 'tiktoken': encoding_kwargs(encoding),
            'eot_token': encoding.eot_token, 'n_tokens': n_tokens}
    _atomic_write(os.path.join(out_dir, 'meta.pkl'), lambda f: pickle.dump(meta, f))

    for split, (docs, n) in sizes.items():
        print(f'{split}: {docs:,} document{"" if docs == 1 else "s"}, {n:,} tokens')
    print(f'wrote {out_dir} (encoding {encoding.name}, vocab_size {encoding.n_vocab:,}, uint16) '
          f'in {time.time() - t0:.1f}s')
    return n_tokens


# -----------------------------------------------------------------------------

def main(argv=None):
    parser = argparse.ArgumentParser(
        description='Tokenise OpenWebText (default) or your own corpus with a tiktoken BPE (GPT-2 by default) '
                    'into train.bin / val.bin (flat uint16 ids, end-of-text after every document) plus meta.pkl.',
        epilog='meta.pkl is written last: a .bin without meta.pkl is not a finished dataset.')
    src = parser.add_argument_group('source (default: the Hugging Face dataset openwebtext)')
    src_x = src.add_mutually_exclusive_group()
    src_x.add_argument('--input', metavar='PATH', nargs='+',
                       help='local .txt (one document per file), .jsonl (one JSON object per line) '
                            'or .parquet files; blank documents are skipped')
    src_x.add_argument('--hf_dataset', metavar='NAME', help='a Hugging Face dataset name instead of openwebtext')
    src.add_argument('--hf_config', metavar='C', default=None, help='its config name (default: none)')
    src.add_argument('--hf_split', metavar='S', default=None, help='its split to read (default: train)')
    src.add_argument('--txt_lines', action='store_true',
                     help='with --input: every non-empty line of a .txt file is one document')
    src.add_argument('--text_column', metavar='COL', default='text',
                     help='the text field of .jsonl / .parquet / Hugging Face data (default: %(default)s)')
    parser.add_argument('--out', metavar='DIR', default=None,
                        help=f'output directory (default for openwebtext: {DEFAULT_OUT}; '
                             f'required with --input / --hf_dataset)')
    parser.add_argument('--val_fraction', type=float, default=OWT_VAL_FRACTION,
                        help='share of the documents for val: ceil(fraction * n), at least 1, '
                             'and train keeps at least 1 (default: %(default)s)')
    parser.add_argument('--seed', type=int, default=SEED, help='seed of the val split (default: %(default)s)')
    tok = parser.add_mutually_exclusive_group()
    tok.add_argument('--encoding', metavar='NAME', default=None,
                     help='tiktoken encoding name (default: gpt2; downloaded once by tiktoken, then cached)')
    tok.add_argument('--encoding_file', metavar='PATH', default=None,
                     help='a tiktoken Encoding saved as a pickle of its constructor kwargs '
                          '(name, pat_str, mergeable_ranks, special_tokens), or a meta.pkl from this script')
    parser.add_argument('--num_proc', type=int, default=min(8, os.cpu_count() or 1),
                        help='processes for loading / tokenising Hugging Face data, threads for local files '
                             '(default: %(default)s)')
    args = parser.parse_args(argv)

    custom = args.input is not None or args.hf_dataset is not None
    if custom and args.out is None:
        parser.error('--out DIR is required with --input / --hf_dataset (e.g. --out data/mycorpus)')
    if args.txt_lines and args.input is None:
        parser.error('--txt_lines needs --input')
    if (args.hf_config or args.hf_split) and args.input is not None:
        parser.error('--hf_config / --hf_split go with --hf_dataset (or the default openwebtext), not --input')
    if not 0 < args.val_fraction < 1:
        parser.error(f'--val_fraction must be between 0 and 1 (exclusive), got {args.val_fraction}')
    if args.num_proc < 1:
        parser.error('--num_proc must be at least 1')

    try:
        encoding = load_encoding(args.encoding or 'gpt2', args.encoding_file)
        check_encoding(encoding)  # before reading a large corpus
        if args.input is not None:
            train_docs, val_docs = local_splits(args.input, args.text_column, args.txt_lines,
                                                args.val_fraction, args.seed)
        else:
            train_docs, val_docs = hf_splits(args.hf_dataset or OWT_DATASET, args.hf_config, args.hf_split or 'train',
                                             args.text_column, args.val_fraction, args.seed, args.num_proc)
        prepare(train_docs, val_docs, args.out or DEFAULT_OUT, encoding,
                text_column=args.text_column, num_proc=args.num_proc)
    except (PrepareError, OSError) as e:  # OSError: e.g. an unwritable --out or a full disk
        print(f'error: {e}', file=sys.stderr)
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
