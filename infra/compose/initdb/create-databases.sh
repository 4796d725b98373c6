#!/bin/bash
# Create one database per service named in POSTGRES_MULTIPLE_DATABASES (comma-separated).
set -euo pipefail
for db in ${POSTGRES_MULTIPLE_DATABASES//,/ }; do
  psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" -c "CREATE DATABASE $db;"
done
