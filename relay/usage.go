package relay

import (
	"errors"
	"io"
	"net/http"
	"strconv"
	"sync"
	"sync/atomic"

	"github.com/comfyume/comfyume/comfy"
	"github.com/comfyume/comfyume/dispatch"
	"github.com/comfyume/comfyume/usage"
)

// outputTally counts the bytes of outputs stored per job until the job
// ends (dispatch.OutputCounter). Jobs that end on another gateway leave
// their entry behind; maxTallied bounds how many are kept.
type outputTally struct {
	mu sync.Mutex
	m  map[string]int64
	// read counts the bytes of each job's outputs stored or being
	// stored (see take); max bounds it (0: DefaultMaxOutputSize).
	read map[string]int64
	max  atomic.Int64
	// files counts each job's stored outputs (see takeFile).
	files map[string]int64
}

// MaxOutputFiles is how many output files one job may store: each is a
// file (or object) of its own in the outputs store, whatever its size.
const MaxOutputFiles = 10000

// takeFile counts one more output file of the job; false (not counted)
// past MaxOutputFiles. A negative n gives files back.
func (t *outputTally) takeFile(jobID string, n int64) bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	return within(&t.files, jobID, n, MaxOutputFiles)
}

// take counts n more bytes read for one of the job's outputs; false (and
// not counted) when that takes the job's outputs past their bound. A
// negative n gives back what an output that was not stored took.
func (t *outputTally) take(jobID string, n int64) bool {
	limit := t.max.Load()
	if limit <= 0 {
		limit = DefaultMaxOutputSize
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	return within(&t.read, jobID, n, limit)
}

// within adds n to the job's count in *m unless that takes it past limit
// (t.mu held). Jobs that ended elsewhere leave counts behind: past
// maxTallied jobs, the counts start again.
func within(m *map[string]int64, jobID string, n, limit int64) bool {
	if *m == nil {
		*m = map[string]int64{}
	}
	if _, ok := (*m)[jobID]; !ok && len(*m) >= maxTallied {
		clear(*m)
	}
	if (*m)[jobID]+n > limit {
		return false
	}
	(*m)[jobID] += n
	return true
}

const maxTallied = 100000

func (t *outputTally) add(jobID string, n int64) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.m == nil {
		t.m = map[string]int64{}
	}
	if _, ok := t.m[jobID]; !ok && len(t.m) >= maxTallied {
		clear(t.m) // jobs long gone elsewhere: their byte counts go with them
	}
	t.m[jobID] += n
}

// TakeOutputBytes implements dispatch.OutputCounter.
func (g *Gateway) TakeOutputBytes(jobID string) int64 {
	t := &g.outBytes
	t.mu.Lock()
	defer t.mu.Unlock()
	n := t.m[jobID]
	delete(t.m, jobID)
	delete(t.read, jobID)
	delete(t.files, jobID)
	return n
}

// DefaultMaxOutputSize is the default bound of the bytes one job's
// outputs may take in the blob store (see Gateway.SetMaxOutputSize).
const DefaultMaxOutputSize = 4 << 30

// SetMaxOutputSize bounds the bytes of outputs one job may store (0:
// DefaultMaxOutputSize). A GPU server is semi-trusted: past the bound an
// output is not stored (a pinned job then fails saying why; a captured
// output keeps the server's ref) and its server is read no further.
func (g *Gateway) SetMaxOutputSize(n int64) { g.outBytes.max.Store(n) }

// errOutputsTooLarge is an output that would take its job's outputs past
// their bound.
type errOutputsTooLarge struct{ limit int64 }

func (e errOutputsTooLarge) Error() string {
	if e.limit == 0 {
		return "the job has more outputs than the gateway keeps (" + strconv.Itoa(MaxOutputFiles) + " files)"
	}
	return "the job's outputs are larger than the gateway keeps (" + formatBytes(e.limit) + ")"
}

// boundedOutput reads one of a job's outputs within the job's bound.
type boundedOutput struct {
	r     io.Reader
	t     *outputTally
	jobID string
}

func (b *boundedOutput) Read(p []byte) (int, error) {
	n, err := b.r.Read(p)
	if n > 0 && !b.t.take(b.jobID, int64(n)) {
		limit := b.t.max.Load()
		if limit <= 0 {
			limit = DefaultMaxOutputSize
		}
		return 0, errOutputsTooLarge{limit: limit}
	}
	return n, err
}

// countingReader counts what is read through it.
type countingReader struct {
	r io.Reader
	n int64
}

func (c *countingReader) Read(p []byte) (int, error) {
	n, err := c.r.Read(p)
	c.n += int64(n)
	return n, err
}

// writeQuotaExceeded answers a prompt over the user's quota: 403 in
// ComfyUI's error shape with empty node_errors, which the current
// frontend shows as a dialog with error.message and the legacy frontend
// as a dialog with "message: details". The message alone says what was
// used and when the quota starts again; extra_info has the numbers.
func writeQuotaExceeded(w http.ResponseWriter, ex *usage.ExceededError) {
	e := comfy.NewPromptError("quota_exceeded", ex.Error(), "")
	info := map[string]any{"pool": ex.Pool, "quota": ex.Kind, "resets_at": ex.Resets.UTC().Format("2006-01-02T15:04:05Z")}
	if ex.Kind == usage.KindJobs {
		info["used_prompts"], info["max_prompts"] = ex.Used, ex.Limit
	} else {
		info["used_gpu_seconds"], info["quota_gpu_seconds"] = float64(ex.Used)/1000, float64(ex.Limit)/1000
	}
	e.Error.ExtraInfo = info
	writeJSON(w, http.StatusForbidden, e)
}

// quotaExceeded reports whether err is a quota refusal.
func quotaExceeded(err error) (*usage.ExceededError, bool) {
	var ex *usage.ExceededError
	ok := errors.As(err, &ex)
	return ex, ok
}

var _ dispatch.OutputCounter = (*Gateway)(nil)
