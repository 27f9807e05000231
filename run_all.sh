#!/usr/bin/env bash
# Does it block? Every scenario under gunicorn, load.py against each, one summary table.
#
#   ./run_all.sh                                        # default scenarios, N=5, S=1
#   ./run_all.sh --requests 100 --seconds 1 --json results.json
#   ./run_all.sh --scenario green --scenario green-pool --requests 30   # a subset
#   ./run_all.sh --workers 4                            # W gunicorn workers per scenario
#   sudo ./run_all.sh --rtt 5                           # app and PostgreSQL 5 ms apart
#   ./run_all.sh --rate 30 --duration 10                # a stream, not a burst: p99 under load
#   ./run_all.sh --serve green [--port 8000]            # serve one until Ctrl-C, for load.py
#   ./run_all.sh --test [pytest arguments]              # the tests (-m "not slow": seconds)
#   ./run_all.sh --audit MODULE:APP [audit.py flags]    # which routes of YOUR app block
#
# Reads DATABASE_URL (unset: a throwaway PostgreSQL is started and removed), POOL_SIZE,
# MAX_OVERFLOW, POOL_TIMEOUT and the rest of models.py's variables, PYTHON (the interpreter
# that creates .venv, default python3). The summary goes to stdout, everything else to stderr.
# Exit status: 0 when every row is as expected, 1 when not, 2 on bad usage, 130/143 on signals.
set -euo pipefail
caller_dir=$PWD
cd "$(dirname "$0")"

venv=.venv py=.venv/bin/python
size=() scenarios=() json=() port=() serve=""  # checked by Python (kit.run plan), not here

say() { printf 'run_all: %s\n' "$*" >&2; }
usage() { sed -n '2,17s/^# \{0,1\}//p' "$0" >&2; exit 2; }

# setup: a .venv from the pinned requirements, made again when they change; a .pth file puts
# this folder on its path, so `python bench/...` and the tests import models and kit.
ensure_venv() {
  if [[ -x $py ]] && cat requirements*.txt | cmp -s - "$venv/.requirements"; then return; fi
  local python=${PYTHON:-python3} version
  version=$("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null) \
    || { say "cannot run '$python': set PYTHON= to a Python 3.11 or newer"; exit 2; }
  if [[ ${version%%.*} -lt 3 || ( ${version%%.*} -eq 3 && ${version#*.} -lt 11 ) ]]; then
    say "'$python' is Python $version; the pins (SQLAlchemy 2.1) need 3.11 or newer: PYTHON=python3.12 $0"
    exit 2
  fi
  say "installing the pinned requirements into $venv (once, Python $version)"
  "$python" -m venv "$venv"
  "$py" -m pip install -q --disable-pip-version-check -r requirements-test.txt >&2
  "$py" -c 'import site, sys; open(site.getsitepackages()[0] + "/kit-root.pth", "w").write(sys.argv[1])' "$PWD"
  cat requirements*.txt >"$venv/.requirements"
}

while (($#)); do
  case $1 in
    --requests|--seconds|--workers|--rtt|--rate|--duration) size+=("$1" "${2:?$1 needs a value}"); shift 2 ;;
    --scenario) scenarios+=(--scenario "${2:?}"); shift 2 ;;
    --json) json=(--json "${2:?}"); [[ $2 == /* ]] || json=(--json "$caller_dir/$2"); shift 2 ;;
    --serve) serve=${2:?--serve needs a scenario}; shift 2 ;;
    --port) port=(--port "${2:?--port needs a number}"); shift 2 ;;
    --test) shift; ensure_venv; exec "$py" -m pytest "$@" ;;
    --audit) shift; ensure_venv; kit=$PWD; cd "$caller_dir"; exec "$kit/$py" "$kit/audit.py" "$@" ;;
    -h|--help) usage ;;
    *) say "unknown argument: $1"; usage ;;
  esac
done
ensure_venv
export PATH="$PWD/$venv/bin:$PATH"
mapfile -t picked < <(python -m kit.run plan ${serve:+--serve "$serve"} "${scenarios[@]}" \
  "${port[@]}" "${size[@]}")
((${#picked[@]})) || exit 2

# Everything started below is stopped, and the temporary folder removed, on every exit path.
tmp=$(mktemp -d "${TMPDIR:-/tmp}/run_all.XXXXXX")
running=""  # the step in progress, if any: a finished step's pid may belong to someone else
cleanup() {
  local status=$?
  trap - EXIT INT TERM
  if [[ -n $running ]]; then kill -TERM "$running" 2>/dev/null || true; wait "$running" 2>/dev/null || true; fi
  python -m kit.pg stop "$tmp/pg.json" || true
  rm -rf "$tmp"
  exit "$status"
}
trap cleanup EXIT
trap 'say "interrupted"; exit 130' INT
trap 'say "terminated"; exit 143' TERM

# step NAME CMD...: run in the background, so a signal is handled at once; on failure the
# run stops with the step's name and the tail of its output.
step() {
  local name=$1 status=0; shift
  "$@" 2> >(tee "$tmp/step.log" >&2) & running=$!
  wait "$running" || status=$?
  running=""
  if ((status)); then say "step '$name' failed (exit $status):"; tail -n 5 "$tmp/step.log" >&2; exit 1; fi
}

# 1. the database: DATABASE_URL, or a throwaway PostgreSQL of our own (its watchdog stops it
#    and removes $tmp should this script be killed before its cleanup can run)
if [[ -z ${DATABASE_URL:-} ]]; then
  step "start PostgreSQL" python -m kit.pg start "$tmp/pg.json" --owner $$ --cleanup "$tmp" >"$tmp/url"
  DATABASE_URL=$(<"$tmp/url"); export DATABASE_URL
fi
# 2. the todos
step "seed the database" python seed.py >&2
# 3. each scenario under gunicorn, with load.py's results as parts for the summary
if [[ -n $serve ]]; then
  step "serve $serve" python -m kit.run serve "$serve" "${port[@]}" "${size[@]}"
  exit 0
fi
mkdir "$tmp/parts"
for name in "${picked[@]}"; do
  step "scenario $name" python -m kit.run one "$name" --parts "$tmp/parts" "${size[@]}" >&2
done
# 4. the summary, to stdout
python -m kit.summary "$tmp/parts" "${size[@]}" "${json[@]}"
