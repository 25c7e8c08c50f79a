// Package dispatch is where jobs run: the Job record and its store, pools
// of upstream ComfyUI servers (health, capacity, cold start), the fair
// scheduler, input forwarding, submission under the gateway's prompt_id,
// and each upstream's event stream.
//
// # The parts of the Manager
//
// Manager is the package's facade: its exported methods are what Caddy's
// glue and relay call. It composes parts that each own one concept, with
// their own fields and lock, and keeps only what ties them together:
// submitting and sending a job (Submit, send, sendPinned), taking the
// next waiting job to a free endpoint (dispatchWaiting, dispatchShared),
// cold starts, failover, health checks and watchdogs (health.go), ending
// a job (finish, detach), cancelling it, and taking jobs over from other
// gateways (Recover, adopt).
//
//   - poolSet (pool.go): the configured pools, by name, and the users'
//     homes a pool's fallback sends jobs to. A Pool holds its endpoints,
//     its local queue, its cold-start holds and its cached install.
//   - runSet (runs.go): the jobs that live in this process (their runs,
//     by job id) and the queue numbers of new jobs.
//   - poolQueues (poolqueues.go): where waiting jobs wait — each pool's
//     local fair queue, or the SharedQueue of every gateway — and where
//     each stands. Reads the runSet.
//   - waitNotices (waiting.go): tells waiting jobs why they wait. Reads
//     the poolSet, runSet and poolQueues; tells through the Events.
//   - prechecker (precheck.go, install.go): refuses prompts that need what
//     the pool lacks. Uses the store's InstallStore.
//   - leases (leases.go): this gateway's claims on jobs in the Store and
//     the jobs it ended lately; adoptedStreams: the event streams opened
//     for jobs taken over.
//   - accounts (accounting.go): each user's use of the pools — the
//     usage.Ledger and its quotas, the counters for metrics.
//   - jobHistory (history.go): what is kept of ended jobs — history
//     limits, outcome counts, the latest failures.
//   - opsView (ops.go, status.go): what the operator's pages see (Board,
//     Status). Reads the Store, runSet, poolSet and poolQueues.
//
// Parts point down only: each gets what it needs as a field, never the
// Manager, and none points to another's owner. The pointers up are a
// run's (run.m) and a pinned job's stream handler's (pinnedHandler.m): a
// job's goroutine hands its events to the Manager's Events and ends the
// job through the Manager, which involves most parts.
//
// # The path of one event
//
// Every event of every job takes the same path, and it is kept cheap: an
// upstream frame is read where it lies in the stream's read buffer,
// routed by scanning a few of its bytes, and forwarded as it came unless
// something in it must change.
//
//  1. Upstream.readStream (stream.go) reads each WebSocket frame of a GPU
//     server itself (wsReader, frames.go; gorilla only dials and writes)
//     with a size limit (EventLimits): a larger frame is discarded as it
//     is read, logged once per job, and the job goes on. A frame is lent
//     where it lies — in the read buffer, or for a preview larger than
//     it, in the reader's memory for large frames — until the reader
//     calls its release hook, which it does before it reads from its
//     connection again (readBatch.flush).
//  2. onText reads a JSON frame's Head with the stream's comfy.Scanner
//     (type, prompt_id, node; nothing is decoded: a frame that is the
//     stream's last progress or progress_state but for digits is only
//     compared with it, any other is scanned) and drops the server's own
//     status frames; onBinary reads a preview's or progress text's header. Both
//     route the frame by prompt_id (or, without one, to the job the
//     server is running) to the job's run. A pinned job's stream
//     (pinned.go) pushes its frames to the run's queue.
//  3. run.offer (run.go): an event that needs no I/O (progress,
//     progress_state, executing, previews, progress text) and finds the
//     job's goroutine idle is handled at once on the reader, with no
//     hand-off between goroutines and without a copy — when the Events say
//     their delivery does no network I/O (InlineEvents; not with a Valkey
//     bus). The reader then holds the job's events until it next reads
//     from its connection. Anything else is copied out of the reader's
//     memory (event.own: small progress-like frames into a shared block)
//     and goes to run.push, which queues it for the job's goroutine (an
//     event that needs I/O first ends the reader's hold). The queue is
//     bounded by bytes: over its bound, progress and previews coalesce to
//     the latest per node; lifecycle events are always kept. Whoever
//     handles, one at a time, so the job's events keep their order.
//  4. run.handle turns it into the job's Event in place: the original
//     bytes, or a copy with the job's prompt_id for a server that made its
//     own, or a type-1 preview given the job's metadata. Job state (node,
//     outputs, status) is updated in memory; the record is saved only at
//     lifecycle points (start, executed, end). An executed event first
//     goes through Events.Capture, which stores its outputs and rewrites
//     their refs.
//  5. run.deliver hands the Event to the Events for its Recipient (user,
//     browser session, job); relay's Gateway publishes it to the hub.
//     Whoever handles keeps the events it has more of at hand (pending)
//     and hands them together with BatchEvents.DeliverAll: the job's
//     goroutine when its queue is empty, the reader just before it next
//     reads from the network (readBatch.flush), lending them (Lender):
//     each browser socket writes what its connection takes at once from
//     where the frames lie, and copies only what must wait for a browser
//     that is behind. So the events of one read reach each browser in one
//     write and one hand-over, an event that came alone leaves at once,
//     and a progress event or a preview is not copied on its way.
package dispatch

import (
	"bytes"

	"github.com/comfyume/comfyume/comfy"
)

// Default event limits; see EventLimits.
const (
	// DefaultMaxBinaryEvent bounds a binary frame from an upstream.
	// Previews are downscaled to --preview-size (512 px) and weigh tens of
	// KiB, but SaveImageWebsocket sends whole images as preview frames: a
	// 2048×2048 RGBA PNG is at most 16 MiB, so 32 MiB leaves room (it is
	// also the pinned transport's frame limit, worker.MaxPayload).
	DefaultMaxBinaryEvent = 32 << 20
	// DefaultMaxTextEvent bounds a JSON event from an upstream. The largest
	// ComfyUI sends are executed (UI outputs: refs, text of text nodes)
	// and execution_error (traceback, current inputs), kilobytes in
	// practice; 4 MiB is also aiohttp's default WebSocket message limit.
	DefaultMaxTextEvent = 4 << 20
	// DefaultMaxJobQueue bounds the bytes of events waiting for one job's
	// goroutine (which may be busy capturing outputs).
	DefaultMaxJobQueue = 16 << 20
)

// EventLimits bound what one upstream's events may cost the gateway.
type EventLimits struct {
	// MaxBinary is the largest binary frame (a preview, or a whole image
	// from SaveImageWebsocket) accepted from an upstream, in bytes
	// (default 32 MiB). Larger frames are logged and skipped; the job goes
	// on.
	MaxBinary int64
	// MaxText is the largest JSON event accepted from an upstream (default
	// 4 MiB, or MaxBinary if that is smaller). Larger ones are logged and
	// skipped.
	MaxText int64
	// MaxJobQueue is how many bytes of events may wait for one job while
	// it is busy (default 16 MiB). Past half of it, progress, previews and
	// custom nodes' own events are coalesced to the latest per node; past
	// it, they are dropped. Lifecycle events (execution_*, executing,
	// executed) are kept up to twice it; a server that sends more while the
	// job is busy is broken or hostile, and the job ends with an
	// execution_error that says so.
	MaxJobQueue int64
}

// withDefaults fills unset limits.
func (l EventLimits) withDefaults() EventLimits {
	if l.MaxBinary <= 0 {
		l.MaxBinary = DefaultMaxBinaryEvent
	}
	if l.MaxText <= 0 {
		l.MaxText = min(DefaultMaxTextEvent, l.MaxBinary)
	}
	if l.MaxJobQueue <= 0 {
		l.MaxJobQueue = DefaultMaxJobQueue
	}
	return l
}

// Recipient names who is shown a job's events.
type Recipient struct {
	// User owns the job; ClientID is the browser session that submitted
	// it; JobID is the job's id (the prompt_id the browser knows).
	User, ClientID, JobID string
}

// BatchEvents is implemented by an Events that takes several of a job's
// events at once: whoever handles the job's events hands those it has at
// hand together, so that they reach the browser in one write and the
// hand-over is paid once. (An Events that is not BatchEvents gets each
// with Deliver.)
type BatchEvents interface {
	// DeliverAll is Deliver of each of evs, in order. evs is the
	// caller's again once DeliverAll returns. Those of evs that are lent
	// (Event.Lent) are lender's memory: DeliverAll shows them, or copies
	// what it keeps of them, before it returns, and it returns at once,
	// without waiting for a browser.
	DeliverAll(to Recipient, evs []Event, lender *Lender)
}

// Lender names whose memory a lent event is (an upstream's reader): a
// writer may write a lent frame from where it lies only for its lender,
// who keeps the memory as it is until the writer's call returns.
type Lender struct{ _ byte } // (not empty: pointers to empty values may be equal)

// InlineEvents is implemented by a BatchEvents whose delivery of a
// progress event, a preview or a progress text returns at once, without
// network I/O, when Inline says so. The upstream's reader then hands such
// events over itself when the job's goroutine is idle, with no hand-off
// between goroutines (run.offer), and lends them: DeliverAll's lender is
// the reader. Events that publish on a shared bus say no: the reader must
// never wait for the network on a job's behalf.
type InlineEvents interface {
	BatchEvents
	Inline() bool
}

// recipientOf returns who sees j's events.
func recipientOf(j *Job) Recipient {
	return Recipient{User: j.User, ClientID: j.ClientID, JobID: j.ID}
}

// Event is one thing that happened to a job, in the job's own terms: every
// prompt_id in it is the job's ID. One of JSON, Preview and Text is set.
type Event struct {
	// Type is the JSON event's type (execution_start, executing, progress,
	// ...); "" for binary frames.
	Type string
	// JSON is the JSON event frame as the browser gets it. It may be the
	// upstream's own bytes: never modify it, replace it.
	JSON []byte
	// Preview is a live preview image; its Metadata names the job and node.
	Preview *comfy.Preview
	// Text is a progress-text frame of the job's running node.
	Text *comfy.TextFrame
	// Lent says that JSON, Preview.Image and Text.Text may be the
	// upstream reader's memory, valid until BatchEvents.DeliverAll that
	// hands the event over returns: whatever keeps it longer copies them.
	Lent bool
}

// jobMessage makes a job event of a message built by the gateway.
func jobMessage(m comfy.Message) Event {
	return Event{Type: m.Type, JSON: m.Encode()}
}

// event is one frame from an upstream, not yet tied to a job.
type event struct {
	json    []byte     // a JSON event frame
	head    comfy.Head // what the stream's Scanner (or ScanEvent) read of json
	preview *comfy.Preview
	text    *comfy.TextFrame
	// lent: json, preview.Image or text.Text are the stream reader's
	// memory, valid until it next calls its release hook (wsReader); the
	// event is own()ed before it is kept any longer.
	lent bool
}

// own makes a lent event's bytes its own: a small quick JSON frame goes
// into the reader's slab when rb is given (short-lived: queued for a busy
// job), anything else gets a copy of its own.
func (ev *event) own(rb *readBatch) {
	if !ev.lent {
		return
	}
	ev.lent = false
	switch {
	case ev.json != nil:
		if rb != nil && ev.quick() {
			ev.json = rb.slab.copy(ev.json)
		} else {
			ev.json = bytes.Clone(ev.json)
		}
	case ev.preview != nil:
		ev.preview = ev.preview.Clone()
	case ev.text != nil:
		t := *ev.text
		t.Text = bytes.Clone(t.Text)
		ev.text = &t
	}
}

// messageEvent makes an upstream event of a message built by the gateway.
func messageEvent(m comfy.Message) (event, bool) {
	b := m.Encode()
	h, ok := comfy.ScanEvent(b)
	return event{json: b, head: h}, ok
}

// size is what an event weighs in a job's queue.
func (ev *event) size() int64 {
	const overhead = 64
	switch {
	case ev.json != nil:
		return int64(len(ev.json)) + overhead
	case ev.preview != nil:
		return int64(len(ev.preview.Image)) + overhead
	case ev.text != nil:
		return int64(len(ev.text.Text)+len(ev.text.NodeID)) + overhead
	}
	return overhead
}

// coalesceKey says whether an event is transient — superseded by the next
// of its kind for its node: progress, previews, progress text, and JSON
// events of types that are not part of a job's lifecycle (custom nodes'
// own) — and under which key.
type coalesceKey struct {
	kind string
	node string
}

// quick reports whether handling the event needs no I/O: progress,
// previews, progress text, custom nodes' own events and executing of a
// node (not the end marker, executing{node: null}).
func (ev *event) quick() bool {
	if ev.json != nil && ev.head.Type == comfy.MsgExecuting {
		return ev.head.NodeKind == comfy.NodeString
	}
	_, ok := ev.transient()
	return ok
}

func (ev *event) transient() (coalesceKey, bool) {
	switch {
	case ev.json != nil:
		switch ev.head.Type {
		case comfy.MsgExecutionStart, comfy.MsgExecutionCached, comfy.MsgExecuting, comfy.MsgExecuted,
			comfy.MsgExecutionSuccess, comfy.MsgExecutionError, comfy.MsgExecutionInterrupted, comfy.MsgStatus:
			return coalesceKey{}, false
		}
		return coalesceKey{ev.head.Type, ev.head.Node}, true
	case ev.preview != nil:
		node := ""
		if ev.preview.Metadata != nil {
			node = ev.preview.Metadata.NodeID
		}
		return coalesceKey{"preview", node}, true
	case ev.text != nil:
		return coalesceKey{"text", ev.text.NodeID}, true
	}
	return coalesceKey{}, false
}

// SetEventLimits bounds the events of the manager's upstreams and jobs.
// It applies to pools set afterwards (SetPool) and to every job's queue at
// once.
func (m *Manager) SetEventLimits(l EventLimits) {
	l = l.withDefaults()
	m.limits.Store(&l)
}

// eventLimits returns the limits in force.
func (m *Manager) eventLimits() EventLimits {
	if l := m.limits.Load(); l != nil {
		return *l
	}
	return EventLimits{}.withDefaults()
}
