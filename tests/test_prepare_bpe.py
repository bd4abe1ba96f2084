"""Tests for data/prepare_openwebtext.py with a tiny hand-built BPE (the tiny_bpe fixture).

No network: tiktoken's GPT-2 file is never loaded (its loader is faked where needed) and the
Hugging Face tests run with HF_DATASETS_OFFLINE=1 / HF_HUB_OFFLINE=1 on in-memory datasets.
"""

import json
import math
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import tiktoken

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, 'data', 'prepare_openwebtext.py')
sys.path.insert(0, REPO)

import data.prepare_openwebtext as pobpe  # noqa: E402
from data.prepare_openwebtext import PrepareError, prepare  # noqa: E402

# 12 documents: merges (the, th, he), digits, punctuation, unicode, newlines inside a document,
# text that looks like a special token (encode_ordinary must treat it as plain text)
DOCS = [
    'the theme of the thesis',
    'hello there, 42 times!',
    'Ünïcödé — ok? 🙂',
    'line one\nline two\n',
    "it's the end <|endoftext|> not really",
    'another the',
    'x',
    'tabs\tand  double  spaces',
    'numbers 1234567890',
    'they the them',
    'last but one',
    'the last document',
]
SEED = 2357


def expected_ids(enc, docs):
    """Independent oracle: encode_ordinary of each document, then the end-of-text id."""
    out = []
    for d in docs:
        out += enc.encode_ordinary(d) + [enc._special_tokens['<|endoftext|>']]
    return np.array(out, dtype=np.int64)


def read_bin(out_dir, split):
    path = os.path.join(out_dir, f'{split}.bin')
    assert os.path.getsize(path) % 2 == 0
    return np.fromfile(path, dtype=np.uint16)


def load_meta(out_dir):
    with open(os.path.join(out_dir, 'meta.pkl'), 'rb') as f:
        return pickle.load(f)


def split_docs(enc, ids):
    """Decode a .bin back into its documents (split at end-of-text)."""
    eot = enc._special_tokens['<|endoftext|>']
    ids = [int(i) for i in ids]
    assert ids and ids[-1] == eot
    docs, cur = [], []
    for i in ids:
        if i == eot:
            docs.append(enc.decode(cur))
            cur = []
        else:
            cur.append(i)
    return docs


def expected_split(docs, val_fraction, seed=SEED):
    """The val rule re-derived here: ceil(f*n) in 1..n-1, the first ones of default_rng(seed).permutation."""
    n = len(docs)
    n_val = min(max(math.ceil(val_fraction * n), 1), n - 1)
    val_idx = set(np.random.default_rng(seed).permutation(n)[:n_val].tolist())
    return ([d for i, d in enumerate(docs) if i not in val_idx], [d for i, d in enumerate(docs) if i in val_idx])


def check_output(out_dir, enc, train_docs, val_docs):
    """The .bin files hold exactly the split's documents, encoded, in order; meta.pkl is complete."""
    for split, docs in (('train', train_docs), ('val', val_docs)):
        ids = read_bin(out_dir, split)
        assert ids.dtype == np.uint16
        np.testing.assert_array_equal(ids.astype(np.int64), expected_ids(enc, docs))
        mm = np.memmap(os.path.join(out_dir, f'{split}.bin'), dtype=np.uint16, mode='r')
        assert len(mm) == len(ids)
    meta = load_meta(out_dir)
    assert set(meta) == {'vocab_size', 'tiktoken', 'eot_token', 'n_tokens'}
    assert meta['vocab_size'] == enc.n_vocab
    assert meta['eot_token'] == enc.eot_token
    assert meta['n_tokens'] == {'train': len(read_bin(out_dir, 'train')), 'val': len(read_bin(out_dir, 'val'))}
    assert set(meta['tiktoken']) == {'name', 'pat_str', 'mergeable_ranks', 'special_tokens'}
    rebuilt = tiktoken.Encoding(**meta['tiktoken'])
    assert rebuilt.name == enc.name and rebuilt.n_vocab == enc.n_vocab
    for d in DOCS:
        assert rebuilt.encode_ordinary(d) == enc.encode_ordinary(d)
        assert rebuilt.decode(enc.encode_ordinary(d)) == d
    assert not [n for n in os.listdir(out_dir) if '.tmp' in n]
    return meta


def offline_env(tmp_path):
    env = dict(os.environ, HF_DATASETS_OFFLINE='1', HF_HUB_OFFLINE='1', HF_HOME=str(tmp_path / 'hf_home'))
    env.pop('HF_DATASETS_CACHE', None)
    return env


def run_script(tmp_path, *args):
    return subprocess.run([sys.executable, SCRIPT, *map(str, args)], cwd=REPO, capture_output=True, text=True,
                          timeout=120, env=offline_env(tmp_path))


def assert_one_line_error(res):
    assert res.returncode == 1, (res.returncode, res.stderr)
    assert 'Traceback' not in res.stderr
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith('error: ')
    return lines[0]


@pytest.fixture
def enc_file(tiny_bpe, tmp_path):
    path = tmp_path / 'tiny_encoding.pkl'
    pobpe.save_encoding_file(tiny_bpe, str(path))
    return path


def write_txt_files(folder, docs):
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, d in enumerate(docs):
        p = folder / f'doc{i:02d}.txt'
        p.write_bytes(d.encode('utf-8'))
        paths.append(p)
    return paths


def write_jsonl(path, docs, column='text'):
    with open(path, 'w', encoding='utf-8') as f:
        for i, d in enumerate(docs):
            f.write(json.dumps({'id': i, column: d}) + '\n')
    return path


# -----------------------------------------------------------------------------
# the tokenizer fixture and the split rule

def test_tiny_bpe_merges(tiny_bpe):
    assert tiny_bpe.encode_ordinary('the') == [tiny_bpe._mergeable_ranks[b'the']]
    assert tiny_bpe.eot_token == tiny_bpe.n_vocab - 1
    assert tiny_bpe.encode_ordinary('<|endoftext|>') != [tiny_bpe.eot_token]
    for d in DOCS:
        assert tiny_bpe.decode(tiny_bpe.encode_ordinary(d)) == d


@pytest.mark.parametrize('n, frac, n_val', [(2, 0.0005, 1), (3, 0.9, 2), (10_000, 0.0005, 5),
                                            (10_001, 0.0005, 6), (8_013_769, 0.0005, 4007), (100, 0.1, 10)])
def test_val_count(n, frac, n_val):
    assert pobpe.val_count(n, frac) == n_val


@pytest.mark.parametrize('n', [0, 1])
def test_val_count_needs_two_documents(n):
    with pytest.raises(PrepareError, match='at least 2'):
        pobpe.val_count(n, 0.5)


def test_val_split_matches_datasets_train_test_split():
    datasets = pytest.importorskip('datasets')
    n = 503
    ds = datasets.Dataset.from_dict({'i': list(range(n))})
    for frac in (0.0005, 0.1):
        n_val = pobpe.val_count(n, frac)
        parts = ds.train_test_split(test_size=frac, seed=SEED, shuffle=True)
        assert len(parts['test']) == n_val
        mask = pobpe.val_mask(n, n_val, SEED)
        assert sorted(parts['test']['i']) == np.flatnonzero(mask).tolist()


# -----------------------------------------------------------------------------
# prepare() from Python

def test_prepare_lists(tiny_bpe, tmp_path):
    out = tmp_path / 'out'
    train, val = DOCS[:9], DOCS[9:]
    counts = prepare(train, val, str(out), tiny_bpe)
    meta = check_output(str(out), tiny_bpe, train, val)
    assert counts == meta['n_tokens']
    assert meta['tiktoken']['name'] == 'tiny'
    assert split_docs(tiny_bpe, read_bin(str(out), 'val')) == val


def test_prepare_generators_and_batches(tiny_bpe, tmp_path, monkeypatch):
    monkeypatch.setattr(pobpe, 'BATCH_DOCS', 5)  # several batches, a partial last one
    many = [f'{DOCS[i % len(DOCS)]} #{i}' for i in range(23)]
    prepare((d for d in many[:20]), iter(many[20:]), str(tmp_path), tiny_bpe, num_proc=3)
    check_output(str(tmp_path), tiny_bpe, many[:20], many[20:])


@pytest.mark.parametrize('num_proc', [1, 2])
def test_prepare_hf_dataset_objects(tiny_bpe, tmp_path, monkeypatch, num_proc):
    datasets = pytest.importorskip('datasets')
    monkeypatch.setenv('HF_DATASETS_OFFLINE', '1')
    monkeypatch.setattr(pobpe, 'MAX_SHARDS', 4)  # several shards when writing
    many = [f'{DOCS[i % len(DOCS)]} #{i}' for i in range(40)]
    ds = datasets.Dataset.from_dict({'body': many, 'other': list(range(40))})
    parts = ds.train_test_split(test_size=3, seed=SEED)
    counts = prepare(parts['train'], parts['test'], str(tmp_path), tiny_bpe, text_column='body', num_proc=num_proc)
    meta = check_output(str(tmp_path), tiny_bpe, parts['train']['body'], parts['test']['body'])
    assert counts == meta['n_tokens']


def test_prepare_hf_dataset_missing_column(tiny_bpe, tmp_path):
    datasets = pytest.importorskip('datasets')
    ds = datasets.Dataset.from_dict({'body': DOCS})
    with pytest.raises(PrepareError, match=r"no column 'text'.*columns: body"):
        prepare(ds, ds, str(tmp_path), tiny_bpe)


def test_local_splits_keep_file_order(tiny_bpe, tmp_path):
    paths = [str(p) for p in write_txt_files(tmp_path / 'docs', DOCS)]
    train, val = pobpe.local_splits(paths, val_fraction=0.25, seed=SEED)
    exp_train, exp_val = expected_split(DOCS, 0.25)
    assert (list(train), list(val)) == (exp_train, exp_val)
    assert (len(train), len(val)) == (9, 3)
    assert list(train) == exp_train  # iterable again (re-reads the files)


# -----------------------------------------------------------------------------
# the CLI with local files and --encoding_file

def test_cli_txt_one_document_per_file(tiny_bpe, enc_file, tmp_path):
    paths = write_txt_files(tmp_path / 'docs', DOCS)
    (tmp_path / 'docs' / 'blank.txt').write_text('  \n\n')  # blank documents are skipped
    out = tmp_path / 'out'
    res = run_script(tmp_path, '--input', *paths, tmp_path / 'docs' / 'blank.txt', '--out', out,
                     '--encoding_file', enc_file, '--val_fraction', 0.2)
    assert res.returncode == 0, res.stderr
    train, val = expected_split(DOCS, 0.2)
    assert len(val) == 3
    meta = check_output(str(out), tiny_bpe, train, val)
    assert f"train: {len(train)} documents, {meta['n_tokens']['train']} tokens" in res.stdout
    assert f"val: {len(val)} documents, {meta['n_tokens']['val']} tokens" in res.stdout


def test_cli_txt_lines(tiny_bpe, enc_file, tmp_path):
    lines = [d.replace('\n', ' ') for d in DOCS]
    src = tmp_path / 'corpus.txt'
    # blank and whitespace-only lines are skipped; \r\n line ends are removed
    src.write_bytes(('\n'.join(lines[:6]) + '\n\n   \n' + '\r\n'.join(lines[6:]) + '\n').encode('utf-8'))
    out = tmp_path / 'out'
    res = run_script(tmp_path, '--input', src, '--txt_lines', '--out', out, '--encoding_file', enc_file)
    assert res.returncode == 0, res.stderr
    train, val = expected_split(lines, 0.0005)
    assert len(val) == 1 and len(train) == len(lines) - 1
    check_output(str(out), tiny_bpe, train, val)


def test_cli_jsonl_and_parquet(tiny_bpe, enc_file, tmp_path):
    pa = pytest.importorskip('pyarrow')
    pq = pytest.importorskip('pyarrow.parquet')
    a = write_jsonl(tmp_path / 'a.jsonl', DOCS[:7], column='content')
    with open(a, 'a', encoding='utf-8') as f:  # blank line and null text: skipped
        f.write('\n' + json.dumps({'id': 99, 'content': None}) + '\n')
    b = tmp_path / 'b.parquet'
    pq.write_table(pa.table({'content': DOCS[7:] + [''], 'n': list(range(len(DOCS) - 6))}), b)
    out = tmp_path / 'out'
    res = run_script(tmp_path, '--input', a, b, '--text_column', 'content', '--out', out,
                     '--encoding_file', enc_file, '--val_fraction', 0.3, '--seed', 7)
    assert res.returncode == 0, res.stderr
    train, val = expected_split(DOCS, 0.3, seed=7)
    check_output(str(out), tiny_bpe, train, val)


def test_cli_meta_pkl_as_encoding_file(tiny_bpe, enc_file, tmp_path):
    paths = write_txt_files(tmp_path / 'docs', DOCS[:4])
    first, second = tmp_path / 'first', tmp_path / 'second'
    assert run_script(tmp_path, '--input', *paths, '--out', first, '--encoding_file', enc_file).returncode == 0
    res = run_script(tmp_path, '--input', *paths, '--out', second, '--encoding_file', first / 'meta.pkl')
    assert res.returncode == 0, res.stderr
    assert load_meta(str(first)) == load_meta(str(second))


def test_cli_help():
    res = subprocess.run([sys.executable, SCRIPT, '--help'], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0
    for opt in ('--input', '--txt_lines', '--text_column', '--hf_dataset', '--hf_config', '--hf_split', '--out',
                '--val_fraction', '--encoding', '--encoding_file', '--num_proc'):
        assert opt in res.stdout


def test_cli_out_required_for_custom_corpora(tmp_path, enc_file):
    src = write_jsonl(tmp_path / 'a.jsonl', DOCS)
    res = run_script(tmp_path, '--input', src, '--encoding_file', enc_file)
    assert res.returncode == 2 and '--out' in res.stderr


# -----------------------------------------------------------------------------
# restart safety

def test_interrupted_run_leaves_nothing_that_looks_finished(tiny_bpe, tmp_path, monkeypatch):
    out = str(tmp_path / 'out')
    prepare(DOCS[:6], DOCS[6:8], out, tiny_bpe)  # an earlier complete dataset
    assert os.path.exists(os.path.join(out, 'meta.pkl'))

    real_writer = pobpe.write_iterable_split

    def crashing_writer(documents, path, encoding, num_proc=1, desc=''):
        if desc == 'val':  # train is written completely, val half-way
            with open(path, 'wb') as f:
                f.write(np.zeros(3, dtype=np.uint16).tobytes())
            raise KeyboardInterrupt('simulated interruption')
        return real_writer(documents, path, encoding, num_proc, desc)

    monkeypatch.setattr(pobpe, 'write_iterable_split', crashing_writer)
    with pytest.raises(KeyboardInterrupt):
        prepare(DOCS[:9], DOCS[9:], out, tiny_bpe)
    left = sorted(os.listdir(out))
    assert 'meta.pkl' not in left
    assert 'train.bin' not in left and 'val.bin' not in left  # the old ones are gone, the new ones never renamed
    assert left == []  # temp files are cleaned up too

    monkeypatch.setattr(pobpe, 'write_iterable_split', real_writer)
    prepare(DOCS[:9], DOCS[9:], out, tiny_bpe)
    check_output(out, tiny_bpe, DOCS[:9], DOCS[9:])


def test_rerun_after_a_killed_run(tiny_bpe, tmp_path):
    """A killed run (no cleanup) may leave a temp file and even a renamed .bin, but never meta.pkl."""
    out = tmp_path / 'out'
    out.mkdir()
    (out / 'train.bin').write_bytes(b'\x01\x00' * 5)
    (out / 'train.bin.tmp12345').write_bytes(b'\x00' * 100)
    (out / 'val.bin.tmp12345').write_bytes(b'\x00' * 10)
    prepare(DOCS[:9], DOCS[9:], str(out), tiny_bpe)
    check_output(str(out), tiny_bpe, DOCS[:9], DOCS[9:])
    assert sorted(os.listdir(out)) == ['meta.pkl', 'train.bin', 'val.bin']


def test_meta_written_last(tiny_bpe, tmp_path, monkeypatch):
    """When meta.pkl is written, both .bin files are already complete under their final names."""
    out = str(tmp_path)
    seen = {}
    real_atomic_write = pobpe._atomic_write

    def spy(path, write_fn):
        if path.endswith('meta.pkl'):
            seen['files'] = sorted(os.listdir(out))
            seen['train'] = read_bin(out, 'train').tolist()
        return real_atomic_write(path, write_fn)

    monkeypatch.setattr(pobpe, '_atomic_write', spy)
    prepare(DOCS[:9], DOCS[9:], out, tiny_bpe)
    assert seen['files'] == ['train.bin', 'val.bin']
    assert seen['train'] == expected_ids(tiny_bpe, DOCS[:9]).tolist()


# -----------------------------------------------------------------------------
# errors: one line, exit code 1, nothing that looks finished

def test_error_missing_jsonl_field_lists_fields(tmp_path, enc_file):
    src = write_jsonl(tmp_path / 'a.jsonl', DOCS, column='body')
    out = tmp_path / 'out'
    line = assert_one_line_error(run_script(tmp_path, '--input', src, '--out', out, '--encoding_file', enc_file))
    assert "no field 'text'" in line and 'id, body' in line and '--text_column' in line
    assert not out.exists()


def test_error_missing_parquet_column_lists_columns(tmp_path, enc_file):
    pa = pytest.importorskip('pyarrow')
    pq = pytest.importorskip('pyarrow.parquet')
    src = tmp_path / 'a.parquet'
    pq.write_table(pa.table({'body': DOCS, 'score': list(range(len(DOCS)))}), src)
    line = assert_one_line_error(run_script(tmp_path, '--input', src, '--out', tmp_path / 'o',
                                            '--encoding_file', enc_file))
    assert "no column 'text'" in line and 'body, score' in line


def test_error_missing_input_file(tmp_path, enc_file):
    line = assert_one_line_error(run_script(tmp_path, '--input', tmp_path / 'nope.txt', '--out', tmp_path / 'o',
                                            '--encoding_file', enc_file))
    assert 'input file not found' in line and 'nope.txt' in line


def test_error_unsupported_extension(tmp_path, enc_file):
    src = tmp_path / 'a.csv'
    src.write_text('text\nhello\n')
    line = assert_one_line_error(run_script(tmp_path, '--input', src, '--out', tmp_path / 'o',
                                            '--encoding_file', enc_file))
    assert "unsupported file type '.csv'" in line


@pytest.mark.parametrize('n_docs', [0, 1])
def test_error_empty_or_single_document_corpus(tmp_path, enc_file, n_docs):
    src = write_jsonl(tmp_path / 'a.jsonl', ['  '] + DOCS[:n_docs])
    out = tmp_path / 'out'
    line = assert_one_line_error(run_script(tmp_path, '--input', src, '--out', out, '--encoding_file', enc_file))
    assert ('empty corpus' in line) if n_docs == 0 else ('at least 2' in line)
    assert not out.exists()


def test_error_bad_json_line(tmp_path, enc_file):
    src = tmp_path / 'a.jsonl'
    src.write_text('{"text": "ok"}\n{"text": oops}\n')
    line = assert_one_line_error(run_script(tmp_path, '--input', src, '--out', tmp_path / 'o',
                                            '--encoding_file', enc_file))
    assert 'a.jsonl:2: invalid JSON' in line


def test_error_offline_hf_dataset(tmp_path, enc_file):
    out = tmp_path / 'out'
    res = run_script(tmp_path, '--hf_dataset', 'no-such-user-xyz/no-such-dataset-xyz', '--out', out,
                     '--encoding_file', enc_file, '--num_proc', 1)
    line = assert_one_line_error(res)
    assert 'no-such-dataset-xyz' in line and 'network access' in line and '--input' in line
    assert not out.exists()


def test_error_offline_gpt2_encoding(tmp_path, monkeypatch, capsys):
    def offline(name):
        raise ConnectionError(f"Failed to resolve 'openaipublic.blob.core.windows.net' for {name}\nsecond line")

    monkeypatch.setattr(pobpe.tiktoken, 'get_encoding', offline)
    out = tmp_path / 'owt'
    assert pobpe.main(['--out', str(out)]) == 1  # the OpenWebText default: the tokenizer fails first
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith('error: ')
    assert "'gpt2'" in err and 'network access' in err and '--encoding_file' in err
    assert not out.exists()


def test_error_bad_encoding_file(tmp_path):
    bad = tmp_path / 'bad.pkl'
    bad.write_bytes(pickle.dumps({'name': 'x'}))
    src = write_jsonl(tmp_path / 'a.jsonl', DOCS)
    line = assert_one_line_error(run_script(tmp_path, '--input', src, '--out', tmp_path / 'o', '--encoding_file', bad))
    assert 'constructor kwargs' in line
    line = assert_one_line_error(run_script(tmp_path, '--input', src, '--out', tmp_path / 'o',
                                            '--encoding_file', tmp_path / 'missing.pkl'))
    assert 'encoding file not found' in line


def huge_id_encoding(tiny_bpe):
    return tiktoken.Encoding('huge', pat_str=tiny_bpe._pat_str, mergeable_ranks=tiny_bpe._mergeable_ranks,
                             special_tokens={'<|endoftext|>': 70_000})


def test_error_token_id_too_large_for_uint16(tiny_bpe, tmp_path):
    huge = huge_id_encoding(tiny_bpe)
    out = tmp_path / 'out'
    with pytest.raises(PrepareError, match=r'70,000.*uint16'):
        prepare(DOCS[:3], DOCS[3:], str(out), huge)
    assert not out.exists()

    path = tmp_path / 'huge.pkl'
    pobpe.save_encoding_file(huge, str(path))
    src = write_jsonl(tmp_path / 'a.jsonl', DOCS)
    line = assert_one_line_error(run_script(tmp_path, '--input', src, '--out', out, '--encoding_file', path))
    assert '70,000' in line and 'uint16' in line
    assert not out.exists()


def test_largest_uint16_id_is_accepted(tiny_bpe, tmp_path):
    enc = tiktoken.Encoding('edge', pat_str=tiny_bpe._pat_str, mergeable_ranks=tiny_bpe._mergeable_ranks,
                            special_tokens={'<|endoftext|>': 65_535})
    prepare(DOCS[:3], DOCS[3:], str(tmp_path), enc)
    assert read_bin(str(tmp_path), 'val')[-1] == 65_535
    assert load_meta(str(tmp_path))['vocab_size'] == 65_536


def test_error_encoding_without_endoftext(tiny_bpe, tmp_path):
    enc = tiktoken.Encoding('noeot', pat_str=tiny_bpe._pat_str, mergeable_ranks=tiny_bpe._mergeable_ranks,
                            special_tokens={})
    with pytest.raises(PrepareError, match='endoftext'):
        prepare(DOCS[:3], DOCS[3:], str(tmp_path / 'o'), enc)


def test_error_empty_split_in_prepare(tiny_bpe, tmp_path):
    with pytest.raises(PrepareError, match='no documents'):
        prepare(DOCS, [], str(tmp_path), tiny_bpe)
    assert 'meta.pkl' not in os.listdir(tmp_path)
    assert not [n for n in os.listdir(tmp_path) if n.endswith('.bin') or '.tmp' in n]


# -----------------------------------------------------------------------------
# the Hugging Face path end to end, offline: a local folder of data files is a dataset name too

def test_cli_hf_dataset_local_folder(tiny_bpe, enc_file, tmp_path):
    pa = pytest.importorskip('pyarrow')
    pq = pytest.importorskip('pyarrow.parquet')
    folder = tmp_path / 'my_dataset'
    (folder / 'data').mkdir(parents=True)
    docs = [f'{DOCS[i % len(DOCS)]} #{i}' for i in range(30)]
    pq.write_table(pa.table({'content': docs, 'n': list(range(30))}), folder / 'data' / 'train-00000.parquet')
    out = tmp_path / 'out'
    res = run_script(tmp_path, '--hf_dataset', folder, '--text_column', 'content', '--out', out,
                     '--encoding_file', enc_file, '--val_fraction', 0.05, '--num_proc', 2)
    assert res.returncode == 0, res.stderr
    # train_test_split order: val = permutation[:n_val], train = permutation[n_val:] (shuffled)
    perm = np.random.default_rng(SEED).permutation(len(docs))
    n_val = math.ceil(0.05 * len(docs))
    meta = check_output(str(out), tiny_bpe, [docs[i] for i in perm[n_val:]], [docs[i] for i in perm[:n_val]])
    assert f"val: {n_val} documents, {meta['n_tokens']['val']} tokens" in res.stdout

    line = assert_one_line_error(run_script(tmp_path, '--hf_dataset', folder, '--out', tmp_path / 'o2',
                                            '--encoding_file', enc_file, '--num_proc', 1))
    assert "no column 'text'" in line and 'content, n' in line
    line = assert_one_line_error(run_script(tmp_path, '--hf_dataset', folder, '--hf_split', 'nosuchsplit',
                                            '--out', tmp_path / 'o3', '--encoding_file', enc_file, '--num_proc', 1))
    assert 'nosuchsplit' in line


def test_error_non_string_document(tiny_bpe, tmp_path):
    with pytest.raises(PrepareError, match='document 1 is int'):
        prepare(['ok', 3, 'x'], ['v'], str(tmp_path), tiny_bpe)
    assert 'meta.pkl' not in os.listdir(tmp_path)


def test_output_is_read_by_train_and_sample(tiny_bpe, tmp_path):
    """train.py memory-maps the .bin files and reads vocab_size; common.load_codec (sample.py) rebuilds the tokenizer
    offline."""
    pytest.importorskip('torch')
    import common
    out = str(tmp_path / 'mine')
    prepare(DOCS[:9], DOCS[9:], out, tiny_bpe)
    for split, docs in (('train', DOCS[:9]), ('val', DOCS[9:])):
        data = common.open_split(out, split)
        assert data.dtype == np.uint16
        np.testing.assert_array_equal(np.asarray(data, dtype=np.int64), expected_ids(tiny_bpe, docs))
    assert common.dataset_vocab_size(out) == tiny_bpe.n_vocab
    codec = common.load_codec(tiny_bpe.n_vocab, 'mine', out)
    assert codec.mask_id == tiny_bpe.n_vocab
    ids = codec.encode(DOCS[0])
    assert ids == tiny_bpe.encode_ordinary(DOCS[0]) and codec.decode(ids) == DOCS[0]


def test_default_openwebtext_path(tiny_bpe, tmp_path, monkeypatch):
    """The default run: load_dataset('openwebtext', split='train'), 0.05% val with seed 2357, GPT-2 by name.
    Both loaders are faked (no network): GPT-2 is replaced by the tiny BPE, OpenWebText by 4,001 short documents."""
    datasets = pytest.importorskip('datasets')
    docs = [f'doc {i}: {DOCS[i % len(DOCS)]}' for i in range(4001)]
    calls = []

    def fake_load_dataset(name, config=None, split=None, num_proc=None):
        calls.append((name, config, split, num_proc))
        return datasets.Dataset.from_dict({'text': docs})

    monkeypatch.setattr(datasets, 'load_dataset', fake_load_dataset)
    monkeypatch.setattr(pobpe.tiktoken, 'get_encoding', lambda name: tiny_bpe if name == 'gpt2' else None)
    out = tmp_path / 'owt'
    assert pobpe.main(['--out', str(out), '--num_proc', '1']) == 0
    assert calls == [('openwebtext', None, 'train', 1)]
    perm = np.random.default_rng(2357).permutation(len(docs))  # ceil(0.0005 * 4001) = 3 val documents
    meta = check_output(str(out), tiny_bpe, [docs[i] for i in perm[3:]], [docs[i] for i in perm[:3]])
    assert meta['n_tokens']['val'] == len(expected_ids(tiny_bpe, [docs[i] for i in perm[:3]]))


def test_error_offline_openwebtext(tiny_bpe, tmp_path):
    """The default run offline, GPT-2 faked by the tiny BPE: the dataset load fails as one line."""
    code = ('import sys, tiktoken; sys.path.insert(0, ".");'
            'import data.prepare_openwebtext as p;'
            f'enc = p.load_encoding(path={str(tmp_path / "enc.pkl")!r});'
            'p.tiktoken.get_encoding = lambda name: enc;'
            f'sys.exit(p.main(["--out", {str(tmp_path / "owt")!r}, "--num_proc", "1"]))')
    pobpe.save_encoding_file(tiny_bpe, str(tmp_path / 'enc.pkl'))
    res = subprocess.run([sys.executable, '-c', code], cwd=REPO, capture_output=True, text=True, timeout=120,
                         env=offline_env(tmp_path))
    line = assert_one_line_error(res)
    assert "'openwebtext'" in line and 'network access' in line
    assert not (tmp_path / 'owt').exists()
