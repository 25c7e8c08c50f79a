package comfytest

import (
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// Options configure a fake server. The zero value is a 2024-12 server with
// 5 ms per node step and 3 sampler steps.
type Options struct {
	// Version is "2024-12" (default; "2024-08" is accepted as an alias,
	// the recordings of both are identical) or "2026". See the package doc
	// for the differences.
	Version string
	// StepDelay is how long every executed (non-cached) node and every
	// sampler progress step takes. Default 5ms. A negative value means no
	// delay at all ("blast"): nodes and sampler steps run back to back, and
	// a job's events are sent as fast as the fake can produce them.
	StepDelay time.Duration
	// FixedRate paces the FakeSampler's steps on a fixed clock: step i is
	// due i×StepDelay after the sampler started, however long sending the
	// earlier steps' events took, so a job emits progress at a steady rate
	// (with StepDelay 2ms: one step every 2 ms). Without it each step waits
	// StepDelay after the previous one finished.
	FixedRate bool
	// Steps is the number of progress steps of a FakeSampler node that has
	// no "steps" input. Default 3.
	Steps int
	// Name shows as the device name in /system_stats and prefixes log lines.
	Name string
	// PreviewBytes, if > 0, pads every FakeSampler preview JPEG to about this
	// many bytes (with JPEG comment segments, so it still decodes), to
	// exercise multi-megabyte binary WebSocket frames.
	PreviewBytes int
	// PreviewEvery, if > 0, makes the FakeSampler send a live preview only
	// on every PreviewEvery-th step (steps PreviewEvery, 2×PreviewEvery, …)
	// instead of on every step, like a previewer that skips steps. With
	// steps 1000 and PreviewEvery 100 a job sends 1000 progress events and
	// 10 previews.
	PreviewEvery int
	// Models lists the model files the server has: the COMBO of
	// FakeCheckpointImage's ckpt_name (default "sd_xl_base_1.0.safetensors").
	Models []string
	// IndexHTML, if set, is the page served at "/" in place of the one line
	// naming the fake (ComfyUI serves its web UI there; the fake has none).
	// The demo uses it to explain what the visitor is looking at.
	IndexHTML string
	// Logf, if set, receives one line per request and per job event.
	Logf func(format string, args ...any)
	// OnSend, if set, is called for every WebSocket frame the server
	// writes, by that socket's writer goroutine just before the write, so a
	// benchmark can measure each event's latency from the moment the fake
	// produced it (SentFrame.Queued) or wrote it (SentFrame.Time). It is
	// called concurrently for different sockets and must be quick; the
	// frame is written when it returns.
	OnSend func(SentFrame)
	// SerialSend makes the server write to its sockets as real ComfyUI
	// does: one publish loop takes the messages of every socket in order
	// and writes each before the next, so a socket whose peer does not
	// read, once its buffers are full, holds up every other socket (aiohttp
	// waits for the slow socket to drain). By default each socket has its
	// own writer, and a slow peer delays only itself.
	SerialSend bool
	// KeepReplacedSockets makes a second socket on a sid behave as in
	// real ComfyUI: the older socket is forgotten but not closed (it stays
	// open and receives nothing more), and when either socket closes the
	// sid is unregistered. By default the fake closes the older socket.
	KeepReplacedSockets bool
	// BeforeHistory, if set, is called with a job's prompt id after its
	// last event (execution_success or its error) was sent and before its
	// history entry is written and it leaves the queue, as ComfyUI's
	// execute() returns before task_done. A test can block in it to hold a
	// job in that window; the server runs nothing else meanwhile.
	BeforeHistory func(promptID string)
	// OnNodeWork, if set, is called with a job's prompt id and node id when
	// the node has passed its interrupt check and starts its work, so a
	// test can interrupt a node that is known to be busy rather than after
	// a guessed delay.
	OnNodeWork func(promptID, node string)
}

// SentFrame describes one WebSocket frame for Options.OnSend.
type SentFrame struct {
	// SID is the clientId of the socket the frame is written to.
	SID string
	// Type is the message type of a text frame ("status", "progress",
	// "executing", …) or "preview" for a binary preview frame (type 1 or 4).
	Type string
	// PromptID is the frame's prompt id: data.prompt_id of a text frame,
	// the job of a preview; "" when the frame has none (status,
	// feature_flags).
	PromptID string
	// Value is data.value of a progress frame, and the sampler step a
	// preview belongs to; 0 otherwise.
	Value int
	// Binary is true for a binary frame; Bytes is the frame's payload size.
	Binary bool
	Bytes  int
	// Queued is when the event happened: the frame was put in the socket's
	// queue (like ComfyUI's, unbounded: a socket that does not keep up makes
	// frames wait there). Time is when the writer took it to write it.
	Queued time.Time
	Time   time.Time
}

// ReceivedPrompt is one accepted POST /prompt.
type ReceivedPrompt struct {
	PromptID string
	// ClientID is the sid the job's events go to: the body's client_id, or
	// extra_data.client_id ("" when there is none).
	ClientID string
	// Prompt is the API-format graph as sent.
	Prompt map[string]any
	// ExtraData is the body's extra_data as sent, with client_id merged in
	// the way ComfyUI does it. Sensitive keys are included (this is what
	// reached the server); the server-added create_time is not.
	ExtraData map[string]any
	Header    http.Header
}

// Upload is one POST /upload/image or /upload/mask.
type Upload struct {
	// Name is the final file name (after the "name (1).ext" rename rule).
	Name      string
	Subfolder string
	Type      string
	// Data is the uploaded file part as received.
	Data   []byte
	Header http.Header
}

// RecordedRequest is one HTTP request (WebSocket upgrades included) as it
// reached the server.
type RecordedRequest struct {
	Method string
	// Path is the escaped path as sent, e.g. "/api/userdata/a%2Fb.json".
	Path     string
	RawQuery string
	Header   http.Header
}

// Server is a fake ComfyUI server. Create it with New or Start.
type Server struct {
	opts    Options
	v2026   bool
	maxBody int64
	handler http.Handler
	rt      []route
	logf    func(format string, args ...any)

	// mu guards queue, history and execution bookkeeping. Lock order:
	// mu before sockMu.
	mu         sync.Mutex
	number     int64
	pending    jobHeap
	running    *job
	history    histStore
	failNext   []string
	lastNode   *string // display id of the running node (for WS reconnects)
	runClient  string
	runHasCli  bool
	workerOnce sync.Once
	workerDone chan struct{}

	interrupted atomic.Bool
	intrCh      chan struct{}
	wake        chan struct{}
	stop        chan struct{}
	stopOnce    sync.Once

	// executor-only state (touched by the single worker goroutine)
	cache   map[string]*cacheEntry
	objects map[string]nodeObject

	sockMu     sync.Mutex
	serial     *serialSender // with Options.SerialSend
	sockets    map[string]*wsConn
	conns      map[*wsConn]struct{}
	refuseWSTo time.Time // WebSocket upgrades answer 503 until then

	fmu   sync.Mutex
	files map[string]*memFile // "type/rel/path"

	umu      sync.Mutex
	userdata map[string]*memFile
	userdirs map[string]bool

	rmu      sync.Mutex
	prompts  []ReceivedPrompt
	uploads  []Upload
	requests []RecordedRequest

	lmu      sync.Mutex
	httpSrv  *http.Server
	listener net.Listener
	killed   bool
}

// New returns a server that is not listening yet; use Handler, Listen or
// Start. It panics on an unknown Options.Version.
func New(opts Options) *Server {
	switch opts.Version {
	case "", "2024-12", "2024-08":
		opts.Version = "2024-12"
	case "2026":
	default:
		panic(fmt.Sprintf("comfytest: unknown Options.Version %q (want \"2024-12\" or \"2026\")", opts.Version))
	}
	if opts.StepDelay == 0 {
		opts.StepDelay = 5 * time.Millisecond
	}
	if opts.Steps <= 0 {
		opts.Steps = 3
	}
	s := &Server{
		opts:       opts,
		v2026:      opts.Version == "2026",
		maxBody:    100 << 20,
		history:    newHistStore(),
		workerDone: make(chan struct{}),
		intrCh:     make(chan struct{}, 1),
		wake:       make(chan struct{}, 1),
		stop:       make(chan struct{}),
		cache:      map[string]*cacheEntry{},
		objects:    map[string]nodeObject{},
		sockets:    map[string]*wsConn{},
		conns:      map[*wsConn]struct{}{},
		files:      map[string]*memFile{},
		userdata:   map[string]*memFile{},
		userdirs:   map[string]bool{"": true},
	}
	if opts.SerialSend {
		s.serial = newSerialSender(s.stop)
	}
	s.logf = func(string, ...any) {}
	if opts.Logf != nil {
		prefix := "comfytest"
		if opts.Name != "" {
			prefix += " " + opts.Name
		}
		s.logf = func(format string, args ...any) {
			opts.Logf("[%s] "+format, append([]any{prefix}, args...)...)
		}
	}
	s.rt = s.routes()
	s.handler = http.HandlerFunc(s.serveHTTP)
	return s
}

// Start starts a server on 127.0.0.1 at a random port, like httptest, and
// closes it when the test ends.
func Start(t testing.TB, opts Options) *Server {
	t.Helper()
	s := New(opts)
	if err := s.Listen("127.0.0.1:0"); err != nil {
		t.Fatalf("comfytest: listen: %v", err)
	}
	t.Cleanup(s.Close)
	return s
}

// Handler serves the fake under any listener or test harness.
func (s *Server) Handler() http.Handler { return s.handler }

// Listen starts serving on addr (host:port, port 0 for a random one) and
// returns at once.
func (s *Server) Listen(addr string) error {
	s.lmu.Lock()
	defer s.lmu.Unlock()
	if s.listener != nil {
		return errors.New("comfytest: already listening")
	}
	if s.killed {
		return errors.New("comfytest: server closed")
	}
	l, err := net.Listen("tcp", addr)
	if err != nil {
		return err
	}
	s.listener = l
	s.httpSrv = &http.Server{Handler: s.handler, ReadHeaderTimeout: 30 * time.Second}
	srv := s.httpSrv
	go func() { _ = srv.Serve(l) }()
	s.logf("listening on http://%s (version %s)", l.Addr(), s.opts.Version)
	return nil
}

// URL is "http://host:port" of the listener (empty before Listen/Start).
func (s *Server) URL() string {
	s.lmu.Lock()
	defer s.lmu.Unlock()
	if s.listener == nil {
		return ""
	}
	return "http://" + s.listener.Addr().String()
}

// Close stops the server: WebSockets get a close frame, the listener and
// all connections are closed, a running job is abandoned. Safe to call more
// than once, and after Kill.
func (s *Server) Close() { s.shutdown(true) }

// Kill makes the server vanish abruptly, like a GPU container that is gone:
// the listener and every connection (WebSockets included) are closed without
// any goodbye, the running job is abandoned. Later requests fail to connect.
// Introspection (Prompts, Uploads, ...) keeps working.
func (s *Server) Kill() { s.shutdown(false) }

func (s *Server) shutdown(graceful bool) {
	s.stopOnce.Do(func() { close(s.stop) })
	s.lmu.Lock()
	s.killed = true
	if s.httpSrv != nil {
		_ = s.httpSrv.Close()
	}
	s.lmu.Unlock()
	s.sockMu.Lock()
	conns := make([]*wsConn, 0, len(s.conns))
	for c := range s.conns {
		conns = append(conns, c)
	}
	s.sockMu.Unlock()
	for _, c := range conns {
		if graceful {
			c.goodbye()
		}
		c.close()
	}
	// Wait for the worker only if it was ever started.
	started := true
	s.workerOnce.Do(func() { started = false; close(s.workerDone) })
	if started {
		<-s.workerDone
	}
}

func (s *Server) stopped() bool {
	select {
	case <-s.stop:
		return true
	default:
		return false
	}
}

// DropSockets cuts every WebSocket abruptly (no close frame), as a proxy
// or network between the gateway and the server might, and answers new
// WebSocket requests with 503 for refuseFor. The server itself keeps
// running: jobs go on, and HTTP (/history, /queue, /view) answers.
func (s *Server) DropSockets(refuseFor time.Duration) {
	s.sockMu.Lock()
	s.refuseWSTo = time.Now().Add(refuseFor)
	conns := make([]*wsConn, 0, len(s.conns))
	for c := range s.conns {
		conns = append(conns, c)
	}
	s.sockMu.Unlock()
	for _, c := range conns {
		c.close()
	}
}

// Prompts returns every accepted POST /prompt in arrival order.
func (s *Server) Prompts() []ReceivedPrompt {
	s.rmu.Lock()
	defer s.rmu.Unlock()
	return append([]ReceivedPrompt(nil), s.prompts...)
}

// Uploads returns every /upload/image and /upload/mask that was stored or
// reused, in arrival order.
func (s *Server) Uploads() []Upload {
	s.rmu.Lock()
	defer s.rmu.Unlock()
	return append([]Upload(nil), s.uploads...)
}

// Requests returns every HTTP request received, in arrival order.
func (s *Server) Requests() []RecordedRequest {
	s.rmu.Lock()
	defer s.rmu.Unlock()
	return append([]RecordedRequest(nil), s.requests...)
}

// OutputFile returns the bytes of a file the server holds: typ is "output",
// "temp" or "input"; subfolder may be "".
func (s *Server) OutputFile(typ, subfolder, filename string) ([]byte, bool) {
	key, ok := fileKey(typ, subfolder, filename)
	if !ok {
		return nil, false
	}
	f := s.getFile(key)
	if f == nil {
		return nil, false
	}
	return append([]byte(nil), f.data...), true
}

// PutInput places a file in the input directory (subfolder may be ""), as
// if the user had uploaded it.
func (s *Server) PutInput(subfolder, name string, data []byte) {
	key, ok := fileKey("input", subfolder, name)
	if !ok {
		panic(fmt.Sprintf("comfytest: PutInput: bad path %q/%q", subfolder, name))
	}
	s.putFile(key, append([]byte(nil), data...))
}

// FailNext injects a failure into the next job that starts:
// "error" → it ends with execution_error at its first non-cached node;
// "hang" → its first non-cached node never finishes until the job is
// interrupted (POST /interrupt) or the server is closed/killed.
// Several calls queue up, one per job. The injection is used up by the next
// job even if all its nodes are cached.
func (s *Server) FailNext(kind string) {
	if kind != "error" && kind != "hang" {
		panic(fmt.Sprintf("comfytest: FailNext(%q): want \"error\" or \"hang\"", kind))
	}
	s.mu.Lock()
	s.failNext = append(s.failNext, kind)
	s.mu.Unlock()
}

// ---- HTTP plumbing ----

func (s *Server) serveHTTP(w http.ResponseWriter, r *http.Request) {
	s.rmu.Lock()
	s.requests = append(s.requests, RecordedRequest{
		Method:   r.Method,
		Path:     r.URL.EscapedPath(),
		RawQuery: r.URL.RawQuery,
		Header:   r.Header.Clone(),
	})
	s.rmu.Unlock()
	s.logf("%s %s", r.Method, r.URL.RequestURI())

	if s.stopped() {
		// Requests racing with Close/Kill.
		if hj, ok := w.(http.Hijacker); ok {
			if c, _, err := hj.Hijack(); err == nil {
				c.Close()
				return
			}
		}
		http.Error(w, "server closed", http.StatusServiceUnavailable)
		return
	}

	// aiohttp client_max_size applies to every request body.
	if r.ContentLength > s.maxBody {
		tooLarge(w, s.maxBody, r.ContentLength)
		return
	}
	r.Body = http.MaxBytesReader(w, r.Body, s.maxBody)

	if !s.originAllowed(r) {
		w.WriteHeader(http.StatusForbidden)
		return
	}
	if r.Method == http.MethodOptions {
		w.WriteHeader(http.StatusOK)
		return
	}
	s.route(w, r)
}

func tooLarge(w http.ResponseWriter, max, actual int64) {
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	w.WriteHeader(http.StatusRequestEntityTooLarge)
	fmt.Fprintf(w, "Maximum request body size %d exceeded, actual body size %d", max, actual)
}

// originAllowed implements ComfyUI's origin_only_middleware (and, for 2026,
// the Sec-Fetch-Site check).
func (s *Server) originAllowed(r *http.Request) bool {
	if s.v2026 && strings.EqualFold(r.Header.Get("Sec-Fetch-Site"), "cross-site") {
		return false
	}
	origin, hasOrigin := r.Header["Origin"]
	if r.Host == "" || !hasOrigin || len(origin) == 0 {
		return true
	}
	hostDomain := strings.ToLower(r.Host)
	hHost, hPort := splitHostPort(hostDomain)
	u, err := url.Parse(origin[0])
	if err != nil {
		return true
	}
	originDomain := strings.ToLower(u.Host)
	oHost, oPort := splitHostPort(originDomain)
	loopback := isLoopbackHost(hHost)
	if oPort == "" {
		hostDomain = hHost
	}
	if hPort == "" {
		originDomain = oHost
	}
	if loopback && hostDomain != "" && originDomain != "" && hostDomain != originDomain {
		s.logf("request with non matching host and origin %s != %s, returning 403", hostDomain, originDomain)
		return false
	}
	return true
}

// splitHostPort splits "host:port", "[v6]:port", "host" or "[v6]" into a
// bare hostname (no brackets) and port.
func splitHostPort(hp string) (host, port string) {
	if strings.HasPrefix(hp, "[") {
		end := strings.Index(hp, "]")
		if end < 0 {
			return hp, ""
		}
		host = hp[1:end]
		rest := hp[end+1:]
		if strings.HasPrefix(rest, ":") {
			port = rest[1:]
		}
		return host, port
	}
	if i := strings.LastIndex(hp, ":"); i >= 0 && !strings.Contains(hp[:i], ":") {
		return hp[:i], hp[i+1:]
	}
	return hp, ""
}

func isLoopbackHost(h string) bool {
	if h == "" {
		return false
	}
	if ip := net.ParseIP(h); ip != nil {
		return ip.IsLoopback()
	}
	// ComfyUI resolves the name; we do not touch DNS and treat the names
	// that always resolve to loopback as such.
	return h == "localhost" || strings.HasSuffix(h, ".localhost")
}

type routeHandler func(w http.ResponseWriter, r *http.Request, p map[string]string)

type route struct {
	segs    []string
	methods map[string]routeHandler
}

func (s *Server) routes() []route {
	type m = map[string]routeHandler
	get := func(h routeHandler) m { return m{"GET": h} }
	post := func(h routeHandler) m { return m{"POST": h} }
	type entry struct {
		pattern string
		methods m
	}
	rs := []entry{
		{"/", get(s.handleRoot)},
		{"/ws", get(s.handleWS)},
		{"/embeddings", get(s.handleJSONConst([]any{}))},
		{"/extensions", get(s.handleJSONConst([]any{}))},
		{"/models", get(s.handleModels)},
		{"/models/{folder}", get(s.handleModelsFolder)},
		{"/upload/image", post(s.handleUploadImage)},
		{"/upload/mask", post(s.handleUploadMask)},
		{"/view", get(s.handleView)},
		{"/system_stats", get(s.handleSystemStats)},
		{"/prompt", m{"GET": s.handleGetPrompt, "POST": s.handlePostPrompt}},
		{"/object_info", get(s.handleObjectInfo)},
		{"/object_info/{node_class}", get(s.handleObjectInfoClass)},
		{"/history", m{"GET": s.handleGetHistory, "POST": s.handlePostHistory}},
		{"/history/{prompt_id}", get(s.handleGetHistoryID)},
		{"/queue", m{"GET": s.handleGetQueue, "POST": s.handlePostQueue}},
		{"/interrupt", post(s.handleInterrupt)},
		{"/free", post(s.handleFree)},
		{"/users", m{"GET": s.handleGetUsers, "POST": s.handlePostUsers}},
		{"/settings", m{"GET": s.handleGetSettings, "POST": s.handlePostSettings}},
		{"/settings/{id}", m{"GET": s.handleGetSetting, "POST": s.handlePostSetting}},
		{"/userdata", get(s.handleListUserdata)},
		{"/userdata/{file}", m{"GET": s.handleGetUserdata, "POST": s.handlePostUserdata, "DELETE": s.handleDeleteUserdata}},
		{"/userdata/{file}/move/{dest}", post(s.handleMoveUserdata)},
	}
	if s.v2026 {
		// /api/jobs is registered with its /api prefix in ComfyUI, so it
		// also answers at /api/api/jobs but not at /jobs.
		rs = append(rs,
			entry{"/features", get(s.handleFeatures)},
			entry{"/api/jobs", get(s.handleJobs)},
			entry{"/api/jobs/{job_id}", get(s.handleJob)},
		)
	}
	out := make([]route, 0, len(rs))
	for _, r := range rs {
		segs := strings.Split(strings.TrimPrefix(r.pattern, "/"), "/")
		if r.pattern == "/" {
			segs = []string{""}
		}
		out = append(out, route{segs: segs, methods: r.methods})
	}
	return out
}

func (s *Server) route(w http.ResponseWriter, r *http.Request) {
	rs := s.rt
	p := r.URL.EscapedPath()
	if s.dispatch(rs, p, w, r) {
		return
	}
	if strings.HasPrefix(p, "/api/") && s.dispatch(rs, p[len("/api"):], w, r) {
		return
	}
	textResponse(w, http.StatusNotFound, "404: Not Found")
}

// dispatch matches the escaped path p against the table. A {param} matches
// one non-empty escaped segment (so %2F stays inside it) and is unescaped
// for the handler, like aiohttp's match_info.
func (s *Server) dispatch(rs []route, p string, w http.ResponseWriter, r *http.Request) bool {
	segs := strings.Split(strings.TrimPrefix(p, "/"), "/")
	for _, rt := range rs {
		if len(rt.segs) != len(segs) {
			continue
		}
		params := map[string]string{}
		ok := true
		for i, ps := range rt.segs {
			if strings.HasPrefix(ps, "{") {
				if segs[i] == "" {
					ok = false
					break
				}
				v, err := url.PathUnescape(segs[i])
				if err != nil {
					ok = false
					break
				}
				params[strings.Trim(ps, "{}")] = v
			} else if ps != segs[i] {
				ok = false
				break
			}
		}
		if !ok {
			continue
		}
		method := r.Method
		if method == http.MethodHead {
			method = http.MethodGet
		}
		h, found := rt.methods[method]
		if !found {
			allow := make([]string, 0, len(rt.methods))
			for k := range rt.methods {
				allow = append(allow, k)
			}
			w.Header().Set("Allow", strings.Join(allow, ","))
			textResponse(w, http.StatusMethodNotAllowed, "405: Method Not Allowed")
			return true
		}
		h(w, r, params)
		return true
	}
	return false
}

// queryOf parses the query string like aiohttp: pairs are separated by
// "&" only, so "preview=webp;90" keeps its semicolon (Go's url.ParseQuery
// would drop the whole pair).
func queryOf(r *http.Request) url.Values {
	v := url.Values{}
	for _, part := range strings.Split(r.URL.RawQuery, "&") {
		if part == "" {
			continue
		}
		k, val, _ := strings.Cut(part, "=")
		if uk, err := url.QueryUnescape(k); err == nil {
			k = uk
		}
		if uv, err := url.QueryUnescape(val); err == nil {
			val = uv
		}
		v[k] = append(v[k], val)
	}
	return v
}

// ---- small response helpers ----

func writeJSON(w http.ResponseWriter, status int, v any) {
	b := mustJSON(v)
	w.Header().Set("Content-Type", "application/json; charset=utf-8")
	w.WriteHeader(status)
	_, _ = w.Write(b)
}

func textResponse(w http.ResponseWriter, status int, text string) {
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	w.WriteHeader(status)
	_, _ = w.Write([]byte(text))
}

// emptyOK is aiohttp's web.Response(status=200): no body,
// application/octet-stream.
func emptyResponse(w http.ResponseWriter, status int) {
	w.Header().Set("Content-Type", "application/octet-stream")
	w.Header().Set("Content-Length", "0")
	w.WriteHeader(status)
}

// serverError is aiohttp's answer to an exception in a handler.
func serverError(w http.ResponseWriter) {
	textResponse(w, http.StatusInternalServerError, "500 Internal Server Error\n\nServer got itself in trouble")
}

// readBody reads the request body; it answers 413 itself when the body is
// over the limit and returns ok=false.
func (s *Server) readBody(w http.ResponseWriter, r *http.Request) ([]byte, bool) {
	var buf []byte
	tmp := make([]byte, 32<<10)
	for {
		n, err := r.Body.Read(tmp)
		buf = append(buf, tmp[:n]...)
		if err != nil {
			var mbe *http.MaxBytesError
			if errors.As(err, &mbe) {
				tooLarge(w, s.maxBody, int64(len(buf)))
				return nil, false
			}
			break
		}
	}
	return buf, true
}

// readJSONBody is aiohttp's `await request.json()`: any parse error → 500.
func (s *Server) readJSONBody(w http.ResponseWriter, r *http.Request) (any, bool) {
	b, ok := s.readBody(w, r)
	if !ok {
		return nil, false
	}
	v, err := decodeOrdered(b)
	if err != nil {
		serverError(w)
		return nil, false
	}
	return v, true
}

func (s *Server) handleRoot(w http.ResponseWriter, r *http.Request, _ map[string]string) {
	w.Header().Set("Content-Type", "text/html")
	w.Header().Set("Cache-Control", "no-cache")
	if s.opts.IndexHTML != "" {
		w.Header().Set("Content-Type", "text/html; charset=utf-8")
		_, _ = w.Write([]byte(s.opts.IndexHTML))
		return
	}
	_, _ = w.Write([]byte("<!DOCTYPE html>\n<html><head><title>ComfyUI</title></head><body>comfytest fake ComfyUI " + s.opts.Version + "</body></html>\n"))
}

func (s *Server) handleJSONConst(v any) routeHandler {
	return func(w http.ResponseWriter, r *http.Request, _ map[string]string) { writeJSON(w, 200, v) }
}
