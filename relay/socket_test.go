package relay

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"io"
	"math/big"
	"net"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/gorilla/websocket"

	"github.com/comfyume/comfyume/comfy"
	"github.com/comfyume/comfyume/dispatch"
)

// wireFrame is one frame as the browser reads it.
type wireFrame struct {
	op      int
	payload []byte
}

// readWire reads unmasked server frames from r until it fails.
func readWire(r io.Reader, out chan<- wireFrame) {
	defer close(out)
	for {
		var h [2]byte
		if _, err := io.ReadFull(r, h[:]); err != nil {
			return
		}
		n := uint64(h[1] & 0x7f)
		switch n {
		case 126:
			var b [2]byte
			if _, err := io.ReadFull(r, b[:]); err != nil {
				return
			}
			n = uint64(binary.BigEndian.Uint16(b[:]))
		case 127:
			var b [8]byte
			if _, err := io.ReadFull(r, b[:]); err != nil {
				return
			}
			n = binary.BigEndian.Uint64(b[:])
		}
		p := make([]byte, n)
		if _, err := io.ReadFull(r, p); err != nil {
			return
		}
		out <- wireFrame{op: int(h[0] & 0x0f), payload: p}
	}
}

// pipeSocket is a socket whose browser reads only when the test says so
// (net.Pipe: every write waits for the reader).
func pipeSocket(t *testing.T, limit int) (*socket, net.Conn) {
	t.Helper()
	server, browser := net.Pipe()
	t.Cleanup(func() { server.Close(); browser.Close() })
	s := newSocket(limit)
	s.out = server
	s.previewMeta = true
	return s, browser
}

func progressText(prompt, node string, v int) []byte {
	return []byte(fmt.Sprintf(`{"type":"progress","data":{"value":%d,"max":100,"prompt_id":%q,"node":%q}}`, v, prompt, node))
}

func lifecycleText(typ, prompt, node string) []byte {
	return []byte(fmt.Sprintf(`{"type":%q,"data":{"prompt_id":%q,"node":%q}}`, typ, prompt, node))
}

func previewOf(prompt, node string, n, fill int) *comfy.Preview {
	return &comfy.Preview{
		Metadata:  &comfy.PreviewMetadata{NodeID: node, PromptID: prompt, ImageType: "image/jpeg"},
		ImageType: "image/jpeg",
		Image:     bytes.Repeat([]byte{byte(fill)}, n),
	}
}

// The job of a socket whose browser is stuck while 300 progress events and
// 30 previews of two nodes arrive: once the browser reads again it gets
// every lifecycle event in order, and of progress and previews the latest
// per node, in their place after the lifecycle events before them. The
// same for frames from home (their kind read from their bytes) and for a
// GPU job's events (their kind from the type the stream's reader read).
func TestQueueCoalescesProgressAndPreviewsUnderPressure(t *testing.T) {
	t.Run("home", func(t *testing.T) {
		testQueueCoalesces(t, func(_ string, b []byte) frame { return frame{text: b} })
	})
	t.Run("job", func(t *testing.T) {
		testQueueCoalesces(t, func(typ string, b []byte) frame {
			f, ok := eventFrame(dispatch.Event{Type: typ, JSON: b}, nil)
			if !ok {
				t.Fatal("no frame")
			}
			return f
		})
	})
}

func testQueueCoalesces(t *testing.T, text func(typ string, b []byte) frame) {
	// Progress alone (about 300 kB) is far over twice the bound: kept
	// whole, it would close the socket.
	const steps = 1500
	s, browser := pipeSocket(t, 64<<10)
	var want []string
	s.send(text("execution_start", lifecycleText("execution_start", "p", "")))
	want = append(want, "execution_start:")
	for _, node := range []string{"3", "7"} {
		s.send(text("executing", lifecycleText("executing", "p", node)))
		want = append(want, "executing:"+node)
		for i := 1; i <= steps; i++ {
			s.send(text("progress", progressText("p", node, i)))
			if i%100 == 0 {
				s.send(frame{preview: previewOf("p", node, 16<<10, i/100)})
			}
		}
		s.send(text("executed", lifecycleText("executed", "p", node)))
		want = append(want, "executed:"+node)
	}
	s.send(text("execution_success", lifecycleText("execution_success", "p", "")))
	want = append(want, "execution_success:")

	frames := make(chan wireFrame, 1024)
	go readWire(browser, frames)
	var got []string
	last := map[string]int{}
	previews := map[string]int{}
	for len(got) < len(want) {
		var f wireFrame
		select {
		case f = <-frames:
		case <-time.After(5 * time.Second):
			t.Fatalf("stuck after %v", got)
		}
		if f.op == websocket.BinaryMessage {
			p, err := comfy.ParsePreview(f.payload)
			if err != nil {
				t.Fatal(err)
			}
			previews[p.Metadata.NodeID] = int(p.Image[0])
			continue
		}
		var m struct {
			Type string `json:"type"`
			Data struct {
				Node  string `json:"node"`
				Value int    `json:"value"`
			} `json:"data"`
		}
		if err := json.Unmarshal(f.payload, &m); err != nil {
			t.Fatal(err)
		}
		if m.Type == "progress" {
			if m.Data.Value <= last[m.Data.Node] {
				t.Fatalf("progress of node %s went from %d to %d", m.Data.Node, last[m.Data.Node], m.Data.Value)
			}
			last[m.Data.Node] = m.Data.Value
			continue
		}
		got = append(got, m.Type+":"+m.Data.Node)
		if m.Type == "executed" && (last[m.Data.Node] != steps || previews[m.Data.Node] != steps/100) {
			t.Fatalf("before executed of node %s: last progress %d, last preview %d; want %d and %d", m.Data.Node, last[m.Data.Node], previews[m.Data.Node], steps, steps/100)
		}
	}
	if strings.Join(got, " ") != strings.Join(want, " ") {
		t.Fatalf("lifecycle events %v, want %v", got, want)
	}
}

// A browser that keeps up (the queue never exceeds its bound) gets every
// frame in order.
func TestQueueKeepsEverythingForABrowserThatKeepsUp(t *testing.T) {
	s, browser := pipeSocket(t, 4<<20)
	frames := make(chan wireFrame, 4096)
	go readWire(browser, frames)
	const n = 500
	for i := 1; i <= n; i++ {
		s.send(frame{text: progressText("p", "3", i)})
		if i%50 == 0 {
			s.send(frame{preview: previewOf("p", "3", 8<<10, i/50)})
		}
	}
	progress, previews := 0, 0
	for progress < n || previews < n/50 {
		select {
		case f := <-frames:
			if f.op == websocket.BinaryMessage {
				previews++
				continue
			}
			progress++
			if want := progressText("p", "3", progress); !bytes.Equal(f.payload, want) {
				t.Fatalf("frame %d is %s, want %s", progress, f.payload, want)
			}
		case <-time.After(5 * time.Second):
			t.Fatalf("got %d progress and %d previews of %d and %d", progress, previews, n, n/50)
		}
	}
}

// Lifecycle frames are never dropped: when they alone pass twice the
// bound, the socket is closed with a reason (the browser reconnects and
// replays) and its queue is freed.
func TestQueueClosesWhenKeptFramesPassTheHardCap(t *testing.T) {
	s, browser := pipeSocket(t, 16<<10)
	big := lifecycleText("executed", "p", strings.Repeat("x", 4<<10))
	for i := 0; i < 20; i++ {
		s.send(frame{text: big})
	}
	s.mu.Lock()
	closing, queued := s.closing, s.bytes
	s.mu.Unlock()
	if !closing || queued > 1<<10 {
		t.Fatalf("closing %v with %d bytes queued", closing, queued)
	}
	frames := make(chan wireFrame, 64)
	go readWire(browser, frames)
	for f := range frames {
		if f.op == websocket.CloseMessage {
			code := binary.BigEndian.Uint16(f.payload)
			if code != websocket.ClosePolicyViolation || !strings.Contains(string(f.payload[2:]), "too slow") {
				t.Fatalf("close %d %q", code, f.payload[2:])
			}
			return
		}
	}
	t.Fatal("no close frame")
}

func FuzzReadBrowserFrame(f *testing.F) {
	f.Add(true, true, []byte(`{"type":"feature_flags","data":{"supports_preview_metadata":true,"supports_progress_text_metadata":true,"supports_manager_v4_ui":true}}`))
	f.Add(true, true, []byte(`{"type":"feature_flags","data":null}`))
	f.Add(true, true, []byte(`{"type":"feature_flags"}`))
	f.Add(false, true, []byte(`{"type":"feature_flags","data":{}}`))
	f.Add(true, true, []byte(`{"type":"something","data":[1,2]}`))
	f.Add(true, true, []byte(`{"type":1}`))
	f.Add(true, true, []byte(`not json`))
	f.Add(true, false, []byte{0, 0, 0, 1})
	f.Fuzz(func(t *testing.T, first, text bool, b []byte) {
		typ := websocket.BinaryMessage
		if text {
			typ = websocket.TextMessage
		}
		in := readBrowserFrame(typ, b, first)
		switch {
		case in.closeCode != 0:
			if in.forward != nil || in.flags || in.reason == "" {
				t.Fatalf("close with %+v", in)
			}
		case in.flags:
			if !first {
				t.Fatal("flags answered on a later frame")
			}
			var m struct {
				Type string         `json:"type"`
				Data map[string]any `json:"data"`
			}
			if err := json.Unmarshal(in.forward, &m); err != nil || m.Type != comfy.MsgFeatureFlags {
				t.Fatalf("forwarded flags %s: %v", in.forward, err)
			}
			if _, ok := m.Data["supports_progress_text_metadata"]; ok {
				t.Fatalf("forwarded flags keep supports_progress_text_metadata: %s", in.forward)
			}
			if in.previewMeta != (m.Data["supports_preview_metadata"] == true) {
				t.Fatalf("previewMeta %v for %s", in.previewMeta, in.forward)
			}
		default:
			if !bytes.Equal(in.forward, b) {
				t.Fatalf("forwarded %q, got %q", in.forward, b)
			}
		}
	})
}

func FuzzBusEncoding(f *testing.F) {
	f.Add("frame", "alice", "tab", "1-0", "", []byte(`{"type":"executed","data":{}}`), uint8(0))
	f.Add("frame", "bob", "s\x00id", "", "o", []byte{0, 0, 0, 4, 0, 0, 0, 2, '{', '}'}, uint8(1))
	f.Add("queue", "u}:x", "", "", "", []byte{}, uint8(2))
	f.Fuzz(func(t *testing.T, kind, user, sid, pos, origin string, body []byte, which uint8) {
		m := BusMessage{Kind: kind, User: user, SID: sid, Pos: pos, Origin: origin}
		switch which % 3 {
		case 0:
			m.Text = string(body)
		case 1:
			m.Binary = body
		case 2:
			m.Preview = body
		}
		var got BusMessage
		if err := decodeBus(encodeBus(&m), &got); err != nil {
			t.Fatalf("decoding what was encoded: %v", err)
		}
		// The frame's bytes travel as they are (an empty one as none).
		norm := func(m BusMessage) string {
			return fmt.Sprintf("%q|%x|%x", m.Text, m.Binary, m.Preview)
		}
		if len(body) > 0 && norm(got) != norm(m) {
			t.Fatalf("round trip: %s, want %s", norm(got), norm(m))
		}
		// Anything from the bus decodes or fails, never panics.
		_ = decodeBus(body, &got)
	})
}

// A job's goroutine writes to an idle socket itself, but only what the
// connection takes at once: to a browser that has stopped reading, 32 MiB
// of frames (far more than the kernel buffers) are handed over without the
// job's goroutine ever waiting, and once the browser reads it gets every
// frame, whole and in order. Over TLS, which cannot be written without
// blocking, the job's goroutine hands every write to a writer goroutine.
func TestJobGoroutineNeverWaitsForTheBrowser(t *testing.T) {
	for _, overTLS := range []bool{false, true} {
		t.Run(map[bool]string{false: "tcp", true: "tls"}[overTLS], func(t *testing.T) {
			jobNeverWaits(t, overTLS)
		})
	}
}

// browserPair connects a socket to a browser over loopback TCP, or TLS on
// it; the browser reads nothing unless the test does.
func browserPair(t *testing.T, overTLS bool) (s *socket, browser net.Conn) {
	t.Helper()
	server, browser := loopback(t, &net.Dialer{})
	s = newSocket(1 << 30) // nothing coalesces
	t.Cleanup(s.kill)
	if !overTLS {
		s.out, s.vectored = server, true
		return s, browser
	}
	ts, tb := tlsOver(t, server, browser)
	s.out = ts
	return s, tb
}

// loopback connects over loopback TCP: the gateway's end and the
// browser's, dialed with d.
func loopback(t *testing.T, d *net.Dialer) (server, browser net.Conn) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	browser, err = d.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { browser.Close() })
	if server, err = ln.Accept(); err != nil {
		t.Fatal(err)
	}
	return server, browser
}

// tlsOver runs TLS over a connection: the gateway's end serves a
// self-signed certificate, the browser's trusts any.
func tlsOver(t *testing.T, server, browser net.Conn) (ts, tb *tls.Conn) {
	t.Helper()
	ts = tls.Server(server, &tls.Config{Certificates: []tls.Certificate{selfSigned(t)}})
	tb = tls.Client(browser, &tls.Config{InsecureSkipVerify: true})
	done := make(chan error, 1)
	go func() { done <- ts.Handshake() }()
	if err := tb.Handshake(); err != nil {
		t.Fatal(err)
	}
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	return ts, tb
}

// selfSigned makes a certificate for a test's TLS server.
func selfSigned(t *testing.T) tls.Certificate {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour)}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}
}

func jobNeverWaits(t *testing.T, overTLS bool) {
	s, browser := browserPair(t, overTLS)

	const n = 2048
	pad := strings.Repeat("x", 16<<10)
	handed := make(chan struct{})
	go func() {
		defer close(handed)
		for i := 0; i < n; i++ {
			f := frame{text: []byte(fmt.Sprintf(`{"type":"executed","data":{"i":%d,"pad":%q}}`, i, pad))}
			if i%3 == 0 {
				q := queued{f: f}
				s.push(&q, startLater) // a batch, written by the next startNow or releaseLent
			} else {
				q := queued{f: f}
				s.push(&q, startNow)
			}
		}
		s.releaseLent(nil)
	}()
	select {
	case <-handed:
	case <-time.After(20 * time.Second):
		t.Fatal("the job's goroutine waited for a browser that does not read")
	}
	frames := make(chan wireFrame, 64)
	go readWire(browser, frames)
	for i := 0; i < n; i++ {
		f, ok := <-frames
		if !ok {
			t.Fatalf("the connection ended after %d frames", i)
		}
		var m struct {
			Data struct {
				I   int    `json:"i"`
				Pad string `json:"pad"`
			} `json:"data"`
		}
		if err := json.Unmarshal(f.payload, &m); err != nil || m.Data.I != i || m.Data.Pad != pad {
			t.Fatalf("frame %d: got %.80s (%v)", i, f.payload, err)
		}
	}
}

// While a reconnecting tab's missed frames are read from the bus, live
// frames wait for it within the socket's bound: a blast of progress and
// previews meanwhile keeps at most the bound (lifecycle frames all kept,
// and all shown once the replay is done), and lifecycle frames past twice
// the bound close the socket instead of growing without end.
func TestHeldFramesAreBoundedWhileCatchingUp(t *testing.T) {
	const limit = 64 << 10
	s, browser := pipeSocket(t, limit)
	s.mu.Lock()
	s.holding = true
	s.mu.Unlock()
	s.deliver(frame{text: lifecycleText("execution_start", "p", "")}, "", startNow)
	for i := 1; i <= 2000; i++ {
		s.deliver(frame{text: progressText("p", "3", i)}, "", startNow)
		if i%100 == 0 {
			s.deliver(frame{preview: previewOf("p", "3", 16<<10, i)}, "", startNow)
		}
	}
	s.deliver(frame{text: lifecycleText("execution_success", "p", "")}, "", startNow)
	s.mu.Lock()
	held, n := s.heldBytes, len(s.held)
	s.mu.Unlock()
	if held > limit+1024 {
		t.Fatalf("%d bytes (%d frames) held while catching up; bound %d", held, n, limit)
	}
	frames := make(chan wireFrame, 4096)
	go readWire(browser, frames)
	s.replay(nil, busFrame)
	var got []string
	for f := range frames {
		if f.op != websocket.TextMessage {
			continue
		}
		var m struct{ Type string }
		_ = json.Unmarshal(f.payload, &m)
		if m.Type != comfy.MsgProgress {
			got = append(got, m.Type)
		}
		if m.Type == comfy.MsgExecutionSuccess {
			break
		}
	}
	if len(got) != 2 || got[0] != comfy.MsgExecutionStart {
		t.Fatalf("lifecycle frames shown after the replay: %v", got)
	}

	// Kept frames past twice the bound: the socket closes.
	s2, _ := pipeSocket(t, 16<<10)
	s2.mu.Lock()
	s2.holding = true
	s2.mu.Unlock()
	big := lifecycleText("executed", "p", strings.Repeat("x", 4<<10))
	for i := 0; i < 20; i++ {
		s2.deliver(frame{text: big}, "", startNow)
	}
	s2.mu.Lock()
	closing, held2 := s2.closing, s2.heldBytes
	s2.mu.Unlock()
	if !closing || held2 != 0 {
		t.Fatalf("closing %v with %d bytes held", closing, held2)
	}
}

// tcpSocket is a socket on a loopback TCP connection with small socket
// buffers (the kernel holds some tens of KiB of it), written as a
// browser's is (non-blocking writev), and the browser's end.
func tcpSocket(t *testing.T, limit int) (*socket, net.Conn) {
	t.Helper()
	server, browser := loopback(t, &net.Dialer{Control: func(_, _ string, c syscall.RawConn) error {
		return c.Control(func(fd uintptr) { _ = syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_RCVBUF, 8<<10) })
	}})
	_ = server.(*net.TCPConn).SetWriteBuffer(8 << 10)
	s := newSocket(limit)
	s.out, s.vectored, s.raw = server, true, rawConn(server)
	t.Cleanup(s.kill)
	return s, browser
}

// Frames an upstream reader lends (written from its read buffer, without
// a copy) reach the browser as they were, although the reader reads over
// that buffer as soon as it has released them — also when the browser is
// behind: when another writer (a job's goroutine) took them off the queue
// and its write is not done, when the reader's own write of them is not
// done, and when they wait behind a write that is not done.
func TestLentFramesOutliveTheirLender(t *testing.T) {
	var reader, otherReader dispatch.Lender
	release := func(s *socket) { s.releaseLent(&reader) }
	const n = 16
	pad := strings.Repeat("p", 16<<10) // n of them are far more than the kernel holds
	filler := []byte(`{"type":"executed","data":{"pad":"` + strings.Repeat("f", 256<<10) + `"}}`)
	for _, c := range []struct {
		name string
		// before runs after the lent frames are queued; release is how
		// the reader releases them.
		before  func(s *socket)
		release func(s *socket)
		filler  bool
	}{
		{"taken by another writer", func(s *socket) { s.releaseLent(nil) }, release, false},
		{"taken by another reader's write", func(s *socket) { s.releaseLent(&otherReader) }, release, false},
		{"half written by the reader", func(s *socket) {}, release, false},
		{"queued behind a write", func(s *socket) {}, release, true},
	} {
		t.Run(c.name, func(t *testing.T) {
			s, browser := tcpSocket(t, 1<<30) // nothing coalesces
			if c.filler {
				q := queued{f: frame{text: filler}}
				s.push(&q, startNow) // half written; a goroutine goes on
			}
			buf := make([]byte, 0, n*(len(pad)+64)) // the reader's buffer
			for k := 0; k < n; k++ {
				start := len(buf)
				buf = fmt.Appendf(buf, `{"type":"progress","data":{"value":%d,"pad":%q}}`, k, pad)
				q := queued{f: frame{text: buf[start:len(buf):len(buf)], lender: &reader}}
				s.push(&q, startLater)
			}
			c.before(s)
			c.release(s)
			for i := range buf {
				buf[i] = 'X' // the reader reads over it
			}
			frames := make(chan wireFrame, n+1)
			go readWire(browser, frames)
			if c.filler {
				if f := <-frames; !bytes.Equal(f.payload, filler) {
					t.Fatalf("the first frame is not the one written before: %.80q", f.payload)
				}
			}
			for k := 0; k < n; k++ {
				f, ok := <-frames
				if !ok {
					t.Fatalf("the connection ended after %d frames", k)
				}
				if want := fmt.Sprintf(`{"type":"progress","data":{"value":%d,"pad":%q}}`, k, pad); string(f.payload) != want {
					t.Fatalf("frame %d: got %.80q…", k, f.payload)
				}
			}
		})
	}
}

// Frames a reader lends to a socket whose write is under way (by another
// goroutine) are copied before the reader's hand-over returns: the socket
// may leave its session (its browser went away) and still write them
// while it closes, long after the reader read over its memory.
func TestLeavingSocketKeepsCopiesOfLentFrames(t *testing.T) {
	h := NewHub()
	defer h.Close()
	s, _ := tcpSocket(t, 1<<30)
	h.attach("alice", "tab", s)
	s.mu.Lock()
	s.writing = true // a write under way: frames only queue
	s.mu.Unlock()
	buf := progressText("p", "1", 7)
	want := string(buf)
	var reader dispatch.Lender
	h.publishAll("alice", "tab", []dispatch.Event{{Type: comfy.MsgProgress, JSON: buf, Lent: true}}, &reader)
	h.detach("alice", "tab", s)
	for i := range buf {
		buf[i] = 'X'
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.queue.Len() != 1 || string(s.queue.At(0).f.text) != want {
		t.Fatalf("the leaving socket holds %d frames, the first %q", s.queue.Len(), s.queue.At(0).f.text)
	}
}

// Closing a socket over TLS whose browser reads nothing does not wait for
// the browser: TLS sends a close alert first, which can wait up to 5 s for
// a full connection, and the socket's lock (which the GPU stream's reader
// takes to queue a frame) is held while it closes. (net.Pipe: every write
// waits for the reader, as a full connection does.)
func TestTLSSocketClosesWithoutWaitingForTheBrowser(t *testing.T) {
	server, browser := net.Pipe()
	t.Cleanup(func() { server.Close(); browser.Close() })
	ts, _ := tlsOver(t, server, browser)
	s := newSocket(1 << 20)
	s.out = ts
	// The browser reads nothing from now on.
	start := time.Now()
	s.kill()
	if waited := time.Since(start); waited > time.Second {
		t.Fatalf("closing the socket waited %v for a browser that does not read", waited)
	}
	q := queued{f: frame{text: []byte(`{"type":"progress","data":{}}`)}}
	s.push(&q, startNow) // a dead socket takes nothing, at once
}
