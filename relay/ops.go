package relay

import (
	"bytes"
	"context"
	"crypto/sha256"
	_ "embed"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"net/http"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/comfyume/comfyume/dispatch"
	"github.com/comfyume/comfyume/usage"
)

// The operator's page: a live view of the pools, their endpoints, the
// running and waiting jobs and the latest failures, for the people who run
// a workshop. One HTML page (its style and script inline, allowed by hash
// in a strict Content-Security-Policy; nothing loaded from elsewhere) and
// one server-sent-event stream that pushes the whole state when it
// changes. Usernames and error messages are operator data; prompts and
// workflows are never on it.

var (
	//go:embed ops/page.html
	opsHTML string
	//go:embed ops/page.css
	opsCSS string
	//go:embed ops/page.js
	opsJS string
)

// opsPage is the page with its style and script inline, and the CSP that
// allows exactly those.
var opsPage, opsCSP = func() ([]byte, string) {
	hash := func(s string) string {
		sum := sha256.Sum256([]byte(s))
		return "'sha256-" + base64.StdEncoding.EncodeToString(sum[:]) + "'"
	}
	page := strings.Replace(opsHTML, "/*STYLE*/", opsCSS, 1)
	page = strings.Replace(page, "/*SCRIPT*/", opsJS, 1)
	csp := "default-src 'none'; script-src " + hash(opsJS) + "; style-src " + hash(opsCSS) +
		"; connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
	return []byte(page), csp
}()

// Operator page limits.
const (
	// MaxOpsStreams is how many operator pages may be open on one gateway
	// at once; more are answered 503 (the page retries).
	MaxOpsStreams = 16
	// opsMinGap is the least time between two pushed states (at most 2 a
	// second however busy the gateway).
	opsMinGap = 500 * time.Millisecond
	// opsPoll re-reads the state without a change signal (endpoint
	// health, other gateways' jobs).
	opsPoll = 2 * time.Second
	// opsHeartbeat keeps idle proxies from cutting a quiet stream.
	opsHeartbeat = 15 * time.Second
	// opsWriteTimeout bounds one write to a page: a page that reads
	// nothing for that long (a sleeping laptop, a stuck proxy) is dropped
	// and gives its place back.
	opsWriteTimeout = 30 * time.Second
	// opsRows bounds the running and waiting jobs and the usage rows
	// listed, opsFailures the failures.
	opsRows     = 200
	opsFailures = 50
)

// Ops serves the operator's page and its stream.
type Ops struct {
	g    *Gateway
	feed *opsFeed
}

func newOps(g *Gateway) *Ops {
	o := &Ops{g: g}
	o.feed = newOpsFeed(o.content, MaxOpsStreams)
	return o
}

// Ops returns the operator's page of this gateway.
func (g *Gateway) Ops() *Ops { return g.ops }

// ServeHTTP answers a path ending in "/events" with the page's stream and
// anything else with the page. The page finds its stream relative to its
// own path, so it can be mounted anywhere.
func (o *Ops) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if r.Method != http.MethodGet && r.Method != http.MethodHead {
		w.Header().Set("Allow", "GET, HEAD")
		http.Error(w, "method not allowed", http.StatusMethodNotAllowed)
		return
	}
	if strings.HasSuffix(r.URL.Path, "/events") {
		o.ServeEvents(w, r)
		return
	}
	o.ServePage(w, r)
}

// ServePage writes the page.
func (o *Ops) ServePage(w http.ResponseWriter, r *http.Request) {
	h := w.Header()
	h.Set("Content-Type", "text/html; charset=utf-8")
	h.Set("Content-Security-Policy", opsCSP)
	h.Set("X-Content-Type-Options", "nosniff")
	h.Set("X-Frame-Options", "DENY")
	// The stream is asked with a Referer of this origin only: Caddy's
	// admin API wants one from browsers.
	h.Set("Referrer-Policy", "same-origin")
	h.Set("Cache-Control", "no-store")
	h.Set("Content-Length", strconv.Itoa(len(opsPage)))
	if r.Method == http.MethodHead {
		return
	}
	_, _ = w.Write(opsPage)
}

// ServeEvents writes the stream of states (text/event-stream).
func (o *Ops) ServeEvents(w http.ResponseWriter, r *http.Request) { o.feed.serve(w, r) }

// State returns the current state as JSON, as the stream sends it.
func (o *Ops) State(ctx context.Context) []byte { return stamp(o.content(ctx)) }

// changed tells open pages that jobs changed.
func (o *Ops) changed() { o.feed.changed() }

// opsState is what the page shows.
type opsState struct {
	Pools       []opsPool           `json:"pools"`
	Running     []dispatch.JobBrief `json:"running"`
	MoreRunning int                 `json:"more_running"`
	Waiting     []dispatch.JobBrief `json:"waiting"`
	MoreWaiting int                 `json:"more_waiting"`
	Failures    []dispatch.Failure  `json:"failures"`
	// Usage is each person's use of the pools today against their quota
	// (null: not kept).
	Usage *opsUsage `json:"usage"`
	// Problems are reasons the state may be incomplete (the store did
	// not answer).
	Problems []string `json:"problems,omitempty"`
}

// opsUsage is today's use of the pools (UTC day), per user and pool.
type opsUsage struct {
	Day string `json:"day"`
	// Resets is when the day's quotas start again (Unix ms).
	Resets int64         `json:"resets"`
	Rows   []opsUsageRow `json:"rows"`
	More   int           `json:"more"`
}

type opsUsageRow struct {
	User string `json:"user"`
	Pool string `json:"pool"`
	// GPUSeconds of the jobs that ended today; QuotaGPUSeconds the day's
	// GPU-time quota with what an operator added (0: none).
	GPUSeconds      float64 `json:"gpu_seconds"`
	QuotaGPUSeconds float64 `json:"quota_gpu_seconds"`
	// Prompts admitted today; QuotaPrompts their quota with what an
	// operator added (0: none).
	Prompts      int64 `json:"prompts"`
	QuotaPrompts int64 `json:"quota_prompts"`
	// Jobs that ran and ended today, Errors those that failed.
	Jobs   int64 `json:"jobs"`
	Errors int64 `json:"errors"`
}

type opsPool struct {
	Name      string        `json:"name"`
	Waiting   int           `json:"waiting"`
	Held      int           `json:"held"`
	Running   int           `json:"running"`
	Endpoints []opsEndpoint `json:"endpoints"`
}

type opsEndpoint struct {
	URL string `json:"url"`
	// State is "up", "starting" (failing while jobs wait for it: a cold
	// start) or "down" (its circuit is open and nothing waits).
	State string `json:"state"`
	// Circuit is "closed" (takes jobs) or "open".
	Circuit   string `json:"circuit"`
	Failures  int    `json:"failures"`
	Jobs      int    `json:"jobs"`
	MaxJobs   int    `json:"max_jobs"`
	Transport string `json:"transport"`
}

// content builds the state's JSON (without its time stamp).
func (o *Ops) content(ctx context.Context) []byte {
	m := o.g.manager
	st := opsState{Pools: []opsPool{}}
	for _, p := range m.Status(ctx) {
		op := opsPool{Name: p.Name, Waiting: p.Waiting, Held: p.Held, Running: p.Running, Endpoints: []opsEndpoint{}}
		for _, e := range p.Endpoints {
			oe := opsEndpoint{URL: e.URL, Failures: e.Failures, Jobs: e.Jobs, MaxJobs: e.MaxJobs, Transport: e.Transport,
				State: "up", Circuit: "closed"}
			if !e.Up {
				oe.Circuit, oe.State = "open", "down"
			}
			if e.Failures > 0 && (p.Held > 0 || p.Waiting > 0) {
				oe.State = "starting"
			}
			op.Endpoints = append(op.Endpoints, oe)
		}
		st.Pools = append(st.Pools, op)
	}
	b, err := m.Board(ctx, opsRows)
	if err != nil {
		st.Problems = append(st.Problems, "the job store did not answer; showing this gateway's jobs only: "+err.Error())
	}
	st.Running, st.MoreRunning, st.Waiting, st.MoreWaiting = b.Running, b.MoreRunning, b.Waiting, b.MoreWaiting
	if st.Running == nil {
		st.Running = []dispatch.JobBrief{}
	}
	if st.Waiting == nil {
		st.Waiting = []dispatch.JobBrief{}
	}
	f, err := m.Failures(ctx, opsFailures)
	if err != nil {
		st.Problems = append(st.Problems, "the shared failure list did not answer; showing this gateway's: "+err.Error())
	}
	st.Failures = f
	if l := m.Usage(); l != nil {
		now := time.Now()
		u := &opsUsage{Day: usage.DayOf(now), Resets: usage.ResetTime(now).UnixMilli(), Rows: []opsUsageRow{}}
		rows, err := l.Usage(ctx, usage.Query{Since: u.Day, Until: u.Day})
		if err != nil {
			st.Problems = append(st.Problems, "usage could not be read: "+err.Error())
		}
		for _, r := range rows {
			ur := opsUsageRow{User: r.User, Pool: r.Pool, GPUSeconds: r.GPUSeconds, Prompts: r.Admitted, Jobs: r.Jobs, Errors: r.Error + r.Lost}
			if r.QuotaGPUSeconds > 0 {
				ur.QuotaGPUSeconds = r.QuotaGPUSeconds + r.ExtraGPUSeconds
			}
			if r.QuotaJobs > 0 {
				ur.QuotaPrompts = r.QuotaJobs + r.ExtraJobs
			}
			u.Rows = append(u.Rows, ur)
		}
		// The heaviest users first.
		sort.SliceStable(u.Rows, func(a, b int) bool {
			x, y := u.Rows[a], u.Rows[b]
			if x.GPUSeconds != y.GPUSeconds {
				return x.GPUSeconds > y.GPUSeconds
			}
			if x.Prompts != y.Prompts {
				return x.Prompts > y.Prompts
			}
			return x.User < y.User
		})
		if n := len(u.Rows) - opsRows; n > 0 {
			u.Rows, u.More = u.Rows[:opsRows], n
		}
		st.Usage = u
	}
	out, _ := json.Marshal(st)
	return out
}

// stamp puts the server's time (Unix ms) in a state's JSON object, so the
// page can tell how long ago things happened by the server's clock.
func stamp(content []byte) []byte {
	t := strconv.FormatInt(time.Now().UnixMilli(), 10)
	if len(content) < 2 || content[0] != '{' {
		return []byte(`{"time":` + t + `}`)
	}
	sep := ","
	if bytes.Equal(bytes.TrimSpace(content[1:]), []byte("}")) {
		sep = ""
	}
	return append([]byte(`{"time":`+t+sep), content[1:]...)
}

// opsFeed builds the state for every open page at once and pushes it to
// each when it changed: at most once per minGap, right after a change
// signal (or every poll otherwise); a page that opens gets the state
// within minGap. It runs only while a page is open.
type opsFeed struct {
	build     func(ctx context.Context) []byte
	max       int
	minGap    time.Duration
	poll      time.Duration
	heartbeat time.Duration
	// writeTimeout bounds each write to a page.
	writeTimeout time.Duration
	// after waits between two builds (a test replaces it).
	after func(time.Duration) <-chan time.Time

	kick chan struct{}
	mu   sync.Mutex
	subs map[*opsSub]struct{}
	stop chan struct{} // closed when the last page leaves
	last []byte
}

type opsSub struct {
	ch    chan []byte // the latest state not yet written
	fresh bool        // gets the next state even if unchanged
}

func newOpsFeed(build func(ctx context.Context) []byte, max int) *opsFeed {
	return &opsFeed{build: build, max: max, minGap: opsMinGap, poll: opsPoll, heartbeat: opsHeartbeat,
		writeTimeout: opsWriteTimeout, after: time.After, kick: make(chan struct{}, 1), subs: map[*opsSub]struct{}{}}
}

// changed asks for a new state; it never waits.
func (f *opsFeed) changed() {
	select {
	case f.kick <- struct{}{}:
	default:
	}
}

func (f *opsFeed) subscribe() (*opsSub, bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if len(f.subs) >= f.max {
		return nil, false
	}
	s := &opsSub{ch: make(chan []byte, 1), fresh: true}
	f.subs[s] = struct{}{}
	if f.stop == nil {
		f.stop = make(chan struct{})
		f.last = nil
		go f.loop(f.stop)
	}
	f.changed()
	return s, true
}

func (f *opsFeed) unsubscribe(s *opsSub) {
	f.mu.Lock()
	defer f.mu.Unlock()
	delete(f.subs, s)
	if len(f.subs) == 0 && f.stop != nil {
		close(f.stop)
		f.stop = nil
	}
}

// streams counts the open pages.
func (f *opsFeed) streams() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return len(f.subs)
}

func (f *opsFeed) loop(stop chan struct{}) {
	poll := time.NewTicker(f.poll)
	defer poll.Stop()
	for {
		select {
		case <-stop:
			return
		case <-f.kick:
		case <-poll.C:
		}
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		content := f.build(ctx)
		cancel()
		f.mu.Lock()
		if f.stop != stop {
			f.mu.Unlock()
			return
		}
		changed := !bytes.Equal(content, f.last)
		f.last = content
		msg := stamp(content)
		for s := range f.subs {
			if changed || s.fresh {
				s.fresh = false
				select {
				case <-s.ch: // replaced by the newer state
				default:
				}
				s.ch <- msg
			}
		}
		f.mu.Unlock()
		select {
		case <-stop:
			return
		case <-f.after(f.minGap):
		}
	}
}

// serve streams states to one page until it goes.
func (f *opsFeed) serve(w http.ResponseWriter, r *http.Request) {
	s, ok := f.subscribe()
	if !ok {
		w.Header().Set("Retry-After", "10")
		http.Error(w, fmt.Sprintf("too many operator pages are open (limit %d)", f.max), http.StatusServiceUnavailable)
		return
	}
	defer f.unsubscribe(s)
	rc := http.NewResponseController(w)
	// Each write has its own deadline: a stream has no end to wait for,
	// but a page that stopped reading must not keep its place forever.
	_ = rc.SetWriteDeadline(time.Now().Add(f.writeTimeout))
	h := w.Header()
	h.Set("Content-Type", "text/event-stream")
	h.Set("Cache-Control", "no-store")
	h.Set("X-Content-Type-Options", "nosniff")
	h.Set("X-Accel-Buffering", "no")
	w.WriteHeader(http.StatusOK)
	if _, err := fmt.Fprint(w, "retry: 3000\n\n"); err != nil {
		return
	}
	if rc.Flush() != nil {
		return
	}
	hb := time.NewTicker(f.heartbeat)
	defer hb.Stop()
	for {
		var out []byte
		select {
		case <-r.Context().Done():
			return
		case msg := <-s.ch:
			out = append(append([]byte("data: "), msg...), '\n', '\n')
		case <-hb.C:
			out = []byte(": heartbeat\n\n")
		}
		_ = rc.SetWriteDeadline(time.Now().Add(f.writeTimeout))
		if _, err := w.Write(out); err != nil {
			return
		}
		if rc.Flush() != nil {
			return
		}
	}
}
