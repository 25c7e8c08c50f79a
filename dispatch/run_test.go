package dispatch

import (
	"context"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/comfyume/comfyume/comfy"
)

// browserFeed is an Events whose deliveries are what the job's browser
// would get; Capture blocks on executed events until release is closed.
type browserFeed struct {
	release chan struct{}
	mu      sync.Mutex
	got     []Event
	ended   chan struct{}
}

func (f *browserFeed) Capture(ctx context.Context, to Recipient, up *Upstream, ev *Event) error {
	<-f.release
	return nil
}

func (f *browserFeed) Deliver(to Recipient, ev Event) {
	f.mu.Lock()
	f.got = append(f.got, ev)
	f.mu.Unlock()
	if ev.Type == comfy.MsgExecuting && strings.Contains(string(ev.JSON), `"node":null`) {
		close(f.ended)
	}
}

func (f *browserFeed) QueueChanged(string) {}

// releaseUntilEnd lets the capture go and waits for the job's end.
func (f *browserFeed) releaseUntilEnd(t *testing.T) {
	t.Helper()
	close(f.release)
	select {
	case <-f.ended:
	case <-time.After(30 * time.Second):
		t.Fatal("the job never ended")
	}
}

// upstreamEvent is a JSON frame as an upstream sends it, routed.
// ptr is a pointer to a copy of ev.
func ptr(ev event) *event { return &ev }

func upstreamEvent(t testing.TB, frame string) event {
	h, ok := comfy.ScanEvent([]byte(frame))
	if !ok {
		t.Fatalf("bad frame %s", frame)
	}
	return event{json: []byte(frame), head: h}
}

func previewEvent(t testing.TB, pid, node string, n int) event {
	md := fmt.Sprintf(`{"node_id":%q,"prompt_id":%q,"display_node_id":%q,"real_node_id":%q,"image_type":"image/jpeg"}`, node, pid, node, node)
	b := binary.BigEndian.AppendUint32(nil, comfy.BinaryPreviewImageWithMetadata)
	b = binary.BigEndian.AppendUint32(b, uint32(len(md)))
	b = append(append(b, md...), make([]byte, n)...)
	ev, _, ok := binaryEvent(b)
	if !ok {
		t.Fatal("bad preview")
	}
	return ev
}

// capturingJob is job-1 of alice with a job queue bound, whose output
// capture blocks until feed.release is closed.
func capturingJob(bound int64) (*Manager, *browserFeed, *run) {
	feed := &browserFeed{release: make(chan struct{}), ended: make(chan struct{})}
	m := NewManager(NewMemoryStore(), feed, nil)
	m.SetEventLimits(EventLimits{MaxJobQueue: bound})
	r := newRun(m, &Job{ID: "job-1", User: "alice", ClientID: "tab", Status: StatusPending})
	m.runs.put(r)
	return m, feed, r
}

// While a job's goroutine is stuck (capturing an output), an endless
// stream of progress and previews does not grow its queue past the bound;
// once it is free, the browser gets every lifecycle event in order and the
// latest progress and preview.
func TestJobQueueBoundedWhileBusy(t *testing.T) {
	const bound = 256 << 10
	_, feed, r := capturingJob(bound)
	job := r.job
	const pid = "gpu-own-id" // a server that made its own id

	r.push(upstreamEvent(t, `{"type":"execution_start","data":{"prompt_id":"`+pid+`","timestamp":1}}`))
	r.push(upstreamEvent(t, `{"type":"executing","data":{"node":"1","display_node":"1","prompt_id":"`+pid+`"}}`))
	r.push(upstreamEvent(t, `{"type":"executed","data":{"node":"1","display_node":"1","output":{"images":[]},"prompt_id":"`+pid+`"}}`))
	r.push(upstreamEvent(t, `{"type":"executing","data":{"node":"2","display_node":"2","prompt_id":"`+pid+`"}}`))
	peak := int64(0)
	const n = 100000
	for i := 1; i <= n; i++ {
		r.push(upstreamEvent(t, fmt.Sprintf(`{"type":"progress","data":{"value":%d,"max":%d,"prompt_id":%q,"node":"2"}}`, i, n, pid)))
		if i%100 == 0 {
			r.push(previewEvent(t, pid, "2", 4<<10+i/100))
		}
		r.mu.Lock()
		peak = max(peak, r.qBytes)
		r.mu.Unlock()
	}
	r.push(upstreamEvent(t, `{"type":"executed","data":{"node":"2","display_node":"2","output":{"text":["done"]},"prompt_id":"`+pid+`"}}`))
	r.push(upstreamEvent(t, `{"type":"execution_success","data":{"prompt_id":"`+pid+`","timestamp":2}}`))
	if peak > bound {
		t.Fatalf("the job's queue grew to %d bytes (bound %d)", peak, bound)
	}
	feed.releaseUntilEnd(t)

	feed.mu.Lock()
	defer feed.mu.Unlock()
	var lifecycle []string
	progress, previews, lastValue, lastPreview := 0, 0, 0, 0
	for _, ev := range feed.got {
		if ev.Preview != nil {
			previews++
			lastPreview = len(ev.Preview.Image)
			continue
		}
		var msg struct {
			Type string `json:"type"`
			Data struct {
				PromptID string `json:"prompt_id"`
				Node     any    `json:"node"`
				Value    int    `json:"value"`
			} `json:"data"`
		}
		if err := json.Unmarshal(ev.JSON, &msg); err != nil || msg.Type != ev.Type {
			t.Fatalf("browser got %q (%v)", ev.JSON, err)
		}
		if msg.Data.PromptID != job.ID {
			t.Fatalf("%s carries prompt_id %q, want the job's %q", msg.Type, msg.Data.PromptID, job.ID)
		}
		if msg.Type == comfy.MsgProgress {
			if msg.Data.Value <= lastValue {
				t.Fatalf("progress went back from %d to %d", lastValue, msg.Data.Value)
			}
			progress, lastValue = progress+1, msg.Data.Value
			continue
		}
		lifecycle = append(lifecycle, fmt.Sprintf("%s:%v", msg.Type, msg.Data.Node))
	}
	want := []string{"execution_start:<nil>", "executing:1", "executed:1", "executing:2", "executed:2", "execution_success:<nil>", "executing:<nil>"}
	if !slices.Equal(lifecycle, want) {
		t.Fatalf("browser got lifecycle %v, want %v", lifecycle, want)
	}
	if lastValue != n {
		t.Fatalf("the last progress the browser got is %d, want %d", lastValue, n)
	}
	if lastPreview != 4<<10+n/100 {
		t.Fatalf("the last preview the browser got has %d bytes, want the latest (%d)", lastPreview, 4<<10+n/100)
	}
	if progress >= n {
		t.Fatalf("all %d progress events were queued", progress)
	}
	t.Logf("queue peak %d bytes; browser got %d of %d progress events, %d of %d previews", peak, progress, n, previews, n/100)
}

// A GPU server that floods a job with lifecycle events (executing, over
// and over) while the job's goroutine is stuck capturing an output cannot
// grow the job's queue past twice its bound: the job ends with an
// execution_error that says why, and nothing more of it is queued.
func TestLifecycleFloodEndsTheJob(t *testing.T) {
	const bound = 64 << 10
	m, feed, r := capturingJob(bound)
	job := r.job
	r.push(upstreamEvent(t, `{"type":"execution_start","data":{"prompt_id":"job-1","timestamp":1}}`))
	r.push(upstreamEvent(t, `{"type":"executed","data":{"node":"1","display_node":"1","output":{"images":[]},"prompt_id":"job-1"}}`))
	peak := int64(0)
	const n = 20000 // about 1.7 MiB of executing events
	for i := 0; i < n; i++ {
		r.push(upstreamEvent(t, fmt.Sprintf(`{"type":"executing","data":{"node":"%d","display_node":"%d","prompt_id":"job-1"}}`, i, i)))
		r.mu.Lock()
		peak = max(peak, r.qBytes)
		r.mu.Unlock()
	}
	if peak > 2*bound+1024 {
		t.Fatalf("the job's queue grew to %d bytes (twice the bound: %d)", peak, 2*bound)
	}
	feed.releaseUntilEnd(t)
	feed.mu.Lock()
	defer feed.mu.Unlock()
	last := feed.got[len(feed.got)-2] // (the end marker follows)
	if last.Type != comfy.MsgExecutionError || !strings.Contains(string(last.JSON), "more than 128 KiB of events") {
		t.Fatalf("the job ended with %s %s", last.Type, last.JSON)
	}
	if len(feed.got) > n/4 {
		t.Fatalf("the browser was handed %d events of the flood", len(feed.got))
	}
	if s, err := m.Store().JobSummary(context.Background(), job.ID); err != nil || s.Status != StatusFailed {
		t.Fatalf("the job's record: %+v %v", s, err)
	}
}

type discardEvents struct{}

func (discardEvents) Capture(context.Context, Recipient, *Upstream, *Event) error { return nil }
func (discardEvents) Deliver(Recipient, Event)                                    {}
func (discardEvents) QueueChanged(string)                                         {}

// BenchmarkProgressEvent is one upstream progress frame handled for a job
// with a large prompt record: scanned, routed and delivered, with no copy
// of the job record (allocs/op stays small whatever the record's size).
func BenchmarkProgressEvent(b *testing.B) {
	m := NewManager(NewMemoryStore(), discardEvents{}, nil)
	job := &Job{ID: "job-1", User: "alice", ClientID: "tab", Status: StatusInProgress,
		ExtraData: map[string]json.RawMessage{}, Outputs: map[string]json.RawMessage{}}
	for i := 0; i < 100; i++ {
		job.ExtraData[fmt.Sprint(i)] = json.RawMessage(`{}`)
		job.Outputs[fmt.Sprint(i)] = json.RawMessage(`{}`)
	}
	r := newRun(m, job)
	frame := []byte(`{"type": "progress", "data": {"value": 17, "max": 1000, "prompt_id": "job-1", "node": "3"}}`)
	b.ReportAllocs()
	for i := 0; i < b.N; i++ {
		h, ok := comfy.ScanEvent(frame)
		if !ok {
			b.Fatal("scan")
		}
		r.handle(&event{json: frame, head: h})
	}
}

// A server that makes its own prompt ids can send a job's first events —
// a thousand progress steps and a preview, on a fast GPU — before the
// gateway has its answer to POST /prompt and knows that id. They are kept
// and reach the job's browser once the id is known, previews included.
func TestEventsBeforeTheIDIsKnownReachTheBrowser(t *testing.T) {
	feed := &browserFeed{release: make(chan struct{}), ended: make(chan struct{})}
	close(feed.release)
	m := NewManager(NewMemoryStore(), feed, nil)
	up, err := NewUpstream("http://127.0.0.1:1", UpstreamOptions{})
	if err != nil {
		t.Fatal(err)
	}
	job := &Job{ID: "job-1", User: "alice", ClientID: "tab", Status: StatusPending}
	r := newRun(m, job)
	m.runs.put(r)
	const pid = "gpu-own-id"
	up.mu.Lock()
	up.routeLocked(pid, ptr(upstreamEvent(t, `{"type":"execution_start","data":{"prompt_id":"`+pid+`","timestamp":1}}`)))
	up.routeLocked(pid, ptr(upstreamEvent(t, `{"type":"executing","data":{"node":"3","display_node":"3","prompt_id":"`+pid+`"}}`)))
	for i := 1; i <= 1000; i++ {
		up.routeLocked(pid, ptr(upstreamEvent(t, fmt.Sprintf(`{"type":"progress","data":{"value":%d,"max":1000,"prompt_id":%q,"node":"3"}}`, i, pid))))
		if i%100 == 0 {
			up.routeLocked(pid, ptr(previewEvent(t, pid, "3", 64<<10)))
		}
	}
	up.mu.Unlock()
	up.register(pid, r)
	r.push(upstreamEvent(t, `{"type":"execution_success","data":{"prompt_id":"`+pid+`","timestamp":2}}`))
	select {
	case <-feed.ended:
	case <-time.After(5 * time.Second):
		t.Fatal("the job did not end")
	}
	feed.mu.Lock()
	defer feed.mu.Unlock()
	progress, previews := 0, 0
	for _, ev := range feed.got {
		switch {
		case ev.Type == comfy.MsgProgress:
			progress++
		case ev.Preview != nil:
			previews++
		}
	}
	if progress != 1000 || previews != 10 {
		t.Fatalf("the browser got %d of 1000 progress events and %d of 10 previews", progress, previews)
	}
}

// The job's queue reuses its array across bursts and moves waiting events
// to its front when full: events still come out once each, in order, over
// bursts of every size, with the goroutine taking them at any pace.
func TestJobQueueKeepsOrderAcrossBursts(t *testing.T) {
	m := NewManager(NewMemoryStore(), &browserFeed{}, nil)
	r := newRun(m, &Job{ID: "job-1"})
	sent, got := 0, 0
	take := func(n int) {
		for ; n > 0; n-- {
			r.mu.Lock()
			ev, ok := r.dequeueLocked()
			r.mu.Unlock()
			if !ok {
				return
			}
			var msg struct {
				Data struct{ Value int } `json:"data"`
			}
			if err := json.Unmarshal(ev.json, &msg); err != nil || msg.Data.Value != got {
				t.Fatalf("event %d came out as %s", got, ev.json)
			}
			got++
		}
	}
	for burst := 0; burst < 400; burst++ {
		for i := 0; i < burst*7%613; i++ {
			typ := "progress"
			if sent%50 == 0 {
				typ = "executing" // a lifecycle event now and then
			}
			r.mu.Lock()
			r.enqueueLocked(upstreamEvent(t, fmt.Sprintf(`{"type":%q,"data":{"value":%d,"node":"3","prompt_id":"p"}}`, typ, sent)))
			r.mu.Unlock()
			sent++
			if i%3 == burst%3 {
				take(burst % 5)
			}
		}
		if burst%4 == 0 {
			take(sent) // drained: the array goes back to the pool
		}
	}
	take(sent)
	if got != sent {
		t.Fatalf("got %d of %d events", got, sent)
	}
}
