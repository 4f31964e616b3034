"""Graph-aware passes: the first three on float models before layers are swapped, the last after.

* ``fold_batchnorm``: BatchNorm folded into the Conv / Linear before it.
* ``cross_layer_equalize``: per-channel weight ranges balanced between consecutive layers
  (so per-tensor weight scales work).
* ``quantize_residual_adds``: ``tensor + tensor`` adds routed through ``QuantAdd`` (fx).
* ``quantize_pool_inputs``: a ``QuantStub`` before average pools, so they run in integers (fx).
* ``smooth_quant``: activation outliers moved into the weights (SmoothQuant); returns a ``SmoothReport``.
* ``correct_bias``: after quantization, the mean output error of each layer removed from its bias.
* ``quantize_activation_inputs``: after swapping, an output quantizer on each Conv that feeds SiLU,
  GELU, Hardswish ... so ORT runs it as QLinearConv (``lowbit.ptq.swap_layers`` runs it).
* ``find_float_read_outputs`` / ``add_output_quantizers``: for a target whose integer kernels write
  quantized outputs (TFLite), an output quantizer on each layer whose output anything but a quantizer
  reads, found on a batch (``lowbit.ptq.read_output_quantizers`` runs both).

Each returns ``(model, names of what it changed)`` and edits in place (``quantize_residual_adds``
returns a GraphModule sharing the model's layers).  The graph searches use torch.fx and fall
back to ``nn.Sequential`` containers where a model does not trace; lowbit's quantized layers
and ``QuantAdd`` are opaque to them, so running a pass twice, or in another order, is harmless.
``lowbit.ptq.quantize`` runs them as steps (``lowbit.ptq.steps``: ``FoldBatchNorm``, ``CLE``,
``SmoothQuant``, ``BiasCorrection``, in the order its ``algorithms=`` list gives) and inserts the
residual-add and pool quantizers (``quantize_adds``) as the config's rules say; by hand::

    model = copy.deepcopy(float_model).eval()
    model, _ = fold_batchnorm(model)
    model, _ = cross_layer_equalize(model, relu6_to_relu=True)
    model, _ = quantize_residual_adds(model, UINT8_ACTIVATION)
    qmodel = lowbit.ptq.quantize(model, calib, config)     # (its own passes then find nothing new)
    qmodel, _ = correct_bias(None, qmodel, calib)
"""

from .activations import quantize_activation_inputs
from .bias_correction import correct_bias
from .equalize import cross_layer_equalize
from .fold_bn import fold_batchnorm
from .outputs import add_output_quantizers, find_float_read_outputs
from .pool_inputs import quantize_pool_inputs
from .residual_add import quantize_residual_adds
from .smooth import SmoothReport, smooth_quant

__all__ = ["SmoothReport", "add_output_quantizers", "correct_bias", "cross_layer_equalize", "find_float_read_outputs",
           "fold_batchnorm", "quantize_activation_inputs", "quantize_pool_inputs", "quantize_residual_adds",
           "smooth_quant"]
