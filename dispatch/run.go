package dispatch

import (
	"context"
	"encoding/json"
	"sync"
	"time"

	"go.uber.org/zap"

	"github.com/comfyume/comfyume/comfy"
)

// Event is one thing that happened to a job, in the job's own terms: every
// prompt_id in it is the job's ID.
type Event struct {
	// Message is a JSON event (execution_start, executing, progress, ...).
	Message *comfy.Message
	// Preview is a live preview image; its Metadata names the job and node.
	Preview *comfy.Preview
	// Text is a progress-text frame of the job's running node.
	Text *comfy.TextFrame
}

// Events receives what happens to jobs. The dispatcher calls it from one
// goroutine per job, in the job's event order.
type Events interface {
	// Capture sees each event before it is recorded on the job and may
	// rewrite it (output capture rewrites executed refs).
	Capture(ctx context.Context, j *Job, up *Upstream, ev *Event) error
	// Deliver hands a recorded event to whoever shows it (the browser).
	Deliver(j *Job, ev Event)
	// QueueChanged says a user's set of waiting or running jobs changed.
	QueueChanged(user string)
}

// run is a job that lives in this process: waiting for a slot, submitted,
// or running on an upstream.
type run struct {
	m  *Manager
	up *Upstream

	mu       sync.Mutex
	job      *Job
	queue    []event
	wake     chan struct{}
	node     string // node the upstream is executing
	display  string
	finished bool
	detached bool // see Manager.detach
	done     chan struct{}
	started  bool // goroutine running
	routeIDs []string
	req      SubmitRequest
	// slot is the pool endpoint whose capacity the job holds, from the
	// moment it is taken for the job until the job ends or is refused.
	slot      *Upstream
	slotToken string // the slot's name among gateways sharing the store
	// attempts and firstTry count sends no endpoint accepted.
	attempts int
	firstTry time.Time
	// lastEvent is when the upstream last said something about the job.
	lastEvent time.Time
	// cancelRun ends a pinned job's stream (the worker then interrupts
	// it); cancelled records that the user asked for it.
	cancelRun func()
	cancelled bool
	// adopted runs follow a job another gateway sent, on a stream of their
	// own (closed when the job ends).
	adopted bool
}

func newRun(m *Manager, j *Job) *run {
	return &run{m: m, job: j, wake: make(chan struct{}, 1), done: make(chan struct{})}
}

// snapshot returns a copy of the job record.
func (r *run) snapshot() *Job {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.job.Clone()
}

func (r *run) push(ev event) {
	r.mu.Lock()
	if r.finished {
		r.mu.Unlock()
		return
	}
	// Keep memory bounded if a consumer is slow: drop previews first.
	if ev.preview != nil && len(r.queue) > 64 {
		r.mu.Unlock()
		return
	}
	r.queue = append(r.queue, ev)
	r.lastEvent = time.Now()
	if !r.started {
		r.started = true
		go r.loop()
	}
	r.mu.Unlock()
	select {
	case r.wake <- struct{}{}:
	default:
	}
}

func (r *run) loop() {
	for {
		r.mu.Lock()
		if len(r.queue) == 0 {
			if r.finished {
				r.mu.Unlock()
				return
			}
			r.mu.Unlock()
			select {
			case <-r.wake:
				continue
			case <-r.done:
				r.mu.Lock()
				empty := len(r.queue) == 0
				r.mu.Unlock()
				if empty {
					return
				}
				continue
			}
		}
		ev := r.queue[0]
		r.queue = r.queue[1:]
		r.mu.Unlock()
		r.handle(ev)
	}
}

// handle turns an upstream event into a job event, records and delivers it.
func (r *run) handle(raw event) {
	r.mu.Lock()
	if r.finished {
		r.mu.Unlock()
		return
	}
	job := r.job
	var ev Event
	switch {
	case raw.msg != nil:
		m := *raw.msg
		c, _ := m.Common()
		if c.PromptID != "" && c.PromptID != job.ID {
			if f, err := m.Fields(); err == nil {
				f["prompt_id"] = job.ID
				m = m.WithFields(f)
			}
		}
		switch m.Type {
		case comfy.MsgExecuting:
			if c.Node == nil {
				// The upstream's end-of-job marker; the dispatcher sends
				// its own after the terminal event.
				r.mu.Unlock()
				return
			}
			r.node = c.NodeString()
			r.display = c.DisplayNode
			if r.display == "" {
				r.display = r.node
			}
		case comfy.MsgProgress:
			if n := c.NodeString(); n != "" {
				r.node = n
			}
		}
		ev.Message = &m
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
	snap := job.Clone()
	r.mu.Unlock()

	if err := r.m.events.Capture(context.Background(), snap, r.up, &ev); err != nil {
		r.m.logger.Warn("capture failed", zap.String("job", job.ID), zap.Error(err))
	}
	terminal := false
	if ev.Message != nil {
		r.mu.Lock()
		r.job.Apply(*ev.Message)
		terminal = comfy.IsTerminal(ev.Message.Type)
		if terminal {
			r.finished = true
		}
		snap = r.job.Clone()
		r.mu.Unlock()
		switch ev.Message.Type {
		case comfy.MsgExecutionStart, comfy.MsgExecuted, comfy.MsgExecutionSuccess,
			comfy.MsgExecutionError, comfy.MsgExecutionInterrupted:
			r.m.save(snap)
		}
		if ev.Message.Type == comfy.MsgExecutionStart {
			r.m.events.QueueChanged(snap.User)
		}
	}
	r.m.events.Deliver(snap, ev)
	if terminal {
		r.m.finish(r, snap, true)
	}
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
	m := comfy.NewMessage(comfy.MsgExecutionError, data)
	r.push(event{msg: &m})
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

// replayHistory pushes executed events for outputs not yet seen and the
// terminal event recorded in the history entry.
func (r *run) replayHistory(pid string, h historyEntry) {
	r.mu.Lock()
	seen := map[string]bool{}
	for k := range r.job.Outputs {
		seen[k] = true
	}
	r.mu.Unlock()
	for node, out := range h.Outputs {
		if seen[node] {
			continue
		}
		m := comfy.NewMessage(comfy.MsgExecuted, map[string]any{
			"node": node, "display_node": node, "output": out, "prompt_id": pid,
		})
		r.push(event{msg: &m})
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
	r.push(event{msg: terminal})
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
