package dispatch

import (
	"context"
	"encoding/json"
	"errors"
	"net/url"
	"strconv"
	"sync"
	"time"

	"go.uber.org/zap"

	"github.com/comfyume/comfyume/usage"
)

// OutputCounter is implemented by Events that store jobs' outputs: the
// bytes stored for a job so far, forgotten once taken (when the job ends).
type OutputCounter interface {
	TakeOutputBytes(jobID string) int64
}

// accounts owns each user's use of the pools: the ledger that records it
// and holds the daily quotas (admission of a prompt, the check of a
// waiting job, the record of an ended one), and this gateway's counters
// for metrics. It points down to the usage package and, for the bytes of
// a job's outputs, to the OutputCounter the Events may be.
type accounts struct {
	logger  *zap.Logger
	outputs OutputCounter // nil: outputs are not counted

	mu       sync.Mutex
	ledger   usage.Ledger // nil: none kept
	counters usage.Counters
}

// SetUsage sets the ledger that records each user's use of the pools and
// holds their quotas (nil: none kept). Call it before jobs run.
func (m *Manager) SetUsage(l usage.Ledger) {
	m.accounts.mu.Lock()
	m.accounts.ledger = l
	m.accounts.mu.Unlock()
}

// Usage returns the usage ledger (nil when none is kept).
func (m *Manager) Usage() usage.Ledger { return m.accounts.kept() }

// UsageCounters returns this gateway's running totals of use per pool
// (and per user, when turned on), for metrics.
func (m *Manager) UsageCounters() *usage.Counters { return &m.accounts.counters }

// kept returns the ledger (nil when none is kept).
func (a *accounts) kept() usage.Ledger {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.ledger
}

// admit counts a prompt against the user's quota on the pool, and returns
// the day it counted on ("" when no ledger is kept). Over the quota it
// returns the *usage.ExceededError the user is shown. A ledger that cannot
// be asked refuses the prompt only when a limit applies.
func (a *accounts) admit(ctx context.Context, p *Pool, req SubmitRequest) (string, error) {
	l := a.kept()
	if l == nil {
		return "", nil
	}
	lim := p.Quota.Apply(req.Quota)
	day := usage.DayOf(time.Now())
	err := l.Admit(ctx, day, p.Name, req.User, lim)
	var ex *usage.ExceededError
	switch {
	case err == nil:
		return day, nil
	case errors.As(err, &ex):
		a.counters.Refused(p.Name, req.User, ex.Kind)
		return "", err
	case lim.None():
		a.logger.Warn("usage not recorded: the ledger did not answer", zap.String("user", req.User), zap.Error(err))
		return "", nil
	default:
		return "", &StoreError{Err: err}
	}
}

// overQuota is checked when a waiting job of user leaves the queue (quota
// is its site's change of the pool's limits): if the user's jobs that
// ended meanwhile used up their GPU time for today, the job is not sent
// and gets the refusal (nil: send it). Without it every prompt admitted
// while the user was under the quota — max_queued of them — would run,
// however far past it. A ledger that cannot be read lets the job go (it
// was admitted). A job taken over from another gateway keeps the pool's
// quota only (its site's override is not in its record).
func (a *accounts) overQuota(ctx context.Context, p *Pool, user string, quota usage.Override) error {
	l := a.kept()
	if l == nil || p.Quota.Apply(quota).GPU <= 0 {
		return nil
	}
	now := time.Now()
	day := usage.DayOf(now)
	rows, err := l.Usage(ctx, usage.Query{Since: day, Until: day, User: user, Pool: p.Name})
	if err != nil || len(rows) != 1 {
		return nil
	}
	limit, ok := rows[0].GPULimit()
	used := time.Duration(rows[0].GPUSeconds * float64(time.Second))
	if !ok || used < limit {
		return nil
	}
	a.counters.Refused(p.Name, user, usage.KindGPU)
	return &usage.ExceededError{Pool: p.Name, Kind: usage.KindGPU, Used: used.Milliseconds(),
		Limit: limit.Milliseconds(), Resets: usage.ResetTime(now), Now: now}
}

// unadmit gives back an admission of a prompt that never ran.
func (a *accounts) unadmit(day, pool, user string) {
	l := a.kept()
	if l == nil || day == "" {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := l.Unadmit(ctx, day, pool, user); err != nil {
		a.logger.Warn("giving back a prompt's admission", zap.String("user", user), zap.Error(err))
	}
}

// account records what an ended job used, at its end (a lifecycle point,
// never per event). A job that never started gives its admission back.
func (a *accounts) account(snap *Job) {
	bytes := snap.StoredBytes // (counted at the end event)
	if a.outputs != nil {
		bytes += a.outputs.TakeOutputBytes(snap.ID) // (a job that ended otherwise)
	}
	if snap.Pool == "" || !usage.ValidPool(snap.Pool) {
		return
	}
	if snap.StartTime == 0 || ranOnHome(snap) {
		// Never ran, or ran on the user's own ComfyUI (a pool's
		// fallback home): the pool's GPUs were not used.
		if snap.CreateTime > 0 {
			a.unadmit(usage.DayOf(time.UnixMilli(snap.CreateTime)), snap.Pool, snap.User)
		}
		return
	}
	now := time.Now()
	// Keyed by the id and when the job was made: a client-supplied
	// prompt_id reused once history_limit forgot its job is a new job
	// that ran again, and is counted again.
	e := usage.JobEnd{JobID: snap.ID + "@" + strconv.FormatInt(snap.CreateTime, 10), Day: usage.DayOf(now), Pool: snap.Pool, User: snap.User,
		Outcome: outcomeOf(snap), OutputBytes: bytes}
	e.GPU, e.Wait = jobTimes(snap, now)
	a.counters.Add(e)
	l := a.kept()
	if l == nil {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := l.Record(ctx, e); err != nil {
		a.logger.Warn("recording a job's usage", zap.String("job", snap.ID), zap.Error(err))
	}
}

// ranOnHome reports whether the job ran on the user's own ComfyUI.
func ranOnHome(j *Job) bool {
	if j.Upstream == "" || j.Home == "" {
		return false
	}
	u, err := url.Parse(j.Home)
	return err == nil && (j.Upstream == j.Home || j.Upstream == u.Redacted())
}

// jobTimes splits a job's life at the gateway into GPU time and waiting.
// GPU time is execution_start to the end, both stamped by the GPU server
// (one clock); it is bounded by the job's whole life at the gateway, so a
// server's wrong clock or lying stamps cannot inflate it. Waiting is the
// rest of that life: queue, cold start, sending inputs.
func jobTimes(j *Job, now time.Time) (gpu, wait time.Duration) {
	life := time.Duration(0)
	if j.CreateTime > 0 {
		life = max(now.Sub(time.UnixMilli(j.CreateTime)), 0)
	}
	end := j.EndTime
	if end == 0 {
		end = now.UnixMilli()
	}
	gpu = time.Duration(end-j.StartTime) * time.Millisecond
	gpu = min(max(gpu, 0), life)
	return gpu, life - gpu
}

// outcomeOf names how a job that ran ended: a failure the gateway made
// (the GPU server went away, went silent, lost the job) is "lost".
func outcomeOf(j *Job) usage.Outcome {
	switch j.Status {
	case StatusCompleted:
		return usage.Success
	case StatusCancelled:
		return usage.Interrupted
	}
	var e struct {
		Type string `json:"exception_type"`
	}
	if json.Unmarshal(j.Error, &e) == nil && e.Type == gatewayErrorType {
		return usage.Lost
	}
	return usage.Error
}

// gatewayErrorType is the exception_type of the execution_errors the
// gateway makes itself (run.fail).
const gatewayErrorType = "comfyume.UpstreamError"
