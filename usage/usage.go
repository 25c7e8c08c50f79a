package usage

import (
	"context"
	"errors"
	"fmt"
	"sort"
	"strconv"
	"strings"
	"time"
)

// DayLayout is how days are written: a UTC calendar day.
const DayLayout = "2006-01-02"

// Retention is how long a day's usage is kept after its last change
// (about 13 months, so that a year ago can still be compared).
const Retention = 400 * 24 * time.Hour

// MaxQueryDays bounds the days one query covers (Retention's days).
const MaxQueryDays = 400

// MaxRows bounds the rows one query returns; a query that would return
// more fails with ErrTooManyRows (narrow it by user, pool or days).
const MaxRows = 50000

// ErrTooManyRows refuses a query whose answer would exceed MaxRows.
var ErrTooManyRows = fmt.Errorf("the query matches more than %d rows: narrow it by user, pool or days", MaxRows)

// DayOf returns the UTC day of t.
func DayOf(t time.Time) string { return t.UTC().Format(DayLayout) }

// ResetTime returns when the quota of the day that holds t starts again:
// the next midnight UTC.
func ResetTime(t time.Time) time.Time {
	d := t.UTC().Truncate(24 * time.Hour)
	return d.Add(24 * time.Hour)
}

// Outcome is how a job that ran ended.
type Outcome string

// Outcomes of jobs that ran.
const (
	Success     Outcome = "success"     // execution_success
	Error       Outcome = "error"       // the job's own execution_error
	Interrupted Outcome = "interrupted" // cancelled by its user while it ran
	Lost        Outcome = "lost"        // the gateway lost it: GPU server gone, silent or unreadable
)

// Outcomes lists every outcome, in the order metrics and CSV use.
var Outcomes = []Outcome{Success, Error, Interrupted, Lost}

// JobEnd is what one job that ran on a pool used, accounted when it ended.
type JobEnd struct {
	// JobID makes recording idempotent: a job is counted once. It names
	// one run of a job (the dispatcher adds when the job was made), so
	// that a prompt id reused after its job was forgotten counts again.
	JobID string
	// Day is the UTC day the job ended.
	Day        string
	Pool, User string
	Outcome    Outcome
	// GPU is how long the job ran on its GPU server (execution_start to
	// its end); Wait how long it waited before (queue, cold start,
	// sending its inputs).
	GPU, Wait   time.Duration
	OutputBytes int64
}

// Limits are a user's daily quota on one pool. Zero means no limit.
type Limits struct {
	// GPU is the GPU time a user may use per day. It is checked when a
	// prompt is admitted against the time of the jobs that ended: a job
	// admitted under the quota runs to its end and may finish over it.
	GPU time.Duration
	// Jobs is how many prompts a user may have admitted per day (queued,
	// running or ended; a prompt that never ran is given back).
	Jobs int64
}

// None reports whether no limit is set.
func (l Limits) None() bool { return l.GPU <= 0 && l.Jobs <= 0 }

// Override changes a pool's Limits for one user; a nil field keeps the
// pool's value, a pointer to zero lifts that limit.
type Override struct {
	GPU  *time.Duration
	Jobs *int64
}

// Apply returns l changed by o.
func (l Limits) Apply(o Override) Limits {
	if o.GPU != nil {
		l.GPU = *o.GPU
	}
	if o.Jobs != nil {
		l.Jobs = *o.Jobs
	}
	return l
}

// Row is one user's use of one pool on one day.
type Row struct {
	Day  string `json:"day"`
	Pool string `json:"pool"`
	User string `json:"user"`
	// Jobs that ran and ended this day, and how they ended.
	Jobs        int64 `json:"jobs"`
	Success     int64 `json:"success"`
	Error       int64 `json:"error"`
	Interrupted int64 `json:"interrupted"`
	Lost        int64 `json:"lost"`
	// GPUSeconds and WaitSeconds of those jobs, OutputBytes their outputs.
	GPUSeconds  float64 `json:"gpu_seconds"`
	WaitSeconds float64 `json:"wait_seconds"`
	OutputBytes int64   `json:"output_bytes"`
	// Admitted counts prompts admitted this day (waiting, running or
	// ended; those that never ran are taken off again).
	Admitted int64 `json:"admitted"`
	// QuotaGPUSeconds and QuotaJobs are the limits that held at the user's
	// last admission this day (0: none); ExtraGPUSeconds and ExtraJobs
	// what an operator added for the day (raise, reset).
	QuotaGPUSeconds float64 `json:"quota_gpu_seconds"`
	QuotaJobs       int64   `json:"quota_jobs"`
	ExtraGPUSeconds float64 `json:"extra_gpu_seconds"`
	ExtraJobs       int64   `json:"extra_jobs"`
}

// Columns are the CSV header, in Row's field order.
var Columns = []string{"day", "pool", "user", "jobs", "success", "error", "interrupted", "lost",
	"gpu_seconds", "wait_seconds", "output_bytes", "admitted",
	"quota_gpu_seconds", "quota_jobs", "extra_gpu_seconds", "extra_jobs"}

// Record returns the row as CSV fields, in Columns order.
func (r Row) Record() []string {
	f := func(v float64) string { return strconv.FormatFloat(v, 'f', 3, 64) }
	i := func(v int64) string { return strconv.FormatInt(v, 10) }
	return []string{r.Day, r.Pool, r.User, i(r.Jobs), i(r.Success), i(r.Error), i(r.Interrupted), i(r.Lost),
		f(r.GPUSeconds), f(r.WaitSeconds), i(r.OutputBytes), i(r.Admitted),
		f(r.QuotaGPUSeconds), i(r.QuotaJobs), f(r.ExtraGPUSeconds), i(r.ExtraJobs)}
}

// Query selects rows: days Since..Until (inclusive, "2006-01-02"), and
// optionally one user and one pool.
type Query struct {
	Since, Until string
	User, Pool   string
}

// Ledger keeps usage per user, pool and day. Implementations are safe for
// concurrent use; ValkeyLedger is shared by gateway replicas.
type Ledger interface {
	// Admit checks the user's limits on pool for day and, when the user
	// is under them, counts one more admitted prompt — in one atomic step.
	// Over a limit it returns an *ExceededError and counts nothing. It
	// also remembers the limits for the day's row.
	Admit(ctx context.Context, day, pool, user string, lim Limits) error
	// Unadmit takes back an admission of day (a prompt that never ran).
	Unadmit(ctx context.Context, day, pool, user string) error
	// Record adds what a job used; a job already recorded is not counted
	// again.
	Record(ctx context.Context, e JobEnd) error
	// Usage returns the rows the query selects, sorted by day, pool,
	// user; ErrTooManyRows past MaxRows.
	Usage(ctx context.Context, q Query) ([]Row, error)
	// Raise adds GPU time and prompts to a user's quota on pool for day.
	Raise(ctx context.Context, day, pool, user string, gpu time.Duration, jobs int64) error
	// Reset gives a user their whole quota on pool for day again (what
	// they used stays in the record).
	Reset(ctx context.Context, day, pool, user string) error
}

// ExceededError refuses a prompt over the user's quota. Its message says
// what was used and when the quota starts again, for the UI's dialog.
type ExceededError struct {
	Pool string
	// Kind is "gpu_time" or "jobs".
	Kind string
	// Used and Limit are milliseconds of GPU time, or prompts.
	Used, Limit int64
	// Resets is when the day's quota starts again (midnight UTC).
	Resets time.Time
	// Now is when the prompt was refused.
	Now time.Time
}

// Error is the message the UI shows.
func (e *ExceededError) Error() string {
	var used string
	if e.Kind == KindJobs {
		used = fmt.Sprintf("You have used your %d prompts for today on the GPU pool %q.", e.Limit, e.Pool)
		if e.Used > e.Limit {
			used = fmt.Sprintf("You have used %d prompts today on the GPU pool %q, over your %d.", e.Used, e.Pool, e.Limit)
		}
	} else {
		used = fmt.Sprintf("You have used your GPU time for today on the GPU pool %q: %s of %s.", e.Pool,
			FormatDuration(time.Duration(e.Used)*time.Millisecond), FormatDuration(time.Duration(e.Limit)*time.Millisecond))
	}
	return fmt.Sprintf("%s Your quota starts again at midnight UTC (%s), in %s.", used,
		e.Resets.UTC().Format(time.RFC3339), FormatDuration(e.Resets.Sub(e.Now).Round(time.Minute)))
}

// Kinds of quota.
const (
	KindGPU  = "gpu_time"
	KindJobs = "jobs"
)

// FormatDuration writes d in words a person reads at a glance: "1h 5m",
// "30m 12s", "45s" (whole seconds).
func FormatDuration(d time.Duration) string {
	d = d.Round(time.Second)
	if d <= 0 {
		return "0s"
	}
	h, m, s := int64(d/time.Hour), int64(d%time.Hour/time.Minute), int64(d%time.Minute/time.Second)
	var parts []string
	if h > 0 {
		parts = append(parts, fmt.Sprintf("%dh", h))
	}
	if m > 0 {
		parts = append(parts, fmt.Sprintf("%dm", m))
	}
	if s > 0 && h == 0 {
		parts = append(parts, fmt.Sprintf("%ds", s))
	}
	if len(parts) == 0 {
		return "0s"
	}
	return strings.Join(parts, " ")
}

// verdict decides an admission from the day's numbers; it is the rule
// both ledgers apply (ValkeyLedger in its script, with the same order).
func verdict(usedMS, admitted, extraMS, extraJobs int64, lim Limits) string {
	if lim.Jobs > 0 && admitted >= lim.Jobs+extraJobs {
		return KindJobs
	}
	if lim.GPU > 0 && usedMS >= lim.GPU.Milliseconds()+extraMS {
		return KindGPU
	}
	return ""
}

// Field names inside a day: "<metric>|<pool>|<user>". Pool names cannot
// hold "|" (see ValidPool); users can, they come last.
const (
	fAdmitted   = "admitted"
	fJobs       = "jobs"
	fGPU        = "gpu_ms"
	fWait       = "wait_ms"
	fBytes      = "bytes"
	fLimGPU     = "lim_gpu_ms"
	fLimJobs    = "lim_jobs"
	fExtraGPU   = "extra_gpu_ms"
	fExtraJobs  = "extra_jobs"
	outcomePfx  = "o_"
	fieldSep    = "|"
	maxUserName = 1024
)

// rowMetrics are the metrics a Row is made of (see rowSet.add).
var rowMetrics = []string{fAdmitted, fJobs, fGPU, fWait, fBytes, fLimGPU, fLimJobs, fExtraGPU, fExtraJobs,
	outcomePfx + string(Success), outcomePfx + string(Error), outcomePfx + string(Interrupted), outcomePfx + string(Lost)}

// ValidPool reports whether a pool name can be a key of the ledger.
func ValidPool(name string) bool { return name != "" && !strings.ContainsAny(name, fieldSep+"\x00") }

func field(metric, pool, user string) string { return metric + fieldSep + pool + fieldSep + user }

// splitField reads a field name back; ok is false for names it did not
// write.
func splitField(f string) (metric, pool, user string, ok bool) {
	metric, rest, ok1 := strings.Cut(f, fieldSep)
	pool, user, ok2 := strings.Cut(rest, fieldSep)
	return metric, pool, user, ok1 && ok2 && pool != ""
}

type rowKey struct{ day, pool, user string }

// rows folds a day's fields into rows, keeping those q selects; add is
// called per selected row made, and fails past MaxRows.
type rowSet struct {
	q    Query
	rows map[rowKey]*Row
}

func newRowSet(q Query) *rowSet { return &rowSet{q: q, rows: map[rowKey]*Row{}} }

func (s *rowSet) add(day, f string, v int64) error {
	metric, pool, user, ok := splitField(f)
	if !ok || (s.q.User != "" && user != s.q.User) || (s.q.Pool != "" && pool != s.q.Pool) {
		return nil
	}
	k := rowKey{day, pool, user}
	r := s.rows[k]
	if r == nil {
		if len(s.rows) >= MaxRows {
			return ErrTooManyRows
		}
		r = &Row{Day: day, Pool: pool, User: user}
		s.rows[k] = r
	}
	sec := float64(v) / 1000
	switch metric {
	case fAdmitted:
		r.Admitted = v
	case fJobs:
		r.Jobs = v
	case fGPU:
		r.GPUSeconds = sec
	case fWait:
		r.WaitSeconds = sec
	case fBytes:
		r.OutputBytes = v
	case fLimGPU:
		r.QuotaGPUSeconds = sec
	case fLimJobs:
		r.QuotaJobs = v
	case fExtraGPU:
		r.ExtraGPUSeconds = sec
	case fExtraJobs:
		r.ExtraJobs = v
	case outcomePfx + string(Success):
		r.Success = v
	case outcomePfx + string(Error):
		r.Error = v
	case outcomePfx + string(Interrupted):
		r.Interrupted = v
	case outcomePfx + string(Lost):
		r.Lost = v
	}
	return nil
}

func (s *rowSet) sorted() []Row {
	out := make([]Row, 0, len(s.rows))
	for _, r := range s.rows {
		out = append(out, *r)
	}
	sort.Slice(out, func(a, b int) bool {
		x, y := out[a], out[b]
		if x.Day != y.Day {
			return x.Day < y.Day
		}
		if x.Pool != y.Pool {
			return x.Pool < y.Pool
		}
		return x.User < y.User
	})
	return out
}

// Days lists the days of a valid query, oldest first.
func (q Query) Days() []string {
	since, err1 := time.Parse(DayLayout, q.Since)
	until, err2 := time.Parse(DayLayout, q.Until)
	if err1 != nil || err2 != nil {
		return nil
	}
	var out []string
	for d := since; !d.After(until) && len(out) < MaxQueryDays; d = d.Add(24 * time.Hour) {
		out = append(out, d.Format(DayLayout))
	}
	return out
}

// endFields are the increments one job's end makes.
func endFields(e JobEnd) []struct {
	f string
	v int64
} {
	return []struct {
		f string
		v int64
	}{
		{field(fJobs, e.Pool, e.User), 1},
		{field(outcomePfx+string(e.Outcome), e.Pool, e.User), 1},
		{field(fGPU, e.Pool, e.User), e.GPU.Milliseconds()},
		{field(fWait, e.Pool, e.User), e.Wait.Milliseconds()},
		{field(fBytes, e.Pool, e.User), e.OutputBytes},
	}
}

// errBadArg refuses an argument a caller should have checked.
var errBadArg = errors.New("usage: empty day, pool or user, or a pool name with '|'")

func checkArgs(day, pool, user string) error {
	if _, err := time.Parse(DayLayout, day); err != nil || !ValidPool(pool) || user == "" || len(user) > maxUserName {
		return errBadArg
	}
	return nil
}

// Today returns today's rows (UTC) of one user, or of everyone when user
// is "": what each person used so far today, with the quota that held at
// their last admission (the operator page's "usage against quota").
func Today(ctx context.Context, l Ledger, user string) ([]Row, error) {
	day := DayOf(time.Now())
	return l.Usage(ctx, Query{Since: day, Until: day, User: user})
}

// GPULimit is the GPU time the row's user may use that day (the quota
// plus what an operator added), and false when no GPU quota held.
func (r Row) GPULimit() (time.Duration, bool) {
	if r.QuotaGPUSeconds <= 0 {
		return 0, false
	}
	return time.Duration((r.QuotaGPUSeconds + r.ExtraGPUSeconds) * float64(time.Second)), true
}

// JobsLimit is the prompts the row's user may have admitted that day, and
// false when no limit held.
func (r Row) JobsLimit() (int64, bool) {
	if r.QuotaJobs <= 0 {
		return 0, false
	}
	return r.QuotaJobs + r.ExtraJobs, true
}

// OverQuota reports whether the row's user gets no more prompts admitted
// that day (under the quota that held at their last admission).
func (r Row) OverQuota() bool {
	if n, ok := r.JobsLimit(); ok && r.Admitted >= n {
		return true
	}
	if d, ok := r.GPULimit(); ok && time.Duration(r.GPUSeconds*float64(time.Second)) >= d {
		return true
	}
	return false
}
