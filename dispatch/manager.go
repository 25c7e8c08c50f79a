package dispatch

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"sort"
	"strings"
	"sync/atomic"
	"time"

	"github.com/google/uuid"
	"go.uber.org/zap"

	"github.com/comfyume/comfyume/comfy"
	"github.com/comfyume/comfyume/usage"
)

// Manager places jobs on upstreams and follows them to their end. It is
// the package's facade: it composes the parts below, each of which owns
// its own state (see the package comment), and keeps to itself only what
// ties them together — submitting, sending and cancelling a job, taking
// the next waiting job to a free endpoint, ending a job, and taking jobs
// over from other gateways.
type Manager struct {
	store  Store
	events Events
	// batch and inline are events as BatchEvents and InlineEvents, or nil
	// (asked once: a job's every event uses them).
	batch  BatchEvents
	inline InlineEvents
	logger *zap.Logger
	// limits bound upstream frames and job queues (SetEventLimits).
	limits atomic.Pointer[EventLimits]
	// inputsFor finds the input files of jobs taken over (SetInputsFor).
	inputsFor InputsFor

	pools    *poolSet       // where jobs can go (pool.go)
	runs     *runSet        // the jobs that live here (runs.go)
	queues   *poolQueues    // where waiting jobs wait (poolqueues.go)
	waits    *waitNotices   // telling waiting jobs why (waiting.go)
	leases   *leases        // claims on jobs, jobs ended lately (leases.go)
	adopted  adoptedStreams // streams of jobs taken over (leases.go)
	accounts *accounts      // use and quotas (accounting.go)
	history  *jobHistory    // what is kept of ended jobs (history.go)
	precheck *prechecker    // prompts against installs (precheck.go)
	ops      *opsView       // the operator's views (ops.go, status.go)
	// maxHeld bounds the prompt bytes one user's live jobs keep here
	// (SetMaxQueuedSize).
	maxHeld atomic.Int64
}

// DefaultMaxQueuedSize is the default bound of the bytes of prompts and UI
// workflows one user's waiting and running jobs keep on a gateway.
const DefaultMaxQueuedSize = 512 << 20

// SetMaxQueuedSize bounds the bytes of prompts and UI workflows one user's
// waiting and running jobs keep in this gateway's memory (0:
// DefaultMaxQueuedSize). A prompt past it is refused (QueueFullError) until
// some of the user's jobs end.
func (m *Manager) SetMaxQueuedSize(n int64) {
	if n <= 0 {
		n = DefaultMaxQueuedSize
	}
	m.maxHeld.Store(n)
}

// NewManager returns a manager that records jobs in store and reports to
// events.
func NewManager(store Store, events Events, logger *zap.Logger) *Manager {
	if logger == nil {
		logger = zap.NewNop()
	}
	m := &Manager{store: store, events: events, logger: logger,
		pools:    newPoolSet(),
		runs:     newRunSet(),
		leases:   newLeases(store, logger),
		accounts: &accounts{logger: logger},
		history:  &jobHistory{store: store, logger: logger},
		precheck: &prechecker{logger: logger},
	}
	m.batch, _ = events.(BatchEvents)
	m.inline, _ = events.(InlineEvents)
	m.precheck.store, _ = store.(InstallStore)
	m.accounts.outputs, _ = events.(OutputCounter)
	m.queues = &poolQueues{runs: m.runs, logger: logger}
	if sq, ok := store.(SharedQueue); ok {
		m.queues.shared = sq
	}
	m.waits = newWaitNotices(m.runs, m.pools, m.queues, events)
	m.ops = &opsView{store: store, runs: m.runs, pools: m.pools, queues: m.queues}
	return m
}

// Store returns the job store.
func (m *Manager) Store() Store { return m.store }

// SetPool adds or replaces a pool (on a config reload). Jobs waiting in the
// old pool move to the new one; jobs running on the old pool's upstreams
// finish there, and those upstreams close once idle.
func (m *Manager) SetPool(p *Pool) {
	for _, u := range p.Upstreams {
		u.setLimits(m.eventLimits())
	}
	if ss, ok := m.store.(SharedSlots); ok {
		for _, u := range p.Upstreams {
			u.mu.Lock()
			u.shared, u.slotTTL = ss, m.leases.ttl
			u.mu.Unlock()
		}
	}
	old := m.pools.put(p)
	if old == nil || old == p {
		return
	}
	old.mu.Lock()
	waiting := old.queue().drain()
	old.mu.Unlock()
	p.mu.Lock()
	for _, r := range waiting {
		p.queue().push(r)
	}
	p.mu.Unlock()
	for _, u := range old.Upstreams {
		u.retire()
	}
	m.dispatchWaiting(p)
}

// InputSource opens a file a prompt references (on the user's home, or a
// captured output) so it can be forwarded to the upstream.
type InputSource func(ctx context.Context, ref comfy.FileRef) (io.ReadCloser, error)

// SubmitRequest is one POST /prompt to run on a pool.
type SubmitRequest struct {
	User     string
	ClientID string
	Pool     string
	// Home is the user's home URL (recorded so that another gateway can
	// forward the inputs if it has to send the job).
	Home    string
	Request *comfy.PromptRequest
	// Priority orders users in the pool's queue (higher first).
	Priority int
	// Inputs opens referenced input files; nil forwards nothing.
	Inputs InputSource
	// Quota changes the pool's daily limits for this user.
	Quota usage.Override
}

// SubmitResult is what POST /prompt answers on success.
type SubmitResult struct {
	PromptID   string          `json:"prompt_id"`
	Number     float64         `json:"number"`
	NodeErrors json.RawMessage `json:"node_errors"`
}

// RejectedError is an upstream's refusal of a prompt (400 with node_errors);
// Body is relayed to the browser unchanged.
type RejectedError struct {
	Status int
	Body   []byte
}

func (e *RejectedError) Error() string { return fmt.Sprintf("prompt rejected (%d)", e.Status) }

// UnavailableError means no upstream could take the prompt.
type UnavailableError struct {
	Pool string
	Err  error
}

func (e *UnavailableError) Error() string {
	return fmt.Sprintf("the GPU pool %q could not be reached: %v", e.Pool, e.Err)
}

func (e *UnavailableError) Unwrap() error { return e.Err }

// QueueFullError refuses a prompt of a user who already has the pool's
// limit of waiting jobs.
type QueueFullError struct {
	Pool  string
	Limit int
	// Held, when > 0, is the bytes of prompts the user's waiting and
	// running jobs keep, and HeldLimit the bound this prompt would pass.
	Held, HeldLimit int64
}

func (e *QueueFullError) Error() string {
	if e.Held > 0 {
		return fmt.Sprintf("your waiting and running prompts already take %d MiB of the gateway's memory (limit %d MiB); wait for one to end",
			e.Held>>20, e.HeldLimit>>20)
	}
	return fmt.Sprintf("you already have %d prompts waiting for the GPU pool %q; wait for one to start", e.Limit, e.Pool)
}

// mayRun reports whether the user is under the pool's running cap.
func (m *Manager) mayRun(p *Pool, user string) bool {
	return p.MaxRunning <= 0 || m.runs.runningByUser(p.Name)[user] < p.MaxRunning
}

// ErrPromptIDTaken is returned for a client-supplied prompt_id that another
// user's job already has.
var ErrPromptIDTaken = errors.New("prompt_id already in use")

// Submit creates a job for the request. If the pool has a free slot the
// prompt is sent at once and the upstream's verdict (e.g. a 400 with
// node_errors) is returned; otherwise the job waits for a slot and is
// answered as queued.
func (m *Manager) Submit(ctx context.Context, req SubmitRequest) (_ SubmitResult, err error) {
	pool, ok := m.Pool(req.Pool)
	if !ok || len(pool.Upstreams) == 0 {
		return SubmitResult{}, &UnavailableError{Pool: req.Pool, Err: errors.New("no such pool")}
	}
	pr := req.Request
	id := ""
	if pr.PromptID != "" {
		if u, err := uuid.Parse(pr.PromptID); err == nil && u.String() == pr.PromptID {
			id = pr.PromptID
			if old, err := m.store.Job(ctx, id); err == nil {
				if old.User != req.User {
					return SubmitResult{}, ErrPromptIDTaken
				}
				// A retried submission: do not run it twice.
				return SubmitResult{PromptID: old.ID, Number: old.Number, NodeErrors: json.RawMessage("{}")}, nil
			}
		}
	}
	if id == "" {
		id = uuid.NewString()
	}
	if err := m.precheck.check(ctx, pool, pr); err != nil {
		return SubmitResult{}, err
	}
	if err := checkInputs(pr); err != nil {
		return SubmitResult{}, err
	}
	if pool.MaxQueued > 0 {
		n, err := m.queues.waitingCount(ctx, pool, req.User)
		if err != nil {
			return SubmitResult{}, &StoreError{Err: err}
		}
		if n >= pool.MaxQueued {
			return SubmitResult{}, &QueueFullError{Pool: pool.Name, Limit: pool.MaxQueued}
		}
	}
	// Counted against the user's quota now; given back unless this very
	// job is accepted (a duplicate or a refusal never counts).
	admitDay, err := m.accounts.admit(ctx, pool, req)
	if err != nil {
		return SubmitResult{}, err
	}
	accepted := false
	defer func() {
		if !accepted {
			m.accounts.unadmit(admitDay, pool.Name, req.User)
		}
	}()
	number := m.runs.nextNumber()
	if pr.Number != nil {
		number = *pr.Number
	} else if pr.Front {
		number = -number
	}
	promptJSON, err := comfy.AppendPrompt(nil, pr.Prompt)
	if err != nil {
		return SubmitResult{}, err
	}
	job := &Job{
		ID:               id,
		User:             req.User,
		ClientID:         req.ClientID,
		Pool:             pool.Name,
		Number:           number,
		Prompt:           promptJSON,
		ExtraData:        pr.ExtraDataWithout(comfy.SensitiveExtraData...),
		OutputsToExecute: sinkNodes(pr.Prompt),
		WorkflowID:       workflowID(pr.ExtraData),
		Home:             req.Home,
		Priority:         req.Priority,
		Status:           StatusPending,
		CreateTime:       time.Now().UnixMilli(),
	}
	r := newRun(m, job)
	r.req = req
	// Registered and claimed before the record exists, so that no gateway
	// (this one included) takes a job over that is being submitted.
	limit := m.maxHeld.Load()
	if limit <= 0 {
		limit = DefaultMaxQueuedSize
	}
	if other, added, held := m.runs.addWithin(r, limit); !added {
		if other == nil {
			return SubmitResult{}, &QueueFullError{Pool: pool.Name, Held: held, HeldLimit: limit}
		}
		if other.job.User != req.User {
			return SubmitResult{}, ErrPromptIDTaken
		}
		return SubmitResult{PromptID: id, Number: other.job.Number, NodeErrors: json.RawMessage("{}")}, nil
	}
	m.leases.claim(ctx, id)
	if err := m.store.Create(ctx, job); err != nil {
		m.runs.remove(id)
		if errors.Is(err, ErrExists) {
			// The same client-supplied id arrived twice at once.
			if old, err := m.store.Job(ctx, id); err == nil && old.User == req.User {
				return SubmitResult{PromptID: old.ID, Number: old.Number, NodeErrors: json.RawMessage("{}")}, nil
			}
			return SubmitResult{}, ErrPromptIDTaken
		}
		m.leases.unclaim(id)
		return SubmitResult{}, &StoreError{Err: err}
	}

	var up *Upstream
	if m.queues.shared != nil {
		// Into the shared queue; if this very job is the next to run and
		// an endpoint has room, it is sent now.
		if err := m.queues.shared.Enqueue(ctx, queued(r)); err != nil {
			m.drop(r)
			m.leases.unclaim(id)
			return SubmitResult{}, &StoreError{Err: err}
		}
		a := m.dispatchShared(pool, id)
		if a != nil {
			if up = pool.endpoint(a.Endpoint); up == nil {
				m.releaseAssigned(*a)
				m.requeue(pool, r)
			} else {
				m.holdAssigned(r, up, a.Token)
				go m.dispatchWaiting(pool) // more room, perhaps
			}
		}
	} else {
		// Straight to an endpoint when one is free, nobody waits before
		// this user, and the user is under their running cap; else into
		// the queue.
		pool.mu.Lock()
		var token string
		if pool.queue().len() == 0 && m.mayRun(pool, req.User) {
			up, token = pool.acquire()
		}
		if up == nil {
			pool.queue().push(r)
		} else {
			r.holdSlot(up, token)
			pool.queue().markServed(req.User)
		}
		pool.mu.Unlock()
		if up == nil {
			m.dispatchWaiting(pool)
		}
	}
	if up == nil {
		accepted = true
		m.events.QueueChanged(req.User)
		m.waits.pokeWaiting()
		return SubmitResult{PromptID: id, Number: number, NodeErrors: json.RawMessage("{}")}, nil
	}
	res, err := m.send(ctx, r, up)
	if err != nil {
		r.releaseSlot()
		if beforeAcceptance(err) {
			// Cold or dead endpoint: the job is accepted here and waits.
			up.markFailure(time.Now())
			m.retryLater(pool, r, err)
			accepted = true
			m.events.QueueChanged(req.User)
			return SubmitResult{PromptID: id, Number: number, NodeErrors: json.RawMessage("{}")}, nil
		}
		m.drop(r)
		m.dispatchWaiting(pool)
		return SubmitResult{}, err
	}
	if up.markSuccess() {
		go m.endpointBack(pool, up)
	}
	accepted = true
	m.events.QueueChanged(req.User)
	return res, nil
}

// send forwards inputs and posts the prompt to up.
func (m *Manager) send(ctx context.Context, r *run, up *Upstream) (_ SubmitResult, err error) {
	if up.Pinned {
		return m.sendPinned(ctx, r, up)
	}
	job := r.snapshot()
	pr := *r.req.Request // a copy: the rewritten prompt is for this send only
	poolName := job.Pool
	defer func() {
		if err == nil {
			return
		}
		// Not accepted: the job is free to go elsewhere.
		up.unregister(job.ID, r)
		r.mu.Lock()
		if r.up == up {
			r.up = nil
			r.job.Upstream, r.job.UpstreamClient, r.job.UpstreamID = "", "", ""
			r.routeIDs = nil
		}
		r.mu.Unlock()
	}()
	if err := up.ensureStream(ctx); err != nil {
		return SubmitResult{}, &UnavailableError{Pool: poolName, Err: err}
	}
	if r.req.Inputs != nil {
		rewritten, err := forwardInputs(ctx, up, job.ID, &pr, r.req.Inputs)
		if err != nil {
			var rej *RejectedError
			if errors.As(err, &rej) {
				// The user's files: their error, not the endpoint's.
				if ie := (*InputError)(nil); errors.As(err, &ie) {
					m.logger.Info("input file not delivered", zap.String("job", job.ID), zap.Error(ie))
				}
				return SubmitResult{}, err
			}
			return SubmitResult{}, &UnavailableError{Pool: poolName, Err: err}
		}
		pr.Prompt = rewritten
	}
	// In parts that share the workflow's bytes with the request: a
	// megabytes body is not copied once more to be sent.
	body, err := pr.BodyParts(job.ID, up.clientID, comfy.SensitiveExtraData...)
	if err != nil {
		return SubmitResult{}, err
	}
	r.mu.Lock()
	r.up = up
	r.job.Upstream = up.String()
	r.job.UpstreamClient = up.clientID
	r.job.UpstreamID = job.ID
	r.routeIDs = []string{job.ID}
	r.mu.Unlock()
	up.register(job.ID, r)
	status, rb, err := up.PostJSON(ctx, "/prompt", body)
	if err != nil {
		return SubmitResult{}, &UnavailableError{Pool: poolName, Err: err}
	}
	if status != 200 {
		switch {
		case status >= 500 || status == 408 || status == 425 || status == 429:
			// Starting, overloaded or gone: another try, or another endpoint.
			return SubmitResult{}, &UnavailableError{Pool: poolName, Err: &HTTPError{Status: status, Body: rb}}
		case json.Valid(rb):
			return SubmitResult{}, &RejectedError{Status: status, Body: rb}
		default:
			return SubmitResult{}, &RejectedError{Status: status, Body: comfy.NewPromptError("server_error",
				fmt.Sprintf("The GPU server refused the prompt (%d %s)", status, http.StatusText(status)), string(truncate(rb, 500))).JSON()}
		}
	}
	var res struct {
		PromptID   string          `json:"prompt_id"`
		Number     json.Number     `json:"number"`
		NodeErrors json.RawMessage `json:"node_errors"`
	}
	if err := json.Unmarshal(rb, &res); err != nil || res.PromptID == "" {
		return SubmitResult{}, &UnavailableError{Pool: poolName, Err: fmt.Errorf("unexpected /prompt answer %.200q", rb)}
	}
	r.mu.Lock()
	r.lastEvent = time.Now()
	r.mu.Unlock()
	if res.PromptID != job.ID {
		// A server older than 2025-07 made its own id: route its events too.
		r.mu.Lock()
		r.job.UpstreamID = res.PromptID
		r.routeIDs = append(r.routeIDs, res.PromptID)
		r.mu.Unlock()
		up.register(res.PromptID, r)
	}
	r.save()
	ne := res.NodeErrors
	if len(ne) == 0 {
		ne = json.RawMessage("{}")
	}
	return SubmitResult{PromptID: job.ID, Number: job.Number, NodeErrors: ne}, nil
}

// dispatchWaiting sends waiting jobs of the pool while slots are free.
func (m *Manager) dispatchWaiting(p *Pool) {
	if m.queues.shared != nil {
		m.dispatchShared(p, "")
		return
	}
	for {
		p.mu.Lock()
		if p.queue().len() == 0 {
			p.mu.Unlock()
			return
		}
		up, token := p.acquire()
		if up == nil {
			p.mu.Unlock()
			return
		}
		running := m.runs.runningByUser(p.Name)
		r := p.queue().next(func(user string) bool { return p.MaxRunning <= 0 || running[user] < p.MaxRunning }, running)
		if r == nil {
			up.giveBack(token)
			p.mu.Unlock()
			return
		}
		if r.isFinished() {
			// Ended while it waited (its end took it out of the queue
			// just after): the slot is not its to hold.
			up.giveBack(token)
			p.mu.Unlock()
			continue
		}
		// The job holds the slot from now on (and counts as running for
		// the user's cap) until it ends or is not accepted.
		r.holdSlot(up, token)
		p.mu.Unlock()
		go m.sendQueued(p, r, up)
	}
}

// sendQueued sends a job that waited in the queue to the endpoint whose
// slot it holds.
func (m *Manager) sendQueued(p *Pool, r *run, up *Upstream) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	if err := m.accounts.overQuota(ctx, p, r.job.User, r.req.Quota); err != nil {
		r.releaseSlot()
		m.failUnsent(r, err)
		m.dispatchWaiting(p)
		return
	}
	_, err := m.send(ctx, r, up)
	if err == nil {
		if up.markSuccess() {
			m.endpointBack(p, up)
		}
		return
	}
	r.releaseSlot()
	if beforeAcceptance(err) {
		up.markFailure(time.Now())
		m.retryLater(p, r, err)
	} else {
		m.failUnsent(r, err)
	}
	m.dispatchWaiting(p)
}

// failUnsent ends a job that could not be sent after it had been accepted:
// its browser gets an execution_error explaining why.
func (m *Manager) failUnsent(r *run, err error) {
	m.logger.Warn("job not sent", zap.String("job", r.job.ID), zap.String("pool", r.job.Pool), zap.Error(err))
	msg := PublicMessage(r.job.Pool, err.Error())
	var rej *RejectedError
	if errors.As(err, &rej) {
		var pe struct {
			Error struct {
				Message string `json:"message"`
				Details string `json:"details"`
			} `json:"error"`
		}
		if json.Unmarshal(rej.Body, &pe) == nil && pe.Error.Message != "" {
			msg = strings.TrimSpace(pe.Error.Message + "\n" + pe.Error.Details)
		}
	}
	r.fail(msg)
}

// drop forgets a job that never started (rejected or unreachable). Its
// record goes first: while it exists, the run stays listed as this
// gateway's, so that nobody takes the job over.
func (m *Manager) drop(r *run) {
	r.mu.Lock()
	r.finished = true
	id := r.job.ID
	r.mu.Unlock()
	if err := m.store.Delete(context.Background(), id); err != nil {
		m.logger.Warn("deleting rejected job", zap.String("job", id), zap.Error(err))
	}
	m.leases.rememberEnded(id, nil)
	m.runs.remove(id)
}

func (m *Manager) save(j *Job) {
	if err := m.store.Save(context.Background(), j); err != nil {
		m.logger.Error("saving job", zap.String("job", j.ID), zap.Error(err))
	}
}

// finish releases a job's slot once it ended and sends the end-of-job
// executing{node:null} after the queue update, as ComfyUI orders them.
func (m *Manager) finish(r *run, snap *Job, sendEnd bool) {
	// Remembered before it leaves m.runs: Recover never sees it as
	// nobody's.
	m.leases.rememberEnded(snap.ID, snap.Summary())
	if !m.detach(r) {
		return
	}
	m.history.ended(snap)
	pool, _ := m.pools.get(snap.Pool)
	m.leases.unclaim(snap.ID)
	m.events.QueueChanged(snap.User)
	m.waits.pokeWaiting() // the others move up
	if sendEnd {
		end := comfy.NewMessage(comfy.MsgExecuting, map[string]any{"node": nil, "prompt_id": snap.ID})
		m.events.Deliver(recipientOf(snap), jobMessage(end))
	}
	// Accounted before the next job leaves the queue: a waiting job of the
	// same user is checked against the GPU time this one used.
	m.accounts.account(snap)
	if pool != nil {
		m.dispatchWaiting(pool)
	}
}

// detach ends this process's hold on a run: it takes no more events, and
// its routes, its endpoint slot and (for a job taken over from another
// gateway) its own event stream are released. It reports false when the
// run was detached already.
func (m *Manager) detach(r *run) bool {
	r.mu.Lock()
	if r.detached {
		r.mu.Unlock()
		return false
	}
	r.detached = true
	r.finished = true
	up, ids := r.up, r.routeIDs
	r.mu.Unlock()
	close(r.done)
	r.stopCapture()
	m.runs.remove(r.job.ID)
	if up != nil {
		for _, id := range ids {
			up.unregister(id, r)
		}
	}
	r.releaseSlot()
	if r.adopted && up != nil {
		m.adopted.release(up)
	}
	return true
}

// Cancel stops one of the user's jobs: a waiting job leaves the queue, a job
// queued upstream is deleted there, a running job is interrupted. It reports
// false for ids that are not the user's live jobs.
func (m *Manager) Cancel(ctx context.Context, user, id string) bool {
	r, ok := m.runs.get(id)
	pool := (*Pool)(nil)
	if ok {
		pool, _ = m.pools.get(r.job.Pool)
	}
	if !ok || r.job.User != user {
		return false
	}
	// Still waiting for a slot here?
	if pool != nil && m.queues.unqueue(ctx, pool, r) {
		m.cancelLocal(r)
		return true
	}
	r.mu.Lock()
	up := r.up
	pid := r.job.UpstreamID
	started := r.job.Status == StatusInProgress
	backingOff := up == nil && r.slot == nil && r.attempts > 0
	stop := r.cancelRun
	if stop != nil {
		r.cancelled = true
	}
	r.mu.Unlock()
	if stop != nil {
		stop() // the worker interrupts the job; the run ends as interrupted
		return true
	}
	if backingOff {
		m.cancelLocal(r)
		return true
	}
	if up == nil {
		// Being sent right now: ask again shortly.
		go func() {
			time.Sleep(200 * time.Millisecond)
			m.Cancel(context.Background(), user, id)
		}()
		return true
	}
	if started || up.isRunning(pid) {
		r.stopCapture() // an output being captured is let go
		if _, _, err := up.PostJSON(ctx, "/interrupt", map[string]string{"prompt_id": pid}); err != nil {
			m.logger.Warn("interrupt", zap.String("job", id), zap.Error(err))
		}
		return true
	}
	if _, _, err := up.PostJSON(ctx, "/queue", map[string]any{"delete": []string{pid}}); err != nil {
		m.logger.Warn("queue delete", zap.String("job", id), zap.Error(err))
	}
	// It may have started between our look and the delete.
	if up.isRunning(pid) {
		_, _, _ = up.PostJSON(ctx, "/interrupt", map[string]string{"prompt_id": pid})
		return true
	}
	m.cancelLocal(r)
	return true
}

// cancelLocal ends a job that never started, as cancelled.
func (m *Manager) cancelLocal(r *run) {
	r.mu.Lock()
	if r.finished {
		r.mu.Unlock()
		return
	}
	r.finished = true
	r.job.Status = StatusCancelled
	r.job.EndTime = time.Now().UnixMilli()
	snap, n := r.toSaveLocked()
	r.mu.Unlock()
	r.persist(snap, n)
	m.finish(r, snap, false)
}

// Close stops every upstream stream and gives up this gateway's job
// leases, so that another gateway (or this one restarted) takes the running
// jobs over at once rather than after the lease expires.
func (m *Manager) Close() {
	var ids []string
	var ups []*Upstream
	for _, r := range m.runs.list() {
		ids = append(ids, r.job.ID)
		r.mu.Lock()
		if r.up != nil {
			ups = append(ups, r.up)
		}
		r.mu.Unlock()
	}
	ups = append(ups, m.pools.upstreams()...)
	for _, u := range ups {
		u.Close()
	}
	for _, id := range ids {
		m.leases.unclaim(id)
	}
}

// sinkNodes returns the ids of nodes no other node takes input from: the
// graph's outputs, as ComfyUI's outputs_to_execute lists them.
func sinkNodes(prompt map[string]comfy.Node) []string {
	used := map[string]bool{}
	for _, n := range prompt {
		for _, v := range n.Inputs {
			if src, ok := comfy.LinkSource(v); ok {
				used[src] = true
			}
		}
	}
	out := []string{}
	for id := range prompt {
		if !used[id] {
			out = append(out, id)
		}
	}
	sort.Strings(out)
	return out
}

// workflowID is the UI workflow's id (extra_pnginfo.workflow.id), found
// without decoding the workflow: the frontend writes "id" first.
func workflowID(extra map[string]json.RawMessage) string {
	pnginfo, ok := extra["extra_pnginfo"]
	if !ok {
		return ""
	}
	wf, ok := comfy.ValueFrom(pnginfo, "workflow") // not to its end: megabytes
	if !ok {
		return ""
	}
	raw, ok := comfy.ObjectMember(wf, "id")
	if !ok {
		return ""
	}
	var id string
	_ = json.Unmarshal(raw, &id)
	return id
}
