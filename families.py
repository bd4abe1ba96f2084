"""
The model families, and the one interface through which train.py, evaluate.py, sample.py and bench.py use
them. They know nothing else about a family: no script names a class.

A family is an nn.Module in a file of its own, built on the DiT of model.py, constructed from keyword
arguments (its `model_args`, stored in every checkpoint), with:

    vocab_size        the data are token ids 0 .. vocab_size - 1
    mask_id           the id that marks "generate this position" in sample()'s input (the absorbing
                      families also use it as their mask token; a family without a mask still reads it
                      as "to generate", and may use the id for anything else internally)
    net               its DiT
    forward(x0, clean=None)                     -> (logits, loss, metrics)
                      training on a (B, L) batch of clean ids: loss is minimised; metrics is a dict of 0-dim
                      tensors that holds at least "bound", a one-sample estimate of the model's bound in
                      nats/token (train.py logs every entry)
    batch_bound(x0, offset, generator=None, T=None, clean=None) -> float64 0-dim tensor
                      one unbiased estimate of the model's bound (nats/token) on a (B, L) batch, one network
                      call, stratified over the batch by offset in [0, 1); evaluate.py averages them.
                      T = N: the bound of an N-step sampler instead; a family whose bound has no such
                      variant raises ValueError
                      first_given=True (optional; passed only to a family that takes it): x0[:, 0] given, not scored
    clean             conditional generation (prompt -> answer rows, data/prepare_pairs.py): an optional (B, L) bool
                      tensor, True at the positions given and held fixed (the prompt). They are never noised and
                      never scored; the bound is that of the other positions given them, -log p(answer | prompt)
                      bounded, per scored token: the mean over rows of (the row's bound) / (its scored positions),
                      each row with at least one. metrics["bound"] and the loss use the same normalisation.
                      clean=None is the unconditional model, unchanged. Each family's file states its conditional
                      bound (the masked families mask only unclean positions; the autoregressive model scores only
                      them; block diffusion keeps the prompt clean inside whatever block it ends in; Duo never
                      noises it).
    bound_name(T=None) -> str                   what batch_bound estimates, for the printout
    sample(x, steps=None, generator=None, callback=None, cache=True, sampler="ancestral", **opts)
                                                -> (samples, network calls)
                      fill the mask_id positions of x (B, L); other tokens are given and never change.
                      steps: the sampler's step count (None: the family's exact sampler); callback(x, t)
                      after each network call; cache=False: the same samples without the family's
                      shortcut (for comparison); sampler "ancestral", "confidence", "remask" or "greedy_tail" and opts
                      temperature, top_k, top_p, score, schedule, eta (sampling.py); "threshold" (opt threshold)
                      picks its own number of calls and ignores steps; "euler" (SEDD's Euler predictor); opts
                      correction_steps, correction_temperature (GIDD's self-correction after sampling, its calls
                      counted: the scripts pass them only to a sample() that names them, common.refuse_unsupported).
                      What a family cannot do (an option, infilling) is a ValueError, which the scripts print as one line.
Optionally:
    check_length(L)   raise ValueError when windows of L tokens do not fit the model (block diffusion)
    distill_loss(teacher, x0, steps) -> loss, and distill_defaults = (method name, teacher steps, rounds)
                      few-step distillation for distill.py: the loss of the student (self) learning in one step
                      what teacher (a frozen copy) does in two steps of 1/steps
    null_prompt(x0, clean, generator=None) -> x0 with the clean positions replaced by the family's no-prompt input
                      (classifier-free guidance: train.py --cond_drop, sample.py / evaluate.py --guidance). It is what
                      the NETWORK reads there (sampling.null_prompt_input): the family's own x0 keeps the prompt, so a
                      dropped row is still never noised and never scored at its prompt. Without it: mask_id at the
                      prompt positions (the absorbing families, and the autoregressive model, whose DiT embeds mask_id
                      as its start token: every DiT but Duo's has a row for it). Duo (no mask class): uniformly random
                      tokens there, its prior
    start_iteration(iter_num)  called by train.py before every optimizer step (an objective that changes during
                      training: duo.py's curriculum)
    any_length = True sample() writes any number of tokens itself, given opts window (the training length)
                      and stop_id (stop once every row has produced it); without it sample.py --length
                      generates window after window (sampling.generate_long)

Adding a family: one file, one line in FAMILIES below, and its config functions in configs.py.
"""
import os

import torch

from ar import AR
from bd3lm import BD3LM
from d3pm import D3PMAbsorbing
from duo import Duo
from genmd4 import GenMD4
from gidd import GIDD
from mdlm import MDLM
from sedd import SEDD

FAMILIES = {cls.__name__: cls for cls in (D3PMAbsorbing, MDLM, AR, BD3LM, GenMD4, Duo, GIDD, SEDD)}  # checkpoints name them: model_cls

EMA_PREFIX = "ema_model."


def read_checkpoint(path, map_location="cpu"):
    """torch.load a checkpoint in the nanoDD layout (model, model_cls, model_args, and from train.py ema,
    optimizer, training_args, iter_num...), or raise ValueError / FileNotFoundError saying why."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated zip, pickle garbage, not a torch file...
        raise ValueError(f"{path} is not a readable checkpoint: truncated, corrupt or not a torch file "
                         f"({type(e).__name__})") from None
    if not isinstance(ckpt, dict) or not {"model", "model_cls", "model_args"} <= set(ckpt):
        raise ValueError(f"{path} is not a nanoDD checkpoint (needs keys model, model_cls, model_args)")
    if ckpt["model_cls"] not in FAMILIES:
        raise ValueError(f"{path}: unknown model class {ckpt['model_cls']!r} (known: {', '.join(FAMILIES)})")
    return ckpt


def load_checkpoint(path, ema=True, map_location="cpu"):
    """The model stored in a checkpoint of any family, with its EMA weights (default) or raw weights, in eval
    mode on map_location. The checkpoint is read into CPU memory and only the model moves to map_location
    (a last.pt also holds the optimizer's moments, the other weights and RNG states: 4x the weights).
    The rest of the checkpoint (without weights) is on model.checkpoint_meta, for callers that want
    model_args / training_args / iter_num."""
    ckpt = read_checkpoint(path, "cpu")
    model = FAMILIES[ckpt["model_cls"]](**ckpt["model_args"])
    state = ckpt["model"]
    if ema:
        if "ema" not in ckpt:
            raise ValueError(f"{path} has no EMA weights; use the raw weights (--no_ema)")
        state = {k[len(EMA_PREFIX):]: v for k, v in ckpt["ema"].items() if k.startswith(EMA_PREFIX)}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ValueError(f"{path}: weights do not match {ckpt['model_cls']}"
                         f"({ckpt['model_args']}): {str(e).splitlines()[0]}") from None
    model.checkpoint_meta = {k: v for k, v in ckpt.items() if k not in ("model", "ema", "optimizer")}
    return model.to(map_location).eval()
