"""
Built-in planning tasks for conditional generation: prompt -> answer pairs in plain text, each with a
deterministic generator and a checker that decides whether an answer is correct (not only string equality).

    path_star   the path from the centre of a star graph to the end of one arm
                (Bachmann & Nagarajan 2024, "The pitfalls of next-token prediction")
    sudoku      a 9x9 sudoku with a unique solution (Ye et al. 2024, "Beyond Autoregression")
    countdown   reach a target by combining numbers with + - * / (the same paper)
    addition    the sum of two multi-digit numbers (a control)

Every prompt and answer is made of the characters of ALPHABET only: the digits 0-9, the lowercase letters
a-z, space and the punctuation , ; : = + - * / | > ( )   (49 characters; the tasks use a subset of them).

API:
    TASKS                                         {name: {parameter: default}}
    generate(name, n, seed, **params)             -> [(prompt, answer)], n problems with distinct prompts,
                                                     the same for the same (seed, params); generate(n) is a
                                                     prefix of generate(n + k)
    check(name, prompt, answer, **params)         -> bool, from the prompt alone (params are only validated);
                                                     a malformed answer (any object) is False, never an error
    split(name, n_train, n_test, seed, **params)  -> (train, test), disjoint by prompt (sudoku: also by
                                                     solution grid); test does not depend on n_train
Unknown names or parameters and impossible settings raise ValueError with a one-line message.
The checkers take the answer exactly as written: no spaces, no padding (strip a model's padding first).

Formats (examples: generate(name, 1, seed=0) with the defaults, shortened with ...):

path_star   degree=3 arms of arm_length=5 nodes each go out from a centre node; the 1 + degree * arm_length
            labels are distinct, drawn from range(nodes=36) and written in base 36 (0-9 then a-z, no leading
            zeros), so up to 36 nodes every label is one character, one token of --tokenizer chars. Prompt: the edges "a>b" (directed away from the
            centre) in random order, joined by ",", then "|", then "start>goal" (start = the centre, goal =
            the last node of one arm). Answer: the path from start to goal, labels joined by ",".
                m>x,a>q,b>a,2>k,...,j>y,m>5,y>4|m>v   ->   m,x,p,2,k,v
            Checker: the answer is exactly the path found by walking the prompt's edges back from the goal.

sudoku      Prompt: the 81 cells row by row, "0" for a blank, min_givens..max_givens (default 30..40) of
            them given, with exactly one solution. Answer: the 81 digits of the solution.
                070800000052190030306504000107...   ->   971836542452197836386524971197...
            Checker: 81 digits 1-9, every row, column and 3x3 box a permutation of 1..9, every given kept
            (no stored solution is used).

countdown   numbers=4 numbers drawn from 1..max_number=99 (repeats allowed, written in increasing order),
            and a target in min_target..max_target (default 10..100). Prompt: "n1,n2,...:target".
            Answer: one equation "a<op>b=c" per operation, joined by ",", numbers-1 of them.
                28,58,82,89:23   ->   58-28=30,89-82=7,30-7=23
            The rule (Countdown as in the paper): each prompt number is used exactly once; an operation takes
            two operands that are prompt numbers or results of earlier equations, each used once; + - * /
            only, and every result is a positive integer (a-b needs a > b, a/b needs b to divide a).
            Checker: every equation is true arithmetic under that rule and the last result is the target;
            any correct solution passes, not only the generator's.

addition    two numbers, each of min_digits..max_digits (default 1..5) digits (the length drawn uniformly,
            then the number), no leading zeros. Prompt "a+b=", answer the decimal sum.
                5454+71=   ->   5525
            Checker: the answer is the sum written without leading zeros.

Limits: path_star needs nodes >= 1 + degree * arm_length; sudoku 17 <= min_givens <= max_givens <= 81
(each puzzle aims at a count drawn from the range and keeps a few more givens when no blank can be added
without losing uniqueness; 22..23 still works, slowly, but e.g. 20..22 fails 50 grids in a row: ValueError);
countdown numbers in 2..6; addition up to 1000 digits. generate raises ValueError when a setting has
too few distinct problems (MAX_MISSES duplicates in a row).
"""

import random
import re
from collections import Counter

ALPHABET = '0123456789abcdefghijklmnopqrstuvwxyz ,;:=+-*/|>()'

TASKS = {
    'path_star': {'degree': 3, 'arm_length': 5, 'nodes': 36},
    'sudoku': {'min_givens': 30, 'max_givens': 40},
    'countdown': {'numbers': 4, 'max_number': 99, 'min_target': 10, 'max_target': 100},
    'addition': {'min_digits': 1, 'max_digits': 5},
}

MAX_MISSES = 1000  # generate gives up after this many duplicate problems in a row
_NUM = r'(?:0|[1-9][0-9]{0,999})'  # a decimal without leading zeros ([0-9], not \d: no other Unicode digits)
_B36 = r'(?:0|[1-9a-z][0-9a-z]{0,99})'  # a base-36 numeral without leading zeros (path_star's labels)
_DIGITS36 = '0123456789abcdefghijklmnopqrstuvwxyz'


def _base36(v):
    """v >= 0 written in base 36: 0-9 then a-z."""
    out = _DIGITS36[v % 36]
    while v >= 36:
        v //= 36
        out = _DIGITS36[v % 36] + out
    return out


# -----------------------------------------------------------------------------
# parameters

def _params(name, params):
    """The task's defaults updated with params; checks names, types and ranges (ValueError, one line)."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r} (known: {', '.join(TASKS)})")
    for k, v in params.items():
        if k not in TASKS[name]:
            raise ValueError(f"unknown parameter {k!r} for task {name!r} (known: {', '.join(TASKS[name])})")
        if not isinstance(v, int) or isinstance(v, bool):
            raise ValueError(f"{name}: parameter {k} must be an int, got {v!r}")
    p = {**TASKS[name], **params}
    if name == 'path_star':
        if p['degree'] < 1 or p['arm_length'] < 1:
            raise ValueError(f"path_star: degree and arm_length must be >= 1, got {p['degree']}, {p['arm_length']}")
        if p['nodes'] < 1 + p['degree'] * p['arm_length']:
            raise ValueError(f"path_star: nodes={p['nodes']} is fewer than the 1 + degree * arm_length = "
                             f"{1 + p['degree'] * p['arm_length']} distinct labels a graph needs")
    elif name == 'sudoku':
        if not 17 <= p['min_givens'] <= p['max_givens'] <= 81:
            raise ValueError(f"sudoku: need 17 <= min_givens <= max_givens <= 81 (no 9x9 sudoku with fewer than "
                             f"17 givens has a unique solution), got {p['min_givens']}..{p['max_givens']}")
    elif name == 'countdown':
        if not 2 <= p['numbers'] <= 6:
            raise ValueError(f"countdown: numbers must be in 2..6, got {p['numbers']}")
        if p['max_number'] < 1 or not 1 <= p['min_target'] <= p['max_target']:
            raise ValueError(f"countdown: need max_number >= 1 and 1 <= min_target <= max_target, got "
                             f"max_number={p['max_number']}, targets {p['min_target']}..{p['max_target']}")
    elif name == 'addition':
        if not 1 <= p['min_digits'] <= p['max_digits'] <= 1000:
            raise ValueError(f"addition: need 1 <= min_digits <= max_digits <= 1000, "
                             f"got {p['min_digits']}..{p['max_digits']}")
    return p


# -----------------------------------------------------------------------------
# path_star

def _make_path_star(rng, degree, arm_length, nodes):
    labels = [_base36(v) for v in rng.sample(range(nodes), 1 + degree * arm_length)]
    centre, arms = labels[0], [labels[1 + a * arm_length: 1 + (a + 1) * arm_length] for a in range(degree)]
    edges = [f'{a}>{b}' for arm in arms for a, b in zip([centre] + arm, arm)]
    rng.shuffle(edges)
    path = [centre] + rng.choice(arms)
    return f"{','.join(edges)}|{centre}>{path[-1]}", ','.join(path)


def _parse_path_star(prompt):
    """(parent of each node, start, goal) of a path_star prompt; ValueError if malformed."""
    m = re.fullmatch(rf'((?:{_B36}>{_B36},)*{_B36}>{_B36})\|({_B36})>({_B36})', prompt)
    if not m:
        raise ValueError(f'path_star: malformed prompt {prompt[:60]!r}')
    parent = {}
    for edge in m[1].split(','):
        a, b = edge.split('>')
        if b in parent:
            raise ValueError(f'path_star: node {b} has two incoming edges in the prompt')
        parent[b] = a
    return parent, m[2], m[3]


def _check_path_star(prompt, answer):
    """The answer must be the path start -> goal, i.e. the walk back from the goal along the edges."""
    parent, start, goal = _parse_path_star(prompt)
    path = [goal]
    while path[-1] != start:
        if path[-1] not in parent or len(path) > len(parent):
            raise ValueError(f'path_star: the prompt has no path from {start} to {goal}')
        path.append(parent[path[-1]])
    return answer == ','.join(reversed(path))


# -----------------------------------------------------------------------------
# sudoku: cells are indexed 0..80 row by row; a grid is a list of 81 ints, 0 for a blank

_BOX = [(i // 27) * 3 + (i % 9) // 3 for i in range(81)]
_UNITS = ([[r * 9 + c for c in range(9)] for r in range(9)] +             # rows
          [[r * 9 + c for r in range(9)] for c in range(9)] +             # columns
          [[i for i in range(81) if _BOX[i] == b] for b in range(9)])     # boxes
_ALL = 0b1111111110  # bit d set = digit d (1..9) is available


def _search(grid, limit, rng=None):
    """Solve by backtracking, always on the blank cell with the fewest candidates; stop after `limit`
    solutions. Returns (number of solutions found, the first one or None). rng shuffles the digit order."""
    grid = list(grid)
    rows, cols, boxes = [0] * 9, [0] * 9, [0] * 9
    for i, v in enumerate(grid):
        if v:
            bit = 1 << v
            if (rows[i // 9] | cols[i % 9] | boxes[_BOX[i]]) & bit:
                return 0, None  # two equal givens in a unit
            rows[i // 9] |= bit
            cols[i % 9] |= bit
            boxes[_BOX[i]] |= bit
    blanks = [i for i in range(81) if not grid[i]]
    found = []

    def solve(count):
        best, best_free, best_n = -1, 0, 10
        for i in blanks:
            if not grid[i]:
                free = _ALL & ~(rows[i // 9] | cols[i % 9] | boxes[_BOX[i]])
                n = free.bit_count()
                if n < best_n:
                    best, best_free, best_n = i, free, n
                    if n <= 1:
                        break
        if best < 0:  # no blank left: a solution
            if not found:
                found.append(list(grid))
            return count + 1
        digits = [d for d in range(1, 10) if best_free >> d & 1]
        if rng is not None:
            rng.shuffle(digits)
        r, c, b = best // 9, best % 9, _BOX[best]
        for d in digits:
            bit = 1 << d
            grid[best] = d
            rows[r] |= bit
            cols[c] |= bit
            boxes[b] |= bit
            count = solve(count)
            grid[best] = 0
            rows[r] &= ~bit
            cols[c] &= ~bit
            boxes[b] &= ~bit
            if count >= limit:
                break
        return count

    count = solve(0)
    return count, (found[0] if found else None)


def _make_sudoku(rng, min_givens, max_givens):
    """A random full grid (randomised backtracking), then blanks in random order, each kept only if the
    puzzle still has one solution, until the number of givens drawn from min..max is reached."""
    for _ in range(50):
        _, solution = _search([0] * 81, 1, rng)
        puzzle, givens = list(solution), 81
        target = rng.randint(min_givens, max_givens)
        for i in rng.sample(range(81), 81):
            if givens == target:
                break
            puzzle[i] = 0
            if _search(puzzle, 2)[0] == 1:
                givens -= 1
            else:
                puzzle[i] = solution[i]
        if givens <= max_givens:
            return ''.join(map(str, puzzle)), ''.join(map(str, solution))
    raise ValueError(f'sudoku: 50 grids in a row could not be reduced to at most {max_givens} givens; '
                     f'raise max_givens')


def _check_sudoku(prompt, answer):
    """Rows, columns and boxes are permutations of 1..9 and every given is kept."""
    if not re.fullmatch('[0-9]{81}', prompt):
        raise ValueError(f'sudoku: a prompt is 81 digits 0-9, got {prompt[:90]!r}')
    if not re.fullmatch('[1-9]{81}', answer):
        return False
    if any(p != '0' and p != a for p, a in zip(prompt, answer)):
        return False
    return all({answer[i] for i in unit} == set('123456789') for unit in _UNITS)


# -----------------------------------------------------------------------------
# countdown

def _make_countdown(rng, numbers, max_number, min_target, max_target):
    """Random numbers combined by a random expression tree (two random operands at a time, a random
    operation among those whose result is a positive integer); retried until the result is in range."""
    for _ in range(1000):
        nums = [rng.randint(1, max_number) for _ in range(numbers)]
        pool, equations = list(nums), []
        while len(pool) > 1:
            a = pool.pop(rng.randrange(len(pool)))
            b = pool.pop(rng.randrange(len(pool)))
            big, small = max(a, b), min(a, b)
            ops = ['+', '*'] + (['-'] if big != small else []) + (['/'] if big % small == 0 else [])
            op = rng.choice(ops)
            if op in '-/':
                a, b = big, small
            c = {'+': a + b, '*': a * b, '-': a - b, '/': a // b}[op]
            equations.append(f'{a}{op}{b}={c}')
            pool.append(c)
        if min_target <= pool[0] <= max_target:
            return f"{','.join(map(str, sorted(nums)))}:{pool[0]}", ','.join(equations)
    raise ValueError(f'countdown: 1000 random expressions missed the targets {min_target}..{max_target}; '
                     f'widen the range or raise max_number')


def _check_countdown(prompt, answer):
    """numbers-1 true equations, operands from the prompt numbers and earlier results (each used once),
    every result a positive integer, the last one the target."""
    m = re.fullmatch(rf'((?:{_NUM},)*{_NUM}):({_NUM})', prompt)
    if not m:
        raise ValueError(f'countdown: malformed prompt {prompt[:60]!r}')
    nums, target = [int(x) for x in m[1].split(',')], int(m[2])
    equations = answer.split(',')
    if len(equations) != len(nums) - 1:
        return False
    pool = Counter(nums)  # what may still be used: unused numbers and results
    c = None
    for eq in equations:
        e = re.fullmatch(rf'({_NUM})([-+*/])({_NUM})=({_NUM})', eq)
        if not e:
            return False
        a, op, b, c = int(e[1]), e[2], int(e[3]), int(e[4])
        for x in (a, b):
            if pool[x] == 0:
                return False
            pool[x] -= 1
        true = {'+': a + b == c, '-': a - b == c, '*': a * b == c, '/': b > 0 and b * c == a}[op]
        if not true or c <= 0:
            return False
        pool[c] += 1
    return c == target


# -----------------------------------------------------------------------------
# addition

def _make_addition(rng, min_digits, max_digits):
    def number():
        d = rng.randint(min_digits, max_digits)
        return rng.randint(0 if d == 1 else 10 ** (d - 1), 10 ** d - 1)
    a, b = number(), number()
    return f'{a}+{b}=', str(a + b)


def _check_addition(prompt, answer):
    """The answer is the sum in decimal, without leading zeros."""
    m = re.fullmatch(rf'({_NUM})\+({_NUM})=', prompt)
    if not m:
        raise ValueError(f'addition: malformed prompt {prompt[:60]!r}')
    return answer == str(int(m[1]) + int(m[2]))


# -----------------------------------------------------------------------------
# the API

_MAKE = {'path_star': _make_path_star, 'sudoku': _make_sudoku,
         'countdown': _make_countdown, 'addition': _make_addition}
_CHECK = {'path_star': _check_path_star, 'sudoku': _check_sudoku,
          'countdown': _check_countdown, 'addition': _check_addition}


def generate(name, n, seed, **params):
    """n (prompt, answer) problems of task name, pairwise distinct prompts (sudoku: distinct solutions too),
    the same for the same (seed, params). Drawn one after another from one RNG, so generate(n) is a prefix
    of generate(n + k). ValueError after MAX_MISSES duplicates in a row (too few distinct problems)."""
    p = _params(name, params)
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise ValueError(f'{name}: n must be an int >= 0, got {n!r}')
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ValueError(f'{name}: seed must be an int, got {seed!r}')
    rng = random.Random(f'{name}:{seed}')  # a str seed is hashed with sha512: the same in every process
    out, prompts, answers, misses = [], set(), set(), 0
    while len(out) < n:
        prompt, answer = _MAKE[name](rng, **p)
        if prompt in prompts or (name == 'sudoku' and answer in answers):
            misses += 1
            if misses >= MAX_MISSES:
                raise ValueError(f'{name}: only {len(out)} distinct problems found, not {n}, with {p}')
            continue
        misses = 0
        prompts.add(prompt)
        answers.add(answer)
        out.append((prompt, answer))
    return out


def check(name, prompt, answer, **params):
    """Whether answer is a correct answer to prompt (see the module docstring for each task's rule).
    Works from the prompt alone; params are only validated. A malformed answer, or one that is not a str,
    is False; a malformed prompt raises ValueError."""
    _params(name, params)
    if not isinstance(prompt, str):
        raise ValueError(f'{name}: the prompt must be a str, got {type(prompt).__name__}')
    if not isinstance(answer, str):
        return False
    return _CHECK[name](prompt, answer)


def split(name, n_train, n_test, seed, **params):
    """(train, test): the first n_test problems of generate(name, n_test + n_train, seed) are the test set,
    the rest the training set. Disjoint by prompt (sudoku: also by solution grid), and the test set is the
    same whatever n_train."""
    for k, v in (('n_train', n_train), ('n_test', n_test)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise ValueError(f'{name}: {k} must be an int >= 0, got {v!r}')
    pairs = generate(name, n_test + n_train, seed, **params)
    return pairs[n_test:], pairs[:n_test]
