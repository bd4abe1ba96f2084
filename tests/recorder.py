"""
Record what train.py / evaluate.py do, for the tests (tests/test_distributed.py, tests/test_train.py).

As a script, under torchrun or alone (one file per rank in $RECORD_DIR, written after main() returns):

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/recorder.py train ARGS...
    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/recorder.py evaluate ARGS...

In-process: `with recording() as rec: call_main(train, argv)`, then rec.events.

Faults: with CRASH_AFTER=N in the environment, the last rank dies (os._exit(13), as a failed node) in training
step N + 1, before its backward, on torchrun's first attempt only (train.loss_hook replaced by crash_after(N)).

What is recorded (D3PM models):
  train: ("fwd", x0, t_plus_1, x_noisy, ddp_sync) for every q_sample under autograd (one per micro-step;
         ddp_sync: the DDP wrapper's require_backward_grad_sync, False inside no_sync()), ("step", params,
         grads) at each clip_grad_norm_ (the parameters before the optimizer step, the accumulated and
         all-reduced gradients before clipping), and a copy of every last.pt as it is written
         ($RECORD_DIR/last_<iter>.pt, rank 0).
  evaluate: ("bound", x0, offset, generator state before the call, result) for every batch_bound call.
  Both: the names of the threads left in the process after main() returned (gloo's worker threads
  are "pt_gloo_runloop" and "gloo_tcp_loop"; a clean teardown leaves none).
"""
import contextlib
import os
import shutil
import sys
import weakref

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from d3pm import D3PMAbsorbing  # noqa: E402


class Recording:
    def __init__(self):
        self.events = []
        self.ddp = []  # weak references to the DDP wrappers train.py built


def os_threads():
    """Names of this process's OS threads (Linux), [] where /proc is not available."""
    try:
        names = []
        for tid in os.listdir("/proc/self/task"):
            with open(f"/proc/self/task/{tid}/comm") as f:
                names.append(f.read().strip())
        return sorted(names)
    except OSError:
        return []


@contextlib.contextmanager
def recording(record_dir=None):
    """Patch D3PMAbsorbing.q_sample / batch_bound, torch.nn.utils.clip_grad_norm_, DDP and train.atomic_save
    to record into a Recording (yielded); everything is restored on exit."""
    import train
    rec = Recording()
    orig_q_sample, orig_bound = D3PMAbsorbing.q_sample, D3PMAbsorbing.batch_bound
    orig_clip, orig_ddp, orig_save = torch.nn.utils.clip_grad_norm_, torch.nn.parallel.DistributedDataParallel, \
        train.atomic_save

    def q_sample(self, x0, t, generator=None):
        out = orig_q_sample(self, x0, t, generator)
        if torch.is_grad_enabled():
            alive = [r() for r in rec.ddp if r() is not None]
            sync = alive[-1].require_backward_grad_sync if alive else None
            rec.events.append(("fwd", x0.detach().cpu().clone(), t.detach().cpu().clone(), out.detach().cpu().clone(),
                               sync))
        return out

    def batch_bound(self, x0, offset, generator=None, T=None):
        state = generator.get_state().clone() if generator is not None else None
        out = orig_bound(self, x0, offset, generator, T=T)
        rec.events.append(("bound", x0.detach().cpu().clone(), float(offset), state, float(out)))
        return out

    def clip(parameters, *args, **kwargs):
        params = list(parameters)
        rec.events.append(("step", [p.detach().cpu().clone() for p in params],
                           [p.grad.detach().cpu().clone() for p in params]))
        return orig_clip(params, *args, **kwargs)

    class RecordingDDP(orig_ddp):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            rec.ddp.append(weakref.ref(self))  # weak: the wrapper must still be freed at teardown

    def atomic_save(obj, path):
        orig_save(obj, path)
        if record_dir and os.path.basename(path) == "last.pt":
            shutil.copyfile(path, os.path.join(record_dir, f"last_{obj['iter_num']}.pt"))

    D3PMAbsorbing.q_sample, D3PMAbsorbing.batch_bound = q_sample, batch_bound
    torch.nn.utils.clip_grad_norm_ = clip
    torch.nn.parallel.DistributedDataParallel = RecordingDDP
    train.atomic_save = atomic_save
    try:
        yield rec
    finally:
        D3PMAbsorbing.q_sample, D3PMAbsorbing.batch_bound = orig_q_sample, orig_bound
        torch.nn.utils.clip_grad_norm_ = orig_clip
        torch.nn.parallel.DistributedDataParallel = orig_ddp
        train.atomic_save = orig_save


# ---- reading a recording, and what one optimizer step on the union of micro-batches gives --------------
def load_rank(record_dir, rank):
    return torch.load(os.path.join(str(record_dir), f"rank{rank}.pt"), map_location="cpu", weights_only=True)


def split_steps(events):
    """A rank's training events as optimizer steps: [(fwd events of its micro-steps, step event)]."""
    steps, fwds = [], []
    for e in events:
        if e[0] == "fwd":
            fwds.append(e)
        elif e[0] == "step":
            steps.append((fwds, e))
            fwds = []
    return steps


def set_params(model, params):
    with torch.no_grad():
        for p, v in zip(model.parameters(), params):
            p.copy_(v)


def big_batch_gradient(model, params, fwds):
    """The gradient at `params` of the loss of ONE forward pass over all the micro-batches `fwds` at once
    (their sequences, times and masked inputs concatenated): what a single optimizer step on the union
    batch uses. Needs a model without dropout."""
    set_params(model, params)
    x0 = torch.cat([f[1] for f in fwds])
    t = torch.cat([f[2] for f in fwds]) - 1  # q_sample saw t + 1
    x_noisy = torch.cat([f[3] for f in fwds])
    model.q_sample = lambda x, tt, generator=None: x_noisy  # an instance attribute: the class is untouched
    try:
        model.zero_grad(set_to_none=True)
        model(x0, t=t)[1].backward()
    finally:
        del model.q_sample
    return [p.grad.detach().clone() for p in model.parameters()]


def adamw(model, lr=1e-3, weight_decay=0.1, betas=(0.9, 0.98)):
    """AdamW with train.py's parameter groups (decay on >= 2-D parameters), built here independently; its
    state_dict is interchangeable with the checkpoints' optimizer state."""
    params = list(model.parameters())
    return torch.optim.AdamW([dict(params=[p for p in params if p.dim() >= 2], weight_decay=weight_decay),
                              dict(params=[p for p in params if p.dim() < 2], weight_decay=0.0)],
                             lr=lr, betas=betas)


def optimizer_step(model, opt, params, grads, grad_clip=0.1):
    """One clipped AdamW step from `params` with gradient `grads`; returns the new parameters."""
    set_params(model, params)
    for p, g in zip(model.parameters(), grads):
        p.grad = g.clone()
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    opt.step()
    return [p.detach().clone() for p in model.parameters()]


def crash_after(step):
    """A train.loss_hook under which the last rank dies (os._exit(13), a hard crash of one worker) in step
    `step` + 1, on torchrun's first attempt only (TORCHELASTIC_RESTART_COUNT 0); the loss is unchanged."""
    last_rank = int(os.environ.get("RANK", 0)) == int(os.environ.get("WORLD_SIZE", 1)) - 1
    first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"

    def loss_hook(iter_num, loss):
        if iter_num > step and last_rank and first_attempt:
            os._exit(13)
        return loss
    return loss_hook


def main():
    what, argv = sys.argv[1], sys.argv[2:]
    record_dir = os.environ["RECORD_DIR"]
    os.makedirs(record_dir, exist_ok=True)
    rank = os.environ.get("RANK", "single")
    with recording(record_dir) as rec:
        if what == "train":
            import train
            if os.environ.get("CRASH_AFTER"):
                train.loss_hook = crash_after(int(os.environ["CRASH_AFTER"]))
            model = train.main(argv)
            state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        else:
            import evaluate
            result = evaluate.main(argv)
            state = {"result": result}
    torch.save({"events": rec.events, "final": state, "threads": os_threads()},
               os.path.join(record_dir, f"rank{rank}.pt"))


if __name__ == "__main__":
    main()
