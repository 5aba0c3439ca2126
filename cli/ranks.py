"""What each process of ``osq calibrate`` and ``osq eval`` runs: all of it on one device, or one rank's
share under ``--gpus`` / torchrun (module-level functions, so spawned processes can be given them)."""

from __future__ import annotations

from typing import Any

from rich.console import Console

out = Console()  # tables and results
err = Console(stderr=True)  # progress, notes and errors


def calibrate_rank(ctx, model, qcfg, ccfg, target, shown, data, eval_data, checkpoint, augment, resume, ws):
    """One process' share of ``osq calibrate`` (all of it on one device); the first rank prints and
    records the run in the workspace, once its model and images have loaded."""
    from dataclasses import replace

    from osqdeploy import api

    from .progress import CalibrationProgress

    if ctx is not None and ctx.active:
        ccfg = replace(ccfg, device=str(ctx.device))
    main = ctx is None or ctx.is_main
    inputs = api.calibration_inputs(model, ccfg, data=data, eval_data=eval_data, checkpoint=checkpoint, augment=augment)
    loaded, images, views = inputs.loaded, inputs.images, inputs.augmented_views
    if main:
        ws.record_run(target)
        w, a = qcfg.w_bits, qcfg.a_bits
        ranks = f" on {ctx.world} ranks" if ctx is not None and ctx.active else ""
        out.print(f"[bold]osq calibrate[/] {loaded.recipe.name} ({loaded.spec.timm_name}) W{w}A{a}, weights: "
                  f"{source_text(loaded.source)}")
        out.print(f"  {images.shape[0]} calibration images" + (f" ({views} of them augmented views)" if views else "")
                  + f" from {inputs.data_info['calib_dir']}; {ccfg.iters} iters/group, batch {ccfg.batch_size}, "
                  f"seed {ccfg.seed}, device {ccfg.device}{ranks}; run: {shown}", highlight=False)
    with CalibrationProgress(err if main else Console(quiet=True), plan_console=out if main else Console(quiet=True),
                             iters_per_group=ccfg.iters) as callbacks:
        run = api.calibrate(loaded, images, qcfg, ccfg, target, callbacks=callbacks, resume=resume,
                            data_info=inputs.data_info, dist=ctx)
    return run.manifest, int(images.shape[0])


def source_text(source: dict[str, Any]) -> str:
    if "demo" in source:
        acc = source.get("val_top1")
        return "embedded digits demo" + (f" (held-out top-1 {acc:.2f}%)" if isinstance(acc, (int, float)) else "")
    if "checkpoint" in source:
        return f"checkpoint {source['checkpoint']}"
    if "pretrained" in source:
        return "timm pretrained (local cache)"
    return ", ".join(f"{k}={v}" for k, v in source.items()) or "?"


def eval_rank(ctx, run_dir, onnx_path, data, runtime, provider, device, batch_size, limit):
    """One process' shard of ``osq eval``; the first rank returns the gathered report."""
    from osqdeploy import api

    main = ctx is None or ctx.is_main
    report = api.evaluate(run_dir, onnx_path, data=data, runtime=runtime, provider=provider, device=device,
                          batch_size=batch_size, limit=limit, progress=main and out.is_terminal, dist=ctx)
    return report if main else None
