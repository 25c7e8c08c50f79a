package dispatch

import (
	"testing"

	"github.com/gorilla/websocket"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"
)

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
