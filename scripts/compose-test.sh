#!/usr/bin/env bash
# Runs the workshop of examples/workshop in Docker and tests it end to end:
#   1. installs Docker and docker-compose from Debian if missing and starts
#      the daemon if it is not running (stopped again at the end if this
#      script started it);
#   2. makes the base images on this machine (scripts/compose/images.sh: no
#      registry needed) and builds the gateway and GPU worker images with
#      docker-compose;
#   3. `docker-compose up -d`, then the Go tests of e2e/compose against the
#      gateway published on 127.0.0.1 (two participants, a GPU worker killed
#      mid-job);
#   4. tears the stack down — containers, networks, volumes — also when a
#      step fails (after printing the containers' logs).
# scripts/test.sh runs it when CI=true or COMFYUME_COMPOSE=1. Needs root (or
# a user in the docker group, with Docker installed), go and python3.
# Extra arguments go to `go test` (e.g. -run TestWorkshopTwoParticipants).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
start=$SECONDS
step() { printf '\n=== compose: %s\n' "$*"; }
took() { printf '=== compose: %s took %ds\n' "$1" "$((SECONDS - $2))"; }

cleanup_fns=()
run_cleanup() {
	local i
	for ((i = ${#cleanup_fns[@]} - 1; i >= 0; i--)); do
		"${cleanup_fns[i]}" || true
	done
	cleanup_fns=()
}
trap run_cleanup EXIT

# --- Docker --------------------------------------------------------------
step "Docker"
t=$SECONDS
if ! command -v dockerd >/dev/null || ! command -v docker-compose >/dev/null; then
	if [[ $(id -u) -ne 0 ]] || ! command -v apt-get >/dev/null; then
		echo "compose-test.sh: needs docker.io and docker-compose (apt-get install docker.io docker-compose, as root)" >&2
		exit 1
	fi
	apt-get update -qq
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends docker.io docker-compose
fi
# Debian's client matches Debian's daemon (API 1.41); a newer client
# elsewhere on PATH may not talk to it.
DOCKER=docker
[[ -x /usr/bin/docker ]] && DOCKER=/usr/bin/docker
export DOCKER
stop_dockerd() {
	kill "$dockerd_pid" 2>/dev/null || true
	wait "$dockerd_pid" 2>/dev/null || true
}
if ! "$DOCKER" info >/dev/null 2>&1; then
	dockerd_log="$(mktemp "${TMPDIR:-/tmp}/comfyume-dockerd.XXXXXX")"
	echo "starting dockerd (log: $dockerd_log)"
	dockerd >"$dockerd_log" 2>&1 &
	dockerd_pid=$!
	cleanup_fns+=(stop_dockerd)
	for ((i = 0; i < 120; i++)); do
		"$DOCKER" info >/dev/null 2>&1 && break
		if ! kill -0 "$dockerd_pid" 2>/dev/null; then
			echo "dockerd exited:" >&2
			tail -n 30 "$dockerd_log" >&2
			exit 1
		fi
		sleep 0.5
	done
	"$DOCKER" info >/dev/null
fi
echo "$("$DOCKER" version --format 'Docker {{.Server.Version}} (API {{.Server.APIVersion}})'), $(docker-compose version --short 2>/dev/null || docker-compose version | head -n 1)"
took "Docker" "$t"

# --- Images --------------------------------------------------------------
# The gateway image builds the Caddy release xcaddy.json pins.
want="$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["caddy"])' xcaddy.json)"
if ! grep -qx "ARG COMFYUME_CADDY_VERSION=$want" examples/workshop/Dockerfile.gateway; then
	echo "compose-test.sh: examples/workshop/Dockerfile.gateway does not build Caddy $want (xcaddy.json)" >&2
	exit 1
fi
step "base images made on this machine"
t=$SECONDS
# shellcheck source=compose/images.sh
source scripts/compose/images.sh
make_base_images "$root"
took "base images" "$t"

# The stack's secrets: fresh for every run.
rand() { od -An -N"$1" -tx1 /dev/urandom | tr -d ' \n'; }
export WORKER_TOKEN S3_ACCESS_KEY S3_SECRET_KEY GATEWAY_PORT
WORKER_TOKEN="$(rand 24)"
S3_ACCESS_KEY="comfyume$(rand 6)"
S3_SECRET_KEY="$(rand 20)"
for _ in 1 2 3 4 5 6 7 8 9 10; do
	GATEWAY_PORT=$((20000 + RANDOM % 40000))
	(exec 3<>"/dev/tcp/127.0.0.1/$GATEWAY_PORT") 2>/dev/null || break
done
export COMPOSE_DOCKER_CLI_BUILD=0 # docker-compose's own builder: no buildx needed
project="comfyume-ci-$$"
compose=(docker-compose --ansi never -p "$project" -f "$root/examples/workshop/docker-compose.yml")

step "docker-compose build"
t=$SECONDS
# The GPU worker image copies the binary out of the gateway image: first.
"${compose[@]}" build gateway
"${compose[@]}" build gpu-1 gpu-2
took "image builds" "$t"

# --- The stack -------------------------------------------------------------
teardown() {
	if [[ -n "${failed:-}" ]]; then
		echo "=== compose: the containers' logs" >&2
		"${compose[@]}" logs --no-color --tail 200 >&2 || true
	fi
	"${compose[@]}" down -v --remove-orphans --timeout 5 || true
}
failed=1
cleanup_fns+=(teardown)
step "docker-compose up -d (gateway on 127.0.0.1:$GATEWAY_PORT)"
t=$SECONDS
"${compose[@]}" up -d
took "up" "$t"

step "go test ./e2e/compose"
t=$SECONDS
COMFYUME_COMPOSE_URL="http://127.0.0.1:$GATEWAY_PORT" \
	COMFYUME_COMPOSE_CMD="${compose[*]}" \
	go test -count=1 -v -timeout 20m "$@" ./e2e/compose/
took "go test ./e2e/compose" "$t"
failed=
step "tear down"
t=$SECONDS
run_cleanup
took "tear down" "$t"
echo "=== compose: the whole compose test took $((SECONDS - start))s"
