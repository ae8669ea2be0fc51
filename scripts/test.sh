#!/usr/bin/env bash
# Run the test suite. Tests start their own redis-server, SeaweedFS S3 server and Celery
# workers on free loopback ports; nothing else needs to be running.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH"
.venv/bin/ruff check .
exec .venv/bin/pytest -q -p no:cacheprovider "$@"
