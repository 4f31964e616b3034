"""``lowbit bench`` (ONNX Runtime latency) and ``lowbit inspect`` (which kernels run in integers)."""

from __future__ import annotations

from ._common import UserError, existing_file

# ONNX tensor element types -> numpy dtype names, for the inputs bench makes up
_DTYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64",
           "tensor(int64)": "int64", "tensor(int32)": "int32", "tensor(uint8)": "uint8", "tensor(int8)": "int8",
           "tensor(bool)": "bool"}


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


def bench_feeds(session, path: str, batch: int, seq_len: int) -> dict:
    """Inputs for one ORT run: symbolic dimension 0 = ``batch``, other symbolic ones = ``seq_len``.

    Integer inputs (token ids, masks) are ones, valid in every vocabulary; float ones are N(0, 1).
    """
    import numpy as np

    rng, feeds = np.random.default_rng(0), {}
    for inp in session.get_inputs():
        shape = []
        for i, d in enumerate(inp.shape):
            if isinstance(d, int):
                if i == 0 and d != batch:
                    raise UserError(f"{path}: input {inp.name!r} has a fixed batch of {d}; run it with --batch {d}"
                                    " (or export with a dynamic batch)")
                shape.append(d)
            else:
                shape.append(batch if i == 0 else seq_len)
        if inp.type not in _DTYPES:
            raise UserError(f"{path}: input {inp.name!r} is a {inp.type}; bench makes up float and integer inputs only")
        dtype = np.dtype(_DTYPES[inp.type])
        feeds[inp.name] = (rng.standard_normal(shape).astype(dtype) if dtype.kind == "f"
                           else np.ones(shape, dtype))
    return feeds


def cmd_bench(args) -> int:
    """Median / p90 latency of each file for each thread count and batch size, as a markdown table."""
    from ..runtime.ort import OrtModel, measure_latency

    for path in args.models:
        _load_onnx(path)  # a clear error before any timing
    symbolic = False
    print("| model | threads | batch | median ms | p90 ms |\n|---|---:|---:|---:|---:|")
    for path in args.models:
        for threads in args.threads:
            model = OrtModel(path, threads=threads)
            symbolic |= any(not isinstance(d, int) for i in model.session.get_inputs() for d in i.shape[1:])
            for batch in args.batch:
                feeds = bench_feeds(model.session, path, batch, args.seq_len)
                stats = measure_latency(model, feeds, runs=args.runs, batch=batch)
                print(f"| {path} | {threads} | {batch} | {stats.median_ms:.3f} | {stats.p90_ms:.3f} |")
    if symbolic:
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
