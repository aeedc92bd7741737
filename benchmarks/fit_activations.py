"""From the real-shape measurements (benchmarks/real_shapes.json) to the planner's activation table
(src/diffalign/planning/activations.json), and the planner's prediction beside every measured step.

    .venv/bin/python benchmarks/fit_activations.py [--write]   # --write updates activations.json

One configuration per architecture and gradient-checkpointing setting calibrates the bytes per row per unit (the
MaPO LoRA step: CALIBRATION); every other measured configuration (other methods, other row counts, full fine-tuning,
the DPO reference pass, the Self-NPO teacher) is a check of the planner, which predicts it from that coefficient and
its parameter arithmetic. CogVideoX-5b is not measured: its coefficient is 2b's times the ratio of
width x depth (3072 x 42 / 1920 x 30), said so in the table. The half-precision factor comes from
benchmarks/activation_dtype.py (pass --half-factor and --half-source).

The prediction compared with the measured CPU peak is the planner's total at the measured settings (float32, batch 1
pair, the text encoders dropped, the VAE dropped where the benchmark dropped it) plus the measured runtime (the resident
set of the imported libraries, which a GPU's memory does not hold).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from diffalign.planning import memory
from diffalign.planning.architectures import architecture

HERE = Path(__file__).resolve().parent
CALIBRATION = {("sd15", False): "sd15-lora-mapo", ("sd15", True): "sd15-lora-mapo-gc",
               ("sdxl", False): "sdxl-lora-mapo", ("sdxl", True): "sdxl-lora-mapo-gc",
               ("cogvideox-2b", False): "cogvideox-2b-lora-mapo", ("cogvideox-2b", True): "cogvideox-2b-lora-mapo-gc"}
GB = 2 ** 30


def setting_of(r: dict) -> memory.Setting:
    from diffalign.training.methods import get_method

    row = get_method(r["method"])
    from diffalign.training.config import TrainConfig

    keys = row.keys(TrainConfig(method=r["method"]))
    without = ("text_encoders",) if r["keep_vae"] else ("text_encoders", "vae")
    return memory.Setting(architecture(r["arch"]), method=r["method"], train_mode=r["train_mode"], rank=8,
                          gradient_checkpointing=r["gc"], mixed_precision="no", optimizer=r["optimizer"], batch=1,
                          resolution=r["resolution"], frames=r["frames"], needs_reference=row.needs_reference(keys),
                          without=without)


def coefficients(records: dict) -> dict:
    out = {}
    for (arch, gc), name in CALIBRATION.items():
        r = records.get(name)
        if r is None:
            continue
        s = setting_of(r)
        units, _ = memory.units_per_row(s.arch, s.resolution, s.frames)
        rows = memory.ROWS[s.method]
        shape = "x".join(map(str, r["latent_shape"]))
        out.setdefault(arch, {})["checkpointing" if gc else "no_checkpointing"] = {
            "bytes_per_row_unit": round(r["activations"] / (rows * units)),
            "source": f"measured: {name} (float32, CPU, latents {shape}, {rows} rows)"}
    if "cogvideox-2b" in out:
        scale = (3072 * 42) / (1920 * 30)
        out["cogvideox-5b"] = {k: {"bytes_per_row_unit": round(v["bytes_per_row_unit"] * scale),
                                   "source": f"not measured: cogvideox-2b's x {scale:.2f} (width x depth)"}
                               for k, v in out["cogvideox-2b"].items()}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", default=str(HERE / "real_shapes.json"))
    parser.add_argument("--write", action="store_true", help="write planning/activations.json")
    parser.add_argument("--half-factor", type=float, default=None)
    parser.add_argument("--half-source", default=None)
    args = parser.parse_args()
    records = json.loads(Path(args.records).read_text())
    table = json.loads(memory.ACTIVATIONS_FILE.read_text())
    table["architectures"].update(coefficients(records))
    if args.half_factor is not None:
        table["half_precision_factor"] = {"value": args.half_factor, "source": args.half_source or "given"}
    if args.write:
        memory.ACTIVATIONS_FILE.write_text(json.dumps(table, indent=1) + "\n")
    print("| configuration | latents | weights meas / plan | gradients meas / plan | optimizer meas / plan | "
          "activations meas / plan | "
          "step peak meas | planner + runtime | error | calibrates |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    order = ("sd15", "sdxl", "cogvideox-2b")
    for name, r in sorted(records.items(), key=lambda kv: (order.index(kv[1]["arch"]), kv[0])):
        s = setting_of(r)
        p = memory.plan(s, table)
        weights_plan = sum(x.bytes for x in p.lines if x.name.startswith("weights") or x.name in
                           ("DPO reference", "Self-NPO teacher"))
        predicted = p.total + r["runtime_bytes"]
        err = (predicted - r["step_peak"]) / r["step_peak"]
        calib = "yes" if name in CALIBRATION.values() else "no (check)"
        weights = sum(r["weights"].values())
        print(f"| {name} | {'x'.join(map(str, r['latent_shape']))} | {weights / GB:.2f} / {weights_plan / GB:.2f} | "
              f"{r['gradients'] / GB:.3f} / {p.line('gradients') / GB:.3f} | "
              f"{r['optimizer_state'] / GB:.3f} / {p.line('optimizer state') / GB:.3f} | "
              f"{r['activations'] / GB:.2f} / {p.line('activations') / GB:.2f} | {r['step_peak'] / GB:.2f} | "
              f"{predicted / GB:.2f} | {100 * err:+.1f}% | {calib} |")


if __name__ == "__main__":
    main()
