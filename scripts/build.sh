#!/usr/bin/env bash
# Builds the pinned Caddy with comfyume, as xcaddy.json says:
#   caddy    Caddy version to build
#   xcaddy   xcaddy version that builds it
#   output   the binary, relative to the repo root (default comfyume-caddy)
#   plugins  each {"module":  Go module path,
#                  "package": package to plug in (default: the module's root),
#                  "replace": local directory of the module, relative to the repo root,
#                  "version": module version, when not replaced}
# comfyume's module root registers its Caddy modules (modules.go), so the
# plugin is the module itself, replaced by this checkout: the build runs
#   xcaddy build <caddy> --with github.com/comfyume/comfyume=<this checkout>
# exactly as the plugin convention says, with xcaddy installed at its pinned
# version. TestXcaddyBuild (xcaddy_test.go, under CI) runs this script.
#
# Usage: scripts/build.sh [output path]
# Needs go and python3. Prints the binary's path when done; then e.g.
#   ./comfyume-caddy list-modules | grep comfyume
#   ./comfyume-caddy run --config Caddyfile
set -euo pipefail

caller_dir="$PWD"
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

# One line each: caddy version, xcaddy version, output, then xcaddy's plugin
# arguments (--with/--replace and their values).
spec_text="$(python3 - "$root/xcaddy.json" "$root" <<'PY'
import json, os, sys

path, root = sys.argv[1], sys.argv[2]
with open(path) as f:
    cfg = json.load(f)
for key in ("caddy", "xcaddy"):
    if not isinstance(cfg.get(key), str) or not cfg[key]:
        sys.exit(f"{path}: missing {key!r} version")
lines = [cfg["caddy"], cfg["xcaddy"], cfg.get("output") or "comfyume-caddy"]
for p in cfg.get("plugins", []):
    mod = p["module"]
    pkg = p.get("package") or mod
    local = os.path.normpath(os.path.join(root, p["replace"])) if p.get("replace") else ""
    version = "" if local else p.get("version", "")
    arg = pkg + (f"@{version}" if version else "")
    if local and pkg == mod:
        arg += f"={local}"
    lines += ["--with", arg]
    if local and pkg != mod:
        # The package lives inside the replaced module.
        lines += ["--replace", f"{mod}={local}"]
for line in lines:
    if "\n" in line:
        sys.exit(f"{path}: newline in {line!r}")
    print(line)
PY
)"
mapfile -t spec <<<"$spec_text"
caddy_version="${spec[0]}"
xcaddy_version="${spec[1]}"
output="${spec[2]}"
plugin_args=("${spec[@]:3}")
if [[ $# -ge 1 ]]; then
	output="$1"
	[[ "$output" = /* ]] || output="$caller_dir/$output"
fi
[[ "$output" = /* ]] || output="$root/$output"

# The module proxy here answers 403/400, not 404/410, for a module path it
# does not serve, such as this unpublished module, and Go tries the next
# GOPROXY entry after a "," only on 404/410. xcaddy's `go get` of a replaced
# module first asks the proxy for its latest version and uses the
# replacement only when the answer is "not found". So: the configured
# proxies joined with "|" (next entry on any error), ending in an empty
# file:// proxy, which answers "not found". "direct" is left out: it would
# try to clone unpublished modules with git.
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
empty_proxy="$work/proxy"
mkdir "$empty_proxy"
proxies=()
IFS=',|' read -r -a configured <<<"$(go env GOPROXY)"
for p in "${configured[@]}"; do
	case "$p" in "" | direct | off) ;; *) proxies+=("$p") ;; esac
done
proxies+=("file://$empty_proxy")
GOPROXY="$(IFS='|' && echo "${proxies[*]}")"
export GOPROXY

echo "build.sh: GOPROXY=$GOPROXY" >&2
echo "build.sh: go install github.com/caddyserver/xcaddy/cmd/xcaddy@$xcaddy_version" >&2
GOBIN="$work/bin" go install "github.com/caddyserver/xcaddy/cmd/xcaddy@$xcaddy_version"
echo "build.sh: xcaddy build $caddy_version ${plugin_args[*]} --output $output" >&2
echo "build.sh: compiling Caddy (a few minutes the first time; xcaddy logs each step)" >&2
"$work/bin/xcaddy" build "$caddy_version" "${plugin_args[@]}" --output "$output"
echo "$output"
