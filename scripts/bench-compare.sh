#!/usr/bin/env bash
# The side-by-side: the same fanout, slow, idle and previews workloads against
# comfyfleet and against nchan (nginx + Debian's libnginx-mod-nchan, Redis-backed,
# WebSocket subscribers, HTTP publisher), in one run on this machine, plus
# redis-benchmark's unpipelined PUBLISH rate as the ceiling of the broker itself.
# Writes BENCHMARKS.md (the hand-written part after the "profile" marker is kept).
#
# Needs PostgreSQL and Redis on loopback (as the test suite does); installs nginx,
# the nchan module and redis-tools with apt-get when they are missing. Binds
# 127.0.0.1 only and stops everything it started.
#
# Knobs (environment): FANOUT_CLIENTS (1000), FANOUT_RATES ("60 100 140 200 240 280"),
# BIG_CLIENTS (10000), BIG_RATE (10), IDLE_CLIENTS (10000), DURATION (5 s),
# SLOW_PAIRS (4), NCHAN_PORT (18731), OUT (target/bench/compare-<time>).
set -euo pipefail
cd "$(dirname "$0")/.."

FANOUT_CLIENTS=${FANOUT_CLIENTS:-1000}
FANOUT_RATES=${FANOUT_RATES:-"60 100 140 200 240 280"}
BIG_CLIENTS=${BIG_CLIENTS:-10000}
BIG_RATE=${BIG_RATE:-10}
IDLE_CLIENTS=${IDLE_CLIENTS:-10000}
DURATION=${DURATION:-5}
SLOW_PAIRS=${SLOW_PAIRS:-4}
NCHAN_PORT=${NCHAN_PORT:-18731}
OUT=${OUT:-target/bench/compare-$(date -u +%Y%m%dT%H%M%SZ)}
REDIS_HOST=127.0.0.1
REDIS_PORT=6379

say() { echo "==> $*" >&2; }

# --- what this needs ---------------------------------------------------------
sudo_if_needed() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }
missing=()
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || missing+=(nginx)
[ -f /usr/lib/nginx/modules/ngx_nchan_module.so ] || missing+=(libnginx-mod-nchan)
command -v redis-benchmark >/dev/null 2>&1 || missing+=(redis-tools)
if [ ${#missing[@]} -gt 0 ]; then
  say "installing ${missing[*]}"
  sudo_if_needed apt-get update -q
  sudo_if_needed env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}"
fi
NGINX=$(command -v nginx || echo /usr/sbin/nginx)
redis-cli -h $REDIS_HOST -p $REDIS_PORT ping >/dev/null || { echo "Redis is not answering on $REDIS_HOST:$REDIS_PORT" >&2; exit 1; }

say "building comfyfleet (release)"
cargo build --release --quiet
BENCH=target/release/comfyfleet
mkdir -p "$OUT"
ulimit -n "$(ulimit -Hn)" || true

# --- nchan on loopback --------------------------------------------------------
NDIR=$(mktemp -d /tmp/bench-nchan.XXXXXX)
cleanup() {
  if [ -f "$NDIR/nginx.pid" ]; then
    kill "$(cat "$NDIR/nginx.pid")" 2>/dev/null || true
    for _ in $(seq 50); do [ -f "$NDIR/nginx.pid" ] || break; sleep 0.1; done
  fi
  rm -rf "$NDIR"
}
trap cleanup EXIT
mkdir -p "$NDIR/tmp"
user_line=""
NOFILE=$(ulimit -Hn)
[ "$NOFILE" = unlimited ] && NOFILE=65536
[ "$(id -u)" -eq 0 ] && user_line="user root;"
cat >"$NDIR/nginx.conf" <<EOF
load_module /usr/lib/nginx/modules/ngx_nchan_module.so;
$user_line
worker_processes auto;
worker_rlimit_nofile $NOFILE;
pid $NDIR/nginx.pid;
error_log $NDIR/error.log warn;
events { worker_connections $NOFILE; }
http {
  access_log off;
  client_body_temp_path $NDIR/tmp/body;
  proxy_temp_path $NDIR/tmp/proxy;
  fastcgi_temp_path $NDIR/tmp/fastcgi;
  uwsgi_temp_path $NDIR/tmp/uwsgi;
  scgi_temp_path $NDIR/tmp/scgi;
  client_max_body_size 16m;
  client_body_buffer_size 256k;
  upstream bench_redis {
    nchan_redis_server "redis://$REDIS_HOST:$REDIS_PORT";
  }
  server {
    listen 127.0.0.1:$NCHAN_PORT;
    location ~ ^/sub/(\w+)$ {
      nchan_subscriber websocket;
      nchan_channel_id \$1;
      nchan_redis_pass bench_redis;
      nchan_subscriber_first_message newest;
    }
    location ~ ^/pub/(\w+)$ {
      nchan_publisher http;
      nchan_channel_id \$1;
      nchan_redis_pass bench_redis;
      nchan_message_buffer_length 10;
      nchan_message_timeout 60s;
    }
  }
}
EOF
"$NGINX" -t -q -c "$NDIR/nginx.conf" -p "$NDIR"
start_nchan() {
  "$NGINX" -c "$NDIR/nginx.conf" -p "$NDIR"
  for _ in $(seq 100); do [ -s "$NDIR/nginx.pid" ] && break; sleep 0.05; done
  NCHAN_PID=$(cat "$NDIR/nginx.pid")
}
stop_nchan() {
  kill "$(cat "$NDIR/nginx.pid")"
  for _ in $(seq 100); do [ -f "$NDIR/nginx.pid" ] || break; sleep 0.05; done
}
start_nchan
NCHAN_VERSION=$(dpkg-query -W -f '${Version}' libnginx-mod-nchan 2>/dev/null || echo unknown)
NGINX_VERSION=$("$NGINX" -v 2>&1 | sed 's/.*nginx\///')
say "nchan $NCHAN_VERSION on nginx $NGINX_VERSION at 127.0.0.1:$NCHAN_PORT (master pid $NCHAN_PID)"

run() { # run NAME TARGET SCENARIO ARGS...  (JSON into $RUN_DIR, default $OUT)
  local name=$1 target=$2 scenario=$3; shift 3
  local extra=()
  [ "$target" = nchan ] && extra=(--nchan-url "http://127.0.0.1:$NCHAN_PORT" --server-pid "$NCHAN_PID")
  say "$name: $target $scenario $*"
  "$BENCH" bench "$scenario" --target "$target" "${extra[@]}" --label "$name" \
    --json "${RUN_DIR:-$OUT}/$name-$target.json" "$@" | sed -n '1,2p' >&2
}
both() { local name=$1; shift; run "$name" comfyfleet "$@"; run "$name" nchan "$@"; }

# --- the broker's own ceiling -------------------------------------------------
say "redis-benchmark: unpipelined PUBLISH"
redis-benchmark -h $REDIS_HOST -p $REDIS_PORT -q -n 200000 -c 50 PUBLISH benchcompare hello \
  | tr '\r' '\n' | grep -i 'requests per second' | tail -1 >"$OUT/redis-publish.txt"
cat "$OUT/redis-publish.txt" >&2

# --- the workloads ------------------------------------------------------------
# idle first, on a fresh nginx: a server that already held 10,000 sockets keeps
# their memory, and the per-socket figure would read near zero. (The bench starts
# a fresh comfyfleet pod for every run.)
both "idle-$IDLE_CLIENTS" idle --clients "$IDLE_CLIENTS" --duration 3
stop_nchan; start_nchan
for rate in $FANOUT_RATES; do
  both "fanout-$FANOUT_CLIENTS-r$rate" fanout --clients "$FANOUT_CLIENTS" --rate "$rate" --duration "$DURATION"
done
both "fanout-$BIG_CLIENTS-r$BIG_RATE" fanout --clients "$BIG_CLIENTS" --rate "$BIG_RATE" --duration "$DURATION"
both "slow-$FANOUT_CLIENTS-r100" slow --clients "$FANOUT_CLIENTS" --rate 100 --slow-share 0.1 --duration "$DURATION"
# The slow target is a change of ≤ 10 % in the readers' p99, less than what one
# run varies by on a shared 2-core box: fanout and slow alternate, and the
# medians are compared. nginx is restarted first, as for idle: after holding
# 10,000 sockets its fan-out latency was several times its fresh figure.
stop_nchan; start_nchan
mkdir -p "$OUT/pairs"
for k in $(seq "$SLOW_PAIRS"); do
  for scenario in fanout slow; do
    RUN_DIR="$OUT/pairs" both "pair$k-$scenario" "$scenario" --clients "$FANOUT_CLIENTS" --rate 100 \
      --slow-share 0.1 --duration "$DURATION"
  done
done
both "previews-4x25" previews --jobs 4 --watchers 25 --rate 10 --size 102400 --duration "$DURATION"

# --- BENCHMARKS.md ------------------------------------------------------------
say "writing BENCHMARKS.md"
python3 - "$OUT" "$NCHAN_VERSION" "$NGINX_VERSION" <<'PY'
import glob, json, os, sys
out, nchan_version, nginx_version = sys.argv[1:4]
runs = {}
for path in sorted(glob.glob(os.path.join(out, "*.json"))):
    r = json.load(open(path))
    runs.setdefault(r["label"], {})[r["target"]] = r
redis = open(os.path.join(out, "redis-publish.txt")).read().strip()
keep = ""
if os.path.exists("BENCHMARKS.md"):
    text = open("BENCHMARKS.md").read()
    marker = "<!-- profile: kept by scripts/bench-compare.sh -->"
    if marker in text:
        keep = text[text.index(marker):]
any_run = next(iter(next(iter(runs.values())).values()))
m = any_run["machine"]

def f(v, d=1):
    return "-" if v is None else f"{v:,.{d}f}"

def ratio(a, b):
    return "-" if not a or not b else f"{a / b:.2f}×"

def srv(r, k):
    s = r.get("server") or {}
    return s.get(k)

rows = [
    ("delivered msgs/s", lambda r: r["delivered_per_sec"], 0, True),
    ("delivered MB/s", lambda r: r["mb_per_sec"], 2, True),
    ("latency p50 (ms)", lambda r: r["latency"]["p50_ms"], 2, False),
    ("latency p90 (ms)", lambda r: r["latency"]["p90_ms"], 2, False),
    ("latency p99 (ms)", lambda r: r["latency"]["p99_ms"], 2, False),
    ("latency p99.9 (ms)", lambda r: r["latency"]["p999_ms"], 2, False),
    ("latency max (ms)", lambda r: r["latency"]["max_ms"], 2, False),
    ("lost", lambda r: r["lost"], 0, False),
    ("closed by server", lambda r: r["closed_by_server"], 0, False),
    ("server CPU (% of a core)", lambda r: srv(r, "cpu_percent"), 0, False),
    ("server RSS after (MiB)", lambda r: srv(r, "rss_mib_after"), 1, False),
    ("server RSS peak (MiB)", lambda r: srv(r, "rss_mib_peak"), 1, False),
    ("RSS per connection (KiB)", lambda r: srv(r, "rss_kib_per_connection"), 1, False),
    ("load generator CPU (% of a core)", lambda r: r.get("load_generator_cpu_percent"), 0, False),
]

lines = []
w = lines.append
w("# Benchmarks")
w("")
w("Generated by `scripts/bench-compare.sh` (the reproducible artifact; figures below are one run).")
w("Every figure is measured on the receiving side by `comfyfleet bench`: latency is end to end,")
w("from the publish time carried in each message to the client's receive, in an HDR histogram.")
w("The load generator runs on the same machine as the servers and shares its cores.")
w("")
w("## Machine")
w("")
w(f"- {m['cores']} cores ({m['cpu_model']}), {m['memory_mib']:,} MiB, Linux {m['kernel']}")
w(f"- nchan {nchan_version} on nginx {nginx_version} (Debian packages), Redis-backed (`nchan_redis_pass`), WebSocket subscribers, HTTP publisher, `worker_processes auto`")
w(f"- comfyfleet: one API pod (`comfyfleet api`, release build) started by the bench, Redis bus, messages published by a worker-side `Publisher`")
w(f"- broker ceiling, `redis-benchmark -n 200000 -c 50 PUBLISH` (unpipelined): {redis}")
w("- the machine is shared with other builds: the load average at the start of each run is shown with it")
w("")
w("Reproduce: `scripts/bench-compare.sh` (knobs: `FANOUT_CLIENTS`, `FANOUT_RATES`, `BIG_CLIENTS`, `BIG_RATE`, `IDLE_CLIENTS`, `DURATION`, `SLOW_PAIRS`).")
w("One run by hand: `cargo build --release && target/release/comfyfleet bench fanout --clients 1000 --rate 100 --duration 5`.")
w("")

def order(label):
    # fanout-1000-r20 before fanout-1000-r100: numbers compare as numbers.
    kinds = ["fanout", "slow", "idle", "previews"]
    kind = label.split("-")[0]
    parts = [int(x) if x.isdigit() else x for x in label.replace("-r", "-").split("-")[1:]]
    return (kinds.index(kind) if kind in kinds else 9, [str(type(p)) for p in parts], parts)

best = {}
for label in sorted(runs, key=order):
    pair = runs[label]
    cf, nc = pair.get("comfyfleet"), pair.get("nchan")
    first = cf or nc
    p = first["params"]
    w(f"## {label}")
    w("")
    desc = ", ".join(f"{k}={v}" for k, v in p.items())
    w(f"`{first['scenario']}`: {desc}")
    w("")
    def load(r):
        return "-" if not r else " / ".join(f"{x:.2f}" for x in r["machine"]["load_average"])
    w("| | comfyfleet | nchan | comfyfleet ÷ nchan |")
    w("|---|---:|---:|---:|")
    w(f"| clients connected | {cf['connected'] if cf else '-'} / {cf['clients'] if cf else '-'} | {nc['connected'] if nc else '-'} / {nc['clients'] if nc else '-'} | |")
    if first["scenario"] != "idle":
        w(f"| offered msgs/s | {f(cf and cf['offered_per_sec'])} | {f(nc and nc['offered_per_sec'])} | |")
    for name, get, digits, _ in rows:
        if first["scenario"] == "idle" and name not in ("closed by server", "server RSS after (MiB)", "RSS per connection (KiB)", "server CPU (% of a core)"):
            continue
        a = get(cf) if cf else None
        b = get(nc) if nc else None
        w(f"| {name} | {f(a, digits)} | {f(b, digits)} | {ratio(a, b) if isinstance(a, (int, float)) and isinstance(b, (int, float)) else '-'} |")
    w(f"| load average at start | {load(cf)} | {load(nc)} | |")
    w("")
    if first["scenario"] == "fanout" and first["params"]["clients"] == p["clients"]:
        for name, r in (("comfyfleet", cf), ("nchan", nc)):
            if r and r["latency"]["p99_ms"] <= 50 and r["lost"] == 0 and r["connected"] == r["clients"]:
                key = (name, p["clients"])
                best[key] = max(best.get(key, 0), r["delivered_per_sec"])

if best:
    w("## Highest sustained fanout (p99 ≤ 50 ms, nothing lost), per client count")
    w("")
    w("| clients | comfyfleet msgs/s | nchan msgs/s | ratio |")
    w("|---:|---:|---:|---:|")
    for n in sorted({k[1] for k in best}):
        a, b = best.get(("comfyfleet", n)), best.get(("nchan", n))
        w(f"| {n:,} | {f(a, 0)} | {f(b, 0)} | {ratio(a, b)} |")
    w("")
    w("Only the rates the script tried count: the true maximum lies between the best passing rate and the next one.")
    w("")

pairs = {}
for path in sorted(glob.glob(os.path.join(out, "pairs", "*.json"))):
    r = json.load(open(path))
    pairs.setdefault(r["target"], {}).setdefault(r["scenario"], []).append(r)
if pairs:
    def median(xs):
        xs = sorted(xs)
        n = len(xs)
        return None if n == 0 else (xs[n // 2] if n % 2 else (xs[n // 2 - 1] + xs[n // 2]) / 2)
    def each(target, scenario, key):
        rs = sorted(pairs.get(target, {}).get(scenario, []), key=lambda r: r["label"])
        return [r["latency"][key] for r in rs]
    def runs_of(target, scenario, key):
        xs = each(target, scenario, key)
        return " / ".join(f"{x:.1f}" for x in xs) or "-"
    def change(target):
        a, b = median(each(target, "fanout", "p99_ms")), median(each(target, "slow", "p99_ms"))
        return "-" if not a or b is None else f"{(b - a) / a * 100:+.0f} %"
    n = max(len(v) for t in pairs.values() for v in t.values())
    w(f"## slow against fanout: {n} alternating pairs (1,000 clients, 100 msgs/s)")
    w("")
    w("The `slow` target is the readers' p99 moving by ≤ 10 % when 10 % of the clients stop reading.")
    w("One run's p99 varies by more than that here, so `fanout` and `slow` alternate and the medians compare.")
    w("")
    w("| | comfyfleet | nchan |")
    w("|---|---|---|")
    for name, scenario, key in (
        ("fanout p99 (ms), each run", "fanout", "p99_ms"),
        ("slow p99 (ms), each run", "slow", "p99_ms"),
        ("fanout p99.9 (ms), each run", "fanout", "p999_ms"),
        ("slow p99.9 (ms), each run", "slow", "p999_ms"),
    ):
        w(f"| {name} | {runs_of('comfyfleet', scenario, key)} | {runs_of('nchan', scenario, key)} |")
    for name, scenario in (("fanout p99, median (ms)", "fanout"), ("slow p99, median (ms)", "slow")):
        w(f"| {name} | {f(median(each('comfyfleet', scenario, 'p99_ms')), 2)} | {f(median(each('nchan', scenario, 'p99_ms')), 2)} |")
    w(f"| change of the median p99 | {change('comfyfleet')} | {change('nchan')} |")
    w("")

text = "\n".join(lines) + "\n"
if keep:
    text += "\n" + keep
else:
    text += "\n<!-- profile: kept by scripts/bench-compare.sh -->\n## Profile\n\n(not written yet)\n"
open("BENCHMARKS.md", "w").write(text)
PY
say "done: BENCHMARKS.md, raw results in $OUT"
