#!/usr/bin/env bash
# Create .venv with everything lesa needs (idempotent). Used by run-default.sh, test.sh and CI.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3

if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
stamp=.venv/.lesa-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  # torch/torchvision first and pinned: on Python 3.11 pip takes these from local disk here.
  .venv/bin/python -m pip install -q torch==2.14.1 torchvision==0.29.1
  .venv/bin/python -m pip install -q -e '.[dev]'
  touch "$stamp"
fi

# The embedded default dataset renders Noto Color Emoji; install the font when it is missing.
if [ ! -f /usr/share/fonts/truetype/noto/NotoColorEmoji.ttf ] && command -v apt-get >/dev/null; then
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  ($SUDO apt-get update -qq && $SUDO apt-get install -y -qq fonts-noto-color-emoji) \
    || echo "warning: could not install fonts-noto-color-emoji; lesa will try its checksum-verified download" >&2
fi
