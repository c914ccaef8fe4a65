#!/usr/bin/env bash
# Prints the folders that hold the CUDA runtime libraries the CUDA build needs
# (libcublas/libcudart .so.13, libcurand .so.10, the driver's libcuda.so.1), as
# one colon-separated list for LD_LIBRARY_PATH, on a GPU machine whose python3
# has PyTorch cu130: its site-packages/nvidia/*/lib folders, then the driver
# folders a container may mount outside the default paths. Prints nothing when
# none is found. Used by scripts/gpu-check.sh and scripts/gpu-bench.sh.
set -uo pipefail
libdirs=""
for py in python3 /opt/torch/.venv/bin/python3; do
  command -v "$py" >/dev/null || continue
  site="$("$py" -c 'import os, torch; print(os.path.dirname(os.path.dirname(torch.__file__)))' 2>/dev/null)" || continue
  [ -d "$site/nvidia" ] || continue
  libdirs="$(find -L "$site/nvidia" -maxdepth 3 -type d -name lib -exec sh -c 'ls "$1"/lib*.so* >/dev/null 2>&1 && echo "$1"' _ {} \; | sort | paste -sd: -)"
  break
done
for d in /usr/local/nvidia/lib64 /usr/local/nvidia/lib; do
  [ -e "$d/libcuda.so.1" ] && libdirs="${libdirs:+$libdirs:}$d"
done
printf '%s\n' "$libdirs"
