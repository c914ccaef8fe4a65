# Sourced by scripts/gpu-check.sh and scripts/gpu-bench.sh with their arguments: prints the
# calling script's header comment for -h/--help (exit 0) or a wrong argument count (exit 2),
# else sets START (epoch seconds), ROOT (the repository) and OUT_DIR (the one argument, made
# and absolute).
if [ $# -ne 1 ] || [ "$1" = -h ] || [ "$1" = --help ]; then
  sed -n '2,/^set -uo/{/^set -uo/d;s/^# \{0,1\}//;p}' "$0"
  [ $# -eq 1 ] && exit 0 || exit 2
fi

START=$(date +%s)
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
OUT_DIR="$1"
mkdir -p "$OUT_DIR" || exit 2
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
