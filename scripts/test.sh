#!/usr/bin/env bash
# Installs what the tests need on a fresh Debian machine with Go, then runs
# them all: go vet, a gofmt check and `go test -race` over every package.
# CI runs this through .ci/run; developers run `bash scripts/test.sh`.
# Extra arguments go to `go test` (e.g. -run TestX -v).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

step() { printf '\n=== %s\n' "$*"; }
elapsed() { printf '=== %s took %ds\n' "$1" "$(($(date +%s) - $2))"; }

# Debian packages, installed only when a command is missing.
apt_install() {
	if [[ $(id -u) -ne 0 ]] || ! command -v apt-get >/dev/null; then
		echo "test.sh: missing $*; install it (needs root and apt-get)" >&2
		exit 1
	fi
	if [[ -z "${apt_updated:-}" ]]; then
		apt-get update -qq
		apt_updated=1
	fi
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@"
}

# e2e/sdk: a real ComfyUI client from npm (@saintno/comfyui-sdk) that
# caddymodule's TestThirdPartySDKClient runs with node. Reinstalled only
# when package-lock.json changed since the last install.
install_sdk() {
	command -v node >/dev/null && command -v npm >/dev/null || apt_install nodejs npm
	local dir=e2e/sdk stamp=e2e/sdk/node_modules/.comfyume-lock.sha256 want
	want="$(sha256sum "$dir/package.json" "$dir/package-lock.json" | sha256sum | cut -d' ' -f1)"
	if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
		echo "e2e/sdk/node_modules is up to date"
		return
	fi
	npm ci --prefix "$dir" --no-audit --no-fund
	echo "$want" >"$stamp"
}

# ---------------------------------------------------------------------------
# start_services: starts the servers the shared-state tests need — a real
# Valkey (job store, pub/sub) and a real S3-compatible server (versitygw,
# for outputs) — on 127.0.0.1 at free ports, exports their addresses
# (COMFYUME_TEST_VALKEY, COMFYUME_TEST_S3_*) and stops them when this script
# exits. The Valkey binary is also exported (COMFYUME_TEST_VALKEY_SERVER and
# its LD_LIBRARY_PATH) for tests that stop and restart a server of their own.
# ---------------------------------------------------------------------------
# shellcheck source=services/valkey.sh
source scripts/services/valkey.sh
# shellcheck source=services/s3.sh
source scripts/services/s3.sh
cleanup_fns=()
trap run_cleanup_fns EXIT

start_services() {
	start_valkey
	# A server that was already running (COMFYUME_TEST_VALKEY set) leaves no
	# binary known: find one for the tests that run their own.
	[[ -n "${_valkey_bin:-}" ]] || _valkey_find_server || true
	export COMFYUME_TEST_VALKEY_SERVER="${_valkey_bin:-$(command -v valkey-server || command -v redis-server || true)}"
	export COMFYUME_TEST_VALKEY_LD_PATH="${_valkey_ld_path:-}"
	start_s3
	# The workshop in Docker (examples/workshop) for e2e/compose's tests:
	# CI always, developers with COMFYUME_COMPOSE=1. Installs Docker if
	# missing; takes minutes (it compiles Caddy inside Docker).
	if [[ "${CI:-}" == true || "${COMFYUME_COMPOSE:-}" == 1 ]]; then
		# shellcheck source=compose/stack.sh
		source scripts/compose/stack.sh
		start_workshop "$root"
	fi
}

start=$(date +%s)
cat <<'EOF'
scripts/test.sh runs every test, in these steps (each says how long it took):
  1. toolchain: installs what is missing (gcc for -race, Chromium, Node)
  2. npm ci for the SDK test, when e2e/sdk changed
  3. starts a Valkey and an S3 server on 127.0.0.1 for the shared-state tests
  4. go vet and a gofmt check
  5. go test -race ./...: compiling the test binaries takes several minutes
     the first time (nothing to show meanwhile but a line a minute); each
     package's result follows as it finishes, failing tests' output in
     full, and the last line counts the tests: N passed, N failed, N skipped.
     Under CI=true TestXcaddyBuild also builds Caddy with xcaddy (about 5
     minutes of CPU with a cold cache).
EOF
step "toolchain"
go version
# -race needs cgo, so a C compiler.
command -v gcc >/dev/null || apt_install gcc libc6-dev
# caddymodule's TestCrossSiteAttackInChromium and TestOpsPageInChromium drive
# Debian's Chromium; the operator page's screenshots land in test-artifacts/.
command -v chromium >/dev/null || apt_install chromium
export COMFYUME_TEST_ARTIFACTS="${COMFYUME_TEST_ARTIFACTS:-$root/test-artifacts}"
command -v node >/dev/null && echo "node $(node --version), npm $(npm --version)" || echo "node: not installed yet"

step "npm ci --prefix e2e/sdk"
t=$(date +%s)
install_sdk
elapsed "npm ci" "$t"

step "start_services"
start_services

step "go vet ./..."
t=$(date +%s)
go vet ./...
elapsed "go vet" "$t"

step "gofmt -l"
unformatted="$(find . -name '*.go' -not -path './.git/*' -not -path '*/node_modules/*' -print0 | xargs -0 gofmt -l)"
if [[ -n "$unformatted" ]]; then
	echo "these files need gofmt -w:" >&2
	echo "$unformatted" >&2
	exit 1
fi
echo "all Go files are formatted"

step "go test -race -count=1 -timeout 30m ./..."
t=$(date +%s)
echo "(setup took $((t - start))s)"
# go test -json, read by scripts/testsummary: package results as they come,
# failing tests' output in full, a line a minute while nothing else is said,
# and the totals at the end. -v among the arguments shows every test's
# output. The pipeline fails if go test or the summary does.
summary_bin="$(mktemp -d)"
remove_summary_bin() { rm -rf "$summary_bin"; }
cleanup_fns+=(remove_summary_bin)
go build -o "$summary_bin/testsummary" ./scripts/testsummary
summary_args=()
for a in "$@"; do
	[[ "$a" == "-v" || "$a" == "-test.v" || "$a" == "-v=true" ]] && summary_args=(-v)
done
WORKSHOP_FAILED=1 # the workshop's containers' logs, if it runs and this fails
go test -json -race -count=1 -timeout 30m "$@" ./... | "$summary_bin/testsummary" "${summary_args[@]}"
WORKSHOP_FAILED=
elapsed "go test" "$t"
