package dispatch

import (
	"context"
	"encoding/json"
	"sort"
	"sync"
	"time"
	"unicode/utf8"
)

// What an operator sees of the jobs: who runs what where, who waits and
// why, and the latest failures. Never a prompt or a workflow.

// opsView owns what the operator's pages see of the pools and jobs (Board,
// Status). It only reads: the store's active jobs, the runs, the pools and
// their queues.
type opsView struct {
	store  Store
	runs   *runSet
	pools  *poolSet
	queues *poolQueues
}

// JobBrief is a job as the operator's page lists it.
type JobBrief struct {
	ID   string `json:"id"`
	User string `json:"user"`
	Pool string `json:"pool"`
	// Endpoint is where the job runs (password redacted); "" while it
	// waits.
	Endpoint string `json:"endpoint,omitempty"`
	// Status is "pending" (waiting, or queued on its endpoint) or
	// "in_progress".
	Status string `json:"status"`
	// Created is when the prompt came, Started when its endpoint began it
	// (Unix milliseconds; 0: not yet).
	Created int64 `json:"created"`
	Started int64 `json:"started,omitempty"`
	// Position is the job's place in its pool's queue (1 = next; 0: not
	// in the queue, e.g. held for a cold-start retry).
	Position int `json:"position,omitempty"`
	// Why the job waits, as its user is told ("Waiting for a free GPU
	// server — next in line").
	Why string `json:"why,omitempty"`
}

// Board is every pool's running and waiting jobs — of every gateway when
// the store is shared.
type Board struct {
	Running []JobBrief `json:"running"`
	Waiting []JobBrief `json:"waiting"`
	// MoreRunning and MoreWaiting count the jobs left out beyond the
	// limit Board was asked for.
	MoreRunning int `json:"more_running,omitempty"`
	MoreWaiting int `json:"more_waiting,omitempty"`
}

// Board lists the running jobs and the waiting ones (in queue order, each
// with why it waits), at most limit of each. The store is asked for every
// gateway's jobs; when it cannot answer, this gateway's own are listed and
// the error returned with them.
func (m *Manager) Board(ctx context.Context, limit int) (Board, error) {
	return m.ops.board(ctx, limit)
}

// board lists the running and the waiting jobs (see Manager.Board).
func (o *opsView) board(ctx context.Context, limit int) (Board, error) {
	jobs, err := o.store.ActiveJobs(ctx)
	if err != nil {
		jobs = nil
		runs := o.runs.list()
		for _, r := range runs {
			jobs = append(jobs, r.snapshot().Summary())
		}
	}
	var b Board
	byPool := map[string][]*Job{}
	for _, j := range jobs {
		if !j.Active() || j.Pool == "" {
			continue
		}
		if j.Upstream != "" {
			b.Running = append(b.Running, JobBrief{ID: j.ID, User: j.User, Pool: j.Pool, Endpoint: j.Upstream,
				Status: j.Status, Created: j.CreateTime, Started: j.StartTime})
			continue
		}
		byPool[j.Pool] = append(byPool[j.Pool], j)
	}
	sort.Slice(b.Running, func(x, y int) bool {
		a, c := b.Running[x], b.Running[y]
		if a.Pool != c.Pool {
			return a.Pool < c.Pool
		}
		if a.Endpoint != c.Endpoint {
			return a.Endpoint < c.Endpoint
		}
		return a.Created < c.Created
	})
	names := make([]string, 0, len(byPool))
	for name := range byPool {
		names = append(names, name)
	}
	sort.Strings(names)
	for _, name := range names {
		b.Waiting = append(b.Waiting, o.waitingBriefs(ctx, name, byPool[name])...)
	}
	if limit > 0 {
		if n := len(b.Running) - limit; n > 0 {
			b.Running, b.MoreRunning = b.Running[:limit], n
		}
		if n := len(b.Waiting) - limit; n > 0 {
			b.Waiting, b.MoreWaiting = b.Waiting[:limit], n
		}
	}
	return b, err
}

// waitingBriefs orders a pool's waiting jobs as its queue will run them and
// says why each waits (see waitWhy).
func (o *opsView) waitingBriefs(ctx context.Context, pool string, jobs []*Job) []JobBrief {
	out := make([]JobBrief, 0, len(jobs))
	p, ok := o.pools.get(pool)
	if !ok {
		for _, j := range jobs {
			out = append(out, JobBrief{ID: j.ID, User: j.User, Pool: j.Pool, Status: j.Status, Created: j.CreateTime,
				Why: "its pool is no longer configured here"})
		}
		return out
	}
	pos, running := o.queues.view(ctx, p)
	type heldRun struct {
		attempts int
		firstTry time.Time
	}
	p.mu.Lock()
	heldRuns := make([]*run, 0, len(p.held))
	for r := range p.held {
		heldRuns = append(heldRuns, r)
	}
	p.mu.Unlock()
	held := map[string]heldRun{} // jobs of this gateway waiting out a retry
	for _, r := range heldRuns {
		r.mu.Lock()
		held[r.job.ID] = heldRun{r.attempts, r.firstTry}
		r.mu.Unlock()
	}
	up := false
	for _, u := range p.Upstreams {
		if u.Healthy() {
			up = true
			break
		}
	}
	now := time.Now()
	for _, j := range jobs {
		jb := JobBrief{ID: j.ID, User: j.User, Pool: j.Pool, Status: j.Status, Created: j.CreateTime}
		h, isHeld := held[j.ID]
		n, queued := pos[j.ID]
		jb.Position = n
		if why, ok := waitWhy(p, j.User, isHeld, h.attempts, h.firstTry, n, queued, up, running, now); ok {
			jb.Why = "Waiting for " + why
		} else {
			jb.Why = "Being sent, or between two tries of a cold start on another gateway"
		}
		out = append(out, jb)
	}
	sort.SliceStable(out, func(x, y int) bool {
		a, c := out[x], out[y]
		if (a.Position == 0) != (c.Position == 0) {
			return a.Position != 0
		}
		if a.Position != c.Position {
			return a.Position < c.Position
		}
		return a.Created < c.Created
	})
	return out
}

// Failure is a job that ended with an error, as the operator's page lists
// it.
type Failure struct {
	// Time the job failed (Unix milliseconds).
	Time     int64  `json:"time"`
	JobID    string `json:"job_id"`
	User     string `json:"user"`
	Pool     string `json:"pool"`
	Endpoint string `json:"endpoint,omitempty"`
	// Node is the type of the node that failed, Type the exception's.
	Node string `json:"node,omitempty"`
	Type string `json:"type,omitempty"`
	// Message is the error the user was shown (at most
	// MaxFailureMessage bytes).
	Message string `json:"message"`
}

// RecentFailures is how many failures are kept (per gateway, and in a
// shared store's list).
const RecentFailures = 100

// MaxFailureMessage bounds a kept failure's message, in bytes.
const MaxFailureMessage = 2000

// FailureLog is implemented by stores several gateways share: one list of
// the latest RecentFailures failures of all of them.
type FailureLog interface {
	AddFailure(ctx context.Context, f Failure) error
	Failures(ctx context.Context, n int) ([]Failure, error)
}

// failureRing keeps this gateway's latest failures.
type failureRing struct {
	mu   sync.Mutex
	list []Failure // oldest first, at most RecentFailures
}

func (f *failureRing) add(x Failure) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if len(f.list) >= RecentFailures {
		copy(f.list, f.list[1:])
		f.list = f.list[:len(f.list)-1]
	}
	f.list = append(f.list, x)
}

// latest returns up to n failures, newest first.
func (f *failureRing) latest(n int) []Failure {
	f.mu.Lock()
	defer f.mu.Unlock()
	out := make([]Failure, 0, min(n, len(f.list)))
	for i := len(f.list) - 1; i >= 0 && len(out) < n; i-- {
		out = append(out, f.list[i])
	}
	return out
}

// failureOf describes a failed job from its record.
func failureOf(j *Job) Failure {
	f := Failure{Time: j.EndTime, JobID: j.ID, User: j.User, Pool: j.Pool, Endpoint: j.Upstream}
	if f.Time == 0 {
		f.Time = time.Now().UnixMilli()
	}
	var e struct {
		Message  string `json:"exception_message"`
		Type     string `json:"exception_type"`
		NodeType string `json:"node_type"`
	}
	_ = json.Unmarshal(j.Error, &e)
	f.Message, f.Type, f.Node = clipText(e.Message, MaxFailureMessage), clipText(e.Type, 200), clipText(e.NodeType, 200)
	if f.Message == "" {
		f.Message = "(no message)"
	}
	return f
}

// clipText cuts s to at most n bytes, at a rune boundary.
func clipText(s string, n int) string {
	if len(s) <= n {
		return s
	}
	s = s[:n]
	for len(s) > 0 && !utf8.ValidString(s) {
		s = s[:len(s)-1]
	}
	return s + "…"
}
