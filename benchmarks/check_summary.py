"""The GPU check's figures side by side, from its results.jsonl (`device_check.sh` prints this
last, so the device tool's output tail holds it).

    python benchmarks/check_summary.py out/device_check/results.jsonl
"""

from __future__ import annotations

import json
import sys

MEMBERS = ("kandinsky3", "kandinsky3-flash", "kandinsky2.2")
PEERS = ("diffusers", "diffusers-best")


def load(path: str) -> list[dict]:
    records = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:
                    records.append({"unreadable": line[:200]})
    return records


def mfu(flops: float | None, batch: int, seconds: float, peak: float | None) -> str:
    if not flops or not peak or not seconds:
        return "-"
    return f"{100 * flops * batch / seconds / (peak * 1e12):.1f}%"


def images(records: list[dict]) -> list[str]:
    flops, peak = {}, None
    for r in records:
        if r.get("event") == "setup":
            flops.update(r.get("flops_per_image") or {})
            peak = r.get("peak_tflops") or peak
    results = [r for r in records if r.get("bench") == "gpu_bench" and r.get("impl")]
    if not results:
        return []
    lines = [
        f"{'member':<17} {'impl':<16} {'img/s':>7} {'s/batch':>8} {'unet s':>7} "
        f"{'decode s':>8} {'MFU img':>7} {'1st call s':>10} {'vs diffusers':>12} {'vs best':>8}"
    ]
    for member in MEMBERS:
        by = {r["impl"]: r for r in results if r["member"] == member}
        for impl, r in by.items():
            f = (flops.get(member) or {}).get("image")
            ratios = [
                f"{r['images_per_second'] / by[p]['images_per_second']:.2f}x" if p in by else "-"
                for p in PEERS
            ]
            first = r.get("first_call_s")
            lines.append(
                f"{member:<17} {impl:<16} {r['images_per_second']:>7.3f} {r['seconds']:>8.3f} "
                f"{r['unet'] or 0:>7.3f} {r['decode'] or 0:>8.3f} "
                f"{mfu(f, r['batch'], r['seconds'], peak):>7} "
                f"{'-' if first is None else f'{first:.1f}':>10} {ratios[0]:>12} {ratios[1]:>8}"
            )
    return lines


def compiles(records: list[dict]) -> list[str]:
    rows = [r for r in records if "compile_s" in r or ("variant" in r and "error" in r)]
    lines = []
    for r in rows:
        if "error" in r:
            lines.append(f"  {r['step']:<9} {r['variant']:<26} failed: {r['error'][:120]}")
            continue
        b = r.get("blocks") or {}
        lines.append(
            f"  {r['step']:<9} {r['variant']:<26} {r.get('cache', ''):<9} compile "
            f"{r['compile_s']:>6.1f} s, {r.get('eager_ms')} -> {r['compiled_ms']} ms/step "
            f"({r.get('speedup')}x), blocks {b.get('compiled')}/{b.get('blocks')} compiled, "
            f"{b.get('eager')} eager, {b.get('graphs')} graphs, "
            f"{r.get('recompiles_at_another_timestep')} recompiles"
        )
    return ["compile (UNet, per step at the UNet batch):", *lines] if lines else []


def others(records: list[dict]) -> list[str]:
    lines = []
    for r in records:
        if r.get("step") == "profile" and "groups_share" in r:
            shares = ", ".join(f"{k} {100 * v:.0f}%" for k, v in r["groups_share"].items())
            lines.append(f"profile {r['model']}: {r['ms_per_call']:.1f} ms ({shares})")
        elif r.get("variant") == "fp8_eager":
            lines.append(
                f"fp8 eager: {r['eager_ms']} ms/step ({r['vs_bf16_eager']}x bf16 eager), "
                f"{r['fp8_gemms']} GEMMs, eps rel. error vs bf16 {r['eps_rel_error_vs_bf16_t999']:.3g}"
            )
        elif r.get("bench") == "precision_drift":
            psnr = ", ".join(f"{p:.1f}" for p in r["psnr_db"])
            lines.append(f"drift {r['variant']} vs {r['vs']}: PSNR {psnr} dB")
        elif "ms_per_decode" in r:
            tag = " compiled" if r["compiled"] else ""
            lines.append(
                f"decode {r['attention']}{tag}: {r['ms_per_decode']} ms per {r['latents']} latents"
            )
        elif "ms_per_row_step" in r:
            lines.append(f"batch {r['rows']} rows: {r['ms_per_row_step']} ms per row and step")
        elif r.get("event") == "superres":
            for run in r.get("runs", []):
                tag = " compiled" if run.get("compiled") else ""
                lines.append(
                    f"superres x4 {run['max_tiles_per_call']} tiles/call{tag}: "
                    f"{run['seconds']:.2f} s/image"
                )
        elif "artifacts_loaded" in r:
            lines.append(f"artifacts loaded: {r['artifacts_loaded']}")
    return lines


def steps(records: list[dict]) -> list[str]:
    out = []
    for r in records:
        if "rc" in r and "step" in r:
            flag = " TIMED OUT" if r.get("timed_out") else ""
            out.append(f"{r['step']}: rc {r['rc']} in {r['seconds']} s{flag}")
        elif r.get("skipped"):
            out.append(f"{r['step']}: skipped ({r['skipped']})")
    return ["steps: " + "; ".join(out)] if out else []


def main(argv=None) -> None:
    path = (argv or sys.argv[1:])[0]
    records = load(path)
    env = [r for r in records if r.get("step") == "env"]
    print("\n".join(f"{r.get('gpu')}; {r.get('versions')}" for r in env))
    for part in (steps, images, compiles, others):
        lines = part(records)
        if lines:
            print("\n".join(lines))


if __name__ == "__main__":
    main()
