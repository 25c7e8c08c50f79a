package dispatch

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"testing"
	"time"

	"github.com/gorilla/websocket"

	"github.com/comfyume/comfyume/comfy"
)

// inlineFeed is an InlineEvents that shows what a browser would see, in
// the order it would see it. Capture blocks on executed events until
// release is closed.
type inlineFeed struct {
	release chan struct{}
	shown   chan Event
}

var _ InlineEvents = (*inlineFeed)(nil)

func newInlineFeed() *inlineFeed {
	return &inlineFeed{release: make(chan struct{}), shown: make(chan Event, 10000)}
}

func (f *inlineFeed) Capture(ctx context.Context, to Recipient, up *Upstream, ev *Event) error {
	<-f.release
	return nil
}

func (f *inlineFeed) Deliver(to Recipient, ev Event) {
	f.shown <- owned(ev)
}

// DeliverAll shows evs: the test reads them after the reader has reused
// its memory, so lent events are copied.
func (f *inlineFeed) DeliverAll(to Recipient, evs []Event, _ *Lender) {
	for _, ev := range evs {
		f.shown <- owned(ev)
	}
}

// owned is ev with bytes of its own.
func owned(ev Event) Event {
	if ev.Lent {
		ev.Lent = false
		ev.JSON = bytes.Clone(ev.JSON)
		if ev.Preview != nil {
			ev.Preview = ev.Preview.Clone()
		}
	}
	return ev
}

func (f *inlineFeed) QueueChanged(string) {}
func (f *inlineFeed) Inline() bool        { return true }

// next returns the next event the browser is shown.
func (f *inlineFeed) next(t *testing.T) Event {
	t.Helper()
	select {
	case ev := <-f.shown:
		return ev
	case <-time.After(10 * time.Second):
		t.Fatal("the browser was shown nothing more")
		return Event{}
	}
}

// fakeEventServer is a ComfyUI event socket that sends what the test puts
// on its channel.
func fakeEventServer(t *testing.T) (*Upstream, chan<- string) {
	frames := make(chan string, 1000)
	up := websocket.Upgrader{}
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
		c, err := up.Upgrade(w, req, nil)
		if err != nil {
			return
		}
		defer c.Close()
		go func() { // read the feature flags, then whatever comes
			for {
				if _, _, err := c.NextReader(); err != nil {
					return
				}
			}
		}()
		if c.WriteMessage(websocket.TextMessage, []byte(`{"type":"status","data":{"status":{"exec_info":{"queue_remaining":0}},"sid":"s"}}`)) != nil {
			return
		}
		for f := range frames {
			if c.WriteMessage(websocket.TextMessage, []byte(f)) != nil {
				return
			}
		}
	}))
	u, err := NewUpstream(srv.URL, UpstreamOptions{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		close(frames)
		u.Close()
		srv.Close()
	})
	return u, frames
}

// followJob routes the upstream's events of job-1 to a run of m.
func followJob(t *testing.T, m *Manager, u *Upstream) *run {
	job := &Job{ID: "job-1", User: "alice", ClientID: "tab", Status: StatusInProgress}
	r := newRun(m, job)
	r.up = u
	m.runs.put(r)
	u.register(job.ID, r)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := u.ensureStream(ctx); err != nil {
		t.Fatal(err)
	}
	return r
}

func progressValue(t *testing.T, ev Event) int {
	t.Helper()
	var msg struct {
		Data struct{ Value int } `json:"data"`
	}
	if ev.Type != comfy.MsgProgress || json.Unmarshal(ev.JSON, &msg) != nil {
		t.Fatalf("want a progress event, got %s %s", ev.Type, ev.JSON)
	}
	return msg.Data.Value
}

// idle waits until nobody handles the run's events.
func (r *run) waitIdle(t *testing.T) {
	t.Helper()
	for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(time.Millisecond) {
		r.mu.Lock()
		idle := !r.busy && !r.inline && r.queue.Len() == 0
		r.mu.Unlock()
		if idle {
			return
		}
	}
	t.Fatal("the job's events are still being handled")
}

// An event the upstream's reader hands over itself is shown as soon as the
// reader has nothing more to read: a lone progress event, after which the
// GPU server stays silent, reaches the browser.
func TestLoneEventLeavesBeforeTheReaderWaits(t *testing.T) {
	feed := newInlineFeed()
	m := NewManager(NewMemoryStore(), feed, nil)
	u, frames := fakeEventServer(t)
	r := followJob(t, m, u)
	frames <- `{"type":"execution_start","data":{"prompt_id":"job-1","timestamp":1}}`
	frames <- `{"type":"executing","data":{"node":"3","display_node":"3","prompt_id":"job-1"}}`
	if ev := feed.next(t); ev.Type != comfy.MsgExecutionStart {
		t.Fatalf("first shown: %s", ev.JSON)
	}
	if ev := feed.next(t); ev.Type != comfy.MsgExecuting {
		t.Fatalf("second shown: %s", ev.JSON)
	}
	for i := 1; i <= 3; i++ {
		r.waitIdle(t) // so that the reader takes the event itself
		frames <- fmt.Sprintf(`{"type":"progress","data":{"value":%d,"max":20,"prompt_id":"job-1","node":"3"}}`, i)
		if v := progressValue(t, feed.next(t)); v != i {
			t.Fatalf("shown progress %d, want %d", v, i)
		}
	}
}

// Events the reader could hand over itself wait behind an event the job's
// goroutine is still handling (an executed event whose outputs are being
// captured): the browser sees the job's events in the GPU server's order.
func TestReaderKeepsOrderBehindABusyJob(t *testing.T) {
	feed := newInlineFeed()
	m := NewManager(NewMemoryStore(), feed, nil)
	u, frames := fakeEventServer(t)
	r := followJob(t, m, u)
	frames <- `{"type":"execution_start","data":{"prompt_id":"job-1","timestamp":1}}`
	frames <- `{"type":"executing","data":{"node":"9","display_node":"9","prompt_id":"job-1"}}`
	frames <- `{"type":"executed","data":{"node":"9","display_node":"9","output":{"images":[{"filename":"a.png","subfolder":"","type":"output"}]},"prompt_id":"job-1"}}`
	const n = 200
	for i := 1; i <= n; i++ {
		frames <- fmt.Sprintf(`{"type":"progress","data":{"value":%d,"max":%d,"prompt_id":"job-1","node":"3"}}`, i, n)
	}
	// Let the capture go once the reader has read every progress event.
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(time.Millisecond) {
		r.mu.Lock()
		queued := r.queue.Len()
		r.mu.Unlock()
		if queued >= n {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d events queued behind the capture, want %d", queued, n)
		}
	}
	close(feed.release)
	for _, want := range []string{comfy.MsgExecutionStart, comfy.MsgExecuting, comfy.MsgExecuted} {
		if ev := feed.next(t); ev.Type != want {
			t.Fatalf("shown %s, want %s", ev.JSON, want)
		}
	}
	for i := 1; i <= n; i++ {
		if v := progressValue(t, feed.next(t)); v != i {
			t.Fatalf("shown progress %d, want %d", v, i)
		}
	}
	// The job's goroutine is idle again: the reader takes events itself.
	r.waitIdle(t)
	frames <- `{"type":"progress","data":{"value":1,"max":1,"prompt_id":"job-1","node":"9"}}`
	if v := progressValue(t, feed.next(t)); v != 1 {
		t.Fatalf("shown progress %d after the burst", v)
	}
}

// Frames copied into the reader's slab stay apart: each holds its own
// bytes whatever is copied after it or appended to another, and a large
// frame gets a copy of its own.
func TestFrameSlabCopiesStayApart(t *testing.T) {
	var rb readBatch
	var kept [][]byte
	var want []string
	for i := 0; i < 500; i++ {
		frame := []byte(fmt.Sprintf(`{"type":"progress","data":{"value":%d,"max":500}}`, i))
		if i%97 == 0 {
			frame = append(frame, make([]byte, slabFrame)...)
		}
		c := rb.slab.copy(frame)
		frame[0] = 'X' // the reader's scratch is reused
		kept = append(kept, c)
		want = append(want, string(c))
		if i%3 == 0 && i > 0 {
			_ = append(kept[i-1], "garbage"...) // must not reach its neighbour
		}
	}
	for i := range kept {
		if string(kept[i]) != want[i] || kept[i][0] != '{' {
			t.Fatalf("frame %d changed: %q", i, kept[i])
		}
	}
}

// progressEvent is a progress frame of job-1 as the reader hands it over:
// lent from buf (which the test then reads over), or with nil its own.
func progressEvent(t *testing.T, v int, buf []byte) event {
	t.Helper()
	ev := upstreamEvent(t, fmt.Sprintf(`{"type":"progress","data":{"value":%d,"max":9,"prompt_id":"job-1","node":"3"}}`, v))
	if buf != nil {
		ev.json, ev.lent = append(buf[:0], ev.json...), true
	}
	return ev
}

// Events queued for a job that its goroutine has not taken yet go before
// the reader's next one: those at the head that need no I/O the reader
// handles itself, in order; behind one that needs I/O its event waits its
// turn in the queue. Lent events reach the browser as they were, although
// the reader reads over its memory after it released them.
func TestReaderTakesQueuedEventsFirst(t *testing.T) {
	feed := newInlineFeed()
	m := NewManager(NewMemoryStore(), feed, nil)
	r := newRun(m, &Job{ID: "job-1", User: "alice", ClientID: "tab", Status: StatusInProgress})
	buf := make([]byte, 0, 256)
	r.mu.Lock()
	r.started = true // (its goroutine has not run yet)
	for i := 1; i <= 3; i++ {
		r.enqueueLocked(progressEvent(t, i, nil))
	}
	r.mu.Unlock()
	rb := &readBatch{}
	r.offer(ptr(progressEvent(t, 4, buf)), rb)
	rb.flush()
	copy(buf[:cap(buf)], bytes.Repeat([]byte{'X'}, cap(buf)))
	for i := 1; i <= 4; i++ {
		if v := progressValue(t, feed.next(t)); v != i {
			t.Fatalf("shown progress %d, want %d", v, i)
		}
	}
	end, ok := messageEvent(comfy.NewMessage(comfy.MsgExecutionSuccess, map[string]any{"prompt_id": "job-1"}))
	if !ok {
		t.Fatal("bad frame")
	}
	r.mu.Lock()
	r.enqueueLocked(end)
	r.mu.Unlock()
	r.offer(ptr(progressEvent(t, 5, buf)), rb)
	rb.flush()
	copy(buf[:cap(buf)], bytes.Repeat([]byte{'X'}, cap(buf)))
	r.mu.Lock()
	queued := r.queue.Len()
	var last event
	if queued == 2 {
		last = *r.queue.At(1)
	}
	r.mu.Unlock()
	if queued != 2 || !bytes.Contains(last.json, []byte(`"value":5`)) {
		t.Fatalf("behind execution_success: %d queued, the last %q", queued, last.json)
	}
	select {
	case ev := <-feed.shown:
		t.Fatalf("shown %s before the event ahead of it", ev.JSON)
	default:
	}
}
