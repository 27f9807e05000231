#!/usr/bin/env bash
# Does it block? Every scenario under gunicorn, load.py against each, one summary table.
#
#   ./run_all.sh                                        # default scenarios, N=5, S=1
#   ./run_all.sh --requests 100 --seconds 1 --json results.json
#   ./run_all.sh --scenario green --scenario green-pool --requests 30   # a subset
#   ./run_all.sh --workers 4                            # W gunicorn workers per scenario
#   ./run_all.sh --test [pytest arguments]              # run the tests instead
#
# Reads DATABASE_URL (unset: a throwaway PostgreSQL is started and removed), POOL_SIZE,
# MAX_OVERFLOW, POOL_TIMEOUT and the rest of models.py's variables, PYTHON (the interpreter
# that creates .venv, default python3). The summary goes to stdout, everything else to stderr.
# Exit status: 0 when every row is as expected, 1 when not, 2 on bad usage, 130/143 on signals.
set -euo pipefail
caller_dir=$PWD
cd "$(dirname "$0")"

requests=5 seconds=1 workers=1 json="" scenarios=()
venv=.venv py=.venv/bin/python

say() { printf 'run_all: %s\n' "$*" >&2; }
usage() { sed -n '2,13s/^# \{0,1\}//p' "$0" >&2; exit 2; }

# setup: a .venv from the pinned requirements, made again when they change.
ensure_venv() {
  if [[ -x $py ]] && cat requirements*.txt | cmp -s - "$venv/.requirements"; then return; fi
  say "installing the pinned requirements into $venv (once)"
  "${PYTHON:-python3}" -m venv "$venv"
  "$py" -m pip install -q --disable-pip-version-check -r requirements-test.txt >&2
  cat requirements*.txt >"$venv/.requirements"
}

while (($#)); do
  case $1 in
    --requests) requests=${2:?}; shift 2 ;;
    --seconds) seconds=${2:?}; shift 2 ;;
    --workers) workers=${2:?}; shift 2 ;;
    --json) json=${2:?}; [[ $json == /* ]] || json="$caller_dir/$json"; shift 2 ;;
    --scenario) scenarios+=("${2:?}"); shift 2 ;;
    --test) shift; ensure_venv; exec "$py" -m pytest "$@" ;;
    -h|--help) usage ;;
    *) say "unknown argument: $1"; usage ;;
  esac
done
[[ $requests =~ ^[1-9][0-9]*$ && $workers =~ ^[1-9][0-9]*$ ]] \
  || { say "--requests and --workers take a whole number >= 1"; exit 2; }
[[ $seconds =~ ^[0-9]+(\.[0-9]+)?$ ]] || { say "--seconds takes a number >= 0"; exit 2; }
ensure_venv
export PATH="$PWD/$venv/bin:$PATH"
mapfile -t picked < <(python -m kit.scenarios names "${scenarios[@]}") || exit 2
((${#picked[@]})) || exit 2

# Everything started below is stopped, and the temporary folder removed, on every exit path.
tmp=$(mktemp -d "${TMPDIR:-/tmp}/run_all.XXXXXX")
pids=()
cleanup() {
  local status=$?
  trap - EXIT INT TERM
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  python -m kit.pg stop "$tmp/pg.json" || true
  rm -rf "$tmp"
  exit "$status"
}
trap cleanup EXIT
trap 'say "interrupted"; exit 130' INT
trap 'say "terminated"; exit 143' TERM

# run NAME CMD...: a step in the background, so a signal is handled at once; on failure the
# run stops with the step's name and the tail of its log.
run() {
  local name=$1 status=0; shift
  "$@" > >(tee "$tmp/step.log" >&2) 2>&1 & pids+=($!)
  wait "$!" || status=$?
  if ((status)); then say "step '$name' failed (exit $status):"; tail -n 5 "$tmp/step.log" >&2; exit 1; fi
}

if [[ -z ${DATABASE_URL:-} ]]; then
  python -m kit.pg start "$tmp/pg.json" >"$tmp/url" 2> >(tee "$tmp/step.log" >&2) & pids+=($!)
  wait "$!" || { say "step 'start PostgreSQL' failed"; exit 1; }
  DATABASE_URL=$(<"$tmp/url"); export DATABASE_URL
fi
run "seed the database" python seed.py
KIT_PG_VERSION=$(python -c 'from models import engine; from sqlalchemy import text
with engine.connect() as c: print(c.scalar(text("SHOW server_version")).split()[0])')
export KIT_PG_VERSION="PostgreSQL $KIT_PG_VERSION"

# wait_ready URL PID LOG: poll /health for at most 30 s while gunicorn is alive.
wait_ready() {
  local deadline=$((SECONDS + 30))
  until python -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=1)' \
      "$1/health" 2>/dev/null; do
    kill -0 "$2" 2>/dev/null || { say "gunicorn exited during start-up:"; tail -n 5 "$3" >&2; return 1; }
    ((SECONDS < deadline)) || { say "gunicorn not ready after 30 s:"; tail -n 5 "$3" >&2; return 1; }
    sleep 0.2
  done
}

mkdir "$tmp/parts"
ran_runners=" "
for name in "${picked[@]}"; do
  runner=$(python -m kit.scenarios runner "$name")
  if [[ -n $runner ]]; then  # a scenario that needs servers of its own (outage, pgbouncer)
    [[ $ran_runners == *" $runner "* ]] && continue
    ran_runners+="$runner "
    say "scenario $name: python -m $runner"
    python -m "$runner" --requests "$requests" --seconds "$seconds" --parts "$tmp/parts" >&2 &
    pids+=($!)
    wait "$!" || say "scenario $name: $runner failed; see above"
    continue
  fi
  if ! python -m kit.scenarios budget "$name" --requests "$requests" --workers "$workers" \
      2>"$tmp/parts/$name.refused" >&2; then
    say "$(cat "$tmp/parts/$name.refused")"; continue
  fi
  rm -f "$tmp/parts/$name.refused"
  port=$(python -c 'from kit.pg import free_port; print(free_port())')
  mapfile -t argv < <(python -m kit.scenarios command "$name" --port "$port" \
    --requests "$requests" --workers "$workers" --seconds "$seconds")
  say "scenario $name: ${argv[*]}"
  log="$tmp/$name.log"
  "${argv[@]}" >"$log" 2>&1 & gunicorn=$! pids+=("$gunicorn")
  wait_ready "http://127.0.0.1:$port" "$gunicorn" "$log" || exit 1
  for endpoint in python postgres; do
    expect=$(python -m kit.scenarios expect "$name" "$endpoint" --requests "$requests" \
      --workers "$workers")
    before=$(grep -c 'appears to be blocked' "$log" || true)
    load_status=0
    python load.py "$requests" --url "http://127.0.0.1:$port" --endpoint "$endpoint" \
      --seconds "$seconds" --expect-concurrency "$expect" --no-lines \
      --timeout $((requests * (${seconds%.*} + 2) + 30)) \
      --json "$tmp/parts/$name.$endpoint.json" >&2 & pids+=($!)
    wait "$!" || load_status=$?
    ((load_status <= 1)) || { say "load.py failed on $name/$endpoint (exit $load_status)"; exit 1; }
    echo $(($(grep -c 'appears to be blocked' "$log" || true) - before)) >"$tmp/parts/$name.$endpoint.hub"
  done
  kill -TERM "$gunicorn"; wait "$gunicorn" || true
done

python -m kit.summary "$tmp/parts" --requests "$requests" --seconds "$seconds" \
  --workers "$workers" ${json:+--json "$json"}
