"""
The judge: scores generated samples with a fixed autoregressive model, for sample quality you can measure.

    judge = load_judge("gpt2-large", device="cuda")           # GPT-2 (downloaded once from the HF hub)
    judge = load_judge("out/ar_text8/ckpt.pt")                # or an autoregressive checkpoint of this repo
    score_samples(judge, texts)   -> {gen_bpt, gen_ppl, tokens, nll_nats, samples, protocol}
    unigram_entropy(ids, unit)    -> mean per-sample unigram entropy, in bits (default) or nats
    in_vocab(texts, train_words(data_dir)) -> share of generated words seen in the training split
    quality(texts, ids, judge, data_dir)   -> all of the above at once (evaluate.py --samples, bench.py)
    score_samples(judge, texts, protocol="mdlm")  -> gen_ppl as MDLM / Duo compute it (mdlm_token_nlls)
    quality(..., protocol="mdlm")          -> entropy in nats, as the papers report it (entropy_unit says which)

A judge reads a start token followed by the sample: the first token is predicted from the start token
alone, every token is scored exactly once. A sample longer than the judge's context C (the longest input
it reads, start token included) is scored in sliding windows of C tokens moved by C // 2 (see windows()),
so every token after the first window is predicted from at least C/2 tokens of context. Windows after the
first do not begin with the start token (GPT-2 was trained on such windows; an AR checkpoint of this
repo never was, so its scores of samples longer than its training length are slightly pessimistic).

That is protocol "pooled", the default. Protocol "mdlm" is generative perplexity as MDLM and Duo compute
it (see mdlm_token_nlls): no start token, the sample truncated to max_length (default the judge's context)
and cut into chunks of C tokens whose first token is only context, every token counted except the EOS after
a chunk's first, pooled over all counted tokens.

The GPT-2 here is our own small module with the parameter names of the OpenAI / Hugging Face state dict.
"""
import math
import os
import pickle
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from common import UserError, default_dataset, hub_online, load_codec, resolve_checkpoint
from families import load_checkpoint

# ---- GPT-2 ------------------------------------------------------------------------------------------
GPT2_SIZES = {"gpt2": (12, 12, 768), "gpt2-medium": (24, 16, 1024),  # name: (n_layer, n_head, n_embd)
              "gpt2-large": (36, 20, 1280), "gpt2-xl": (48, 25, 1600)}
GPT2_EOT = 50256  # <|endoftext|>, GPT-2's start token


@dataclass
class GPT2Config:
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    n_ctx: int = 1024
    vocab_size: int = 50257


class GPT2Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.n_head = cfg.n_head
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)  # [q | k | v], heads contiguous within each
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd)

    def forward(self, x):
        B, L, n = x.shape
        q, k, v = (t.view(B, L, self.n_head, n // self.n_head).transpose(1, 2)
                   for t in self.c_attn(x).split(n, dim=-1))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).reshape(B, L, n))


class GPT2MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd)
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd)

    def forward(self, x):
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))


class GPT2Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, eps=1e-5)
        self.attn = GPT2Attention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, eps=1e-5)
        self.mlp = GPT2MLP(cfg)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


def _embedding(n, d):
    """nn.Embedding, without its random init under torch.device("meta") (from_hf_state_dict): normal_ on
    the meta device imports torch._dynamo, seconds for nothing."""
    if torch.empty(0).device.type == "meta":
        return nn.Embedding(n, d, _weight=torch.empty(n, d))
    return nn.Embedding(n, d)


class GPT2(nn.Module):
    """GPT-2 (pre-LN, learned positions, output tied to the token embedding). Our names are the HF names
    with nn.Linear weights (out, in) in place of HF's Conv1D (in, out); lm_head is wte itself."""

    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        self.transformer = nn.ModuleDict(dict(
            wte=_embedding(cfg.vocab_size, cfg.n_embd),
            wpe=_embedding(cfg.n_ctx, cfg.n_embd),
            h=nn.ModuleList(GPT2Block(cfg) for _ in range(cfg.n_layer)),
            ln_f=nn.LayerNorm(cfg.n_embd, eps=1e-5)))

    def forward(self, idx):
        """idx (B, L) with L <= n_ctx -> logits (B, L, vocab_size); logits[:, i] predicts token i + 1."""
        L = idx.shape[1]
        if L > self.config.n_ctx:
            raise ValueError(f"GPT-2 reads at most {self.config.n_ctx} tokens, got {L}")
        tr = self.transformer
        x = tr.wte(idx) + tr.wpe(torch.arange(L, device=idx.device))
        for block in tr.h:
            x = block(x)
        return F.linear(tr.ln_f(x), tr.wte.weight)

    @classmethod
    def from_hf_state_dict(cls, hf_state, cfg):
        """Build the model from a state dict in the HF layout (gpt2_state_dict), without a random init."""
        with torch.device("meta"):
            model = cls(cfg)
        model.load_state_dict(gpt2_state_dict(hf_state), strict=True, assign=True)
        return model.eval()


CONV1D_WEIGHTS = (".attn.c_attn.weight", ".attn.c_proj.weight", ".mlp.c_fc.weight", ".mlp.c_proj.weight")


def gpt2_state_dict(hf_state):
    """A GPT-2 state dict in the OpenAI / Hugging Face layout -> our GPT2's state dict (float32).

    Accepts keys with or without the 'transformer.' prefix (pytorch_model.bin of the original repos has
    none); drops the attention-mask buffers (attn.bias, attn.masked_bias) and lm_head.weight (tied to
    wte); transposes the Conv1D weights, stored (in, out), to nn.Linear's (out, in)."""
    out = {}
    for key, value in hf_state.items():
        if key == "lm_head.weight" or key.endswith((".attn.bias", ".attn.masked_bias")):
            continue
        name = key if key.startswith("transformer.") else "transformer." + key
        if name.endswith(CONV1D_WEIGHTS):
            value = value.t()
        out[name] = value.float().contiguous()
    return out


def load_gpt2(name, device="cpu", cache_dir=None):
    """GPT-2 by name (gpt2, gpt2-medium, gpt2-large, gpt2-xl): pytorch_model.bin from the Hugging Face hub
    (openai-community/NAME, or the legacy id NAME; a cached copy is used offline), in eval mode on device.
    Offline without a cached copy, or any other failure: a one-line UserError."""
    if name not in GPT2_SIZES:
        raise UserError(f"unknown GPT-2 {name!r} (known: {', '.join(GPT2_SIZES)})")
    from huggingface_hub import hf_hub_download
    online = hub_online()
    path, err = None, None
    for repo_id in (f"openai-community/{name}", name):
        try:
            path = hf_hub_download(repo_id=repo_id, filename="pytorch_model.bin", cache_dir=cache_dir,
                                   local_files_only=not online)
            break
        except Exception as e:  # offline and not cached, no such repo, interrupted download...
            err = err or e
    if path is None:
        raise UserError(f"cannot get {name} from the Hugging Face hub ({'online' if online else 'offline'}, "
                        f"{type(err).__name__}): run once with network access to cache it")
    try:
        hf_state = torch.load(path, map_location="cpu", weights_only=True)
        n_layer, n_head, n_embd = GPT2_SIZES[name]
        model = GPT2.from_hf_state_dict(hf_state, GPT2Config(n_layer, n_head, n_embd))
    except Exception as e:
        raise UserError(f"{path} is not a readable {name} checkpoint ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''}); delete it to download it again")
    return model.to(device)


def gpt2_encoding():
    """tiktoken's GPT-2 BPE (downloaded once and cached by tiktoken), or a one-line UserError."""
    import tiktoken
    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as e:
        raise UserError(f"cannot load tiktoken's GPT-2 encoding ({type(e).__name__}); it is downloaded once "
                        f"and cached: run once with network access, or set TIKTOKEN_CACHE_DIR")


# ---- judges -----------------------------------------------------------------------------------------
class Judge:
    """What scoring needs of a judge: name, start_id, context (the longest input, start token included),
    vocab_size (the ids it scores are below it), device, logits(x (B, L)) -> (B, L, >= vocab_size) where
    logits[:, i] predicts the token after x[:, i], and encode(text) -> ids."""
    name, start_id, context, vocab_size, device = "judge", 0, 1, 1, torch.device("cpu")

    def logits(self, x):
        raise NotImplementedError

    def encode(self, text):
        raise NotImplementedError

    @property
    def eos_id(self):
        """The end-of-text id of the mdlm rule: the start token (GPT-2's <|endoftext|>)."""
        return self.start_id

    def nll(self, ids):
        """(total nats, tokens scored) of one sample's token ids."""
        nats = token_nlls(self, [ids])[0]
        return float(nats.sum()), len(nats)


class ARJudge(Judge):
    """An autoregressive checkpoint of this repo (ar.AR): start token model.mask_id, the repo's token ids."""

    def __init__(self, model, context, codec=None, name="AR"):
        self.model, self.context, self.codec, self.name = model.eval(), int(context), codec, name
        self.start_id, self.vocab_size = model.mask_id, model.vocab_size
        self.device = next(model.parameters()).device

    def logits(self, x):
        return self.model.logits(x)

    @property
    def eos_id(self):
        """<|endoftext|> for a BPE codec. Else the start id (mask_id): a character corpus has no end-of-text, so
        under the mdlm rule EOS is only the padding, which this judge cannot predict and never counts."""
        bpe = self.codec.bpe if self.codec is not None else None
        if bpe is not None and "<|endoftext|>" in bpe.special_tokens_set:
            return bpe.eot_token
        return self.start_id

    def encode(self, text):
        if self.codec is None:
            raise UserError(f"judge {self.name} has no tokenizer: pass token ids, or --data_dir with its meta.pkl")
        if self.codec.bpe is not None:  # a generated <|endoftext|> comes back as that token
            return self.codec.bpe.encode(text, allowed_special=self.codec.bpe.special_tokens_set)
        return self.codec.encode(text)


class GPT2Judge(Judge):
    """GPT-2: start token <|endoftext|>, context n_ctx (1024), tiktoken's GPT-2 ids."""

    def __init__(self, model, encoding=None, name="gpt2"):
        self.model, self.encoding, self.name = model.eval(), encoding, name
        self.start_id, self.context, self.vocab_size = GPT2_EOT, model.config.n_ctx, model.config.vocab_size
        self.device = next(model.parameters()).device

    def logits(self, x):
        return self.model(x)

    def encode(self, text):
        if self.encoding is None:
            self.encoding = gpt2_encoding()
        return self.encoding.encode(text, allowed_special={"<|endoftext|>"})


def load_judge(spec, data_dir=None, device="cpu", ema=True):
    """A GPT-2 name (gpt2, gpt2-medium, gpt2-large, gpt2-xl), or an AR checkpoint of this repo: a file, a run
    directory (its ckpt.pt) or a HF repo id; its EMA weights when it has them (ema=True). data_dir: the
    dataset whose meta.pkl holds its tokenizer (default: its training dataset's)."""
    device = torch.device(device)
    if spec in GPT2_SIZES:
        return GPT2Judge(load_gpt2(spec, device), gpt2_encoding(), spec)
    path = resolve_checkpoint(spec)
    try:
        try:
            model = load_checkpoint(path, ema=ema, map_location=device)
        except ValueError as e:
            if not (ema and "no EMA weights" in str(e)):
                raise
            model = load_checkpoint(path, ema=False, map_location=device)
    except (ValueError, FileNotFoundError) as e:
        raise UserError(f"judge {spec}: {e} (a judge is an AR checkpoint or one of {', '.join(GPT2_SIZES)})")
    cls = model.checkpoint_meta["model_cls"]
    if cls != "AR":
        raise UserError(f"judge {spec} is a {cls} checkpoint; a judge must be autoregressive (an AR checkpoint "
                        f"or one of {', '.join(GPT2_SIZES)})")
    trained = model.checkpoint_meta.get("training_args") or {}
    try:
        codec = load_codec(model.vocab_size, trained.get("dataset") or default_dataset(model.vocab_size), data_dir)
    except UserError:
        codec = None  # token ids still work; encode() says what is missing
    return ARJudge(model, trained.get("seq_len", 256), codec, name=spec)


# ---- scoring ----------------------------------------------------------------------------------------
def windows(n, context):
    """How a sample x_0..x_{n-1} is scored by a judge of context C: a list of (a, b, t) where the judge
    reads s[a:b] of s = [start, x_0, ..., x_{n-1}] (b - a <= C) and scores x_t..x_{b-1} (x_i is predicted
    at input position i - a, from s[a:i+1]). n <= C: one plain pass (0, n, 0). Else the first window
    scores x_0..x_{C-1}, then each next window scores the next C // 2 tokens (fewer at the end) from the C
    inputs that end with them, so each token after the first window has at least C/2 + 1 of context."""
    if n <= context:
        return [(0, n, 0)]
    stride = max(1, context // 2)
    out, t = [(0, context, 0)], context
    while t < n:
        b = min(t + stride, n)
        out.append((b - context, b, t))
        t = b
    return out


PROTOCOLS = ("pooled", "mdlm")  # score_samples' rules: this repo's (token_nlls), MDLM / Duo's (mdlm_token_nlls)


def checked_ids(judge, ids):
    """A sample's token ids as a list of ints, or a one-line UserError if one is outside the judge's vocabulary."""
    ids = ids.tolist() if hasattr(ids, "tolist") else [int(i) for i in ids]
    if ids and (min(ids) < 0 or max(ids) >= judge.vocab_size):
        raise UserError(f"token id {max(ids) if max(ids) >= judge.vocab_size else min(ids)} is outside judge "
                        f"{judge.name}'s vocabulary (0..{judge.vocab_size - 1}): score texts, not ids")
    return ids


@torch.no_grad()
def batched_nlls(judge, jobs, batch_tokens):
    """jobs: (inp, tgt) pairs of equal-length id tensors (at most judge.context long), longest first: tgt[i] is
    the token predicted at inp[i], -100 where nothing is scored. -> one float64 numpy array of NLLs (nats; 0
    where not scored) per job. At most batch_tokens input tokens per network call, right-padded with the start
    token: causal attention keeps the padding out of every scored position."""
    out, i = [], 0
    while i < len(jobs):
        L = len(jobs[i][0])
        batch, i = jobs[i:i + max(1, batch_tokens // L)], i + max(1, batch_tokens // L)
        inp = torch.full((len(batch), L), judge.start_id, dtype=torch.long)
        tgt = torch.full((len(batch), L), -100, dtype=torch.long)
        for r, (x, y) in enumerate(batch):
            inp[r, :len(x)], tgt[r, :len(y)] = x, y
        logits = judge.logits(inp.to(judge.device))
        nll = F.cross_entropy(logits.flatten(0, 1).float(), tgt.flatten().to(judge.device), reduction="none",
                              ignore_index=-100).view(len(batch), L).double().cpu()
        out += [nll[r, :len(x)].numpy() for r, (x, _) in enumerate(batch)]
    return out


def token_nlls(judge, samples, batch_tokens=4096):
    """The pooled rule: per-token negative log-likelihoods (nats, float64 numpy arrays), one array per sample
    of token ids, every token scored once after the start token, long samples in windows(). The windows of all
    samples are sorted by length and batched (batched_nlls)."""
    seqs = [torch.tensor([judge.start_id] + checked_ids(judge, ids), dtype=torch.long) for ids in samples]
    out = [np.zeros(len(s) - 1) for s in seqs]
    wins = sorted(((b - a, j, a, b, t) for j, s in enumerate(seqs) if len(s) > 1
                   for a, b, t in windows(len(s) - 1, judge.context)), reverse=True)
    jobs = []
    for L, j, a, b, t in wins:
        tgt = torch.full((L,), -100, dtype=torch.long)
        tgt[t - a:] = seqs[j][t + 1:b + 1]
        jobs.append((seqs[j][a:b], tgt))
    for (_, j, a, b, t), nll in zip(wins, batched_nlls(judge, jobs, batch_tokens)):
        out[j][t:b] = nll[t - a:]
    return out


def mdlm_token_nlls(judge, samples, batch_tokens=4096, max_length=None):
    """The mdlm rule, generative perplexity as MDLM and Duo compute it: per-token NLLs (nats, float64 numpy),
    one array per sample of token ids, of the tokens it counts, in order. No start token (GPT-2's tokenizer
    adds none). Each sample is truncated to max_length tokens (default: the judge's context C), right-padded
    with EOS (judge.eos_id) to the longest sample, and cut into chunks of C tokens; a chunk's first token is
    only context. A later token counts if it is not EOS or it is the chunk's first EOS ((cumsum(x == eos) ==
    1) | (x != eos)): every non-EOS token, also after an EOS (despite MDLM's comment that text after the first
    EOS is discarded), and of the EOS tokens, padding included, only each chunk's first (none where the chunk
    begins with EOS, as samples of a BOS-framed model do); only where the judge can predict EOS.

    Read in kuleshov-group/mdlm diffusion.py (eval_retokenize, compute_generative_perplexity) and s-sahoo/duo
    metrics.py (record_generative_perplexity): the same rule, max_length = the generator's length. BD3-LM's
    metrics.py differs (sliding windows of 1024 by 512, no EOS counted) and is not offered. Not reproduced:
    they pad per sampling batch (score each batch and pool nll_nats / tokens to match), drop samples beyond a
    multiple of 8 and accumulate in float32."""
    eos, C = judge.eos_id, judge.context
    if max_length is not None and max_length < 1:
        raise UserError(f"max_length must be at least 1, got {max_length}")
    rows = [checked_ids(judge, ids)[:int(max_length or C)] for ids in samples]
    n = max(map(len, rows), default=0)
    chunks = []  # (length, sample, start, inp, counted), counted[k] for inp[k + 1]
    for j, row in enumerate(rows):
        row = torch.tensor(row + [eos] * (n - len(row)), dtype=torch.long)
        for c in range(0, n, C):
            x = row[c:c + C]
            first_eos = ((x == eos).cumsum(0) == 1) & (eos < judge.vocab_size)
            chunks.append((len(x), j, c, x, ((x != eos) | first_eos)[1:]))
    chunks.sort(key=lambda ch: (ch[0], ch[1], ch[2]), reverse=True)
    jobs = []
    for _, _, _, x, counted in chunks:
        tgt = torch.full((len(x),), -100, dtype=torch.long)
        tgt[:-1] = torch.where(counted, x[1:], -100)
        jobs.append((x, tgt))
    parts = {(j, c): nll[:-1][counted.numpy()]
             for (_, j, c, _, counted), nll in zip(chunks, batched_nlls(judge, jobs, batch_tokens))}
    return [np.concatenate([parts[j, c] for c in range(0, n, C)] or [np.zeros(0)]) for j in range(len(rows))]


def score_samples(judge, samples, batch_tokens=4096, protocol="pooled", max_length=None):
    """Score samples (texts, encoded with the judge's tokenizer, or token ids in the judge's vocabulary) by
    the rule `protocol` (PROTOCOLS): "pooled", this repo's (token_nlls), or "mdlm", MDLM / Duo's
    (mdlm_token_nlls; max_length its truncation, default the judge's context). Either way the mean is pooled
    over all scored tokens of all samples: gen_bpt (bits per token), gen_ppl = exp(nats per token), tokens,
    nll_nats, samples, protocol."""
    if protocol not in PROTOCOLS:
        raise UserError(f"unknown protocol {protocol!r} (known: {', '.join(PROTOCOLS)})")
    if max_length is not None and protocol != "mdlm":
        raise UserError(f"max_length is the mdlm rule's truncation; protocol {protocol!r} scores every token")
    ids = [judge.encode(s) if isinstance(s, str) else s for s in samples]
    if protocol == "mdlm":
        nats = mdlm_token_nlls(judge, ids, batch_tokens, max_length)
    else:
        nats = token_nlls(judge, ids, batch_tokens)
    total, tokens = float(sum(n.sum() for n in nats)), sum(len(n) for n in nats)
    if tokens == 0:
        raise UserError("no tokens to score: every sample is empty")
    return dict(gen_bpt=total / tokens / math.log(2), gen_ppl=math.exp(total / tokens), tokens=tokens,
                nll_nats=total, samples=len(ids), protocol=protocol)


# ---- diversity and words ----------------------------------------------------------------------------
ENTROPY_UNITS = {"bits": math.log(2), "nats": 1.0}  # one unit in nats


def unigram_entropy(samples, unit="bits"):
    """Mean over samples of H = -sum_v p_v log p_v of each sample's unigram distribution p (the counts of its
    token ids / its length), in `unit`: bits (log base 2, this repo's default) or nats (natural log, as the
    papers' torch.special.entr). Any sequences of hashables (id lists, or strings: per character); empty
    samples are skipped. A repetitive sample has a low entropy (a constant one: 0)."""
    if unit not in ENTROPY_UNITS:
        raise UserError(f"unknown entropy unit {unit!r} (known: {', '.join(ENTROPY_UNITS)})")
    entropies = []
    for s in samples:
        s = s.tolist() if hasattr(s, "tolist") else list(s)
        if not s:
            continue
        _, counts = np.unique(np.asarray(s), return_counts=True)
        p = counts / counts.sum()
        entropies.append(float(-(p * np.log(p)).sum()) / ENTROPY_UNITS[unit] + 0.0)  # + 0.0: no -0.0
    return sum(entropies) / len(entropies) if entropies else float("nan")


def unigram_entropy_bits(samples):
    """unigram_entropy in bits."""
    return unigram_entropy(samples, "bits")


def train_words(data_dir, cache=True, chunk_chars=1 << 22):
    """The set of words (whitespace-separated) of data_dir's train split, for a character corpus
    (meta.pkl with itos, train.npy). Cached in data_dir/train_words.txt (rebuilt when train.npy changes;
    skipped silently where data_dir is not writable)."""
    meta_path, src = os.path.join(data_dir, "meta.pkl"), os.path.join(data_dir, "train.npy")
    meta = None
    if os.path.exists(meta_path):
        with open(meta_path, "rb") as f:
            meta = pickle.load(f)
    if not meta or not meta.get("itos") or not os.path.exists(src):
        raise UserError(f"in_vocab needs a character corpus: {data_dir} has no meta.pkl with itos and train.npy")
    st = os.stat(src)
    stamp = f"# train words of train.npy size={st.st_size} mtime_ns={st.st_mtime_ns}"
    cache_path = os.path.join(data_dir, "train_words.txt")
    if cache and os.path.exists(cache_path):
        with open(cache_path, encoding="utf-8") as f:
            lines = f.read().split("\n")
        if lines[0] == stamp:
            return frozenset(w for w in lines[1:] if w)
    itos = meta["itos"]
    data = np.load(src, mmap_mode="r")
    single = all(len(c) == 1 for c in itos.values())
    lut = np.zeros(max(itos) + 1, dtype="<u4")
    for i, c in itos.items():
        lut[i] = ord(c) if single else 0

    def decode(ids):
        if single:
            return lut[np.asarray(ids, dtype=np.int64)].tobytes().decode("utf-32-le")
        return "".join(itos[int(i)] for i in ids)

    words, carry = set(), ""
    for start in range(0, len(data), chunk_chars):
        text = carry + decode(data[start:start + chunk_chars])
        parts = text.split()
        carry = parts.pop() if parts and not text[-1].isspace() else ""  # may go on in the next chunk
        words.update(parts)
    if carry:
        words.add(carry)
    if cache:
        tmp = f"{cache_path}.tmp{os.getpid()}"
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(stamp + "\n" + "\n".join(sorted(words)) + "\n")
            os.replace(tmp, cache_path)
        except OSError:
            pass
    return frozenset(words)


def in_vocab(texts, words):
    """The share of generated words found in `words` (train_words), pooled over all samples. Every
    whitespace-separated word counts, the first and last of a sample too, although a fixed-length
    sample usually cuts its last word (and a window of real text both): compare with the same measure on
    real text windows of the same length, not with 1. nan when there are no words."""
    found = total = 0
    for text in texts:
        for w in text.split():
            total += 1
            found += w in words
    return found / total if total else float("nan")


def quality(texts, ids, judge, data_dir=None, protocol="pooled", max_length=None):
    """Sample quality under a judge (judge.py): gen_ppl and gen_bpt pooled over all scored tokens (the
    texts, in the judge's tokens) by the rule `protocol` (score_samples), the mean unigram entropy of each
    sample's own tokens (ids if given, else the judge's) in entropy_unit: bits under "pooled", nats under "mdlm"
    (the papers' 5.2-5.6 are nats), and for a character corpus (data_dir with itos) in_vocab, the share of
    generated words that occur in its training split."""
    result = score_samples(judge, texts, protocol=protocol, max_length=max_length)
    result["entropy_unit"] = "nats" if protocol == "mdlm" else "bits"
    result["entropy"] = unigram_entropy(ids if ids is not None else [judge.encode(t) for t in texts],
                                        result["entropy_unit"])
    if data_dir and os.path.exists(os.path.join(data_dir, "meta.pkl")):
        try:
            result["in_vocab"] = in_vocab(texts, train_words(data_dir))
        except UserError:
            pass  # a BPE corpus: no word list
    return result
