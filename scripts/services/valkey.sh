# shellcheck shell=bash
# Valkey for the tests: source this file, then call start_valkey.
#
#   source scripts/services/valkey.sh
#   start_valkey            # exports COMFYUME_TEST_VALKEY=127.0.0.1:<port>
#
# start_valkey starts a private Valkey server on 127.0.0.1 at a free port
# (no persistence, no config file, logs in a temporary folder), waits until
# it answers PING and exports its address as COMFYUME_TEST_VALKEY, which the
# Go tests read. Where the server comes from, first that works:
#   1. valkey-server on PATH;
#   2. the copy cached by an earlier run in
#      ${XDG_CACHE_HOME:-$HOME/.cache}/comfyume/valkey;
#   3. Debian's <codename>-backports (valkey-server 8.0 on bookworm):
#      `apt-get download` through a temporary sources list and package lists,
#      so the system's apt sources and lists are untouched; the packages and
#      the libraries the system lacks (libjemalloc2, liblzf1, ...) are
#      unpacked with dpkg-deb -x into that cache and run with
#      LD_LIBRARY_PATH;
#   4. redis-server (7.0 on bookworm), installed with apt-get if missing.
# If COMFYUME_TEST_VALKEY is already set and answers PING, that server is
# used and nothing is started. COMFYUME_DEBIAN_MIRROR overrides the mirror
# used in step 3 (default http://deb.debian.org/debian).
#
# Cleanup contract. start_valkey does not replace the caller's EXIT trap:
#   - it appends its stop function to the array `cleanup_fns` (created if
#     unset); run_cleanup_fns, defined here, calls those functions in reverse
#     order, each once, and is safe to call more than once;
#   - if the shell has no EXIT trap, start_valkey sets `trap run_cleanup_fns
#     EXIT`; if it has one that does not mention run_cleanup_fns, it becomes
#     `run_cleanup_fns; <the old trap>`. A caller that sets its EXIT trap
#     after start_valkey must call run_cleanup_fns from it.
# Other service scripts can follow the same contract (append to cleanup_fns,
# call _services_ensure_exit_trap).
#
# Needs bash, and root with apt-get for steps 3 and 4. Works under
# `set -euo pipefail`.

# run_cleanup_fns calls every function in cleanup_fns, the last added first,
# and empties the array.
run_cleanup_fns() {
	local i
	for ((i = ${#cleanup_fns[@]} - 1; i >= 0; i--)); do
		"${cleanup_fns[i]}" || true
	done
	cleanup_fns=()
}

# _services_ensure_exit_trap makes the shell's EXIT trap call run_cleanup_fns.
_services_ensure_exit_trap() {
	local current
	current="$(trap -p EXIT)"
	if [[ -z "$current" ]]; then
		trap run_cleanup_fns EXIT
		return
	fi
	[[ "$current" == *run_cleanup_fns* ]] && return
	eval "set -- $current" # trap -- 'command' EXIT
	# shellcheck disable=SC2064 # expand the old command now
	trap "run_cleanup_fns; $3" EXIT
}

# _valkey_ping HOST PORT: true if a server there answers PING with PONG.
# Runs in a subshell so the caller's file descriptors are left alone.
_valkey_ping() {
	local reply
	reply="$(
		exec 2>/dev/null
		exec {fd}<>"/dev/tcp/$1/$2" || exit 1
		printf 'PING\r\n' >&"$fd"
		IFS= read -r -t 2 line <&"$fd" && printf '%s' "$line"
	)" || return 1
	[[ "$reply" == "+PONG"* ]]
}

# _valkey_runs BINARY: true if the binary starts (all its libraries found).
_valkey_runs() {
	[[ -x "$1" ]] && LD_LIBRARY_PATH="${_valkey_ld_path:-}" "$1" --version >/dev/null 2>&1
}

# _valkey_from_backports DIR: puts Debian's valkey-server and the libraries
# this system lacks under DIR (usr/bin, usr/lib/<triplet>).
_valkey_from_backports() {
	local dir="$1" mirror="${COMFYUME_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
	local codename tmp pkgs=(valkey-server valkey-tools) lib
	codename="$(. /etc/os-release && echo "${VERSION_CODENAME:-}")"
	[[ -n "$codename" ]] || return 1
	command -v apt-get >/dev/null && command -v dpkg-deb >/dev/null || return 1
	for lib in libjemalloc2 liblzf1 libatomic1 libssl3 libsystemd0 libstdc++6; do
		if [[ "$(dpkg-query -W -f='${Status}' "$lib" 2>/dev/null)" != "install ok installed" ]]; then
			pkgs+=("$lib")
		fi
	done
	tmp="$(mktemp -d)"
	mkdir -p "$tmp/lists/partial" "$tmp/cache/archives/partial" "$tmp/debs"
	printf 'deb %s %s main\ndeb %s %s-backports main\n' "$mirror" "$codename" "$mirror" "$codename" >"$tmp/sources.list"
	local apt=(-o "Dir::Etc::SourceList=$tmp/sources.list" -o Dir::Etc::SourceParts=/dev/null
		-o "Dir::State::Lists=$tmp/lists" -o "Dir::Cache=$tmp/cache" -o APT::Sandbox::User=root
		-o Acquire::Retries=2 -o Acquire::http::Timeout=20)
	echo "valkey: fetching ${pkgs[*]} from $codename-backports ($mirror)"
	if ! apt-get "${apt[@]}" -qq update >"$tmp/apt.log" 2>&1 ||
		! (cd "$tmp/debs" && apt-get "${apt[@]}" -qq download "${pkgs[@]}") >>"$tmp/apt.log" 2>&1; then
		echo "valkey: could not fetch the packages:" >&2
		tail -n 20 "$tmp/apt.log" >&2
		rm -rf "$tmp"
		return 1
	fi
	rm -rf "$dir.new"
	mkdir -p "$dir.new"
	local deb
	for deb in "$tmp"/debs/*.deb; do
		dpkg-deb -x "$deb" "$dir.new" || {
			rm -rf "$tmp" "$dir.new"
			return 1
		}
	done
	rm -rf "$tmp" "$dir"
	mv "$dir.new" "$dir"
}

# _valkey_lib_dirs DIR prints the folders under DIR that hold shared
# libraries, as a LD_LIBRARY_PATH.
_valkey_lib_dirs() {
	[[ -d "$1" ]] || return 0
	find "$1" -name '*.so*' \( -type f -o -type l \) -printf '%h\n' | sort -u | paste -sd: -
}

# _valkey_find_server sets _valkey_bin (and _valkey_ld_path) to a usable
# server binary, fetching one if needed.
_valkey_find_server() {
	local cache="${XDG_CACHE_HOME:-$HOME/.cache}/comfyume/valkey"
	_valkey_ld_path=""
	if command -v valkey-server >/dev/null && _valkey_runs "$(command -v valkey-server)"; then
		_valkey_bin="$(command -v valkey-server)"
		return
	fi
	_valkey_bin="$cache/usr/bin/valkey-server"
	_valkey_ld_path="$(_valkey_lib_dirs "$cache")"
	if _valkey_runs "$_valkey_bin"; then
		return
	fi
	if [[ $(id -u) -eq 0 ]] && _valkey_from_backports "$cache"; then
		_valkey_ld_path="$(_valkey_lib_dirs "$cache")"
		_valkey_runs "$_valkey_bin" && return
		echo "valkey: the unpacked server does not run:" >&2
		LD_LIBRARY_PATH="$_valkey_ld_path" ldd "$_valkey_bin" >&2 || true
	fi
	echo "valkey: no Valkey from backports; falling back to Debian's redis-server" >&2
	_valkey_ld_path=""
	if ! command -v redis-server >/dev/null; then
		if [[ $(id -u) -ne 0 ]] || ! command -v apt-get >/dev/null; then
			echo "valkey: need root and apt-get to install a server" >&2
			return 1
		fi
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends redis-server >/dev/null 2>&1 || {
			apt-get update -qq &&
				DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends redis-server
		} || return 1
	fi
	_valkey_bin="$(command -v redis-server)"
}

# start_valkey starts the server and exports COMFYUME_TEST_VALKEY (see the
# top of this file).
start_valkey() {
	if [[ -n "${COMFYUME_TEST_VALKEY:-}" ]] && _valkey_ping "${COMFYUME_TEST_VALKEY%:*}" "${COMFYUME_TEST_VALKEY##*:}"; then
		echo "valkey: using the server at $COMFYUME_TEST_VALKEY"
		export COMFYUME_TEST_VALKEY
		return 0
	fi
	_valkey_find_server || {
		echo "valkey: no server could be installed" >&2
		return 1
	}
	echo "valkey: $(LD_LIBRARY_PATH="$_valkey_ld_path" "$_valkey_bin" --version)"
	_valkey_dir="$(mktemp -d)"
	local attempt port i
	for attempt in 1 2 3 4 5; do
		port=$((20000 + RANDOM % 40000))
		_valkey_ping 127.0.0.1 "$port" && continue # taken
		LD_LIBRARY_PATH="$_valkey_ld_path" "$_valkey_bin" --port "$port" --bind 127.0.0.1 \
			--save '' --appendonly no --daemonize no --dir "$_valkey_dir" \
			>"$_valkey_dir/server.log" 2>&1 &
		_valkey_pid=$!
		for ((i = 0; i < 100; i++)); do # up to 10s
			if _valkey_ping 127.0.0.1 "$port"; then
				export COMFYUME_TEST_VALKEY="127.0.0.1:$port"
				cleanup_fns+=(stop_valkey)
				_services_ensure_exit_trap
				echo "valkey: listening on $COMFYUME_TEST_VALKEY (pid $_valkey_pid)"
				return 0
			fi
			kill -0 "$_valkey_pid" 2>/dev/null || break
			sleep 0.1
		done
		kill "$_valkey_pid" 2>/dev/null || true
		wait "$_valkey_pid" 2>/dev/null || true
		if ! grep -qi 'address already in use' "$_valkey_dir/server.log"; then
			break
		fi
	done
	echo "valkey: the server did not start; its log:" >&2
	cat "$_valkey_dir/server.log" >&2
	rm -rf "$_valkey_dir"
	_valkey_pid=""
	return 1
}

# stop_valkey stops the server start_valkey started (if any).
stop_valkey() {
	if [[ -n "${_valkey_pid:-}" ]]; then
		kill "$_valkey_pid" 2>/dev/null || true
		wait "$_valkey_pid" 2>/dev/null || true
		_valkey_pid=""
	fi
	if [[ -n "${_valkey_dir:-}" ]]; then
		rm -rf "$_valkey_dir"
	fi
	_valkey_dir=""
}

[[ -n "${cleanup_fns+set}" ]] || cleanup_fns=()
