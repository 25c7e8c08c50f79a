package comfytest

import (
	"encoding/binary"
	"net/http"
	"strings"
	"sync"
	"time"

	"github.com/google/uuid"
	"github.com/gorilla/websocket"
)

// wsConn is one browser/API socket. Messages are queued without blocking
// the sender and written in order by a dedicated goroutine, like aiohttp's
// publish loop: a slow client never stalls execution.
type wsConn struct {
	sid    string
	c      *websocket.Conn
	queue  *sendQueue[wsMsg]
	done   chan struct{}
	once   sync.Once
	onSend func(SentFrame) // Options.OnSend
	serial *serialSender   // Options.SerialSend: the server's one writer

	// guarded by Server.sockMu
	flags    any
	gotFirst bool
}

type wsMsg struct {
	binary bool
	data   []byte
	// What Options.OnSend is told about the frame (not sent).
	typ      string
	promptID string
	value    int
	queued   time.Time // set by enqueue when Options.OnSend is
}

func newWSConn(sid string, c *websocket.Conn, onSend func(SentFrame)) *wsConn {
	return &wsConn{sid: sid, c: c, queue: newSendQueue[wsMsg](), done: make(chan struct{}), onSend: onSend}
}

func (c *wsConn) enqueue(m wsMsg) {
	if c.onSend != nil {
		m.queued = time.Now()
	}
	if c.serial != nil {
		c.serial.enqueue(c, m)
		return
	}
	c.queue.push(m)
}

func (c *wsConn) writer() { c.queue.run(c.done, c.write) }

// sendQueue is an unbounded queue of messages and its writer's wake-up:
// a socket's, or with SerialSend the server's one.
type sendQueue[T any] struct {
	mu     sync.Mutex
	items  []T
	notify chan struct{}
}

func newSendQueue[T any]() *sendQueue[T] {
	return &sendQueue[T]{notify: make(chan struct{}, 1)}
}

func (q *sendQueue[T]) push(v T) {
	q.mu.Lock()
	q.items = append(q.items, v)
	q.mu.Unlock()
	select {
	case q.notify <- struct{}{}:
	default:
	}
}

// run hands what is pushed to write, in order, until stop is closed or
// write returns false.
func (q *sendQueue[T]) run(stop <-chan struct{}, write func(T) bool) {
	var zero T
	for {
		select {
		case <-stop:
			return
		case <-q.notify:
		}
		for {
			q.mu.Lock()
			if len(q.items) == 0 {
				q.mu.Unlock()
				break
			}
			v := q.items[0]
			q.items[0] = zero
			q.items = q.items[1:]
			q.mu.Unlock()
			if !write(v) {
				return
			}
		}
	}
}

// write writes one message, and closes the socket when that fails.
func (c *wsConn) write(m wsMsg) bool {
	typ := websocket.TextMessage
	if m.binary {
		typ = websocket.BinaryMessage
	}
	if c.onSend != nil {
		c.onSend(SentFrame{SID: c.sid, Type: m.typ, PromptID: m.promptID, Value: m.value,
			Binary: m.binary, Bytes: len(m.data), Queued: m.queued, Time: time.Now()})
	}
	if err := c.c.WriteMessage(typ, m.data); err != nil {
		c.close()
		return false
	}
	return true
}

// serialSender is Options.SerialSend's publish loop: the messages of every
// socket, written one after the other by one goroutine. (ComfyUI's
// PromptServer.publish_loop awaits each send, and aiohttp's send waits
// for a socket's buffer to drain once it is over its limit.)
type serialSender struct {
	queue *sendQueue[serialMsg]
}

type serialMsg struct {
	c *wsConn
	m wsMsg
}

func newSerialSender(stop <-chan struct{}) *serialSender {
	ss := &serialSender{queue: newSendQueue[serialMsg]()}
	go ss.queue.run(stop, func(sm serialMsg) bool {
		select {
		case <-sm.c.done: // closed: its messages are dropped
		default:
			sm.c.write(sm.m)
		}
		return true
	})
	return ss
}

func (ss *serialSender) enqueue(c *wsConn, m wsMsg) { ss.queue.push(serialMsg{c, m}) }

// goodbye sends a close frame (best effort) before close.
func (c *wsConn) goodbye() {
	_ = c.c.WriteControl(websocket.CloseMessage,
		websocket.FormatCloseMessage(websocket.CloseGoingAway, ""), time.Now().Add(200*time.Millisecond))
}

func (c *wsConn) close() {
	c.once.Do(func() {
		close(c.done)
		_ = c.c.Close()
	})
}

var upgrader = websocket.Upgrader{
	// The origin rules are applied by the middleware, like ComfyUI.
	CheckOrigin:     func(*http.Request) bool { return true },
	ReadBufferSize:  4096,
	WriteBufferSize: 32 << 10,
}

func (s *Server) handleWS(w http.ResponseWriter, r *http.Request, _ map[string]string) {
	s.sockMu.Lock()
	refuse := time.Now().Before(s.refuseWSTo)
	s.sockMu.Unlock()
	if refuse {
		http.Error(w, "503: WebSockets unavailable", http.StatusServiceUnavailable)
		return
	}
	c, err := upgrader.Upgrade(w, r, nil)
	if err != nil {
		return // Upgrade already answered
	}
	c.SetReadLimit(s.maxBody)
	sid := queryOf(r).Get("clientId")
	if sid == "" {
		sid = strings.ReplaceAll(uuid.NewString(), "-", "")
	}
	wc := newWSConn(sid, c, s.opts.OnSend)
	if s.serial != nil {
		wc.serial = s.serial
	} else {
		go wc.writer()
	}

	s.mu.Lock()
	remaining := s.queueRemainingLocked()
	var resend *string
	if s.running != nil && s.runHasCli && s.runClient == sid && s.lastNode != nil {
		n := *s.lastNode
		resend = &n
	}
	s.sockMu.Lock()
	if s.stopped() {
		s.sockMu.Unlock()
		s.mu.Unlock()
		wc.close()
		return
	}
	old := s.sockets[sid]
	s.sockets[sid] = wc
	s.conns[wc] = struct{}{}
	wc.enqueue(textMsg("status", obj{{"status", queueInfo(remaining)}, {"sid", sid}}))
	if resend != nil {
		wc.enqueue(textMsg("executing", obj{{"node", *resend}}))
	}
	s.sockMu.Unlock()
	s.mu.Unlock()
	if old != nil && !s.opts.KeepReplacedSockets {
		// Real ComfyUI forgets the old socket without closing it (and later
		// orphans the new one when the old closes). We close it instead.
		old.close()
	}
	s.logf("ws connected sid=%s", sid)

	for {
		mt, data, err := c.ReadMessage()
		if err != nil {
			break
		}
		if mt != websocket.TextMessage || !s.v2026 {
			continue // 2024-12 servers ignore client frames
		}
		v, err := decodeOrdered(data)
		if err != nil {
			continue // "Invalid JSON received from client": first_message stays
		}
		o, _ := v.(obj)
		s.sockMu.Lock()
		first := !wc.gotFirst
		wc.gotFirst = true
		typ, _ := o.get("type")
		if first && typ == "feature_flags" {
			flags, ok := o.get("data")
			if !ok {
				flags = obj{}
			}
			wc.flags = flags
			wc.enqueue(textMsg("feature_flags", serverFeatures()))
		}
		s.sockMu.Unlock()
	}

	s.sockMu.Lock()
	if s.sockets[sid] == wc || s.opts.KeepReplacedSockets {
		delete(s.sockets, sid) // real ComfyUI pops the sid whichever socket it was
	}
	delete(s.conns, wc)
	s.sockMu.Unlock()
	wc.close()
	s.logf("ws closed sid=%s", sid)
}

func serverFeatures() obj {
	return obj{{"supports_preview_metadata", true}, {"max_upload_size", 104857600}}
}

func (s *Server) handleFeatures(w http.ResponseWriter, r *http.Request, _ map[string]string) {
	writeJSON(w, 200, serverFeatures())
}

func queueInfo(remaining int) obj {
	return obj{{"exec_info", obj{{"queue_remaining", remaining}}}}
}

func textMsg(typ string, data any) wsMsg {
	m := wsMsg{data: mustJSON(obj{{"type", typ}, {"data", data}}), typ: typ}
	if o, ok := data.(obj); ok {
		if id, ok := o.get("prompt_id"); ok {
			m.promptID, _ = id.(string)
		}
		if typ == "progress" {
			if v, ok := o.get("value"); ok {
				m.value, _ = v.(int)
			}
		}
	}
	return m
}

// target says where an event goes: one sid, or every socket.
type target struct {
	sid string
	all bool
}

var broadcast = target{all: true}

// send queues a message on the target socket(s). A sid that is not
// connected drops the message (ComfyUI does not buffer).
func (s *Server) send(t target, m wsMsg) {
	s.sockMu.Lock()
	defer s.sockMu.Unlock()
	s.sendLocked(t, m)
}

func (s *Server) sendLocked(t target, m wsMsg) {
	if t.all {
		for _, c := range s.sockets {
			c.enqueue(m)
		}
		return
	}
	if c := s.sockets[t.sid]; c != nil {
		c.enqueue(m)
	}
}

func (s *Server) sendJSON(t target, typ string, data any) { s.send(t, textMsg(typ, data)) }

// supportsPreviewMetadata reports whether the socket of sid declared
// supports_preview_metadata: true in its feature_flags.
func (s *Server) supportsPreviewMetadata(t target) bool {
	if t.all || !s.v2026 {
		return false
	}
	s.sockMu.Lock()
	defer s.sockMu.Unlock()
	c := s.sockets[t.sid]
	if c == nil {
		return false
	}
	f, ok := c.flags.(obj)
	if !ok {
		return false
	}
	v, _ := f.get("supports_preview_metadata")
	return v == true
}

// previewFrame builds a type-1 frame: [u32 1][u32 format][image].
func previewFrame(format uint32, img []byte) wsMsg {
	b := make([]byte, 8, 8+len(img))
	binary.BigEndian.PutUint32(b[0:], 1)
	binary.BigEndian.PutUint32(b[4:], format)
	return wsMsg{binary: true, data: append(b, img...), typ: "preview"}
}

// previewMetaFrame builds a type-4 frame: [u32 4][u32 len][metadata][image].
func previewMetaFrame(meta obj, img []byte) wsMsg {
	mj := mustJSON(meta)
	b := make([]byte, 8, 8+len(mj)+len(img))
	binary.BigEndian.PutUint32(b[0:], 4)
	binary.BigEndian.PutUint32(b[4:], uint32(len(mj)))
	b = append(b, mj...)
	return wsMsg{binary: true, data: append(b, img...), typ: "preview"}
}
