package caddymodule

import (
	"fmt"
	"net/http"
	"sort"
	"strings"
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
	caddy.RegisterModule(supervisorApp{})
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

	// Command, if set, is ComfyUI's command line (program and arguments):
	// the worker runs it with Caddy, in a process group of its own and
	// with Caddy's environment, answers 503 until it serves at ComfyUI,
	// logs its output, starts it again when it exits (a job running then
	// ends with an error saying why) and stops it with Caddy. Without a
	// command, ComfyUI is run by something else.
	Command []string `json:"command,omitempty"`
	// Dir is the command's working directory (default: Caddy's).
	Dir string `json:"dir,omitempty"`
	// Env sets environment variables of the command, on top of Caddy's.
	Env map[string]string `json:"env,omitempty"`
	// RestartMin and RestartMax bound the wait before ComfyUI is started
	// again: it doubles from RestartMin after each exit, up to RestartMax,
	// and is back to RestartMin once ComfyUI ran ready for RestartMax
	// (default 1s and 1m).
	RestartMin caddy.Duration `json:"restart_min,omitempty"`
	RestartMax caddy.Duration `json:"restart_max,omitempty"`
	// StopTimeout is how long ComfyUI has to exit after SIGTERM before it
	// gets SIGKILL (default 10s).
	StopTimeout caddy.Duration `json:"stop_timeout,omitempty"`
	// ReadyTimeout is how long a starting ComfyUI may take to answer
	// before it is stopped and started again (default 10m).
	ReadyTimeout caddy.Duration `json:"ready_timeout,omitempty"`

	server *worker.Server
	spec   worker.SupervisorSpec
	supKey string
	sup    *worker.Supervisor
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
	comfyURL := repl.ReplaceAll(w.ComfyUI, "")
	if len(w.Command) > 0 {
		if err := w.provisionCommand(ctx, repl, comfyURL); err != nil {
			return err
		}
	}
	w.server = worker.NewServer(comfyURL, worker.Options{
		Token:      repl.ReplaceAll(w.Token, ""),
		Heartbeat:  time.Duration(w.Heartbeat),
		Idle:       time.Duration(w.Idle),
		Logger:     ctx.Logger(),
		Supervisor: w.sup,
	})
	return nil
}

// supervisors keeps one supervised ComfyUI per address across config
// reloads: a reload with the same command keeps it running (and its jobs);
// one that changes the command restarts it once, when the new config
// starts. The last config using it stops it.
var supervisors = caddy.NewUsagePool()

type supervisorHolder struct{ *worker.Supervisor }

func (h supervisorHolder) Destruct() error {
	h.Stop()
	return nil
}

func (w *Worker) provisionCommand(ctx caddy.Context, repl *caddy.Replacer, comfyURL string) error {
	w.spec = worker.SupervisorSpec{
		Dir: repl.ReplaceKnown(w.Dir, ""), URL: comfyURL,
		RestartMin: time.Duration(w.RestartMin), RestartMax: time.Duration(w.RestartMax),
		StopTimeout: time.Duration(w.StopTimeout), ReadyTimeout: time.Duration(w.ReadyTimeout),
	}
	for _, a := range w.Command {
		w.spec.Command = append(w.spec.Command, repl.ReplaceKnown(a, ""))
	}
	keys := make([]string, 0, len(w.Env))
	for k := range w.Env {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		w.spec.Env = append(w.spec.Env, k+"="+repl.ReplaceKnown(w.Env[k], ""))
	}
	w.supKey = "comfyume_worker:" + comfyURL
	logger := ctx.Logger().Named("comfyui")
	val, _, err := supervisors.LoadOrNew(w.supKey, func() (caddy.Destructor, error) {
		return supervisorHolder{worker.NewSupervisor(logger)}, nil
	})
	if err != nil {
		return err
	}
	w.sup = val.(supervisorHolder).Supervisor
	// The command starts with the config (Start of the app below), not
	// here: `caddy validate` provisions without starting.
	app, err := ctx.App(supervisorAppID)
	if err != nil {
		_, _ = supervisors.Delete(w.supKey)
		w.sup = nil
		return err
	}
	if err := app.(*supervisorApp).add(w); err != nil {
		_, _ = supervisors.Delete(w.supKey)
		w.sup = nil
		return err
	}
	return nil
}

// Cleanup lets go of the supervised ComfyUI; the last config using it
// stops it.
func (w *Worker) Cleanup() error {
	if w.sup != nil {
		_, _ = supervisors.Delete(w.supKey)
		w.sup = nil
	}
	return nil
}

const supervisorAppID = "comfyume_supervisor"

// supervisorApp starts the commands of the config's comfyume_worker
// handlers when the config starts. It is loaded by the handlers; nothing
// configures it.
type supervisorApp struct {
	workers []*Worker
}

// CaddyModule returns the Caddy module information.
func (supervisorApp) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{ID: supervisorAppID, New: func() caddy.Module { return new(supervisorApp) }}
}

func (a *supervisorApp) add(w *Worker) error {
	for _, o := range a.workers {
		if o.supKey == w.supKey && !o.spec.Equal(w.spec) {
			return fmt.Errorf("comfyume_worker: two different commands for the ComfyUI at %s", w.spec.URL)
		}
	}
	a.workers = append(a.workers, w)
	return nil
}

// Start runs (or keeps running) every command of the config.
func (a *supervisorApp) Start() error {
	for _, w := range a.workers {
		if w.sup == nil {
			continue
		}
		if err := w.sup.Start(w.spec); err != nil {
			return fmt.Errorf("comfyume_worker: %v", err)
		}
	}
	return nil
}

// Stop does nothing: a command stops with the last config that uses it
// (the handlers' Cleanup), so that a reload does not restart it.
func (a *supervisorApp) Stop() error { return nil }

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
//		command <program> <args...>
//		dir <path>
//		env <KEY> <value>
//		restart_backoff <min> <max>
//		stop_timeout <duration>
//		ready_timeout <duration>
//	}
func (w *Worker) UnmarshalCaddyfile(d *caddyfile.Dispenser) error {
	d.Next()
	if d.NextArg() {
		return d.ArgErr()
	}
	for d.NextBlock(0) {
		key := d.Val()
		switch key {
		case "command":
			w.Command = d.RemainingArgs()
			if len(w.Command) == 0 {
				return d.ArgErr()
			}
			continue
		case "env":
			args := d.RemainingArgs()
			if len(args) != 2 || args[0] == "" || strings.ContainsAny(args[0], "=\x00") {
				return d.Errf("env takes a variable name and its value")
			}
			if w.Env == nil {
				w.Env = map[string]string{}
			}
			w.Env[args[0]] = args[1]
			continue
		case "restart_backoff":
			args := d.RemainingArgs()
			if len(args) != 2 {
				return d.Errf("restart_backoff takes the shortest and the longest wait")
			}
			lo, err := parseDuration(d, key, args[0])
			if err != nil {
				return err
			}
			hi, err := parseDuration(d, key, args[1])
			if err != nil {
				return err
			}
			if hi < lo {
				return d.Errf("restart_backoff: the longest wait %s is shorter than the shortest %s", args[1], args[0])
			}
			w.RestartMin, w.RestartMax = lo, hi
			continue
		}
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
		case "dir":
			w.Dir = val
		case "heartbeat", "idle", "stop_timeout", "ready_timeout":
			dur, err := parseDuration(d, key, val)
			if err != nil {
				return err
			}
			switch key {
			case "heartbeat":
				w.Heartbeat = dur
			case "idle":
				w.Idle = dur
			case "stop_timeout":
				w.StopTimeout = dur
			default:
				w.ReadyTimeout = dur
			}
		default:
			return d.Errf("unrecognized comfyume_worker option %q", key)
		}
	}
	if w.Path != "" && w.Path[0] != '/' {
		return fmt.Errorf("comfyume_worker path %q must start with /", w.Path)
	}
	if len(w.Command) == 0 && (w.Dir != "" || w.Env != nil || w.RestartMin != 0 || w.StopTimeout != 0 || w.ReadyTimeout != 0) {
		return fmt.Errorf("comfyume_worker: dir, env, restart_backoff, stop_timeout and ready_timeout need a command")
	}
	return nil
}

// Interface guards
var (
	_ caddy.Provisioner           = (*Worker)(nil)
	_ caddy.CleanerUpper          = (*Worker)(nil)
	_ caddy.App                   = (*supervisorApp)(nil)
	_ caddyhttp.MiddlewareHandler = (*Worker)(nil)
	_ caddyfile.Unmarshaler       = (*Worker)(nil)
)
