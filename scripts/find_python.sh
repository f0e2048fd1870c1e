#!/bin/sh
# Print a Python interpreter >= 3.12 (3.13 and 3.12, the tested ones, first): $PYTHON if set, else the first on
# PATH, else one installed by pyenv.
ok() { "$1" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 12) else 1)' 2>/dev/null; }
for c in "${PYTHON:-}" python3.13 python3.12 python3 python; do
  [ -n "$c" ] && command -v "$c" >/dev/null 2>&1 && ok "$c" && { command -v "$c"; exit 0; }
done
root=$(pyenv root 2>/dev/null || echo "$HOME/.pyenv")
for c in $(ls -d "$root"/versions/3.1[2-9]*/bin/python 2>/dev/null | sort -rV); do
  ok "$c" && { echo "$c"; exit 0; }
done
echo "no Python >= 3.12 found: install one (e.g. pyenv install 3.12) or set PYTHON=/path/to/python3.12" >&2
exit 1
