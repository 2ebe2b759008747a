#!/usr/bin/env bash
# Runs once, on the first start of an empty data directory (postgres image entrypoint): creates
# the read-only role the Grafana datasource logs in as. Password: GRAFANA_DB_PASSWORD (empty: the
# role gets none and cannot log in until `ALTER ROLE grafana_ro PASSWORD '...'`).
set -euo pipefail
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
    -v ro_password="${GRAFANA_DB_PASSWORD:-}" \
    -f "$(dirname "${BASH_SOURCE[0]}")/grafana-ro.psql"
