// Package caddymodule is the Caddy glue of comfyume: the "comfyume" app
// (pools, output storage; one per Caddy instance, shared by every site) and
// the "comfyume" HTTP handler (per site: who the user is, where their home
// ComfyUI is, which pool runs their prompts). Protocol, scheduling and
// relaying live in the comfy, dispatch and relay packages.
package caddymodule

import (
	"fmt"
	"net/http"
	"path/filepath"
	"time"

	"github.com/caddyserver/caddy/v2"
	"go.uber.org/zap"

	"github.com/comfyume/comfyume/dispatch"
	"github.com/comfyume/comfyume/relay"
)

func init() {
	caddy.RegisterModule(App{})
	caddy.RegisterModule(Handler{})
}

// App is the comfyume app: the GPU pools prompts can run on and where
// captured outputs are kept. Its state (jobs, browser sessions, outputs)
// lives as long as the Caddy process, across config reloads.
type App struct {
	// Pools of ComfyUI servers that run prompts, each with a name sites
	// refer to in `run_on`.
	Pools []PoolConfig `json:"pools,omitempty"`

	// Store selects where job records are kept. "memory" (the default)
	// keeps them in this process.
	Store string `json:"store,omitempty"`

	// Outputs says where outputs captured from GPU servers are stored.
	// Default: a directory "comfyume/outputs" in Caddy's data directory.
	Outputs *OutputsConfig `json:"outputs,omitempty"`

	gateway *relay.Gateway
	key     string
	logger  *zap.Logger
}

// PoolConfig is a named set of GPU ComfyUI servers.
type PoolConfig struct {
	// Name identifies the pool in a site's `run_on`.
	Name string `json:"name"`
	// Upstreams are the pool's servers. A job goes to the least busy one
	// with a free slot; when none has one, it waits its turn.
	Upstreams []UpstreamConfig `json:"upstreams"`
}

// UpstreamConfig is one ComfyUI server of a pool.
type UpstreamConfig struct {
	// URL of the server, e.g. "http://10.0.0.5:8188" or
	// "https://containers.example.com/my-deployment". Global placeholders
	// such as {env.NAME} are replaced.
	URL string `json:"url"`
	// Headers added to every request to this server, e.g. an
	// Authorization bearer token. Values may use global placeholders
	// ({env.GPU_TOKEN}). They are never sent to browsers.
	Headers http.Header `json:"headers,omitempty"`
	// MaxJobs is how many of the gateway's jobs may run on this server at
	// once (0 = no limit). ComfyUI runs one prompt at a time, so 1 keeps
	// each job's wait visible in the gateway's own queue.
	MaxJobs int `json:"max_jobs,omitempty"`
	// LostTimeout is how long this server may stay unreachable while the
	// gateway's jobs run on it before those jobs end with an error the UI
	// shows (default 15s). The gateway reconnects meanwhile and recovers
	// finished results from the server's history.
	LostTimeout caddy.Duration `json:"lost_timeout,omitempty"`
}

// OutputsConfig selects the output store.
type OutputsConfig struct {
	// Backend is "disk" (the default).
	Backend string `json:"backend,omitempty"`
	// Dir is the directory for the disk backend.
	Dir string `json:"dir,omitempty"`
}

// CaddyModule returns the Caddy module information.
func (App) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "comfyume",
		New: func() caddy.Module { return new(App) },
	}
}

// gateways keeps one gateway per output location alive across config
// reloads: the new config's app picks up the running one (jobs, sessions).
var gateways = caddy.NewUsagePool()

type gatewayHolder struct{ *relay.Gateway }

func (g gatewayHolder) Destruct() error {
	g.Gateway.Hub().CloseSockets()
	g.Gateway.Close()
	return nil
}

// Provision sets up the app.
func (a *App) Provision(ctx caddy.Context) error {
	a.logger = ctx.Logger()
	repl := caddy.NewReplacer()
	if a.Outputs == nil {
		a.Outputs = &OutputsConfig{}
	}
	if a.Outputs.Backend == "" {
		a.Outputs.Backend = "disk"
	}
	if a.Outputs.Dir == "" {
		a.Outputs.Dir = filepath.Join(caddy.AppDataDir(), "comfyume", "outputs")
	}
	a.Outputs.Dir = repl.ReplaceAll(a.Outputs.Dir, "")
	if a.Store == "" {
		a.Store = "memory"
	}
	a.key = "comfyume:" + a.Store + ":" + a.Outputs.Backend + ":" + a.Outputs.Dir
	val, _, err := gateways.LoadOrNew(a.key, func() (caddy.Destructor, error) {
		blobs, err := relay.NewDiskBlobs(a.Outputs.Dir)
		if err != nil {
			return nil, fmt.Errorf("outputs directory: %w", err)
		}
		gw, err := relay.New(relay.Config{Store: dispatch.NewMemoryStore(), Blobs: blobs, Logger: a.logger})
		if err != nil {
			return nil, err
		}
		return gatewayHolder{gw}, nil
	})
	if err != nil {
		return err
	}
	a.gateway = val.(gatewayHolder).Gateway
	for _, pc := range a.Pools {
		pool := &dispatch.Pool{Name: pc.Name}
		for _, uc := range pc.Upstreams {
			h := http.Header{}
			for k, vs := range uc.Headers {
				for _, v := range vs {
					h.Add(k, repl.ReplaceAll(v, ""))
				}
			}
			up, err := dispatch.NewUpstream(repl.ReplaceAll(uc.URL, ""), dispatch.UpstreamOptions{
				Header: h, MaxJobs: uc.MaxJobs, LostTimeout: time.Duration(uc.LostTimeout), Logger: a.logger,
			})
			if err != nil {
				return fmt.Errorf("pool %s: %w", pc.Name, err)
			}
			pool.Upstreams = append(pool.Upstreams, up)
		}
		a.gateway.Manager().SetPool(pool)
	}
	return nil
}

// Validate checks the configuration.
func (a *App) Validate() error {
	seen := map[string]bool{}
	for _, p := range a.Pools {
		if p.Name == "" || p.Name == "home" {
			return fmt.Errorf("pool name %q is reserved or empty", p.Name)
		}
		if seen[p.Name] {
			return fmt.Errorf("pool %q defined twice", p.Name)
		}
		seen[p.Name] = true
		if len(p.Upstreams) == 0 {
			return fmt.Errorf("pool %q has no upstream", p.Name)
		}
	}
	if a.Store != "memory" {
		return fmt.Errorf("store %q is not available (only memory)", a.Store)
	}
	if a.Outputs.Backend != "disk" {
		return fmt.Errorf("outputs backend %q is not available (only disk)", a.Outputs.Backend)
	}
	return nil
}

// hasPool reports whether a pool of that name is configured.
func (a *App) hasPool(name string) bool {
	for _, p := range a.Pools {
		if p.Name == name {
			return true
		}
	}
	return false
}

// Start implements caddy.App.
func (a *App) Start() error { return nil }

// Stop implements caddy.App.
func (a *App) Stop() error { return nil }

// Cleanup releases this config's hold on the shared gateway.
func (a *App) Cleanup() error {
	if a.key != "" {
		_, err := gateways.Delete(a.key)
		return err
	}
	return nil
}

// Interface guards
var (
	_ caddy.App          = (*App)(nil)
	_ caddy.Provisioner  = (*App)(nil)
	_ caddy.Validator    = (*App)(nil)
	_ caddy.CleanerUpper = (*App)(nil)
)
