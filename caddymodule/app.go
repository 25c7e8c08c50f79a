// Package caddymodule is the Caddy glue of comfyume: the "comfyume" app
// (pools, output storage; one per Caddy instance, shared by every site) and
// the "comfyume" HTTP handler (per site: who the user is, where their home
// ComfyUI is, which pool runs their prompts). Protocol, scheduling and
// relaying live in the comfy, dispatch and relay packages.
package caddymodule

import (
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"path/filepath"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"

	"github.com/comfyume/comfyume/dispatch"
	"github.com/comfyume/comfyume/relay"
	"github.com/comfyume/comfyume/usage"
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

	// Store selects where job records are kept. Default: in this process
	// ("memory"). With "valkey", several Caddy instances share jobs, events
	// and browser sessions, and a restart forgets nothing.
	Store *StoreConfig `json:"store,omitempty"`

	// HealthInterval is how often endpoints marked down (after failures)
	// are probed — GET /system_stats, or the worker's GET /comfyume/job for
	// pinned endpoints; one that answers takes jobs again. Default 10s.
	// While jobs wait for a pool, its down endpoints are probed every
	// 250 ms regardless, so the end of a cold start is noticed at once.
	HealthInterval caddy.Duration `json:"health_interval,omitempty"`

	// HistoryLimit is how many ended jobs each user keeps (default 1000).
	// When a job ends, the user's oldest ended jobs beyond it are
	// forgotten — records and prompts, in memory or in Valkey — as ComfyUI
	// forgets history beyond its own limit, so that neither grows without
	// end. A forgotten job's captured outputs are removed from the disk
	// directory or bucket with it (a removal that fails is logged).
	HistoryLimit int `json:"history_limit,omitempty"`

	// HistorySize bounds, in bytes, what each user's ended jobs keep of
	// their prompts and UI workflows (default 256 MiB). When a job ends,
	// the user's oldest ended jobs beyond it are forgotten whole, as beyond
	// history_limit; the newest ended job is always kept.
	HistorySize int64 `json:"history_size,omitempty"`

	// HistoryOutputs bounds, in bytes, what each user's ended jobs keep of
	// captured outputs in the outputs store (default 10 GiB). When a job
	// with outputs ends, the user's oldest ended jobs beyond it are
	// forgotten whole — records and outputs — as beyond history_limit; the
	// newest ended job is always kept. A user's outputs then take at most
	// this plus what their waiting and running jobs store (each up to
	// max_output_size), however many jobs they run.
	HistoryOutputs int64 `json:"history_outputs,omitempty"`
	// MaxEventSize is the largest binary frame (a preview, or a whole
	// image from SaveImageWebsocket) accepted from a GPU server, in bytes
	// (default 32 MiB); MaxTextEventSize the largest JSON event (default
	// 4 MiB, or MaxEventSize if smaller). A larger frame is logged and
	// skipped, and the job goes on.
	MaxEventSize     int64 `json:"max_event_size,omitempty"`
	MaxTextEventSize int64 `json:"max_text_event_size,omitempty"`
	// MaxSocketsPerUser is how many browser sockets (tabs) one user may
	// have open on this Caddy at once (default 32); more are refused with
	// close code 1008 "too many open sockets for this user".
	MaxSocketsPerUser int `json:"max_sockets_per_user,omitempty"`

	// MaxSocketQueue is how many bytes may wait for one browser socket that
	// reads slower than its events arrive (default 4 MiB). Beyond it,
	// progress and previews are coalesced to the latest per node while
	// lifecycle events are all kept; a socket still over it after 10s, or
	// over twice it, is closed (the browser reconnects and catches up).
	MaxSocketQueue int `json:"max_socket_queue,omitempty"`

	// MaxJobQueue is how many bytes of a GPU server's events may wait for
	// one job while the gateway is still busy with earlier ones, e.g.
	// storing an output (default 16 MiB). Past half of it, progress and
	// previews are coalesced to the latest per node, and past it dropped;
	// lifecycle events are kept up to twice it. A server that sends more
	// while the job is busy is broken or hostile: the job ends with an
	// execution_error that says so.
	MaxJobQueue int64 `json:"max_job_queue,omitempty"`

	// MaxOutputSize bounds, in bytes, the outputs one job may store
	// (default 4 GiB): what the gateway copies from a GPU server into the
	// outputs store. A server that announces more (or a file that does not
	// end) is read no further: the output past the bound is not stored,
	// and a job on a worker endpoint ends with an execution_error saying
	// so.
	MaxOutputSize int64 `json:"max_output_size,omitempty"`

	// MaxQueuedSize bounds, in bytes, the prompts and UI workflows one
	// user's waiting and running jobs keep in this Caddy's memory (default
	// 512 MiB; a user's only job is always taken). A prompt past it is
	// refused with 429 until some of the user's jobs end: max_queued
	// prompts of max_body_size each would otherwise be kept whole.
	MaxQueuedSize int64 `json:"max_queued_size,omitempty"`

	// MetricsPerUser adds per-user series to the usage metrics (GPU and
	// wait seconds, jobs, refusals by user and pool). Off by default: one
	// series per user grows with the workshop; the admin API's
	// /comfyume/usage has per-user numbers without it.
	MetricsPerUser bool `json:"metrics_per_user,omitempty"`

	// Outputs says where outputs captured from GPU servers are stored.
	// Default: a directory "comfyume/outputs" in Caddy's data directory.
	Outputs *OutputsConfig `json:"outputs,omitempty"`

	gateway *relay.Gateway
	key     string
	logger  *zap.Logger
}

// StoreConfig selects the job store.
type StoreConfig struct {
	// Backend is "memory" (default) or "valkey" (also any Redis 7 server).
	Backend string `json:"backend,omitempty"`
	// Address of the Valkey server: host:port, or a URL such as
	// valkey://user:pass@host:6379/0 or rediss://host:6380 (TLS).
	Address string `json:"address,omitempty"`
	// Username and Password authenticate (override the URL's).
	Username string `json:"username,omitempty"`
	Password string `json:"password,omitempty"`
	// TLS connects with TLS (implied by rediss:// and valkeys:// URLs).
	TLS bool `json:"tls,omitempty"`
	// Prefix is put before every key and channel (default "comfyume:"), so
	// several deployments can share one server.
	Prefix string `json:"prefix,omitempty"`
	// DisableCache turns client-side caching off, for servers without
	// CLIENT TRACKING.
	DisableCache bool `json:"disable_cache,omitempty"`
	// LeaseTTL is how long a gateway's claim on a running job lasts without
	// renewal; when a gateway dies, another takes its jobs over after this
	// (default 15s).
	LeaseTTL caddy.Duration `json:"lease_ttl,omitempty"`
}

// DefaultMaxQueued is how many jobs one user may have waiting in a pool
// when its max_queued is not set.
const DefaultMaxQueued = 100

// PoolConfig is a named set of GPU ComfyUI servers.
type PoolConfig struct {
	// Name identifies the pool in a site's `run_on`.
	Name string `json:"name"`
	// Upstreams are the pool's servers. A job goes to the least busy one
	// with a free slot; when none has one, it waits its turn in the pool's
	// fair queue: users of higher priority first, otherwise one job per
	// user in turn, so one user's batch does not hold up the others.
	Upstreams []UpstreamConfig `json:"upstreams"`
	// MaxQueued is how many jobs one user may have waiting (default
	// DefaultMaxQueued, 100; -1 = no limit); more are refused with 429 and
	// a message the UI shows. Waiting jobs keep their prompts and
	// workflows in the store, so this also bounds what one user's queue
	// costs in memory.
	MaxQueued int `json:"max_queued,omitempty"`
	// MaxRunning is how many of one user's jobs may run at once on the
	// pool (0 = no limit).
	MaxRunning int `json:"max_running,omitempty"`
	// ColdStartTimeout is how long a job waits while no endpoint accepts
	// it — connection refused, 502/503/504 and timeouts are what a
	// serverless container scaling from zero looks like. Meanwhile the job
	// is retried with backoff and the browser shows why it waits; after
	// it, the job fails with an error the UI shows. Default 5m.
	ColdStartTimeout caddy.Duration `json:"cold_start_timeout,omitempty"`
	// Watchdog ends a job that has had no event from its GPU server for
	// this long (the server is asked to interrupt it and the UI shows an
	// error), so a stuck job never holds a slot forever. Jobs are checked
	// every second, so the end comes up to two seconds after. 0 = off.
	Watchdog caddy.Duration `json:"watchdog,omitempty"`
	// Quota is the GPU time each user may use on the pool per day (UTC),
	// e.g. "30m"; MaxJobsPerDay how many prompts each user may have
	// admitted per day. A prompt over either is refused at once (403, a
	// dialog in the UI saying what was used and when it resets); a job
	// already running is never cut, so a job admitted under the GPU quota
	// may end over it. 0: no limit. A site's `quota` and
	// `max_jobs_per_day` change them per user.
	Quota         caddy.Duration `json:"quota,omitempty"`
	MaxJobsPerDay int64          `json:"max_jobs_per_day,omitempty"`
	// Fallback "home" runs a job that no endpoint accepted within
	// ColdStartTimeout on the user's own ComfyUI instead of failing it
	// (the browser is told). Default: none.
	Fallback string `json:"fallback,omitempty"`
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
	// LostTimeout is how long this server's event stream may stay down
	// while the gateway's jobs run on it (default 15s). The gateway redials
	// meanwhile. Past it, each job is looked up over plain HTTP: one that
	// ended is finished from the server's /history (outputs included), one
	// still in the server's /queue is waited for; the others end with an
	// error the UI shows.
	LostTimeout caddy.Duration `json:"lost_timeout,omitempty"`
	// Transport is how jobs reach this server: "comfyui" (the default:
	// ComfyUI's own API, an event WebSocket and /view) or "worker": the
	// server runs comfyume's worker handler (comfyume_worker) in front of
	// its ComfyUI, and each job travels in one streaming request that
	// carries its inputs in and its events and outputs back. Use "worker"
	// for serverless deployments behind a load balancer that sends each
	// request to any container. "worker-async" is the same job request
	// for platforms that only answer asynchronously (Prefer:
	// respond-async, then polling status and result): progress shows the
	// platform's status, events arrive when the job is done.
	Transport string `json:"transport,omitempty"`
}

// OutputsConfig selects the output store.
type OutputsConfig struct {
	// Backend is "disk" (the default) or "s3" (any S3-compatible service:
	// AWS S3, Cloudflare R2, MinIO, ...).
	Backend string `json:"backend,omitempty"`
	// Dir is the directory for the disk backend.
	Dir string `json:"dir,omitempty"`

	// Endpoint of the S3 API: host[:port] (HTTPS) or a URL whose scheme
	// says http or https.
	Endpoint string `json:"endpoint,omitempty"`
	// Bucket holds the outputs; Prefix is put before every object key.
	Bucket string `json:"bucket,omitempty"`
	Prefix string `json:"prefix,omitempty"`
	// AccessKey and SecretKey sign requests (placeholders such as
	// {env.S3_KEY} work); both empty: taken from the environment.
	AccessKey string `json:"access_key,omitempty"`
	SecretKey string `json:"secret_key,omitempty"`
	// Region of the bucket (R2: "auto").
	Region string `json:"region,omitempty"`
	// Serve is how /view delivers outputs: "proxy" (default: streamed
	// through Caddy, Range supported) or "redirect" (302 to a presigned
	// URL valid for RedirectExpiry, default 15m).
	Serve          string         `json:"serve,omitempty"`
	RedirectExpiry caddy.Duration `json:"redirect_expiry,omitempty"`
	// PublicEndpoint is where browsers reach the bucket, if not at
	// Endpoint (presigned URLs are signed for it).
	PublicEndpoint string `json:"public_endpoint,omitempty"`
	// Spool is a local directory where outputs wait while S3 is
	// unreachable; they are uploaded when it returns, and served from
	// there meanwhile. Default: "comfyume/spool" in Caddy's data directory.
	Spool string `json:"spool,omitempty"`
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

type gatewayHolder struct {
	*relay.Gateway
	closers []func()
}

func (g gatewayHolder) Destruct() error {
	g.Gateway.Hub().CloseSockets()
	g.Gateway.Close()
	for _, c := range g.closers {
		c()
	}
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
	if a.Store == nil {
		a.Store = &StoreConfig{}
	}
	if a.Store.Backend == "" {
		a.Store.Backend = "memory"
	}
	if a.Store.Prefix == "" {
		a.Store.Prefix = "comfyume:"
	}
	out := *a.Outputs
	for _, f := range []*string{&out.Dir, &out.Endpoint, &out.Bucket, &out.Prefix, &out.AccessKey, &out.SecretKey, &out.Region, &out.PublicEndpoint, &out.Spool} {
		*f = repl.ReplaceAll(*f, "")
	}
	if out.Dir == "" {
		out.Dir = filepath.Join(caddy.AppDataDir(), "comfyume", "outputs")
	}
	if out.Spool == "" {
		out.Spool = filepath.Join(caddy.AppDataDir(), "comfyume", "spool")
	}
	st := *a.Store
	for _, f := range []*string{&st.Address, &st.Username, &st.Password, &st.Prefix} {
		*f = repl.ReplaceAll(*f, "")
	}
	keyJSON, _ := json.Marshal(struct {
		S StoreConfig
		O OutputsConfig
	}{st, out})
	a.key = "comfyume:" + string(keyJSON)
	val, _, err := gateways.LoadOrNew(a.key, func() (caddy.Destructor, error) {
		return newGateway(ctx, st, out, time.Duration(a.HealthInterval), a.logger)
	})
	if err != nil {
		return err
	}
	a.gateway = val.(gatewayHolder).Gateway
	a.gateway.Manager().SetEventLimits(dispatch.EventLimits{MaxBinary: a.MaxEventSize, MaxText: a.MaxTextEventSize, MaxJobQueue: a.MaxJobQueue})
	for _, pc := range a.Pools {
		maxQueued := pc.MaxQueued
		switch {
		case maxQueued == 0:
			maxQueued = DefaultMaxQueued
		case maxQueued < 0:
			maxQueued = 0 // no limit
		}
		pool := &dispatch.Pool{Name: pc.Name, MaxQueued: maxQueued, MaxRunning: pc.MaxRunning,
			ColdStartTimeout: time.Duration(pc.ColdStartTimeout), Watchdog: time.Duration(pc.Watchdog),
			FallbackHome: pc.Fallback == "home",
			Quota:        usage.Limits{GPU: time.Duration(pc.Quota), Jobs: pc.MaxJobsPerDay}}
		for _, uc := range pc.Upstreams {
			h := http.Header{}
			for k, vs := range uc.Headers {
				for _, v := range vs {
					h.Add(k, repl.ReplaceAll(v, ""))
				}
			}
			up, err := dispatch.NewUpstream(repl.ReplaceAll(uc.URL, ""), dispatch.UpstreamOptions{
				Header: h, MaxJobs: uc.MaxJobs, LostTimeout: time.Duration(uc.LostTimeout), Logger: a.logger,
				Pinned: uc.Transport == "worker", Async: uc.Transport == "worker-async",
			})
			if err != nil {
				return fmt.Errorf("pool %s: %w", pc.Name, err)
			}
			pool.Upstreams = append(pool.Upstreams, up)
		}
		a.gateway.Manager().SetPool(pool)
	}
	a.gateway.Manager().UsageCounters().SetPerUser(a.MetricsPerUser)
	a.gateway.Manager().SetHistoryLimit(a.HistoryLimit)
	a.gateway.Manager().SetHistorySize(a.HistorySize)
	a.gateway.Manager().SetHistoryOutputs(a.HistoryOutputs)
	a.gateway.Hub().SetLimits(a.MaxSocketsPerUser, a.MaxSocketQueue)
	a.gateway.SetMaxOutputSize(a.MaxOutputSize)
	a.gateway.Manager().SetMaxQueuedSize(a.MaxQueuedSize)
	if reg := ctx.GetMetricsRegistry(); reg != nil {
		for _, c := range []prometheus.Collector{metrics{app: a}, usageMetrics{app: a}} {
			if err := reg.Register(c); err != nil {
				var dup prometheus.AlreadyRegisteredError
				if !errors.As(err, &dup) {
					a.logger.Warn("registering metrics", zap.Error(err))
				}
			}
		}
	}
	return nil
}

// Validate checks the configuration.
func (a *App) Validate() error {
	if a.HistoryLimit < 0 {
		return fmt.Errorf("history_limit %d: must not be negative", a.HistoryLimit)
	}
	if a.HistorySize < 0 {
		return fmt.Errorf("history_size %d: must not be negative", a.HistorySize)
	}
	if a.HistoryOutputs < 0 {
		return fmt.Errorf("history_outputs %d: must not be negative", a.HistoryOutputs)
	}
	if a.MaxSocketsPerUser < 0 || a.MaxSocketQueue < 0 || a.MaxJobQueue < 0 || a.MaxOutputSize < 0 || a.MaxQueuedSize < 0 {
		return fmt.Errorf("max_sockets_per_user, max_socket_queue, max_job_queue, max_output_size and max_queued_size must not be negative")
	}
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
		if !usage.ValidPool(p.Name) {
			return fmt.Errorf("pool name %q: must not contain '|'", p.Name)
		}
		if p.Quota < 0 || p.MaxJobsPerDay < 0 {
			return fmt.Errorf("pool %q: quota and max_jobs_per_day must not be negative", p.Name)
		}
		if p.Fallback != "" && p.Fallback != "home" {
			return fmt.Errorf("pool %q: fallback %q: only home is supported", p.Name, p.Fallback)
		}
		for _, u := range p.Upstreams {
			if u.Transport != "" && u.Transport != "comfyui" && u.Transport != "worker" && u.Transport != "worker-async" {
				return fmt.Errorf("pool %q upstream %s: transport %q: use comfyui, worker or worker-async", p.Name, u.URL, u.Transport)
			}
		}
	}
	switch a.Store.Backend {
	case "memory":
	case "valkey":
		if a.Store.Address == "" {
			return fmt.Errorf("store valkey: address is required")
		}
	default:
		return fmt.Errorf("store %q: use memory or valkey", a.Store.Backend)
	}
	switch a.Outputs.Backend {
	case "disk":
	case "s3":
		if a.Outputs.Endpoint == "" || a.Outputs.Bucket == "" {
			return fmt.Errorf("outputs s3: endpoint and bucket are required")
		}
		if a.Outputs.Serve != "" && a.Outputs.Serve != "proxy" && a.Outputs.Serve != "redirect" {
			return fmt.Errorf("outputs s3: serve %q: use proxy or redirect", a.Outputs.Serve)
		}
	default:
		return fmt.Errorf("outputs %q: use disk or s3", a.Outputs.Backend)
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
