#!/usr/bin/env bash
# Prune on a vault of 50 snapshots: time, peak memory, and bytes reclaimed
# against the bytes no snapshot references.
#
#   benches/prune.sh [DIR]      (SNAPSHOTS=50 KEEP=10 APP_MIB=100 DB_MIB=100)
#
# A volume from ../shared/bench/gen_dataset.py is snapshotted, mutated (1%)
# and snapshotted again, SNAPSHOTS times; then all but the last KEEP are
# forgotten and the vault is pruned, then checked with --read-data.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
WORK=${1:-$(mktemp -d /tmp/ferry-prune.XXXXXX)}
SNAPSHOTS=${SNAPSHOTS:-50}
KEEP=${KEEP:-10}
GEN="$ROOT/../shared/bench/gen_dataset.py"
cargo build --release -p ferry-cli >&2
FERRY="$ROOT/target/release/ferry"
export FERRY_PASSPHRASE=bench XDG_STATE_HOME="$WORK/state" FERRY_VAULT="$WORK/vault"
rm -rf "$WORK/vol" "$WORK/vault" "$WORK/state"
python3 "$GEN" build "$WORK/vol" --app-mib "${APP_MIB:-100}" --db-mib "${DB_MIB:-100}" --app-files 2000 >&2
"$FERRY" vault init >/dev/null
for i in $(seq 1 "$SNAPSHOTS"); do
  python3 "$GEN" mutate "$WORK/vol" --seed "$i" 2>/dev/null
  "$FERRY" snapshot "$WORK/vol" --volume bench --json >/dev/null
done
before=$(du -sb "$WORK/vault/packs" | cut -f1)
"$FERRY" forget bench --keep-last "$KEEP" --json >/dev/null
/usr/bin/time -f '%e %M' -o "$WORK/prune.time" "$FERRY" prune --json > "$WORK/prune.json"
after=$(du -sb "$WORK/vault/packs" | cut -f1)
read -r secs rss_kib < "$WORK/prune.time"
/usr/bin/time -f '%e' -o "$WORK/check.time" "$FERRY" vault check --read-data --json > "$WORK/check.json"
python3 - "$WORK" "$before" "$after" "$secs" "$rss_kib" "$SNAPSHOTS" "$KEEP" <<'PY'
import json, sys
work, before, after, secs, rss, n, keep = sys.argv[1:]
p = json.load(open(f"{work}/prune.json"))
c = json.load(open(f"{work}/check.json"))
ct = float(open(f"{work}/check.time").read().split()[0])
before, after = int(before), int(after)
print(f"prune of a vault of {n} snapshots (kept {keep}): {before/1e6:.1f} MB of packs before, {after/1e6:.1f} MB after")
print(f"| figure | value |\n| --- | ---: |")
print(f"| prune wall s | {float(secs):.2f} |")
print(f"| prune peak RSS MiB | {int(rss)/1024:.0f} |")
print(f"| unreferenced MB | {p['unreferenced_bytes']/1e6:.1f} |")
print(f"| reclaimed MB | {p['bytes_reclaimed']/1e6:.1f} |")
print(f"| reclaimed / unreferenced | {p['bytes_reclaimed']/max(p['unreferenced_bytes'],1):.2f} |")
print(f"| packs deleted / repacked / written | {p['packs_deleted']} / {p['packs_repacked']} / {p['packs_written']} |")
print(f"| check --read-data MB/s | {after/1e6/ct:.0f} ({'ok' if c['ok'] else 'DAMAGED'}) |")
PY
