package dispatch

import (
	"context"
	"errors"
	"fmt"
	"time"

	"go.uber.org/zap"

	"github.com/comfyume/comfyume/comfy"
)

// Endpoint health. Each failure to hand a job to an endpoint (refused,
// 502/503/504, timeout — a serverless container scaling from zero looks
// exactly like that) counts against it; after FailuresToOpen in a row its
// circuit opens: no job is sent there until a health check (or, when every
// endpoint is down, one trial job) succeeds. Any success closes it.

// FailuresToOpen is how many failures in a row open an endpoint's circuit.
const FailuresToOpen = 3

func (u *Upstream) markFailure(now time.Time) {
	u.mu.Lock()
	defer u.mu.Unlock()
	u.failures++
	if u.failures >= FailuresToOpen {
		// 1 s, doubling to 8 s: a cold start that ends is noticed soon.
		backoff := time.Duration(1<<min(u.failures-FailuresToOpen, 3)) * time.Second
		u.openUntil = now.Add(backoff)
	}
}

// markSuccess records that the endpoint took a job or answered a check; it
// reports whether the endpoint had been failing (it is back: e.g. done
// with a cold start).
func (u *Upstream) markSuccess() bool {
	u.mu.Lock()
	defer u.mu.Unlock()
	back := u.failures > 0
	u.failures = 0
	u.openUntil = time.Time{}
	return back
}

// Healthy reports whether the endpoint's circuit is closed.
func (u *Upstream) Healthy() bool {
	u.mu.Lock()
	defer u.mu.Unlock()
	return u.failures < FailuresToOpen
}

// check probes the endpoint — GET /system_stats of a ComfyUI, or the
// worker's status (GET /comfyume/job: 200 once its ComfyUI answers, 503
// while it starts) of a pinned endpoint. Success marks it up; a failure
// changes nothing (it is down already: probes must not push its circuit's
// next trial further away).
func (u *Upstream) check(ctx context.Context) error {
	path := "/system_stats"
	if u.Pinned {
		path = WorkerPath
	}
	var st map[string]any
	if err := u.GetJSON(ctx, path, &st); err != nil {
		return err
	}
	u.markSuccess()
	return nil
}

// endpointBack is called when an endpoint that had been failing takes a
// job or answers a check: the jobs held for a cold start need not sit out
// their backoff — they are queued again now.
func (m *Manager) endpointBack(p *Pool, u *Upstream) {
	p.mu.Lock()
	held := p.held
	p.held = nil
	p.mu.Unlock()
	if len(held) == 0 {
		return
	}
	m.logger.Info("endpoint is back; sending the jobs held for it", zap.String("upstream", u.String()), zap.Int("jobs", len(held)))
	for r, tm := range held {
		// A timer that fired already finds its job gone from p.held and
		// leaves it to us: requeue whether or not Stop caught it.
		tm.Stop()
		if !r.isFinished() {
			m.requeue(p, r)
		}
	}
	m.dispatchWaiting(p)
}

// HealthChecks probes each pool's endpoints that are marked down every
// interval until ctx ends; an endpoint that answers becomes eligible again,
// and waiting jobs go. While a pool has jobs waiting or held for a cold
// start, its down endpoints are probed every ProbeWhileWaiting instead, so
// that the end of a cold start is noticed at once, not at the next
// interval or the next retry of a job (whose backoff grows to 8 s).
func (m *Manager) HealthChecks(ctx context.Context, interval time.Duration) {
	go func() {
		var slow <-chan time.Time
		if interval > 0 {
			t := time.NewTicker(interval)
			defer t.Stop()
			slow = t.C
		}
		fast := time.NewTicker(ProbeWhileWaiting)
		defer fast.Stop()
		for {
			all := false
			select {
			case <-ctx.Done():
				return
			case <-slow:
				all = true
			case <-fast.C:
			}
			for _, p := range m.pools.list() {
				m.expireWaiting(p, time.Now())
				if !all && (!anyDown(p) || !m.queues.hasWaiting(ctx, p)) {
					continue
				}
				var recovered *Upstream
				for _, u := range p.Upstreams {
					if u.Healthy() {
						continue // passive counting covers healthy ones
					}
					timeout := interval
					if timeout <= 0 || timeout > 10*time.Second {
						timeout = 10 * time.Second
					}
					cctx, cancel := context.WithTimeout(ctx, timeout)
					if u.check(cctx) == nil {
						recovered = u
						m.logger.Info("endpoint is up again", zap.String("upstream", u.String()))
					}
					cancel()
				}
				if recovered != nil {
					m.endpointBack(p, recovered)
					m.dispatchWaiting(p)
				}
			}
		}
	}()
}

// expireWaiting ends the jobs queued here that have waited longer than the
// pool's cold-start timeout while none of its endpoints was up (counted from
// when the pool went down, or the job came, whichever is later): like a job
// whose retries ran out, each runs on the user's own ComfyUI (fallback
// home) or fails with a message the UI shows.
func (m *Manager) expireWaiting(p *Pool, now time.Time) {
	up := false
	for _, u := range p.Upstreams {
		if u.Healthy() {
			up = true
			break
		}
	}
	timeout := p.ColdStartTimeout
	if timeout <= 0 {
		timeout = DefaultColdStartTimeout
	}
	p.mu.Lock()
	if up {
		p.downSince = time.Time{}
		p.mu.Unlock()
		return
	}
	if p.downSince.IsZero() {
		p.downSince = now
	}
	downSince := p.downSince
	expired := func(r *run) bool {
		since := time.UnixMilli(r.job.CreateTime)
		if since.Before(downSince) {
			since = downSince
		}
		return now.Sub(since) > timeout
	}
	var due []*run
	if m.queues.shared == nil {
		for _, rs := range p.queue().byUser {
			for _, r := range rs {
				if expired(r) {
					due = append(due, r)
				}
			}
		}
		for _, r := range due {
			p.queue().remove(r)
		}
		p.mu.Unlock()
	} else {
		held := make(map[*run]bool, len(p.held))
		for r := range p.held {
			held[r] = true
		}
		p.mu.Unlock()
		// This gateway's jobs waiting in the shared queue.
		var mine []*run
		for _, r := range m.runs.list() {
			if r.job.Pool == p.Name && !held[r] {
				mine = append(mine, r)
			}
		}
		for _, r := range mine {
			r.mu.Lock()
			waiting := r.up == nil && r.slot == nil && !r.finished && r.job.Status == StatusPending
			r.mu.Unlock()
			if waiting && expired(r) {
				ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
				if m.queues.unqueue(ctx, p, r) {
					due = append(due, r)
				}
				cancel()
			}
		}
	}
	for _, r := range due {
		job := r.snapshot()
		if p.FallbackHome && job.Home != "" {
			m.runOnHome(r, job, fmt.Sprintf("No GPU server of pool %q answered within %s; running on your own ComfyUI instead.", p.Name, timeout.Round(time.Second)))
			continue
		}
		m.failUnsent(r, fmt.Errorf("no GPU server of pool %q was up within %s", p.Name, timeout.Round(time.Second)))
	}
}

// ProbeWhileWaiting is how often endpoints marked down are probed while
// jobs wait for them.
const ProbeWhileWaiting = 250 * time.Millisecond

func anyDown(p *Pool) bool {
	for _, u := range p.Upstreams {
		if !u.Healthy() {
			return true
		}
	}
	return false
}

// DefaultColdStartTimeout is how long a job waits for an endpoint to accept
// it (serverless cold starts take from 30 s to several minutes).
const DefaultColdStartTimeout = 5 * time.Minute

// retryLater puts a job that no endpoint accepted back in its pool's queue
// after a backoff, telling the browser why it waits; past the pool's
// ColdStartTimeout it fails instead.
func (m *Manager) retryLater(p *Pool, r *run, cause error) {
	r.mu.Lock()
	if r.finished {
		r.mu.Unlock()
		return
	}
	r.attempts++
	if r.firstTry.IsZero() {
		r.firstTry = time.Now()
	}
	attempts, waited := r.attempts, time.Since(r.firstTry)
	job := r.job.Clone()
	r.mu.Unlock()
	timeout := p.ColdStartTimeout
	if timeout <= 0 {
		timeout = DefaultColdStartTimeout
	}
	if waited >= timeout {
		if p.FallbackHome && job.Home != "" {
			m.runOnHome(r, job, fmt.Sprintf("No GPU server of pool %q answered within %s; running on your own ComfyUI instead.", p.Name, timeout.Round(time.Second)))
			return
		}
		m.failUnsent(r, fmt.Errorf("no GPU server of pool %q accepted the job within %s: %w", p.Name, timeout.Round(time.Second), cause))
		return
	}
	backoff := time.Duration(1<<min(attempts-1, 5)) * 250 * time.Millisecond // 0.25 s … 8 s
	m.logger.Info("no endpoint took the job; retrying", zap.String("job", job.ID), zap.Int("attempt", attempts), zap.Duration("in", backoff), zap.Error(cause))
	defer m.waits.pokeWaiting() // tells the job why it waits (waiting.go)
	// Held until the backoff ends, or until an endpoint of the pool is back
	// (endpointBack), whichever comes first.
	p.mu.Lock()
	var tm *time.Timer
	tm = time.AfterFunc(backoff, func() {
		p.mu.Lock()
		mine := p.held[r] == tm
		if mine {
			delete(p.held, r)
		}
		p.mu.Unlock()
		if !mine || r.isFinished() {
			return
		}
		if cur, ok := m.Pool(p.Name); ok {
			p = cur // the configuration was reloaded meanwhile
		}
		m.requeue(p, r)
		m.dispatchWaiting(p)
	})
	if p.held == nil {
		p.held = map[*run]*time.Timer{}
	}
	p.held[r] = tm
	p.mu.Unlock()
}

// notify shows a line of text on the job's output node in the browser (a
// progress-text frame, which the unchanged frontend draws under the node).
func notify(events Events, j *Job, text string) {
	node := ""
	if len(j.OutputsToExecute) > 0 {
		node = j.OutputsToExecute[0]
	}
	events.Deliver(recipientOf(j), Event{Text: &comfy.TextFrame{PromptID: j.ID, NodeID: node, Text: []byte(text)}})
}

// beforeAcceptance reports whether a send error means the endpoint never
// took the job (so it may be retried or sent elsewhere).
func beforeAcceptance(err error) bool {
	var unav *UnavailableError
	return errors.As(err, &unav)
}

// failover moves a job whose endpoint vanished before the job started to
// another endpoint of its pool (through the queue, with the cold-start
// rules). It reports false for a job that had started: its work is lost
// with the endpoint, and it fails.
func (m *Manager) failover(r *run, up *Upstream, cause error) bool {
	r.mu.Lock()
	if r.finished || r.job.Status != StatusPending || r.adopted || r.cancelRun != nil {
		r.mu.Unlock()
		return false
	}
	ids := r.routeIDs
	r.up, r.routeIDs = nil, nil
	r.job.Upstream, r.job.UpstreamClient, r.job.UpstreamID = "", "", ""
	snap, snapNo := r.toSaveLocked()
	r.mu.Unlock()
	for _, id := range ids {
		up.unregister(id, r)
	}
	r.releaseSlot()
	up.markFailure(time.Now())
	pool, ok := m.Pool(snap.Pool)
	if !ok {
		return false
	}
	r.persist(snap, snapNo)
	m.logger.Warn("endpoint lost before the job started; sending it elsewhere", zap.String("job", snap.ID), zap.String("upstream", up.String()))
	m.retryLater(pool, r, cause)
	return true
}

// Watchdogs ends jobs that have had no event for their pool's Watchdog
// time: the upstream is asked to interrupt them and the browser gets an
// execution_error. It checks every interval until ctx ends.
func (m *Manager) Watchdogs(ctx context.Context, interval time.Duration) {
	go func() {
		t := time.NewTicker(interval)
		defer t.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case now := <-t.C:
				m.checkWatchdogs(ctx, now)
			}
		}
	}()
}

func (m *Manager) checkWatchdogs(ctx context.Context, now time.Time) {
	type stale struct {
		r    *run
		idle time.Duration
	}
	var due []stale
	for _, r := range m.runs.list() {
		p, _ := m.pools.get(r.job.Pool)
		if p == nil || p.Watchdog <= 0 {
			continue
		}
		r.mu.Lock()
		if r.events != r.watched {
			r.watched, r.lastEvent = r.events, now // it said something since the last check
		}
		if r.up != nil && !r.finished && !r.lastEvent.IsZero() && now.Sub(r.lastEvent) > p.Watchdog {
			due = append(due, stale{r, p.Watchdog})
			r.lastEvent = now // one interrupt per period
		}
		r.mu.Unlock()
	}
	for _, s := range due {
		s.r.mu.Lock()
		up, pid, stop := s.r.up, s.r.job.UpstreamID, s.r.cancelRun
		s.r.mu.Unlock()
		// The error first: the interruption's own event then comes too
		// late to replace it.
		s.r.fail(fmt.Sprintf("The GPU server sent nothing for %s; the job was stopped.", s.idle))
		if stop != nil {
			stop()
			continue
		}
		if up != nil {
			cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
			_, _, _ = up.PostJSON(cctx, "/interrupt", map[string]string{"prompt_id": pid})
			cancel()
		}
	}
}

// runOnHome sends a job no endpoint of its pool took to the user's own
// ComfyUI (a pool's `fallback home`). Its input files are there already;
// its outputs are captured from there like any other.
func (m *Manager) runOnHome(r *run, job *Job, notice string) {
	home, err := m.pools.home(job.Home, m.logger)
	if err != nil {
		m.failUnsent(r, err)
		return
	}
	notify(m.events, job, notice)
	r.mu.Lock()
	req := r.req
	req.Inputs = nil // the files are on home already
	r.req = req
	r.mu.Unlock()
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
		defer cancel()
		if _, err := m.send(ctx, r, home); err != nil {
			m.failUnsent(r, err)
		}
	}()
}
