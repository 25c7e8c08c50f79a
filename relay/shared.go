package relay

import (
	"net/http"
	"path"
	"strings"
)

// A shared home is one ComfyUI that serves several users of a site (its
// URL has no per-user placeholder). ComfyUI keeps only user data (saved
// workflows, settings) per user, and only with --multi-user and the
// Comfy-User header; everything else on it is everyone's. The gateway
// sends the user's identity as Comfy-User, keeps its own clears and
// interrupts to the user's jobs, and refuses the routes that act on all
// of home's users at once.

// ComfyUserHeader is ComfyUI's multi-user header (app/user_manager.py):
// with --multi-user, it selects whose user data a request reads and
// writes.
const ComfyUserHeader = "Comfy-User"

// ActsOnEveryone reports whether r, passed on to a shared home, would act
// on every user of it at once: /internal/* (the server's logs and its
// input, output and temp folders) and /free (unloads models and frees
// memory under everyone's running job). The path is compared cleaned, so
// "//internal/./logs" is the same route.
func ActsOnEveryone(r *http.Request) bool {
	p := path.Clean("/" + r.URL.Path)
	if strings.HasPrefix(p, "/api/") {
		p = p[4:]
	}
	return p == "/internal" || strings.HasPrefix(p, "/internal/") || p == "/free"
}
