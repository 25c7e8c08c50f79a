package caddymodule

import (
	"fmt"
	"net/http"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"go.uber.org/zap"

	"github.com/comfyume/comfyume/comfy"
	"github.com/comfyume/comfyume/relay"
	"github.com/comfyume/comfyume/usage"
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
	// http://127.0.0.1:8188. Without a placeholder and with User set, one
	// home serves everyone (a shared home): each request carries its user
	// as ComfyUI's Comfy-User header (run it with --multi-user), and its
	// routes that act on all users (/internal/*, /free, clears and
	// interrupts of the whole server) are refused or kept to the user's
	// own jobs.
	Home string `json:"home,omitempty"`

	// RunOn names the pool that runs this site's prompts, or "home" (the
	// default) to run them on the user's home ComfyUI.
	RunOn string `json:"run_on,omitempty"`

	// User is a placeholder that gives the identity of the person making the
	// request, e.g. "{http.auth.user.id}". Users see only their own jobs,
	// events and outputs. Default: everyone is one anonymous user. An empty
	// value refuses the request (403, saying why). A
	// request header (e.g. {http.request.header.X-User}) is only
	// trustworthy if a proxy in front sets it and strips it from clients.
	User string `json:"user,omitempty"`

	// Priority orders this site's users in a pool's queue: a number, or a
	// placeholder that gives one per request (e.g. from a `map` of users to
	// priorities). Higher runs first; default 0.
	Priority string `json:"priority,omitempty"`

	// Quota changes the pool's daily GPU time quota for this site's users:
	// a duration ("2h"), or a placeholder that gives one per request (e.g.
	// from a `map` of users). "0" or "unlimited" lifts the limit; an empty
	// value keeps the pool's. MaxJobsPerDay does the same for the pool's
	// max_jobs_per_day (a number). A value that is neither is ignored (the
	// pool's holds) and logged once.
	Quota         string `json:"quota,omitempty"`
	MaxJobsPerDay string `json:"max_jobs_per_day,omitempty"`

	// MaxBodySize limits request bodies the handler reads, in bytes
	// (default 100 MiB, ComfyUI's own upload limit). Larger ones get 413.
	MaxBodySize int64 `json:"max_body_size,omitempty"`

	app        *App
	logger     *zap.Logger
	sharedHome bool // home has no placeholder and serves every user
	warned     *warnings
}

// warnings are the handler's warnings that must not repeat per request.
type warnings struct {
	noUser    sync.Once      // an empty identity: logged once
	badQuota  sync.Once      // a quota placeholder that is no quota
	crossSite rateLimitedLog // refused cross-site requests
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
	h.logger = ctx.Logger()
	h.warned = new(warnings)
	// {env.*} is the same for everyone; any other placeholder is taken to
	// pick a home per user.
	h.sharedHome = h.User != "" && !strings.Contains(envPlaceholder.ReplaceAllString(h.Home, ""), "{")
	if h.sharedHome {
		h.logger.Warn("home is shared by every user of this site: each user's identity goes to it as the Comfy-User header, "+
			"so saved workflows and settings stay apart only if it runs with --multi-user and lists every user; "+
			"uploads, models and files it saves are everyone's, and /internal/* and /free are refused (README: a shared home)",
			zap.String("home", h.Home), zap.String("user", h.User))
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
	if reason := relay.CrossSite(r); reason != "" {
		if held, ok := h.warned.crossSite.allow(time.Now()); ok {
			h.logger.Warn("refused a cross-site request (403): another site's page made the browser send it",
				zap.String("reason", reason), zap.String("method", r.Method), zap.String("path", r.URL.Path),
				zap.Int("refused_since_last_warning", held))
		}
		// As ComfyUI answers it: 403 with an empty body.
		w.WriteHeader(http.StatusForbidden)
		return nil
	}
	repl, _ := r.Context().Value(caddy.ReplacerCtxKey).(*caddy.Replacer)
	if repl == nil {
		repl = caddy.NewReplacer()
	}
	user := anonymous
	if h.User != "" {
		user = repl.ReplaceAll(h.User, "")
		if user == "" {
			h.warned.noUser.Do(func() {
				h.logger.Warn("refusing requests without a user identity (403): the user placeholder was empty; "+
					"is the auth handler (basic_auth, forward_auth, …) in front of comfyume?", zap.String("user", h.User))
			})
			writeError(w, http.StatusForbidden, "no_user_identity", "No user identity",
				"The gateway's user placeholder "+h.User+" was empty for this request: is the auth handler in front of comfyume?")
			return nil
		}
	}
	homeURL := repl.ReplaceAll(h.Home, "")
	home, err := h.app.gateway.Home(homeURL)
	if err != nil {
		return caddyhttp.Error(http.StatusBadGateway, err)
	}
	site := relay.Site{User: user, Home: home, RunOn: h.RunOn, MaxBody: h.MaxBodySize, SharedHome: h.sharedHome}
	if h.Priority != "" {
		p, err := strconv.Atoi(strings.TrimSpace(repl.ReplaceAll(h.Priority, "")))
		if err == nil {
			site.Priority = p
		}
	}
	if (h.Quota != "" || h.MaxJobsPerDay != "") && r.Method == http.MethodPost && strings.HasSuffix(r.URL.Path, "/prompt") {
		site.Quota = h.quotaOverride(repl)
	}
	repl.Set("comfyume.user", user)
	if h.app.gateway.ServeHTTP(w, r, site) {
		return nil
	}
	if h.sharedHome {
		if relay.ActsOnEveryone(r) {
			writeError(w, http.StatusForbidden, "shared_home", "Not available on a shared home",
				r.URL.Path+" acts on every user of this site's home ComfyUI, which the gateway does not allow.")
			return nil
		}
		// The user's own identity, never one the client picked.
		r.Header.Set(relay.ComfyUserHeader, user)
	}
	// The request passed the gateway's cross-site check above, the one
	// rule for everything behind it, so Origin and fetch metadata stop
	// here: home's own check would refuse what the gateway allows — the
	// navigations that open the UI from a link or after a login on another
	// domain (newer ComfyUI), and every browser post once reverse_proxy
	// sends home its own Host (a loopback home compares Host and Origin).
	r.Header.Del("Origin")
	for k := range r.Header {
		if strings.HasPrefix(k, "Sec-Fetch-") {
			r.Header.Del(k)
		}
	}
	return next.ServeHTTP(w, r)
}

var envPlaceholder = regexp.MustCompile(`\{env\.[^}]*\}`)

// quotaOverride reads the site's per-user quota values for this request.
func (h *Handler) quotaOverride(repl *caddy.Replacer) usage.Override {
	var o usage.Override
	bad := func(key, v string) {
		h.warned.badQuota.Do(func() {
			h.logger.Warn("ignoring a per-user quota that is not one (the pool's quota holds)",
				zap.String(key, v))
		})
	}
	if h.Quota != "" {
		switch v := strings.TrimSpace(repl.ReplaceAll(h.Quota, "")); v {
		case "":
		case "0", "unlimited", "none":
			zero := time.Duration(0)
			o.GPU = &zero
		default:
			if d, err := caddy.ParseDuration(v); err == nil && d > 0 {
				o.GPU = &d
			} else {
				bad("quota", v)
			}
		}
	}
	if h.MaxJobsPerDay != "" {
		switch v := strings.TrimSpace(repl.ReplaceAll(h.MaxJobsPerDay, "")); v {
		case "":
		case "unlimited", "none":
			zero := int64(0)
			o.Jobs = &zero
		default:
			if n, err := strconv.ParseInt(v, 10, 64); err == nil && n >= 0 {
				o.Jobs = &n
			} else {
				bad("max_jobs_per_day", v)
			}
		}
	}
	return o
}

// writeError answers in ComfyUI's error shape.
func writeError(w http.ResponseWriter, status int, typ, message, details string) {
	w.Header().Set("Content-Type", "application/json; charset=utf-8")
	w.WriteHeader(status)
	_, _ = w.Write(comfy.NewPromptError(typ, message, details).JSON())
}

// rateLimitedLog lets a warning through at most once a minute and counts
// the ones held back, so a flood of refused requests cannot flood the log.
type rateLimitedLog struct {
	mu   sync.Mutex
	last time.Time
	held int
}

func (l *rateLimitedLog) allow(now time.Time) (held int, ok bool) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if !l.last.IsZero() && now.Sub(l.last) < time.Minute {
		l.held++
		return 0, false
	}
	held, l.held, l.last = l.held, 0, now
	return held, true
}

// Interface guards
var (
	_ caddy.Provisioner           = (*Handler)(nil)
	_ caddy.Validator             = (*Handler)(nil)
	_ caddyhttp.MiddlewareHandler = (*Handler)(nil)
)
