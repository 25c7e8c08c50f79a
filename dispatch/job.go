package dispatch

import (
	"bytes"
	"encoding/json"
	"sort"
	"time"

	"github.com/comfyume/comfyume/comfy"
)

// TransportWorker marks jobs sent to a pinned (worker) upstream.
const TransportWorker = "worker"

// Job statuses, as /api/jobs names them.
const (
	StatusPending    = "pending"
	StatusInProgress = "in_progress"
	StatusCompleted  = "completed"
	StatusFailed     = "failed"
	StatusCancelled  = "cancelled"
)

// Job is the record of one prompt the gateway sent to an upstream. It is plain
// data (JSON-serialisable) so that any Store can keep it.
type Job struct {
	// ID is the prompt_id the user sees everywhere (made by the gateway).
	ID string `json:"id"`
	// UpstreamID is the prompt_id the upstream uses; equal to ID for servers
	// that accept a client-supplied prompt_id (ComfyUI 2025-07 and newer).
	UpstreamID string `json:"upstream_id,omitempty"`
	// User owns the job; ClientID is the browser session (sid) it belongs to.
	User     string `json:"user"`
	ClientID string `json:"client_id"`
	// Pool and Upstream name where the job runs ("" while it waits).
	Pool     string `json:"pool"`
	Upstream string `json:"upstream,omitempty"`
	// UpstreamClient is the sid the gateway's event stream used toward the
	// upstream; another gateway taking the job over listens as that sid.
	UpstreamClient string `json:"upstream_client,omitempty"`
	// Transport is how the job travels: "" (ComfyUI's own API) or
	// TransportWorker (one pinned stream per job).
	Transport string `json:"transport,omitempty"`
	// Home is the user's home URL, where the job's input files come from.
	Home string `json:"home,omitempty"`

	Number float64 `json:"number"`
	// Priority orders users in the pool's queue (higher first).
	Priority int `json:"priority_class,omitempty"`
	// Prompt and ExtraData never change once the job is made (a record
	// may replace them whole, never edit them): copies of the record
	// share them.
	Prompt           json.RawMessage            `json:"prompt"`
	ExtraData        map[string]json.RawMessage `json:"extra_data,omitempty"`
	OutputsToExecute []string                   `json:"outputs_to_execute"`
	WorkflowID       string                     `json:"workflow_id,omitempty"`

	Status     string `json:"status"`
	CreateTime int64  `json:"create_time"`
	StartTime  int64  `json:"execution_start_time,omitempty"`
	EndTime    int64  `json:"execution_end_time,omitempty"`

	// Outputs maps node id → UI output with refs already rewritten to the
	// gateway's captured copies.
	Outputs map[string]json.RawMessage `json:"outputs,omitempty"`
	// Messages are the execution_* events, as history status.messages.
	Messages []HistoryMessage `json:"messages,omitempty"`
	// StoredBytes is what the job's captured outputs take in the outputs
	// store, counted when the job ends (history_outputs bounds the sum of
	// each user's ended jobs).
	StoredBytes int64 `json:"stored_bytes,omitempty"`
	// outputBytes is what Outputs weigh (see outputsSize; 0: not counted
	// yet, as in a record read back from the store).
	outputBytes int
	// Error is the execution_error (or interrupted) payload, if any.
	Error json.RawMessage `json:"error,omitempty"`
	// Hidden jobs were deleted from the user's history view.
	Hidden bool `json:"hidden,omitempty"`
}

// HistoryMessage is one [event_name, data] pair of a history entry.
type HistoryMessage struct {
	Type string
	Data json.RawMessage
}

// MarshalJSON writes the pair as a two-element array, like ComfyUI.
func (h HistoryMessage) MarshalJSON() ([]byte, error) {
	return json.Marshal([]any{h.Type, h.Data})
}

// UnmarshalJSON reads a two-element array.
func (h *HistoryMessage) UnmarshalJSON(b []byte) error {
	var pair []json.RawMessage
	if err := json.Unmarshal(b, &pair); err != nil {
		return err
	}
	if len(pair) != 2 {
		return errBadMessage
	}
	if err := json.Unmarshal(pair[0], &h.Type); err != nil {
		return err
	}
	h.Data = pair[1]
	return nil
}

// Active reports whether the job still waits or runs.
func (j *Job) Active() bool {
	return j.Status == StatusPending || j.Status == StatusInProgress
}

// Clone returns a deep-enough copy for handing records across goroutines:
// what changes as the job runs is copied; Prompt and ExtraData, which do
// not, are shared.
func (j *Job) Clone() *Job {
	c := *j
	if j.Outputs != nil {
		c.Outputs = make(map[string]json.RawMessage, len(j.Outputs))
		for k, v := range j.Outputs {
			c.Outputs[k] = v
		}
	}
	c.Messages = append([]HistoryMessage(nil), j.Messages...)
	c.OutputsToExecute = append([]string(nil), j.OutputsToExecute...)
	return &c
}

// Summary returns a copy without Prompt and ExtraData.
func (j *Job) Summary() *Job {
	c := *j
	c.Prompt, c.ExtraData = nil, nil
	return c.Clone()
}

// Apply records the effect of one upstream event on the job. The message's
// prompt_id must already be the job's ID.
func (j *Job) Apply(m comfy.Message) {
	now := time.Now().UnixMilli()
	switch m.Type {
	case comfy.MsgExecutionStart:
		j.Status = StatusInProgress
		j.StartTime = timestampOf(m, now)
	case comfy.MsgExecuted:
		var d struct {
			Node        string          `json:"node"`
			DisplayNode string          `json:"display_node"`
			Output      json.RawMessage `json:"output"`
		}
		if json.Unmarshal(m.Data, &d) == nil && d.Node != "" && len(d.Output) > 0 && string(d.Output) != "null" {
			if j.Outputs == nil {
				j.Outputs = map[string]json.RawMessage{}
			}
			key := d.Node
			if d.DisplayNode != "" {
				key = d.DisplayNode
			}
			if j.outputsSize()+len(key)+len(d.Output) <= MaxRecordedOutputs {
				old := j.Outputs[key]
				merged := mergeOutput(old, d.Output)
				if len(old) == 0 {
					j.outputBytes += len(key)
				}
				j.Outputs[key] = merged
				j.outputBytes += len(merged) - len(old)
			}
		}
	case comfy.MsgExecutionSuccess:
		j.Status = StatusCompleted
		j.EndTime = timestampOf(m, now)
	case comfy.MsgExecutionError:
		j.Status = StatusFailed
		j.EndTime = timestampOf(m, now)
		j.Error = m.Data
	case comfy.MsgExecutionInterrupted:
		j.Status = StatusCancelled
		j.EndTime = timestampOf(m, now)
		j.Error = m.Data
	}
	switch m.Type {
	case comfy.MsgExecutionStart, comfy.MsgExecutionCached:
		if len(j.Messages) >= MaxRecordedMessages || messagesSize(j.Messages)+len(m.Data) > MaxRecordedOutputs {
			break
		}
		fallthrough
	case comfy.MsgExecutionSuccess, comfy.MsgExecutionError, comfy.MsgExecutionInterrupted:
		j.Messages = append(j.Messages, HistoryMessage{Type: m.Type, Data: m.Data})
	}
}

// What a job's record keeps of its GPU server's events is bounded (the
// server is semi-trusted; a real job has a few outputs per node and a few
// messages): outputs past MaxRecordedOutputs bytes are shown live but not
// kept for its history, and only the first MaxRecordedMessages start and
// cached messages are kept, MaxRecordedOutputs bytes of them at most (the
// end's always is).
const (
	MaxRecordedOutputs  = 1 << 20
	MaxRecordedMessages = 64
)

// messagesSize is the bytes of recorded messages' data (at most
// MaxRecordedMessages of them are added up).
func messagesSize(ms []HistoryMessage) int {
	n := 0
	for _, m := range ms {
		n += len(m.Data)
	}
	return n
}

// outputsSize is the bytes of the job's recorded outputs (their keys and
// values), counted once and then kept up to date.
func (j *Job) outputsSize() int {
	if j.outputBytes == 0 {
		for k, v := range j.Outputs {
			j.outputBytes += len(k) + len(v)
		}
	}
	return j.outputBytes
}

// mergeOutput concatenates the lists of two UI outputs of the same node
// (ComfyUI does this for batch calls); the newer value wins for non-lists.
// Values are spliced as bytes, never decoded: a server that sends a node's
// output thousands of times costs a copy per event, not a decoding and
// encoding of everything merged so far (5000 events: 35 s of CPU).
func mergeOutput(old, add json.RawMessage) json.RawMessage {
	if len(old) == 0 {
		return add
	}
	a, okA := comfy.ObjectMembers(old)
	b, okB := comfy.ObjectMembers(add)
	if !okA || !okB {
		return add
	}
	vals := make(map[string]json.RawMessage, len(a)+len(b))
	for _, m := range a {
		vals[m.Key] = m.Value // the last of a repeated key, like json.Unmarshal
	}
	newer := make(map[string]json.RawMessage, len(b))
	for _, m := range b {
		newer[m.Key] = m.Value
	}
	for k, v := range newer {
		if la := vals[k]; isList(la) && (isList(v) || string(v) == "null") {
			vals[k] = joinLists(la, v)
			continue
		}
		vals[k] = v
	}
	keys := make([]string, 0, len(vals))
	n := 2
	for k, v := range vals {
		keys = append(keys, k)
		n += len(k) + len(v) + 8
	}
	sort.Strings(keys)
	out := make([]byte, 0, n)
	out = append(out, '{')
	for i, k := range keys {
		if i > 0 {
			out = append(out, ',')
		}
		kb, _ := json.Marshal(k)
		out = append(append(append(out, kb...), ':'), vals[k]...)
	}
	return append(out, '}')
}

// isList reports whether a JSON value (as ObjectMembers gives it, without
// surrounding space) is an array.
func isList(v json.RawMessage) bool { return len(v) > 0 && v[0] == '[' }

// joinLists concatenates two JSON arrays (b may be null: a is kept).
func joinLists(a, b json.RawMessage) json.RawMessage {
	empty := func(l json.RawMessage) bool { return len(bytes.TrimSpace(l[1:len(l)-1])) == 0 }
	switch {
	case !isList(b) || empty(b):
		return a
	case empty(a):
		return b
	}
	out := make([]byte, 0, len(a)+len(b))
	out = append(out, a[:len(a)-1]...)
	out = append(out, ',')
	return append(out, b[1:]...)
}

func timestampOf(m comfy.Message, def int64) int64 {
	c, err := m.Common()
	if err != nil || c.Timestamp == 0 {
		return def
	}
	return c.Timestamp
}

// SortJobs orders jobs the way ComfyUI's queue does: by number, then id.
func SortJobs(jobs []*Job) {
	sort.Slice(jobs, func(a, b int) bool { return jobBefore(jobs[a], jobs[b]) })
}

// jobBefore is SortJobs's order: a comes before b.
func jobBefore(a, b *Job) bool {
	if a.Number != b.Number {
		return a.Number < b.Number
	}
	return a.ID < b.ID
}

type dispatchError string

func (e dispatchError) Error() string { return string(e) }

const (
	errBadMessage = dispatchError("dispatch: bad history message")
	// ErrNotFound is returned by a Store for an unknown job.
	ErrNotFound = dispatchError("dispatch: job not found")
)
