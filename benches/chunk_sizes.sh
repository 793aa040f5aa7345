#!/usr/bin/env bash
# Chunk-size sweep: how many bytes the 1% mutation re-sends (delta) against
# how many chunks (index size) each FastCDC setting makes. The figures and
# the choice they led to are in docs/FORMAT.md, "Chunk size".
# Usage: benches/chunk_sizes.sh [WORKDIR]   (uses target/release/ferry if built, else debug)
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
gen="$here/../shared/bench/gen_dataset.py"
work=${1:-/tmp/ferry-chunk-sizes}
ferry="$here/target/release/ferry"
[ -x "$ferry" ] || { cargo build -q -p ferry-cli --manifest-path "$here/Cargo.toml"; ferry="$here/target/debug/ferry"; }
mkdir -p "$work" && cd "$work"
if [ ! -d base ]; then
  python3 "$gen" build base --app-mib 60 --app-files 3000 --db-files 2 --db-mib 150
  cp -a base mut && python3 "$gen" mutate mut --seed 1
fi
export FERRY_PASSPHRASE=bench XDG_STATE_HOME="$work/state"
for p in "4K 8K 32K" "8K 16K 64K" "16K 32K 128K" "32K 64K 256K" "64K 128K 512K" "256K 1M 4M"; do
  set -- $p
  rm -rf v state
  "$ferry" vault init v --chunk-min "$1" --chunk-avg "$2" --chunk-max "$3" >/dev/null
  a=$("$ferry" snapshot base --vault v --volume d --json)
  b=$("$ferry" snapshot mut --vault v --volume d --json)
  cat_bytes=$(du -sb state | cut -f1)
  python3 - "$a" "$b" "$cat_bytes" "$1/$2/$3" <<'PY'
import json, sys
a, b = json.loads(sys.argv[1]), json.loads(sys.argv[2])
M = 2 ** 20
print("%-14s chunks=%7d base_uploaded=%6.1fMiB delta_new=%6.1fMiB delta_uploaded=%6.1fMiB catalog=%5.1fMiB"
      % (sys.argv[4], a["chunks"], a["bytes_uploaded"] / M, b["bytes_new"] / M, b["bytes_uploaded"] / M, int(sys.argv[3]) / M))
PY
done
