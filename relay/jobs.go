package relay

import (
	"context"
	"encoding/json"
	"errors"
	"net/http"
	"net/url"
	"sort"
	"strconv"
	"strings"
	"time"

	"go.uber.org/zap"

	"github.com/comfyume/comfyume/comfy"
	"github.com/comfyume/comfyume/dispatch"
)

// jobView is one job as /api/jobs lists it. Fields are kept as a map so a
// home server's jobs pass through with whatever fields it adds.
type jobView map[string]any

func (j jobView) str(k string) string { s, _ := j[k].(string); return s }

func (j jobView) num(k string) float64 {
	switch v := j[k].(type) {
	case float64:
		return v
	case json.Number:
		f, _ := v.Float64()
		return f
	case int64:
		return float64(v)
	case int:
		return float64(v)
	}
	return 0
}

var jobStatuses = map[string]bool{
	dispatch.StatusPending: true, dispatch.StatusInProgress: true, dispatch.StatusCompleted: true,
	dispatch.StatusFailed: true, dispatch.StatusCancelled: true,
}

// jobsQuery is a checked /api/jobs query.
type jobsQuery struct {
	statuses   map[string]bool
	workflowID string
	sortBy     string
	desc       bool
	limit      int // -1: all
	offset     int
}

func parseJobsQuery(q url.Values) (jobsQuery, string) {
	jq := jobsQuery{sortBy: "created_at", desc: true, limit: -1}
	if s := q.Get("status"); s != "" {
		jq.statuses = map[string]bool{}
		for _, v := range strings.Split(s, ",") {
			v = strings.TrimSpace(v)
			if !jobStatuses[v] {
				return jq, "Invalid status: " + v
			}
			jq.statuses[v] = true
		}
	}
	jq.workflowID = q.Get("workflow_id")
	if s := q.Get("sort_by"); s != "" {
		if s != "created_at" && s != "execution_duration" {
			return jq, "sort_by must be created_at or execution_duration"
		}
		jq.sortBy = s
	}
	if s := q.Get("sort_order"); s != "" {
		if s != "asc" && s != "desc" {
			return jq, "sort_order must be asc or desc"
		}
		jq.desc = s == "desc"
	}
	if s := q.Get("limit"); s != "" {
		n, ok := queryInt(s)
		if !ok || n < 1 {
			return jq, "limit must be a positive integer"
		}
		jq.limit = n
	}
	if s := q.Get("offset"); s != "" {
		n, ok := queryInt(s)
		if !ok || n < 0 {
			return jq, "offset must be a non-negative integer"
		}
		jq.offset = n
	}
	return jq, ""
}

// maxQueryInt bounds every integer read from a query (a count or an
// offset): larger values mean "all" and are clamped to it, so that no sum
// of two of them overflows.
const maxQueryInt = 1<<31 - 1

// queryInt reads a query integer clamped to ±maxQueryInt; ok is false for
// anything but an optionally signed run of decimal digits.
func queryInt(s string) (int, bool) {
	n, err := strconv.ParseInt(s, 10, 64)
	if err != nil {
		var ne *strconv.NumError
		if !errors.As(err, &ne) || ne.Err != strconv.ErrRange {
			return 0, false
		}
		// Out of int64's range: clamped below, by its sign.
		if strings.HasPrefix(s, "-") {
			n = -maxQueryInt
		} else {
			n = maxQueryInt
		}
	}
	return int(max(-maxQueryInt, min(n, maxQueryInt))), true
}

// page returns the bounds of the items [start, end) that a page of limit
// items (<= 0: all) from offset selects out of total: never out of range,
// whatever the numbers.
func page(total, offset, limit int) (start, end int) {
	start = min(max(offset, 0), total)
	end = total
	if limit > 0 && limit < end-start {
		end = start + limit
	}
	return start, end
}

func (jq jobsQuery) keep(j jobView) bool {
	if jq.statuses != nil && !jq.statuses[j.str("status")] {
		return false
	}
	if jq.workflowID != "" && j.str("workflow_id") != jq.workflowID {
		return false
	}
	return true
}

// remoteJobView renders a gateway job the way ComfyUI's jobs API does.
func remoteJobView(j *dispatch.Job, detail bool) jobView {
	v := jobView{
		"id":          j.ID,
		"status":      j.Status,
		"priority":    j.Number,
		"create_time": j.CreateTime,
	}
	if j.StartTime != 0 {
		v["execution_start_time"] = j.StartTime
	}
	if j.EndTime != 0 {
		v["execution_end_time"] = j.EndTime
	}
	if j.Status == dispatch.StatusFailed && len(j.Error) > 0 {
		v["execution_error"] = j.Error
	}
	if j.WorkflowID != "" {
		v["workflow_id"] = j.WorkflowID
	}
	outputs := map[string]any{}
	for node, raw := range j.Outputs {
		var o map[string]any
		if json.Unmarshal(raw, &o) == nil {
			outputs[node] = o
		}
	}
	count, preview := summarizeOutputs(outputs)
	if !j.Active() || count > 0 {
		v["outputs_count"] = count
	}
	if preview != nil {
		v["preview_output"] = preview
	}
	if detail {
		v["outputs"] = outputs
		e := historyEntry(j)
		v["execution_status"] = e["status"]
		prompt := j.Prompt
		if len(prompt) == 0 {
			prompt = json.RawMessage("{}")
		}
		v["workflow"] = map[string]any{"prompt": prompt, "extra_data": queueItem(j)[3]}
	}
	return v
}

// summarizeOutputs counts output files and picks the preview item: the first
// previewable item, preferring saved outputs over temp previews.
func summarizeOutputs(outputs map[string]any) (int, map[string]any) {
	nodes := make([]string, 0, len(outputs))
	for n := range outputs {
		nodes = append(nodes, n)
	}
	sort.Strings(nodes)
	count := 0
	var preview, fallback map[string]any
	for _, node := range nodes {
		o, _ := outputs[node].(map[string]any)
		keys := make([]string, 0, len(o))
		for k := range o {
			keys = append(keys, k)
		}
		sort.Strings(keys)
		for _, key := range keys {
			comfy.RefsIn(map[string]any{key: o[key]}, func(k string, item map[string]any) {
				count++
				p := map[string]any{}
				for ik, iv := range item {
					p[ik] = iv
				}
				p["nodeId"] = node
				p["mediaType"] = k
				if preview == nil && item["type"] == comfy.TypeOutput {
					preview = p
				}
				if fallback == nil {
					fallback = p
				}
			})
		}
	}
	if preview == nil {
		preview = fallback
	}
	return count, preview
}

// homeJobs lists the home server's jobs. Servers older than the jobs API
// get theirs built from /queue and /history.
func (g *Gateway) homeJobs(ctx context.Context, site Site, jq jobsQuery, q url.Values) []jobView {
	if site.Home == nil {
		return nil
	}
	if site.SharedHome { // home's jobs list names no client: its queue and history do
		return g.homeJobsFromQueue(ctx, site)
	}
	hq := url.Values{}
	for _, k := range []string{"status", "workflow_id", "sort_by", "sort_order"} {
		if v := q.Get(k); v != "" {
			hq.Set(k, v)
		}
	}
	if jq.limit > 0 {
		hq.Set("limit", strconv.Itoa(min(jq.limit+jq.offset, maxQueryInt)))
	}
	hq.Set("offset", "0")
	var resp struct {
		Jobs []jobView `json:"jobs"`
	}
	err := g.homeGet(ctx, site, "/api/jobs?"+hq.Encode(), &resp)
	if err == nil {
		return resp.Jobs
	}
	if he, ok := err.(*dispatch.HTTPError); !ok || he.Status != http.StatusNotFound {
		g.logger.Debug("home jobs unavailable", zap.Error(err))
		return nil
	}
	return g.homeJobsFromQueue(ctx, site)
}

// homeJobsFromQueue builds jobs from an older server's /queue and /history.
func (g *Gateway) homeJobsFromQueue(ctx context.Context, site Site) []jobView {
	var out []jobView
	var q queueBody
	if err := g.homeGet(ctx, site, "/queue", &q); err == nil {
		for status, items := range map[string][]json.RawMessage{dispatch.StatusInProgress: q.Running, dispatch.StatusPending: q.Pending} {
			for _, raw := range items {
				if v := jobFromQueueItem(raw, status); v != nil {
					out = append(out, v)
				}
			}
		}
	}
	var raw json.RawMessage
	if err := g.homeGet(ctx, site, "/history", &raw); err == nil {
		entries, _ := decodeOrdered(raw)
		for _, e := range entries {
			if v := jobFromHistory(e.key, e.val); v != nil {
				out = append(out, v)
			}
		}
	}
	return out
}

type queueTuple struct {
	number    float64
	id        string
	extraData map[string]any
}

func parseQueueTuple(raw json.RawMessage) (queueTuple, bool) {
	var item []json.RawMessage
	if json.Unmarshal(raw, &item) != nil || len(item) < 4 {
		return queueTuple{}, false
	}
	var t queueTuple
	_ = json.Unmarshal(item[0], &t.number)
	if json.Unmarshal(item[1], &t.id) != nil || t.id == "" {
		return queueTuple{}, false
	}
	_ = json.Unmarshal(item[3], &t.extraData)
	return t, true
}

func createTimeOf(extra map[string]any, def int64) int64 {
	if v, ok := extra["create_time"].(float64); ok && v > 0 {
		return int64(v)
	}
	return def
}

func workflowIDOf(extra map[string]any) string {
	pi, _ := extra["extra_pnginfo"].(map[string]any)
	wf, _ := pi["workflow"].(map[string]any)
	id, _ := wf["id"].(string)
	return id
}

func jobFromQueueItem(raw json.RawMessage, status string) jobView {
	t, ok := parseQueueTuple(raw)
	if !ok {
		return nil
	}
	v := jobView{"id": t.id, "status": status, "priority": t.number, "create_time": createTimeOf(t.extraData, time.Now().UnixMilli())}
	if wf := workflowIDOf(t.extraData); wf != "" {
		v["workflow_id"] = wf
	}
	return v
}

func jobFromHistory(id string, raw json.RawMessage) jobView {
	var e struct {
		Prompt  json.RawMessage `json:"prompt"`
		Outputs map[string]any  `json:"outputs"`
		Status  struct {
			StatusStr string              `json:"status_str"`
			Messages  [][]json.RawMessage `json:"messages"`
		} `json:"status"`
	}
	if json.Unmarshal(raw, &e) != nil {
		return nil
	}
	t, _ := parseQueueTuple(e.Prompt)
	v := jobView{"id": id, "priority": t.number}
	status := dispatch.StatusCompleted
	var start, end int64
	for _, m := range e.Status.Messages {
		if len(m) != 2 {
			continue
		}
		var typ string
		_ = json.Unmarshal(m[0], &typ)
		var d struct {
			Timestamp int64 `json:"timestamp"`
		}
		_ = json.Unmarshal(m[1], &d)
		switch typ {
		case comfy.MsgExecutionStart:
			start = d.Timestamp
		case comfy.MsgExecutionSuccess:
			end = d.Timestamp
		case comfy.MsgExecutionError:
			end, status = d.Timestamp, dispatch.StatusFailed
			v["execution_error"] = m[1]
		case comfy.MsgExecutionInterrupted:
			end, status = d.Timestamp, dispatch.StatusCancelled
		}
	}
	if e.Status.StatusStr == "error" && status == dispatch.StatusCompleted {
		status = dispatch.StatusFailed
	}
	v["status"] = status
	v["create_time"] = createTimeOf(t.extraData, start)
	if start != 0 {
		v["execution_start_time"] = start
	}
	if end != 0 {
		v["execution_end_time"] = end
	}
	if wf := workflowIDOf(t.extraData); wf != "" {
		v["workflow_id"] = wf
	}
	count, preview := summarizeOutputs(e.Outputs)
	v["outputs_count"] = count
	if preview != nil {
		v["preview_output"] = preview
	}
	return v
}

// serveJobs answers the jobs API: GET /api/jobs, GET /api/jobs/{id},
// POST /api/jobs/{id}/cancel and POST /api/jobs/cancel.
func (g *Gateway) serveJobs(w http.ResponseWriter, r *http.Request, site Site, rest string) {
	ctx := r.Context()
	switch {
	case rest == "" && r.Method == http.MethodGet:
		g.listJobs(w, r, site)
	case rest == "cancel" && r.Method == http.MethodPost:
		body, ok := readControlBody(w, r, site)
		if !ok {
			return
		}
		var req struct {
			JobIDs []string `json:"job_ids"`
		}
		if err := json.Unmarshal(body, &req); err != nil {
			writeJSON(w, http.StatusBadRequest, comfy.JobsError{Error: "Invalid JSON body"})
			return
		}
		hq := &homeQueue{}
		for _, id := range req.JobIDs {
			g.cancelJob(ctx, site, id, hq)
		}
		writeJSON(w, http.StatusOK, map[string]any{"cancelled": req.JobIDs})
	case strings.HasSuffix(rest, "/cancel") && r.Method == http.MethodPost:
		id := strings.TrimSuffix(rest, "/cancel")
		g.cancelJob(ctx, site, id, &homeQueue{})
		writeJSON(w, http.StatusOK, map[string]any{"cancelled": []string{id}})
	case rest != "" && !strings.Contains(rest, "/") && r.Method == http.MethodGet:
		g.jobDetail(w, r, site, rest)
	default:
		writeJSON(w, http.StatusNotFound, comfy.JobsError{Error: "Not found"})
	}
}

// cancelJob cancels one job where it is: the user's remote job through the
// dispatcher, otherwise on home (interrupt if running, delete if queued).
func (g *Gateway) cancelJob(ctx context.Context, site Site, id string, hq *homeQueue) {
	if j := g.userJob(ctx, site.User, id, false); j != nil {
		g.cancel(ctx, site.User, id)
		return
	}
	switch hq.stateOf(ctx, g, site, id) {
	case homeRunning:
		b, _ := json.Marshal(map[string]string{"prompt_id": id})
		g.homePost(ctx, site, "/interrupt", b)
	case homePending:
		b, _ := json.Marshal(map[string]any{"delete": []string{id}})
		g.homePost(ctx, site, "/queue", b)
	}
}

// homeQueue is home's queue as one request read it: a request cancelling
// many jobs asks home once, not once per job.
type homeQueue struct {
	read  bool
	state map[string]int // prompt_id → homeRunning or homePending
}

const (
	homeRunning = 1 + iota
	homePending
)

// stateOf says whether home runs the job, has it waiting, or neither (0, also
// when home cannot be asked).
func (h *homeQueue) stateOf(ctx context.Context, g *Gateway, site Site, id string) int {
	if !h.read {
		h.read = true
		var q queueBody
		if g.homeGet(ctx, site, "/queue", &q) == nil {
			h.state = make(map[string]int, len(q.Running)+len(q.Pending))
			// Pending first: a job listed in both counts as running.
			for _, raw := range q.Pending {
				if t, ok := parseQueueTuple(raw); ok {
					h.state[t.id] = homePending
				}
			}
			for _, raw := range q.Running {
				if t, ok := parseQueueTuple(raw); ok {
					h.state[t.id] = homeRunning
				}
			}
		}
	}
	return h.state[id]
}

func (g *Gateway) listJobs(w http.ResponseWriter, r *http.Request, site Site) {
	q := r.URL.Query()
	jq, problem := parseJobsQuery(q)
	if problem != "" {
		writeJSON(w, http.StatusBadRequest, comfy.JobsError{Error: problem})
		return
	}
	var all []jobView
	remote := g.userJobs(r.Context(), site.User, false)
	mine := jobIDs(remote)
	for _, v := range g.homeJobs(r.Context(), site, jq, q) {
		// A job that fell back to home is listed once, from the gateway.
		if jq.keep(v) && !mine[v.str("id")] {
			all = append(all, v)
		}
	}
	positions := map[string]map[string]int{}
	for _, j := range remote {
		v := remoteJobView(j, false)
		if j.Status == dispatch.StatusPending {
			if positions[j.Pool] == nil {
				positions[j.Pool] = g.manager.Positions(j.Pool)
			}
			if pos, ok := positions[j.Pool][j.ID]; ok {
				// Not a ComfyUI field: where the job stands in the pool's
				// fair queue (1 = next). The frontend ignores it.
				v["queue_position"] = pos
			}
		}
		if jq.keep(v) {
			all = append(all, v)
		}
	}
	key := func(v jobView) float64 {
		if jq.sortBy == "execution_duration" {
			s, e := v.num("execution_start_time"), v.num("execution_end_time")
			if s == 0 || e == 0 {
				return 0
			}
			return e - s
		}
		return v.num("create_time")
	}
	sort.SliceStable(all, func(a, b int) bool {
		ka, kb := key(all[a]), key(all[b])
		if ka == kb {
			return all[a].str("id") < all[b].str("id")
		}
		if jq.desc {
			return ka > kb
		}
		return ka < kb
	})
	total := len(all)
	start, end := page(total, jq.offset, jq.limit)
	items := all[start:end]
	if items == nil {
		items = []jobView{}
	}
	limit := jq.limit
	if limit < 0 {
		limit = total
	}
	writeJSON(w, http.StatusOK, map[string]any{
		"jobs": items,
		"pagination": map[string]any{
			"offset": jq.offset, "limit": limit, "total": total, "has_more": end < total,
		},
	})
}

func (g *Gateway) jobDetail(w http.ResponseWriter, r *http.Request, site Site, id string) {
	ctx := r.Context()
	if j := g.userJob(ctx, site.User, id, true); j != nil && !j.Hidden {
		writeJSON(w, http.StatusOK, remoteJobView(j, true))
		return
	}
	var v jobView
	var err error
	if site.SharedHome {
		// Home's job names no client: its queue and history do.
		if v := g.ownHomeQueued(ctx, site, id); v != nil {
			writeJSON(w, http.StatusOK, v)
			return
		}
		err = &dispatch.HTTPError{Status: http.StatusNotFound}
	} else {
		err = g.homeGet(ctx, site, "/api/jobs/"+url.PathEscape(id), &v)
	}
	if err == nil {
		writeJSON(w, http.StatusOK, v)
		return
	}
	if he, ok := err.(*dispatch.HTTPError); ok && he.Status == http.StatusNotFound && !strings.Contains(string(he.Body), "Job not found") {
		// An older home without the jobs API: look in its history.
		var raw map[string]json.RawMessage
		if g.homeGet(ctx, site, "/history/"+url.PathEscape(id), &raw) == nil {
			if e, ok := raw[id]; ok {
				v := jobFromHistory(id, e)
				var full struct {
					Outputs json.RawMessage `json:"outputs"`
					Status  json.RawMessage `json:"status"`
				}
				_ = json.Unmarshal(e, &full)
				v["outputs"] = full.Outputs
				v["execution_status"] = full.Status
				writeJSON(w, http.StatusOK, v)
				return
			}
		}
	}
	writeJSON(w, http.StatusNotFound, comfy.JobsError{Error: "Job not found"})
}

// jobIDs is the set of the jobs' ids.
func jobIDs(jobs []*dispatch.Job) map[string]bool {
	out := make(map[string]bool, len(jobs))
	for _, j := range jobs {
		out[j.ID] = true
	}
	return out
}
