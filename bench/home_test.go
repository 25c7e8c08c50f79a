package bench

import (
	"bytes"
	"errors"
	"net"
	"net/http"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/gorilla/websocket"
)

// fakeHome is a minimal ComfyUI WebSocket endpoint: on connect it greets
// with status and the socket's sid, like ComfyUI, then only reads (and
// answers pings). Benchmarks make it send frames through homeConn.
type fakeHome struct {
	ln   net.Listener
	srv  *http.Server
	open atomic.Int64

	mu    sync.Mutex
	conns map[string]*homeConn
	seq   int
}

type homeConn struct {
	sid string
	c   *websocket.Conn
	mu  sync.Mutex // serialises writes
	buf []byte
}

var homeUpgrader = websocket.Upgrader{CheckOrigin: func(*http.Request) bool { return true }}

func startFakeHome() (*fakeHome, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	h := &fakeHome{ln: ln, conns: map[string]*homeConn{}}
	mux := http.NewServeMux()
	mux.HandleFunc("/ws", h.serveWS)
	h.srv = &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
	go func() { _ = h.srv.Serve(ln) }()
	return h, nil
}

func (h *fakeHome) URL() string  { return "http://" + h.ln.Addr().String() }
func (h *fakeHome) Addr() string { return h.ln.Addr().String() }

func (h *fakeHome) Close() {
	_ = h.srv.Close()
	h.mu.Lock()
	for _, c := range h.conns {
		c.c.Close()
	}
	h.mu.Unlock()
}

func (h *fakeHome) serveWS(w http.ResponseWriter, r *http.Request) {
	sid := r.URL.Query().Get("clientId")
	conn, err := homeUpgrader.Upgrade(w, r, nil)
	if err != nil {
		return
	}
	h.mu.Lock()
	if sid == "" {
		h.seq++
		sid = "home" + strconv.Itoa(h.seq)
	}
	hc := &homeConn{sid: sid, c: conn}
	h.conns[sid] = hc
	h.mu.Unlock()
	h.open.Add(1)
	defer func() {
		h.open.Add(-1)
		h.mu.Lock()
		if h.conns[sid] == hc {
			delete(h.conns, sid)
		}
		h.mu.Unlock()
		conn.Close()
	}()
	hc.mu.Lock()
	err = conn.WriteMessage(websocket.TextMessage, statusFrame(sid))
	hc.mu.Unlock()
	if err != nil {
		return
	}
	for {
		if _, _, err := conn.NextReader(); err != nil {
			return
		}
	}
}

// waitConn returns the socket home holds for sid once it is open.
func (h *fakeHome) waitConn(sid string, d time.Duration) (*homeConn, error) {
	deadline := time.Now().Add(d)
	for {
		h.mu.Lock()
		hc := h.conns[sid]
		h.mu.Unlock()
		if hc != nil {
			return hc, nil
		}
		if time.Now().After(deadline) {
			return nil, errors.New("home got no socket for sid " + sid)
		}
		time.Sleep(time.Millisecond)
	}
}

func statusFrame(sid string) []byte {
	return []byte(`{"type": "status", "data": {"status": {"exec_info": {"queue_remaining": 0}}, "sid": "` + sid + `"}}`)
}

// A ComfyUI progress frame as ComfyUI's json.dumps writes it, with one
// extra field "ts": the sender's clock in Unix nanoseconds. Without "ts"
// the frame is 119 bytes; with it, 146.
const (
	progressHead = `{"type": "progress", "data": {"value": `
	progressMax  = `, "max": `
	progressTail = `, "prompt_id": "5c8a3e1b-6d2f-4f7a-9b1e-2d4c6f8a0b3e", "node": "3", "ts": `
)

// sendProgress writes one progress frame stamped with the current time.
func (hc *homeConn) sendProgress(value, max int) error {
	hc.mu.Lock()
	defer hc.mu.Unlock()
	b := append(hc.buf[:0], progressHead...)
	b = strconv.AppendInt(b, int64(value), 10)
	b = append(b, progressMax...)
	b = strconv.AppendInt(b, int64(max), 10)
	b = append(b, progressTail...)
	b = strconv.AppendInt(b, time.Now().UnixNano(), 10)
	b = append(b, "}}"...)
	hc.buf = b
	return hc.c.WriteMessage(websocket.TextMessage, b)
}

var (
	progressPrefix = []byte(`{"type": "progress"`)
	tsKey          = []byte(`"ts": `)
)

// progressStamp returns the send time of a progress frame, or ok=false for
// any other frame (status, feature_flags, ...).
func progressStamp(b []byte) (int64, bool) {
	if !bytes.HasPrefix(b, progressPrefix) {
		return 0, false
	}
	i := bytes.LastIndex(b, tsKey)
	if i < 0 {
		return 0, false
	}
	var ts int64
	for _, c := range b[i+len(tsKey):] {
		if c < '0' || c > '9' {
			break
		}
		ts = ts*10 + int64(c-'0')
	}
	return ts, true
}
