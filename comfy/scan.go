package comfy

import (
	"unicode/utf16"
	"unicode/utf8"
)

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
func ScanEvent(b []byte) (Head, bool) {
	var h Head
	i := skipSpace(b, 0)
	if i >= len(b) || b[i] != '{' {
		return h, false
	}
	// One pass: the members of data are picked while it is validated.
	var typ, data, pid, node, disp [2]int // value bounds; [0] < 0: absent
	typ[0], data[0] = -1, -1
	inData := func(key []byte, vs, ve int) bool {
		switch {
		case keyIs(key, "prompt_id"):
			pid = [2]int{vs, ve}
		case keyIs(key, "node"):
			node = [2]int{vs, ve}
		case keyIs(key, "display_node"):
			disp = [2]int{vs, ve}
		}
		return true
	}
	i = skipSpace(b, i+1)
	if i < len(b) && b[i] == '}' {
		return h, false // no type
	}
	for {
		if i >= len(b) || b[i] != '"' {
			return h, false
		}
		ke, ok := scanString(b, i)
		if !ok {
			return h, false
		}
		key := b[i:ke]
		i = skipSpace(b, ke)
		if i >= len(b) || b[i] != ':' {
			return h, false
		}
		i = skipSpace(b, i+1)
		var ve int
		if keyIs(key, "data") {
			// The last "data" counts, as in encoding/json.
			pid, node, disp = [2]int{-1, -1}, [2]int{-1, -1}, [2]int{-1, -1}
			if i < len(b) && b[i] == '{' {
				ve, ok = scanObject(b, i, 2, inData)
			} else {
				ve, ok = scanValue(b, i, 1)
			}
			data = [2]int{i, ve}
		} else {
			ve, ok = scanValue(b, i, 1)
			if keyIs(key, "type") {
				typ = [2]int{i, ve}
			}
		}
		if !ok {
			return h, false
		}
		i = skipSpace(b, ve)
		if i >= len(b) {
			return h, false
		}
		if b[i] == '}' {
			break
		}
		if b[i] != ',' {
			return h, false
		}
		i = skipSpace(b, i+1)
	}
	if skipSpace(b, i+1) != len(b) {
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
			h.PromptID = unquote(b[pid[0]:pid[1]])
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

// keyIs reports whether a quoted key, decoded, is want.
func keyIs(q []byte, want string) bool {
	raw := q[1 : len(q)-1]
	for _, c := range raw {
		if c == '\\' {
			return unquote(q) == want
		}
	}
	return string(raw) == want
}

// scanObject validates the object starting at b[i] ('{'), calling f with
// each member's quoted key and value bounds, and returns the index just
// past it. depth counts the containers open, this one included.
func scanObject(b []byte, i, depth int, f func(key []byte, vs, ve int) bool) (int, bool) {
	if depth > maxDepth {
		return 0, false
	}
	i = skipSpace(b, i+1)
	if i < len(b) && b[i] == '}' {
		return i + 1, true
	}
	for {
		if i >= len(b) || b[i] != '"' {
			return 0, false
		}
		ke, ok := scanString(b, i)
		if !ok {
			return 0, false
		}
		key := b[i:ke]
		i = skipSpace(b, ke)
		if i >= len(b) || b[i] != ':' {
			return 0, false
		}
		i = skipSpace(b, i+1)
		ve, ok := scanValue(b, i, depth)
		if !ok {
			return 0, false
		}
		if f != nil && !f(key, i, ve) {
			return ve, true
		}
		i = skipSpace(b, ve)
		if i >= len(b) {
			return 0, false
		}
		switch b[i] {
		case ',':
			i = skipSpace(b, i+1)
		case '}':
			return i + 1, true
		default:
			return 0, false
		}
	}
}

// scanArray validates the array starting at b[i] ('[').
func scanArray(b []byte, i, depth int) (int, bool) {
	if depth > maxDepth {
		return 0, false
	}
	i = skipSpace(b, i+1)
	if i < len(b) && b[i] == ']' {
		return i + 1, true
	}
	for {
		e, ok := scanValue(b, i, depth)
		if !ok {
			return 0, false
		}
		i = skipSpace(b, e)
		if i >= len(b) {
			return 0, false
		}
		switch b[i] {
		case ',':
			i = skipSpace(b, i+1)
		case ']':
			return i + 1, true
		default:
			return 0, false
		}
	}
}

// scanValue validates the value starting at b[i] and returns the index
// just past it. depth counts the containers around it.
func scanValue(b []byte, i, depth int) (int, bool) {
	if i >= len(b) {
		return 0, false
	}
	switch c := b[i]; {
	case c == '"':
		return scanString(b, i)
	case c == '{':
		return scanObject(b, i, depth+1, nil)
	case c == '[':
		return scanArray(b, i, depth+1)
	case c == 't':
		return scanLiteral(b, i, "true")
	case c == 'f':
		return scanLiteral(b, i, "false")
	case c == 'n':
		return scanLiteral(b, i, "null")
	case c == '-' || (c >= '0' && c <= '9'):
		return scanNumber(b, i)
	}
	return 0, false
}

func scanLiteral(b []byte, i int, word string) (int, bool) {
	if len(b)-i < len(word) || string(b[i:i+len(word)]) != word {
		return 0, false
	}
	return i + len(word), true
}

// scanNumber validates -?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?.
func scanNumber(b []byte, i int) (int, bool) {
	if b[i] == '-' {
		i++
	}
	switch {
	case i < len(b) && b[i] == '0':
		i++
	case i < len(b) && b[i] >= '1' && b[i] <= '9':
		i = digits(b, i+1)
	default:
		return 0, false
	}
	if i < len(b) && b[i] == '.' {
		j := digits(b, i+1)
		if j == i+1 {
			return 0, false
		}
		i = j
	}
	if i < len(b) && (b[i] == 'e' || b[i] == 'E') {
		i++
		if i < len(b) && (b[i] == '+' || b[i] == '-') {
			i++
		}
		j := digits(b, i)
		if j == i {
			return 0, false
		}
		i = j
	}
	return i, true
}

func digits(b []byte, i int) int {
	for i < len(b) && b[i] >= '0' && b[i] <= '9' {
		i++
	}
	return i
}

// scanString validates the string starting at b[i] ('"') and returns the
// index just past its closing quote.
func scanString(b []byte, i int) (int, bool) {
	for j := i + 1; j < len(b); j++ {
		switch c := b[j]; {
		case c == '"':
			return j + 1, true
		case c < 0x20:
			return 0, false
		case c == '\\':
			j++
			if j >= len(b) {
				return 0, false
			}
			switch b[j] {
			case '"', '\\', '/', 'b', 'f', 'n', 'r', 't':
			case 'u':
				if len(b)-j < 5 || hex4(b[j+1:j+5]) < 0 {
					return 0, false
				}
				j += 4
			default:
				return 0, false
			}
		}
	}
	return 0, false
}

// hex4 decodes 4 hex digits, or returns -1.
func hex4(b []byte) rune {
	var r rune
	for _, c := range b[:4] {
		switch {
		case c >= '0' && c <= '9':
			c -= '0'
		case c >= 'a' && c <= 'f':
			c = c - 'a' + 10
		case c >= 'A' && c <= 'F':
			c = c - 'A' + 10
		default:
			return -1
		}
		r = r*16 + rune(c)
	}
	return r
}

// unquote decodes a validated JSON string (quotes included) the way
// encoding/json does: invalid UTF-8 and unpaired surrogates become U+FFFD.
func unquote(q []byte) string {
	s := q[1 : len(q)-1]
	plain := true
	for _, c := range s {
		if c == '\\' || c >= utf8.RuneSelf {
			plain = false
			break
		}
	}
	if plain {
		return string(s)
	}
	out := make([]byte, 0, len(s)+8)
	for i := 0; i < len(s); {
		c := s[i]
		switch {
		case c == '\\':
			switch s[i+1] {
			case 'b':
				out = append(out, '\b')
			case 'f':
				out = append(out, '\f')
			case 'n':
				out = append(out, '\n')
			case 'r':
				out = append(out, '\r')
			case 't':
				out = append(out, '\t')
			case 'u':
				r := hex4(s[i+2:])
				i += 6
				if utf16.IsSurrogate(r) {
					if len(s)-i >= 6 && s[i] == '\\' && s[i+1] == 'u' {
						if r2 := hex4(s[i+2:]); r2 >= 0 {
							if d := utf16.DecodeRune(r, r2); d != utf8.RuneError {
								out = utf8.AppendRune(out, d)
								i += 6
								continue
							}
						}
					}
					r = utf8.RuneError
				}
				out = utf8.AppendRune(out, r)
				continue
			default: // '"', '\\', '/'
				out = append(out, s[i+1])
			}
			i += 2
		case c < utf8.RuneSelf:
			out = append(out, c)
			i++
		default:
			r, n := utf8.DecodeRune(s[i:])
			if r == utf8.RuneError && n == 1 {
				out = utf8.AppendRune(out, utf8.RuneError)
			} else {
				out = append(out, s[i:i+n]...)
			}
			i += n
		}
	}
	return string(out)
}
