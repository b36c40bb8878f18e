#!/usr/bin/env bash
# Sets up a fresh Debian machine with Python 3.11 (idempotent): the offline corpus packages, a C++ compiler and
# Python's headers (torch.compile's CPU backend: the CPU preset compiles the softcapped CE and SLOT), the Python
# requirements (CPU torch pinned), and the offline dataset (data/datasets/offline_sp1024, ~15 s).
set -euo pipefail
cd "$(dirname "$0")"
export DEBIAN_FRONTEND=noninteractive PIP_DISABLE_PIP_VERSION_CHECK=1
SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
PKGS="linux-doc-6.12 python3.11-doc g++"  # g++: torch.compile (inductor) on CPU
[ -f "$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["include"])')/Python.h" ] || PKGS="$PKGS python3-dev"
if ! dpkg -s $PKGS >/dev/null 2>&1; then
  $SUDO apt-get install -y --no-install-recommends $PKGS >/dev/null 2>&1 || {
    $SUDO apt-get update >/dev/null && $SUDO apt-get install -y --no-install-recommends $PKGS >/dev/null; }
fi
python3 -m pip install -q -r requirements.txt
[ -f data/datasets/offline_sp1024/manifest.json ] && [ -f data/tokenizers/offline_1024_bpe.model ] || python3 data/prepare_offline.py
