package comfytest

import (
	"bytes"
	"context"
	"crypto/subtle"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"net/http/httputil"
	"net/url"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/uuid"
)

// AsyncPlatformOptions configure StartAsyncPlatformWith.
type AsyncPlatformOptions struct {
	// Backend is the URL requests are forwarded to: /<Deployment>/<path>
	// goes to <Backend>/<path> (Backend's own path kept as a prefix). It
	// can be any HTTP server: a wrapper such as a worker, a fake ComfyUI,
	// or a Balancer's URL.
	Backend string
	// Deployment is the deployment name, the first path segment.
	Deployment string
	// Token, if set, is required as "Authorization: Bearer <Token>" on
	// every request (otherwise 401); it is then consumed, not forwarded.
	// Without Token, Authorization is forwarded to the backend.
	Token string
	// QueueDelay is how long a submitted asynchronous request stays in
	// "Queue" before it is sent to the backend.
	QueueDelay time.Duration
	// StoreDelay is how long a request stays in "Inference" after the
	// backend's response was read whole, before it is "Completed" (the
	// platform storing the result).
	StoreDelay time.Duration
	// MaxBody bounds an asynchronous request body and a stored response
	// (default 256 MiB); a larger request gets 413.
	MaxBody int64
}

// AsyncPlatform is a fake of Verda's serverless container endpoint with
// its asynchronous mode (shared/comfyui-protocol.md §7.1), in front of
// one backend:
//
//   - /<deployment>/<path>: forwarded to the backend, streamed both ways
//     (the synchronous mode). With "Prefer: respond-async", the request
//     body is read whole and the answer is 202 with JSON
//     {"Id","StatusPath","ResultPath"}, the id also in X-Inference-Id and
//     the result path in Location; the request (without its Prefer
//     header) is then sent to the backend in the background and its whole
//     response (status, headers, body) is stored. A backend that cannot be
//     reached gives a stored 502 with a text body.
//   - GET /status/<deployment> with X-Inference-Id: 200 JSON
//     {"Id","Status"}, Status being "Initialized" (stored, not yet
//     picked up), "Queue" (waiting QueueDelay), "Inference" (running at
//     the backend, or storing for StoreDelay) or "Completed".
//   - GET /result/<deployment> with X-Inference-Id: the stored response
//     once Completed (as often as asked); 425 Too Early with JSON
//     {"Id","Status"} before.
//
// Both answer 400 without X-Inference-Id and 404 (JSON {"error"}) for an
// id the platform does not know. Other paths get 404. Verda's real
// answers to unknown or unfinished ids are undocumented; these are this
// fake's choices. There is no cancellation, as on Verda: a submitted
// request runs to its end (or until the platform is closed).
type AsyncPlatform struct {
	opts   AsyncPlatformOptions
	target *url.URL
	proxy  *httputil.ReverseProxy
	hc     *http.Client
	front  *http.Server
	ln     net.Listener
	ctx    context.Context
	stop   context.CancelFunc
	wg     sync.WaitGroup

	mu   sync.Mutex
	jobs map[string]*asyncRequest
	ids  []string
}

type asyncRequest struct {
	status string
	code   int
	header http.Header
	body   []byte
}

// StartAsyncPlatform starts a fake async platform on 127.0.0.1 at a
// random port that forwards /<deployment>/<path> to backend; it is closed
// when the test ends.
func StartAsyncPlatform(t testing.TB, backend, deployment string) *AsyncPlatform {
	t.Helper()
	return StartAsyncPlatformWith(t, AsyncPlatformOptions{Backend: backend, Deployment: deployment})
}

// StartAsyncPlatformWith is StartAsyncPlatform with options.
func StartAsyncPlatformWith(t testing.TB, o AsyncPlatformOptions) *AsyncPlatform {
	t.Helper()
	target, err := url.Parse(o.Backend)
	if err != nil || target.Scheme == "" || target.Host == "" {
		t.Fatalf("comfytest: bad async platform backend %q", o.Backend)
	}
	o.Deployment = strings.Trim(o.Deployment, "/")
	if o.Deployment == "" || strings.Contains(o.Deployment, "/") {
		t.Fatalf("comfytest: bad deployment name %q", o.Deployment)
	}
	if o.MaxBody <= 0 {
		o.MaxBody = 256 << 20
	}
	tr := &http.Transport{
		Proxy:               nil,
		DialContext:         (&net.Dialer{Timeout: 5 * time.Second}).DialContext,
		MaxIdleConnsPerHost: 32,
		IdleConnTimeout:     30 * time.Second,
	}
	p := &AsyncPlatform{opts: o, target: target, hc: &http.Client{Transport: tr}, jobs: map[string]*asyncRequest{}}
	p.ctx, p.stop = context.WithCancel(context.Background())
	p.proxy = &httputil.ReverseProxy{
		Rewrite: func(pr *httputil.ProxyRequest) {
			pr.Out.URL.Scheme, pr.Out.URL.Host = target.Scheme, target.Host
			pr.Out.URL.Path, pr.Out.URL.RawPath = p.backendPath(pr.In.URL)
			pr.Out.Host = target.Host
			if o.Token != "" {
				pr.Out.Header.Del("Authorization")
			}
		},
		Transport:     tr,
		FlushInterval: -1,
		ErrorLog:      log.New(io.Discard, "", 0),
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("comfytest: async platform listen: %v", err)
	}
	p.ln = ln
	p.front = &http.Server{Handler: p, ReadHeaderTimeout: 30 * time.Second, ErrorLog: log.New(io.Discard, "", 0)}
	go func() { _ = p.front.Serve(ln) }()
	t.Cleanup(p.Close)
	return p
}

// URL is the platform's base URL, "http://127.0.0.1:<port>".
func (p *AsyncPlatform) URL() string { return "http://" + p.ln.Addr().String() }

// DeploymentURL is <URL>/<deployment>, where requests are sent.
func (p *AsyncPlatform) DeploymentURL() string { return p.URL() + "/" + p.opts.Deployment }

// StatusURL is <URL>/status/<deployment>.
func (p *AsyncPlatform) StatusURL() string { return p.URL() + "/status/" + p.opts.Deployment }

// ResultURL is <URL>/result/<deployment>.
func (p *AsyncPlatform) ResultURL() string { return p.URL() + "/result/" + p.opts.Deployment }

// Submitted returns the ids of the asynchronous requests, in order.
func (p *AsyncPlatform) Submitted() []string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return append([]string(nil), p.ids...)
}

// Status is the status of an asynchronous request ("" if unknown).
func (p *AsyncPlatform) Status(id string) string {
	p.mu.Lock()
	defer p.mu.Unlock()
	if j := p.jobs[id]; j != nil {
		return j.status
	}
	return ""
}

// Close stops the platform and the requests it runs in the background.
func (p *AsyncPlatform) Close() {
	p.stop()
	_ = p.front.Close()
	p.wg.Wait()
	p.hc.CloseIdleConnections()
}

// backendPath maps /<deployment>/<rest> to the backend's path + /<rest>.
func (p *AsyncPlatform) backendPath(in *url.URL) (string, string) {
	rest := strings.TrimPrefix(in.EscapedPath(), "/"+p.opts.Deployment)
	if rest == "" {
		rest = "/"
	}
	escaped := strings.TrimRight(p.target.EscapedPath(), "/") + rest
	u, err := url.Parse(escaped)
	if err != nil {
		return escaped, ""
	}
	if u.EscapedPath() != u.Path {
		return u.Path, escaped
	}
	return u.Path, ""
}

// ServeHTTP is the platform's front end.
func (p *AsyncPlatform) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	// See Balancer.ServeHTTP: keep the request body readable while a
	// streamed answer goes out.
	_ = http.NewResponseController(w).EnableFullDuplex()
	if p.opts.Token != "" {
		auth := r.Header.Get("Authorization")
		if subtle.ConstantTimeCompare([]byte(auth), []byte("Bearer "+p.opts.Token)) != 1 {
			w.Header().Set("WWW-Authenticate", `Bearer realm="comfytest"`)
			textResponse(w, http.StatusUnauthorized, "401 Unauthorized")
			return
		}
	}
	dep := p.opts.Deployment
	path := r.URL.EscapedPath()
	switch {
	case path == "/status/"+dep:
		p.serveStatus(w, r)
	case path == "/result/"+dep:
		p.serveResult(w, r)
	case path == "/"+dep || strings.HasPrefix(path, "/"+dep+"/"):
		if preferAsync(r.Header) {
			p.submit(w, r)
			return
		}
		p.proxy.ServeHTTP(w, r)
	default:
		textResponse(w, http.StatusNotFound, "404 Not Found: no deployment at "+path)
	}
}

// preferAsync reports a "Prefer: respond-async" header (other Prefer
// values, such as respond-async-proxy, are not modelled and are passed on).
func preferAsync(h http.Header) bool {
	for _, v := range h.Values("Prefer") {
		for _, part := range strings.Split(v, ",") {
			if strings.EqualFold(strings.TrimSpace(part), "respond-async") {
				return true
			}
		}
	}
	return false
}

func (p *AsyncPlatform) submit(w http.ResponseWriter, r *http.Request) {
	body, err := io.ReadAll(io.LimitReader(r.Body, p.opts.MaxBody+1))
	if err != nil {
		return // the client went away
	}
	if int64(len(body)) > p.opts.MaxBody {
		textResponse(w, http.StatusRequestEntityTooLarge, "413 Request Entity Too Large")
		return
	}
	out, err := http.NewRequestWithContext(p.ctx, r.Method, p.target.String(), bytes.NewReader(body))
	if err != nil {
		serverError(w)
		return
	}
	out.URL.Path, out.URL.RawPath = p.backendPath(r.URL)
	out.URL.RawQuery = r.URL.RawQuery
	for k, v := range r.Header {
		switch http.CanonicalHeaderKey(k) {
		case "Authorization":
			if p.opts.Token != "" {
				continue
			}
		case "Prefer", "Connection", "Keep-Alive", "Te", "Trailer",
			"Transfer-Encoding", "Upgrade", "Proxy-Connection", "Content-Length":
			continue
		}
		out.Header[k] = append([]string(nil), v...)
	}

	id := uuid.NewString()
	p.mu.Lock()
	p.jobs[id] = &asyncRequest{status: "Initialized"}
	p.ids = append(p.ids, id)
	p.mu.Unlock()
	p.wg.Add(1)
	go p.run(id, out)

	dep := p.opts.Deployment
	w.Header().Set("X-Inference-Id", id)
	w.Header().Set("Location", "/result/"+dep)
	writeJSON(w, http.StatusAccepted, struct {
		ID         string `json:"Id"`
		StatusPath string `json:"StatusPath"`
		ResultPath string `json:"ResultPath"`
	}{id, "/status/" + dep, "/result/" + dep})
}

func (p *AsyncPlatform) setStatus(id, status string) {
	p.mu.Lock()
	p.jobs[id].status = status
	p.mu.Unlock()
}

// sleep waits d; false when the platform closed meanwhile.
func (p *AsyncPlatform) sleep(d time.Duration) bool {
	if d <= 0 {
		return p.ctx.Err() == nil
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return true
	case <-p.ctx.Done():
		return false
	}
}

// run sends one asynchronous request to the backend and stores its
// response.
func (p *AsyncPlatform) run(id string, out *http.Request) {
	defer p.wg.Done()
	p.setStatus(id, "Queue")
	if !p.sleep(p.opts.QueueDelay) {
		return
	}
	p.setStatus(id, "Inference")
	res := &asyncRequest{header: http.Header{}}
	resp, err := p.hc.Do(out)
	if err == nil {
		res.code = resp.StatusCode
		for _, k := range []string{"Content-Type", "Content-Encoding", "Cache-Control"} {
			if v := resp.Header.Values(k); len(v) > 0 {
				res.header[k] = v
			}
		}
		res.body, err = io.ReadAll(io.LimitReader(resp.Body, p.opts.MaxBody+1))
		resp.Body.Close()
		if err == nil && int64(len(res.body)) > p.opts.MaxBody {
			err = fmt.Errorf("the response exceeds %d bytes", p.opts.MaxBody)
		}
	}
	if err != nil {
		if p.ctx.Err() != nil {
			return
		}
		res.code = http.StatusBadGateway
		res.header = http.Header{"Content-Type": {"text/plain; charset=utf-8"}}
		res.body = []byte("502 Bad Gateway: " + err.Error())
	}
	if !p.sleep(p.opts.StoreDelay) {
		return
	}
	res.status = "Completed"
	p.mu.Lock()
	p.jobs[id] = res
	p.mu.Unlock()
}

// lookup finds the request named by X-Inference-Id, answering 400/404
// itself.
func (p *AsyncPlatform) lookup(w http.ResponseWriter, r *http.Request) (string, *asyncRequest) {
	if r.Method != http.MethodGet && r.Method != http.MethodHead {
		w.Header().Set("Allow", "GET, HEAD")
		textResponse(w, http.StatusMethodNotAllowed, "405 Method Not Allowed")
		return "", nil
	}
	id := r.Header.Get("X-Inference-Id")
	if id == "" {
		writeJSON(w, http.StatusBadRequest, map[string]string{"error": "missing X-Inference-Id header"})
		return "", nil
	}
	p.mu.Lock()
	j := p.jobs[id]
	var snap asyncRequest
	if j != nil {
		snap = *j
	}
	p.mu.Unlock()
	if j == nil {
		writeJSON(w, http.StatusNotFound, map[string]string{"error": "unknown inference id " + id})
		return "", nil
	}
	return id, &snap
}

type asyncStatus struct {
	ID     string `json:"Id"`
	Status string `json:"Status"`
}

func (p *AsyncPlatform) serveStatus(w http.ResponseWriter, r *http.Request) {
	id, j := p.lookup(w, r)
	if j == nil {
		return
	}
	w.Header().Set("Cache-Control", "no-store")
	writeJSON(w, http.StatusOK, asyncStatus{id, j.status})
}

func (p *AsyncPlatform) serveResult(w http.ResponseWriter, r *http.Request) {
	id, j := p.lookup(w, r)
	if j == nil {
		return
	}
	if j.status != "Completed" {
		writeJSON(w, http.StatusTooEarly, asyncStatus{id, j.status})
		return
	}
	for k, v := range j.header {
		w.Header()[k] = v
	}
	w.Header().Set("Content-Length", fmt.Sprint(len(j.body)))
	w.WriteHeader(j.code)
	if r.Method != http.MethodHead {
		_, _ = w.Write(j.body)
	}
}
