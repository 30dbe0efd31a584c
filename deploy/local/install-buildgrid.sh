#!/usr/bin/env bash
# Installs BuildGrid 0.9.1 (the scheduler and CAS we test and benchmark against) into its
# own virtualenv, never the project's: BuildGrid >= 0.9 needs Python >= 3.13, which
# Debian 12 lacks, so it is looked for under pyenv (or given as $PYTHON313).
# Argument: the virtualenv's directory. Prints nothing when it is already there.
set -euo pipefail
venv=${1:?usage: install-buildgrid.sh VENV_DIR}
version=0.9.1
if [ -x "$venv/bin/bgd" ] && "$venv/bin/python" -c "import importlib.metadata as m, sys; sys.exit(m.version('buildgrid') != '$version')" 2>/dev/null; then
  exit 0
fi
python=${PYTHON313:-}
if [ -z "$python" ]; then
  for candidate in "$(pyenv root 2>/dev/null || echo /root/.pyenv)"/versions/3.1[3-9]*/bin/python3 \
                   /usr/bin/python3.1[3-9] /usr/local/bin/python3.1[3-9]; do
    if [ -x "$candidate" ]; then python=$candidate; break; fi
  done
fi
if [ -z "$python" ] || ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 13))'; then
  echo "install-buildgrid.sh: BuildGrid $version needs Python >= 3.13 and none was found" >&2
  echo "  (looked under pyenv and /usr; set PYTHON313=/path/to/python3.13)" >&2
  exit 1
fi
echo "installing BuildGrid $version into $venv (with $python)"
rm -rf "$venv"
"$python" -m venv "$venv"
"$venv/bin/pip" install -q --upgrade pip 2> >(grep -v "is ignored" >&2)
"$venv/bin/pip" install -q "buildgrid==$version" 2> >(grep -v "is ignored" >&2)
