package relay

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"net/url"
	"sort"
	"strconv"
	"time"

	"go.uber.org/zap"

	"github.com/comfyume/comfyume/dispatch"
)

// homeTimeout bounds a read of the home server's queue or history while
// building a merged view; without an answer the view shows the remote part.
const homeTimeout = 10 * time.Second

// maxHomeAnswer bounds what the gateway reads of one answer of a home
// server (its queue, history or jobs): a home is semi-trusted — a user may
// run their own — and a view merging it is built in memory.
const maxHomeAnswer = 64 << 20

// errHomeTooLarge is a home answer beyond maxHomeAnswer.
var errHomeTooLarge = errors.New("relay: home answer too large")

func (g *Gateway) homeGet(ctx context.Context, site Site, pathAndQuery string, v any) error {
	if site.Home == nil {
		return dispatch.ErrNotFound
	}
	ctx, cancel := context.WithTimeout(ctx, homeTimeout)
	defer cancel()
	req, err := site.Home.NewRequest(ctx, http.MethodGet, pathAndQuery, nil)
	if err != nil {
		return err
	}
	resp, err := site.Home.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode/100 != 2 {
		b, _ := io.ReadAll(io.LimitReader(resp.Body, 64<<10))
		return &dispatch.HTTPError{Status: resp.StatusCode, Body: b}
	}
	b, err := io.ReadAll(io.LimitReader(resp.Body, maxHomeAnswer+1))
	if err != nil {
		return err
	}
	if len(b) > maxHomeAnswer {
		g.logger.Warn("home answer too large: showing the gateway's part only",
			zap.String("path", pathAndQuery), zap.Int("limit", maxHomeAnswer))
		return errHomeTooLarge
	}
	if site.SharedHome {
		if b, err = ownHomeAnswer(site.User, pathAndQuery, b); err != nil {
			return err
		}
	}
	return json.Unmarshal(b, v)
}

func (g *Gateway) homePost(ctx context.Context, site Site, path string, body []byte) {
	if site.Home == nil {
		return
	}
	ctx, cancel := context.WithTimeout(ctx, homeTimeout)
	defer cancel()
	if _, _, err := site.Home.PostJSON(ctx, path, body); err != nil {
		g.logger.Warn("forwarding to home", zap.String("path", path), zap.Error(err))
	}
}

// userJobs returns the user's remote job records, visible ones only; with
// full, each with its prompt and extra_data (the UI workflow: megabytes
// per job, read only for views that show it).
func (g *Gateway) userJobs(ctx context.Context, user string, full bool) []*dispatch.Job {
	read := g.manager.Store().UserJobSummaries
	if full {
		read = g.manager.Store().UserJobs
	}
	all, err := read(ctx, user)
	if err != nil {
		g.logger.Error("reading jobs", zap.Error(err))
		return nil
	}
	out := all[:0]
	for _, j := range all {
		if !j.Hidden {
			out = append(out, j)
		}
	}
	return out
}

// activeJobs returns the user's remote jobs that wait or run, on any
// gateway sharing the store (full: see userJobs).
func (g *Gateway) activeJobs(ctx context.Context, user string, full bool) []*dispatch.Job {
	var out []*dispatch.Job
	for _, j := range g.userJobs(ctx, user, full) {
		if j.Active() {
			out = append(out, j)
		}
	}
	return out
}

// remoteCount is the user's part of queue_remaining.
func (g *Gateway) remoteCount(ctx context.Context, user string) int {
	n, err := g.manager.Store().ActiveCount(ctx, user)
	if err != nil {
		g.logger.Debug("counting active jobs", zap.Error(err))
	}
	return n
}

// cancel stops one of the user's remote jobs: here if this gateway runs it,
// else through the bus on the gateway that does.
func (g *Gateway) cancel(ctx context.Context, user, id string) {
	if g.manager.Cancel(ctx, user, id) || g.hub.bus == nil {
		return
	}
	bctx, done := context.WithTimeout(ctx, busTimeout)
	defer done()
	if err := g.hub.bus.Publish(bctx, &BusMessage{Kind: busKindCancel, User: user, JobID: id, Origin: g.hub.id}); err != nil {
		g.logger.Warn("forwarding cancel", zap.String("job", id), zap.Error(err))
	}
}

// userJob returns one of the user's remote jobs, or nil; with full, with
// its prompt and extra_data (the UI workflow: megabytes — checks of owner
// or state do without).
func (g *Gateway) userJob(ctx context.Context, user, id string, full bool) *dispatch.Job {
	read := g.manager.Store().JobSummary
	if full {
		read = g.manager.Store().Job
	}
	j, err := read(ctx, id)
	if err != nil || j.User != user {
		return nil
	}
	return j
}

// servePromptStatus answers GET /prompt: {"exec_info": {"queue_remaining"}}.
func (g *Gateway) servePromptStatus(w http.ResponseWriter, r *http.Request, site Site) {
	var st struct {
		ExecInfo struct {
			QueueRemaining int `json:"queue_remaining"`
		} `json:"exec_info"`
	}
	_ = g.homeGet(r.Context(), site, "/prompt", &st)
	st.ExecInfo.QueueRemaining += g.remoteCount(r.Context(), site.User)
	writeJSON(w, http.StatusOK, st)
}

// queueItem is ComfyUI's 5-element queue/history prompt tuple.
func queueItem(j *dispatch.Job) []any {
	extra := map[string]json.RawMessage{}
	for k, v := range j.ExtraData {
		extra[k] = v
	}
	if _, ok := extra["client_id"]; !ok {
		extra["client_id"], _ = json.Marshal(j.ClientID)
	}
	extra["create_time"], _ = json.Marshal(j.CreateTime)
	prompt := j.Prompt
	if len(prompt) == 0 {
		prompt = json.RawMessage("{}")
	}
	return []any{j.Number, j.ID, prompt, extra, j.OutputsToExecute}
}

type queueBody struct {
	Running []json.RawMessage `json:"queue_running"`
	Pending []json.RawMessage `json:"queue_pending"`
}

// serveQueue answers GET /queue (home's queue plus the user's remote jobs)
// and POST /queue {"clear"|"delete"} (each id on the server that has it).
func (g *Gateway) serveQueue(w http.ResponseWriter, r *http.Request, site Site) {
	ctx := r.Context()
	if r.Method == http.MethodPost {
		body, ok := readControlBody(w, r, site)
		if !ok {
			return
		}
		var req struct {
			Clear  bool     `json:"clear"`
			Delete []string `json:"delete"`
		}
		if len(bytes.TrimSpace(body)) > 0 && json.Unmarshal(body, &req) != nil {
			http.Error(w, "invalid JSON", http.StatusBadRequest)
			return
		}
		var homeIDs []string
		for _, id := range req.Delete {
			if j := g.userJob(ctx, site.User, id, false); j != nil {
				if j.Status == dispatch.StatusPending {
					g.cancel(ctx, site.User, id)
				}
				continue
			}
			homeIDs = append(homeIDs, id)
		}
		homeIDs = g.ownHomeIDs(ctx, site, homeIDs, "/queue")
		if req.Clear {
			for _, j := range g.activeJobs(ctx, site.User, false) {
				if j.Status == dispatch.StatusPending {
					g.cancel(ctx, site.User, j.ID)
				}
			}
		}
		fwd := map[string]any{}
		if req.Clear && !site.SharedHome {
			fwd["clear"] = true
		} else if req.Clear { // a shared home's clear is everyone's: the user's own, by id
			_, waiting := g.ownHomeJobs(ctx, site, "/queue")
			homeIDs = append(homeIDs, waiting...)
		}
		if len(homeIDs) > 0 {
			fwd["delete"] = homeIDs
		}
		if len(fwd) > 0 {
			b, _ := json.Marshal(fwd)
			g.homePost(ctx, site, "/queue", b)
		}
		w.WriteHeader(http.StatusOK)
		return
	}
	var q queueBody
	if err := g.homeGet(ctx, site, "/queue", &q); err != nil {
		g.logger.Debug("home queue unavailable", zap.Error(err))
	}
	// Summaries first: the prompts (with the UI workflow) are read for the
	// waiting and running jobs only, not for every job the user keeps.
	active := g.activeJobs(ctx, site.User, false)
	mine := jobIDs(active)
	// A job that fell back to home is listed once, from the gateway.
	q.Running = withoutJobs(q.Running, mine)
	q.Pending = withoutJobs(q.Pending, mine)
	for _, j := range active {
		running := j.Status == dispatch.StatusInProgress
		if full := g.userJob(ctx, site.User, j.ID, true); full != nil {
			j = full
		}
		b, _ := json.Marshal(queueItem(j))
		if running {
			q.Running = append(q.Running, b)
		} else {
			q.Pending = append(q.Pending, b)
		}
	}
	writeJSON(w, http.StatusOK, q)
}

// withoutJobs drops queue items whose prompt_id is in ids (never nil).
func withoutJobs(items []json.RawMessage, ids map[string]bool) []json.RawMessage {
	out := make([]json.RawMessage, 0, len(items))
	for _, raw := range items {
		if t, ok := parseQueueTuple(raw); ok && ids[t.id] {
			continue
		}
		out = append(out, raw)
	}
	return out
}

// historyEntry builds ComfyUI's history entry for a finished remote job.
func historyEntry(j *dispatch.Job) map[string]any {
	outputs := map[string]json.RawMessage{}
	for k, v := range j.Outputs {
		outputs[k] = v
	}
	statusStr := "success"
	if j.Status == dispatch.StatusFailed || j.Status == dispatch.StatusCancelled {
		statusStr = "error"
	}
	msgs := j.Messages
	if msgs == nil {
		msgs = []dispatch.HistoryMessage{}
	}
	meta := map[string]any{}
	for node := range j.Outputs {
		meta[node] = map[string]any{"node_id": node, "display_node": node, "parent_node": nil, "real_node_id": node}
	}
	return map[string]any{
		"prompt":  queueItem(j),
		"outputs": outputs,
		"status":  map[string]any{"status_str": statusStr, "completed": j.Status == dispatch.StatusCompleted, "messages": msgs},
		"meta":    meta,
	}
}

// orderedEntry is one key of a JSON object whose key order matters.
type orderedEntry struct {
	key string
	val json.RawMessage
	end int64
	job *dispatch.Job // a gateway job, val not made yet
}

// writeHistory writes a history object entry by entry, in order, making
// each gateway job's entry (with its prompt and workflow, read from the
// store) only when it is written: the answer is streamed, never built whole
// in memory.
func (g *Gateway) writeHistory(ctx context.Context, w http.ResponseWriter, user string, entries []orderedEntry) {
	w.Header().Set("Content-Type", "application/json; charset=utf-8")
	w.WriteHeader(http.StatusOK)
	bw := bufio.NewWriterSize(w, 32<<10)
	defer bw.Flush()
	bw.WriteByte('{')
	for i, e := range entries {
		val := e.val
		if e.job != nil {
			j := e.job
			if full := g.userJob(ctx, user, j.ID, true); full != nil {
				j = full
			}
			val, _ = json.Marshal(historyEntry(j))
		}
		if i > 0 {
			bw.WriteString(", ")
		}
		k, _ := json.Marshal(e.key)
		bw.Write(k)
		bw.WriteString(": ")
		if _, err := bw.Write(val); err != nil {
			return // the client went away
		}
	}
	bw.WriteByte('}')
}

// historyPage selects the entries a /history query asks for, out of total
// in completion order, as ComfyUI does: with max_items and no offset, the
// last max_items; with an offset, max_items from there; max_items absent
// (or not a positive integer): all from offset. Every number is clamped,
// so start <= end <= total whatever the query.
func historyPage(q url.Values, total int) (start, end int) {
	maxItems, _ := queryInt(q.Get("max_items"))
	offset, ok := queryInt(q.Get("offset"))
	if !ok {
		offset = -1 // ComfyUI's default: none
	}
	if maxItems > 0 && offset < 0 {
		offset = total - maxItems
	}
	return page(total, offset, maxItems)
}

// decodeOrdered reads a JSON object keeping its key order.
func decodeOrdered(b []byte) ([]orderedEntry, error) {
	d := json.NewDecoder(bytes.NewReader(b))
	t, err := d.Token()
	if err != nil {
		return nil, err
	}
	if t != json.Delim('{') {
		return nil, errors.New("not an object")
	}
	var out []orderedEntry
	for d.More() {
		t, err := d.Token()
		if err != nil {
			return nil, err
		}
		k, _ := t.(string)
		var v json.RawMessage
		if err := d.Decode(&v); err != nil {
			return nil, err
		}
		out = append(out, orderedEntry{key: k, val: v, end: lastTimestamp(v)})
	}
	return out, nil
}

// lastTimestamp is the latest message timestamp of a history entry.
func lastTimestamp(entry json.RawMessage) int64 {
	var e struct {
		Status struct {
			Messages [][]json.RawMessage `json:"messages"`
		} `json:"status"`
	}
	_ = json.Unmarshal(entry, &e)
	var last int64
	for _, m := range e.Status.Messages {
		if len(m) != 2 {
			continue
		}
		var d struct {
			Timestamp int64 `json:"timestamp"`
		}
		if json.Unmarshal(m[1], &d) == nil && d.Timestamp > last {
			last = d.Timestamp
		}
	}
	return last
}

// serveHistory answers GET /history[/{id}] and POST /history.
func (g *Gateway) serveHistory(w http.ResponseWriter, r *http.Request, site Site, id string) {
	ctx := r.Context()
	if r.Method == http.MethodPost {
		body, ok := readControlBody(w, r, site)
		if !ok {
			return
		}
		var req struct {
			Clear  bool     `json:"clear"`
			Delete []string `json:"delete"`
		}
		if len(bytes.TrimSpace(body)) > 0 && json.Unmarshal(body, &req) != nil {
			http.Error(w, "invalid JSON", http.StatusBadRequest)
			return
		}
		var homeIDs []string
		hide := func(j *dispatch.Job) {
			if j.Active() {
				return
			}
			j.Hidden = true
			if err := g.manager.Store().Save(ctx, j); err != nil {
				g.logger.Error("hiding job", zap.Error(err))
			}
		}
		for _, id := range req.Delete {
			if j := g.userJob(ctx, site.User, id, false); j != nil {
				hide(j)
				continue
			}
			homeIDs = append(homeIDs, id)
		}
		homeIDs = g.ownHomeIDs(ctx, site, homeIDs, "/history")
		if req.Clear {
			for _, j := range g.userJobs(ctx, site.User, false) {
				hide(j)
			}
		}
		fwd := map[string]any{}
		if req.Clear && !site.SharedHome {
			fwd["clear"] = true
		} else if req.Clear { // a shared home's clear is everyone's: the user's own, by id
			_, ended := g.ownHomeJobs(ctx, site, "/history")
			homeIDs = append(homeIDs, ended...)
		}
		if len(homeIDs) > 0 {
			fwd["delete"] = homeIDs
		}
		if len(fwd) > 0 {
			b, _ := json.Marshal(fwd)
			g.homePost(ctx, site, "/history", b)
		}
		w.WriteHeader(http.StatusOK)
		return
	}
	if r.Method != http.MethodGet {
		http.Error(w, "method not allowed", http.StatusMethodNotAllowed)
		return
	}
	if id != "" {
		if j := g.userJob(ctx, site.User, id, true); j != nil && !j.Hidden {
			if j.Active() {
				writeJSON(w, http.StatusOK, map[string]any{})
				return
			}
			writeJSON(w, http.StatusOK, map[string]any{j.ID: historyEntry(j)})
			return
		}
		var raw json.RawMessage
		if err := g.homeGet(ctx, site, "/history/"+url.PathEscape(id), &raw); err != nil {
			raw = json.RawMessage("{}")
		}
		writeRaw(w, http.StatusOK, raw)
		return
	}
	q := r.URL.Query()
	homeQuery := "/history"
	// A shared home's last items may be others' (kept out): all are read.
	if maxItems, _ := queryInt(q.Get("max_items")); maxItems > 0 && !site.SharedHome {
		offset, _ := queryInt(q.Get("offset"))
		homeQuery += "?max_items=" + strconv.Itoa(min(maxItems+max(offset, 0), maxQueryInt))
	}
	var entries []orderedEntry
	// Summaries first; the prompts (with the UI workflow) are read only for
	// the page returned, one entry at a time as it is written.
	remote := g.userJobs(ctx, site.User, false)
	mine := jobIDs(remote)
	var raw json.RawMessage
	if err := g.homeGet(ctx, site, homeQuery, &raw); err == nil {
		all, _ := decodeOrdered(raw)
		for _, e := range all {
			if !mine[e.key] { // a job that fell back to home: listed once
				entries = append(entries, e)
			}
		}
	}
	for _, j := range remote {
		if j.Active() {
			continue
		}
		entries = append(entries, orderedEntry{key: j.ID, job: j, end: j.EndTime})
	}
	sort.SliceStable(entries, func(a, b int) bool { return entries[a].end < entries[b].end })
	start, end := historyPage(q, len(entries))
	g.writeHistory(ctx, w, site.User, entries[start:end])
}

// serveInterrupt answers POST /interrupt: the named job is interrupted where
// it runs (only if it is the user's); without a prompt_id, the user's running
// remote jobs and whatever runs on home (on a shared home: the user's job
// there, by its id).
func (g *Gateway) serveInterrupt(w http.ResponseWriter, r *http.Request, site Site) {
	body, ok := readControlBody(w, r, site)
	if !ok {
		return
	}
	var req struct {
		PromptID string `json:"prompt_id"`
	}
	_ = json.Unmarshal(body, &req)
	ctx := r.Context()
	if req.PromptID != "" {
		if j := g.userJob(ctx, site.User, req.PromptID, false); j != nil {
			g.cancel(ctx, site.User, j.ID)
		} else if len(g.ownHomeIDs(ctx, site, []string{req.PromptID}, "/queue")) > 0 {
			g.homePost(ctx, site, "/interrupt", body)
		}
		w.WriteHeader(http.StatusOK)
		return
	}
	for _, j := range g.activeJobs(ctx, site.User, false) {
		if j.Status == dispatch.StatusInProgress {
			g.cancel(ctx, site.User, j.ID)
		}
	}
	if !site.SharedHome {
		g.homePost(ctx, site, "/interrupt", body)
	} else {
		// What runs on a shared home may be someone else's: the user's own
		// job is interrupted by its id.
		running, _ := g.ownHomeJobs(ctx, site, "/queue")
		for _, id := range running {
			b, _ := json.Marshal(map[string]string{"prompt_id": id})
			g.homePost(ctx, site, "/interrupt", b)
		}
	}
	w.WriteHeader(http.StatusOK)
}
