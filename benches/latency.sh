#!/usr/bin/env bash
# The final delta over agents as the coordinator moves away: two agents reach
# the coordinator through benches/delay_proxy.py (a loopback proxy that adds
# a round trip), as they would from another region or cloud. For each round
# trip time, ROUNDS rounds of: the 1% mutation, then `ferry sync --from-agent
# a --to-agent b` (the agents' final delta) and an embedded `ferry sync` of
# the same change (no coordinator: the floor). Prints medians and the
# catalog calls of the last round.
#
# Usage: benches/latency.sh [WORKDIR]
#   RTTS="0 10 40" (milliseconds)   ROUNDS=3   GEN_ARGS (as benches/snapshot.sh)
#   FERRY_BIN=path (another build of ferry, to compare two commits; default: this one, built)
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
gen="$here/../shared/bench/gen_dataset.py"
work=${1:-/tmp/ferry-latency}
mkdir -p "$work" && work=$(cd "$work" && pwd)
RTTS=${RTTS:-0 10 40}
ROUNDS=${ROUNDS:-3}
if [ -z "${FERRY_BIN:-}" ]; then
  cargo build -q --release -p ferry-cli --manifest-path "$here/Cargo.toml"
fi
ferry=${FERRY_BIN:-$here/target/release/ferry}
cd "$work"
if [ ! -d pristine ]; then
  # shellcheck disable=SC2086
  python3 "$gen" build pristine ${GEN_ARGS:-} >/dev/null
fi
export FERRY_PASSPHRASE=bench XDG_STATE_HOME="$work/state"
port=47331
pids=()
stop() { kill "${pids[@]}" 2>/dev/null || true; wait "${pids[@]}" 2>/dev/null || true; pids=(); }
trap stop EXIT
echo -e "rtt_ms\tround\tagents_s\tsnapshot_job_s\trestore_job_s\tembedded_s\tsnapshot_calls\trestore_calls" > results.tsv

for rtt in $RTTS; do
  # Moved aside, deleted at the end: deleting 160,000 files slows every file
  # creation for minutes after on ext4 without a journal (benches/snapshot.sh).
  trash="trash.$(date +%s%N)"
  mkdir "$trash"
  for d in data vault catalog.sqlite* agent-* target sync-target state; do
    if [ -e "$d" ]; then mv "$d" "$trash/"; fi
  done
  cp -a pristine data
  "$ferry" vault init vault >/dev/null
  "$ferry" coordinator --listen 127.0.0.1:$port --vault "$work/vault" --catalog "$work/catalog.sqlite" >/dev/null 2>coordinator.log &
  pids+=($!)
  url=http://127.0.0.1:$port
  if [ "$rtt" != 0 ]; then
    python3 "$here/benches/delay_proxy.py" $((port + 1)) $port "$rtt" >/dev/null 2>&1 &
    pids+=($!)
    url=http://127.0.0.1:$((port + 1))
  fi
  sleep 1
  for a in a b; do
    XDG_STATE_HOME="$work/agent-$a" "$ferry" agent --coordinator "$url" --name "$a" --root "$work" >/dev/null 2>"agent-$a.log" &
    pids+=($!)
  done
  sleep 1
  fleet_sync=(env FERRY_COORDINATOR=http://127.0.0.1:$port "$ferry" sync "$work/data" "$work/target" --from-agent a --to-agent b --delete --json)
  # The pre-syncs, untimed.
  "${fleet_sync[@]}" >/dev/null || { echo "ferry sync over agents failed:"; tail -3 agent-*.log; exit 1; }
  "$ferry" sync data sync-target --delete >/dev/null
  for ((r = 1; r <= ROUNDS; r++)); do
    python3 "$gen" mutate data --seed "$r" >/dev/null 2>&1
    sync
    s=$(date +%s.%N); "${fleet_sync[@]}" >fleet.json; e=$(date +%s.%N)
    s2=$(date +%s.%N); "$ferry" sync data sync-target --delete --json >embedded.json; e2=$(date +%s.%N)
    python3 - "$rtt" "$r" "$s" "$e" "$s2" "$e2" >>results.tsv <<'PY'
import json, sys
rtt, r = sys.argv[1], sys.argv[2]
s, e, s2, e2 = map(float, sys.argv[3:7])
y = json.load(open("fleet.json"))
print("\t".join([rtt, r, "%.2f" % (e - s), "%.2f" % y["snapshot"]["duration_s"],
                 "%.2f" % y["restore"]["duration_s"], "%.2f" % (e2 - s2),
                 str(y["snapshot"]["catalog_rpcs"]), str(y["restore"]["catalog_rpcs"])]))
PY
  done
  diff -r --no-dereference data target >/dev/null || { echo "MISMATCH between data and the agents' target at $rtt ms"; exit 1; }
  stop
done

python3 - <<'PY'
import csv, statistics
rows = list(csv.DictReader(open("results.tsv"), delimiter="\t"))
med = lambda rs, k: statistics.median(float(r[k]) for r in rs)
print("%-7s %10s %14s %13s %12s %8s %s" % ("rtt ms", "agents s", "snapshot job", "restore job", "embedded s", "ratio", "catalog calls (snapshot/restore, last round)"))
for rtt in dict.fromkeys(r["rtt_ms"] for r in rows):
    rs = [r for r in rows if r["rtt_ms"] == rtt]
    a, emb = med(rs, "agents_s"), med(rs, "embedded_s")
    print("%-7s %10.2f %14.2f %13.2f %12.2f %7.2fx %s/%s" % (rtt, a, med(rs, "snapshot_job_s"), med(rs, "restore_job_s"), emb, a / emb, rs[-1]["snapshot_calls"], rs[-1]["restore_calls"]))
PY
echo "the agents' target equaled the source after each round trip's last round"
rm -rf trash.*
