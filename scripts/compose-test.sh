#!/usr/bin/env bash
# Runs the workshop of examples/workshop in Docker and tests it end to end:
# scripts/compose/stack.sh's start_workshop installs Docker if needed, makes
# the base images on this machine (no registry), builds the gateway and GPU
# worker images and brings the stack up; then e2e/compose's tests run
# through the published gateway (two participants, a GPU worker killed
# mid-job); the stack is torn down at the end, also on failure (after
# printing the containers' logs). scripts/test.sh does the same within its
# own run when CI=true or COMFYUME_COMPOSE=1.
# Extra arguments go to `go test` (e.g. -run TestWorkshopTwoParticipants).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
start=$SECONDS
cleanup_fns=()
run_cleanup() {
	local i
	for ((i = ${#cleanup_fns[@]} - 1; i >= 0; i--)); do
		"${cleanup_fns[i]}" || true
	done
	cleanup_fns=()
}
trap run_cleanup EXIT

# shellcheck source=compose/stack.sh
source scripts/compose/stack.sh
start_workshop "$root"

t=$SECONDS
WORKSHOP_FAILED=1
go test -count=1 -v -timeout 20m "$@" ./e2e/compose/
WORKSHOP_FAILED=
echo "=== workshop: go test ./e2e/compose took $((SECONDS - t))s"
t=$SECONDS
run_cleanup
echo "=== workshop: torn down in $((SECONDS - t))s; the whole compose test took $((SECONDS - start))s"
