package dispatch

import (
	"context"
	"encoding/json"
	"fmt"
	"time"

	"go.uber.org/zap"

	"github.com/comfyume/comfyume/comfy"
)

// StoreError means the job store could not be written; nothing was sent.
type StoreError struct{ Err error }

func (e *StoreError) Error() string { return "job store unavailable: " + e.Err.Error() }
func (e *StoreError) Unwrap() error { return e.Err }

// Start runs the manager's background work until ctx ends: renewing the
// leases of the jobs this gateway follows, and taking over the active jobs
// nobody follows — after a restart, or from a gateway that died. A job that
// was waiting is queued again here; one that was sent is followed on its
// upstream (its events, or its history entry if it already ended).
//
// Renewal runs on a goroutine of its own: no amount of takeover work
// (store reads, dials, history lookups) can delay it past a lease's end.
func (m *Manager) Start(ctx context.Context) {
	if m.queues.shared != nil {
		go m.followAssignments(ctx)
	}
	go every(ctx, m.leases.ttl/3, func() { m.renew(ctx) })
	go m.waits.tellWaiting(ctx)
	go func() {
		m.Recover(ctx)
		every(ctx, m.leases.ttl/3, func() {
			m.Recover(ctx)
			// Slots freed by other gateways wake nobody here: look.
			for _, p := range m.pools.list() {
				m.dispatchWaiting(p)
			}
		})
	}()
}

// every calls fn every d until ctx ends.
func every(ctx context.Context, d time.Duration, fn func()) {
	t := time.NewTicker(d)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			fn()
		}
	}
}

func (m *Manager) renew(ctx context.Context) {
	runs := m.runs.list()
	for _, r := range runs {
		r.mu.Lock()
		slot, token := r.slot, r.slotToken
		r.mu.Unlock()
		if ss := slot.sharedSlots(); ss != nil && token != "" {
			if err := ss.RenewSlot(ctx, slot.String(), token, m.leases.ttl); err != nil {
				m.logger.Warn("renewing shared slot", zap.Error(err))
			}
		}
		ok, err := m.leases.renew(ctx, r.job.ID)
		if err != nil || ok {
			continue // store down: keep following; nobody else can claim
		}
		// Another gateway took the job over while this one could not renew
		// (e.g. cut off from the store): let it follow the job alone.
		m.logger.Warn("job taken over by another gateway; letting go", zap.String("job", r.job.ID))
		m.abandon(r)
	}
}

// abandon stops following a job without ending it.
func (m *Manager) abandon(r *run) {
	r.mu.Lock()
	ending := r.finished // its end is being handled: let that finish it
	r.mu.Unlock()
	if ending {
		return
	}
	// Out of the queues first, so that no dispatch hands it a slot after
	// it let go.
	for _, p := range m.pools.list() {
		p.mu.Lock()
		p.queue().remove(r)
		p.mu.Unlock()
	}
	m.detach(r)
}

// Recover takes over active jobs that no live gateway follows. It never
// takes over a job this gateway follows or has just ended: one it ended
// whose record still says active (the final save failed) is saved again
// instead.
func (m *Manager) Recover(ctx context.Context) {
	jobs, err := m.store.ActiveJobs(ctx)
	if err != nil {
		m.logger.Warn("listing active jobs", zap.Error(err))
		return
	}
	m.leases.forgetEnded(time.Now())
	for _, j := range jobs {
		// Its run first, then its end: a job leaves m.runs only once it
		// is remembered as ended (finish, drop).
		_, mine := m.runs.get(j.ID)
		if mine {
			continue
		}
		if end, endedHere := m.leases.endedHere(j.ID); endedHere {
			m.leases.repairEnded(ctx, j.ID, end)
			continue
		}
		if !m.leases.claim(ctx, j.ID) {
			continue
		}
		// The list may be older than the lease: a job that ended since
		// has been saved as ended before its gateway let the lease go.
		fresh, err := m.store.Job(ctx, j.ID)
		if err != nil || !fresh.Active() {
			m.leases.unclaim(j.ID)
			continue
		}
		m.adopt(ctx, fresh)
	}
}

// InputsFor, when set, gives the input source for a job this gateway takes
// over before it was sent (its files are on the user's home).
type InputsFor func(j *Job) InputSource

// SetInputsFor sets how adopted jobs find their input files.
func (m *Manager) SetInputsFor(f InputsFor) { m.inputsFor = f }

func (m *Manager) adopt(ctx context.Context, j *Job) {
	log := m.logger.With(zap.String("job", j.ID), zap.String("user", j.User))
	r := newRun(m, j)
	if j.Upstream == "" {
		// It was waiting for a slot: queue it again here.
		pool, ok := m.Pool(j.Pool)
		if !ok {
			log.Warn("cannot take over job: its pool is gone", zap.String("pool", j.Pool))
			m.runs.put(r)
			r.fail("The GPU pool " + j.Pool + " is no longer configured.")
			return
		}
		r, err := m.waitingRun(j)
		m.runs.put(r)
		if err != nil {
			r.fail(err.Error())
			return
		}
		log.Info("took over a waiting job")
		m.requeue(pool, r)
		m.dispatchWaiting(pool)
		return
	}
	if j.Transport == TransportWorker {
		// Its stream ended with the gateway that held it; the container
		// interrupted the job when the stream broke.
		m.runs.put(r)
		r.fail("The gateway restarted while this job ran on a pinned GPU endpoint; please queue it again.")
		return
	}
	// It was sent: listen as the sid it was sent with.
	var slot *Upstream
	opts := UpstreamOptions{ClientID: j.UpstreamClient, Logger: m.logger}
	if pool, ok := m.Pool(j.Pool); ok {
		for _, u := range pool.Upstreams {
			if u.String() == j.Upstream {
				slot = u
				opts.Header = u.Header
				opts.LostTimeout = u.LostTimeout
			}
		}
	}
	pid := j.UpstreamID
	if pid == "" {
		pid = j.ID
	}
	// ComfyUI sends a sid's events to one socket only: a second socket
	// on a sid this process listens on already would cut the first off.
	// So the job is followed on the stream that has its sid, if any; else
	// on a stream of its own, shared with the other jobs taken over on
	// that sid and closed with the last of them.
	m.adopted.mu.Lock()
	up, own := m.streamWithSid(j.Upstream, j.UpstreamClient)
	if up == nil {
		var err error
		if up, err = NewUpstream(j.Upstream, opts); err != nil {
			m.adopted.mu.Unlock()
			m.runs.put(r)
			r.fail(PublicMessage(j.Pool, "The job's GPU server address is not valid: "+err.Error()))
			return
		}
		m.adopted.addLocked(up)
	}
	r.up, r.adopted = up, true
	if slot != nil {
		// The job runs there already: take a slot even if the dead
		// gateway's has not expired yet.
		token, ok := slot.take(j.User)
		if !ok {
			slot.mu.Lock()
			slot.inflight++
			slot.mu.Unlock()
		}
		r.holdSlot(slot, token)
	}
	r.routeIDs = []string{pid}
	m.runs.put(r)
	up.register(pid, r)
	m.adopted.mu.Unlock()
	if own {
		// Sent by this very process (sids are made per process), which
		// then lost track of it: follow it again on its own stream.
		log.Warn("following again a job this gateway had lost track of", zap.String("upstream", up.String()))
	} else {
		log.Info("took over a running job", zap.String("upstream", up.String()))
	}
	go func() {
		sctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		err := up.ensureStream(sctx)
		cancel()
		if err != nil {
			log.Warn("taken-over job's upstream unreachable", zap.Error(err))
			// The stream loop keeps trying and fails the job after its
			// LostTimeout; the history check below may still finish it.
		}
		// Still queued or running there: its events end it; if its end
		// event went by before it was routed here, the end-of-job marker
		// the GPU sends after writing its history does (endFromHistory).
		if r.resync() == stateGone {
			// Neither ended nor queued there: no event will ever come.
			r.fail("The job is no longer on its GPU server: it was lost while no gateway followed it. Please queue it again.")
		}
	}()
}

// waitingRun rebuilds, from its record, the run of a job that waited for
// a slot on another gateway.
func (m *Manager) waitingRun(j *Job) (*run, error) {
	r := newRun(m, j)
	body, _ := json.Marshal(map[string]any{"prompt": j.Prompt, "extra_data": j.ExtraData})
	pr, err := comfy.ParsePromptRequest(body)
	if err != nil {
		return r, fmt.Errorf("The job's prompt could not be read back: %w", err)
	}
	r.req = SubmitRequest{User: j.User, ClientID: j.ClientID, Pool: j.Pool, Home: j.Home, Request: pr, Priority: j.Priority}
	if m.inputsFor != nil {
		r.req.Inputs = m.inputsFor(j)
	}
	return r, nil
}

// streamWithSid returns this process's stream toward upstream that listens
// as sid: a pool endpoint's or a home's own stream (own), or one opened
// for jobs taken over. Call with m.adopted.mu held.
func (m *Manager) streamWithSid(upstream, sid string) (_ *Upstream, own bool) {
	if sid == "" {
		return nil, false
	}
	for _, u := range m.pools.upstreams() {
		if u.listensAs(upstream, sid) {
			return u, true
		}
	}
	// An endpoint a config reload replaced keeps its stream while its jobs
	// run.
	for _, r := range m.runs.list() {
		r.mu.Lock()
		u, adopted := r.up, r.adopted
		r.mu.Unlock()
		if u != nil && !adopted && u.listensAs(upstream, sid) && !u.isClosed() {
			return u, true
		}
	}
	if u := m.adopted.byKey[streamKey{upstream, sid}]; u != nil && !u.isClosed() {
		return u, false
	}
	return nil, false
}

// listensAs reports whether u is the stream toward upstream (as String
// names it) listening as sid.
func (u *Upstream) listensAs(upstream, sid string) bool {
	return u.clientID == sid && u.String() == upstream
}

// isClosed reports whether u was closed.
func (u *Upstream) isClosed() bool {
	u.mu.Lock()
	defer u.mu.Unlock()
	return u.closed
}
