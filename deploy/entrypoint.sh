#!/bin/sh
# Start command of the refit image (Dockerfile CMD) and of the Kubernetes init Job.
#
#   entrypoint.sh [serve]  make sure the registry has a current model (training the default one
#                          from ENTRYPOINT_TRAIN_DATA when it has none), then exec bentoml serve
#   entrypoint.sh init     the same check and training, then exit 0 (the Kubernetes init Job)
#   entrypoint.sh wait     wait up to ENTRYPOINT_WAIT_SECONDS for another process (the init Job)
#                          to promote a model, never training (the Deployment's initContainer)
#
# Whatever prevents a model from being there stops the container with a non-zero exit and one
# line saying why, instead of a server that answers 503 forever. Run from the project root
# (the image's WORKDIR), where bentofile.yaml is. Variables are not REFIT_* on purpose: refit
# warns about REFIT_* variables that name no setting.
set -eu

mode="${1:-serve}"
registry="${REFIT_REGISTRY_PATH:-model_registry}"
train_data="${ENTRYPOINT_TRAIN_DATA:-data/demo/intents.jsonl}"
port="${ENTRYPOINT_PORT:-3000}"
wait_seconds="${ENTRYPOINT_WAIT_SECONDS:-900}"

fail() {
    echo "refit entrypoint: $*" >&2
    exit 1
}

# Prints the current version and exits 0, exits 1 when there is none, 2 when the registry
# cannot be read.
current_version() {
    python -c '
import sys
from adapters.serving.registry import ModelRegistry
try:
    pointer = ModelRegistry(sys.argv[1]).pointer()
except Exception as exc:  # a broken registry is a reason to stop, not to retrain over it
    print(f"{type(exc).__name__}: {exc}", file=sys.stderr)
    sys.exit(2)
if pointer is None:
    sys.exit(1)
print(pointer.version)
' "$registry"
}

ensure_model() {
    status=0
    version="$(current_version)" || status=$?
    if [ "$status" -eq 0 ]; then
        echo "refit entrypoint: registry $registry serves version $version"
        return 0
    fi
    [ "$status" -eq 1 ] || fail "cannot read the model registry at $registry (see above)"
    [ -f "$train_data" ] && [ -r "$train_data" ] \
        || fail "registry $registry has no model and the training data $train_data is not a readable file"
    echo "refit entrypoint: registry $registry has no model; training the default one from $train_data"
    refit train --data "$train_data" --registry "$registry" \
        || fail "registry $registry has no model and 'refit train --data $train_data' failed (see above)"
    version="$(current_version)" \
        || fail "'refit train' finished but registry $registry still has no current version"
    echo "refit entrypoint: trained and promoted version $version"
}

case "$mode" in
    serve)
        ensure_model
        exec bentoml serve . --host 0.0.0.0 --port "$port"
        ;;
    init)
        ensure_model
        ;;
    wait)
        waited=0
        until version="$(current_version)"; do
            [ "$waited" -lt "$wait_seconds" ] \
                || fail "no model in registry $registry after ${wait_seconds}s (is the refit-init Job failing?)"
            sleep 5
            waited=$((waited + 5))
        done
        echo "refit entrypoint: registry $registry serves version $version"
        ;;
    *)
        fail "unknown mode '$mode' (serve, init or wait)"
        ;;
esac
