"""The tables ``osq`` prints: pure functions from library results to rich renderables."""

from __future__ import annotations

from typing import Any

from rich.table import Table
from rich.text import Text

GRANULARITY_HELP = [
    ("auto", "Algorithm 1: slices:A-B-C when the model has downsampling layers (Swin), else blocks:3 (ViT/DeiT)"),
    ("blocks:N", "N consecutive whole blocks per reconstruction group"),
    ("slices:A-B-C", "each slice alone: A attention up to the context, B projection + residual, C MLP + residual"),
    ("slices:AB-C", "attention (A+B) together, MLP (C) alone"),
    ("slices:A-BC", "A alone, projection and MLP (B+C) together"),
    ("slices:ABC", "one whole block per group"),
    ("--cross-stage", "let blocks:N groups span Swin stages (default: a group stays within one stage)"),
]


def mib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:.2f} MiB"


def pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def kv_table(title: str, rows: list[tuple[str, str]]) -> Table:
    table = Table(title=title, title_justify="left", show_header=False)
    table.add_column("what")
    table.add_column("value")
    for k, v in rows:
        table.add_row(k, v)
    return table


def export_table(target: str, run: str, info: Any, float_bytes: int | None, batch: int | None, seconds: float) -> Table:
    rows = [
        ("from run", run),
        ("bits", f"W{info.w_bits}A{info.a_bits} (opset {info.opset})"),
        ("size", mib(info.bytes)),
    ]
    if float_bytes:
        rows.append(("float export", f"{mib(float_bytes)} ({float_bytes / info.bytes:.2f}× larger)"))
    rows += [
        ("QDQ pairs", f"{info.qdq_pairs} QuantizeLinear→DequantizeLinear ({info.act_quantizers} act. quantizers)"),
        ("weight initializers", ", ".join(f"{n} {k}" for k, n in sorted(info.weight_initializers.items())) or "-"),
        ("batch", "dynamic" if info.dynamic_batch else str(batch)),
        ("export time", f"{seconds:.1f} s"),
    ]
    return kv_table(f"Exported {target}", rows)


def eval_tables(report: Any, asked: str) -> list[Any]:
    """Accuracy, KL to fp32 and speed per runtime; parity; whether the difference is noise; file sizes."""
    title = "Evaluation" + (f" (W{report.bits[0]}A{report.bits[1]})" if report.bits else "")
    table = Table(title=title, title_justify="left")
    for col in ("runtime", "top-1 %", "top-5 %", "KL to fp32", "images/s"):
        table.add_column(col, justify="left" if col == "runtime" else "right")
    for name, r in report.results.items():
        label = name + (f" ({report.provider.removesuffix('ExecutionProvider')})" if name == "onnxruntime" else "")
        kl = report.kl_to_fp32.get(name)
        table.add_row(
            label + (" *" if name == asked else ""),
            pct(r.top1),
            pct(r.top5),
            "-" if kl is None else f"{kl:.4f}",
            f"{r.images_per_s:,.0f}",
        )
    table.caption = "* the runtime asked for; KL: mean KL(fp32 ‖ runtime) of the predicted class distributions"
    shown: list[Any] = [table]
    if report.fp32_missing:
        shown.append(Text(f"No torch-fp32 reference: {report.fp32_missing}."))
    if report.parity is not None:
        p = report.parity
        pt = Table(title="Parity: torch-quant → onnxruntime", title_justify="left")
        for col in ("top-1 agreement", "KL", "max |Δlogit|", "mean |Δlogit|"):
            pt.add_column(col, justify="right")
        pt.add_row(
            f"{p.top1_agreement:.2f}%",
            f"{p.kl_divergence:.4f}",
            f"{p.max_abs_logit_diff:.3g}",
            f"{p.mean_abs_logit_diff:.3g}",
        )
        shown.append(pt)
    if report.noise is not None:
        shown.append(Text(report.noise.sentence("torch-quant", "onnxruntime", report.n)))
    sizes = {k: v for k, v in (report.extra.get("sizes") or {}).items() if v is not None}
    labels = {"onnx_bytes": "QDQ ONNX", "float_onnx_bytes": "float ONNX", "run_state_bytes": "run state"}
    if sizes:
        st = Table(title="Model files", title_justify="left")
        for k in sizes:
            st.add_column(labels.get(k, k), justify="right")
        st.add_row(*(mib(v) for v in sizes.values()))
        shown.append(st)
    return shown


def list_tables(recipes: list[Any], defaults: Any, recipe_calibration: dict[str, dict[str, int]],
                default_method: str) -> list[Any]:
    from osqdeploy.plan import resolve_spec

    table = Table(title="Model recipes (any timm model name also works)", title_justify="left")
    for col in ("name", "aliases", "timm name", "family", "granularity", "images", "bits"):
        table.add_column(col)
    for r in recipes:
        resolved = resolve_spec(r.granularity, r.family == "swin")
        gran = r.granularity if resolved == r.granularity else f"{r.granularity} → {resolved}"
        pairs = [f"W{w}A{a}" for w, a in r.bit_pairs]
        table.add_row(r.name, ", ".join(r.aliases), r.timm_name, r.family or "-", gran,
                      f"{r.samples or defaults.samples:,}", ", ".join([f"{pairs[0]} (default)", *pairs[1:]]))
    lines = [
        f"Calibration defaults: method {default_method}, {defaults.samples} images, {defaults.iters} iterations per "
        f"group, batch {defaults.batch_size}. Any listed pair: --bits W A (e.g. --bits 4 8, --bits 8 8).",
        "--method paper: the paper's reconstruction on granularity auto and 1,024 images, whatever the recipe says.",
    ]
    lines += [
        f"  {name}: " + ", ".join(f"{v} {k}" for k, v in cal.items()) + " (a quick demonstration; options override)"
        for name, cal in recipe_calibration.items()
    ]
    gt = Table(title="Granularity (--granularity)", title_justify="left")
    gt.add_column("spec")
    gt.add_column("reconstruction groups")
    for spec, text in GRANULARITY_HELP:
        gt.add_row(spec, text)
    return [table, Text("\n".join(lines)), gt]


def _matmul_precision(m: Any) -> str:
    """The arithmetic a run's reconstruction used, from its recorded settings."""
    kind = m.device.split(":")[0]
    mode = m.calibration.autocast_on(kind)
    if mode != "off":
        return mode
    return "TF32" if kind == "cuda" and m.calibration.tf32 else "fp32"


def _time_split(m: Any) -> str:
    """Calibration time and where it went (stages, and the groups' phases summed)."""
    text = f"{m.seconds:.1f} s"
    if m.resumed_from_group:  # the process that finished a resumed run timed only the groups after the resume
        groups = sum(m.phase_totals().values())
        text += f" (resumed after group {m.resumed_from_group - 1}; every group together {groups:.1f} s)"
    if not m.stage_seconds:
        return text
    names = {
        "inputs": "group inputs",
        "first_step": "first steps incl. compilation",
        "steps": "iterations",
        "finish": "hardening",
    }
    inner = ", ".join(f"{names.get(k, k)} {v:.1f}" for k, v in m.phase_totals().items())
    parts = [
        f"{k} {v:.1f}" + (f" ({inner})" if k == "reconstruct" and inner else "") for k, v in m.stage_seconds.items()
    ]
    return f"{text}: " + ", ".join(parts)


def _averaged(c: Any) -> str:
    return f", ending on the average, decay {c.output_tuning_ema:.3g}" if c.output_tuning_ema else ""


def inspect_tables(run: str, m: Any, source: str, progress: str) -> list[Any]:
    from osqdeploy.config import method_of

    from .progress import plan_table, summary_table, tuning_line

    q, c = m.quant, m.calibration
    rows = [
        ("status", m.status.value + progress),
        ("model", f"{m.model.recipe} ({m.model.timm_name}), family {m.family}"),
        ("weights", source),
        (
            "bits",
            f"W{q.w_bits}A{q.a_bits}, patch embedding and head {q.edge_bits}-bit, softmax on a "
            + (f"log{'√2' if q.attn_log_base == 'sqrt2' else '2'} grid" if q.attn_grid == "log" else "uniform grid")
            + f", post-GELU grid {q.post_gelu_grid}",
        ),
        (
            "calibration",
            f"{c.samples} images, {c.iters} iters/group, batch {c.batch_size}, seed {c.seed}, "
            f"device {m.device}, {_matmul_precision(m)} matmuls",
        ),
        ("method", method_of(q, c).value
         + (f", then {c.output_tuning_iters} steps of output tuning ({c.output_tuning}, "
            f"{c.output_tuning_mix} views{_averaged(c)})" if c.output_tuning_iters else "")),
    ]
    if m.seconds is not None:
        rows.append(("calibration time", _time_split(m)))
    if m.output_tuning:
        rows.append(("output tuning", tuning_line(m.output_tuning)))
    if m.output_mse is not None:
        rows.append(("output vs fp32", f"MSE {m.output_mse:.4g}, top-1 agreement {100 * m.output_top1_agreement:.1f}%"))
    rows += [(f"data: {k}", str(v)) for k, v in m.data.items()]
    from osqdeploy.run.manifest import RUN_FORMAT, RUN_FORMAT_VERSION

    rows.append(("format", f"{RUN_FORMAT} v{RUN_FORMAT_VERSION}, osq {m.osq_version}"))
    shown: list[Any] = [kv_table(f"Run {run}", rows)]
    shown.append(summary_table(m.groups) if m.groups else plan_table(m.plan))
    if m.outliers:
        ot = Table(title="Outlier channels of block outputs (calibration images)", title_justify="left")
        for col, justify in (
            ("block", "right"),
            ("top channels", "left"),
            ("max |activation|", "left"),
            ("top / median", "right"),
        ):
            ot.add_column(col, justify=justify)
        for s in m.outliers:
            ot.add_row(
                str(s["block"]),
                ", ".join(map(str, s["channels"])),
                ", ".join(f"{v:.3g}" for v in s["max"]),
                f"{s['ratio_to_median']:.1f}×",
            )
        shown.append(ot)
    return shown


def sensitivity_table(rows: list[Any], data: str) -> Table:
    """Each set of activation quantizers released to float; Δ is released minus quantized, so a
    negative Δ CE is cross-entropy the set costs."""
    st = Table(
        title=f"Activation quantizers switched back to float, one set at a time ({rows[0].n} images of {data}); "
        "sorted by how much releasing the set lowers the cross-entropy (CE)",
        title_justify="left",
    )
    for col in ("in float", "n", "top-1 %", "Δ top-1", "CE", "Δ CE"):
        st.add_column(col, justify="left" if col == "in float" else "right", no_wrap=True)
    for r in rows:
        name = r.released.replace(".input_quantizer", " input").replace("_quantizer", "")
        name = name if r.kind != "baseline" else "(none: the quantized model)"
        st.add_row(
            name,
            str(r.count),
            f"{r.top1:.1f}",
            f"{r.delta_top1:+.1f}",
            f"{r.cross_entropy:.4f}",
            f"{-r.delta_cross_entropy:+.4f}",
        )
    return st
