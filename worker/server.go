package worker

import (
	"bytes"
	"context"
	"crypto/subtle"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"mime"
	"mime/multipart"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/google/uuid"
	"github.com/gorilla/websocket"
	"go.uber.org/zap"

	"github.com/comfyume/comfyume/comfy"
)

// Defaults of Options.
const (
	DefaultHeartbeat = 15 * time.Second
	DefaultIdle      = 10 * time.Minute
)

const (
	// greetTimeout bounds dialing the local WebSocket and its greeting.
	greetTimeout = 15 * time.Second
	// flagsTimeout bounds the wait for the feature_flags reply.
	flagsTimeout = 5 * time.Second
	// finishGrace is how long the worker waits for executing{node:null}
	// after the terminal event before it ends the stream anyway.
	finishGrace = 5 * time.Second
	// writeTimeout bounds writing one frame to the gateway.
	writeTimeout = 2 * time.Minute
	// cleanupTimeout bounds interrupting the local prompt.
	cleanupTimeout = 15 * time.Second
	// drainLimit is how much of an unread request body the worker reads
	// before refusing a job, so that the gateway sees the answer rather
	// than a reset connection.
	drainLimit = 16 << 20
	// frameQueue is the number of local WebSocket frames buffered between
	// the socket reader and the job loop.
	frameQueue = 256
	// wsReadLimit bounds one frame from the local ComfyUI.
	wsReadLimit = 512 << 20
)

// Options configure a worker Server. The zero value is usable.
type Options struct {
	// Token, if set, is required on job requests, either in TokenHeader
	// ("X-Comfyume-Worker-Token: <Token>") or as "Authorization: Bearer
	// <Token>". The separate header is for platforms whose own key takes
	// the Authorization header. The GET status answer needs no token
	// (platform health checks cannot send one).
	Token string
	// Heartbeat is how often a heartbeat frame is sent while nothing else
	// was (default 15s).
	Heartbeat time.Duration
	// Idle is how long a job may go without any WebSocket frame from the
	// local ComfyUI before it is interrupted and failed (default 10 min).
	Idle time.Duration
	// ChunkSize is the payload size of output chunks (default 1 MiB).
	ChunkSize int
	// HTTPClient talks to the local ComfyUI (default: a client without
	// timeouts; every call carries its own context).
	HTTPClient *http.Client
	// Dialer opens the local WebSocket (default websocket.DefaultDialer).
	Dialer *websocket.Dialer
	// Logger receives the worker's logs (default: none).
	Logger *zap.Logger
	// Supervisor, if set, runs the local ComfyUI: the worker is ready only
	// while it says so, and a job whose ComfyUI ends ends with an error
	// saying why (exit code or signal, out of memory, its last lines).
	Supervisor *Supervisor
}

// Server runs jobs sent as one streaming request each on the local
// ComfyUI; see the package documentation. Create it with NewServer.
type Server struct {
	base    string // local ComfyUI, "http://127.0.0.1:8188"
	wsBase  string // "ws://127.0.0.1:8188"
	opts    Options
	hc      *http.Client
	dialer  *websocket.Dialer
	log     *zap.Logger
	running atomic.Int64
}

// NewServer returns a worker for the ComfyUI at the base URL comfy
// (e.g. "http://127.0.0.1:8188").
func NewServer(comfy string, opts Options) *Server {
	if opts.Heartbeat <= 0 {
		opts.Heartbeat = DefaultHeartbeat
	}
	if opts.Idle <= 0 {
		opts.Idle = DefaultIdle
	}
	if opts.ChunkSize <= 0 || opts.ChunkSize > MaxPayload-4 {
		opts.ChunkSize = DefaultChunkSize
	}
	s := &Server{base: strings.TrimRight(comfy, "/"), opts: opts, hc: opts.HTTPClient, dialer: opts.Dialer, log: opts.Logger}
	if s.hc == nil {
		s.hc = &http.Client{}
	}
	if s.dialer == nil {
		s.dialer = websocket.DefaultDialer
	}
	if s.log == nil {
		s.log = zap.NewNop()
	}
	switch {
	case strings.HasPrefix(s.base, "https://"):
		s.wsBase = "wss://" + strings.TrimPrefix(s.base, "https://")
	case strings.HasPrefix(s.base, "http://"):
		s.wsBase = "ws://" + strings.TrimPrefix(s.base, "http://")
	default:
		s.wsBase = s.base
	}
	return s
}

// Running is the number of jobs the worker is handling now.
func (s *Server) Running() int { return int(s.running.Load()) }

// ServeHTTP handles a job (POST with Content-Type ContentType) or answers
// a status query (GET/HEAD), whatever the path.
func (s *Server) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	switch r.Method {
	case http.MethodGet, http.MethodHead:
		s.serveStatus(w, r)
	case http.MethodPost:
		if !s.authorized(r) {
			w.Header().Set("WWW-Authenticate", `Bearer realm="comfyume-worker"`)
			s.refuse(w, r, http.StatusUnauthorized, "missing or wrong bearer token")
			return
		}
		if mt, _, _ := mime.ParseMediaType(r.Header.Get("Content-Type")); mt != ContentType {
			s.refuse(w, r, http.StatusUnsupportedMediaType, "a job request has Content-Type "+ContentType)
			return
		}
		if sup := s.opts.Supervisor; sup != nil && !sup.Ready() {
			st := sup.Status()
			msg := "the local ComfyUI is " + st.State
			if st.LastExit != "" {
				msg += " (" + st.LastExit + ")"
			}
			s.refuse(w, r, http.StatusServiceUnavailable, msg)
			return
		}
		s.serveJob(w, r)
	default:
		w.Header().Set("Allow", "GET, HEAD, POST")
		s.refuse(w, r, http.StatusMethodNotAllowed, "method not allowed")
	}
}

// TokenHeader carries a worker's token when the Authorization header
// belongs to the platform in front of it.
const TokenHeader = "X-Comfyume-Worker-Token"

func (s *Server) authorized(r *http.Request) bool {
	if s.opts.Token == "" {
		return true
	}
	if t := r.Header.Get(TokenHeader); t != "" {
		return subtle.ConstantTimeCompare([]byte(strings.TrimSpace(t)), []byte(s.opts.Token)) == 1
	}
	h := r.Header.Get("Authorization")
	const prefix = "bearer "
	if len(h) < len(prefix) || !strings.EqualFold(h[:len(prefix)], prefix) {
		return false
	}
	return subtle.ConstantTimeCompare([]byte(strings.TrimSpace(h[len(prefix):])), []byte(s.opts.Token)) == 1
}

// Status is the worker's GET answer.
type Status struct {
	// Ready: the local ComfyUI answers /system_stats.
	Ready bool `json:"ready"`
	// Running is the number of jobs the worker is handling.
	Running int `json:"running"`
	// ComfyUI is the state of the ComfyUI the worker runs (with command).
	ComfyUI *ChildStatus `json:"comfyui,omitempty"`
}

// serveStatus answers 200 with the Status when the local ComfyUI is
// ready, 503 with it otherwise, so that it can serve as the platform's
// health check.
func (s *Server) serveStatus(w http.ResponseWriter, r *http.Request) {
	ctx, cancel := context.WithTimeout(r.Context(), 3*time.Second)
	defer cancel()
	st := Status{Running: s.Running()}
	sup := s.opts.Supervisor
	if sup != nil {
		cs := sup.Status()
		st.ComfyUI = &cs
	}
	if sup != nil && !sup.Ready() {
		// Starting or restarting: not worth asking.
	} else if req, err := http.NewRequestWithContext(ctx, http.MethodGet, s.base+"/system_stats", nil); err == nil {
		if resp, err := s.hc.Do(req); err == nil {
			_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, 1<<20))
			resp.Body.Close()
			st.Ready = resp.StatusCode == http.StatusOK
		}
	}
	code := http.StatusOK
	if !st.Ready {
		code = http.StatusServiceUnavailable
	}
	b, _ := json.Marshal(st)
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", "no-store")
	w.WriteHeader(code)
	if r.Method != http.MethodHead {
		_, _ = w.Write(b)
	}
}

// refuse answers a job that never reached ComfyUI with a JSON ErrorInfo.
// It first reads (a bounded part of) the rest of the request body, so that
// a client still sending gets the answer instead of a reset.
func (s *Server) refuse(w http.ResponseWriter, r *http.Request, status int, msg string) {
	_, _ = io.CopyN(io.Discard, r.Body, drainLimit)
	b, _ := json.Marshal(ErrorInfo{Message: msg})
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", "no-store")
	w.WriteHeader(status)
	_, _ = w.Write(b)
}

// ---- one job ----

type wsFrame struct {
	binary bool
	data   []byte
}

type job struct {
	s        *Server
	log      *zap.Logger
	spec     JobSpec
	clientID string
	localID  string // ComfyUI's id of the prompt (the gateway's, unless an old server made its own)

	conn      *websocket.Conn
	frames    chan wsFrame
	quit      chan struct{}
	readDone  chan struct{}
	readErr   error // set before frames is closed
	armed     atomic.Bool
	flagsOnce sync.Once
	flagsSeen chan struct{}

	out *frameOut
	// life is the supervised ComfyUI the job runs on (nil without one);
	// lines is how many lines it had printed when the job came.
	life  *life
	lines int64

	// job loop state
	started  bool // saw execution_start of our prompt
	running  bool // our prompt is executing (frames without prompt_id are ours)
	terminal bool // saw the terminal event
	sent     map[comfy.FileRef]bool
	nextOut  uint32
}

// statusError is a failure before the job was accepted, with the HTTP
// status the worker answers.
type statusError struct {
	status int
	msg    string
}

func (e *statusError) Error() string { return e.msg }

func badJob(format string, args ...any) error {
	return &statusError{http.StatusBadRequest, fmt.Sprintf(format, args...)}
}

func unavailable(format string, args ...any) error {
	return &statusError{http.StatusServiceUnavailable, fmt.Sprintf(format, args...)}
}

func (s *Server) serveJob(w http.ResponseWriter, r *http.Request) {
	s.running.Add(1)
	defer s.running.Add(-1)
	ctx := r.Context()
	body := NewReader(r.Body)

	k, p, err := body.Next()
	if err != nil || k != KindJob {
		s.refuse(w, r, http.StatusBadRequest, "the request body must start with a job frame")
		return
	}
	j := &job{
		s: s, clientID: strings.ReplaceAll(uuid.NewString(), "-", ""),
		frames: make(chan wsFrame, frameQueue), quit: make(chan struct{}), readDone: make(chan struct{}),
		flagsSeen: make(chan struct{}), sent: map[comfy.FileRef]bool{},
	}
	if err := j.parseSpec(p); err != nil {
		s.refuse(w, r, http.StatusBadRequest, err.Error())
		return
	}
	j.log = s.log.With(zap.String("prompt_id", j.spec.PromptID), zap.String("client_id", j.clientID))
	if s.opts.Supervisor != nil {
		if j.life = s.opts.Supervisor.current(); j.life != nil {
			j.lines = j.life.tail.count()
		}
	}

	fail := func(err error) {
		var se *statusError
		if !errors.As(err, &se) {
			se = &statusError{http.StatusServiceUnavailable, err.Error()}
		}
		j.log.Warn("job refused", zap.Int("status", se.status), zap.String("reason", se.msg))
		s.refuse(w, r, se.status, se.msg)
	}
	if err := j.connect(ctx); err != nil {
		fail(err)
		return
	}
	defer j.close()
	if err := j.receiveFiles(ctx, body); err != nil {
		if ctx.Err() != nil {
			return // the gateway is gone; nothing was queued
		}
		fail(err)
		return
	}
	j.waitFlags(ctx)
	j.armed.Store(true)
	acc, rej, err := j.queue(ctx)
	if err != nil {
		fail(err)
		return
	}

	w.Header().Set("Content-Type", ContentType)
	w.Header().Set("Cache-Control", "no-store")
	w.Header().Set("X-Accel-Buffering", "no")
	w.WriteHeader(http.StatusOK)
	j.out = &frameOut{fw: NewWriter(w), rc: http.NewResponseController(w), hb: time.NewTimer(s.opts.Heartbeat), every: s.opts.Heartbeat}
	defer j.out.hb.Stop()

	if rej != nil {
		j.log.Info("prompt rejected", zap.Int("status", rej.Status))
		if j.out.send(KindRejected, rejectedPayload(rej)) == nil {
			_ = j.out.send(KindDone)
		}
		return
	}
	j.log.Info("prompt queued", zap.String("local_prompt_id", j.localID), zap.Float64("number", acc.Number))
	if err := j.out.send(KindAccepted, mustJSON(acc)); err != nil {
		j.cancelLocal()
		return
	}
	if ctx.Err() != nil {
		j.cancelLocal()
		return
	}
	j.loop(ctx)
}

// mustJSON encodes v without HTML escaping. (Raw messages inside v are
// compacted: payloads that must stay byte for byte are built by hand.)
func mustJSON(v any) []byte {
	var b bytes.Buffer
	enc := json.NewEncoder(&b)
	enc.SetEscapeHTML(false)
	if err := enc.Encode(v); err != nil {
		panic(err)
	}
	return bytes.TrimSuffix(b.Bytes(), []byte("\n"))
}

// rejectedPayload encodes a RejectedInfo keeping ComfyUI's body byte for
// byte (json.Marshal would compact it and escape <, > and &).
func rejectedPayload(r *RejectedInfo) []byte {
	out := fmt.Appendf(nil, `{"status":%d,"body":`, r.Status)
	out = append(out, r.Body...)
	return append(out, '}')
}

func (j *job) parseSpec(p []byte) error {
	if err := json.Unmarshal(p, &j.spec); err != nil {
		return badJob("bad job frame: %v", err)
	}
	if len(bytes.TrimSpace(j.spec.Prompt)) == 0 || string(bytes.TrimSpace(j.spec.Prompt)) == "null" {
		return badJob("the job has no prompt")
	}
	if j.spec.PromptID == "" {
		j.spec.PromptID = uuid.NewString()
	}
	seen := map[uint32]bool{}
	for _, f := range j.spec.Files {
		if seen[f.ID] {
			return badJob("file id %d announced twice", f.ID)
		}
		seen[f.ID] = true
		if f.Filename == "" {
			return badJob("file id %d has no filename", f.ID)
		}
	}
	return nil
}

// connect opens the local WebSocket with the job's own client id, waits
// for ComfyUI's greeting (a status frame: the sid is registered, events of
// a prompt queued from now on reach it) and asks for type-4 previews.
func (j *job) connect(ctx context.Context) error {
	s := j.s
	dctx, cancel := context.WithTimeout(ctx, greetTimeout)
	defer cancel()
	conn, resp, err := s.dialer.DialContext(dctx, s.wsBase+"/ws?clientId="+j.clientID, nil)
	if err != nil {
		if resp != nil {
			return unavailable("local ComfyUI WebSocket: %v (HTTP %d)", err, resp.StatusCode)
		}
		return unavailable("local ComfyUI is not reachable: %v", err)
	}
	// A frame too large to forward is skipped (see loop), not fatal: the
	// socket only dies on frames beyond this much larger limit.
	conn.SetReadLimit(wsReadLimit)
	deadline, _ := dctx.Deadline()
	_ = conn.SetReadDeadline(deadline)
	for greeted := false; !greeted; {
		mt, data, err := conn.ReadMessage()
		if err != nil {
			conn.Close()
			return unavailable("local ComfyUI did not greet the WebSocket: %v", err)
		}
		if mt == websocket.TextMessage {
			m, err := comfy.ParseMessage(data)
			greeted = err == nil && m.Type == comfy.MsgStatus
		}
	}
	_ = conn.SetReadDeadline(time.Time{})
	if err := conn.WriteMessage(websocket.TextMessage, []byte(`{"type":"feature_flags","data":{"supports_preview_metadata":true}}`)); err != nil {
		conn.Close()
		return unavailable("local ComfyUI WebSocket: %v", err)
	}
	j.conn = conn
	go j.readLoop()
	return nil
}

// readLoop reads the local WebSocket. Until the job is armed (just before
// POST /prompt) frames cannot concern the job and are dropped, so that a
// long upload never leaves ComfyUI blocked on an unread socket.
func (j *job) readLoop() {
	defer close(j.readDone)
	defer close(j.frames)
	for {
		mt, data, err := j.conn.ReadMessage()
		if err != nil {
			j.readErr = err
			return
		}
		if mt != websocket.TextMessage && mt != websocket.BinaryMessage {
			continue
		}
		if mt == websocket.TextMessage && isType(data, comfy.MsgFeatureFlags) {
			j.flagsOnce.Do(func() { close(j.flagsSeen) })
			continue
		}
		if !j.armed.Load() {
			continue
		}
		select {
		case j.frames <- wsFrame{binary: mt == websocket.BinaryMessage, data: data}:
		case <-j.quit:
			return
		}
	}
}

func isType(data []byte, typ string) bool {
	var m struct {
		Type string `json:"type"`
	}
	return json.Unmarshal(data, &m) == nil && m.Type == typ
}

func (j *job) close() {
	close(j.quit)
	j.conn.Close()
	<-j.readDone
}

// waitFlags waits for ComfyUI's feature_flags reply when the server
// announces the feature (GET /features): a preview sent before the server
// read our flags would come without metadata. Older servers neither reply
// nor serve /features.
func (j *job) waitFlags(ctx context.Context) {
	select {
	case <-j.flagsSeen:
		return
	default:
	}
	fctx, cancel := context.WithTimeout(ctx, flagsTimeout)
	defer cancel()
	req, err := http.NewRequestWithContext(fctx, http.MethodGet, j.s.base+"/features", nil)
	if err != nil {
		return
	}
	resp, err := j.s.hc.Do(req)
	if err != nil {
		return
	}
	var f struct {
		Preview bool `json:"supports_preview_metadata"`
	}
	ok := resp.StatusCode == http.StatusOK && json.NewDecoder(io.LimitReader(resp.Body, 1<<20)).Decode(&f) == nil && f.Preview
	resp.Body.Close()
	if !ok {
		return
	}
	select {
	case <-j.flagsSeen:
	case <-fctx.Done():
		j.log.Warn("no feature_flags reply from the local ComfyUI; previews may lack metadata")
	}
}

// ---- input files ----

type upload struct {
	ref  comfy.FileRef
	pw   *io.PipeWriter
	done chan error
	once sync.Once
	err  error
}

func (u *upload) result() error {
	u.once.Do(func() { u.err = <-u.done })
	return u.err
}

func (u *upload) write(b []byte) error {
	if _, err := u.pw.Write(b); err != nil {
		if rerr := u.result(); rerr != nil {
			return rerr
		}
		return unavailable("upload of %s: %v", u.ref.Filename, err)
	}
	return nil
}

func (u *upload) finish() error {
	_ = u.pw.Close()
	return u.result()
}

var errAborted = errors.New("job aborted")

// receiveFiles reads file frames up to the start frame, streaming each
// file to the local /upload/image as it arrives.
func (j *job) receiveFiles(ctx context.Context, body *Reader) error {
	declared := map[uint32]comfy.FileRef{}
	for _, f := range j.spec.Files {
		declared[f.ID] = f.FileRef
	}
	open := map[uint32]*upload{}
	finished := map[uint32]bool{}
	defer func() {
		for _, u := range open {
			_ = u.pw.CloseWithError(errAborted)
			_ = u.result()
		}
	}()
	get := func(p []byte) (uint32, []byte, *upload, error) {
		id, data, err := SplitID(p)
		if err != nil {
			return 0, nil, nil, badJob("%v", err)
		}
		ref, ok := declared[id]
		if !ok || finished[id] {
			return 0, nil, nil, badJob("frame for unknown or finished file id %d", id)
		}
		u := open[id]
		if u == nil {
			u = j.startUpload(ctx, ref)
			open[id] = u
		}
		return id, data, u, nil
	}
	for {
		k, p, err := body.Next()
		if err != nil {
			if err == io.EOF {
				return badJob("the request body ended before the start frame")
			}
			return badJob("reading the request body: %v", err)
		}
		switch k {
		case KindFileChunk:
			_, data, u, err := get(p)
			if err != nil {
				return err
			}
			if err := u.write(data); err != nil {
				return err
			}
		case KindFileEnd:
			id, _, u, err := get(p)
			if err != nil {
				return err
			}
			delete(open, id)
			if err := u.finish(); err != nil {
				return err
			}
			finished[id] = true
		case KindStart:
			if len(finished) != len(declared) {
				return badJob("start frame before every announced file was sent (%d of %d)", len(finished), len(declared))
			}
			if _, _, err := body.Next(); err != io.EOF {
				return badJob("data after the start frame")
			}
			return nil
		default:
			return badJob("unexpected %s frame in the request body", k)
		}
	}
}

// startUpload begins a streaming multipart POST /upload/image of ref.
func (j *job) startUpload(ctx context.Context, ref comfy.FileRef) *upload {
	dataR, dataW := io.Pipe()
	bodyR, bodyW := io.Pipe()
	mw := multipart.NewWriter(bodyW)
	u := &upload{ref: ref, pw: dataW, done: make(chan error, 1)}
	typ := ref.Type
	if typ == "" {
		typ = comfy.TypeInput
	}
	go func() {
		err := func() error {
			for _, f := range [][2]string{{"type", typ}, {"subfolder", ref.Subfolder}, {"overwrite", "true"}} {
				if err := mw.WriteField(f[0], f[1]); err != nil {
					return err
				}
			}
			part, err := mw.CreateFormFile("image", ref.Filename)
			if err != nil {
				return err
			}
			if _, err := io.Copy(part, dataR); err != nil {
				return err
			}
			return mw.Close()
		}()
		_ = dataR.CloseWithError(err)
		_ = bodyW.CloseWithError(err)
	}()
	go func() {
		u.done <- func() error {
			req, err := http.NewRequestWithContext(ctx, http.MethodPost, j.s.base+"/upload/image", bodyR)
			if err != nil {
				_ = bodyR.CloseWithError(err)
				return unavailable("upload of %s: %v", ref.Filename, err)
			}
			req.Header.Set("Content-Type", mw.FormDataContentType())
			resp, err := j.s.hc.Do(req)
			if err != nil {
				_ = bodyR.CloseWithError(err)
				return unavailable("upload of %s to the local ComfyUI: %v", ref.Filename, err)
			}
			defer resp.Body.Close()
			b, _ := io.ReadAll(io.LimitReader(resp.Body, 64<<10))
			// An early answer leaves the writer blocked; release it.
			_ = bodyR.CloseWithError(errAborted)
			if resp.StatusCode != http.StatusOK {
				msg := fmt.Sprintf("the local ComfyUI refused the upload of %s: %d %s", ref.Filename, resp.StatusCode, bytes.TrimSpace(b))
				if resp.StatusCode >= 502 && resp.StatusCode <= 504 {
					return unavailable("%s", msg)
				}
				return badJob("%s", msg)
			}
			var got struct {
				Name string `json:"name"`
			}
			if json.Unmarshal(b, &got) == nil && got.Name != ref.Filename {
				j.log.Warn("the local ComfyUI renamed an upload", zap.String("sent", ref.Filename), zap.String("stored", got.Name))
			}
			return nil
		}()
	}()
	return u
}

// ---- POST /prompt ----

// queue posts the prompt. It returns the accepted info, or the rejection
// to relay, or an error when ComfyUI could not be asked.
func (j *job) queue(ctx context.Context) (*AcceptedInfo, *RejectedInfo, error) {
	quote := func(s string) json.RawMessage { return mustJSON(s) }
	body := map[string]json.RawMessage{
		"prompt":    j.spec.Prompt,
		"client_id": quote(j.clientID),
		"prompt_id": quote(j.spec.PromptID),
	}
	if ed := bytes.TrimSpace(j.spec.ExtraData); len(ed) > 0 && string(ed) != "null" {
		body["extra_data"] = ed
	}
	if pt := bytes.TrimSpace(j.spec.PartialExecutionTargets); len(pt) > 0 && string(pt) != "null" {
		body["partial_execution_targets"] = pt
	}
	// Once sent, the prompt may be queued whatever happens to the gateway:
	// the answer is awaited in any case, so that the prompt can be
	// interrupted if the gateway left meanwhile.
	pctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), time.Minute)
	defer cancel()
	req, err := http.NewRequestWithContext(pctx, http.MethodPost, j.s.base+"/prompt", bytes.NewReader(mustJSON(body)))
	if err != nil {
		return nil, nil, unavailable("POST /prompt: %v", err)
	}
	req.Header.Set("Content-Type", "application/json")
	resp, err := j.s.hc.Do(req)
	if err != nil {
		return nil, nil, unavailable("POST /prompt to the local ComfyUI: %v", err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, 64<<20))
	if err != nil {
		return nil, nil, unavailable("reading the answer to POST /prompt: %v", err)
	}
	switch {
	case resp.StatusCode == http.StatusOK:
		var a struct {
			PromptID   string          `json:"prompt_id"`
			Number     float64         `json:"number"`
			NodeErrors json.RawMessage `json:"node_errors"`
		}
		if err := json.Unmarshal(b, &a); err != nil || a.PromptID == "" {
			return nil, nil, unavailable("unexpected answer to POST /prompt: %s", truncate(b, 200))
		}
		j.localID = a.PromptID
		return &AcceptedInfo{PromptID: j.spec.PromptID, Number: a.Number, NodeErrors: a.NodeErrors}, nil, nil
	case resp.StatusCode == http.StatusTooManyRequests || (resp.StatusCode >= 502 && resp.StatusCode <= 504):
		return nil, nil, unavailable("the local ComfyUI answered POST /prompt with %d", resp.StatusCode)
	default:
		raw := json.RawMessage(b)
		if !json.Valid(b) {
			raw = mustJSON(string(b))
		}
		return nil, &RejectedInfo{Status: resp.StatusCode, Body: raw}, nil
	}
}

func truncate(b []byte, n int) []byte {
	if len(b) > n {
		return b[:n]
	}
	return b
}

// ---- streaming the job ----

// frameOut writes flushed frames to the gateway; only the job loop uses it.
type frameOut struct {
	fw    *Writer
	rc    *http.ResponseController
	hb    *time.Timer
	every time.Duration
	err   error
}

func (o *frameOut) send(k Kind, parts ...[]byte) error {
	if o.err != nil {
		return o.err
	}
	_ = o.rc.SetWriteDeadline(time.Now().Add(writeTimeout))
	err := o.fw.Write(k, parts...)
	if err == nil {
		if ferr := o.rc.Flush(); ferr != nil && !errors.Is(ferr, http.ErrNotSupported) {
			err = ferr
		}
	}
	o.err = err
	o.hb.Reset(o.every)
	return err
}

func (o *frameOut) sendID(k Kind, id uint32, data []byte) error {
	var b [4]byte
	b[0], b[1], b[2], b[3] = byte(id>>24), byte(id>>16), byte(id>>8), byte(id)
	return o.send(k, b[:], data)
}

// errFinished ends the job loop normally.
var errFinished = errors.New("finished")

func (j *job) loop(ctx context.Context) {
	idle := time.NewTimer(j.s.opts.Idle)
	defer idle.Stop()
	var grace <-chan time.Time
	var ended <-chan struct{}
	if j.life != nil {
		ended = j.life.done
	}
	for {
		select {
		case <-ended:
			j.comfyEnded()
			return
		case <-ctx.Done():
			j.log.Info("gateway left; interrupting the prompt", zap.Error(context.Cause(ctx)))
			j.cancelLocal()
			return
		case <-j.out.hb.C:
			if j.out.send(KindHeartbeat) != nil {
				j.cancelLocal()
				return
			}
		case <-idle.C:
			msg := fmt.Sprintf("no event from ComfyUI for %v; the prompt was interrupted", j.s.opts.Idle)
			j.log.Warn(msg)
			j.cancelLocal()
			j.fail(msg)
			return
		case <-grace:
			j.log.Warn("no executing{node:null} after the terminal event")
			_ = j.out.send(KindDone)
			return
		case f, ok := <-j.frames:
			if !ok {
				if j.comfyEnded() {
					return
				}
				msg := fmt.Sprintf("lost the WebSocket of the local ComfyUI: %v", j.readErr)
				j.log.Warn(msg)
				j.cancelLocal()
				j.fail(msg)
				return
			}
			idle.Reset(j.s.opts.Idle)
			if len(f.data) > MaxPayload {
				j.log.Warn("skipping a WebSocket frame too large to forward", zap.Int("bytes", len(f.data)))
				continue
			}
			var err error
			if f.binary {
				err = j.onBinary(f.data)
			} else {
				err = j.onText(ctx, f.data)
			}
			switch {
			case err == errFinished:
				_ = j.out.send(KindDone)
				return
			case err != nil:
				var gone *goneError
				if errors.As(err, &gone) {
					j.fail(gone.msg)
					return
				}
				// Writing to the gateway failed, or it left.
				j.log.Info("stream to the gateway broke; interrupting the prompt", zap.Error(err))
				j.cancelLocal()
				return
			}
			if j.terminal && grace == nil {
				grace = time.After(finishGrace)
			}
		}
	}
}

// exitWait is how long a job whose local WebSocket broke waits for the
// supervised ComfyUI to be found dead (the socket closes before the
// process is reaped and its output read).
const exitWait = 5 * time.Second

// comfyEnded ends the job with why its supervised ComfyUI ended, if it
// did (waiting up to exitWait for it to be seen gone). It reports whether
// it did.
func (j *job) comfyEnded() bool {
	if j.life == nil {
		return false
	}
	t := time.NewTimer(exitWait)
	defer t.Stop()
	select {
	case <-j.life.done:
	case <-t.C:
		return false
	}
	msg := j.life.exit.MessageSince(j.lines)
	j.log.Warn("ComfyUI ended during the job", zap.String("reason", j.life.exit.Reason()))
	j.fail(msg)
	return true
}

func (j *job) fail(msg string) {
	_ = j.out.send(KindError, mustJSON(ErrorInfo{Message: msg}))
}

type goneError struct{ msg string }

func (e *goneError) Error() string { return e.msg }

// mapID rewrites ComfyUI's prompt id to the gateway's in a JSON text.
func (j *job) mapID(b []byte) []byte {
	if j.localID == j.spec.PromptID {
		return b
	}
	return bytes.ReplaceAll(b, mustJSON(j.localID), mustJSON(j.spec.PromptID))
}

func (j *job) onText(ctx context.Context, data []byte) error {
	m, err := comfy.ParseMessage(data)
	if err != nil {
		j.log.Debug("skipping a malformed frame", zap.ByteString("frame", truncate(data, 200)))
		return nil
	}
	switch m.Type {
	case comfy.MsgStatus:
		return j.onStatus(ctx, m)
	case comfy.MsgFeatureFlags, "crystools.monitor", "logs":
		return nil
	}
	var c struct {
		PromptID any     `json:"prompt_id"`
		Node     *string `json:"node"`
	}
	_ = json.Unmarshal(m.Data, &c)
	pid, _ := c.PromptID.(string)
	switch {
	case pid == "" && !j.running:
		return nil // not about our prompt
	case pid != "" && pid != j.localID:
		return nil // another prompt's
	}
	if m.Type == comfy.MsgExecutionStart {
		j.started, j.running = true, true
	}
	if m.Type == comfy.MsgExecuted {
		if err := j.sendOutputs(ctx, m); err != nil {
			return err
		}
	}
	if err := j.out.send(KindEvent, j.mapID(data)); err != nil {
		return err
	}
	if comfy.IsTerminal(m.Type) {
		j.running, j.terminal = false, true
	}
	if m.Type == comfy.MsgExecuting && c.Node == nil && pid == j.localID {
		return errFinished
	}
	return nil
}

// onStatus notices a prompt that left the queue without running (deleted
// by someone else): with nothing queued and our prompt never started, it
// asks ComfyUI where the prompt is.
func (j *job) onStatus(ctx context.Context, m comfy.Message) error {
	st, err := comfy.ParseStatus(m)
	if err != nil || st.Status.ExecInfo.QueueRemaining != 0 || j.started || j.terminal {
		return nil
	}
	lctx, cancel := context.WithTimeout(ctx, cleanupTimeout)
	defer cancel()
	// A prompt that is queued, running or done is fine: the status may be
	// stale (sent before the prompt was queued) and the prompt's events
	// may still be queued behind it. Only a prompt that is nowhere is gone.
	where, err := j.locate(lctx)
	if err != nil || where != "" {
		return nil
	}
	return &goneError{"the prompt left the local ComfyUI's queue without running (deleted?)"}
}

func (j *job) onBinary(data []byte) error {
	t, ok := comfy.BinaryType(data)
	if !ok {
		return nil
	}
	if t == comfy.BinaryPreviewImageWithMetadata {
		p, err := comfy.ParsePreview(data)
		if err != nil {
			return nil
		}
		if pid := p.Metadata.PromptID; pid != "" {
			if pid != j.localID {
				return nil
			}
			return j.out.send(KindBinary, j.mapPreviewID(data))
		}
	}
	if !j.running {
		return nil
	}
	return j.out.send(KindBinary, data)
}

// mapPreviewID rewrites the prompt id inside a type-4 frame's metadata.
func (j *job) mapPreviewID(frame []byte) []byte {
	if j.localID == j.spec.PromptID || len(frame) < 8 {
		return frame
	}
	n := int(uint32(frame[4])<<24 | uint32(frame[5])<<16 | uint32(frame[6])<<8 | uint32(frame[7]))
	if n > len(frame)-8 {
		return frame
	}
	meta := j.mapID(frame[8 : 8+n])
	out := make([]byte, 0, len(frame)-n+len(meta))
	out = append(out, frame[:4]...)
	out = append(out, byte(len(meta)>>24), byte(len(meta)>>16), byte(len(meta)>>8), byte(len(meta)))
	out = append(out, meta...)
	return append(out, frame[8+n:]...)
}

// sendOutputs streams every file an executed event names, before the
// event itself is forwarded.
func (j *job) sendOutputs(ctx context.Context, m comfy.Message) error {
	var d struct {
		Output map[string]any `json:"output"`
	}
	if json.Unmarshal(m.Data, &d) != nil || d.Output == nil {
		return nil
	}
	var refs []comfy.FileRef
	comfy.RefsIn(d.Output, func(_ string, item map[string]any) { refs = append(refs, comfy.RefOf(item)) })
	for _, ref := range refs {
		if j.sent[ref] {
			continue
		}
		j.sent[ref] = true
		if err := j.sendOutput(ctx, ref); err != nil {
			return err
		}
	}
	return nil
}

// sendOutput streams one file from the local /view. A file ComfyUI cannot
// serve is skipped (the browser would get the same 404 from ComfyUI); one
// that breaks off midway ends with an error in its output end frame.
func (j *job) sendOutput(ctx context.Context, ref comfy.FileRef) error {
	q := url.Values{"filename": {ref.Filename}, "subfolder": {ref.Subfolder}, "type": {ref.Type}}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, j.s.base+"/view?"+q.Encode(), nil)
	if err != nil {
		return nil
	}
	resp, err := j.s.hc.Do(req)
	if err != nil {
		if ctx.Err() != nil {
			return ctx.Err()
		}
		j.log.Warn("cannot fetch an output", zap.String("filename", ref.Filename), zap.Error(err))
		return nil
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		j.log.Warn("cannot fetch an output", zap.String("filename", ref.Filename), zap.Int("status", resp.StatusCode))
		return nil
	}
	j.nextOut++
	id := j.nextOut
	info := OutputInfo{ID: id, FileRef: ref, ContentType: resp.Header.Get("Content-Type"), Size: resp.ContentLength}
	if err := j.out.send(KindOutputBegin, mustJSON(info)); err != nil {
		return err
	}
	buf := make([]byte, j.s.opts.ChunkSize)
	for {
		n, rerr := io.ReadFull(resp.Body, buf)
		if n > 0 {
			if err := j.out.sendID(KindOutputChunk, id, buf[:n]); err != nil {
				return err
			}
		}
		if rerr == io.EOF || rerr == io.ErrUnexpectedEOF {
			return j.out.sendID(KindOutputEnd, id, nil)
		}
		if rerr != nil {
			if ctx.Err() != nil {
				return ctx.Err()
			}
			j.log.Warn("output cut short", zap.String("filename", ref.Filename), zap.Error(rerr))
			return j.out.sendID(KindOutputEnd, id, []byte("reading "+ref.Filename+" from ComfyUI: "+rerr.Error()))
		}
	}
}

// ---- interrupting ----

// locate says where ComfyUI has the prompt: "running", "pending",
// "history" or "" (nowhere).
func (j *job) locate(ctx context.Context) (string, error) {
	var q struct {
		Running [][]json.RawMessage `json:"queue_running"`
		Pending [][]json.RawMessage `json:"queue_pending"`
	}
	if err := j.getJSON(ctx, "/queue", &q); err != nil {
		return "", err
	}
	has := func(items [][]json.RawMessage) bool {
		for _, it := range items {
			var id string
			if len(it) > 1 && json.Unmarshal(it[1], &id) == nil && id == j.localID {
				return true
			}
		}
		return false
	}
	if has(q.Running) {
		return "running", nil
	}
	if has(q.Pending) {
		return "pending", nil
	}
	var h map[string]json.RawMessage
	if err := j.getJSON(ctx, "/history/"+url.PathEscape(j.localID), &h); err != nil {
		return "", err
	}
	if _, ok := h[j.localID]; ok {
		return "history", nil
	}
	return "", nil
}

// cancelLocal stops the local prompt: interrupts it if it runs, removes it
// from the queue if it waits. It checks first, because an old ComfyUI
// interrupts whatever runs, whatever prompt_id it is given.
func (j *job) cancelLocal() {
	if j.localID == "" {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), cleanupTimeout)
	defer cancel()
	for range 3 {
		where, err := j.locate(ctx)
		if err != nil {
			j.log.Warn("cannot cancel the local prompt", zap.Error(err))
			return
		}
		switch where {
		case "running":
			j.log.Info("interrupting the local prompt", zap.String("local_prompt_id", j.localID))
			_ = j.post(ctx, "/interrupt", map[string]any{"prompt_id": j.localID})
			return
		case "pending":
			j.log.Info("removing the local prompt from the queue", zap.String("local_prompt_id", j.localID))
			_ = j.post(ctx, "/queue", map[string]any{"delete": []string{j.localID}})
			// It may have started meanwhile: look again.
		default:
			return
		}
	}
}

func (j *job) getJSON(ctx context.Context, path string, v any) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, j.s.base+path, nil)
	if err != nil {
		return err
	}
	resp, err := j.s.hc.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("GET %s: %s", path, resp.Status)
	}
	return json.NewDecoder(io.LimitReader(resp.Body, 256<<20)).Decode(v)
}

func (j *job) post(ctx context.Context, path string, v any) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, j.s.base+path, bytes.NewReader(mustJSON(v)))
	if err != nil {
		return err
	}
	req.Header.Set("Content-Type", "application/json")
	resp, err := j.s.hc.Do(req)
	if err != nil {
		return err
	}
	_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, 1<<20))
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("POST %s: %s", path, resp.Status)
	}
	return nil
}
