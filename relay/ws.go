package relay

import (
	"context"
	"fmt"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"time"

	"github.com/google/uuid"
	"github.com/gorilla/websocket"
	"go.uber.org/zap"

	"github.com/comfyume/comfyume/comfy"
)

// browserReadLimit bounds one frame from a browser. The ComfyUI frontend
// only ever sends a small feature_flags frame; anything bigger is abuse.
const browserReadLimit = 1 << 20

var writeBuffers = &sync.Pool{}

var upgrader = websocket.Upgrader{
	HandshakeTimeout: 10 * time.Second,
	// Browsers send one small frame; what comes is read through the
	// connection's spareReader, which holds a buffer only while bytes wait.
	ReadBufferSize:  frameHeadBuffer,
	WriteBufferPool: writeBuffers,
	CheckOrigin:     allowedOrigin, // the rule of origin.go
}

// homeDialer opens the per-browser socket to home with no buffers of its
// own while idle (one per open tab adds up): write buffers are pooled, and
// reads go through a spareReader.
var homeDialer = &websocket.Dialer{
	HandshakeTimeout: 10 * time.Second,
	NetDialContext:   dialSpare,
	ReadBufferSize:   frameHeadBuffer,
	WriteBufferPool:  writeBuffers,
}

// hijackable unwraps Caddy's response writer wrappers down to one that can
// hijack the connection (gorilla's Upgrade asserts http.Hijacker directly).
func hijackable(w http.ResponseWriter) http.ResponseWriter {
	for {
		if _, ok := w.(http.Hijacker); ok {
			return w
		}
		u, ok := w.(interface{ Unwrap() http.ResponseWriter })
		if !ok {
			return w
		}
		w = u.Unwrap()
	}
}

// serveWS owns the browser's WebSocket: it greets with status and sid,
// answers feature_flags, relays the user's home stream both ways and
// receives the events of the user's remote jobs through the hub.
func (g *Gateway) serveWS(w http.ResponseWriter, r *http.Request, site Site) {
	if !websocket.IsWebSocketUpgrade(r) {
		http.Error(w, "expected a WebSocket upgrade", http.StatusBadRequest)
		return
	}
	sid := r.URL.Query().Get("clientId")
	if len(sid) > comfy.MaxClientID {
		writeJSON(w, http.StatusBadRequest, comfy.NewPromptError("invalid_client_id", "clientId is too long",
			fmt.Sprintf("clientId has %d bytes; the limit is %d", len(sid), comfy.MaxClientID)))
		return
	}
	if sid == "" {
		sid = strings.ReplaceAll(uuid.NewString(), "-", "")
	}
	user := site.User
	admitted, limit, first := g.hub.admit(user)
	s := g.hub.newSocket()
	hj := &hijacker{ResponseWriter: hijackable(w), s: s}
	conn, err := upgrader.Upgrade(hj, r, nil)
	if err != nil {
		if admitted {
			g.hub.release(user)
		}
		g.logger.Debug("websocket upgrade failed", zap.Error(err))
		return
	}
	hj.conn.upgraded = true
	s.conn = conn
	// The connection is ours now: no server read/write deadlines apply.
	_ = s.out.SetDeadline(time.Time{})
	conn.SetReadLimit(browserReadLimit)
	if !admitted {
		if first {
			g.logger.Warn("refusing browser sockets: too many open for this user", zap.String("user", user), zap.Int("limit", limit))
		}
		go refuse(s, websocket.ClosePolicyViolation, fmt.Sprintf("too many open sockets for this user (limit %d)", limit))
		return
	}
	// The socket lives on in a goroutine of its own, so that Caddy's
	// handler goroutine and its request state are freed now.
	go g.runSocket(s, site, sid)
}

// refuse closes a socket the gateway will not serve, with a reason the
// browser sees, after giving it a moment to take the close frame.
func refuse(s *socket, code int, reason string) {
	s.mu.Lock()
	s.closing = true
	s.mu.Unlock()
	_ = s.out.SetWriteDeadline(time.Now().Add(closeWait))
	_, _ = s.out.Write(closeFrame(code, reason))
	_ = s.conn.SetReadDeadline(time.Now().Add(closeWait))
	for {
		if _, _, err := s.conn.ReadMessage(); err != nil {
			break
		}
	}
	s.kill()
}

// runSocket greets a browser socket, attaches it to its user's events and
// starts its reader (and its home link).
func (g *Gateway) runSocket(s *socket, site Site, sid string) {
	user := site.User
	bg := context.Background()
	s.onClose = func(reason string) {
		g.logger.Info("closing browser socket", zap.String("user", user), zap.String("sid", sid), zap.String("reason", reason))
	}

	s.write(frame{text: comfy.StatusMessage(g.remoteCount(bg, user), sid).Encode()})
	if bus := g.hub.bus; bus != nil {
		// Frames this tab missed, from whichever gateway had them; live
		// frames wait until those are queued.
		s.mu.Lock()
		s.holding = true
		s.mu.Unlock()
		g.hub.attach(user, sid, s)
		ctx, cancel := context.WithTimeout(bg, busTimeout)
		since, err := bus.LastSeen(ctx, user, sid)
		var missed []BusMessage
		if err == nil {
			missed, err = bus.Missed(ctx, user, sid, since)
		}
		cancel()
		if err != nil {
			g.logger.Warn("reading missed events", zap.String("sid", sid), zap.Error(err))
		}
		s.replay(missed, busFrame)
	} else {
		for _, f := range g.hub.attach(user, sid, s) {
			s.write(f)
		}
	}
	g.hub.track(s, true)

	ctx, cancel := context.WithCancel(context.Background())
	hl := &homeLink{}
	if site.Home != nil {
		go g.relayHome(ctx, s, hl, site, sid, minRedial, false)
	}
	// The socket's reader goes on on a goroutine of its own: this one's
	// stack has grown with the greeting (JSON, the store), and a parked
	// goroutine's stack is most of what an idle socket costs.
	go g.readBrowser(s, hl, cancel, site, sid)
}

// readBrowser reads the browser's frames until the socket closes, then
// lets go of it. Its stack stays small: all it does itself is wait for a
// frame; what it makes of one is done on a goroutine of its own (see
// onFresh).
func (g *Gateway) readBrowser(s *socket, hl *homeLink, cancel context.CancelFunc, site Site, sid string) {
	defer g.endSocket(s, hl, cancel, site.User, sid)
	first := true
	for {
		typ, b, err := s.conn.ReadMessage()
		if err != nil {
			return
		}
		end, isFirst := false, first
		onFresh(func() { end = g.onBrowserFrame(s, hl, site, sid, typ, b, isFirst) })
		first = false
		if end {
			return
		}
	}
}

// onBrowserFrame handles one frame from the browser; end: the socket
// closes.
func (g *Gateway) onBrowserFrame(s *socket, hl *homeLink, site Site, sid string, typ int, b []byte, first bool) (end bool) {
	in := readBrowserFrame(typ, b, first)
	switch {
	case in.closeCode != 0:
		g.logger.Debug("closing browser socket", zap.String("sid", sid), zap.String("reason", in.reason))
		s.mu.Lock()
		s.closeLocked(in.closeCode, in.reason)
		s.mu.Unlock()
		return true
	case in.flags:
		s.setPreviewMeta(in.previewMeta)
		s.setCurrentUI(in.currentUI)
		hl.setFlags(in.forward)
		s.write(frame{text: comfy.NewMessage(comfy.MsgFeatureFlags, g.serverFeatures(site)).Encode()})
	default:
		hl.write(in.forward)
	}
	return false
}

// endSocket lets go of a browser socket and its home link.
func (g *Gateway) endSocket(s *socket, hl *homeLink, cancel context.CancelFunc, user, sid string) {
	cancel()
	hl.close()
	g.hub.detach(user, sid, s)
	g.hub.track(s, false)
	g.hub.release(user)
	s.mu.Lock()
	pos := s.lastPos
	s.mu.Unlock()
	s.finish()
	if bus := g.hub.bus; bus != nil && pos != "" {
		ctx, cancel := context.WithTimeout(context.Background(), busTimeout)
		if err := bus.Seen(ctx, user, sid, pos); err != nil {
			g.logger.Warn("recording replay position", zap.String("sid", sid), zap.Error(err))
		}
		cancel()
	}
}

// onFresh runs f on a new goroutine and waits for it. A socket's reader
// calls it for what needs a deep stack (JSON, the store, a request to
// home), so that its own goroutine's stack stays at the starting size:
// a goroutine's stack grows for its deepest call and, while it waits
// in a read, seldom shrinks back. (Not for the frames that pass as they
// are: those the reader writes itself.)
func onFresh(f func()) {
	done := make(chan struct{})
	go func() {
		defer close(done)
		f()
	}()
	<-done
}

// browserFrame is what the gateway makes of one frame from the browser.
type browserFrame struct {
	// forward goes to home (the frame as is, or rewritten flags).
	forward []byte
	// flags: the browser's first frame declared its features (answered by
	// the gateway); previewMeta: it takes type-4 previews; currentUI: it is
	// the current frontend, which takes a waiting job's `notification`.
	flags, previewMeta, currentUI bool
	// closeCode, when not 0, closes the socket with reason.
	closeCode int
	reason    string
}

// readBrowserFrame reads one frame from the browser. The ComfyUI frontend
// sends feature_flags first; anything else is passed on to home.
func readBrowserFrame(typ int, b []byte, first bool) browserFrame {
	if typ != websocket.TextMessage {
		return browserFrame{closeCode: websocket.CloseUnsupportedData, reason: "unexpected binary frame"}
	}
	m, err := comfy.ParseMessage(b)
	if err != nil {
		return browserFrame{closeCode: websocket.CloseUnsupportedData, reason: "malformed frame"}
	}
	if !first || m.Type != comfy.MsgFeatureFlags {
		return browserFrame{forward: b}
	}
	flags, _ := m.Fields()
	if flags == nil {
		flags = map[string]any{}
	}
	// The current frontend (ComfyUI_frontend, src/config/
	// clientFeatureFlags.json) declares supports_preview_metadata,
	// supports_manager_v4_ui and supports_progress_text_metadata; the last
	// came with progress text carrying a prompt_id (src/schemas/
	// apiSchema.ts), after the notification message had gained its job
	// "id" there — which src/stores/executionStore.ts handleNotification
	// reads: a notification whose value contains "Waiting for a machine"
	// marks that job "initializing" in the job panel until it starts.
	// So a browser that declares supports_progress_text_metadata gets
	// waiting jobs' notifications; others do not (the legacy frontend logs
	// every message type it does not know). The current frontend draws no
	// text for a notification, so it gets the progress text under the
	// job's node too: the only place the reason and place in line show.
	currentUI := flags["supports_progress_text_metadata"] == true
	// We relay TEXT frames in the legacy layout only.
	delete(flags, "supports_progress_text_metadata")
	return browserFrame{
		forward:     comfy.NewMessage(comfy.MsgFeatureFlags, flags).Encode(),
		flags:       true,
		previewMeta: flags["supports_preview_metadata"] == true,
		currentUI:   currentUI,
	}
}

// homeLink is the upstream half of a browser socket: the socket to the
// user's home ComfyUI, with the same sid.
type homeLink struct {
	mu     sync.Mutex
	conn   *websocket.Conn
	flags  []byte
	closed bool
}

func (h *homeLink) setConn(c *websocket.Conn) bool {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.closed {
		return false
	}
	h.conn = c
	if c != nil && h.flags != nil {
		_ = c.SetWriteDeadline(time.Now().Add(writeWait))
		_ = c.WriteMessage(websocket.TextMessage, h.flags)
	}
	return true
}

func (h *homeLink) setFlags(b []byte) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.flags = b
	if h.conn != nil {
		_ = h.conn.SetWriteDeadline(time.Now().Add(writeWait))
		_ = h.conn.WriteMessage(websocket.TextMessage, b)
	}
}

func (h *homeLink) write(b []byte) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.conn != nil {
		_ = h.conn.SetWriteDeadline(time.Now().Add(writeWait))
		_ = h.conn.WriteMessage(websocket.TextMessage, b)
	}
}

func (h *homeLink) close() {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.closed = true
	if h.conn != nil {
		h.conn.Close()
		h.conn = nil
	}
}

// relayHome keeps a socket to the user's home open for as long as the
// browser's is, and relays what home sends. It dials (first waiting
// backoff, with waitFirst), and once linked, hands the link to readHome
// on a goroutine of its own (a new, small stack: a dial's calls are deep)
// and returns; readHome starts relayHome again when the link ends.
func (g *Gateway) relayHome(ctx context.Context, s *socket, hl *homeLink, site Site, sid string, backoff time.Duration, waitFirst bool) {
	wait := func() bool {
		select {
		case <-ctx.Done():
			return false
		case <-time.After(backoff):
		}
		backoff = min(2*backoff, maxRedial)
		return true
	}
	if waitFirst && !wait() {
		return
	}
	for ctx.Err() == nil {
		dctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		conn, err := site.Home.DialWebSocketWith(dctx, homeDialer, "/ws?clientId="+url.QueryEscape(site.HomeSID(sid)))
		cancel()
		if err != nil {
			g.logger.Debug("home websocket unavailable", zap.String("home", site.Home.String()), zap.Error(err))
			if !wait() {
				return
			}
			continue
		}
		conn.SetReadLimit(streamLimit)
		if !hl.setConn(conn) {
			conn.Close()
			return
		}
		go g.readHome(ctx, s, hl, site, sid, conn, backoff)
		return
	}
}

// readHome relays what home sends on one link until it ends, then has
// relayHome re-dial. Home's own status frames are rewritten to count the
// user's remote jobs too (on a goroutine of their own: see onFresh);
// every other frame the reader writes as it is; a shared home's frames of
// other users' jobs are kept back (sharedGate). It never waits for the
// browser (socket.relay): a home shared by many users writes to their
// sockets one after another, so a link that stopped reading would stall
// them all.
func (g *Gateway) readHome(ctx context.Context, s *socket, hl *homeLink, site Site, sid string, conn *websocket.Conn, backoff time.Duration) {
	linked := time.Now()
	var gate *sharedGate
	if site.SharedHome {
		gate = &sharedGate{}
	}
	for {
		typ, b, err := conn.ReadMessage()
		if err != nil {
			break
		}
		if gate != nil && !gate.pass(typ == websocket.BinaryMessage, b) {
			continue // someone else's job's
		}
		f := frame{binary: b}
		if typ != websocket.BinaryMessage {
			// Most frames pass unchanged: decode only those we rewrite.
			if t, ok := comfy.PeekType(b); !ok || t == comfy.MsgStatus || t == comfy.MsgFeatureFlags {
				onFresh(func() { g.onHomeFrame(ctx, s, site, b) })
				continue
			}
			f = frame{text: b}
		}
		s.relay(f)
	}
	g.homeLinkEnded(ctx, s, hl, site, sid, conn, backoff, linked)
}

// homeLinkEnded closes a link to home that ended at linked and has
// relayHome dial again.
func (g *Gateway) homeLinkEnded(ctx context.Context, s *socket, hl *homeLink, site Site, sid string, conn *websocket.Conn, backoff time.Duration, linked time.Time) {
	hl.setConn(nil)
	conn.Close()
	if ctx.Err() != nil {
		return
	}
	// A link that died soon after it was made counts as a failed dial
	// (a home that drops the socket, another tab on the same clientId):
	// back off instead of re-dialing in a loop.
	if time.Since(linked) < stableLink {
		go g.relayHome(ctx, s, hl, site, sid, backoff, true)
	} else {
		go g.relayHome(ctx, s, hl, site, sid, minRedial, false)
	}
}

// onHomeFrame relays a frame from home that may need rewriting.
func (g *Gateway) onHomeFrame(ctx context.Context, s *socket, site Site, b []byte) {
	m, err := comfy.ParseMessage(b)
	if err != nil {
		g.logger.Debug("skipping malformed home frame", zap.Error(err))
		return
	}
	switch m.Type {
	case comfy.MsgFeatureFlags:
		// Answered by the gateway already.
	case comfy.MsgStatus:
		st, err := comfy.ParseStatus(m)
		if err != nil {
			return
		}
		s.setHomeRemaining(st.Status.ExecInfo.QueueRemaining)
		remote := g.remoteCount(ctx, site.User)
		s.relay(frame{text: comfy.StatusMessage(st.Status.ExecInfo.QueueRemaining+remote, "").Encode()})
	default:
		s.relay(frame{text: b})
	}
}

// Re-dialing home: the first retry after minRedial, doubling up to
// maxRedial while dials fail or links die within stableLink.
var (
	minRedial  = 500 * time.Millisecond
	maxRedial  = 10 * time.Second
	stableLink = 5 * time.Second
)

// streamLimit bounds one frame from an upstream (previews can be large).
const streamLimit = 64 << 20

// serverFeatures is the feature_flags reply: the home server's flags where
// it has them, with what the gateway itself guarantees.
func (g *Gateway) serverFeatures(site Site) map[string]any {
	flags := map[string]any{}
	if site.Home != nil {
		g.homesMu.Lock()
		cached, ok := g.features[site.Home.String()]
		g.homesMu.Unlock()
		if !ok || time.Since(cached.at) > time.Minute {
			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
			var f map[string]any
			if err := site.Home.GetJSON(ctx, "/features", &f); err == nil && f != nil {
				cached = featureCache{flags: f}
			}
			cancel()
			cached.at = time.Now()
			g.homesMu.Lock()
			g.features[site.Home.String()] = cached
			g.homesMu.Unlock()
		}
		for k, v := range cached.flags {
			flags[k] = v
		}
	}
	delete(flags, "supports_progress_text_metadata")
	flags["supports_preview_metadata"] = true
	limit := site.MaxBody
	if limit <= 0 {
		limit = DefaultMaxBody
	}
	if _, ok := flags["max_upload_size"]; !ok {
		flags["max_upload_size"] = limit
	}
	return flags
}

type featureCache struct {
	flags map[string]any
	at    time.Time
}
