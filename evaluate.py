"""
Estimate a model's own bound on the negative log-likelihood of a data split, in bits per token (what
model.bound_name() says: the D3PM's T-step bound, a masked model's continuous NELBO, the autoregressive
model's exact NLL, block diffusion's sum of per-block NELBOs, the uniform-state model's continuous NELBO; --T N: the
N-step bound of a continuous-time model):

    python evaluate.py out/d3pm_text8_cpu/ckpt.pt --split test
    python evaluate.py out/mdlm_text8_cpu/ckpt.pt --split test --T 64
    python evaluate.py --samples samples.jsonl --judge out/ar_text8_cpu --data_dir data/text8   # sample quality
    torchrun --standalone --nproc_per_node=8 evaluate.py CKPT --data_dir data/openwebtext --seq_len 1024
    python evaluate.py out/path_star_mdlm --data_dir data/path_star                  # conditional bound, test rows
    python evaluate.py out/path_star_mdlm --data_dir data/path_star --accuracy --sampler confidence --steps 8
    python evaluate.py out/path_star_mdlm --data_dir data/path_star --choices questions.jsonl --mc 64

Each batch holds B random windows of the split and gives one unbiased estimate of the bound
(model.batch_bound: one network call, stratified over the batch with one random offset; see each
model file). Batches are i.i.d. replicates, so the standard error is the spread of the per-batch
estimates / sqrt(batches). Sampling stops when the standard error drops below --target_se.

With --zero_shot ptb,wikitext103,... it scores the papers' zero-shot suite instead (zeroshot.py: their datasets,
detokenizers and wrapping into windows of the model's length, each framed by BOS/EOS): one pass over all
windows of each dataset, in shuffled batches, printed as a table of bits/token and perplexity with 95% intervals.
The interval comes from the spread of the batch estimates, so it covers the Monte-Carlo error of the bound and
the variation between windows (it is conservative for the fixed test set). Every token of a window is scored,
BOS and EOS included, as MDLM's evaluation scores its diffusion models (BD3-LM's skips the first token); with
--protocol mdlm a model that can condition on it (the autoregressive one) is given the first token and scores the
other L - 1, as the papers' AR baseline (MDLM diffusion.py: input x[:, :-1], targets x[:, 1:]).

On a pair dataset (data/prepare_pairs.py: prompt -> answer rows) it scores the conditional bound, bits per answer
token given each row's prompt, over every row of the split; --accuracy answers every test prompt with the sampler
options of sample.py and reports the share its task's checker (data/tasks.py), or else exact match, accepts;
--choices FILE (JSON lines of prompt, choices, label) picks for each question the choice of lowest conditional bound
(--mc draws of each) and reports the share of right picks.

With --samples FILE --judge JUDGE it scores generated text instead (judge.py): generative perplexity
and bits/token under an autoregressive judge (pooled over all tokens by default; --protocol mdlm: the
papers' rule), the mean unigram entropy of each sample (bits; nats under --protocol mdlm, as the papers), and
for character corpora the share of generated words found in the training split.
"""
import argparse
import inspect
import json
import math
import os
import sys

import numpy as np
import torch

from common import (UserError, add_sampler_options, guidance, all_gather, check_length, clean_positions, comm_buffer,
                    compile_network, ddp_shutdown, default_dataset, is_pair_dataset, load_codec, open_model, open_pairs,
                    open_split, pick_device, random_windows, refuse_unsupported, sampler_options, start_processes)
from sampling import answer_prompts


@torch.no_grad()
def estimate(model, data, batch_size, seq_len, target_se, max_batches, min_batches=10, seed=0,
             rank=0, world_size=1, progress=None, T=None):
    """Draw batch estimates (bits/token) until the standard error < target_se or max_batches.
    Under torch.distributed each rank draws its own batches; all ranks see the combined list."""
    dev = next(model.parameters()).device
    rng = np.random.default_rng([seed, rank])
    gen = torch.Generator(device=dev).manual_seed(seed * 1000 + rank)
    estimates = []
    if world_size > 1:  # the tensors the all_gather goes through, allocated once (see common.py: teardown)
        send = comm_buffer(torch.zeros(1, dtype=torch.float64, device=dev))
        everyone = [comm_buffer(torch.zeros_like(send)) for _ in range(world_size)]
    while not max_batches or len(estimates) < max_batches:
        x0 = random_windows(data, batch_size, seq_len, model.vocab_size, rng, dev)
        offset = float(torch.rand((), generator=gen, device=dev))
        mine = model.batch_bound(x0, offset, gen, T=T).reshape(1) / math.log(2)
        if world_size > 1:
            mine = torch.cat(all_gather(everyone, send.copy_(mine)))
        estimates += mine.tolist()
        mean, se = summarize(estimates)
        if progress is not None:
            progress.update(len(mine))
            progress.set_postfix_str(f"bpt {mean:.4f} \u00b1 {se:.4f}")
        if len(estimates) >= min_batches and se < target_se:
            break
    return estimates


@torch.no_grad()
def estimate_windows(model, windows, batch_size, seed=0, rank=0, world_size=1, max_batches=0, T=None, progress=None,
                     first_given=False, prompt_len=None):
    """One pass over fixed windows (N, L): shuffled (seed) into N // batch_size batches of batch_size to
    2 batch_size - 1 windows, each scored once by model.batch_bound (bits/token; first_given=True is passed on,
    see families.py); max_batches > 0 keeps only the first ones. Under torchrun rank r takes batches r, r + W, ...
    prompt_len (N,): rows of a pair dataset, each scored given its prompt (batch_bound's clean mask).
    Returns (estimates, sizes) of all."""
    given = {"first_given": True} if first_given else {}
    dev = next(model.parameters()).device
    order = np.random.default_rng(seed).permutation(len(windows))
    batches = np.array_split(order, max(1, len(windows) // batch_size))[:max_batches or None]
    gen = torch.Generator(device=dev).manual_seed(seed * 1000 + rank)
    if world_size > 1:  # the tensors the all_gather goes through, allocated once (see common.py: teardown)
        send = comm_buffer(torch.zeros(2, dtype=torch.float64, device=dev))
        everyone = [comm_buffer(torch.zeros_like(send)) for _ in range(world_size)]
    estimates, sizes = [], []
    for first in range(0, len(batches), world_size):
        mine = torch.zeros(2, dtype=torch.float64, device=dev)  # (estimate, size); size 0: no batch this round
        if first + rank < len(batches):
            x0 = torch.from_numpy(windows[batches[first + rank]].astype(np.int64)).to(dev)
            offset = float(torch.rand((), generator=gen, device=dev))
            if prompt_len is not None:
                lengths = torch.from_numpy(prompt_len[batches[first + rank]].astype(np.int64)).to(dev)
                given = {"clean": clean_positions(lengths, x0.shape[1])}
            mine[0] = model.batch_bound(x0, offset, gen, T=T, **given) / math.log(2)
            mine[1] = len(x0)
        rows = all_gather(everyone, send.copy_(mine)) if world_size > 1 else [mine]
        for row in rows:
            if row[1] > 0:
                estimates.append(float(row[0]))
                sizes.append(int(row[1]))
        if progress is not None:
            progress.update(sum(1 for row in rows if row[1] > 0))
    return estimates, sizes


def weighted_summary(estimates, sizes):
    """The mean of batch estimates weighted by their sizes, and its standard error (inf with fewer than two)."""
    e, w = np.asarray(estimates, dtype=np.float64), np.asarray(sizes, dtype=np.float64)
    mean = float((e * w).sum() / w.sum())
    if len(e) < 2:
        return mean, float("inf")
    return mean, float(np.sqrt((w ** 2 * (e - mean) ** 2).sum() * len(e) / (len(e) - 1)) / w.sum())


def zero_shot_main(args, model, rank, world_size):
    """evaluate.py CKPT --zero_shot NAMES: the table of the papers' zero-shot suite. --protocol pooled scores every
    token of a window (comparable with the diffusion bounds); mdlm scores as the papers: a family whose batch_bound
    takes first_given (the autoregressive model) is given each window's first token (the BOS) and scores L - 1."""
    import zeroshot
    if args.protocol not in ("pooled", "mdlm"):
        raise UserError(f"unknown protocol {args.protocol!r} (known: pooled, mdlm)")
    first_given = args.protocol == "mdlm" and "first_given" in inspect.signature(model.batch_bound).parameters
    scored = (f"{args.protocol} protocol: the first token of each window given, not scored (the papers' AR rule)"
              if first_given else f"{args.protocol} protocol: every token of each window scored")
    trained = model.checkpoint_meta.get("training_args", {})
    codec = load_codec(model.vocab_size, trained.get("dataset") or default_dataset(model.vocab_size),
                       args.data_dir or None)
    if codec.bpe is None:
        raise UserError("--zero_shot needs a model of a BPE vocabulary (GPT-2's, as the papers'): this one reads characters")
    seq_len = args.seq_len or trained.get("seq_len") or 1024
    check_length(model, seq_len)
    if args.wrap_shards < 1:
        raise UserError(f"--wrap_shards must be at least 1 (datasets' num_proc), got {args.wrap_shards}")
    data_files = zeroshot.parse_data_files(args.data_files) if args.data_files else {}
    eot = codec.bpe.eot_token
    rows = []
    for name in zeroshot.parse_names(args.zero_shot):
        windows, docs = zeroshot.zero_shot_windows(name, codec.bpe.encode_ordinary, seq_len, eot, eot,
                                                   data_files.get(name), doc_eos=args.doc_eos or None,
                                                   shards=args.wrap_shards, frame=not args.no_frame)
        progress = None
        if rank == 0 and not args.json:
            from tqdm import tqdm
            progress = tqdm(desc=name, unit="batch", dynamic_ncols=True, mininterval=0.5, disable=None)
        try:
            estimates, sizes = estimate_windows(model, windows, args.batch_size, args.seed, rank, world_size,
                                                args.max_batches, args.T, progress, first_given)
        finally:
            if progress is not None:
                progress.close()
        bpt, se = weighted_summary(estimates, sizes)
        lo, hi = bpt - 1.96 * se, bpt + 1.96 * se
        rows.append({"dataset": name, "documents": docs, "windows": int(sum(sizes)),
                     "tokens": int(sum(sizes)) * (seq_len - first_given),
                     "bpt": bpt, "se": se if math.isfinite(se) else None, "ppl": 2 ** bpt,
                     "ppl95": [2 ** lo, 2 ** hi] if math.isfinite(se) else None})
    if rank == 0:
        if args.json:
            print(json.dumps({"model": type(model).__name__, "bound": model.bound_name(args.T), "seq_len": seq_len,
                              "protocol": args.protocol, "first_given": first_given, "zero_shot": rows}))
        else:
            print(f"zero-shot {model.bound_name(args.T)}, windows of {seq_len} tokens"
                  f"{'' if args.no_frame else ' (BOS/EOS included)'}; {scored}")
            print(f"{'dataset':<12} {'docs':>8} {'tokens':>11} {'bits/token':>18} {'perplexity':>10}  95% interval")
            for r in rows:
                interval = f"{r['ppl95'][0]:.2f}..{r['ppl95'][1]:.2f}" if r["ppl95"] else "n/a"
                print(f"{r['dataset']:<12} {r['documents']:>8} {r['tokens']:>11} {r['bpt']:>9.4f} \u00b1 "
                      f"{r['se'] if r['se'] is not None else float('nan'):.4f} {r['ppl']:>10.2f}  {interval}")
    return {"zero_shot": rows, "seq_len": seq_len, "model": type(model).__name__, "protocol": args.protocol,
            "first_given": first_given}


def wilson(correct, n, z=1.96):
    """The Wilson score interval of a binomial proportion correct / n (95% for z = 1.96)."""
    p, d = correct / n, 1 + z * z / n
    center, half = (p + z * z / (2 * n)) / d, z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return max(0.0, center - half), min(1.0, center + half)


def accuracy_main(args, model, data_dir, world_size):
    """evaluate.py CKPT --accuracy on a pair dataset: an answer for every prompt of its test_pairs.jsonl (the sampler
    options as sample.py's), judged by its task's checker (data/tasks.py) or else by exact match with the reference;
    the accuracy with its 95% Wilson interval; --out keeps a line per pair."""
    import pickle
    from tqdm import tqdm
    from data import tasks
    if world_size > 1:
        raise UserError("--accuracy runs in one process (not under torchrun)")
    with open(os.path.join(data_dir, "meta.pkl"), "rb") as f:
        meta = pickle.load(f)
    path = os.path.join(data_dir, "test_pairs.jsonl")
    try:
        with open(path, encoding="utf-8") as f:
            pairs = [json.loads(line) for line in f if line.strip()][:args.max_answers or None]
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read the test pairs {path}: {e}")
    codec = load_codec(model.vocab_size, "", data_dir)
    dev = next(model.parameters()).device
    gen = torch.Generator(device=dev).manual_seed(args.seed)
    opts = refuse_unsupported(model, dict(sampler_options(args), **({} if args.cache else {"cache": False})))
    guide = guidance(model, args.guidance, args.seed, dev)
    progress = tqdm(total=len(pairs), desc="answers", unit="answer", disable=None if not args.json else True)
    try:
        answers = answer_prompts(lambda x: model.sample(x.to(dev), generator=gen, **opts),
                                 [codec.encode(p["prompt"]) for p in pairs], meta["seq_len"], codec.mask_id,
                                 codec.eoa_id, args.batch_size, progress, guide)
    finally:
        progress.close()
    task = meta.get("task")
    rows = []
    for pair, (ids, calls) in zip(pairs, answers):
        answer = codec.decode(ids)
        correct = (tasks.check(task["name"], pair["prompt"], answer, **task["params"]) if task
                   else answer == pair["answer"])
        rows.append({"prompt": pair["prompt"], "answer": answer, "reference": pair["answer"], "correct": bool(correct),
                     "network_calls": calls})
    k, n = sum(r["correct"] for r in rows), len(rows)
    lo, hi = wilson(k, n)
    judge = f"the {task['name']} checker" if task else "exact match"
    result = {"accuracy": k / n, "ci95": [lo, hi], "correct": k, "answers": n, "judged_by": judge,
              "network_calls": sum(r["network_calls"] for r in rows) / n, "model": type(model).__name__,
              "guidance": args.guidance, **{k_: v for k_, v in opts.items() if v is not None}}
    return report(args, result, rows, f"accuracy {k / n:.4f} ({k} of {n}, 95% interval {lo:.4f}..{hi:.4f}), judged by "
                                      f"{judge}, {result['network_calls']:.1f} network calls per answer")


def report(args, result, lines, text):
    """--out: the lines as JSON lines; then the result as one JSON object (--json) or the text. Returns result."""
    if args.out:
        with open(args.out, "w") as f:
            f.writelines(json.dumps(line) + "\n" for line in lines)
    print(json.dumps(result) if args.json else text)
    return result


def read_choices(path):
    """The questions of a --choices file, one JSON object a line: prompt (str), choices (two or more str), label (the
    index of the right choice). Anything else is a one-line UserError naming the line."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = [(i, line) for i, line in enumerate(f, 1) if line.strip()]
    except OSError as e:
        raise UserError(f"cannot read --choices {path}: {e.strerror}")
    if not lines:
        raise UserError(f"--choices {path} holds no questions")
    questions = []
    for i, line in lines:
        where = f"{path}:{i}"
        try:
            q = json.loads(line)
        except ValueError as e:
            raise UserError(f"{where} is not JSON: {e}")
        missing = [k for k in ("prompt", "choices", "label") if not isinstance(q, dict) or k not in q]
        if missing:
            raise UserError(f"{where}: a question needs prompt, choices and label (missing: {', '.join(missing)})")
        if not isinstance(q["prompt"], str):
            raise UserError(f"{where}: prompt must be a string")
        if not isinstance(q["choices"], list) or not all(isinstance(c, str) and c for c in q["choices"]):
            raise UserError(f"{where}: choices must be a list of non-empty strings")
        if len(q["choices"]) < 2:
            raise UserError(f"{where}: a question needs at least 2 choices, got {len(q['choices'])}")
        label = q["label"]
        if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < len(q["choices"]):
            raise UserError(f"{where}: label must be a choice's index, 0..{len(q['choices']) - 1}, not {label!r}")
        questions.append((where, q))
    return questions


def choice_rows(codec, prompt, choices, seq_len, where):
    """Each choice's row as data/prepare_pairs.py builds training rows: prompt ids | choice ids | end-of-answer,
    padded with end-of-answer to seq_len; (rows (C, L) long, the prompt length). One that does not fit is a
    UserError naming the question."""
    try:
        p = codec.encode(prompt)
        answers = [codec.encode(c) for c in choices]
    except UserError as e:
        raise UserError(f"{where}: {e}")
    rows = torch.full((len(choices), seq_len), codec.eoa_id, dtype=torch.long)
    for j, a in enumerate(answers):
        if len(p) + len(a) >= seq_len:
            raise UserError(f"{where}: prompt and choice {j} take {len(p)} + {len(a)} tokens and an end-of-answer, "
                            f"more than the rows' {seq_len}")
        rows[j, :len(p) + len(a)] = torch.tensor(p + a, dtype=torch.long)
    return rows, len(p)


@torch.no_grad()
def choice_bound(model, row, prompt_len, mc, batch_size, generator, T=None):
    """The Monte-Carlo estimate of one row's conditional bound, bits per answer token,
        -log p(answer | prompt) / n <= bound / n,   n = L - prompt_len (the answer region, padding included),
    from mc draws: mc copies of the row in groups of at most batch_size (at least min(4, mc) groups), each group one
    model.batch_bound call with its own offset (stratified over its copies, so each group is unbiased), pooled by
    size. Returns (estimate, standard error from the spread of the groups; inf with one group)."""
    dev = next(model.parameters()).device
    x = torch.as_tensor(row, dtype=torch.long, device=dev)[None]
    clean = clean_positions(torch.tensor([prompt_len], device=dev), x.shape[1])
    sizes = [len(s) for s in np.array_split(np.arange(mc), max(-(-mc // batch_size), min(4, mc)))]
    estimates = []
    for b in sizes:
        offset = float(torch.rand((), generator=generator, device=dev))
        bound = model.batch_bound(x.repeat(b, 1), offset, generator, T=T, clean=clean.repeat(b, 1))
        estimates.append(float(bound) / math.log(2))
    return weighted_summary(estimates, sizes)


def choices_main(args, model, data_dir, world_size):
    """evaluate.py CKPT --choices FILE on a pair dataset: multiple choice by the model's own bound. Every choice of a
    question becomes its training-style row (choice_rows) and gets choice_bound's --mc draw estimate of its
    conditional bound per answer token; the pick is the lowest. Every choice of a question has the same answer region
    (L - prompt length tokens: the padding is answer), so the per-token and the total bound -log p(choice | prompt)
    rank them alike. Reports the share of questions whose pick is the label, with its 95% Wilson interval; --out
    keeps a line per question (each choice's bits per answer token and standard error)."""
    import pickle
    from tqdm import tqdm
    if world_size > 1:
        raise UserError("--choices runs in one process (not under torchrun)")
    if args.accuracy:
        raise UserError("--choices and --accuracy are two evaluations: give one")
    if args.mc < 1:
        raise UserError(f"--mc must be at least 1, got {args.mc}")
    with open(os.path.join(data_dir, "meta.pkl"), "rb") as f:
        seq_len = pickle.load(f)["seq_len"]
    check_length(model, seq_len)
    questions = read_choices(args.choices)
    codec = load_codec(model.vocab_size, "", data_dir)
    built = [choice_rows(codec, q["prompt"], q["choices"], seq_len, where) for where, q in questions]
    dev = next(model.parameters()).device
    gen = torch.Generator(device=dev).manual_seed(args.seed)
    lines = []
    for (where, q), (rows, prompt_len) in zip(questions, tqdm(built, desc="questions", unit="question",
                                                              disable=None if not args.json else True)):
        scores = [choice_bound(model, row, prompt_len, args.mc, args.batch_size, gen, args.T) for row in rows]
        pick = int(np.argmin([s[0] for s in scores]))
        lines.append({"prompt": q["prompt"], "choices": q["choices"], "label": q["label"], "pick": pick,
                      "correct": pick == q["label"], "bpt": [s[0] for s in scores],
                      "se": [s[1] if math.isfinite(s[1]) else None for s in scores]})
    k, n = sum(r["correct"] for r in lines), len(lines)
    lo, hi = wilson(k, n)
    bound = f"conditional {model.bound_name(args.T)}, per answer token"
    result = {"accuracy": k / n, "ci95": [lo, hi], "correct": k, "questions": n, "mc": args.mc,
              "model": type(model).__name__, "bound": bound, "T": args.T}
    return report(args, result, lines, f"accuracy {k / n:.4f} ({k} of {n} questions, 95% interval {lo:.4f}..{hi:.4f}), "
                                       f"each pick the choice of lowest {bound} ({args.mc} draws)")


def pairs_main(args, model, data_dir, rank, world_size):
    """evaluate.py CKPT on a pair dataset (data/prepare_pairs.py): the conditional bound, bits per answer token
    (end-of-answer padding included) given each row's prompt, one pass over every row of the split; with --accuracy
    the accuracy of generated answers instead (accuracy_main)."""
    if args.choices:
        return choices_main(args, model, data_dir, world_size)
    if args.accuracy:
        return accuracy_main(args, model, data_dir, world_size)
    pairs = open_pairs(data_dir, args.split)
    check_length(model, pairs.rows.shape[1])
    progress = None
    if rank == 0 and not args.json:
        from tqdm import tqdm
        progress = tqdm(desc=f"{args.split} conditional bound", unit="batch", dynamic_ncols=True, mininterval=0.5,
                        disable=None)
    try:
        estimates, sizes = estimate_windows(model, pairs.rows, args.batch_size, args.seed, rank, world_size,
                                            args.max_batches, args.T, progress, prompt_len=pairs.prompt_len)
    finally:
        if progress is not None:
            progress.close()
    bpt, se = weighted_summary(estimates, sizes)
    finite = math.isfinite(se)
    result = {"bpt": bpt, "se": se if finite else None, "ci95": [bpt - 1.96 * se, bpt + 1.96 * se] if finite else None,
              "rows": int(sum(sizes)), "batches": len(estimates), "split": args.split, "model": type(model).__name__,
              "bound": f"conditional {model.bound_name(args.T)}, per answer token", "T": args.T}
    if rank == 0:
        if args.json:
            print(json.dumps(result))
        else:
            print(f"{args.split} {result['bound']}: {bpt:.4f} \u00b1 {se:.4f} bits/token, {result['rows']} rows given "
                  f"their prompts, {len(estimates)} batches")
    return result


def summarize(estimates):
    """Mean and its standard error (inf with fewer than two estimates)."""
    n = len(estimates)
    mean = sum(estimates) / n
    if n < 2:
        return mean, float("inf")
    var = sum((e - mean) ** 2 for e in estimates) / (n - 1)
    return mean, math.sqrt(var / n)


def read_samples(path):
    """(texts, ids or None) from sample.py --out (JSON lines: text, ids), sample.py --json (one object with
    samples and ids), or plain text (samples separated by blank lines)."""
    try:
        with open(path, encoding="utf-8") as f:
            content = f.read()
    except OSError as e:
        raise UserError(f"cannot read --samples {path}: {e.strerror}")
    try:
        obj = json.loads(content)
        if isinstance(obj, dict) and "samples" in obj:
            return obj["samples"], obj.get("ids")
    except ValueError:
        pass
    try:
        rows = [json.loads(line) for line in content.splitlines() if line.strip()]
        if rows and all(isinstance(r, dict) and "text" in r for r in rows):
            return [r["text"] for r in rows], [r["ids"] for r in rows] if all("ids" in r for r in rows) else None
    except ValueError:
        pass
    return [t.strip("\n") for t in content.split("\n\n") if t.strip()], None


def judge_main(args, dev):
    """evaluate.py --samples FILE --judge JUDGE: the quality of generated samples."""
    from judge import load_judge, quality
    texts, ids = read_samples(args.samples)
    if not texts:
        raise UserError(f"--samples {args.samples} holds no samples")
    judge = load_judge(args.judge, args.data_dir or None, dev, ema=args.ema)
    result = {"judge": args.judge, **quality(texts, ids, judge, args.data_dir or None, protocol=args.protocol)}
    if args.json:
        print(json.dumps({k: (v if not isinstance(v, float) or math.isfinite(v) else None) for k, v in result.items()}))
    else:
        extra = f", in-vocabulary words {result['in_vocab']:.3f}" if "in_vocab" in result else ""
        print(f"{result['samples']} samples, {result['tokens']} tokens under {args.judge} ({args.protocol} rule): "
              f"generative perplexity "
              f"{result['gen_ppl']:.3f} ({result['gen_bpt']:.4f} bits/token), unigram entropy "
              f"{result['entropy']:.3f} {result['entropy_unit']}{extra}")
    return result


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ckpt", nargs="?", help="checkpoint file, run directory, or Hugging Face repo id")
    p.add_argument("--samples", default="", help="score generated samples instead (sample.py --out or --json "
                   "output) under --judge")
    p.add_argument("--judge", default="", help="with --samples: an autoregressive checkpoint of this repo, or "
                   "gpt2 / gpt2-medium / gpt2-large / gpt2-xl (Hugging Face weights)")
    p.add_argument("--protocol", default="pooled", help="with --zero_shot: pooled (every token of a window scored) "
                   "or mdlm (the papers': an autoregressive model is given each window's first token and scores L - 1; "
                   "the diffusion models score all L). With --samples: pooled (this repo's rule: every token "
                   "scored once, sliding windows) or mdlm (the papers': see judge.py)")
    p.add_argument("--zero_shot", default="", help="the papers' zero-shot suite instead of --split, a comma list of "
                   "ptb, wikitext103, wikitext2, lm1b, lambada, ag_news, pubmed, arxiv, or all (zeroshot.py); "
                   "openwebtext: their OWT test set (the last 100k documents)")
    p.add_argument("--doc_eos", action="store_true", help="with --zero_shot: end-of-text after every document (MDLM's "
                   "dataloader default, and openwebtext's always; the released zero-shot scripts turn it off)")
    p.add_argument("--no_frame", action="store_true", help="with --zero_shot: windows of plain text, no BOS/EOS "
                   "around each (BD3-LM's OWT script: insert_valid_special=False)")
    p.add_argument("--wrap_shards", type=int, default=1, help="with --zero_shot: group the documents as datasets' "
                   "map(batched=True, num_proc=N) does: N contiguous shards (the first n %% N one document longer), "
                   "the remainder dropped per 1000-document batch in each; the papers' N was the CPU count of the "
                   "machine that built their cache (README)")
    p.add_argument("--data_files", default="", help="with --zero_shot: local copies, NAME=PATH[,NAME=PATH] (a file "
                   "or directory as the Hugging Face dataset repo stores it), for offline use")
    p.add_argument("--split", default="test", help="val or test (any SPLIT.npy / SPLIT.bin in --data_dir)")
    p.add_argument("--data_dir", default="", help="dataset directory (default data/text8 or data/openwebtext)")
    p.add_argument("--batch_size", type=int, default=64, help="windows per batch (one network call)")
    p.add_argument("--seq_len", type=int, default=0, help="tokens per window (default: the checkpoint's training length)")
    p.add_argument("--T", type=int, default=None, help="continuous-time models: score the T-step bound instead of "
                   "the continuous NELBO")
    p.add_argument("--target_se", type=float, default=0.002, help="stop when the standard error (bits) is below")
    p.add_argument("--max_batches", type=int, default=0,
                   help="stop after this many batches (0: no limit; under torchrun a multiple of the world size)")
    p.add_argument("--no_ema", dest="ema", action="store_false", help="use the raw weights, not the EMA")
    p.add_argument("--no-ema", dest="ema", action="store_false", help=argparse.SUPPRESS)  # nanoDD's spelling
    p.add_argument("--device", default="auto")
    p.add_argument("--compile", action="store_true", help="torch.compile the network (not the estimator around it)")
    p.add_argument("--compile_backend", default="inductor", help="with --compile: inductor (default) or aot_eager")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--accuracy", action="store_true", help="a model trained on pairs: answer every test prompt with "
                   "the sampler options below and report the share judged correct (its task's checker, else exact "
                   "match) with a 95%% interval")
    p.add_argument("--max_answers", type=int, default=0, help="--accuracy: only the first N test pairs (0: all)")
    p.add_argument("--out", default="", help="--accuracy: a JSON line per test pair (prompt, answer, reference, "
                   "correct, network calls); --choices: a JSON line per question (its pick, each choice's bits per "
                   "answer token and standard error)")
    p.add_argument("--choices", default="", help="a model trained on pairs: multiple choice from a JSONL FILE of "
                   "prompt, choices, label; each pick the choice of lowest conditional bound (--mc draws)")
    p.add_argument("--mc", type=int, default=32, help="--choices: Monte-Carlo draws of each choice's bound")
    add_sampler_options(p)
    p.add_argument("--guidance", type=float, default=0.0, help="--accuracy with a model trained with --cond_drop > 0: "
                   "classifier-free guidance of this weight, two network calls per step (0: off)")
    p.add_argument("--no_kv_cache", dest="cache", action="store_false", help="--accuracy: the samplers without "
                   "their KV cache (needed with --guidance by the autoregressive and block-diffusion models)")
    p.add_argument("--json", action="store_true", help="print one JSON object with the result")
    args = p.parse_args(argv)
    if bool(args.samples) != bool(args.judge):
        raise UserError("--samples and --judge go together: evaluate.py --samples FILE --judge JUDGE")
    if args.samples:
        return judge_main(args, pick_device(args.device))
    if not args.ckpt:
        raise UserError("give a checkpoint to evaluate (or --samples FILE --judge JUDGE)")
    if args.batch_size < 1:
        raise UserError("--batch_size must be at least 1")

    ddp, rank, world_size, dev = start_processes(args.device)
    model = open_model(args.ckpt, args.ema, dev)
    if args.compile:
        compile_network(model, args.compile_backend)
    if args.zero_shot:
        try:
            return zero_shot_main(args, model, rank, world_size)
        except ValueError as e:  # what this model's bound does not offer (--T for a fixed bound)
            raise UserError(str(e))
        finally:
            if ddp:
                ddp_shutdown()
    trained = model.checkpoint_meta.get("training_args", {})
    dataset = trained.get("dataset") or default_dataset(model.vocab_size)
    data_dir = args.data_dir or os.path.join("data", dataset or "text8")
    if args.choices and not is_pair_dataset(data_dir):
        raise UserError(f"--choices scores answers on a pair dataset (data/prepare_pairs.py); {data_dir} is text")
    if args.guidance and not args.accuracy:
        raise UserError("--guidance applies to generated answers: give --accuracy")
    if args.accuracy and not is_pair_dataset(data_dir):
        raise UserError(f"--accuracy scores answers on a pair dataset (data/prepare_pairs.py); {data_dir} is text")
    if is_pair_dataset(data_dir):
        try:
            return pairs_main(args, model, data_dir, rank, world_size)
        except ValueError as e:  # what this model's bound does not offer
            raise UserError(str(e))
        finally:
            if ddp:
                ddp_shutdown()
    data = open_split(data_dir, args.split)
    seq_len = args.seq_len or trained.get("seq_len") or (256 if dataset == "text8" else 1024)
    if len(data) < seq_len:
        raise UserError(f"the {args.split} split in {data_dir} has {len(data)} tokens, fewer than seq_len={seq_len}")
    check_length(model, seq_len)

    progress = None
    if rank == 0 and not args.json:
        from tqdm import tqdm
        progress = tqdm(desc=f"{args.split} bound", unit="batch", total=args.max_batches or None,
                        dynamic_ncols=True, mininterval=0.5, disable=None)  # disable=None: off when not a TTY
    try:
        estimates = estimate(model, data, args.batch_size, seq_len, args.target_se, args.max_batches,
                             seed=args.seed, rank=rank, world_size=world_size, progress=progress, T=args.T)
    except ValueError as e:  # what this model's bound does not offer (--T for a fixed bound)
        raise UserError(str(e))
    finally:
        if progress is not None:
            progress.close()
    bpt, se = summarize(estimates)
    result = {"bpt": bpt, "se": se, "ci95": [bpt - 1.96 * se, bpt + 1.96 * se], "network_calls": len(estimates),
              "tokens": len(estimates) * args.batch_size * seq_len, "batches": len(estimates),
              "split": args.split, "model": type(model).__name__, "bound": model.bound_name(args.T), "T": args.T}
    if rank == 0:
        if args.json:  # strict JSON: an undefined standard error (one batch) is null
            finite = math.isfinite(se)
            print(json.dumps({**result, "se": se if finite else None, "ci95": result["ci95"] if finite else None}))
        else:
            print(f"{args.split} {result['bound']}: {bpt:.4f} \u00b1 {se:.4f} bits/token (95% interval {result['ci95'][0]:.4f}.."
                  f"{result['ci95'][1]:.4f}), {len(estimates)} batches of {args.batch_size} x {seq_len} tokens")
    if ddp:
        ddp_shutdown()
    return result


if __name__ == "__main__":
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
