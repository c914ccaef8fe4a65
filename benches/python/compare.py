#!/usr/bin/env python3
"""Prints ours / diffusers ratios from the two JSON files of
scripts/bench-vs-diffusers.sh (stdlib only)."""

import json
import sys


def main():
    py = json.load(open(sys.argv[1]))
    rs = json.load(open(sys.argv[2]))
    P, R = py["results"], rs["results"]
    print(
        f"diffusers {py['diffusers']} / torch {py['torch']} ({py['threads']} threads) vs echomimic-rs "
        f"({rs['threads']} threads); {py['device']} {py['dtype']}, latent {py['latent']}², "
        f"{py['frames']} frames, median of {py['iters']}; load average {py['load_average']:.1f} / "
        f"{rs['load_average']:.1f}"
    )
    print("seconds are medians (min in brackets: on a shared machine the least disturbed run)")
    print(f"{'part':<11} {'ours s':>16} {'diffusers s':>16} {'ratio':>5} {'(min)':>6} {'GFLOP':>7} {'ours GFLOP/s':>12} {'max|Δ|':>9}")
    pairs = [(k, k) for k in ("unet", "unet_acc", "ref", "vae_encode", "vae_decode")]
    pairs += [("echo_cfg", "unet"), ("echo_acc", "unet_acc")]
    for ours, base in pairs:
        if ours not in R or base not in P:
            continue
        r, p = R[ours], P[base]
        ratio = r["seconds"] / p["seconds"]
        rmin, pmin = min(r["times"]), min(p["times"])
        flops = r.get("flops") or p.get("flops")
        line = f"{ours:<11} {r['seconds']:>7.3f} ({rmin:>6.3f}) {p['seconds']:>7.3f} ({pmin:>6.3f}) {ratio:>5.2f} ({rmin / pmin:>4.2f})"
        line += f" {flops / 1e9:>7.1f} {flops / r['seconds'] / 1e9:>12.1f}" if flops else f" {'':>7} {'':>12}"
        diff = r.get("max_abs_diff")
        line += f" {diff:>9.2e}" if diff is not None else ""
        if ours.startswith("echo"):
            per_flop = (r["seconds"] / r["flops"]) / (p["seconds"] / p["flops"])
            per_flop_min = (rmin / r["flops"]) / (pmin / p["flops"])
            line += f"   vs plain diffusers {base}: x{r['flops'] / p['flops']:.2f} FLOPs, ratio per FLOP {per_flop:.2f} ({per_flop_min:.2f})"
        print(line)
    for k in ("unet", "unet_acc", "ref"):
        if k in R and k in P and R[k].get("flops_as_diffusers", R[k].get("flops")):
            mine = R[k].get("flops_as_diffusers", R[k]["flops"])
            print(f"FLOP check {k}: analytic {mine:.6g}, torch FlopCounterMode {P[k]['flops']:.6g}")
    print(f"peak RSS: ours {rs['vm_hwm_bytes'] / 2**30:.2f} GiB, diffusers {py['max_rss_bytes'] / 2**30:.2f} GiB")
    gpu = rs.get("gpu_memory") or {}
    if gpu.get("peak_bytes") is not None or "gpu_max_reserved_bytes" in py:
        def g(b):
            return f"{b / 2**30:.2f} GiB" if b is not None else "?"
        print(
            f"GPU memory: ours peak {g(gpu.get('peak_bytes'))} used on the device (nvidia-smi, "
            f"{g(gpu.get('before_bytes'))} before); diffusers {g(py.get('gpu_max_allocated_bytes'))} "
            f"allocated, {g(py.get('gpu_max_reserved_bytes'))} reserved (torch, without the context)"
        )


if __name__ == "__main__":
    main()
