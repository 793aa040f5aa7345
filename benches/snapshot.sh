#!/usr/bin/env bash
# Whole-pipeline throughput on the benchmark volume from
# ../shared/bench/gen_dataset.py: initial snapshot, unchanged snapshot,
# snapshot after the 1% mutation, full restore into an empty directory.
# Prints one row per operation: wall seconds, MB/s of the volume, peak RSS,
# bytes read, new and uploaded.
#
# Usage: benches/snapshot.sh [WORKDIR]
#   GEN_ARGS="--app-mib 600 --app-files 40000 --db-files 4 --db-mib 200" (the default volume)
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
gen="$here/../shared/bench/gen_dataset.py"
work=${1:-/tmp/ferry-bench}
GEN_ARGS=${GEN_ARGS:-}
cargo build -q --release -p ferry-cli --manifest-path "$here/Cargo.toml"
ferry="$here/target/release/ferry"
mkdir -p "$work" && cd "$work"
if [ ! -d data ]; then
  # shellcheck disable=SC2086
  python3 "$gen" build data $GEN_ARGS
fi
rm -rf vault state restored mutated
export FERRY_PASSPHRASE=bench XDG_STATE_HOME="$work/state"
"$ferry" vault init vault >/dev/null
size=$(du -sb data | cut -f1)
sync

run() { # name, then the command; prints a row
  local name=$1; shift
  /usr/bin/time -f '%e %M' -o time.out "$@" --json > out.json
  python3 - "$name" "$size" out.json time.out <<'PY'
import json, sys
name, size = sys.argv[1], int(sys.argv[2])
o = json.load(open(sys.argv[3]))
wall, rss_kb = open(sys.argv[4]).read().split()[-2:]
wall = float(wall)
M = 1e6
print("%-22s %8.2f s %9.1f MB/s %8.0f MiB rss   read %9.1f MB  new %9.1f MB  uploaded %9.1f MB  written %9.1f MB"
      % (name, wall, size / M / max(wall, 1e-9), int(rss_kb) / 1024, o.get("bytes_scanned", 0) / M,
         o.get("bytes_new", 0) / M, o.get("bytes_uploaded", 0) / M, o.get("bytes_written", 0) / M))
PY
}

echo "volume: $(du -sh data | cut -f1) in $(find data -type f | wc -l) files; $(nproc) cores"
run "initial snapshot" "$ferry" snapshot data --vault vault --volume bench
run "unchanged snapshot" "$ferry" snapshot data --vault vault --volume bench
cp -a data mutated
python3 "$gen" mutate mutated --seed 1
run "snapshot after 1%" "$ferry" snapshot mutated --vault vault --volume bench
run "full restore" "$ferry" restore bench restored --vault vault
echo "vault: $(du -sh vault | cut -f1)"
