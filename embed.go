// Package comfyume puts many people's unchanged ComfyUI web UI in front of
// remote GPUs, as Caddy modules. Import
// github.com/comfyume/comfyume/caddymodule in a Caddy build (xcaddy) to get
// the `comfyume` global option and HTTP directive.
package comfyume

import _ "embed"

// DefaultCaddyfile is the embedded default configuration (the repository's
// top-level Caddyfile): memory state, disk outputs, home ComfyUI at
// 127.0.0.1:8188 and a pool "gpu" at 127.0.0.1:8189.
//
//go:embed Caddyfile
var DefaultCaddyfile []byte
