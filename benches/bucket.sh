#!/usr/bin/env bash
# Bucket migration: ferry bucket sync against rclone sync, same run, same
# servers, same concurrency. Two s3s-fs servers on loopback stand for two
# clouds (so neither tool can copy server-side).
#
#   benches/bucket.sh [DIR]     (SMALL=10000 objects of 2 KiB; LARGE=4 objects of 256 MiB; WORKERS=16)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
WORK=${1:-$(mktemp -d /tmp/ferry-bucket.XXXXXX)}
SMALL=${SMALL:-10000}; LARGE=${LARGE:-4}; LARGE_MIB=${LARGE_MIB:-256}; WORKERS=${WORKERS:-16}
command -v rclone >/dev/null || { sudo -n true 2>/dev/null && SUDO=sudo || SUDO=; $SUDO apt-get update -qq && $SUDO apt-get install -y -qq rclone; }
cargo build --release -p ferry-cli -p ferry-bench --bin ferry --bin s3server >&2
FERRY="$ROOT/target/release/ferry"; S3="$ROOT/target/release/s3server"
rm -rf "$WORK/a" "$WORK/b" "$WORK/state"; mkdir -p "$WORK/a/src" "$WORK/b"
# Objects are files under the server's root: generated directly.
python3 - "$WORK/a/src" "$SMALL" "$LARGE" "$LARGE_MIB" <<'PY'
import os, sys, random
root, small, large, mib = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
r = random.Random(1)
for i in range(small):
    d = os.path.join(root, "small", f"{i % 100:02d}")
    os.makedirs(d, exist_ok=True)
    open(os.path.join(d, f"obj-{i:06d}.json"), "wb").write(r.randbytes(2048))
os.makedirs(os.path.join(root, "large"), exist_ok=True)
for i in range(large):
    with open(os.path.join(root, "large", f"blob-{i}.bin"), "wb") as f:
        for _ in range(mib):
            f.write(r.randbytes(1 << 20))
PY
"$S3" "$WORK/a" > "$WORK/a.url" & PA=$!
"$S3" "$WORK/b" > "$WORK/b.url" & PB=$!
trap 'kill $PA $PB 2>/dev/null' EXIT
sleep 1
A=$(cat "$WORK/a.url"); B=$(cat "$WORK/b.url")
cat > "$WORK/ferry.toml" <<EOF2
[remotes.a]
endpoint = "$A"
access_key_id = "bench"
secret_access_key = "benchsecret"
[remotes.b]
endpoint = "$B"
access_key_id = "bench"
secret_access_key = "benchsecret"
EOF2
for r in A B; do
  url=$A; [ $r = B ] && url=$B
  export RCLONE_CONFIG_${r}_TYPE=s3 RCLONE_CONFIG_${r}_PROVIDER=Other RCLONE_CONFIG_${r}_ENDPOINT=$url \
         RCLONE_CONFIG_${r}_ACCESS_KEY_ID=bench RCLONE_CONFIG_${r}_SECRET_ACCESS_KEY=benchsecret \
         RCLONE_CONFIG_${r}_FORCE_PATH_STYLE=true RCLONE_CONFIG_${r}_REGION=us-east-1
done
export XDG_STATE_HOME="$WORK/state"
# Plain-http loopback servers: a CA bundle from the environment only trips rclone up.
unset AWS_CA_BUNDLE
run() { # name, then the command; prints seconds
  local t0 t1; t0=$(date +%s.%N); "$@" >/dev/null 2>"$WORK/err" || { cat "$WORK/err" >&2; exit 1; }; t1=$(date +%s.%N)
  python3 -c "print(f'{$t1-$t0:.2f}')"
}
mkdir -p "$WORK/b/f-small" "$WORK/b/r-small" "$WORK/b/f-large" "$WORK/b/r-large"
fs=$(run "$FERRY" bucket sync a:src/small b:f-small --workers "$WORKERS" --config "$WORK/ferry.toml")
rs=$(run rclone sync A:src/small B:r-small --transfers "$WORKERS" --checkers "$WORKERS")
fs2=$(run "$FERRY" bucket sync a:src/small b:f-small --workers "$WORKERS" --config "$WORK/ferry.toml")
rs2=$(run rclone sync A:src/small B:r-small --transfers "$WORKERS" --checkers "$WORKERS")
fl=$(run "$FERRY" bucket sync a:src/large b:f-large --workers "$WORKERS" --config "$WORK/ferry.toml")
rl=$(run rclone sync A:src/large B:r-large --transfers "$WORKERS" --checkers "$WORKERS")
python3 - "$SMALL" "$LARGE" "$LARGE_MIB" "$fs" "$rs" "$fs2" "$rs2" "$fl" "$rl" <<'PY'
import sys
small, large, mib = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
fs, rs, fs2, rs2, fl, rl = map(float, sys.argv[4:])
print("| operation | ferry s | rclone s | ferry rate | rclone rate | rclone/ferry |")
print("| --- | ---: | ---: | ---: | ---: | ---: |")
print(f"| {small} small objects (2 KiB), first copy | {fs:.2f} | {rs:.2f} | {small/fs:.0f} obj/s | {small/rs:.0f} obj/s | {rs/fs:.2f} |")
print(f"| same, rerun with nothing changed | {fs2:.2f} | {rs2:.2f} | {small/fs2:.0f} obj/s | {small/rs2:.0f} obj/s | {rs2/fs2:.2f} |")
mb = large * mib * 1.048576
print(f"| {large} large objects ({mib} MiB) | {fl:.2f} | {rl:.2f} | {mb/fl:.0f} MB/s | {mb/rl:.0f} MB/s | {rl/fl:.2f} |")
PY
