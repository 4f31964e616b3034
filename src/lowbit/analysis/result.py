"""What a sensitivity analysis found: one row per quantized layer, serialisable.

Every method fills the same shape, so the mixed-precision solver reads any of them:

* ``cost``: the error the layer adds when it gets the analysed choice, in the method's unit
  (``cost_unit``), additive over layers (the solver sums it) and 0 when the layer stays
  float.  Larger = more sensitive.
* ``values``: everything the method measured for the layer, by name (SQNR in dB, metrics,
  the Hessian trace and its confidence interval ...).

    report = lowbit.sensitivity(model, calib, "w4a8", method="sqnr")
    print(report.to_markdown())
    report.save_json("sensitivity.json"); again = SensitivityReport.load_json("sensitivity.json")
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

FORMAT = "lowbit.SensitivityReport"
VERSION = 1


class JsonFile:
    """``save_json`` / ``load_json`` for a result with ``to_dict`` / ``from_dict``."""

    def save_json(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def load_json(cls, path: str | Path):
        return cls.from_dict(json.loads(Path(path).read_text()))


@dataclass
class LayerSensitivity:
    """One layer's row."""

    name: str  # qualified module name
    kind: str  # float layer class, e.g. "Conv2d"
    params: int  # elements of the weight
    weight_bits: int  # the weight's bits under the analysed choice (32: float)
    cost: float  # additive error this layer adds under the choice (see the module docstring)
    values: dict[str, float] = field(default_factory=dict)


@dataclass
class SensitivityReport(JsonFile):
    """Rows in the model's layer order, and how they were measured."""

    method: str  # "sqnr", "ablation" or "hessian"
    choice: str  # the analysed choice's name ("w8a8", "w4a8" ...)
    cost_unit: str  # what ``cost`` measures, in words
    layers: list[LayerSensitivity]
    baseline: dict[str, float] = field(default_factory=dict)  # model-level figures (FP32 metric ...)
    seconds: float = 0.0  # wall time of the analysis
    settings: dict = field(default_factory=dict)  # batches, probes, eval_fn used ...

    def costs(self) -> dict[str, float]:
        """Layer name -> cost."""
        return {row.name: row.cost for row in self.layers}

    def ranked(self) -> list[LayerSensitivity]:
        """Rows, most sensitive (largest cost) first."""
        return sorted(self.layers, key=lambda r: -r.cost if math.isfinite(r.cost) else -math.inf)

    def __getitem__(self, name: str) -> LayerSensitivity:
        for row in self.layers:
            if row.name == name:
                return row
        raise KeyError(f"no layer {name!r} in this sensitivity report")

    # -- files ------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"format": FORMAT, "version": VERSION, **asdict(self)}

    @classmethod
    def from_dict(cls, data: dict) -> SensitivityReport:
        data = dict(data)
        if data.pop("format", None) != FORMAT:
            raise ValueError(f"not a lowbit sensitivity report (missing format: {FORMAT})")
        if data.pop("version", None) != VERSION:
            raise ValueError(f"sensitivity report version is not {VERSION}")
        layers = [LayerSensitivity(**row) for row in data.pop("layers")]
        return cls(layers=layers, **data)

    def to_markdown(self, top: int | None = None) -> str:
        """A table, most sensitive first (``top`` rows, all by default)."""
        rows = self.ranked()[:top] if top else self.ranked()
        keys = sorted({k for r in rows for k in r.values})
        head = ["layer", "kind", "params", "bits", "cost", *keys]
        lines = [f"Sensitivity ({self.method}, {self.choice}); cost = {self.cost_unit}; {self.seconds:.1f} s",
                 "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in rows:
            cells = [r.name, r.kind, str(r.params), str(r.weight_bits), _num(r.cost),
                     *(_num(r.values.get(k)) for k in keys)]
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)


def _num(value) -> str:
    if value is None:
        return ""
    return f"{value:.4g}" if isinstance(value, float) else str(value)
