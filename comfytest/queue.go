package comfytest

import (
	"container/heap"
	"encoding/json"
	"fmt"
	"net/http"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/google/uuid"
)

// job is one queued prompt (ComfyUI's queue tuple plus parsed helpers).
type job struct {
	number    pyNum
	id        string
	prompt    obj // as sent
	extra     obj // extra_data (+client_id, +create_time for 2026)
	outputs   []string
	sensitive obj

	nodes     map[string]*pnode
	order     []string // prompt key order
	clientID  string
	hasClient bool
	index     int
}

type pnode struct {
	id     string
	class  string
	inputs obj
	def    *nodeDef
}

// tuple is the 5-element queue/history item.
func (j *job) tuple() []any {
	outs := make([]any, len(j.outputs))
	for i, o := range j.outputs {
		outs[i] = o
	}
	return []any{j.number, j.id, j.prompt, j.extra, outs}
}

func (j *job) createTime() any {
	v, _ := j.extra.get("create_time")
	return v
}

type jobHeap []*job

func (h jobHeap) Len() int { return len(h) }
func (h jobHeap) Less(i, k int) bool {
	if h[i].number.f != h[k].number.f {
		return h[i].number.f < h[k].number.f
	}
	return h[i].id < h[k].id
}
func (h jobHeap) Swap(i, k int) {
	h[i], h[k] = h[k], h[i]
	h[i].index = i
	h[k].index = k
}
func (h *jobHeap) Push(x any) {
	j := x.(*job)
	j.index = len(*h)
	*h = append(*h, j)
}
func (h *jobHeap) Pop() any {
	old := *h
	n := len(old)
	j := old[n-1]
	old[n-1] = nil
	*h = old[:n-1]
	return j
}

// histEntry is one /history entry.
type histEntry struct {
	job     *job
	outputs obj
	status  obj
	meta    obj
}

func (e *histEntry) json() obj {
	return obj{{"prompt", e.job.tuple()}, {"outputs", e.outputs}, {"status", e.status}, {"meta", e.meta}}
}

const maxHistory = 10000

// histStore is an insertion-ordered map like the Python dict ComfyUI uses.
type histStore struct {
	ids []string
	m   map[string]*histEntry
}

func newHistStore() histStore { return histStore{m: map[string]*histEntry{}} }

func (h *histStore) put(id string, e *histEntry) {
	if len(h.ids) > maxHistory {
		h.remove(h.ids[0])
	}
	if _, ok := h.m[id]; !ok {
		h.ids = append(h.ids, id)
	}
	h.m[id] = e
}

func (h *histStore) remove(id string) {
	if _, ok := h.m[id]; !ok {
		return
	}
	delete(h.m, id)
	for i, x := range h.ids {
		if x == id {
			h.ids = append(h.ids[:i:i], h.ids[i+1:]...)
			break
		}
	}
}

func (s *Server) queueRemainingLocked() int {
	n := len(s.pending)
	if s.running != nil {
		n++
	}
	return n
}

// queueUpdatedLocked broadcasts status; call with s.mu held.
func (s *Server) queueUpdatedLocked() {
	s.sendJSON(broadcast, "status", obj{{"status", queueInfo(s.queueRemainingLocked())}})
}

func (s *Server) enqueue(j *job) {
	s.workerOnce.Do(func() { go s.worker() })
	s.mu.Lock()
	heap.Push(&s.pending, j)
	s.queueUpdatedLocked()
	s.mu.Unlock()
	select {
	case s.wake <- struct{}{}:
	default:
	}
}

// ---- POST /prompt ----

var sensitiveKeys = []string{"auth_token_comfy_org", "api_key_comfy_org"}

func (s *Server) handlePostPrompt(w http.ResponseWriter, r *http.Request, _ map[string]string) {
	body, ok := s.readBody(w, r)
	if !ok {
		return
	}
	v, err := decodeOrdered(body)
	if err != nil {
		serverError(w)
		return
	}
	var jd obj
	switch t := v.(type) {
	case obj:
		jd = t
	case []any:
		// `"key" in list` is False for every key in Python.
	default:
		serverError(w)
		return
	}

	var number pyNum
	if nv, ok := jd.get("number"); ok {
		f, ok := pyFloatArg(nv)
		if !ok {
			serverError(w)
			return
		}
		number = pyNum{f: f, isFloat: true}
	} else {
		s.mu.Lock()
		n := s.number
		s.number++
		s.mu.Unlock()
		if fv, ok := jd.get("front"); ok && pyTruthy(fv) {
			n = -n
		}
		number = intNum(n)
	}

	promptV, ok := jd.get("prompt")
	if !ok {
		if s.v2026 {
			writeJSON(w, 400, obj{
				{"error", obj{{"type", "no_prompt"}, {"message", "No prompt provided"}, {"details", "No prompt provided"}, {"extra_info", obj{}}}},
				{"node_errors", obj{}},
			})
		} else {
			writeJSON(w, 400, obj{{"error", "no prompt"}, {"node_errors", []any{}}})
		}
		return
	}
	prompt, ok := promptV.(obj)
	if !ok {
		serverError(w)
		return
	}

	promptID := uuid.NewString()
	if s.v2026 {
		if pv, ok := jd.get("prompt_id"); ok {
			promptID = pyStr(pv)
		}
	}
	var partial []string
	if s.v2026 {
		if pv, ok := jd.get("partial_execution_targets"); ok && pv != nil {
			arr, ok := pv.([]any)
			if !ok {
				serverError(w)
				return
			}
			partial = []string{}
			for _, x := range arr {
				partial = append(partial, pyStr(x))
			}
		}
	}

	res := s.validatePrompt(prompt, partial)

	extra := obj{}
	if ev, ok := jd.get("extra_data"); ok {
		eo, isObj := ev.(obj)
		if !isObj {
			serverError(w)
			return
		}
		extra = eo.clone()
	}
	if cv, ok := jd.get("client_id"); ok {
		extra = extra.set("client_id", cv)
	}

	if !res.ok {
		s.logf("invalid prompt: %s", mustJSON(res.err))
		writeJSON(w, 400, obj{{"error", res.err}, {"node_errors", res.nodeErrors}})
		return
	}

	received := extra.clone()
	j := &job{number: number, id: promptID, prompt: prompt, outputs: res.outputs, nodes: res.nodes, order: res.order}
	if s.v2026 {
		for _, k := range sensitiveKeys {
			if sv, ok := extra.get(k); ok {
				j.sensitive = j.sensitive.set(k, sv)
				extra = extra.del(k)
			}
		}
		extra = extra.set("create_time", time.Now().UnixMilli())
	}
	j.extra = extra
	if cv, ok := extra.get("client_id"); ok && cv != nil {
		j.hasClient = true
		j.clientID = pyStr(cv)
	}

	em, _ := toPlain(received).(map[string]any)
	pm, _ := toPlain(prompt).(map[string]any)
	s.rmu.Lock()
	s.prompts = append(s.prompts, ReceivedPrompt{
		PromptID: promptID, ClientID: j.clientID, Prompt: pm, ExtraData: em, Header: r.Header.Clone(),
	})
	s.rmu.Unlock()

	s.enqueue(j)
	s.logf("queued prompt %s number=%s outputs=%v", promptID, number, res.outputs)
	writeJSON(w, 200, obj{{"prompt_id", promptID}, {"number", number}, {"node_errors", res.nodeErrors}})
}

// pyFloatArg is Python's float(x) for a JSON value.
func pyFloatArg(v any) (float64, bool) {
	switch t := v.(type) {
	case json.Number:
		f, err := t.Float64()
		return f, err == nil
	case string:
		f, err := strconv.ParseFloat(strings.TrimSpace(t), 64)
		return f, err == nil
	case bool:
		if t {
			return 1, true
		}
		return 0, true
	}
	return 0, false
}

func pyTruthy(v any) bool {
	switch t := v.(type) {
	case nil:
		return false
	case bool:
		return t
	case string:
		return t != ""
	case json.Number:
		f, _ := t.Float64()
		return f != 0
	case []any:
		return len(t) > 0
	case obj:
		return len(t) > 0
	}
	return true
}

// ---- GET /prompt, /queue ----

func (s *Server) handleGetPrompt(w http.ResponseWriter, r *http.Request, _ map[string]string) {
	s.mu.Lock()
	n := s.queueRemainingLocked()
	s.mu.Unlock()
	writeJSON(w, 200, queueInfo(n))
}

func (s *Server) handleGetQueue(w http.ResponseWriter, r *http.Request, _ map[string]string) {
	s.mu.Lock()
	running := []any{}
	if s.running != nil {
		running = append(running, s.running.tuple())
	}
	pending := []any{}
	for _, j := range s.pending {
		pending = append(pending, j.tuple())
	}
	s.mu.Unlock()
	writeJSON(w, 200, obj{{"queue_running", running}, {"queue_pending", pending}})
}

func (s *Server) handlePostQueue(w http.ResponseWriter, r *http.Request, _ map[string]string) {
	v, ok := s.readJSONBody(w, r)
	if !ok {
		return
	}
	jd, _ := v.(obj)
	s.mu.Lock()
	if cv, ok := jd.get("clear"); ok && pyTruthy(cv) {
		s.pending = nil
		s.queueUpdatedLocked()
	}
	if dv, ok := jd.get("delete"); ok {
		ids, _ := dv.([]any)
		for _, idv := range ids {
			id, _ := idv.(string)
			for i, j := range s.pending {
				if j.id == id {
					if len(s.pending) == 1 {
						s.pending = nil
						s.queueUpdatedLocked() // wipe_queue
					} else {
						heap.Remove(&s.pending, i)
					}
					s.queueUpdatedLocked()
					break
				}
			}
		}
	}
	s.mu.Unlock()
	emptyResponse(w, 200)
}

// ---- POST /interrupt, /free ----

func (s *Server) handleInterrupt(w http.ResponseWriter, r *http.Request, _ map[string]string) {
	if !s.v2026 {
		// 2024-12: no body is read, whatever runs is interrupted.
		s.interrupt()
		emptyResponse(w, 200)
		return
	}
	body, ok := s.readBody(w, r)
	if !ok {
		return
	}
	var jd obj
	if v, err := decodeOrdered(body); err == nil {
		jd, _ = v.(obj)
	}
	pid, _ := jd.get("prompt_id")
	if pyTruthy(pid) {
		id := pyStr(pid)
		s.mu.Lock()
		match := s.running != nil && s.running.id == id
		s.mu.Unlock()
		if match {
			s.logf("Interrupting prompt %s", id)
			s.interrupt()
		} else {
			s.logf("Prompt %s is not currently running, skipping interrupt", id)
		}
	} else {
		s.interrupt()
	}
	emptyResponse(w, 200)
}

func (s *Server) interrupt() {
	s.interrupted.Store(true)
	select {
	case s.intrCh <- struct{}{}:
	default:
	}
}

func (s *Server) handleFree(w http.ResponseWriter, r *http.Request, _ map[string]string) {
	if _, ok := s.readJSONBody(w, r); !ok {
		return
	}
	emptyResponse(w, 200)
}

// ---- /history ----

func (s *Server) handleGetHistory(w http.ResponseWriter, r *http.Request, _ map[string]string) {
	q := queryOf(r)
	maxItems, hasMax := 0, false
	if v, ok := q["max_items"]; ok {
		n, err := strconv.Atoi(strings.TrimSpace(v[0]))
		if err != nil {
			serverError(w)
			return
		}
		maxItems, hasMax = n, true
	}
	offset := -1
	if v, ok := q["offset"]; ok {
		n, err := strconv.Atoi(strings.TrimSpace(v[0]))
		if err != nil {
			serverError(w)
			return
		}
		offset = n
	}
	s.mu.Lock()
	out := obj{}
	if offset < 0 && hasMax {
		offset = len(s.history.ids) - maxItems
	}
	for i, id := range s.history.ids {
		if i >= offset {
			out = append(out, kv{id, s.history.m[id].json()})
			if hasMax && len(out) >= maxItems {
				break
			}
		}
	}
	s.mu.Unlock()
	writeJSON(w, 200, out)
}

func (s *Server) handleGetHistoryID(w http.ResponseWriter, r *http.Request, p map[string]string) {
	id := p["prompt_id"]
	s.mu.Lock()
	out := obj{}
	if e, ok := s.history.m[id]; ok {
		out = obj{{id, e.json()}}
	}
	s.mu.Unlock()
	writeJSON(w, 200, out)
}

func (s *Server) handlePostHistory(w http.ResponseWriter, r *http.Request, _ map[string]string) {
	v, ok := s.readJSONBody(w, r)
	if !ok {
		return
	}
	jd, _ := v.(obj)
	s.mu.Lock()
	if cv, ok := jd.get("clear"); ok && pyTruthy(cv) {
		s.history = newHistStore()
	}
	if dv, ok := jd.get("delete"); ok {
		ids, _ := dv.([]any)
		for _, idv := range ids {
			if id, ok := idv.(string); ok {
				s.history.remove(id)
			}
		}
	}
	s.mu.Unlock()
	emptyResponse(w, 200)
}

// ---- /api/jobs (2026) ----

var jobStatuses = []string{"pending", "in_progress", "completed", "failed", "cancelled"}

func pruneNil(o obj) obj {
	out := obj{}
	for _, e := range o {
		if e.V != nil {
			out = append(out, e)
		}
	}
	return out
}

func workflowID(extra obj) any {
	pi, _ := extra.get("extra_pnginfo")
	po, _ := pi.(obj)
	wf, _ := po.get("workflow")
	wo, _ := wf.(obj)
	id, _ := wo.get("id")
	return id
}

func queueJob(j *job, status string) obj {
	return pruneNil(obj{
		{"id", j.id}, {"status", status}, {"priority", j.number}, {"create_time", j.createTime()},
		{"outputs_count", 0}, {"workflow_id", workflowID(j.extra)},
	})
}

var threeDExt = []string{".obj", ".fbx", ".gltf", ".glb", ".usdz"}

func has3DExt(name string) bool {
	l := strings.ToLower(name)
	for _, e := range threeDExt {
		if strings.HasSuffix(l, e) {
			return true
		}
	}
	return false
}

func normalizeOutputItem(item any) any {
	switch t := item.(type) {
	case string:
		if has3DExt(t) {
			return obj{{"filename", t}, {"type", "output"}, {"subfolder", ""}, {"mediaType", "3d"}}
		}
		return nil
	case obj:
		return t
	}
	return nil
}

func outputsSummary(outputs obj) (int, any) {
	count := 0
	var preview, fallback obj
	for _, node := range outputs {
		no, ok := node.V.(obj)
		if !ok {
			continue
		}
		for _, media := range no {
			items, ok := media.V.([]any)
			if media.K == "animated" || !ok {
				continue
			}
			for _, it := range items {
				n := normalizeOutputItem(it)
				if n == nil {
					continue
				}
				count++
				if preview != nil {
					continue
				}
				nm, ok := n.(obj)
				if !ok || !isPreviewable(media.K, nm) {
					continue
				}
				enriched := nm.clone().set("nodeId", node.K)
				if !nm.has("mediaType") {
					enriched = enriched.set("mediaType", media.K)
				}
				if t, _ := nm.get("type"); t == "output" {
					preview = enriched
				} else if fallback == nil {
					fallback = enriched
				}
			}
		}
	}
	if preview != nil {
		return count, preview
	}
	if fallback != nil {
		return count, fallback
	}
	return count, nil
}

func isPreviewable(media string, item obj) bool {
	switch media {
	case "images", "video", "audio", "3d":
		return true
	}
	if f, _ := item.get("format"); f != nil {
		if fs, ok := f.(string); ok && (strings.HasPrefix(fs, "video/") || strings.HasPrefix(fs, "audio/")) {
			return true
		}
	}
	fn, _ := item.get("filename")
	fs, _ := fn.(string)
	return has3DExt(fs)
}

func normalizeOutputs(outputs obj) obj {
	out := obj{}
	for _, node := range outputs {
		no, ok := node.V.(obj)
		if !ok {
			out = append(out, node)
			continue
		}
		nn := obj{}
		for _, media := range no {
			items, ok := media.V.([]any)
			if media.K == "animated" || !ok {
				nn = append(nn, media)
				continue
			}
			ni := []any{}
			for _, it := range items {
				if it == nil {
					continue
				}
				if n := normalizeOutputItem(it); n != nil {
					ni = append(ni, n)
				} else {
					ni = append(ni, it)
				}
			}
			nn = append(nn, kv{media.K, ni})
		}
		out = append(out, kv{node.K, nn})
	}
	return out
}

func historyJob(e *histEntry, full bool) obj {
	var start, end, execErr any
	interrupted := false
	msgs, _ := e.status.get("messages")
	for _, m := range msgs.([]any) {
		pair := m.([]any)
		name := pair[0].(string)
		data := pair[1].(obj)
		switch name {
		case "execution_start":
			start, _ = data.get("timestamp")
		case "execution_success", "execution_error", "execution_interrupted":
			end, _ = data.get("timestamp")
			if name == "execution_error" {
				execErr = data
			} else if name == "execution_interrupted" {
				interrupted = true
			}
		}
	}
	st, _ := e.status.get("status_str")
	status := "completed"
	if st == "error" {
		status = "failed"
		if interrupted {
			status = "cancelled"
		}
	}
	count, preview := outputsSummary(e.outputs)
	j := pruneNil(obj{
		{"id", e.job.id}, {"status", status}, {"priority", e.job.number}, {"create_time", e.job.createTime()},
		{"execution_start_time", start}, {"execution_end_time", end}, {"execution_error", execErr},
		{"outputs_count", count}, {"preview_output", preview}, {"workflow_id", workflowID(e.job.extra)},
	})
	if full {
		j = append(j, kv{"outputs", normalizeOutputs(e.outputs)}, kv{"execution_status", e.status},
			kv{"workflow", obj{{"prompt", e.job.prompt}, {"extra_data", e.job.extra}}})
	}
	return j
}

func jobInt(j obj, k string) int64 {
	v, _ := j.get(k)
	switch t := v.(type) {
	case int64:
		return t
	case int:
		return int64(t)
	case json.Number:
		i, _ := t.Int64()
		return i
	}
	return 0
}

func (s *Server) handleJobs(w http.ResponseWriter, r *http.Request, _ map[string]string) {
	q := queryOf(r)
	badReq := func(msg string) { writeJSON(w, 400, obj{{"error", msg}}) }
	var filter []string
	if sp := q.Get("status"); sp != "" {
		var invalid []string
		for _, x := range strings.Split(sp, ",") {
			x = strings.ToLower(strings.TrimSpace(x))
			if x == "" {
				continue
			}
			filter = append(filter, x)
			valid := false
			for _, st := range jobStatuses {
				valid = valid || st == x
			}
			if !valid {
				invalid = append(invalid, x)
			}
		}
		if len(invalid) > 0 {
			badReq(fmt.Sprintf("Invalid status value(s): %s. Valid values: %s", strings.Join(invalid, ", "), strings.Join(jobStatuses, ", ")))
			return
		}
	} else {
		filter = jobStatuses
	}
	sortBy := "created_at"
	if v, ok := q["sort_by"]; ok {
		sortBy = strings.ToLower(v[0])
	}
	sortOrder := "desc"
	if v, ok := q["sort_order"]; ok {
		sortOrder = strings.ToLower(v[0])
	}
	if sortBy != "created_at" && sortBy != "execution_duration" {
		badReq("sort_by must be 'created_at' or 'execution_duration'")
		return
	}
	if sortOrder != "asc" && sortOrder != "desc" {
		badReq("sort_order must be 'asc' or 'desc'")
		return
	}
	var limit any // nil → JSON null
	limitN := -1
	if v, ok := q["limit"]; ok {
		n, err := strconv.Atoi(strings.TrimSpace(v[0]))
		if err != nil {
			badReq("limit must be an integer")
			return
		}
		if n <= 0 {
			badReq("limit must be a positive integer")
			return
		}
		limit, limitN = n, n
	}
	offset := 0
	if v, ok := q["offset"]; ok {
		n, err := strconv.Atoi(strings.TrimSpace(v[0]))
		if err != nil {
			badReq("offset must be an integer")
			return
		}
		if n > 0 {
			offset = n
		}
	}
	wfID := q.Get("workflow_id")
	want := map[string]bool{}
	for _, f := range filter {
		want[f] = true
	}

	s.mu.Lock()
	var jobs []obj
	if want["in_progress"] && s.running != nil {
		jobs = append(jobs, queueJob(s.running, "in_progress"))
	}
	if want["pending"] {
		for _, j := range s.pending {
			jobs = append(jobs, queueJob(j, "pending"))
		}
	}
	if want["completed"] || want["failed"] || want["cancelled"] {
		for _, id := range s.history.ids {
			j := historyJob(s.history.m[id], false)
			st, _ := j.get("status")
			if want[st.(string)] {
				jobs = append(jobs, j)
			}
		}
	}
	s.mu.Unlock()

	if wfID != "" {
		kept := jobs[:0]
		for _, j := range jobs {
			if v, _ := j.get("workflow_id"); v == wfID {
				kept = append(kept, j)
			}
		}
		jobs = kept
	}
	key := func(j obj) int64 {
		if sortBy == "execution_duration" {
			st, en := jobInt(j, "execution_start_time"), jobInt(j, "execution_end_time")
			if st != 0 && en != 0 {
				return en - st
			}
			return 0
		}
		return jobInt(j, "create_time")
	}
	sort.SliceStable(jobs, func(a, b int) bool {
		if sortOrder == "desc" {
			return key(jobs[a]) > key(jobs[b])
		}
		return key(jobs[a]) < key(jobs[b])
	})
	total := len(jobs)
	if offset > 0 {
		if offset > len(jobs) {
			jobs = nil
		} else {
			jobs = jobs[offset:]
		}
	}
	if limitN >= 0 && len(jobs) > limitN {
		jobs = jobs[:limitN]
	}
	list := make([]any, len(jobs))
	for i, j := range jobs {
		list[i] = j
	}
	writeJSON(w, 200, obj{
		{"jobs", list},
		{"pagination", obj{{"offset", offset}, {"limit", limit}, {"total", total}, {"has_more", offset+len(jobs) < total}}},
	})
}

func (s *Server) handleJob(w http.ResponseWriter, r *http.Request, p map[string]string) {
	id := p["job_id"]
	s.mu.Lock()
	var out obj
	if e, ok := s.history.m[id]; ok {
		out = historyJob(e, true)
	} else if s.running != nil && s.running.id == id {
		out = queueJob(s.running, "in_progress")
	} else {
		for _, j := range s.pending {
			if j.id == id {
				out = queueJob(j, "pending")
				break
			}
		}
	}
	s.mu.Unlock()
	if out == nil {
		writeJSON(w, 404, obj{{"error", "Job not found"}})
		return
	}
	writeJSON(w, 200, out)
}
