package dispatch

import (
	"bytes"
	"context"
	"io"
	"net/http"
	"net/http/httptest"
	"testing"
)

// A body in parts reaches the GPU server as the parts joined, with its
// Content-Length (not chunked), and can be sent again from the start.
func TestPostJSONParts(t *testing.T) {
	type got struct {
		body     []byte
		length   int64
		encoding []string
	}
	seen := make(chan got, 1)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		b, _ := io.ReadAll(r.Body)
		seen <- got{b, r.ContentLength, r.TransferEncoding}
		w.Write([]byte(`{"ok":true}`))
	}))
	defer srv.Close()
	up, err := NewUpstream(srv.URL, UpstreamOptions{})
	if err != nil {
		t.Fatal(err)
	}
	parts := [][]byte{[]byte(`{"prompt":{},"extra_data":{"workflow":`), bytes.Repeat([]byte(" "), 100<<10), []byte(`{}}}`)}
	want := bytes.Join(parts, nil)
	status, rb, err := up.PostJSON(context.Background(), "/prompt", parts)
	if err != nil || status != 200 || string(rb) != `{"ok":true}` {
		t.Fatalf("PostJSON: %d %q %v", status, rb, err)
	}
	g := <-seen
	if !bytes.Equal(g.body, want) || g.length != int64(len(want)) || len(g.encoding) != 0 {
		t.Fatalf("server got %d bytes (Content-Length %d, %v), want %d", len(g.body), g.length, g.encoding, len(want))
	}

	// Rewindable, as a []byte body is (the transport re-sends a request
	// whose reused connection was closed before it was written).
	req, _ := up.NewRequest(context.Background(), http.MethodPost, "/prompt", nil)
	setParts(req, parts)
	for i := 0; i < 2; i++ {
		body, err := req.GetBody()
		if err != nil {
			t.Fatal(err)
		}
		if b, _ := io.ReadAll(body); !bytes.Equal(b, want) {
			t.Fatalf("GetBody #%d: %d bytes, want %d", i, len(b), len(want))
		}
	}
}
