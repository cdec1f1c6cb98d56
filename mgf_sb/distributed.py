"""DDP helpers on top of SpeechBrain's own (torchrun + ``ddp_init_group``).

SpeechBrain converts every BatchNorm to SyncBatchNorm when it wraps modules in
DDP; SyncBatchNorm exists only on GPUs, so CPU runs with the gloo backend (tests,
laptops) would fail. :class:`CPUFriendlyDDP` keeps plain BatchNorm there.
"""

import contextlib
import gc
import logging
import os

import torch

logger = logging.getLogger(__name__)

# Threads of a gloo process group (C++; named by PyTorch / gloo).
GLOO_THREAD_NAMES = ("pt_gloo_runloop", "gloo_tcp_loop")


def import_before_process_group():
    """Imports ``torch.distributed.nn`` *before* the DDP group is created.

    Its functions take ``group=group.WORLD`` as a default argument, evaluated
    when the module is first imported. DDP imports it lazily, after the group
    exists, so ten function defaults would hold the default ProcessGroup for the
    life of the interpreter: ``destroy_process_group`` could then never free it,
    and its gloo threads (``pt_gloo_runloop``, ``gloo_tcp_loop``) lived on into
    interpreter shutdown, where a thread releasing a tensor owned by Python
    needs the GIL that is being torn down (``terminate called without an
    active exception``, SIGABRT after the last epoch, seen under load).
    Imported first, those defaults are ``None`` (the default group, looked up
    at call time).
    """
    import torch.distributed.nn  # noqa: F401


def os_threads():
    """Names of this process's OS threads (Linux ``/proc``; empty elsewhere)."""
    names = []
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return names
    for t in tasks:
        try:
            with open(f"/proc/self/task/{t}/comm") as f:
                names.append(f.read().strip())
        except OSError:  # the thread ended meanwhile
            pass
    return names


def end_process_group():
    """Destroys the DDP process group and joins its threads while Python is alive (idempotent).

    ``destroy_process_group`` only unregisters the group; its gloo worker and
    network threads end when the last reference to it goes (ProcessGroupGloo's
    destructor waits for queued work and joins them). A garbage collection
    frees the references held by reference cycles (the Brain's DDP wrappers),
    so the threads are joined here, deterministically, not during interpreter
    shutdown. Threads still alive afterwards are logged by name.

    Returns
    -------
    list of str
        The gloo threads left (empty after a clean exit).
    """
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return []
    try:
        torch.distributed.destroy_process_group()
    except Exception as e:  # already torn down by a failing peer: nothing left to clean
        logger.debug(f"destroy_process_group: {e}")
    gc.collect()
    left = [n for n in os_threads() if n in GLOO_THREAD_NAMES]
    if left:
        logger.warning(f"the process group's threads outlive it: {left} (a reference to the group is still held)")
    return left


@contextlib.contextmanager
def _no_sync_batchnorm():
    original = torch.nn.SyncBatchNorm.convert_sync_batchnorm
    torch.nn.SyncBatchNorm.convert_sync_batchnorm = classmethod(lambda cls, module, process_group=None: module)
    try:
        yield
    finally:
        torch.nn.SyncBatchNorm.convert_sync_batchnorm = original


class CPUFriendlyDDP:
    """Brain mixin: DDP on CPU (gloo) without the SyncBatchNorm conversion."""

    def _wrap_distributed(self):
        if getattr(self, "distributed_launch", False) and torch.device(self.device).type == "cpu":
            with _no_sync_batchnorm():
                return super()._wrap_distributed()
        return super()._wrap_distributed()


def world_size():
    """Number of DDP processes (1 without DDP)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return 1


def unwrap(module):
    """The module inside a DDP / DataParallel wrapper (the module itself otherwise)."""
    if isinstance(module, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
        return module.module
    return module


def ddp_sum(values):
    """Sums a list of numbers over the DDP processes (unchanged without DDP).

    For statistics of a stage whose data is sharded across processes (the
    training set under torchrun); every process must call it.
    """
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64)
    if torch.distributed.get_backend() == "nccl":
        t = t.cuda()
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
    return t.cpu().tolist()


def rank():
    """This process's DDP rank (0 without DDP)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return 0


def seed_data_stream(seed):
    """Seeds this process's random generators with ``seed + rank``.

    SpeechBrain seeds every DDP process alike (identical initial weights);
    call this *after* the modules are built, so that the random draws of the
    data pipeline (crop positions, views, masks in the collate) differ across
    processes as they differ across the utterances of one process's batch.
    Data-loader workers (``num_workers > 0``) are then seeded by PyTorch from
    this process's generator plus their worker id, so they differ too.

    Returns
    -------
    int
        The seed used.
    """
    from speechbrain.utils.seed import seed_everything

    return seed_everything(int(seed) + rank(), verbose=False)


class _GatherWithGrad(torch.autograd.Function):
    """all_gather of equal-shaped tensors whose backward returns each process its rows' gradient.

    Backward sums the gradient of the gathered tensor over processes (each
    process's loss depends on every process's rows) and keeps the local slice,
    so that, after DDP averages the parameter gradients, the result equals
    the gradient of one process holding the whole batch.
    """

    @staticmethod
    def forward(ctx, x):
        out = [torch.empty_like(x) for _ in range(torch.distributed.get_world_size())]
        torch.distributed.all_gather(out, x.contiguous())
        return torch.stack(out)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        torch.distributed.all_reduce(grad)
        return grad[torch.distributed.get_rank()]


def gather_for_contrast(z, group):
    """Every process's embeddings as contrastive keys (SimCLR / CLIP style).

    Under DDP a contrastive loss over the local batch alone sees 1/N of the
    negatives, so its value (and what it learns) depends on the number of
    processes. The other processes' embeddings are gathered *with* gradient
    (their loss terms reach this process's rows through the backward), so the
    averaged DDP gradient equals the single-process gradient on the global
    batch; the local rows stay the local tensor.

    Arguments
    ---------
    z : torch.Tensor
        (M, D) local embeddings (sizes may differ across processes).
    group : torch.LongTensor
        (M,) local utterance index of each row.

    Returns
    -------
    keys : torch.Tensor
        (sum of M, D).
    key_group : torch.LongTensor
        (sum of M,) utterance indices made unique across processes.
    offset : int
        Row of the local ``z[0]`` in ``keys``.
    """
    n = world_size()
    if n == 1:
        return z, group, 0
    dist = torch.distributed
    me = dist.get_rank()
    sizes = [torch.zeros(2, dtype=torch.long, device=z.device) for _ in range(n)]
    dist.all_gather(sizes, torch.tensor([z.shape[0], int(group.max()) + 1], device=z.device))
    sizes = [tuple(int(v) for v in s) for s in sizes]
    width = max(s[0] for s in sizes)
    pad_z = torch.nn.functional.pad(z, (0, 0, 0, width - z.shape[0]))
    pad_g = torch.zeros(width, dtype=torch.long, device=z.device)
    pad_g[: z.shape[0]] = group
    all_z = _GatherWithGrad.apply(pad_z)  # (n, width, D), differentiable
    all_g = [torch.empty_like(pad_g) for _ in range(n)]
    dist.all_gather(all_g, pad_g)
    keys, key_group, g_offset = [], [], 0
    for r, ((m, n_groups), gr) in enumerate(zip(sizes, all_g)):
        keys.append(z if r == me else all_z[r, :m])
        key_group.append(gr[:m] + g_offset)
        g_offset += n_groups
    offset = sum(s[0] for s in sizes[:me])
    return torch.cat(keys), torch.cat(key_group), offset


class _AllReduceSum(torch.autograd.Function):
    """Sum over processes; the gradient of a sum is the sum of the gradients."""

    @staticmethod
    def forward(ctx, x):
        x = x.clone()
        torch.distributed.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        torch.distributed.all_reduce(grad)
        return grad


class GlobalBatchNorm1d(torch.nn.BatchNorm1d):
    """BatchNorm1d whose batch statistics cover every DDP process, also on CPU.

    On GPUs SpeechBrain converts it to SyncBatchNorm like any BatchNorm; on CPU
    (gloo), where SyncBatchNorm does not exist, it all-reduces the batch sums
    itself (with autograd), so a contrastive head normalised by batch
    statistics behaves as in a single process with the global batch.
    """

    def forward(self, x):
        if not (self.training and world_size() > 1 and x.device.type == "cpu"):
            return super().forward(x)
        C = x.shape[1]
        stats = torch.cat([x.sum(0), (x * x).sum(0), x.new_tensor([x.shape[0]])])
        stats = _AllReduceSum.apply(stats)  # differentiable sum over processes
        n = stats[-1]
        mean = stats[:C] / n
        var = (stats[C : 2 * C] / n - mean * mean).clamp(min=0)
        with torch.no_grad():
            m = self.momentum if self.momentum is not None else 0.1
            self.running_mean.mul_(1 - m).add_(m * mean.detach())
            self.running_var.mul_(1 - m).add_(m * var.detach() * n / (n - 1).clamp(min=1))
            self.num_batches_tracked += 1
        y = (x - mean) / torch.sqrt(var + self.eps)
        return y * self.weight + self.bias if self.affine else y
