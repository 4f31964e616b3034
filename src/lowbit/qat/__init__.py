"""Quantization-aware training: train with fake quantization so the model learns to live with it.

    qmodel = lowbit.prepare_qat(model, "w4a8", calib_data=batches)   # learned scales (LSQ) by default
    sched = lowbit.qat.QATSchedule(qmodel, freeze_bn_after=1000)
    ... your training loop, calling sched.step() after each optimizer step ...
    lowbit.export_onnx(qmodel, "model.onnx", example)                # BN folded, ranges fixed
"""

from .distill import distillation_loss
from .prepare import QATSummary, convert, fuse_conv_bn, prepare_qat
from .schedule import QATSchedule, freeze_bn, freeze_observers

__all__ = [
    "QATSchedule",
    "QATSummary",
    "convert",
    "distillation_loss",
    "freeze_bn",
    "freeze_observers",
    "fuse_conv_bn",
    "prepare_qat",
]
