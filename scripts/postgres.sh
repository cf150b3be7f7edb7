#!/usr/bin/env bash
# PostgreSQL on 127.0.0.1 for the test that runs the pipeline against PostgreSQL-backed Prefect and
# MLflow servers (Debian's package; needs root). Prints the URL the tests read from
# QLORA_TEST_POSTGRES:  export QLORA_TEST_POSTGRES=$(bash scripts/postgres.sh)
set -euo pipefail
if ! command -v pg_ctlcluster >/dev/null 2>&1; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql) >&2
fi
version=$(ls /usr/lib/postgresql | sort -n | tail -1)
if ! pg_lsclusters -h | grep -q "^${version} main"; then
  pg_createcluster "$version" main >&2
fi
pg_ctlcluster "$version" main start >&2 2>/dev/null || true   # already running is fine
for _ in $(seq 30); do pg_isready -q -h 127.0.0.1 && break; sleep 1; done
runuser -u postgres -- psql -q -h 127.0.0.1 -c "SELECT 1" >/dev/null 2>&1 || true
runuser -u postgres -- psql -q -c "DO \$\$BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'qlora') THEN
  CREATE ROLE qlora LOGIN SUPERUSER PASSWORD 'qlora'; END IF; END\$\$;" >&2
echo "postgresql://qlora:qlora@127.0.0.1:5432"
