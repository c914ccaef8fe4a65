"""The table of scripts/bench-vs-reference.sh: best of N per part, both sides.

    python reference_table.py --runs 3 --threads 2 OUT_DIR golden real

reads OUT_DIR/<request>/{ours,ref}-<i>.json (seconds per part, "whole" = the
process's wall time measured by the script) and prints a Markdown table:
per request and part, the best (smallest) time of the runs on each side and
ours / reference. Standard library only.
"""

import argparse
import json
import os

PARTS = [
    ("face", "face: photo, MTCNN, crop"),
    ("audio", "audio: features + windows"),
    ("reference", "reference: noise, locator, VAE enc, ref UNet"),
    ("denoising", "denoising"),
    ("decoding", "decoding (ours: incl. video encoding)"),
    ("pipeline", "pipeline (face..decoding)"),
    ("write", "finishing the MP4 (ours: with its sound)"),
    ("write_video", "… reference: the silent MP4"),
    ("write_audio", "… reference: the speech added (moviepy)"),
    ("load", "loading the weights"),
    ("import", "Python imports"),
    ("whole", "**whole process**"),
]

COMPONENTS = [
    ("mtcnn:512", "MTCNN detect, 512² photo"),
    ("mtcnn:884x880", "MTCNN detect, 884x880 photo"),
    ("mtcnn:1342", "MTCNN detect, 1342² photo"),
    ("log_mel_30s", "log-mel of 30 s"),
    ("whisper_tiny_30s", "Whisper-tiny-sized encoder, 30 s"),
]

REQUESTS = {
    "golden": "public golden request (128², 16 frames, 3 steps, cfg 2.5, windows 8/3)",
    "real": "real portrait + speech (128², windows 12/3, 3 steps, cfg 2.5)",
}


def load_runs(folder, side, runs):
    out = []
    for i in range(1, runs + 1):
        path = os.path.join(folder, f"{side}-{i}.json")
        if os.path.exists(path):
            with open(path) as f:
                out.append(json.load(f))
    if not out:
        raise SystemExit(f"no {side}-*.json in {folder}")
    return out


def best(runs, key):
    values = [r[key] for r in runs if key in r]
    return min(values) if values else None


def fmt(v):
    return "–" if v is None else f"{v:.3f}"


def components(folder, threads):
    ours, ref = load_runs(folder, "ours", 1)[0], load_runs(folder, "ref", 1)[0]
    print(f"### components (best of {ours.get('iters')} calls, {threads} threads, seconds)\n")
    print("| part | ours | reference | ours / reference | faces (ours, ref) |")
    print("|---|---|---|---|---|")
    for key, label in COMPONENTS:
        mo, mr = ours.get(key), ref.get(key)
        ratio = f"{mo / mr:.2f}" if mo is not None and mr else "–"
        faces = (f"{ours.get(key + ':faces')}, {ref.get(key + ':faces')}"
                 if key.startswith("mtcnn") else "")
        print(f"| {label} | {fmt(mo)} | {fmt(mr)} | {ratio} | {faces} |")
    print()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--runs", type=int, required=True)
    p.add_argument("--threads", type=int, required=True)
    p.add_argument("out")
    p.add_argument("requests", nargs="+")
    a = p.parse_args()
    for req in a.requests:
        folder = os.path.join(a.out, req)
        if req == "components":
            components(folder, a.threads)
            continue
        ours, ref = load_runs(folder, "ours", a.runs), load_runs(folder, "ref", a.runs)
        o, r = ours[0], ref[0]
        print(f"### {REQUESTS.get(req, req)}\n")
        print(f"{o.get('frames')} frames, {o.get('unet_calls')} UNet calls "
              f"(reference: {r.get('frames')} frames, {r.get('unet_calls')} calls); "
              f"best of {len(ours)} / {len(ref)} runs, {a.threads} threads, seconds\n")
        print("| part | ours | reference | ours / reference | ours, every run |")
        print("|---|---|---|---|---|")
        for key, label in PARTS:
            mo, mr = best(ours, key), best(ref, key)
            ratio = f"{mo / mr:.2f}" if mo is not None and mr else "–"
            every = " ".join(fmt(x.get(key)) for x in ours) if mo is not None else "–"
            print(f"| {label} | {fmt(mo)} | {fmt(mr)} | {ratio} | {every} |")
        print(f"\nreference, every run (whole): {' '.join(fmt(x.get('whole')) for x in ref)}\n")


if __name__ == "__main__":
    main()
