package caddymodule

import (
	"fmt"
	"net/http"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/caddyserver/caddy/v2/caddyconfig/httpcaddyfile"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"

	"github.com/comfyume/comfyume/dispatch"
	"github.com/comfyume/comfyume/worker"
)

func init() {
	caddy.RegisterModule(Worker{})
}

// Worker is the comfyume_worker handler. It runs inside a GPU container,
// in front of that container's own ComfyUI, and takes whole jobs from a
// gateway whose pool upstream uses `transport worker`: one streaming POST
// per job brings the prompt and its input files, and its response carries
// every event, preview and output file back. Requests to other paths go to
// the next handler (e.g. reverse_proxy to ComfyUI, for health checks and
// plain API use). GET on the job path answers a JSON status (200 when the
// local ComfyUI is ready, 503 while it starts), for platform health checks.
type Worker struct {
	// ComfyUI is the local ComfyUI's URL (default http://127.0.0.1:8188).
	ComfyUI string `json:"comfyui,omitempty"`
	// Path is where jobs are taken (default /comfyume/job).
	Path string `json:"path,omitempty"`
	// Token, if set, is required on job requests: as "Authorization:
	// Bearer <token>", or — when the platform in front of the container
	// uses the Authorization header for its own key — in the
	// X-Comfyume-Worker-Token header (the gateway's upstream sends it with
	// `header X-Comfyume-Worker-Token {env.WORKER_TOKEN}`). Placeholders
	// such as {env.WORKER_TOKEN} work.
	Token string `json:"token,omitempty"`
	// Heartbeat is how often an idle job stream carries a heartbeat frame,
	// so proxies in between never cut it (default 15s).
	Heartbeat caddy.Duration `json:"heartbeat,omitempty"`
	// Idle ends a job whose ComfyUI sends nothing for this long (default
	// 10m): the prompt is interrupted and the gateway told why.
	Idle caddy.Duration `json:"idle,omitempty"`

	server *worker.Server
}

// CaddyModule returns the Caddy module information.
func (Worker) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{ID: "http.handlers.comfyume_worker", New: func() caddy.Module { return new(Worker) }}
}

// Provision sets up the worker.
func (w *Worker) Provision(ctx caddy.Context) error {
	repl := caddy.NewReplacer()
	if w.ComfyUI == "" {
		w.ComfyUI = "http://127.0.0.1:8188"
	}
	if w.Path == "" {
		w.Path = dispatch.WorkerPath
	}
	w.server = worker.NewServer(repl.ReplaceAll(w.ComfyUI, ""), worker.Options{
		Token:     repl.ReplaceAll(w.Token, ""),
		Heartbeat: time.Duration(w.Heartbeat),
		Idle:      time.Duration(w.Idle),
		Logger:    ctx.Logger(),
	})
	return nil
}

// ServeHTTP implements caddyhttp.MiddlewareHandler.
func (w *Worker) ServeHTTP(rw http.ResponseWriter, r *http.Request, next caddyhttp.Handler) error {
	if r.URL.Path != w.Path {
		return next.ServeHTTP(rw, r)
	}
	w.server.ServeHTTP(rw, r)
	return nil
}

func parseWorker(h httpcaddyfile.Helper) (caddyhttp.MiddlewareHandler, error) {
	w := new(Worker)
	err := w.UnmarshalCaddyfile(h.Dispenser)
	return w, err
}

// UnmarshalCaddyfile reads the comfyume_worker directive:
//
//	comfyume_worker {
//		comfyui <url>
//		path <path>
//		token <secret>
//		heartbeat <duration>
//		idle <duration>
//	}
func (w *Worker) UnmarshalCaddyfile(d *caddyfile.Dispenser) error {
	d.Next()
	if d.NextArg() {
		return d.ArgErr()
	}
	for d.NextBlock(0) {
		key := d.Val()
		val, err := oneArg(d)
		if err != nil {
			return err
		}
		switch key {
		case "comfyui":
			w.ComfyUI = val
		case "path":
			w.Path = val
		case "token":
			w.Token = val
		case "heartbeat", "idle":
			dur, err := parseDuration(d, key, val)
			if err != nil {
				return err
			}
			if key == "heartbeat" {
				w.Heartbeat = dur
			} else {
				w.Idle = dur
			}
		default:
			return d.Errf("unrecognized comfyume_worker option %q", key)
		}
	}
	if w.Path != "" && w.Path[0] != '/' {
		return fmt.Errorf("comfyume_worker path %q must start with /", w.Path)
	}
	return nil
}

// Interface guards
var (
	_ caddy.Provisioner           = (*Worker)(nil)
	_ caddyhttp.MiddlewareHandler = (*Worker)(nil)
	_ caddyfile.Unmarshaler       = (*Worker)(nil)
)
