package dispatch

import (
	"context"
	"time"

	"github.com/google/uuid"
	"go.uber.org/zap"
)

// With a SharedQueue (the Valkey store) every gateway's waiting jobs are in
// one queue per pool. A gateway that sees room on an endpoint (a job ended,
// a prompt came in, or its periodic look) takes the globally next job. Jobs
// it holds itself it sends; jobs another gateway holds go to that gateway's
// inbox, and it sends them (it has the job's run: the browser's session,
// the input files' source). So the fair order holds across every replica,
// and no job depends on which replica the load balancer picked.

// queued describes a run for the shared queue.
func queued(r *run) QueuedJob {
	j := r.job
	return QueuedJob{Pool: j.Pool, ID: j.ID, User: j.User, Priority: j.Priority, Order: float64(j.CreateTime)}
}

// requeue puts a job (back) in its pool's queue: at the head of its user's
// line. In the shared queue it keeps its original place there. A store
// that cannot be reached is tried again shortly.
func (m *Manager) requeue(p *Pool, r *run) {
	if m.queues.shared == nil {
		p.mu.Lock()
		p.queue().pushFront(r)
		p.mu.Unlock()
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := m.queues.shared.Enqueue(ctx, queued(r)); err != nil {
		m.logger.Warn("putting a job back in the shared queue; trying again", zap.String("job", r.job.ID), zap.Error(err))
		time.AfterFunc(time.Second, func() {
			if !r.isFinished() {
				m.requeue(p, r)
				m.dispatchWaiting(p)
			}
		})
	}
}

// takeRequest describes the pool's endpoints as this gateway sees them.
// It returns false when none may take a job.
func (m *Manager) takeRequest(p *Pool) (TakeRequest, bool) {
	t := TakeRequest{Pool: p.Name, MaxRunning: p.MaxRunning, Token: uuid.NewString(), TTL: m.leases.ttl, Owner: m.leases.owner}
	now := time.Now()
	for _, u := range p.Upstreams {
		u.mu.Lock()
		ok := u.failures < FailuresToOpen
		due := !ok && !now.Before(u.openUntil)
		u.mu.Unlock()
		e := EndpointSlots{Endpoint: u.String(), Max: u.MaxJobs}
		switch {
		case ok:
			t.Endpoints = append(t.Endpoints, e)
		case due:
			t.Trial = append(t.Trial, e)
		default:
			t.Others = append(t.Others, e.Endpoint)
		}
	}
	return t, len(t.Endpoints)+len(t.Trial) > 0
}

// dispatchShared takes jobs from the shared queue while endpoints have
// room. The job named want, when this gateway takes it for itself, is not
// started but returned: its submitter sends it and answers with the
// endpoint's verdict.
func (m *Manager) dispatchShared(p *Pool, want string) *Assignment {
	for i := 0; i < 256; i++ {
		t, ok := m.takeRequest(p)
		if !ok {
			return nil
		}
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		a, err := m.queues.shared.Take(ctx, t)
		cancel()
		if err != nil {
			m.logger.Warn("taking the next job from the shared queue", zap.String("pool", p.Name), zap.Error(err))
			return nil
		}
		if a == nil {
			return nil
		}
		for _, e := range t.Trial {
			if e.Endpoint == a.Endpoint {
				if u := p.endpoint(a.Endpoint); u != nil {
					u.mu.Lock()
					u.openUntil = time.Now().Add(time.Hour) // one trial at a time
					u.mu.Unlock()
				}
			}
		}
		switch {
		case a.JobID == want && a.Owner == m.leases.owner:
			return a
		case a.Owner == m.leases.owner || a.Owner == "":
			m.assigned(p, *a)
		default:
			// In its holder's inbox now; it sends the job.
		}
	}
	return nil
}

// assigned starts a job the shared queue gave a slot (taken here, or
// handed over by another gateway).
func (m *Manager) assigned(p *Pool, a Assignment) {
	r, _ := m.runs.get(a.JobID)
	if r == nil && a.Owner == "" {
		r = m.adoptAssigned(a)
	}
	up := p.endpoint(a.Endpoint)
	if r == nil || up == nil || r.isFinished() {
		m.releaseAssigned(a)
		if r != nil && up == nil && !r.isFinished() {
			m.logger.Warn("another gateway gave this one's job an endpoint its pool lacks: the replicas' pool configurations differ",
				zap.String("pool", p.Name), zap.String("endpoint", a.Endpoint), zap.String("job", a.JobID))
			m.requeue(p, r)
		}
		go m.dispatchWaiting(p)
		return
	}
	m.holdAssigned(r, up, a.Token)
	go m.sendQueued(p, r, up)
}

// holdAssigned records on the run the slot the shared queue gave it.
func (m *Manager) holdAssigned(r *run, up *Upstream, token string) {
	up.mu.Lock()
	up.inflight++
	up.mu.Unlock()
	r.holdSlot(up, token)
}

// releaseAssigned gives back the slot of an assignment nobody will send.
func (m *Manager) releaseAssigned(a Assignment) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	if err := m.queues.shared.ReleaseSlot(ctx, a.Endpoint, a.Token); err != nil {
		m.logger.Warn("releasing an unused shared slot", zap.String("endpoint", a.Endpoint), zap.Error(err))
	}
}

// adoptAssigned takes over a waiting job whose gateway is gone, to send it
// here.
func (m *Manager) adoptAssigned(a Assignment) *run {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if !m.leases.claim(ctx, a.JobID) {
		return nil
	}
	j, err := m.store.Job(ctx, a.JobID)
	if err != nil || j.Status != StatusPending || j.Upstream != "" {
		m.leases.unclaim(a.JobID)
		return nil
	}
	r, err := m.waitingRun(j)
	if err != nil {
		m.runs.put(r)
		r.fail(err.Error())
		return nil
	}
	m.runs.put(r)
	m.logger.Info("took over a waiting job", zap.String("job", j.ID), zap.String("user", j.User))
	return r
}

// followAssignments sends the jobs other gateways hand to this one, until
// ctx ends.
func (m *Manager) followAssignments(ctx context.Context) {
	var lastErr time.Time
	for ctx.Err() == nil {
		as, err := m.queues.shared.Assignments(ctx, m.leases.owner, 5*time.Second)
		if err != nil {
			if ctx.Err() != nil {
				return
			}
			if time.Since(lastErr) > time.Minute {
				m.logger.Warn("reading jobs handed to this gateway", zap.Error(err))
				lastErr = time.Now()
			}
			select {
			case <-ctx.Done():
				return
			case <-time.After(time.Second):
			}
			continue
		}
		for _, a := range as {
			p, ok := m.Pool(a.Pool)
			if !ok {
				m.releaseAssigned(a)
				continue
			}
			m.assigned(p, a)
		}
	}
}

func (r *run) isFinished() bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.finished
}
