#!/usr/bin/env bash
# kvray's C extension (kvray/_ext/speedups.c) under AddressSanitizer + UndefinedBehaviorSanitizer:
# builds an instrumented copy into a temporary directory (the in-tree kvray/_speedups*.so that the
# normal venv uses is not touched), then runs, with that copy loaded in its place,
#   1. tests/unit/test_fast.py, test_frame_path.py and test_zmq_source.py (the C functions against
#      their pure-Python twins, the whole-frame path against the general one, the C receive
#      against pyzmq's; hypothesis), and
#   2. a differential fuzz of every C entry point against its twin (benchmarks/fuzz_decoder.py
#      --native; 100,000 inputs by default, KVRAY_SANITIZE_FUZZ_N to change).
# Exits non-zero on any sanitizer report, test failure or mismatch; the last line is a summary.
# Needs gcc with libasan/libubsan (Debian: gcc) and the project venv (.venv; PYTHON to override).
# Run from anywhere: `bash scripts/sanitize.sh`. About 1-2 minutes on 2 cores.
set -uo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
PY=${PYTHON:-.venv/bin/python}
N=${KVRAY_SANITIZE_FUZZ_N:-100000}
tmp=$(mktemp -d "${TMPDIR:-/tmp}/kvray-sanitize.XXXXXX")
trap 'rm -rf "$tmp"' EXIT

fail() {
  echo "sanitize: FAIL - $1 ($(( $(date +%s) - start )) s)"
  exit 1
}

libasan=$(gcc -print-file-name=libasan.so)
[ -f "$libasan" ] || fail "no libasan.so (gcc -print-file-name=libasan.so gave '$libasan')"

# --- the instrumented build (gcc directly: setup.py's build is optional=True and would only
# warn if the flags failed) ---
inc=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
suffix=$("$PY" -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')
so="$tmp/lib/_speedups$suffix"
mkdir -p "$tmp/lib" "$tmp/site"
gcc -shared -fPIC -O1 -g -Wall -Wextra -Wno-unused-parameter -Wno-missing-field-initializers \
  -fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined \
  -I kvray/_ext -I "$inc" kvray/_ext/speedups.c -o "$so" 2>"$tmp/build.log" \
  || { cat "$tmp/build.log"; fail "the instrumented build failed"; }
if [ -s "$tmp/build.log" ]; then cat "$tmp/build.log"; fi

# Python imports sitecustomize at start-up: it loads the instrumented module as kvray._speedups
# before kvray.core.fast looks for it (which then finds it in sys.modules).
cat >"$tmp/site/sitecustomize.py" <<'EOF'
import importlib.util
import os
import sys

_spec = importlib.util.spec_from_file_location("kvray._speedups", os.environ["KVRAY_SANITIZE_SO"])
_mod = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_mod)
sys.modules["kvray._speedups"] = _mod
EOF

# PYTHONMALLOC=malloc: Python's own small-object allocator would hide the extension's PyMem_*
# buffers from ASan; with malloc every allocation is checked. Leaks are not reported (CPython
# keeps objects alive at exit by design). A report goes to stderr (captured in the logs below)
# and ends the process with exit code 86.
unset KVRAY_PURE_PYTHON
export KVRAY_SANITIZE_SO="$so" PYTHONPATH="$tmp/site" PYTHONMALLOC=malloc
export ASAN_OPTIONS="detect_leaks=0:halt_on_error=1:exitcode=86"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1:exitcode=86"
san() { LD_PRELOAD="$libasan" "$@"; }

# $1: what ran, $2: its log, $3: its exit code.
check() {
  if [ "$3" -eq 86 ] || grep -qE 'ERROR: AddressSanitizer|runtime error:|Sanitizer' "$2"; then
    grep -E -A40 'ERROR: AddressSanitizer|runtime error:|Sanitizer' "$2" | head -n 80
    fail "sanitizer report during $1 (above)"
  fi
  [ "$3" -eq 0 ] || { tail -n 40 "$2"; fail "$1 (exit $3)"; }
}

san "$PY" -c 'from kvray.core import fast; print(fast._speedups.__file__)' >"$tmp/load.log" 2>&1
check "import" "$tmp/load.log" $?
[ "$(cat "$tmp/load.log")" = "$so" ] \
  || fail "kvray.core.fast loaded $(cat "$tmp/load.log"), not the instrumented build"

# --- 1. test_fast under the sanitizers (--capture=sys: pytest's default fd capture would swallow
# a report printed to file descriptor 2 by a process that then exits) ---
san "$PY" -m pytest -q -p no:cacheprovider --capture=sys tests/unit/test_fast.py tests/unit/test_frame_path.py tests/unit/test_zmq_source.py >"$tmp/pytest.log" 2>&1
check "test_fast" "$tmp/pytest.log" $?
tail -n 1 "$tmp/pytest.log"
tests=$(grep -Eo '[0-9]+ passed' "$tmp/pytest.log" | tail -n 1)

# --- 2. the differential fuzz under the sanitizers ---
san "$PY" benchmarks/fuzz_decoder.py --native --n "$N" >"$tmp/fuzz.log" 2>&1
check "the native fuzz" "$tmp/fuzz.log" $?
tail -n 1 "$tmp/fuzz.log"
fuzz=$(grep -Eo '[0-9,]+ inputs, [0-9]+ mismatches' "$tmp/fuzz.log")

echo "sanitize: OK - ASan+UBSan build of kvray/_ext/speedups.c: test_fast + test_frame_path + test_zmq_source $tests;" \
  "native fuzz $fuzz; no sanitizer reports ($(( $(date +%s) - start )) s)"
