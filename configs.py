"""
Named configurations. Each function returns (model_cls, model_args, training_args):
model_args are the D3PMAbsorbing keyword arguments (stored in checkpoints), training_args
override the globals at the top of train.py. Pick one with `python train.py NAME`.
"""
from d3pm import D3PMAbsorbing


def d3pm_text8():
    """The published text8 model: 12 x 768 DiT, T = 1000, 256 x 256 chars x 4 accumulation steps."""
    model_args = dict(vocab_size=27, n_embed=768, n_heads=12, n_blocks=12, n_cond=128,
                      dropout=0.025, T=1000, lambda_ce=0.05)
    training_args = dict(dataset="text8", batch_size=256, seq_len=256, gradient_accumulation_steps=4,
                         learning_rate=1e-3, min_lr=1e-5, warmup_iters=2_500, max_iters=500_000,
                         weight_decay=0.1, eval_interval=5_000, eval_iters=500, training_seed=1)
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
                         weight_decay=0.1, eval_interval=5_000, eval_iters=400, training_seed=9)
    return D3PMAbsorbing, model_args, training_args


def d3pm_openwebtext_32gpu():
    """d3pm_openwebtext_8gpu on 32 GPUs: same tokens per step with 2 accumulation steps."""
    model_cls, model_args, training_args = d3pm_openwebtext_8gpu()
    training_args.update(gradient_accumulation_steps=2, eval_iters=100)
    return model_cls, model_args, training_args


def d3pm_text8_cpu():
    """A small model that a 2-core laptop trains in about 15 minutes (5500 steps of 32 x 128
    characters, ~25k tokens/s) to samples with real words. Small and many steps beats larger and
    fewer here: at equal wall time a 1M-parameter model was ahead of a 3M one (README)."""
    model_args = dict(vocab_size=27, n_embed=128, n_heads=2, n_blocks=4, n_cond=64,
                      dropout=0.0, T=1000, lambda_ce=0.05)
    training_args = dict(dataset="text8", batch_size=32, seq_len=128, gradient_accumulation_steps=1,
                         learning_rate=2e-3, min_lr=2e-4, warmup_iters=100, max_iters=5500, beta2=0.99,
                         weight_decay=0.1, eval_interval=500, eval_iters=20, log_interval=100,
                         ckpt_interval=500, ema_beta=0.99, compile=False, training_seed=1)
    return D3PMAbsorbing, model_args, training_args


def d3pm_owt_cpu():
    """A small GPT-2 BPE model for a laptop CPU, on OpenWebText or any corpus prepared with
    data/prepare_openwebtext.py (--dataset=NAME; the vocabulary comes from the dataset)."""
    model_args = dict(vocab_size=50257, n_embed=128, n_heads=2, n_blocks=4, n_cond=64,
                      dropout=0.0, T=1000, lambda_ce=0.05)
    training_args = dict(dataset="openwebtext", batch_size=8, seq_len=256, gradient_accumulation_steps=1,
                         learning_rate=2e-3, min_lr=2e-4, warmup_iters=50, max_iters=1000, beta2=0.99,
                         weight_decay=0.1, eval_interval=200, eval_iters=10, log_interval=25,
                         ckpt_interval=200, ema_beta=0.99, compile=False, training_seed=1)
    return D3PMAbsorbing, model_args, training_args


def d3pm_tiny():
    """A toy model for tests and smoke runs: seconds on a CPU."""
    model_args = dict(vocab_size=27, n_embed=32, n_heads=2, n_blocks=1, n_cond=16,
                      dropout=0.1, T=50, lambda_ce=0.05)
    training_args = dict(dataset="text8", batch_size=8, seq_len=32, gradient_accumulation_steps=1,
                         learning_rate=1e-3, min_lr=1e-4, warmup_iters=5, max_iters=20,
                         weight_decay=0.1, eval_interval=10, eval_iters=2, log_interval=5,
                         compile=False, training_seed=1)
    return D3PMAbsorbing, model_args, training_args

