"""
Sampling pieces that every model family shares (d3pm.py, mdlm.py, ar.py call them; sample.py drives them).

    draw                   one token per row from logits, float64 inverse CDF, with temperature / top-k / top-p
    unmask_at_event_times  the exact masked-diffusion reverse process, network only where something unmasks
    confidence_decode      MaskGIT / LLaDA-style decoding: commit the most confident positions, S steps
    threshold_decode       Fast-dLLM-style decoding: commit every position whose draw is likely enough
    remask_decode          ReMDM: the ancestral grid, but a generated token may be masked again and redrawn
    generate_long          any length, semi-autoregressively: each window starts with the previous one's end
    answer_prompts         prompts in, answers out, for a model trained on prompt -> answer rows
    null_prompt_input      the network sees the family's no-prompt input at the prompt (train.py --cond_drop)
    guided                 classifier-free guidance around the network (sample.py / evaluate.py --guidance)
    sdtt_loss              SDTT distillation: a student's one masked-diffusion step against its teacher's two

Draws are float64 throughout: float32 truncates the tail and lowers the effective temperature, which
flatters generative perplexity. The float64 work on (N, K) logits goes a chunk of rows at a time (row_chunks), so
that at K = 50258 it costs a small fraction of the float32 logits, whatever N; every row is computed as it would
be alone, so the draws do not depend on the chunk size. The samplers keep one float32 copy of the logits of the
positions they draw (logits[masked]) and free the network's output before its next call.
"""
import contextlib
import math

import torch

CHUNK_ELEMENTS = 1 << 22  # float64 work on (N, K) logits: max(1, CHUNK_ELEMENTS // K) rows at a time (32 MB a buffer)


def row_chunks(n, k):
    """Slices covering rows 0..n-1 of (n, k) logits, max(1, CHUNK_ELEMENTS // k) rows each."""
    step = max(1, CHUNK_ELEMENTS // k)
    return [slice(i, min(i + step, n)) for i in range(0, n, step)]


def filter_logits(logits, temperature=1.0, top_k=0, top_p=1.0):
    """float64 logits / temperature, keeping only the top_k classes (0: all) and the smallest set whose
    probability reaches top_p (nucleus; 1.0: all). The rest get -inf. temperature must be > 0."""
    logits = logits.double() / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        before = probs.cumsum(dim=-1) - probs  # the mass of the classes ranked above each class
        drop = before >= top_p  # keep a class while the mass above it is below p: the smallest set reaching p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return logits


def draw(logits, generator=None, u=None, temperature=1.0, top_k=0, top_p=1.0):
    """One sample per row of (N, K) logits, by inverting the CDF in float64 with one uniform per row (u, (N,),
    drawn here if not given), after filter_logits. temperature=0 is the argmax. side="right" never returns
    a class of probability 0 (the masked column, or one filtered out)."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    N, K = logits.shape
    if u is None:  # all rows' uniforms first: the draws do not depend on the chunks
        u = torch.rand(N, dtype=torch.float64, device=logits.device, generator=generator)
    out = torch.empty(N, dtype=torch.long, device=logits.device)
    for rows in row_chunks(N, K):
        cdf = filter_logits(logits[rows], temperature, top_k, top_p).softmax(dim=-1).cumsum(dim=-1)
        out[rows] = torch.searchsorted(cdf, (u[rows] * cdf[:, -1])[:, None], right=True).squeeze(1)
    return out.clamp(max=K - 1)


def drawn_probability(logits, tokens, temperature=1.0, top_k=0, top_p=1.0):
    """The probability of tokens (N,) under the distribution draw() samples (N, K) logits from (filter_logits).
    temperature 0 (the argmax, a point mass) is scored at temperature 1, so that positions still rank."""
    out = torch.empty(tokens.shape, dtype=torch.float64, device=logits.device)
    for rows in row_chunks(*logits.shape):
        probs = filter_logits(logits[rows], temperature or 1.0, top_k, top_p).softmax(dim=-1)
        out[rows] = probs.gather(-1, tokens[rows, None]).squeeze(-1)
    return out


def top_two(logits):
    """The two largest probabilities of softmax(float64 (N, K) logits), (N, 2), chunk by chunk."""
    out = torch.empty((logits.shape[0], 2), dtype=torch.float64, device=logits.device)
    for rows in row_chunks(*logits.shape):
        out[rows] = torch.softmax(logits[rows].double(), dim=-1).topk(2, dim=-1).values
    return out


def unmask_at_event_times(logits_fn, x, tau, u, mask_id, callback=None, grid=None, whole_batch=False,
                          **draw_opts):
    """Run a masked-diffusion reverse process whose unmask times and draws are fixed in advance.

    tau (B, L) > 0: the time at which each masked position of x unmasks, going down from the top; u (B, L):
    the uniform that draws its token (draw). First-hitting (grid=None): each row advances to its largest
    pending time t and calls logits_fn(x_rows, t_rows) once (all rows together, each at its own time),
    drawing every position that unmasks at t from p(x_0 | x_t). Times where nothing unmasks change nothing
    and cost nothing. grid (descending times): the plain loop instead, one call at every grid time for
    every row; since the draws are fixed in advance, it gives the same samples.
    whole_batch=True: every call gets all rows (rows without an event at time 0, their outputs unused), for a
    logits_fn whose state is per batch (bd3lm.py's KV cache). Given tokens are never changed.
    Returns (x, network calls)."""
    x = x.clone()
    pending = torch.where(x == mask_id, tau, torch.zeros_like(tau))  # 0: nothing to do
    calls = 0
    while True:
        if grid is None:
            t_row = pending.max(dim=1).values  # each row's next event time (the largest pending)
        elif calls < len(grid):
            t_row = grid[calls].expand(x.shape[0]).to(pending)
        else:
            t_row = torch.zeros_like(pending[:, 0])
        rows = (t_row > 0).nonzero().squeeze(1)
        if rows.numel() == 0:
            return x, calls
        xr, pr, tr = x[rows], pending[rows], t_row[rows]
        now = pr == tr[:, None]
        if whole_batch:  # the rows at an event, in order: one copy of their logits
            now_all = torch.zeros_like(pending, dtype=torch.bool)
            now_all[rows] = now
            logits = logits_fn(x, t_row)[now_all]
        else:
            logits = logits_fn(xr, tr)[now]
        xr[now] = draw(logits, u=u[rows][now], **draw_opts)
        del logits  # before the next call
        x[rows], pending[rows] = xr, torch.where(now, torch.zeros_like(pr), pr)
        calls += 1
        if callback is not None:
            callback(x, tr)


def confidence_decode(logits_fn, x, times, mask_id, generator=None, callback=None, score="drawn",
                      schedule="linear", **draw_opts):
    """MaskGIT / LLaDA-style decoding in S = len(times) network calls (not a sampler of the model's
    distribution: measure it). Step j calls logits_fn(x, times[j]) (times descending), draws a token for
    every masked position (draw_opts: temperature, top_k, top_p), and commits the k_j positions whose
    score is highest: "drawn" = the probability of the drawn token (drawn_probability: LLaDA's low_confidence
    remasking, MaskGIT), "max" = the largest probability, "margin" = top-1 minus top-2 probability (these
    two of the unfiltered prediction, whatever was drawn); the others stay masked. With M masked positions
    in a row, k_j = n(j+1) - n(j) with n(j) = round(M f(j/S)), f(s) = s (linear) or 1 - cos(pi s / 2)
    (cosine: few first, many last), so every position is filled after S steps. Given tokens are never
    changed. Returns (x, network calls)."""
    if score not in ("drawn", "max", "margin"):
        raise ValueError(f"unknown confidence score {score!r} (drawn, max or margin)")
    x = x.clone()
    B = x.shape[0]
    S = len(times)
    n_masked = (x == mask_id).sum(dim=1)  # (B,)

    def filled_by(j):
        s = j / S
        frac = s if schedule == "linear" else 1 - math.cos(math.pi * s / 2)
        return torch.round(n_masked.double() * frac).long()

    calls = 0
    for j, t in enumerate(times):
        masked = x == mask_id
        if not masked.any():
            break
        calls += 1
        lm = logits_fn(x, torch.full((B,), float(t), dtype=torch.float64, device=x.device))[masked]
        drawn = draw(lm, generator, **draw_opts)
        if score == "drawn":
            conf_values = drawn_probability(lm, drawn, **draw_opts)
        else:
            top2 = top_two(lm)
            conf_values = top2[:, 0] if score == "max" else top2[:, 0] - top2[:, 1]
        del lm  # before the next call
        confidence = torch.full(x.shape, float("-inf"), dtype=torch.float64, device=x.device)
        confidence[masked] = conf_values
        k = filled_by(j + 1) - filled_by(j) if j < S - 1 else masked.sum(dim=1)
        rank = confidence.argsort(dim=1, descending=True).argsort(dim=1)
        commit = masked & (rank < k[:, None])
        tokens = torch.full_like(x, mask_id)
        tokens[masked] = drawn
        x = torch.where(commit, tokens, x)
        if callback is not None:
            callback(x, t)
    return x, calls


def threshold_decode(logits_fn, x, mask_id, threshold, generator=None, callback=None, time_of=None,
                     whole_batch=False, **draw_opts):
    """Confidence-threshold parallel decoding (Fast-dLLM; not a sampler of the model's distribution: measure
    it). Each call draws a token for every masked position of the rows that still hold a mask (draw_opts:
    temperature, top_k, top_p) and commits every one whose drawn token has probability >= threshold
    (drawn_probability), and always the row's most probable draw, so each call fills at least one position:
    the model decides the number of calls, at most a row's masked count (threshold 1: one position per call,
    most confident first, unless several draws are certain). A row is called with time time_of(s) (B,)
    (default: s), s = the share of its originally masked positions still masked (1 at the first call);
    rows finish independently and are left out of later calls, unless whole_batch (every call gets all rows,
    as unmask_at_event_times). Given tokens are never changed. Returns (x, network calls)."""
    if not 0 < threshold <= 1:
        raise ValueError(f"the threshold must be in (0, 1], not {threshold}")
    x = x.clone()
    n0 = (x == mask_id).sum(dim=1).clamp(min=1).double()  # (B,)
    calls = 0
    while True:
        masked = x == mask_id
        left = masked.sum(dim=1)
        rows = (left > 0).nonzero().squeeze(1)
        if rows.numel() == 0:
            return x, calls
        share = left.double() / n0
        t = time_of(share) if time_of is not None else share
        mr = masked[rows]
        # one copy of the masked rows' logits (whole_batch: the rows without a mask have none in masked)
        lm = logits_fn(x, t)[masked] if whole_batch else logits_fn(x[rows], t[rows])[mr]
        calls += 1
        drawn = draw(lm, generator, **draw_opts)
        conf = torch.full(mr.shape, float("-inf"), dtype=torch.float64, device=x.device)
        conf[mr] = drawn_probability(lm, drawn, **draw_opts)
        del lm  # before the next call
        commit = mr & (conf >= threshold)
        commit[torch.arange(rows.numel(), device=x.device), conf.argmax(dim=1)] = True  # a masked one: conf > -inf
        tokens = torch.full_like(mr, mask_id, dtype=x.dtype)
        tokens[mr] = drawn
        x[rows] = torch.where(commit, tokens, x[rows])
        if callback is not None:
            callback(x, t[rows])


def remask_decode(logits_fn, x, times, alpha, mask_id, generator=None, callback=None, eta=0.02, **draw_opts):
    """ReMDM-cap (Wang et al. 2025): the ancestral sampler on the grid `times` (descending, from 1 to 0: S calls),
    except that a generated token may be masked again, so a later step can redraw it. From t to s, with
    a_t = alpha(t) and sigma = min(eta, (1 - a_s) / a_t):
        a masked position unmasks w.p. (a_s - (1 - sigma) a_t) / (1 - a_t), to a draw from p(x_0 | x_t);
        a generated position is masked again w.p. sigma.
    Each position is still masked w.p. 1 - a_s after the step (as under q(x_s | x_0)), so a model trained on
    the forward process needs no retraining; sigma = 0 is the ancestral sampler, and the last step (a_s = 1)
    unmasks everything. The network is called at every step (tokens can change). Given tokens never change.
    Returns (x, network calls)."""
    x = x.clone()
    generated = x == mask_id
    calls = 0
    for t, s in zip(times[:-1], times[1:]):
        a_t, a_s = float(alpha(t)), float(alpha(s))
        sigma = min(eta, (1 - a_s) / a_t) if a_t > 0 else eta
        masked = x == mask_id
        logits = logits_fn(x, torch.full((x.shape[0],), float(t), dtype=torch.float64, device=x.device))
        calls += 1
        u = torch.rand(x.shape, dtype=torch.float64, device=x.device, generator=generator)
        unmask = masked & (u < (a_s - (1 - sigma) * a_t) / (1 - a_t))
        remask = generated & ~masked & (u < sigma)
        logits = logits[unmask]  # one copy: the network's output is freed
        tokens = torch.full_like(x, mask_id)
        tokens[unmask] = draw(logits, generator, **draw_opts)
        del logits  # before the next call
        x = torch.where(unmask, tokens, torch.where(remask, torch.full_like(x, mask_id), x))
        if callback is not None:
            callback(x, t)
    return x, calls


def generate_long(sample_fn, prefix, length, window, keep, mask_id, stop_id=None):
    """Generate `length` tokens per row after `prefix` (B, P) with a model of window length `window`:
    each window is [the last `keep` tokens so far, masks...] (the first window: the prefix, then masks),
    sample_fn fills its masks, and its new tokens are appended. stop_id: stop early once every row has
    produced it. Returns ((B, P + length) ids, network calls, list of window starts)."""
    if not 0 <= keep < window:
        raise ValueError(f"keep ({keep}) must be smaller than the window ({window})")
    out, calls, starts = prefix, 0, []
    while out.shape[1] - prefix.shape[1] < length:
        generated = out.shape[1] - prefix.shape[1]
        first = max(0, out.shape[1] - (window - 1)) if generated == 0 else out.shape[1] - keep
        ctx = out[:, first:]
        n_new = min(window - ctx.shape[1], length - generated)
        x = torch.cat([ctx, torch.full((out.shape[0], n_new), mask_id, dtype=out.dtype, device=out.device)], dim=1)
        starts.append(first)
        filled, c = sample_fn(x)
        calls += c
        out = torch.cat([out, filled[:, ctx.shape[1]:]], dim=1)
        if stop_id is not None and (out[:, prefix.shape[1]:] == stop_id).any(dim=1).all():
            break
    return out, calls, starts


def answer_prompts(sample_fn, prompts, seq_len, mask_id, eoa_id, batch_size, progress=None, guide=None):
    """Answer prompts (lists of ids) with a model trained on pair rows of seq_len (data/prepare_pairs.py): each row is
    [prompt, mask_id ...], filled by sample_fn(x) -> (x, network calls), its answer the ids after the prompt up to the
    first eoa_id. Rows go batch_size at a time, prompts of one length together (an autoregressive model continues a
    prompt of one length per batch). guide(clean) (optional): a context manager around each batch's sample_fn, given
    its (B, L) prompt mask, that yields the network passes per call of the sampler (guided: 2, counted). Returns [(answer ids, the network calls
    of its batch)] in the prompts' order."""
    for p in prompts:
        if len(p) >= seq_len:
            raise ValueError(f"a prompt of {len(p)} tokens leaves no room for an answer in rows of {seq_len}")
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    batches, answers = [], [None] * len(prompts)
    for i in order:
        if batches and len(batches[-1]) < batch_size and len(prompts[batches[-1][0]]) == len(prompts[i]):
            batches[-1].append(i)
        else:
            batches.append([i])
    for batch in batches:
        n = len(prompts[batch[0]])
        x = torch.tensor([prompts[i] + [mask_id] * (seq_len - n) for i in batch])
        if guide is None:
            filled, calls = sample_fn(x)
        else:
            clean = torch.zeros(x.shape, dtype=torch.bool)
            clean[:, :n] = True
            with guide(clean) as passes:  # guided: 2, a conditional and an unconditional pass per call (w = 0: 1)
                filled, calls = sample_fn(x)
            calls *= passes
        for i, row in zip(batch, filled[:, n:].tolist()):
            answers[i] = (row[:row.index(eoa_id)] if eoa_id in row else row, calls)
        if progress is not None:
            progress.update(len(batch))
    return answers


def step_grid(B, offset, T, device):
    """The N-step bounds' rows (batch_bound with T = N): row i of B at step j_i = 1 + floor((i + offset) T / B) of the
    grid t_j = j / T, stratified by offset in [0, 1). Returns (t, s = t - 1/T), float64 (B,)."""
    i = torch.arange(B, dtype=torch.float64, device=device)
    j = (1 + torch.floor((i + offset) / B * T)).clamp(max=T)
    return j / T, (j - 1) / T


# ---- no prompt, and classifier-free guidance (families.py: null_prompt) -----------------------------------------
def null_prompt(model, x0, clean, generator=None):
    """x0 (B, L) ids with the clean positions replaced by the family's no-prompt input: its null_prompt(x0, clean,
    generator) when it has one (families.py), else mask_id there."""
    if hasattr(model, "null_prompt"):
        return model.null_prompt(x0, clean, generator)
    return x0.masked_fill(clean, model.mask_id)


def input_positions(net, length, row_len, positions=None):
    """The row position each of the network's `length` input positions holds, (length,) long, -1 for none:
    `positions` when the caller passes them; a causal network (the autoregressive model) reads the row shifted right
    by its start token (input j holds row position j - 1); any other input j holds row position j mod row_len
    (block diffusion's training input [x_t, x_0] holds the row twice)."""
    if positions is not None:
        return positions.long()
    j = torch.arange(length)
    if any(getattr(block, "causal", False) for block in getattr(net, "blocks", [])):
        return j - 1
    return j % row_len


def nulled_input(model, x, clean, positions=None, generator=None):
    """The network input x ((B', L') ids, or (B', L', K) probability vectors) with the family's no-prompt input where
    it holds a clean position of the rows (clean (B, L) bool; B' = B, a multiple of B (the batch repeated: genmd4.py's
    two draws), or any B' when every row has the same prompt positions (a sampler's subset of the rows))."""
    B, L = clean.shape
    if x.shape[0] != B:
        if (clean == clean[:1]).all():
            clean = clean[:1].expand(x.shape[0], L)
        elif x.shape[0] % B == 0:
            clean = clean.repeat(x.shape[0] // B, 1)
        else:
            raise ValueError(f"the network was called on {x.shape[0]} rows of a batch of {B} with different prompts")
    pos = input_positions(model.net, x.shape[1], L, positions).to(clean.device)
    held = torch.where(pos >= 0, clean[:, pos.clamp(min=0)], torch.zeros((), dtype=torch.bool, device=clean.device))
    held = held.to(x.device)
    if not x.is_floating_point():
        return null_prompt(model, x, held, generator)
    ids = null_prompt(model, x.argmax(-1), held, generator)  # a soft input: the null tokens one-hot
    return torch.where(held[..., None], torch.nn.functional.one_hot(ids, x.shape[-1]).to(x.dtype), x)


@contextlib.contextmanager
def wrapped_forward(net, make, passes=1):
    """Within: net.forward is make(the current forward); the previous one comes back after, also on an exception.
    Yields passes (the network passes per call)."""
    had, previous = "forward" in net.__dict__, net.__dict__.get("forward")
    net.forward = make(net.forward)
    try:
        yield passes
    finally:
        if had:
            net.forward = previous
        else:
            del net.forward


def null_prompt_input(model, clean, generator=None):
    """Context manager: within, every call of model.net sees the no-prompt input (null_prompt) at the clean positions
    (B, L) of the rows: train.py --cond_drop passes the prompt positions of the dropped rows. The family itself still
    sees the prompt in its own x0: never noised, never scored."""
    def make(forward):
        def forward_without_prompt(x, t, *args, **kwargs):
            return forward(nulled_input(model, x, clean, kwargs.get("positions"), generator), t, *args, **kwargs)
        return forward_without_prompt
    return wrapped_forward(model.net, make)


def guided(model, w, clean, generator=None):
    """Classifier-free guidance (Ho & Salimans 2022; discrete: Nisonoff et al. 2024, Schiff et al. 2025). Context
    manager: within, each call of model.net is two, on its input (c: the prompt) and on nulled_input (no prompt), and
    returns the outputs mixed per position, out_c + w (out_c - out_u) (float32). A family that reads them as logits
    gets log p(x | c) + w (log p(x | c) - log p(x)) up to a constant per position, which its softmax removes:
    p_w(x | c) proportional to p(x | c)^(1 + w) / p(x)^w. SEDD reads them as log scores (log rate ratios): the mix is
    the guided rates R_c^(1 + w) / R_u^w (Nisonoff et al.). w = 0: nothing changes (one call, the network's own output). A call with a KV cache (ar.py, bd3lm.py with cache=True) is a ValueError: the two passes
    would mix their keys in it. clean (B, L) bool: the prompt positions of the rows. Yields the passes per call
    (2; 1 for w = 0)."""
    if not w:
        return contextlib.nullcontext(1)

    def make(forward):
        def guided_forward(x, t, *args, **kwargs):
            if kwargs.get("cache") is not None:
                raise ValueError("--guidance calls the network twice per step and cannot share a KV cache between "
                                 "the two passes: add --no_kv_cache")
            cond = forward(x, t, *args, **kwargs).float()
            uncond = forward(nulled_input(model, x, clean, kwargs.get("positions"), generator), t, *args,
                             **kwargs).float()
            return cond + w * (cond - uncond)
        return guided_forward
    return wrapped_forward(model.net, make, 2)


def sdtt_loss(student_logits, teacher_logits, x_t, times, keep, mask_id, generator=None):
    """SDTT's loss (Deschenaux & Gulcehre 2024) for an absorbing model: the teacher takes ancestral steps from
    x_t (B, L) through times = [t, t - dt, t - 2 dt] (each (B,)), a masked position unmasking from t to s w.p.
    (keep(s) - keep(t)) / (1 - keep(t)) (keep: the clean share alpha) to a draw from the teacher's p(x_0 | .).
    Each masked position's target is the teacher's log p(x_0 | .) at the step where it unmasked, or the last
    step's if it is still masked; the loss is the reverse KL(student || target) of student_logits (B, L, K)
    at x_t, averaged over the masked positions (over the first mask_id classes: the mask logit is -inf)."""
    masked = x_t == mask_id
    target = None
    x = x_t
    with torch.no_grad():
        for t, s in zip(times[:-1], times[1:]):
            log_p = teacher_logits(x, t)[..., :mask_id].float().log_softmax(-1)
            p_unmask = (keep(s) - keep(t)) / (1 - keep(t))
            u = torch.rand(x.shape, dtype=torch.float64, device=x.device, generator=generator)
            unmask = (x == mask_id) & (u < p_unmask[:, None].to(x.device))
            target = log_p if target is None else torch.where((x == mask_id)[..., None], log_p, target)
            x = x.clone()
            x[unmask] = draw(log_p[unmask], generator)
    log_q = student_logits[..., :mask_id].float().log_softmax(-1)[masked]
    kl = (log_q.exp() * (log_q - target[masked])).sum(-1)
    return kl.mean() if kl.numel() else student_logits.sum() * 0
