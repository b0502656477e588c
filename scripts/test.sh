#!/usr/bin/env bash
# The whole test suite on a fresh machine: installs the dev requirements, makes sure a Redis
# server is there for the tests (the local one, or a throwaway one started here), runs pytest
# with coverage.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/venv.sh requirements-dev.txt

redis_up() { .venv/bin/python - "$1" <<'PY'
import sys, redis
try:
    redis.Redis.from_url(sys.argv[1], socket_connect_timeout=1).ping()
except Exception:
    sys.exit(1)
PY
}

if ! command -v redis-server >/dev/null 2>&1; then
  # Some tests start their own redis-server processes (outage and restart tests).
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing Debian's redis-server package for the tests" >&2
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server) >/dev/null
  else
    echo "The tests need redis-server: install it (Debian/Ubuntu: apt-get install redis-server;" \
         "macOS: brew install redis) and run again." >&2
    exit 1
  fi
fi

export TEST_REDIS_URL="${TEST_REDIS_URL:-redis://127.0.0.1:6379/0}"
throwaway=""
if ! redis_up "$TEST_REDIS_URL"; then
  port=$(.venv/bin/python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  dir=$(mktemp -d)
  redis-server --port "$port" --bind 127.0.0.1 --save "" --appendonly no --dir "$dir" \
    --daemonize yes --pidfile "$dir/redis.pid" --logfile "$dir/redis.log"
  throwaway="$dir"
  trap 'kill "$(cat "$throwaway/redis.pid")" 2>/dev/null || true; rm -rf "$throwaway"' EXIT
  export TEST_REDIS_URL="redis://127.0.0.1:$port/0"
  for _ in $(seq 50); do redis_up "$TEST_REDIS_URL" && break; sleep 0.1; done
  echo "started a throwaway redis-server for the tests at $TEST_REDIS_URL" >&2
fi

# Two processes at a time (the tests mostly wait on servers), and the coverage of the package,
# also of the servers and workers the tests start, printed at the end and in htmlcov/.
.venv/bin/python -m pytest --numprocesses auto --maxprocesses 4 \
  --cov=conversational_core --cov-report=term --cov-report=html "$@"
