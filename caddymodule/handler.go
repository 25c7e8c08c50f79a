package caddymodule

import (
	"fmt"
	"net/http"
	"strconv"
	"strings"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"

	"github.com/comfyume/comfyume/relay"
)

// Handler is the comfyume HTTP handler. Put it before reverse_proxy to the
// user's home ComfyUI: it answers what a gateway must own (the WebSocket,
// POST /prompt when prompts run on a pool, captured outputs on /view, the
// queue, history and jobs APIs merged per user) and passes everything else
// on unchanged.
type Handler struct {
	// Home is the URL of the user's own ComfyUI, which serves the UI, user
	// data and models. Request placeholders are allowed, e.g.
	// "http://comfy-{http.auth.user.id}:8188". Default:
	// http://127.0.0.1:8188.
	Home string `json:"home,omitempty"`

	// RunOn names the pool that runs this site's prompts, or "home" (the
	// default) to run them on the user's home ComfyUI.
	RunOn string `json:"run_on,omitempty"`

	// User is a placeholder that gives the identity of the person making the
	// request, e.g. "{http.auth.user.id}". Users see only their own jobs,
	// events and outputs. Default: everyone is one anonymous user. A
	// request header (e.g. {http.request.header.X-User}) is only
	// trustworthy if a proxy in front sets it and strips it from clients.
	User string `json:"user,omitempty"`

	// Priority orders this site's users in a pool's queue: a number, or a
	// placeholder that gives one per request (e.g. from a `map` of users to
	// priorities). Higher runs first; default 0.
	Priority string `json:"priority,omitempty"`

	// MaxBodySize limits request bodies the handler reads, in bytes
	// (default 100 MiB, ComfyUI's own upload limit). Larger ones get 413.
	MaxBodySize int64 `json:"max_body_size,omitempty"`

	app *App
}

// CaddyModule returns the Caddy module information.
func (Handler) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "http.handlers.comfyume",
		New: func() caddy.Module { return new(Handler) },
	}
}

// DefaultHome is where a user's own ComfyUI is expected by default.
const DefaultHome = "http://127.0.0.1:8188"

// anonymous is the one user when no identity is configured.
const anonymous = "anonymous"

// Provision sets up the handler.
func (h *Handler) Provision(ctx caddy.Context) error {
	appIface, err := ctx.App("comfyume")
	if err != nil {
		return fmt.Errorf("loading comfyume app: %w", err)
	}
	h.app = appIface.(*App)
	if h.Home == "" {
		h.Home = DefaultHome
	}
	if h.RunOn == "" {
		h.RunOn = "home"
	}
	if h.MaxBodySize <= 0 {
		h.MaxBodySize = relay.DefaultMaxBody
	}
	return nil
}

// Validate checks that run_on names a configured pool.
func (h *Handler) Validate() error {
	if h.RunOn != "home" && !h.app.hasPool(h.RunOn) {
		return fmt.Errorf("run_on %q: no such pool in the global comfyume options", h.RunOn)
	}
	if !strings.Contains(h.Home, "{") && !strings.HasPrefix(h.Home, "http://") && !strings.HasPrefix(h.Home, "https://") {
		return fmt.Errorf("home %q must be an http:// or https:// URL", h.Home)
	}
	return nil
}

// ServeHTTP implements caddyhttp.MiddlewareHandler.
func (h *Handler) ServeHTTP(w http.ResponseWriter, r *http.Request, next caddyhttp.Handler) error {
	repl, _ := r.Context().Value(caddy.ReplacerCtxKey).(*caddy.Replacer)
	if repl == nil {
		repl = caddy.NewReplacer()
	}
	user := anonymous
	if h.User != "" {
		user = repl.ReplaceAll(h.User, "")
		if user == "" {
			return caddyhttp.Error(http.StatusForbidden, fmt.Errorf("comfyume: no user identity for this request (user %q is empty)", h.User))
		}
	}
	homeURL := repl.ReplaceAll(h.Home, "")
	home, err := h.app.gateway.Home(homeURL)
	if err != nil {
		return caddyhttp.Error(http.StatusBadGateway, err)
	}
	site := relay.Site{User: user, Home: home, RunOn: h.RunOn, MaxBody: h.MaxBodySize}
	if h.Priority != "" {
		p, err := strconv.Atoi(strings.TrimSpace(repl.ReplaceAll(h.Priority, "")))
		if err == nil {
			site.Priority = p
		}
	}
	repl.Set("comfyume.user", user)
	if h.app.gateway.ServeHTTP(w, r, site) {
		return nil
	}
	// Newer ComfyUI refuses cross-site fetch metadata; the browser talks to
	// the gateway's origin, so those headers say nothing about home.
	for k := range r.Header {
		if strings.HasPrefix(k, "Sec-Fetch-") {
			r.Header.Del(k)
		}
	}
	return next.ServeHTTP(w, r)
}

// Interface guards
var (
	_ caddy.Provisioner           = (*Handler)(nil)
	_ caddy.Validator             = (*Handler)(nil)
	_ caddyhttp.MiddlewareHandler = (*Handler)(nil)
)
