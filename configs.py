"""
Named configurations. Each function returns (model_cls, model_args, training_args):
model_args are the model class's keyword arguments (stored in checkpoints), training_args
override the globals at the top of train.py. Pick one with `python train.py NAME`.

The masked (mdlm_*), autoregressive (ar_*) and block-diffusion (bd3lm_*) configs use exactly the network, data,
batch, learning-rate schedule and steps of the D3PM config of the same name, so the families are compared at
equal budget. Each family clips gradients as its paper does: the D3PM at 0.1 (nanoDD; its loss is ~30x smaller),
MDLM, BD3-LM, Duo and the autoregressive model at 1.0. Override model arguments on the command line, e.g. `python train.py bd3lm_text8 --block_size=16`.

split_command_line and parse_overrides read the `[CONFIG] [--key=value ...]` command line that train.py and
bench.py share, each value type-checked against the default it replaces.
"""
import inspect

from ar import AR
from bd3lm import BD3LM
from common import UserError
from d3pm import D3PMAbsorbing
from duo import Duo
from genmd4 import GenMD4
from gidd import GIDD
from mdlm import MDLM
from sedd import SEDD


def d3pm_text8():
    """The published text8 model: 12 x 768 DiT, T = 1000, 256 x 256 chars x 4 accumulation steps."""
    model_args = dict(vocab_size=27, n_embed=768, n_heads=12, n_blocks=12, n_cond=128,
                      dropout=0.025, T=1000, lambda_ce=0.05)
    training_args = dict(dataset="text8", batch_size=256, seq_len=256, gradient_accumulation_steps=4,
                         learning_rate=1e-3, min_lr=1e-5, warmup_iters=2_500, max_iters=500_000,
                         weight_decay=0.1, grad_clip=0.1, eval_interval=5_000, eval_iters=500, training_seed=1)
    return D3PMAbsorbing, model_args, training_args


def d3pm_text8_4gpu():
    """d3pm_text8 on 4 GPUs: the same 1024 sequences per step, no accumulation."""
    model_cls, model_args, training_args = d3pm_text8()
    training_args.update(gradient_accumulation_steps=1, eval_iters=125)
    return model_cls, model_args, training_args


def d3pm_openwebtext_8gpu():
    """The published OpenWebText model (GPT-2 BPE), 8 GPUs x 16 x 1024 tokens x 8 accumulation steps."""
    model_args = dict(vocab_size=50257, n_embed=768, n_heads=12, n_blocks=12, n_cond=128,
                      dropout=0.0, T=1000, lambda_ce=0.05)
    training_args = dict(dataset="openwebtext", batch_size=16, seq_len=1024, gradient_accumulation_steps=8,
                         learning_rate=6e-4, min_lr=1e-5, warmup_iters=2_500, max_iters=500_000,
                         weight_decay=0.1, grad_clip=0.1, eval_interval=5_000, eval_iters=400, training_seed=9)
    return D3PMAbsorbing, model_args, training_args


def d3pm_openwebtext_32gpu():
    """d3pm_openwebtext_8gpu on 32 GPUs: same tokens per step with 2 accumulation steps."""
    model_cls, model_args, training_args = d3pm_openwebtext_8gpu()
    training_args.update(gradient_accumulation_steps=2, eval_iters=100)
    return model_cls, model_args, training_args


def d3pm_text8_cpu():
    """A 1M-parameter model that a 2-core laptop trains in about 15 minutes (5500 steps of 32 x 128
    characters) to samples with real words (RESULTS.md: why small and many steps)."""
    model_args = dict(vocab_size=27, n_embed=128, n_heads=2, n_blocks=4, n_cond=64,
                      dropout=0.0, T=1000, lambda_ce=0.05)
    training_args = dict(dataset="text8", batch_size=32, seq_len=128, gradient_accumulation_steps=1,
                         learning_rate=2e-3, min_lr=2e-4, warmup_iters=100, max_iters=5500, beta2=0.99,
                         weight_decay=0.1, grad_clip=0.1, eval_interval=500, eval_iters=20, log_interval=100,
                         ckpt_interval=500, ema_beta=0.99, compile=False, training_seed=1)
    return D3PMAbsorbing, model_args, training_args


def d3pm_owt_cpu():
    """A small GPT-2 BPE model for a laptop CPU, on OpenWebText or any corpus prepared with
    data/prepare_openwebtext.py (--dataset=NAME; the vocabulary comes from the dataset)."""
    model_args = dict(vocab_size=50257, n_embed=128, n_heads=2, n_blocks=4, n_cond=64,
                      dropout=0.0, T=1000, lambda_ce=0.05)
    training_args = dict(dataset="openwebtext", batch_size=8, seq_len=256, gradient_accumulation_steps=1,
                         learning_rate=2e-3, min_lr=2e-4, warmup_iters=50, max_iters=1000, beta2=0.99,
                         weight_decay=0.1, grad_clip=0.1, eval_interval=200, eval_iters=10, log_interval=25,
                         ckpt_interval=200, ema_beta=0.99, compile=False, training_seed=1)
    return D3PMAbsorbing, model_args, training_args


def d3pm_tiny():
    """A toy model for tests and smoke runs: seconds on a CPU."""
    model_args = dict(vocab_size=27, n_embed=32, n_heads=2, n_blocks=1, n_cond=16,
                      dropout=0.1, T=50, lambda_ce=0.05)
    training_args = dict(dataset="text8", batch_size=8, seq_len=32, gradient_accumulation_steps=1,
                         learning_rate=1e-3, min_lr=1e-4, warmup_iters=5, max_iters=20,
                         weight_decay=0.1, grad_clip=0.1, eval_interval=10, eval_iters=2, log_interval=5,
                         compile=False, training_seed=1)
    return D3PMAbsorbing, model_args, training_args



# ---- the other families, at the D3PM configs' sizes and budgets -------------------------------------------
def _network_args(model_args):
    """The DiT's arguments of a D3PM config (everything but the D3PM's own T and lambda_ce)."""
    return {k: v for k, v in model_args.items() if k not in ("T", "lambda_ce")}


def _masked(d3pm_config):
    """MDLM's network and schedule, trained on the unweighted masked cross-entropy (loss_weighting="masked_ce",
    the D3PM's effective weighting, which wins at the laptop budget: RESULTS.md; --loss_weighting=elbo is MDLM's
    own recipe). Evaluation is the NELBO either way."""
    _, model_args, training_args = d3pm_config()
    return MDLM, dict(_network_args(model_args), schedule="linear", time_conditioning=False, antithetic=True,
                      t_eps=1e-3, loss_weighting="masked_ce"), dict(training_args, grad_clip=1.0)


def _block(d3pm_config):
    _, model_args, training_args = d3pm_config()
    return BD3LM, dict(_network_args(model_args), block_size=4, schedule="linear", antithetic=True, t_eps=1e-3,
                       t_min=0.0, t_max=1.0), dict(training_args, grad_clip=1.0)


def _autoregressive(d3pm_config):
    _, model_args, training_args = d3pm_config()
    return AR, _network_args(model_args), dict(training_args, grad_clip=1.0)


def mdlm_text8():
    """Continuous-time masked diffusion (MDLM: linear schedule, no time input, masked-CE training) at d3pm_text8's
    size and budget."""
    return _masked(d3pm_text8)


def mdlm_openwebtext_8gpu():
    """MDLM at d3pm_openwebtext_8gpu's size and budget."""
    return _masked(d3pm_openwebtext_8gpu)


def mdlm_text8_cpu():
    """MDLM with exactly d3pm_text8_cpu's network, data, batch, schedule and steps."""
    return _masked(d3pm_text8_cpu)


def mdlm_tiny():
    """A toy MDLM for tests and smoke runs."""
    return _masked(d3pm_tiny)


def ar_text8():
    """The autoregressive baseline (causal DiT blocks, start token) at d3pm_text8's size and budget."""
    return _autoregressive(d3pm_text8)


def ar_openwebtext_8gpu():
    """The autoregressive baseline at d3pm_openwebtext_8gpu's size and budget."""
    return _autoregressive(d3pm_openwebtext_8gpu)


def ar_text8_cpu():
    """The autoregressive baseline with exactly d3pm_text8_cpu's network, data, batch, schedule and steps."""
    return _autoregressive(d3pm_text8_cpu)


def ar_tiny():
    """A toy autoregressive model for tests and smoke runs."""
    return _autoregressive(d3pm_tiny)


def bd3lm_text8():
    """Block diffusion (BD3-LM), blocks of 4 (8, 16: --block_size=N), at d3pm_text8's size and budget."""
    return _block(d3pm_text8)


def bd3lm_openwebtext_8gpu():
    """Block diffusion, blocks of 4 (8, 16: --block_size=N), at d3pm_openwebtext_8gpu's size and budget."""
    return _block(d3pm_openwebtext_8gpu)


def bd3lm_text8_cpu():
    """Block diffusion with exactly d3pm_text8_cpu's network, data, batch, schedule and steps."""
    return _block(d3pm_text8_cpu)


def bd3lm_tiny():
    """A toy block-diffusion model for tests and smoke runs."""
    return _block(d3pm_tiny)


def _learned(d3pm_config):
    _, model_args, training_args = d3pm_config()
    return GenMD4, dict(_network_args(model_args), time_conditioning=True, antithetic=True, t_eps=1e-3), \
        dict(training_args, grad_clip=1.0)


def genmd4_text8():
    """GenMD4 (masked diffusion with a learned schedule per token, time input) at d3pm_text8's size and budget.
    Each step calls the network on twice the batch (two masks per sequence for the schedule's gradient)."""
    return _learned(d3pm_text8)


def genmd4_text8_cpu():
    """GenMD4 with exactly d3pm_text8_cpu's network, data, batch, schedule and steps."""
    return _learned(d3pm_text8_cpu)


def genmd4_tiny():
    """A toy GenMD4 for tests and smoke runs."""
    return _learned(d3pm_tiny)


def _uniform(d3pm_config, gamma_min, gamma_max):
    """Duo: the curriculum for the first half of the steps, as Duo's OpenWebText run (500k of 1M)."""
    _, model_args, training_args = d3pm_config()
    return Duo, dict(_network_args(model_args), antithetic=True, t_eps=1e-3,
                     curriculum_iters=training_args["max_iters"] // 2, gamma_min=gamma_min, gamma_max=gamma_max,
                     tau=1e-3), dict(training_args, grad_clip=1.0)


# Duo's curriculum range: its OpenWebText script's gamma in [-3.55, -1.85] covers alpha in [0.049, 0.945] under GPT-2's
# 50257 tokens (and its LM1B range the same under BERT's 30522); with text8's 27 tokens that alpha range is
# gamma in [-2.68, 1.59] (duo.gaussian_alpha).
def duo_text8():
    """Uniform-state diffusion with Duo's Gaussian curriculum (--curriculum_iters=0: plain UDLM) at d3pm_text8's
    size and budget."""
    return _uniform(d3pm_text8, -2.68, 1.59)


def duo_openwebtext_8gpu():
    """Duo at d3pm_openwebtext_8gpu's size and budget, with its OpenWebText script's curriculum range."""
    return _uniform(d3pm_openwebtext_8gpu, -3.55, -1.85)


def duo_text8_cpu():
    """Duo with exactly d3pm_text8_cpu's network, data, batch, schedule and steps."""
    return _uniform(d3pm_text8_cpu, -2.68, 1.59)


def duo_tiny():
    """A toy Duo for tests and smoke runs."""
    return _uniform(d3pm_tiny, -2.68, 1.59)


def _score(d3pm_config):
    """SEDD: the absorbing graph, their log-linear noise (eps 1e-3) and score scaling, gradients clipped at 1.0 (their
    recipe). --graph=uniform --scale_by_sigma=false for their uniform graph, --noise=geometric for the geometric noise."""
    _, model_args, training_args = d3pm_config()
    return SEDD, dict(_network_args(model_args), graph="absorb", noise="loglinear", eps=1e-3, sigma_min=1e-4,
                      sigma_max=20.0, scale_by_sigma=True, antithetic=True, t_eps=1e-3), dict(training_args, grad_clip=1.0)


def sedd_text8():
    """SEDD (score entropy, absorbing graph) at d3pm_text8's size and budget."""
    return _score(d3pm_text8)


def sedd_openwebtext_8gpu():
    """SEDD-small as published (louaaron/sedd-small: 768 x 12 blocks, 12 heads, 128 time dims, dropout 0.1, 1024 tokens,
    untied output layer; 512 sequences per step = 8 GPUs x 16 x 4 accumulation, AdamW 3e-4 without weight decay or
    decay of the rate, 2500 warmup steps, 1.3M steps, EMA 0.9999)."""
    model_cls, model_args, training_args = _score(d3pm_openwebtext_8gpu)
    training_args.update(gradient_accumulation_steps=4, learning_rate=3e-4, decay_lr=False, weight_decay=0.0,
                         beta2=0.999, warmup_iters=2500, max_iters=1_300_000, ema_beta=0.9999)
    return model_cls, dict(model_args, dropout=0.1, tied_output=False), training_args


def sedd_text8_cpu():
    """SEDD with exactly d3pm_text8_cpu's network, data, batch, schedule and steps."""
    return _score(d3pm_text8_cpu)


def sedd_tiny():
    """A toy SEDD for tests and smoke runs."""
    return _score(d3pm_tiny)


def _interpolating(d3pm_config, p_uniform=0.0):
    """GIDD: the hybrid process of uniform share p_uniform (--p_uniform=0.1, GIDD's 0.1 / 0.2; 0: masked), its dynamic
    loss weighting and t_eps, gradients clipped at 1.0 (their recipe)."""
    _, model_args, training_args = d3pm_config()
    return GIDD, dict(_network_args(model_args), p_uniform=p_uniform, t_eps=1e-4, loss_weighting="dynamic",
                      min_loss_weight=0.0, max_loss_weight=2.0, antithetic=True), dict(training_args, grad_clip=1.0)


def gidd_text8():
    """GIDD (mask + uniform noise, --p_uniform=P, default 0) at d3pm_text8's size and budget."""
    return _interpolating(d3pm_text8)


def gidd_openwebtext_8gpu():
    """GIDD's published small run (gidd-small-p_unif-*: 768 x 12 blocks, 12 heads, 128 time dims, 512 tokens, 8 GPUs x
    64 rows, 500k steps = 131B tokens, Adam 5e-4, betas (0.9, 0.99), weight decay 0.02, 10k warmup, cosine to a tenth),
    untied output layer as theirs; --p_uniform=0.1 or 0.2 for their hybrid models."""
    model_cls, model_args, training_args = _interpolating(d3pm_openwebtext_8gpu)
    training_args.update(batch_size=64, seq_len=512, gradient_accumulation_steps=1, learning_rate=5e-4, min_lr=5e-5,
                         beta2=0.99, weight_decay=0.02, warmup_iters=10_000, max_iters=500_000)
    return model_cls, dict(model_args, tied_output=False), training_args


def gidd_text8_cpu():
    """GIDD with exactly d3pm_text8_cpu's network, data, batch, schedule and steps (--p_uniform=0.1, 0.2)."""
    return _interpolating(d3pm_text8_cpu)


def gidd_tiny():
    """A toy GIDD for tests and smoke runs (p_uniform 0.1: both kinds of noise)."""
    return _interpolating(d3pm_tiny, p_uniform=0.1)


# ---- conditional tasks: every family on each task of data/tasks.py (data/prepare_pairs.py --task NAME) -------
# <family>_<task>_cpu: the family's _text8_cpu network (1M parameters, the same for every family) at the task's
# budget on one core; <family>_<task>: its _text8 network (GPU size). The row length is the dataset's.
TASK_BUDGETS_CPU = {  # about an hour of one core each (RESULTS.md: conditional generation)
    "path_star": dict(batch_size=32, max_iters=12_000),
    "sudoku": dict(batch_size=32, max_iters=6_000),
    "countdown": dict(batch_size=64, max_iters=6_000),
    "addition": dict(batch_size=64, max_iters=4_000),
}
TASK_BUDGET_GPU = dict(batch_size=256, max_iters=50_000, warmup_iters=1000, eval_interval=2000, ckpt_interval=2000)


def _on_task(config, task, budget):
    def task_config():
        model_cls, model_args, training_args = config()
        training_args = dict(training_args, dataset=task, **{"eval_interval": 1000, "ckpt_interval": 1000, **budget})
        if "curriculum_iters" in model_args:  # Duo: the curriculum for the first half of the steps, as on text
            model_args = dict(model_args, curriculum_iters=training_args["max_iters"] // 2)
        return model_cls, model_args, training_args
    task_config.__doc__ = f"{config.__name__}'s network and recipe on the pairs of data/{task}."
    return task_config


for _config in [f for name, f in list(globals().items()) if name.endswith(("_text8", "_text8_cpu"))]:
    for _task in TASK_BUDGETS_CPU:
        _cpu = _config.__name__.endswith("_cpu")
        _name = _config.__name__.replace("text8", _task)
        globals()[_name] = _on_task(_config, _task, TASK_BUDGETS_CPU[_task] if _cpu else TASK_BUDGET_GPU)
        globals()[_name].__name__ = _name


NAMES = [name for name, f in list(globals().items())
         if inspect.isfunction(f) and f.__module__ == __name__ and not name.startswith("_")]


# ---- the command line of train.py and bench.py (after NAMES: these are not configs) -----------------------
def split_command_line(argv):
    """[CONFIG] [--key=value ...] -> (config name or None, {key: text}); anything else is a one-line UserError."""
    config_name, texts = None, {}
    for arg in argv:
        if arg.startswith("--"):
            key, eq, text = arg[2:].partition("=")
            if not eq:
                raise UserError(f"--{key} needs a value: --{key}=VALUE")
            texts[key] = text
        elif config_name is None:
            if arg not in NAMES:
                raise UserError(f"unknown config {arg!r}; valid: " + ", ".join(NAMES))
            config_name = arg
        else:
            raise UserError(f"unexpected argument {arg!r} (one config name, then --key=value options)")
    return config_name, texts


def parse_value(key, text, default):
    """text as the type of `default` (bool: 1/true/yes/on or 0/false/no/off; int and float may hold _ as in
    1_000), or a one-line UserError."""
    kind = type(default)
    if kind is str:
        return text
    if kind is bool and text.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
        return text.lower() in ("1", "true", "yes", "on")
    if kind in (int, float):
        try:
            return kind(text.replace("_", ""))
        except ValueError:
            pass
    raise UserError(f"--{key}={text}: expected {kind.__name__} (default is {default!r})")


def parse_overrides(texts, defaults):
    """{key: text} -> {key: value}, each text read as the type of defaults[key] (parse_value); a key that is not in
    defaults is a one-line UserError listing the valid ones."""
    for key in texts:
        if key not in defaults:
            raise UserError(f"unknown option --{key}; valid: " + ", ".join(defaults))
    return {key: parse_value(key, text, defaults[key]) for key, text in texts.items()}
