#!/usr/bin/env bash
# Stop the brokers started by scripts/kafka-up.sh, by their pid files. Idempotent.
#
#   scripts/kafka-down.sh [tansu] [noida]     (default: both)
#
# Naming one broker restarts just that one together with kafka-up.sh (which starts only
# brokers whose port does not answer): the broker restart test stops noida alone this way.
set -uo pipefail
cd "$(dirname "$0")/.."
DATA="${KAFKA_DATA_DIR:-$PWD/.kafka-data}"
names=("$@")
[ ${#names[@]} -eq 0 ] && names=(tansu noida)
for name in "${names[@]}"; do
    case "$name" in
        tansu | noida) ;;
        *) echo "kafka-down: unknown broker $name (tansu or noida)" >&2; exit 2 ;;
    esac
    pidfile="$DATA/$name.pid"
    if [ -f "$pidfile" ]; then
        start-stop-daemon --stop --oknodo --retry TERM/30/KILL/5 --pidfile "$pidfile" --remove-pidfile \
            >/dev/null
        echo "kafka-down: $name stopped"
    else
        echo "kafka-down: $name not running (no $pidfile)"
    fi
done
