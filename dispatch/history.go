package dispatch

import (
	"context"
	"sync/atomic"
	"time"

	"go.uber.org/zap"
)

// jobHistory owns what this gateway keeps of jobs once they end: how many
// ended jobs (and how many bytes of their bodies) each user keeps, what
// goes with the jobs it forgets, the count of ended jobs by outcome, and
// the latest failures. It points down to the job Store only.
type jobHistory struct {
	store  Store
	logger *zap.Logger
	// limit is how many ended jobs each user keeps.
	limit atomic.Int64
	// bytes bounds the bodies of each user's ended jobs (bytes).
	bytes atomic.Int64
	// outputs bounds what each user's ended jobs' outputs take in the
	// outputs store (bytes).
	outputs atomic.Int64
	// forget removes what else goes with forgotten jobs (set before Start).
	forget   func(ctx context.Context, ids []string)
	outcomes jobOutcomes
	failures failureRing // the latest failed jobs, for operators
}

// DefaultHistoryLimit is how many ended jobs each user keeps by default.
const DefaultHistoryLimit = 1000

// SetHistoryLimit sets how many ended jobs each user keeps (0: the
// default). When a job ends, the user's oldest ended jobs beyond the limit
// are forgotten, as ComfyUI forgets the oldest history beyond its own.
func (m *Manager) SetHistoryLimit(n int) {
	if n <= 0 {
		n = DefaultHistoryLimit
	}
	m.history.limit.Store(int64(n))
}

// DefaultHistorySize is the default byte budget of each user's ended
// jobs' bodies (prompts and UI workflows).
const DefaultHistorySize = 256 << 20

// SetHistorySize sets the byte budget of each user's ended jobs' bodies —
// their prompts and UI workflows (0: DefaultHistorySize). When a job ends,
// the user's oldest ended jobs beyond it are forgotten whole, as beyond
// the history limit; the newest ended job is always kept.
func (m *Manager) SetHistorySize(n int64) {
	if n <= 0 {
		n = DefaultHistorySize
	}
	m.history.bytes.Store(n)
}

// DefaultHistoryOutputs is the default byte budget of the captured outputs
// of each user's ended jobs.
const DefaultHistoryOutputs = 10 << 30

// SetHistoryOutputs sets the byte budget of the captured outputs of each
// user's ended jobs (0: DefaultHistoryOutputs). When a job with outputs
// ends, the user's oldest ended jobs beyond it are forgotten whole,
// records and outputs, as beyond the history limit; the newest ended job
// is always kept. So a user's outputs take at most this plus what their
// waiting and running jobs store (each up to max_output_size), however
// many jobs they run.
func (m *Manager) SetHistoryOutputs(n int64) {
	if n <= 0 {
		n = DefaultHistoryOutputs
	}
	m.history.outputs.Store(n)
}

// OnForget sets what else goes with the jobs the history limit forgets
// (their captured files). Call it before Start.
func (m *Manager) OnForget(f func(ctx context.Context, ids []string)) { m.history.forget = f }

// Ended counts the jobs that ended on this gateway since it started, by
// final status ("completed", "failed", "cancelled").
func (m *Manager) Ended() map[string]uint64 {
	o := &m.history.outcomes
	return map[string]uint64{
		StatusCompleted: o.completed.Load(),
		StatusFailed:    o.failed.Load(),
		StatusCancelled: o.cancelled.Load(),
	}
}

// Failures returns up to n of the latest failed jobs, newest first: of
// every gateway when the store keeps a shared list (this gateway's own
// when it cannot be read).
func (m *Manager) Failures(ctx context.Context, n int) ([]Failure, error) {
	return m.history.latestFailures(ctx, n)
}

// ended records a job that ended here (snap is its final state): it is
// counted, kept among the failures if it failed, and the user's oldest
// ended jobs beyond the limits are forgotten (in the background).
func (h *jobHistory) ended(snap *Job) {
	h.outcomes.count(snap.Status)
	if snap.Status == StatusFailed {
		h.recordFailure(snap)
	}
	go h.trim(snap.User, snap.StoredBytes > 0)
}

// trim forgets the user's oldest ended jobs beyond the limits, and what
// goes with them.
func (h *jobHistory) trim(user string, stored bool) {
	keep := int(h.limit.Load())
	if keep <= 0 {
		keep = DefaultHistoryLimit
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	budget := h.bytes.Load()
	if budget <= 0 {
		budget = DefaultHistorySize
	}
	ids, err := h.store.Trim(ctx, user, keep, budget)
	if err != nil {
		h.logger.Warn("forgetting old jobs", zap.String("user", user), zap.Error(err))
	}
	if len(ids) > 0 && h.forget != nil {
		h.forget(ctx, ids)
	}
	if stored {
		h.trimOutputs(ctx, user)
	}
}

// outputTotals is a Store that keeps each user's total StoredBytes of
// ended jobs (MemoryStore, ValkeyStore): the end of a job with outputs
// then reads the user's jobs only when they are over the budget, not
// their whole history every time.
type outputTotals interface {
	EndedOutputBytes(ctx context.Context, user string) (int64, error)
}

// trimOutputs forgets the user's oldest ended jobs beyond the newest whose
// stored outputs fit in the outputs budget together (the newest ended job
// is always kept; waiting and running jobs are never forgotten): their
// records and their outputs.
func (h *jobHistory) trimOutputs(ctx context.Context, user string) {
	budget := h.outputs.Load()
	if budget <= 0 {
		budget = DefaultHistoryOutputs
	}
	if t, ok := h.store.(outputTotals); ok {
		if total, err := t.EndedOutputBytes(ctx, user); err == nil && total <= budget {
			return
		}
	}
	jobs, err := h.store.UserJobSummaries(ctx, user)
	if err != nil {
		h.logger.Warn("reading jobs to bound their outputs", zap.String("user", user), zap.Error(err))
		return
	}
	var ended []*Job
	var total int64
	for _, j := range jobs {
		if !j.Active() {
			ended = append(ended, j)
			total += j.StoredBytes
		}
	}
	if total <= budget {
		return
	}
	SortJobs(ended)
	kept, sum := len(ended), int64(0)
	for i := range ended {
		sum += ended[len(ended)-1-i].StoredBytes
		if sum > budget && i > 0 {
			kept = i
			break
		}
	}
	var gone []string
	for _, j := range ended[:len(ended)-kept] {
		if err := h.store.Delete(ctx, j.ID); err != nil {
			h.logger.Warn("forgetting a job beyond the outputs budget", zap.String("job", j.ID), zap.Error(err))
			continue
		}
		gone = append(gone, j.ID)
	}
	if len(gone) > 0 {
		h.logger.Info("forgot a user's oldest jobs: their outputs were over the budget",
			zap.String("user", user), zap.Int("jobs", len(gone)), zap.Int64("budget", budget))
		if h.forget != nil {
			h.forget(ctx, gone)
		}
	}
}

// jobOutcomes counts jobs that ended here, by their final status.
type jobOutcomes struct {
	completed, failed, cancelled atomic.Uint64
}

func (o *jobOutcomes) count(status string) {
	switch status {
	case StatusCompleted:
		o.completed.Add(1)
	case StatusFailed:
		o.failed.Add(1)
	case StatusCancelled:
		o.cancelled.Add(1)
	}
}

// recordFailure keeps a failed job in this gateway's ring and, with a
// shared store, in the shared list.
func (h *jobHistory) recordFailure(j *Job) {
	f := failureOf(j)
	h.failures.add(f)
	if fl, ok := h.store.(FailureLog); ok {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		if err := fl.AddFailure(ctx, f); err != nil {
			h.logger.Debug("failure not shared", zap.Error(err))
		}
	}
}

// latestFailures returns up to n of the latest failed jobs, newest first
// (see Manager.Failures).
func (h *jobHistory) latestFailures(ctx context.Context, n int) ([]Failure, error) {
	n = min(max(n, 0), RecentFailures)
	if fl, ok := h.store.(FailureLog); ok {
		out, err := fl.Failures(ctx, n)
		if err == nil {
			return out, nil
		}
		return h.failures.latest(n), err
	}
	return h.failures.latest(n), nil
}
