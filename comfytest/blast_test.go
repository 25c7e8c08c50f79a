package comfytest

import (
	"encoding/binary"
	"reflect"
	"sync"
	"testing"
	"time"

	"github.com/google/uuid"
)

// The options for event benchmarks: no step delay, a preview every
// PreviewEvery steps padded to PreviewBytes, and OnSend telling which
// frame went out when.
func TestBlastPreviewEveryAndOnSend(t *testing.T) {
	var (
		mu   sync.Mutex
		sent []SentFrame
	)
	srv := Start(t, Options{Version: "2026", StepDelay: -1, PreviewEvery: 10, PreviewBytes: 64 << 10,
		OnSend: func(f SentFrame) {
			mu.Lock()
			sent = append(sent, f)
			mu.Unlock()
		}})
	ws := dialWS(t, srv.URL(), "blast")
	ws.next()
	ws.sendJSON(browserFlags)
	ws.next()
	pid := uuid.NewString()
	wf := samplerWorkflow("b")
	wf["2"].(map[string]any)["inputs"].(map[string]any)["steps"] = 50
	queuePrompt(t, srv.URL(), map[string]any{"prompt": wf, "client_id": "blast", "prompt_id": pid})
	frames := ws.untilDone(pid)
	start := time.Now()

	var progress, previews []int
	step := 0
	for _, f := range frames {
		switch f.typ {
		case "progress":
			step = int(f.data["value"].(float64))
			progress = append(progress, step)
		case "<binary>":
			if binary.BigEndian.Uint32(f.raw) != 4 || len(f.raw) < 64<<10 {
				t.Fatalf("preview: type %d, %d bytes", binary.BigEndian.Uint32(f.raw), len(f.raw))
			}
			previews = append(previews, step+1) // a preview goes out before its step's progress
		}
	}
	if len(progress) != 50 || progress[49] != 50 {
		t.Fatalf("progress values %v", progress)
	}
	if want := []int{10, 20, 30, 40, 50}; !reflect.DeepEqual(previews, want) {
		t.Fatalf("previews at steps %v, want %v", previews, want)
	}

	// OnSend saw every frame the socket got, in order, with its prompt and
	// step, before it arrived.
	mu.Lock()
	defer mu.Unlock()
	if len(sent) != len(frames)+2 { // + the greeting and feature_flags
		t.Fatalf("OnSend saw %d frames, the socket got %d (+2)", len(sent), len(frames))
	}
	var sentProgress, sentPreviews []int
	for i, f := range sent[2:] {
		want := frames[i].typ
		if want == "<binary>" {
			want = "preview"
		}
		if f.Type != want || f.SID != "blast" || f.Bytes != len(frames[i].raw) || f.Binary != (want == "preview") {
			t.Fatalf("OnSend frame %d: %+v, socket got %s", i, f, frames[i].raw[:min(80, len(frames[i].raw))])
		}
		if f.Time.After(start) || f.Queued.IsZero() || f.Queued.After(f.Time) {
			t.Fatalf("OnSend frame %d queued at %v, written at %v, arrived by %v", i, f.Queued, f.Time, start)
		}
		switch f.Type {
		case "progress":
			sentProgress = append(sentProgress, f.Value)
		case "preview":
			sentPreviews = append(sentPreviews, f.Value)
		}
		if (f.Type == "progress" || f.Type == "preview" || f.Type == "executing") && f.PromptID != pid {
			t.Fatalf("OnSend frame %d: prompt %q, want %q", i, f.PromptID, pid)
		}
	}
	if !reflect.DeepEqual(sentProgress, progress) || !reflect.DeepEqual(sentPreviews, previews) {
		t.Fatalf("OnSend progress %v previews %v", sentProgress, sentPreviews)
	}
	if sent[0].Type != "status" || sent[0].PromptID != "" || sent[1].Type != "feature_flags" {
		t.Fatalf("OnSend greeting %+v %+v", sent[0], sent[1])
	}
}

// FixedRate keeps steps on a clock: step i is never sent before i×5 ms
// after the sampler started (and so after the prompt was posted).
func TestFixedRateSteps(t *testing.T) {
	var (
		mu    sync.Mutex
		times []time.Time
	)
	srv := Start(t, Options{StepDelay: 5 * time.Millisecond, FixedRate: true,
		OnSend: func(f SentFrame) {
			if f.Type == "progress" {
				mu.Lock()
				times = append(times, f.Queued)
				mu.Unlock()
			}
		}})
	ws := dialWS(t, srv.URL(), "paced")
	ws.next()
	wf := samplerWorkflow("p")
	wf["2"].(map[string]any)["inputs"].(map[string]any)["steps"] = 20
	t0 := time.Now()
	id := queuePrompt(t, srv.URL(), map[string]any{"prompt": wf, "client_id": "paced"})
	ws.untilDone(id)
	mu.Lock()
	defer mu.Unlock()
	if len(times) != 20 {
		t.Fatalf("%d progress frames", len(times))
	}
	for i, at := range times {
		if d := at.Sub(t0); d < time.Duration(i+1)*5*time.Millisecond {
			t.Fatalf("step %d sent %v after the POST, before its slot", i+1, d)
		}
	}
}
