package dispatch

import (
	"context"
	"time"

	"go.uber.org/zap"
)

// poolQueues owns where waiting jobs wait: each pool's own fair queue in
// this process, or — when gateways share the store — the SharedQueue of
// every gateway's jobs. It answers how many jobs a user has waiting,
// whether a pool has any, where each waiting job stands, and takes a
// cancelled job out. It points down to the runs (a local queue's order
// depends on each user's running jobs) and the SharedQueue; putting jobs
// in and taking the next one out stays with the Manager, which sends them.
type poolQueues struct {
	// shared is the store's queue shared with other gateways (nil: each
	// pool's queue lives in this process).
	shared SharedQueue
	runs   *runSet
	logger *zap.Logger
}

// Positions returns the place (1 = next) of each of the pool's waiting
// jobs in the order the queue plans to run them.
func (m *Manager) Positions(pool string) map[string]int {
	p, ok := m.Pool(pool)
	if !ok {
		return nil
	}
	return m.queues.positions(p)
}

// positions returns the place (1 = next) of each of the pool's waiting
// jobs.
func (q *poolQueues) positions(p *Pool) map[string]int {
	if q.shared != nil {
		return q.sharedPositions(p)
	}
	running := q.runs.runningByUser(p.Name)
	p.mu.Lock()
	defer p.mu.Unlock()
	out := map[string]int{}
	for r, pos := range p.queue().positions(running) {
		out[r.job.ID] = pos
	}
	return out
}

// waitingCount counts a user's jobs waiting in a pool's queue.
func (q *poolQueues) waitingCount(ctx context.Context, p *Pool, user string) (int, error) {
	if q.shared != nil {
		return q.shared.Waiting(ctx, p.Name, user)
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.queue().userLen(user), nil
}

// unqueue takes a cancelled job out of its pool's queue; false if it was
// not waiting there.
func (q *poolQueues) unqueue(ctx context.Context, p *Pool, r *run) bool {
	if q.shared != nil {
		ok, err := q.shared.Dequeue(ctx, p.Name, r.job.User, r.job.ID)
		if err != nil {
			q.logger.Warn("taking a cancelled job out of the shared queue", zap.String("job", r.job.ID), zap.Error(err))
		}
		return ok
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.queue().remove(r)
}

// hasWaiting reports whether jobs wait for the pool's endpoints: held for a
// cold start, or queued (here, or in the shared queue). Probing only then
// keeps a scaled-to-zero deployment that nobody needs asleep.
func (q *poolQueues) hasWaiting(ctx context.Context, p *Pool) bool {
	p.mu.Lock()
	local := len(p.held) > 0 || p.queue().len() > 0
	p.mu.Unlock()
	if local || q.shared == nil {
		return local
	}
	ctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	n, err := q.shared.PoolWaiting(ctx, p.Name)
	return err != nil || n > 0 // unsure: probe
}

// view returns the place (1 = next) of each of the pool's queued
// jobs, and each user's jobs running on it — of every gateway when the
// queue is shared. A store that does not answer gives no places.
func (q *poolQueues) view(ctx context.Context, p *Pool) (positions, running map[string]int) {
	if q.shared != nil {
		return q.sharedView(ctx, p)
	}
	running = q.runs.runningByUser(p.Name)
	p.mu.Lock()
	defer p.mu.Unlock()
	positions = map[string]int{}
	for r, pos := range p.queue().positions(running) {
		positions[r.job.ID] = pos
	}
	return positions, running
}

// sharedPositions tells where each waiting job of the pool stands in the
// shared queue's order.
func (q *poolQueues) sharedPositions(p *Pool) map[string]int {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	pos, _ := q.sharedView(ctx, p)
	return pos
}

// sharedView reads the pool's shared queue once: where each waiting
// job stands, and how many jobs each user runs on the pool (every gateway's).
func (q *poolQueues) sharedView(ctx context.Context, p *Pool) (positions, running map[string]int) {
	names := make([]string, 0, len(p.Upstreams))
	for _, u := range p.Upstreams {
		names = append(names, u.String())
	}
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	st, err := q.shared.QueueState(ctx, p.Name, names)
	if err != nil {
		q.logger.Warn("reading the shared queue", zap.String("pool", p.Name), zap.Error(err))
		return nil, nil
	}
	fq := newFairQueue()
	fq.served = map[string]uint64{}
	for _, u := range st.Users {
		for _, id := range u.Jobs {
			fq.push(&run{job: &Job{ID: id, User: u.User, Priority: u.Priority}})
		}
		fq.served[u.User] = u.Served
		fq.seq = max(fq.seq, u.Served)
	}
	out := map[string]int{}
	for r, pos := range fq.positions(st.Running) {
		out[r.job.ID] = pos
	}
	return out, st.Running
}
