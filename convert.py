"""
The papers' published checkpoints, loaded into this repo's classes (sample.py, evaluate.py and bench.py take
their Hugging Face ids, or a local copy of the repo, wherever they take a checkpoint):

    kuleshov-group/mdlm-owt                       MDLM   (Sahoo et al. 2024)
    kuleshov-group/bd3lm-owt-block_size{4,8,16}   BD3LM  (Arriola et al. 2025)
    s-sahoo/duo, s-sahoo/duo-distilled            Duo    (Sahoo et al. 2025; the distilled one by DCD)
    louaaron/sedd-small, louaaron/sedd-medium     SEDD   (Lou, Meng & Ermon 2024)
    dvruette/gidd-{small,base}-p_unif-{0.0,0.1,0.2}   GIDD   (von Rutte et al. 2025)

Each repo holds config.json and model.safetensors (or pytorch_model.bin): the state dict of a `backbone`, the
DiT of MDLM's code base, which differs from nanoDD's (model.py) only in names and in its output layer, an
untied Linear with a bias (model.py's tied_output=False). The names map by prefix (LAYOUT), in order:

    backbone.vocab_embed.embedding            -> net.vocab_embed.weight
    backbone.sigma_map.                       -> net.c_embed.           (the time embedding)
    backbone.output_layer.linear.             -> net.output.
    backbone.output_layer.norm_final.         -> net.norm_final.
    backbone.output_layer.adaLN_modulation.   -> net.adaLN_modulation.
    backbone.                                 -> net.                   (blocks.i.*, rotary_emb.inv_freq)

The settings come from config.json ("model_type" picks the family): the vocabulary (MDLM and BD3-LM: GPT-2's
50257 tokens plus the mask, last; Duo: 50258 states, GPT-2's tokens plus a [PAD] id that is never data),
the sizes, the length ("model_length"), BD3-LM's block size and its clipped training range of t (the buffers
sampling_eps_min / max, which become t_min / t_max). MDLM and BD3-LM run without time conditioning (the
network reads t = 0); Duo's network reads sigma = -log alpha_t (duo.py time_input="sigma"). Loading is
strict: a missing, unexpected or misshapen tensor is a one-line error naming it.

SEDD's repos hold their `SEDD` module itself: the same names without "backbone." (vocab_embed.embedding, sigma_map.,
blocks., output_layer.), and as config.json their whole training config (no model_type): tokens (GPT-2's 50257; the
absorbing graph adds the mask, last), graph.type, noise.type (sigma_min, sigma_max) and model (hidden_size, cond_dim,
n_blocks, n_heads, dropout, length, scale_by_sigma). Their network reads sigma(t), as sedd.py's.

GIDD's repos hold their Hugging Face DIT (gidd/models/modeling_dit.py), bare names too, plus its rotary tables
rotary_emb.cos_cached / sin_cached (checked against ours, then dropped), and its DITConfig (model_type "dit"):
vocab_size (GPT-2's 50257 tokens, then the [PAD] and [MASK] their tokenizer adds: the mask is the last id, [PAD] a token
never in the data, as Duo's), hidden_size, timestep_cond_dim, num_hidden_layers, num_attention_heads, attention_dropout,
max_seq_len, p_uniform and t_eps. Their network reads t itself, as gidd.py's.
"""
import json
import os

import torch

from bd3lm import BD3LM
from duo import Duo
from gidd import GIDD
from mdlm import MDLM
from sedd import SEDD

PUBLISHED = {  # Hugging Face id -> family; any repo with a config.json of these model types loads the same way
    "kuleshov-group/mdlm-owt": "MDLM",
    "kuleshov-group/bd3lm-owt-block_size4": "BD3LM",
    "kuleshov-group/bd3lm-owt-block_size8": "BD3LM",
    "kuleshov-group/bd3lm-owt-block_size16": "BD3LM",
    "s-sahoo/duo": "Duo",
    "s-sahoo/duo-distilled": "Duo",
    "louaaron/sedd-small": "SEDD",
    "louaaron/sedd-medium": "SEDD",
    **{f"dvruette/gidd-{size}-p_unif-{p}": "GIDD" for size in ("small", "base") for p in ("0.0", "0.1", "0.2")},
}

LAYOUT = [("backbone.vocab_embed.embedding", "net.vocab_embed.weight"),
          ("backbone.sigma_map.", "net.c_embed."),
          ("backbone.output_layer.linear.", "net.output."),
          ("backbone.output_layer.norm_final.", "net.norm_final."),
          ("backbone.output_layer.adaLN_modulation.", "net.adaLN_modulation."),
          ("backbone.", "net.")]
OPTIONAL = ("net.rotary_emb.inv_freq",)  # a persistent buffer: a file may or may not carry it

SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}


def read_safetensors(path):
    """The tensors of a .safetensors file: an 8-byte little-endian header length n, n bytes of JSON
    {name: {dtype, shape, data_offsets: [begin, end]}} (offsets into the bytes after the header), the bytes."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
        data = bytearray(f.read())  # the tensors are views of it (a little-endian machine)
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        begin, end = info["data_offsets"]
        dtype = SAFETENSORS_DTYPES[info["dtype"]]
        count = (end - begin) // dtype.itemsize
        flat = torch.frombuffer(data, dtype=dtype, count=count, offset=begin) if count else \
            torch.empty(0, dtype=dtype)
        out[name] = flat.reshape(info["shape"])
    return out


def our_name(key):
    """The state-dict name in this repo of a published key (None: not a backbone key)."""
    for theirs, ours in LAYOUT:
        if key.startswith(theirs):
            return ours + key[len(theirs):]
    return None


def their_name(key):
    """The published name of one of our state-dict keys."""
    for theirs, ours in LAYOUT:
        if key.startswith(ours):
            return theirs + key[len(ours):]
    return key


def require(config, keys, source):
    missing = [k for k in keys if k not in config]
    if missing:
        raise ValueError(f"{source}: config.json lacks {', '.join(missing)}")
    return [config[k] for k in keys]


def sizes(config, source):
    """The DiT sizes every layout shares, as model args."""
    n, c, blocks, heads, dropout = require(config, ("hidden_dim", "cond_dim", "n_blocks", "n_heads", "dropout"), source)
    return dict(n_embed=n, n_heads=heads, n_blocks=blocks, n_cond=c, dropout=dropout, tied_output=False)


def refuse(config, source, **expected):
    """A one-line error if a config setting is not the one our class reproduces."""
    for key, value in expected.items():
        if config.get(key, value) != value:
            raise ValueError(f"{source}: {key}={config[key]!r} is not supported (this repo loads {key}={value!r})")


def mdlm_args(config, state, source):
    refuse(config, source, time_conditioning=False)
    (V,) = require(config, ("vocab_size",), source)
    return MDLM, dict(vocab_size=V - 1, **sizes(config, source), schedule="linear", time_conditioning=False)


def bd3lm_args(config, state, source):
    refuse(config, source, time_conditioning=False, cross_attn=True, adaln=True, causal=False)
    V, block_size = require(config, ("vocab_size", "block_size"), source)
    t_min = float(state.pop("sampling_eps_min", 0.0))
    t_max = float(state.pop("sampling_eps_max", 1.0))
    return BD3LM, dict(vocab_size=V - 1, **sizes(config, source), block_size=block_size, t_min=t_min, t_max=t_max)


def duo_args(config, state, source):
    refuse(config, source, causal=False)
    (V,) = require(config, ("vocab_size",), source)
    return Duo, dict(vocab_size=V, **sizes(config, source), time_input="sigma")


def sedd_config(config, source):
    """SEDD's nested training config as the flat settings the others have (their model/transformer.py reads these)."""
    tokens, graph, noise, model = require(config, ("tokens", "graph", "noise", "model"), source)
    if not all(isinstance(d, dict) for d in (graph, noise, model)):
        raise ValueError(f"{source}: config.json's graph, noise and model must be objects")
    (graph_type,), (noise_type,) = require(graph, ("type",), source), require(noise, ("type",), source)
    n, c, blocks, heads, dropout, length = require(model, ("hidden_size", "cond_dim", "n_blocks", "n_heads", "dropout",
                                                           "length"), source)
    return dict(model_type="sedd", vocab_size=tokens, graph=graph_type, noise=noise_type,
                sigma_min=noise.get("sigma_min", 1e-4), sigma_max=noise.get("sigma_max", 20.0),
                scale_by_sigma=bool(model.get("scale_by_sigma", False)), hidden_dim=n, cond_dim=c, n_blocks=blocks,
                n_heads=heads, dropout=dropout, model_length=length)


def sedd_args(config, state, source):
    if config["noise"] not in ("loglinear", "geometric"):
        raise ValueError(f"{source}: noise type {config['noise']!r} is not supported (loglinear or geometric)")
    if config["graph"] not in ("absorb", "uniform"):
        raise ValueError(f"{source}: graph type {config['graph']!r} is not supported (absorb or uniform)")
    return SEDD, dict(vocab_size=config["vocab_size"], **sizes(config, source), graph=config["graph"],
                      noise=config["noise"], eps=1e-3, sigma_min=float(config["sigma_min"]),
                      sigma_max=float(config["sigma_max"]), scale_by_sigma=config["scale_by_sigma"])


def gidd_config(config, source):
    """GIDD's DITConfig under the names the others use."""
    names = ("hidden_size", "timestep_cond_dim", "num_hidden_layers", "num_attention_heads", "attention_dropout",
             "max_seq_len")
    ours = ("hidden_dim", "cond_dim", "n_blocks", "n_heads", "dropout", "model_length")
    return dict(config, **dict(zip(ours, require(config, names, source))))


def gidd_args(config, state, source):
    V, p_uniform, t_eps = require(config, ("vocab_size", "p_uniform", "t_eps"), source)
    for part in ("cos", "sin"):  # their Rotary's tables, (1, length, 3, 1, head_dim): q, k rotated, v not
        table = state.pop(f"backbone.rotary_emb.{part}_cached", None)
        if table is None:
            continue
        d = table.shape[-1]
        angles = torch.outer(torch.arange(table.shape[1]).double(),
                             1.0 / 10000 ** (torch.arange(0, d, 2).double() / d)).repeat(1, 2)
        expected = (angles.cos() if part == "cos" else angles.sin())[None, :, None, None, :].repeat(1, 1, 3, 1, 1)
        expected[:, :, 2] = 1.0 if part == "cos" else 0.0
        if (table.shape != expected.shape or d * config["n_heads"] != config["hidden_dim"]
                or not torch.allclose(table.double(), expected, atol=1e-2)):  # (bf16 files too)
            raise ValueError(f"{source}: rotary_emb.{part}_cached differs from the rotary tables this repo computes")
    return GIDD, dict(vocab_size=V - 1, **sizes(config, source), p_uniform=float(p_uniform), t_eps=float(t_eps))


FAMILY_ARGS = {"mdlm": mdlm_args, "bd3lm": bd3lm_args, "duo": duo_args, "sedd": sedd_args,  # model_type (any case)
               "dit": gidd_args}
BARE = ("sedd", "dit")  # state dicts of the DiT itself: their keys are the LAYOUT's without "backbone."


def convert(config, state, source):
    """(model, model_args, training_args) from a published config dict and state dict; ValueError (one line) if
    they do not fit: an unknown model type, a missing setting, or a missing, unexpected or misshapen tensor."""
    model_type = str(config.get("model_type", "")).lower()
    if not model_type and {"tokens", "graph", "noise", "model"} <= set(config):  # SEDD's training config
        config = sedd_config(config, source)
        model_type = "sedd"
    if model_type == "dit":  # GIDD's DITConfig
        config = gidd_config(config, source)
    if model_type not in FAMILY_ARGS:
        raise ValueError(f"{source}: unknown model_type {config.get('model_type')!r} in config.json "
                         f"(known: {', '.join(FAMILY_ARGS)})")
    bare = model_type in BARE
    shown = (lambda key: key[len("backbone."):]) if bare else (lambda key: key)  # the file's own names, in messages
    state = {("backbone." + k if bare else k): v for k, v in state.items()}
    cls, args = FAMILY_ARGS[model_type](config, state, source)
    try:
        model = cls(**args)
    except (ValueError, TypeError, AssertionError) as e:
        raise ValueError(f"{source}: config.json: {e}") from None
    ours = model.state_dict()
    loaded = {}
    for key, value in state.items():
        name = our_name(key)
        if name not in ours or their_name(name) != key:  # e.g. backbone.output.weight is not a published name
            raise ValueError(f"{source}: unexpected tensor {shown(key)} (not in the {cls.__name__} layout)")
        if tuple(value.shape) != tuple(ours[name].shape):
            raise ValueError(f"{source}: {shown(key)} has shape {tuple(value.shape)}, expected {tuple(ours[name].shape)} "
                             f"from config.json")
        if name in OPTIONAL:  # a buffer we compute ourselves: it must agree (in the file's precision)
            if not torch.allclose(value.float(), ours[name].to(value.dtype).float(), rtol=1e-5, atol=0):
                raise ValueError(f"{source}: {shown(key)} differs from the rotary frequencies this repo computes")
            continue
        loaded[name] = value.float()
    missing = [k for k in ours if k not in loaded and k not in OPTIONAL]
    if missing:
        raise ValueError(f"{source}: missing tensor {shown(their_name(missing[0]))}"
                         + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))
    model.load_state_dict({**ours, **loaded}, strict=True)
    (length,) = require(config, ("model_length",), source)
    training_args = {"seq_len": int(length), "published": source}
    return model, args, training_args


def read_published(directory, source):
    """(config dict, state dict) of a local copy of a published repo."""
    with open(os.path.join(directory, "config.json"), encoding="utf-8") as f:
        try:
            config = json.load(f)
        except ValueError as e:
            raise ValueError(f"{source}: config.json is not JSON ({e})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{source}: config.json is not a JSON object")
    for name in ("model.safetensors", "pytorch_model.bin"):
        path = os.path.join(directory, name)
        if os.path.exists(path):
            try:
                if name.endswith(".safetensors"):
                    return config, read_safetensors(path)
                return config, torch.load(path, map_location="cpu", weights_only=True)
            except Exception as e:
                raise ValueError(f"{source}: {name} is not readable ({type(e).__name__}); delete it and download "
                                 f"it again") from None
    raise ValueError(f"{source}: neither model.safetensors nor pytorch_model.bin in {directory}")


def is_published(spec):
    """A known published id, or a directory that holds a config.json and no ckpt.pt of ours."""
    if os.path.isdir(spec):
        return os.path.exists(os.path.join(spec, "config.json")) and not os.path.exists(os.path.join(spec, "ckpt.pt"))
    return spec in PUBLISHED


def load_published(directory, source, map_location="cpu"):
    """The model of a local copy of a published repo (source: its id or path, for messages), in eval mode; its
    settings on model.checkpoint_meta as for a checkpoint of ours (model_cls, model_args, training_args)."""
    config, state = read_published(directory, source)
    model, args, training_args = convert(config, state, source)
    model.checkpoint_meta = {"model_cls": type(model).__name__, "model_args": args, "training_args": training_args}
    return model.to(map_location).eval()
