package dispatch

import (
	"bytes"
	"strings"
	"testing"

	"github.com/gorilla/websocket"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"
)

// A frame up to the limit is read whole; a larger one is read to its end
// and reported over, keeping only its first bytes.
func TestReadFrameLimit(t *testing.T) {
	const limit = 10000
	var scratch []byte
	for _, n := range []int{0, 1, 511, 4096, limit - 1, limit, limit + 1, 3 * limit} {
		in := bytes.Repeat([]byte("ab"), n)[:n]
		rd := strings.NewReader(string(in))
		b, over, err := readFrame(rd, limit, &scratch)
		if err != nil {
			t.Fatal(err)
		}
		if over != (n > limit) {
			t.Fatalf("%d bytes: over=%v", n, over)
		}
		if !over && !bytes.Equal(b, in) {
			t.Fatalf("%d bytes: read %d", n, len(b))
		}
		if over && (len(b) > 256 || rd.Len() != 0) {
			t.Fatalf("%d bytes over: kept %d, left %d unread", n, len(b), rd.Len())
		}
	}
}

// Oversized frames are logged once per job the server runs, not per frame.
func TestOversizedLoggedOncePerJob(t *testing.T) {
	core, logs := observer.New(zap.WarnLevel)
	u, err := NewUpstream("http://127.0.0.1:1", UpstreamOptions{Logger: zap.New(core)})
	if err != nil {
		t.Fatal(err)
	}
	for _, job := range []string{"a", "a", "a", "b", "b"} {
		u.mu.Lock()
		u.running = job
		u.mu.Unlock()
		u.oversized(websocket.TextMessage, []byte(`{"type":"progress"`), 10)
	}
	if n := logs.Len(); n != 2 {
		t.Fatalf("%d log lines for oversized frames of 2 jobs, want 2", n)
	}
}
