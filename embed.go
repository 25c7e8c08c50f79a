// Package comfyume puts many people's unchanged ComfyUI web UI in front of
// remote GPUs, as Caddy modules. Build Caddy with it the usual way
// (`xcaddy build --with github.com/comfyume/comfyume`) to get the `comfyume`
// global option and HTTP directive and the `comfyume_worker` directive.
package comfyume

import _ "embed"

// DefaultCaddyfile is the embedded default configuration (the repository's
// top-level Caddyfile): memory state, disk outputs, home ComfyUI at
// 127.0.0.1:8188 and a pool "gpu" at 127.0.0.1:8189.
//
//go:embed Caddyfile
var DefaultCaddyfile []byte
