#!/usr/bin/env bash
# Starts a SeaweedFS server (master, volume, filer, S3) on loopback in DIR, on free ports, and
# prints `S3_PORT PID` once its S3 endpoint answers. Sourced by run.sh and used by the tests to
# restart the server after killing it (same DIR, same ports).
#
#   tests/s3/weed.sh DIR [PORTS_FILE]
#
# With PORTS_FILE (written by an earlier start), the same ports are used again.
set -euo pipefail
dir=$1
ports_file=${2:-$dir/ports}
mkdir -p "$dir/data"
if [ ! -s "$ports_file" ]; then
  # Eight free ports below 55000 (SeaweedFS would otherwise add 10000 for gRPC ports).
  python3 - >"$ports_file" <<'PY'
import random, socket
out = []
while len(out) < 8:
    p = random.randint(20000, 54999)
    s = socket.socket()
    try:
        s.bind(("127.0.0.1", p))
    except OSError:
        continue
    finally:
        s.close()
    if p not in out:
        out.append(p)
print(" ".join(map(str, out)))
PY
fi
read -r s3 s3g master masterg volume volumeg filer filerg <"$ports_file"
cat >"$dir/identities.json" <<'JSON'
{"identities":[{"name":"reshard","credentials":[{"accessKey":"reshardtestkey","secretKey":"reshardtestsecret"}],"actions":["Admin","Read","Write","List"]}]}
JSON
# Telemetry off: the tests send traffic to loopback only.
weed server -ip=127.0.0.1 -ip.bind=127.0.0.1 -dir="$dir/data" -master.telemetry=false \
  -s3 -s3.port="$s3" -s3.port.grpc="$s3g" -s3.port.iceberg=0 -s3.port.lance=0 -s3.config="$dir/identities.json" \
  -master.port="$master" -master.port.grpc="$masterg" -master.volumeSizeLimitMB=64 \
  -volume.port="$volume" -volume.port.grpc="$volumeg" -volume.max=0 \
  -filer.port="$filer" -filer.port.grpc="$filerg" >>"$dir/weed.log" 2>&1 &
pid=$!
for _ in $(seq 1 120); do
  if ! kill -0 "$pid" 2>/dev/null; then
    echo "weed exited; its log:" >&2
    tail -20 "$dir/weed.log" >&2
    exit 1
  fi
  code=$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$s3/" || true)
  if [ "$code" != "000" ] && [ -n "$code" ]; then
    echo "$pid" >"$dir/pid"
    echo "$s3 $pid"
    exit 0
  fi
  sleep 0.5
done
echo "weed did not answer on port $s3 within 60 s" >&2
kill "$pid" 2>/dev/null || true
exit 1
