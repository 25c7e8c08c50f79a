package dispatch

import (
	"bufio"
	"bytes"
	"crypto/sha1"
	"encoding/base64"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/gorilla/websocket"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"
)

// frame encodes one server frame (unmasked).
func frame(fin bool, op int, payload []byte) []byte {
	b0 := byte(op)
	if fin {
		b0 |= 0x80
	}
	out := []byte{b0}
	switch n := len(payload); {
	case n <= 125:
		out = append(out, byte(n))
	case n <= 0xffff:
		out = append(out, 126)
		out = binary.BigEndian.AppendUint16(out, uint16(n))
	default:
		out = append(out, 127)
		out = binary.BigEndian.AppendUint64(out, uint64(n))
	}
	return append(out, payload...)
}

// fragments encodes a message in parts of at most part bytes, with a ping
// after each fragment but the last.
func fragments(op int, payload []byte, part int) []byte {
	var out []byte
	for first := true; ; first = false {
		n := min(part, len(payload))
		fop := opContinuation
		if first {
			fop = op
		}
		out = append(out, frame(n == len(payload), fop, payload[:n])...)
		payload = payload[n:]
		if len(payload) == 0 {
			return out
		}
		out = append(out, frame(true, opPing, []byte("p"))...)
	}
}

func newFrameReader(stream []byte, bufSize int) (*wsReader, *[]string) {
	var controls []string
	r := &wsReader{br: bufio.NewReaderSize(bytes.NewReader(stream), bufSize)}
	r.control = func(op int, p []byte) error {
		controls = append(controls, fmt.Sprintf("%d:%s", op, p))
		if op == opClose {
			code := websocket.CloseNoStatusReceived
			if len(p) >= 2 {
				code = int(binary.BigEndian.Uint16(p))
			}
			return &websocket.CloseError{Code: code}
		}
		return nil
	}
	return r, &controls
}

// Messages up to the limit are read whole, whether they come in one frame
// or in fragments with pings between them, and whether they fit the read
// buffer or not; larger ones are skipped, reported with their first bytes,
// and the stream goes on.
func TestFrameReaderLimit(t *testing.T) {
	const limit = 10000
	limitOf := func(int) int64 { return limit }
	for _, n := range []int{0, 1, 125, 126, 4095, 4096, 4097, limit - 1, limit, limit + 1, 3 * limit, 70000} {
		for _, part := range []int{0, 1000, 4096} {
			msg := bytes.Repeat([]byte("0123456789abcdef"), n/16+1)[:n]
			var stream []byte
			if part == 0 {
				stream = frame(true, opText, msg)
			} else {
				stream = fragments(opText, msg, part)
			}
			stream = append(stream, frame(true, opBinary, []byte("after"))...)
			r, controls := newFrameReader(stream, 4096)
			typ, b, _, over, err := r.next(limitOf)
			if err != nil || typ != opText {
				t.Fatalf("%d bytes in parts of %d: type %d, err %v", n, part, typ, err)
			}
			if over != (n > limit) {
				t.Fatalf("%d bytes in parts of %d: over=%v", n, part, over)
			}
			if !over && !bytes.Equal(b, msg) {
				t.Fatalf("%d bytes in parts of %d: read %d bytes, not the message", n, part, len(b))
			}
			if over && (len(b) > 256 || !bytes.HasPrefix(msg, b) || len(b) == 0) {
				t.Fatalf("%d bytes over in parts of %d: kept %d bytes", n, part, len(b))
			}
			typ, b, _, over, err = r.next(limitOf)
			if err != nil || typ != opBinary || over || string(b) != "after" {
				t.Fatalf("%d bytes in parts of %d: the next message came out as %d %q %v %v", n, part, typ, b, over, err)
			}
			if part > 0 && len(*controls) != (max(n, 1)-1)/part {
				t.Fatalf("%d bytes in parts of %d: %d pings answered", n, part, len(*controls))
			}
			if _, _, _, _, err := r.next(limitOf); err != io.EOF {
				t.Fatalf("at the end: %v", err)
			}
		}
	}
}

// A close ends the stream with its code; frames no server may send end it
// with a protocol error; a frame cut short is an unexpected EOF.
func TestFrameReaderRefusesBadFrames(t *testing.T) {
	limitOf := func(int) int64 { return 1 << 20 }
	closeFrame := frame(true, opClose, binary.BigEndian.AppendUint16(nil, 1001))
	r, _ := newFrameReader(append(frame(true, opText, []byte("x")), closeFrame...), 4096)
	if _, _, _, _, err := r.next(limitOf); err != nil {
		t.Fatal(err)
	}
	var ce *websocket.CloseError
	if _, _, _, _, err := r.next(limitOf); !errors.As(err, &ce) || ce.Code != 1001 {
		t.Fatalf("a close gave %v", err)
	}
	masked := frame(true, opText, []byte("abcd"))
	masked[1] |= 0x80
	long := frame(true, opText, nil)
	long[1] = 127
	long = append(long, 0x80, 0, 0, 0, 0, 0, 0, 1)
	for name, stream := range map[string][]byte{
		"masked":                 masked,
		"reserved bits":          append([]byte{0x80 | 0x40 | opText, 1}, 'x'),
		"unknown opcode":         frame(true, 3, []byte("x")),
		"unknown control":        frame(true, 11, []byte("x")),
		"lone continuation":      frame(true, opContinuation, []byte("x")),
		"message in a message":   append(frame(false, opText, []byte("x")), frame(true, opText, []byte("y"))...),
		"fragmented ping":        frame(false, opPing, []byte("x")),
		"long ping":              frame(true, opPing, make([]byte, 126)),
		"length over 2^63":       long,
		"cut header":             frame(true, opText, make([]byte, 300))[:3],
		"cut payload":            frame(true, opText, make([]byte, 300))[:100],
		"cut large payload":      frame(true, opBinary, make([]byte, 9000))[:5000],
		"cut fragmented message": frame(false, opText, make([]byte, 30)),
	} {
		r, _ := newFrameReader(stream, 4096)
		_, _, _, _, err := r.next(limitOf)
		var pe errProtocol
		switch {
		case strings.HasPrefix(name, "cut"):
			if err != io.ErrUnexpectedEOF {
				t.Errorf("%s: %v, want an unexpected EOF", name, err)
			}
		case !errors.As(err, &pe):
			t.Errorf("%s: %v, want a protocol error", name, err)
		}
	}
}

// What a fuzzed server sends never panics the reader or gets a message
// over the limit through; and messages encoded from the fuzzer's bytes,
// whole or in fragments with pings between, come out as they went in.
func FuzzFrameReader(f *testing.F) {
	f.Add([]byte{0x81, 0x03, 'a', 'b', 'c'}, uint16(10), uint8(3))
	f.Add(fragments(opBinary, []byte("hello world"), 4), uint16(100), uint8(1))
	f.Add(frame(true, opText, make([]byte, 70000))[:300], uint16(65535), uint8(200))
	f.Add(frame(true, opText, make([]byte, 5000)), uint16(4000), uint8(0))
	f.Fuzz(func(t *testing.T, stream []byte, limit uint16, part uint8) {
		if len(stream) > 20000 {
			stream = stream[:20000]
		}
		limitOf := func(int) int64 { return int64(limit) }
		r, _ := newFrameReader(stream, 64)
		for i := 0; i < 1000; i++ {
			typ, b, _, over, err := r.next(limitOf)
			if err != nil {
				break
			}
			if typ != opText && typ != opBinary {
				t.Fatalf("type %d", typ)
			}
			if !over && len(b) > int(limit) || over && len(b) > 256 {
				t.Fatalf("%d bytes through a limit of %d (over %v)", len(b), limit, over)
			}
		}
		// Round trip: the stream's bytes as messages of up to 300 bytes.
		// It is read in pieces, and what the reader lends stays as it was
		// until it releases it (lendingReader).
		var enc []byte
		var msgs [][]byte
		var ends []int
		for rest := stream; len(rest) > 0; {
			n := min(len(rest), 1+int(rest[0])%300)
			msgs = append(msgs, rest[:n])
			if part == 0 {
				enc = append(enc, frame(true, opText, rest[:n])...)
			} else {
				enc = append(enc, fragments(opBinary, rest[:n], int(part))...)
			}
			ends = append(ends, len(enc))
			rest = rest[n:]
		}
		r, lc := lendingReader(t, enc, ends, 64)
		for i, m := range msgs {
			_, b, owned, over, err := r.next(func(int) int64 { return 300 })
			if err != nil || over || !bytes.Equal(b, m) {
				t.Fatalf("message %d of %d: %q over=%v err=%v, want %q", i, len(msgs), b, over, err, m)
			}
			lc.keep(b, owned)
		}
	})
}

// A server that sends its greeting in the same write as its handshake
// answer: the greeting is the stream's first event, not lost in the
// handshake reader's buffer.
func TestGreetingInTheHandshakeWriteIsRead(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		req, err := http.ReadRequest(bufio.NewReader(c))
		if err != nil {
			return
		}
		h := sha1.Sum([]byte(req.Header.Get("Sec-WebSocket-Key") + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"))
		out := []byte("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: " +
			base64.StdEncoding.EncodeToString(h[:]) + "\r\n\r\n")
		out = append(out, frame(true, opText, []byte(`{"type":"status","data":{"status":{"exec_info":{"queue_remaining":0}},"sid":"s"}}`))...)
		out = append(out, frame(true, opText, []byte(`{"type":"progress","data":{"value":1,"max":2,"prompt_id":"job-1","node":"3"}}`))...)
		c.Write(out) // one write: the greeting and an event behind the head
		io.Copy(io.Discard, c)
	}()
	core, logs := observer.New(zap.InfoLevel)
	u, err := NewUpstream("http://"+ln.Addr().String(), UpstreamOptions{Logger: zap.New(core)})
	if err != nil {
		t.Fatal(err)
	}
	defer u.Close()
	if err := u.ensureStream(t.Context()); err != nil {
		t.Fatal(err)
	}
	// The progress event of a job nobody follows yet is kept for it.
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(time.Millisecond) {
		u.mu.Lock()
		kept := len(u.orphans["job-1"])
		u.mu.Unlock()
		if kept == 1 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the event behind the greeting was not read; log: %v", logs.All())
		}
	}
}

// The reader lends what it hands out: a payload it does not say it owns
// stays as it was until the reader calls its release hook, which it does
// before it reads the connection again (and so before its buffer or its
// memory for large frames is reused) — across frames that fit the buffer,
// larger ones, fragmented ones and pings, read in small pieces.
func TestFrameReaderLendsUntilRelease(t *testing.T) {
	var stream []byte
	var msgs [][]byte
	var ends []int // where messages end in stream
	for i := 0; i < 300; i++ {
		n := []int{10, 100, 1000, 3000, 5000, 20000}[i%6]
		if i%7 == 0 {
			n = maxLent + 1 // owned
		}
		msg := fmt.Appendf(nil, "%d:", i)
		msg = append(msg, bytes.Repeat([]byte{byte('a' + i%26)}, n-len(msg))...)
		msgs = append(msgs, msg)
		if i%11 == 0 {
			stream = append(stream, fragments(opBinary, msg, 700)...)
		} else {
			stream = append(stream, frame(true, opBinary, msg)...)
		}
		ends = append(ends, len(stream))
		if i%5 == 1 {
			stream = append(stream, frame(true, opText, make([]byte, 40000))...) // over the limit: skipped
			ends = append(ends, len(stream))
		}
		if i%2 == 0 {
			stream = append(stream, frame(true, opPing, []byte("p"))...)
			ends = append(ends, len(stream))
		}
	}
	limit := func(typ int) int64 {
		if typ == opText {
			return 30000
		}
		return 2 << 20
	}
	r, lc := lendingReader(t, stream, ends, 4096)
	for i := range msgs {
		_, b, owned, over, err := r.next(limit)
		if err != nil || over {
			t.Fatalf("message %d: %v (over %v)", i, err, over)
		}
		if !bytes.Equal(b, msgs[i]) {
			t.Fatalf("message %d: read %q…", i, b[:min(8, len(b))])
		}
		if owned != (len(b) > maxLent || i%11 == 0 && len(b) > 700) {
			t.Fatalf("message %d of %d bytes: owned %v", i, len(b), owned)
		}
		lc.keep(b, owned)
		if i%5 == 1 {
			if _, _, _, over, err := r.next(limit); !over || err != nil {
				t.Fatalf("after message %d: over %v, %v", i, over, err)
			}
			lc.check("after a skipped frame")
		}
	}
	if lc.releases < 100 {
		t.Fatalf("only %d releases", lc.releases)
	}
}

// lendCheck checks the frame reader's lending: a payload it lends stays
// as it was until it calls release, and it calls release before it reads
// its connection (a pieces).
type lendCheck struct {
	t        testing.TB
	out      [][2][]byte // lent payloads and copies of what they were
	releases int
}

// lendingReader is a frame reader of stream, read in pieces (ends: where
// messages end) through a buffer of bufSize, whose lending is checked.
func lendingReader(t testing.TB, stream []byte, ends []int, bufSize int) (*wsReader, *lendCheck) {
	lc := &lendCheck{t: t}
	conn := &pieces{b: stream, ends: ends, before: func() {
		if len(lc.out) > 0 {
			t.Fatalf("the reader reads its connection with %d payloads lent", len(lc.out))
		}
	}}
	r := &wsReader{br: bufio.NewReaderSize(conn, bufSize)}
	r.release = func() {
		lc.check("at a release")
		lc.out = lc.out[:0]
		lc.releases++
	}
	return r, lc
}

// keep records a payload the reader handed out, unless it is owned.
func (lc *lendCheck) keep(b []byte, owned bool) {
	if !owned {
		lc.out = append(lc.out, [2][]byte{b, bytes.Clone(b)})
	}
	lc.check("after a read")
}

func (lc *lendCheck) check(when string) {
	lc.t.Helper()
	for _, l := range lc.out {
		if !bytes.Equal(l[0], l[1]) {
			lc.t.Fatalf("%s: a lent payload changed before it was released: %q, was %q", when, l[0][:min(8, len(l[0]))], l[1][:min(8, len(l[1]))])
		}
	}
}

// pieces is a connection that reads b in pieces of 1 to about 2000 bytes,
// many of them short, and most of them up to the next end of a message
// (as a server's writes often arrive) or a byte or two past it.
type pieces struct {
	b      []byte
	ends   []int // offsets in b where messages end
	off, i int
	before func() // called before each read
}

func (p *pieces) Read(q []byte) (int, error) {
	p.before()
	if len(p.b) == 0 {
		return 0, io.EOF
	}
	p.i++
	size := []int{1, 2, 3, 7, 100, 1000, 1999}[p.i*7919%7]
	for len(p.ends) > 0 && p.ends[0] <= p.off {
		p.ends = p.ends[1:]
	}
	if k := p.i % 4; k < 3 && len(p.ends) > 0 {
		size = p.ends[0] - p.off + k // (k bytes into the next frame's header)
	}
	n := copy(q[:min(len(q), size)], p.b)
	p.b, p.off = p.b[n:], p.off+n
	return n, nil
}
