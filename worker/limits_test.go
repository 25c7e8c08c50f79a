package worker

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"slices"
	"strings"
	"testing"
)

// oversizedRecorder also counts the frames the client skipped.
type oversizedRecorder struct {
	*recorder
	skipped int
}

func (o *oversizedRecorder) Oversized(n int) { o.skipped = n }

// A worker stream with an oversized event and an oversized preview in the
// middle of a job: the client skips both and the job goes on to its end.
func TestClientSkipsOversizedFrames(t *testing.T) {
	ts := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		_, _ = io.Copy(io.Discard, r.Body)
		w.Header().Set("Content-Type", ContentType)
		fw := NewWriter(w)
		_ = fw.WriteJSON(KindAccepted, AcceptedInfo{PromptID: "p", Number: 1})
		_ = fw.Write(KindEvent, []byte(`{"type":"execution_start","data":{"prompt_id":"p"}}`))
		_ = fw.Write(KindEvent, []byte(`{"type":"progress","data":{"prompt_id":"p","node":"2","pad":"`+strings.Repeat("x", 8<<10)+`"}}`))
		_ = fw.Write(KindBinary, []byte{0, 0, 0, 1, 0, 0, 0, 1}, bytes.Repeat([]byte{0xff}, 64<<10))
		_ = fw.Write(KindBinary, []byte{0, 0, 0, 1, 0, 0, 0, 1}, []byte("small jpeg"))
		_ = fw.Write(KindEvent, []byte(`{"type":"execution_success","data":{"prompt_id":"p"}}`))
		_ = fw.Write(KindDone)
	}))
	defer ts.Close()
	rec := &oversizedRecorder{recorder: newRecorder(t)}
	c := &Client{URL: ts.URL, MaxEventSize: 4 << 10, MaxBinarySize: 32 << 10}
	if err := c.Run(context.Background(), Job{PromptID: "p", Prompt: json.RawMessage(`{}`)}, rec); err != nil {
		t.Fatalf("the job did not go on: %v", err)
	}
	if want := []string{"accepted", "event:execution_start", "<binary>", "event:execution_success"}; !slices.Equal(rec.log, want) {
		t.Fatalf("handler got %v, want %v", rec.log, want)
	}
	if rec.skipped != 2 {
		t.Fatalf("told of %d skipped frames, want 2", rec.skipped)
	}
}
