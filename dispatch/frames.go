package dispatch

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"time"

	"github.com/gorilla/websocket"
)

// An upstream's event stream is dialed with gorilla (the handshake, and
// every write: the feature flags, pongs, the close), but its frames are
// read here. Gorilla's reader allocates per message and copies every
// payload out of its buffer; this one lends each frame where it lies in
// its memory until it calls its release hook, which it does before it
// reuses that memory, and the stream copies only what it keeps longer
// (event.own). RFC 6455 §5, as a client reads it: frames from the
// server are never masked, no extension is negotiated (so the reserved
// bits are 0), control frames are at most 125 bytes and never fragmented,
// and a message may come in fragments with control frames between them.

// Frame opcodes (RFC 6455 §5.2).
const (
	opContinuation = 0
	opText         = 1 // = websocket.TextMessage
	opBinary       = 2 // = websocket.BinaryMessage
	opClose        = 8
	opPing         = 9
	opPong         = 10
)

// streamReadBuffer is the read buffer of an upstream's event stream: a
// frame up to this size is handed out without a copy.
const streamReadBuffer = 32 << 10

// errProtocol is a frame no server may send; the stream is dropped and
// dialed again.
type errProtocol string

func (e errProtocol) Error() string { return "websocket protocol error: " + string(e) }

// maxLent is the largest frame over the read buffer's size that is read
// into memory the reader keeps and lends (a preview); a larger one is read
// into a slice of its own.
const maxLent = 1 << 20

// wsReader reads the frames of one upstream connection (see above).
type wsReader struct {
	br *bufio.Reader
	// control answers a ping, a pong or a close (payload valid during the
	// call); an error ends the stream (a close's is a *websocket.CloseError).
	control func(op int, payload []byte) error
	// release is called before the reader reads from its connection, which
	// is when it may reuse the memory of the payloads it lent: until then
	// they stay as they were. (nil: nothing to call.)
	release func()
	// skip is the size of the frame handed out last from br's buffer,
	// discarded on the next call.
	skip int
	// msg assembles a fragmented message.
	msg []byte
	// big holds the latest frame larger than br's buffer (up to maxLent).
	big []byte
}

// next returns the next message: its type (opText or opBinary) and its
// payload, lent until the reader next calls release (owned: b is a new
// slice of its own, which the caller may keep). A message over limit(typ)
// bytes is read to its end and discarded: over is true and b holds at
// most its first 256 bytes.
func (r *wsReader) next(limit func(typ int) int64) (typ int, b []byte, owned, over bool, err error) {
	if r.skip > 0 {
		if _, err := r.br.Discard(r.skip); err != nil {
			return 0, nil, false, false, err
		}
		r.skip = 0
	}
	r.msg = r.msg[:0]
	var max, size int64 // the message's limit, and its bytes so far
	for {
		fin, op, n, err := r.header()
		if err != nil {
			if typ != 0 {
				err = unexpected(err) // inside a fragmented message
			}
			return 0, nil, false, false, err
		}
		if op >= opClose {
			if err := r.controlFrame(op, n); err != nil {
				return 0, nil, false, false, err
			}
			continue
		}
		switch {
		case op == opContinuation && typ == 0:
			return 0, nil, false, false, errProtocol("continuation frame outside a message")
		case (op == opText || op == opBinary) && typ != 0:
			return 0, nil, false, false, errProtocol("new message inside a fragmented one")
		case op == opText || op == opBinary:
			typ, max = op, limit(op)
		case op != opContinuation:
			return 0, nil, false, false, errProtocol("unknown opcode")
		}
		if over || size+n > max {
			if !over && len(b) == 0 {
				b = append(b, r.msg[:min(len(r.msg), 256)]...)
				if len(b) < 256 {
					head, _ := r.br.Peek(int(min(n, int64(256-len(b)), int64(r.br.Buffered()))))
					b = append(b, head...)
				}
			}
			over = true
			if err := r.discard(n); err != nil {
				return 0, nil, false, false, err
			}
			if fin {
				return typ, b, false, true, nil
			}
			continue
		}
		size += n
		switch {
		case fin && len(r.msg) == 0 && n <= int64(r.br.Size()):
			// The common case: the frame is the message, and it fits the
			// buffer.
			r.need(n)
			p, err := r.br.Peek(int(n))
			if err != nil {
				return 0, nil, false, false, unexpected(err)
			}
			r.skip = int(n)
			return typ, p, false, false, nil
		case fin && len(r.msg) == 0:
			// A frame larger than the buffer (a preview): straight into
			// the reader's own memory for large frames (lent as the
			// buffer is), or, past maxLent, a slice of its own.
			r.need(n)
			owned := n > maxLent
			var p []byte
			if owned {
				p = make([]byte, n)
			} else {
				if int64(cap(r.big)) < n {
					r.big = make([]byte, n, min(maxLent, 2*n))
				}
				p = r.big[:n]
			}
			if _, err := io.ReadFull(r.br, p); err != nil {
				return 0, nil, false, false, unexpected(err)
			}
			return typ, p, owned, false, nil
		}
		start := len(r.msg)
		r.msg = append(r.msg, make([]byte, n)...)
		r.need(n)
		if _, err := io.ReadFull(r.br, r.msg[start:]); err != nil {
			return 0, nil, false, false, unexpected(err)
		}
		if fin {
			// A fragmented message (rare): its own slice.
			b, r.msg = r.msg, nil
			return typ, b, true, false, nil
		}
	}
}

// need releases what the reader lent when reading n more bytes needs its
// connection: its buffer holds fewer.
func (r *wsReader) need(n int64) {
	if int64(r.br.Buffered()) < n && r.release != nil {
		r.release()
	}
}

// header reads a frame's header: fin, opcode and payload length.
func (r *wsReader) header() (fin bool, op int, n int64, err error) {
	r.need(2)
	h, err := r.br.Peek(2)
	if err != nil {
		if len(h) > 0 {
			err = unexpected(err)
		}
		return false, 0, 0, err
	}
	b0, b1 := h[0], h[1]
	if b0&0x70 != 0 {
		return false, 0, 0, errProtocol("reserved bits set (no extension was negotiated)")
	}
	if b1&0x80 != 0 {
		return false, 0, 0, errProtocol("masked frame from the server")
	}
	fin, op = b0&0x80 != 0, int(b0&0x0f)
	hl := 2
	switch b1 & 0x7f {
	case 126:
		hl = 4
	case 127:
		hl = 10
	}
	if hl > 2 {
		r.need(int64(hl))
		if h, err = r.br.Peek(hl); err != nil {
			return false, 0, 0, unexpected(err)
		}
	}
	switch b1 & 0x7f {
	case 126:
		n = int64(binary.BigEndian.Uint16(h[2:4]))
	case 127:
		u := binary.BigEndian.Uint64(h[2:10])
		if u>>63 != 0 {
			return false, 0, 0, errProtocol("frame length over 2^63")
		}
		n = int64(u)
	default:
		n = int64(b1 & 0x7f)
	}
	if op >= opClose && (!fin || n > 125) {
		return false, 0, 0, errProtocol("fragmented or oversized control frame")
	}
	if _, err := r.br.Discard(hl); err != nil {
		return false, 0, 0, unexpected(err)
	}
	return fin, op, n, nil
}

// controlFrame reads a control frame's payload and answers it.
func (r *wsReader) controlFrame(op int, n int64) error {
	if op > opPong {
		return errProtocol("unknown control opcode")
	}
	r.need(n)
	p, err := r.br.Peek(int(n))
	if err != nil {
		return unexpected(err)
	}
	if r.control != nil {
		if err := r.control(op, p); err != nil {
			return err
		}
	}
	_, err = r.br.Discard(int(n))
	return unexpected(err)
}

// discard skips n bytes of payload.
func (r *wsReader) discard(n int64) error {
	r.need(n)
	for n > 0 {
		k, err := r.br.Discard(int(min(n, 1<<30)))
		n -= int64(k)
		if err != nil {
			return unexpected(err)
		}
	}
	return nil
}

// unexpected is err, with an end of input inside a frame made an
// unexpected one.
func unexpected(err error) error {
	if err == io.EOF {
		return io.ErrUnexpectedEOF
	}
	return err
}

// answerControl answers an upstream's control frames on conn (whose
// writes gorilla serialises): a ping with a pong, a close with the same
// close, which then ends the stream with a *websocket.CloseError.
func answerControl(conn *websocket.Conn) func(op int, payload []byte) error {
	return func(op int, payload []byte) error {
		deadline := time.Now().Add(5 * time.Second)
		switch op {
		case opPing:
			err := conn.WriteControl(websocket.PongMessage, payload, deadline)
			if err != nil && !errors.Is(err, websocket.ErrCloseSent) {
				var ne net.Error
				if errors.As(err, &ne) && ne.Timeout() {
					return nil // a slow peer: the next read tells
				}
				return err
			}
		case opClose:
			code, text := websocket.CloseNoStatusReceived, ""
			reply := []byte{}
			if len(payload) >= 2 {
				code, text = int(binary.BigEndian.Uint16(payload)), string(payload[2:])
				reply = websocket.FormatCloseMessage(code, "")
			}
			_ = conn.WriteControl(websocket.CloseMessage, reply, deadline)
			return &websocket.CloseError{Code: code, Text: text}
		}
		return nil
	}
}

// handshakeConn is an upstream's event connection as the stream reads it.
// Until its handshake is over it hands out no byte past the end of the
// HTTP response's head, so gorilla's handshake reader keeps nothing the
// stream's own frame reader would miss. Only the stream's goroutine reads
// it.
type handshakeConn struct {
	net.Conn
	// During the handshake: the bytes read from the network and not yet
	// handed out (pre), how many of them belong to the head (headEnd,
	// 0 while the head's end is not seen), and handshake itself.
	handshake bool
	pre       []byte
	headEnd   int
}

func (c *handshakeConn) Read(p []byte) (int, error) {
	if c.handshake {
		return c.readHandshake(p)
	}
	if len(c.pre) > 0 {
		n := copy(p, c.pre)
		c.pre = c.pre[n:]
		if len(c.pre) == 0 {
			c.pre = nil
		}
		return n, nil
	}
	return c.Conn.Read(p)
}

// readHandshake hands out the response's head and nothing after it.
func (c *handshakeConn) readHandshake(p []byte) (int, error) {
	for c.headEnd == 0 {
		if i := bytes.Index(c.pre, []byte("\r\n\r\n")); i >= 0 {
			c.headEnd = i + 4
			break
		}
		if len(c.pre) > 64<<10 {
			return 0, errors.New("websocket handshake: response head over 64 KiB")
		}
		buf := make([]byte, 4096)
		n, err := c.Conn.Read(buf)
		c.pre = append(c.pre, buf[:n]...)
		if err != nil && n == 0 {
			if len(c.pre) > 0 {
				break // (hand out what there is; the parser tells)
			}
			return 0, err
		}
	}
	end := c.headEnd
	if end == 0 {
		end = len(c.pre)
	}
	n := copy(p, c.pre[:end])
	c.pre = c.pre[n:]
	if c.headEnd > 0 {
		c.headEnd -= n
		if c.headEnd == 0 {
			c.handshake = false // the head is out: the rest is the stream's
		}
	}
	return n, nil
}

// streamDialer returns a dialer for the upstream's event stream whose
// connections are handshakeConns, and the latest connection it made.
func (u *Upstream) streamDialer() (*websocket.Dialer, func() *handshakeConn) {
	var last *handshakeConn
	d := *u.dialer
	// Gorilla's reader reads only the handshake's response.
	d.ReadBufferSize = 4 << 10
	wrap := func(c net.Conn) net.Conn {
		last = &handshakeConn{Conn: c, handshake: true}
		return last
	}
	d.NetDialContext = func(ctx context.Context, network, addr string) (net.Conn, error) {
		c, err := (&net.Dialer{}).DialContext(ctx, network, addr)
		if err != nil {
			return nil, err
		}
		return wrap(c), nil
	}
	// With TLS the wrapper must sit above it (the head's end is found in
	// plain text), so the dialer does the TLS handshake itself.
	d.NetDialTLSContext = func(ctx context.Context, network, addr string) (net.Conn, error) {
		c, err := (&net.Dialer{}).DialContext(ctx, network, addr)
		if err != nil {
			return nil, err
		}
		host, _, _ := net.SplitHostPort(addr)
		cfg := &tls.Config{}
		if u.dialer.TLSClientConfig != nil {
			cfg = u.dialer.TLSClientConfig.Clone()
		}
		if cfg.ServerName == "" {
			cfg.ServerName = host
		}
		tc := tls.Client(c, cfg)
		if err := tc.HandshakeContext(ctx); err != nil {
			c.Close()
			return nil, err
		}
		return wrap(tc), nil
	}
	return &d, func() *handshakeConn { return last }
}
