package relay

import (
	"context"
	"sync"
	"time"

	"github.com/google/uuid"
	"github.com/gorilla/websocket"

	"github.com/comfyume/comfyume/comfy"
)

// frame is one thing to send to a browser socket.
type frame struct {
	text    []byte         // a JSON text frame
	binary  []byte         // a binary frame sent as is
	preview *comfy.Preview // a preview, encoded per socket (type 1 or 4)
}

// Limits of what a session keeps for a browser that is reconnecting.
const (
	backlogFrames = 1000
	backlogBytes  = 8 << 20
	sessionIdle   = 10 * time.Minute
)

// sessionKey scopes a browser session id to its user: the same clientId
// opened by another user is another session and sees nothing of this one.
type sessionKey struct{ user, sid string }

// session is one browser tab (a ComfyUI sid) of one user. It outlives its
// sockets so that a reconnecting tab keeps its jobs' events.
type session struct {
	key      sessionKey
	sockets  map[*socket]struct{}
	backlog  []frame
	bytes    int
	lastSeen time.Time
}

// Hub tracks browser sessions and their sockets.
type Hub struct {
	mu       sync.Mutex
	sessions map[sessionKey]*session
	byUser   map[string]map[*session]struct{}
	open     map[*socket]struct{}
	bus      Bus
	id       string // this gateway, as the Origin of its bus messages
	stop     chan struct{}
	once     sync.Once
}

// NewHub starts a hub; Close stops its housekeeping.
func NewHub() *Hub {
	h := &Hub{
		id:       uuid.NewString(),
		sessions: map[sessionKey]*session{},
		byUser:   map[string]map[*session]struct{}{},
		stop:     make(chan struct{}),
	}
	go h.housekeeping()
	return h
}

// Close stops the hub's timers. Sockets are closed by their handlers.
func (h *Hub) Close() { h.once.Do(func() { close(h.stop) }) }

// attach registers a socket and returns the frames it missed while its
// session had no socket.
func (h *Hub) attach(user, sid string, s *socket) []frame {
	h.mu.Lock()
	defer h.mu.Unlock()
	k := sessionKey{user, sid}
	se := h.sessions[k]
	if se == nil {
		se = &session{key: k, sockets: map[*socket]struct{}{}}
		h.sessions[k] = se
		if h.byUser[user] == nil {
			h.byUser[user] = map[*session]struct{}{}
		}
		h.byUser[user][se] = struct{}{}
	}
	se.sockets[s] = struct{}{}
	se.lastSeen = time.Now()
	missed := se.backlog
	se.backlog, se.bytes = nil, 0
	return missed
}

func (h *Hub) detach(user, sid string, s *socket) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if se := h.sessions[sessionKey{user, sid}]; se != nil {
		delete(se.sockets, s)
		se.lastSeen = time.Now()
	}
}

// publish sends a frame to every socket of one session, on whichever
// gateway they are: through the bus when there is one (which also keeps
// lifecycle frames for replay), else locally.
func (h *Hub) publish(user, sid string, f frame) {
	if h.bus != nil {
		m := frameMessage(user, sid, f)
		m.Origin = h.id
		ctx, cancel := context.WithTimeout(context.Background(), busTimeout)
		err := h.bus.Publish(ctx, m)
		cancel()
		if err == nil {
			// Other gateways get it from the bus; this one's sockets now,
			// without a round trip through the subscription.
			h.deliverFrame(user, sid, f, m.Pos)
			return
		}
		// The bus is down: sockets on this gateway still get the frame.
	}
	h.publishLocal(user, sid, f)
}

// catchUp writes to every socket of this gateway the kept frames it has not
// had: after the bus subscription was re-established, frames published
// meanwhile reached nobody here.
func (h *Hub) catchUp() {
	if h.bus == nil {
		return
	}
	h.mu.Lock()
	type target struct {
		key sessionKey
		s   *socket
	}
	var all []target
	for k, se := range h.sessions {
		for s := range se.sockets {
			all = append(all, target{k, s})
		}
	}
	h.mu.Unlock()
	for _, t := range all {
		t.s.mu.Lock()
		since := t.s.lastPos
		t.s.mu.Unlock()
		ctx, cancel := context.WithTimeout(context.Background(), busTimeout)
		missed, err := h.bus.Missed(ctx, t.key.user, t.key.sid, since)
		cancel()
		if err != nil {
			continue
		}
		for _, m := range missed {
			if f, ok := busFrame(m); ok {
				t.s.deliver(f, m.Pos)
			}
		}
	}
}

// busTimeout bounds one bus operation.
const busTimeout = 5 * time.Second

// deliverBus hands a frame that came over the bus to this gateway's sockets
// of the session.
func (h *Hub) deliverBus(m BusMessage) {
	if f, ok := busFrame(m); ok {
		h.deliverFrame(m.User, m.SID, f, m.Pos)
	}
}

// deliverFrame writes a frame with its replay position to this gateway's
// sockets of a session.
func (h *Hub) deliverFrame(user, sid string, f frame, pos string) {
	h.mu.Lock()
	se := h.sessions[sessionKey{user, sid}]
	var targets []*socket
	if se != nil {
		for s := range se.sockets {
			targets = append(targets, s)
		}
	}
	h.mu.Unlock()
	for _, s := range targets {
		s.deliver(f, pos)
	}
}

// busFrame turns a bus message back into a frame.
func busFrame(m BusMessage) (frame, bool) {
	var f frame
	switch {
	case m.Text != "":
		f.text = []byte(m.Text)
	case m.Binary != nil:
		f.binary = m.Binary
	case m.Preview != nil:
		p, err := comfy.ParsePreview(m.Preview)
		if err != nil {
			return f, false
		}
		f.preview = &p
	default:
		return f, false
	}
	return f, true
}

// publishLocal sends a frame to this gateway's sockets of the session; while
// the session has none, text frames are kept (bounded) for its reconnect.
func (h *Hub) publishLocal(user, sid string, f frame) {
	h.mu.Lock()
	se := h.sessions[sessionKey{user, sid}]
	if se == nil {
		se = &session{key: sessionKey{user, sid}, sockets: map[*socket]struct{}{}, lastSeen: time.Now()}
		h.sessions[se.key] = se
		if h.byUser[user] == nil {
			h.byUser[user] = map[*session]struct{}{}
		}
		h.byUser[user][se] = struct{}{}
	}
	if len(se.sockets) == 0 {
		if f.preview == nil && len(se.backlog) < backlogFrames && se.bytes+len(f.text)+len(f.binary) <= backlogBytes {
			se.backlog = append(se.backlog, f)
			se.bytes += len(f.text) + len(f.binary)
		}
		h.mu.Unlock()
		return
	}
	targets := make([]*socket, 0, len(se.sockets))
	for s := range se.sockets {
		targets = append(targets, s)
	}
	h.mu.Unlock()
	for _, s := range targets {
		s.send(f)
	}
}

// userSockets returns every open socket of a user.
func (h *Hub) userSockets(user string) []*socket {
	h.mu.Lock()
	defer h.mu.Unlock()
	var out []*socket
	for se := range h.byUser[user] {
		for s := range se.sockets {
			out = append(out, s)
		}
	}
	return out
}

// Sockets counts open browser sockets.
func (h *Hub) Sockets() int {
	h.mu.Lock()
	defer h.mu.Unlock()
	n := 0
	for _, se := range h.sessions {
		n += len(se.sockets)
	}
	return n
}

// housekeeping pings idle sockets (so idle timeouts of proxies and load
// balancers between the browser and the gateway never cut them) and forgets
// sessions that have had no socket for a while.
func (h *Hub) housekeeping() {
	t := time.NewTicker(pingEvery)
	defer t.Stop()
	for {
		select {
		case <-h.stop:
			return
		case now := <-t.C:
			var all []*socket
			h.mu.Lock()
			for k, se := range h.sessions {
				if len(se.sockets) == 0 && now.Sub(se.lastSeen) > sessionIdle {
					delete(h.sessions, k)
					if us := h.byUser[k.user]; us != nil {
						delete(us, se)
						if len(us) == 0 {
							delete(h.byUser, k.user)
						}
					}
					continue
				}
				for s := range se.sockets {
					all = append(all, s)
				}
			}
			h.mu.Unlock()
			for _, s := range all {
				s.ping()
			}
		}
	}
}

var pingEvery = 30 * time.Second

// writeWait bounds one write to a browser; a browser that cannot take a
// frame in that time is cut off (it reconnects and resynchronises).
const writeWait = 10 * time.Second

// socket is one browser WebSocket connection.
type socket struct {
	conn *websocket.Conn
	mu   sync.Mutex // serialises writes
	dead bool

	// With a bus: the replay position of the last frame written, and while
	// missed frames are being replayed, live frames held back until then.
	lastPos     string
	recent      map[string]struct{} // positions delivered lately (dedupe)
	recentOrder []string
	holding     bool
	held        []heldFrame

	previewMeta   bool // browser declared supports_preview_metadata
	homeRemaining int  // queue_remaining of the home server
}

type heldFrame struct {
	f   frame
	pos string
}

// deliver writes a frame that has a replay position (or "" for none).
// Frames of one session come from several gateways (each delivers its own
// at once, the others' through the bus), so positions arrive out of order:
// duplicates are recognised by position, not by order.
func (s *socket) deliver(f frame, pos string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.holding {
		s.held = append(s.held, heldFrame{f, pos})
		return
	}
	if pos != "" && !s.mark(pos) {
		return // had it already (a catch-up after a live delivery)
	}
	s.writeLocked(f)
}

// recentPositions bounds the positions a socket remembers for dedupe.
const recentPositions = 512

// mark records a delivered position; false means it was delivered before.
// lastPos keeps the highest position delivered.
func (s *socket) mark(pos string) bool {
	if _, dup := s.recent[pos]; dup {
		return false
	}
	if s.recent == nil {
		s.recent = map[string]struct{}{}
	}
	s.recent[pos] = struct{}{}
	s.recentOrder = append(s.recentOrder, pos)
	if len(s.recentOrder) > recentPositions {
		delete(s.recent, s.recentOrder[0])
		s.recentOrder = s.recentOrder[1:]
	}
	if posAfter(pos, s.lastPos) {
		s.lastPos = pos
	}
	return true
}

// replay writes the frames a reconnecting browser missed, then the live
// frames that arrived meanwhile (skipping those it replayed).
func (s *socket) replay(missed []BusMessage, toFrame func(BusMessage) (frame, bool)) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, m := range missed {
		if m.Pos != "" && !s.mark(m.Pos) {
			continue
		}
		if f, ok := toFrame(m); ok {
			s.writeLocked(f)
		}
	}
	for _, h := range s.held {
		if h.pos != "" && !s.mark(h.pos) {
			continue
		}
		s.writeLocked(h.f)
	}
	s.held = nil
	s.holding = false
}

func (s *socket) send(f frame) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.writeLocked(f)
}

func (s *socket) writeLocked(f frame) {
	if s.dead {
		return
	}
	var err error
	_ = s.conn.SetWriteDeadline(time.Now().Add(writeWait))
	switch {
	case f.text != nil:
		err = s.conn.WriteMessage(websocket.TextMessage, f.text)
	case f.binary != nil:
		err = s.conn.WriteMessage(websocket.BinaryMessage, f.binary)
	case f.preview != nil:
		var b []byte
		if s.previewMeta && f.preview.Metadata != nil {
			b = f.preview.EncodeType4(*f.preview.Metadata)
		} else {
			b = f.preview.EncodeType1()
		}
		err = s.conn.WriteMessage(websocket.BinaryMessage, b)
	}
	if err != nil {
		s.dead = true
		s.conn.Close()
	}
}

func (s *socket) ping() {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.dead {
		return
	}
	if err := s.conn.WriteControl(websocket.PingMessage, nil, time.Now().Add(writeWait)); err != nil {
		s.dead = true
		s.conn.Close()
	}
}

// setFlags records the browser's declared features and returns the queue
// count to show, under the write lock so frames see a consistent view.
func (s *socket) setPreviewMeta(v bool) {
	s.mu.Lock()
	s.previewMeta = v
	s.mu.Unlock()
}

func (s *socket) setHomeRemaining(n int) {
	s.mu.Lock()
	s.homeRemaining = n
	s.mu.Unlock()
}

func (s *socket) getHomeRemaining() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.homeRemaining
}

// track remembers open sockets so Close can end them.
func (h *Hub) track(s *socket, open bool) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.open == nil {
		h.open = map[*socket]struct{}{}
	}
	if open {
		h.open[s] = struct{}{}
	} else {
		delete(h.open, s)
	}
}

// CloseSockets ends every open browser socket (on shutdown; browsers
// reconnect to the new configuration).
func (h *Hub) CloseSockets() {
	h.mu.Lock()
	all := make([]*socket, 0, len(h.open))
	for s := range h.open {
		all = append(all, s)
	}
	h.mu.Unlock()
	for _, s := range all {
		s.mu.Lock()
		s.dead = true
		s.conn.Close()
		s.mu.Unlock()
	}
}
