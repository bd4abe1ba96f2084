"""Tests for data/prepare_text8.py. No network: downloads are faked or pointed at a closed port."""

import os
import pickle
import subprocess
import sys
import zipfile

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, 'data', 'prepare_text8.py')
CORPUS_A = os.path.join(REPO, '..', 'shared', 'data', 'corpus_a.txt')
sys.path.insert(0, REPO)

from data.prepare_text8 import PrepareError, decode_text8, encode_text8, prepare  # noqa: E402

# 199 characters in text8 form (a pangram, repeated), ending in a space
WORDS = 'the quick brown fox jumps over a lazy dog and then sleeps in the warm sun'.split()
TEXT = ' '.join(WORDS[i % len(WORDS)] for i in range(60))[:199]


def oracle_ids(text):
    """Independent per-character id mapping: space -> 0, a..z -> 1..26."""
    return [0 if c == ' ' else ord(c) - ord('a') + 1 for c in text]


def run_script(*args):
    return subprocess.run([sys.executable, SCRIPT, *args], cwd=REPO, capture_output=True, text=True, timeout=60)


def load(out_dir):
    splits = {name: np.load(os.path.join(out_dir, f'{name}.npy')) for name in ('train', 'val', 'test')}
    with open(os.path.join(out_dir, 'meta.pkl'), 'rb') as f:
        meta = pickle.load(f)
    return splits, meta


def write_zip(path, data, member='text8'):
    with zipfile.ZipFile(path, 'w', zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(member, data)


def assert_one_line_error(res):
    assert res.returncode != 0
    assert 'Traceback' not in res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith('error: ')
    return lines[0]


# -----------------------------------------------------------------------------

def test_prepare_small_corpus(tmp_path):
    n = len(TEXT)
    assert n == 199 and TEXT.endswith(' ')  # odd size: exercises the integer split rounding
    src = tmp_path / 'small.txt'
    src.write_bytes(TEXT.encode())
    out = tmp_path / 'out'
    sizes = prepare(str(src), str(out))
    splits, meta = load(out)

    # split boundaries: first 90% train, next 5% val, rest test
    n_train, n_val = n * 90 // 100, n * 5 // 100
    assert sizes == {'train': n_train, 'val': n_val, 'test': n - n_train - n_val}
    assert [len(splits[k]) for k in ('train', 'val', 'test')] == [179, 9, 11]
    for arr in splits.values():
        assert arr.dtype == np.uint16

    # ids match the oracle, split by position
    expected = oracle_ids(TEXT)
    assert splits['train'].tolist() == expected[:n_train]
    assert splits['val'].tolist() == expected[n_train:n_train + n_val]
    assert splits['test'].tolist() == expected[n_train + n_val:]
    whole = np.concatenate([splits['train'], splits['val'], splits['test']])
    assert whole.tolist() == expected
    assert decode_text8(whole) == TEXT

    # meta: the fixed 27-symbol vocabulary
    assert meta['vocab_size'] == 27
    assert meta['stoi'] == {c: i for i, c in enumerate(' abcdefghijklmnopqrstuvwxyz')}
    assert meta['itos'] == {i: c for c, i in meta['stoi'].items()}
    assert ''.join(meta['itos'][int(i)] for i in whole) == TEXT

    # no temp files left behind
    assert sorted(os.listdir(out)) == ['meta.pkl', 'test.npy', 'train.npy', 'val.npy']


def test_split_of_real_text8_size():
    from data.prepare_text8 import split_sizes
    assert split_sizes(100_000_000) == (90_000_000, 5_000_000, 5_000_000)


def test_encode_all_symbols():
    alphabet = ' abcdefghijklmnopqrstuvwxyz'
    ids = encode_text8(alphabet.encode())
    assert ids.dtype == np.uint16
    assert ids.tolist() == list(range(27)) == oracle_ids(alphabet)
    assert encode_text8(alphabet).tolist() == ids.tolist()  # str accepted too


def test_encode_reports_first_bad_char():
    with pytest.raises(PrepareError, match=r"'A' \(byte 0x41\) at offset 4\b"):
        encode_text8(b'abc Abc 1')


def test_vocab_fixed_when_letters_missing(tmp_path):
    src = tmp_path / 'ab.txt'
    src.write_bytes(b'ab ba ' * 10)
    prepare(str(src), str(tmp_path / 'out'))
    splits, meta = load(tmp_path / 'out')
    assert meta['vocab_size'] == 27 and len(meta['itos']) == 27 and meta['stoi']['z'] == 26
    assert set(np.concatenate(list(splits.values())).tolist()) == {0, 1, 2}


def test_zip_matches_raw(tmp_path):
    raw = tmp_path / 'text8'
    raw.write_bytes(TEXT.encode())
    zpath = tmp_path / 'text8.zip'
    write_zip(zpath, TEXT.encode())
    prepare(str(raw), str(tmp_path / 'raw'))
    prepare(str(zpath), str(tmp_path / 'zip'))
    a, meta_a = load(tmp_path / 'raw')
    b, meta_b = load(tmp_path / 'zip')
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    assert meta_a == meta_b


def test_cli_runs(tmp_path):
    src = tmp_path / 'small.txt'
    src.write_bytes(TEXT.encode())
    res = run_script('--input', str(src), '--out', str(tmp_path / 'out'))
    assert res.returncode == 0, res.stderr
    assert '199' in res.stdout and str(tmp_path / 'out') in res.stdout
    splits, _ = load(tmp_path / 'out')
    assert decode_text8(np.concatenate(list(splits.values()))) == TEXT


@pytest.mark.parametrize('bad, char', [
    (TEXT[:50] + 'Q' + TEXT[51:], "'Q'"),          # uppercase
    (TEXT + '\n', r"'\n'"),                        # trailing newline
    (TEXT[:50] + '7' + TEXT[51:], "'7'"),          # digit
])
def test_bad_input_cli(tmp_path, bad, char):
    src = tmp_path / 'bad.txt'
    src.write_bytes(bad.encode())
    out = tmp_path / 'out'
    line = assert_one_line_error(run_script('--input', str(src), '--out', str(out)))
    offset = next(i for i, c in enumerate(bad) if c not in ' abcdefghijklmnopqrstuvwxyz')
    assert char in line and f'offset {offset}' in line
    assert 'to_text8.py' in line
    assert not out.exists()


def test_bad_input_in_zip(tmp_path):
    zpath = tmp_path / 'text8.zip'
    write_zip(zpath, b'abc d\xc3\xa9f')
    line = assert_one_line_error(run_script('--input', str(zpath), '--out', str(tmp_path / 'out')))
    assert 'non-ASCII byte 0xc3 at offset 5' in line


def test_missing_input_cli(tmp_path):
    line = assert_one_line_error(run_script('--input', str(tmp_path / 'nope.txt'), '--out', str(tmp_path / 'out')))
    assert 'nope.txt' in line
    assert not (tmp_path / 'out').exists()


def test_offline_cli(tmp_path):
    out = tmp_path / 'out'
    line = assert_one_line_error(run_script('--url', 'http://127.0.0.1:9/text8.zip', '--out', str(out)))
    assert 'could not download text8' in line and '--input PATH' in line
    assert not (out / 'meta.pkl').exists()
    assert not (out / 'text8.zip.part').exists()


def test_rerun_replaces_dataset(tmp_path):
    out = tmp_path / 'out'
    src = tmp_path / 'a.txt'
    src.write_bytes(TEXT.encode())
    prepare(str(src), str(out))
    src.write_bytes(TEXT[::-1].encode())
    prepare(str(src), str(out))
    splits, _ = load(out)
    assert decode_text8(np.concatenate(list(splits.values()))) == TEXT[::-1]


# -----------------------------------------------------------------------------
# download path with a fake requests.get (no network)

class FakeResponse:
    def __init__(self, payload, length=None):
        self.payload = payload
        self.headers = {'content-length': str(len(payload) if length is None else length)}

    def raise_for_status(self):
        pass

    def iter_content(self, chunk_size):
        for i in range(0, len(self.payload), chunk_size):
            yield self.payload[i:i + chunk_size]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def zip_bytes(tmp_path, data):
    p = tmp_path / 'src.zip'
    write_zip(p, data)
    return p.read_bytes()


def test_download_and_reuse(tmp_path, monkeypatch):
    import requests
    payload = zip_bytes(tmp_path, TEXT.encode())
    calls = []

    def fake_get(url, **kw):
        calls.append(url)
        return FakeResponse(payload)

    monkeypatch.setattr(requests, 'get', fake_get)
    out = tmp_path / 'out'
    url = 'http://example.invalid/text8.zip'
    prepare(None, str(out), url=url)
    assert calls == [url]
    assert (out / 'text8.zip').read_bytes() == payload
    splits, _ = load(out)
    assert decode_text8(np.concatenate(list(splits.values()))) == TEXT
    prepare(None, str(out), url=url)  # completed zip is reused
    assert calls == [url]


def test_download_truncated(tmp_path, monkeypatch):
    import requests
    payload = zip_bytes(tmp_path, TEXT.encode())
    monkeypatch.setattr(requests, 'get', lambda url, **kw: FakeResponse(payload[:-10], length=len(payload)))
    out = tmp_path / 'out'
    with pytest.raises(PrepareError, match='could not download text8'):
        prepare(None, str(out), url='http://example.invalid/text8.zip')
    assert os.listdir(out) == []  # no partial zip, no dataset


# -----------------------------------------------------------------------------

@pytest.mark.skipif(not os.path.isfile(CORPUS_A), reason='shared corpus_a.txt not present')
def test_corpus_a(tmp_path):
    res = run_script('--input', CORPUS_A, '--out', str(tmp_path))
    assert res.returncode == 0, res.stderr
    splits, meta = load(tmp_path)
    assert sum(len(a) for a in splits.values()) == 3_654_479
    assert [len(splits[k]) for k in ('train', 'val', 'test')] == [3_289_031, 182_723, 182_725]
    whole = np.concatenate(list(splits.values()))
    with open(CORPUS_A, 'rb') as f:
        assert decode_text8(whole).encode() == f.read()
    assert meta['vocab_size'] == 27 and int(whole.max()) <= 26
