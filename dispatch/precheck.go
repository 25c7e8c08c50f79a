package dispatch

import (
	"context"
	"encoding/json"
	"fmt"
	"sort"
	"strings"
	"sync"
	"time"
	"unicode/utf8"

	"go.uber.org/zap"

	"github.com/comfyume/comfyume/comfy"
)

// A pool's install (its /object_info: node classes and the model files in
// their COMBO inputs) is cached, so a prompt that needs a node or model the
// pool lacks is refused at once, with the 400 the frontend uses to mark the
// node red, instead of waiting minutes for a cold start to learn it.

// objectInfoTTL is how long a pool's /object_info is trusted.
const objectInfoTTL = 5 * time.Minute

// installRecheck is how often a pool never seen warm here looks for an
// install another gateway kept in the store.
const installRecheck = 10 * time.Second

// objectInfoFetchTimeout bounds reading an endpoint's /object_info, or
// the pool's last known install from the store.
const objectInfoFetchTimeout = 5 * time.Second

// prechecker owns checking prompts against what their pool has installed
// (its node classes and their COMBO options) before they are queued: the
// install read from a pool's endpoints, cached on the Pool, and kept in
// the store for the pool's cold spells. It points down to the store's
// InstallStore only.
type prechecker struct {
	store  InstallStore // nil: installs are not kept
	logger *zap.Logger
}

// installInfo is a pool's cached install.
type installInfo struct {
	mu      sync.Mutex
	classes map[string]classInfo
	fetched time.Time
	// stored: classes are the last known install read from the store (no
	// endpoint answered), at loaded.
	stored bool
	loaded time.Time
}

type classInfo struct {
	// combos maps an input name to its allowed values (COMBO inputs only).
	combos map[string]combo
}

// combo is one COMBO input's allowed values, with a set for long lists
// (a checkpoint folder may hold thousands of files).
type combo struct {
	list []string
	set  map[string]struct{}
}

func newCombo(list []string) combo {
	c := combo{list: list}
	if len(list) > comboListShown {
		c.set = make(map[string]struct{}, len(list))
		for _, v := range list {
			c.set[v] = struct{}{}
		}
	}
	return c
}

func (c combo) has(v string) bool {
	if c.set != nil {
		_, ok := c.set[v]
		return ok
	}
	return contains(c.list, v)
}

// install returns the pool's cached install, refreshing it from a healthy
// endpoint when stale (and keeping it in the store). When no endpoint
// answers, it is the last one known here or, for a pool not seen warm by
// this gateway (a restart, another replica), the last one kept in the
// store. nil means unknown (never seen warm): no check.
func (c *prechecker) install(ctx context.Context, p *Pool) map[string]classInfo {
	p.mu.Lock()
	if p.info == nil {
		p.info = &installInfo{}
	}
	info := p.info
	p.mu.Unlock()
	info.mu.Lock()
	defer info.mu.Unlock()
	if info.classes != nil && !info.stored && time.Since(info.fetched) < objectInfoTTL {
		return info.classes
	}
	for _, u := range p.Upstreams {
		if !u.Healthy() {
			continue
		}
		cctx, cancel := context.WithTimeout(ctx, objectInfoFetchTimeout)
		classes, err := fetchObjectInfo(cctx, u)
		cancel()
		if err != nil {
			continue
		}
		info.classes, info.fetched, info.stored = classes, time.Now(), false
		c.keepInstall(p.Name, classes)
		return classes
	}
	if info.classes == nil && time.Since(info.loaded) >= installRecheck || info.stored && time.Since(info.loaded) >= objectInfoTTL {
		// Another gateway may have seen the pool warm since.
		if classes := c.lastInstall(ctx, p.Name); classes != nil {
			info.classes, info.stored = classes, true
		}
		info.loaded = time.Now()
	}
	return info.classes // stale is better than nothing
}

// comboOptions reads a COMBO input spec: [["a","b"], {...}] or the newer
// ["COMBO", {"options": ["a","b"]}].
func comboOptions(spec json.RawMessage) ([]string, bool) {
	var parts []json.RawMessage
	if json.Unmarshal(spec, &parts) != nil || len(parts) == 0 {
		return nil, false
	}
	var list []string
	if json.Unmarshal(parts[0], &list) == nil {
		return list, true
	}
	var typ string
	if json.Unmarshal(parts[0], &typ) == nil && typ == "COMBO" && len(parts) > 1 {
		var opts struct {
			Options []string `json:"options"`
		}
		if json.Unmarshal(parts[1], &opts) == nil && opts.Options != nil {
			return opts.Options, true
		}
	}
	return nil, false
}

// precheck refuses a prompt that needs what the pool does not have. File
// inputs the gateway forwards (LoadImage...) are not checked: their files
// are uploaded with the prompt. It takes time linear in the prompt's size,
// and its answer is bounded (see nodeErrors).
func (c *prechecker) check(ctx context.Context, p *Pool, pr *comfy.PromptRequest) error {
	classes := c.install(ctx, p)
	if classes == nil {
		return nil
	}
	ids := make([]string, 0, len(pr.Prompt))
	for id := range pr.Prompt {
		ids = append(ids, id)
	}
	sort.Strings(ids)
	ne := newNodeErrors(pr.Prompt)
	for _, id := range ids {
		n := pr.Prompt[id]
		ci, ok := classes[n.ClassType]
		if !ok {
			title := n.ClassType
			var meta struct {
				Title string `json:"title"`
			}
			if json.Unmarshal(n.Meta, &meta) == nil && meta.Title != "" {
				title = meta.Title
			}
			pe := comfy.NewPromptError("missing_node_type",
				fmt.Sprintf("Cannot execute because node %s does not exist.", shown(n.ClassType)), fmt.Sprintf("Node ID '#%s'", shown(id)))
			pe.Error.ExtraInfo = map[string]any{"node_id": shown(id), "class_type": shown(n.ClassType), "node_title": shown(title)}
			pe.NodeErrors = json.RawMessage("[]")
			return &RejectedError{Status: 400, Body: pe.JSON()}
		}
		fi, hasFile := fileInputs[n.ClassType]
		names := make([]string, 0, len(n.Inputs))
		for name := range n.Inputs {
			names = append(names, name)
		}
		sort.Strings(names)
		var errs []nodeError
		for _, name := range names {
			allowed, isCombo := ci.combos[name]
			if !isCombo || (hasFile && fi.input == name) {
				continue
			}
			var v string
			if json.Unmarshal(n.Inputs[name], &v) != nil {
				continue // a link, or not a string
			}
			if annotated(v) || allowed.has(v) {
				continue
			}
			errs = append(errs, nodeError{
				typ: "value_not_in_list", message: "Value not in list",
				details: fmt.Sprintf("%s: '%s' not in %s", shown(name), shown(v), listInfo(allowed.list)),
				input:   name, value: v, hasValue: true,
			})
		}
		ne.add(id, n.ClassType, errs)
	}
	return ne.rejected()
}

// Bounds of a validation error's body. A prompt of thousands of failing
// nodes is answered with the first ones: the frontend marks them red, the
// details end with how many more there are.
const (
	// maxNodeErrors is how many failing nodes node_errors names.
	maxNodeErrors = 50
	// comboListShown is the longest list of allowed values a message
	// prints; longer ones are shown as "(list of length N)", as ComfyUI
	// does.
	comboListShown = 20
	// maxShown bounds each user-supplied string an error repeats.
	maxShown = 256
	// maxDependentOutputs bounds each node's dependent_outputs.
	maxDependentOutputs = 20
)

// nodeError is one entry of a node's "errors".
type nodeError struct {
	typ, message, details string
	input                 string
	value                 string
	hasValue              bool
}

// nodeErrors collects a prompt's validation errors into ComfyUI's 400
// (prompt_outputs_failed_validation), keeping the first maxNodeErrors
// failing nodes and counting the rest.
type nodeErrors struct {
	prompt  map[string]comfy.Node
	nodes   map[string]any
	details []string
	omitted int
	users   map[string][]string // node id → nodes taking its output
}

func newNodeErrors(prompt map[string]comfy.Node) *nodeErrors {
	return &nodeErrors{prompt: prompt, nodes: map[string]any{}}
}

// add records a node's errors (none: nothing). Call it in a stable order
// (sorted node ids): the first nodes are the ones named.
func (e *nodeErrors) add(id, classType string, errs []nodeError) {
	if len(errs) == 0 {
		return
	}
	if len(e.nodes) >= maxNodeErrors {
		e.omitted++
		return
	}
	list := make([]any, 0, len(errs))
	for _, x := range errs {
		extra := map[string]any{"input_name": shown(x.input)}
		if x.hasValue {
			extra["received_value"] = shown(x.value)
		}
		list = append(list, map[string]any{"type": x.typ, "message": x.message, "details": x.details, "extra_info": extra})
		e.details = append(e.details, x.details)
	}
	e.nodes[id] = map[string]any{"errors": list, "dependent_outputs": e.dependentOutputs(id), "class_type": shown(classType)}
}

// rejected is the 400 for the errors added, or nil when there are none.
func (e *nodeErrors) rejected() error {
	if len(e.nodes) == 0 {
		return nil
	}
	details := e.details
	pe := comfy.NewPromptError("prompt_outputs_failed_validation", "Prompt outputs failed validation", "")
	if e.omitted > 0 {
		details = append(details[:len(details):len(details)], fmt.Sprintf("(and %d more nodes with errors)", e.omitted))
		pe.Error.ExtraInfo["omitted_node_errors"] = e.omitted
	}
	pe.Error.Details = strings.Join(details, "\n")
	pe.NodeErrors, _ = json.Marshal(e.nodes)
	return &RejectedError{Status: 400, Body: pe.JSON()}
}

// dependentOutputs lists the output nodes (nodes whose output nobody
// takes) that depend on id, itself included, up to maxDependentOutputs.
// The graph's reverse links are built once, on the first call.
func (e *nodeErrors) dependentOutputs(id string) []string {
	if e.users == nil {
		e.users = map[string][]string{}
		for uid, n := range e.prompt {
			for _, raw := range n.Inputs {
				if src, ok := comfy.LinkSource(raw); ok {
					e.users[src] = append(e.users[src], uid)
				}
			}
		}
	}
	out := []string{}
	seen := map[string]bool{id: true}
	queue := []string{id}
	for len(queue) > 0 && len(out) < maxDependentOutputs {
		cur := queue[0]
		queue = queue[1:]
		users := e.users[cur]
		if len(users) == 0 {
			out = append(out, shown(cur))
			continue
		}
		for _, u := range users {
			if !seen[u] {
				seen[u] = true
				queue = append(queue, u)
			}
		}
	}
	sort.Strings(out)
	return out
}

// shown shortens a user-supplied string an error message repeats.
func shown(s string) string {
	if len(s) <= maxShown {
		return s
	}
	cut := maxShown
	for cut > 0 && !utf8.RuneStart(s[cut]) {
		cut--
	}
	return s[:cut] + "…"
}

// listInfo prints allowed values the way ComfyUI's "not in" message does:
// the list itself, or "(list of length N)" beyond comboListShown items.
func listInfo(list []string) string {
	if len(list) > comboListShown {
		return fmt.Sprintf("(list of length %d)", len(list))
	}
	return pyList(list)
}

func contains(list []string, v string) bool {
	for _, x := range list {
		if x == v {
			return true
		}
	}
	return false
}

// pyList formats a list the way ComfyUI's messages show it: ['a', 'b'].
func pyList(list []string) string {
	q := make([]string, len(list))
	for i, s := range list {
		q[i] = "'" + shown(s) + "'"
	}
	return "[" + strings.Join(q, ", ") + "]"
}
