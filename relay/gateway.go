package relay

import (
	"context"
	"encoding/json"
	"errors"
	"io"
	"mime"
	"net/http"
	"path"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/google/uuid"
	"go.uber.org/zap"

	"github.com/comfyume/comfyume/comfy"
	"github.com/comfyume/comfyume/dispatch"
	"github.com/comfyume/comfyume/usage"
)

// OutputsSubfolder is the /view subfolder under which the gateway serves the
// outputs it captured: refs read "<OutputsSubfolder>/<prompt_id>[/<original
// subfolder>]". Requests for other subfolders go to the user's home.
const OutputsSubfolder = "comfyume"

// Config configures a Gateway.
type Config struct {
	// Store keeps job records (default: in memory).
	Store dispatch.Store
	// Blobs keeps captured outputs (required).
	Blobs Blobs
	// Logger receives the gateway's logs.
	Logger *zap.Logger
	// HomeHeader is added to every request toward a home server.
	HomeHeader http.Header
	// Transport overrides the HTTP transport toward upstreams (tests).
	Transport http.RoundTripper
	// RedirectExpiry, when > 0, makes /view answer 302 Found to a presigned
	// URL valid that long, for blob stores that implement Presigner (S3),
	// instead of streaming files through the gateway. 0 is proxy mode.
	RedirectExpiry time.Duration
	// Bus connects this gateway to the others sharing Store (nil: alone).
	Bus Bus
	// LeaseTTL is how long this gateway's claim on a job lasts without
	// renewal (default dispatch.DefaultLeaseTTL).
	LeaseTTL time.Duration
	// HealthInterval is how often endpoints that are down are probed
	// (default 10s).
	HealthInterval time.Duration
	// Events bounds what GPU servers' events may cost: the largest frame
	// accepted and the bytes queued per job (see dispatch.EventLimits).
	Events dispatch.EventLimits
	// MaxSocketsPerUser is how many browser sockets one user may have open
	// on this gateway at once (default DefaultMaxSocketsPerUser); more are
	// refused with close code 1008 and a reason the browser shows.
	MaxSocketsPerUser int
	// MaxSocketQueue is how many bytes may wait for one browser socket that
	// reads slower than its events come (default DefaultMaxSocketQueue).
	// Beyond it, progress and previews are coalesced to the latest per node
	// (lifecycle events are all kept); a socket still over it after 10s, or
	// over twice it, is closed, and the browser reconnects and replays.
	MaxSocketQueue int
}

// Gateway is the per-Caddy core shared by every site: jobs, sessions,
// captured outputs.
type Gateway struct {
	hub     *Hub
	blobs   Blobs
	manager *dispatch.Manager
	logger  *zap.Logger
	cfg     Config

	stop     func()
	control  chan BusMessage // queue changes and cancels from the bus
	homesMu  sync.Mutex
	homes    map[string]*dispatch.Upstream
	features map[string]featureCache
	ops      *Ops // the operator's page
	// outBytes counts each running job's stored outputs (usage).
	outBytes outputTally
	// prompts bounds the POST /prompt requests of one user handled at once.
	prompts userSlots
}

// New builds a gateway.
func New(cfg Config) (*Gateway, error) {
	if cfg.Blobs == nil {
		return nil, errors.New("relay: no blob store")
	}
	if cfg.Store == nil {
		cfg.Store = dispatch.NewMemoryStore()
	}
	if cfg.Logger == nil {
		cfg.Logger = zap.NewNop()
	}
	g := &Gateway{
		hub:      NewHub(),
		blobs:    cfg.Blobs,
		logger:   cfg.Logger,
		cfg:      cfg,
		homes:    map[string]*dispatch.Upstream{},
		features: map[string]featureCache{},
	}
	g.hub.SetLimits(cfg.MaxSocketsPerUser, cfg.MaxSocketQueue)
	g.ops = newOps(g)
	g.manager = dispatch.NewManager(cfg.Store, g, cfg.Logger.Named("dispatch"))
	g.manager.SetLeaseTTL(cfg.LeaseTTL)
	g.manager.SetEventLimits(cfg.Events)
	ctx, cancel := context.WithCancel(context.Background())
	g.stop = cancel
	if cfg.Bus != nil {
		g.hub.bus = cfg.Bus
		g.control = make(chan BusMessage, 1024)
		go g.runControl(ctx)
		go cfg.Bus.Run(ctx, g.onBus, g.hub.catchUp)
	}
	g.manager.SetInputsFor(func(j *dispatch.Job) dispatch.InputSource {
		site := Site{User: j.User}
		if j.Home != "" {
			if h, err := g.Home(j.Home); err == nil {
				site.Home = h
			}
		}
		return g.inputSource(site)
	})
	g.manager.OnForget(g.removeFiles)
	g.manager.Start(ctx)
	if cfg.HealthInterval <= 0 {
		cfg.HealthInterval = 10 * time.Second
	}
	g.manager.HealthChecks(ctx, cfg.HealthInterval)
	g.manager.Watchdogs(ctx, time.Second)
	return g, nil
}

// onBus handles a message from any gateway on the bus. It runs inside the
// bus subscription's callback, which shares the store's connection: frames
// are only written to sockets here; queue changes and cancels, which read
// the store, are handed to a goroutine of their own (g.control).
func (g *Gateway) onBus(m BusMessage) {
	if m.Origin == g.hub.id {
		return // handled here when published
	}
	switch m.Kind {
	case busKindFrame:
		g.hub.deliverBus(m)
	case busKindQueue, busKindCancel:
		select {
		case g.control <- m:
		default:
			g.logger.Warn("bus control backlog full; dropping", zap.String("kind", m.Kind))
		}
	}
}

// runControl handles queue changes and cancels from other gateways.
func (g *Gateway) runControl(ctx context.Context) {
	for {
		select {
		case <-ctx.Done():
			return
		case m := <-g.control:
			switch m.Kind {
			case busKindQueue:
				g.localQueueChanged(m.User)
			case busKindCancel:
				g.manager.Cancel(ctx, m.User, m.JobID)
			}
		}
	}
}

// Manager returns the job dispatcher (to configure pools).
func (g *Gateway) Manager() *dispatch.Manager { return g.manager }

// Hub returns the browser session hub.
func (g *Gateway) Hub() *Hub { return g.hub }

// Close stops background work.
func (g *Gateway) Close() {
	g.stop()
	g.hub.Close()
	g.manager.Close()
	g.homesMu.Lock()
	for _, h := range g.homes {
		h.Close()
	}
	g.homesMu.Unlock()
}

// Home returns the upstream for a home URL, made once per URL.
func (g *Gateway) Home(base string) (*dispatch.Upstream, error) {
	g.homesMu.Lock()
	defer g.homesMu.Unlock()
	if h, ok := g.homes[base]; ok {
		return h, nil
	}
	h, err := dispatch.NewUpstream(base, dispatch.UpstreamOptions{Header: g.cfg.HomeHeader, Transport: g.cfg.Transport, Logger: g.logger})
	if err != nil {
		return nil, err
	}
	g.homes[base] = h
	return h, nil
}

// Site is what the HTTP handler knows about one request.
type Site struct {
	// User is the identity of the person making the request.
	User string
	// Home is the user's own ComfyUI.
	Home *dispatch.Upstream
	// RunOn is the pool prompts run on, or "home".
	RunOn string
	// MaxBody limits request bodies the gateway reads (bytes).
	MaxBody int64
	// Priority of the user's jobs in the pool's queue (higher first).
	Priority int
	// Quota changes the pool's daily limits for this user.
	Quota usage.Override
	// SharedHome says Home serves other users too: the gateway's clears
	// and interrupts then stay with this user's jobs (see shared.go).
	SharedHome bool
}

// RunsHome reports whether prompts go to the user's home unchanged.
func (s Site) RunsHome() bool { return s.RunOn == "" || s.RunOn == "home" }

// ServeHTTP answers the requests the gateway owns and passes the rest to
// next. It returns false when it did not handle the request.
func (g *Gateway) ServeHTTP(w http.ResponseWriter, r *http.Request, site Site) bool {
	p := r.URL.Path
	route := p
	if strings.HasPrefix(p, "/api/") {
		route = p[4:]
	}
	switch {
	case route == "/ws":
		g.serveWS(w, r, site)
	case route == "/prompt" && r.Method == http.MethodPost && !site.RunsHome():
		g.servePrompt(w, r, site)
	case route == "/prompt" && r.Method == http.MethodPost && site.SharedHome:
		// Passed on to home, with the user's own sid at home.
		return !g.ownHomePrompt(w, r, site)
	case route == "/prompt" && r.Method == http.MethodGet:
		g.servePromptStatus(w, r, site)
	case route == "/view" && (r.Method == http.MethodGet || r.Method == http.MethodHead):
		return g.serveView(w, r, site)
	case route == "/queue":
		g.serveQueue(w, r, site)
	case route == "/history" || strings.HasPrefix(route, "/history/"):
		g.serveHistory(w, r, site, strings.TrimPrefix(strings.TrimPrefix(route, "/history"), "/"))
	case route == "/interrupt" && r.Method == http.MethodPost:
		g.serveInterrupt(w, r, site)
	case p == "/api/jobs" || strings.HasPrefix(p, "/api/jobs/"):
		g.serveJobs(w, r, site, strings.TrimPrefix(strings.TrimPrefix(p, "/api/jobs"), "/"))
	default:
		return false
	}
	return true
}

// writeJSON answers with a JSON body.
func writeJSON(w http.ResponseWriter, status int, v any) {
	b, err := json.Marshal(v)
	if err != nil {
		status, b = http.StatusInternalServerError, []byte(`{"error":"encoding failed"}`)
	}
	w.Header().Set("Content-Type", "application/json; charset=utf-8")
	w.WriteHeader(status)
	_, _ = w.Write(b)
}

func writeRaw(w http.ResponseWriter, status int, body []byte) {
	w.Header().Set("Content-Type", "application/json; charset=utf-8")
	w.WriteHeader(status)
	_, _ = w.Write(body)
}

// readBody reads a JSON request body within the site's limit. On failure it
// has answered already (413 for too large).
func readBody(w http.ResponseWriter, r *http.Request, site Site) ([]byte, bool) {
	limit := site.MaxBody
	if limit <= 0 {
		limit = DefaultMaxBody
	}
	return readBodyWithin(w, r, limit)
}

// maxControlBody bounds the body of a request that names jobs to act on
// (POST /queue, /history, /interrupt, /api/jobs/cancel): ComfyUI's UI sends
// a few ids at most, and each id named costs a look-up (and the list is
// passed on to home).
const maxControlBody = 1 << 20

// readControlBody reads the body of a request that names jobs, within
// maxControlBody (or the site's limit if smaller).
func readControlBody(w http.ResponseWriter, r *http.Request, site Site) ([]byte, bool) {
	limit := int64(maxControlBody)
	if site.MaxBody > 0 && site.MaxBody < limit {
		limit = site.MaxBody
	}
	return readBodyWithin(w, r, limit)
}

// readBodyWithin reads a request body of at most limit bytes (see
// readBody).
func readBodyWithin(w http.ResponseWriter, r *http.Request, limit int64) ([]byte, bool) {
	var b []byte
	var err error
	if n := r.ContentLength; n > 0 && n <= limit {
		b, err = readAnnounced(r.Body, n)
	} else {
		b, err = io.ReadAll(http.MaxBytesReader(w, r.Body, limit))
	}
	if err != nil {
		var mbe *http.MaxBytesError
		if errors.As(err, &mbe) {
			writeRaw(w, http.StatusRequestEntityTooLarge, comfy.NewPromptError("request_too_large",
				"The request is too large", "The body exceeds the gateway's limit of "+formatBytes(limit)+".").JSON())
			return nil, false
		}
		writeRaw(w, http.StatusBadRequest, comfy.NewPromptError("invalid_request", "Could not read the request", err.Error()).JSON())
		return nil, false
	}
	return b, true
}

// firstBodyBuffer is the buffer a body of announced size is read into
// first (then doubled as the bytes come).
const firstBodyBuffer = 64 << 10

// readAnnounced reads a body of announced length n (the server ends the
// body there) into a buffer of n bytes at most, grown (doubling) as the
// bytes come rather than made whole at once: an announced length costs
// nothing until it is sent. (A client could announce 100 MiB on each of
// many connections and send nothing.)
func readAnnounced(body io.Reader, n int64) ([]byte, error) {
	b := make([]byte, 0, min(n, firstBodyBuffer))
	var err error
	for int64(len(b)) < n && err == nil {
		if len(b) == cap(b) {
			b = append(make([]byte, 0, min(2*int64(cap(b)), n)), b...)
		}
		var m int
		m, err = body.Read(b[len(b):cap(b)])
		b = b[:len(b)+m]
	}
	if int64(len(b)) == n {
		return b, nil
	}
	if err == io.EOF {
		err = io.ErrUnexpectedEOF
	}
	return b, err
}

// DefaultMaxBody is the default request body limit: ComfyUI's own default
// --max-upload-size of 100 MB.
const DefaultMaxBody = 100 << 20

func formatBytes(n int64) string {
	const mb = 1 << 20
	if n%mb == 0 {
		return strconv.FormatInt(n/mb, 10) + " MiB"
	}
	return strconv.FormatInt(n, 10) + " bytes"
}

// servePrompt runs POST /prompt on the site's pool.
func (g *Gateway) servePrompt(w http.ResponseWriter, r *http.Request, site Site) {
	pr, ok := g.readPrompt(w, r, site)
	if !ok {
		return
	}
	if err := g.freshID(r.Context(), pr.PromptID); err != nil {
		g.logger.Error("clearing a reused prompt_id's files", zap.Error(err))
		writeJSON(w, http.StatusServiceUnavailable, comfy.NewPromptError("server_error",
			"The gateway cannot record jobs right now. Please try again in a moment.", ""))
		return
	}
	res, err := g.manager.Submit(r.Context(), dispatch.SubmitRequest{
		User:     site.User,
		ClientID: pr.ClientID,
		Pool:     site.RunOn,
		Home:     homeURL(site),
		Request:  pr,
		Priority: site.Priority,
		Inputs:   g.inputSource(site),
		Quota:    site.Quota,
	})
	var rej *dispatch.RejectedError
	var unav *dispatch.UnavailableError
	var serr *dispatch.StoreError
	var full *dispatch.QueueFullError
	ex, over := quotaExceeded(err)
	switch {
	case over:
		writeQuotaExceeded(w, ex)
	case errors.As(err, &full):
		writeJSON(w, http.StatusTooManyRequests, comfy.NewPromptError("queue_full", "Too many prompts waiting", full.Error()))
	case err == nil:
		writeJSON(w, http.StatusOK, res)
	case errors.As(err, &rej):
		writeRaw(w, rej.Status, rej.Body)
	case errors.Is(err, dispatch.ErrPromptIDTaken):
		writeJSON(w, http.StatusBadRequest, comfy.NewPromptError("invalid_prompt_id", "prompt_id is already in use", pr.PromptID))
	case errors.As(err, &serr):
		g.logger.Error("job store unavailable", zap.Error(err))
		writeJSON(w, http.StatusServiceUnavailable, comfy.NewPromptError("server_error",
			"The gateway cannot record jobs right now. Please try again in a moment.", serr.Error()))
	case errors.As(err, &unav):
		g.logger.Warn("prompt not sent", zap.String("pool", site.RunOn), zap.Error(err))
		writeJSON(w, http.StatusServiceUnavailable, comfy.NewPromptError("server_error",
			"The GPU server is not reachable right now. Please try again.", dispatch.PublicMessage(site.RunOn, err.Error())))
	default:
		g.logger.Error("prompt failed", zap.Error(err))
		writeJSON(w, http.StatusInternalServerError, comfy.NewPromptError("server_error", "The gateway could not queue the prompt", dispatch.PublicMessage(site.RunOn, err.Error())))
	}
}

// readPrompt reads and checks a POST /prompt body, in one of the user's
// few slots for it (see promptsAtOnce). On failure it has answered
// already.
func (g *Gateway) readPrompt(w http.ResponseWriter, r *http.Request, site Site) (*comfy.PromptRequest, bool) {
	if !g.prompts.acquire(r.Context(), site.User) {
		return nil, false // the client went away while it waited
	}
	defer g.prompts.release(site.User)
	body, ok := readBody(w, r, site)
	if !ok {
		return nil, false
	}
	pr, berr := comfy.ParsePromptRequest(body)
	if berr != nil {
		writeJSON(w, berr.Status, berr.Body)
		return nil, false
	}
	return pr, true
}

// removeFiles removes the captured files of jobs that are forgotten.
func (g *Gateway) removeFiles(ctx context.Context, ids []string) {
	for _, id := range ids {
		if err := g.blobs.RemoveJob(ctx, id); err != nil {
			g.logger.Warn("removing a forgotten job's files", zap.String("job", id), zap.Error(err))
		}
	}
}

// freshID makes sure that a client-supplied prompt_id no job has (any
// more) starts with an empty folder: files of a job forgotten under that id
// (history limit, history cleared, or left behind by a removal that failed)
// must never become the new job's outputs, whoever submits it. Ids in use
// are left alone (Submit refuses or deduplicates them).
func (g *Gateway) freshID(ctx context.Context, id string) error {
	if u, err := uuid.Parse(id); err != nil || u.String() != id {
		return nil // not one Submit takes
	}
	if _, err := g.manager.Store().JobSummary(ctx, id); !errors.Is(err, dispatch.ErrNotFound) {
		return nil
	}
	return g.blobs.RemoveJob(ctx, id)
}

func homeURL(site Site) string {
	if site.Home == nil {
		return ""
	}
	return site.Home.Base.String()
}

// inputSource opens files a prompt references: captured outputs from the
// blob store (only the user's own), anything else from the user's home.
// Refs that fail comfy.FileRef.Check are never opened anywhere.
func (g *Gateway) inputSource(site Site) dispatch.InputSource {
	return func(ctx context.Context, ref comfy.FileRef) (io.ReadCloser, error) {
		if ref.Check() != nil {
			return nil, dispatch.ErrNotFound
		}
		if ours(ref) {
			key, jobID, ok := blobKey(ref)
			if !ok {
				return nil, dispatch.ErrNotFound
			}
			j, err := g.manager.Store().JobSummary(ctx, jobID)
			if err != nil || j.User != site.User {
				return nil, dispatch.ErrNotFound
			}
			b, err := g.blobs.Open(ctx, key)
			if errors.Is(err, ErrBlobNotFound) {
				return nil, dispatch.ErrNotFound
			}
			return b, err
		}
		if site.Home == nil {
			return nil, dispatch.ErrNotFound
		}
		resp, err := site.Home.Open(ctx, ref)
		if err != nil {
			return nil, err
		}
		return resp.Body, nil
	}
}

// ours reports whether a ref names a file under the gateway's subfolder
// (a captured output, or a mistake) rather than one of home's.
func ours(ref comfy.FileRef) bool {
	return ref.Subfolder == OutputsSubfolder || strings.HasPrefix(ref.Subfolder, OutputsSubfolder+"/")
}

// blobKey maps a captured output's ref to its blob key and job id. The key
// is made of the ref's checked names only ("<job>/<type>[/<subfolder>]/
// <filename>", no cleaning, no joining of anything unchecked), so it always
// lies inside its job's folder and names exactly one ref (capturedRef of
// the same parts).
func blobKey(ref comfy.FileRef) (key, jobID string, ok bool) {
	if !ours(ref) || ref.Check() != nil {
		return "", "", false
	}
	rest := strings.TrimPrefix(ref.Subfolder, OutputsSubfolder)
	jobID, orig, _ := strings.Cut(strings.TrimPrefix(rest, "/"), "/")
	if jobID == "" {
		return "", "", false
	}
	key = jobID + "/" + ref.Type + "/"
	if orig != "" {
		key += orig + "/"
	}
	return key + ref.Filename, jobID, true
}

// capturedRef is the ref under which a captured output is served.
func capturedRef(jobID string, orig comfy.FileRef) comfy.FileRef {
	sub := OutputsSubfolder + "/" + jobID
	if orig.Subfolder != "" {
		sub += "/" + orig.Subfolder
	}
	return comfy.FileRef{Filename: orig.Filename, Subfolder: sub, Type: orig.Type}
}

// Capture implements dispatch.Events: before an executed event is recorded
// or shown, every file it names is copied from the upstream into the blob
// store and its ref rewritten to the gateway's copy. (Executed events are
// a few per job: decoding them whole is fine.)
func (g *Gateway) Capture(ctx context.Context, to dispatch.Recipient, up *dispatch.Upstream, ev *dispatch.Event) error {
	if ev.Type != comfy.MsgExecuted || up == nil {
		return nil
	}
	msg, err := comfy.ParseMessage(ev.JSON)
	if err != nil {
		return err
	}
	f, err := msg.Fields()
	if err != nil {
		return err
	}
	out, ok := f["output"].(map[string]any)
	if !ok {
		return nil
	}
	if up.Pinned {
		// The files came with the job's stream and are stored already
		// (StoreOutput): only the refs change.
		comfy.RefsIn(out, func(_ string, item map[string]any) {
			ref := comfy.RefOf(item)
			if storable(ref) {
				item["subfolder"] = capturedRef(to.JobID, ref).Subfolder
			}
		})
		ev.JSON = msg.WithFields(f).Encode()
		return nil
	}
	type output struct {
		item map[string]any
		ref  comfy.FileRef
	}
	var items []output
	comfy.RefsIn(out, func(_ string, item map[string]any) {
		if ref := comfy.RefOf(item); storable(ref) {
			items = append(items, output{item, ref})
		}
	})
	var (
		wg    sync.WaitGroup
		mu    sync.Mutex
		first error
		sem   = make(chan struct{}, 4)
	)
	capture := func(o output) {
		err := g.captureOne(ctx, to.JobID, up, o.ref)
		mu.Lock()
		defer mu.Unlock()
		if err != nil {
			if first == nil {
				first = err
			}
			return
		}
		o.item["subfolder"] = capturedRef(to.JobID, o.ref).Subfolder
	}
	if len(items) == 1 {
		capture(items[0]) // (most jobs: one image, and no goroutine for it)
	} else {
		// Up to 4 at a time.
		for _, o := range items {
			wg.Add(1)
			sem <- struct{}{}
			go func() {
				defer func() { <-sem; wg.Done() }()
				capture(o)
			}()
		}
		wg.Wait()
	}
	ev.JSON = msg.WithFields(f).Encode()
	return first
}

// storable reports whether an output ref an upstream announced names a
// file the gateway may keep: one that passes comfy.FileRef.Check even once
// moved under its job's folder (refs are checked where they enter).
func storable(ref comfy.FileRef) bool {
	return ref.Check() == nil && capturedRef(longestJobID, ref).Check() == nil
}

// longestJobID has the length of every job id (a UUID).
const longestJobID = "00000000-0000-0000-0000-000000000000"

// StoreOutput implements dispatch.OutputStore: a file that arrived with a
// pinned job's stream goes straight into the blob store.
func (g *Gateway) StoreOutput(ctx context.Context, j *dispatch.Job, ref comfy.FileRef, contentType string, body io.Reader) error {
	if !storable(ref) {
		_, err := io.Copy(io.Discard, body)
		return err
	}
	key, _, _ := blobKey(capturedRef(j.ID, ref))
	if contentType == "" {
		contentType = contentTypeOf(ref.Filename)
	}
	return g.putOutput(ctx, j.ID, key, contentType, body)
}

// putOutput stores one of a job's outputs in the blob store and counts its
// bytes for the job's usage.
func (g *Gateway) putOutput(ctx context.Context, jobID, key, contentType string, body io.Reader) error {
	if !g.outBytes.takeFile(jobID, 1) {
		return errOutputsTooLarge{}
	}
	counted := &countingReader{r: &boundedOutput{r: body, t: &g.outBytes, jobID: jobID}}
	if err := g.blobs.Put(ctx, key, counted, BlobInfo{ContentType: contentType}); err != nil {
		// Not stored: a retry may take them again.
		g.outBytes.take(jobID, -counted.n)
		g.outBytes.takeFile(jobID, -1)
		return err
	}
	g.outBytes.add(jobID, counted.n)
	return nil
}

func (g *Gateway) captureOne(ctx context.Context, jobID string, up *dispatch.Upstream, ref comfy.FileRef) error {
	key, _, _ := blobKey(capturedRef(jobID, ref))
	var err error
	for attempt := 0; attempt < 3; attempt++ {
		if attempt > 0 {
			time.Sleep(time.Duration(attempt) * 200 * time.Millisecond)
		}
		err = func() error {
			cctx, cancel := context.WithTimeout(ctx, 5*time.Minute)
			defer cancel()
			resp, err := up.Open(cctx, ref)
			if err != nil {
				return err
			}
			defer resp.Body.Close()
			ct := resp.Header.Get("Content-Type")
			if ct == "" {
				ct = contentTypeOf(ref.Filename)
			}
			return g.putOutput(cctx, jobID, key, ct, resp.Body)
		}()
		if err == nil {
			return nil
		}
		var he *dispatch.HTTPError
		var big errOutputsTooLarge
		if errors.As(err, &he) && he.Status == 404 || errors.As(err, &big) {
			break
		}
	}
	return err
}

func contentTypeOf(name string) string {
	ct := mime.TypeByExtension(path.Ext(name))
	if ct == "" {
		ct = "application/octet-stream"
	}
	return ct
}

// Deliver implements dispatch.Events: it shows a job event to the browser
// session that submitted it. A JSON event goes out as the bytes it came
// with (see dispatch's package comment for the path before).
func (g *Gateway) Deliver(to dispatch.Recipient, ev dispatch.Event) {
	if f, ok := eventFrame(ev, nil); ok {
		g.hub.publish(to.User, to.ClientID, f, startNow)
	}
}

// DeliverAll implements dispatch.BatchEvents: the events are queued on the
// session's sockets together, and each socket writes what its connection
// takes at once; the lent ones are written from where they lie, and
// copied when they must wait for a browser that is behind.
func (g *Gateway) DeliverAll(to dispatch.Recipient, evs []dispatch.Event, lender *dispatch.Lender) {
	g.hub.publishAll(to.User, to.ClientID, evs, lender)
}

// Inline implements dispatch.InlineEvents: without a bus, handing a
// progress event or a preview over only queues it on this gateway's
// sockets (and writes what the connection takes at once, without
// waiting), so the upstream's reader may do it itself. With a bus every
// frame is published on it first, a network round trip.
func (g *Gateway) Inline() bool { return g.hub.bus == nil }

var _ dispatch.InlineEvents = (*Gateway)(nil)

// eventFrame is the frame of a job's event; a JSON event's kind is its
// type as the GPU stream's reader read it. A lent event is lender's (with
// none, it is copied).
func eventFrame(ev dispatch.Event, lender *dispatch.Lender) (frame, bool) {
	var f frame
	switch {
	case ev.JSON != nil:
		f.text, f.typed = ev.JSON, true
		if ev.Type == comfy.MsgProgress || ev.Type == comfy.MsgProgressState {
			f.kind = kindProgress
		}
	case ev.Preview != nil:
		f.preview = ev.Preview
	case ev.Text != nil:
		f.binary = ev.Text.Encode(false)
		return f, true
	default:
		return f, false
	}
	switch {
	case !ev.Lent:
	case lender == nil:
		f = f.clone()
	default:
		f.lender = lender
	}
	return f, true
}

// QueueChanged implements dispatch.Events: every socket of the user gets a
// status with the new queue count (which also makes the frontend refresh
// its job list).
func (g *Gateway) QueueChanged(user string) {
	if bus := g.hub.bus; bus != nil {
		ctx, cancel := context.WithTimeout(context.Background(), busTimeout)
		err := bus.Publish(ctx, &BusMessage{Kind: busKindQueue, User: user, Origin: g.hub.id})
		cancel()
		if err != nil {
			g.logger.Debug("queue change not shared", zap.Error(err))
		}
	}
	g.localQueueChanged(user)
}

// localQueueChanged sends the new queue count to this gateway's sockets of
// the user.
func (g *Gateway) localQueueChanged(user string) {
	g.ops.changed()
	ctx, cancel := context.WithTimeout(context.Background(), busTimeout)
	remote := g.remoteCount(ctx, user)
	cancel()
	for _, s := range g.hub.userSockets(user) {
		s.send(frame{text: comfy.StatusMessage(s.getHomeRemaining()+remote, "").Encode()})
	}
}
