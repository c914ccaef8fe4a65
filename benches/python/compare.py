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
    print(f"{'part':<11} {'ours s':>9} {'diffusers s':>12} {'ratio':>7} {'GFLOP':>9} {'ours GFLOP/s':>13} {'max|Δ|':>9}")
    pairs = [(k, k) for k in ("unet", "unet_acc", "ref", "vae_encode", "vae_decode")]
    pairs += [("echo_cfg", "unet"), ("echo_acc", "unet_acc")]
    for ours, base in pairs:
        if ours not in R or base not in P:
            continue
        r, p = R[ours], P[base]
        ratio = r["seconds"] / p["seconds"]
        flops = r.get("flops") or p.get("flops")
        line = f"{ours:<11} {r['seconds']:>9.3f} {p['seconds']:>12.3f} {ratio:>7.2f}"
        line += f" {flops / 1e9:>9.1f} {flops / r['seconds'] / 1e9:>13.1f}" if flops else f" {'':>9} {'':>13}"
        diff = r.get("max_abs_diff")
        line += f" {diff:>9.2e}" if diff is not None else ""
        if ours.startswith("echo"):
            per_flop = (r["seconds"] / r["flops"]) / (p["seconds"] / p["flops"])
            line += f"   vs plain diffusers {base}: x{r['flops'] / p['flops']:.2f} FLOPs, ratio per FLOP {per_flop:.2f}"
        print(line)
    for k in ("unet", "unet_acc", "ref"):
        if k in R and k in P and R[k].get("flops_as_diffusers", R[k].get("flops")):
            mine = R[k].get("flops_as_diffusers", R[k]["flops"])
            print(f"FLOP check {k}: analytic {mine:.6g}, torch FlopCounterMode {P[k]['flops']:.6g}")
    print(f"peak RSS: ours {rs['vm_hwm_bytes'] / 2**30:.2f} GiB, diffusers {py['max_rss_bytes'] / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
