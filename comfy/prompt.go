package comfy

import (
	"bytes"
	"encoding/json"
	"fmt"
	"slices"
	"sort"
	"strings"
)

// PromptRequest is the body of POST /prompt. Fields the gateway does not
// interpret are kept in Raw so they reach the upstream unchanged.
type PromptRequest struct {
	// Raw holds every top-level key of the body as sent.
	Raw map[string]json.RawMessage
	// Prompt is the API-format graph: node id → node.
	Prompt map[string]Node
	// ClientID is the browser's WebSocket sid ("" if none).
	ClientID string
	// PromptID is a client-supplied id ("" if none).
	PromptID string
	// ExtraData is passed through to the server (may be nil).
	ExtraData map[string]json.RawMessage
	// Front asks for the front of the queue.
	Front bool
	// Number is an explicit priority, if the client gave one.
	Number *float64
}

// Node is one node of an API-format prompt. Inputs keep their raw JSON so a
// relayed prompt is byte-for-byte what the client sent, except where the
// gateway rewrites an input value.
type Node struct {
	ClassType string                     `json:"class_type"`
	Inputs    map[string]json.RawMessage `json:"inputs"`
	Meta      json.RawMessage            `json:"_meta,omitempty"`
	// Other keys of the node object.
	Extra map[string]json.RawMessage `json:"-"`
}

// MaxClientID is the longest client_id (a browser's WebSocket sid) taken,
// in bytes. ComfyUI's frontend sends 32 hex digits and API clients a UUID;
// a job keeps its client_id for as long as the job is kept, and sessions
// are looked up by it.
const MaxClientID = 256

// MaxPromptKeys bounds the keys of a POST /prompt body that the gateway
// decodes: the body's own, extra_data's, the prompt's nodes, each node's
// and each node's inputs'. Decoded, a key costs many times its bytes in the
// body (20 MiB of tiny nodes took 360 MiB); the largest real workflows
// have a few thousand.
const MaxPromptKeys = 100_000

func tooManyKeys() *BodyError {
	return &BodyError{Status: 400, Body: NewPromptError("invalid_prompt", "The prompt is too large",
		fmt.Sprintf("more than %d nodes, inputs and keys; the gateway takes at most %d", MaxPromptKeys, MaxPromptKeys))}
}

// BodyError says why a POST /prompt body was refused. Status is the HTTP
// status ComfyUI would use and Body is what it would send.
type BodyError struct {
	Status int
	Body   PromptError
}

func (e *BodyError) Error() string { return e.Body.Error.Message }

// ParsePromptRequest decodes and checks a POST /prompt body.
func ParsePromptRequest(body []byte) (*PromptRequest, *BodyError) {
	// One validating pass that splits the body as it goes, without
	// decoding the values (extra_data holds the UI workflow: often
	// megabytes). Only a refused body is looked at again, for the error.
	raw, extra, keys, ok := splitPromptBody(body, MaxPromptKeys)
	if keys > MaxPromptKeys {
		return nil, tooManyKeys()
	}
	if !ok {
		if !json.Valid(body) {
			var v any
			err := json.Unmarshal(body, &v)
			return nil, &BodyError{Status: 400, Body: NewPromptError("invalid_json",
				"The request body is not a JSON object", errString(err, "expected a JSON object"))}
		}
		return nil, &BodyError{Status: 400, Body: NewPromptError("invalid_json",
			"The request body is not a JSON object", "expected a JSON object")}
	}
	pr := &PromptRequest{Raw: raw}
	p, ok := raw["prompt"]
	if !ok || isNull(p) {
		pe := NewPromptError("no_prompt", "No prompt provided", "")
		return nil, &BodyError{Status: 400, Body: pe}
	}
	if promptKeys(p, MaxPromptKeys-keys) > MaxPromptKeys-keys {
		return nil, tooManyKeys()
	}
	nodes, ok := ObjectMembers(p)
	if !ok {
		var m map[string]json.RawMessage
		err := json.Unmarshal(p, &m)
		return nil, &BodyError{Status: 400, Body: NewPromptError("invalid_prompt",
			"Prompt must be an object of nodes", errString(err, "prompt is not an object"))}
	}
	pr.Prompt = make(map[string]Node, len(nodes))
	for _, nm := range nodes {
		n, err := parseNode(nm.Value)
		if err != nil {
			pe := NewPromptError("invalid_prompt",
				"Cannot execute because a node is missing the class_type property.",
				"Node ID '#"+nm.Key+"'")
			return nil, &BodyError{Status: 400, Body: pe}
		}
		pr.Prompt[nm.Key] = n
	}
	if v, ok := raw["client_id"]; ok {
		_ = json.Unmarshal(v, &pr.ClientID)
		if len(pr.ClientID) > MaxClientID {
			return nil, &BodyError{Status: 400, Body: NewPromptError("invalid_prompt",
				"client_id is too long", fmt.Sprintf("client_id has %d bytes; the limit is %d", len(pr.ClientID), MaxClientID))}
		}
	}
	if v, ok := raw["prompt_id"]; ok && !isNull(v) {
		var s string
		if json.Unmarshal(v, &s) != nil {
			s = strings.Trim(string(v), `"`)
		}
		pr.PromptID = s
	}
	if v, ok := raw["extra_data"]; ok && !isNull(v) {
		if extra == nil {
			var m map[string]json.RawMessage
			err := json.Unmarshal(v, &m)
			return nil, &BodyError{Status: 400, Body: NewPromptError("invalid_prompt",
				"extra_data must be an object", errString(err, "extra_data is not an object"))}
		}
		pr.ExtraData = make(map[string]json.RawMessage, len(extra))
		for _, m := range extra {
			pr.ExtraData[m.Key] = m.Value
		}
	}
	if v, ok := raw["front"]; ok {
		var b bool
		if json.Unmarshal(v, &b) == nil {
			pr.Front = b
		}
	}
	if v, ok := raw["number"]; ok && !isNull(v) {
		var f float64
		if json.Unmarshal(v, &f) == nil {
			pr.Number = &f
		}
	}
	return pr, nil
}

// parseNode reads a node of a valid prompt the way encoding/json reads it
// into a map of raw members (the last of a repeated key counts), then its
// class_type into a string and its inputs into a map, without reflection:
// a graph from the frontend has hundreds of nodes. The values are b's own
// bytes, not copies (as the body's other parts are).
func parseNode(b json.RawMessage) (Node, error) {
	members, ok := ObjectMembers(b)
	if !ok {
		return Node{}, errBadMetadata
	}
	var n Node
	var class, inputs json.RawMessage
	for _, m := range members {
		switch m.Key {
		case "class_type":
			class = m.Value
		case "inputs":
			inputs = m.Value
		case "_meta":
			n.Meta = m.Value
		default:
			if n.Extra == nil {
				n.Extra = map[string]json.RawMessage{}
			}
			n.Extra[m.Key] = m.Value
		}
	}
	// class_type must be a string, not empty (null reads as "").
	if len(class) < 3 || class[0] != '"' {
		return Node{}, errBadMetadata
	}
	n.ClassType = unquote(class)
	if inputs != nil && !isNull(inputs) {
		in, ok := ObjectMembers(inputs)
		if !ok {
			return Node{}, errBadMetadata
		}
		n.Inputs = make(map[string]json.RawMessage, len(in))
		for _, m := range in {
			n.Inputs[m.Key] = m.Value
		}
	} else {
		n.Inputs = map[string]json.RawMessage{}
	}
	return n, nil
}

// MarshalJSON writes the node with its extra keys.
func (n Node) MarshalJSON() ([]byte, error) {
	return n.appendJSON(nil)
}

// AppendPrompt appends prompt as json.Marshal writes it — node ids sorted,
// each node's members sorted, values compacted, strings with <, > and &
// escaped — without reflection or maps: a prompt is encoded twice per job
// (the record, the body sent on).
func AppendPrompt(dst []byte, prompt map[string]Node) ([]byte, error) {
	return appendSortedObject(dst, prompt, func(dst []byte, n Node) ([]byte, error) { return n.appendJSON(dst) })
}

// appendSortedObject appends m as json.Marshal writes a map: null for nil,
// else its keys sorted, each value as appendValue writes it.
func appendSortedObject[V any](dst []byte, m map[string]V, appendValue func([]byte, V) ([]byte, error)) ([]byte, error) {
	if m == nil {
		return append(dst, "null"...), nil
	}
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	return appendMembers(dst, keys, func(dst []byte, k string) ([]byte, error) { return appendValue(dst, m[k]) })
}

// appendMembers appends an object of keys, in their order, each value as
// appendValue writes the key's.
func appendMembers(dst []byte, keys []string, appendValue func([]byte, string) ([]byte, error)) ([]byte, error) {
	dst = append(dst, '{')
	var err error
	for i, k := range keys {
		if i > 0 {
			dst = append(dst, ',')
		}
		dst = appendMarshaledString(dst, k)
		dst = append(dst, ':')
		if dst, err = appendValue(dst, k); err != nil {
			return nil, err
		}
	}
	return append(dst, '}'), nil
}

// appendJSON appends the node as MarshalJSON did with maps: its members
// (Extra, then class_type, inputs and _meta over them) sorted by key.
func (n Node) appendJSON(dst []byte) ([]byte, error) {
	keys := make([]string, 0, 3+len(n.Extra))
	for k := range n.Extra {
		switch {
		case k == "class_type" || k == "inputs":
		case k == "_meta" && len(n.Meta) > 0:
		default:
			keys = append(keys, k)
		}
	}
	keys = append(keys, "class_type", "inputs")
	if len(n.Meta) > 0 {
		keys = append(keys, "_meta")
	}
	sort.Strings(keys)
	return appendMembers(dst, keys, func(dst []byte, k string) ([]byte, error) {
		switch {
		case k == "class_type":
			return appendMarshaledString(dst, n.ClassType), nil
		case k == "inputs":
			return appendSortedObject(dst, n.Inputs, appendCompact)
		case k == "_meta" && len(n.Meta) > 0:
			return appendCompact(dst, n.Meta)
		}
		return appendCompact(dst, n.Extra[k])
	})
}

// appendMarshaledString appends s as json.Marshal writes a string.
func appendMarshaledString(dst []byte, s string) []byte {
	for i := 0; i < len(s); i++ {
		if c := s[i]; c < 0x20 || c >= 0x7f || c == '"' || c == '\\' || c == '<' || c == '>' || c == '&' {
			b, _ := json.Marshal(s)
			return append(dst, b...)
		}
	}
	dst = append(dst, '"')
	dst = append(dst, s...)
	return append(dst, '"')
}

// appendCompact appends the JSON value v as json.Marshal writes a
// json.RawMessage: compacted, with <, >, &, U+2028 and U+2029 escaped.
func appendCompact(dst []byte, v json.RawMessage) ([]byte, error) {
	if v == nil {
		return append(dst, "null"...), nil
	}
	start := len(dst)
	buf := bytes.NewBuffer(dst)
	if err := json.Compact(buf, v); err != nil {
		return nil, err
	}
	dst = buf.Bytes()
	if bytes.ContainsAny(dst[start:], "<>&\u2028\u2029") {
		seg := bytes.Clone(dst[start:])
		buf = bytes.NewBuffer(dst[:start])
		json.HTMLEscape(buf, seg)
		dst = buf.Bytes()
	}
	return dst, nil
}

// Body re-encodes the request with the given prompt_id and client_id, the
// (possibly rewritten) prompt, and every other key as the client sent it.
// Keys listed in drop are removed from extra_data.
func (pr *PromptRequest) Body(promptID, clientID string, dropExtra ...string) ([]byte, error) {
	parts, err := pr.BodyParts(promptID, clientID, dropExtra...)
	if err != nil {
		return nil, err
	}
	return bytes.Join(parts, nil), nil
}

// sharedPart is the size from which BodyParts hands on a value of the
// request as it is instead of copying it.
const sharedPart = 1 << 10

// BodyParts is Body as pieces to be sent one after the other. Values of
// the request of a KiB or more (the UI workflow: often megabytes) are not
// copied: their parts share the bytes the request was parsed from, which
// must stay unchanged until the body is sent.
func (pr *PromptRequest) BodyParts(promptID, clientID string, dropExtra ...string) ([][]byte, error) {
	p, err := AppendPrompt(nil, pr.Prompt)
	if err != nil {
		return nil, err
	}
	var b bodyParts
	b.cur = make([]byte, 0, 256)
	b.cur = append(b.cur, '{')
	b.cur = appendKey(b.cur, "prompt")
	b.add(p)
	id, _ := json.Marshal(promptID)
	b.cur = append(b.cur, ',')
	b.cur = appendKey(b.cur, "prompt_id")
	b.cur = append(b.cur, id...)
	cid, _ := json.Marshal(clientID)
	b.cur = append(b.cur, ',')
	b.cur = appendKey(b.cur, "client_id")
	b.cur = append(b.cur, cid...)
	// ComfyUI fails with a 500 on "extra_data": null: left out when nil.
	if pr.ExtraData != nil {
		b.cur = append(b.cur, ',')
		b.cur = appendKey(b.cur, "extra_data")
		// As AppendObject writes it: keys sorted, values as sent.
		keys := make([]string, 0, len(pr.ExtraData))
		for k := range pr.ExtraData {
			if !slices.Contains(dropExtra, k) {
				keys = append(keys, k)
			}
		}
		sort.Strings(keys)
		b.cur = append(b.cur, '{')
		for i, k := range keys {
			if i > 0 {
				b.cur = append(b.cur, ',')
			}
			b.cur = appendKey(b.cur, k)
			b.add(pr.ExtraData[k])
		}
		b.cur = append(b.cur, '}')
	}
	keys := make([]string, 0, len(pr.Raw))
	for k := range pr.Raw {
		switch k {
		case "prompt", "prompt_id", "client_id", "extra_data":
		default:
			keys = append(keys, k)
		}
	}
	sort.Strings(keys)
	for _, k := range keys {
		b.cur = append(b.cur, ',')
		b.cur = appendKey(b.cur, k)
		b.add(pr.Raw[k])
	}
	b.cur = append(b.cur, '}')
	return append(b.done, b.cur), nil
}

// bodyParts collects a body: small pieces are copied into cur, large
// values become parts of their own.
type bodyParts struct {
	done [][]byte
	cur  []byte
}

func (b *bodyParts) add(v []byte) {
	if len(v) < sharedPart {
		b.cur = append(b.cur, v...)
		return
	}
	if len(b.cur) > 0 {
		b.done = append(b.done, b.cur)
		b.cur = make([]byte, 0, 256)
	}
	b.done = append(b.done, v)
}

// ExtraDataWithout returns a copy of extra_data without the given keys.
func (pr *PromptRequest) ExtraDataWithout(keys ...string) map[string]json.RawMessage {
	if pr.ExtraData == nil {
		return nil
	}
	ed := make(map[string]json.RawMessage, len(pr.ExtraData))
	for k, v := range pr.ExtraData {
		ed[k] = v
	}
	for _, k := range keys {
		delete(ed, k)
	}
	return ed
}

// SensitiveExtraData are the extra_data keys ComfyUI never shows in its queue,
// history or jobs responses (comfy.org credentials).
var SensitiveExtraData = []string{"auth_token_comfy_org", "api_key_comfy_org"}

func isNull(b json.RawMessage) bool {
	return len(bytes.TrimSpace(b)) == 0 || string(bytes.TrimSpace(b)) == "null"
}

func errString(err error, def string) string {
	if err != nil {
		return err.Error()
	}
	return def
}

// LinkSource reads an input value that links another node's output —
// ["<node id>", <slot>] — and returns the node id. Nothing is decoded but
// that id: a list value of millions of items (a user's to send) costs one
// scan, where decoding it cost a copy of each item.
func LinkSource(raw []byte) (string, bool) {
	i := skipSpace(raw, 0)
	if i >= len(raw) || raw[i] != '[' {
		return "", false
	}
	i = skipSpace(raw, i+1)
	if i >= len(raw) || raw[i] != '"' {
		return "", false
	}
	e := validString(raw, i)
	if e < 0 {
		return "", false
	}
	src := raw[i:e]
	if i = skipSpace(raw, e); i >= len(raw) || raw[i] != ',' {
		return "", false
	}
	if e = validValue(raw, skipSpace(raw, i+1), 1); e < 0 {
		return "", false
	}
	if i = skipSpace(raw, e); i >= len(raw) || raw[i] != ']' || skipSpace(raw, i+1) != len(raw) {
		return "", false
	}
	return unquote(src), true
}
