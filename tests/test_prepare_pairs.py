"""Tests for data/prepare_pairs.py: tiny pair files built here, rows rebuilt by hand; the tiny_bpe fixture for the
tiktoken path (nothing downloads); the CLI as a child for the one-line errors; --task only when data/tasks.py exists."""

import csv
import json
import math
import os
import pickle

import numpy as np
import pytest

from conftest import REPO_ROOT, assert_one_line_error, run_script, script_env

import data.prepare_openwebtext as pobpe
import data.prepare_pairs as pp

SCRIPT = REPO_ROOT / 'data' / 'prepare_pairs.py'

# digits, operators, punctuation, a space, upper case, unicode; "12+7=" twice (two answers for one prompt)
PAIRS = [('12+7=', '19'), ('Hello, who?', 'World!'), ('3*4=', '12'), ('(a b)', 'ab'), ('é?', 'ü'),
         ('12+7=', '19 again'), ('', 'no prompt'), ('9-9=', '0'), ('x', 'y'), ('long prompt here', 'z')]


def write_jsonl(path, pairs, prompt='prompt', answer='answer'):
    with open(path, 'w', encoding='utf-8') as f:
        for i, (p, a) in enumerate(pairs):
            f.write(json.dumps({'id': i, prompt: p, answer: a}) + '\n')
    return path


def write_csv(path, pairs, prompt='prompt', answer='answer'):
    with open(path, 'w', encoding='utf-8', newline='') as f:
        w = csv.writer(f)
        w.writerow(['id', prompt, answer])
        w.writerows([i, p, a] for i, (p, a) in enumerate(pairs))
    return path


def write_parquet(path, pairs, prompt='prompt', answer='answer'):
    pa = pytest.importorskip('pyarrow')
    pq = pytest.importorskip('pyarrow.parquet')
    pq.write_table(pa.table({prompt: [p for p, _ in pairs], answer: [a for _, a in pairs]}), path)
    return path


def load(out):
    out = str(out)
    with open(os.path.join(out, 'meta.pkl'), 'rb') as f:
        meta = pickle.load(f)
    arrays = {name: np.load(os.path.join(out, name)) for name in pp.OUTPUTS if name.endswith('.npy')}
    with open(os.path.join(out, 'test_pairs.jsonl'), encoding='utf-8') as f:
        test_pairs = [(d['prompt'], d['answer']) for d in map(json.loads, f)]
    assert not [n for n in os.listdir(out) if '.tmp' in n]
    return meta, arrays, test_pairs


def hand_rows(pairs, encode, eoa, seq_len):
    """The oracle: prompt ids, answer ids, then end-of-answer up to seq_len; and the prompt lengths."""
    rows = []
    for p, a in pairs:
        ids = encode(p) + encode(a)
        rows.append(ids + [eoa] * (seq_len - len(ids)))
    return np.array(rows, dtype=np.int64), np.array([len(encode(p)) for p, _ in pairs])


def hand_split(pairs, fraction, seed):
    """The test rule re-derived: ceil(f * n) of the n distinct prompts (first-appearance order), kept 1..n-1, are
    the first entries of default_rng(seed).permutation(n); every pair of a test prompt is test."""
    prompts = []
    for p, _ in pairs:
        if p not in prompts:
            prompts.append(p)
    n = len(prompts)
    n_test = min(max(math.ceil(fraction * n), 1), n - 1)
    test = {prompts[i] for i in np.random.default_rng(seed).permutation(n)[:n_test]}
    return [x for x in pairs if x[0] not in test], [x for x in pairs if x[0] in test]


def check_dataset(out, train, test, encode, eoa, seq_len, vocab_size, dtype=np.uint16):
    meta, arrays, test_pairs = load(out)
    assert meta['pairs'] is True and meta['seq_len'] == seq_len and meta['eoa_id'] == eoa
    assert meta['vocab_size'] == vocab_size
    assert meta['counts'] == {'train': len(train), 'test': len(test)}
    for split, pairs in (('train', train), ('test', test)):
        rows, plen = hand_rows(pairs, encode, eoa, seq_len)
        assert arrays[f'{split}.npy'].dtype == dtype and arrays[f'{split}.npy'].shape == (len(pairs), seq_len)
        np.testing.assert_array_equal(arrays[f'{split}.npy'].astype(np.int64), rows)
        assert arrays[f'{split}_prompt_len.npy'].dtype == np.int32
        np.testing.assert_array_equal(arrays[f'{split}_prompt_len.npy'], plen)
    assert test_pairs == test
    return meta, arrays


def main(argv):
    return pp.main([str(a) for a in argv])


# -----------------------------------------------------------------------------
# rows, vocabulary, splits

def test_jsonl_chars_rows_and_fraction_split(tmp_path, capsys):
    src = write_jsonl(tmp_path / 'qa.jsonl', PAIRS)
    out = tmp_path / 'out'
    assert main(['--input', src, '--tokenizer', 'chars', '--test_fraction', 0.2, '--seed', 5, '--out', out]) == 0
    chars = sorted(set(''.join(p + a for p, a in PAIRS)))  # the vocabulary: every character of the data, sorted
    assert ' ' in chars and '!' in chars and 'H' in chars and 'é' in chars and '*' in chars
    stoi = {c: i for i, c in enumerate(chars)}
    train, test = hand_split(PAIRS, 0.2, 5)
    longest = max(len(p) + len(a) for p, a in PAIRS)
    seq_len = 8 * math.ceil((longest + 1) / 8)
    meta, arrays = check_dataset(out, train, test, lambda s: [stoi[c] for c in s], len(chars), seq_len, len(chars) + 1)
    assert meta['tokenizer'] == 'chars' and meta['itos'] == dict(enumerate(chars)) and meta['stoi'] == stoi
    assert meta['task'] is None and meta['dropped'] == {'train': 0, 'test': 0}
    assert not {p for p, _ in train} & {p for p, _ in test} and len(train) + len(test) == len(PAIRS)
    # every row: exactly one end-of-answer run, to the end of the row
    for row, pl in zip(arrays['train.npy'], arrays['train_prompt_len.npy']):
        first = int(np.argmax(row == len(chars)))
        assert first > pl and (row[first:] == len(chars)).all() and (row[:first] != len(chars)).all()
    assert pp.decode_answer(meta, arrays['train.npy'][0][arrays['train_prompt_len.npy'][0]:]) == train[0][1]
    assert 'train: 8 pairs, 0 dropped' in capsys.readouterr().out  # 9 distinct prompts, 2 test: 8 + 2 pairs


def test_split_deterministic_by_seed_and_disjoint(tmp_path):
    pairs = [(f'{i}+{i}=', str(2 * i)) for i in range(40)] + [('0+0=', '0 again')]
    src = write_jsonl(tmp_path / 'sums.jsonl', pairs)
    splits = {}
    for run, seed in (('a', 7), ('b', 7), ('c', 8)):
        assert main(['--input', src, '--tokenizer', 'chars', '--seed', seed, '--test_fraction', 0.25,
                     '--out', tmp_path / run]) == 0
        meta, arrays, test = load(tmp_path / run)
        splits[run] = (arrays['train.npy'], test)
        train_prompts = {''.join(meta['itos'][i] for i in r[:pl])
                         for r, pl in zip(arrays['train.npy'], arrays['train_prompt_len.npy'])}
        assert not train_prompts & {p for p, _ in test}  # disjoint by prompt
        assert len(train_prompts) + len({p for p, _ in test}) == 40
        assert sorted(test) == sorted(hand_split(pairs, 0.25, seed)[1]) and len({p for p, _ in test}) == 10
    np.testing.assert_array_equal(splits['a'][0], splits['b'][0])
    assert splits['a'][1] == splits['b'][1] and splits['a'][1] != splits['c'][1]


def test_csv_parquet_inputs_test_files_columns(tmp_path):
    csv_pairs = [('a, "quoted"', 'multi\nline'), ('b', 'c')]
    pq_pairs = [('d', 'ee'), ('fff', 'g')]
    test_pairs = [('h?', 'i'), ('b', 'c')]  # a test prompt also in train is allowed with --test, and noted
    a = write_csv(tmp_path / 'a.csv', csv_pairs, 'q', 'r')
    b = write_parquet(tmp_path / 'b.parquet', pq_pairs, 'q', 'r')
    t = write_jsonl(tmp_path / 't.jsonl', test_pairs, 'q', 'r')
    out = tmp_path / 'out'
    rc = main(['--input', a, b, '--test', t, '--prompt_column', 'q', '--answer_column', 'r', '--tokenizer', 'chars',
               '--seq_len', 40, '--out', out])
    assert rc == 0
    train = csv_pairs + pq_pairs
    chars = sorted(set(''.join(p + x for p, x in train + test_pairs)))
    stoi = {c: i for i, c in enumerate(chars)}
    check_dataset(out, train, test_pairs, lambda s: [stoi[c] for c in s], len(chars), 40, len(chars) + 1)


def test_gpt2_path_with_tiny_bpe(tiny_bpe, tmp_path):
    enc_file = tmp_path / 'tiny.pkl'
    pobpe.save_encoding_file(tiny_bpe, str(enc_file))
    train = [('the theme?', 'the thesis <|endoftext|> here'), ('Hi there', 'then 42')]
    test = [('in the', 'er')]
    out = tmp_path / 'out'
    assert main(['--input', write_jsonl(tmp_path / 'tr.jsonl', train), '--test', write_parquet(tmp_path / 'te.parquet', test),
                 '--encoding_file', enc_file, '--out', out]) == 0  # gpt2 is the default for files
    eot = tiny_bpe._special_tokens['<|endoftext|>']
    longest = max(len(tiny_bpe.encode_ordinary(p)) + len(tiny_bpe.encode_ordinary(a)) for p, a in train + test)
    seq_len = 8 * math.ceil((longest + 1) / 8)
    meta, arrays = check_dataset(out, train, test, tiny_bpe.encode_ordinary, eot, seq_len, tiny_bpe.n_vocab)
    assert meta['tokenizer'] == 'gpt2' and meta['eot_token'] == eot and 'itos' not in meta
    rebuilt = pobpe.load_encoding(path=str(out / 'meta.pkl'))  # the meta rebuilds the encoding offline
    assert rebuilt.encode_ordinary('the thesis') == tiny_bpe.encode_ordinary('the thesis')
    assert pp.encode_prompt(meta, 'the theme?') == tiny_bpe.encode_ordinary('the theme?')
    row, pl = arrays['train.npy'][0], arrays['train_prompt_len.npy'][0]
    assert pp.decode_answer(meta, row[pl:]) == train[0][1]
    from common import load_codec  # the repo's codec reads the stored BPE
    assert load_codec(meta['vocab_size'] + 1, None, str(out)).decode(row[:pl]) == train[0][0]


def test_dropped_pairs_counted_and_max_dropped(tmp_path, capsys):
    pairs = [(f'p{i}', 'a' * (i % 3 + 1)) for i in range(20)] + [('x' * 30, 'too long')]
    src = write_jsonl(tmp_path / 'd.jsonl', pairs)
    test = write_jsonl(tmp_path / 'dt.jsonl', [('p1', 'b')])
    out = tmp_path / 'out'
    assert main(['--input', src, '--test', test, '--tokenizer', 'chars', '--seq_len', 8, '--out', out]) == 1
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and '1 of the 21 train pairs' in err and '--max_dropped' in err
    assert not out.exists() or 'meta.pkl' not in os.listdir(out)
    # p{i} (2-3 chars) + an answer of 1-3 + end-of-answer fit 8; the long pair is dropped and counted
    assert main(['--input', src, '--test', test, '--tokenizer', 'chars', '--seq_len', 8, '--max_dropped', 0.05,
                 '--out', out]) == 0
    assert 'train: 20 pairs, 1 dropped' in capsys.readouterr().out
    meta, arrays, _ = load(out)
    assert meta['dropped'] == {'train': 1, 'test': 0} and meta['counts'] == {'train': 20, 'test': 1}
    chars = sorted(set(''.join(p + a for p, a in pairs + [('p1', 'b')])))  # the dropped pair's characters too
    assert meta['vocab_size'] == len(chars) + 1
    stoi = {c: i for i, c in enumerate(chars)}
    rows, plen = hand_rows(pairs[:20], lambda s: [stoi[c] for c in s], len(chars), 8)
    np.testing.assert_array_equal(arrays['train.npy'].astype(np.int64), rows)
    # a pair that fills the row exactly but for its end-of-answer fits: 7 + 1 = 8
    assert pp.make_rows([([1, 2, 3], [4, 5, 6, 7])], 8, 9, np.uint16)[2] == [0]
    assert pp.make_rows([([1, 2, 3], [4, 5, 6, 7, 8])], 8, 9, np.uint16)[2] == []


def test_uint32_for_a_large_vocabulary(tmp_path):
    chars = ''.join(chr(c) for c in range(0x100, 0x100 + 70000) if not 0xD800 <= c <= 0xDFFF)[:65540]  # no surrogates
    pp.prepare([('a', chars)], [('b', 'c')], str(tmp_path / 'big'), 'chars')
    meta, arrays, _ = load(tmp_path / 'big')
    assert meta['vocab_size'] > 65535 and arrays['train.npy'].dtype == np.uint32
    assert int(arrays['train.npy'].max()) == meta['eoa_id'] == meta['vocab_size'] - 1


def test_encode_prompt_unknown_character(tmp_path):
    pp.prepare([('1+2=', '3')], [('2+2=', '4')], str(tmp_path / 'o'), 'chars')
    meta, _, _ = load(tmp_path / 'o')
    assert pp.encode_prompt(meta, '21+3=') == [meta['stoi'][c] for c in '21+3=']
    with pytest.raises(ValueError) as e:
        pp.encode_prompt(meta, '1-2=')
    assert "'-'" in str(e.value) and '\n' not in str(e.value)


# -----------------------------------------------------------------------------
# bad input: one line, no meta.pkl

def test_cli_errors_are_one_line(tmp_path):
    out = tmp_path / 'out'
    cases = []
    cases.append((write_jsonl(tmp_path / 'empty_answer.jsonl', [('a', 'b'), ('c', '')]),
                  ['empty_answer.jsonl:2', 'empty answer']))
    cases.append((write_csv(tmp_path / 'cols.csv', [('a', 'b')], 'question', 'reply'),
                  ["no column 'prompt'", 'id, question, reply']))
    cases.append((write_csv(tmp_path / 'empty.csv', [('a', 'b'), ('c', '')]), ['empty.csv: row 2', 'empty answer']))
    bad = tmp_path / 'latin1.jsonl'
    bad.write_bytes('{"prompt": "caf\u00e9", "answer": "x"}\n'.encode('latin-1'))
    cases.append((bad, ['latin1.jsonl', 'not UTF-8']))
    broken = tmp_path / 'broken.parquet'
    broken.write_bytes(b'not a parquet file')
    cases.append((broken, ['broken.parquet', 'cannot read parquet']))
    cases.append((tmp_path / 'missing.jsonl', ['not found', 'missing.jsonl']))
    cases.append((_write_text(tmp_path / 'num.jsonl', '{"prompt": "1+1=", "answer": 2}\n'), ["'answer' is int"]))
    for src, words in cases:
        res = run_script([SCRIPT, '--input', src, '--tokenizer', 'chars', '--out', out], timeout=60,
                         env=script_env(HF_HOME=tmp_path / 'hf'))
        assert_one_line_error(res, *words)
        assert not out.exists() or 'meta.pkl' not in os.listdir(out)
    # the refusal of too many dropped pairs, from the CLI too
    src = write_jsonl(tmp_path / 'long.jsonl', [('abc', 'defgh'), ('a', 'b')])
    res = run_script([SCRIPT, '--input', src, '--test', src, '--tokenizer', 'chars', '--seq_len', 4, '--out', out],
                     timeout=60)
    assert_one_line_error(res, '1 of the 2 train pairs', 'seq_len 4')
    assert not out.exists() or 'meta.pkl' not in os.listdir(out)


def _write_text(path, text):
    path.write_text(text, encoding='utf-8')
    return path


def test_bad_input_keeps_a_previous_dataset_complete(tmp_path):
    """A refused run leaves no half-written files: the previous complete dataset stays as it was."""
    out = tmp_path / 'out'
    good = write_jsonl(tmp_path / 'g.jsonl', PAIRS)
    assert main(['--input', good, '--tokenizer', 'chars', '--out', out]) == 0
    before = {n: (out / n).read_bytes() for n in os.listdir(out)}
    assert main(['--input', write_jsonl(tmp_path / 'b.jsonl', [('a', '')]), '--tokenizer', 'chars', '--out', out]) == 1
    assert {n: (out / n).read_bytes() for n in os.listdir(out)} == before


def test_default_out_and_help(tmp_path, monkeypatch):
    monkeypatch.setattr(pp, 'DATA_DIR', str(tmp_path / 'data'))
    assert main(['--input', write_jsonl(tmp_path / 'myqa.jsonl', PAIRS), '--tokenizer', 'chars']) == 0
    assert sorted(os.listdir(tmp_path / 'data' / 'myqa')) == sorted(pp.OUTPUTS + ('meta.pkl',))
    res = run_script([SCRIPT, '--help'], timeout=60)
    assert res.returncode == 0
    for opt in ('--input', '--hf_dataset', '--task', '--prompt_column', '--answer_column', '--test', '--test_fraction',
                '--seed', '--n_train', '--n_test', '--tokenizer', '--encoding', '--encoding_file', '--seq_len',
                '--max_dropped', '--out'):
        assert opt in res.stdout


def test_cli_hf_dataset_local_folder(tmp_path):
    folder = tmp_path / 'my_pairs'
    (folder / 'data').mkdir(parents=True)
    pairs = [(f'q{i}?', f'a{i * 7}') for i in range(20)]
    write_parquet(folder / 'data' / 'train-00000.parquet', pairs, 'question', 'ans')
    out = tmp_path / 'out'
    env = script_env(HF_HOME=tmp_path / 'hf')
    res = run_script([SCRIPT, '--hf_dataset', folder, '--prompt_column', 'question', '--answer_column', 'ans',
                      '--tokenizer', 'chars', '--test_fraction', 0.1, '--seed', 3, '--out', out], timeout=120, env=env)
    assert res.returncode == 0, res.stderr
    train, test = hand_split(pairs, 0.1, 3)
    chars = sorted(set(''.join(p + a for p, a in pairs)))
    stoi = {c: i for i, c in enumerate(chars)}
    check_dataset(out, train, test, lambda s: [stoi[c] for c in s], len(chars), 16, len(chars) + 1)  # 'q19?a133' + 1
    res = run_script([SCRIPT, '--hf_dataset', folder, '--tokenizer', 'chars', '--out', tmp_path / 'o2'],
                     timeout=120, env=env)
    assert_one_line_error(res, "no column 'prompt'", 'question, ans')


# -----------------------------------------------------------------------------
# --task (data/tasks.py, written separately)

HAVE_TASKS = (REPO_ROOT / 'data' / 'tasks.py').exists()


@pytest.mark.skipif(HAVE_TASKS, reason='data/tasks.py is here')
def test_task_without_tasks_module(tmp_path):
    res = run_script([SCRIPT, '--task', 'addition', '--n_train', 5, '--n_test', 2, '--out', tmp_path / 'o'],
                     timeout=60)
    assert_one_line_error(res, 'data/tasks.py')


@pytest.mark.skipif(not HAVE_TASKS, reason='data/tasks.py is not here yet')
@pytest.mark.parametrize('name', ['addition', 'path_star', 'sudoku', 'countdown'])
def test_task(tmp_path, name):
    tasks = pytest.importorskip('data.tasks')
    if name not in tasks.TASKS:
        pytest.skip(f'no task {name} in data/tasks.py')
    out = tmp_path / 'out'
    params = dict(tasks.TASKS[name])
    assert main(['--task', name, '--n_train', 40, '--n_test', 10, '--seed', 11, '--out', out]) == 0
    train, test = tasks.split(name, 40, 10, 11, **params)  # the oracle: the task's own split
    train, test = [tuple(x) for x in train], [tuple(x) for x in test]
    chars = sorted(set(''.join(p + a for p, a in train + test)))
    stoi = {c: i for i, c in enumerate(chars)}
    longest = max(len(p) + len(a) for p, a in train + test)
    meta, _ = check_dataset(out, train, test, lambda s: [stoi[c] for c in s], len(chars),
                            8 * math.ceil((longest + 1) / 8), len(chars) + 1)
    assert meta['task'] == {'name': name, 'params': params, 'seed': 11, 'n_train': 40, 'n_test': 10}
    assert not {p for p, _ in train} & {p for p, _ in test}
    assert all(tasks.check(name, p, a, **params) for p, a in test)


@pytest.mark.skipif(not HAVE_TASKS, reason='data/tasks.py is not here yet')
def test_task_params_options_and_errors(tmp_path):
    tasks = pytest.importorskip('data.tasks')
    name = next(iter(tasks.TASKS))
    res = run_script([SCRIPT, '--task', name, '--help'], timeout=60)
    assert res.returncode == 0 and all(f'--{k}' in res.stdout for k in tasks.TASKS[name])
    assert_one_line_error(run_script([SCRIPT, '--task', 'no_such_task', '--n_train', 5, '--n_test', 2,
                                      '--out', tmp_path / 'o'], timeout=60), "'no_such_task'", name)
    ints = [k for k, v in tasks.TASKS[name].items() if isinstance(v, int) and not isinstance(v, bool)]
    if ints:  # a parameter given as an option reaches the task and meta
        k = ints[0]
        assert main(['--task', name, '--n_train', 20, '--n_test', 5, f'--{k}', tasks.TASKS[name][k],
                     '--out', tmp_path / 'p']) == 0
        assert load(tmp_path / 'p')[0]['task']['params'][k] == tasks.TASKS[name][k]
    res = run_script([SCRIPT, '--task', 'addition', '--n_train', 5, '--n_test', 2, '--min_digits', 0,
                      '--out', tmp_path / 'q'], timeout=60)
    assert_one_line_error(res, "task 'addition'", 'min_digits')
    assert not (tmp_path / 'q').exists()
