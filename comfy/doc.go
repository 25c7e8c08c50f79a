// Package comfy describes ComfyUI's wire protocol as Go values: API-format
// prompts, WebSocket messages and binary frames, output file references,
// /view queries and the error bodies ComfyUI answers with.
//
// Everything here is pure: no I/O, no knowledge of users, storage or Caddy.
// The facts it encodes are documented in shared/comfyui-protocol.md.
package comfy
