"""The export stage: the shipped student as TFLite (float, int8, QAT), TFLite Micro and Android kits, checked
against every device target by measurement."""

from __future__ import annotations

from mskd_tf.context import Context


def _target_checks(ctx: Context, student, rows, micro) -> dict:
    """Each parameter / arena / flash target against the shipped student and its measured int8 model."""
    from mskd_tf import device_targets, flops

    targets = device_targets.Targets.from_config(ctx.cfg)
    int8 = next((r for r in rows if r["kind"] in ("int8_qat", "int8")), None)
    checks = {}
    params_limit = targets.limits(ctx.wd.read_json("teacher.json")["params"]).get("params")
    measured = {"--target_params": (targets.params, params_limit, flops.count(student).params, "parameters"),
                "--target_arena_kb": (targets.arena_kb, targets.arena_kb,
                                      micro and micro["arena_bytes"] / device_targets.KB, "KB"),
                "--target_flash_kb": (targets.flash_kb, targets.flash_kb,
                                      int8 and int8["bytes"] / device_targets.KB, "KB"),
                "--target_latency_ms": (targets.latency_ms, targets.latency_ms,
                                        int8 and int8["latency_ms"].get(targets.latency_threads), "ms")}
    for flag, (given, limit, value, unit) in measured.items():
        if not given:
            continue
        if value is None:  # the export that would measure it was not asked for
            checks[f"{flag}={given:g}"] = {"measured": None, "unit": unit, "margin": None, "met": None}
            continue
        digits = 3 if unit == "ms" else 1
        checks[f"{flag}={given:g}"] = {"measured": round(value, digits), "unit": unit,
                                       "margin": round(limit - value, digits), "met": bool(value <= limit)}
    return checks


def run(ctx: Context):
    from mskd_tf import deploy

    cfg, d = ctx.cfg, ctx.data
    student = ctx.model("student.keras")
    qat = {"train_ds": ctx.train_data(), "teacher": ctx.model("teacher.keras"), "epochs": 1} if cfg.qat else None
    rows = deploy.export_all(
        student, str(ctx.wd / "export"), kinds=cfg.export, representative_ds=ctx.calibration, test_ds=d.test,
        num_calibration=cfg.int8_calibration_samples, class_names=list(d.info.class_names), qat=qat, micro=cfg.micro,
        seed=cfg.seed,
    )
    micro = next((r.get("micro") for r in rows if r.get("micro")), None)
    checks = _target_checks(ctx, student, rows, micro)
    ctx.wd.write_json("export.json", {"exports": rows, "micro": micro, "targets": checks})
    from mskd_tf import report

    print(report.exports_table(rows), flush=True)
    for row in rows:
        if row.get("litert_kernels") == "builtin":
            print(f"export: LiteRT's XNNPACK delegate refused the {row['kind']} model (an int8 layer's scales out of its "
                  "range, e.g. a layer that is zero on every calibration image); its accuracy and times above were "
                  "measured with TFLite's builtin kernels", flush=True)
    for flag, check in checks.items():
        if check["met"] is None:
            print(f"export: {flag} not checked: it needs --export=int8 (and --micro for the arena, --latency_threads "
                  "of 1 or 2 for the latency)", flush=True)
            continue
        verdict = "meets" if check["met"] else "WARNING: misses"
        print(f"export: the shipped int8 student {verdict} {flag}: {check['measured']} {check['unit']} "
              f"measured, {abs(check['margin'])} {check['unit']} {'to spare' if check['met'] else 'over'}", flush=True)
