"""``lowbit bench`` (latency in ONNX Runtime or OpenVINO) and ``lowbit inspect`` (which kernels run in
integers)."""

from __future__ import annotations

from ._common import UserError, existing_file


def _load_onnx(path: str):
    """The ModelProto of ``path`` (weights in external files not loaded); UserError if it is not ONNX."""
    import onnx
    from google.protobuf.message import DecodeError

    existing_file(path, "ONNX file")
    try:
        model = onnx.load(path, load_external_data=False)
    except (DecodeError, ValueError, RuntimeError) as exc:
        raise UserError(f"{path} is not an ONNX model ({exc})") from None
    if not model.graph.output:  # protobuf parses many byte strings as an empty message
        raise UserError(f"{path} is not an ONNX model (no graph outputs)")
    return model


def bench_feeds(model, path: str, batch: int, seq_len: int) -> dict:
    """Inputs for one run of the ONNX ``model`` (a ModelProto): symbolic dimension 0 = ``batch``,
    other symbolic ones = ``seq_len``.

    Integer inputs (token ids, masks) are ones, valid in every vocabulary; float ones are N(0, 1).
    """
    import numpy as np
    from onnx.helper import tensor_dtype_to_np_dtype

    rng, feeds = np.random.default_rng(0), {}
    weights = {init.name for init in model.graph.initializer}
    for inp in (i for i in model.graph.input if i.name not in weights):
        tensor = inp.type.tensor_type
        dtype = tensor_dtype_to_np_dtype(tensor.elem_type) if inp.type.HasField("tensor_type") else None
        if dtype is None or dtype.kind not in "fiub":
            raise UserError(f"{path}: input {inp.name!r} is a {dtype or inp.type.WhichOneof('value')}; bench makes up "
                            "float, integer and boolean inputs only")
        shape = []
        for i, d in enumerate(tensor.shape.dim):
            if d.HasField("dim_value"):
                if i == 0 and d.dim_value != batch:
                    raise UserError(f"{path}: input {inp.name!r} has a fixed batch of {d.dim_value}; run it with "
                                    f"--batch {d.dim_value} (or export with a dynamic batch)")
                shape.append(d.dim_value)
            else:
                shape.append(batch if i == 0 else seq_len)
        feeds[inp.name] = rng.standard_normal(shape).astype(dtype) if dtype.kind == "f" else np.ones(shape, dtype)
    return feeds


def _runner(runtime: str, path: str, threads: int):
    if runtime == "openvino":
        from ..runtime.openvino import OpenVINOModel

        return OpenVINOModel(path, threads=threads)
    from ..runtime.ort import OrtModel

    return OrtModel(path, threads=threads)


def _symbolic(model) -> bool:
    """True when an input has a symbolic dimension past the batch (a sequence length)."""
    return any(not d.HasField("dim_value") for i in model.graph.input for d in i.type.tensor_type.shape.dim[1:])


def cmd_bench(args) -> int:
    """Median / p90 latency of each file for each thread count and batch size, as a markdown table."""
    from ..runtime.ort import measure_latency

    models = {path: _load_onnx(path) for path in args.models}  # a clear error before any timing
    print("| model | runtime | threads | batch | median ms | p90 ms |\n|---|---|---:|---:|---:|---:|")
    for path, proto in models.items():
        for threads in args.threads:
            runner = _runner(args.runtime, path, threads)
            for batch in args.batch:
                stats = measure_latency(runner, bench_feeds(proto, path, batch, args.seq_len), runs=args.runs,
                                        batch=batch)
                print(f"| {path} | {args.runtime} | {threads} | {batch} | {stats.median_ms:.3f} | {stats.p90_ms:.3f} |")
    if any(_symbolic(m) for m in models.values()):
        print(f"\nsymbolic non-batch dimensions (sequence length) set to --seq-len {args.seq_len}")
    return 0


def cmd_inspect(args) -> int:
    """Print ORT's kernel table for an ONNX file and the target it was made for."""
    from ..export import inspect_onnx
    from ..targets import TARGET_METADATA

    model = _load_onnx(args.model)
    report = inspect_onnx(args.model, level=args.level)
    print(report)
    props = {p.key: p.value for p in model.metadata_props}
    target = props.get(TARGET_METADATA)
    inputs = ", ".join(f"{i.name} [{', '.join(d.dim_param or str(d.dim_value) for d in i.type.tensor_type.shape.dim)}]"
                       for i in model.graph.input)
    print(f"\ninputs: {inputs}")
    print(f"target: {target} ({TARGET_METADATA} metadata)" if target else
          f"target: not recorded (no {TARGET_METADATA} metadata: not made by lowbit, or made before targets)")
    return 0
