package dispatch

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"mime/multipart"
	"net"
	"net/http"
	"net/url"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/google/uuid"
	"github.com/gorilla/websocket"
	"go.uber.org/zap"

	"github.com/comfyume/comfyume/comfy"
)

// Upstream is one ComfyUI server the gateway talks to: a user's home or an
// endpoint of a GPU pool. It owns the HTTP client toward that server and the
// single WebSocket that carries the events of every job the gateway sent it.
type Upstream struct {
	// Base is the server's URL (scheme, host and an optional path prefix).
	Base *url.URL
	// Header is added to every request (e.g. a bearer token). Never shown to
	// browsers.
	Header http.Header
	// MaxJobs limits how many of the gateway's jobs run here at once (0: no
	// limit).
	MaxJobs int
	// LostTimeout is how long the server may stay unreachable while jobs
	// run on it; then those jobs fail with an execution_error.
	LostTimeout time.Duration
	// Pinned upstreams run comfyume's worker handler in front of their
	// ComfyUI: each job travels in one streaming request (see pinned.go).
	Pinned bool
	// Async (pinned upstreams only): the platform answers the job request
	// later (Prefer: respond-async, then polling status and result).
	Async bool

	client *http.Client
	dialer *websocket.Dialer
	logger *zap.Logger

	mu       sync.Mutex
	clientID string
	conn     *websocket.Conn
	ready    chan struct{} // closed when conn is open and greeted
	dialErr  error
	routes   map[string]*run // upstream prompt_id → run
	orphans  map[string][]event
	// orphanBytes is what the orphans weigh (see maxOrphanBytes).
	orphanBytes int64
	running     string // upstream prompt_id that last started executing
	inflight    int    // jobs placed here and not finished
	closed      bool
	retired     bool
	// maxText and maxBinary bound one frame of the event stream (see
	// EventLimits); oversizeJob is the job whose oversized frame was
	// logged last.
	maxText, maxBinary atomic.Int64
	oversizeJob        string
	oversizeLogged     bool
	// scan reads the Heads of the stream's events (used only by the
	// stream's reader).
	scan comfy.Scanner
	// health (see health.go)
	failures  int
	openUntil time.Time
	// shared counts slots with the other gateways sharing the store.
	shared  SharedSlots
	slotTTL time.Duration
}

// UpstreamOptions configures NewUpstream.
type UpstreamOptions struct {
	Header  http.Header
	MaxJobs int
	// LostTimeout: see Upstream.LostTimeout (default DefaultLostTimeout).
	LostTimeout time.Duration
	// Pinned selects the worker transport (see Upstream.Pinned); Async
	// its submit-and-poll variant.
	Pinned, Async bool
	// ClientID is the sid of the event stream (default: a new random one).
	// A gateway that takes over another's jobs reuses that one's sid, since
	// ComfyUI sends a job's events only to the sid that queued it.
	ClientID string
	// Transport overrides the HTTP transport (tests, benchmarks).
	Transport http.RoundTripper
	Logger    *zap.Logger
}

// NewUpstream prepares an upstream; it dials nothing until first used.
func NewUpstream(base string, opts UpstreamOptions) (*Upstream, error) {
	u, err := url.Parse(base)
	if err != nil {
		return nil, fmt.Errorf("upstream %q: %w", base, err)
	}
	if u.Scheme != "http" && u.Scheme != "https" {
		return nil, fmt.Errorf("upstream %q: scheme must be http or https", base)
	}
	u.Path = strings.TrimSuffix(u.Path, "/")
	tr := opts.Transport
	if tr == nil {
		tr = &http.Transport{
			Proxy:                 nil,
			DialContext:           (&net.Dialer{Timeout: 10 * time.Second, KeepAlive: 30 * time.Second}).DialContext,
			MaxIdleConnsPerHost:   32,
			IdleConnTimeout:       90 * time.Second,
			ResponseHeaderTimeout: 120 * time.Second,
		}
	}
	clientID := opts.ClientID
	if clientID == "" {
		clientID = "comfyume-" + strings.ReplaceAll(uuid.NewString(), "-", "")
	}
	lost := opts.LostTimeout
	if lost <= 0 {
		lost = DefaultLostTimeout
	}
	logger := opts.Logger
	if logger == nil {
		logger = zap.NewNop()
	}
	up := &Upstream{
		Base:        u,
		Header:      opts.Header.Clone(),
		MaxJobs:     opts.MaxJobs,
		LostTimeout: lost,
		Pinned:      opts.Pinned || opts.Async,
		Async:       opts.Async,
		client:      &http.Client{Transport: tr},
		dialer:      &websocket.Dialer{HandshakeTimeout: 10 * time.Second, ReadBufferSize: 32 << 10, WriteBufferSize: 16 << 10},
		logger:      logger.With(zap.String("upstream", u.Redacted())),
		clientID:    clientID,
		routes:      map[string]*run{},
		orphans:     map[string][]event{},
	}
	up.setLimits(EventLimits{})
	return up, nil
}

// setLimits applies the event limits to the upstream's stream.
func (u *Upstream) setLimits(l EventLimits) {
	l = l.withDefaults()
	u.maxText.Store(l.MaxText)
	u.maxBinary.Store(l.MaxBinary)
}

// String names the upstream for logs and job records (no credentials).
func (u *Upstream) String() string { return u.Base.Redacted() }

// URL returns the absolute URL of a server path (which may carry a query).
func (u *Upstream) URL(pathAndQuery string) string {
	return u.Base.String() + pathAndQuery
}

// NewRequest builds a request to the server with the gateway's header
// hygiene: Host and Origin are the server's own (so ComfyUI's loopback origin
// check passes), and the configured headers are set.
func (u *Upstream) NewRequest(ctx context.Context, method, pathAndQuery string, body io.Reader) (*http.Request, error) {
	req, err := http.NewRequestWithContext(ctx, method, u.URL(pathAndQuery), body)
	if err != nil {
		return nil, err
	}
	u.decorate(req.Header)
	return req, nil
}

func (u *Upstream) decorate(h http.Header) {
	for k, v := range u.Header {
		h[k] = append([]string(nil), v...)
	}
	h.Set("Origin", u.Base.Scheme+"://"+u.Base.Host)
}

// Do sends a request built by NewRequest.
func (u *Upstream) Do(req *http.Request) (*http.Response, error) {
	return u.client.Do(req)
}

// MaxAnswer bounds what GetJSON reads of one answer (a GPU server's
// /history entry, /queue or status, a home's /features): servers are
// semi-trusted, and an answer is decoded in memory.
const MaxAnswer = 64 << 20

// GetJSON fetches a path and decodes its JSON body into v, reading at most
// MaxAnswer bytes of it. A non-2xx status is an *HTTPError.
func (u *Upstream) GetJSON(ctx context.Context, pathAndQuery string, v any) error {
	req, err := u.NewRequest(ctx, http.MethodGet, pathAndQuery, nil)
	if err != nil {
		return err
	}
	resp, err := u.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode/100 != 2 {
		b, _ := io.ReadAll(io.LimitReader(resp.Body, 64<<10))
		return &HTTPError{Status: resp.StatusCode, Body: b}
	}
	lr := &io.LimitedReader{R: resp.Body, N: MaxAnswer + 1}
	if err := json.NewDecoder(lr).Decode(v); err != nil {
		if lr.N <= 0 {
			return fmt.Errorf("%s answer is larger than %d MiB", pathOnly(pathAndQuery), MaxAnswer>>20)
		}
		return err
	}
	return nil
}

// pathOnly is a request's path without its query, for errors.
func pathOnly(pathAndQuery string) string {
	p, _, _ := strings.Cut(pathAndQuery, "?")
	return p
}

// PostJSON posts v as JSON and returns the status and body (up to 16 MiB).
// v may be encoded JSON already: []byte, or [][]byte whose parts are sent
// one after the other without being joined.
func (u *Upstream) PostJSON(ctx context.Context, path string, v any) (int, []byte, error) {
	var req *http.Request
	var err error
	switch b := v.(type) {
	case []byte:
		req, err = u.NewRequest(ctx, http.MethodPost, path, bytes.NewReader(b))
	case [][]byte:
		if req, err = u.NewRequest(ctx, http.MethodPost, path, nil); err == nil {
			setParts(req, b)
		}
	default:
		var body []byte
		if body, err = json.Marshal(v); err != nil {
			return 0, nil, err
		}
		req, err = u.NewRequest(ctx, http.MethodPost, path, bytes.NewReader(body))
	}
	if err != nil {
		return 0, nil, err
	}
	req.Header.Set("Content-Type", "application/json")
	resp, err := u.Do(req)
	if err != nil {
		return 0, nil, err
	}
	defer resp.Body.Close()
	rb, err := io.ReadAll(io.LimitReader(resp.Body, 16<<20))
	return resp.StatusCode, rb, err
}

// setParts makes parts, written one after the other, the body of req (a
// request without one), rewindable as bytes.NewReader's is.
func setParts(req *http.Request, parts [][]byte) {
	var n int64
	for _, p := range parts {
		n += int64(len(p))
	}
	if n == 0 {
		return
	}
	req.ContentLength = n
	req.GetBody = func() (io.ReadCloser, error) {
		b := net.Buffers(slices.Clone(parts))
		return io.NopCloser(&b), nil
	}
	req.Body, _ = req.GetBody()
}

// Open fetches a file through the server's /view.
func (u *Upstream) Open(ctx context.Context, ref comfy.FileRef) (*http.Response, error) {
	req, err := u.NewRequest(ctx, http.MethodGet, "/view?"+ref.Query(), nil)
	if err != nil {
		return nil, err
	}
	resp, err := u.Do(req)
	if err != nil {
		return nil, err
	}
	if resp.StatusCode != http.StatusOK {
		b, _ := io.ReadAll(io.LimitReader(resp.Body, 4<<10))
		resp.Body.Close()
		return nil, &HTTPError{Status: resp.StatusCode, Body: b}
	}
	return resp, nil
}

// Upload sends a file with /upload/image (overwrite=true) and returns the
// reference the server stored it under.
func (u *Upstream) Upload(ctx context.Context, ref comfy.FileRef, content io.Reader) (comfy.FileRef, error) {
	pr, pw := io.Pipe()
	mw := multipart.NewWriter(pw)
	go func() {
		err := func() error {
			for k, v := range map[string]string{"type": ref.Type, "subfolder": ref.Subfolder, "overwrite": "true"} {
				if err := mw.WriteField(k, v); err != nil {
					return err
				}
			}
			fw, err := mw.CreateFormFile("image", ref.Filename)
			if err != nil {
				return err
			}
			if _, err := io.Copy(fw, content); err != nil {
				return err
			}
			return mw.Close()
		}()
		pw.CloseWithError(err)
	}()
	req, err := u.NewRequest(ctx, http.MethodPost, "/upload/image", pr)
	if err != nil {
		pr.CloseWithError(err)
		return comfy.FileRef{}, err
	}
	req.Header.Set("Content-Type", mw.FormDataContentType())
	resp, err := u.Do(req)
	if err != nil {
		pr.CloseWithError(err)
		return comfy.FileRef{}, err
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(io.LimitReader(resp.Body, 64<<10))
	if resp.StatusCode != http.StatusOK {
		return comfy.FileRef{}, &HTTPError{Status: resp.StatusCode, Body: b}
	}
	var out struct {
		Name      string `json:"name"`
		Subfolder string `json:"subfolder"`
		Type      string `json:"type"`
	}
	if err := json.Unmarshal(b, &out); err != nil || out.Name == "" {
		return comfy.FileRef{}, fmt.Errorf("upload to %s: unexpected answer %q", u, b)
	}
	if out.Type == "" {
		out.Type = ref.Type
	}
	return comfy.FileRef{Filename: out.Name, Subfolder: out.Subfolder, Type: out.Type}, nil
}

// HTTPError is a non-2xx answer from an upstream.
type HTTPError struct {
	Status int
	Body   []byte
}

func (e *HTTPError) Error() string {
	return fmt.Sprintf("upstream answered %d: %.200s", e.Status, e.Body)
}

// WebSocketURL returns the ws:// or wss:// URL of a server path.
func (u *Upstream) WebSocketURL(pathAndQuery string) string {
	w := *u.Base
	if w.Scheme == "https" {
		w.Scheme = "wss"
	} else {
		w.Scheme = "ws"
	}
	return w.String() + pathAndQuery
}

// DialWebSocket opens a WebSocket to the server with the gateway's header
// hygiene.
func (u *Upstream) DialWebSocket(ctx context.Context, pathAndQuery string) (*websocket.Conn, error) {
	return u.DialWebSocketWith(ctx, u.dialer, pathAndQuery)
}

// DialWebSocketWith is DialWebSocket with the caller's dialer (buffer
// sizes).
func (u *Upstream) DialWebSocketWith(ctx context.Context, d *websocket.Dialer, pathAndQuery string) (*websocket.Conn, error) {
	h := http.Header{}
	u.decorate(h)
	conn, resp, err := d.DialContext(ctx, u.WebSocketURL(pathAndQuery), h)
	if resp != nil && resp.Body != nil {
		resp.Body.Close()
	}
	return conn, err
}
