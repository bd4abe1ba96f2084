"""
Prepare the text8 character-level dataset.

text8 is 100,000,000 characters of cleaned Wikipedia: only a-z and single spaces.
The characters are split by position into the first 90% (train), the next 5% (val)
and the last 5% (test), and mapped to ids by the sorted character set:
space = 0, a..z = 1..26 (the diffusion mask token, 27, never appears in the data).

Writes to the output dir (default: data/text8/ next to this script):
    train.npy, val.npy, test.npy   np.uint16 ids, saved with np.save
    meta.pkl                       {'vocab_size': 27, 'itos': {id: char}, 'stoi': {char: id}}
meta.pkl is written last, so its presence means the dataset is complete.

Examples:
    python data/prepare_text8.py                          # download text8.zip (needs internet)
    python data/prepare_text8.py --input ~/text8.zip      # a local text8.zip
    python data/prepare_text8.py --input ../shared/data/corpus_a.txt --out /tmp/corpus_a

From Python (e.g. train.py, run from the repo root):
    from data.prepare_text8 import prepare
    prepare(input_path=None, out_dir='data/text8')
"""

import argparse
import os
import pickle
import sys
import time
import urllib.parse
import zipfile

import numpy as np

URL = 'http://mattmahoney.net/dc/text8.zip'
ZIP_SIZE = 31_344_016        # bytes of text8.zip at URL
TEXT8_SIZE = 100_000_000     # bytes of the unzipped text8
DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'text8')

# the vocabulary is always these 27 symbols, whatever the corpus contains
CHARS = ' abcdefghijklmnopqrstuvwxyz'
VOCAB_SIZE = len(CHARS)  # 27; the mask id used by the model is VOCAB_SIZE
STOI = {ch: i for i, ch in enumerate(CHARS)}
ITOS = {i: ch for i, ch in enumerate(CHARS)}

# byte -> id lookup table; 255 marks a byte that is not allowed in text8
_BAD = 255
_LUT = np.full(256, _BAD, dtype=np.uint8)
for _ch, _i in STOI.items():
    _LUT[ord(_ch)] = _i


class PrepareError(Exception):
    """A problem the user can fix (bad input, no network); main() prints it as one line."""


# -----------------------------------------------------------------------------
# encoding

def encode_text8(text_bytes):
    """Map text8 bytes (a-z and space) to a np.uint16 array of ids 0..26.

    Raises PrepareError naming the first byte outside the alphabet and its byte offset.
    A str is accepted and encoded as UTF-8 first.
    """
    if isinstance(text_bytes, str):
        text_bytes = text_bytes.encode('utf-8')
    raw = np.frombuffer(text_bytes, dtype=np.uint8)
    ids = _LUT[raw]
    bad = ids == _BAD
    if bad.any():
        offset = int(np.argmax(bad))
        b = int(raw[offset])
        what = f'{chr(b)!r} (byte 0x{b:02x})' if b < 128 else f'non-ASCII byte 0x{b:02x}'
        raise PrepareError(
            f'invalid character {what} at offset {offset:,}; text8 form allows only a-z and '
            f'single spaces: convert it with a text8 converter such as to_text8.py')
    return ids.astype(np.uint16)


def decode_text8(ids):
    """Map ids 0..26 back to a string (inverse of encode_text8)."""
    return np.frombuffer(CHARS.encode('ascii'), dtype=np.uint8)[np.asarray(ids)].tobytes().decode('ascii')


def split_sizes(n):
    """Sizes of the train / val / test splits of n characters: 90% / 5% / the rest."""
    n_train = n * 90 // 100
    n_val = n * 5 // 100
    return n_train, n_val, n - n_train - n_val


# -----------------------------------------------------------------------------
# reading the input

def read_input(path):
    """Return the bytes of a text8.zip (member 'text8', or its only member) or of a plain file."""
    if not os.path.isfile(path):
        raise PrepareError(f'input file not found: {path}')
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as zf:
                names = [n for n in zf.namelist() if not n.endswith('/')]
                member = [n for n in names if os.path.basename(n) == 'text8']
                if not member and len(names) == 1:
                    member = names
                if not member:
                    raise PrepareError(f'{path}: zip has no member named text8 (members: {names[:5]})')
                return zf.read(member[0])
        except zipfile.BadZipFile as e:
            raise PrepareError(f'{path}: corrupt zip ({e})') from None
    with open(path, 'rb') as f:
        return f.read()


def download(url, out_dir):
    """Download url into out_dir/text8.zip (streamed, via a temp name) and return its path.

    A completed text8.zip already in out_dir is reused.
    """
    import requests
    from tqdm import tqdm

    dest = os.path.join(out_dir, 'text8.zip')
    expected = ZIP_SIZE if url == URL else None
    if os.path.isfile(dest) and zipfile.is_zipfile(dest):
        if expected is None or os.path.getsize(dest) == expected:
            print(f'reusing {dest}')
            return dest

    hint = f'download {url} yourself and pass --input PATH'
    part = dest + '.part'
    try:
        with requests.get(url, stream=True, timeout=30) as r:
            r.raise_for_status()
            if expected is None and r.headers.get('content-length'):
                expected = int(r.headers['content-length'])
            got = 0
            with open(part, 'wb') as f, tqdm(total=expected, unit='B', unit_scale=True,
                                             unit_divisor=1024, desc='text8.zip') as bar:
                for chunk in r.iter_content(chunk_size=1 << 20):
                    f.write(chunk)
                    got += len(chunk)
                    bar.update(len(chunk))
        if expected is not None and got != expected:
            raise PrepareError(f'could not download text8 (got {got:,} bytes, expected {expected:,}): {hint}')
        if not zipfile.is_zipfile(part):
            raise PrepareError(f'could not download text8 (the file at {url} is not a zip): {hint}')
        os.replace(part, dest)
    except requests.RequestException as e:
        parts = urllib.parse.urlsplit(url)
        if isinstance(e, requests.Timeout):
            reason = f'{parts.netloc} timed out'
        elif isinstance(e, requests.ConnectionError):
            reason = f'connection to {parts.netloc} failed'
        else:  # e.g. HTTPError '404 Client Error: Not Found for url: ...'
            reason = ' '.join(str(e).split())[:200]  # one line
        reason = f'{type(e).__name__}: {reason}'
        raise PrepareError(f'could not download text8 ({reason}): {hint}') from None
    finally:
        if os.path.exists(part):
            os.remove(part)
    return dest


# -----------------------------------------------------------------------------
# writing the output

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


def prepare(input_path=None, out_dir=DEFAULT_OUT, url=URL):
    """Build train/val/test.npy and meta.pkl in out_dir; return the split sizes as a dict.

    input_path: a text8.zip, the raw text8 file or any text8-form text; None downloads url.
    Raises PrepareError for problems the user can fix (bad input, download failure).
    """
    t0 = time.time()
    downloaded = input_path is None
    if downloaded:
        os.makedirs(out_dir, exist_ok=True)
        input_path = download(url, out_dir)
    text = read_input(input_path)  # a missing or bad --input fails before out_dir is created
    if downloaded and url == URL and len(text) != TEXT8_SIZE:
        raise PrepareError(f'{input_path}: unzipped to {len(text):,} bytes, expected {TEXT8_SIZE:,}; '
                           f'delete it and run again')
    try:
        ids = encode_text8(text)
    except PrepareError as e:
        raise PrepareError(f'{input_path}: {e}') from None
    del text

    n = len(ids)
    n_train, n_val, n_test = split_sizes(n)
    if min(n_train, n_val, n_test) == 0:
        raise PrepareError(f'{input_path}: {n:,} characters is too few to split 90/5/5')
    splits = {'train': ids[:n_train], 'val': ids[n_train:n_train + n_val], 'test': ids[n_train + n_val:]}

    os.makedirs(out_dir, exist_ok=True)
    # remove a previous meta.pkl first: its presence must always mean a complete dataset
    meta_path = os.path.join(out_dir, 'meta.pkl')
    if os.path.exists(meta_path):
        os.remove(meta_path)
    for name, arr in splits.items():
        _atomic_write(os.path.join(out_dir, f'{name}.npy'), lambda f, arr=arr: np.save(f, arr))
    meta = {'vocab_size': VOCAB_SIZE, 'itos': dict(ITOS), 'stoi': dict(STOI)}
    _atomic_write(meta_path, lambda f: pickle.dump(meta, f))

    sizes = {name: len(arr) for name, arr in splits.items()}
    print(f'text8: {n:,} characters from {input_path}')
    print(f'train {sizes["train"]:,} | val {sizes["val"]:,} | test {sizes["test"]:,} ids (uint16, vocab {VOCAB_SIZE})')
    print(f'wrote {out_dir} in {time.time() - t0:.1f}s')
    return sizes


# -----------------------------------------------------------------------------

def main(argv=None):
    parser = argparse.ArgumentParser(
        description='Prepare text8 for character-level training: 90/5/5 train/val/test split, '
                    'ids space=0, a..z=1..26, saved as uint16 .npy files plus meta.pkl.')
    parser.add_argument('--input', metavar='PATH', default=None,
                        help='local text8.zip, raw text8 file, or any text in text8 form '
                             '(only a-z and single spaces); default: download text8.zip')
    parser.add_argument('--out', metavar='DIR', default=DEFAULT_OUT,
                        help='output directory (default: %(default)s)')
    parser.add_argument('--url', default=URL, help='download URL used without --input (default: %(default)s)')
    args = parser.parse_args(argv)
    try:
        prepare(args.input, args.out, args.url)
    except (PrepareError, OSError) as e:  # OSError: e.g. an unwritable --out
        print(f'error: {e}', file=sys.stderr)
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
