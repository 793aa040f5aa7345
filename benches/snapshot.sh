#!/usr/bin/env bash
# ferry against restic, borg, rsync and rclone on the same data, in one run.
# Data: the benchmark volume of ../shared/bench/gen_dataset.py and its 1%
# mutation. Operations: initial snapshot; snapshot with nothing changed;
# full restore into an empty directory (ROUNDS rounds, medians); snapshot
# after the 1% mutation;
# the final delta (one `ferry sync` into a target pre-synced by `ferry sync`:
# snapshot + delta restore, what runs in the downtime window) against
# `rsync -a --delete`, `rsync -a --delete --inplace --no-whole-file` and
# `rclone sync` on the same change, each into its own pre-synced copy;
# and the same final delta over a coordinator and two agents on loopback
# (`ferry sync --from-agent a --to-agent b`: the migration's path between
# two nodes; FLEET=0 skips it).
# Full restores also against `cp -a` of the tree (the disk's limit).
# Prints one table: operation, tool, wall s, MB/s (of the whole volume),
# peak RSS, bytes stored/written, and peer/ferry time ratio.
#
# Usage: benches/snapshot.sh [WORKDIR]
#   GEN_ARGS="--app-mib 600 --app-files 40000 --db-files 4 --db-mib 200"  (the generator's default)
#   PEERS="restic borg rsync rclone" (installed with apt-get when missing)
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
gen="$here/../shared/bench/gen_dataset.py"
work=${1:-/tmp/ferry-bench}
mkdir -p "$work" && work=$(cd "$work" && pwd)
GEN_ARGS=${GEN_ARGS:-}
PEERS=${PEERS:-restic borg rsync rclone}
need=()
for p in $PEERS; do
  case $p in borg) command -v borg >/dev/null || need+=(borgbackup) ;; *) command -v "$p" >/dev/null || need+=("$p") ;; esac
done
if [ ${#need[@]} -gt 0 ]; then apt-get update -qq && apt-get install -y -qq "${need[@]}" >/dev/null; fi
has() { [[ " $PEERS " == *" $1 "* ]]; }
cargo build -q --release -p ferry-cli --manifest-path "$here/Cargo.toml"
ferry="$here/target/release/ferry"
mkdir -p "$work" && cd "$work"
if [ ! -d pristine ]; then
  # shellcheck disable=SC2086
  python3 "$gen" build pristine $GEN_ARGS >/dev/null
fi
# ext4 without a journal (this machine's disk) skips the inodes freed in the
# last one to six minutes whenever it creates a file, so deleting a tree
# slows whoever creates files next: `cp -a` of the volume took 23 s a
# minute after 160,000 files were deleted, 4.3 s eight minutes later. So a
# run deletes its outputs after its last timed run; a run that finds some
# (the last run failed) deletes them first, and a run waits until the last
# deletion is seven minutes old.
outputs() {
  for d in data cp-out-* vault state restored restored-* restic-repo restic-out-* borg-repo borg-out-* \
    rsync-target rsync-inplace-target rclone-target sync-target fleet-vault fleet.sqlite* fleet-target \
    agent-a agent-b borg-base restic-cache; do
    if [ -e "$d" ]; then echo "$d"; fi
  done
}
clean() {
  outputs | xargs -r rm -rf
  sync
  date +%s > .deleted-at
}
if [ -n "$(outputs)" ]; then clean; fi
if [ -f .deleted-at ]; then
  left=$(($(cat .deleted-at) + 420 - $(date +%s)))
  if [ "$left" -gt 0 ]; then
    echo "waiting ${left} s: files were deleted here less than 7 minutes ago (ext4 skips freed inodes meanwhile)"
    sleep "$left"
  fi
fi
rm -f results.tsv
cp -a pristine data
export FERRY_PASSPHRASE=bench XDG_STATE_HOME="$work/state" RESTIC_PASSWORD=bench BORG_PASSPHRASE=bench
export BORG_BASE_DIR="$work/borg-base" RESTIC_CACHE_DIR="$work/restic-cache"
"$ferry" vault init vault >/dev/null
has restic && restic init --repo restic-repo -q
has borg && borg init -e repokey borg-repo
size=$(du -sb data | cut -f1)
echo "volume: $(du -sh data | cut -f1) in $(find data -type f | wc -l) files; $(nproc) cores"
sync

dub() { du -sb "$1" | cut -f1; }
# settle: the previous tool's writes on disk (its writeback would stall the
# next tool's fsyncs) and the source in the page cache (by the final delta
# this run has written ~17 GB, and which source pages survive depends on who
# ran last). Every tool starts from the same state.
settle() { sync; find "$work/data" -type f -exec cat {} + > /dev/null; }
# t OP TOOL STORED_CMD -- COMMAND...: times COMMAND, appends a result row.
t() {
  local op=$1 tool=$2 stored=$3; shift 4
  settle
  /usr/bin/time -f '%e %M' -o "$work/time.out" "$@" > "$work/out.txt" 2> "$work/err.txt" || { echo "$tool failed on $op:"; tail -3 "$work/err.txt"; exit 1; }
  read -r wall rss < <(tail -1 "$work/time.out")
  printf '%s\t%s\t%s\t%s\t%s\n' "$op" "$tool" "$wall" "$rss" "$(eval "$stored")" >> "$work/results.tsv"
}
jq_() { python3 -c "import json,sys; o=json.load(open('$work/out.txt')); o={**o.get('snapshot',{}),**o}; print(o.get('$1',0))"; }

t "initial snapshot" ferry "dub vault" -- "$ferry" snapshot data --vault vault --volume bench --json
has restic && t "initial snapshot" restic "dub restic-repo" -- restic backup --repo restic-repo -q data
has borg && t "initial snapshot" borg "dub borg-repo" -- borg create --compression zstd,1 borg-repo::a1 data
t "unchanged snapshot" ferry "jq_ bytes_uploaded" -- "$ferry" snapshot data --vault vault --volume bench --json
python3 -c "import json; o=json.load(open('out.txt')); print('  ferry unchanged snapshot: %d files in %.3f s = %.0f files/s (key derivation and catalog open excluded), %d bytes read' % (o['files'], o['duration_s'], o['files']/o['duration_s'], o['bytes_scanned']))"
has restic && t "unchanged snapshot" restic "echo 0" -- restic backup --repo restic-repo -q data
has borg && t "unchanged snapshot" borg "echo 0" -- borg create --compression zstd,1 borg-repo::a2 data
# Full restores, ROUNDS times in rotating order (the table shows medians);
# `cp -a` of the same tree is the disk's own limit. Each run writes a new
# directory: deleting the previous output first would leave ext4 skipping
# its recently freed inodes while the next tool creates 40,000 files, a
# cost that falls on whoever creates files first. Outputs are deleted at
# the end of the run.
full_restore() {
  local tools=(ferry restic borg cp) n=4 i tool r=$1
  for ((i = 0; i < n; i++)); do
    tool=${tools[$(((i + r) % n))]}
    case $tool in
      ferry) t "full restore" ferry "jq_ bytes_written" -- "$ferry" restore bench "restored-$r" --vault vault --json ;;
      restic) has restic && t "full restore" restic "dub restic-out-$r" -- restic restore latest --repo restic-repo -q --target "restic-out-$r" ;;
      borg) has borg && { mkdir -p "borg-out-$r"; (cd "borg-out-$r" && t "full restore" borg "dub ." -- borg extract "$work/borg-repo::a1"); } ;;
      cp) t "full restore" "cp -a" "dub cp-out-$r" -- cp -a data "cp-out-$r" ;;
    esac
  done
  return 0
}
for ((r = 1; r <= ${ROUNDS:-3}; r++)); do full_restore "$r"; done
sync

# Over agents: a coordinator (its own vault and catalog) and two agents on
# loopback, both rooted at the work directory, each with its own state.
fleet() { [ "${FLEET:-1}" = 1 ]; }
if fleet; then
  "$ferry" vault init fleet-vault >/dev/null
  "$ferry" coordinator --listen 127.0.0.1:47311 --vault "$work/fleet-vault" --catalog "$work/fleet.sqlite" >/dev/null 2>"$work/coordinator.log" &
  fleet_pids=($!)
  trap 'kill "${fleet_pids[@]}" 2>/dev/null || true' EXIT
  sleep 1
  for a in a b; do
    XDG_STATE_HOME="$work/agent-$a" "$ferry" agent --coordinator http://127.0.0.1:47311 --name "$a" --root "$work" >/dev/null 2>"$work/agent-$a.log" &
    fleet_pids+=($!)
  done
  sleep 1
fi
fleet_sync=(env FERRY_COORDINATOR=http://127.0.0.1:47311 "$ferry" sync "$work/data" "$work/fleet-target" --from-agent a --to-agent b --delete)

# Pre-sync the final-delta targets (untimed): ferry sync's own (its default
# vault, under the state directory), the agents' and the peers'; then the 1%
# mutation.
"$ferry" sync data sync-target >/dev/null
if fleet; then "${fleet_sync[@]}" >/dev/null || { echo "ferry sync over agents failed:"; tail -3 agent-*.log; exit 1; }; fi
has rsync && rsync -a --delete pristine/ rsync-target/
has rsync && rsync -a --delete pristine/ rsync-inplace-target/
has rclone && cp -a pristine rclone-target
changed=$(python3 "$gen" mutate data --seed 1 2>&1 >/dev/null | sed -n 's/.*bytes_written.: \([0-9]*\).*/\1/p')
sync
t "snapshot after 1%" ferry "jq_ bytes_uploaded" -- "$ferry" snapshot data --vault vault --volume bench --json
cp out.txt snap1.json
has restic && t "snapshot after 1%" restic "echo 0" -- restic backup --repo restic-repo -q data
has borg && t "snapshot after 1%" borg "echo 0" -- borg create --compression zstd,1 borg-repo::a3 data
# Into the first round's output: its target memory is recorded under that path.
t "delta restore" ferry "jq_ bytes_written" -- "$ferry" restore bench restored-1 --vault vault --delete --json
cp out.txt rest1.json
restored_ok=$(diff -r --no-dereference data restored-1 >/dev/null && echo equals || echo "MISMATCH with")

# The final delta, ROUNDS times (default 3; the table shows medians): each
# round every tool brings its own pre-synced copy up to date, in an order
# that rotates (page cache and writeback favour no one), after a new 1%
# mutation (seed 1 is the one above) and a `sync`.
final_delta() {
  local tools=(ferry ferry-agents rsync rsync-inplace rclone) n=${#tools[@]} i tool
  for ((i = 0; i < n; i++)); do
    tool=${tools[$(((i + $1) % n))]}
    case $tool in
      ferry) t "final delta" ferry "jq_ bytes_written" -- "$ferry" sync data sync-target --delete --json
             [ "$1" = 1 ] && cp out.txt sync1.json ;;
      ferry-agents) fleet && t "final delta" "ferry (agents)" "jq_ bytes_written" -- "${fleet_sync[@]}" --json
                    [ "$1" = 1 ] && fleet && cp out.txt fleet1.json ;;
      rsync) has rsync && t "final delta" rsync "echo 0" -- rsync -a --delete data/ rsync-target/ ;;
      rsync-inplace) has rsync && t "final delta" rsync-inplace "echo 0" -- rsync -a --delete --inplace --no-whole-file data/ rsync-inplace-target/ ;;
      rclone) has rclone && t "final delta" rclone "echo 0" -- rclone sync --links data rclone-target ;;
    esac
  done
  return 0
}
final_delta 1
for ((seed = 2; seed <= ${ROUNDS:-3}; seed++)); do
  python3 "$gen" mutate data --seed "$seed" >/dev/null 2>&1
  final_delta "$seed"
done

# The stage benches, for the machine's limit (STAGES=0 skips them): on
# their synthetic input and on a sample of the benchmark volume itself.
if [ "${STAGES:-1}" = 1 ]; then
  cargo bench -q -p ferry-bench --bench stages --manifest-path "$here/Cargo.toml" -- --noplot >/dev/null 2>&1 || echo "stage benches failed"
  FERRY_STAGE_INPUT="$work/pristine" cargo bench -q -p ferry-bench --bench stages --manifest-path "$here/Cargo.toml" -- --noplot >/dev/null 2>&1 || echo "stage benches (volume sample) failed"
fi

python3 - "$size" "${changed:-0}" "$here/target/criterion" "$(nproc)" <<'PY'
import json, os, sys
size, changed = int(sys.argv[1]), int(sys.argv[2])
criterion_dir, cores = sys.argv[3], int(sys.argv[4])
rows = [l.rstrip("\n").split("\t") for l in open("results.tsv")]
rows = [(op, tool, float(w), int(r), int(float(s or 0))) for op, tool, w, r, s in rows]
# Repeated operations (the final delta): one row per tool, the median wall.
merged = {}
for row in rows:
    merged.setdefault((row[0], row[1]), []).append(row)
rows = []
for (op, tool), rs in merged.items():
    rs.sort(key=lambda x: x[2])
    m = rs[len(rs) // 2]
    rows.append(m)
    if len(rs) > 1:
        print("%s, %s: %s s (the table shows the median)" % (op, tool, " ".join("%.2f" % x[2] for x in rs)))
ferry = {op: w for op, tool, w, r, s in rows if tool == "ferry"}
print("%-20s %-13s %8s %9s %9s %12s %12s" % ("operation", "tool", "wall s", "MB/s", "RSS MiB", "stored/wr MB", "peer/ferry"))
order = ["initial snapshot", "unchanged snapshot", "full restore", "snapshot after 1%", "delta restore", "final delta"]
for op in order:
    for o, tool, w, r, s in rows:
        if o != op:
            continue
        ratio = "" if tool == "ferry" else "%.2f" % (w / ferry[op])
        print("%-20s %-13s %8.2f %9.1f %9.0f %12.1f %12s" % (op, tool, w, size / 1e6 / max(w, 1e-9), r / 1024, s / 1e6, ratio))
s, r, y = json.load(open("snap1.json")), json.load(open("rest1.json")), json.load(open("sync1.json"))
print("the mutation wrote %.1f MB: ferry stored %.1f MB new (%.2fx), wrote %.1f MB into the target (%.2fx); restore phases %s"
      % (changed / 1e6, s["bytes_new"] / 1e6, s["bytes_new"] / max(changed, 1), r["bytes_written"] / 1e6,
         r["bytes_written"] / max(changed, 1), {k: round(v, 2) for k, v in r["phases"].items()}))
print("final delta (one ferry sync): %.2f s, snapshot %.2f s %s, restore %.2f s %s, %.1f MB written"
      % (y["duration_s"], y["snapshot"]["duration_s"], {k: round(v, 2) for k, v in y["snapshot"]["phases"].items()},
         y["restore"]["duration_s"], {k: round(v, 2) for k, v in y["restore"]["phases"].items()}, y["bytes_written"] / 1e6))
# The pipeline's limit on this machine: cores / the sum of the per-byte costs
# of the stages every new byte goes through (criterion's mean per stage),
# on the stages' synthetic input and on the volume's own bytes; ferry's
# fraction is of the latter, the limit for this data.
def rate(group, name):
    try:
        d = os.path.join(criterion_dir, group, name, "new")
        est, bench = json.load(open(os.path.join(d, "estimates.json"))), json.load(open(os.path.join(d, "benchmark.json")))
        return bench["throughput"]["Bytes"] / (est["mean"]["point_estimate"] / 1e9)
    except (OSError, KeyError, ValueError):
        return None
# The snapshot's stages: chunk, hash, compress, encrypt, and store the
# pack (pack_store: the pack finished and put into a local vault, per byte
# of input). The limit without the store stage is printed too.
got = size / ferry["initial snapshot"]
for group, label in [("stage", "synthetic input"), ("stage_volume", "the volume's own bytes")]:
    rates = {n: rate(group, n) for n in ["fastcdc", "blake3_keyed", "zstd_1", "aes256gcm", "pack_store"]}
    if all(rates.values()):
        limit = cores / sum(1 / r for r in rates.values())
        four = cores / sum(1 / r for n, r in rates.items() if n != "pack_store")
        print("stages on %s (MiB/s per core): %s; pipeline limit on %d cores %.0f MiB/s; ferry's initial snapshot %.0f MiB/s = %.0f%% of it (%.0f%% of the limit of the first four stages, %.0f MiB/s)"
              % (label, {n: round(r / 2**20) for n, r in rates.items()}, cores, limit / 2**20, got / 2**20, 100 * got / limit, 100 * got / four, four / 2**20))
PY
echo "ferry's delta restore $restored_ok the source"
diff -r --no-dereference data sync-target >/dev/null && echo "ferry's sync target equals the source" || echo "MISMATCH between data and sync-target"
if fleet; then
  diff -r --no-dereference data fleet-target >/dev/null && echo "the agents' sync target equals the source" || echo "MISMATCH between data and fleet-target"
  python3 -c "
import json; y = json.load(open('fleet1.json'))
print('final delta over agents (round 1): %.2f s, snapshot job %.2f s (%d catalog calls), restore job %.2f s after waiting %.2f s (%d catalog calls)' % (y['duration_s'], y['snapshot']['duration_s'], y['snapshot']['catalog_rpcs'], y['restore']['duration_s'], y['restore'].get('waited_s', 0), y['restore']['catalog_rpcs']))"
fi
# Every output (17 GB), deleted after the last timed run; the next run
# waits for the deletion if it comes within seven minutes.
if fleet; then kill "${fleet_pids[@]}" 2>/dev/null || true; wait "${fleet_pids[@]}" 2>/dev/null || true; fi
clean
