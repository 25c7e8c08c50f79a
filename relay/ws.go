package relay

import (
	"context"
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
	// Small: browsers send one small frame; larger ones are read in parts.
	ReadBufferSize:  1024,
	WriteBufferPool: writeBuffers,
	CheckOrigin:     allowedOrigin, // the rule of origin.go
}

// homeDialer opens the per-browser socket to home with small buffers (one
// per open tab adds up; write buffers are pooled).
var homeDialer = &websocket.Dialer{HandshakeTimeout: 10 * time.Second, ReadBufferSize: 4 << 10, WriteBufferPool: writeBuffers}

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
	if sid == "" {
		sid = strings.ReplaceAll(uuid.NewString(), "-", "")
	}
	conn, err := upgrader.Upgrade(hijackable(w), r, nil)
	if err != nil {
		g.logger.Debug("websocket upgrade failed", zap.Error(err))
		return
	}
	// The connection is ours now: no server read/write deadlines apply.
	_ = conn.UnderlyingConn().SetDeadline(time.Time{})
	conn.SetReadLimit(browserReadLimit)
	// The socket lives on in a goroutine of its own, so that Caddy's
	// handler goroutine and its request state are freed now.
	go g.runSocket(conn, site, sid)
}

// runSocket serves one browser socket until it closes.
func (g *Gateway) runSocket(conn *websocket.Conn, site Site, sid string) {
	s := &socket{conn: conn}
	user := site.User
	bg := context.Background()

	s.send(frame{text: comfy.StatusMessage(g.remoteCount(bg, user), sid).Encode()})
	if bus := g.hub.bus; bus != nil {
		// Frames this tab missed, from whichever gateway had them; live
		// frames wait until those are written.
		s.holding = true
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
			s.send(f)
		}
	}
	g.hub.track(s, true)

	ctx, cancel := context.WithCancel(context.Background())
	hl := &homeLink{}
	if site.Home != nil {
		go g.relayHome(ctx, s, hl, site, sid)
	}
	defer func() {
		cancel()
		hl.close()
		g.hub.detach(user, sid, s)
		g.hub.track(s, false)
		s.mu.Lock()
		s.dead = true
		pos := s.lastPos
		s.mu.Unlock()
		conn.Close()
		if bus := g.hub.bus; bus != nil && pos != "" {
			ctx, cancel := context.WithTimeout(context.Background(), busTimeout)
			if err := bus.Seen(ctx, user, sid, pos); err != nil {
				g.logger.Warn("recording replay position", zap.String("sid", sid), zap.Error(err))
			}
			cancel()
		}
	}()

	first := true
	for {
		typ, b, err := conn.ReadMessage()
		if err != nil {
			return
		}
		if typ != websocket.TextMessage {
			g.logger.Debug("closing browser socket: unexpected binary frame", zap.String("sid", sid))
			return
		}
		m, err := comfy.ParseMessage(b)
		if err != nil {
			g.logger.Debug("closing browser socket: malformed frame", zap.String("sid", sid), zap.Error(err))
			_ = conn.WriteControl(websocket.CloseMessage, websocket.FormatCloseMessage(websocket.CloseUnsupportedData, "malformed frame"), time.Now().Add(time.Second))
			return
		}
		if first && m.Type == comfy.MsgFeatureFlags {
			flags, _ := m.Fields()
			s.setPreviewMeta(flags["supports_preview_metadata"] == true)
			// We relay TEXT frames in the legacy layout only.
			delete(flags, "supports_progress_text_metadata")
			fwd := comfy.NewMessage(comfy.MsgFeatureFlags, flags).Encode()
			hl.setFlags(fwd)
			s.send(frame{text: comfy.NewMessage(comfy.MsgFeatureFlags, g.serverFeatures(site)).Encode()})
		} else {
			hl.write(b)
		}
		first = false
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
// browser's is, and relays what home sends. Home's own status frames are
// rewritten to count the user's remote jobs too.
func (g *Gateway) relayHome(ctx context.Context, s *socket, hl *homeLink, site Site, sid string) {
	backoff := 500 * time.Millisecond
	for ctx.Err() == nil {
		dctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		conn, err := site.Home.DialWebSocketWith(dctx, homeDialer, "/ws?clientId="+url.QueryEscape(sid))
		cancel()
		if err != nil {
			g.logger.Debug("home websocket unavailable", zap.String("home", site.Home.String()), zap.Error(err))
			select {
			case <-ctx.Done():
				return
			case <-time.After(backoff):
			}
			if backoff < 10*time.Second {
				backoff *= 2
			}
			continue
		}
		backoff = 500 * time.Millisecond
		conn.SetReadLimit(streamLimit)
		if !hl.setConn(conn) {
			conn.Close()
			return
		}
		for {
			typ, b, err := conn.ReadMessage()
			if err != nil {
				break
			}
			if typ == websocket.BinaryMessage {
				s.send(frame{binary: b})
				continue
			}
			// Most frames pass unchanged: decode only those we rewrite.
			if t, ok := comfy.PeekType(b); ok && t != comfy.MsgStatus && t != comfy.MsgFeatureFlags {
				s.send(frame{text: b})
				continue
			}
			m, err := comfy.ParseMessage(b)
			if err != nil {
				g.logger.Debug("skipping malformed home frame", zap.Error(err))
				continue
			}
			switch m.Type {
			case comfy.MsgFeatureFlags:
				// Answered by the gateway already.
			case comfy.MsgStatus:
				st, err := comfy.ParseStatus(m)
				if err != nil {
					continue
				}
				s.setHomeRemaining(st.Status.ExecInfo.QueueRemaining)
				remote := g.remoteCount(ctx, site.User)
				s.send(frame{text: comfy.StatusMessage(st.Status.ExecInfo.QueueRemaining+remote, "").Encode()})
			default:
				s.send(frame{text: b})
			}
		}
		hl.setConn(nil)
		conn.Close()
	}
}

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
