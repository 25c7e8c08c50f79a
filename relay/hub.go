package relay

import (
	"bytes"
	"context"
	"slices"
	"sync"
	"time"

	"github.com/google/uuid"

	"github.com/comfyume/comfyume/comfy"
	"github.com/comfyume/comfyume/dispatch"
)

// frame is one thing to send to a browser socket.
type frame struct {
	text    []byte         // a JSON text frame
	binary  []byte         // a binary frame sent as is
	preview *comfy.Preview // a preview, encoded per socket (type 1 or 4)
	// lender, when set, lent text, binary or preview.Image: they are an
	// upstream reader's memory (dispatch.Event.Lent), valid until the
	// Gateway.DeliverAll that brought them returns. Only that reader
	// writes such a frame from where it lies; whatever keeps it longer or
	// takes it elsewhere copies it first (own).
	lender *dispatch.Lender
	// typed says that kind is the text frame's kind as its publisher read
	// it (a GPU job's event, whose type the stream's reader knew), so that
	// queuing it looks no further at its bytes.
	typed bool
	kind  uint8
}

// own returns f with bytes of its own.
func (f frame) own() frame {
	if f.lender == nil {
		return f
	}
	return f.clone()
}

// clone returns f with copies of its bytes.
func (f frame) clone() frame {
	f.lender = nil
	switch {
	case f.text != nil:
		f.text = bytes.Clone(f.text)
	case f.binary != nil:
		f.binary = bytes.Clone(f.binary)
	case f.preview != nil:
		f.preview = f.preview.Clone()
	}
	return f
}

// Limits of what a session keeps for a browser that is reconnecting.
const (
	backlogFrames = 1000
	backlogBytes  = 8 << 20
	sessionIdle   = 10 * time.Minute
	// userBacklogBytes bounds what all of one user's sessions without a
	// socket keep: a user may send jobs to any number of made-up
	// clientIds, and each would keep up to backlogBytes.
	userBacklogBytes = 32 << 20
)

// sessionKey scopes a browser session id to its user: the same clientId
// opened by another user is another session and sees nothing of this one.
type sessionKey struct{ user, sid string }

// session is one browser tab (a ComfyUI sid) of one user. It outlives its
// sockets so that a reconnecting tab keeps its jobs' events.
type session struct {
	key      sessionKey
	sockets  []*socket // (a slice: a session has a socket or two)
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

	perUser    map[string]int  // open sockets per user
	backlog    map[string]int  // bytes kept by each user's sessions without a socket
	refused    map[string]bool // users refused a socket since they were last under the limit (logged once)
	maxPerUser int
	maxQueue   int
	stop       chan struct{}
	once       sync.Once
}

// NewHub starts a hub; Close stops its housekeeping.
func NewHub() *Hub {
	h := &Hub{
		id:       uuid.NewString(),
		sessions: map[sessionKey]*session{},
		byUser:   map[string]map[*session]struct{}{},
		perUser:  map[string]int{},
		backlog:  map[string]int{},
		refused:  map[string]bool{},
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
		se = &session{key: k}
		h.sessions[k] = se
		if h.byUser[user] == nil {
			h.byUser[user] = map[*session]struct{}{}
		}
		h.byUser[user][se] = struct{}{}
	}
	if !slices.Contains(se.sockets, s) {
		se.sockets = append(se.sockets, s)
	}
	se.lastSeen = time.Now()
	missed := se.backlog
	h.dropBacklogLocked(se)
	return missed
}

// detach unregisters a socket. The frames it holds that an upstream
// reader lent are copied before the reader can miss it in its release
// (the socket may still write them while it closes).
func (h *Hub) detach(user, sid string, s *socket) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if se := h.sessions[sessionKey{user, sid}]; se != nil {
		if i := slices.Index(se.sockets, s); i >= 0 {
			se.sockets = slices.Delete(se.sockets, i, i+1)
		}
		se.lastSeen = time.Now()
	}
	s.mu.Lock() // (the order: h.mu, then a socket's)
	s.ownLocked()
	s.mu.Unlock()
}

// publish sends a frame to every socket of one session, on whichever
// gateway they are: through the bus when there is one (which also keeps
// lifecycle frames for replay), else locally. With startLater, this
// gateway's sockets only queue it until flush.
func (h *Hub) publish(user, sid string, f frame, start writerStart) {
	if h.bus != nil {
		m := frameMessage(user, sid, f)
		m.Origin = h.id
		ctx, cancel := context.WithTimeout(context.Background(), busTimeout)
		err := h.bus.Publish(ctx, m)
		cancel()
		if err == nil {
			// Other gateways get it from the bus; this one's sockets now,
			// without a round trip through the subscription.
			h.deliverFrame(user, sid, f, m.Pos, start)
			return
		}
		// The bus is down: sockets on this gateway still get the frame.
	}
	h.publishLocal(user, sid, f, start)
}

// publishAll is publish of a job's events, in order, to one session. With
// a bus each goes through it. Without, the session is looked up once and
// each of its sockets here takes them all at once (socket.pushAll). The
// lent ones among them are lender's: each socket writes what its
// connection takes at once from where they lie and copies the rest
// before publishAll returns.
func (h *Hub) publishAll(user, sid string, evs []dispatch.Event, lender *dispatch.Lender) {
	var buf [4]*socket
	if h.bus != nil {
		for _, ev := range evs {
			if f, ok := eventFrame(ev, lender); ok {
				h.publish(user, sid, f, startLater)
			}
		}
		for _, s := range h.sessionSockets(user, sid, buf[:0]) {
			s.releaseLent(lender)
		}
		return
	}
	h.mu.Lock()
	se := h.sessionLocked(user, sid)
	if len(se.sockets) == 0 {
		for _, ev := range evs {
			if f, ok := eventFrame(ev, lender); ok {
				h.keepLocked(se, f)
			}
		}
		h.mu.Unlock()
		return
	}
	targets := append(buf[:0], se.sockets...)
	h.mu.Unlock()
	for _, s := range targets {
		s.pushAll(evs, lender)
	}
}

// sessionSockets appends this gateway's sockets of a session to buf.
func (h *Hub) sessionSockets(user, sid string, buf []*socket) []*socket {
	h.mu.Lock()
	defer h.mu.Unlock()
	se := h.sessions[sessionKey{user, sid}]
	if se == nil {
		return buf
	}
	return append(buf, se.sockets...)
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
		for _, s := range se.sockets {
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
				t.s.deliver(f, m.Pos, startGoroutine)
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
		h.deliverFrame(m.User, m.SID, f, m.Pos, startGoroutine)
	}
}

// deliverFrame writes a frame with its replay position to this gateway's
// sockets of a session.
func (h *Hub) deliverFrame(user, sid string, f frame, pos string, start writerStart) {
	var buf [4]*socket
	for _, s := range h.sessionSockets(user, sid, buf[:0]) {
		s.deliver(f, pos, start)
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
func (h *Hub) publishLocal(user, sid string, f frame, start writerStart) {
	h.mu.Lock()
	se := h.sessionLocked(user, sid)
	if len(se.sockets) == 0 {
		h.keepLocked(se, f)
		h.mu.Unlock()
		return
	}
	var buf [4]*socket
	targets := append(buf[:0], se.sockets...)
	h.mu.Unlock()
	for _, s := range targets {
		q := queued{f: f}
		s.push(&q, start)
	}
}

// sessionLocked returns a session, made if it is new.
func (h *Hub) sessionLocked(user, sid string) *session {
	se := h.sessions[sessionKey{user, sid}]
	if se == nil {
		se = &session{key: sessionKey{user, sid}, lastSeen: time.Now()}
		h.sessions[se.key] = se
		if h.byUser[user] == nil {
			h.byUser[user] = map[*session]struct{}{}
		}
		h.byUser[user][se] = struct{}{}
	}
	return se
}

// keepLocked keeps a text frame for a session without a socket, for its
// reconnect, within the backlog's bounds.
func (h *Hub) keepLocked(se *session, f frame) {
	n := len(f.text) + len(f.binary)
	if f.preview == nil && len(se.backlog) < backlogFrames && se.bytes+n <= backlogBytes && h.backlog[se.key.user]+n <= userBacklogBytes {
		se.backlog = append(se.backlog, f.own())
		se.bytes += n
		h.backlog[se.key.user] += n
	}
}

// dropBacklogLocked lets go of what a session kept for its reconnect.
func (h *Hub) dropBacklogLocked(se *session) {
	if se.bytes > 0 {
		if h.backlog[se.key.user] -= se.bytes; h.backlog[se.key.user] <= 0 {
			delete(h.backlog, se.key.user)
		}
	}
	se.backlog, se.bytes = nil, 0
}

// userSockets returns every open socket of a user.
func (h *Hub) userSockets(user string) []*socket {
	h.mu.Lock()
	defer h.mu.Unlock()
	var out []*socket
	for se := range h.byUser[user] {
		for _, s := range se.sockets {
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
					h.dropBacklogLocked(se)
					delete(h.sessions, k)
					if us := h.byUser[k.user]; us != nil {
						delete(us, se)
						if len(us) == 0 {
							delete(h.byUser, k.user)
						}
					}
					continue
				}
				for _, s := range se.sockets {
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

type heldFrame struct {
	f   frame
	pos string
}

// deliver queues a frame that has a replay position (or "" for none).
// Frames of one session come from several gateways (each delivers its own
// at once, the others' through the bus), so positions arrive out of order:
// duplicates are recognised by position, not by order.
func (s *socket) deliver(f frame, pos string, start writerStart) {
	s.mu.Lock()
	if s.holding {
		s.holdLocked(f, pos)
		s.mu.Unlock()
		return
	}
	ok, direct, q := false, false, queued{f: f}
	if pos == "" || s.mark(pos) { // else: had it already (a catch-up after a live delivery)
		ok, direct = s.enqueueLocked(&q, start != startLater)
	}
	s.mu.Unlock()
	switch {
	case !ok:
	case start == startNow:
		s.writeLoop(nil, &q, direct, true, q.f.lender)
	default:
		s.goWrite(q, direct)
	}
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

// replay queues the frames a reconnecting browser missed, then the live
// frames that arrived meanwhile (skipping those it replayed), and writes
// them (it runs on the socket's own goroutine).
func (s *socket) replay(missed []BusMessage, toFrame func(BusMessage) (frame, bool)) {
	s.mu.Lock()
	start, first, direct := false, queued{}, false
	add := func(f frame) {
		q := queued{f: f}
		if st, d := s.enqueueLocked(&q, true); st {
			start, first, direct = true, q, d
		}
	}
	for _, m := range missed {
		if m.Pos != "" && !s.mark(m.Pos) {
			continue
		}
		if f, ok := toFrame(m); ok {
			add(f)
		}
	}
	for _, h := range s.held {
		if h.pos != "" && !s.mark(h.pos) {
			continue
		}
		add(h.f)
	}
	s.held, s.heldBytes = nil, 0
	s.holding = false
	s.mu.Unlock()
	if start {
		s.writeLoop(nil, &first, direct, false, nil)
	}
}

// ping queues a ping (housekeeping keeps idle sockets alive).
func (s *socket) ping() { s.sendRaw(pingFrame) }

// setPreviewMeta records whether the browser declared
// supports_preview_metadata (previews are encoded for it when written).
func (s *socket) setPreviewMeta(v bool) {
	s.mu.Lock()
	s.previewMeta = v
	s.mu.Unlock()
}

// setCurrentUI records whether the browser declared the current frontend's
// features (it then gets `notification` frames).
func (s *socket) setCurrentUI(v bool) {
	s.mu.Lock()
	s.currentUI = v
	s.mu.Unlock()
}

// noticePrefix starts every notification frame the gateway makes
// (comfy.Message encodes its type first).
var noticePrefix = []byte(`{"type":"` + comfy.MsgNotification + `"`)

// isNotice reports whether a text frame is a notification the gateway
// made: only sockets whose browser declared the current frontend's features
// get those (socket.currentUI). Told from the bytes rather than marked in
// frame: a larger frame grows every idle socket's goroutine stack (see
// BenchmarkIdleSocketMemory).
func isNotice(text []byte) bool { return bytes.HasPrefix(text, noticePrefix) }

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

// admit counts a new socket of user against the per-user limit; false
// means the user has that many open already. Every admitted socket is
// released with track(s, false) or release.
func (h *Hub) admit(user string) (ok bool, limit int, first bool) {
	h.mu.Lock()
	defer h.mu.Unlock()
	limit = h.maxPerUser
	if limit <= 0 {
		limit = DefaultMaxSocketsPerUser
	}
	if h.perUser[user] >= limit {
		first = !h.refused[user]
		h.refused[user] = true
		return false, limit, first
	}
	h.perUser[user]++
	return true, limit, false
}

// release gives back a socket counted by admit.
func (h *Hub) release(user string) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.perUser[user]--; h.perUser[user] <= 0 {
		delete(h.perUser, user)
		delete(h.refused, user)
	}
}

// SetLimits sets the per-user socket limit and the bytes queued per socket
// (0: the defaults) for sockets opened from now on.
func (h *Hub) SetLimits(socketsPerUser, queueBytes int) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.maxPerUser, h.maxQueue = socketsPerUser, queueBytes
}

func (h *Hub) newSocket() *socket {
	h.mu.Lock()
	defer h.mu.Unlock()
	return newSocket(h.maxQueue)
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
		s.kill()
	}
}
