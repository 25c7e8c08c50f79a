package dispatch

import (
	"context"
	"encoding/json"
	"errors"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"

	"github.com/comfyume/comfyume/comfy"
	"github.com/comfyume/comfyume/comfytest"
)

// endEvents records, per job, the terminal events delivered to browsers.
type endEvents struct {
	mu   sync.Mutex
	ends map[string]chan string
}

func (e *endEvents) ch(id string) chan string {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.ends == nil {
		e.ends = map[string]chan string{}
	}
	c := e.ends[id]
	if c == nil {
		c = make(chan string, 8)
		e.ends[id] = c
	}
	return c
}

func (e *endEvents) Capture(context.Context, Recipient, *Upstream, *Event) error { return nil }
func (e *endEvents) QueueChanged(string)                                         {}
func (e *endEvents) Deliver(to Recipient, ev Event) {
	if comfy.IsTerminal(ev.Type) {
		e.ch(to.JobID) <- ev.Type
	}
}

// waitEnd returns the job's terminal event type, or "" after d.
func (e *endEvents) waitEnd(id string, d time.Duration) string {
	select {
	case typ := <-e.ch(id):
		return typ
	case <-time.After(d):
		return ""
	}
}

// lossyStore fails the save of a job's end while failEnds is set, as a
// store that blinks right then would.
type lossyStore struct {
	Store
	failEnds atomic.Bool
}

func (s *lossyStore) Save(ctx context.Context, j *Job) error {
	if !j.Active() && s.failEnds.Load() {
		return errors.New("store unavailable")
	}
	return s.Store.Save(ctx, j)
}

// recoverFixture is one gateway (a Manager on a store) with a pool of one
// fake GPU that, like real ComfyUI, sends a sid's events to its newest
// socket only and forgets the sid when one of them closes.
func recoverFixture(t *testing.T, store Store) (*Manager, *endEvents, *observer.ObservedLogs) {
	m, events, logs, _ := recoverFixtureGPU(t, store, 0)
	return m, events, logs
}

func recoverFixtureGPU(t *testing.T, store Store, step time.Duration) (*Manager, *endEvents, *observer.ObservedLogs, *comfytest.Server) {
	t.Helper()
	return recoverFixtureWith(t, store, comfytest.Options{StepDelay: step}, nil)
}

// recoverFixtureWith is recoverFixtureGPU with more of the fake's options,
// and the HTTP transport the gateway reaches it through (nil: default).
func recoverFixtureWith(t *testing.T, store Store, opts comfytest.Options, tr http.RoundTripper) (*Manager, *endEvents, *observer.ObservedLogs, *comfytest.Server) {
	t.Helper()
	opts.Version, opts.Name, opts.KeepReplacedSockets = "2026", "gpu", true
	gpu := comfytest.Start(t, opts)
	core, logs := observer.New(zap.InfoLevel)
	events := &endEvents{}
	m := NewManager(store, events, zap.New(core))
	t.Cleanup(m.Close)
	up, err := NewUpstream(gpu.URL(), UpstreamOptions{MaxJobs: 4, Transport: tr})
	if err != nil {
		t.Fatal(err)
	}
	m.SetPool(&Pool{Name: "gpu", Upstreams: []*Upstream{up}})
	return m, events, logs, gpu
}

// runFirstJob runs a one-step job to its end and waits until this gateway
// has let it go.
func runFirstJob(t *testing.T, m *Manager, events *endEvents) string {
	t.Helper()
	id := submitOneStep(t, m, "first")
	if typ := events.waitEnd(id, 5*time.Second); typ != comfy.MsgExecutionSuccess {
		t.Fatalf("first job: %q", typ)
	}
	waitDetached(t, m, id)
	return id
}

func submitOneStep(t *testing.T, m *Manager, prefix string) string {
	t.Helper()
	body, _ := json.Marshal(map[string]any{"prompt": map[string]any{
		"1": map[string]any{"class_type": "EmptyImage", "inputs": map[string]any{"width": 8, "height": 8, "batch_size": 1, "color": 0}},
		"2": map[string]any{"class_type": "SaveImage", "inputs": map[string]any{"images": []any{"1", 0}, "filename_prefix": prefix}},
	}})
	pr, perr := comfy.ParsePromptRequest(body)
	if perr != nil {
		t.Fatal(perr)
	}
	res, err := m.Submit(context.Background(), SubmitRequest{User: "alice", ClientID: "tab", Pool: "gpu", Request: pr})
	if err != nil {
		t.Fatal(err)
	}
	return res.PromptID
}

// afterRecover runs a takeover pass over a job that ended on this gateway
// but whose record says otherwise, then checks that the gateway took
// nothing over and still runs the next prompt.
func afterRecover(t *testing.T, m *Manager, events *endEvents, logs *observer.ObservedLogs, id string) {
	t.Helper()
	m.Recover(context.Background())
	if got := logs.FilterMessage("took over a running job").Len() + logs.FilterMessage("took over a waiting job").Len(); got != 0 {
		t.Errorf("the only gateway took over its own ended job (%d times)", got)
	}
	if typ := events.waitEnd(id, 300*time.Millisecond); typ != "" {
		t.Errorf("the ended job ended again in the browser (%s)", typ)
	}
	j, err := m.Store().Job(context.Background(), id)
	if err != nil || j.Active() {
		t.Errorf("ended job's record after Recover: %+v, %v", j, err)
	}
	next := submitOneStep(t, m, "next")
	if typ := events.waitEnd(next, 5*time.Second); typ != comfy.MsgExecutionSuccess {
		t.Fatalf("the next prompt got %q, want execution_success (the gateway is wedged)", typ)
	}
}

// The job's sender saves the "sent" state while the job's events end it;
// the older state lands last. The gateway must not take its own job over:
// that dialed a second stream on its endpoint's sid, ComfyUI then sent the
// sid's events to neither, and nothing ran any more.
func TestLateSaveOfOwnJobIsNotTakenOver(t *testing.T) {
	m, events, logs := recoverFixture(t, NewMemoryStore())
	id := runFirstJob(t, m, events)
	late, err := m.Store().Job(context.Background(), id)
	if err != nil {
		t.Fatal(err)
	}
	late.Status, late.EndTime = StatusPending, 0
	m.save(late) // the sender's save, after the end
	afterRecover(t, m, events, logs, id)
}

// The store misses the save of a job's end: the record still says it runs.
// The gateway that ended it writes the end again instead of taking it over.
func TestLostEndSaveOfOwnJobIsRepaired(t *testing.T) {
	store := &lossyStore{Store: NewMemoryStore()}
	m, events, logs := recoverFixture(t, store)
	store.failEnds.Store(true)
	id := runFirstJob(t, m, events)
	store.failEnds.Store(false)
	if j, _ := store.Job(context.Background(), id); j == nil || !j.Active() {
		t.Fatalf("setup: the end was saved: %+v", j)
	}
	afterRecover(t, m, events, logs, id)
}

// Past the time it remembers its ended jobs, a gateway that finds one of
// its own jobs still listed as running follows it again on the stream that
// has its sid (it finishes from the endpoint's history), never on a second
// socket that would cut that stream off.
func TestOwnJobFollowedAgainOnItsOwnStream(t *testing.T) {
	store := &lossyStore{Store: NewMemoryStore()}
	m, events, logs := recoverFixture(t, store)
	store.failEnds.Store(true)
	id := runFirstJob(t, m, events)
	store.failEnds.Store(false)
	m.leases.forgetEnded(time.Now().Add(time.Hour))
	m.Recover(context.Background())
	if n := logs.FilterMessage("following again a job this gateway had lost track of").Len(); n != 1 {
		t.Fatalf("own job followed again %d times, want 1", n)
	}
	if typ := events.waitEnd(id, 5*time.Second); typ != comfy.MsgExecutionSuccess {
		t.Fatalf("own job followed again ended with %q", typ)
	}
	waitDetached(t, m, id)
	if j, err := store.Job(context.Background(), id); err != nil || j.Active() {
		t.Fatalf("record after following again: %+v, %v", j, err)
	}
	next := submitOneStep(t, m, "next")
	if typ := events.waitEnd(next, 5*time.Second); typ != comfy.MsgExecutionSuccess {
		t.Fatalf("the next prompt got %q, want execution_success (the gateway is wedged)", typ)
	}
}

// queueReads tells when the GPU's answer to a GET /queue has arrived.
type queueReads struct {
	base http.RoundTripper
	done chan struct{}
}

func (q *queueReads) RoundTrip(req *http.Request) (*http.Response, error) {
	res, err := q.base.RoundTrip(req)
	if err == nil && req.Method == http.MethodGet && strings.HasSuffix(req.URL.Path, "/queue") {
		select {
		case q.done <- struct{}{}:
		default:
		}
	}
	return res, err
}

// A gateway follows one of its own jobs again in the moment after the GPU
// sent the job's end and before it wrote the job's history entry (ComfyUI
// does so in that order): the job is still listed as running there, and
// its end event is gone. The end-of-job marker the GPU sends once the
// entry is written ends the job from there, instead of leaving it running
// forever in the user's queue.
func TestOwnJobFollowedAgainBeforeItsHistoryIsWritten(t *testing.T) {
	store := &lossyStore{Store: NewMemoryStore()}
	var jobs atomic.Int32
	release := make(chan struct{})
	var releaseOnce sync.Once
	free := func() { releaseOnce.Do(func() { close(release) }) }
	t.Cleanup(free) // before the fake stops
	hold := func(string) {
		if jobs.Add(1) == 1 { // the first job only
			<-release
		}
	}
	reads := &queueReads{base: http.DefaultTransport, done: make(chan struct{}, 1)}
	m, events, logs, _ := recoverFixtureWith(t, store, comfytest.Options{BeforeHistory: hold}, reads)
	store.failEnds.Store(true)
	id := runFirstJob(t, m, events)
	store.failEnds.Store(false)
	m.leases.forgetEnded(time.Now().Add(time.Hour))
	select {
	case <-reads.done: // none is expected before the job is followed again
	default:
	}
	m.Recover(context.Background())
	if n := logs.FilterMessage("following again a job this gateway had lost track of").Len(); n != 1 {
		t.Fatalf("own job followed again %d times, want 1", n)
	}
	select {
	case <-reads.done: // it found the job still running there
	case <-time.After(5 * time.Second):
		t.Fatal("the job followed again was not looked up on its GPU")
	}
	free() // the GPU writes the history entry and sends its end marker
	if typ := events.waitEnd(id, 5*time.Second); typ != comfy.MsgExecutionSuccess {
		t.Fatalf("own job followed again ended with %q, want execution_success", typ)
	}
	waitDetached(t, m, id)
	if j, err := store.Job(context.Background(), id); err != nil || j.Active() {
		t.Fatalf("record after following again: %+v, %v", j, err)
	}
	next := submitOneStep(t, m, "next")
	if typ := events.waitEnd(next, 5*time.Second); typ != comfy.MsgExecutionSuccess {
		t.Fatalf("the next prompt got %q, want execution_success (the gateway is wedged)", typ)
	}
}

// The GPU's end-of-job marker for alice's job reaches the gateway after
// it let the job go. Once the job is forgotten, bob queues a prompt under
// the same prompt_id: his job must run and show his own output, not end
// at once with alice's (read from the GPU's history of the old job).
func TestReusedIDDoesNotEndWithTheOldJob(t *testing.T) {
	store := NewMemoryStore()
	id := "00000000-0000-4000-8000-0000000000a1"
	gate := make(chan struct{})
	var gateOnce sync.Once
	open := func() { gateOnce.Do(func() { close(gate) }) }
	t.Cleanup(open) // before the fake stops
	ended := false  // the fake's writer calls OnSend in frame order
	onSend := func(f comfytest.SentFrame) {
		switch {
		case f.PromptID != id:
		case f.Type == comfy.MsgExecutionSuccess:
			ended = true
		case ended && f.Type == comfy.MsgExecuting:
			// The marker after alice's end: held until she is let go.
			ended = false
			<-gate
		}
	}
	m, events, _, _ := recoverFixtureWith(t, store, comfytest.Options{OnSend: onSend}, nil)
	submit := func(user, prefix, pid string) string {
		t.Helper()
		body, _ := json.Marshal(map[string]any{"prompt_id": pid, "prompt": map[string]any{
			"1": map[string]any{"class_type": "EmptyImage", "inputs": map[string]any{"width": 8, "height": 8, "batch_size": 1, "color": 0}},
			"2": map[string]any{"class_type": "SaveImage", "inputs": map[string]any{"images": []any{"1", 0}, "filename_prefix": prefix}},
		}})
		pr, perr := comfy.ParsePromptRequest(body)
		if perr != nil {
			t.Fatal(perr)
		}
		res, err := m.Submit(context.Background(), SubmitRequest{User: user, ClientID: "tab-" + user, Pool: "gpu", Request: pr})
		if err != nil {
			t.Fatal(err)
		}
		return res.PromptID
	}
	if got := submit("alice", "alice", id); got != id {
		t.Fatalf("alice's prompt_id: %s", got)
	}
	if typ := events.waitEnd(id, 5*time.Second); typ != comfy.MsgExecutionSuccess {
		t.Fatalf("alice's job: %q", typ)
	}
	waitDetached(t, m, id)
	open()
	// A job queued after hers: once it ended, the marker was read.
	if next := submit("alice", "alice-next", ""); events.waitEnd(next, 5*time.Second) != comfy.MsgExecutionSuccess {
		t.Fatal("alice's next job did not succeed")
	}
	if err := store.Delete(context.Background(), id); err != nil { // forgotten
		t.Fatal(err)
	}
	if got := submit("bob", "bob", id); got != id {
		t.Fatalf("bob's prompt_id: %s", got)
	}
	if typ := events.waitEnd(id, 5*time.Second); typ != comfy.MsgExecutionSuccess {
		t.Fatalf("bob's job: %q", typ)
	}
	waitDetached(t, m, id)
	j, err := store.Job(context.Background(), id)
	if err != nil {
		t.Fatal(err)
	}
	if out := string(j.Outputs["2"]); !strings.Contains(out, `"bob_`) || strings.Contains(out, "alice") {
		t.Fatalf("bob's job shows the output %s, want his own", out)
	}
}

// Two jobs of a dead gateway run on one endpoint under its sid: the
// gateway taking them over follows both on one stream (a stream per job
// would leave all but the newest socket deaf), and closes it after them.
func TestTakenOverJobsShareTheirSid(t *testing.T) {
	store := NewMemoryStore()
	m, events, logs, _ := recoverFixtureGPU(t, store, 20*time.Millisecond)
	p, _ := m.Pool("gpu")
	ids := []string{"00000000-0000-4000-8000-000000000001", "00000000-0000-4000-8000-000000000002"}
	for i, id := range ids {
		prompt := json.RawMessage(`{"1":{"class_type":"EmptyImage","inputs":{"width":8,"height":8,"batch_size":1,"color":0}},` +
			`"2":{"class_type":"FakeSampler","inputs":{"image":["1",0],"steps":15}},` +
			`"3":{"class_type":"SaveImage","inputs":{"images":["2",0],"filename_prefix":"dead"}}}`)
		// Sent by the dead gateway, which listened as dead-gateway-sid.
		st, b, err := p.Upstreams[0].PostJSON(context.Background(), "/prompt",
			map[string]any{"prompt": prompt, "client_id": "dead-gateway-sid", "prompt_id": id})
		if err != nil || st != 200 {
			t.Fatalf("queueing on the GPU: %d %s %v", st, b, err)
		}
		j := &Job{ID: id, UpstreamID: id, User: "bob", ClientID: "tab", Pool: "gpu", Number: float64(i),
			Upstream: p.Upstreams[0].String(), UpstreamClient: "dead-gateway-sid", Status: StatusInProgress,
			Prompt: prompt, CreateTime: time.Now().UnixMilli()}
		if err := store.Create(context.Background(), j); err != nil {
			t.Fatal(err)
		}
	}
	m.Recover(context.Background())
	if n := logs.FilterMessage("took over a running job").Len(); n != 2 {
		t.Fatalf("%d jobs taken over, want 2", n)
	}
	for _, id := range ids {
		if typ := events.waitEnd(id, 10*time.Second); typ != comfy.MsgExecutionSuccess {
			t.Fatalf("taken-over job %s ended with %q, want execution_success", id, typ)
		}
	}
	deadline := time.Now().Add(5 * time.Second)
	for {
		m.adopted.mu.Lock()
		streams := len(m.adopted.byKey)
		m.adopted.mu.Unlock()
		if streams == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the taken-over jobs' stream stays open after they ended")
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// waitDetached waits until the job's run has let go (after its end event).
func waitDetached(t *testing.T, m *Manager, id string) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		_, live := m.runs.get(id)
		if !live {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("job %s still followed after its end", id)
		}
		time.Sleep(5 * time.Millisecond)
	}
}
