package comfytest

import (
	"bufio"
	"crypto/subtle"
	"errors"
	"fmt"
	"io"
	"log"
	"math/rand/v2"
	"net"
	"net/http"
	"net/http/httputil"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

// BalancerOptions configure StartBalancer.
type BalancerOptions struct {
	// Replicas is the number of fake ComfyUI replicas behind the one URL.
	// Default 2.
	Replicas int
	// Server are the options of every replica. Name is made unique per
	// replica: "replica-<i>" when empty, "<Name>-<i>" otherwise (it shows
	// as the device name in /system_stats and prefixes log lines).
	Server Options
	// ColdStart is how long a (re)started replica takes to become ready.
	// While it is starting, every request routed to it is answered by the
	// balancer itself with 503 Service Unavailable (a Retry-After header
	// and a text body; nothing reaches the replica), unless HoldColdStart
	// is set. The replicas made by StartBalancer are warm (ready at once);
	// Restart and scale-from-zero cold-start. Zero means ready at once.
	ColdStart time.Duration
	// HoldColdStart, if true, makes a request routed to a starting replica
	// wait until the replica is ready and then forwards it (as Verda's
	// synchronous queue does), instead of answering 503. A held request
	// gets 502 if its replica is killed or restarted meanwhile.
	HoldColdStart bool
	// PathPrefix, e.g. "/my-deployment", makes the balancer serve
	// <URL>/<path> and forward /<path> to a replica, like Verda's
	// https://containers.datacrunch.io/<deployment>/<path>. Requests
	// outside the prefix get 404 from the balancer. The exact prefix is
	// forwarded as "/".
	PathPrefix string
	// Token, if set, is required as "Authorization: Bearer <Token>"
	// (otherwise 401, checked before the prefix). The Authorization header
	// is then consumed by the balancer and not forwarded to the replica.
	Token string
	// Policy is "round-robin" (default) or "random". Either way every
	// request, WebSocket upgrades included, is routed on its own: there is
	// no affinity by connection, client or cookie.
	Policy string
	// ExtraHandler, if set, models a wrapper that runs in each replica's
	// container in front of ComfyUI (like a worker or Salad's comfyui-api):
	// the port the balancer forwards to serves ExtraHandler(i, comfy)
	// instead of ComfyUI. comfy listens on its own address as usual
	// (comfy.URL(), like 127.0.0.1:8188 inside the container); to pass a
	// request through unchanged call comfy.Handler().ServeHTTP(w, r). It
	// is called again with the fresh Server on every (re)start (on scale
	// from zero with the balancer's lock held: it must not call Balancer
	// methods); Kill drops the wrapper's connections together with
	// ComfyUI's.
	ExtraHandler func(replica int, comfy *Server) http.Handler
}

// BalancedRequest is one request that reached the balancer.
type BalancedRequest struct {
	Method string
	// Path is the escaped path forwarded to the replica (PathPrefix
	// removed), or the path as received when it was outside the prefix.
	Path     string
	RawQuery string
	// WebSocket reports an Upgrade: websocket request.
	WebSocket bool
	// Replica is the index the request was routed to, -1 when it was
	// rejected before routing (401, 404 outside the prefix).
	Replica int
	// Status is the status the client got: the replica's, 101 for a
	// proxied protocol switch, or the balancer's own 401/404/502/503.
	// It is recorded as soon as the response header is sent (for a
	// tunnelled WebSocket when the protocol is switched); 0 before that,
	// or when the connection dropped before any status was sent.
	Status int
	Time   time.Time
}

// Balancer is a non-sticky load balancer in front of N fake ComfyUI
// replicas, like a serverless GPU host (Verda/DataCrunch serverless
// containers, see shared/comfyui-protocol.md §7): every HTTP request is
// sent to some replica independently of the ones before, replicas die,
// are replaced by fresh ones with empty state and cold-start, and the
// deployment can scale to zero.
//
// Replica states, as reported by State:
//
//   - "ready": requests routed to it are proxied (httputil.ReverseProxy,
//     responses streamed unbuffered, WebSocket upgrades tunnelled, escaped
//     paths such as %2F kept).
//   - "starting": cold start in progress, until ColdStart has passed since
//     Restart or scale-from-zero. Requests routed to it get 503 from the
//     balancer (or wait, with HoldColdStart).
//   - "dead": after Kill. It stays in the rotation, as a crashed container
//     the load balancer has not noticed; requests routed to it get 502.
//   - "zero": after ScaleToZero. Not in the rotation. When a request
//     arrives and every replica is at zero, replica 0 is started (fresh,
//     cold) and the request is routed to it; the others stay at zero
//     until Restart.
type Balancer struct {
	t     testing.TB
	opts  BalancerOptions
	pfx   string
	logf  func(format string, args ...any)
	tr    *http.Transport
	elog  *log.Logger
	front *http.Server
	ln    net.Listener

	closed    chan struct{}
	closeOnce sync.Once

	mu       sync.Mutex // guards slots, rr and isClosed
	slots    []*slot
	rr       uint64
	isClosed bool

	lmu  sync.Mutex
	reqs []BalancedRequest
}

type slotState int

const (
	slotLive slotState = iota // ready or starting, see replica.readyAt
	slotDead
	slotZero
)

type slot struct {
	state slotState
	cur   *replica // the latest incarnation (never nil after StartBalancer)
}

// replica is one incarnation of a replica; it is immutable except for
// stopOnce/gone.
type replica struct {
	idx      int
	srv      *Server
	wrap     *http.Server // ExtraHandler's server, nil without one
	target   *url.URL
	proxy    *httputil.ReverseProxy
	readyAt  time.Time
	gone     chan struct{} // closed when this incarnation stops
	stopOnce sync.Once
}

func (r *replica) stop(graceful bool) {
	r.stopOnce.Do(func() {
		close(r.gone)
		if r.wrap != nil {
			_ = r.wrap.Close()
		}
		if graceful {
			r.srv.Close()
		} else {
			r.srv.Kill()
		}
	})
}

// StartBalancer starts o.Replicas warm replicas and the balancer in front
// of them on 127.0.0.1 at a random port; everything is closed when the
// test ends.
func StartBalancer(t testing.TB, o BalancerOptions) *Balancer {
	t.Helper()
	if o.Replicas == 0 {
		o.Replicas = 2
	}
	if o.Replicas < 0 {
		t.Fatalf("comfytest: BalancerOptions.Replicas = %d", o.Replicas)
	}
	switch o.Policy {
	case "":
		o.Policy = "round-robin"
	case "round-robin", "random":
	default:
		t.Fatalf("comfytest: unknown BalancerOptions.Policy %q (want \"round-robin\" or \"random\")", o.Policy)
	}
	pfx := strings.TrimRight(o.PathPrefix, "/")
	if pfx != "" && !strings.HasPrefix(pfx, "/") {
		pfx = "/" + pfx
	}
	b := &Balancer{
		t:      t,
		opts:   o,
		pfx:    pfx,
		logf:   func(string, ...any) {},
		closed: make(chan struct{}),
		tr: &http.Transport{
			Proxy:               nil, // never an environment proxy
			DialContext:         (&net.Dialer{Timeout: 5 * time.Second}).DialContext,
			MaxIdleConnsPerHost: 32,
			IdleConnTimeout:     30 * time.Second,
		},
		elog: log.New(io.Discard, "", 0),
	}
	if o.Server.Logf != nil {
		b.logf = func(format string, args ...any) { o.Server.Logf("[balancer] "+format, args...) }
		b.elog = log.New(logfWriter(b.logf), "", 0)
	}
	b.slots = make([]*slot, o.Replicas)
	for i := range b.slots {
		r, err := b.newReplica(i, 0)
		if err != nil {
			b.Close()
			t.Fatalf("comfytest: start replica %d: %v", i, err)
		}
		b.slots[i] = &slot{state: slotLive, cur: r}
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Close()
		t.Fatalf("comfytest: balancer listen: %v", err)
	}
	b.ln = ln
	b.front = &http.Server{Handler: b, ReadHeaderTimeout: 30 * time.Second, ErrorLog: b.elog}
	go func() { _ = b.front.Serve(ln) }()
	t.Cleanup(b.Close)
	b.logf("listening on %s with %d replicas (%s)", b.URL(), o.Replicas, o.Policy)
	return b
}

// newReplica starts a fresh incarnation of replica i that becomes ready
// after coldStart.
func (b *Balancer) newReplica(i int, coldStart time.Duration) (*replica, error) {
	so := b.opts.Server
	if so.Name == "" {
		so.Name = fmt.Sprintf("replica-%d", i)
	} else {
		so.Name = fmt.Sprintf("%s-%d", so.Name, i)
	}
	srv := New(so)
	if err := srv.Listen("127.0.0.1:0"); err != nil {
		srv.Close()
		return nil, err
	}
	r := &replica{idx: i, srv: srv, readyAt: time.Now().Add(coldStart), gone: make(chan struct{})}
	addr := srv.URL()
	if b.opts.ExtraHandler != nil {
		h := b.opts.ExtraHandler(i, srv)
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			srv.Close()
			return nil, err
		}
		r.wrap = &http.Server{Handler: h, ReadHeaderTimeout: 30 * time.Second, ErrorLog: b.elog}
		wrap := r.wrap
		go func() { _ = wrap.Serve(ln) }()
		addr = "http://" + ln.Addr().String()
	}
	r.target, _ = url.Parse(addr)
	r.proxy = &httputil.ReverseProxy{
		Rewrite:       b.rewrite(r.target),
		Transport:     b.tr,
		FlushInterval: -1,
		ErrorLog:      b.elog,
		ErrorHandler: func(w http.ResponseWriter, req *http.Request, err error) {
			b.logf("replica %d: %s %s: %v", i, req.Method, req.URL.RequestURI(), err)
			textResponse(w, http.StatusBadGateway, fmt.Sprintf("502 Bad Gateway: replica %d: %v", i, err))
		},
	}
	return r, nil
}

func (b *Balancer) rewrite(target *url.URL) func(*httputil.ProxyRequest) {
	return func(pr *httputil.ProxyRequest) {
		rest, _ := b.strip(pr.In.URL.EscapedPath())
		pr.Out.URL.Scheme = target.Scheme
		pr.Out.URL.Host = target.Host
		if p, err := url.PathUnescape(rest); err == nil {
			pr.Out.URL.Path = p
		} else {
			pr.Out.URL.Path = rest
		}
		pr.Out.URL.RawPath = rest // keeps %2F as sent
		pr.Out.Host = pr.In.Host  // the replica sees the client's Host
		pr.SetXForwarded()
		if b.opts.Token != "" {
			pr.Out.Header.Del("Authorization")
		}
	}
}

// strip removes PathPrefix from an escaped path.
func (b *Balancer) strip(p string) (string, bool) {
	if b.pfx == "" {
		return p, true
	}
	if p == b.pfx {
		return "/", true
	}
	if strings.HasPrefix(p, b.pfx+"/") {
		return p[len(b.pfx):], true
	}
	return p, false
}

// URL is the base URL of the deployment, "http://127.0.0.1:port" plus
// PathPrefix.
func (b *Balancer) URL() string {
	return "http://" + b.ln.Addr().String() + b.pfx
}

// Replica returns the current (latest) fake behind replica i, also when it
// is dead or at zero, for introspection (Prompts, OutputFile, ...). After
// Restart or scale-from-zero it is a different Server with empty state.
func (b *Balancer) Replica(i int) *Server {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.slots[i].cur.srv
}

// State returns "ready", "starting", "dead" or "zero" for replica i.
func (b *Balancer) State(i int) string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.stateLocked(b.slots[i], time.Now())
}

func (b *Balancer) stateLocked(s *slot, now time.Time) string {
	switch s.state {
	case slotDead:
		return "dead"
	case slotZero:
		return "zero"
	}
	if now.Before(s.cur.readyAt) {
		return "starting"
	}
	return "ready"
}

// Kill makes replica i die abruptly: its listener, in-flight requests and
// WebSockets (proxied ones included) drop without a goodbye. It stays in
// the rotation; requests routed to it get 502 until Restart. No-op when
// it is already dead or at zero.
func (b *Balancer) Kill(i int) {
	b.mu.Lock()
	s := b.slots[i]
	if s.state != slotLive {
		b.mu.Unlock()
		return
	}
	s.state = slotDead
	r := s.cur
	b.mu.Unlock()
	b.logf("replica %d killed", i)
	r.stop(false)
}

// Restart replaces replica i (killing the old incarnation if it still
// runs) by a fresh one with empty state that cold-starts for ColdStart.
func (b *Balancer) Restart(i int) {
	b.t.Helper()
	r, err := b.newReplica(i, b.opts.ColdStart)
	if err != nil {
		b.t.Fatalf("comfytest: restart replica %d: %v", i, err)
		return
	}
	b.mu.Lock()
	if b.isClosed {
		b.mu.Unlock()
		r.stop(true)
		return
	}
	s := b.slots[i]
	old := s.cur
	s.cur, s.state = r, slotLive
	b.mu.Unlock()
	old.stop(false)
	b.logf("replica %d restarted (cold start %v)", i, b.opts.ColdStart)
}

// ScaleToZero stops every replica (abruptly, like Kill) and takes them out
// of the rotation. The next request starts a cold start of replica 0 and
// is answered 503 (or held, with HoldColdStart) until it is ready.
func (b *Balancer) ScaleToZero() {
	b.mu.Lock()
	var stop []*replica
	for _, s := range b.slots {
		if s.state == slotLive {
			stop = append(stop, s.cur)
		}
		s.state = slotZero
	}
	b.mu.Unlock()
	for _, r := range stop {
		r.stop(false)
	}
	b.logf("scaled to zero")
}

// Requests returns every request that reached the balancer, in arrival
// order, with the replica it was routed to.
func (b *Balancer) Requests() []BalancedRequest {
	b.lmu.Lock()
	defer b.lmu.Unlock()
	return append([]BalancedRequest(nil), b.reqs...)
}

// Close stops the balancer and every replica (gracefully). Safe to call
// more than once; StartBalancer registers it with t.Cleanup.
func (b *Balancer) Close() {
	b.closeOnce.Do(func() {
		close(b.closed)
		b.mu.Lock()
		b.isClosed = true
		var stop []*replica
		for _, s := range b.slots {
			if s != nil {
				stop = append(stop, s.cur)
			}
		}
		b.mu.Unlock()
		for _, r := range stop {
			r.stop(true)
		}
		if b.front != nil {
			_ = b.front.Close()
		}
		b.tr.CloseIdleConnections()
	})
}

// pick routes one request: it returns the replica index and incarnation,
// starting replica 0 when the deployment is at zero.
func (b *Balancer) pick() (int, *replica, string, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	pool := make([]int, 0, len(b.slots))
	for i, s := range b.slots {
		if s.state != slotZero {
			pool = append(pool, i)
		}
	}
	if len(pool) == 0 {
		if len(b.slots) == 0 || b.isClosed {
			return -1, nil, "", errors.New("no replicas")
		}
		r, err := b.newReplica(0, b.opts.ColdStart)
		if err != nil {
			return 0, nil, "", err
		}
		b.slots[0].cur, b.slots[0].state = r, slotLive
		b.logf("scale from zero: replica 0 starting (cold start %v)", b.opts.ColdStart)
		pool = append(pool, 0)
	}
	var i int
	if b.opts.Policy == "random" {
		i = pool[rand.IntN(len(pool))]
	} else {
		i = pool[b.rr%uint64(len(pool))]
		b.rr++
	}
	s := b.slots[i]
	return i, s.cur, b.stateLocked(s, time.Now()), nil
}

func (b *Balancer) record(e BalancedRequest) int {
	b.lmu.Lock()
	defer b.lmu.Unlock()
	b.reqs = append(b.reqs, e)
	return len(b.reqs) - 1
}

func (b *Balancer) update(id int, f func(*BalancedRequest)) {
	b.lmu.Lock()
	f(&b.reqs[id])
	b.lmu.Unlock()
}

func isUpgrade(r *http.Request) bool {
	return strings.EqualFold(r.Header.Get("Upgrade"), "websocket")
}

// ServeHTTP is the balancer's front end.
func (b *Balancer) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	// Without full duplex, net/http's HTTP/1 server drains and closes the
	// request body when the response header goes out; the proxy's
	// transport may still be doing its final read of that body (after
	// the backend already answered), fails, and drops the backend
	// connection in the middle of a streamed response.
	_ = http.NewResponseController(w).EnableFullDuplex()
	escaped := r.URL.EscapedPath()
	rest, inPrefix := b.strip(escaped)
	id := b.record(BalancedRequest{
		Method:    r.Method,
		Path:      rest,
		RawQuery:  r.URL.RawQuery,
		WebSocket: isUpgrade(r),
		Replica:   -1,
		Time:      time.Now(),
	})
	sw := &statusWriter{ResponseWriter: w, onStatus: func(code int) {
		b.update(id, func(e *BalancedRequest) { e.Status = code })
	}}

	if b.opts.Token != "" {
		auth := r.Header.Get("Authorization")
		if subtle.ConstantTimeCompare([]byte(auth), []byte("Bearer "+b.opts.Token)) != 1 {
			sw.Header().Set("WWW-Authenticate", `Bearer realm="comfytest"`)
			textResponse(sw, http.StatusUnauthorized, "401 Unauthorized")
			return
		}
	}
	if !inPrefix {
		textResponse(sw, http.StatusNotFound, "404 Not Found: no deployment at "+escaped)
		return
	}
	i, rep, state, err := b.pick()
	if err != nil {
		textResponse(sw, http.StatusBadGateway, "502 Bad Gateway: "+err.Error())
		return
	}
	b.update(id, func(e *BalancedRequest) { e.Replica = i })
	switch state {
	case "dead":
		b.logf("%s %s -> replica %d: dead", r.Method, r.URL.RequestURI(), i)
		textResponse(sw, http.StatusBadGateway, fmt.Sprintf("502 Bad Gateway: replica %d is down", i))
		return
	case "starting":
		if !b.opts.HoldColdStart {
			b.logf("%s %s -> replica %d: starting", r.Method, r.URL.RequestURI(), i)
			secs := int(time.Until(rep.readyAt)/time.Second) + 1
			sw.Header().Set("Retry-After", strconv.Itoa(secs))
			textResponse(sw, http.StatusServiceUnavailable, fmt.Sprintf("503 Service Unavailable: replica %d is starting", i))
			return
		}
		t := time.NewTimer(time.Until(rep.readyAt))
		defer t.Stop()
		select {
		case <-t.C:
		case <-rep.gone:
			textResponse(sw, http.StatusBadGateway, fmt.Sprintf("502 Bad Gateway: replica %d went away during its cold start", i))
			return
		case <-r.Context().Done():
			return
		case <-b.closed:
			textResponse(sw, http.StatusServiceUnavailable, "503 Service Unavailable: balancer closed")
			return
		}
	}
	b.logf("%s %s -> replica %d", r.Method, r.URL.RequestURI(), i)
	rep.proxy.ServeHTTP(sw, r)
}

// statusWriter remembers the status sent to the client; Flush and Hijack
// reach the underlying writer (ReverseProxy uses http.ResponseController).
type statusWriter struct {
	http.ResponseWriter
	status   int
	onStatus func(int) // records the status as soon as it is sent
}

func (w *statusWriter) setStatus(code int) {
	if w.status == 0 {
		w.status = code
		w.onStatus(code)
	}
}

func (w *statusWriter) WriteHeader(code int) {
	if code >= 200 {
		w.setStatus(code)
	}
	w.ResponseWriter.WriteHeader(code)
}

func (w *statusWriter) Write(p []byte) (int, error) {
	w.setStatus(http.StatusOK)
	return w.ResponseWriter.Write(p)
}

func (w *statusWriter) Unwrap() http.ResponseWriter { return w.ResponseWriter }

func (w *statusWriter) FlushError() error {
	w.setStatus(http.StatusOK)
	return http.NewResponseController(w.ResponseWriter).Flush()
}

func (w *statusWriter) Flush() { _ = w.FlushError() }

func (w *statusWriter) Hijack() (net.Conn, *bufio.ReadWriter, error) {
	c, brw, err := http.NewResponseController(w.ResponseWriter).Hijack()
	if err == nil {
		w.setStatus(http.StatusSwitchingProtocols)
	}
	return c, brw, err
}

// logfWriter turns net/http's and httputil's error log lines into Logf
// lines.
type logfWriter func(format string, args ...any)

func (f logfWriter) Write(p []byte) (int, error) {
	f("%s", strings.TrimRight(string(p), "\n"))
	return len(p), nil
}
