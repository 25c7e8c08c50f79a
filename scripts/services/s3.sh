# shellcheck shell=bash
# An S3-compatible server for tests: versitygw (Apache-2.0), posix backend on
# a temporary directory, single-account mode, on 127.0.0.1:<free port>.
#
# Contract shared by the scripts in scripts/services/ (source them, then call
# their start_* function):
#   - start_X starts the service, waits until it answers and exports the
#     variables the tests read. It returns non-zero on failure and never
#     exits the caller's shell. It does not change shell options.
#   - start_X appends the name of a function that stops the service and
#     removes its files to the array cleanup_fns; the caller runs them, e.g.
#         cleanup_fns=()
#         trap 'for f in "${cleanup_fns[@]}"; do "$f"; done' EXIT
#
# start_s3 exports:
#   COMFYUME_TEST_S3_ENDPOINT    host:port (plain http)
#   COMFYUME_TEST_S3_ACCESS_KEY  root access key of the server
#   COMFYUME_TEST_S3_SECRET_KEY  root secret key
#   COMFYUME_TEST_S3_BUCKET      a bucket that exists (comfyume-test)
# If COMFYUME_TEST_S3_ENDPOINT is already set, start_s3 leaves it alone and
# starts nothing (tests then use that server).
#
# Needs only Go and the Go module proxy: the first call builds versitygw with
# `go install` (a few minutes on 2 cores) into
# ${XDG_CACHE_HOME:-$HOME/.cache}/comfyume/bin; later calls reuse it.

S3_VERSITYGW_VERSION=v1.8.0

# s3_install_versitygw prints the path of the versitygw binary, building it
# first if the cache does not hold this version.
s3_install_versitygw() {
	local bin="${XDG_CACHE_HOME:-$HOME/.cache}/comfyume/bin"
	local exe="$bin/versitygw" stamp="$bin/versitygw.version"
	if [[ -x "$exe" && -f "$stamp" && "$(cat "$stamp")" == "$S3_VERSITYGW_VERSION" ]]; then
		echo "$exe"
		return 0
	fi
	mkdir -p "$bin" || return 1
	local t=$SECONDS
	echo "s3.sh: building versitygw $S3_VERSITYGW_VERSION (first time only; takes minutes)" >&2
	# From / so that no go.mod or go.work around us takes part.
	if ! (cd / && GOBIN="$bin" GOFLAGS=-buildvcs=false go install "github.com/versity/versitygw/cmd/versitygw@$S3_VERSITYGW_VERSION") >&2; then
		echo "s3.sh: go install of versitygw failed" >&2
		return 1
	fi
	echo "$S3_VERSITYGW_VERSION" >"$stamp"
	echo "s3.sh: versitygw built in $((SECONDS - t))s" >&2
	echo "$exe"
}

# s3_port_free reports whether nothing listens on 127.0.0.1:$1.
s3_port_free() {
	! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

# s3_healthy reports whether the gateway on port $1 answers its health check.
s3_healthy() {
	local reply
	reply="$(
		exec 2>/dev/null 3<>"/dev/tcp/127.0.0.1/$1" || exit 1
		printf 'GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n' >&3
		timeout 2 head -n 1 <&3
	)" || return 1
	[[ "$reply" == *" 200 "* ]]
}

start_s3() {
	if [[ -n "${COMFYUME_TEST_S3_ENDPOINT:-}" ]]; then
		echo "s3.sh: using the S3 server at $COMFYUME_TEST_S3_ENDPOINT"
		return 0
	fi
	local exe
	exe="$(s3_install_versitygw)" || return 1

	s3_dir="$(mktemp -d "${TMPDIR:-/tmp}/comfyume-s3.XXXXXX")" || return 1
	cleanup_fns+=(stop_s3)
	# A bucket of the posix backend is a directory under its root; object
	# metadata goes to a sidecar directory, so the file system needs no
	# extended attributes (tmpfs, overlayfs...).
	local bucket=comfyume-test
	mkdir -p "$s3_dir/root/$bucket" "$s3_dir/meta" || return 1
	local access secret
	access="comfyume$(od -An -N6 -tx1 /dev/urandom | tr -d ' \n')"
	secret="$(od -An -N20 -tx1 /dev/urandom | tr -d ' \n')"

	local try port waited
	for try in 1 2 3 4 5; do
		port=$((20000 + RANDOM % 40000))
		s3_port_free "$port" || continue
		ROOT_ACCESS_KEY_ID="$access" ROOT_SECRET_ACCESS_KEY="$secret" \
			"$exe" --port "127.0.0.1:$port" --health /health --quiet \
			posix --sidecar "$s3_dir/meta" "$s3_dir/root" \
			>"$s3_dir/versitygw.log" 2>&1 </dev/null &
		s3_pid=$!
		for ((waited = 0; waited < 150; waited++)); do
			if s3_healthy "$port"; then
				export COMFYUME_TEST_S3_ENDPOINT="127.0.0.1:$port"
				export COMFYUME_TEST_S3_ACCESS_KEY="$access"
				export COMFYUME_TEST_S3_SECRET_KEY="$secret"
				export COMFYUME_TEST_S3_BUCKET="$bucket"
				echo "s3.sh: versitygw (pid $s3_pid) serves bucket $bucket on $COMFYUME_TEST_S3_ENDPOINT"
				return 0
			fi
			kill -0 "$s3_pid" 2>/dev/null || break # died: the port was taken meanwhile?
			sleep 0.2
		done
		kill "$s3_pid" 2>/dev/null || true
		wait "$s3_pid" 2>/dev/null || true
		s3_pid=
	done
	echo "s3.sh: versitygw did not start; its log:" >&2
	cat "$s3_dir/versitygw.log" >&2
	return 1
}

stop_s3() {
	if [[ -n "${s3_pid:-}" ]]; then
		kill "$s3_pid" 2>/dev/null || true
		wait "$s3_pid" 2>/dev/null || true
		s3_pid=
	fi
	if [[ -n "${s3_dir:-}" ]]; then
		rm -rf "$s3_dir"
		s3_dir=
	fi
}
