"""
Sample from a trained model: the diffusion models start from all-mask sequences and unmask them,
the autoregressive model writes left to right (prompts only, no infill), the block-diffusion model
unmasks one block after the other, left to right, and the uniform-state model (Duo) starts from random
tokens and may change any of them at every step (--steps N, default the length; --sampler greedy_tail).

    python sample.py out/d3pm_text8_cpu/ckpt.pt
    python sample.py rupspace/nanoDD-D3PM-text8 --batch_size 4 --seed 1
    python sample.py CKPT --prompt "the meaning of life is"
    python sample.py CKPT --infill "the ??????? of life is ????? and"
    python sample.py CKPT --sampler confidence --steps 32 --top_p 0.9   # MaskGIT-style, 32 calls, nucleus
    python sample.py CKPT --sampler threshold --threshold 0.9           # Fast-dLLM-style, the model picks the calls
    python sample.py CKPT --length 1024 --prompt "the"                  # beyond the training length
    python sample.py BD3LM_CKPT --length 512 --no_kv_cache               # block diffusion without its cache
    python sample.py PAIR_CKPT --prompts data/path_star/test_pairs.jsonl --out answers.jsonl   # answer prompts
    python sample.py PAIR_CKPT --prompts FILE --guidance 1.5    # classifier-free guidance (trained with --cond_drop)

By default each model's exact sampler runs. For the D3PM: the same output distribution as the T-step
ancestral sampler, but the network is called only at the steps where some position unmasks (about
226 of 1000 for 256 tokens). For the continuous-time masked model: the continuous process itself
(positions unmask one at a time, in a random order). --steps N samples on an N-step grid instead,
calling the network only at the steps where something unmasks. Block diffusion runs the masked
model's sampler inside each block, with a KV cache of the finished blocks.

--length N: the block-diffusion model simply goes on for N tokens (the context slides beyond its
training length, block by block); the other models generate window after window, each new window
starting with the end of the previous one (--keep tokens of it).

Infilling: in the template each placeholder stands for one generated token and every other
character/token is kept as given. The placeholder is the mask glyph \u2588; for text8, `?` works too.
A model trained on a pair dataset (data/prepare_pairs.py) answers: --prompt TEXT or --prompts FILE (JSON lines
with a prompt field, or one a line); each answer fills the rest of a row and ends at the end-of-answer id.
--guidance W (a model trained with train.py --cond_drop > 0): every network call becomes two, with and without the
prompt, mixed as log p(x|c) + W (log p(x|c) - log p(x)) (sampling.guided); the calls reported count both. A sampler
that keeps a KV cache (autoregressive, block diffusion) needs --no_kv_cache with it.

On a terminal the sequences unmask live (space shown as _, mask as \u2588); otherwise only the final
text is printed. --json prints one JSON object instead.
"""
import argparse
import json
import shutil
import sys
import time

import torch

from common import (UserError, add_sampler_options, compile_network, default_dataset, guidance, load_codec, open_model,
                    pick_device, refuse_unsupported, sampler_options)
from configs import parse_value
from sampling import answer_prompts, generate_long

# ---- the live view ----------------------------------------------------------------------------------
class LiveView:
    """Redraws the batch in place with ANSI cursor moves, at most every `interval` seconds."""

    def __init__(self, codec, interval=0.05):
        self.codec, self.interval, self.last, self.lines = codec, interval, 0.0, 0
        size = shutil.get_terminal_size((100, 40))
        self.width, self.height = max(20, size.columns), max(5, size.lines - 2)

    def __call__(self, x, t=None, force=False):
        now = time.time()
        if not force and now - self.last < self.interval:
            return
        self.last = now
        lines = []
        for row in x.tolist():
            text = self.codec.decode(row, view=True)
            lines += [text[i:i + self.width] for i in range(0, len(text), self.width)] + [""]
        lines = lines[-self.height:]
        out = (f"\x1b[{self.lines}F" if self.lines else "") + "\x1b[J" + "\n".join(lines) + "\n"
        sys.stdout.write(out)
        sys.stdout.flush()
        self.lines = len(lines)


# ---- main -------------------------------------------------------------------------------------------
def initial_ids(codec, batch_size, seq_len, prompt, infill):
    """The starting (B, L) ids: all mask, or the prompt followed by masks, or the infill template."""
    if prompt is not None and infill is not None:
        raise UserError("give either --prompt or --infill, not both")
    if infill is not None:
        ids = codec.encode(infill, template=True)
        if codec.mask_id not in ids:
            raise UserError(f"--infill has no placeholder ({' or '.join(sorted(codec.placeholders))}) to fill")
        seq_len = len(ids)
    elif prompt is not None:
        ids = codec.encode(prompt)
        if len(ids) >= seq_len:
            raise UserError(f"--prompt is {len(ids)} tokens, it must be shorter than seq_len={seq_len}")
        ids = ids + [codec.mask_id] * (seq_len - len(ids))
    else:
        ids = [codec.mask_id] * seq_len
    return torch.tensor([ids] * batch_size)


def read_prompts(path):
    """The prompts of a file: JSON lines with a "prompt" field (as data/prepare_pairs.py's test_pairs.jsonl), else
    one prompt a line."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = [line.rstrip("\n") for line in f if line.strip()]
    except OSError as e:
        raise UserError(f"cannot read --prompts {path}: {e.strerror}")
    try:
        return [json.loads(line)["prompt"] for line in lines]
    except (ValueError, KeyError, TypeError):
        return lines


def answer_main(args, codec, seq_len, sample_fn, guide=None):
    """sample.py CKPT --prompts FILE (or --prompt TEXT) with a model trained on a pair dataset: one answer per prompt,
    each cut at its end-of-answer, printed or written to --out as JSON lines (prompt, answer, network calls)."""
    if codec.eoa_id is None:
        raise UserError("--prompts answers prompts with a model trained on a pair dataset (data/prepare_pairs.py); "
                        "this one was trained on text: use --prompt")
    prompts = read_prompts(args.prompts) if args.prompts else [args.prompt]
    if not prompts:
        raise UserError(f"--prompts {args.prompts} holds no prompt")
    t0 = time.time()
    try:
        answers = answer_prompts(sample_fn, [codec.encode(p) for p in prompts], seq_len, codec.mask_id, codec.eoa_id,
                                 args.batch_size, guide=guide)
    except ValueError as e:  # a prompt too long for the rows, or what the model cannot do
        raise UserError(str(e))
    rows = [{"prompt": p, "answer": codec.decode(ids), "network_calls": calls} for p, (ids, calls) in zip(prompts, answers)]
    if args.out:
        with open(args.out, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    if args.json:
        print(json.dumps({"answers": rows, "seconds": time.time() - t0}))
    elif not args.out:
        print("\n".join(r["answer"] for r in rows))
    print(f"[{len(rows)} answers in {time.time() - t0:.2f} s]", file=sys.stderr)
    return rows


def cut_at(ids, stop_id):
    """The ids before the first stop_id."""
    return ids[:ids.index(stop_id)] if stop_id in ids else ids


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ckpt", help="checkpoint file, run directory, or Hugging Face repo id")
    p.add_argument("--batch_size", type=int, default=1, help="sequences to sample")
    p.add_argument("--dataset", default="", help="text8 or openwebtext (default: the checkpoint's)")
    p.add_argument("--data_dir", default=None, help="dataset directory whose meta.pkl holds the tokenizer")
    p.add_argument("--seq_len", type=int, default=0, help="tokens per sequence (default: the checkpoint's training length)")
    p.add_argument("--seed", type=int, default=123)
    p.add_argument("--no_ema", dest="ema", action="store_false", help="use the raw weights, not the EMA")
    p.add_argument("--no-ema", dest="ema", action="store_false", help=argparse.SUPPRESS)  # nanoDD's spelling
    p.add_argument("--load_ema", type=lambda text: parse_value("load_ema", text, True), dest="ema",
                   help="the original's flag: --load_ema false is --no_ema")
    p.add_argument("--device", default="auto")
    add_sampler_options(p)
    p.add_argument("--prompt", default=None, help="text the sequences start with")
    p.add_argument("--infill", default=None, help="template: placeholders are generated, the rest kept")
    p.add_argument("--length", type=int, default=0, help="generate this many tokens after the prompt, beyond "
                   "the training length if need be: window after window, each starting with the end of the last")
    p.add_argument("--keep", type=int, default=0, help="--length: tokens of context each new window keeps "
                   "(default half the window)")
    p.add_argument("--stop_at_eos", action="store_true", help="BPE: cut each sample at its first end-of-text")
    p.add_argument("--no_kv_cache", dest="cache", action="store_false", help="for comparison: block diffusion "
                   "re-reads the history at every call, the other models call the network at every step")
    p.add_argument("--compile", action="store_true", help="torch.compile the network (not the sampler loop); "
                   "pays once its compile time, so for many or long samples")
    p.add_argument("--compile_backend", default="inductor", help="with --compile: inductor (default) or aot_eager "
                   "(no code generation: a quick check)")
    p.add_argument("--prompts", default=None, help="a model trained on pairs (data/prepare_pairs.py): answer every "
                   "prompt of this file (JSON lines with a prompt field, or one a line), --batch_size at a time")
    p.add_argument("--guidance", type=float, default=0.0, help="answers (--prompts) of a model trained with "
                   "--cond_drop > 0: classifier-free guidance of this weight, two network calls per step (0: off)")
    p.add_argument("--out", default=None, help="also write the samples to this file (JSON lines: text, ids), "
                   "for evaluate.py --samples")
    p.add_argument("--json", action="store_true", help="print one JSON object with samples and timings")
    args = p.parse_args(argv)
    if args.batch_size < 1:
        raise UserError("--batch_size must be at least 1")
    opts = dict(sampler_options(args), cache=args.cache)
    if args.length < 0:
        raise UserError("--length >= 0 is required")
    if args.length and args.infill is not None:
        raise UserError("--length continues a prompt (or nothing); it does not combine with --infill")

    dev = pick_device(args.device)
    model = open_model(args.ckpt, args.ema, dev)
    refuse_unsupported(model, opts)
    if args.compile:
        compile_network(model, args.compile_backend)
    vocab = model.vocab_size
    trained = model.checkpoint_meta.get("training_args", {})
    dataset = args.dataset or trained.get("dataset") or default_dataset(vocab)
    codec = load_codec(vocab, dataset, args.data_dir)
    seq_len = args.seq_len or trained.get("seq_len") or (256 if dataset == "text8" else 1024)
    stop_id = None
    if args.stop_at_eos:
        if codec.bpe is None:
            raise UserError("--stop_at_eos applies to BPE models (a character model has no end-of-text token)")
        stop_id = codec.bpe.eot_token
    any_length = getattr(model, "any_length", False)  # block diffusion: sample() takes any length itself
    if any_length:
        opts.update(window=seq_len, stop_id=stop_id)

    generator = torch.Generator(device=dev).manual_seed(args.seed)
    view = LiveView(codec) if sys.stdout.isatty() and not args.json else None

    def sample_window(x):
        return model.sample(x, generator=generator, callback=view, **opts)

    if args.prompts or (codec.eoa_id is not None and args.prompt is not None):
        return answer_main(args, codec, seq_len, lambda x: model.sample(x.to(dev), generator=generator, **opts),
                           guidance(model, args.guidance, args.seed, dev))
    if args.guidance:
        raise UserError("--guidance applies to answers of a model trained on pairs (--prompts FILE or --prompt TEXT)")
    t0 = time.time()
    try:
        if args.length and any_length:
            prompt = codec.encode(args.prompt) if args.prompt is not None else []
            x = torch.tensor([prompt + [codec.mask_id] * args.length] * args.batch_size, dtype=torch.long)
            samples, calls = sample_window(x.to(dev))
        elif args.length:
            prompt = codec.encode(args.prompt) if args.prompt is not None else []
            prefix = torch.tensor([prompt] * args.batch_size, dtype=torch.long)
            keep = args.keep or seq_len // 2
            samples, calls, _ = generate_long(sample_window, prefix.to(dev), args.length, seq_len, keep,
                                              codec.mask_id, stop_id)
        else:
            x = initial_ids(codec, args.batch_size, seq_len, args.prompt, args.infill).to(dev)
            if view:
                view(x, force=True)
            samples, calls = sample_window(x)
    except ValueError as e:  # what this model cannot do (e.g. infill with an autoregressive model)
        raise UserError(str(e))
    if dev.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.time() - t0
    ids = [cut_at(row, stop_id) for row in samples.tolist()]
    texts = [codec.decode(row) for row in ids]

    if args.json:
        print(json.dumps({"samples": texts, "ids": ids, "network_calls": calls, "seconds": seconds,
                          "steps": args.steps, "seed": args.seed, "sampler": args.sampler,
                          **({"threshold": args.threshold} if args.sampler == "threshold" else {}),
                          "temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k}))
    else:
        if view:
            view(samples, force=True)
        else:
            print("\n\n".join(texts))
        print(f"[{calls} network calls for {args.batch_size} x {samples.shape[1]} tokens in {seconds:.2f} s]",
              file=sys.stderr)
    if args.out:
        with open(args.out, "w") as f:
            f.writelines(json.dumps({"text": text, "ids": row}) + "\n" for text, row in zip(texts, ids))


if __name__ == "__main__":
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
