#!/usr/bin/env bash
# A local NDIF (the server behind nnsight's remote=True) for this project: Redis, an S3 store (moto), a Ray head, the
# NDIF controller and API — all bound to 127.0.0.1 inside a network namespace that has only a loopback interface —
# serving local model directories on the CPU.
#
#   ndif.sh install          server venv from tools/ndif/requirements-ndif.lock (+ redis-server from apt if missing)
#   ndif.sh installed        exit 0 when that venv is up to date with the lock and redis-server is there
#   ndif.sh up MODEL_DIR     start everything and deploy MODEL_DIR; says so and exits 0 when already up
#   ndif.sh down             stop exactly what `up` started (by process group, then leftover Ray pids in our state dir)
#   ndif.sh exec CMD...      run CMD inside the server's network namespace (clients must: nothing else can reach it)
#   ndif.sh status           exit 0 when the API answers
#
# Settings: NDIF_VENV (default ~/.cache/saif-ndif/venv-<lock hash>: shared by every checkout of the same lock),
# NDIF_STATE (default ${TMPDIR:-/tmp}/saif-ndif; pid files and logs),
# NDIF_UP_TIMEOUT (seconds, default 240), OMP_NUM_THREADS (torch threads of the model actor and of `exec` clients,
# default nproc). Ray's gRPC servers bind every interface whatever --node-ip-address says, so the stack always runs in
# `unshare -n` (needs root): reachable from this machine's namespace only through `exec`.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
HERE="$REPO/tools/ndif"
LOCK="$HERE/requirements-ndif.lock"
VENV="${NDIF_VENV:-$HOME/.cache/saif-ndif/venv-$(sha256sum "$LOCK" | cut -c1-12)}"
STATE="${NDIF_STATE:-${TMPDIR:-/tmp}/saif-ndif}"
TIMEOUT="${NDIF_UP_TIMEOUT:-240}"
NDIF_VERSION="0.1.2"

export NDIF_REDIS_URL="redis://127.0.0.1:6379"
export NDIF_OBJECT_STORE_URL="http://127.0.0.1:9000"
export NDIF_OBJECT_STORE_ACCESS_KEY="local" NDIF_OBJECT_STORE_SECRET_KEY="local"  # moto accepts any pair
export NDIF_RAY_ADDRESS="ray://127.0.0.1:10001"
export NDIF_API_URL="http://127.0.0.1:8001" NDIF_API_PORT=8001
export NDIF_MODEL_IMPORT_PATH="ndif_cpu_actor.CPUModelActor"  # tools/ndif/plugin: the stock actor needs CUDA
export NDIF_DEFAULT_DTYPE="float32" NDIF_MINIMUM_DEPLOYMENT_TIME_SECONDS=0
export NDIF_HOME="$STATE/home"
export GRPC_ENABLE_FORK_SUPPORT=0 RAY_USAGE_STATS_ENABLED=0
export RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=0  # `ray start --block` otherwise drains 30 s on SIGTERM
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
# Clients (`exec`) and the model actor compute on the same thread count: remote results equal local ones bit for bit.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(nproc)}"; export MKL_NUM_THREADS="${MKL_NUM_THREADS:-$OMP_NUM_THREADS}"
export NDIF_ACTOR_THREADS="$OMP_NUM_THREADS"  # the model actor's torch threads (tools/ndif/plugin/ndif_cpu_actor.py)
export PYTHONPATH="$HERE/plugin${PYTHONPATH:+:$PYTHONPATH}"
export PATH="$VENV/bin:$PATH"

log() { echo "[ndif $(date +%T)] $*"; }
die() { log "$*"; exit 1; }

holder_pid() {  # the pid whose network namespace the stack lives in (redis, started first), if it is alive
  local pid; pid=$(cat "$STATE/redis.pid" 2>/dev/null) || return 1
  kill -0 "$pid" 2>/dev/null && echo "$pid"
}

in_ns() {  # run a command in the stack's namespace
  local holder; holder=$(holder_pid) || return 1
  nsenter -t "$holder" -n -- "$@"
}

api_up() { in_ns curl -fsS --max-time 3 http://127.0.0.1:8001/connected >/dev/null 2>&1; }

wait_for() {  # description seconds command...
  local what="$1" limit="$2"; shift 2
  local t=0
  until "$@" >/dev/null 2>&1; do
    t=$((t + 1)); [ "$t" -ge "$limit" ] && die "timed out after ${limit}s waiting for $what (logs: $STATE/*.log)"
    sleep 1
  done
}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

spawn() {  # name cmd... — its own session, so `down` can end the whole process group by its pid
  local name="$1"; shift
  setsid "$@" >"$STATE/$name.log" 2>&1 </dev/null &
  echo $! >"$STATE/$name.pid"
  log "$name started (pid $!)"
}

installed() {
  command -v redis-server >/dev/null && [ -f "$VENV/.saif-ndif-installed" ] \
    && [ "$(cat "$VENV/.saif-ndif-installed")" = "$(sha256sum "$LOCK" | cut -c1-64)" ]
}

cmd_install() {
  command -v redis-server >/dev/null || { log "installing redis-server (Debian)"; apt-get install -y -q redis-server >/dev/null; }
  local stamp="$VENV/.saif-ndif-installed" want; want=$(sha256sum "$LOCK" | cut -c1-64)
  if installed; then log "server venv up to date ($VENV)"; return; fi
  [ -x "$VENV/bin/python" ] || { mkdir -p "$(dirname "$VENV")" && python3.11 -m venv "$VENV"; }
  log "installing the server venv from $(basename "$LOCK") (torch pinned by constraints.txt) …"
  "$VENV/bin/pip" install -q -r "$LOCK" -c "$REPO/constraints.txt" 2>&1 | { grep -v "is ignored: it is neither" || true; }
  # ndif declares Python >= 3.12, but for 3.12 only the CUDA torch build resolves; its code runs on 3.11.
  "$VENV/bin/pip" install -q --no-deps --ignore-requires-python "ndif==$NDIF_VERSION" 2>&1 | { grep -v "is ignored" || true; }
  echo "$want" >"$stamp"
}

cmd_up() {
  local model_dir="${1:?usage: ndif.sh up MODEL_DIR}"
  model_dir="$(cd "$model_dir" && pwd)"
  [ -x "$VENV/bin/ndif" ] || die "no server venv at $VENV: run 'ndif.sh install' (make ndif-up does)"
  if holder_pid >/dev/null && api_up; then
    if is_deployed "$model_dir"; then log "already running (state $STATE) and serving $model_dir"; return; fi
    log "already running (state $STATE); deploying $model_dir"; cmd_deploy "$model_dir"; return
  fi
  # Ray's socket paths (STATE/ray/session_<date>/sockets/…) must fit AF_UNIX's 107 bytes.
  [ "${#STATE}" -le 40 ] || die "NDIF_STATE=$STATE is too long for Ray's socket paths: use a short one (≤ 40 chars)"
  if [ -z "${_NDIF_IN_NETNS:-}" ]; then
    command -v unshare >/dev/null && [ "$(id -u)" = 0 ] || die "needs root and unshare: the stack runs in a private network namespace"
    cmd_down >/dev/null 2>&1 || true  # a half-started stack from an earlier failure
    mkdir -p "$STATE" "$NDIF_HOME" "$STATE/ray"
    # Re-run in a new network namespace with only `lo`; the services keep it alive after this shell exits.
    exec unshare -n env _NDIF_IN_NETNS=1 bash -c 'ip link set lo up && exec "$0" up "$1"' "$0" "$model_dir"
  fi
  trap 'log "start failed: stopping what was started"; cmd_down' ERR
  cd "$STATE"  # not the repository: the server must not import the project's code from its working directory
  local t0=$SECONDS
  spawn redis redis-server --bind 127.0.0.1 --port 6379 --save "" --appendonly no --protected-mode yes
  spawn s3 moto_server -H 127.0.0.1 -p 9000
  wait_for "redis" 30 port_open 6379; wait_for "the S3 store" 60 port_open 9000
  # The controller places models only on nodes with a "GPU" resource: one is declared, the CPU actor never uses it.
  local cpu_mem; cpu_mem=$(python -c 'import psutil; print(psutil.virtual_memory().total)')
  # Logical CPUs: the controller's one, and room for two model replicas (a redeploy starts its new one first).
  spawn ray ray start --head --block --disable-usage-stats --node-ip-address=127.0.0.1 --port=6385 \
      --ray-client-server-port=10001 --num-cpus=$((2 * NDIF_ACTOR_THREADS + 2)) --num-gpus=1 \
      --object-store-memory=200000000 \
      --resources="{\"head\": 10, \"cuda_memory_bytes\": 8000000000, \"cpu_memory_bytes\": $cpu_mem}" \
      --include-dashboard=true --dashboard-host=127.0.0.1 --dashboard-port=8265 --temp-dir="$STATE/ray"
  wait_for "the Ray head" 120 port_open 6385; wait_for "the Ray client server" 120 port_open 10001
  wait_for "the Ray dashboard" 120 port_open 8265
  RAY_ADDRESS="127.0.0.1:6385" python -m ndif.services.ray.deployments.controller.controller \
      >"$STATE/controller-launch.log" 2>&1
  spawn api gunicorn --config python:ndif.services.api.gunicorn_conf --bind 127.0.0.1:8001 ndif.services.api.app:app
  wait_for "the NDIF API" 120 curl -fsS --max-time 3 http://127.0.0.1:8001/connected
  log "API up after $((SECONDS - t0)) s"
  cmd_deploy "$model_dir"
  trap - ERR
  log "ready after $((SECONDS - t0)) s"
}

model_key() {  # the key nnsight's client computes for a local model directory
  echo "nnsight.modeling.transformers.TransformersModel:{\"repo_id\": \"$1\", \"revision\": null, \"task\": \"text-generation\"}"
}

is_deployed() {  # exit 0 when the running server lists a replica of MODEL_DIR (ndif names them <replica>:ModelActor:<key>)
  in_ns curl -fsS --max-time 30 http://127.0.0.1:8001/status | python -c 'import json, sys
names = json.load(sys.stdin).get("deployments", {})
sys.exit(0 if any(name.endswith(":ModelActor:" + sys.argv[1]) for name in names) else 1)' "$(model_key "$1")"
}

cmd_deploy() {  # deploy a local model directory (pinned) under the key nnsight's client computes for it
  local model_dir; model_dir="$(cd "${1:?usage: ndif.sh deploy MODEL_DIR}" && pwd)"
  local holder; holder=$(holder_pid) || die "not running"
  if [ "$(readlink /proc/$holder/ns/net)" != "$(readlink /proc/$$/ns/net)" ]; then
    exec nsenter -t "$holder" -n -- "$0" deploy "$model_dir"
  fi
  # size_bytes spares the controller a hub lookup (and a TypeError between ndif 0.1.2 and nnsight 0.8.1).
  local size; size=$(du -cb "$model_dir"/*.safetensors | tail -1 | cut -f1)
  local spec="$STATE/models-$(basename "$model_dir").yaml"
  cat >"$spec" <<YAML
models:
  - checkpoint: $model_dir
    model_key: '$(model_key "$model_dir")'
    pinned: true
    dtype: float32
    size_bytes: $size
    padding_bias: 0
YAML
  # A replica Ray cannot place waits for ever: bounded, so a failure says so.
  timeout "$TIMEOUT" ndif deploy -f "$spec" --ray-address "$NDIF_RAY_ADDRESS" >>"$STATE/deploy.log" 2>&1 \
      || die "deploy failed or timed out after ${TIMEOUT}s (see $STATE/deploy.log)"
  log "deployed $model_dir"
}

cmd_down() {
  local name pid stopped=0
  for name in api ray s3 redis; do
    [ -f "$STATE/$name.pid" ] || continue
    pid=$(cat "$STATE/$name.pid")
    if kill -0 "$pid" 2>/dev/null; then
      kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
      for _ in $(seq 1 15); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
      kill -KILL -- "-$pid" 2>/dev/null || true
      log "$name stopped (process group $pid)"; stopped=1
    fi
    rm -f "$STATE/$name.pid"
  done
  # Ray's daemons (gcs, raylet, workers, the detached controller) run under our temp dir: end those pids only.
  for pid in $(ps -eo pid=,args= | awk -v d="$STATE/ray" 'index($0, d) {print $1}'); do
    [ "$pid" = "$$" ] && continue
    kill -KILL "$pid" 2>/dev/null && log "ended Ray process $pid" || true
  done
  [ "$stopped" = 1 ] || log "nothing was running (state $STATE)"
}

case "${1:-}" in
  install) cmd_install ;;
  installed) installed || { log "no up-to-date server venv at $VENV or no redis-server: run 'ndif.sh install'"; exit 1; } ;;
  up) shift; cmd_up "$@" ;;
  deploy) shift; cmd_deploy "$@" ;;
  down) cmd_down ;;
  exec) shift; holder=$(holder_pid) || die "not running"; exec nsenter -t "$holder" -n -- "$@" ;;
  status) api_up && log "up (state $STATE)" || { log "down"; exit 1; } ;;
  *) sed -n '2,15p' "$0" >&2; exit 2 ;;
esac
