package dispatch

import (
	"context"
	"encoding/json"
	"fmt"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/comfyume/comfyume/comfy"
)

// A pool's install (its /object_info: node classes and the model files in
// their COMBO inputs) is cached, so a prompt that needs a node or model the
// pool lacks is refused at once, with the 400 the frontend uses to mark the
// node red, instead of waiting minutes for a cold start to learn it.

// objectInfoTTL is how long a pool's /object_info is trusted.
const objectInfoTTL = 5 * time.Minute

type installInfo struct {
	mu      sync.Mutex
	classes map[string]classInfo
	fetched time.Time
}

type classInfo struct {
	// combos maps an input name to its allowed values (COMBO inputs only).
	combos map[string][]string
}

// install returns the pool's cached install, refreshing it from a healthy
// endpoint when stale. nil means unknown (no endpoint answered): no check.
func (m *Manager) install(ctx context.Context, p *Pool) map[string]classInfo {
	p.mu.Lock()
	if p.info == nil {
		p.info = &installInfo{}
	}
	info := p.info
	p.mu.Unlock()
	info.mu.Lock()
	defer info.mu.Unlock()
	if info.classes != nil && time.Since(info.fetched) < objectInfoTTL {
		return info.classes
	}
	for _, u := range p.Upstreams {
		if !u.Healthy() {
			continue
		}
		cctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		var raw map[string]struct {
			Input map[string]map[string]json.RawMessage `json:"input"`
		}
		err := u.GetJSON(cctx, "/object_info", &raw)
		cancel()
		if err != nil {
			continue
		}
		classes := make(map[string]classInfo, len(raw))
		for name, def := range raw {
			ci := classInfo{combos: map[string][]string{}}
			for _, group := range def.Input {
				for in, spec := range group {
					if opts, ok := comboOptions(spec); ok {
						ci.combos[in] = opts
					}
				}
			}
			classes[name] = ci
		}
		info.classes, info.fetched = classes, time.Now()
		return classes
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
// are uploaded with the prompt.
func (m *Manager) precheck(ctx context.Context, p *Pool, pr *comfy.PromptRequest) error {
	classes := m.install(ctx, p)
	if classes == nil {
		return nil
	}
	ids := make([]string, 0, len(pr.Prompt))
	for id := range pr.Prompt {
		ids = append(ids, id)
	}
	sort.Strings(ids)
	nodeErrors := map[string]any{}
	var details []string
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
				fmt.Sprintf("Cannot execute because node %s does not exist.", n.ClassType), fmt.Sprintf("Node ID '#%s'", id))
			pe.Error.ExtraInfo = map[string]any{"node_id": id, "class_type": n.ClassType, "node_title": title}
			pe.NodeErrors = json.RawMessage("[]")
			return &RejectedError{Status: 400, Body: pe.JSON()}
		}
		fi, hasFile := fileInputs[n.ClassType]
		var errs []any
		for name, raw := range n.Inputs {
			allowed, isCombo := ci.combos[name]
			if !isCombo || (hasFile && fi.input == name) {
				continue
			}
			var v string
			if json.Unmarshal(raw, &v) != nil {
				continue // a link, or not a string
			}
			if annotated(v) || contains(allowed, v) {
				continue
			}
			detail := fmt.Sprintf("%s: '%s' not in %s", name, v, pyList(allowed))
			details = append(details, detail)
			errs = append(errs, map[string]any{
				"type": "value_not_in_list", "message": "Value not in list", "details": detail,
				"extra_info": map[string]any{"input_name": name, "received_value": v},
			})
		}
		if len(errs) > 0 {
			nodeErrors[id] = map[string]any{"errors": errs, "dependent_outputs": sinkNodes(pr.Prompt), "class_type": n.ClassType}
		}
	}
	if len(nodeErrors) == 0 {
		return nil
	}
	pe := comfy.NewPromptError("prompt_outputs_failed_validation", "Prompt outputs failed validation", strings.Join(details, "\n"))
	pe.NodeErrors, _ = json.Marshal(nodeErrors)
	return &RejectedError{Status: 400, Body: pe.JSON()}
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
		q[i] = "'" + s + "'"
	}
	return "[" + strings.Join(q, ", ") + "]"
}
