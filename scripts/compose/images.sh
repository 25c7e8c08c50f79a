# shellcheck shell=bash
# Base images for the workshop's Dockerfiles, made on this machine from its
# own files, for hosts that reach no container registry (CI). Source this
# file, then call make_base_images; it tags:
#
#   comfyume-local/caddy-builder  stand-in for caddy:2-builder: this host's Go
#                                 toolchain, xcaddy (xcaddy.json's version) and
#                                 a file:// Go module proxy holding exactly the
#                                 modules the gateway build needs, so the build
#                                 inside Docker needs no network
#   comfyume-local/caddy          stand-in for caddy:2: scratch, CA
#                                 certificates and the official image's layout
#                                 (/etc/caddy, /config, /data, its CMD)
#   comfyume-local/comfyui-fake   stand-in for a ComfyUI image: comfytest's fake
#                                 ComfyUI (static), as /usr/local/bin/fakecomfy
#   comfyume-local/valkey         Debian's valkey-server (scripts/services/
#                                 valkey.sh fetches it) with its libraries
#   comfyume-local/versitygw      the S3 server scripts/services/s3.sh builds,
#                                 with its libraries and the bucket
#                                 comfy-outputs (/s3/root/comfy-outputs)
#
# Binaries that are not static go in with the libraries ldd names, at the
# same paths, so the images need no package manager. Needs go, python3,
# ldd, tar and a running Docker daemon ($DOCKER, default docker).

DOCKER="${DOCKER:-docker}"

# _img_add_binary STAGE SRC DEST: copies the executable SRC to STAGE/DEST and
# every shared library it loads (as ldd resolves them, LD_LIBRARY_PATH
# included) under STAGE at the path ldd printed.
_img_add_binary() {
	local stage="$1" src="$2" dest="$3" lib
	mkdir -p "$stage/$(dirname "$dest")"
	cp -L "$src" "$stage/$dest"
	# "libx.so => /path (0x...)" and "/lib64/ld-linux-x86-64.so.2 (0x...)".
	while read -r lib; do
		[[ -n "$lib" && -e "$lib" ]] || continue
		if [[ "$lib" == /root/* || "$lib" == /home/* || "$lib" == /tmp/* ]]; then
			# A library unpacked in a cache: into the system folder.
			mkdir -p "$stage/usr/lib/x86_64-linux-gnu"
			cp -L "$lib" "$stage/usr/lib/x86_64-linux-gnu/$(basename "$lib")"
		else
			mkdir -p "$stage/$(dirname "$lib")"
			cp -L "$lib" "$stage/$lib"
		fi
	done < <(ldd "$src" 2>/dev/null | awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\// {print $1}')
}

# _img_import TAG DIR [--change ...]: a one-layer image of DIR's files.
_img_import() {
	local tag="$1" dir="$2"
	shift 2
	mkdir -p "$dir/tmp" && chmod 1777 "$dir/tmp"
	tar --numeric-owner --owner=0 --group=0 -C "$dir" -c . | "$DOCKER" import "$@" - "$tag" >/dev/null
	echo "images.sh: $tag ($(du -sh "$dir" | cut -f1))"
}

# _img_goproxy ROOT OUT: a file:// module proxy (the layout of
# $(go env GOMODCACHE)/cache/download) with every module xcaddy needs to build
# Caddy $caddy_version with the comfyume module at ROOT: xcaddy sets the build
# up on the host with an empty module cache (filled from the host's own cache,
# then the configured proxy), `go list -deps` fetches every package's module
# without compiling and `go mod tidy -e` what xcaddy's own tidy reads (the
# tests' imports of the dependencies).
_img_goproxy() {
	local root="$1" out="$2" work xcaddy="$3" caddy_version="$4"
	work="$(mktemp -d)"
	local hostcache proxies=() p configured
	hostcache="$(go env GOMODCACHE)/cache/download"
	IFS=',|' read -r -a configured <<<"$(go env GOPROXY)"
	proxies=("file://$hostcache")
	for p in "${configured[@]}"; do
		case "$p" in "" | direct | off) ;; *) proxies+=("$p") ;; esac
	done
	proxies+=("file://$work/empty") # "not found" for the replaced module
	mkdir -p "$work/empty" "$work/tmp"
	if ! (
		export GOMODCACHE="$work/mod" GOPROXY="$(IFS='|' && echo "${proxies[*]}")" GOSUMDB=off \
			GOFLAGS="-mod=mod -buildvcs=false" TMPDIR="$work/tmp" XCADDY_SKIP_BUILD=1 CGO_ENABLED=0
		cd "$work/tmp" &&
			"$xcaddy" build "$caddy_version" --with "github.com/comfyume/comfyume=$root" --output "$work/caddy" >"$work/xcaddy.log" 2>&1 &&
			cd "$work"/tmp/buildenv_* && go list -deps ./... >/dev/null 2>>"$work/xcaddy.log" &&
			go mod tidy -e >/dev/null 2>>"$work/xcaddy.log"
	); then
		echo "images.sh: could not gather the gateway's Go modules:" >&2
		tail -n 30 "$work/xcaddy.log" >&2
		chmod -R u+w "$work" && rm -rf "$work"
		return 1
	fi
	rm -rf "$out"
	cp -r "$work/mod/cache/download" "$out"
	chmod -R u+w "$work" && rm -rf "$work"
}

# _img_current TAG KEY: whether the image TAG exists and was made from
# inputs whose digest is KEY (its label comfyume.inputs).
_img_current() {
	[[ "$("$DOCKER" image inspect -f '{{index .Config.Labels "comfyume.inputs"}}' "$1" 2>/dev/null)" == "$2" ]]
}

# _img_builder ROOT STAGE CADDY_VERSION XCADDY_VERSION KEY
_img_builder() {
	local root="$1" stage="$2" caddy_version="$3" xcaddy_version="$4" key="$5"
	mkdir -p "$stage/usr/bin"
	(cd / && CGO_ENABLED=0 GOBIN="$stage/usr/bin" GOFLAGS=-buildvcs=false \
		go install "github.com/caddyserver/xcaddy/cmd/xcaddy@$xcaddy_version") || return 1
	_img_goproxy "$root" "$stage/goproxy" "$stage/usr/bin/xcaddy" "$caddy_version" || return 1
	_img_add_binary "$stage" "$(readlink -f /bin/sh)" bin/sh
	mkdir -p "$stage/root" "$stage/tmp" && chmod 1777 "$stage/tmp"
	# GOROOT goes in as /usr/local/go, straight from where it is.
	local goroot base
	goroot="$(go env GOROOT)"
	base="$(basename "$goroot")"
	tar --numeric-owner --owner=0 --group=0 -c -C "$stage" . \
		-C "$(dirname "$goroot")" --transform "s|^\./$base\(/\|\$\)|./usr/local/go\1|" \
		--exclude "./$base/test" --exclude "./$base/doc" --exclude "./$base/api" "./$base" |
		"$DOCKER" import \
			--change 'ENV PATH=/usr/local/go/bin:/usr/bin:/bin' \
			--change 'ENV HOME=/root' --change 'ENV TMPDIR=/tmp' \
			--change 'ENV GOTOOLCHAIN=local' --change 'ENV GOPROXY=file:///goproxy' \
			--change 'ENV GOSUMDB=off' --change 'ENV GOFLAGS=-mod=mod' \
			--change "LABEL comfyume.inputs=$key" \
			--change 'WORKDIR /root' - comfyume-local/caddy-builder >/dev/null || return 1
	echo "images.sh: comfyume-local/caddy-builder (Go $(go env GOVERSION), xcaddy $xcaddy_version, $(du -sh "$stage/goproxy" | cut -f1) of modules)"
}

# _img_caddy STAGE KEY
_img_caddy() {
	local stage="$1" key="$2"
	mkdir -p "$stage/etc/caddy" "$stage/etc/ssl/certs" "$stage/config/caddy" \
		"$stage/data/caddy" "$stage/srv" "$stage/usr/bin"
	cp -L /etc/ssl/certs/ca-certificates.crt "$stage/etc/ssl/certs/"
	printf ':80 {\n\trespond "Caddy works"\n}\n' >"$stage/etc/caddy/Caddyfile"
	_img_import comfyume-local/caddy "$stage" \
		--change 'ENV XDG_CONFIG_HOME=/config' --change 'ENV XDG_DATA_HOME=/data' \
		--change 'ENV PATH=/usr/bin:/bin' --change 'WORKDIR /srv' \
		--change 'EXPOSE 80 443 2019' --change "LABEL comfyume.inputs=$key" \
		--change 'CMD ["caddy", "run", "--config", "/etc/caddy/Caddyfile", "--adapter", "caddyfile"]'
}

# make_base_images ROOT: makes every image listed at the top of this file.
make_base_images() {
	local root stage caddy_version xcaddy_version t=$SECONDS
	root="$(cd "$1" && pwd)" || return 1
	caddy_version="$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["caddy"])' "$root/xcaddy.json")" || return 1
	xcaddy_version="$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["xcaddy"])' "$root/xcaddy.json")" || return 1
	stage="$(mktemp -d)"

	# The fake ComfyUI, static.
	mkdir -p "$stage/fake/usr/local/bin"
	(cd "$root" && CGO_ENABLED=0 go build -trimpath -o "$stage/fake/usr/local/bin/fakecomfy" ./comfytest/cmd/fakecomfy) || return 1

	# The builder: Go, xcaddy, /bin/sh for RUN lines, the module proxy. Made
	# again only when what goes into it changed, so that Docker's layer
	# cache keeps the gateway image between runs on one machine.
	local key
	# (Bump "v2" when _img_builder changes.)
	key="$(cat "$root/go.mod" "$root/go.sum" /bin/sh <(go env GOVERSION GOROOT) <(echo "builder v2 $caddy_version $xcaddy_version") | sha256sum | cut -c1-32)"
	if _img_current comfyume-local/caddy-builder "$key"; then
		echo "images.sh: comfyume-local/caddy-builder is up to date"
	else
		_img_builder "$root" "$stage/builder" "$caddy_version" "$xcaddy_version" "$key" || return 1
	fi

	# The Caddy runtime: the official image's layout on scratch.
	key="$(cat /etc/ssl/certs/ca-certificates.crt <(echo "caddy v1") | sha256sum | cut -c1-32)"
	if _img_current comfyume-local/caddy "$key"; then
		echo "images.sh: comfyume-local/caddy is up to date"
	else
		_img_caddy "$stage/caddy" "$key" || return 1
	fi

	# The fake ComfyUI (a home: listens on every interface of its container).
	_img_import comfyume-local/comfyui-fake "$stage/fake" \
		--change 'ENV PATH=/usr/local/bin:/usr/bin:/bin' \
		--change 'CMD ["fakecomfy", "-listen", "0.0.0.0:8188", "-version", "2026"]' || return 1

	# Valkey, as the tests run it.
	# shellcheck source=../services/valkey.sh
	source "$root/scripts/services/valkey.sh"
	_valkey_find_server || return 1
	(
		export LD_LIBRARY_PATH="${_valkey_ld_path:-}"
		_img_add_binary "$stage/valkey" "$_valkey_bin" usr/bin/valkey-server
	) || return 1
	mkdir -p "$stage/valkey/data"
	_img_import comfyume-local/valkey "$stage/valkey" \
		--change 'WORKDIR /data' --change 'EXPOSE 6379' \
		--change 'CMD ["/usr/bin/valkey-server", "--bind", "0.0.0.0", "--protected-mode", "no", "--save", "", "--appendonly", "no"]' || return 1

	# versitygw (posix backend, metadata in a sidecar folder: no xattrs).
	# shellcheck source=../services/s3.sh
	source "$root/scripts/services/s3.sh"
	local s3
	s3="$(s3_install_versitygw)" || return 1
	_img_add_binary "$stage/s3" "$s3" usr/bin/versitygw
	# The workshop's bucket (a folder of the posix backend), so a fresh
	# volume on /s3 starts with it.
	mkdir -p "$stage/s3/s3/root/comfy-outputs" "$stage/s3/s3/meta"
	_img_import comfyume-local/versitygw "$stage/s3" \
		--change 'EXPOSE 7070' \
		--change 'ENTRYPOINT ["/usr/bin/versitygw"]' || return 1

	chmod -R u+w "$stage" && rm -rf "$stage"
	echo "images.sh: base images made in $((SECONDS - t))s"
}
