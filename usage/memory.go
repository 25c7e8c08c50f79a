package usage

import (
	"context"
	"sync"
	"time"
)

// MemoryLedger keeps usage in this process (the `store memory` default).
// Days older than Retention are forgotten.
type MemoryLedger struct {
	mu   sync.Mutex
	days map[string]map[string]int64
	// done are the jobs recorded lately, by the day they ended.
	done   map[string]map[string]struct{}
	pruned string // the day old days were last forgotten
	now    func() time.Time
}

// NewMemoryLedger returns an empty ledger.
func NewMemoryLedger() *MemoryLedger {
	return &MemoryLedger{days: map[string]map[string]int64{}, done: map[string]map[string]struct{}{}, now: time.Now}
}

// dayLocked returns a day's fields, made on first use, forgetting days
// beyond Retention once a day.
func (l *MemoryLedger) dayLocked(day string) map[string]int64 {
	if today := DayOf(l.now()); today != l.pruned {
		l.pruned = today
		oldest := DayOf(l.now().Add(-Retention))
		for d := range l.days {
			if d < oldest {
				delete(l.days, d)
			}
		}
		// A job is recorded once when it ends: its marker is needed for
		// a day or two, not for the whole retention.
		recent := DayOf(l.now().Add(-48 * time.Hour))
		for d := range l.done {
			if d < recent {
				delete(l.done, d)
			}
		}
	}
	m := l.days[day]
	if m == nil {
		m = map[string]int64{}
		l.days[day] = m
	}
	return m
}

// Admit implements Ledger.
func (l *MemoryLedger) Admit(_ context.Context, day, pool, user string, lim Limits) error {
	if err := checkArgs(day, pool, user); err != nil {
		return err
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	m := l.dayLocked(day)
	m[field(fLimGPU, pool, user)] = lim.GPU.Milliseconds()
	m[field(fLimJobs, pool, user)] = lim.Jobs
	used, admitted := m[field(fGPU, pool, user)], m[field(fAdmitted, pool, user)]
	xg, xj := m[field(fExtraGPU, pool, user)], m[field(fExtraJobs, pool, user)]
	if kind := verdict(used, admitted, xg, xj, lim); kind != "" {
		return exceeded(day, pool, kind, used, admitted, xg, xj, lim, l.now())
	}
	m[field(fAdmitted, pool, user)]++
	return nil
}

// exceeded builds the refusal for an admission over a limit.
func exceeded(day, pool, kind string, used, admitted, xg, xj int64, lim Limits, now time.Time) *ExceededError {
	e := &ExceededError{Pool: pool, Kind: kind, Now: now}
	if d, err := time.Parse(DayLayout, day); err == nil {
		e.Resets = ResetTime(d)
	}
	if kind == KindJobs {
		e.Used, e.Limit = admitted, lim.Jobs+xj
	} else {
		e.Used, e.Limit = used, lim.GPU.Milliseconds()+xg
	}
	return e
}

// Unadmit implements Ledger.
func (l *MemoryLedger) Unadmit(_ context.Context, day, pool, user string) error {
	if err := checkArgs(day, pool, user); err != nil {
		return err
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	m := l.dayLocked(day)
	if f := field(fAdmitted, pool, user); m[f] > 0 {
		m[f]--
	}
	return nil
}

// Record implements Ledger.
func (l *MemoryLedger) Record(_ context.Context, e JobEnd) error {
	if err := checkArgs(e.Day, e.Pool, e.User); err != nil {
		return err
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	m := l.dayLocked(e.Day)
	done := l.done[e.Day]
	if done == nil {
		done = map[string]struct{}{}
		l.done[e.Day] = done
	}
	if _, dup := done[e.JobID]; dup && e.JobID != "" {
		return nil
	}
	done[e.JobID] = struct{}{}
	for _, fv := range endFields(e) {
		m[fv.f] += fv.v
	}
	return nil
}

// Usage implements Ledger.
func (l *MemoryLedger) Usage(_ context.Context, q Query) ([]Row, error) {
	set := newRowSet(q)
	l.mu.Lock()
	defer l.mu.Unlock()
	for _, day := range q.Days() {
		for f, v := range l.days[day] {
			if err := set.add(day, f, v); err != nil {
				return nil, err
			}
		}
	}
	return set.sorted(), nil
}

// Raise implements Ledger.
func (l *MemoryLedger) Raise(_ context.Context, day, pool, user string, gpu time.Duration, jobs int64) error {
	if err := checkArgs(day, pool, user); err != nil {
		return err
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	m := l.dayLocked(day)
	m[field(fExtraGPU, pool, user)] += gpu.Milliseconds()
	m[field(fExtraJobs, pool, user)] += jobs
	return nil
}

// Reset implements Ledger.
func (l *MemoryLedger) Reset(_ context.Context, day, pool, user string) error {
	if err := checkArgs(day, pool, user); err != nil {
		return err
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	m := l.dayLocked(day)
	m[field(fExtraGPU, pool, user)] = m[field(fGPU, pool, user)]
	m[field(fExtraJobs, pool, user)] = m[field(fAdmitted, pool, user)]
	return nil
}

var _ Ledger = (*MemoryLedger)(nil)
