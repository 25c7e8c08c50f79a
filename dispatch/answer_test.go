package dispatch

import (
	"bytes"
	"context"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

// A GPU server whose /history answer does not end (or is larger than any
// real one) is read only up to MaxAnswer: the gateway, which decodes the
// answer in memory, says the answer is too large instead of growing with
// it. (It read on until the request's timeout: gigabytes on a fast link.)
func TestEndlessAnswerIsCut(t *testing.T) {
	var sent atomic.Int64
	chunk := bytes.Repeat([]byte("a"), 1<<20)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		n, _ := w.Write([]byte(`{"x":{"outputs":"`))
		sent.Add(int64(n))
		// "Endless", but within what a test may cost if it is not cut.
		for i := 0; i < 3*MaxAnswer>>20; i++ {
			n, err := w.Write(chunk)
			sent.Add(int64(n))
			if err != nil {
				return
			}
		}
	}))
	defer srv.Close()
	up, err := NewUpstream(srv.URL, UpstreamOptions{})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	var hist map[string]historyEntry
	err = up.GetJSON(ctx, "/history/x", &hist)
	if err == nil || !strings.Contains(err.Error(), "larger than 64 MiB") {
		t.Fatalf("error %v, want the answer too large", err)
	}
	srv.CloseClientConnections()
	if n := sent.Load(); n > MaxAnswer+16<<20 {
		t.Fatalf("the gateway read %d MiB of the answer", n>>20)
	}
}
