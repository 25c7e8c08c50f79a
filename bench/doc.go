// Package bench holds comfyume's performance benchmarks. It has no
// non-test code: everything lives in _test.go files and only runs under
// `go test -bench`. See BENCHMARKS.md at the repository root for how to
// run them and for recorded results.
//
// Every benchmark compares, in the same run, comfyume against plain
// Caddy (reverse_proxy / file_server) and direct access without Caddy.
// Caddy runs in this process, loaded from an adapted Caddyfile with
// `admin off`, and every address is on loopback.
package bench
