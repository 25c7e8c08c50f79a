package comfytest

import (
	"container/heap"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"fmt"
	"sort"
	"strconv"
	"strings"
	"time"
)

// cacheEntry is what ComfyUI's output + ui caches hold for one node
// signature.
type cacheEntry struct {
	outputs []any
	ui      obj // {"meta":..., "output":...} or nil
}

var (
	errInterrupted = errors.New("interrupted")
	errStopped     = errors.New("server stopped")
)

func (s *Server) worker() {
	defer close(s.workerDone)
	for {
		s.mu.Lock()
		for len(s.pending) == 0 {
			s.mu.Unlock()
			select {
			case <-s.stop:
				return
			case <-s.wake:
			}
			s.mu.Lock()
		}
		if s.stopped() {
			s.mu.Unlock()
			return
		}
		j := heap.Pop(&s.pending).(*job)
		s.running = j
		s.runClient, s.runHasCli = j.clientID, j.hasClient
		s.lastNode = nil
		var fail string
		if len(s.failNext) > 0 {
			fail = s.failNext[0]
			s.failNext = s.failNext[1:]
		}
		s.queueUpdatedLocked()
		s.mu.Unlock()

		if !s.runJob(j, fail) {
			return // stopped mid-job: the job vanishes with the server
		}
	}
}

// run is the state of one executing job (ComfyUI's PromptExecutor).
type run struct {
	s         *Server
	j         *job
	tgt       target // where "to client" events go (broadcast if no client)
	sigs      map[string]string
	outputs   map[string][]any
	executed  []string
	messages  []any
	uiOutputs obj // node id → {"meta","output"} in production order
	progOrder []string
	prog      map[string]*nodeProgress
	fail      string
	current   []string
}

type nodeProgress struct {
	state      string
	value, max any
}

func (r *run) hasClient() bool { return r.j.hasClient }

// toClient sends only when the prompt has a client_id (ComfyUI's
// `if server.client_id is not None`).
func (r *run) toClient(typ string, data any) {
	if r.j.hasClient {
		r.s.sendJSON(r.tgt, typ, data)
	}
}

// addMessage is PromptExecutor.add_message: timestamped, kept for history.
func (r *run) addMessage(event string, data obj, bcast bool) {
	data = append(data, kv{"timestamp", time.Now().UnixMilli()})
	r.messages = append(r.messages, []any{event, data})
	if r.j.hasClient || bcast {
		r.s.sendJSON(r.tgt, event, data)
	}
}

// runJob executes j; it returns false if the server stopped meanwhile.
func (s *Server) runJob(j *job, fail string) bool {
	// interrupt_processing(False) at the start of every execution
	s.interrupted.Store(false)
	select {
	case <-s.intrCh:
	default:
	}
	r := &run{s: s, j: j, tgt: broadcast, outputs: map[string][]any{}, prog: map[string]*nodeProgress{}, fail: fail, executed: []string{}}
	if j.hasClient {
		r.tgt = target{sid: j.clientID}
	}
	s.logf("executing prompt %s", j.id)
	r.addMessage("execution_start", obj{{"prompt_id", j.id}}, false)

	r.sigs = s.signatures(j)
	used := map[string]bool{}
	for _, sig := range r.sigs {
		used[sig] = true
	}
	for sig := range s.cache {
		if !used[sig] {
			delete(s.cache, sig)
		}
	}
	cached := []any{}
	for _, id := range j.order {
		if s.cache[r.sigs[id]] != nil {
			cached = append(cached, id)
			r.current = append(r.current, id)
		}
	}
	r.addMessage("execution_cached", obj{{"nodes", cached}, {"prompt_id", j.id}}, false)

	el := newExecList(j, func(id string) bool { return s.cache[r.sigs[id]] != nil })
	for _, o := range orderOutputs(j) {
		el.addNode(o)
	}
	success := true
	for !el.empty() {
		id := el.stage()
		err := r.execNode(id)
		if err == errStopped {
			return false
		}
		if err != nil {
			success = false
			r.handleError(id, err)
			break
		}
		el.complete(id)
	}
	if success {
		r.addMessage("execution_success", obj{{"prompt_id", j.id}}, false)
	}
	if s.stopped() {
		return false
	}

	outputs, meta := obj{}, obj{}
	for _, e := range r.uiOutputs {
		u := e.V.(obj)
		o, _ := u.get("output")
		m, _ := u.get("meta")
		outputs = append(outputs, kv{e.K, o})
		meta = append(meta, kv{e.K, m})
	}
	if s.opts.BeforeHistory != nil {
		s.opts.BeforeHistory(j.id)
	}
	statusStr := "success"
	if !success {
		statusStr = "error"
	}
	msgs := append([]any{}, r.messages...)
	entry := &histEntry{job: j, outputs: outputs, meta: meta,
		status: obj{{"status_str", statusStr}, {"completed", success}, {"messages", msgs}}}

	s.mu.Lock()
	s.running = nil
	s.lastNode = nil
	s.history.put(j.id, entry)
	s.queueUpdatedLocked()
	s.mu.Unlock()
	if j.hasClient {
		s.sendJSON(r.tgt, "executing", obj{{"node", nil}, {"prompt_id", j.id}})
	}
	s.logf("prompt %s finished: %s", j.id, statusStr)
	return true
}

func (r *run) nodeMeta(id string) obj {
	return obj{{"node_id", id}, {"display_node", id}, {"parent_node", nil}, {"real_node_id", id}}
}

// execNode is execution.execute() for one staged node.
func (r *run) execNode(id string) error {
	s, j := r.s, r.j
	n := j.nodes[id]
	if ce := s.cache[r.sigs[id]]; ce != nil {
		var out any
		if ce.ui != nil {
			out, _ = ce.ui.get("output")
			r.uiOutputs = r.uiOutputs.set(id, ce.ui)
		}
		r.toClient("executed", obj{{"node", id}, {"display_node", id}, {"output", out}, {"prompt_id", j.id}})
		r.finishProgress(id)
		r.outputs[id] = ce.outputs
		return nil
	}
	r.startProgress(id)
	if j.hasClient {
		s.mu.Lock()
		node := id
		s.lastNode = &node
		s.mu.Unlock()
		r.toClient("executing", obj{{"node", id}, {"display_node", id}, {"prompt_id", j.id}})
	}
	if s.takeInterrupt() {
		return errInterrupted
	}
	if s.opts.OnNodeWork != nil {
		s.opts.OnNodeWork(j.id, id)
	}
	c := &nodeCtx{s: s, r: r, job: j, node: n}
	if f := r.fail; f != "" {
		r.fail = ""
		if f == "hang" {
			s.logf("prompt %s: node %s hangs (FailNext)", j.id, id)
			select {
			case <-s.stop:
				return errStopped
			case <-s.intrCh:
				s.interrupted.Store(false)
				return errInterrupted
			}
		}
		return &nodeError{typ: "RuntimeError", msg: "comfytest: injected failure (FailNext(\"error\"))"}
	}
	in := map[string]any{}
	for _, e := range n.inputs {
		if arr, ok := e.V.([]any); ok && len(arr) == 2 {
			from, _ := arr[0].(string)
			slot, _ := arr[1].(json.Number).Int64()
			outs := r.upstream(from)
			if int(slot) < len(outs) {
				in[e.K] = outs[slot]
			}
			continue
		}
		in[e.K] = e.V
	}
	if err := c.work(); err != nil {
		return err
	}
	outs, ui, err := n.def.run(c, in)
	if err != nil {
		return err
	}
	var uiEntry obj
	if len(ui) > 0 {
		uiEntry = obj{{"meta", r.nodeMeta(id)}, {"output", ui}}
		r.uiOutputs = r.uiOutputs.set(id, uiEntry)
		r.toClient("executed", obj{{"node", id}, {"display_node", id}, {"output", ui}, {"prompt_id", j.id}})
	}
	s.cache[r.sigs[id]] = &cacheEntry{outputs: outs, ui: uiEntry}
	r.outputs[id] = outs
	r.finishProgress(id)
	r.executed = append(r.executed, id)
	return nil
}

// upstream is the output of node id: from this run, or from the cache.
func (r *run) upstream(id string) []any {
	if outs, ok := r.outputs[id]; ok {
		return outs
	}
	if ce := r.s.cache[r.sigs[id]]; ce != nil {
		return ce.outputs
	}
	return nil
}

func (r *run) executedList() []any {
	out := make([]any, len(r.executed))
	for i, e := range r.executed {
		out[i] = e
	}
	return out
}

func (r *run) handleError(id string, err error) {
	j := r.j
	class := j.nodes[id].class
	if err == errInterrupted {
		r.s.logf("prompt %s interrupted at node %s", j.id, id)
		r.addMessage("execution_interrupted", obj{
			{"prompt_id", j.id}, {"node_id", id}, {"node_type", class}, {"executed", r.executedList()},
		}, true)
		return
	}
	typ, msg := "RuntimeError", err.Error()
	var ne *nodeError
	if errors.As(err, &ne) {
		typ = ne.typ
	} else if _, ok := err.(pyErr); ok {
		typ = "TypeError"
	}
	inputs := obj{}
	for _, e := range j.nodes[id].inputs {
		var v any = e.V
		if arr, ok := e.V.([]any); ok && len(arr) == 2 {
			if out := r.upstream(pyStr(arr[0])); out != nil {
				v = describeValue(out, arr[1])
			}
		}
		inputs = append(inputs, kv{e.K, []any{v}})
	}
	current := make([]any, len(r.current))
	for i, c := range r.current {
		current[i] = c
	}
	r.s.logf("prompt %s failed at node %s: %s", j.id, id, msg)
	r.addMessage("execution_error", obj{
		{"prompt_id", j.id}, {"node_id", id}, {"node_type", class}, {"executed", r.executedList()},
		{"exception_message", msg}, {"exception_type", typ},
		{"traceback", []any{
			"  File \"/ComfyUI/execution.py\", line 327, in execute\n    output_data, output_ui, has_subgraph = get_output_data(obj, input_data_all, execution_block_cb=execution_block_cb, pre_execute_cb=pre_execute_cb)\n",
			fmt.Sprintf("  File \"comfytest\", line 1, in %s\n", j.nodes[id].class),
		}},
		{"current_inputs", inputs}, {"current_outputs", current},
	}, false)
}

// describeValue renders a linked value for current_inputs (ComfyUI str()s
// tensors).
func describeValue(outs []any, slot any) any {
	num, _ := slot.(json.Number)
	i, _ := num.Int64()
	if int(i) >= len(outs) {
		return nil
	}
	switch t := outs[i].(type) {
	case imgBatch:
		if len(t) == 0 {
			return "tensor([])"
		}
		return fmt.Sprintf("tensor(shape=[%d, %d, %d, 3])", len(t), t[0].Rect.Dy(), t[0].Rect.Dx())
	case maskBatch:
		if len(t) == 0 {
			return "tensor([])"
		}
		return fmt.Sprintf("tensor(shape=[%d, %d, %d])", len(t), t[0].Rect.Dy(), t[0].Rect.Dx())
	}
	return pyStr(outs[i])
}

// takeInterrupt is throw_exception_if_processing_interrupted: it consumes
// a pending interrupt.
func (s *Server) takeInterrupt() bool {
	if !s.interrupted.CompareAndSwap(true, false) {
		return false
	}
	select {
	case <-s.intrCh:
	default:
	}
	return true
}

// ---- progress (2026 progress_state registry + legacy progress hook) ----

func (r *run) progressState() {
	nodes := obj{}
	for _, id := range r.progOrder {
		p := r.prog[id]
		if p.state == "pending" {
			continue
		}
		nodes = append(nodes, kv{id, obj{
			{"value", p.value}, {"max", p.max}, {"state", p.state}, {"node_id", id}, {"prompt_id", r.j.id},
			{"display_node_id", id}, {"parent_node_id", nil}, {"real_node_id", id},
		}})
	}
	r.s.sendJSON(r.tgt, "progress_state", obj{{"prompt_id", r.j.id}, {"nodes", nodes}})
}

func (r *run) entry(id string) *nodeProgress {
	p := r.prog[id]
	if p == nil {
		p = &nodeProgress{state: "pending", value: 0, max: 1}
		r.prog[id] = p
		r.progOrder = append(r.progOrder, id)
	}
	return p
}

func (r *run) startProgress(id string) {
	if !r.s.v2026 {
		return
	}
	p := r.entry(id)
	p.state, p.value, p.max = "running", pyNum{0, true}, pyNum{1, true}
	r.progressState()
}

func (r *run) finishProgress(id string) {
	if !r.s.v2026 {
		return
	}
	p := r.entry(id)
	p.state, p.value = "finished", p.max
	r.progressState()
}

type preview struct {
	format string // "JPEG" or "PNG"
	data   []byte
}

// nodeCtx is what a running node sees.
type nodeCtx struct {
	s    *Server
	r    *run
	job  *job
	node *pnode
}

// work spends one StepDelay of "GPU time". Like real node work it is not
// interruptible; only Close/Kill cut it short.
func (c *nodeCtx) work() error {
	return c.workFor(c.s.opts.StepDelay)
}

// workFor is work of d; d <= 0 only checks that the server still runs.
func (c *nodeCtx) workFor(d time.Duration) error {
	if d <= 0 {
		if c.s.stopped() {
			return errStopped
		}
		return nil
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return nil
	case <-c.s.stop:
		return errStopped
	}
}

// progress is ComfyUI's progress-bar hook: it checks for an interrupt, then
// reports value/max and sends the preview.
func (c *nodeCtx) progress(value, maxv int, pv *preview) error {
	if c.s.takeInterrupt() {
		return errInterrupted
	}
	if c.s.stopped() {
		return errStopped
	}
	r, id := c.r, c.node.id
	meta := r.s.supportsPreviewMetadata(r.tgt)
	if r.s.v2026 {
		p := r.entry(id)
		p.state, p.value, p.max = "running", value, maxv
		r.progressState()
		if pv != nil && meta {
			mime := "image/jpeg"
			if pv.format == "PNG" {
				mime = "image/png"
			}
			m := previewMetaFrame(obj{
				{"node_id", id}, {"prompt_id", r.j.id}, {"display_node_id", id}, {"parent_node_id", nil},
				{"real_node_id", id}, {"image_type", mime},
			}, pv.data)
			m.promptID, m.value = r.j.id, value
			r.s.send(r.tgt, m)
		}
	}
	r.s.sendJSON(r.tgt, "progress", obj{{"value", value}, {"max", maxv}, {"prompt_id", r.j.id}, {"node", id}})
	if pv != nil && !meta {
		format := uint32(1)
		if pv.format == "PNG" {
			format = 2
		}
		m := previewFrame(format, pv.data)
		m.promptID, m.value = r.j.id, value
		r.s.send(r.tgt, m)
	}
	return nil
}

// ---- cache signatures ----

// signatures computes a cache key per node from its class, constant inputs
// and the keys of its linked ancestors (ComfyUI's CacheKeySetInputSignature).
func (s *Server) signatures(j *job) map[string]string {
	sigs := map[string]string{}
	var sig func(id string, depth int) string
	sig = func(id string, depth int) string {
		if v, ok := sigs[id]; ok {
			return v
		}
		n := j.nodes[id]
		if n == nil || depth > 10000 {
			return "missing:" + id
		}
		h := sha256.New()
		fmt.Fprintf(h, "%s\x00", n.class)
		if n.def.alwaysRun {
			fmt.Fprintf(h, "always:%d\x00", time.Now().UnixNano())
			fmt.Fprintf(h, "%s\x00%s\x00", j.id, id)
		}
		if n.def.changed != nil {
			fmt.Fprintf(h, "changed:%s\x00", n.def.changed(s, n))
		}
		keys := make([]string, 0, len(n.inputs))
		for _, e := range n.inputs {
			keys = append(keys, e.K)
		}
		sort.Strings(keys)
		for _, k := range keys {
			v, _ := n.inputs.get(k)
			if arr, ok := v.([]any); ok && len(arr) == 2 {
				if from, ok := arr[0].(string); ok {
					fmt.Fprintf(h, "%s=link(%s,%s)\x00", k, sig(from, depth+1), pyStr(arr[1]))
					continue
				}
			}
			fmt.Fprintf(h, "%s=%s\x00", k, canonicalJSON(v))
		}
		v := fmt.Sprintf("%x", h.Sum(nil))
		sigs[id] = v
		return v
	}
	for _, id := range j.order {
		sig(id, 0)
	}
	return sigs
}

// canonicalJSON renders constants so that 5 and 5.0 compare equal, like
// Python's hash of 5 == 5.0.
func canonicalJSON(v any) string {
	switch t := v.(type) {
	case json.Number:
		if f, err := t.Float64(); err == nil {
			return "n:" + strconv.FormatFloat(f, 'g', -1, 64)
		}
	case obj:
		keys := make([]string, 0, len(t))
		for _, e := range t {
			keys = append(keys, e.K)
		}
		sort.Strings(keys)
		var b strings.Builder
		b.WriteString("{")
		for _, k := range keys {
			x, _ := t.get(k)
			b.WriteString(strconv.Quote(k) + ":" + canonicalJSON(x) + ",")
		}
		return b.String() + "}"
	case []any:
		var b strings.Builder
		b.WriteString("[")
		for _, x := range t {
			b.WriteString(canonicalJSON(x) + ",")
		}
		return b.String() + "]"
	}
	return string(mustJSON(v))
}

// ---- execution order (comfy_execution/graph.py ExecutionList) ----

// orderOutputs orders the output nodes for add_node. ComfyUI iterates a
// Python set (random per process); the fake uses "fewest upstream nodes
// first, then id", which reproduces the recorded traces.
func orderOutputs(j *job) []string {
	anc := func(id string) int {
		seen := map[string]bool{}
		stack := []string{id}
		for len(stack) > 0 {
			x := stack[len(stack)-1]
			stack = stack[:len(stack)-1]
			n := j.nodes[x]
			if n == nil {
				continue
			}
			for _, e := range n.inputs {
				if arr, ok := e.V.([]any); ok && len(arr) == 2 {
					if from, ok := arr[0].(string); ok && !seen[from] {
						seen[from] = true
						stack = append(stack, from)
					}
				}
			}
		}
		return len(seen)
	}
	outs := append([]string{}, j.outputs...)
	counts := map[string]int{}
	for _, o := range outs {
		counts[o] = anc(o)
	}
	sort.SliceStable(outs, func(a, b int) bool {
		if counts[outs[a]] != counts[outs[b]] {
			return counts[outs[a]] < counts[outs[b]]
		}
		return idLess(outs[a], outs[b])
	})
	return outs
}

func idLess(a, b string) bool {
	ai, ea := strconv.Atoi(a)
	bi, eb := strconv.Atoi(b)
	if ea == nil && eb == nil {
		return ai < bi
	}
	if (ea == nil) != (eb == nil) {
		return ea == nil
	}
	return a < b
}

type execList struct {
	j          *job
	cached     func(string) bool
	pending    []string
	inPending  map[string]bool
	blockCount map[string]int
	blocking   map[string][]string
}

func newExecList(j *job, cached func(string) bool) *execList {
	return &execList{j: j, cached: cached, inPending: map[string]bool{}, blockCount: map[string]int{}, blocking: map[string][]string{}}
}

func (l *execList) empty() bool { return len(l.pending) == 0 }

func (l *execList) addNode(start string) {
	stack := []string{start}
	type link struct{ from, to string }
	var links []link
	for len(stack) > 0 {
		id := stack[len(stack)-1]
		stack = stack[:len(stack)-1]
		if l.inPending[id] {
			continue
		}
		l.inPending[id] = true
		l.pending = append(l.pending, id)
		l.blockCount[id] = 0
		l.blocking[id] = nil
		for _, e := range l.j.nodes[id].inputs {
			if arr, ok := e.V.([]any); ok && len(arr) == 2 {
				from, _ := arr[0].(string)
				if !l.cached(from) {
					stack = append(stack, from)
					links = append(links, link{from, id})
				}
			}
		}
	}
	for _, k := range links {
		l.addStrongLink(k.from, k.to)
	}
}

func (l *execList) addStrongLink(from, to string) {
	if l.cached(from) {
		return
	}
	l.addNode(from)
	if !contains(l.blocking[from], to) {
		l.blocking[from] = append(l.blocking[from], to)
		l.blockCount[to]++
	}
}

func (l *execList) isOutput(id string) bool { return l.j.nodes[id].def.outputNode }

// stage is ux_friendly_pick_node over the ready nodes.
func (l *execList) stage() string {
	var ready []string
	for _, id := range l.pending {
		if l.blockCount[id] == 0 {
			ready = append(ready, id)
		}
	}
	if len(ready) == 0 {
		// A cycle: cannot happen for validated prompts of these node types
		// (validation would have recursed forever in ComfyUI too).
		return l.pending[0]
	}
	for _, id := range ready {
		if l.isOutput(id) {
			return id
		}
	}
	for _, id := range ready {
		for _, b := range l.blocking[id] {
			if l.isOutput(b) {
				return id
			}
		}
	}
	for _, id := range ready {
		for _, b := range l.blocking[id] {
			for _, b1 := range l.blocking[b] {
				if l.isOutput(b1) {
					return id
				}
			}
		}
	}
	return ready[0]
}

func (l *execList) complete(id string) {
	for i, p := range l.pending {
		if p == id {
			l.pending = append(l.pending[:i:i], l.pending[i+1:]...)
			break
		}
	}
	delete(l.inPending, id)
	for _, b := range l.blocking[id] {
		l.blockCount[b]--
	}
	delete(l.blocking, id)
	delete(l.blockCount, id)
}

func sha256sum(b []byte) []byte {
	h := sha256.Sum256(b)
	return h[:]
}
