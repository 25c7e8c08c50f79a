package comfy

// A GPU server sends thousands of JSON events per job, and the gateway
// needs only a handful of their fields to route them: the type, the
// prompt_id and the node. ScanEvent reads those from the frame's bytes in
// one pass, without decoding the rest into Go values, so that the frame
// can be forwarded as it came. The pass is the gateway's main cost per
// event: it calls no function per member, compares the keys it reads in
// place, and reads strings 8 bytes at a time (rawjson.go).

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
	return ScanEventLike(b, &Head{PromptID: known})
}

// ScanEventLike is ScanEvent for a reader that keeps the Head of the
// stream's last event: a prompt_id, node or display_node equal to last's
// is returned as last's own string, not a copy (a GPU server's stream
// names the same job and node over and over; a node id of more than one
// byte would otherwise cost an allocation per frame).
func ScanEventLike(b []byte, last *Head) (Head, bool) {
	var where headSpans
	return scanHead(b, last, &where)
}

// headSpans are where the values a Head is read from lie in a frame: the
// type, data.prompt_id, data.node and data.display_node (the last
// members of those names, as the Head reads them).
type headSpans [4]span

// scanHead is ScanEventLike, also setting where the Head's values lie.
func scanHead(b []byte, last *Head, where *headSpans) (Head, bool) {
	var h Head
	// One pass: the members of data are picked while it is validated.
	var typ, data span
	var f dataFields
	i := skipSpace(b, 0)
	if i >= len(b) || b[i] != '{' {
		return h, false
	}
	if i = skipSpace(b, i+1); i < len(b) && b[i] == '}' {
		i++
	} else {
		for {
			name, at := memberKey(b, i)
			if at < 0 {
				return h, false
			}
			var e int
			switch name {
			case nameType:
				e = typ.scan(b, at, 1)
			case nameData:
				// The last "data" counts, as in encoding/json.
				f = dataFields{}
				if b[at] == '{' {
					e = f.scan(b, at)
				} else {
					e = validValue(b, at, 1)
				}
				data = span{at: at, end: e}
			default:
				e = validValue(b, at, 1)
			}
			if e < 0 {
				return h, false
			}
			if i = skipSpace(b, e); i >= len(b) {
				return h, false
			}
			if b[i] == '}' {
				i++
				break
			}
			if b[i] != ',' {
				return h, false
			}
			i = skipSep(b, i+1)
		}
	}
	if skipSpace(b, i) != len(b) {
		return h, false
	}
	if typ.end == 0 || b[typ.at] != '"' || typ.end-typ.at < 3 {
		return h, false
	}
	*where = headSpans{typ, f.promptID, f.node, f.displayNode}
	h.Type = messageType(b[typ.at:typ.end])
	if data.end == 0 || b[data.at] == 'n' {
		return h, true
	}
	if b[data.at] != '{' {
		return h, false
	}
	if pid := f.promptID; pid.end != 0 {
		switch b[pid.at] {
		case '"':
			h.PromptID = pid.strLike(b, last.PromptID)
			h.PromptIDStart, h.PromptIDEnd = pid.at, pid.end
		case 'n':
		default:
			return h, false
		}
	}
	if disp := f.displayNode; disp.end != 0 {
		switch b[disp.at] {
		case '"':
			h.DisplayNode = disp.strLike(b, last.DisplayNode)
		case 'n':
		default:
			return h, false
		}
	}
	if node := f.node; node.end != 0 {
		switch b[node.at] {
		case '"':
			h.NodeKind, h.Node = NodeString, node.strLike(b, last.Node)
		case 'n':
			h.NodeKind = NodeNull
		default:
			h.NodeKind = NodeOther
		}
	}
	return h, true
}

// span is where a member's value is in a frame: b[at:end]; end is 0 when
// there is no such member.
type span struct {
	at, end int
	plain   bool // a string that decodes to its content as it is
}

// scan checks the value at b[at], which depth containers enclose, and
// records it.
func (s *span) scan(b []byte, at, depth int) int {
	var e int
	plain := false
	if b[at] == '"' {
		e, plain = scanString(b, at)
	} else {
		e = validValue(b, at, depth)
	}
	*s = span{at, e, plain}
	return e
}

// str decodes the string value s spans.
// strLike is str, returning prev itself when the string equals it.
func (s span) strLike(b []byte, prev string) string {
	if s.plain && string(b[s.at+1:s.end-1]) == prev {
		return prev
	}
	return s.str(b)
}

func (s span) str(b []byte) string {
	if s.plain {
		return string(b[s.at+1 : s.end-1])
	}
	return unquote(b[s.at:s.end])
}

// dataFields are the members of an event's data the gateway reads.
type dataFields struct{ promptID, node, displayNode span }

// scan checks the object data at b[i] ('{') and records its members.
func (f *dataFields) scan(b []byte, i int) int {
	if i = skipSpace(b, i+1); i < len(b) && b[i] == '}' {
		return i + 1
	}
	for {
		name, at := memberKey(b, i)
		if at < 0 {
			return -1
		}
		var e int
		switch name {
		case namePromptID:
			e = f.promptID.scan(b, at, 2)
		case nameNode:
			e = f.node.scan(b, at, 2)
		case nameDisplayNode:
			e = f.displayNode.scan(b, at, 2)
		default:
			e = validValue(b, at, 2)
		}
		if e < 0 {
			return -1
		}
		if i = skipSpace(b, e); i >= len(b) {
			return -1
		}
		if b[i] == '}' {
			return i + 1
		}
		if b[i] != ',' {
			return -1
		}
		i = skipSep(b, i+1)
	}
}

// memberKey checks `"key" :` at b[i] and returns which of the names
// ScanEvent reads the key is, and the start of its value (< len(b)) or -1.
func memberKey(b []byte, i int) (name, at int) {
	if i >= len(b) || b[i] != '"' {
		return 0, -1
	}
	// The names as ComfyUI sends them are compared in place; other keys
	// are scanned, and decoded if they have escapes.
	name, at = nameOther, 0
	if n := len(b) - i; n > 1 {
		switch b[i+1] {
		case 't':
			if n >= 6 && string(b[i:i+6]) == `"type"` {
				name, at = nameType, i+6
			}
		case 'd':
			if n >= 6 && string(b[i:i+6]) == `"data"` {
				name, at = nameData, i+6
			} else if n >= 14 && string(b[i:i+14]) == `"display_node"` {
				name, at = nameDisplayNode, i+14
			}
		case 'p':
			if n >= 11 && string(b[i:i+11]) == `"prompt_id"` {
				name, at = namePromptID, i+11
			}
		case 'n':
			if n >= 6 && string(b[i:i+6]) == `"node"` {
				name, at = nameNode, i+6
			}
		}
	}
	if at == 0 {
		var plain bool
		if at, plain = scanString(b, i); at < 0 {
			return 0, -1
		}
		if !plain {
			name = memberName(unquote(b[i:at]))
		}
	}
	if at = skipSpace(b, at); at >= len(b) || b[at] != ':' {
		return 0, -1
	}
	if at = skipSep(b, at+1); at >= len(b) {
		return 0, -1
	}
	return name, at
}

// The member names ScanEvent reads.
const (
	nameOther = iota
	nameType
	nameData
	namePromptID
	nameNode
	nameDisplayNode
)

// memberName tells which of the names ScanEvent reads a decoded key is.
func memberName(key string) int {
	switch key {
	case "type":
		return nameType
	case "data":
		return nameData
	case "prompt_id":
		return namePromptID
	case "node":
		return nameNode
	case "display_node":
		return nameDisplayNode
	}
	return nameOther
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
