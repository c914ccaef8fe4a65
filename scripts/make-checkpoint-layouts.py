#!/usr/bin/env python3
"""Makes testdata/checkpoints: small torch.save files whose tensors are stored the ways a real
checkpoint can store them, for the checkpoint reader's tests (echomimic-pipeline/src/weights.rs).

  layouts.pth   one dict: contiguous tensors of every storage dtype torch.save writes for
                float/int weights (float32, float16, bfloat16, float64, int64, uint8), views
                that start inside a shared storage (a row slice, a 1-D slice), transposed
                (Fortran-ordered) tensors with and without such an offset
  strided.pth   one tensor that is neither contiguous nor transposed (every second column)

The values are small integers (exact in every dtype), so a test can write them out by hand.

    python scripts/make-checkpoint-layouts.py      # any torch >= 1.6 (zip format)
"""

from pathlib import Path

import torch

OUT = Path(__file__).resolve().parent.parent / "testdata" / "checkpoints"


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    grid = torch.arange(20, dtype=torch.float32).reshape(4, 5)
    line = torch.arange(10, dtype=torch.float32)
    layouts = {
        "plain": torch.arange(6, dtype=torch.float32).reshape(2, 3),
        "f16": torch.tensor([0.5, -1.25], dtype=torch.float16),
        "bf16": torch.tensor([1.5, -2.0], dtype=torch.bfloat16),
        "f64": torch.tensor([2.25, -8.0], dtype=torch.float64),
        "i64": torch.tensor([-3, 7], dtype=torch.int64),
        "u8": torch.tensor([1, 255], dtype=torch.uint8),
        # views into shared storages: saved with the whole storage and an element offset
        "grid": grid,
        "grid_rows": grid[1:3],
        "line_slice": line[3:7],
        # Fortran order: the transpose of a contiguous block, with and without an offset
        "transposed": torch.arange(6, dtype=torch.float32).reshape(2, 3).t(),
        "grid_rows_t": grid[1:3].t(),
    }
    assert layouts["grid_rows"].storage_offset() == 5
    assert layouts["line_slice"].storage_offset() == 3
    assert layouts["grid_rows_t"].storage_offset() == 5
    torch.save(layouts, OUT / "layouts.pth")
    torch.save({"every_second_column": grid[:, ::2]}, OUT / "strided.pth")
    for name in ("layouts.pth", "strided.pth"):
        print(OUT / name, (OUT / name).stat().st_size, "bytes")


if __name__ == "__main__":
    main()
