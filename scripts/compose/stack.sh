# shellcheck shell=bash
# The workshop of examples/workshop, running in Docker for the tests. Source
# this file, then call start_workshop ROOT; it follows the contract of
# scripts/services/ (appends its stop function to cleanup_fns, never exits
# the caller's shell):
#   1. installs Docker and docker-compose from Debian if missing and starts
#      the daemon if it is not running (stopped again by the cleanup);
#   2. makes the base images on this machine (scripts/compose/images.sh: no
#      registry needed) and builds the gateway and GPU worker images with
#      docker-compose;
#   3. `docker-compose up -d`, the gateway published on 127.0.0.1:<free port>,
#      and exports what e2e/compose's tests read:
#        COMFYUME_COMPOSE_URL  the gateway, http://127.0.0.1:<port>
#        COMFYUME_COMPOSE_CMD  the stack's docker-compose command line
# The cleanup prints the containers' logs if WORKSHOP_FAILED is set, then
# removes the stack: containers, networks, volumes.
# Needs root (or a user in the docker group, with Docker installed), go and
# python3.

_ws_step() { printf '=== workshop: %s\n' "$*"; }

_ws_docker() {
	if ! command -v dockerd >/dev/null || ! command -v docker-compose >/dev/null; then
		if [[ $(id -u) -ne 0 ]] || ! command -v apt-get >/dev/null; then
			echo "workshop: needs docker.io and docker-compose (apt-get install docker.io docker-compose, as root)" >&2
			return 1
		fi
		apt-get update -qq &&
			DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends docker.io docker-compose ||
			return 1
	fi
	# Debian's client matches Debian's daemon (API 1.41).
	DOCKER=docker
	[[ -x /usr/bin/docker ]] && DOCKER=/usr/bin/docker
	export DOCKER
	if ! "$DOCKER" info >/dev/null 2>&1; then
		_ws_dockerd_log="$(mktemp "${TMPDIR:-/tmp}/comfyume-dockerd.XXXXXX")"
		echo "workshop: starting dockerd (log: $_ws_dockerd_log)"
		dockerd >"$_ws_dockerd_log" 2>&1 &
		_ws_dockerd_pid=$!
		cleanup_fns+=(_ws_stop_dockerd)
		local i
		for ((i = 0; i < 120; i++)); do
			"$DOCKER" info >/dev/null 2>&1 && break
			if ! kill -0 "$_ws_dockerd_pid" 2>/dev/null; then
				echo "workshop: dockerd exited:" >&2
				tail -n 30 "$_ws_dockerd_log" >&2
				return 1
			fi
			sleep 0.5
		done
		"$DOCKER" info >/dev/null || return 1
	fi
	echo "workshop: $("$DOCKER" version --format 'Docker {{.Server.Version}} (API {{.Server.APIVersion}})'), docker-compose $(docker-compose version --short 2>/dev/null)"
}

_ws_stop_dockerd() {
	[[ -n "${_ws_dockerd_pid:-}" ]] || return 0
	kill "$_ws_dockerd_pid" 2>/dev/null || true
	wait "$_ws_dockerd_pid" 2>/dev/null || true
	_ws_dockerd_pid=
}

_ws_rand() { od -An -N"$1" -tx1 /dev/urandom | tr -d ' \n'; }

start_workshop() {
	local root t start=$SECONDS
	root="$(cd "$1" && pwd)" || return 1
	t=$SECONDS
	_ws_docker || return 1
	_ws_step "Docker ready in $((SECONDS - t))s"

	# The gateway image builds the Caddy release xcaddy.json pins.
	local want
	want="$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["caddy"])' "$root/xcaddy.json")" || return 1
	if ! grep -qx "ARG COMFYUME_CADDY_VERSION=$want" "$root/examples/workshop/Dockerfile.gateway"; then
		echo "workshop: examples/workshop/Dockerfile.gateway does not build Caddy $want (xcaddy.json)" >&2
		return 1
	fi
	t=$SECONDS
	# shellcheck source=images.sh
	source "$root/scripts/compose/images.sh"
	make_base_images "$root" || return 1
	_ws_step "base images made in $((SECONDS - t))s"

	# The stack's secrets: fresh for every run.
	export WORKER_TOKEN S3_ACCESS_KEY S3_SECRET_KEY GATEWAY_PORT
	WORKER_TOKEN="$(_ws_rand 24)"
	S3_ACCESS_KEY="comfyume$(_ws_rand 6)"
	S3_SECRET_KEY="$(_ws_rand 20)"
	local try
	for try in 1 2 3 4 5 6 7 8 9 10; do
		GATEWAY_PORT=$((20000 + RANDOM % 40000))
		(exec 3<>"/dev/tcp/127.0.0.1/$GATEWAY_PORT") 2>/dev/null || break
	done
	export COMPOSE_DOCKER_CLI_BUILD=0 # docker-compose's own builder: no buildx needed
	_ws_compose=(docker-compose --ansi never -p "comfyume-test-$$" -f "$root/examples/workshop/docker-compose.yml")

	t=$SECONDS
	echo "workshop: building the gateway image (compiles Caddy inside Docker: minutes)"
	# The GPU worker image copies the binary out of the gateway image: first.
	"${_ws_compose[@]}" build gateway || return 1
	"${_ws_compose[@]}" build gpu-1 gpu-2 || return 1
	_ws_step "images built in $((SECONDS - t))s"

	cleanup_fns+=(stop_workshop)
	t=$SECONDS
	"${_ws_compose[@]}" up -d || return 1
	export COMFYUME_COMPOSE_URL="http://127.0.0.1:$GATEWAY_PORT"
	export COMFYUME_COMPOSE_CMD="${_ws_compose[*]}"
	_ws_step "up in $((SECONDS - t))s, gateway on $COMFYUME_COMPOSE_URL ($((SECONDS - start))s in all)"
}

stop_workshop() {
	[[ -n "${_ws_compose+set}" ]] || return 0
	if [[ -n "${WORKSHOP_FAILED:-}" ]]; then
		echo "=== workshop: the containers' logs" >&2
		"${_ws_compose[@]}" logs --no-color --tail 200 >&2 || true
	fi
	"${_ws_compose[@]}" down -v --remove-orphans --timeout 5 >/dev/null 2>&1 || true
	unset _ws_compose
}
