package comfy

// A GPU server sends thousands of JSON events per job, and the gateway
// needs only a handful of their fields to route them: the type, the
// prompt_id and the node. ScanEvent reads those from the frame's bytes in
// one pass, without decoding the rest into Go values, so that the frame
// can be forwarded as it came.

// NodeKind says what an event's data.node is.
type NodeKind uint8

// Kinds of data.node.
const (
	NodeAbsent NodeKind = iota // no "node" member
	NodeNull                   // "node": null (executing's end-of-job marker)
	NodeString                 // "node": "<id>"
	NodeOther                  // a number, object, ...: not a node id
)

// Head is what the gateway reads of a JSON event frame
// {"type": ..., "data": {...}}.
type Head struct {
	// Type is the message type (never empty).
	Type string
	// PromptID is data.prompt_id ("" when absent or null).
	PromptID string
	// PromptIDStart and PromptIDEnd delimit data.prompt_id's string value,
	// quotes included, in the frame (both 0 when there is none).
	PromptIDStart, PromptIDEnd int
	// Node is data.node when NodeKind is NodeString.
	Node     string
	NodeKind NodeKind
	// DisplayNode is data.display_node ("" when absent or null).
	DisplayNode string
}

// ScanEvent reads the Head of a text frame. It reports false unless the
// frame is valid JSON (as encoding/json defines it) and an object whose
// "type" is a non-empty string and whose "data" is absent, null or an
// object in which prompt_id and display_node are strings or null. Keys
// match exactly (escapes decoded); of a repeated key the last counts.
func ScanEvent(b []byte) (Head, bool) { return ScanEventKnown(b, "") }

// ScanEventKnown is ScanEvent for a reader that expects a prompt_id:
// a prompt_id equal to known is returned as known itself, not a copy (a
// GPU server's stream names the same job thousands of times).
func ScanEventKnown(b []byte, known string) (Head, bool) {
	var h Head
	// One pass: the members of data are picked while it is validated.
	absent := [2]int{-1, -1}
	typ, data, pid, node, disp := absent, absent, absent, absent, absent // value bounds
	inData := func(key []byte, at int) int {
		e := validValue(b, at, 2)
		switch {
		case keyIs(key, "prompt_id"):
			pid = [2]int{at, e}
		case keyIs(key, "node"):
			node = [2]int{at, e}
		case keyIs(key, "display_node"):
			disp = [2]int{at, e}
		}
		return e
	}
	end := walkObject(b, skipSpace(b, 0), 0, func(key []byte, at int) int {
		if !keyIs(key, "data") {
			e := validValue(b, at, 1)
			if keyIs(key, "type") {
				typ = [2]int{at, e}
			}
			return e
		}
		// The last "data" counts, as in encoding/json.
		pid, node, disp = absent, absent, absent
		var e int
		if b[at] == '{' {
			e = walkObject(b, at, 1, inData)
		} else {
			e = validValue(b, at, 1)
		}
		data = [2]int{at, e}
		return e
	})
	if end < 0 || skipSpace(b, end) != len(b) {
		return h, false
	}
	if typ[0] < 0 || b[typ[0]] != '"' || typ[1]-typ[0] < 3 {
		return h, false
	}
	h.Type = messageType(b[typ[0]:typ[1]])
	if data[0] < 0 || b[data[0]] == 'n' {
		return h, true
	}
	if b[data[0]] != '{' {
		return h, false
	}
	if pid[0] >= 0 {
		switch b[pid[0]] {
		case '"':
			if raw := b[pid[0]+1 : pid[1]-1]; known != "" && string(raw) == known && plainASCII(raw) {
				h.PromptID = known
			} else {
				h.PromptID = unquote(b[pid[0]:pid[1]])
			}
			h.PromptIDStart, h.PromptIDEnd = pid[0], pid[1]
		case 'n':
		default:
			return h, false
		}
	}
	if disp[0] >= 0 {
		switch b[disp[0]] {
		case '"':
			h.DisplayNode = unquote(b[disp[0]:disp[1]])
		case 'n':
		default:
			return h, false
		}
	}
	if node[0] >= 0 {
		switch b[node[0]] {
		case '"':
			h.NodeKind, h.Node = NodeString, unquote(b[node[0]:node[1]])
		case 'n':
			h.NodeKind = NodeNull
		default:
			h.NodeKind = NodeOther
		}
	}
	return h, true
}

// WithPromptID returns the frame with its data.prompt_id set to id: a new
// slice, the rest of the bytes as they were. A frame without a prompt_id
// is returned as is.
func (h Head) WithPromptID(frame []byte, id string) []byte {
	if h.PromptIDEnd == 0 {
		return frame
	}
	out := make([]byte, 0, len(frame)-(h.PromptIDEnd-h.PromptIDStart)+len(id)+2)
	out = append(out, frame[:h.PromptIDStart]...)
	out = AppendQuoted(out, id)
	return append(out, frame[h.PromptIDEnd:]...)
}

// AppendQuoted appends s as a JSON string.
func AppendQuoted(dst []byte, s string) []byte {
	const hex = "0123456789abcdef"
	dst = append(dst, '"')
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch {
		case c == '"' || c == '\\':
			dst = append(dst, '\\', c)
		case c < 0x20:
			dst = append(dst, '\\', 'u', '0', '0', hex[c>>4], hex[c&0xf])
		default:
			dst = append(dst, c)
		}
	}
	return append(dst, '"')
}

// messageType returns a quoted type as a string, without allocating for
// the types ComfyUI sends.
func messageType(q []byte) string {
	switch string(q[1 : len(q)-1]) {
	case MsgProgress:
		return MsgProgress
	case MsgProgressState:
		return MsgProgressState
	case MsgExecuting:
		return MsgExecuting
	case MsgExecuted:
		return MsgExecuted
	case MsgExecutionStart:
		return MsgExecutionStart
	case MsgExecutionCached:
		return MsgExecutionCached
	case MsgExecutionSuccess:
		return MsgExecutionSuccess
	case MsgExecutionError:
		return MsgExecutionError
	case MsgExecutionInterrupted:
		return MsgExecutionInterrupted
	case MsgStatus:
		return MsgStatus
	}
	return unquote(q)
}
