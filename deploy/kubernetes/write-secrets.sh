#!/bin/sh
# Writes the env files the overlays' secretGenerators read, with fresh random tokens:
#   deploy/kubernetes/write-secrets.sh dev
#   REFIT_DATABASE_URL=postgresql+psycopg://user:pw@host:5432/refit deploy/kubernetes/write-secrets.sh production
# The files are git-ignored; an existing file is kept (delete it to rotate the tokens).
set -eu
overlay="${1:?usage: write-secrets.sh dev|production}"
dir="$(dirname "$0")/overlays/$overlay"
[ -d "$dir" ] || { echo "write-secrets: no overlay $dir" >&2; exit 1; }
token() { od -An -N24 -tx1 /dev/urandom | tr -d ' \n'; }
umask 077
if [ "$overlay" = dev ]; then
    if [ ! -e "$dir/postgres.env" ]; then
        echo "postgres-password=$(token)" > "$dir/postgres.env"
    fi
    password="$(sed -n 's/^postgres-password=//p' "$dir/postgres.env")"
    url="postgresql+psycopg://refit:${password}@refit-postgres:5432/refit"
else
    url="${REFIT_DATABASE_URL:?set REFIT_DATABASE_URL to the external database, postgresql+psycopg://...}"
fi
if [ -e "$dir/refit.env" ]; then
    echo "write-secrets: $dir/refit.env exists; kept it"
else
    printf 'admin-token=%s\nfeedback-key=%s\ndatabase-url=%s\n' "$(token)" "$(token)" "$url" > "$dir/refit.env"
    echo "write-secrets: wrote $dir/refit.env (admin-token: sed -n 's/^admin-token=//p' $dir/refit.env)"
fi
