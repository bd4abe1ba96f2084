"""dev/path_star_probe.py, dev/recall_control.py and dev/sudoku_cells.py: the probe masks the nodes it says it masks
(checked with a model that really walks the graph), the recall control's pairs answer their prompts, and the Sudoku
cell shares count exactly the cells changed by hand."""
import importlib.util
import json

import torch

from conftest import REPO_ROOT
from data import tasks


def load_dev(name):
    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "dev" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class GraphWalker:
    """A 'network' that answers a masked node from a visible neighbour by the prompt's edges: from the node after
    it (its unique predecessor), else from the node before it (the first successor listed: a tie at the centre),
    else a fixed wrong token. Visible tokens are predicted as themselves."""

    def __init__(self, itos):
        self.itos, self.stoi = itos, {c: i for i, c in enumerate(itos)}
        self.mask_id = len(itos)

    def logits(self, x, t):
        out = torch.full((*x.shape, self.mask_id + 1), -1e9)
        for r, row in enumerate(x.tolist()):
            text = "".join(self.itos[i] if i < self.mask_id else "?" for i in row)
            edges = [e.split(">") for e in text[:text.index("|")].split(",")]
            start = text.index("|") + 4  # "|s>g" then the answer
            for pos, tok in enumerate(row):
                guess = tok
                if tok == self.mask_id:
                    after = row[pos + 2] if pos + 2 < len(row) else self.mask_id
                    before = row[pos - 2] if pos - 2 >= start else self.mask_id
                    if after != self.mask_id:
                        guess = self.stoi[next(a for a, b in edges if b == self.itos[after])]
                    elif before != self.mask_id:
                        guess = self.stoi[next(b for a, b in edges if a == self.itos[before])]
                    else:
                        guess = 0
                out[r, pos, guess] = 0.0
        return out


def test_path_star_probe_masks_what_it_says():
    probe = load_dev("path_star_probe")
    problems = tasks.generate("path_star", 120, seed=3)
    itos = sorted(set("".join(p + a for p, a in problems)) | {"|"})
    model = GraphWalker(itos)
    length = max(len(p) + len(a) for p, a in problems)
    rows = torch.tensor([[model.stoi[c] for c in p + a] + [0] * (length - len(p) - len(a)) for p, a in problems])
    start = torch.tensor([len(p) for p, _ in problems])
    got = probe.probe(model, rows, start, arm_length=5)
    assert got["neighbours"] == [1.0] * 4 and got["from_goal"] == [1.0] * 4
    assert got["from_start"][1:] == [1.0] * 3
    assert 0.15 < got["from_start"][0] < 0.6  # the centre's first listed child: one of its 3 arms


def test_recall_control_pairs_answer_their_prompts(tmp_path):
    recall = load_dev("recall_control")
    recall.make(str(tmp_path / "a"), n_train=50, n_test=20)
    recall.make(str(tmp_path / "b"), n_train=50, n_test=20)
    for split in ("train", "test"):
        lines = (tmp_path / "a" / f"{split}.jsonl").read_text().splitlines()
        assert lines == (tmp_path / "b" / f"{split}.jsonl").read_text().splitlines()  # deterministic
        for line in lines:
            row = json.loads(line)
            edges, query = row["prompt"].split("|")
            pairs = dict(e.split(">") for e in edges.split(","))
            labels = list(pairs) + list(pairs.values())
            assert len(pairs) == 8 and len(set(labels)) == 16
            assert pairs[query] == row["answer"]


def test_sudoku_cells_counts_what_was_changed():
    cells = load_dev("sudoku_cells")
    (prompt, solution), = tasks.generate("sudoku", 1, seed=3)
    blanks = [i for i, c in enumerate(prompt) if c == "0"]
    givens = [i for i, c in enumerate(prompt) if c != "0"]
    wrong = list(solution)
    for i in blanks[:5] + givens[:2]:  # 5 blank cells and 2 givens changed to another digit
        wrong[i] = "1" if solution[i] != "1" else "2"
    rows = [dict(prompt=prompt, answer=solution, reference=solution, correct=True),
            dict(prompt=prompt, answer="".join(wrong), reference=solution, correct=False),
            dict(prompt=prompt, answer=solution[:40], reference=solution, correct=False)]  # cut short
    solved, blank_right, copied = cells.cell_shares(rows)
    late_blanks, late_givens = sum(i >= 40 for i in blanks), sum(i >= 40 for i in givens)
    assert solved == 1 / 3
    assert blank_right == (3 * len(blanks) - 5 - late_blanks) / (3 * len(blanks))
    assert copied == (3 * len(givens) - 2 - late_givens) / (3 * len(givens))
