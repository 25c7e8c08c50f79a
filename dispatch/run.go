package dispatch

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"runtime"
	"slices"
	"sync"
	"time"

	"go.uber.org/zap"

	"github.com/comfyume/comfyume/comfy"
	"github.com/comfyume/comfyume/internal/fifo"
)

// Events receives what happens to jobs. The dispatcher calls it from one
// goroutine per job, in the job's event order.
type Events interface {
	// Capture sees each executed event before it is recorded on the job or
	// delivered, and may replace its JSON (output capture rewrites refs).
	Capture(ctx context.Context, to Recipient, up *Upstream, ev *Event) error
	// Deliver hands a job's event to whoever shows it (the browser
	// session of to).
	Deliver(to Recipient, ev Event)
	// QueueChanged says a user's set of waiting or running jobs changed.
	QueueChanged(user string)
}

// run is a job that lives in this process: waiting for a slot, submitted,
// or running on an upstream.
type run struct {
	m  *Manager
	up *Upstream

	mu  sync.Mutex
	job *Job
	// queue holds the upstream's events waiting for the job's goroutine;
	// see enqueueLocked for its bound.
	queue    fifo.Queue[event]
	queueSeq int64                 // sequence number of the front of queue
	qBytes   int64                 // what the queued events weigh
	latest   map[coalesceKey]int64 // while over half the bound: sequence number of the last transient event per key
	lastKept int64                 // sequence number of the last lifecycle event queued
	dropped  int                   // transient events dropped over the bound
	wake     chan struct{}
	// pending are events handled but not handed to a BatchEvents yet
	// (deliver): they go together, with the next one handled alone or at
	// the flush. pendingLender is who lent those of them that are lent.
	// Whoever handles the job's events owns them. The slice is borrowed
	// from pendingBufs while it holds events (nil between batches).
	pending       *[]Event
	pendingTo     Recipient
	pendingLender *Lender
	// Who handles the job's events now (at most one at a time, so they
	// stay in order): busy while the job's goroutine is handling or
	// flushing, inline while an upstream's reader handles them itself
	// (offer): holder, from its first event of a read until it reads
	// again (readBatch.flush).
	busy   bool
	inline bool
	holder *readBatch
	// overflowed: the upstream sent more than the queue holds; the job
	// ends (overflowLocked).
	overflowed bool
	node       string // node the upstream is executing
	display    string
	finished   bool
	detached   bool // see Manager.detach
	replayed   bool // its end was replayed from the upstream's history
	done       chan struct{}
	started    bool // goroutine running
	routeIDs   []string
	req        SubmitRequest
	// slot is the pool endpoint whose capacity the job holds, from the
	// moment it is taken for the job until the job ends or is refused.
	slot      *Upstream
	slotToken string // the slot's name among gateways sharing the store
	// attempts and firstTry count sends no endpoint accepted.
	attempts int
	firstTry time.Time
	// lastEvent is when the upstream last said something about the job,
	// as the watchdog knows it: events counts what the upstream said, and
	// the watchdog moves lastEvent to its check's time when that count
	// moved since its last check (watched). (A clock read per event was
	// more than 1 % of the gateway's CPU in a blast of events.)
	lastEvent time.Time
	events    uint64
	watched   uint64
	// saves counts the job's records saved at lifecycle points before its
	// end, lastSave the latest: past eagerSaves, at most one a second.
	saves    int
	lastSave time.Time
	// snapshots numbers the records taken to be saved (under mu), written
	// the newest one written (under saveMu): two goroutines saving the
	// same job (the submit answering while the job's goroutine handles
	// execution_start) write in the order they read it, and an older
	// record never overwrites a newer one in the store.
	snapshots uint64
	saveMu    sync.Mutex
	written   uint64
	// captureCtx is what capturing the job's outputs runs under;
	// stopCapture ends it when the user cancels the job or it ends (a
	// server that trickles an output would otherwise hold a cancelled
	// job, and its slot, for as long as capturing may take).
	captureCtx  context.Context
	stopCapture context.CancelFunc
	// cancelRun ends a pinned job's stream (the worker then interrupts
	// it); cancelled records that the user asked for it.
	cancelRun func()
	cancelled bool
	// adopted runs follow a job another gateway sent, on a stream of their
	// own (closed when the job ends).
	adopted bool
}

func newRun(m *Manager, j *Job) *run {
	r := &run{m: m, job: j, queue: fifo.Queue[event]{Pool: &eventChunks}, wake: make(chan struct{}, 1), done: make(chan struct{}), lastKept: -1}
	r.captureCtx, r.stopCapture = context.WithCancel(context.Background())
	return r
}

// snapshot returns a copy of the job record.
func (r *run) snapshot() *Job {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.job.Clone()
}

// toSaveLocked returns a copy of the job record to hand to persist, and
// its number. The caller holds r.mu.
func (r *run) toSaveLocked() (*Job, uint64) {
	r.snapshots++
	return r.job.Clone(), r.snapshots
}

// save writes the job record as it is now.
func (r *run) save() {
	r.mu.Lock()
	snap, n := r.toSaveLocked()
	r.mu.Unlock()
	r.persist(snap, n)
}

// persist writes a record toSaveLocked returned, unless a newer one was
// written already.
func (r *run) persist(snap *Job, n uint64) {
	r.saveMu.Lock()
	defer r.saveMu.Unlock()
	if n <= r.written {
		return
	}
	r.written = n
	r.m.save(snap)
}

func (r *run) push(ev event) {
	r.mu.Lock()
	if r.finished {
		r.mu.Unlock()
		return
	}
	r.enqueueLocked(ev)
	r.events++
	if !r.started {
		r.started = true
		go r.loop()
	}
	r.mu.Unlock()
	r.poke()
}

// poke wakes the job's goroutine, if it waits.
func (r *run) poke() {
	select {
	case r.wake <- struct{}{}:
	default:
	}
}

// enqueueLocked queues an event for the job's goroutine, within the job's
// queue bound (EventLimits.MaxJobQueue): lifecycle events are always
// queued; progress, previews and progress text are queued while the queue
// is under half the bound, then each replaces the queued one of its kind
// and node (since the last lifecycle event), and past the bound they are
// dropped. An event never waits: the upstream's reader goes on at once.
func (r *run) enqueueLocked(ev event) {
	size := ev.size()
	next := r.queueSeq + int64(r.queue.Len())
	if r.overflowed {
		return // the job is ending: see overflowLocked
	}
	key, transient := ev.transient()
	if !transient {
		if bound := r.m.eventLimits().MaxJobQueue; r.qBytes+size > 2*bound {
			r.overflowLocked(bound)
			return
		}
		r.appendLocked(ev, size)
		r.lastKept = next
		return
	}
	if r.queue.Len() == 0 {
		r.appendLocked(ev, size)
		return
	}
	bound := r.m.eventLimits().MaxJobQueue
	if r.latest == nil {
		if r.qBytes+size <= bound/2 {
			r.appendLocked(ev, size)
			return
		}
		// Over half the bound: index the transient events queued since
		// the last lifecycle event, then keep the index until the queue
		// drains.
		r.latest = map[coalesceKey]int64{}
		for i := max(0, int(r.lastKept-r.queueSeq)+1); i < r.queue.Len(); i++ {
			if k, ok := r.queue.At(i).transient(); ok {
				r.latest[k] = r.queueSeq + int64(i)
			}
		}
	}
	if r.qBytes+size <= bound/2 {
		r.appendLocked(ev, size)
		r.latest[key] = next
		return
	}
	if seq, ok := r.latest[key]; ok && seq > r.lastKept && seq >= r.queueSeq {
		old := r.queue.At(int(seq - r.queueSeq))
		if grown := r.qBytes + size - old.size(); grown <= bound {
			r.qBytes = grown
			*old = ev
			return
		}
	} else if r.qBytes+size <= bound {
		r.appendLocked(ev, size)
		r.latest[key] = next
		return
	}
	if r.dropped == 0 {
		r.m.logger.Warn("job events arrive faster than they are handled; dropping progress and previews over the job's queue bound",
			zap.String("job", r.job.ID), zap.Int64("bound", bound))
	}
	r.dropped++
}

// overflowLocked ends a job whose upstream sent more lifecycle events than
// its queue holds (twice EventLimits.MaxJobQueue, progress included) while
// the job's goroutine was still busy with earlier ones. No ComfyUI does
// that; holding them all would let a broken or hostile server take the
// gateway's memory. The queued events are let go, the job ends with an
// execution_error that says why, and the server's further events for it
// are dropped.
func (r *run) overflowLocked(bound int64) {
	r.overflowed = true
	for r.queue.Len() > 0 {
		r.dequeueLocked()
	}
	r.m.logger.Warn("a GPU server sent more lifecycle events for a job than its queue holds; ending the job",
		zap.String("job", r.job.ID), zap.Int64("bound", 2*bound))
	held := fmt.Sprintf("%d KiB", 2*bound>>10)
	if 2*bound >= 1<<20 {
		held = fmt.Sprintf("%d MiB", 2*bound>>20)
	}
	ev, ok := r.failEvent(r.node, "The GPU server sent more than "+held+" of events for this job while earlier ones were still being passed on; the job was stopped.")
	if ok {
		r.lastKept = r.queueSeq
		r.appendLocked(ev, ev.size())
	}
}

// eventChunks holds the queue chunks of every job's queue.
var eventChunks fifo.Pool[event]

func (r *run) appendLocked(ev event, size int64) {
	r.queue.Push(ev)
	r.qBytes += size
}

// dequeueLocked takes the next queued event, if any.
func (r *run) dequeueLocked() (event, bool) {
	ev, ok := r.queue.Pop()
	if !ok {
		return ev, false
	}
	r.qBytes -= ev.size()
	if r.latest != nil {
		if key, ok := ev.transient(); ok && r.latest[key] == r.queueSeq {
			delete(r.latest, key)
		}
	}
	r.queueSeq++
	if r.queue.Len() == 0 {
		r.latest = nil
	}
	return ev, true
}

func (r *run) loop() {
	for {
		r.mu.Lock()
		if r.inline {
			// The upstream's reader is handling an event; it wakes this
			// goroutine when it is done, if more are queued or the job
			// is over.
			r.mu.Unlock()
			<-r.wake
			continue
		}
		ev, ok := r.dequeueLocked()
		if !ok {
			r.busy = true
			r.mu.Unlock()
			r.flush()
			r.mu.Lock()
			r.busy = false
			if r.queue.Len() > 0 {
				r.mu.Unlock()
				continue
			}
			finished := r.finished
			r.mu.Unlock()
			if finished {
				return
			}
			select {
			case <-r.wake:
			case <-r.done:
				if r.idleAfterDone() {
					return
				}
			}
			continue
		}
		r.busy = true
		r.mu.Unlock()
		r.handle(&ev)
		r.mu.Lock()
		r.busy = false
		r.mu.Unlock()
	}
}

// idleAfterDone reports, once the job is done, whether its goroutine may
// end: nothing is queued and nobody else handles an event.
func (r *run) idleAfterDone() bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.queue.Len() == 0 && !r.inline
}

// offer hands an event from the upstream's reader to the job. An event
// that needs no I/O to handle (progress, progress_state, executing,
// previews, progress text) and finds the job's goroutine idle is handled
// at once on the reader itself, without a hand-off and without a copy: a
// frame that finds the path idle goes out at once, from where the reader
// read it. The reader then holds the job's events (inline) until it next
// reads from its connection: the job's goroutine waits, the events the
// reader handles meanwhile are kept (deliver) and, at its flush
// (readBatch.flush), handed over together with what they lent, so the
// events of one read reach the browser in one write and cost one hand-
// over. Events queued while the job's goroutine was busy, which it has
// not taken yet, go first: the reader handles those at the head that
// need no I/O too, in order. Anything else, or while the job's goroutine
// is at work, is copied out of the reader's memory and queued (push); an
// event that needs I/O ends the reader's hold first, so that the job's
// goroutine takes it at once. With an Events that is not InlineEvents, or
// says no, every event is queued.
func (r *run) offer(ev *event, rb *readBatch) {
	if rb == nil || !ev.quick() || !r.inlineEvents() {
		quick := ev.quick()
		if rb != nil && !quick {
			rb.letGo(r)
		}
		ev.own(rb)
		r.push(*ev)
		if rb != nil && !quick {
			// A lifecycle event (its handling may save the job, capture
			// outputs): the job's goroutine, just woken, takes it now
			// rather than when the reader has read all there is, which
			// in a burst is a whole time slice of events queued behind it.
			// (Not after each event when every one is queued: a bus.)
			runtime.Gosched()
		}
		return
	}
	r.mu.Lock()
	if r.holder != rb {
		if r.finished || r.busy || r.inline {
			r.mu.Unlock()
			ev.own(rb)
			r.push(*ev)
			return
		}
		r.inline, r.holder = true, rb
		rb.runs = append(rb.runs, r)
	}
	for r.queue.Len() > 0 && !r.finished && r.queue.At(0).quick() {
		q, _ := r.dequeueLocked()
		r.mu.Unlock()
		r.handleAt(&q, rb)
		r.mu.Lock()
	}
	now := r.queue.Len() == 0 && !r.finished
	if now {
		r.events++
	}
	r.mu.Unlock()
	if now {
		r.handleAt(ev, rb)
	} else {
		// Behind an event that needs I/O: the job's goroutine takes both.
		ev.own(rb)
		r.push(*ev)
	}
}

// inlineEvents reports whether the job's events may be handed over on the
// upstream's reader (InlineEvents).
func (r *run) inlineEvents() bool {
	return r.m.inline != nil && r.m.inline.Inline()
}

// release ends the hold of the upstream's reader rb on the job's events:
// what it handled goes to the Events, and the job's goroutine is woken if
// events wait or the job is over.
func (r *run) release(rb *readBatch) {
	r.flush()
	r.mu.Lock()
	if r.holder == rb {
		r.inline, r.holder = false, nil
	}
	wake := r.queue.Len() > 0 || r.finished
	r.mu.Unlock()
	if wake {
		r.poke()
	}
}

// readBatch is the state of an upstream's reader goroutine: the jobs whose
// events it holds since it last read from its connection (released before
// it reads again), the block its small frames are copied into when they
// are queued, and its name as the lender of its memory.
type readBatch struct {
	runs   []*run
	slab   frameSlab
	lender Lender
}

// letGo releases r if the reader holds it.
func (b *readBatch) letGo(r *run) {
	if i := slices.Index(b.runs, r); i >= 0 {
		b.runs = slices.Delete(b.runs, i, i+1)
		r.release(b)
	}
}

// frameSlab hands out copies of small frames from shared blocks: one
// allocation for dozens of progress events instead of one each. A block
// is freed once none of its frames is referenced; only short-lived frames
// go here (a frame kept long, e.g. as an orphan, is copied out), so a few
// kept frames cannot pin many blocks.
type frameSlab struct {
	block []byte
}

const (
	slabBlock = 8 << 10
	slabFrame = 1 << 10 // larger frames get their own copy
)

func (s *frameSlab) copy(b []byte) []byte {
	if len(b) > slabFrame {
		return bytes.Clone(b)
	}
	if cap(s.block)-len(s.block) < len(b) {
		s.block = make([]byte, 0, slabBlock)
	}
	n := len(s.block)
	s.block = append(s.block, b...)
	return s.block[n:len(s.block):len(s.block)]
}

// flush hands over and releases what the reader handled (the wsReader's
// release hook: it runs before the reader reads its connection again).
func (b *readBatch) flush() {
	for i, r := range b.runs {
		r.release(b)
		b.runs[i] = nil
	}
	b.runs = b.runs[:0]
}

// handle turns an upstream event into the job's event, records it and
// delivers it. The upstream's bytes are forwarded as they came unless the
// job's prompt_id must replace the server's own; job state changes in
// memory, and the record is saved only at lifecycle points.
func (r *run) handle(raw *event) {
	r.handleAt(raw, nil)
}

// handleAt is handle by the upstream's reader rb, which holds the job's
// events until its flush (nil: the job's goroutine).
func (r *run) handleAt(raw *event, rb *readBatch) {
	r.mu.Lock()
	if r.finished {
		r.mu.Unlock()
		return
	}
	job := r.job
	to := recipientOf(job)
	more := rb != nil || r.queue.Len() > 0
	ev := Event{Lent: raw.lent}
	switch {
	case raw.json != nil:
		h := &raw.head
		ev.Type, ev.JSON = h.Type, raw.json
		if h.PromptID != "" && h.PromptID != job.ID {
			ev.JSON = h.WithPromptID(raw.json, job.ID)
		}
		switch h.Type {
		case comfy.MsgExecuting:
			if h.NodeKind == comfy.NodeNull {
				// The upstream's end-of-job marker; the dispatcher sends
				// its own after the terminal event. Reaching it unfinished,
				// the run missed that event: it ends from the history (a
				// pinned job ends with its stream instead).
				pinned := job.Transport == TransportWorker
				r.mu.Unlock()
				if !pinned {
					go r.endFromHistory()
				}
				return
			}
			r.node = h.Node
			r.display = h.DisplayNode
			if r.display == "" {
				r.display = r.node
			}
		case comfy.MsgProgress:
			if h.Node != "" {
				r.node = h.Node
			}
		}
	case raw.preview != nil:
		p := *raw.preview
		md := comfy.PreviewMetadata{NodeID: r.node, DisplayNodeID: r.display, RealNodeID: r.node}
		if p.Metadata != nil {
			md = *p.Metadata
		}
		md.PromptID = job.ID
		if md.DisplayNodeID == "" {
			md.DisplayNodeID = md.NodeID
		}
		if md.RealNodeID == "" {
			md.RealNodeID = md.NodeID
		}
		md.ImageType = p.ImageType
		p.Metadata = &md
		ev.Preview = &p
	case raw.text != nil:
		t := *raw.text
		t.PromptID = job.ID
		ev.Text = &t
	}
	r.mu.Unlock()

	if ev.Type == comfy.MsgExecuted {
		// Capture gets a copy: &ev itself would put every event on the heap.
		captured := ev
		if err := r.m.events.Capture(r.captureCtx, to, r.up, &captured); err != nil {
			r.m.logger.Warn("capture failed", zap.String("job", to.JobID), zap.Error(err))
		}
		ev = captured
	}
	var snap *Job // the record as saved, at lifecycle points
	var snapNo uint64
	terminal := false
	switch ev.Type {
	case comfy.MsgExecutionStart, comfy.MsgExecutionCached, comfy.MsgExecuted, comfy.MsgExecutionSuccess,
		comfy.MsgExecutionError, comfy.MsgExecutionInterrupted:
		m, err := comfy.ParseMessage(ev.JSON)
		if err != nil {
			break
		}
		r.mu.Lock()
		r.job.Apply(m)
		terminal = comfy.IsTerminal(m.Type)
		if terminal {
			r.finished = true
			// Every executed event was captured before this one: the
			// job's record says what its outputs take.
			if c := r.m.accounts.outputs; c != nil {
				r.job.StoredBytes += c.TakeOutputBytes(r.job.ID)
			}
		}
		if m.Type != comfy.MsgExecutionCached && (terminal || r.saves < eagerSaves || time.Since(r.lastSave) >= time.Second) {
			snap, snapNo = r.toSaveLocked()
			r.saves++
			r.lastSave = time.Now()
		}
		r.mu.Unlock()
		if snap != nil {
			r.persist(snap, snapNo)
		}
		if m.Type == comfy.MsgExecutionStart {
			r.m.events.QueueChanged(to.User)
		}
	}
	var lender *Lender
	if rb != nil && ev.Lent {
		lender = &rb.lender
	}
	r.deliver(to, ev, more && !terminal, lender)
	if terminal {
		r.m.finish(r, snap, true)
	}
}

// eagerSaves is how many times a job's record is saved at once at its
// lifecycle points (start, each output node's executed) before saves are
// spaced a second apart: a workflow has tens of output nodes at most, and
// a server that sends thousands of executed events would otherwise make
// as many writes to the store (with Valkey, a round trip and up to a
// megabyte each). The end is always saved, with everything.
const eagerSaves = 64

// maxBatched bounds the events handed over together.
const maxBatched = 64

// deliver hands an event over: with more at hand (more), to a BatchEvents
// together with them (pending), so that they reach the browser in one
// write. lender is who lent ev (Event.Lent).
func (r *run) deliver(to Recipient, ev Event, more bool, lender *Lender) {
	if r.m.batch == nil {
		r.m.events.Deliver(to, ev)
		return
	}
	if r.pending == nil {
		r.pending = pendingBufs.Get().(*[]Event)
	}
	*r.pending = append(*r.pending, ev)
	r.pendingTo = to
	if lender != nil {
		r.pendingLender = lender
	}
	if !more || len(*r.pending) >= maxBatched {
		r.flush()
	}
}

// pendingBufs are the slices runs gather a batch in (run.pending): a job
// that grew its own would make one per job, 8 KiB of garbage by the time
// it held a full batch.
var pendingBufs = sync.Pool{New: func() any {
	b := make([]Event, 0, maxBatched)
	return &b
}}

// flush hands over the events handled and not handed yet, if any.
func (r *run) flush() {
	if r.pending == nil {
		return // (a borrowed slice holds an event at least)
	}
	r.m.batch.DeliverAll(r.pendingTo, *r.pending, r.pendingLender)
	clear(*r.pending)
	*r.pending = (*r.pending)[:0]
	pendingBufs.Put(r.pending)
	r.pending, r.pendingLender = nil, nil
}

// pushMessage queues a message the gateway made for the job. It reports
// false for a message that is not a well-formed event.
func (r *run) pushMessage(m comfy.Message) bool {
	ev, ok := messageEvent(m)
	if !ok {
		r.m.logger.Error("dropping a malformed event", zap.String("job", r.job.ID), zap.String("type", m.Type))
		return false
	}
	r.push(ev)
	return true
}

// fail ends the job with an execution_error the UI shows.
func (r *run) fail(message string) {
	r.mu.Lock()
	if r.finished {
		r.mu.Unlock()
		return
	}
	node := r.node
	r.mu.Unlock()
	if ev, ok := r.failEvent(node, message); ok {
		r.push(ev)
	}
}

// failEvent is the execution_error that ends the job with message, at
// node.
func (r *run) failEvent(node, message string) (event, bool) {
	data := map[string]any{
		"prompt_id":         r.job.ID,
		"node_id":           node,
		"node_type":         "",
		"executed":          []string{},
		"exception_message": message,
		"exception_type":    "comfyume.UpstreamError",
		"traceback":         []string{},
		"current_inputs":    map[string]any{},
		"current_outputs":   map[string]any{},
		"timestamp":         time.Now().UnixMilli(),
	}
	ev, ok := messageEvent(comfy.NewMessage(comfy.MsgExecutionError, data))
	if !ok {
		r.m.logger.Error("dropping a malformed event", zap.String("job", r.job.ID), zap.String("type", comfy.MsgExecutionError))
	}
	return ev, ok
}

// jobState is what an upstream says of a job whose events were missed.
type jobState int

const (
	stateUnknown jobState = iota // the upstream could not be asked
	stateEnded                   // its history entry was replayed
	stateActive                  // still queued or running there
	stateGone                    // neither in its history nor its queue
)

// resync reads the job's history entry from its upstream after missed
// events, and replays its outputs and end state if the job already ended.
// A job without an entry is looked for in the upstream's queue.
func (r *run) resync() jobState {
	r.mu.Lock()
	if r.finished || r.up == nil {
		r.mu.Unlock()
		return stateEnded
	}
	pid := r.job.UpstreamID
	if pid == "" {
		pid = r.job.ID
	}
	up := r.up
	r.mu.Unlock()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	var hist map[string]historyEntry
	if err := up.GetJSON(ctx, "/history/"+pid, &hist); err != nil {
		r.m.logger.Warn("reading history after missed events", zap.String("job", r.job.ID), zap.Error(err))
		return stateUnknown
	}
	if h, ok := hist[pid]; ok && (h.Status.Completed || h.Status.StatusStr != "") {
		r.replayHistory(pid, h)
		return stateEnded
	}
	var q struct {
		Running [][]json.RawMessage `json:"queue_running"`
		Pending [][]json.RawMessage `json:"queue_pending"`
	}
	if err := up.GetJSON(ctx, "/queue", &q); err != nil {
		return stateUnknown
	}
	for _, item := range append(q.Running, q.Pending...) {
		var id string
		if len(item) > 1 && json.Unmarshal(item[1], &id) == nil && id == pid {
			return stateActive
		}
	}
	// It may have ended between the two reads.
	hist = nil
	if err := up.GetJSON(ctx, "/history/"+pid, &hist); err == nil {
		if h, ok := hist[pid]; ok && (h.Status.Completed || h.Status.StatusStr != "") {
			r.replayHistory(pid, h)
			return stateEnded
		}
	}
	return stateGone
}

// endFromHistory ends a run whose upstream said the job is over (its
// executing{node:null}) without the run having seen how: it missed the
// terminal event, e.g. because it followed the job again only after that
// was sent. ComfyUI writes the job's history entry before it sends the
// marker, so the end is read from there. A server that cannot be asked is
// asked again a few times; a job whose end cannot be read fails rather
// than waiting for events that will never come.
func (r *run) endFromHistory() {
	wait := time.Second
	for try := 0; ; try++ {
		switch r.resync() {
		case stateEnded:
			return
		case stateGone:
			r.fail("The job is no longer on its GPU server: its result was lost. Please queue it again.")
			return
		}
		if try == 3 {
			r.fail("The job ended on its GPU server, but its result could not be read. Please queue it again.")
			return
		}
		select {
		case <-r.done:
			return
		case <-time.After(wait):
		}
		wait *= 2
	}
}

// replayHistory pushes executed events for outputs not yet seen and the
// terminal event recorded in the history entry, once per run (the run's
// history may be read by more than one resync at a time).
func (r *run) replayHistory(pid string, h historyEntry) {
	r.mu.Lock()
	if r.replayed || r.finished {
		r.mu.Unlock()
		return
	}
	r.replayed = true
	seen := map[string]bool{}
	for k := range r.job.Outputs {
		seen[k] = true
	}
	r.mu.Unlock()
	for node, out := range h.Outputs {
		if seen[node] {
			continue
		}
		r.pushMessage(comfy.NewMessage(comfy.MsgExecuted, map[string]any{
			"node": node, "display_node": node, "output": out, "prompt_id": pid,
		}))
	}
	var terminal *comfy.Message
	for _, raw := range h.Status.Messages {
		var pair []json.RawMessage
		if json.Unmarshal(raw, &pair) != nil || len(pair) != 2 {
			continue
		}
		var typ string
		if json.Unmarshal(pair[0], &typ) != nil || !comfy.IsTerminal(typ) {
			continue
		}
		m := comfy.Message{Type: typ, Data: pair[1]}
		terminal = &m
	}
	if terminal == nil {
		typ := comfy.MsgExecutionSuccess
		if h.Status.StatusStr == "error" {
			r.fail("The job failed on the GPU server (from its history).")
			return
		}
		m := comfy.NewMessage(typ, map[string]any{"prompt_id": pid, "timestamp": time.Now().UnixMilli()})
		terminal = &m
	}
	if !r.pushMessage(*terminal) {
		r.fail("The job ended on the GPU server, but its history entry could not be read.")
	}
}

// holdSlot records the endpoint slot taken for the job.
func (r *run) holdSlot(up *Upstream, token string) {
	r.mu.Lock()
	r.slot, r.slotToken = up, token
	r.mu.Unlock()
}

// releaseSlot gives the job's slot back, once: whoever gets here first
// (the job's end, or its sender after a refusal) releases it.
func (r *run) releaseSlot() {
	r.mu.Lock()
	slot, token := r.slot, r.slotToken
	r.slot, r.slotToken = nil, ""
	r.mu.Unlock()
	if slot != nil {
		slot.giveBack(token)
	}
}
