"""data/tasks.py: the planning tasks' generators and checkers, each against an oracle written here
(a different algorithm from the module's: in-order backtracking for sudoku, a brute force over all
expressions for countdown, the test's own graph parse for path_star, int arithmetic for addition)."""
import itertools
import os
import random
import subprocess
import sys

import numpy as np
import pytest

from data import tasks

DIGITS = set('123456789')


# ---- oracles ------------------------------------------------------------------------------------------
def count_sudoku_solutions(cells, limit=3):
    """Solutions of an 81-character puzzle ('0' blank), counted up to limit: plain backtracking over the
    blanks in reading order, each digit tried against the cell's row, column and box."""
    g = [int(c) for c in cells]

    def ok(i, d):
        r, c = divmod(i, 9)
        br, bc = r // 3 * 3, c // 3 * 3
        return all(g[r * 9 + k] != d and g[k * 9 + c] != d and g[(br + k // 3) * 9 + bc + k % 3] != d
                   for k in range(9))

    for i in range(81):  # the givens themselves must not clash
        if g[i]:
            d, g[i] = g[i], 0
            clash = not ok(i, d)
            g[i] = d
            if clash:
                return 0
    blanks = [i for i in range(81) if not g[i]]

    def count(k):
        if k == len(blanks):
            return 1
        i, n = blanks[k], 0
        for d in range(1, 10):
            if ok(i, d):
                g[i] = d
                n += count(k + 1)
                g[i] = 0
                if n >= limit:
                    break
        return n

    return min(count(0), limit)


def countdown_solutions(nums):
    """{value: equations} for every value reachable using each number exactly once (all pairs, all
    operations, every result a positive integer): an exhaustive search, independent of the module."""
    if len(nums) == 1:
        return {nums[0]: []}
    out = {}
    for i, j in itertools.permutations(range(len(nums)), 2):
        a, b = nums[i], nums[j]
        rest = [x for k, x in enumerate(nums) if k not in (i, j)]
        results = [('+', a + b), ('*', a * b)]
        if a > b:
            results.append(('-', a - b))
        if a % b == 0:
            results.append(('/', a // b))
        for op, c in results:
            for value, eqs in countdown_solutions(rest + [c]).items():
                out.setdefault(value, [f'{a}{op}{b}={c}'] + eqs)
    return out


def b36(v):
    """The test's own base-36 writing (numpy's, lowercase)."""
    return np.base_repr(v, 36).lower()


def parse_star(prompt):
    """The test's own parse of a path_star prompt (labels in base 36): (edges as int pairs, start, goal)."""
    edge_part, query = prompt.split('|')
    edges = [tuple(int(x, 36) for x in e.split('>')) for e in edge_part.split(',')]
    start, goal = (int(x, 36) for x in query.split('>'))
    return edges, start, goal


def find_deadly_rectangle(grid):
    """Cells (r1,c1),(r1,c2),(r2,c1),(r2,c2) of a solved grid (81 chars), r1, r2 in one band and c1, c2 in
    two stacks, holding a b / b a: blanking them leaves (at least) two solutions. None if there is none."""
    for r1, r2 in itertools.combinations(range(9), 2):
        if r1 // 3 != r2 // 3:
            continue
        for c1, c2 in itertools.combinations(range(9), 2):
            if c1 // 3 != c2 // 3 and grid[r1 * 9 + c1] == grid[r2 * 9 + c2] and grid[r1 * 9 + c2] == grid[r2 * 9 + c1]:
                return [r1 * 9 + c1, r1 * 9 + c2, r2 * 9 + c1, r2 * 9 + c2]
    return None


@pytest.fixture(scope='module')
def sudokus():
    return tasks.generate('sudoku', 30, seed=3)


# ---- sudoku -------------------------------------------------------------------------------------------
def test_sudoku_counter_tells_one_from_two_solutions(sudokus):
    """The oracle can fail: blanking a deadly rectangle of a solved grid gives it two solutions."""
    for puzzle, solution in sudokus:
        cells = find_deadly_rectangle(solution)
        if cells is None:
            continue
        two = ''.join('0' if i in cells else c for i, c in enumerate(solution))
        assert count_sudoku_solutions(two) == 2
        assert count_sudoku_solutions(solution) == 1
        assert tasks._search([int(c) for c in two], 3)[0] == 2  # the module's counter agrees
        # the same rectangle blanked in the real puzzle: no longer unique
        loose = ''.join('0' if i in cells else c for i, c in enumerate(puzzle))
        assert count_sudoku_solutions(loose) >= 2
        break
    else:
        pytest.fail('no deadly rectangle in any sample grid')
    clash = '11' + '0' * 79
    assert count_sudoku_solutions(clash) == 0


def test_sudoku_unique_and_in_range(sudokus):
    for puzzle, solution in sudokus:
        assert len(puzzle) == 81 and set(puzzle) <= set('0123456789')
        assert 30 <= 81 - puzzle.count('0') <= 40
        assert count_sudoku_solutions(puzzle) == 1, puzzle
        assert all(p in ('0', s) for p, s in zip(puzzle, solution))
    givens = [(p, 81 - p.count('0')) for p, _ in tasks.generate('sudoku', 4, seed=0, min_givens=45, max_givens=50)]
    for p, n in givens:
        assert 45 <= n <= 50 and count_sudoku_solutions(p) == 1


def test_sudoku_checker(sudokus):
    for puzzle, solution in sudokus[:4]:
        assert tasks.check('sudoku', puzzle, solution)
        # two blank cells of one row swapped: the row is still a permutation, columns are not
        r = next(r for r in range(9) if puzzle[r * 9:r * 9 + 9].count('0') >= 2)
        i, j = [r * 9 + c for c in range(9) if puzzle[r * 9 + c] == '0'][:2]
        s = list(solution)
        s[i], s[j] = s[j], s[i]
        assert not tasks.check('sudoku', puzzle, ''.join(s))
        # relabelled digits: a valid grid, but the givens are not kept
        relabel = solution.translate(str.maketrans('123456789', '234567891'))
        assert not tasks.check('sudoku', puzzle, relabel)
        assert tasks.check('sudoku', '0' * 81, relabel)  # the checker does not compare with a stored grid
        # one given changed in the answer
        g = puzzle.index(next(c for c in puzzle if c != '0'))
        s = list(solution)
        s[g] = str(int(s[g]) % 9 + 1)
        assert not tasks.check('sudoku', puzzle, ''.join(s))
        # the puzzle has one solution, so any other string is wrong
        rng = random.Random(puzzle)
        for _ in range(30):
            k = rng.randrange(81)
            m = solution[:k] + rng.choice('0123456789x ') + solution[k + 1:]
            assert tasks.check('sudoku', puzzle, m) == (m == solution)
        for bad in ('', solution[:-1], solution + '1', solution.replace('1', '0'), None, 5, list(solution)):
            assert tasks.check('sudoku', puzzle, bad) is False
    latin = ''.join(str((r + c) % 9 + 1) for r in range(9) for c in range(9))  # rows, columns fine, boxes not
    assert not tasks.check('sudoku', '0' * 81, latin)


# ---- path_star ----------------------------------------------------------------------------------------
@pytest.mark.parametrize('params', [{}, {'degree': 5, 'arm_length': 8, 'nodes': 100},
                                    {'degree': 2, 'arm_length': 1, 'nodes': 6}])
def test_path_star_shape_and_checker(params):
    p = {**tasks.TASKS['path_star'], **params}
    D, M, N = p['degree'], p['arm_length'], p['nodes']
    pairs = tasks.generate('path_star', 20, seed=1, **params)
    for prompt, answer in pairs:
        edges, start, goal = parse_star(prompt)
        out = {}
        for a, b in edges:
            out.setdefault(a, []).append(b)
        labels = {x for e in edges for x in e}
        assert len(edges) == D * M and len(labels) == 1 + D * M and all(0 <= x < N for x in labels)
        if N <= 36:  # one character (one token of --tokenizer chars) per label
            assert all(len(x) == 1 for x in prompt.replace('|', ',').replace('>', ',').split(','))
        assert len(out[start]) == D and all(len(v) <= 1 for k, v in out.items() if k != start)
        arms = []
        for first in out[start]:
            arm = [first]
            while arm[-1] in out:
                arm.append(out[arm[-1]][0])
            arms.append(arm)
        assert sorted(len(a) for a in arms) == [M] * D
        assert goal in [a[-1] for a in arms]
        true = [start] + next(a for a in arms if a[-1] == goal)
        assert answer == ','.join(map(b36, true))
        assert tasks.check('path_star', prompt, answer)
        for arm in arms:  # the other arms, whole
            if arm[-1] != goal:
                assert not tasks.check('path_star', prompt, ','.join(map(b36, [start] + arm)))
        wrong = [true[:-1], true[1:], true[::-1], true + [true[-1]], [start, goal]]
        if M > 1:
            wrong.append(true[:1] + true[2:])
        for w in wrong:
            if w != true:
                assert not tasks.check('path_star', prompt, ','.join(map(b36, w)))
        for bad in ('', answer + ',', ' ' + answer, answer.replace(',', ';'), '0' + answer, None, true):
            assert tasks.check('path_star', prompt, bad) is False


def test_path_star_rejects_impossible():
    with pytest.raises(ValueError, match='nodes=15'):
        tasks.generate('path_star', 1, 0, degree=3, arm_length=5, nodes=15)
    assert tasks.generate('path_star', 1, 0, degree=3, arm_length=5, nodes=16)
    # 3 labels, 2 arms of 1: 3 centres x 2 edge orders x 2 goals = 12 distinct prompts, no more
    assert len(tasks.generate('path_star', 12, 0, degree=2, arm_length=1, nodes=3)) == 12
    with pytest.raises(ValueError, match='only 12 distinct'):
        tasks.generate('path_star', 13, 0, degree=2, arm_length=1, nodes=3)


# ---- countdown ----------------------------------------------------------------------------------------
@pytest.mark.parametrize('numbers', [3, 4])
def test_countdown_reachable_by_brute_force(numbers):
    pairs = tasks.generate('countdown', 15 if numbers == 3 else 6, seed=2, numbers=numbers)
    for prompt, answer in pairs:
        nums_s, target_s = prompt.split(':')
        nums, target = [int(x) for x in nums_s.split(',')], int(target_s)
        assert len(nums) == numbers and all(1 <= x <= 99 for x in nums) and 10 <= target <= 100
        assert tasks.check('countdown', prompt, answer)
        found = countdown_solutions(nums)
        assert target in found
        # the brute force's own solution (often not the generator's) passes too
        assert tasks.check('countdown', prompt, ','.join(found[target]))
        # every value the brute force cannot reach is rejected
        unreachable = next(v for v in range(1, 10 ** 6) if v not in found)
        assert not tasks.check('countdown', f'{nums_s}:{unreachable}', answer)


def test_countdown_checker_rules():
    prompt = '1,2,3,4:24'
    for ok in ('1*2=2,2*3=6,6*4=24', '4*3=12,2*1=2,12*2=24', '1+2=3,3+3=6,6*4=24', '2*4=8,8*3=24,24/1=24'):
        assert tasks.check('countdown', prompt, ok), ok
    bad = {
        'wrong arithmetic': '1*2=3,3+3=6,6*4=24',
        'a result used twice': '3*4=12,12+12=24,24*1=24',
        'a prompt number used twice': '4+4=8,8*3=24,24*1=24',
        'a number not in the prompt': '6*4=24,3-2=1,24*1=24',
        'wrong final value': '1+2=3,3+3=6,6+4=10',
        'a number left unused': '3*4=12,12*2=24',
        'an extra equation': '1*2=2,2*3=6,6*4=24,24/1=24',
        'a leading zero': '01*2=2,2*3=6,6*4=24',
        'spaces': '1*2=2, 2*3=6, 6*4=24',
        'a trailing comma': '1*2=2,2*3=6,6*4=24,',
        'garbage': 'abc',
        'empty': '',
    }
    for why, answer in bad.items():
        assert not tasks.check('countdown', prompt, answer), why
    # every result must be a positive integer: no 0, no negative, no fraction
    assert not tasks.check('countdown', '2,2,5:5', '2-2=0,0+5=5')
    assert not tasks.check('countdown', '2,3,5:4', '2-3=-1,5--1=6')
    assert not tasks.check('countdown', '2,3,4:4', '3/2=1,1*4=4')
    assert tasks.check('countdown', '2,2,5:5', '2/2=1,5*1=5')
    for bad_type in (None, 24, ['1*2=2']):
        assert tasks.check('countdown', prompt, bad_type) is False


def test_countdown_generator_answers_perturbed():
    for prompt, answer in tasks.generate('countdown', 30, seed=5, numbers=5):
        assert tasks.check('countdown', prompt, answer)
        eqs = answer.split(',')
        lhs, c = eqs[-1].split('=')
        assert not tasks.check('countdown', prompt, ','.join(eqs[:-1] + [f'{lhs}={int(c) + 1}']))  # false
        assert not tasks.check('countdown', prompt, ','.join(eqs[:-1]))
        assert not tasks.check('countdown', prompt, ','.join(eqs + eqs[-1:]))
        # the same (true, complete) answer for a prompt whose numbers lack its first operand
        a = int(next(eqs[0].split(o)[0] for o in '+-*/' if o in eqs[0]))
        nums_s, target = prompt.split(':')
        nums = [int(x) for x in nums_s.split(',')]
        other = sorted(max(nums) + 1 if x == a else x for x in nums)
        assert not tasks.check('countdown', f"{','.join(map(str, other))}:{target}", answer)


# ---- addition -----------------------------------------------------------------------------------------
def test_addition_hand_examples():
    assert tasks.check('addition', '123+4567=', '4690')
    assert tasks.check('addition', '0+0=', '0')
    assert tasks.check('addition', '99999+1=', '100000')
    for prompt, bad in [('123+4567=', '4691'), ('123+4567=', '04690'), ('123+4567=', '4690 '), ('0+0=', '00'),
                        ('0+0=', ''), ('5+5=', '1O'), ('5+5=', '+10'), ('5+5=', '10.0'), ('5+5=', None)]:
        assert tasks.check('addition', prompt, bad) is False, (prompt, bad)
    assert tasks.check('addition', '5+5=', '\u0661\u0660') is False  # Arabic-Indic digits: int() would take them


def test_addition_against_int_arithmetic():
    rng = random.Random(0)
    for _ in range(300):
        a, b = rng.randrange(10 ** rng.randint(1, 12)), rng.randrange(10 ** rng.randint(1, 12))
        prompt = f'{a}+{b}='
        assert tasks.check('addition', prompt, str(a + b))
        for d in (-1, 1, 10, -(a + b) - 1):
            assert not tasks.check('addition', prompt, str(a + b + d))
    for params, lo, hi in [({}, 1, 5), ({'min_digits': 3, 'max_digits': 3}, 3, 3), ({'max_digits': 30}, 1, 30)]:
        for prompt, answer in tasks.generate('addition', 200, seed=4, **params):
            a, b = prompt[:-1].split('+')
            assert all(lo <= len(x) <= hi and (x == '0' or x[0] != '0') for x in (a, b))
            assert answer == str(int(a) + int(b))
            assert tasks.check('addition', prompt, answer)
    # 1-digit operands: exactly 100 prompts exist
    assert len(tasks.generate('addition', 100, 0, max_digits=1)) == 100
    with pytest.raises(ValueError, match='only 100 distinct'):
        tasks.generate('addition', 101, 0, max_digits=1)


# ---- all tasks ----------------------------------------------------------------------------------------
N = {'path_star': 300, 'sudoku': 20, 'countdown': 300, 'addition': 300}


@pytest.mark.parametrize('name', list(tasks.TASKS))
def test_deterministic_distinct_and_alphabet(name):
    n = N[name]
    pairs = tasks.generate(name, n, seed=7)
    assert len(pairs) == n and pairs == tasks.generate(name, n, seed=7)
    assert pairs != tasks.generate(name, n, seed=8)
    assert tasks.generate(name, n // 2, seed=7) == pairs[:n // 2]  # a prefix
    assert len({p for p, _ in pairs}) == n
    if name == 'sudoku':
        assert len({a for _, a in pairs}) == n
    assert all(isinstance(p, str) and isinstance(a, str) and p and a for p, a in pairs)
    used = set(''.join(p + a for p, a in pairs))
    assert used <= set(tasks.ALPHABET), used - set(tasks.ALPHABET)
    assert all(tasks.check(name, p, a) for p, a in pairs)
    assert tasks.generate(name, 0, seed=7) == []


def test_alphabet():
    assert tasks.ALPHABET == '0123456789abcdefghijklmnopqrstuvwxyz ,;:=+-*/|>()'
    assert len(set(tasks.ALPHABET)) == len(tasks.ALPHABET) == 49


def test_same_problems_in_another_process():
    """Nothing depends on Python's per-process hash seed (set iteration, str hashes)."""
    code = ('from data import tasks; import hashlib; '
            'print(hashlib.sha256(repr([tasks.generate(n, 5, 11) for n in tasks.TASKS]).encode()).hexdigest())')
    outs = set()
    for hash_seed in ('1', '2'):
        env = {**os.environ, 'PYTHONHASHSEED': hash_seed}
        outs.add(subprocess.run([sys.executable, '-c', code], cwd=os.path.dirname(os.path.dirname(__file__)),
                                env=env, capture_output=True, text=True, check=True).stdout)
    import hashlib
    here = hashlib.sha256(repr([tasks.generate(n, 5, 11) for n in tasks.TASKS]).encode()).hexdigest() + '\n'
    assert outs == {here}


@pytest.mark.parametrize('name', list(tasks.TASKS))
def test_split(name):
    n_train, n_test = (20, 8) if name == 'sudoku' else (200, 50)
    train, test = tasks.split(name, n_train, n_test, seed=9)
    assert len(train) == n_train and len(test) == n_test
    assert not {p for p, _ in train} & {p for p, _ in test}
    if name == 'sudoku':
        assert not {a for _, a in train} & {a for _, a in test}
    assert (train, test) == tasks.split(name, n_train, n_test, seed=9)
    train2, test2 = tasks.split(name, n_train // 2, n_test, seed=9)
    assert test2 == test and train2 == train[:n_train // 2]  # the test set does not depend on n_train
    assert tasks.split(name, n_train, n_test, seed=10)[1] != test


@pytest.mark.parametrize('name', list(tasks.TASKS))
def test_checker_never_raises_on_malformed_answers(name):
    rng = random.Random(name)
    prompt, answer = tasks.generate(name, 1, seed=12)[0]
    candidates = ['', ' ', ',', '=', '|', '>', '1' * 5000, '1' * 5000 + '+1=2', '9' * 1200 + '*2=1',
                  answer * 2, answer[::-1]]
    for _ in range(300):
        k = rng.randrange(len(answer) + 1)
        candidates.append(answer[:k] + rng.choice(tasks.ALPHABET + '\n') + answer[k + 1:])  # a change
        candidates.append(answer[:k] + rng.choice(tasks.ALPHABET) + answer[k:])  # an insertion
        candidates.append(''.join(rng.choice(tasks.ALPHABET) for _ in range(rng.randint(1, 40))))
    for c in candidates:
        ok = tasks.check(name, prompt, c)
        assert ok is True or ok is False
        if name != 'countdown':  # these tasks have exactly one right answer
            assert ok == (c == answer), c


def test_one_line_value_errors():
    cases = [
        lambda: tasks.generate('maze', 1, 0),
        lambda: tasks.generate('sudoku', 1, 0, givens=30),
        lambda: tasks.generate('sudoku', 1, 0, min_givens=16),
        lambda: tasks.generate('sudoku', 1, 0, min_givens=41, max_givens=40),
        lambda: tasks.generate('sudoku', 1, 0, max_givens=82),
        lambda: tasks.generate('path_star', 1, 0, degree=0),
        lambda: tasks.generate('path_star', 1, 0, degree=2.0),
        lambda: tasks.generate('path_star', 1, 0, degree=True),
        lambda: tasks.generate('countdown', 1, 0, numbers=7),
        lambda: tasks.generate('countdown', 1, 0, numbers=1),
        lambda: tasks.generate('countdown', 1, 0, min_target=50, max_target=40),
        lambda: tasks.generate('countdown', 1, 0, numbers=2, max_number=1),  # only 1 and 2 are reachable
        lambda: tasks.generate('addition', 1, 0, min_digits=0),
        lambda: tasks.generate('addition', 1, 0, min_digits=3, max_digits=2),
        lambda: tasks.generate('addition', -1, 0),
        lambda: tasks.generate('addition', 1, '0'),
        lambda: tasks.split('addition', -1, 5, 0),
        lambda: tasks.check('maze', '1+1=', '2'),
        lambda: tasks.check('addition', '1+1=', '2', digits=3),
        lambda: tasks.check('addition', '1+1', '2'),
        lambda: tasks.check('sudoku', '0' * 80, '1' * 81),
        lambda: tasks.check('path_star', '1>2,3>4|1>4', '1,2,3,4'),
        lambda: tasks.check('countdown', '1,2,3', '1+2=3'),
    ]
    for i, case in enumerate(cases):
        with pytest.raises(ValueError) as e:
            case()
        assert str(e.value) and '\n' not in str(e.value), (i, str(e.value))


def test_sudoku_distinct_by_solution_grid(monkeypatch, sudokus):
    """Two puzzles of one grid count as one problem: generate skips the second, so split's train and test
    never share a solution. (Random grids practically never repeat, so a fake maker shows it.)"""
    (p1, s1), (p2, s2) = sudokus[:2]
    other = ''.join('0' if c != '0' and i % 7 == 0 else c for i, c in enumerate(p1))  # another puzzle of s1
    made = iter([(p1, s1), (other, s1), (p2, s2)])
    monkeypatch.setitem(tasks._MAKE, 'sudoku', lambda rng, **p: next(made))
    assert tasks.generate('sudoku', 2, seed=0) == [(p1, s1), (p2, s2)]
