package caddymodule

import (
	"context"
	"errors"
	"fmt"
	"net/http"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/caddyserver/caddy/v2/caddyconfig/httpcaddyfile"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"

	"github.com/comfyume/comfyume/relay"
)

func init() {
	caddy.RegisterModule(OpsHandler{})
	httpcaddyfile.RegisterHandlerDirective("comfyume_ops", parseOps)
	// Before respond, like metrics: after basic_auth and the other auth
	// directives, and before comfyume, which would otherwise pass the
	// page's path on to home.
	httpcaddyfile.RegisterDirectiveOrder("comfyume_ops", httpcaddyfile.Before, "respond")
}

// OpsHandler serves the operator's page — pools and endpoints, running and
// waiting jobs, recent failures, live — at its route: the page on any path,
// its event stream on a path ending in /events. It shows every user's jobs
// and error messages, so put it behind the operator's own authentication
// (e.g. basic_auth), or on a site only the operator reaches.
type OpsHandler struct {
	app *App
	// ctx ends when this config is replaced: the page's stream ends with
	// it (the page reconnects to the new config) rather than holding the
	// old server up.
	ctx caddy.Context
}

// CaddyModule returns the Caddy module information.
func (OpsHandler) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{ID: "http.handlers.comfyume_ops", New: func() caddy.Module { return new(OpsHandler) }}
}

// Provision finds the comfyume app.
func (h *OpsHandler) Provision(ctx caddy.Context) error {
	app, err := ctx.App("comfyume")
	if err != nil {
		return fmt.Errorf("loading comfyume app: %w", err)
	}
	h.app = app.(*App)
	h.ctx = ctx
	return nil
}

// ServeHTTP implements caddyhttp.MiddlewareHandler; it answers every
// request itself.
func (h *OpsHandler) ServeHTTP(w http.ResponseWriter, r *http.Request, _ caddyhttp.Handler) error {
	if h.app == nil || h.app.gateway == nil {
		return caddyhttp.Error(http.StatusServiceUnavailable, errors.New("comfyume is not running"))
	}
	ctx := r.Context()
	if h.ctx.Context != nil {
		ctx = untilUnloaded(ctx, h.ctx)
	}
	h.app.gateway.Ops().ServeHTTP(w, r.WithContext(ctx))
	return nil
}

// untilUnloaded is ctx, also ended when config (a Caddy config's context)
// is unloaded. The context.AfterFunc registration goes when ctx ends.
func untilUnloaded(ctx context.Context, config context.Context) context.Context {
	out, cancel := context.WithCancel(ctx)
	stop := context.AfterFunc(config, cancel)
	context.AfterFunc(out, func() { stop() })
	return out
}

// UnmarshalCaddyfile reads the comfyume_ops directive, which has no
// options: `comfyume_ops [<matcher>]`.
func (h *OpsHandler) UnmarshalCaddyfile(d *caddyfile.Dispenser) error {
	d.Next()
	if d.NextArg() {
		return d.ArgErr()
	}
	if d.NextBlock(0) {
		return d.Errf("comfyume_ops has no options")
	}
	return nil
}

func parseOps(h httpcaddyfile.Helper) (caddyhttp.MiddlewareHandler, error) {
	o := new(OpsHandler)
	err := o.UnmarshalCaddyfile(h.Dispenser)
	return o, err
}

// activeGateway is the running config's gateway, for the admin API.
func activeGateway() (*relay.Gateway, error) {
	app, err := caddy.ActiveContext().AppIfConfigured("comfyume")
	if err != nil || app == nil {
		return nil, caddy.APIError{HTTPStatus: http.StatusNotFound, Err: fmt.Errorf("comfyume is not configured")}
	}
	a, ok := app.(*App)
	if !ok || a.gateway == nil {
		return nil, caddy.APIError{HTTPStatus: http.StatusNotFound, Err: fmt.Errorf("comfyume is not running")}
	}
	return a.gateway, nil
}

// handleOpsEvents serves GET /comfyume/ops/events on the admin API: the
// page's stream of states, for scripts (curl -N). The page itself is not
// served there: the admin API refuses a browser's navigation (it has
// neither an Origin nor a Referer), so a browser could never open it.
func handleOpsEvents(w http.ResponseWriter, r *http.Request) error {
	if r.Method != http.MethodGet {
		return caddy.APIError{HTTPStatus: http.StatusMethodNotAllowed, Err: errors.New("method not allowed")}
	}
	g, err := activeGateway()
	if err != nil {
		return err
	}
	ctx := r.Context()
	if cfg := caddy.ActiveContext(); cfg.Context != nil {
		ctx = untilUnloaded(ctx, cfg)
	}
	g.Ops().ServeEvents(w, r.WithContext(ctx))
	return nil
}

// handleOpsState serves GET /comfyume/ops: the page's state as JSON.
func handleOpsState(w http.ResponseWriter, r *http.Request) error {
	if r.Method != http.MethodGet {
		return caddy.APIError{HTTPStatus: http.StatusMethodNotAllowed, Err: errors.New("method not allowed")}
	}
	g, err := activeGateway()
	if err != nil {
		return err
	}
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", "no-store")
	_, err = w.Write(g.Ops().State(r.Context()))
	return err
}

var (
	_ caddyhttp.MiddlewareHandler = (*OpsHandler)(nil)
	_ caddy.Provisioner           = (*OpsHandler)(nil)
	_ caddyfile.Unmarshaler       = (*OpsHandler)(nil)
)
