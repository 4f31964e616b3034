"""Quantization-aware training: train with fake quantization so the model learns to live with it.

    qmodel = lowbit.prepare_qat(model, "w4a8", calib_data=batches)   # learned scales (LSQ) by default
    sched = lowbit.qat.QATSchedule(qmodel, freeze_bn_after=1000)
    opt = torch.optim.AdamW(lowbit.qat.param_groups(qmodel, lr=1e-4))  # no decay on learned ranges
    ... your training loop, calling sched.step() after each optimizer step ...
    # or the reference loop: checkpoints, resume, distillation, NaN guard, TensorBoard
    lowbit.qat.fit(qmodel, train_batches, F.cross_entropy, epochs=3, schedule=sched, teacher=model,
                   checkpoint_dir="runs/qat", log_dir="runs/qat/tb")
    lowbit.export_onnx(qmodel, "model.onnx", example)                # BN folded, ranges fixed

Under ``torchrun``: ``lowbit.qat.prepare_ddp(qmodel)`` after prepare_qat, then wrap in DDP with
``broadcast_buffers=False``; observers and BatchNorm statistics agree on every rank
(see ``lowbit.examples.qat_ddp``).

From a PTQ model (round to nearest, GPTQ ...): ``lowbit.qat.from_ptq(qmodel)`` makes its frozen
ranges learnable where PTQ left them; causal LMs get a staged schedule (scales first, then groups
of decoder blocks) and distillation helpers in ``lowbit.qat.llm`` (``llm_schedule``).
"""

from ..nn import convert
from .checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from .distill import distillation_loss
from .distributed import (
    DDPSetup,
    attach_observer_sync,
    detach_sync,
    prepare_ddp,
    replica_mismatches,
    rescale_lsq_gradients,
    sync_batchnorm,
    sync_calibration,
    sync_observers,
)
from .fit import FitResult, fit
from .from_ptq import from_ptq
from .llm import causal_lm_loss, decoder_blocks, llm_frozen, llm_schedule, llm_stages, lm_batches
from .monitor import Monitor
from .optim import param_groups
from .prepare import QATSummary, fuse_conv_bn, prepare_qat
from .schedule import QATSchedule, freeze_bn, freeze_observers

__all__ = [
    "Checkpoint",
    "DDPSetup",
    "FitResult",
    "Monitor",
    "QATSchedule",
    "QATSummary",
    "attach_observer_sync",
    "causal_lm_loss",
    "convert",
    "decoder_blocks",
    "detach_sync",
    "distillation_loss",
    "fit",
    "freeze_bn",
    "freeze_observers",
    "from_ptq",
    "fuse_conv_bn",
    "llm_frozen",
    "llm_schedule",
    "llm_stages",
    "lm_batches",
    "load_checkpoint",
    "param_groups",
    "prepare_ddp",
    "prepare_qat",
    "replica_mismatches",
    "rescale_lsq_gradients",
    "save_checkpoint",
    "sync_batchnorm",
    "sync_calibration",
    "sync_observers",
]
