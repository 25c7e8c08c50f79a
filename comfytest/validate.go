package comfytest

import (
	"encoding/json"
	"fmt"
	"math"
	"strconv"
	"strings"
)

// validation is the outcome of ComfyUI's validate_prompt.
type validation struct {
	ok         bool
	err        any // error object for the 400 body
	nodeErrors any // obj, or [] for prompt-level errors
	outputs    []string
	nodes      map[string]*pnode
	order      []string
}

func promptError(typ, msg, details string) obj {
	return obj{{"type", typ}, {"message", msg}, {"details", details}, {"extra_info", obj{}}}
}

// pyException stands for a Python exception raised while validating.
type pyException struct {
	typ string // full type name, e.g. "KeyError"
	msg string // str(ex)
}

type vresult struct {
	valid   bool
	reasons []any
}

type validator struct {
	s         *Server
	nodes     map[string]*pnode
	validated map[string]vresult
	vorder    []string
	visiting  map[string]bool
}

func (v *validator) record(id string, r vresult) {
	if _, ok := v.validated[id]; !ok {
		v.vorder = append(v.vorder, id)
	}
	v.validated[id] = r
}

func (s *Server) validatePrompt(prompt obj, partial []string) validation {
	res := validation{nodes: map[string]*pnode{}}
	var outputs []string
	for _, e := range prompt {
		no, _ := e.V.(obj)
		ctv, hasCT := no.get("class_type")
		if !hasCT {
			res.err = promptError("invalid_prompt", "Cannot execute because a node is missing the class_type property.", fmt.Sprintf("Node ID '#%s'", e.K))
			res.nodeErrors = []any{}
			return res
		}
		class := pyStr(ctv)
		def := nodeDefs[class]
		if _, isStr := ctv.(string); !isStr || def == nil {
			res.err = promptError("invalid_prompt", fmt.Sprintf("Cannot execute because node %s does not exist.", class), fmt.Sprintf("Node ID '#%s'", e.K))
			res.nodeErrors = []any{}
			return res
		}
		inputs, _ := no.get("inputs")
		io, _ := inputs.(obj)
		if inputs != nil && io == nil {
			io = obj{}
		}
		res.nodes[e.K] = &pnode{id: e.K, class: class, inputs: io, def: def}
		res.order = append(res.order, e.K)
		if def.outputNode && (partial == nil || contains(partial, e.K)) {
			outputs = append(outputs, e.K)
		}
	}
	if len(outputs) == 0 {
		res.err = promptError("prompt_no_outputs", "Prompt has no outputs", "")
		res.nodeErrors = []any{}
		return res
	}

	v := &validator{s: s, nodes: res.nodes, validated: map[string]vresult{}, visiting: map[string]bool{}}
	type nodeErr struct {
		errors []any
		deps   []any
		class  string
	}
	nodeErrs := map[string]*nodeErr{}
	var nodeErrOrder []string
	type outErr struct {
		o       string
		reasons []any
	}
	var errs []outErr
	var good []string
	for _, o := range outputs {
		valid, reasons, exc := v.validateInputs(o)
		if exc != nil {
			valid = false
			reasons = []any{obj{
				{"type", "exception_during_validation"},
				{"message", "Exception when validating node"},
				{"details", exc.msg},
				{"extra_info", obj{{"exception_type", exc.typ}, {"traceback", fakeTraceback("validate_inputs")}}},
			}}
			v.record(o, vresult{false, reasons})
		}
		if valid {
			good = append(good, o)
			continue
		}
		errs = append(errs, outErr{o, reasons})
		for _, id := range v.vorder {
			r := v.validated[id]
			if !r.valid && len(r.reasons) > 0 {
				ne := nodeErrs[id]
				if ne == nil {
					ne = &nodeErr{errors: r.reasons, deps: []any{}, class: res.nodes[id].class}
					nodeErrs[id] = ne
					nodeErrOrder = append(nodeErrOrder, id)
				}
				ne.deps = append(ne.deps, o)
			}
		}
	}
	ne := obj{}
	for _, id := range nodeErrOrder {
		e := nodeErrs[id]
		ne = append(ne, kv{id, obj{{"errors", e.errors}, {"dependent_outputs", e.deps}, {"class_type", e.class}}})
	}
	res.nodeErrors = ne
	if len(good) == 0 {
		var lines []string
		for _, e := range errs {
			for _, r := range e.reasons {
				ro := r.(obj)
				m, _ := ro.get("message")
				d, _ := ro.get("details")
				lines = append(lines, fmt.Sprintf("%s: %s", m, d))
			}
		}
		res.err = promptError("prompt_outputs_failed_validation", "Prompt outputs failed validation", strings.Join(lines, "\n"))
		return res
	}
	res.ok = true
	res.outputs = good
	return res
}

func contains(list []string, x string) bool {
	for _, e := range list {
		if e == x {
			return true
		}
	}
	return false
}

func fakeTraceback(fn string) []any {
	return []any{fmt.Sprintf("  File \"comfytest\", line 1, in %s\n", fn)}
}

func reason(typ, msg, details string, extra obj) obj {
	return obj{{"type", typ}, {"message", msg}, {"details", details}, {"extra_info", extra}}
}

func (v *validator) validateInputs(id string) (bool, []any, *pyException) {
	if r, ok := v.validated[id]; ok {
		return r.valid, r.reasons, nil
	}
	if v.visiting[id] {
		return false, nil, &pyException{"RecursionError", "maximum recursion depth exceeded"}
	}
	v.visiting[id] = true
	defer delete(v.visiting, id)
	n := v.nodes[id]
	if n.inputs == nil {
		return false, nil, &pyException{"KeyError", "'inputs'"}
	}
	def := n.def
	errors := []any{}
	valid := true
	for _, d := range def.required {
		if !n.inputs.has(d.name) {
			errors = append(errors, reason("required_input_missing", "Required input is missing", d.name, obj{{"input_name", d.name}}))
		}
	}
	for _, d := range def.allInputs() {
		val, ok := n.inputs.get(d.name)
		if !ok {
			continue
		}
		info := d.info(v.s)
		if arr, isLink := val.([]any); isLink {
			if len(arr) != 2 {
				errors = append(errors, reason("bad_linked_input", "Bad linked input, must be a length-2 list of [node_id, slot_index]", d.name,
					obj{{"input_name", d.name}, {"input_config", info}, {"received_value", val}}))
				continue
			}
			oid, isStr := arr[0].(string)
			on := v.nodes[oid]
			if !isStr || on == nil {
				return false, nil, &pyException{"KeyError", pyRepr(arr[0])}
			}
			slot, err := pyIndex(arr[1], len(on.def.outputs))
			if err != nil {
				return false, nil, err
			}
			received := on.def.outputs[slot]
			if !typesMatch(received, d.typ) {
				errors = append(errors, reason("return_type_mismatch", "Return type mismatch between linked nodes",
					fmt.Sprintf("%s, received_type(%s) mismatch input_type(%s)", d.name, received, d.typ),
					obj{{"input_name", d.name}, {"input_config", info}, {"received_type", received}, {"linked_node", val}}))
				continue
			}
			rv, _, rexc := v.validateInputs(oid)
			if rexc != nil {
				valid = false
				v.record(oid, vresult{false, []any{reason("exception_during_inner_validation", "Exception when validating inner node", rexc.msg,
					obj{{"input_name", d.name}, {"input_config", info}, {"exception_message", rexc.msg}, {"exception_type", rexc.typ},
						{"traceback", fakeTraceback("validate_inputs")}, {"linked_node", val}})}})
				continue
			}
			if !rv {
				valid = false
			}
			continue
		}
		var num float64
		switch d.typ {
		case "INT":
			i, err := pyInt(val)
			if err != nil {
				errors = append(errors, reason("invalid_input_type", "Failed to convert an input value to a INT value",
					fmt.Sprintf("%s, %s, %s", d.name, pyStr(val), err), obj{{"input_name", d.name}, {"input_config", info}, {"received_value", val}, {"exception_message", err.Error()}}))
				continue
			}
			num = float64(i)
		case "FLOAT":
			f, err := pyFloatConv(val)
			if err != nil {
				errors = append(errors, reason("invalid_input_type", "Failed to convert an input value to a FLOAT value",
					fmt.Sprintf("%s, %s, %s", d.name, pyStr(val), err), obj{{"input_name", d.name}, {"input_config", info}, {"received_value", val}, {"exception_message", err.Error()}}))
				continue
			}
			num = f
		}
		if d.typ == "INT" || d.typ == "FLOAT" {
			shown := pyStr(intOrFloat(num, d.typ == "FLOAT"))
			if d.min != nil && num < d.min.f {
				errors = append(errors, reason("value_smaller_than_min", fmt.Sprintf("Value %s smaller than min of %s", shown, d.min), d.name,
					obj{{"input_name", d.name}, {"input_config", info}, {"received_value", val}}))
				continue
			}
			if d.max != nil && num > d.max.f {
				errors = append(errors, reason("value_bigger_than_max", fmt.Sprintf("Value %s bigger than max of %s", shown, d.max), d.name,
					obj{{"input_name", d.name}, {"input_config", info}, {"received_value", val}}))
				continue
			}
		}
		if d.typ == "COMBO" && d.validate == nil {
			list := d.combo(v.s)
			sv, _ := val.(string)
			if !contains(list, sv) {
				errors = append(errors, reason("value_not_in_list", "Value not in list", fmt.Sprintf("%s: '%s' not in %s", d.name, pyStr(val), pyList(list)),
					obj{{"input_name", d.name}, {"input_config", info}, {"received_value", val}}))
				continue
			}
		}
	}
	// VALIDATE_INPUTS-style checks (after the per-input loop, like ComfyUI).
	for _, d := range def.allInputs() {
		if d.validate == nil {
			continue
		}
		val, ok := n.inputs.get(d.name)
		if !ok {
			continue
		}
		if _, isLink := val.([]any); isLink {
			continue
		}
		if msg, ok := d.validate(v.s, val); !ok {
			errors = append(errors, reason("custom_validation_failed", "Custom validation failed for node", d.name+" - "+msg, obj{{"input_name", d.name}}))
		}
	}
	r := vresult{valid: valid && len(errors) == 0, reasons: []any{}}
	if !r.valid {
		r.reasons = errors
	}
	v.record(id, r)
	return r.valid, r.reasons, nil
}

func intOrFloat(f float64, isFloat bool) any {
	if isFloat {
		return f
	}
	return int64(f)
}

func typesMatch(received, want string) bool {
	if received == want || received == "*" || want == "*" {
		return true
	}
	rs := strings.Split(received, ",")
	ws := strings.Split(want, ",")
	for _, r := range rs {
		for _, w := range ws {
			if strings.TrimSpace(r) == strings.TrimSpace(w) {
				return true
			}
		}
	}
	return false
}

func pyRepr(v any) string {
	switch t := v.(type) {
	case string:
		return "'" + t + "'"
	case obj, []any:
		return string(mustJSON(v))
	}
	return pyStr(v)
}

func pyList(list []string) string {
	parts := make([]string, len(list))
	for i, x := range list {
		parts[i] = "'" + x + "'"
	}
	return "[" + strings.Join(parts, ", ") + "]"
}

// pyIndex is RETURN_TYPES[idx] in Python.
func pyIndex(v any, n int) (int, *pyException) {
	num, ok := v.(json.Number)
	if !ok {
		return 0, &pyException{"TypeError", fmt.Sprintf("tuple indices must be integers or slices, not %s", pyTypeName(v))}
	}
	i, err := num.Int64()
	if err != nil {
		return 0, &pyException{"TypeError", "tuple indices must be integers or slices, not float"}
	}
	if i < 0 {
		i += int64(n)
	}
	if i < 0 || i >= int64(n) {
		return 0, &pyException{"IndexError", "tuple index out of range"}
	}
	return int(i), nil
}

func pyTypeName(v any) string {
	switch t := v.(type) {
	case nil:
		return "NoneType"
	case string:
		return "str"
	case bool:
		return "bool"
	case json.Number:
		if _, err := t.Int64(); err == nil {
			return "int"
		}
		return "float"
	case obj:
		return "dict"
	case []any:
		return "list"
	}
	return fmt.Sprintf("%T", v)
}

type pyErr string

func (e pyErr) Error() string { return string(e) }

// pyInt is Python's int(x) for a JSON value.
func pyInt(v any) (int64, error) {
	switch t := v.(type) {
	case json.Number:
		if i, err := t.Int64(); err == nil {
			return i, nil
		}
		f, err := t.Float64()
		if err != nil || math.IsInf(f, 0) || math.IsNaN(f) {
			return 0, pyErr("cannot convert float infinity to integer")
		}
		return int64(f), nil
	case string:
		s := strings.ReplaceAll(strings.TrimSpace(t), "_", "")
		i, err := strconv.ParseInt(s, 10, 64)
		if err != nil {
			return 0, pyErr(fmt.Sprintf("invalid literal for int() with base 10: '%s'", t))
		}
		return i, nil
	case bool:
		if t {
			return 1, nil
		}
		return 0, nil
	case float64:
		return int64(t), nil
	case int64:
		return t, nil
	case int:
		return int64(t), nil
	}
	return 0, pyErr(fmt.Sprintf("int() argument must be a string, a bytes-like object or a real number, not '%s'", pyTypeName(v)))
}

// pyFloatConv is Python's float(x) for a JSON value.
func pyFloatConv(v any) (float64, error) {
	switch t := v.(type) {
	case string:
		f, err := strconv.ParseFloat(strings.TrimSpace(t), 64)
		if err != nil {
			return 0, pyErr(fmt.Sprintf("could not convert string to float: '%s'", t))
		}
		return f, nil
	case float64:
		return t, nil
	case int64:
		return float64(t), nil
	case int:
		return float64(t), nil
	}
	if f, ok := pyFloatArg(v); ok {
		return f, nil
	}
	return 0, pyErr(fmt.Sprintf("float() argument must be a string or a real number, not '%s'", pyTypeName(v)))
}
