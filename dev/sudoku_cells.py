"""
Where Sudoku answers go wrong, cell by cell: for each answers file written by `evaluate.py --accuracy --out F`, the
share solved, the share of blank cells (`0` in the prompt) holding the reference solution's digit, and the share of
givens copied unchanged (RESULTS.md: conditional generation).

    python dev/sudoku_cells.py out/sd_mdlm_answers.jsonl out/sd_ar_answers.jsonl
"""
import json
import sys


def cell_shares(rows):
    """-> (solved, blank cells right, givens copied), each a share in [0, 1]."""
    blank = blank_right = given = given_copied = 0
    for row in rows:
        answer = row["answer"].ljust(81)  # a short answer: its missing cells are wrong
        for prompt_cell, cell, solution_cell in zip(row["prompt"], answer, row["reference"]):
            if prompt_cell == "0":
                blank, blank_right = blank + 1, blank_right + (cell == solution_cell)
            else:
                given, given_copied = given + 1, given_copied + (cell == prompt_cell)
    return sum(row["correct"] for row in rows) / len(rows), blank_right / blank, given_copied / given


if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] in ("-h", "--help"):
        sys.exit(__doc__)
    for path in sys.argv[1:]:
        try:
            with open(path) as f:
                solved, blank_right, copied = cell_shares([json.loads(line) for line in f if line.strip()])
        except (OSError, ValueError, KeyError, ZeroDivisionError) as e:
            sys.exit(f"{path}: not an answers file of evaluate.py --accuracy --out on Sudoku ({type(e).__name__}: {e})")
        print(f"{path}: solved {solved:.1%}, blank cells right {blank_right:.1%}, givens copied {copied:.1%}")
