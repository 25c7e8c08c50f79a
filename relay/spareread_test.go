package relay

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/gorilla/websocket"
)

// Frames of every size, sent back to back so that many share one read
// and the big ones span many, reach a socket read through a spareReader
// whole and in order, both ways (the home side dials through dialSpare;
// the browser side is a hijacked connection wrapped as browserConn).
func TestSpareReaderKeepsFramesWhole(t *testing.T) {
	sizes := []int{0, 1, 2, 100, 125, 126, 127, 128, 129, 1000, readChunk - 1, readChunk, readChunk + 1, 3*readChunk + 7, 300 << 10}
	payload := func(i, n int) []byte {
		b := make([]byte, n)
		for j := range b {
			b[j] = byte(i*31 + j*7)
		}
		return b
	}
	up := websocket.Upgrader{ReadBufferSize: frameHeadBuffer}
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		hj := &hijacker{ResponseWriter: w, s: newSocket(0)}
		c, err := up.Upgrade(hj, r, nil)
		if err != nil {
			return
		}
		defer c.Close()
		// What the browser sent comes back from here, on the raw
		// connection (the browserConn queues what gorilla writes).
		var out bytes.Buffer
		for range 2 * len(sizes) {
			typ, b, err := c.ReadMessage()
			if err != nil {
				return
			}
			out.Write(appendHeader(nil, typ, len(b)))
			out.Write(b)
		}
		_, _ = hj.conn.Conn.Write(out.Bytes())
		_, _, _ = c.ReadMessage()
	}))
	defer srv.Close()

	c, _, err := homeDialer.Dial("ws"+strings.TrimPrefix(srv.URL, "http"), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	for round := range 2 {
		for i, n := range sizes {
			if err := c.WriteMessage(websocket.BinaryMessage, payload(round*100+i, n)); err != nil {
				t.Fatal(err)
			}
		}
	}
	_ = c.SetReadDeadline(time.Now().Add(30 * time.Second))
	for round := range 2 {
		for i, n := range sizes {
			typ, b, err := c.ReadMessage()
			if err != nil {
				t.Fatalf("frame %d of %d bytes: %v", i, n, err)
			}
			if typ != websocket.BinaryMessage || !bytes.Equal(b, payload(round*100+i, n)) {
				t.Fatalf("frame %d of %d bytes came back as %d bytes of type %d, not as sent", i, n, len(b), typ)
			}
		}
	}
}

// Read deadlines and the peer's close end a wait that holds no buffer as
// they end any read.
func TestSpareReaderDeadlineAndEOF(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	accepted := make(chan net.Conn, 1)
	go func() {
		c, err := ln.Accept()
		if err == nil {
			accepted <- c
		}
	}()
	c, err := dialSpare(context.Background(), "tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	peer := <-accepted

	p := make([]byte, frameHeadBuffer)
	_ = c.SetReadDeadline(time.Now().Add(50 * time.Millisecond))
	if _, err := c.Read(p); !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("read past its deadline: %v, want a deadline error", err)
	}
	_ = c.SetReadDeadline(time.Time{})
	if _, err := peer.Write([]byte("abc")); err != nil {
		t.Fatal(err)
	}
	peer.Close()
	var got []byte
	for {
		n, err := c.Read(p[:2])
		got = append(got, p[:n]...)
		if err != nil {
			if !errors.Is(err, io.EOF) {
				t.Fatalf("read after the peer closed: %v, want EOF", err)
			}
			break
		}
	}
	if string(got) != "abc" {
		t.Fatalf("read %q, want %q", got, "abc")
	}
}
