"""
Prepare prompt -> answer pairs as a pair dataset for conditional training (LLaDA-style SFT rows).

Every pair becomes one row of seq_len token ids:

    prompt ids | answer ids | end-of-answer | end-of-answer ... (padding up to seq_len)

The padding is end-of-answer ids too and counts as answer: a model learns to fill the answer part
of a row, its end and its padding, given the prompt. Each row's prompt length is stored with it.
A pair whose prompt + answer + one end-of-answer does not fit seq_len is dropped and counted;
more than --max_dropped of a split's pairs dropped is an error.

Sources (one of):
    --input PATH [PATH ...]  .jsonl (one JSON object per line), .csv (a header row) or .parquet files
                             with a prompt and an answer column (--prompt_column, --answer_column)
    --hf_dataset NAME        a Hugging Face dataset (or a local folder of data files), its --hf_split
    --task NAME              a built-in task of data/tasks.py (path_star, sudoku, countdown, addition...):
                             --n_train / --n_test pairs, --seed, and the task's own parameters as options
                             (`--task NAME --help` lists them, e.g. --digits for addition)
The test split: --test PATH [PATH ...] (files as --input), else the task's own disjoint split, else
--test_fraction of the distinct prompts, chosen by --seed (the first ceil(fraction * n) entries of
np.random.default_rng(seed).permutation(n) over the distinct prompts in order of first appearance;
at least 1, and train keeps at least 1): every pair of a chosen prompt is test, so no test prompt
is in train. Both splits keep the input order. Answers may not be empty; prompts may.

Tokenizers (--tokenizer):
    chars  (default for --task) the sorted set of the characters of all pairs, ids 0..V-1 as
           nanoGPT's shakespeare_char (meta itos / stoi); end-of-answer is V; vocab_size V + 1
    gpt2   (default otherwise) a tiktoken BPE: --encoding NAME (default gpt2) or --encoding_file PATH
           (as prepare_openwebtext.py); prompt and answer are encoded apart with encode_ordinary;
           end-of-answer is <|endoftext|> (GPT-2: 50256); vocab_size is the encoding's (GPT-2: 50257)
The mask id of a diffusion model is vocab_size, as for the other datasets.

--seq_len: default the smallest multiple of 8 that holds the longest pair of both splits plus its
end-of-answer (so nothing is dropped).

Writes to --out DIR (default data/<task name>, data/<stem of the first input> or data/<dataset name>):
    train.npy, test.npy                       (N, seq_len) ids, uint16 (uint32 if vocab_size > 65535)
    train_prompt_len.npy, test_prompt_len.npy (N,) int32: the prompt length of each row
    test_pairs.jsonl                          the test pairs kept, {"prompt": ..., "answer": ...} a line
    meta.pkl  {'vocab_size', 'pairs': True, 'tokenizer': 'chars' | 'gpt2', 'eoa_id', 'seq_len',
               'itos', 'stoi' (chars) or 'tiktoken', 'eot_token' (gpt2, as prepare_openwebtext.py),
               'task': {'name', 'params', 'seed', 'n_train', 'n_test'} or None,
               'counts': {'train': n, 'test': n}, 'dropped': {'train': n, 'test': n}}
Every file is written under a temp name and renamed; meta.pkl goes first at the start of a run
and is written last, so its presence means the dataset is complete.

Examples:
    python data/prepare_pairs.py --input qa.jsonl --out data/qa
    python data/prepare_pairs.py --input a.csv b.parquet --test held_out.jsonl --tokenizer chars
    python data/prepare_pairs.py --hf_dataset NAME --prompt_column question --answer_column answer --out data/q
    python data/prepare_pairs.py --task addition --n_train 100000 --n_test 1000 --digits 3

At answer time: encode_prompt(meta, text) encodes a prompt with the stored tokenizer (ValueError,
one line, for a character outside a chars vocabulary); decode_answer(meta, ids) reads an answer back.
"""

import argparse
import ast
import csv
import json
import math
import os
import pickle
import sys
import time

import numpy as np
from tqdm import tqdm

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from data.prepare_openwebtext import PrepareError, encoding_kwargs, json_objects, load_encoding  # noqa: E402

DATA_DIR = os.path.dirname(os.path.abspath(__file__))
EXTENSIONS = ('.jsonl', '.csv', '.parquet')
EOT = '<|endoftext|>'
TEST_FRACTION = 0.05
MAX_DROPPED = 0.01
SEED = 1337
SPLITS = ('train', 'test')
OUTPUTS = ('train.npy', 'train_prompt_len.npy', 'test.npy', 'test_prompt_len.npy', 'test_pairs.jsonl')


def _one_line(e, limit=200):
    """An exception as 'Type: message', on one line and not too long."""
    msg = ' '.join(str(e).split())
    msg = msg if len(msg) <= limit else msg[:limit] + '...'
    return f'{type(e).__name__}: {msg}' if msg else type(e).__name__


# -----------------------------------------------------------------------------
# reading the pairs

def _pair(prompt, answer, where, prompt_column, answer_column):
    """Check one pair's types and that the answer is not empty; where names it in the error."""
    for column, value in ((prompt_column, prompt), (answer_column, answer)):
        if value is not None and not isinstance(value, str):
            raise PrepareError(f'{where}: {column!r} is {type(value).__name__}, not a string')
    if not answer:
        raise PrepareError(f'{where}: empty answer ({answer_column!r})')
    return prompt or '', answer


def _missing(where, columns, prompt_column, answer_column):
    missing = [c for c in (prompt_column, answer_column) if c not in columns]
    if missing:
        raise PrepareError(f'{where}: no column {missing[0]!r} (columns: {", ".join(map(str, columns)) or "none"}); '
                           f'pick them with --prompt_column / --answer_column')


def read_file_pairs(path, prompt_column='prompt', answer_column='answer'):
    """The (prompt, answer) pairs of one .jsonl / .csv / .parquet file, in order."""
    ext = os.path.splitext(path)[1].lower()
    if ext not in EXTENSIONS:
        raise PrepareError(f'{path}: unsupported file type {ext or "(no extension)"!r}; use {", ".join(EXTENSIONS)}')
    if not os.path.isfile(path):
        raise PrepareError(f'input file not found: {path}')
    cols = (prompt_column, answer_column)
    pairs = []
    try:
        if ext == '.jsonl':
            for lineno, obj in json_objects(path):
                _missing(f'{path}:{lineno}', list(obj), *cols)
                pairs.append(_pair(obj[prompt_column], obj[answer_column], f'{path}:{lineno}', *cols))
        elif ext == '.csv':
            csv.field_size_limit(2 ** 31 - 1)
            with open(path, encoding='utf-8', newline='') as f:
                reader = csv.DictReader(f)
                _missing(path, reader.fieldnames or [], *cols)
                for row, record in enumerate(reader, 1):
                    where = f'{path}: row {row} (line {reader.line_num})'
                    pairs.append(_pair(record[prompt_column], record[answer_column], where, *cols))
        else:
            import pyarrow.parquet as pq
            try:
                table = pq.read_table(path)
            except Exception as e:
                raise PrepareError(f'{path}: cannot read parquet ({_one_line(e)})') from None
            _missing(path, table.column_names, *cols)
            prompts, answers = table.column(prompt_column).to_pylist(), table.column(answer_column).to_pylist()
            for row, (p, a) in enumerate(zip(prompts, answers), 1):
                pairs.append(_pair(p, a, f'{path}: row {row}', *cols))
    except UnicodeDecodeError as e:
        raise PrepareError(f'{path}: not UTF-8 text ({_one_line(e, 150)})') from None
    except csv.Error as e:
        raise PrepareError(f'{path}: cannot read CSV ({_one_line(e)})') from None
    if not pairs:
        raise PrepareError(f'{path}: no pairs')
    return pairs


def read_files(paths, prompt_column='prompt', answer_column='answer'):
    """The pairs of all the files, in order."""
    pairs = []
    for path in tqdm(paths, desc='reading', unit=' files', leave=False, disable=None):
        pairs += read_file_pairs(path, prompt_column, answer_column)
    return pairs


def read_hf_dataset(name, config=None, split='train', prompt_column='prompt', answer_column='answer'):
    """The pairs of a Hugging Face dataset split (a hub name or a local folder of data files)."""
    import datasets
    what = f'the Hugging Face dataset {name!r}' + (f' (config {config!r})' if config else '') + f' split {split!r}'
    try:
        ds = datasets.load_dataset(name, config, split=split)
    except Exception as e:  # offline, not on the hub, a bad config or split name...
        raise PrepareError(f'could not load {what} ({_one_line(e)}): run once with network access so that it is '
                           f'in the Hugging Face cache, or pass --input with local files') from None
    _missing(what, ds.column_names, prompt_column, answer_column)
    prompts, answers = ds[prompt_column], ds[answer_column]
    pairs = [_pair(p, a, f'{what}: row {row}', prompt_column, answer_column)
             for row, (p, a) in enumerate(zip(prompts, answers), 1)]
    if not pairs:
        raise PrepareError(f'{what}: no pairs')
    return pairs


def split_pairs(pairs, test_fraction=TEST_FRACTION, seed=SEED):
    """(train, test): the pairs of ceil(test_fraction * n) of the n distinct prompts are test (see the docstring)."""
    prompts = list(dict.fromkeys(p for p, _ in pairs))  # distinct, in order of first appearance
    n = len(prompts)
    if n < 2:
        raise PrepareError(f'{len(pairs)} pairs with {n} distinct prompt{"" if n == 1 else "s"}: at least 2 '
                           f'distinct prompts are needed to cut a test split (or pass --test FILE)')
    n_test = min(max(math.ceil(test_fraction * n), 1), n - 1)
    chosen = {prompts[i] for i in np.random.default_rng(seed).permutation(n)[:n_test]}
    return [pr for pr in pairs if pr[0] not in chosen], [pr for pr in pairs if pr[0] in chosen]


# -----------------------------------------------------------------------------
# built-in tasks (data/tasks.py, imported only when asked for)

def load_tasks():
    """The data.tasks module, or a one-line error if it is not there."""
    import importlib
    try:
        return importlib.import_module('data.tasks')
    except ModuleNotFoundError as e:
        if e.name in ('data', 'data.tasks'):
            raise PrepareError('--task needs data/tasks.py, which is not in this checkout') from None
        raise


def task_defaults(tasks, name):
    """The task's parameters and their defaults, or a one-line error naming the tasks."""
    if name not in tasks.TASKS:
        raise PrepareError(f'unknown task {name!r} (tasks: {", ".join(tasks.TASKS)})')
    return dict(tasks.TASKS[name])


def task_pairs(name, n_train, n_test, seed, params):
    """(train, test) pairs of a built-in task, from its own disjoint split."""
    tasks = load_tasks()
    task_defaults(tasks, name)
    try:
        train, test = tasks.split(name, n_train, n_test, seed, **params)
    except ValueError as e:  # tasks.py's one-line refusals: impossible parameters, too few distinct problems
        raise PrepareError(f'task {name!r}: {" ".join(str(e).split())}') from None
    checked = []
    for split, pairs in (('train', train), ('test', test)):
        checked.append([_pair(p, a, f'task {name!r} {split} pair {i}', 'prompt', 'answer')
                        for i, (p, a) in enumerate(pairs, 1)])
    return checked[0], checked[1]


def _value_parser(default):
    """An argparse type for a task parameter: the default's type (bool: true/false; None: a Python literal)."""
    if isinstance(default, bool):
        def parse_bool(s):
            if s.lower() in ('1', 'true', 'yes'):
                return True
            if s.lower() in ('0', 'false', 'no'):
                return False
            raise argparse.ArgumentTypeError(f'expected true or false, got {s!r}')
        return parse_bool
    if isinstance(default, (int, float, str)):
        return type(default)

    def parse_literal(s):
        try:
            return ast.literal_eval(s)
        except (ValueError, SyntaxError):
            return s
    return parse_literal


# -----------------------------------------------------------------------------
# the tokenizers

def build_chars(pairs):
    """The sorted characters of all the pairs: (itos, stoi)."""
    chars = sorted(set(''.join(p + a for p, a in pairs)))
    return dict(enumerate(chars)), {c: i for i, c in enumerate(chars)}


def _chars_encoder(stoi):
    def encode(text):
        try:
            return [stoi[c] for c in text]
        except KeyError as e:
            raise ValueError(f'character {e.args[0]!r} is not in the vocabulary '
                             f'({"".join(sorted(stoi))!r})') from None
    return encode


_BPE_CACHE = {}


def _bpe(meta):
    """The tiktoken Encoding stored in meta (built once per meta['tiktoken'] object)."""
    import tiktoken
    kwargs = meta['tiktoken']
    cached = _BPE_CACHE.get(id(kwargs))
    if cached is None or cached[0] is not kwargs:
        cached = _BPE_CACHE[id(kwargs)] = (kwargs, tiktoken.Encoding(**kwargs))
    return cached[1]


def encode_prompt(meta, text):
    """A prompt's ids with the tokenizer of a pair dataset's meta; ValueError (one line) for an unknown character."""
    if meta.get('stoi'):
        return _chars_encoder(meta['stoi'])(text)
    return _bpe(meta).encode_ordinary(text)


def decode_answer(meta, ids):
    """The text of answer ids, up to the first end-of-answer id."""
    ids = [int(i) for i in ids]
    if meta['eoa_id'] in ids:
        ids = ids[:ids.index(meta['eoa_id'])]
    if meta.get('itos'):
        return ''.join(meta['itos'][i] for i in ids)
    return _bpe(meta).decode(ids)


def tokenizer_meta(tokenizer, pairs, encoding=None):
    """The tokenizer's part of meta.pkl (vocab_size, eoa_id, itos/stoi or tiktoken) and an encode function."""
    if tokenizer == 'chars':
        itos, stoi = build_chars(pairs)
        meta = {'vocab_size': len(itos) + 1, 'tokenizer': 'chars', 'eoa_id': len(itos), 'itos': itos, 'stoi': stoi}
        return meta, _chars_encoder(stoi)
    if EOT not in encoding._special_tokens:
        raise PrepareError(f'the encoding {encoding.name!r} has no {EOT} special token, needed to end each answer')
    meta = {'vocab_size': encoding.n_vocab, 'tokenizer': 'gpt2', 'eoa_id': encoding._special_tokens[EOT],
            'tiktoken': encoding_kwargs(encoding), 'eot_token': encoding._special_tokens[EOT]}
    return meta, encoding.encode_ordinary


# -----------------------------------------------------------------------------
# the rows and the files

def default_seq_len(lengths):
    """The smallest multiple of 8 that holds the longest pair and its end-of-answer."""
    return 8 * math.ceil((max(lengths) + 1) / 8)


def make_rows(encoded, seq_len, eoa_id, dtype):
    """Rows (N, seq_len) of prompt | answer | end-of-answer padding, the prompt lengths (N,) int32, and the
    indices of the pairs kept (a pair longer than seq_len - 1 is dropped)."""
    kept = [i for i, (p, a) in enumerate(encoded) if len(p) + len(a) < seq_len]
    rows = np.full((len(kept), seq_len), eoa_id, dtype=dtype)
    prompt_len = np.zeros(len(kept), dtype=np.int32)
    for r, i in enumerate(kept):
        p, a = encoded[i]
        rows[r, :len(p) + len(a)] = p + a
        prompt_len[r] = len(p)
    return rows, prompt_len, kept


def _tmp(path):
    return f'{path}.tmp{os.getpid()}'


def _write_tmp(path, write_fn, tmp_paths):
    """Write path's content under its temp name (recorded in tmp_paths, renamed later)."""
    tmp_paths[path] = _tmp(path)
    with open(tmp_paths[path], 'wb') as f:
        write_fn(f)


def prepare(train_pairs, test_pairs, out_dir, tokenizer='chars', encoding=None, seq_len=None,
            max_dropped=MAX_DROPPED, task=None):
    """Write the pair dataset of two lists of (prompt, answer) to out_dir; return meta.

    tokenizer: 'chars' or 'gpt2' (then encoding: a tiktoken.Encoding with <|endoftext|>).
    seq_len: None for the default (nothing dropped). task: meta['task'] (a dict, or None).
    Raises PrepareError for problems the user can fix.
    """
    t0 = time.time()
    if not train_pairs or not test_pairs:
        raise PrepareError(f'the {"train" if not train_pairs else "test"} split has no pairs')
    meta, encode = tokenizer_meta(tokenizer, train_pairs + test_pairs, encoding)
    splits = dict(zip(SPLITS, (train_pairs, test_pairs)))
    encoded = {}
    for split, pairs in splits.items():
        encoded[split] = [(encode(p), encode(a)) for p, a in tqdm(pairs, desc=f'tokenizing {split}',
                                                                   unit=' pairs', leave=False, disable=None)]
    if seq_len is None:
        seq_len = default_seq_len([len(p) + len(a) for e in encoded.values() for p, a in e])
    if seq_len < 2:
        raise PrepareError(f'seq_len {seq_len} is too short: a row holds at least an answer and its end')
    dtype = np.uint16 if meta['vocab_size'] <= 65535 else np.uint32

    arrays, counts, dropped, kept_test = {}, {}, {}, None
    for split, e in encoded.items():
        rows, prompt_len, kept = make_rows(e, seq_len, meta['eoa_id'], dtype)
        n_dropped = len(e) - len(kept)
        print(f'{split}: {len(kept):,} pairs, {n_dropped:,} dropped (longer than seq_len {seq_len} with '
              f'their end-of-answer)')
        if n_dropped > max_dropped * len(e) or not kept:
            raise PrepareError(f'{n_dropped:,} of the {len(e):,} {split} pairs do not fit seq_len {seq_len} '
                               f'(more than --max_dropped {max_dropped}): raise --seq_len or --max_dropped')
        arrays[f'{split}.npy'], arrays[f'{split}_prompt_len.npy'] = rows, prompt_len
        counts[split], dropped[split] = len(kept), n_dropped
        if split == 'test':
            kept_test = [splits['test'][i] for i in kept]

    os.makedirs(out_dir, exist_ok=True)
    meta_path = os.path.join(out_dir, 'meta.pkl')
    if os.path.exists(meta_path):  # its presence must always mean a complete dataset
        os.remove(meta_path)
    tmp_paths = {}
    try:
        for name, arr in arrays.items():
            _write_tmp(os.path.join(out_dir, name), lambda f, arr=arr: np.save(f, arr), tmp_paths)
        lines = ''.join(json.dumps({'prompt': p, 'answer': a}, ensure_ascii=False) + '\n' for p, a in kept_test)
        _write_tmp(os.path.join(out_dir, 'test_pairs.jsonl'), lambda f: f.write(lines.encode('utf-8')), tmp_paths)
        for path, tmp in tmp_paths.items():
            os.replace(tmp, path)
        meta.update({'pairs': True, 'seq_len': seq_len, 'task': task, 'counts': counts, 'dropped': dropped})
        _write_tmp(meta_path, lambda f: pickle.dump(meta, f), tmp_paths)
        os.replace(tmp_paths[meta_path], meta_path)
    finally:
        for tmp in tmp_paths.values():
            if os.path.exists(tmp):
                os.remove(tmp)

    print(f'wrote {out_dir} ({meta["tokenizer"]}, vocab_size {meta["vocab_size"]:,}, end-of-answer id '
          f'{meta["eoa_id"]}, seq_len {seq_len}, {np.dtype(dtype).name}) in {time.time() - t0:.1f}s')
    return meta


# -----------------------------------------------------------------------------

def build_parser(task=None, params=None):
    """The argument parser; with a task, its parameters (name -> default) become options too."""
    parser = argparse.ArgumentParser(
        description='Turn prompt -> answer pairs (files, a Hugging Face dataset or a built-in task) into rows of '
                    'prompt | answer | end-of-answer padding: train.npy / test.npy, their *_prompt_len.npy, '
                    'test_pairs.jsonl and meta.pkl.',
        epilog='meta.pkl is written last: a directory without it is not a finished dataset. '
               'The parameters of a task are options too: `--task NAME --help` lists them.')
    src = parser.add_argument_group('source (one of)')
    src_x = src.add_mutually_exclusive_group(required=True)
    src_x.add_argument('--input', metavar='PATH', nargs='+', help='.jsonl, .csv (with a header) or .parquet files')
    src_x.add_argument('--hf_dataset', metavar='NAME', help='a Hugging Face dataset, or a local folder of data files')
    src_x.add_argument('--task', metavar='NAME', help='a built-in task of data/tasks.py (e.g. addition)')
    src.add_argument('--hf_config', metavar='C', default=None, help='the dataset config (default: none)')
    src.add_argument('--hf_split', metavar='S', default='train', help='the dataset split (default: %(default)s)')
    src.add_argument('--prompt_column', metavar='COL', default='prompt', help='(default: %(default)s)')
    src.add_argument('--answer_column', metavar='COL', default='answer', help='(default: %(default)s)')
    split = parser.add_argument_group('the test split')
    split.add_argument('--test', metavar='PATH', nargs='+', help='test pairs from these files (as --input)')
    split.add_argument('--test_fraction', type=float, default=TEST_FRACTION,
                       help='else this share of the distinct prompts, at least 1 (default: %(default)s)')
    split.add_argument('--seed', type=int, default=SEED, help='seed of the split and of a task (default: %(default)s)')
    split.add_argument('--n_train', type=int, default=None, help='--task: train pairs to generate')
    split.add_argument('--n_test', type=int, default=None, help='--task: test pairs to generate')
    tok = parser.add_argument_group('tokenizer and rows')
    tok.add_argument('--tokenizer', choices=('chars', 'gpt2'), default=None,
                     help='chars: the characters of the data; gpt2: a tiktoken BPE '
                          '(default: chars for --task, gpt2 otherwise)')
    enc = tok.add_mutually_exclusive_group()
    enc.add_argument('--encoding', metavar='NAME', default=None, help='gpt2: the tiktoken encoding (default: gpt2)')
    enc.add_argument('--encoding_file', metavar='PATH', default=None,
                     help='gpt2: a tiktoken Encoding pickled as its constructor kwargs, or a meta.pkl')
    tok.add_argument('--seq_len', type=int, default=None,
                     help='row length (default: the smallest multiple of 8 that holds the longest pair + 1)')
    tok.add_argument('--max_dropped', type=float, default=MAX_DROPPED,
                     help='the largest share of a split that may be dropped as too long (default: %(default)s)')
    parser.add_argument('--out', metavar='DIR', default=None,
                        help='output directory (default: data/<task>, data/<first input stem> or data/<dataset>)')
    if task is not None:
        group = parser.add_argument_group(f'parameters of the task {task}')
        taken = {a.dest for a in parser._actions}
        for name, default in params.items():
            if name in taken:
                raise PrepareError(f'task {task!r}: its parameter {name!r} clashes with the option --{name}')
            group.add_argument(f'--{name}', type=_value_parser(default), default=default, metavar='V',
                               help='(default: %(default)s)')
    return parser


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
        pre.add_argument('--task', default=None)
        task_name = pre.parse_known_args(argv)[0].task
        params = task_defaults(load_tasks(), task_name) if task_name else None
        parser = build_parser(task_name, params)
    except PrepareError as e:
        print(f'error: {e}', file=sys.stderr)
        return 1
    args = parser.parse_args(argv)

    tokenizer = args.tokenizer or ('chars' if args.task else 'gpt2')
    if tokenizer == 'chars' and (args.encoding or args.encoding_file):
        parser.error('--encoding / --encoding_file go with --tokenizer gpt2')
    if args.task and (args.n_train is None or args.n_test is None):
        parser.error('--task needs --n_train and --n_test')
    if not args.task and (args.n_train is not None or args.n_test is not None):
        parser.error('--n_train / --n_test go with --task')
    if args.task and args.test:
        parser.error('--test goes with --input / --hf_dataset (a task splits itself)')
    if not 0 < args.test_fraction < 1:
        parser.error(f'--test_fraction must be between 0 and 1 (exclusive), got {args.test_fraction}')
    if not 0 <= args.max_dropped <= 1:
        parser.error(f'--max_dropped must be between 0 and 1, got {args.max_dropped}')
    if args.seq_len is not None and args.seq_len < 2:
        parser.error(f'--seq_len must be at least 2, got {args.seq_len}')

    if args.task:
        name = args.task
    elif args.input:
        name = os.path.splitext(os.path.basename(args.input[0]))[0]
    else:
        name = os.path.basename(os.path.normpath(args.hf_dataset))
    out_dir = args.out or os.path.join(DATA_DIR, name)

    try:
        encoding = load_encoding(args.encoding or 'gpt2', args.encoding_file) if tokenizer == 'gpt2' else None
        task = None
        if args.task:
            task_params = {k: getattr(args, k) for k in params}
            train, test = task_pairs(args.task, args.n_train, args.n_test, args.seed, task_params)
            task = {'name': args.task, 'params': task_params, 'seed': args.seed,
                    'n_train': args.n_train, 'n_test': args.n_test}
        else:
            cols = (args.prompt_column, args.answer_column)
            pairs = read_files(args.input, *cols) if args.input else read_hf_dataset(
                args.hf_dataset, args.hf_config, args.hf_split, *cols)
            if args.test:
                train, test = pairs, read_files(args.test, *cols)
                overlap = len({p for p, _ in train} & {p for p, _ in test})
                if overlap:
                    print(f'note: {overlap:,} test prompts are in the train files too')
            else:
                train, test = split_pairs(pairs, args.test_fraction, args.seed)
        prepare(train, test, out_dir, tokenizer, encoding, args.seq_len, args.max_dropped, task)
    except (PrepareError, OSError) as e:  # OSError: e.g. an unwritable --out or a full disk
        print(f'error: {e}', file=sys.stderr)
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
