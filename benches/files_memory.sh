#!/usr/bin/env bash
# How ferry's peak memory grows with the number of files: two volumes of
# small files (N1 and N2 files of 1 KiB in directories of 1,000), an initial
# snapshot, an unchanged snapshot and a full restore of each; prints the peak
# RSS and the peak anonymous RSS of each, and their growth per file between
# the two sizes.
#
# Usage: benches/files_memory.sh [WORKDIR]   (N1=20000 N2=200000 by default)
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
work=${1:-/tmp/ferry-files-bench}
N1=${N1:-20000}
N2=${N2:-200000}
mkdir -p "$work" && work=$(cd "$work" && pwd)
cargo build -q --release -p ferry-cli --manifest-path "$here/Cargo.toml"
ferry="$here/target/release/ferry"
export FERRY_PASSPHRASE=bench XDG_STATE_HOME="$work/state"
cd "$work"

make_volume() { # DIR N: N distinct 1 KiB files, 1,000 per directory
  python3 - "$1" "$2" <<'PY'
import os, sys
root, n = sys.argv[1], int(sys.argv[2])
if os.path.isdir(root) and sum(len(f) for _, _, f in os.walk(root)) == n:
    sys.exit(0)
for i in range(n):
    d = os.path.join(root, "d%04d" % (i // 1000))
    if i % 1000 == 0:
        os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "f%06d" % i), "wb") as f:
        f.write(i.to_bytes(8, "little") * 128)
PY
}

# peak RSS and peak anonymous RSS (RssAnon sampled every 5 ms), in KiB, of
# the command. RSS also counts the catalog's memory-mapped SQLite pages
# (page cache, which the kernel reclaims under pressure and which grow with
# the catalog on disk); RssAnon is the process's own memory.
rss() {
  python3 - "$@" 2>"$work/err.txt" <<'PY' || { tail -3 "$work/err.txt"; exit 1; }
import resource, subprocess, sys, time
p = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL)
anon = 0
while p.poll() is None:
    try:
        for line in open("/proc/%d/status" % p.pid):
            if line.startswith("RssAnon:"):
                anon = max(anon, int(line.split()[1]))
    except OSError:
        pass
    time.sleep(0.005)
if p.returncode != 0:
    sys.exit("%s failed: %d" % (sys.argv[1:3], p.returncode))
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, anon)
PY
}

declare -A R
for n in "$N1" "$N2"; do
  make_volume "vol$n" "$n"
  rm -rf "vault$n" "out$n" state
  "$ferry" vault init "vault$n" >/dev/null
  R[snap$n]=$(rss "$ferry" snapshot "vol$n" --vault "vault$n" --volume v --json)
  R[again$n]=$(rss "$ferry" snapshot "vol$n" --vault "vault$n" --volume v --json)
  R[restore$n]=$(rss "$ferry" restore v "out$n" --vault "vault$n" --json)
  rm -rf "out$n"
done
printf '%-20s %10s %10s %9s %11s %11s %10s\n' operation "RSS@$N1" "RSS@$N2" "B/file" "anon@$N1" "anon@$N2" "B/file"
for op in snap again restore; do
  read -r a aa <<<"${R[$op$N1]}"
  read -r b ba <<<"${R[$op$N2]}"
  case $op in snap) name="initial snapshot" ;; again) name="unchanged snapshot" ;; restore) name="full restore" ;; esac
  awk -v n="$name" -v a="$a" -v b="$b" -v aa="$aa" -v ba="$ba" -v n1="$N1" -v n2="$N2" \
    'BEGIN { printf "%-20s %8.0f Mi %8.0f Mi %9.0f %8.0f Mi %8.0f Mi %10.0f\n", n, a / 1024, b / 1024, (b - a) * 1024 / (n2 - n1), aa / 1024, ba / 1024, (ba - aa) * 1024 / (n2 - n1) }'
done
