package relay

import (
	"errors"
	"io"
	"net/http"
	"sync"

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
	return n
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
