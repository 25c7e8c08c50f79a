package caddymodule

import (
	"net/http"
	"strconv"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/caddyserver/caddy/v2/caddyconfig/httpcaddyfile"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"github.com/dustin/go-humanize"
)

func init() {
	httpcaddyfile.RegisterGlobalOption("comfyume", parseGlobal)
	httpcaddyfile.RegisterHandlerDirective("comfyume", parseHandler)
	httpcaddyfile.RegisterDirectiveOrder("comfyume", httpcaddyfile.Before, "reverse_proxy")
	httpcaddyfile.RegisterHandlerDirective("comfyume_worker", parseWorker)
	httpcaddyfile.RegisterDirectiveOrder("comfyume_worker", httpcaddyfile.Before, "reverse_proxy")
}

// parseGlobal reads the comfyume global option:
//
//	comfyume {
//		pool <name> {
//			max_queued <n>
//			max_running <n>
//			cold_start_timeout <duration>
//			watchdog <duration>
//			fallback home
//			quota <duration> [per day]
//			max_jobs_per_day <n>
//			upstream <url> {
//				header <field> <value>
//				max_jobs <n>
//				lost_timeout <duration>
//				transport comfyui | worker | worker-async
//			}
//		}
//		health_interval <duration>
//		history_limit <n>
//		history_size <size>
//		history_outputs <size>
//		max_event_size <size> [<text size>]
//		max_sockets_per_user <n>
//		max_socket_queue <size>
//		max_job_queue <size>
//		max_output_size <size>
//		max_queued_size <size>
//		metrics_per_user
//		store memory | valkey {
//			address <host:port | valkey:// or rediss:// URL>
//			username <name>
//			password <secret>
//			tls
//			prefix <prefix>
//			disable_cache
//			lease_ttl <duration>
//		}
//		outputs disk [<dir>] | s3 {
//			endpoint <host[:port] | http(s)://host[:port]>
//			bucket <name>
//			prefix <key prefix>
//			access_key <key>
//			secret_key <secret>
//			region <region>
//			serve proxy | redirect [<expiry>]
//			public_endpoint <host or URL browsers use>
//			spool <dir>
//		}
//	}
func parseGlobal(d *caddyfile.Dispenser, _ any) (any, error) {
	app := new(App) // a second comfyume block replaces the first
	if err := app.UnmarshalCaddyfile(d); err != nil {
		return nil, err
	}
	return httpcaddyfile.App{Name: "comfyume", Value: caddyconfig.JSON(app, nil)}, nil
}

// UnmarshalCaddyfile sets up the app from Caddyfile tokens.
func (a *App) UnmarshalCaddyfile(d *caddyfile.Dispenser) error {
	d.Next() // option name
	if d.NextArg() {
		return d.ArgErr()
	}
	for d.NextBlock(0) {
		switch d.Val() {
		case "pool":
			if !d.NextArg() {
				return d.ArgErr()
			}
			pool := PoolConfig{Name: d.Val()}
			if d.NextArg() {
				return d.ArgErr()
			}
			for d.NextBlock(1) {
				if d.Val() == "fallback" {
					v, err := oneArg(d)
					if err != nil {
						return err
					}
					pool.Fallback = v
					continue
				}
				if key := d.Val(); key == "cold_start_timeout" || key == "watchdog" {
					dur, err := durationArg(d, key)
					if err != nil {
						return err
					}
					if key == "watchdog" {
						pool.Watchdog = dur
					} else {
						pool.ColdStartTimeout = dur
					}
					continue
				}
				if d.Val() == "max_queued" || d.Val() == "max_running" {
					key := d.Val()
					n, err := countArg(d, key, 0)
					if err != nil {
						return err
					}
					if key == "max_queued" {
						if n == 0 {
							n = -1 // "max_queued 0": no limit (unset is the default)
						}
						pool.MaxQueued = n
					} else {
						pool.MaxRunning = n
					}
					continue
				}
				if d.Val() == "quota" {
					dur, err := quotaArg(d)
					if err != nil {
						return err
					}
					pool.Quota = dur
					continue
				}
				if d.Val() == "max_jobs_per_day" {
					n, err := countArg(d, "max_jobs_per_day", 1)
					if err != nil {
						return err
					}
					pool.MaxJobsPerDay = int64(n)
					continue
				}
				if d.Val() != "upstream" {
					return d.Errf("unrecognized pool subdirective %q", d.Val())
				}
				if !d.NextArg() {
					return d.ArgErr()
				}
				up := UpstreamConfig{URL: d.Val()}
				if d.NextArg() {
					return d.ArgErr()
				}
				for d.NextBlock(2) {
					switch d.Val() {
					case "header":
						args := d.RemainingArgs()
						if len(args) != 2 {
							return d.ArgErr()
						}
						if up.Headers == nil {
							up.Headers = http.Header{}
						}
						up.Headers.Add(args[0], args[1])
					case "max_jobs":
						n, err := countArg(d, "max_jobs", 0)
						if err != nil {
							return err
						}
						up.MaxJobs = n
					case "transport":
						v, err := oneArg(d)
						if err != nil {
							return err
						}
						up.Transport = v
					case "lost_timeout":
						dur, err := durationArg(d, "lost_timeout")
						if err != nil {
							return err
						}
						up.LostTimeout = dur
					default:
						return d.Errf("unrecognized upstream subdirective %q", d.Val())
					}
				}
				pool.Upstreams = append(pool.Upstreams, up)
			}
			a.Pools = append(a.Pools, pool)
		case "health_interval":
			dur, err := durationArg(d, "health_interval")
			if err != nil {
				return err
			}
			a.HealthInterval = dur
		case "history_limit":
			n, err := countArg(d, "history_limit", 1)
			if err != nil {
				return err
			}
			a.HistoryLimit = n
		case "history_size":
			n, err := sizeArg(d, "history_size", 1<<62)
			if err != nil {
				return err
			}
			a.HistorySize = n
		case "history_outputs":
			n, err := sizeArg(d, "history_outputs", 1<<62)
			if err != nil {
				return err
			}
			a.HistoryOutputs = n
		case "max_event_size":
			for _, dst := range []*int64{&a.MaxEventSize, &a.MaxTextEventSize} {
				if !d.NextArg() {
					break
				}
				n, err := parseSize(d, "max_event_size", d.Val(), 1<<40)
				if err != nil {
					return err
				}
				*dst = n
			}
			if a.MaxEventSize == 0 || d.NextArg() {
				return d.ArgErr()
			}
		case "max_sockets_per_user":
			n, err := countArg(d, "max_sockets_per_user", 1)
			if err != nil {
				return err
			}
			a.MaxSocketsPerUser = n
		case "metrics_per_user":
			if d.NextArg() {
				return d.ArgErr()
			}
			a.MetricsPerUser = true
		case "max_socket_queue":
			n, err := sizeArg(d, "max_socket_queue", 1<<40)
			if err != nil {
				return err
			}
			a.MaxSocketQueue = int(n)
		case "max_job_queue":
			n, err := sizeArg(d, "max_job_queue", 1<<40)
			if err != nil {
				return err
			}
			a.MaxJobQueue = n
		case "max_output_size", "max_queued_size":
			key := d.Val()
			n, err := sizeArg(d, key, 1<<50)
			if err != nil {
				return err
			}
			*map[string]*int64{"max_output_size": &a.MaxOutputSize, "max_queued_size": &a.MaxQueuedSize}[key] = n
		case "store":
			if !d.NextArg() {
				return d.ArgErr()
			}
			a.Store = &StoreConfig{Backend: d.Val()}
			if d.NextArg() {
				return d.ArgErr()
			}
			for d.NextBlock(1) {
				key := d.Val()
				if key == "tls" || key == "disable_cache" {
					if d.NextArg() {
						return d.ArgErr()
					}
					if key == "tls" {
						a.Store.TLS = true
					} else {
						a.Store.DisableCache = true
					}
					continue
				}
				val, err := oneArg(d)
				if err != nil {
					return err
				}
				switch key {
				case "address":
					a.Store.Address = val
				case "username":
					a.Store.Username = val
				case "password":
					a.Store.Password = val
				case "prefix":
					a.Store.Prefix = val
				case "lease_ttl":
					dur, err := parseDuration(d, key, val)
					if err != nil {
						return err
					}
					a.Store.LeaseTTL = dur
				default:
					return d.Errf("unrecognized store option %q", key)
				}
			}
		case "outputs":
			if !d.NextArg() {
				return d.ArgErr()
			}
			a.Outputs = &OutputsConfig{Backend: d.Val()}
			if d.NextArg() {
				a.Outputs.Dir = d.Val()
			}
			if d.NextArg() {
				return d.ArgErr()
			}
			for d.NextBlock(1) {
				key := d.Val()
				if key == "serve" {
					args := d.RemainingArgs()
					if len(args) < 1 || len(args) > 2 {
						return d.ArgErr()
					}
					a.Outputs.Serve = args[0]
					if len(args) == 2 {
						dur, err := parseDuration(d, "serve "+args[0], args[1])
						if err != nil {
							return err
						}
						a.Outputs.RedirectExpiry = dur
					}
					continue
				}
				val, err := oneArg(d)
				if err != nil {
					return err
				}
				switch key {
				case "dir":
					a.Outputs.Dir = val
				case "endpoint":
					a.Outputs.Endpoint = val
				case "bucket":
					a.Outputs.Bucket = val
				case "prefix":
					a.Outputs.Prefix = val
				case "access_key":
					a.Outputs.AccessKey = val
				case "secret_key":
					a.Outputs.SecretKey = val
				case "region":
					a.Outputs.Region = val
				case "public_endpoint":
					a.Outputs.PublicEndpoint = val
				case "spool":
					a.Outputs.Spool = val
				default:
					return d.Errf("unrecognized outputs option %q", key)
				}
			}
		default:
			return d.Errf("unrecognized comfyume option %q", d.Val())
		}
	}
	return nil
}

// durationArg reads exactly one positive duration argument.
func durationArg(d *caddyfile.Dispenser, key string) (caddy.Duration, error) {
	val, err := oneArg(d)
	if err != nil {
		return 0, err
	}
	return parseDuration(d, key, val)
}

func parseDuration(d *caddyfile.Dispenser, key, val string) (caddy.Duration, error) {
	dur, err := caddy.ParseDuration(val)
	if err != nil || dur <= 0 {
		return 0, d.Errf("%s: %q is not a duration", key, val)
	}
	return caddy.Duration(dur), nil
}

// sizeArg reads exactly one size argument ("4MiB") of 1 to max bytes.
func sizeArg(d *caddyfile.Dispenser, key string, max uint64) (int64, error) {
	val, err := oneArg(d)
	if err != nil {
		return 0, err
	}
	return parseSize(d, key, val, max)
}

func parseSize(d *caddyfile.Dispenser, key, val string, max uint64) (int64, error) {
	n, err := humanize.ParseBytes(val)
	if err != nil || n == 0 || n > max {
		return 0, d.Errf("%s: %q is not a size", key, val)
	}
	return int64(n), nil
}

// countArg reads exactly one whole-number argument of at least min (0 or 1).
func countArg(d *caddyfile.Dispenser, key string, min int) (int, error) {
	val, err := oneArg(d)
	if err != nil {
		return 0, err
	}
	n, err := strconv.Atoi(val)
	if err != nil || n < min {
		kind := "a non-negative number"
		if min > 0 {
			kind = "a positive number"
		}
		return 0, d.Errf("%s: %q is not %s", key, val, kind)
	}
	return n, nil
}

// quotaArg reads "quota <duration> [per day]": GPU time per user and UTC
// day (the only period).
func quotaArg(d *caddyfile.Dispenser) (caddy.Duration, error) {
	args := d.RemainingArgs()
	if len(args) != 1 && !(len(args) == 3 && args[1] == "per" && args[2] == "day") {
		if len(args) == 3 && args[1] == "per" {
			return 0, d.Errf("quota: period %q: only \"per day\" (a UTC day) is supported", args[2])
		}
		return 0, d.Errf("quota: want \"quota <duration> [per day]\", e.g. quota 30m per day")
	}
	return parseDuration(d, "quota", args[0])
}

// oneArg reads exactly one argument of the current line.
func oneArg(d *caddyfile.Dispenser) (string, error) {
	if !d.NextArg() {
		return "", d.ArgErr()
	}
	v := d.Val()
	if d.NextArg() {
		return "", d.ArgErr()
	}
	return v, nil
}

func parseHandler(h httpcaddyfile.Helper) (caddyhttp.MiddlewareHandler, error) {
	m := new(Handler)
	err := m.UnmarshalCaddyfile(h.Dispenser)
	return m, err
}

// UnmarshalCaddyfile reads the comfyume directive:
//
//	comfyume {
//		home <url>
//		run_on <pool>|home
//		user <placeholder>
//		priority <number or placeholder>
//		quota <duration or placeholder>
//		max_jobs_per_day <n or placeholder>
//		max_body_size <size>
//	}
func (h *Handler) UnmarshalCaddyfile(d *caddyfile.Dispenser) error {
	d.Next() // directive name
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
		case "home":
			h.Home = val
		case "run_on":
			h.RunOn = val
		case "user":
			h.User = val
		case "priority":
			h.Priority = val
		case "quota":
			h.Quota = val
		case "max_jobs_per_day":
			h.MaxJobsPerDay = val
		case "max_body_size":
			n, err := humanize.ParseBytes(val)
			if err != nil || n == 0 {
				return d.Errf("max_body_size: %q is not a size", val)
			}
			h.MaxBodySize = int64(n)
		default:
			return d.Errf("unrecognized comfyume subdirective %q", key)
		}
	}
	return nil
}

// Interface guards
var (
	_ caddyfile.Unmarshaler = (*Handler)(nil)
	_ caddyfile.Unmarshaler = (*App)(nil)
)
