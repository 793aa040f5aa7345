#!/usr/bin/env bash
# Whole-pipeline figures on the benchmark volume of ../shared/bench/gen_dataset.py:
# initial snapshot, full restore into an empty directory, unchanged snapshot,
# snapshot after the 1% mutation, delta restore into the pre-synced target,
# and the whole final delta (snapshot + delta restore) against `rsync -a`
# on the same change, in the same run.
#
# Usage: benches/snapshot.sh [WORKDIR]
#   GEN_ARGS="--app-mib 600 --app-files 40000 --db-files 4 --db-mib 200"  (the generator's default volume)
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
gen="$here/../shared/bench/gen_dataset.py"
work=${1:-/tmp/ferry-bench}
GEN_ARGS=${GEN_ARGS:-}
command -v rsync >/dev/null || { apt-get update -qq && apt-get install -y -qq rsync >/dev/null; }
cargo build -q --release -p ferry-cli --manifest-path "$here/Cargo.toml"
ferry="$here/target/release/ferry"
mkdir -p "$work" && cd "$work"
if [ ! -d pristine ]; then
  # shellcheck disable=SC2086
  python3 "$gen" build pristine $GEN_ARGS >/dev/null
fi
rm -rf data vault state restored rsync-target
cp -a pristine data
export FERRY_PASSPHRASE=bench XDG_STATE_HOME="$work/state"
"$ferry" vault init vault >/dev/null
size=$(du -sb data | cut -f1)
files=$(find data -type f | wc -l)
sync

row() { # name, json file, time file
  python3 - "$1" "$size" "$2" "$3" <<'PY'
import json, sys
name, size = sys.argv[1], int(sys.argv[2])
try:
    o = json.load(open(sys.argv[3]))
except Exception:
    o = {}
o = {**o.get("snapshot", {}), **o}  # ferry sync nests the snapshot's figures
wall, rss_kb = open(sys.argv[4]).read().split()[-2:]
wall = float(wall)
M = 1e6
print("%-28s %8.2f s %9.1f MB/s %7.0f MiB rss | read %8.1f MB new %8.1f MB uploaded %8.1f MB written %8.1f MB"
      % (name, wall, size / M / max(wall, 1e-9), int(rss_kb) / 1024, o.get("bytes_scanned", 0) / M,
         o.get("bytes_new", 0) / M, o.get("bytes_uploaded", 0) / M, o.get("bytes_written", 0) / M))
PY
}
run() { # name, command...
  local name=$1; shift
  /usr/bin/time -f '%e %M' -o time.out "$@" --json > out.json
  row "$name" out.json time.out
  cp time.out "time.$name" 2>/dev/null || true
}
secs() { awk '{print $1}' "time.$1"; }

echo "volume: $(du -sh data | cut -f1) in $files files; $(nproc) cores; MB/s is of the whole volume"
run "initial snapshot" "$ferry" snapshot data --vault vault --volume bench
run "full restore (empty target)" "$ferry" restore bench restored --vault vault
run "unchanged snapshot" "$ferry" snapshot data --vault vault --volume bench
python3 -c "import json; o = json.load(open('out.json')); print('  unchanged snapshot: %d files in %.3f s = %.0f files/s (key derivation and catalog open excluded), %d bytes read' % (o['files'], o['duration_s'], o['files'] / o['duration_s'], o['bytes_scanned']))"
rsync -a --delete pristine/ rsync-target/          # rsync's pre-sync (untimed)
changed=$(python3 "$gen" mutate data --seed 1 2>&1 >/dev/null | sed -n 's/.*bytes_written.: \([0-9]*\).*/\1/p')
sync
# The final delta: snapshot of the change + restore into the pre-synced
# target, in one command (one key derivation), against rsync -a.
run "final delta (ferry sync)" "$ferry" sync data restored --vault vault --volume bench --delete
cp out.json final.json
/usr/bin/time -f '%e %M' -o time.rsync rsync -a --delete data/ rsync-target/
echo '{}' > out.json; row "rsync -a --delete (same)" out.json time.rsync
python3 - "$(secs 'final delta (ferry sync)')" "$(awk '{print $1}' time.rsync)" "${changed:-0}" final.json <<'PY'
import json, sys
ferry, rs, changed = map(float, sys.argv[1:4])
o = json.load(open(sys.argv[4]))
s, r = o["snapshot"], o["restore"]
print("final delta: ferry %.2f s (snapshot %.2f s: read %.1f MB, new %.1f MB; restore %.2f s: wrote %.1f MB, phases %s), "
      "rsync -a %.2f s; rsync/ferry = %.2f; the mutation wrote %.1f MB (ferry new/changed = %.2f, written/changed = %.2f)"
      % (ferry, s["duration_s"], s["bytes_scanned"] / 1e6, s["bytes_new"] / 1e6, r["duration_s"], r["bytes_written"] / 1e6,
         {k: round(v, 2) for k, v in r["phases"].items()}, rs, rs / max(ferry, 1e-9), changed / 1e6,
         s["bytes_new"] / max(changed, 1), r["bytes_written"] / max(changed, 1)))
PY
diff -r data restored >/dev/null && echo "restored target equals the source" || echo "MISMATCH between data and restored"
echo "vault: $(du -sh vault | cut -f1)"
